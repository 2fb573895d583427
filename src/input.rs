//! Files zmoe reads (config.json, tokenizer.json, safetensors shards, capsules, ledgers,
//! packs): regular files only.
//!
//! Why: opening a named pipe for reading blocks until something writes to it, and a device
//! such as `/dev/zero` never ends, so a model folder with a pipe where a shard or config.json
//! should be hung zmoe forever. The type is checked before the file is opened (following
//! symbolic links: model caches link every file to a blob, as the HuggingFace cache does),
//! and again on the opened handle.

use std::fs::{File, FileType, Metadata};
use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// What a non-regular file is, for messages (`a named pipe`, `a folder`, ...).
pub fn kind(ft: &FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return "a named pipe";
        }
        if ft.is_socket() {
            return "a socket";
        }
        if ft.is_char_device() || ft.is_block_device() {
            return "a device";
        }
    }
    if ft.is_dir() {
        "a folder"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

/// The error for reading `path` that is not a regular file.
fn not_regular(path: &Path, m: &Metadata) -> Error {
    Error::format(path, format!("is {}, not a regular file; zmoe reads only regular files", kind(&m.file_type())))
}

/// Checks that `path` (after following symbolic links) is a regular file, without opening it.
pub fn check_regular(path: &Path) -> Result<()> {
    let m = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if m.is_file() { Ok(()) } else { Err(not_regular(path, &m)) }
}

/// Opens a regular file for reading; anything else (a pipe, a device, a folder) is refused
/// with an error naming it, before it is opened.
pub fn open(path: &Path) -> Result<File> {
    check_regular(path)?;
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let m = f.metadata().map_err(|e| Error::io(path, e))?;
    if !m.is_file() {
        return Err(not_regular(path, &m));
    }
    Ok(f)
}

/// Reads a whole regular file (see [`open`]).
pub fn read(path: &Path) -> Result<Vec<u8>> {
    let mut f = open(path)?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).map_err(|e| Error::io(path, e))?;
    Ok(buf)
}

/// Reads a whole regular file as UTF-8 text (see [`open`]).
pub fn read_to_string(path: &Path) -> Result<String> {
    String::from_utf8(read(path)?).map_err(|e| Error::format(path, format!("not UTF-8 text ({e})")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_and_devices_are_refused_by_name() {
        let tmp = tempfile::tempdir().unwrap();
        let e = read(tmp.path()).unwrap_err().to_string();
        assert!(e.contains("is a folder, not a regular file"), "{e}");
        #[cfg(unix)]
        {
            let e = read(Path::new("/dev/zero")).unwrap_err().to_string();
            assert!(e.contains("/dev/zero: is a device"), "{e}");
        }
        let f = tmp.path().join("a.txt");
        std::fs::write(&f, "hi").unwrap();
        assert_eq!(read_to_string(&f).unwrap(), "hi");
        let e = read(&tmp.path().join("missing")).unwrap_err();
        assert!(matches!(&e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound), "{e}");
    }
}
