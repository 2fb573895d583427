//! The kernel-pack file format (`pack-<arch>.json`): which template, with which knobs and
//! measured source hash, replaces the built-in kernel of an op at a token bucket.
//!
//! Why in the runtime: the CUDA backend reads packs (see `crate::plan::packs`, which turns
//! a pack into a plan rewrite); the foundry *writes* them (`crate::foundry::pack::promote`).
//! The format sits below both.
//!
//! At load, [`KernelPack::load`] re-renders every entry's template with its knobs and drops
//! (with the reason) any entry whose hash no longer matches — the template or `common.cuh`
//! changed since the measurement — so stale evidence never picks a kernel.
//! [`KernelPack::lookup`] then answers "which kernel for this op at this token count".

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::knobs::{self, Knobs};
use super::ops::OpId;
use super::templates::{self, Rendered};
use super::{Bucket, Numerics};
use crate::error::{Error, Result};

/// The `kind` of a pack file.
pub const PACK_KIND: &str = "zmoe-kernel-pack";
/// Version of the pack layout.
pub const PACK_VERSION: u32 = 1;

/// One opponent beaten by a promoted template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Opponent {
    /// The other template.
    pub template: String,
    /// Matched cases.
    pub n: usize,
    /// Wins of the promoted template.
    pub wins: usize,
    /// Its losses.
    pub losses: usize,
    /// Median p50(opponent) / p50(promoted) (> 1: the promoted one is faster).
    #[serde(with = "crate::jsonl::nan_as_null")]
    pub median_ratio: f64,
    /// Sign-test p.
    #[serde(with = "crate::jsonl::nan_as_null")]
    pub p: f64,
}

/// Why an entry is in the pack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// Cases in the bucket with at least two ok templates.
    pub bucket_cases: usize,
    /// The template's comparison with every other template of the bucket.
    pub opponents: Vec<Opponent>,
    /// Cases of this knob setting in the bucket.
    pub knob_cases: usize,
    /// Of which it was the fastest.
    pub knob_wins: usize,
    /// Median p50 / (fastest other template in the case) of this knob setting.
    #[serde(with = "crate::jsonl::nan_as_null")]
    pub knob_median_ratio: f64,
    /// Its median p50 (µs).
    #[serde(with = "crate::jsonl::nan_as_null")]
    pub median_p50_us: f64,
}

/// One promoted kernel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Op name.
    pub op: String,
    /// Token bucket.
    pub bucket: Bucket,
    /// Template.
    pub template: String,
    /// Knobs.
    pub knobs: Knobs,
    /// Hash of the measured source.
    pub source_hash: String,
    /// Numerics class.
    pub numerics: Numerics,
    /// The measurements behind it.
    pub evidence: Evidence,
    /// For a numerics-changing entry: the validate capsule that passed it.
    #[serde(default)]
    pub fidelity: Option<String>,
}

impl Entry {
    /// `moe_combine/t1_vec@0123456789abcdef`: how the backend names the kernel it uses (and
    /// what a fidelity capsule must mention).
    pub fn tag(&self) -> String {
        format!("{}/{}@{}", self.op, self.template, knobs::short_hash(&self.source_hash))
    }

    /// Renders the entry's template with its knobs as the current code does.
    pub fn render(&self) -> std::result::Result<(OpId, Rendered), String> {
        let op = OpId::parse(&self.op).map_err(|e| e.to_string())?;
        let t = templates::find(op, &self.template).map_err(|e| e.to_string())?;
        Ok((op, t.render(&self.knobs)?))
    }
}

/// A bucket that got no entry, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Refusal {
    /// Op name.
    pub op: String,
    /// Token bucket.
    pub bucket: Bucket,
    /// Why.
    pub why: String,
}

/// An entry the runtime ignores, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Dropped {
    /// The entry.
    pub entry: Entry,
    /// Why it is ignored.
    pub why: String,
}

/// A kernel pack for one GPU architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelPack {
    /// Always [`PACK_KIND`].
    pub kind: String,
    /// [`PACK_VERSION`].
    pub version: u32,
    /// `sm_90`, ...
    pub arch: String,
    /// GPU(s) the evidence came from.
    pub gpu: String,
    /// When promoted.
    pub created_utc: String,
    /// zmoe version that promoted it.
    pub zmoe_version: String,
    /// Its git commit.
    pub git_commit: String,
    /// The campaign folder.
    pub source: String,
    /// Significance level used.
    #[serde(with = "crate::jsonl::nan_as_null")]
    pub alpha: f64,
    /// Promoted kernels.
    pub entries: Vec<Entry>,
    /// Buckets left to the production kernels, with reasons.
    #[serde(default)]
    pub refused: Vec<Refusal>,
    /// Entries ignored at load time (not serialised).
    #[serde(skip)]
    pub dropped: Vec<Dropped>,
}

impl KernelPack {
    /// Reads a pack and keeps only the entries that are usable with this build: a known op
    /// and template, valid knobs, a source hash equal to what the template renders to now,
    /// one entry per (op, bucket). The others move to [`KernelPack::dropped`] with the reason.
    pub fn load(path: &Path) -> Result<KernelPack> {
        let text = crate::input::read_to_string(path)?;
        let mut pack: KernelPack =
            serde_json::from_str(&text).map_err(|e| Error::format(path, format!("not a kernel pack: {e}")))?;
        if pack.kind != PACK_KIND {
            return Err(Error::format(path, format!("kind is `{}`, expected `{PACK_KIND}`", pack.kind)));
        }
        if pack.version > PACK_VERSION {
            return Err(Error::format(
                path,
                format!("pack version {} is newer than this zmoe's {PACK_VERSION}", pack.version),
            ));
        }
        pack.verify();
        Ok(pack)
    }

    /// Drops unusable entries (see [`KernelPack::load`]).
    pub fn verify(&mut self) {
        let mut keep: Vec<Entry> = Vec::new();
        for e in std::mem::take(&mut self.entries) {
            let why = match e.render() {
                Err(why) => Some(why),
                Ok((_, r)) if r.hash != e.source_hash => Some(format!(
                    "source hash mismatch: the pack measured {}, the template now renders to {} (the template or \
                     common.cuh changed since the campaign; re-run it)",
                    e.source_hash, r.hash
                )),
                Ok(_) if keep.iter().any(|k| k.op == e.op && k.bucket == e.bucket) => {
                    Some(format!("a second entry for {} at {}", e.op, e.bucket.name()))
                }
                Ok(_) => None,
            };
            match why {
                Some(why) => self.dropped.push(Dropped { entry: e, why }),
                None => keep.push(e),
            }
        }
        self.entries = keep;
    }

    /// The entry for `op` at `tokens` tokens, if the pack has a usable one.
    pub fn lookup(&self, op: OpId, tokens: usize) -> Option<&Entry> {
        let b = Bucket::of(tokens);
        self.entries.iter().find(|e| e.op == op.name() && e.bucket == b)
    }

    /// One line per dropped entry: `kernel pack: ignoring moe_combine/t1_vec at 1..8: why`.
    pub fn warnings(&self) -> Vec<String> {
        self.dropped
            .iter()
            .map(|d| {
                format!(
                    "kernel pack: ignoring {}/{} at {}: {}",
                    d.entry.op,
                    d.entry.template,
                    d.entry.bucket.name(),
                    d.why
                )
            })
            .collect()
    }
}

/// Where the runtime looks for a pack: `$ZMOE_KERNEL_PACK`, else
/// `<cache>/packs/<arch>.json`.
pub fn default_path(arch: &str) -> PathBuf {
    match std::env::var_os("ZMOE_KERNEL_PACK") {
        Some(p) => PathBuf::from(p),
        None => crate::cache::cache_dir().join("packs").join(format!("{arch}.json")),
    }
}
