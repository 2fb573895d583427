//! Reading and appending the JSONL ledger.
//!
//! The ledger is append-only evidence: [`Ledger::append`] adds one whole line atomically
//! and [`Ledger::read`] reports (and skips) lines it cannot use instead of failing or
//! repairing them. See the [module docs](super) for why.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use super::{Entry, SCHEMA_VERSION};
use crate::error::{Error, Result};

/// The ledger file operations (the file itself is the state).
pub struct Ledger;

/// A ledger line that was skipped, and why.
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

impl Ledger {
    /// Appends `entry` as one line to the ledger at `path`, creating the file and its
    /// parent folders if needed.
    ///
    /// The line is built in memory and written with a single `write_all` on a descriptor
    /// opened with `O_APPEND`, under an exclusive advisory lock (best effort: file systems
    /// without locks still get `O_APPEND`'s atomic positioning), then fsynced. If the file
    /// does not end in a newline (an earlier append was cut off), a newline is written
    /// first, so the half line stays on its own line — byte for byte — and is reported by
    /// [`Ledger::read`]. Existing bytes are never rewritten.
    pub fn append(path: &Path, entry: &Entry) -> Result<()> {
        let json = serde_json::to_string(entry)
            .map_err(|e| Error::format(path, format!("cannot serialise a ledger entry: {e}")))?;
        // Compact JSON escapes control characters inside strings, so this is one line.
        debug_assert!(!json.contains('\n'));
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let existed = path.exists();
        let mut f =
            OpenOptions::new().read(true).append(true).create(true).open(path).map_err(|e| Error::io(path, e))?;
        // Serialises appenders (the newline check below and the write belong together).
        // Released when `f` is closed. Failure (e.g. a network file system) is not fatal.
        let _ = f.lock();
        let mut buf = Vec::with_capacity(json.len() + 2);
        if !ends_with_newline(&mut f).map_err(|e| Error::io(path, e))? {
            buf.push(b'\n');
        }
        buf.extend_from_slice(json.as_bytes());
        buf.push(b'\n');
        f.write_all(&buf).map_err(|e| Error::io(path, e))?;
        f.sync_data().map_err(|e| Error::io(path, e))?;
        if !existed {
            // Make the new file's directory entry durable too (best effort; not on every OS).
            if let Some(dir) = path.parent().map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p }) {
                let _ = File::open(dir).and_then(|d| d.sync_all());
            }
        }
        Ok(())
    }

    /// Reads every entry of the ledger at `path`, in file order, and the lines it skipped.
    ///
    /// Blank lines are ignored. A line that is not UTF-8, not JSON, not an [`Entry`], or from
    /// a newer [`SCHEMA_VERSION`] becomes a [`Corrupt`] with its line number; callers print
    /// [`Corrupt::warning`] for each. Fails only if the file cannot be read.
    pub fn read(path: &Path) -> Result<(Vec<Entry>, Vec<Corrupt>)> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Ok(Ledger::parse(&bytes))
    }

    /// [`Ledger::read`] on the bytes of a ledger.
    pub fn parse(bytes: &[u8]) -> (Vec<Entry>, Vec<Corrupt>) {
        let mut entries = Vec::new();
        let mut corrupt = Vec::new();
        let mut lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
        // After a final newline `split` yields an empty piece; otherwise the last piece is
        // an unterminated line.
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
            match parse_line(raw) {
                Ok(e) => entries.push(e),
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
        (entries, corrupt)
    }
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

/// One line → an entry, or why not.
fn parse_line(raw: &[u8]) -> std::result::Result<Entry, String> {
    let text = std::str::from_utf8(raw).map_err(|e| format!("not UTF-8 text ({e})"))?;
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON ({e})"))?;
    let version = value.get("schema_version").and_then(serde_json::Value::as_u64);
    if let Some(v) = version.filter(|&v| v > u64::from(SCHEMA_VERSION)) {
        return Err(format!("written by a newer zmoe (schema_version {v}; this build reads up to {SCHEMA_VERSION})"));
    }
    serde_json::from_value(value).map_err(|e| format!("not a ledger entry ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_reports_bad_lines_with_numbers() {
        let text = b"\n{\"a\":1}\nnot json\n\xff\xfe\n{\"schema_version\":99}\n   \n{\"half";
        let (entries, corrupt) = Ledger::parse(text);
        assert!(entries.is_empty());
        let got: Vec<(usize, &str)> = corrupt.iter().map(|c| (c.line_no, c.why.as_str())).collect();
        assert_eq!(got.len(), 5, "{got:?}");
        assert_eq!(got[0].0, 2);
        assert!(got[0].1.starts_with("not a ledger entry (missing field"), "{}", got[0].1);
        assert_eq!(got[1].0, 3);
        assert!(got[1].1.starts_with("not valid JSON"), "{}", got[1].1);
        assert_eq!(got[2].0, 4);
        assert!(got[2].1.starts_with("not UTF-8"), "{}", got[2].1);
        assert_eq!(got[3].0, 5);
        assert!(got[3].1.contains("newer zmoe (schema_version 99"), "{}", got[3].1);
        assert_eq!(got[4].0, 7);
        assert!(got[4].1.starts_with("incomplete last line"), "{}", got[4].1);
        let w = corrupt[1].warning(Path::new("bench/matrix.jsonl"));
        assert!(w.starts_with("warning: bench/matrix.jsonl:3: not valid JSON") && w.ends_with(", skipped"), "{w}");
    }

    #[test]
    fn empty_and_blank_ledgers_have_nothing() {
        for text in [&b""[..], b"\n", b"\n\n  \r\n"] {
            let (e, c) = Ledger::parse(text);
            assert!(e.is_empty() && c.is_empty());
        }
    }
}
