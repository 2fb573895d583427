//! Files zmoe writes for the user (capsules, pages, GGUFs): never replace what is there
//! without `--force`, and never leave half a file behind.
//!
//! Why one module: every command that writes a named output file must answer the same
//! three questions the same way — is the name a folder, does the file exist, does its folder
//! exist — before doing any work, and then write without a window in which a reader (or a
//! concurrent writer) sees half a file.

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

/// Checks an output path given with `flag` (e.g. `--out`) before any work is done: not a
/// folder, not an existing file unless `force`, in a folder that exists.
pub fn check_out_path(flag: &str, path: &Path, force: bool) -> Result<()> {
    let bad = |why: String| Err(Error::Arg(format!("{flag} {}: {why}", path.display())));
    if path.is_dir() {
        return bad("is a folder; give a file name".into());
    }
    if path.exists() && !force {
        return bad("file exists; pass --force to overwrite it".into());
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.is_dir()
    {
        return bad(format!("folder {} does not exist", parent.display()));
    }
    Ok(())
}

/// Writes `bytes` to `path`. Without `force` the file must not exist (checked atomically, so
/// a file created meanwhile is not replaced either); with `force` it is written beside the
/// target and renamed over it, so a reader never sees half a file.
pub fn write_new(flag: &str, path: &Path, bytes: &[u8], force: bool) -> Result<()> {
    if !force {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::Arg(format!("{flag} {}: file exists; pass --force to overwrite it", path.display()))
            } else {
                Error::io(path, e)
            }
        })?;
        return f.write_all(bytes).map_err(|e| Error::io(path, e));
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let result = std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_folders_existing_files_and_missing_folders() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("a.json");
        assert!(check_out_path("--out", &f, false).is_ok());
        write_new("--out", &f, b"one", false).unwrap();
        let e = check_out_path("--out", &f, false).unwrap_err().to_string();
        assert!(e.contains("--out") && e.contains("file exists"), "{e}");
        let e = write_new("--out", &f, b"two", false).unwrap_err().to_string();
        assert!(e.contains("file exists"), "{e}");
        assert_eq!(std::fs::read(&f).unwrap(), b"one");
        write_new("--out", &f, b"three", true).unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"three");
        assert!(check_out_path("--out", tmp.path(), true).unwrap_err().to_string().contains("is a folder"));
        let e = check_out_path("--json", &tmp.path().join("no/x.json"), false).unwrap_err().to_string();
        assert!(e.contains("--json") && e.contains("does not exist"), "{e}");
    }
}
