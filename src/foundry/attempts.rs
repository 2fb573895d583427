//! `attempts.ndjson`: one JSON line per attempt (compile + check + time one candidate on
//! one case), appended, never rewritten.
//!
//! Why append-only lines: a campaign can run for an hour on a borrowed GPU; if it dies, every
//! attempt already written is intact, and the next campaign appends to the same ledger.
//! [`Appender::append`] writes each line with one `write_all` on an `O_APPEND` descriptor under an
//! advisory lock, after a newline if an earlier write was cut off, so a torn line stays a
//! single bad line. [`read`] reports such a line with its number and skips it.

use std::fs::File;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::knobs::Knobs;
use super::ops::{CheckResult, Shape};
use super::templates::Launch;
use super::{Bucket, Numerics};
use crate::error::{Error, Result};

/// Version of the attempt record layout.
pub const SCHEMA_VERSION: u32 = 1;

/// The ledger's file name inside a campaign folder.
pub const FILE_NAME: &str = "attempts.ndjson";

/// Which campaign and case an attempt belongs to, and where it ran in the case's order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CampaignInfo {
    /// Campaign id (`<UTC time>-s<seed>-<4 hex>`): cases are matched within a campaign.
    pub id: String,
    /// Campaign seed.
    pub seed: u64,
    /// Requested mode (`random`, `coverage`, `mix`).
    pub mode: String,
    /// Case index.
    pub case: usize,
    /// The rule that chose this case (`random` or `coverage`).
    pub case_mode: String,
    /// Position of this attempt in the case's run order (0 = first).
    pub order_pos: usize,
    /// The case's run order (template names).
    pub order: Vec<String>,
}

/// Compilation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildInfo {
    /// Whether it compiled and loaded.
    pub ok: bool,
    /// Milliseconds (render + compile or cache load + module load).
    #[serde(with = "crate::jsonl::nan_as_null")]
    pub ms: f64,
    /// The compiler log (truncated) or the load error.
    pub error: Option<String>,
}

/// Timing with CUDA events (or the mock model).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchInfo {
    /// Whether timing completed.
    pub ok: bool,
    /// Untimed launches first.
    pub warmup: usize,
    /// Timed launches (each after an L2 flush).
    pub repeats: usize,
    /// Microseconds: 10th percentile.
    #[serde(with = "crate::jsonl::nan_as_null")]
    pub p10_us: f64,
    /// Median.
    #[serde(with = "crate::jsonl::nan_as_null")]
    pub p50_us: f64,
    /// 90th percentile.
    #[serde(with = "crate::jsonl::nan_as_null")]
    pub p90_us: f64,
    /// Fastest.
    #[serde(with = "crate::jsonl::nan_as_null")]
    pub min_us: f64,
    /// Mean.
    #[serde(with = "crate::jsonl::nan_as_null")]
    pub mean_us: f64,
    /// The op's bytes at p50, GB/s.
    #[serde(with = "crate::jsonl::nan_as_null")]
    pub gb_s: f64,
    /// The op's FLOPs at p50, GFLOP/s.
    #[serde(with = "crate::jsonl::nan_as_null")]
    pub gflop_s: f64,
    /// Why timing failed.
    pub error: Option<String>,
}

/// The correctness check, plus bit-identity to the production configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CorrectnessInfo {
    /// Whether the candidate passed (for a numerics-preserving one: also bit-identical).
    pub ok: bool,
    /// Comparison with the CPU reference.
    pub check: CheckResult,
    /// Whether every output equals the production configuration's bit for bit (None when
    /// not compared, e.g. the mock).
    pub bitexact_vs_baseline: Option<bool>,
}

/// One attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// [`SCHEMA_VERSION`] of the writer.
    pub schema_version: u32,
    /// `<campaign>/<case>/<template>`.
    pub id: String,
    /// When it finished (RFC 3339 UTC).
    pub ts: String,
    /// Campaign, case and order.
    pub campaign: CampaignInfo,
    /// Op name.
    pub op: String,
    /// Template name.
    pub template: String,
    /// Knob values.
    pub knobs: Knobs,
    /// Numerics class of this template with these knobs.
    pub numerics: Numerics,
    /// The shape.
    pub shape: Shape,
    /// Main element type.
    pub dtype: String,
    /// Hash of the compiled source (template + knobs + common.cuh).
    pub source_hash: String,
    /// Grid and block.
    pub launch: Option<Launch>,
    /// `cuda` or `mock`.
    pub backend: String,
    /// GPU name (or the mock's description).
    pub gpu: String,
    /// Architecture, e.g. `sm_90` (`mock` for the mock).
    pub arch: String,
    /// Driver version.
    pub driver: Option<String>,
    /// Compilation.
    pub build: BuildInfo,
    /// Correctness (absent if it did not build).
    pub correctness: Option<CorrectnessInfo>,
    /// Timing (absent if it did not build or was incorrect).
    pub bench: Option<BenchInfo>,
    /// The op's bytes for this shape.
    #[serde(with = "crate::jsonl::nan_as_null")]
    pub bytes: f64,
    /// The op's FLOPs for this shape.
    #[serde(with = "crate::jsonl::nan_as_null")]
    pub flops: f64,
    /// zmoe version.
    pub zmoe_version: String,
    /// Git commit of the zmoe that ran it.
    pub git_commit: String,
}

/// Where an attempt got to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Status {
    /// Compile or module load failed.
    BuildError,
    /// Built but wrong (or not bit-identical though declared so).
    Incorrect,
    /// Correct but timing failed.
    BenchError,
    /// Built, correct and timed.
    Ok,
}

impl Attempt {
    /// Where it got to.
    pub fn status(&self) -> Status {
        if !self.build.ok {
            Status::BuildError
        } else if !self.correctness.as_ref().is_some_and(|c| c.ok) {
            Status::Incorrect
        } else if !self.bench.as_ref().is_some_and(|b| b.ok) {
            Status::BenchError
        } else {
            Status::Ok
        }
    }

    /// Median latency in µs, if built, correct and timed.
    pub fn p50(&self) -> Option<f64> {
        (self.status() == Status::Ok).then(|| self.bench.as_ref().map(|b| b.p50_us)).flatten()
    }

    /// The token bucket of its shape.
    pub fn bucket(&self) -> Bucket {
        Bucket::of(self.shape.tokens)
    }

    /// The key that matches attempts of one case: (campaign, case).
    pub fn case_key(&self) -> (String, usize) {
        (self.campaign.id.clone(), self.campaign.case)
    }
}

pub use crate::jsonl::Corrupt;

/// An open ledger to append to.
pub struct Appender {
    file: File,
    path: std::path::PathBuf,
}

impl Appender {
    /// Opens (creating if needed) the ledger at `path`.
    pub fn open(path: &Path) -> Result<Appender> {
        Ok(Appender { file: crate::jsonl::open_append(path)?, path: path.to_path_buf() })
    }

    /// Appends one attempt as one line (see the module docs), then syncs the data.
    pub fn append(&mut self, a: &Attempt) -> Result<()> {
        let json = serde_json::to_string(a)
            .map_err(|e| Error::format(&self.path, format!("cannot serialise an attempt: {e}")))?;
        crate::jsonl::append_line(&mut self.file, &self.path, &json)
    }
}

/// Reads every attempt of the ledger at `path` and the lines it skipped.
pub fn read(path: &Path) -> Result<(Vec<Attempt>, Vec<Corrupt>)> {
    let bytes = crate::input::read(path)?;
    Ok(parse(&bytes))
}

/// [`read`] on bytes.
pub fn parse(bytes: &[u8]) -> (Vec<Attempt>, Vec<Corrupt>) {
    crate::jsonl::parse(bytes, SCHEMA_VERSION, "a foundry attempt")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::foundry::ops::PRESETS;
    use std::io::Write;

    pub(crate) fn sample_attempt(case: usize, template: &str, p50: Option<f64>) -> Attempt {
        Attempt {
            schema_version: SCHEMA_VERSION,
            id: format!("c/{case}/{template}"),
            ts: "2026-01-01T00:00:00Z".into(),
            campaign: CampaignInfo {
                id: "c".into(),
                seed: 1,
                mode: "mix".into(),
                case,
                case_mode: "random".into(),
                order_pos: 0,
                order: vec![template.into()],
            },
            op: "moe_combine".into(),
            template: template.into(),
            knobs: crate::foundry::knobs::knobs(&[("TPB", 256)]),
            numerics: Numerics::Preserving,
            shape: PRESETS[0].shape(4),
            dtype: "bf16".into(),
            source_hash: "fnv1a64:0000000000000001".into(),
            launch: None,
            backend: "mock".into(),
            gpu: "mock".into(),
            arch: "mock".into(),
            driver: None,
            build: BuildInfo { ok: true, ms: 1.0, error: None },
            correctness: Some(CorrectnessInfo {
                ok: true,
                check: CheckResult { ok: true, ..Default::default() },
                bitexact_vs_baseline: None,
            }),
            bench: p50.map(|p| BenchInfo {
                ok: true,
                warmup: 1,
                repeats: 3,
                p10_us: p,
                p50_us: p,
                p90_us: p,
                min_us: p,
                mean_us: p,
                gb_s: 1.0,
                gflop_s: 1.0,
                error: None,
            }),
            bytes: 1.0,
            flops: 1.0,
            zmoe_version: "0".into(),
            git_commit: "x".into(),
        }
    }

    #[test]
    fn append_read_round_trip_and_torn_lines() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("sub/attempts.ndjson");
        let mut ap = Appender::open(&path).unwrap();
        let a = sample_attempt(0, "t0_basic", Some(3.5));
        ap.append(&a).unwrap();
        // A torn write: half a line without a newline, then a normal append.
        drop(ap);
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"schema_ver").unwrap();
        let mut ap = Appender::open(&path).unwrap();
        let b = sample_attempt(1, "t1_vec", None);
        ap.append(&b).unwrap();
        let (got, bad) = read(&path).unwrap();
        assert_eq!(got, vec![a.clone(), b.clone()]);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].line_no, 2);
        assert!(
            bad[0].warning(&path).ends_with("not valid JSON (EOF while parsing a string at line 1 column 12), skipped")
        );
        assert_eq!(a.status(), Status::Ok);
        assert_eq!(b.status(), Status::BenchError);
        assert_eq!(a.p50(), Some(3.5));
        assert_eq!(b.p50(), None);
    }

    #[test]
    fn non_finite_numbers_survive_a_round_trip() {
        let mut a = sample_attempt(0, "t0_basic", Some(f64::NAN));
        if let Some(c) = a.correctness.as_mut() {
            c.check.max_abs_err = f64::INFINITY;
            c.check.rel_l2 = f64::NAN;
        }
        let line = serde_json::to_string(&a).unwrap();
        assert!(line.contains("\"max_abs_err\":null") && line.contains("\"p50_us\":null"), "{line}");
        let (got, bad) = parse(format!("{line}\n").as_bytes());
        assert!(bad.is_empty(), "{bad:?}");
        assert!(got[0].correctness.as_ref().unwrap().check.max_abs_err.is_nan());
        assert!(got[0].bench.as_ref().unwrap().p50_us.is_nan());
    }

    #[test]
    fn parse_reports_each_bad_line() {
        let good = serde_json::to_string(&sample_attempt(0, "t0_basic", Some(1.0))).unwrap();
        let text = format!("{good}\nnot json\n{{\"schema_version\":9}}\n\n{{\"a\":1}}\n{good}");
        let (got, bad) = parse(text.as_bytes());
        assert_eq!(got.len(), 2);
        let lines: Vec<usize> = bad.iter().map(|c| c.line_no).collect();
        assert_eq!(lines, vec![2, 3, 5]);
        assert!(bad[1].why.contains("newer zmoe"));
        assert!(bad[2].why.starts_with("not a foundry attempt"));
    }
}
