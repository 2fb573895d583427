//! L2 prefetch of a step's weights on a side branch of the captured decode graph (issue 16;
//! on with `ZMOE_L2PF=<steps ahead>`, off by default until measured).
//!
//! Why: at batch 1 a decode kernel is a wave or two of warps that each load, wait a DRAM
//! round trip and compute, so every kernel starts cold and takes 2–4× its bytes at copy
//! bandwidth (bench/RESULTS.md). Most of what a step reads does not depend on the data: the
//! projections and the router of a layer are known before the layer runs, and the selected
//! experts' matrices are known once the router has run. A small kernel (a few blocks) on the
//! device's side stream issues bulk L2 prefetches of a step's weights while the steps before
//! it run, so the step's loads find L2. No step waits for the branch (only the end of the
//! graph joins it) and a prefetch changes no value, so every result is bit-identical.
//!
//! Shape: [`fork_points`] decides from the plan alone where each step's prefetches start;
//! [`entries`] turns that into byte spans of the device weights (pure, so CPU tests check
//! them against the weights); [`Prefetcher`] uploads them as one table per plan (before any
//! capture) and launches each fork at its step.

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
/// never before the step after the last router before it (none for a step that routes).
/// Every layer's router writes the same index buffer, so a fork that runs late may read the
/// next layer's choice: a wasted fetch, never a wrong value.
pub(crate) fn fork_points(steps: &[Step], ahead: usize) -> Vec<ForkAt> {
    let mut router = None;
    steps
        .iter()
        .enumerate()
        .map(|(j, s)| {
            let fixed = j.saturating_sub(ahead);
            // A step that picks its own experts reads them before any fork could know them.
            let experts = router.filter(|_| reads_experts(s) && !routes(s)).map(|r: usize| fixed.max(r + 1));
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
/// experts counted for each expert span; the span that crosses the budget is cut, and a span
/// that no longer fits is left out) — more than L2 holds would evict what the fork before
/// fetched. With `ahead` > 1 several forks' bytes are in flight at once.
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

/// The prefetches of one plan: the table on the device and, per fork step, its slice of
/// the table. Made before the capture (an upload may not run inside one); a copy is cheap.
#[derive(Debug, Clone)]
pub(crate) struct Prefetcher {
    /// The entries, `[N, 4]` u64 on the device.
    table: u64,
    /// Blocks of each launch.
    blocks: u32,
    /// `(step index, first entry, entries)`, by step.
    forks: Vec<(usize, usize, usize)>,
    /// The top-k expert indices (`[nidx]` i32), shared by every layer.
    idx: u64,
    /// Entries of `idx` the plan's rows fill (rows × top-k).
    nidx: usize,
    /// Experts a stack holds (an index outside `0..nexp` is skipped).
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

    /// Launches the fork due beside step `i` (call just before launching step `i`);
    /// whether there was one (then the capture must join the side stream).
    pub fn fork(&self, dev: &Device, i: usize) -> Result<bool> {
        let Ok(f) = self.forks.binary_search_by_key(&i, |f| f.0) else { return Ok(false) };
        let (_, first, n) = self.forks[f];
        let a = PrefetchArgs {
            table: rd(self.table),
            first: int(first),
            n: int(n),
            idx: rd(self.idx),
            nidx: int(self.nidx),
            nexp: int(self.nexp),
        };
        l2_prefetch(dev, &a, self.blocks).map(|_| true)
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

    /// A tiny model of `family/preset` in `quant`: its host weights, the same converted into
    /// a fake arena, and the plans the CUDA backend captures — decode (1 row) and batch (3
    /// rows) for the reference and the patched plan — as (rows, steps).
    type Setup =
        (FakeArena, std::sync::Arc<crate::model::Weights>, DeviceWeights, ModelConfig, Vec<(usize, Vec<Step>)>);
    fn setup(family: &str, preset: &str, quant: SynthQuant) -> Setup {
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
        let mut plans = Vec::new();
        for p in [Plan::reference(&cfg), patched_plan(&cfg, &Selection::default()).0] {
            let exec = lower::cuda(&p, &model.weights, &[]).unwrap();
            plans.push((1, exec.decode.steps));
            plans.push((3, exec.batch.steps));
        }
        (arena, model.weights.clone(), w, cfg, plans)
    }

    /// What the host weights say step `s` reads: (bytes of its fixed matrices, bytes of one
    /// selected expert's matrices) — the checker's own account, from the stored tensors.
    fn host_bytes(hw: &crate::model::Weights, s: &Step) -> (u64, u64) {
        let (mut f, mut e) = (0, 0);
        for p in parts(s) {
            match *p {
                Step::Linear { w: r, .. } => f += hw.linear(r).unwrap().w.nbytes() as u64,
                Step::Attn { layer, op: AttnOp::MlaQAbsorb } => {
                    f += hw.mla(layer).unwrap().embed_q.iter().map(|m| m.nbytes() as u64).sum::<u64>()
                }
                Step::Attn { layer, op: AttnOp::MlaVUp } => {
                    f += hw.mla(layer).unwrap().unembed_out.iter().map(|m| m.nbytes() as u64).sum::<u64>()
                }
                Step::Moe { layer, op: MoeOp::ExpertGateUp } => {
                    let x = hw.experts(layer).unwrap();
                    e += (x.gate[0].nbytes() + x.up[0].nbytes()) as u64;
                }
                Step::Moe { layer, op: MoeOp::ExpertDown } => e += hw.experts(layer).unwrap().down[0].nbytes() as u64,
                _ => {}
            }
        }
        (f, e)
    }

    /// With no budget limit, each step's fixed spans add up to the bytes of its matrices in
    /// the host weights, and its expert spans to one expert's matrices, repeated inside the
    /// stack for every expert; fixed weights fork `ahead` steps early and experts after the
    /// router before them (never later than their own step). On the affine, bf16 and MXFP4
    /// layouts, GQA and MLA, decode and 3-row batch plans (a fork's index count 3 × top-k).
    #[test]
    fn prefetch_table_fetches_each_steps_matrices_after_their_router() {
        for (family, preset, quant) in [
            ("qwen3_moe", "tiny", SynthQuant::Affine4),
            ("qwen3_moe", "tiny", SynthQuant::Bf16),
            ("glm4_moe_lite", "glm-tiny", SynthQuant::Affine4),
            ("gpt_oss", "gpt-oss-tiny", SynthQuant::Mxfp4),
        ] {
            let (arena, hw, w, cfg, plans) = setup(family, preset, quant);
            for (m, steps) in &plans {
                for ahead in [0, 1, 3] {
                    let at = fork_points(steps, ahead);
                    let es = entries(&w, &cfg, steps, ahead, u64::MAX, m * cfg.top_k).unwrap();
                    assert!(es.windows(2).all(|x| x[0].0 <= x[1].0), "sorted by fork");
                    let mut last_router = None;
                    let mut expert_steps = 0;
                    for (j, s) in steps.iter().enumerate() {
                        let (want_f, want_e) = host_bytes(&hw, s);
                        let (f, e) = spans(&w, &cfg, s).unwrap();
                        let got_f: u64 = f.iter().map(|x| x[1]).sum();
                        let got_e: u64 = e.iter().map(|x| x[1]).sum();
                        assert_eq!((got_f, got_e), (want_f, want_e), "{family} m {m}: step {j} {}", s.kind());
                        assert!(f.iter().all(|x| x[2] == 0) && e.iter().all(|x| x[2] != 0));
                        for x in f.iter().chain(&e) {
                            let reps = if x[2] == 0 { 1 } else { cfg.num_experts as u64 };
                            for k in 0..reps {
                                assert!(arena.holds(x[0] + k * x[2], x[1]), "{family}: span outside its allocation");
                            }
                        }
                        assert_eq!(at[j].fixed, j.saturating_sub(ahead));
                        for x in &f {
                            assert!(es.contains(&(at[j].fixed, *x)), "{family}: step {j}'s weights not in the table");
                        }
                        if want_e > 0 {
                            expert_steps += 1;
                            let r: usize = last_router.expect("a router before the experts");
                            let a = at[j].experts.expect("experts fetched");
                            assert!(a > r && a <= j, "{family}: experts of step {j} fork at {a}, router at {r}");
                            for x in &e {
                                assert!(es.contains(&(a, *x)), "{family}: step {j}'s experts not in the table");
                            }
                        }
                        if routes(s) {
                            last_router = Some(j);
                        }
                    }
                    assert!(expert_steps > 0, "{family}: no step read experts");
                    // The spans start at the weights' own addresses.
                    let o = w.linear(crate::model::LinRef::O(0)).unwrap().w.q.w.0;
                    assert!(es.iter().any(|x| x.1[0] == o), "{family}: layer 0's o_proj codes not fetched");
                }
                // A budget caps each fork, strided spans counted once per selected expert,
                // and it does cut: the capped table fetches less than the whole one.
                let budget = 4096;
                let nidx = m * cfg.top_k;
                let bytes = |es: &[(usize, Entry)]| -> std::collections::BTreeMap<usize, u64> {
                    let mut per = std::collections::BTreeMap::new();
                    for &(at, [_, n, stride, _]) in es {
                        *per.entry(at).or_default() += n * if stride == 0 { 1 } else { nidx as u64 };
                    }
                    per
                };
                let capped = bytes(&entries(&w, &cfg, steps, 1, budget, nidx).unwrap());
                let whole = bytes(&entries(&w, &cfg, steps, 1, u64::MAX, nidx).unwrap());
                assert!(capped.values().all(|&b| b <= budget), "{family}: {capped:?}");
                assert!(capped.values().sum::<u64>() < whole.values().sum::<u64>(), "{family}: the budget cut nothing");
                assert_eq!(
                    capped.keys().collect::<Vec<_>>(),
                    whole.keys().collect::<Vec<_>>(),
                    "every fork keeps some"
                );
            }
        }
    }

    /// A fused step that picks its experts and reads them fetches no experts (the indices
    /// are written inside it), and nothing before any router does.
    #[test]
    fn a_step_that_routes_fetches_no_experts() {
        let route = Step::Moe { layer: 0, op: MoeOp::RouterTopK };
        let up = Step::Moe { layer: 0, op: MoeOp::ExpertGateUp };
        let both = Step::Fused { op: crate::plan::Fusion::MoeRouter, parts: vec![route.clone(), up.clone()] };
        let at = fork_points(&[up.clone(), both, up.clone(), route, Step::Swiglu, up], 1);
        let ex: Vec<Option<usize>> = at.iter().map(|a| a.experts).collect();
        assert_eq!(ex, [None, None, Some(2), None, None, Some(4)]);
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
