//! Folders zmoe writes (synthetic models, the demo and preset caches), and the only folders
//! `--force` replaces.
//!
//! Why a marker: "looks like a model folder" (it holds a config.json) is not "zmoe wrote it".
//! A user's project, the current folder or a downloaded model all hold a config.json, and
//! `zmoe synth --out . --force` once deleted such a folder. Every folder zmoe writes now
//! carries [`MARKER`] (`.zmoe-synth`), a small JSON naming what wrote it and every file it put
//! there. `--force` replaces a folder only if it has that marker and nothing but the files the
//! marker lists; never `.`, `..`, `/`, the home folder, the current folder or a folder that
//! contains it, and never a symbolic link.
//!
//! Why build beside: the new folder is written into a hidden sibling
//! (`.<name>.zmoe-partial-<random>`) and swapped in only when it is complete: the old folder
//! is renamed aside (`.<name>.zmoe-old-<random>`), the new one renamed in, and then the old
//! one's listed files are deleted. A failed run leaves the old folder as it was. Staging
//! folders carry the marker from their first moment, locked while their writer runs, so the
//! next write into the same parent folder can tell the leftovers of a killed run (marker
//! unlocked) from a run in progress, and removes them — only if they hold nothing but files
//! zmoe writes.

use std::fs::File;
use std::io::{Seek, Write};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The marker file's name inside every folder zmoe writes.
pub const MARKER: &str = ".zmoe-synth";

/// The marker's `kind`.
pub const MARKER_KIND: &str = "zmoe-synth";

/// Infixes of staging siblings: `.<name>.zmoe-partial-<random>`, `.<name>.zmoe-old-<random>`.
const STAGING: [&str; 2] = [".zmoe-partial-", ".zmoe-old-"];

/// The contents of [`MARKER`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Marker {
    /// Always [`MARKER_KIND`].
    pub kind: String,
    /// The zmoe version that wrote the folder.
    pub zmoe_version: String,
    /// False while the folder is being written.
    pub complete: bool,
    /// Every file zmoe wrote into the folder (names, not paths), besides the marker.
    pub files: Vec<String>,
    /// What was written (e.g. family, preset, format and seed of a synthetic model).
    #[serde(default)]
    pub wrote: serde_json::Value,
}

/// What is at an output folder that may be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Nothing yet.
    New,
    /// An empty folder.
    Empty,
    /// A folder zmoe wrote (replaced: `--force` was given).
    Ours,
}

/// Shell-quotes a path for a command shown to the user (`rm -rf <path>`).
pub fn shell_quote(p: &Path) -> String {
    shell_word(&p.display().to_string())
}

/// One shell word: as it is when plain, else single-quoted (a capsule's command line too).
pub fn shell_word(s: &str) -> String {
    let plain = !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain { s.to_string() } else { format!("'{}'", s.replace('\'', r"'\''")) }
}

/// Reads the marker of `dir`, if it has a valid one.
pub fn read_marker(dir: &Path) -> Option<Marker> {
    let p = dir.join(MARKER);
    let m = std::fs::symlink_metadata(&p).ok()?;
    if !m.is_file() || m.len() > 1 << 20 {
        return None;
    }
    let marker: Marker = serde_json::from_slice(&std::fs::read(&p).ok()?).ok()?;
    (marker.kind == MARKER_KIND).then_some(marker)
}

/// Why the folder `dir` is not one zmoe wrote (its marker lists every entry and every entry
/// is a regular file), or `Ok(marker)`. `also` admits more names (for staging folders).
fn ours_with(dir: &Path, also: &dyn Fn(&str) -> bool) -> std::result::Result<Marker, String> {
    let marker = read_marker(dir).ok_or_else(|| format!("it has no {MARKER} marker, so zmoe did not write it"))?;
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot list it ({e})"))?;
    for e in entries {
        let e = e.map_err(|e| format!("cannot list it ({e})"))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let listed = name == MARKER || marker.files.contains(&name) || also(&name);
        let regular = e.file_type().is_ok_and(|t| t.is_file());
        if !listed || !regular {
            return Err(format!("it holds `{name}`, which zmoe did not write"));
        }
    }
    Ok(marker)
}

/// Whether `dir` is a folder zmoe wrote and may replace or delete (see the module docs).
pub fn is_ours(dir: &Path) -> bool {
    let real_dir = std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir());
    real_dir && ours_with(dir, &|_| false).is_ok()
}

/// `path` without `.` components and trailing slashes; `None` if its last component is
/// not a name (`.`, `..`, `/`).
fn normal(path: &Path) -> Option<PathBuf> {
    let p: PathBuf = path.components().collect();
    matches!(p.components().next_back(), Some(Component::Normal(_))).then_some(p)
}

/// Checks the output folder `out` (given with `flag`) before anything is written: it may be
/// new or empty; an existing non-empty folder only with `force` and only if zmoe wrote it.
/// Never `.`, `..`, `/`, the home folder, the current folder (or one that contains it), or a
/// symbolic link.
pub fn check_target(flag: &str, out: &Path, force: bool) -> Result<Target> {
    let refuse = |why: String| Err(Error::Arg(format!("{flag} {}: refusing to write there: {why}", out.display())));
    let Some(path) = normal(out) else {
        return refuse("name the folder itself (not `.`, `..` or `/`), e.g. --out ../name or --out new-folder".into());
    };
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Target::New),
        Err(e) => return Err(Error::io(&path, e)),
    };
    if meta.file_type().is_symlink() {
        return refuse("it is a symbolic link; zmoe never replaces a link or writes through one".into());
    }
    if !meta.is_dir() {
        return Err(Error::Arg(format!("{flag} {}: exists and is not a folder; choose another {flag}", out.display())));
    }
    let real = path.canonicalize().map_err(|e| Error::io(&path, e))?;
    let home = std::env::var_os("HOME").and_then(|h| Path::new(&h).canonicalize().ok());
    if real.parent().is_none() {
        return refuse("it is the root folder".into());
    }
    if home.as_deref() == Some(real.as_path()) {
        return refuse("it is your home folder".into());
    }
    if std::env::current_dir().ok().and_then(|c| c.canonicalize().ok()).is_some_and(|c| c.starts_with(&real)) {
        return refuse("it is the current folder or contains it".into());
    }
    let empty = std::fs::read_dir(&path).map_err(|e| Error::io(&path, e))?.next().is_none();
    if empty {
        return Ok(Target::Empty);
    }
    if !force {
        return Err(Error::Arg(format!(
            "{flag} {}: folder exists and is not empty; pass --force to replace it (only folders zmoe wrote are \
             replaced)",
            out.display()
        )));
    }
    match ours_with(&path, &|_| false) {
        Ok(_) => Ok(Target::Ours),
        Err(why) => refuse(format!(
            "{why}; --force replaces only folders zmoe wrote (marked by {MARKER}) that hold nothing else"
        )),
    }
}

/// `.<name><infix><random>` beside `path`.
fn sibling(path: &Path, infix: &str) -> PathBuf {
    crate::output::hidden_sibling(path, infix, &crate::output::random_hex())
}

/// Removes the staging folders left in `parent` by killed runs (see the module docs):
/// hidden `.<name>.zmoe-partial-*` / `.zmoe-old-*` folders whose marker is not locked by a
/// running zmoe and that hold nothing but files the writer writes (`writes`: the writer's
/// file names, e.g. `checkpoint::synth::writes_file`). Best effort; returns what it removed.
pub fn clean_stale(parent: &Path, writes: &dyn Fn(&str) -> bool) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(parent) else { return removed };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') || !STAGING.iter().any(|s| name.contains(s)) {
            continue;
        }
        let dir = e.path();
        if !e.file_type().is_ok_and(|t| t.is_dir()) || ours_with(&dir, writes).is_err() {
            continue;
        }
        // A running writer holds the lock; a killed one released it with its process.
        let Ok(marker) = File::open(dir.join(MARKER)) else { continue };
        if marker.try_lock().is_err() {
            continue;
        }
        if remove_ours(&dir, writes).is_ok() {
            removed.push(dir);
        }
    }
    removed
}

/// Deletes a folder zmoe wrote, file by file (never following links), after checking again
/// that it holds nothing else.
fn remove_ours(dir: &Path, also: &dyn Fn(&str) -> bool) -> std::io::Result<()> {
    let other = |why: String| std::io::Error::other(why);
    ours_with(dir, also).map_err(other)?;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_name() != MARKER {
            std::fs::remove_file(e.path())?;
        }
    }
    std::fs::remove_file(dir.join(MARKER))?;
    std::fs::remove_dir(dir)
}

/// A folder being written beside its destination (see the module docs). Dropped without
/// [`Staging::finish`], it is removed.
pub struct Staging {
    dir: PathBuf,
    out: PathBuf,
    target: Target,
    marker: File,
    wrote: serde_json::Value,
    done: bool,
}

impl Staging {
    /// Starts writing the folder `out` (checked by [`check_target`] with `flag` and `force`):
    /// removes stale staging folders beside it (holding only files named as `writes` accepts:
    /// the writer's own file names), then creates a fresh hidden sibling with a locked,
    /// incomplete marker. `wrote` describes the contents for the marker.
    pub fn begin(
        flag: &str,
        out: &Path,
        force: bool,
        wrote: serde_json::Value,
        writes: &dyn Fn(&str) -> bool,
    ) -> Result<Staging> {
        let target = check_target(flag, out, force)?;
        let out = normal(out).expect("checked by check_target");
        let parent = crate::output::folder_of(&out).to_path_buf();
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        clean_stale(&parent, writes);
        // Made under a name the cleanup ignores, its marker locked, then renamed: no other
        // run ever sees this staging folder with an unlocked marker while it is written.
        let init = sibling(&out, ".zmoe-init-");
        std::fs::create_dir(&init).map_err(|e| Error::io(&init, e))?;
        let mp = init.join(MARKER);
        let marker = match std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&mp) {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&init);
                return Err(Error::io(&mp, e));
            }
        };
        // Without file locks (some network file systems) nothing is ever found stale: the
        // cleanup's own lock attempt fails too.
        let _ = marker.try_lock();
        let mut s = Staging { dir: init, out, target, marker, wrote, done: false };
        s.write_marker(false, Vec::new())?;
        let dir = sibling(&s.out, STAGING[0]);
        std::fs::rename(&s.dir, &dir).map_err(|e| Error::io(&dir, e))?;
        s.dir = dir;
        Ok(s)
    }

    /// The folder to write the files into.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn write_marker(&mut self, complete: bool, files: Vec<String>) -> Result<()> {
        let m = Marker {
            kind: MARKER_KIND.into(),
            zmoe_version: env!("CARGO_PKG_VERSION").into(),
            complete,
            files,
            wrote: self.wrote.clone(),
        };
        let mut text = serde_json::to_string_pretty(&m).expect("marker serialises");
        text.push('\n');
        let path = self.dir.join(MARKER);
        let f = &mut self.marker;
        f.set_len(0)
            .and_then(|_| f.rewind())
            .and_then(|_| f.write_all(text.as_bytes()))
            .and_then(|_| f.sync_all())
            .map_err(|e| Error::io(&path, e))
    }

    /// Marks the folder complete (listing every file in it) and swaps it in place of the
    /// destination.
    pub fn finish(mut self) -> Result<()> {
        let mut files = Vec::new();
        for e in std::fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))? {
            let e = e.map_err(|e| Error::io(&self.dir, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name != MARKER {
                files.push(name);
            }
        }
        files.sort();
        self.write_marker(true, files)?;
        let (dir, out) = (self.dir.clone(), self.out.clone());
        match self.target {
            Target::New | Target::Empty => {
                if let Err(e) = std::fs::rename(&dir, &out) {
                    // An empty folder that cannot be renamed over (not every OS allows it).
                    if self.target == Target::Empty && std::fs::remove_dir(&out).is_ok() {
                        std::fs::rename(&dir, &out).map_err(|e| Error::io(&out, e))?;
                    } else {
                        return Err(Error::io(&out, e));
                    }
                }
            }
            Target::Ours => {
                // Checked again: the folder may have changed while this one was written.
                if let Err(why) = ours_with(&out, &|_| false) {
                    return Err(Error::Arg(format!("{}: refusing to replace it now: {why}", out.display())));
                }
                let aside = sibling(&out, STAGING[1]);
                std::fs::rename(&out, &aside).map_err(|e| Error::io(&out, e))?;
                if let Err(e) = std::fs::rename(&dir, &out) {
                    let _ = std::fs::rename(&aside, &out);
                    return Err(Error::io(&out, e));
                }
                // Best effort: a leftover is removed by the next run into this parent.
                let _ = remove_ours(&aside, &|_| false);
            }
        }
        self.done = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(out: &Path, force: bool, files: &[(&str, &str)]) -> Result<()> {
        let s = Staging::begin("--out", out, force, serde_json::json!({"test": true}), &|_| true)?;
        for (n, t) in files {
            std::fs::write(s.path().join(n), t).unwrap();
        }
        s.finish()
    }

    #[test]
    fn replaces_only_marked_folders_and_leaves_nothing_beside() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("m");
        write(&out, false, &[("config.json", "1")]).unwrap();
        let m = read_marker(&out).unwrap();
        assert!(m.complete && m.files == ["config.json"], "{m:?}");
        let e = write(&out, false, &[("config.json", "2")]).unwrap_err().to_string();
        assert!(e.contains("not empty") && e.contains("--force"), "{e}");
        write(&out, true, &[("config.json", "3"), ("model.safetensors", "x")]).unwrap();
        assert_eq!(std::fs::read_to_string(out.join("config.json")).unwrap(), "3");
        std::fs::write(out.join("notes.txt"), "mine").unwrap();
        let e = write(&out, true, &[("config.json", "4")]).unwrap_err().to_string();
        assert!(e.contains("refusing") && e.contains("notes.txt"), "{e}");
        assert_eq!(std::fs::read_to_string(out.join("config.json")).unwrap(), "3");
        let names: Vec<String> =
            std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert_eq!(names, ["m"]);
        // An empty folder is written without --force.
        let empty = tmp.path().join("e");
        std::fs::create_dir(&empty).unwrap();
        write(&empty, false, &[("config.json", "1")]).unwrap();
        assert!(is_ours(&empty));
        let e = write(Path::new("/"), true, &[]).unwrap_err().to_string();
        assert!(e.contains("refusing"), "{e}");
    }

    #[test]
    fn a_locked_staging_folder_is_not_stale() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("m");
        let s = Staging::begin("--out", &out, false, serde_json::Value::Null, &|_| true).unwrap();
        std::fs::write(s.path().join("config.json"), "{}").unwrap();
        assert!(clean_stale(tmp.path(), &|_| true).is_empty(), "a running writer's folder was removed");
        let dir = s.path().to_path_buf();
        drop(s);
        assert!(!dir.exists(), "an unfinished staging folder is removed when dropped");
        assert_eq!(shell_quote(Path::new("/a b/c")), "'/a b/c'");
        assert_eq!(shell_quote(Path::new("/a/c")), "/a/c");
    }
}
