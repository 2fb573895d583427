//! The CPU reference backend: executes any [`Plan`] in f32 with exactly dequantized weights.
//!
//! This is the oracle every other path is checked against, so it is written to be read:
//! one `match` arm per step, each a few lines over plain slices (see [`ops`]). It is
//! parallel (rayon) where that costs no clarity — over weight rows, heads and experts —
//! and every reduction has a fixed order, so results are deterministic run to run.

pub mod conv;
pub mod ops;

use std::sync::Arc;

use crate::backend::{Backend, Row};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::{Linear, MlaWeights, Mlp, Weights};
use crate::parallel::{Partial, ShardMap};
use crate::plan::lower::ExecPlans;
use crate::plan::{AttnOp, Buf, LinRef, MoeOp, NormRef, Plan, Step};

/// One sequence slot's cache.
#[derive(Debug, Default, Clone)]
struct SeqCache {
    /// Per layer: K rows `[S, nKV·D]`, post-norm, post-RoPE; for MLA the latent cache rows
    /// `[S, kv_lora + rope]` (normalised latent, roped `k_pe`).
    k: Vec<Vec<f32>>,
    /// Per layer: V rows `[S, nKV·D]` (unused by MLA).
    v: Vec<Vec<f32>>,
    /// Per LFM2 short-conv layer: the last `L − 1` gated inputs `[L−1, H]` (zeros on a
    /// fresh sequence); empty for attention layers.
    conv: Vec<Vec<f32>>,
    /// Tokens already in the cache (S).
    pos: usize,
}

impl SeqCache {
    fn new(cfg: &ModelConfig) -> SeqCache {
        let layers = cfg.num_layers;
        SeqCache { k: vec![Vec::new(); layers], v: vec![Vec::new(); layers], conv: conv_states(cfg), pos: 0 }
    }

    fn clear(&mut self) {
        self.pos = 0;
        self.k.iter_mut().chain(self.v.iter_mut()).for_each(Vec::clear);
        self.conv.iter_mut().for_each(|s| s.fill(0.0));
    }
}

/// Activation buffers, router choices, the rows of the forward being run and the sequence
/// slots' caches.
#[derive(Debug, Default)]
struct RunState {
    /// One buffer per [`Buf`], row-major `[rows, width]`.
    bufs: Vec<Vec<f32>>,
    /// Selected experts `[T, K]`.
    topk_idx: Vec<usize>,
    /// Their weights `[T, K]`.
    topk_w: Vec<f32>,
    /// The rows of the forward being run `[T]` (slot, position, token).
    rows: Vec<Row>,
    /// One cache per sequence slot ([`Backend::set_slots`]).
    seqs: Vec<SeqCache>,
    /// Simulated expert-parallel ranks only: per rank, the slots `t·K + j` of the current
    /// MoE layer whose expert it owns (ascending). Between `ExpertGateUp` and `Combine` the
    /// routed buffers (`Gate`, `Up`, `Act`, `ExpertOut`) are rank-major: rank 0's rows in this
    /// order, then rank 1's, … — each rank's block is what that rank alone would hold.
    rank_slots: Vec<Vec<usize>>,
}

impl RunState {
    fn take(&mut self, b: Buf) -> Vec<f32> {
        std::mem::take(&mut self.bufs[b as usize])
    }

    fn put(&mut self, b: Buf, v: Vec<f32>) {
        self.bufs[b as usize] = v;
    }

    /// Positions of the rows `[T]`.
    fn positions(&self) -> Vec<usize> {
        self.rows.iter().map(|r| r.pos).collect()
    }

    /// Appends row `i` of `buf` (rows of width `buf.len() / T`) to the cache `pick` chooses
    /// in its row's slot, for every row in order.
    fn append(&mut self, buf: Buf, pick: impl Fn(&mut SeqCache) -> &mut Vec<f32>) {
        let src = &self.bufs[buf as usize];
        let w = src.len() / self.rows.len();
        for (r, x) in self.rows.iter().zip(src.chunks_exact(w)) {
            pick(&mut self.seqs[r.slot]).extend_from_slice(x);
        }
    }

    /// Each row's view of layer `l`'s K (or latent) cache `[T]`, and of its V cache.
    fn caches(&self, l: usize) -> (Vec<&[f32]>, Vec<&[f32]>) {
        self.rows.iter().map(|r| (&self.seqs[r.slot].k[l][..], &self.seqs[r.slot].v[l][..])).unzip()
    }
}

/// The CPU backend for one loaded model and plan.
pub struct CpuBackend {
    cfg: ModelConfig,
    weights: Arc<Weights>,
    plan: Plan,
    /// The CPU runs every step as written: both plans are `plan`.
    exec: ExecPlans,
    rope: ops::Rope,
    st: RunState,
    /// [`Backend::max_context`]: the cache itself grows as needed, so this is the limit
    /// generation stops at (`--ctx`).
    max_ctx: usize,
    /// Expert parallelism simulated in one process ([`Backend::set_ranks`], `--ranks N`):
    /// each rank computes the routed experts it owns, and the combine gathers their weighted
    /// rows in slot order ([`crate::parallel`]). `None`: the plain single-rank path.
    ranks: Option<ShardMap>,
}

impl CpuBackend {
    /// A backend running `plan` over `weights`.
    /// The plan is checked against the weights first (every step's weights exist).
    pub fn new(cfg: ModelConfig, weights: Arc<Weights>, plan: Plan) -> Result<CpuBackend> {
        plan.check(&weights)?;
        let rope = ops::Rope::new(&cfg);
        let st =
            RunState { bufs: vec![Vec::new(); Buf::ALL.len()], seqs: vec![SeqCache::new(&cfg)], ..Default::default() };
        let exec = ExecPlans::same(&plan);
        let max_ctx = cfg.max_position_embeddings;
        Ok(CpuBackend { cfg, weights, plan, exec, rope, st, max_ctx, ranks: None })
    }

    /// The same backend with a context of `n` tokens ([`Backend::max_context`], `--ctx`).
    pub fn with_max_context(mut self, n: usize) -> CpuBackend {
        self.max_ctx = n;
        self
    }

    fn linear(&self, r: LinRef) -> &Linear {
        self.weights.linear(r).unwrap_or_else(|e| panic!("plan/model mismatch: {e}"))
    }

    fn norm(&self, r: NormRef) -> &[f32] {
        self.weights.norm(r).unwrap_or_else(|e| panic!("plan/model mismatch: {e}"))
    }

    fn layer(&self, l: usize) -> &crate::model::Layer {
        &self.weights.layers[l]
    }

    fn experts(&self, l: usize) -> &crate::model::Experts {
        self.weights.experts(l).unwrap_or_else(|e| panic!("plan/model mismatch: {e}"))
    }

    fn mla(&self, l: usize) -> &MlaWeights {
        self.weights.mla(l).unwrap_or_else(|e| panic!("plan/model mismatch: {e}"))
    }

    /// Executes one step over the `t` rows of `self.st.rows` (after [`Step::LastRow`], the
    /// rows asking for logits); a fused step runs as its primitive components.
    fn step(&mut self, step: &Step, t: &mut usize) {
        let parts = step.components();
        if !parts.is_empty() {
            return parts.iter().for_each(|s| self.step(s, t));
        }
        let c = &self.cfg;
        let (h, d, k) = (c.hidden_size, c.head_dim, c.top_k);
        match *step {
            Step::Embed => {
                let mut x = vec![0.0; self.st.rows.len() * h];
                for (row, r) in x.chunks_exact_mut(h).zip(&self.st.rows) {
                    self.weights.embed.dequant_row(r.token as usize, row);
                }
                self.st.put(Buf::X, x);
            }
            Step::RmsNorm { w, src, dst } => {
                let x = &self.st.bufs[src as usize];
                let mut out = if src == dst { x.clone() } else { vec![0.0; *t * self.norm(w).len()] };
                ops::rms_norm_prefix(x, x.len() / *t, self.norm(w), w.eps(c), &mut out);
                self.st.put(dst, out);
            }
            Step::Linear { w, src, dst } => {
                let lin = self.linear(w);
                let mut out = vec![0.0; *t * lin.w.rows];
                ops::linear(lin, &self.st.bufs[src as usize], *t, &mut out);
                self.st.put(dst, out);
            }
            Step::HeadNorm { w, buf } => {
                let mut x = self.st.take(buf);
                let src = x.clone();
                ops::rms_norm(&src, self.norm(w), w.eps(c), &mut x);
                self.st.put(buf, x);
            }
            Step::Attn { op: AttnOp::Rope, .. } => {
                let (mut q, mut kk) = (self.st.take(Buf::Q), self.st.take(Buf::K));
                let pos = self.st.positions();
                self.rope.apply(&mut q, c.num_heads, d, 0, &pos);
                self.rope.apply(&mut kk, c.num_kv_heads, d, 0, &pos);
                self.st.put(Buf::Q, q);
                self.st.put(Buf::K, kk);
            }
            Step::Attn { layer, op: AttnOp::KvAppend } => {
                self.st.append(Buf::K, |s| &mut s.k[layer]);
                self.st.append(Buf::V, |s| &mut s.v[layer]);
            }
            Step::Attn { layer, op: AttnOp::SinkAttention } => {
                let mut out = vec![0.0; *t * c.num_heads * d];
                let st = &self.st;
                let sinks = self.weights.sinks(layer).unwrap_or_else(|e| panic!("plan/model mismatch: {e}"));
                let (kc, vc) = st.caches(layer);
                let (q, pos) = (&st.bufs[Buf::Q as usize], st.positions());
                ops::attention_with(q, &kc, &vc, &pos, c, c.window(layer), Some(sinks), &mut out);
                self.st.put(Buf::Attn, out);
            }
            Step::Attn { layer, op: AttnOp::Attention } => {
                let mut out = vec![0.0; *t * c.num_heads * d];
                let st = &self.st;
                let (kc, vc) = st.caches(layer);
                ops::attention(&st.bufs[Buf::Q as usize], &kc, &vc, &st.positions(), c, &mut out);
                self.st.put(Buf::Attn, out);
            }
            Step::Add { dst, src } => {
                let s = self.st.take(src);
                debug_assert_eq!(s.len(), self.st.bufs[dst as usize].len(), "add {dst:?} += {src:?}");
                for (a, b) in self.st.bufs[dst as usize].iter_mut().zip(&s) {
                    *a += b;
                }
                self.st.put(src, s);
            }
            Step::Moe { layer, op: MoeOp::SigmoidTopK } => {
                let Mlp::Moe { correction_bias: Some(bias), .. } = &self.layer(layer).mlp else {
                    panic!("plan asks for the correction bias of layer {layer}, which has none")
                };
                let logits = &self.st.bufs[Buf::RouterLogits as usize];
                let (idx, w) = ops::sigmoid_topk(logits, bias, k, c.norm_topk_prob, c.router);
                self.st.topk_idx = idx;
                self.st.topk_w = w;
            }
            Step::Attn { op: AttnOp::MlaRope, .. } => {
                let m = c.mla.as_ref().expect("MLA config");
                let (mut q, mut kva) = (self.st.take(Buf::Q), self.st.take(Buf::Kva));
                let pos = self.st.positions();
                self.rope.apply(&mut q, c.num_heads, d, m.qk_nope_head_dim, &pos);
                self.rope.apply(&mut kva, 1, m.cache_row(), m.kv_lora_rank, &pos);
                self.st.put(Buf::Q, q);
                self.st.put(Buf::Kva, kva);
            }
            Step::Attn { layer, op: AttnOp::LatentAppend } => {
                self.st.append(Buf::Kva, |s| &mut s.k[layer]);
            }
            Step::Attn { layer, op: AttnOp::MlaQAbsorb } => {
                let m = c.mla.as_ref().expect("MLA config");
                let nope = m.qk_nope_head_dim;
                let q = &self.st.bufs[Buf::Q as usize];
                // Row (t, head) of QLat = embed_q[head] · q_nope[t, head].
                let rows = *t * c.num_heads;
                let x: Vec<f32> = (0..rows).flat_map(|r| q[r * d..][..nope].iter().copied()).collect();
                let heads: Vec<usize> = (0..rows).map(|r| r % c.num_heads).collect();
                let mut out = vec![0.0; rows * m.kv_lora_rank];
                ops::grouped_experts(&heads, 1, &x, &self.mla(layer).embed_q, &mut out);
                self.st.put(Buf::QLat, out);
            }
            Step::Attn { layer, op: AttnOp::MlaAttention } => {
                let m = c.mla.as_ref().expect("MLA config");
                let st = &self.st;
                let mut out = vec![0.0; *t * c.num_heads * m.kv_lora_rank];
                let (ql, q) = (&st.bufs[Buf::QLat as usize], &st.bufs[Buf::Q as usize]);
                ops::mla_attention(ql, q, &st.caches(layer).0, &st.positions(), c, &mut out);
                self.st.put(Buf::OLat, out);
            }
            Step::Attn { layer, op: AttnOp::MlaVUp } => {
                let rows = *t * c.num_heads;
                let heads: Vec<usize> = (0..rows).map(|r| r % c.num_heads).collect();
                let mut out = vec![0.0; rows * c.v_head_dim];
                ops::grouped_experts(
                    &heads,
                    1,
                    &self.st.bufs[Buf::OLat as usize],
                    &self.mla(layer).unembed_out,
                    &mut out,
                );
                self.st.put(Buf::Attn, out);
            }
            Step::Attn { layer, op: AttnOp::MlaAttentionExpanded } => {
                let st = &self.st;
                let mut out = vec![0.0; *t * c.num_heads * c.v_head_dim];
                ops::mla_attention_expanded(
                    &st.bufs[Buf::Q as usize],
                    &st.caches(layer).0,
                    &st.positions(),
                    self.mla(layer),
                    c,
                    &mut out,
                );
                self.st.put(Buf::Attn, out);
            }
            Step::Attn { layer, op: AttnOp::ShortConv } => {
                let cv = self.weights.conv(layer).unwrap_or_else(|e| panic!("plan/model mismatch: {e}"));
                let mut out = vec![0.0; *t * h];
                let st = &mut self.st;
                let bcx = &st.bufs[Buf::Bcx as usize];
                // Each run of consecutive rows of one slot moves that slot's state on.
                let mut at = 0;
                for run in st.rows.chunk_by(|a, b| a.slot == b.slot) {
                    let n = run.len();
                    let state = &mut st.seqs[run[0].slot].conv[layer];
                    let (x, o) = (&bcx[at * 3 * h..(at + n) * 3 * h], &mut out[at * h..(at + n) * h]);
                    conv::short_conv(x, h, &cv.kernel, cv.bias.as_deref(), state, o);
                    at += n;
                }
                self.st.put(Buf::Attn, out);
            }
            Step::Moe { layer, op: MoeOp::SigmoidBiasTopK } => {
                let crate::config::RouterKind::SigmoidBias { routed_scaling_factor, .. } = c.router else {
                    panic!("plan asks for the LFM2 router of a model without one")
                };
                let Mlp::Moe { correction_bias, .. } = &self.layer(layer).mlp else {
                    panic!("plan asks for the router of dense layer {layer}")
                };
                let logits = &self.st.bufs[Buf::RouterLogits as usize];
                let (idx, w) = conv::sigmoid_bias_topk(
                    logits,
                    c.num_experts,
                    correction_bias.as_deref(),
                    k,
                    c.norm_topk_prob,
                    routed_scaling_factor,
                );
                self.st.topk_idx = idx;
                self.st.topk_w = w;
            }
            Step::Moe { op: MoeOp::TopKSoftmax, .. } => {
                let logits = &self.st.bufs[Buf::RouterLogits as usize];
                let (idx, w) = ops::topk_softmax(logits, c.num_experts, k);
                self.st.topk_idx = idx;
                self.st.topk_w = w;
            }
            Step::Moe { op: MoeOp::ClampSwiglu, .. } => {
                let g = c.gpt_oss.as_ref().expect("GPT-OSS config");
                let (gate, up) = (&self.st.bufs[Buf::Gate as usize], &self.st.bufs[Buf::Up as usize]);
                let act = gate.iter().zip(up).map(|(&x, &u)| ops::clamp_swiglu(x, u, g.swiglu_limit, g.swiglu_alpha));
                let act = act.collect();
                self.st.put(Buf::Act, act);
            }
            Step::Moe { op: MoeOp::RouterTopK, .. } => {
                let logits = &self.st.bufs[Buf::RouterLogits as usize];
                let (idx, w) = ops::softmax_topk(logits, c.num_experts, k, c.norm_topk_prob);
                self.st.topk_idx = idx;
                self.st.topk_w = w;
            }
            Step::Moe { layer, op: MoeOp::ExpertGateUp } if self.ranks.is_some() => self.ranked_gate_up(layer),
            Step::Moe { layer, op: MoeOp::ExpertDown } if self.ranks.is_some() => self.ranked_down(layer),
            Step::Moe { op: MoeOp::Combine, .. } if self.ranks.is_some() => self.ranked_combine(*t),
            Step::Moe { layer, op: MoeOp::ExpertGateUp } => {
                let ex = self.experts(layer);
                let i = c.moe_intermediate_size;
                let (mut g, mut u) = (vec![0.0; *t * k * i], vec![0.0; *t * k * i]);
                let x = &self.st.bufs[Buf::H as usize];
                ops::grouped_experts(&self.st.topk_idx, k, x, &ex.gate, &mut g);
                ops::grouped_experts(&self.st.topk_idx, k, x, &ex.up, &mut u);
                if let Some(b) = &ex.bias {
                    ops::add_expert_bias(&self.st.topk_idx, &b.gate, &mut g);
                    ops::add_expert_bias(&self.st.topk_idx, &b.up, &mut u);
                }
                self.st.put(Buf::Gate, g);
                self.st.put(Buf::Up, u);
            }
            Step::Swiglu | Step::Moe { op: MoeOp::SharedSwiglu, .. } => {
                let (g, u) = (&self.st.bufs[Buf::Gate as usize], &self.st.bufs[Buf::Up as usize]);
                let act = g.iter().zip(u).map(|(&g, &u)| ops::silu(g) * u).collect();
                let dst = if matches!(step, Step::Swiglu) { Buf::Act } else { Buf::SharedAct };
                self.st.put(dst, act);
            }
            Step::Moe { layer, op: MoeOp::ExpertDown } => {
                let ex = self.experts(layer);
                let mut y = vec![0.0; *t * k * h];
                // Row t·K+j of Act is slot j of token t, i.e. expert topk_idx[t·K+j].
                ops::grouped_experts(&self.st.topk_idx, 1, &self.st.bufs[Buf::Act as usize], &ex.down, &mut y);
                if let Some(b) = &ex.bias {
                    ops::add_expert_bias(&self.st.topk_idx, &b.down, &mut y);
                }
                self.st.put(Buf::ExpertOut, y);
            }
            Step::Moe { op: MoeOp::Combine, .. } => {
                let mut out = vec![0.0; *t * h];
                ops::combine(&self.st.bufs[Buf::ExpertOut as usize], &self.st.topk_w, k, &mut out);
                self.st.put(Buf::Out, out);
            }
            Step::LastRow => {
                // Keep the rows that ask for logits (all of them: nothing to do).
                if self.st.rows.iter().any(|r| !r.logits) {
                    let x = self.st.take(Buf::X);
                    let keep: Vec<f32> = (self.st.rows.iter().zip(x.chunks_exact(h)))
                        .filter(|(r, _)| r.logits)
                        .flat_map(|(_, x)| x.iter().copied())
                        .collect();
                    self.st.rows.retain(|r| r.logits);
                    *t = self.st.rows.len();
                    self.st.put(Buf::X, keep);
                }
            }
            Step::Fused { .. } | Step::Packed { .. } => unreachable!("fused steps run as their components"),
        }
    }
}

/// The routed experts over simulated ranks. Each rank sees only its own slots and its own
/// contiguous block of experts (indexed locally, as a device holding only that block would),
/// so a rank that reached outside its block would fail here rather than silently agree.
impl CpuBackend {
    fn shard(&self) -> ShardMap {
        self.ranks.expect("ranked step without ranks")
    }

    /// Rank r: gate and up rows `[|slots_r|, I]` of its slots; stored rank-major.
    fn ranked_gate_up(&mut self, layer: usize) {
        let weights = self.weights.clone();
        let ex = weights.experts(layer).unwrap_or_else(|e| panic!("plan/model mismatch: {e}"));
        let (map, k, h, i) = (self.shard(), self.cfg.top_k, self.cfg.hidden_size, self.cfg.moe_intermediate_size);
        let x = &self.st.bufs[Buf::H as usize];
        let (mut g, mut u, mut all) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..map.ranks() {
            let slots = map.local_slots(r, &self.st.topk_idx);
            let (local, rg) = local_experts(&map, r, &slots, &self.st.topk_idx);
            // The hidden state of each slot's token `[|slots|, H]` (every rank holds all rows).
            let xs: Vec<f32> = slots.iter().flat_map(|&s| x[(s / k) * h..][..h].iter().copied()).collect();
            let (mut gr, mut ur) = (vec![0.0; slots.len() * i], vec![0.0; slots.len() * i]);
            ops::grouped_experts(&local, 1, &xs, &ex.gate[rg.clone()], &mut gr);
            ops::grouped_experts(&local, 1, &xs, &ex.up[rg.clone()], &mut ur);
            if let Some(b) = &ex.bias {
                ops::add_expert_bias(&local, &b.gate[rg.start * i..rg.end * i], &mut gr);
                ops::add_expert_bias(&local, &b.up[rg.start * i..rg.end * i], &mut ur);
            }
            g.extend(gr);
            u.extend(ur);
            all.push(slots);
        }
        self.st.put(Buf::Gate, g);
        self.st.put(Buf::Up, u);
        self.st.rank_slots = all;
    }

    /// Rank r: its expert outputs `[|slots_r|, H]` from its block of `Act`; stored rank-major.
    fn ranked_down(&mut self, layer: usize) {
        let weights = self.weights.clone();
        let ex = weights.experts(layer).unwrap_or_else(|e| panic!("plan/model mismatch: {e}"));
        let (map, h, i) = (self.shard(), self.cfg.hidden_size, self.cfg.moe_intermediate_size);
        let act = &self.st.bufs[Buf::Act as usize];
        let (mut y, mut at) = (Vec::new(), 0);
        for (r, slots) in self.st.rank_slots.iter().enumerate() {
            let (local, rg) = local_experts(&map, r, slots, &self.st.topk_idx);
            let mut yr = vec![0.0; slots.len() * h];
            ops::grouped_experts(&local, 1, &act[at * i..(at + slots.len()) * i], &ex.down[rg.clone()], &mut yr);
            if let Some(b) = &ex.bias {
                ops::add_expert_bias(&local, &b.down[rg.start * h..rg.end * h], &mut yr);
            }
            y.extend(yr);
            at += slots.len();
        }
        self.st.put(Buf::ExpertOut, y);
    }

    /// Each rank weights its rows (`w·y`, rounded as the reference combine rounds it); the
    /// rows are gathered in slot order and added in slot order: bit-identical to one rank.
    fn ranked_combine(&mut self, t: usize) {
        let (k, h) = (self.cfg.top_k, self.cfg.hidden_size);
        let (y, w) = (&self.st.bufs[Buf::ExpertOut as usize], &self.st.topk_w);
        let mut at = 0;
        let parts: Vec<Partial> = (self.st.rank_slots.iter())
            .map(|slots| {
                let mine = &y[at * h..(at + slots.len()) * h];
                at += slots.len();
                let rows = (slots.iter().zip(mine.chunks_exact(h)))
                    .flat_map(|(&s, row)| row.iter().map(move |&v| w[s] * v))
                    .collect();
                Partial { slots: slots.clone(), rows }
            })
            .collect();
        let gathered = crate::parallel::gather_slots(&parts, t * k, h)
            .unwrap_or_else(|e| panic!("simulated ranks lost a slot (a bug): {e}"));
        self.st.put(Buf::Out, crate::parallel::sum_slots(&gathered, k, h));
    }
}

/// Rank `r`'s view of `slots`: each slot's expert as an index into the rank's own block of
/// experts, and that block.
fn local_experts(map: &ShardMap, r: usize, slots: &[usize], choice: &[usize]) -> (Vec<usize>, std::ops::Range<usize>) {
    let rg = map.range(r);
    (slots.iter().map(|&s| choice[s] - rg.start).collect(), rg)
}

impl CpuBackend {
    /// Runs the plan over `rows` (checked by the caller) and appends them to their slots.
    fn run(&mut self, rows: &[Row]) {
        self.st.rows = rows.to_vec();
        let plan = std::mem::replace(&mut self.plan, Plan { name: String::new(), steps: Vec::new() });
        let mut t = rows.len();
        for step in &plan.steps {
            self.step(step, &mut t);
        }
        self.plan = plan;
        for r in rows {
            self.st.seqs[r.slot].pos += 1;
        }
    }

    /// The logits of the forward that just ran over `rows`, or [`Error::NonFinite`] naming
    /// the first position with a NaN or infinite logit and the layer and step that first
    /// produced a non-finite value. Finding those re-runs the forward with a check after every
    /// primitive step, so the normal case costs one scan of the logits. A failed forward
    /// leaves every cache as it was before it (`before`: the slots' caches then).
    fn finite_logits(&mut self, rows: &[Row], before: &[CacheMark]) -> Result<Vec<f32>> {
        let logits = self.st.take(Buf::Logits);
        let Some(i) = logits.iter().position(|x| !x.is_finite()) else {
            return Ok(logits);
        };
        let position = rows.iter().filter(|r| r.logits).nth(i / self.cfg.vocab_size).map_or(0, |r| r.pos);
        let restore = |st: &mut RunState| {
            for m in before {
                let seq = &mut st.seqs[m.slot];
                seq.pos = m.pos;
                seq.conv.clone_from(&m.conv);
                for (l, &(k, v)) in m.lens.iter().enumerate() {
                    seq.k[l].truncate(k);
                    seq.v[l].truncate(v);
                }
            }
        };
        restore(&mut self.st);
        let origin = self.locate_non_finite(rows);
        restore(&mut self.st);
        Err(Error::NonFinite { position, origin })
    }

    /// The cache lengths of every slot `rows` touch, to restore after a failed forward.
    fn marks(&self, rows: &[Row]) -> Vec<CacheMark> {
        let mut slots: Vec<usize> = rows.iter().map(|r| r.slot).collect();
        slots.sort_unstable();
        slots.dedup();
        (slots.into_iter())
            .map(|slot| {
                let seq = &self.st.seqs[slot];
                CacheMark {
                    slot,
                    pos: seq.pos,
                    lens: seq.k.iter().zip(&seq.v).map(|(k, v)| (k.len(), v.len())).collect(),
                    conv: seq.conv.clone(),
                }
            })
            .collect()
    }

    /// Runs the plan over `rows` primitive step by primitive step from empty buffers and
    /// names the first step after which a buffer holds a NaN or an infinity.
    fn locate_non_finite(&mut self, rows: &[Row]) -> String {
        let plan = std::mem::replace(&mut self.plan, Plan { name: String::new(), steps: Vec::new() });
        self.st.bufs.iter_mut().for_each(Vec::clear);
        self.st.rows = rows.to_vec();
        let (mut t, mut layer, mut found) = (rows.len(), None, None);
        'steps: for step in &plan.steps {
            for p in step.primitives() {
                self.step(&p, &mut t);
                // Steps without a weight of their own (adds, SwiGLU, ...) belong to the layer
                // they run in; the embedding, the final norm and the head to none.
                let outside = matches!(
                    p,
                    Step::Embed
                        | Step::LastRow
                        | Step::Linear { w: LinRef::LmHead, .. }
                        | Step::RmsNorm { w: NormRef::Final, .. }
                );
                layer = p.layer().or(layer);
                if self.st.bufs.iter().any(|b| b.iter().any(|x| !x.is_finite())) {
                    found = Some((if outside { None } else { layer }, p.kind()));
                    break 'steps;
                }
            }
        }
        self.plan = plan;
        match found {
            Some((Some(l), kind)) => format!("; first non-finite value: layer {l}, step `{kind}`"),
            Some((None, kind)) => format!("; first non-finite value: step `{kind}` (outside the layers)"),
            None => String::new(),
        }
    }
}

/// A slot's cache before a forward: (slot, position, per layer (K len, V len), its conv
/// states — a few KiB, copied since a forward overwrites them in place).
struct CacheMark {
    slot: usize,
    pos: usize,
    lens: Vec<(usize, usize)>,
    conv: Vec<Vec<f32>>,
}

impl Backend for CpuBackend {
    fn name(&self) -> String {
        let ranks = self.ranks.map_or(String::new(), |m| format!(", {} simulated expert-parallel ranks", m.ranks()));
        format!("cpu ({} threads{ranks})", rayon::current_num_threads())
    }

    fn set_ranks(&mut self, n: usize) -> Result<()> {
        if self.cfg.num_experts == 0 {
            return Err(Error::Arg(format!("--ranks {n}: the model has no routed experts to shard")));
        }
        self.ranks = Some(ShardMap::new(self.cfg.num_experts, n)?);
        Ok(())
    }

    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn position(&self) -> usize {
        self.st.seqs[0].pos
    }

    fn max_context(&self) -> usize {
        self.max_ctx
    }

    fn reset(&mut self) {
        self.st.seqs.iter_mut().for_each(SeqCache::clear);
    }

    fn slots(&self) -> usize {
        self.st.seqs.len()
    }

    fn set_slots(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            return Err(Error::Arg("a backend needs at least one sequence slot".into()));
        }
        self.st.seqs = vec![SeqCache::new(&self.cfg); n];
        Ok(())
    }

    fn slot_position(&self, slot: usize) -> usize {
        self.st.seqs[slot].pos
    }

    fn reset_slot(&mut self, slot: usize) {
        self.st.seqs[slot].clear();
    }

    fn plan(&self) -> &Plan {
        &self.plan
    }

    fn exec_plans(&self) -> &ExecPlans {
        &self.exec
    }

    fn set_plan(&mut self, plan: Plan) -> Result<()> {
        plan.check(&self.weights)?;
        self.exec = ExecPlans::same(&plan);
        self.plan = plan;
        self.reset();
        Ok(())
    }

    fn forward(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>> {
        crate::backend::check_tokens(&self.cfg, tokens, self.st.seqs[0].pos)?;
        let rows = Row::of_tokens(0, self.st.seqs[0].pos, tokens, tokens.len(), all_logits);
        self.forward_checked(&rows)
    }

    fn forward_rows(&mut self, rows: &[Row]) -> Result<Vec<f32>> {
        crate::backend::check_rows(&self.cfg, rows, self.st.seqs.len(), self.max_ctx, |s| self.st.seqs[s].pos)?;
        self.forward_checked(rows)
    }
}

impl CpuBackend {
    /// [`Backend::forward_rows`] on rows already checked.
    fn forward_checked(&mut self, rows: &[Row]) -> Result<Vec<f32>> {
        let before = self.marks(rows);
        self.run(rows);
        self.finite_logits(rows, &before)
    }
}

/// Zeroed conv states: `[L−1, H]` for each short-conv layer, empty for the others.
fn conv_states(cfg: &ModelConfig) -> Vec<Vec<f32>> {
    (0..cfg.num_layers)
        .map(|l| match &cfg.conv {
            Some(cv) if cfg.is_conv_layer(l) => vec![0.0; cv.state_len() * cfg.hidden_size],
            _ => Vec::new(),
        })
        .collect()
}
