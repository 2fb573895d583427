//! L2 prefetch of a step's weights on a side branch of the captured decode graph (issue 16;
//! on with `ZMOE_L2PF=<steps ahead>`, off by default until measured).
//!
//! Why: at batch 1 a decode kernel is a wave or two of warps that each load, wait a DRAM
//! round trip and compute, so every kernel starts cold and takes 2–4× its bytes at copy
//! bandwidth (bench/RESULTS.md). Most of what a step reads does not depend on the data: the
//! projections and the router of a layer are known before the layer runs, and the selected
//! experts' matrices are known once the router has run. A one-block kernel on the device's
//! side stream issues bulk L2 prefetches of a step's weights while the steps before it run,
//! so the step's loads find L2. The main chain never waits for the branch (only the end of
//! the capture joins it) and a prefetch changes no value, so every result is bit-identical.
//!
//! Shape: [`fork_points`] decides from the plan alone where each step's prefetches start;
//! [`entries`] turns that into byte spans of the device weights (pure, so CPU tests check
//! them against the allocations); [`Prefetcher`] uploads them as one table per captured
//! plan and launches each fork at its step.

use super::Device;
use super::ops::prefetch::{PrefetchArgs, l2_prefetch};
use super::ops::{int, rd};
use super::weights::{DMat, DeviceWeights};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::plan::{AttnOp, MoeOp, Step};

/// How the prefetch runs: steps ahead, and blocks a fork (spread over SMs: each SM's copy
/// engine generates its own bulk prefetches).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Setting {
    /// Fetch a step's fixed weights this many steps before it (0: beside it).
    pub ahead: usize,
    /// Blocks of each prefetch launch.
    pub blocks: u32,
}

/// Blocks a fork by default.
pub(crate) const DEFAULT_BLOCKS: u32 = 32;

impl Setting {
    /// `AHEAD[,BLOCKS]` (`ZMOE_L2PF`); anything else is off (`None`).
    pub fn parse(v: &str) -> Option<Setting> {
        let (a, b) = v.split_once(',').unwrap_or((v, ""));
        let ahead = a.trim().parse().ok()?;
        let blocks = if b.is_empty() { DEFAULT_BLOCKS } else { b.trim().parse().ok().filter(|&b| b > 0)? };
        Some(Setting { ahead, blocks })
    }
}

/// Where a step's prefetches start: the index of the step they run beside (the fork is
/// recorded just before that step is launched, so the prefetch starts once the step before
/// it has finished).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ForkAt {
    /// Weights that do not depend on the data (projections, routers, MLA heads).
    pub fixed: usize,
    /// The selected experts' matrices: not before the router that picks them has run;
    /// `None` when the step reads no experts or no router precedes it.
    pub experts: Option<usize>,
}

/// The primitive steps a step runs: itself, a fused step's parts, a packed step's step.
fn parts(s: &Step) -> Vec<&Step> {
    match s {
        Step::Fused { parts: ps, .. } => ps.iter().flat_map(parts).collect(),
        Step::Packed { step, .. } => parts(step),
        s => vec![s],
    }
}

/// Whether `s` picks the experts (writes the top-k indices).
fn routes(s: &Step) -> bool {
    parts(s).iter().any(|p| {
        matches!(
            p,
            Step::Moe { op: MoeOp::RouterTopK | MoeOp::SigmoidTopK | MoeOp::SigmoidBiasTopK | MoeOp::TopKSoftmax, .. }
        )
    })
}

/// Whether `s` reads the selected experts' matrices.
fn reads_experts(s: &Step) -> bool {
    parts(s).iter().any(|p| matches!(p, Step::Moe { op: MoeOp::ExpertGateUp | MoeOp::ExpertDown, .. }))
}

/// For each step of `steps`, where its prefetches start: fixed weights `ahead` steps
/// before it (0: beside itself — its later waves still find L2), the experts likewise but
/// never before the step after the last router before it.
pub(crate) fn fork_points(steps: &[Step], ahead: usize) -> Vec<ForkAt> {
    let mut router = None;
    steps
        .iter()
        .enumerate()
        .map(|(j, s)| {
            let fixed = j.saturating_sub(ahead);
            let experts = router.filter(|_| reads_experts(s)).map(|r: usize| fixed.max(r + 1));
            if routes(s) {
                router = Some(j);
            }
            ForkAt { fixed, experts }
        })
        .collect()
}

/// One span of the prefetch table (`PfEntry` in prefetch.cu): `bytes` at `p`, both
/// multiples of 16; with `stride` ≠ 0 the same span in each selected expert (`p + e·stride`).
pub(crate) type Entry = [u64; 4];

/// The spans of matrix 0 of `m` — codes, then scales and biases where the format has them —
/// as `(address, bytes, bytes to the next matrix of the stack)`.
fn mat_spans(m: &DMat) -> Vec<(u64, u64, u64)> {
    let (rows, cols) = (m.rows as u64, m.cols as u64);
    let (ws, ss) = (m.w_stride.max(0) as u64, m.sb_stride.max(0) as u64);
    let q = &m.q;
    let mut v = Vec::new();
    match q.fmt {
        0 => v.push((q.w.0, rows * cols * 2, ws * 2)),
        1 => {
            let groups = rows * cols / q.group.max(1) as u64;
            v.push((q.w.0, rows * cols * q.bits as u64 / 8, ws * 4));
            v.push((q.s.0, groups * 2, ss * 2));
            v.push((q.b.0, groups * 2, ss * 2));
        }
        // MXFP4: codes (4 bits) and one E8M0 scale byte a 32-block.
        _ => {
            v.push((q.w.0, rows * cols / 2, ws * 4));
            v.push((q.s.0, rows * cols / 32, ss));
        }
    }
    v.retain(|&(p, n, _)| p != 0 && n > 0);
    v
}

/// `[p, p + n)` shrunk to 16-byte boundaries (a bulk prefetch's unit), or `None` if
/// nothing is left: a prefetch never touches a byte outside its matrix.
fn inner16(p: u64, n: u64) -> Option<(u64, u64)> {
    let (a, e) = (p.next_multiple_of(16), (p + n) & !15);
    (e > a).then(|| (a, e - a))
}

/// The fixed spans of `m`: matrices `0..count` of a stack (or the one matrix) as one span.
fn fixed(m: &DMat, count: u64, out: &mut Vec<Entry>) {
    for (p, n, stride) in mat_spans(m) {
        let n = if count > 1 { stride * (count - 1) + n } else { n };
        out.extend(inner16(p, n).map(|(a, n)| [a, n, 0, 0]));
    }
}

/// The per-expert spans of stack `m` (skipped where the stride breaks 16-byte alignment).
fn experts(m: &DMat, out: &mut Vec<Entry>) {
    for (p, n, stride) in mat_spans(m) {
        if stride % 16 == 0 && stride > 0 {
            out.extend(inner16(p, n).map(|(a, n)| [a, n, stride, 0]));
        }
    }
}

/// What step `s` reads that a prefetch can fetch: `(fixed spans, expert spans)`. Vectors
/// (norms, biases, conv kernels) are kilobytes and left out; so are the caches (their
/// length is the position, a device value).
fn spans(w: &DeviceWeights, cfg: &ModelConfig, s: &Step) -> Result<(Vec<Entry>, Vec<Entry>)> {
    let (mut f, mut e) = (Vec::new(), Vec::new());
    for p in parts(s) {
        match *p {
            Step::Linear { w: r, .. } => fixed(&w.linear(r)?.w, 1, &mut f),
            Step::Attn { layer, op: AttnOp::MlaQAbsorb } => fixed(&w.mla(layer)?.embed_q, cfg.num_heads as u64, &mut f),
            Step::Attn { layer, op: AttnOp::MlaVUp } => fixed(&w.mla(layer)?.unembed_out, cfg.num_heads as u64, &mut f),
            Step::Moe { layer, op: MoeOp::ExpertGateUp } => {
                let x = w.experts(layer)?;
                experts(&x.gate, &mut e);
                experts(&x.up, &mut e);
            }
            Step::Moe { layer, op: MoeOp::ExpertDown } => experts(&w.experts(layer)?.down, &mut e),
            _ => {}
        }
    }
    Ok((f, e))
}

/// The prefetch table of `steps` as `(fork step, entry)`, sorted by fork step (then by the
/// reading step): what each fork fetches, at most `budget` bytes a fork (`nidx` selected
/// experts counted for each expert span; the span that crosses the budget is cut, later
/// ones dropped) — more than L2 holds would evict what the fork before fetched.
pub(crate) fn entries(
    w: &DeviceWeights,
    cfg: &ModelConfig,
    steps: &[Step],
    ahead: usize,
    budget: u64,
    nidx: usize,
) -> Result<Vec<(usize, Entry)>> {
    let mut all = Vec::new();
    for (j, (s, at)) in steps.iter().zip(fork_points(steps, ahead)).enumerate() {
        let (f, e) = spans(w, cfg, s)?;
        all.extend(f.into_iter().map(|x| (at.fixed, j, x)));
        if let Some(a) = at.experts {
            all.extend(e.into_iter().map(|x| (a, j, x)));
        }
    }
    all.sort_by_key(|&(at, j, _)| (at, j));
    let mut out: Vec<(usize, Entry)> = Vec::new();
    let (mut fork, mut used) = (usize::MAX, 0u64);
    for (at, _, mut x) in all {
        if at != fork {
            (fork, used) = (at, 0);
        }
        let reps = if x[2] != 0 { nidx.max(1) as u64 } else { 1 };
        let left = (budget.saturating_sub(used) / reps) & !15;
        if left == 0 {
            continue;
        }
        x[1] = x[1].min(left);
        used += x[1] * reps;
        out.push((at, x));
    }
    Ok(out)
}

/// The prefetches of one captured plan: the table on the device and, per fork step, its
/// slice of the table.
pub(crate) struct Prefetcher {
    table: u64,
    blocks: u32,
    /// `(step index, first entry, entries)`, by step.
    forks: Vec<(usize, usize, usize)>,
    /// The top-k indices (`[nidx]`, i32) and the experts' count.
    idx: u64,
    nidx: usize,
    nexp: usize,
}

impl Prefetcher {
    /// The table of `steps` over `m` rows (see [`entries`]), uploaded; `None` if there is
    /// nothing to fetch. `idx` holds the rows' top-k expert indices.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dev: &mut Device,
        w: &DeviceWeights,
        cfg: &ModelConfig,
        steps: &[Step],
        set: Setting,
        budget: u64,
        m: usize,
        idx: u64,
    ) -> Result<Option<Prefetcher>> {
        let nidx = m * cfg.top_k;
        let es = entries(w, cfg, steps, set.ahead, budget, nidx)?;
        if es.is_empty() {
            return Ok(None);
        }
        let mut forks: Vec<(usize, usize, usize)> = Vec::new();
        for (i, &(at, _)) in es.iter().enumerate() {
            match forks.last_mut() {
                Some(f) if f.0 == at => f.2 += 1,
                _ => forks.push((at, i, 1)),
            }
        }
        let flat: Vec<u64> = es.iter().flat_map(|(_, x)| *x).collect();
        let table = dev.upload(&flat)?;
        Ok(Some(Prefetcher { table, blocks: set.blocks, forks, idx, nidx, nexp: cfg.num_experts }))
    }

    /// Launches the fork due beside step `i` (call just before launching step `i`).
    pub fn fork(&self, dev: &Device, i: usize) -> Result<()> {
        let Ok(f) = self.forks.binary_search_by_key(&i, |f| f.0) else { return Ok(()) };
        let (_, first, n) = self.forks[f];
        let a = PrefetchArgs {
            table: rd(self.table),
            first: int(first),
            n: int(n),
            idx: rd(self.idx),
            nidx: int(self.nidx),
            nexp: int(self.nexp),
        };
        l2_prefetch(dev, &a, self.blocks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::synth::{self, SynthQuant, SynthSpec};
    use crate::cuda::weights::{Arena, Upload};
    use crate::plan::patterns::{Selection, patched_plan};
    use crate::plan::{Plan, lower};

    /// Hands out addresses like the device arena (256-aligned, a gap between allocations)
    /// and remembers each allocation's bytes.
    #[derive(Default)]
    struct FakeArena(Vec<(u64, u64)>);

    impl Arena for FakeArena {
        fn upload<T: Copy>(&mut self, data: &[T]) -> Result<u64> {
            let p = self.0.last().map_or(1 << 20, |&(p, n)| (p + n).next_multiple_of(256) + 256);
            self.0.push((p, std::mem::size_of_val(data) as u64));
            Ok(p)
        }
    }

    impl FakeArena {
        /// Whether `[p, p + n)` lies inside one allocation.
        fn holds(&self, p: u64, n: u64) -> bool {
            self.0.iter().any(|&(a, m)| p >= a && p + n <= a + m)
        }
    }

    /// A tiny model of `family/preset` in `quant`, its weights converted into a fake arena,
    /// and the decode plans the CUDA backend runs for the reference and the patched plan.
    fn setup(family: &str, preset: &str, quant: SynthQuant) -> (FakeArena, DeviceWeights, ModelConfig, Vec<Vec<Step>>) {
        let tmp = tempfile::tempdir().unwrap();
        let spec = SynthSpec {
            family: family.into(),
            preset: preset.into(),
            quant,
            group_size: 64,
            seed: 17,
            max_shard_bytes: synth::SHARD_BYTES,
        };
        let dir = tmp.path().join("m");
        synth::write(&spec, &dir, false).unwrap();
        let model = crate::Model::load(&dir).unwrap();
        let mut arena = FakeArena::default();
        let w = model.weights.convert(&mut Upload(&mut arena)).unwrap();
        let cfg = model.config().clone();
        let plans = [Plan::reference(&cfg), patched_plan(&cfg, &Selection::default()).0]
            .iter()
            .map(|p| lower::cuda(p, &model.weights, &[]).unwrap().decode.steps)
            .collect();
        (arena, w, cfg, plans)
    }

    /// Every span a prefetch may touch (each strided span at every expert) lies inside one
    /// allocation; every matrix a step reads is fetched whole when the budget allows; fixed
    /// weights fork `ahead` steps early, experts only after their router; a fork fetches at
    /// most its budget. On the affine, bf16 and MXFP4 layouts, GQA and MLA.
    #[test]
    fn prefetch_table_covers_each_step_inside_its_allocations() {
        for (family, preset, quant) in [
            ("qwen3_moe", "tiny", SynthQuant::Affine4),
            ("qwen3_moe", "tiny", SynthQuant::Bf16),
            ("glm4_moe_lite", "glm-tiny", SynthQuant::Affine4),
            ("gpt_oss", "gpt-oss-tiny", SynthQuant::Mxfp4),
        ] {
            let (arena, w, cfg, plans) = setup(family, preset, quant);
            for steps in &plans {
                for ahead in [0, 1, 3] {
                    let at = fork_points(steps, ahead);
                    let es = entries(&w, &cfg, steps, ahead, u64::MAX, cfg.top_k).unwrap();
                    assert!(es.windows(2).all(|x| x[0].0 <= x[1].0), "sorted by fork");
                    for &(_, [p, n, stride, _]) in &es {
                        assert!(p % 16 == 0 && n % 16 == 0 && n > 0, "{family}: span {p:#x}+{n}");
                        let reps = if stride == 0 { 1 } else { cfg.num_experts as u64 };
                        for e in 0..reps {
                            assert!(arena.holds(p + e * stride, n), "{family}: {p:#x}+{n} (expert {e}) outside");
                        }
                    }
                    let mut routed = None;
                    for (j, s) in steps.iter().enumerate() {
                        let (f, e) = spans(&w, &cfg, s).unwrap();
                        assert_eq!(at[j].fixed, j.saturating_sub(ahead));
                        for x in &f {
                            assert!(es.contains(&(at[j].fixed, *x)), "{family}: step {j}'s weights not fetched");
                        }
                        if !e.is_empty() {
                            let r = routed.expect("a router before the experts");
                            let a = at[j].experts.unwrap();
                            assert!(a > r && a <= j.max(r + 1), "{family}: experts of step {j} at {a}, router {r}");
                            for x in &e {
                                assert!(es.contains(&(a, *x)), "{family}: step {j}'s experts not fetched");
                            }
                        }
                        if routes(s) {
                            routed = Some(j);
                        }
                        if let Step::Linear { w: r, .. } = s {
                            assert!(!f.is_empty(), "{family}: {r:?} has nothing to fetch");
                        }
                    }
                    assert!(es.iter().any(|x| x.1[2] != 0), "{family}: no expert spans");
                }
                // A budget caps each fork: strided spans count once per selected expert.
                let budget = 4096;
                let es = entries(&w, &cfg, steps, 1, budget, cfg.top_k).unwrap();
                let mut per = std::collections::BTreeMap::<usize, u64>::new();
                for (at, [_, n, stride, _]) in es {
                    *per.entry(at).or_default() += n * if stride == 0 { 1 } else { cfg.top_k as u64 };
                }
                assert!(per.values().all(|&b| b <= budget && b > 0), "{family}: {per:?}");
            }
        }
    }

    #[test]
    fn setting_parses_ahead_and_blocks() {
        assert_eq!(Setting::parse("1"), Some(Setting { ahead: 1, blocks: DEFAULT_BLOCKS }));
        assert_eq!(Setting::parse("0,64"), Some(Setting { ahead: 0, blocks: 64 }));
        for off in ["", "off", "1,0", "-1", "1,x"] {
            assert_eq!(Setting::parse(off), None, "{off:?}");
        }
    }

    #[test]
    fn inner16_never_leaves_the_span() {
        assert_eq!(inner16(256, 100), Some((256, 96)));
        assert_eq!(inner16(250, 100), Some((256, 80)));
        assert_eq!(inner16(250, 10), None);
        for p in 1000..1040u64 {
            for n in 0..70u64 {
                if let Some((a, m)) = inner16(p, n) {
                    assert!(a >= p && a + m <= p + n && a % 16 == 0 && m % 16 == 0);
                }
            }
        }
    }
}
