//! Reading and appending the JSONL ledger.
//!
//! The ledger is append-only evidence: [`Ledger::append`] adds one whole line atomically
//! and [`Ledger::read`] reports (and skips) lines it cannot use instead of failing or
//! repairing them. See the [module docs](super) for why.

use std::path::Path;

use super::{Entry, SCHEMA_VERSION};
use crate::error::{Error, Result};
pub use crate::jsonl::Corrupt;

/// The ledger file operations (the file itself is the state).
pub struct Ledger;

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
        let existed = path.exists();
        let mut f = crate::jsonl::open_append(path)?;
        crate::jsonl::append_line(&mut f, path, &json)?;
        if !existed {
            // Make the new file's directory entry durable too (best effort; not on every OS).
            if let Some(dir) = path.parent().map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p }) {
                let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
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
        let bytes = crate::input::read(path)?;
        Ok(Ledger::parse(&bytes))
    }

    /// [`Ledger::read`] on the bytes of a ledger.
    pub fn parse(bytes: &[u8]) -> (Vec<Entry>, Vec<Corrupt>) {
        crate::jsonl::parse(bytes, SCHEMA_VERSION, "a ledger entry")
    }
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
