//! Kernel packs: the promoted winners of a GPU architecture, and the rules that let a
//! candidate in.
//!
//! A pack (`pack-<arch>.json`) maps (op, token bucket) to a template, its knobs and the hash
//! of the source that was measured. [`promote`] admits a candidate only if
//! 1. its template wins its bucket: more wins than losses against *every* other template
//!    with ok attempts there, each with an exact sign-test p < alpha (0.01) on matched cases;
//! 2. the knob setting chosen for it (lowest median ratio to the best other template of the
//!    same case, at least two cases) never failed correctness anywhere in the ledger, and
//!    its measured source hash is what the template renders to *now*;
//! 3. if it is numerics-changing, a `zmoe validate` capsule with a fidelity PASS names it
//!    (the CUDA backend lists the pack kernels it uses in its name, which the capsule
//!    records), otherwise it goes to a *pending* pack to validate with.
//!
//! The production configuration winning its bucket is no entry at all (nothing to change).
//!
//! At run time [`KernelPack::load`] re-renders every entry's template with its knobs and
//! drops (with the reason) any entry whose hash no longer matches — the template or
//! `common.cuh` changed since the measurement — so stale evidence never picks a kernel.
//! [`KernelPack::lookup`] then answers "which kernel for this op at this token count".

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::attempts::Attempt;
use super::knobs::{self, Knobs};
use super::ops::OpId;
use super::report::{Analysis, KnobStats, Pair, analyse, fmt_p, group};
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
    #[serde(with = "crate::foundry::num")]
    pub median_ratio: f64,
    /// Sign-test p.
    #[serde(with = "crate::foundry::num")]
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
    #[serde(with = "crate::foundry::num")]
    pub knob_median_ratio: f64,
    /// Its median p50 (µs).
    #[serde(with = "crate::foundry::num")]
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
    #[serde(with = "crate::foundry::num")]
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
        None => crate::cache_dir().join("packs").join(format!("{arch}.json")),
    }
}

/// Promotion settings.
#[derive(Debug, Clone)]
pub struct PromoteOptions {
    /// Significance level of every pairwise sign test.
    pub alpha: f64,
    /// `zmoe validate` capsules (path, parsed JSON) that may vouch for numerics-changing winners.
    pub fidelity: Vec<(PathBuf, serde_json::Value)>,
    /// The campaign folder (recorded in the pack).
    pub source: String,
}

/// What promotion decided for one architecture.
#[derive(Debug, Clone)]
pub struct Promotion {
    /// The pack to write (only admitted entries).
    pub pack: KernelPack,
    /// Numerics-changing winners waiting for a fidelity PASS.
    pub pending: Vec<Entry>,
    /// The analyses behind it, per op.
    pub analyses: Vec<Analysis>,
}

/// Whether capsule JSON is a `zmoe validate` PASS that used `tag`'s kernel.
fn vouches(capsule: &serde_json::Value, tag: &str) -> bool {
    capsule.get("kind").and_then(|v| v.as_str()) == Some(crate::validate::CAPSULE_KIND)
        && capsule.pointer("/fidelity/verdict").and_then(|v| v.as_str()) == Some("PASS")
        && capsule.get("backend").and_then(|v| v.as_str()).is_some_and(|b| b.contains(tag))
}

fn opponents(w: &[Pair]) -> Vec<Opponent> {
    w.iter()
        .map(|p| Opponent {
            template: p.b.clone(),
            n: p.n,
            wins: p.a_wins,
            losses: p.b_wins,
            median_ratio: p.median_ratio,
            p: p.p,
        })
        .collect()
}

/// Applies the promotion rules (module docs) to every (op, arch) in `atts`; one
/// [`Promotion`] per architecture.
pub fn promote(atts: &[Attempt], opts: &PromoteOptions) -> Vec<Promotion> {
    let prov = crate::bench::Provenance::now();
    let mut out: Vec<Promotion> = Vec::new();
    for ((op_name, arch), group) in group(atts) {
        let an = analyse(&group, opts.alpha);
        let idx = match out.iter().position(|p| p.pack.arch == arch) {
            Some(i) => i,
            None => {
                out.push(Promotion {
                    pack: KernelPack {
                        kind: PACK_KIND.into(),
                        version: PACK_VERSION,
                        arch: arch.clone(),
                        gpu: an.gpu.clone(),
                        created_utc: prov.timestamp_utc.clone(),
                        zmoe_version: prov.zmoe_version.clone(),
                        git_commit: prov.git_commit.clone(),
                        source: opts.source.clone(),
                        alpha: opts.alpha,
                        entries: Vec::new(),
                        refused: Vec::new(),
                        dropped: Vec::new(),
                    },
                    pending: Vec::new(),
                    analyses: Vec::new(),
                });
                out.len() - 1
            }
        };
        let prom = &mut out[idx];
        let op = OpId::parse(&op_name).ok();
        for b in &an.buckets {
            let refuse = |why: String| Refusal { op: op_name.clone(), bucket: b.bucket, why };
            let w = match &b.winner {
                Ok(w) => w,
                Err(why) => {
                    prom.pack.refused.push(refuse(format!("no significant winner: {why}")));
                    continue;
                }
            };
            let Some(op) = op else {
                prom.pack.refused.push(refuse(format!("unknown op {op_name}")));
                continue;
            };
            let Ok(t) = templates::find(op, &w.template) else {
                prom.pack.refused.push(refuse(format!("{} is not a template of this build", w.template)));
                continue;
            };
            // Knob settings of the winner: never incorrect anywhere, measured on the current
            // source, at least two cases (one if that is all there is), best median ratio.
            let ks: Vec<&KnobStats> = an
                .knobs
                .get(&b.bucket)
                .map(|v| v.iter().filter(|k| k.template == w.template).collect())
                .unwrap_or_default();
            let current = |k: &KnobStats| t.render(&k.knobs).map(|r| r.hash == k.source_hash).unwrap_or(false);
            let usable: Vec<&&KnobStats> = ks.iter().filter(|k| k.incorrect_anywhere == 0 && current(k)).collect();
            let min_cases = if usable.iter().any(|k| k.cases >= 2) { 2 } else { 1 };
            let best = usable
                .iter()
                .filter(|k| k.cases >= min_cases)
                .min_by(|x, y| x.median_ratio.total_cmp(&y.median_ratio).then(y.cases.cmp(&x.cases)));
            let Some(best) = best else {
                let why = if ks.iter().any(|k| !current(k)) {
                    "its measurements are of an older version of the template (source hash changed); re-run the campaign"
                } else {
                    "every knob setting of it failed correctness somewhere"
                };
                prom.pack.refused.push(refuse(format!("{} won, but {why}", w.template)));
                continue;
            };
            let (bt, bk) = templates::baseline(op);
            if bt.name == w.template && bk == best.knobs {
                prom.pack
                    .refused
                    .push(refuse(format!("the production configuration {} wins: nothing to change", bt.label(&bk))));
                continue;
            }
            let worst_p = w.against.iter().map(|p| p.p).fold(0.0, f64::max);
            let entry = Entry {
                op: op_name.clone(),
                bucket: b.bucket,
                template: w.template.clone(),
                knobs: best.knobs.clone(),
                source_hash: best.source_hash.clone(),
                numerics: best.numerics,
                evidence: Evidence {
                    bucket_cases: b.cases,
                    opponents: opponents(&w.against),
                    knob_cases: best.cases,
                    knob_wins: best.wins,
                    knob_median_ratio: best.median_ratio,
                    median_p50_us: best.median_p50,
                },
                fidelity: None,
            };
            if entry.numerics == Numerics::Changing {
                let tag = entry.tag();
                match opts.fidelity.iter().find(|(_, c)| vouches(c, &tag)) {
                    Some((path, _)) => {
                        let mut e = entry;
                        e.fidelity = Some(format!("PASS: {}", path.display()));
                        prom.pack.entries.push(e);
                    }
                    None => {
                        prom.pack.refused.push(refuse(format!(
                            "{} wins (p ≤ {} vs each) but changes numerics and no `zmoe validate` capsule with a \
                             fidelity PASS names {tag}: pending",
                            t.label(&entry.knobs),
                            fmt_p(worst_p)
                        )));
                        prom.pending.push(entry);
                    }
                }
            } else {
                prom.pack.entries.push(entry);
            }
        }
        prom.analyses.push(an);
    }
    out
}

/// A human summary of a promotion.
pub fn render(p: &Promotion) -> String {
    let mut s = format!(
        "kernel pack for {} ({}): {} entr{}\n",
        p.pack.arch,
        p.pack.gpu,
        p.pack.entries.len(),
        if p.pack.entries.len() == 1 { "y" } else { "ies" }
    );
    for e in &p.pack.entries {
        let worst = e.evidence.opponents.iter().map(|o| o.p).fold(0.0, f64::max);
        let margin = e.evidence.opponents.iter().map(|o| o.median_ratio).fold(f64::INFINITY, f64::min);
        s += &format!(
            "  PROMOTED {:<18} {:<8} {}{{{}}} [{}] — beats {} template{} at p ≤ {} (median ≥ {:.3}× faster), {} knob cases, {}\n",
            e.op,
            e.bucket.name(),
            e.template,
            knobs::display(&e.knobs),
            e.numerics.name(),
            e.evidence.opponents.len(),
            if e.evidence.opponents.len() == 1 { "" } else { "s" },
            fmt_p(worst),
            margin,
            e.evidence.knob_cases,
            knobs::short_hash(&e.source_hash),
        );
    }
    for r in &p.pack.refused {
        s += &format!("  kept     {:<18} {:<8} {}\n", r.op, r.bucket.name(), r.why);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack_with(entries: Vec<Entry>) -> KernelPack {
        KernelPack {
            kind: PACK_KIND.into(),
            version: PACK_VERSION,
            arch: "sm_90".into(),
            gpu: "test".into(),
            created_utc: String::new(),
            zmoe_version: String::new(),
            git_commit: String::new(),
            source: String::new(),
            alpha: 0.01,
            entries,
            refused: Vec::new(),
            dropped: Vec::new(),
        }
    }

    fn entry(op: OpId, template: &str, bucket: Bucket) -> Entry {
        let t = templates::find(op, template).unwrap();
        let k = t.default_knobs();
        Entry {
            op: op.name().into(),
            bucket,
            template: template.into(),
            source_hash: t.render(&k).unwrap().hash,
            knobs: k,
            numerics: t.numerics(&t.default_knobs()),
            evidence: Evidence {
                bucket_cases: 10,
                opponents: vec![],
                knob_cases: 3,
                knob_wins: 3,
                knob_median_ratio: 0.8,
                median_p50_us: 1.0,
            },
            fidelity: None,
        }
    }

    #[test]
    fn load_drops_stale_hashes_unknown_templates_and_duplicates() {
        let good = entry(OpId::MoeCombine, "t1_vec", Bucket::Small);
        let mut stale = entry(OpId::MoeCombine, "t2_row_tile", Bucket::Large);
        stale.source_hash = "fnv1a64:0123456789abcdef".into();
        let mut unknown = entry(OpId::RmsnormResidual, "t1_warp_row", Bucket::Small);
        unknown.template = "t9_gone".into();
        let dup = entry(OpId::MoeCombine, "t3_dual_acc", Bucket::Small);
        let mut badknob = entry(OpId::TopkGating, "t0_warp", Bucket::Medium);
        badknob.knobs.insert("WPB".into(), 3);
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("sm_90.json");
        let p = pack_with(vec![good.clone(), stale, unknown, dup, badknob]);
        std::fs::write(&path, serde_json::to_string_pretty(&p).unwrap()).unwrap();
        let loaded = KernelPack::load(&path).unwrap();
        assert_eq!(loaded.entries, vec![good.clone()]);
        assert_eq!(loaded.lookup(OpId::MoeCombine, 1), Some(&good));
        assert_eq!(loaded.lookup(OpId::MoeCombine, 8), Some(&good));
        assert_eq!(loaded.lookup(OpId::MoeCombine, 9), None);
        assert_eq!(loaded.lookup(OpId::MoeCombine, 200), None, "the stale t2 entry must not be used");
        let w = loaded.warnings();
        assert_eq!(w.len(), 4, "{w:?}");
        assert!(w[0].contains("t2_row_tile at 33..256: source hash mismatch"), "{}", w[0]);
        assert!(w[1].contains("no template `t9_gone`"), "{}", w[1]);
        assert!(w[2].contains("a second entry"), "{}", w[2]);
        assert!(w[3].contains("WPB=3"), "{}", w[3]);
        // Not a pack: a clean error naming the file.
        std::fs::write(&path, "{\"kind\":\"x\"}").unwrap();
        assert!(KernelPack::load(&path).unwrap_err().to_string().contains("sm_90.json"));
    }

    #[test]
    fn capsules_vouch_only_with_pass_and_the_tag() {
        let tag = "moe_combine/t3_dual_acc@0123456789abcdef";
        let cap = |verdict: &str, backend: &str| serde_json::json!({"kind": "zmoe-validate", "fidelity": {"verdict": verdict}, "backend": backend});
        assert!(vouches(&cap("PASS", &format!("cuda (H200, graph, foundry: {tag})")), tag));
        assert!(!vouches(&cap("FAIL", &format!("cuda (foundry: {tag})")), tag));
        assert!(!vouches(&cap("PASS", "cuda (H200, graph)"), tag));
        assert!(!vouches(&serde_json::json!({"kind": "zmoe-bench", "backend": tag}), tag));
    }
}
