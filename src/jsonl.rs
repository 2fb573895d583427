//! Append-only JSON-lines files: the benchmark ledger (`bench/matrix.jsonl`) and the kernel
//! foundry's `attempts.ndjson`.
//!
//! Why one module: both are evidence that must survive a crash mid-write and never be
//! rewritten. [`append_line`] writes one whole line with a single `write_all` on an
//! `O_APPEND` descriptor under an advisory lock (best effort: file systems without locks
//! still get `O_APPEND`'s atomic positioning), after a newline if an earlier append was cut
//! off, so a torn line stays one bad line byte for byte; then it fsyncs. [`parse`] reports
//! each line it cannot use (with its number) and skips it instead of failing or repairing.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// A line that was skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corrupt {
    /// 1-based line number in the file.
    pub line_no: usize,
    /// What is wrong with it.
    pub why: String,
}

impl Corrupt {
    /// The warning callers print to stderr: `warning: <path>:<line>: <why>, skipped`.
    pub fn warning(&self, path: &Path) -> String {
        format!("warning: {}:{}: {}, skipped", path.display(), self.line_no, self.why)
    }
}

/// Opens (creating it and its parent folders if needed) the file at `path` for appending.
/// Only a regular file: a symbolic link is refused (appending through it would change the
/// file it points to), and so is a pipe or a device (opening one can block forever). A new
/// file is created with `create_new`, so a link planted meanwhile is never followed; an
/// existing one is checked before it is opened and again on the open handle.
pub fn open_append(path: &Path) -> Result<File> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let mut opts = OpenOptions::new();
    opts.read(true).append(true);
    match opts.clone().create_new(true).open(path) {
        Ok(f) => return Ok(f),
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(Error::io(path, e)),
        Err(_) => {}
    }
    let before = std::fs::symlink_metadata(path).map_err(|e| Error::io(path, e))?;
    let refuse = |m: &std::fs::Metadata| {
        let ft = m.file_type();
        let why = if ft.is_symlink() {
            "is a symbolic link; zmoe never appends through a link (give the real path)".to_string()
        } else {
            format!("is {}, not a regular file", crate::input::kind(&ft))
        };
        Error::format(path, why)
    };
    if !before.is_file() {
        return Err(refuse(&before));
    }
    let f = opts.open(path).map_err(|e| Error::io(path, e))?;
    let after = f.metadata().map_err(|e| Error::io(path, e))?;
    if !same_file(&before, &after) {
        return Err(Error::format(path, "was replaced while being opened; not appending"));
    }
    Ok(f)
}

/// Whether two metadata describe the same file.
fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        a.dev() == b.dev() && a.ino() == b.ino()
    }
    #[cfg(not(unix))]
    {
        a.is_file() && b.is_file()
    }
}

/// Appends `json` (one line of compact JSON, no newline) to `f`, opened by [`open_append`]
/// on `path` (named in errors), as described in the module docs.
pub fn append_line(f: &mut File, path: &Path, json: &str) -> Result<()> {
    // Compact JSON escapes control characters inside strings, so this is one line.
    debug_assert!(!json.contains('\n'));
    // Serialises appenders: the newline check and the write belong together.
    let _ = f.lock();
    let r = (|| {
        let mut buf = Vec::with_capacity(json.len() + 2);
        if !ends_with_newline(f)? {
            buf.push(b'\n');
        }
        buf.extend_from_slice(json.as_bytes());
        buf.push(b'\n');
        f.write_all(&buf)?;
        f.sync_data()
    })();
    let _ = f.unlock();
    r.map_err(|e| Error::io(path, e))
}

/// Whether the file is empty or its last byte is `\n`.
fn ends_with_newline(f: &mut File) -> std::io::Result<bool> {
    if f.metadata()?.len() == 0 {
        return Ok(true);
    }
    f.seek(SeekFrom::End(-1))?;
    let mut last = [0u8];
    f.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
}

/// Every record of a JSON-lines file, in file order, and the lines skipped. Blank lines are
/// ignored; a line that is not UTF-8, not JSON, from a newer `schema_version` than
/// `max_schema`, or not a `T` (`what` names a `T` in the message) becomes a [`Corrupt`].
pub fn parse<T: DeserializeOwned>(bytes: &[u8], max_schema: u32, what: &str) -> (Vec<T>, Vec<Corrupt>) {
    let (mut out, mut corrupt) = (Vec::new(), Vec::new());
    let mut lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    // After a final newline `split` yields an empty piece; otherwise the last piece is an
    // unterminated line.
    let unterminated = lines.last().is_some_and(|l| !l.is_empty());
    if !unterminated {
        lines.pop();
    }
    let n = lines.len();
    for (i, raw) in lines.into_iter().enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match parse_line(raw, max_schema, what) {
            Ok(x) => out.push(x),
            Err(mut why) => {
                if unterminated && i + 1 == n {
                    why = format!(
                        "incomplete last line (no newline at the end of the file: an interrupted append?): {why}"
                    );
                }
                corrupt.push(Corrupt { line_no: i + 1, why });
            }
        }
    }
    (out, corrupt)
}

/// One line → a record, or why not.
fn parse_line<T: DeserializeOwned>(raw: &[u8], max_schema: u32, what: &str) -> std::result::Result<T, String> {
    let text = std::str::from_utf8(raw).map_err(|e| format!("not UTF-8 text ({e})"))?;
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON ({e})"))?;
    let version = value.get("schema_version").and_then(serde_json::Value::as_u64);
    if let Some(v) = version.filter(|&v| v > u64::from(max_schema)) {
        return Err(format!("written by a newer zmoe (schema_version {v}; this build reads up to {max_schema})"));
    }
    serde_json::from_value(value).map_err(|e| format!("not {what} ({e})"))
}

/// Serde for an `f64` that may be NaN or infinite (a poisoned output's error, a failed
/// timing): written as `null`, read back as NaN. JSON has no NaN, and without this one odd
/// number would make a whole line unreadable. Use as `#[serde(with = "crate::jsonl::nan_as_null")]`.
pub mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes a finite number as is, anything else as `null`.
    pub fn serialize<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
        if x.is_finite() { s.serialize_f64(*x) } else { s.serialize_none() }
    }

    /// Reads `null` as NaN.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

/// [`nan_as_null`] for a list of numbers.
pub mod nans_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes finite numbers as is, anything else as `null`.
    pub fn serialize<S: Serializer>(xs: &[f64], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(xs.iter().map(|x| x.is_finite().then_some(*x)))
    }

    /// Reads `null`s as NaN.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        Ok(Vec::<Option<f64>>::deserialize(d)?.into_iter().map(|x| x.unwrap_or(f64::NAN)).collect())
    }
}
