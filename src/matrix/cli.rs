//! The `zmoe matrix` subcommands: argument definitions and handlers.
//!
//! They live in the library so the binary only dispatches ([`execute_with`]) and tests can
//! call them directly. A handler hands what goes to stdout to one callback and warnings and
//! progress (one line per skipped ledger line, per run of `matrix run`) to another; it never
//! prints itself.

use std::path::{Path, PathBuf};

use super::{DEFAULT_LEDGER, Entry, Ledger, catalog, html, latest, now_utc, report, run};
use crate::error::{Error, Result};

/// `zmoe matrix …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum MatrixCmd {
    /// The models `matrix run` can measure: every synthetic preset and each --model folder,
    /// with total and active parameters, weight format, and default / excluded patterns.
    Catalog {
        /// A model folder to list too (repeatable).
        #[arg(long = "model", value_name = "DIR")]
        models: Vec<PathBuf>,
    },
    /// Validate models (reference vs patched plan: token fidelity and speed) and append one
    /// entry per model to the ledger. Exits non-zero, after every model ran, if any model
    /// failed fidelity (still recorded) or could not run.
    Run(run::RunArgs),
    /// Every entry whose model id contains SUBSTRING (case-insensitive), oldest first.
    History {
        /// Part of a model id, e.g. `qwen3` or `30b-a3b`.
        substring: String,
        /// Which ledger, and which of its entries.
        #[command(flatten)]
        ledger: LedgerArgs,
    },
    /// The latest entry per model × GPU as a table.
    Report {
        /// Which ledger, and which of its entries.
        #[command(flatten)]
        ledger: LedgerArgs,
    },
    /// Compare two ledgers: the latest entry per model × GPU of each, side by side.
    Diff {
        /// The older ledger (A).
        a: PathBuf,
        /// The newer ledger (B).
        b: PathBuf,
    },
    /// Every entry as CSV: a header row, then one row per entry in ledger order.
    Csv {
        /// Which ledger, and which of its entries.
        #[command(flatten)]
        ledger: LedgerArgs,
    },
    /// Write a self-contained HTML page: the report table and a bar chart of decode
    /// speedup and % of roofline per model × GPU.
    Html {
        /// Which ledger, and which of its entries.
        #[command(flatten)]
        ledger: LedgerArgs,
        /// The page to write.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing file at --out.
        #[arg(long)]
        force: bool,
    },
}

/// Which ledger to read, and which of its entries.
#[derive(Debug, Clone, clap::Args)]
pub struct LedgerArgs {
    /// The ledger file (JSON lines).
    #[arg(long, default_value = DEFAULT_LEDGER)]
    pub ledger: PathBuf,
    /// Only entries whose GPU name contains this (case-insensitive), e.g. `H200`.
    #[arg(long)]
    pub gpu: Option<String>,
}

/// Runs a `matrix` subcommand, handing stdout text to `stdout` as it is produced (`matrix
/// run` reports each model when it finishes) and warnings (`warning: <path>:<line>: <why>,
/// skipped`) and progress lines to `stderr`. Presets are cached under [`crate::cache::cache_dir`].
pub fn execute_with(cmd: &MatrixCmd, stdout: &mut dyn FnMut(&str), stderr: &mut dyn FnMut(&str)) -> Result<()> {
    match cmd {
        MatrixCmd::Run(args) => run::run(args, &crate::cache::cache_dir(), stdout, stderr),
        other => {
            stdout(&execute(other, stderr)?);
            Ok(())
        }
    }
}

/// Runs a `matrix` subcommand and returns its stdout text (for `run`, everything printed
/// before an error is lost with it; [`execute_with`] streams instead). `stderr` receives
/// warnings (`warning: <path>:<line>: <why>, skipped`) and progress lines.
pub fn execute(cmd: &MatrixCmd, stderr: &mut dyn FnMut(&str)) -> Result<String> {
    match cmd {
        MatrixCmd::Catalog { models } => catalog::catalog(models),
        MatrixCmd::Run(args) => {
            let mut out = String::new();
            run::run(args, &crate::cache::cache_dir(), &mut |s| out.push_str(s), stderr)?;
            Ok(out)
        }
        MatrixCmd::History { substring, ledger } => {
            let entries = load(ledger, stderr)?;
            if entries.is_empty() {
                return Ok(no_entries(ledger));
            }
            let found = report::history_entries(&entries, substring);
            if found.is_empty() {
                let mut ids: Vec<&str> = entries.iter().map(|e| e.model.id.as_str()).collect();
                ids.sort_unstable();
                ids.dedup();
                return Ok(format!(
                    "no entry in {} has a model id containing `{}` (models: {})\n",
                    ledger.ledger.display(),
                    report::one_line(substring),
                    report::one_line(&ids.join(", "))
                ));
            }
            Ok(report::history(&found))
        }
        MatrixCmd::Report { ledger } => {
            let entries = load(ledger, stderr)?;
            if entries.is_empty() {
                return Ok(no_entries(ledger));
            }
            Ok(report::report(&entries))
        }
        MatrixCmd::Diff { a, b } => {
            let ea = read(a, stderr)?;
            let eb = read(b, stderr)?;
            Ok(report::diff(&ea, &eb, &a.display().to_string(), &b.display().to_string()))
        }
        MatrixCmd::Csv { ledger } => {
            let entries = load(ledger, stderr)?;
            if entries.is_empty() {
                stderr(no_entries(ledger).trim_end());
            }
            Ok(report::csv(&entries))
        }
        MatrixCmd::Html { ledger, out, force } => {
            crate::output::check_out_path("--out", out, *force)?;
            let (entries, skipped) = load_counting(ledger, stderr)?;
            if entries.is_empty() {
                return Err(Error::Arg(format!("{}; nothing to render", no_entries(ledger).trim_end())));
            }
            let name = ledger.ledger.display().to_string();
            let now = now_utc();
            let page = html::page(&entries, &html::PageInfo { ledger: &name, skipped, generated_utc: &now });
            crate::output::write_new("--out", out, page.as_bytes(), *force)?;
            let rows = latest(&entries).len();
            stderr(&format!(
                "wrote {} ({rows} model × GPU row{} from {} entr{})",
                out.display(),
                if rows == 1 { "" } else { "s" },
                entries.len(),
                if entries.len() == 1 { "y" } else { "ies" }
            ));
            Ok(String::new())
        }
    }
}

/// Reads a ledger, sending a warning per skipped line to `stderr`. A missing file is an
/// error that names the path and how ledgers come to be.
pub fn read(path: &Path, stderr: &mut dyn FnMut(&str)) -> Result<Vec<Entry>> {
    read_counting(path, stderr).map(|(e, _)| e)
}

fn read_counting(path: &Path, stderr: &mut dyn FnMut(&str)) -> Result<(Vec<Entry>, usize)> {
    let (entries, corrupt) = Ledger::read(path).map_err(|e| match e {
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => Error::Arg(format!(
            "no ledger at {} (entries are appended by `zmoe matrix run`; pass --ledger PATH to read another file)",
            path.display()
        )),
        Error::Io { source, .. } if path.is_dir() => {
            Error::Arg(format!("ledger {} is a folder, not a file ({source})", path.display()))
        }
        e => e,
    })?;
    for c in &corrupt {
        stderr(&c.warning(path));
    }
    Ok((entries, corrupt.len()))
}

/// [`read`], keeping only the entries on a GPU matching `--gpu`.
fn load(args: &LedgerArgs, stderr: &mut dyn FnMut(&str)) -> Result<Vec<Entry>> {
    load_counting(args, stderr).map(|(e, _)| e)
}

fn load_counting(args: &LedgerArgs, stderr: &mut dyn FnMut(&str)) -> Result<(Vec<Entry>, usize)> {
    let (mut entries, skipped) = read_counting(&args.ledger, stderr)?;
    if let Some(gpu) = &args.gpu {
        let needle = gpu.to_lowercase();
        entries.retain(|e| e.hardware.name.to_lowercase().contains(&needle));
    }
    Ok((entries, skipped))
}

/// The message for a ledger (or `--gpu` selection) without entries.
fn no_entries(args: &LedgerArgs) -> String {
    match &args.gpu {
        Some(g) => format!("{}: no entries on a GPU matching `{}`\n", args.ledger.display(), report::one_line(g)),
        None => format!("{}: the ledger has no entries\n", args.ledger.display()),
    }
}
