//! Files zmoe writes for the user (capsules, pages, packs, GGUFs): never replace what is there
//! without `--force`, never write through a symbolic link, and never leave half a file behind.
//!
//! Why one module: every command that writes a named output file must answer the same
//! questions the same way — is the name a folder or a link, does the file exist, does its
//! folder exist and take new files — before doing any (long) work, and then write without a
//! window in which a reader (or a concurrent writer) sees half a file.
//!
//! How a file is written: into a new temporary file beside the destination, with a random
//! name (`.<name>.zmoe-tmp-<random>`), created with `create_new` (`O_EXCL`: it never opens an
//! existing file, and never follows a link planted at that name); then renamed over the
//! destination with `--force`, or linked to it without (which fails if anything appeared
//! there meanwhile). A destination that is a symbolic link is refused, with or without
//! `--force`: writing through it would change the file it points to, and replacing it would
//! silently turn the user's link into a file. (Should a link appear between the check and the
//! rename, the rename replaces the link itself, never its target.)

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// 16 random hex digits for temporary names (not cryptographic: `create_new` makes a
/// collision or a planted file an error, never a write into someone else's file).
pub fn random_hex() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let local = 0u8;
    let seed = nanos
        ^ (u64::from(std::process::id()) << 32)
        ^ crate::rng::mix64(COUNTER.fetch_add(1, Ordering::Relaxed))
        ^ (&local as *const u8 as u64);
    format!("{:016x}", crate::rng::mix64(seed))
}

/// The folder holding `path` (`.` for a bare file name).
pub(crate) fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// `.<name><infix><suffix>` beside `path` (the name cut to 64 characters): the hidden
/// siblings zmoe writes through (temporary files, staging folders).
pub(crate) fn hidden_sibling(path: &Path, infix: &str, suffix: &str) -> PathBuf {
    let name = path.file_name().map_or("out".into(), |n| n.to_string_lossy().into_owned());
    let name: String = name.chars().take(64).collect();
    path.with_file_name(format!(".{name}{infix}{suffix}"))
}

/// `flag path: why` as an argument error.
fn arg(flag: &str, path: &Path, why: impl std::fmt::Display) -> Error {
    Error::Arg(format!("{flag} {}: {why}", path.display()))
}

/// The refusal for a destination that is a symbolic link.
fn link_refused(flag: &str, path: &Path) -> Error {
    arg(flag, path, "is a symbolic link; zmoe never writes through a link or replaces one (give the real path)")
}

/// Checks that new files can be created in `dir` by creating (and removing) one.
fn probe_folder(flag: &str, path: &Path, dir: &Path) -> Result<()> {
    let probe = dir.join(format!(".zmoe-probe-{}", random_hex()));
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(arg(flag, path, format!("cannot write in folder {}: {e}", dir.display()))),
    }
}

/// What may be at a destination file `path` (given with `flag`): nothing, or a regular file
/// when `force`; never a symbolic link, a folder or another non-regular file. Checked before
/// the work, before the temporary file is made and again when it is moved into place.
fn check_dest(flag: &str, path: &Path, force: bool) -> Result<()> {
    let Ok(m) = std::fs::symlink_metadata(path) else { return Ok(()) };
    let ft = m.file_type();
    if ft.is_symlink() {
        return Err(link_refused(flag, path));
    }
    if ft.is_dir() {
        return Err(arg(flag, path, "is a folder; give a file name"));
    }
    if !ft.is_file() {
        return Err(arg(flag, path, format!("is {}, not a regular file", crate::input::kind(&ft))));
    }
    if !force {
        return Err(arg(flag, path, "file exists; pass --force to overwrite it"));
    }
    Ok(())
}

/// Checks an output path given with `flag` (e.g. `--out`) before any work is done: not a
/// folder, not a symbolic link or another non-regular file, not an existing file unless
/// `force`, in a folder that exists and takes new files.
pub fn check_out_path(flag: &str, path: &Path, force: bool) -> Result<()> {
    check_dest(flag, path, force)?;
    let dir = folder_of(path);
    if !dir.is_dir() {
        return Err(arg(flag, path, format!("folder {} does not exist", dir.display())));
    }
    probe_folder(flag, path, dir)
}

/// Checks, before a long run, that the ledger `path` (given with `flag`) can be appended to:
/// a regular file (not a link, folder or pipe) that opens for appending, or a new file in a
/// folder that exists — or can be created — and takes new files.
pub fn check_appendable(flag: &str, path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(link_refused(flag, path)),
        Ok(m) if m.is_dir() => Err(arg(flag, path, "is a folder, not a file")),
        Ok(m) if !m.is_file() => {
            Err(arg(flag, path, format!("is {}, not a regular file", crate::input::kind(&m.file_type()))))
        }
        Ok(_) => match std::fs::OpenOptions::new().append(true).open(path) {
            Ok(_) => Ok(()),
            Err(e) => Err(arg(flag, path, format!("cannot append to it: {e}"))),
        },
        Err(_) => {
            // The nearest folder that exists is where the missing ones would be created.
            let mut dir = folder_of(path);
            while !dir.exists() {
                match dir.parent() {
                    Some(p) if !p.as_os_str().is_empty() => dir = p,
                    _ => {
                        dir = Path::new(".");
                        break;
                    }
                }
            }
            if !dir.is_dir() {
                return Err(arg(flag, path, format!("{} is not a folder", dir.display())));
            }
            probe_folder(flag, path, dir)
        }
    }
}

/// A new file beside a destination, with a random name, created with `create_new` (never an
/// existing file, never through a link); removed when dropped unless [`TempFile::commit`]ted.
pub struct TempFile {
    file: File,
    path: PathBuf,
    dest: PathBuf,
    flag: String,
    committed: bool,
}

impl TempFile {
    /// Creates the temporary file for `dest` (given with `flag`) in `dest`'s folder, after
    /// removing the temporary files killed runs left there (see [`clean_stale_temps`]).
    pub fn new(flag: &str, dest: &Path) -> Result<TempFile> {
        clean_stale_temps(folder_of(dest));
        let hex = random_hex();
        // Created under a name the cleanup ignores, locked, then renamed (a rename replaces a
        // link planted at the new name; it never follows it).
        let init = hidden_sibling(dest, ".zmoe-new-", &hex);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&init)
            .map_err(|e| arg(flag, dest, format!("cannot create {}: {e}", init.display())))?;
        let _ = file.try_lock();
        let path = hidden_sibling(dest, ".zmoe-tmp-", &hex);
        if let Err(e) = std::fs::rename(&init, &path) {
            let _ = std::fs::remove_file(&init);
            return Err(arg(flag, dest, format!("cannot create {}: {e}", path.display())));
        }
        Ok(TempFile { file, path, dest: dest.to_path_buf(), flag: flag.into(), committed: false })
    }

    /// The temporary file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file (`&File` is a writer; `try_clone` it to hand a writer away).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Syncs the file and moves it to its destination: over an existing regular file with
    /// `force`, only if nothing is there without it; a symbolic link, folder or other
    /// non-regular file at the destination is refused (see the module docs).
    pub fn commit(mut self, force: bool) -> Result<()> {
        self.file.sync_all().map_err(|e| Error::io(&self.path, e))?;
        let (flag, dest) = (self.flag.as_str(), self.dest.as_path());
        check_dest(flag, dest, force)?;
        if force {
            std::fs::rename(&self.path, dest).map_err(|e| Error::io(dest, e))?;
        } else {
            // A hard link fails if anything (even a dangling link) appeared at the destination.
            match std::fs::hard_link(&self.path, dest) {
                Ok(()) => {
                    let _ = std::fs::remove_file(&self.path);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(arg(flag, dest, "file exists; pass --force to overwrite it"));
                }
                // File systems without hard links: the check above, then a rename.
                Err(_) => std::fs::rename(&self.path, dest).map_err(|e| Error::io(dest, e))?,
            }
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Removes the temporary files killed runs left in `dir`: regular files named
/// `.<name>.zmoe-tmp-<16 hex digits>` that no running zmoe holds locked (a [`TempFile`] is
/// locked from its creation; the lock ends with its process). Best effort; without file
/// locks nothing is removed.
pub fn clean_stale_temps(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((head, hex)) = name.rsplit_once(".zmoe-tmp-") else { continue };
        let ours = head.starts_with('.') && hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit());
        if !ours || !e.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let Ok(f) = File::open(e.path()) else { continue };
        if f.try_lock().is_ok() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Writes `bytes` to `path` through a [`TempFile`]: without `force` the file must not exist
/// (checked atomically, so a file created meanwhile is not replaced either); with `force` an
/// existing regular file is replaced in one rename, so a reader never sees half a file.
pub fn write_new(flag: &str, path: &Path, bytes: &[u8], force: bool) -> Result<()> {
    check_dest(flag, path, force)?;
    let tmp = TempFile::new(flag, path)?;
    tmp.file().write_all(bytes).map_err(|e| Error::io(tmp.path(), e))?;
    tmp.commit(force)
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

    #[test]
    fn stale_temporary_files_of_killed_runs_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let stale = tmp.path().join(".a.json.zmoe-tmp-0123456789abcdef");
        std::fs::write(&stale, "half").unwrap();
        let mine = tmp.path().join(".a.json.zmoe-tmp-mine");
        std::fs::write(&mine, "mine").unwrap();
        let live = TempFile::new("--out", &tmp.path().join("b.json")).unwrap();
        write_new("--out", &tmp.path().join("a.json"), b"x", false).unwrap();
        assert!(!stale.exists(), "a killed run's temporary file is left");
        assert!(mine.exists() && live.path().exists(), "removed a file that is not stale");
        drop(live);
        let mut names: Vec<String> =
            std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, [".a.json.zmoe-tmp-mine", "a.json"]);
    }

    #[cfg(unix)]
    #[test]
    fn never_writes_through_a_planted_link() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, "secret").unwrap();
        // A link at the temporary name older builds used (`.<name>.<pid>.tmp`).
        let dest = tmp.path().join("a.json");
        std::os::unix::fs::symlink(&victim, tmp.path().join(format!(".a.json.{}.tmp", std::process::id()))).unwrap();
        write_new("--out", &dest, b"new", true).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"secret");
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        // The destination itself a link: refused, with or without --force.
        let link = tmp.path().join("b.json");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        for force in [false, true] {
            let e = write_new("--capsule", &link, b"new", force).unwrap_err().to_string();
            assert!(e.contains("--capsule") && e.contains("symbolic link"), "{e}");
            let e = check_out_path("--capsule", &link, force).unwrap_err().to_string();
            assert!(e.contains("symbolic link"), "{e}");
        }
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read(&victim).unwrap(), b"secret");
    }
}
