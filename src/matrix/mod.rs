//! `zmoe matrix`: the benchmark ledger — every validation as one line of a JSONL file, and
//! the views that decide from its history.
//!
//! Why it is shaped this way:
//!
//! - **One JSON object per line, append-only** (`bench/matrix.jsonl` by default). An append
//!   is a single write, the file diffs and merges in git line by line, and `grep`/`jq` read
//!   it without zmoe. There is no database to migrate and nothing to lock for readers.
//! - **[`Entry`] is the schema.** The writer (`zmoe matrix run`, from a validation) builds
//!   one and every reader (`history`, `report`, `diff`, `csv`, `html`) goes through the same
//!   struct, so a field cannot be written one way and read another. Raw per-run numbers are
//!   kept beside their medians: a later reader can judge the noise or recompute. Numbers that
//!   are not finite (a median of nothing, a speedup over 0 tok/s) are written as `null` and
//!   read back as NaN instead of making the line unreadable. [`SCHEMA_VERSION`] is bumped
//!   when a field changes meaning; readers skip lines from a newer schema, saying so.
//! - **A ledger is evidence, so it is never rewritten** ([`Ledger`]). An append builds the
//!   whole line in memory and writes it in one `write` on an `O_APPEND` descriptor, under an
//!   advisory lock, then fsyncs: concurrent writers interleave whole lines, and a crash
//!   leaves at most one half line, which the next append isolates behind a newline. Readers
//!   report a bad line with its line number and skip it; nothing "repairs" the file.
//! - **Later lines win.** The views that show one entry per model ([`latest`]) key entries
//!   by (model id, hardware name) and keep the last line, the order results were appended in
//!   — not the timestamps, which come from different machines' clocks.
//! - **Rendering is separate from reading**: [`report`] turns entries into plain-text tables
//!   and CSV, [`html`] into a self-contained page (inline CSS and SVG, no external assets, so
//!   it opens offline and as a CI artifact), and [`cli`] wires both to the command line so
//!   the binary only dispatches.
//! - **Writing is validation plus one conversion**: [`run`] loads each model (a folder, or a
//!   synthetic preset from [`crate::checkpoint::synth`] cached under [`crate::cache::cache_dir`]),
//!   runs [`crate::validate::run_validate`] and appends [`Entry::from_validate`] of the
//!   result; [`catalog`] lists what can be run, with parameter counts from the config
//!   ([`catalog::param_counts`]) and each family's pattern policy.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::backend::DeviceInfo;
use crate::bench::ModelSummary;
use crate::validate::ValidateReport;

pub mod catalog;
pub mod cli;
pub mod html;
pub mod ledger;
pub mod report;
pub mod run;

pub use ledger::{Corrupt, Ledger};

/// Version of the [`Entry`] layout written by this build; bumped when a field changes
/// meaning or disappears (adding an optional field does not bump it).
pub const SCHEMA_VERSION: u32 = 1;

/// Where `zmoe matrix` reads and appends when no `--ledger` is given (relative to the
/// working directory, i.e. the repository root).
pub const DEFAULT_LEDGER: &str = "bench/matrix.jsonl";

/// One validation of one model on one machine: a line of the ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// [`SCHEMA_VERSION`] of the writer.
    pub schema_version: u32,
    /// When the validation finished, UTC, RFC 3339 with whole seconds (`2026-02-08T12:00:00Z`;
    /// see [`now_utc`]).
    pub timestamp_utc: String,
    /// The model.
    pub model: ModelInfo,
    /// The patterns (plan rewrites) that were applied, in order, e.g. `["moe_mlp"]`.
    pub patterns_applied: Vec<String>,
    /// How many steps of the reference plan the patterns replaced (ZMLX: modules patched).
    pub steps_patched: usize,
    /// The device it ran on.
    pub hardware: Hardware,
    /// Driver, CUDA and zmoe versions.
    pub software: Software,
    /// Token fidelity of the patched plan against the reference plan.
    pub fidelity: Fidelity,
    /// Throughput and memory of the reference (unpatched) plan.
    pub reference: PlanRun,
    /// Throughput and memory of the patched plan.
    pub patched: PlanRun,
    /// Patched over reference medians.
    pub speedup: Speedup,
    /// How the validation was run.
    pub settings: Settings,
    /// Free text from `--notes` (may contain anything, newlines included).
    #[serde(default)]
    pub notes: String,
}

/// The model an entry is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Stable id: a preset as `family/preset@quant` (`qwen3_moe/qwen3-30b-a3b@affine4`) or
    /// the model folder's name (`Qwen3-30B-A3B-4bit`). Entries are grouped by it, so it must
    /// not contain machine paths.
    pub id: String,
    /// `model_type`, e.g. `qwen3_moe`.
    pub family: String,
    /// Weight format in one word, e.g. `affine4g64` or `bf16`, if known.
    #[serde(default)]
    pub quant: Option<String>,
}

/// What an entry ran on. Entries are compared per `name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hardware {
    /// Device name, e.g. `NVIDIA H200` (the CPU model for CPU runs).
    pub name: String,
    /// Total device memory in bytes, if known.
    pub memory_bytes: Option<u64>,
}

impl From<&DeviceInfo> for Hardware {
    fn from(d: &DeviceInfo) -> Hardware {
        Hardware { name: d.name.clone(), memory_bytes: d.memory_bytes }
    }
}

/// The software an entry was measured with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Software {
    /// zmoe's crate version.
    pub zmoe_version: String,
    /// Short git commit of the build (see [`crate::bench::build_commit`]), or `unknown`.
    pub git_commit: String,
    /// Whether that checkout had uncommitted changes to tracked files (None if unknown).
    pub git_dirty: Option<bool>,
    /// GPU driver version, if any.
    pub driver: Option<String>,
    /// CUDA version (driver API), if any.
    pub cuda: Option<String>,
}

impl Software {
    /// The commit for tables: `abc1234`, or `abc1234-dirty` when the tree was modified.
    pub fn commit_label(&self) -> String {
        match self.git_dirty {
            Some(true) => format!("{}-dirty", self.git_commit),
            _ => self.git_commit.clone(),
        }
    }
}

/// PASS or FAIL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verdict {
    /// Every generated token identical.
    Pass,
    /// At least one token differs (or the lengths differ).
    Fail,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
        })
    }
}

/// Token fidelity: greedy tokens of the patched plan against the reference plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fidelity {
    /// PASS iff `identical == total` and `total > 0`.
    pub verdict: Verdict,
    /// Positions whose tokens are identical.
    pub identical: usize,
    /// Positions compared.
    pub total: usize,
    /// The first position where they differ (None on PASS).
    pub first_divergence: Option<Divergence>,
    /// Why the output was not finite (NaN / infinite logits), if it was: always a FAIL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub non_finite: Option<String>,
}

impl Fidelity {
    /// One line for humans: `200/200 tokens identical`, plus the first divergence.
    pub fn detail(&self) -> String {
        let mut s = format!("{}/{} tokens identical", self.identical, self.total);
        if let Some(d) = &self.first_divergence {
            s += &format!(
                "; first divergence at token {}: reference {}, patched {}",
                d.position, d.reference_token, d.patched_token
            );
            if d.margin.is_finite() {
                s += &format!(" (reference logit margin {:.4})", d.margin);
            }
        }
        if let Some(why) = &self.non_finite {
            s += &format!("; non-finite output: {why}");
        }
        s
    }

    /// `PASS 200/200` for table cells.
    pub fn short(&self) -> String {
        format!("{} {}/{}", self.verdict, self.identical, self.total)
    }
}

/// Where the patched plan first chose a different token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Divergence {
    /// Index of the generated token (0 = the first token after the prompt).
    pub position: usize,
    /// The reference plan's token there.
    pub reference_token: u32,
    /// The patched plan's token there.
    pub patched_token: u32,
    /// The reference's logit of its own (top-1) token minus its logit of the patched token
    /// there (a near-tie makes a divergence less alarming); NaN (`null`) if unknown.
    #[serde(with = "crate::jsonl::nan_as_null")]
    pub margin: f64,
}

/// Throughput and memory of one plan over the timed runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanRun {
    /// Decode tok/s of every timed run, in order.
    #[serde(with = "crate::jsonl::nans_as_null")]
    pub decode_tps: Vec<f64>,
    /// Their median.
    #[serde(with = "crate::jsonl::nan_as_null")]
    pub decode_median: f64,
    /// Prefill tok/s of every timed run, in order.
    #[serde(with = "crate::jsonl::nans_as_null")]
    pub prefill_tps: Vec<f64>,
    /// Their median.
    #[serde(with = "crate::jsonl::nan_as_null")]
    pub prefill_median: f64,
    /// Peak device memory in bytes, if the backend tracks it.
    pub peak_memory_bytes: Option<u64>,
    /// Bytes of weights read per decoded token × median decode tok/s, in GB/s.
    #[serde(with = "crate::jsonl::nan_as_null")]
    pub achieved_gbps: f64,
    /// Copy bandwidth measured in the same run (the roofline), GB/s.
    #[serde(with = "crate::jsonl::nan_as_null")]
    pub copy_gbps: f64,
    /// `achieved_gbps / copy_gbps × 100`.
    #[serde(with = "crate::jsonl::nan_as_null")]
    pub roofline_pct: f64,
}

impl PlanRun {
    /// Builds a run from raw measurements, computing the medians, achieved GB/s and % of
    /// roofline the same way for every writer.
    pub fn from_runs(
        decode_tps: Vec<f64>,
        prefill_tps: Vec<f64>,
        peak_memory_bytes: Option<u64>,
        bytes_per_token: u64,
        copy_gbps: f64,
    ) -> PlanRun {
        let decode_median = crate::bench::median(&mut decode_tps.clone());
        let prefill_median = crate::bench::median(&mut prefill_tps.clone());
        let achieved_gbps = bytes_per_token as f64 * decode_median / 1e9;
        PlanRun {
            decode_tps,
            decode_median,
            prefill_tps,
            prefill_median,
            peak_memory_bytes,
            achieved_gbps,
            copy_gbps,
            roofline_pct: achieved_gbps / copy_gbps * 100.0,
        }
    }
}

/// Patched median over reference median (> 1 = faster).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Speedup {
    /// Decode tok/s ratio.
    #[serde(with = "crate::jsonl::nan_as_null")]
    pub decode: f64,
    /// Prefill tok/s ratio.
    #[serde(with = "crate::jsonl::nan_as_null")]
    pub prefill: f64,
}

impl Speedup {
    /// `patched / reference` of the medians.
    pub fn of(reference: &PlanRun, patched: &PlanRun) -> Speedup {
        Speedup {
            decode: patched.decode_median / reference.decode_median,
            prefill: patched.prefill_median / reference.prefill_median,
        }
    }
}

/// How a validation was run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// Timed runs per plan.
    pub runs: usize,
    /// Untimed warm-up runs per plan, if recorded (absent in older entries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup: Option<usize>,
    /// Tokens generated per run.
    pub max_tokens: usize,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// The patterns asked for with `--patterns` / `--exclude`, resolved against the family
    /// policy (in application order); None = neither flag, i.e. the family's defaults.
    pub patterns_requested: Option<Vec<String>>,
    /// The backend, e.g. `cuda (NVIDIA H200, graph)` or `cpu (2 threads)`.
    pub backend: String,
}

impl Entry {
    /// The ledger entry of one validation: everything is taken from `r` except the model id,
    /// the notes and the patterns requested (which `r` does not know; see
    /// [`Settings::patterns_requested`]). The timestamp is the validation's.
    ///
    /// `software.cuda` is the device's driver API version ([`DeviceInfo::driver`]);
    /// `software.driver` (the kernel driver's version) is left `None` for the caller to fill
    /// in, since it is a fact of the host rather than of the report.
    pub fn from_validate(
        r: &ValidateReport,
        model_id: &str,
        notes: &str,
        patterns_requested: Option<Vec<String>>,
    ) -> Entry {
        let plan = |p: &crate::validate::PlanResult| {
            PlanRun::from_runs(
                p.runs.iter().map(|x| x.decode_tok_s).collect(),
                p.runs.iter().map(|x| x.prefill_tok_s).collect(),
                p.peak_memory_bytes.map(|b| b as u64),
                r.bytes_per_token as u64,
                r.copy_gb_s,
            )
        };
        let (reference, patched) = (plan(&r.reference), plan(&r.patched));
        let f = &r.fidelity;
        Entry {
            schema_version: SCHEMA_VERSION,
            timestamp_utc: r.provenance.timestamp_utc.clone(),
            model: ModelInfo { id: model_id.into(), family: r.model.family.clone(), quant: quant_word(&r.model) },
            patterns_applied: r.patterns_applied.iter().map(|(p, _)| p.clone()).collect(),
            steps_patched: r.steps_replaced,
            hardware: Hardware::from(&r.device),
            software: Software {
                zmoe_version: r.provenance.zmoe_version.clone(),
                git_commit: r.provenance.git_commit.clone(),
                git_dirty: r.provenance.git_dirty,
                driver: None,
                cuda: r.device.driver.clone(),
            },
            fidelity: Fidelity {
                verdict: if f.passed() { Verdict::Pass } else { Verdict::Fail },
                identical: f.identical,
                total: f.total,
                first_divergence: f.first_divergence.as_ref().map(|d| Divergence {
                    position: d.position,
                    reference_token: d.reference_token,
                    patched_token: d.patched_token,
                    margin: d.margin as f64,
                }),
                non_finite: f.non_finite.clone(),
            },
            speedup: Speedup::of(&reference, &patched),
            reference,
            patched,
            settings: Settings {
                runs: r.settings.runs,
                warmup: Some(r.settings.warmup),
                max_tokens: r.settings.max_tokens,
                prompt_tokens: r.settings.prompt.len(),
                patterns_requested,
                backend: r.backend.clone(),
            },
            notes: notes.into(),
        }
    }

    /// The key [`latest`] groups by: (model id, hardware name).
    pub fn key(&self) -> (&str, &str) {
        (&self.model.id, &self.hardware.name)
    }

    /// The date part of the timestamp (`2026-02-08`).
    pub fn date(&self) -> &str {
        self.timestamp_utc.get(..10).unwrap_or(&self.timestamp_utc)
    }
}

/// A model's weight format in one word ([`ModelInfo::quant`]): the format of the experts
/// (the bulk of an MoE's bytes), else of the dense MLPs, else of attention; e.g. `affine4g64`.
pub fn quant_word(m: &ModelSummary) -> Option<String> {
    ["experts", "dense_mlp", "attention"].iter().find_map(|k| m.quant.get(*k).cloned())
}

/// The current time as RFC 3339 UTC with whole seconds, for [`Entry::timestamp_utc`].
pub fn now_utc() -> String {
    crate::bench::rfc3339_utc(std::time::SystemTime::now())
}

/// The last entry (in ledger order) of every (model id, hardware name), sorted by model id
/// then hardware name, ignoring case.
pub fn latest(entries: &[Entry]) -> Vec<&Entry> {
    let mut by_key: BTreeMap<(&str, &str), &Entry> = BTreeMap::new();
    for e in entries {
        by_key.insert(e.key(), e);
    }
    let mut v: Vec<&Entry> = by_key.into_values().collect();
    v.sort_by_cached_key(|e| (e.model.id.to_lowercase(), e.hardware.name.to_lowercase()));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(decode: &[f64]) -> PlanRun {
        PlanRun::from_runs(decode.to_vec(), vec![1000.0, 1200.0, 1100.0], Some(1 << 30), 2_000_000_000, 4000.0)
    }

    #[test]
    fn plan_run_arithmetic() {
        let r = run(&[100.0, 80.0, 90.0]);
        assert_eq!(r.decode_median, 90.0);
        assert_eq!(r.prefill_median, 1100.0);
        assert_eq!(r.decode_tps, vec![100.0, 80.0, 90.0], "raw runs keep their order");
        assert!((r.achieved_gbps - 180.0).abs() < 1e-9);
        assert!((r.roofline_pct - 4.5).abs() < 1e-9);
        let s = Speedup::of(&r, &run(&[99.0, 99.0]));
        assert!((s.decode - 1.1).abs() < 1e-12);
        assert_eq!(s.prefill, 1.0);
    }

    #[test]
    fn non_finite_numbers_survive_as_nan() {
        let mut r = run(&[]);
        assert!(r.decode_median.is_nan());
        r.prefill_tps = vec![1.0, f64::INFINITY];
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"decode_median\":null") && json.contains("[1.0,null]"), "{json}");
        let back: PlanRun = serde_json::from_str(&json).unwrap();
        assert!(back.decode_median.is_nan() && back.roofline_pct.is_nan());
        assert_eq!(back.prefill_tps[0], 1.0);
        assert!(back.prefill_tps[1].is_nan());
    }

    #[test]
    fn fidelity_detail_and_verdict_spelling() {
        let mut f =
            Fidelity { verdict: Verdict::Pass, identical: 200, total: 200, first_divergence: None, non_finite: None };
        assert_eq!(f.detail(), "200/200 tokens identical");
        assert_eq!(f.short(), "PASS 200/200");
        f.verdict = Verdict::Fail;
        f.identical = 37;
        f.first_divergence = Some(Divergence { position: 37, reference_token: 5, patched_token: 9, margin: 0.0125 });
        assert_eq!(
            f.detail(),
            "37/200 tokens identical; first divergence at token 37: reference 5, patched 9 (reference logit margin 0.0125)"
        );
        assert_eq!(serde_json::to_string(&Verdict::Fail).unwrap(), "\"FAIL\"");
        assert!(serde_json::from_str::<Verdict>("\"pass\"").is_err(), "verdicts are upper case");
    }

    /// A validate report with hand-picked numbers: 2 runs per plan, a divergence at token 5.
    fn validate_report() -> ValidateReport {
        use crate::bench::{RunResult, Spread};
        use crate::validate::{Divergence as VDiv, Fidelity as VFid, PlanResult, ValidateOptions};
        let run = |prefill: f64, decode: f64| RunResult {
            prefill_secs: 0.1,
            prefill_tok_s: prefill,
            decode_tokens: 7,
            decode_secs: 0.2,
            decode_tok_s: decode,
        };
        let plan = |name: &str, steps: usize, runs: Vec<RunResult>| PlanResult {
            plan: name.into(),
            steps,
            prefill_tok_s: Spread::of(&runs.iter().map(|r| r.prefill_tok_s).collect::<Vec<_>>()),
            decode_tok_s: Spread::of(&runs.iter().map(|r| r.decode_tok_s).collect::<Vec<_>>()),
            runs,
            peak_memory_bytes: Some(1 << 20),
            achieved_gb_s: 0.0,
            roofline_pct: 0.0,
            tokens: vec![1, 2, 3],
            deterministic: true,
        };
        let mut quant = BTreeMap::new();
        quant.insert("attention".to_string(), "affine4g64".to_string());
        quant.insert("experts".to_string(), "affine4g64".to_string());
        quant.insert("router".to_string(), "affine8g64".to_string());
        ValidateReport {
            kind: crate::validate::CAPSULE_KIND.into(),
            capsule_version: crate::validate::CAPSULE_VERSION,
            provenance: crate::bench::Provenance {
                zmoe_version: "0.1.0".into(),
                git_commit: "abc1234".into(),
                git_dirty: Some(false),
                timestamp_utc: "2026-03-01T10:00:00Z".into(),
                command: "zmoe matrix run".into(),
            },
            model: ModelSummary {
                dir: "/models/x".into(),
                family: "qwen3_moe".into(),
                num_layers: 4,
                hidden_size: 256,
                num_experts: 16,
                top_k: 4,
                vocab_size: 1024,
                quant,
            },
            backend: "cuda (NVIDIA H200, graph)".into(),
            device: DeviceInfo {
                name: "NVIDIA H200".into(),
                driver: Some("13.0".into()),
                memory_bytes: Some(150_754_820_096),
            },
            settings: ValidateOptions { prompt: vec![7; 64], max_tokens: 200, runs: 2, warmup: 1 },
            patterns_applied: vec![("moe_mlp".into(), 9), ("residual_norm".into(), 5)],
            steps_replaced: 40,
            reference: plan("reference", 100, vec![run(1000.0, 100.0), run(1100.0, 110.0)]),
            patched: plan("moe_mlp+residual_norm", 74, vec![run(1200.0, 120.0), run(1300.0, 126.0)]),
            fidelity: VFid {
                verdict: "FAIL".into(),
                identical: 5,
                total: 200,
                first_divergence: Some(VDiv { position: 5, reference_token: 11, patched_token: 12, margin: 0.5 }),
                non_finite: None,
            },
            decode_speedup: 123.0 / 105.0,
            prefill_speedup: 1250.0 / 1050.0,
            bytes_per_token: 2_000_000_000,
            copy_gb_s: 4000.0,
        }
    }

    #[test]
    fn entry_from_validate() {
        let r = validate_report();
        let e = Entry::from_validate(&r, "qwen3_moe/tiny@affine4", "note", Some(vec!["moe_mlp".into()]));
        assert_eq!(e.schema_version, SCHEMA_VERSION);
        assert_eq!(e.timestamp_utc, "2026-03-01T10:00:00Z");
        assert_eq!(
            e.model,
            ModelInfo {
                id: "qwen3_moe/tiny@affine4".into(),
                family: "qwen3_moe".into(),
                quant: Some("affine4g64".into())
            }
        );
        assert_eq!(e.patterns_applied, ["moe_mlp", "residual_norm"]);
        assert_eq!(e.steps_patched, 40);
        assert_eq!(e.hardware, Hardware { name: "NVIDIA H200".into(), memory_bytes: Some(150_754_820_096) });
        assert_eq!(e.software.commit_label(), "abc1234");
        assert_eq!((e.software.driver.as_deref(), e.software.cuda.as_deref()), (None, Some("13.0")));
        assert_eq!(e.fidelity.verdict, Verdict::Fail);
        assert_eq!((e.fidelity.identical, e.fidelity.total), (5, 200));
        assert_eq!(
            e.fidelity.first_divergence,
            Some(Divergence { position: 5, reference_token: 11, patched_token: 12, margin: 0.5 })
        );
        assert_eq!(e.reference.decode_tps, [100.0, 110.0]);
        assert_eq!(e.reference.prefill_tps, [1000.0, 1100.0]);
        assert_eq!((e.reference.decode_median, e.patched.decode_median), (105.0, 123.0));
        assert_eq!((e.reference.prefill_median, e.patched.prefill_median), (1050.0, 1250.0));
        assert_eq!(e.patched.peak_memory_bytes, Some(1 << 20));
        assert!((e.patched.achieved_gbps - 246.0).abs() < 1e-9, "2 GB/token × 123 tok/s");
        assert!((e.patched.roofline_pct - 6.15).abs() < 1e-9);
        assert!((e.speedup.decode - r.decode_speedup).abs() < 1e-12);
        assert!((e.speedup.prefill - r.prefill_speedup).abs() < 1e-12);
        assert_eq!(
            e.settings,
            Settings {
                runs: 2,
                warmup: Some(1),
                max_tokens: 200,
                prompt_tokens: 64,
                patterns_requested: Some(vec!["moe_mlp".into()]),
                backend: "cuda (NVIDIA H200, graph)".into(),
            }
        );
        assert_eq!(e.notes, "note");

        let mut pass = r.clone();
        pass.fidelity.verdict = "PASS".into();
        pass.fidelity.first_divergence = None;
        pass.device.driver = None;
        let e = Entry::from_validate(&pass, "m", "", None);
        assert_eq!((e.fidelity.verdict, &e.fidelity.first_divergence), (Verdict::Pass, &None));
        assert_eq!((&e.software.cuda, &e.settings.patterns_requested), (&None, &None));
        // (Not whole-struct equality: serde_json's default float parser may be off by an ulp.)
        let back: Entry = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert_eq!((&back.model, &back.fidelity, &back.settings), (&e.model, &e.fidelity, &e.settings));
        assert!((back.speedup.decode - e.speedup.decode).abs() < 1e-12);
    }

    #[test]
    fn software_commit_label() {
        let mut s = Software {
            zmoe_version: "0.1.0".into(),
            git_commit: "abc1234".into(),
            git_dirty: Some(false),
            driver: None,
            cuda: None,
        };
        assert_eq!(s.commit_label(), "abc1234");
        s.git_dirty = Some(true);
        assert_eq!(s.commit_label(), "abc1234-dirty");
        s.git_dirty = None;
        assert_eq!(s.commit_label(), "abc1234");
    }
}
