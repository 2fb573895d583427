//! [`CudaBackend`]: executes a [`Plan`] on the GPU with bf16 activations and f32
//! accumulation (router and logits in f32).
//!
//! Every buffer and the KV cache are allocated once (the device `RunState`), sized for a
//! prefill chunk of [`CHUNK`] tokens. A long prompt runs the prefill plan (tensor cores)
//! eagerly over chunks; decode (one token) runs the decode plan captured once into a CUDA
//! graph and replayed per token — the position and the token live in device memory, so
//! replay needs no re-capture.
//!
//! Sequence slots ([`Backend::set_slots`]): each layer's cache is one allocation of
//! `slots × slot_ctx` rows, slot s owning rows `s·slot_ctx..`. Every row of a batch carries
//! its position and its slot's first cache row on the device (`io`), read by rope, the cache
//! append and attention, so one launch serves rows of any sequences and the single-row
//! decode graph serves any slot. A chunk of up to `BATCH_ROWS` rows that all ask for logits
//! (the server's decode steps; a short prompt with every logit) replays a graph captured
//! once per row count; long prompts' chunks and batches where only some rows ask run eagerly.
//! The three plans are built once ([`crate::plan::lower::cuda`]); this file maps each step to
//! buffers and weights and calls the typed launchers of [`super::ops`].

use std::collections::BTreeMap;
use std::sync::Arc;

use super::Device;
use super::ops::{
    self, Bf16, I32, Void, attention as attn, conv, gemm, gpt_oss, int, linear, mla, moe, norm, rd, rope, sample, wr,
};
use super::weights::{DLinear, DMat, DeviceWeights, Upload, unsupported};
use crate::backend::{Backend, DeviceInfo, Row, StepTime};
use crate::config::{ModelConfig, RouterKind};
use crate::error::{Error, Result};
use crate::model::Weights;
use crate::plan::lower::{self, ExecPlans};
use crate::plan::{AttnOp, Buf, Fusion, LinRef, MoeOp, NormRef, Plan, Step};
use crate::sample::Sampler;

/// Most tokens per prefill launch (activation buffers are sized for it). Large, so that a
/// prompt chunk routes enough rows to each expert to fill tensor-core tiles (`ops::gemm`):
/// 512 tokens × 8 slots over 128 experts is 32 rows, one tile, per expert on average.
pub const CHUNK: usize = 512;
/// Default KV-cache capacity (tokens) when the model allows more (`--ctx` overrides it).
const DEFAULT_MAX_CTX: usize = 8192;
/// Device memory left free after the weights, the activation buffers and the KV cache: CUDA
/// graphs, kernel-pack modules, the driver's own needs.
const CTX_RESERVE_BYTES: usize = 512 << 20;

/// The KV-cache capacity in tokens, given `free` bytes of device memory after the weights, the
/// activation buffers and the rings, and `token_bytes` of cache per token (all layers):
/// `--ctx` when given (an error naming the sizes if its cache does not fit), else
/// [`DEFAULT_MAX_CTX`] bounded by the model's `max_position_embeddings` and by what fits.
fn kv_capacity(c: &ModelConfig, requested: Option<usize>, token_bytes: usize, free: usize) -> Result<usize> {
    let avail = free.saturating_sub(CTX_RESERVE_BYTES);
    let fits = avail / token_bytes.max(1);
    let mib = |b: usize| format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64);
    let n = requested.unwrap_or(c.max_position_embeddings.min(DEFAULT_MAX_CTX).min(fits)).max(1);
    if n > fits {
        return Err(Error::Arg(format!(
            "{}: a KV cache of {n} tokens needs {} ({token_bytes} B per token) but {} of device memory are free \
             after the weights and the activation buffers ({} more kept free); pass a smaller --ctx \
             (at most {fits})",
            if requested.is_some() { format!("--ctx {n}") } else { "CUDA".into() },
            mib(n.saturating_mul(token_bytes)),
            mib(free),
            mib(CTX_RESERVE_BYTES)
        )));
    }
    Ok(n)
}

/// A layer's cache on the device: what one token leaves behind for the next, for every
/// sequence slot (slot s owns the s-th of `slots` equal parts).
enum LayerCache {
    /// GQA: K and V rows, bf16 `[slots · slot_ctx, nKV·D]` each.
    Kv { k: u64, v: u64 },
    /// MLA: the latent row (normalised latent + roped k_pe), bf16
    /// `[slots · slot_ctx, kv_lora + rope]`.
    Latent { rows: u64 },
    /// LFM2 short conv: the last `L − 1` gated inputs, bf16 `[slots, L − 1, H]`, whatever the
    /// context (read as zeros at position 0, so a new sequence needs no reset launch), and
    /// room for a copy of it (`saved`, kept across `profile_decode`).
    Conv { state: u64, saved: u64 },
    /// A sliding-window layer (GPT-OSS): K and V rows `[slots · ring, nKV·D]`, token p of
    /// slot s in row s·ring + p mod ring. `ring` = window + CHUNK − 1: a prefill chunk
    /// appends all its rows before its first query reads the oldest key it still needs.
    Ring { k: u64, v: u64, ring: usize },
}

impl LayerCache {
    /// bf16 values one token leaves in layer `l`'s cache: its K and V rows, MLA's latent
    /// row, or nothing (a conv layer's state does not grow).
    fn row(c: &ModelConfig, l: usize) -> usize {
        match &c.mla {
            _ if c.is_conv_layer(l) => 0,
            Some(m) => m.cache_row(),
            None => 2 * c.num_kv_heads * c.head_dim,
        }
    }

    /// Rows of layer `l`'s ring, if it slides.
    fn ring(c: &ModelConfig, l: usize) -> Option<usize> {
        c.window(l).map(|w| w + CHUNK - 1)
    }

    /// Cache bytes per token of context (the layers whose cache grows with it), and the
    /// bytes of the rings (fixed, whatever the context), both for one sequence slot. Conv
    /// states are a few KB: not counted.
    fn bytes(c: &ModelConfig) -> (usize, usize) {
        let layer = |l: usize| LayerCache::row(c, l) * 2;
        let rings = (0..c.num_layers).filter_map(|l| LayerCache::ring(c, l).map(|r| r * layer(l))).sum();
        let growing = (0..c.num_layers).filter(|&l| c.window(l).is_none()).map(layer).sum();
        (growing, rings)
    }

    /// Bytes of one slot's conv state in a short-conv layer, bf16 `[max(L − 1, 1), H]` (0
    /// for a model without conv layers).
    fn conv_bytes(c: &ModelConfig) -> usize {
        c.conv.as_ref().map_or(0, |cv| cv.state_len().max(1) * c.hidden_size * 2)
    }

    /// Layer `l`'s cache for `slots` sequences of `slot_ctx` tokens.
    fn alloc(dev: &mut Device, c: &ModelConfig, l: usize, slot_ctx: usize, slots: usize) -> Result<LayerCache> {
        if c.conv.is_some() && c.is_conv_layer(l) {
            let bytes = LayerCache::conv_bytes(c) * slots;
            return Ok(LayerCache::Conv { state: dev.alloc(bytes)?, saved: dev.alloc(bytes)? });
        }
        let row = LayerCache::row(c, l);
        let bytes = slots * slot_ctx * row * 2;
        Ok(match (c.mla.is_some(), LayerCache::ring(c, l)) {
            (true, _) => LayerCache::Latent { rows: dev.alloc(bytes)? },
            (false, Some(ring)) => {
                let half = slots * ring * row;
                LayerCache::Ring { k: dev.alloc(half)?, v: dev.alloc(half)?, ring }
            }
            (false, None) => LayerCache::Kv { k: dev.alloc(bytes / 2)?, v: dev.alloc(bytes / 2)? },
        })
    }
}

/// Device activation buffers, one per [`Buf`], plus router state and scalars.
struct RunState {
    bufs: [u64; Buf::ALL.len()],
    /// Elements per row of each buffer.
    widths: [usize; Buf::ALL.len()],
    /// `[CHUNK, K]` i32 expert of each (token, slot) row.
    topk_idx: u64,
    /// `[CHUNK, K]` f32 routing weight of each row.
    topk_w: u64,
    /// Prefill expert grouping: `[E + 1]` i32 row offsets per expert, `[CHUNK·K]` i32 rows,
    /// and the tensor-core tile table (`[1 + 2·max_tiles]` i32, see `ops::gemm`).
    grp_off: u64,
    grp_rows: u64,
    grp_tiles: u64,
    /// `[2]` i32: sampled token, host-fallback flag.
    sample_out: u64,
    /// `[CHUNK·nH]` i32 finished-block counters (`last_to_finish` in common.cuh) of the
    /// attention merge, the fused router and o_proj_add_rmsnorm: each kernel leaves them at
    /// zero, and kernels on the one stream never overlap.
    tickets: u64,
    /// `[pos[CHUNK], base[CHUNK], tokens[CHUNK], slot[CHUNK]]` as i32, written by the host
    /// before each forward: each row's position, its slot's first cache row, its token, its
    /// slot (for the caches that are not `slot_ctx` rows a slot: rings and conv states).
    io: u64,
    /// Attention partials: `[CHUNK·nH, splits, D or kv_lora]` f32 and `[.., splits, 2]` f32.
    part_o: u64,
    part_ml: u64,
    /// Elements currently in Gate/Up/Act (dense and expert widths differ).
    act_elems: usize,
}

impl RunState {
    fn width(&self, b: Buf) -> usize {
        self.widths[b as usize]
    }
}

/// The CUDA backend.
pub struct CudaBackend {
    dev: Device,
    cfg: ModelConfig,
    /// The plan chosen (`Backend::plan`), and what runs for it (`plan::lower::cuda`).
    plan: Plan,
    exec: ExecPlans,
    /// Host weights, kept to re-lower on `set_plan` (shared, not copied).
    weights: Arc<Weights>,
    w: DeviceWeights,
    /// One cache per layer, `slots × slot_ctx` rows.
    caches: Vec<LayerCache>,
    inv_freq: u64,
    st: RunState,
    /// Cache rows allocated per growing (KV or latent) layer.
    cache_rows: usize,
    /// Slots the rings and conv states are allocated for (they grow with `set_slots`).
    ring_slots: usize,
    /// Tokens per sequence slot ([`Backend::max_context`]).
    slot_ctx: usize,
    /// Tokens in each slot's cache (`slots()` entries).
    seqs: Vec<usize>,
    /// Rows of the running chunk whose logits are computed: `Step::LastRow` gathers them to
    /// the front of X (set by `run_rows` before each chunk).
    keep: Vec<usize>,
    use_graph: bool,
    /// Captured graphs by batch rows: the decode step (1 row) and batches of up to
    /// [`lower::BATCH_ROWS`] rows that all ask for their logits (the server's decode steps).
    /// Keyed by the exact row count, so no padding row ever writes a cache or routes to an
    /// expert; at most `BATCH_ROWS` graphs. Rows, positions and slots live in `io`, so one
    /// graph serves every batch of its size.
    graphs: BTreeMap<usize, cudarc::driver::CudaGraph>,
    /// Tokens per prefill chunk, at most [`CHUNK`] (`set_prefill_chunk`).
    chunk: usize,
    /// Whether the running chunk is a prompt chunk on tensor cores (`run_rows`).
    tc_chunk: bool,
    /// Whether prompt chunks may take the tensor cores (the device's, `set_tensor_cores`).
    tc_allowed: bool,
    /// Foundry kernel-pack kernels (src/cuda/packs.rs; the plan's `Step::Packed` steps).
    packs: super::packs::PackKernels,
}

impl CudaBackend {
    /// Opens the GPU and uploads `weights`; `use_graph` captures decode steps into a graph.
    pub fn new(cfg: ModelConfig, weights: &Arc<Weights>, plan: Plan, use_graph: bool) -> Result<CudaBackend> {
        CudaBackend::with_context(cfg, weights, plan, use_graph, None)
    }

    /// Like [`CudaBackend::new`], with a KV cache of `ctx` tokens (`--ctx`; default 8192
    /// bounded by `max_position_embeddings` and free memory, see `kv_capacity`).
    pub fn with_context(
        cfg: ModelConfig,
        weights: &Arc<Weights>,
        plan: Plan,
        use_graph: bool,
        ctx: Option<usize>,
    ) -> Result<CudaBackend> {
        CudaBackend::with_slots(cfg, weights, plan, use_graph, ctx, 1)
    }

    /// Like [`CudaBackend::with_context`], with caches for `slots` sequences of `ctx` tokens
    /// each (default: as `with_context`, bounded so that all slots fit).
    pub fn with_slots(
        cfg: ModelConfig,
        weights: &Arc<Weights>,
        plan: Plan,
        use_graph: bool,
        ctx: Option<usize>,
        slots: usize,
    ) -> Result<CudaBackend> {
        let slots = slots.max(1);
        let mut dev = Device::open()?;
        let c = &cfg;
        let (h, d) = (c.hidden_size, c.head_dim);
        match &c.mla {
            None if d % 8 != 0 || d > ops::MAX_HEAD_DIM => {
                return Err(unsupported(format!("head_dim {d} (need a multiple of 8, at most {})", ops::MAX_HEAD_DIM)));
            }
            Some(m)
                if m.kv_lora_rank % 8 != 0
                    || m.kv_lora_rank > ops::MLA_MAX_LATENT
                    || m.qk_rope_head_dim % 8 != 0
                    || m.qk_rope_head_dim > ops::MLA_MAX_ROPE =>
            {
                return Err(unsupported(format!(
                    "MLA kv_lora_rank {} / qk_rope_head_dim {} (need multiples of 8, at most {} / {})",
                    m.kv_lora_rank,
                    m.qk_rope_head_dim,
                    ops::MLA_MAX_LATENT,
                    ops::MLA_MAX_ROPE
                )));
            }
            _ => {}
        }
        // MXFP4 stacks are read by GPT-OSS's expert kernels only.
        let mxfp4 =
            |m: &[crate::checkpoint::Mat]| m.iter().any(|m| matches!(m.kind, crate::checkpoint::MatKind::Mxfp4 { .. }));
        for (l, ly) in weights.layers.iter().enumerate() {
            let stacks_mxfp4 = match (&ly.mlp, &ly.attn) {
                (_, crate::model::Attn::Mla(m)) if mxfp4(&m.embed_q) || mxfp4(&m.unembed_out) => true,
                (crate::model::Mlp::Moe { experts: e, .. }, _) => {
                    c.gpt_oss.is_none() && (mxfp4(&e.gate) || mxfp4(&e.up) || mxfp4(&e.down))
                }
                _ => false,
            };
            if stacks_mxfp4 {
                return Err(unsupported(format!("MXFP4 expert or head weights in layer {l} of a non-GPT-OSS model")));
            }
        }
        if let RouterKind::SigmoidGrouped { n_group, .. } = c.router
            && n_group > 32
        {
            return Err(unsupported(format!("n_group {n_group} (at most 32)")));
        }
        if let Some(cv) = &c.conv
            && cv.kernel > conv::CONV_MAX_KERNEL
        {
            return Err(unsupported(format!("conv_L_cache {} (at most {})", cv.kernel, conv::CONV_MAX_KERNEL)));
        }
        if c.num_experts > 1024 || c.top_k > 16 {
            return Err(unsupported(format!("{} experts / top-{} (at most 1024 / 16)", c.num_experts, c.top_k)));
        }
        let w = weights.convert(&mut Upload(&mut dev))?;
        let inv_freq = dev.upload(&c.rope.inv_freq)?;
        // Activation buffers for CHUNK rows.
        let (k, nh) = (c.top_k.max(1), c.num_heads);
        let ffn = (k * c.moe_intermediate_size).max(c.intermediate_size).max(c.shared_intermediate_size());
        let (q_lora, lat) = c.mla.as_ref().map_or((0, 0), |m| (m.q_lora_rank.unwrap_or(0), m.kv_lora_rank));
        let kv_row = c.num_kv_heads * d;
        let kva_row = c.mla.as_ref().map_or(0, |m| m.cache_row());
        let widths: [(Buf, usize, usize); Buf::ALL.len()] = [
            (Buf::X, h, 2),
            (Buf::H, h, 2),
            (Buf::Q, nh * d, 2),
            (Buf::K, if c.mla.is_some() { 0 } else { kv_row }, 2),
            (Buf::V, if c.mla.is_some() { 0 } else { kv_row }, 2),
            (Buf::Attn, nh * c.v_head_dim, 2),
            (Buf::Out, h, 2),
            (Buf::RouterLogits, c.num_experts.max(1), 4),
            (Buf::Gate, ffn, 2),
            (Buf::Up, ffn, 2),
            (Buf::Act, ffn, 2),
            (Buf::ExpertOut, k * h, 2),
            (Buf::Logits, c.vocab_size, 4),
            (Buf::QA, q_lora, 2),
            (Buf::Kva, kva_row, 2),
            (Buf::QLat, nh * lat, 2),
            (Buf::OLat, nh * lat, 2),
            (Buf::SharedOut, if c.n_shared_experts > 0 { h } else { 0 }, 2),
            (Buf::SharedAct, c.shared_intermediate_size(), 2),
            (Buf::Bcx, if c.conv.is_some() { 3 * h } else { 0 }, 2),
        ];
        let splits = attn::ATTN_SPLITS.max(mla::MLA_SPLITS);
        let (mut bufs, mut buf_widths) = ([0u64; Buf::ALL.len()], [0usize; Buf::ALL.len()]);
        for (b, width, elem) in widths {
            bufs[b as usize] = if width > 0 { dev.alloc(CHUNK * width * elem)? } else { 0 };
            buf_widths[b as usize] = width;
        }
        let st = RunState {
            bufs,
            widths: buf_widths,
            topk_idx: dev.alloc(CHUNK * k * 4)?,
            topk_w: dev.alloc(CHUNK * k * 4)?,
            grp_off: dev.alloc((c.num_experts + 1) * 4)?,
            grp_rows: dev.alloc(CHUNK * k * 4)?,
            grp_tiles: dev.alloc((1 + 2 * gemm::max_tiles(CHUNK * k, c.num_experts)) * 4)?,
            sample_out: dev.alloc(8)?,
            tickets: dev.alloc(CHUNK * nh.max(1) * 4)?,
            io: dev.alloc(4 * CHUNK * 4)?,
            part_o: dev.alloc(CHUNK * nh * (attn::ATTN_SPLITS * d).max(mla::MLA_SPLITS * lat) * 4)?,
            part_ml: dev.alloc(CHUNK * nh * splits * 2 * 4)?,
            act_elems: 0,
        };
        dev.fill(st.tickets, 0, CHUNK * nh.max(1) * 4)?;
        // The KV cache after the weights and activation buffers, sized to the memory they
        // left free. Cached bf16 values per token and layer: K and V rows, or MLA's latent row.
        let (free, _) = cudarc::driver::result::mem_get_info().map_err(|e| Error::Cuda(e.to_string()))?;
        let (token_bytes, ring_bytes) = LayerCache::bytes(c);
        let slot_ctx = kv_capacity(c, ctx, token_bytes * slots, free.saturating_sub(ring_bytes * slots))?;
        let cache_rows = slot_ctx * slots;
        let caches = (0..c.num_layers)
            .map(|l| LayerCache::alloc(&mut dev, c, l, slot_ctx, slots))
            .collect::<Result<Vec<_>>>()?;
        let packs = super::packs::PackKernels::load(&dev);
        let exec = lower::cuda(&plan, weights, &packs.available())?;
        let dev_tc = dev.tensor_cores();
        Ok(CudaBackend {
            dev,
            cfg,
            plan,
            exec,
            weights: weights.clone(),
            w,
            caches,
            inv_freq,
            st,
            cache_rows,
            ring_slots: slots,
            slot_ctx,
            seqs: vec![0; slots],
            keep: Vec::new(),
            use_graph,
            graphs: BTreeMap::new(),
            chunk: CHUNK,
            tc_chunk: false,
            tc_allowed: dev_tc,
            packs,
        })
    }

    fn buf(&self, b: Buf) -> u64 {
        self.st.bufs[b as usize]
    }

    /// The chunk's row positions on the device (i32 `[CHUNK]`).
    fn pos_ptr(&self) -> u64 {
        self.st.io
    }

    /// The first cache row of each row's slot on the device (i32 `[CHUNK]`).
    fn base_ptr(&self) -> u64 {
        self.st.io + (CHUNK * 4) as u64
    }

    /// The chunk's token ids on the device (i32 `[CHUNK]`).
    fn tokens_ptr(&self) -> u64 {
        self.st.io + (2 * CHUNK * 4) as u64
    }

    /// The slot of each row on the device (i32 `[CHUNK]`).
    fn slot_ptr(&self) -> u64 {
        self.st.io + (3 * CHUNK * 4) as u64
    }

    /// Writes `io` for `rows` (at most [`CHUNK`]).
    fn write_io(&self, rows: &[Row]) -> Result<()> {
        let mut io = vec![0i32; 4 * CHUNK];
        for (i, r) in rows.iter().enumerate() {
            io[i] = r.pos as i32;
            io[CHUNK + i] = (r.slot * self.slot_ctx) as i32;
            io[2 * CHUNK + i] = r.token as i32;
            io[3 * CHUNK + i] = r.slot as i32;
        }
        self.dev.write(self.st.io, &io)
    }

    /// `(K cache, V cache)` of GQA layer `l`.
    fn kv_cache(&self, l: usize) -> Result<(u64, u64)> {
        match self.caches[l] {
            LayerCache::Kv { k, v } => Ok((k, v)),
            _ => Err(Error::Cuda(format!("plan asks for the linear KV cache of layer {l}, which has none"))),
        }
    }

    /// `(K cache, V cache, ring rows or 0)` of GQA layer `l`, linear or a ring.
    fn kv_ring(&self, l: usize) -> Result<(u64, u64, usize)> {
        match self.caches[l] {
            LayerCache::Kv { k, v } => Ok((k, v, 0)),
            LayerCache::Ring { k, v, ring } => Ok((k, v, ring)),
            _ => Err(Error::Cuda(format!("plan asks for the KV cache of layer {l}, which has none"))),
        }
    }

    /// The latent cache of MLA layer `l`.
    fn latent_cache(&self, l: usize) -> Result<u64> {
        match self.caches[l] {
            LayerCache::Latent { rows } => Ok(rows),
            _ => Err(Error::Cuda(format!("plan asks for the latent cache of layer {l}, which has none"))),
        }
    }

    /// The conv states of LFM2 short-conv layer `l`, `[slots, L − 1, H]`.
    fn conv_state(&self, l: usize) -> Result<u64> {
        match self.caches[l] {
            LayerCache::Conv { state, .. } => Ok(state),
            _ => Err(Error::Cuda(format!("plan asks for the conv state of layer {l}, which has none"))),
        }
    }

    /// Copies every conv state to its `saved` slot (`back`: the other way).
    fn save_conv_states(&self, back: bool) -> Result<()> {
        let bytes = LayerCache::conv_bytes(&self.cfg) * self.seqs.len();
        for cache in &self.caches {
            if let LayerCache::Conv { state, saved } = *cache {
                let (dst, src) = if back { (state, saved) } else { (saved, state) };
                self.dev.copy(dst, src, bytes)?;
            }
        }
        Ok(())
    }

    /// The MLA dims of this model, as the rope kernels take them.
    fn mla_dims(&self) -> Result<mla::MlaDims> {
        let c = &self.cfg;
        let m = c.mla.as_ref().ok_or_else(|| Error::Cuda("MLA step on a model without MLA".into()))?;
        Ok(mla::MlaDims {
            nh: int(c.num_heads),
            dqk: int(c.head_dim),
            nope: int(m.qk_nope_head_dim),
            row: int(m.cache_row()),
            lat: int(m.kv_lora_rank),
            d_rot: int(c.rope.dim),
            scaling: c.rope.attention_scaling,
            interleaved: c.rope.interleaved as i32,
        })
    }

    /// LFM2's routing-weight multiplier, or an error on a model without its router.
    fn bias_router_scale(&self) -> Result<f32> {
        match self.cfg.router {
            RouterKind::SigmoidBias { routed_scaling_factor, .. } => Ok(routed_scaling_factor),
            _ => Err(Error::Cuda("LFM2 router step on a model without it".into())),
        }
    }

    /// The sigmoid router's parameters, or an error on a softmax-router model.
    fn sigmoid_router(&self) -> Result<(usize, usize, f32)> {
        match self.cfg.router {
            RouterKind::SigmoidGrouped { n_group, topk_group, routed_scaling_factor } => {
                Ok((n_group, topk_group, routed_scaling_factor))
            }
            _ => Err(Error::Cuda("sigmoid router step on a softmax-router model".into())),
        }
    }

    /// A mat-vec of `lin` over `m` rows of `src` into `dst` (f32 for logits).
    fn linear_step(&self, lin: &DLinear, src: Buf, dst: Buf, m: usize) -> Result<()> {
        let a = linear::MatvecArgs {
            w: lin.w.q,
            x: rd(self.buf(src)),
            y: wr::<Void>(self.buf(dst)),
            bias: rd(lin.bias()),
            n: int(lin.w.rows),
            k: int(lin.w.cols),
            m: int(m),
            out_f32: matches!(dst, Buf::RouterLogits | Buf::Logits) as i32,
        };
        if self.tensor_cores() && gemm::supports(&a.w, lin.w.cols) && gemm::wide_enough(lin.w.rows) {
            gemm::gemm(&self.dev, &a)
        } else {
            linear::matvec(&self.dev, &a)
        }
    }

    /// Whether the running chunk's projections run on tensor cores (`ops::gemm`; set per
    /// chunk by `run_rows`).
    fn tensor_cores(&self) -> bool {
        self.tc_chunk
    }

    /// Launches one step over `m` rows (m may shrink to 1 at `LastRow`).
    fn step(&mut self, step: &Step, m: &mut usize) -> Result<()> {
        let c = &self.cfg;
        let (h, d, nh, nkv, k) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads, c.top_k);
        let eps = c.rms_norm_eps;
        let mm = *m;
        let dev = &self.dev;
        let (pos, base, x_buf) = (rd::<I32>(self.pos_ptr()), rd::<I32>(self.base_ptr()), self.buf(Buf::X));
        match *step {
            Step::Fused { op, ref parts } => self.fused(op, parts, mm)?,
            Step::Packed { ref step, ref kernels } => {
                // The pack kernel of this chunk's token bucket, else the built-in one.
                let b = crate::kernels::Bucket::of(mm);
                let done = match kernels.iter().find(|k| k.bucket == b) {
                    Some(k) => self.pack_step(step, k, mm)?,
                    None => false,
                };
                if !done {
                    self.step(step, m)?;
                }
            }
            Step::Embed => {
                let a = linear::EmbedArgs {
                    table: self.w.embed.q,
                    tokens: rd(self.tokens_ptr()),
                    out: wr(x_buf),
                    h: int(h),
                };
                linear::embed(dev, &a, mm)?;
            }
            Step::RmsNorm { w, src, dst } => {
                // Width: the norm's; row stride: the source buffer's (Kva rows are wider).
                let (n, ld) = match w {
                    NormRef::QLatent(_) => (self.st.width(Buf::QA), self.st.width(Buf::QA)),
                    NormRef::KvLatent(_) => (c.mla.as_ref().map_or(0, |m| m.kv_lora_rank), self.st.width(Buf::Kva)),
                    _ => (h, h),
                };
                let a = norm::RmsnormArgs {
                    x: rd(self.buf(src)),
                    w: rd(*self.w.norm(w)?),
                    y: wr(self.buf(dst)),
                    n: int(n),
                    ld: int(ld),
                    eps: w.eps(c),
                };
                norm::rmsnorm(dev, &a, mm, norm::NORM_THREADS)?;
            }
            Step::HeadNorm { w, buf } => {
                let heads = if buf == Buf::Q { nh } else { nkv };
                let p = self.buf(buf);
                let a = norm::RmsnormArgs { x: rd(p), w: rd(*self.w.norm(w)?), y: wr(p), n: int(d), ld: int(d), eps };
                norm::rmsnorm(dev, &a, mm * heads, norm::HEAD_NORM_THREADS)?;
            }
            Step::Linear { w, src, dst } => {
                let lin = self.w.linear(w)?.clone();
                self.linear_step(&lin, src, dst, mm)?;
                if matches!(dst, Buf::Gate | Buf::Up) {
                    self.st.act_elems = mm * lin.w.rows;
                }
            }
            Step::Attn { op: AttnOp::Rope, .. } if c.rope.attention_scaling != 1.0 => {
                let a = gpt_oss::RopeScaledArgs {
                    q: wr(self.buf(Buf::Q)),
                    k: wr(self.buf(Buf::K)),
                    inv_freq: rd(self.inv_freq),
                    pos,
                    nh: int(nh),
                    nkv: int(nkv),
                    d: int(d),
                    d_rot: int(c.rope.dim),
                    scaling: c.rope.attention_scaling,
                };
                gpt_oss::rope_scaled(dev, &a, mm)?;
            }
            Step::Attn { op: AttnOp::Rope, .. } => {
                let a = rope::RopeArgs {
                    q: wr(self.buf(Buf::Q)),
                    k: wr(self.buf(Buf::K)),
                    inv_freq: rd(self.inv_freq),
                    pos,
                    nh: int(nh),
                    nkv: int(nkv),
                    d: int(d),
                    d_rot: int(c.rope.dim),
                };
                rope::rope(dev, &a, mm)?;
            }
            Step::Attn { layer, op: AttnOp::KvAppend } if c.gpt_oss.is_some() => {
                let (kc, vc, ring) = self.kv_ring(layer)?;
                let a = gpt_oss::KvAppendRingArgs {
                    k: rd(self.buf(Buf::K)),
                    v: rd(self.buf(Buf::V)),
                    kc: wr(kc),
                    vc: wr(vc),
                    pos,
                    slot: rd(self.slot_ptr()),
                    w: int(nkv * d),
                    slot_rows: int(if ring > 0 { ring } else { self.slot_ctx }),
                    ring: int(ring),
                };
                gpt_oss::kv_append_ring(dev, &a, mm)?;
            }
            Step::Attn { layer, op: AttnOp::KvAppend } => {
                let (kc, vc) = self.kv_cache(layer)?;
                let a = rope::KvAppendArgs {
                    k: rd(self.buf(Buf::K)),
                    v: rd(self.buf(Buf::V)),
                    kc: wr(kc),
                    vc: wr(vc),
                    pos,
                    base,
                    w: int(nkv * d),
                };
                rope::kv_append(dev, &a, mm)?;
            }
            Step::Attn { layer, op: op @ (AttnOp::Attention | AttnOp::SinkAttention) } => {
                // GQA attention; GPT-OSS's (SinkAttention) adds its sinks, sliding window and ring cache (the
                // same kernels). A prompt chunk (one sequence's consecutive positions, see
                // run_rows) on tensor cores, else the split kernel.
                let (kc, vc, ring) = self.kv_ring(layer)?;
                let (sinks, window) = match op {
                    AttnOp::SinkAttention => (*self.w.sinks(layer)?, int(c.window(layer).unwrap_or(0))),
                    _ => (0, 0),
                };
                let (q, slot, out) = (rd(self.buf(Buf::Q)), rd(self.slot_ptr()), wr(self.buf(Buf::Attn)));
                let (kc, vc, sinks, ring, scale) = (rd(kc), rd(vc), rd(sinks), int(ring), c.attn_scale());
                let (nh, nkv, d_) = (int(nh), int(nkv), int(d));
                if self.tensor_cores() && attn::tc_supports(d) {
                    let a = attn::FlashArgs {
                        q,
                        kc,
                        vc,
                        pos,
                        base,
                        slot,
                        sinks,
                        out,
                        nh,
                        nkv,
                        d: d_,
                        scale,
                        m: int(mm),
                        window,
                        ring,
                    };
                    attn::attention_tc(dev, &a)?;
                } else {
                    let a = attn::AttentionArgs {
                        q,
                        kc,
                        vc,
                        pos,
                        base,
                        slot,
                        sinks,
                        part_o: wr(self.st.part_o),
                        part_ml: wr(self.st.part_ml),
                        tickets: wr(self.st.tickets),
                        out,
                        nh,
                        nkv,
                        d: d_,
                        scale,
                        nsplit: int(attn::ATTN_SPLITS),
                        window,
                        ring,
                    };
                    attn::attention(dev, &a, mm)?;
                }
            }
            Step::Add { dst, src } => {
                let a = norm::AddArgs { x: wr(self.buf(dst)), y: rd(self.buf(src)), n: (mm * h) as i64 };
                norm::add(dev, &a)?;
            }
            Step::Moe { op: MoeOp::TopKSoftmax, .. } => {
                let a = gpt_oss::TopkSoftmaxArgs {
                    logits: rd(self.buf(Buf::RouterLogits)),
                    e: int(c.num_experts),
                    k: int(k),
                    idx: wr(self.st.topk_idx),
                    wout: wr(self.st.topk_w),
                };
                gpt_oss::router_topk_softmax(dev, &a, mm)?;
            }
            Step::Moe { op: MoeOp::ClampSwiglu, .. } => {
                let g = c.gpt_oss.as_ref().ok_or_else(|| Error::Cuda("clamp_swiglu without GPT-OSS config".into()))?;
                let a = gpt_oss::ClampSwigluArgs {
                    g: rd(self.buf(Buf::Gate)),
                    u: rd(self.buf(Buf::Up)),
                    act: wr(self.buf(Buf::Act)),
                    n: self.st.act_elems as i64,
                    limit: g.swiglu_limit,
                    alpha: g.swiglu_alpha,
                };
                gpt_oss::clamp_swiglu(dev, &a)?;
            }
            Step::Moe { layer, op: MoeOp::ExpertGateUp } if self.w.experts(layer)?.bias.is_some() => {
                let ex = self.w.experts(layer)?.clone();
                self.group_experts(mm)?;
                let b = ex.bias.as_ref().ok_or_else(|| Error::Cuda("expert biases".into()))?;
                for (w, bias, dst) in [(ex.gate, b.gate, Buf::Gate), (ex.up, b.up, Buf::Up)] {
                    self.expert_bias_matvec(&w, bias, Buf::H, k, dst, mm * k)?;
                }
                self.st.act_elems = mm * k * c.moe_intermediate_size;
            }
            Step::Moe { layer, op: MoeOp::ExpertDown } if self.w.experts(layer)?.bias.is_some() => {
                let ex = self.w.experts(layer)?;
                let bias = ex.bias.as_ref().ok_or_else(|| Error::Cuda("expert biases".into()))?.down;
                self.expert_bias_matvec(&ex.down, bias, Buf::Act, 1, Buf::ExpertOut, mm * k)?;
            }
            Step::Moe { op: MoeOp::RouterTopK, .. } => {
                let a = moe::RouterTopkArgs {
                    logits: rd(self.buf(Buf::RouterLogits)),
                    e: int(c.num_experts),
                    k: int(k),
                    norm: c.norm_topk_prob as i32,
                    idx: wr(self.st.topk_idx),
                    wout: wr(self.st.topk_w),
                };
                moe::router_topk(dev, &a, mm)?;
            }
            Step::Moe { layer, op: MoeOp::SigmoidTopK } => {
                let (_, bias) = self.w.router(layer)?;
                let (n_group, topk_group, scale) = self.sigmoid_router()?;
                let a = moe::RouterSigmoidArgs {
                    logits: rd(self.buf(Buf::RouterLogits)),
                    bias: rd(bias),
                    e: int(c.num_experts),
                    k: int(k),
                    n_group: int(n_group),
                    topk_group: int(topk_group),
                    norm: c.norm_topk_prob as i32,
                    scale,
                    idx: wr(self.st.topk_idx),
                    wout: wr(self.st.topk_w),
                };
                moe::router_sigmoid(dev, &a, mm)?;
            }
            Step::Moe { layer, op: MoeOp::ExpertGateUp } => {
                let ex = self.w.experts(layer)?.clone();
                self.group_experts(mm)?;
                for (w, dst) in [(ex.gate, Buf::Gate), (ex.up, Buf::Up)] {
                    self.expert_matvec(&w, Buf::H, k, dst, mm * k)?;
                }
                self.st.act_elems = mm * k * c.moe_intermediate_size;
            }
            Step::Swiglu | Step::Moe { op: MoeOp::SharedSwiglu, .. } => {
                let (act, n) = match step {
                    Step::Swiglu => (Buf::Act, self.st.act_elems),
                    _ => (Buf::SharedAct, mm * c.shared_intermediate_size()),
                };
                let a = moe::SwigluArgs {
                    g: rd(self.buf(Buf::Gate)),
                    u: rd(self.buf(Buf::Up)),
                    act: wr(self.buf(act)),
                    n: n as i64,
                };
                moe::swiglu(dev, &a)?;
            }
            Step::Moe { layer, op: MoeOp::ExpertDown } => {
                let down = self.w.experts(layer)?.down;
                self.expert_matvec(&down, Buf::Act, 1, Buf::ExpertOut, mm * k)?;
            }
            Step::Moe { op: MoeOp::Combine, .. } => {
                let a = moe::CombineArgs {
                    y: rd(self.buf(Buf::ExpertOut)),
                    w: rd(self.st.topk_w),
                    out: wr(self.buf(Buf::Out)),
                    k: int(k),
                    h: int(h),
                };
                moe::combine(dev, &a, mm)?;
            }
            Step::Attn { op: AttnOp::MlaRope, .. } => {
                let a = mla::MlaRopeArgs {
                    q: wr(self.buf(Buf::Q)),
                    kva: wr(self.buf(Buf::Kva)),
                    inv_freq: rd(self.inv_freq),
                    pos,
                    dims: self.mla_dims()?,
                };
                mla::mla_rope(dev, &a, mm)?;
            }
            Step::Attn { layer, op: AttnOp::LatentAppend } => {
                let a = mla::CacheAppendArgs {
                    x: rd(self.buf(Buf::Kva)),
                    cache: wr(self.latent_cache(layer)?),
                    pos,
                    base,
                    w: int(self.st.width(Buf::Kva)),
                };
                mla::cache_append(dev, &a, mm)?;
            }
            Step::Attn { layer, op: AttnOp::MlaQAbsorb } => {
                let w = self.w.mla(layer)?.embed_q;
                self.head_matvec(&w, Buf::Q, d, Buf::QLat, mm)?;
            }
            Step::Attn { layer, op: AttnOp::MlaVUp } => {
                let w = self.w.mla(layer)?.unembed_out;
                self.head_matvec(&w, Buf::OLat, w.cols, Buf::Attn, mm)?;
            }
            Step::Attn { layer, op: AttnOp::MlaAttention } => {
                let m = c.mla.as_ref().ok_or_else(|| Error::Cuda("mla_attention without MLA dims".into()))?;
                let (qlat, q, out) = (rd(self.buf(Buf::QLat)), rd(self.buf(Buf::Q)), wr(self.buf(Buf::OLat)));
                let cache = rd(self.latent_cache(layer)?);
                let (nope, scale) = (int(m.qk_nope_head_dim), c.attn_scale());
                if self.tensor_cores() && mla::tc_supports(m.kv_lora_rank, m.qk_rope_head_dim) {
                    // A prompt chunk: one sequence's consecutive positions (run_rows).
                    let a = mla::MlaFlashArgs {
                        qlat,
                        q,
                        cache,
                        pos,
                        base,
                        out,
                        nh: int(nh),
                        dqk: int(d),
                        nope,
                        scale,
                        m: int(mm),
                    };
                    mla::mla_attention_tc(dev, &a)?;
                } else {
                    let a = mla::MlaAttentionArgs {
                        qlat,
                        q,
                        cache,
                        pos,
                        base,
                        part_o: wr(self.st.part_o),
                        part_ml: wr(self.st.part_ml),
                        tickets: wr(self.st.tickets),
                        out,
                        nh: int(nh),
                        dqk: int(d),
                        nope,
                        l: int(m.kv_lora_rank),
                        r: int(m.qk_rope_head_dim),
                        scale,
                        nsplit: int(mla::MLA_SPLITS),
                    };
                    mla::mla_attention(dev, &a, mm)?;
                }
            }
            Step::Attn { layer, op: AttnOp::ShortConv } => {
                let cv = self.w.conv(layer)?;
                let a = conv::ShortConvArgs {
                    bcx: rd(self.buf(Buf::Bcx)),
                    w: rd(cv.kernel),
                    bias: rd(cv.bias.unwrap_or(0)),
                    state: wr(self.conv_state(layer)?),
                    pos,
                    slot: rd(self.slot_ptr()),
                    out: wr(self.buf(Buf::Attn)),
                    h: int(h),
                    l: int(c.conv.as_ref().map_or(0, |cv| cv.kernel)),
                    m: int(mm),
                };
                conv::short_conv(dev, &a)?;
            }
            Step::Moe { layer, op: MoeOp::SigmoidBiasTopK } => {
                let (_, bias) = self.w.router(layer)?;
                let a = moe::RouterSigmoidBiasArgs {
                    logits: rd(self.buf(Buf::RouterLogits)),
                    bias: rd(bias),
                    e: int(c.num_experts),
                    k: int(k),
                    norm: c.norm_topk_prob as i32,
                    scale: self.bias_router_scale()?,
                    idx: wr(self.st.topk_idx),
                    wout: wr(self.st.topk_w),
                };
                moe::router_sigmoid_bias(dev, &a, mm)?;
            }
            Step::Attn { op: AttnOp::MlaAttentionExpanded, .. } => {
                return Err(unsupported("the expanded MLA form (a CPU oracle)".into()));
            }
            Step::LastRow => {
                // Gather the rows whose logits are wanted to the front of X (through Out).
                if self.keep.len() < mm {
                    let (x, out, row_bytes) = (x_buf, self.buf(Buf::Out), (h * 2) as u64);
                    for (j, &r) in self.keep.iter().enumerate() {
                        let y = wr(out + j as u64 * row_bytes);
                        sample::take_row(dev, &sample::TakeRowArgs { x: rd(x), y, row: int(r), n: int(h) })?;
                    }
                    dev.copy(x, out, self.keep.len() * h * 2)?;
                    *m = self.keep.len();
                }
            }
        }
        Ok(())
    }

    /// Launches the kernel of fused step `op` over `mm` rows: what it reads and writes comes
    /// from its parts, the primitive run it replaces (`plan::patterns`).
    fn fused(&self, op: Fusion, parts: &[Step], mm: usize) -> Result<()> {
        let c = &self.cfg;
        let (h, d, nh, nkv, k) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads, c.top_k);
        let eps = c.rms_norm_eps;
        let dev = &self.dev;
        let (pos, base, x_buf) = (rd::<I32>(self.pos_ptr()), rd::<I32>(self.base_ptr()), self.buf(Buf::X));
        let layer = parts.iter().find_map(Step::layer).ok_or_else(|| Error::Cuda(format!("{op:?} without a layer")))?;
        // The projections among the parts: (weight, output buffer), in order.
        let lins: Vec<(LinRef, Buf)> = parts
            .iter()
            .filter_map(|p| match p {
                Step::Linear { w, dst, .. } => Some((*w, *dst)),
                _ => None,
            })
            .collect();
        match op {
            Fusion::MoeRouter if parts.iter().any(|p| matches!(p, Step::Moe { op: MoeOp::TopKSoftmax, .. })) => {
                let (router, _) = self.w.router(layer)?;
                let a = gpt_oss::MoeRouterTopkSoftmaxArgs {
                    w: router.w.q,
                    x: rd(self.buf(Buf::H)),
                    logits: wr(self.buf(Buf::RouterLogits)),
                    bias: rd(router.bias()),
                    e: int(c.num_experts),
                    h: int(h),
                    k: int(k),
                    tickets: wr(self.st.tickets),
                    idx: wr(self.st.topk_idx),
                    wout: wr(self.st.topk_w),
                };
                gpt_oss::moe_router_topk_softmax(dev, &a, mm)
            }
            Fusion::MoeGateUpSwiglu if parts.iter().any(|p| matches!(p, Step::Moe { op: MoeOp::ClampSwiglu, .. })) => {
                let ex = self.w.experts(layer)?;
                let b = ex.bias.as_ref().ok_or_else(|| Error::Cuda("GPT-OSS experts without biases".into()))?;
                let g = c.gpt_oss.as_ref().ok_or_else(|| Error::Cuda("clamp_swiglu without GPT-OSS config".into()))?;
                let a = gpt_oss::MoeGateUpClampArgs {
                    gate: ex.gate.stacked(),
                    up: ex.up.stacked(),
                    gbias: rd(b.gate),
                    ubias: rd(b.up),
                    idx: rd(self.st.topk_idx),
                    k: int(k),
                    x: rd(self.buf(Buf::H)),
                    act: wr(self.buf(Buf::Act)),
                    i: int(c.moe_intermediate_size),
                    h: int(h),
                    limit: g.swiglu_limit,
                    alpha: g.swiglu_alpha,
                };
                gpt_oss::moe_gate_up_clamp(dev, &a, mm * k)
            }
            Fusion::MoeDownCombineAdd if self.w.experts(layer)?.bias.is_some() => {
                if parts.iter().any(|p| matches!(p, Step::Add { src: Buf::SharedOut, .. })) {
                    return Err(unsupported("shared experts beside experts with biases".into()));
                }
                let ex = self.w.experts(layer)?;
                let bias = ex.bias.as_ref().ok_or_else(|| Error::Cuda("expert biases".into()))?.down;
                let a = gpt_oss::MoeDownBiasCombineAddArgs {
                    down: ex.down.stacked(),
                    bias: rd(bias),
                    idx: rd(self.st.topk_idx),
                    wts: rd(self.st.topk_w),
                    k: int(k),
                    act: rd(self.buf(Buf::Act)),
                    x: wr(x_buf),
                    h: int(h),
                    i: int(c.moe_intermediate_size),
                };
                gpt_oss::moe_down_bias_combine_add(dev, &a, mm)
            }
            Fusion::MoeRouter => {
                let (router, bias) = self.w.router(layer)?;
                if parts.iter().any(|p| matches!(p, Step::Moe { op: MoeOp::SigmoidBiasTopK, .. })) {
                    let a = moe::MoeRouterSigmoidBiasArgs {
                        w: router.w.q,
                        x: rd(self.buf(Buf::H)),
                        logits: wr(self.buf(Buf::RouterLogits)),
                        ebias: rd(bias),
                        e: int(c.num_experts),
                        h: int(h),
                        k: int(k),
                        norm: c.norm_topk_prob as i32,
                        scale: self.bias_router_scale()?,
                        tickets: wr(self.st.tickets),
                        idx: wr(self.st.topk_idx),
                        wout: wr(self.st.topk_w),
                    };
                    moe::moe_router_sigmoid_bias(dev, &a, mm)
                } else if parts.iter().any(|p| matches!(p, Step::Moe { op: MoeOp::SigmoidTopK, .. })) {
                    let (n_group, topk_group, scale) = self.sigmoid_router()?;
                    let a = moe::MoeRouterSigmoidArgs {
                        w: router.w.q,
                        x: rd(self.buf(Buf::H)),
                        logits: wr(self.buf(Buf::RouterLogits)),
                        ebias: rd(bias),
                        e: int(c.num_experts),
                        h: int(h),
                        k: int(k),
                        n_group: int(n_group),
                        topk_group: int(topk_group),
                        norm: c.norm_topk_prob as i32,
                        scale,
                        tickets: wr(self.st.tickets),
                        idx: wr(self.st.topk_idx),
                        wout: wr(self.st.topk_w),
                    };
                    moe::moe_router_sigmoid(dev, &a, mm)
                } else {
                    let a = moe::MoeRouterArgs {
                        w: router.w.q,
                        x: rd(self.buf(Buf::H)),
                        logits: wr(self.buf(Buf::RouterLogits)),
                        bias: rd(router.bias()),
                        e: int(c.num_experts),
                        h: int(h),
                        k: int(k),
                        norm: c.norm_topk_prob as i32,
                        tickets: wr(self.st.tickets),
                        idx: wr(self.st.topk_idx),
                        wout: wr(self.st.topk_w),
                    };
                    moe::moe_router(dev, &a, mm)
                }
            }
            Fusion::MoeGateUpSwiglu => {
                let ex = self.w.experts(layer)?;
                let (g, u) = (ex.gate, ex.up);
                // With the shared experts' gate/up among the parts: theirs too (no biases:
                // plan::lower keeps such a step only then).
                let shared = match lins.as_slice() {
                    [(sg, _), (su, _)] => Some((self.w.linear(*sg)?, self.w.linear(*su)?)),
                    _ => None,
                };
                let a = moe::MoeGateUpArgs {
                    gate: g.q,
                    up: u.q,
                    w_stride: g.w_stride,
                    sb_stride: g.sb_stride,
                    idx: rd(self.st.topk_idx),
                    k: int(k),
                    x: rd(self.buf(Buf::H)),
                    act: wr(self.buf(Buf::Act)),
                    i: int(c.moe_intermediate_size),
                    h: int(h),
                };
                match shared {
                    Some((sg, su)) => {
                        let s = moe::MoeSharedGateUpArgs {
                            routed: a,
                            m: int(mm),
                            sgate: sg.w.q,
                            sup: su.w.q,
                            sact: wr(self.buf(Buf::SharedAct)),
                            si: int(sg.w.rows),
                        };
                        moe::moe_shared_gate_up_swiglu(dev, &s)
                    }
                    None => moe::moe_gate_up_swiglu(dev, &a, mm * k),
                }
            }
            Fusion::MoeDownCombineAdd => {
                let dn = self.w.experts(layer)?.down;
                // The shared experts' output: computed here when their down is among the
                // parts (no bias: plan::lower keeps such a step only then), else read from
                // SharedOut when added.
                let sdown = match lins.first() {
                    Some(&(sd, _)) => Some(self.w.linear(sd)?),
                    None => None,
                };
                let with_shared = parts.iter().any(|p| matches!(p, Step::Add { src: Buf::SharedOut, .. }));
                let shared = if with_shared && sdown.is_none() { self.buf(Buf::SharedOut) } else { 0 };
                let a = moe::MoeDownCombineAddArgs {
                    down: dn.stacked(),
                    idx: rd(self.st.topk_idx),
                    wts: rd(self.st.topk_w),
                    k: int(k),
                    act: rd(self.buf(Buf::Act)),
                    x: wr(x_buf),
                    h: int(h),
                    i: int(c.moe_intermediate_size),
                    shared: rd(shared),
                };
                match sdown {
                    Some(sd) => {
                        let s = moe::MoeSharedDownCombineAddArgs {
                            routed: a,
                            sdown: sd.w.q,
                            sact: rd(self.buf(Buf::SharedAct)),
                            si: int(sd.w.cols),
                        };
                        moe::moe_shared_down_combine_add(dev, &s, mm)
                    }
                    None => moe::moe_down_combine_add(dev, &a, mm),
                }
            }
            Fusion::InProj | Fusion::NormInProj => {
                // Two or three projections of H; with two (MLA), the third slot repeats the
                // second's matrix with no rows.
                let projs: Vec<(&DLinear, Buf)> =
                    lins.iter().map(|&(w, d)| Ok((self.w.linear(w)?, d))).collect::<Result<_>>()?;
                let (&(p0, d0), &(p1, d1)) =
                    (projs.first().ok_or_else(bad_parts)?, projs.get(1).ok_or_else(bad_parts)?);
                let (p2, d2) = match projs.get(2) {
                    Some(&(p2, d2)) => (Some(p2), self.buf(d2)),
                    None => (None, 0),
                };
                let a = linear::QkvArgs {
                    wq: p0.w.q,
                    wk: p1.w.q,
                    wv: p2.unwrap_or(p1).w.q,
                    qbias: rd(p0.bias()),
                    kbias: rd(p1.bias()),
                    vbias: rd(p2.map_or(0, |p| p.bias())),
                    x: rd(self.buf(Buf::H)),
                    q: wr(self.buf(d0)),
                    k: wr(self.buf(d1)),
                    v: wr(d2),
                    nq: int(p0.w.rows),
                    nk: int(p1.w.rows),
                    nv: p2.map_or(0, |p| int(p.w.rows)),
                    kdim: int(h),
                    m: int(mm),
                };
                if op == Fusion::NormInProj {
                    // One token (decode): the layer's input norm of X inside the kernel.
                    let nr = NormRef::Input(layer);
                    if mm != 1 || h > linear::NORM_QKV_MAX_HIDDEN {
                        return Err(Error::Cuda(format!("norm_qkv over {mm} rows of width {h}")));
                    }
                    let a = linear::NormQkvArgs {
                        p: a,
                        xin: rd(x_buf),
                        nw: rd(*self.w.norm(nr)?),
                        h: wr(self.buf(Buf::H)),
                        eps: nr.eps(c),
                    };
                    return linear::norm_qkv(dev, &a);
                }
                if !self.tensor_cores() {
                    return linear::qkv(dev, &a);
                }
                // A prompt chunk: one launch when every matrix takes the tensor cores (as the
                // reference plan's linear steps would), else each product as such a step.
                if projs.iter().all(|(p, _)| gemm::supports(&p.w.q, h) && gemm::wide_enough(p.w.rows)) {
                    gemm::gemm_qkv(dev, &a)
                } else {
                    projs.into_iter().try_for_each(|(p, d)| self.linear_step(p, Buf::H, d, mm))
                }
            }
            Fusion::GateUpSwiglu => {
                let (&(gr, _), &(ur, _)) = (lins.first().ok_or_else(bad_parts)?, lins.get(1).ok_or_else(bad_parts)?);
                let (g, u) = (self.w.linear(gr)?, self.w.linear(ur)?);
                // The shared experts' activation has its own buffer.
                let act = if parts.iter().any(|p| matches!(p, Step::Moe { op: MoeOp::SharedSwiglu, .. })) {
                    Buf::SharedAct
                } else {
                    Buf::Act
                };
                let a = linear::DenseGateUpArgs {
                    gate: g.w.q,
                    up: u.w.q,
                    gbias: rd(g.bias()),
                    ubias: rd(u.bias()),
                    x: rd(self.buf(Buf::H)),
                    act: wr(self.buf(act)),
                    f: int(g.w.rows),
                    h: int(h),
                    m: int(mm),
                };
                linear::dense_gate_up_swiglu(dev, &a)
            }
            Fusion::AddRmsNorm => {
                let (src, w, dst) = add_rms_norm_parts(parts)?;
                let a = norm::AddRmsnormArgs {
                    x: wr(x_buf),
                    src: rd(self.buf(src)),
                    w: rd(*self.w.norm(w)?),
                    y: wr(self.buf(dst)),
                    n: int(h),
                    eps,
                };
                norm::add_rmsnorm(dev, &a, mm)
            }
            Fusion::OProjAddRmsNorm => {
                let ly = &self.w.layers[layer];
                let a = norm::OProjAddRmsnormArgs {
                    o: ly.o.w.q,
                    attn: rd(self.buf(Buf::Attn)),
                    bias: rd(ly.o.bias()),
                    x: wr(x_buf),
                    nw: rd(ly.post_norm),
                    h: wr(self.buf(Buf::H)),
                    hidden: int(h),
                    k: int(ly.o.w.cols),
                    eps,
                    ticket: wr(self.st.tickets),
                };
                norm::o_proj_add_rmsnorm(dev, &a)
            }
            Fusion::QkNormRopeKv => {
                let (_, _, _, qn, kn) = self.w.gqa(layer)?;
                let (kc, vc) = self.kv_cache(layer)?;
                let a = rope::QkNormRopeKvArgs {
                    q: wr(self.buf(Buf::Q)),
                    k: wr(self.buf(Buf::K)),
                    v: rd(self.buf(Buf::V)),
                    qw: rd(qn),
                    kw: rd(kn),
                    inv_freq: rd(self.inv_freq),
                    pos,
                    base,
                    kc: wr(kc),
                    vc: wr(vc),
                    nh: int(nh),
                    nkv: int(nkv),
                    d: int(d),
                    d_rot: int(c.rope.dim),
                    eps,
                };
                rope::qk_norm_rope_kv(dev, &a, mm)
            }
            Fusion::ConvMixer => {
                let cv = self.w.conv(layer)?;
                let a = conv::ConvMixerArgs {
                    in_proj: cv.in_proj.w.q,
                    in_bias: rd(cv.in_proj.bias()),
                    x: rd(self.buf(Buf::H)),
                    w: rd(cv.kernel),
                    bias: rd(cv.bias.unwrap_or(0)),
                    state: wr(self.conv_state(layer)?),
                    pos,
                    slot: rd(self.slot_ptr()),
                    out: wr(self.buf(Buf::Attn)),
                    h: int(h),
                    l: int(c.conv.as_ref().map_or(0, |cv| cv.kernel)),
                };
                conv::conv_mixer(dev, &a)
            }
            Fusion::LatentNormRopeAppend => {
                let a = mla::LatentNormRopeAppendArgs {
                    q: wr(self.buf(Buf::Q)),
                    kva: wr(self.buf(Buf::Kva)),
                    nw: rd(*self.w.norm(NormRef::KvLatent(layer))?),
                    inv_freq: rd(self.inv_freq),
                    pos,
                    base,
                    cache: wr(self.latent_cache(layer)?),
                    dims: self.mla_dims()?,
                    eps: NormRef::KvLatent(layer).eps(c),
                };
                mla::latent_norm_rope_append(dev, &a, mm)
            }
        }
    }

    /// Launches pack kernel `k` in place of `step` at `mm` tokens (src/cuda/packs.rs);
    /// `false` if its knobs cannot run this shape (the built-in kernel runs instead).
    fn pack_step(&self, step: &Step, k: &lower::PackKernel, mm: usize) -> Result<bool> {
        use crate::kernels::ops::{Gating, OpId, Shape};
        // The op's tensors in the order of its kernel signature (crate::kernels::ops), and the
        // expert weights' (bits, group) for the gather op; other steps have no pack kernel.
        let (op, ptrs, quant) = match step {
            Step::Moe { op: MoeOp::Combine, .. } => {
                (OpId::MoeCombine, vec![self.buf(Buf::ExpertOut), self.st.topk_w, self.buf(Buf::Out)], None)
            }
            Step::Moe { op: MoeOp::RouterTopK, .. } => {
                (OpId::TopkGating, vec![self.buf(Buf::RouterLogits), 0, self.st.topk_idx, self.st.topk_w], None)
            }
            Step::Fused { op: Fusion::AddRmsNorm, parts } => {
                let (src, w, dst) = add_rms_norm_parts(parts)?;
                (OpId::RmsnormResidual, vec![self.buf(Buf::X), self.buf(src), *self.w.norm(w)?, self.buf(dst)], None)
            }
            Step::Fused { op: Fusion::MoeGateUpSwiglu, .. } => {
                let ex = self.w.experts(fused_layer(step)?)?;
                let (g, u) = (ex.gate, ex.up);
                let (idx, h, act) = (self.st.topk_idx, self.buf(Buf::H), self.buf(Buf::Act));
                let ptrs = vec![g.q.w.0, g.q.s.0, g.q.b.0, u.q.w.0, u.q.s.0, u.q.b.0, idx, h, act];
                (OpId::GatherQmmSwiglu, ptrs, Some((g.q.bits as u32, g.q.group as usize)))
            }
            _ => return Err(Error::Cuda(format!("no pack op for step `{step}`"))),
        };
        debug_assert_eq!(op, k.op, "plan::lower pairs steps and ops the same way");
        let c = &self.cfg;
        let (bits, group) = quant.unwrap_or((0, 0));
        let shape = Shape {
            preset: "model".into(),
            tokens: mm,
            hidden: c.hidden_size,
            experts: c.num_experts,
            k: c.top_k,
            inter: c.moe_intermediate_size,
            bits,
            group,
            gating: if c.norm_topk_prob { Gating::SoftmaxNorm } else { Gating::Softmax },
            scale: 1.0,
            eps: c.rms_norm_eps,
        };
        self.packs.launch(&self.dev, k, &shape, &ptrs)
    }

    /// Groups a chunk's `mm·K` routed rows by expert for the gate, up and down steps that
    /// follow (offsets, rows, tensor-core tiles); one token (decode) needs no grouping.
    fn group_experts(&self, mm: usize) -> Result<()> {
        // One token's slots go to the per-slot mat-vecs, except on tensor cores (a long
        // prompt's one-row chunk), whose expert product reads the tile table.
        if mm == 1 && !self.tensor_cores() {
            return Ok(());
        }
        let a = moe::MoeGroupArgs {
            idx: rd(self.st.topk_idx),
            r: int(mm * self.cfg.top_k),
            e: int(self.cfg.num_experts),
            off: wr(self.st.grp_off),
            rows: wr(self.st.grp_rows),
            tiles: wr(self.st.grp_tiles),
        };
        moe::moe_group(&self.dev, &a)
    }

    /// `rows` selected-expert mat-vecs: row q reads x row q / per and expert topk_idx[q].
    /// One token (decode) launches a block column per row; more tokens (prefill) use the
    /// grouping `moe_group` made, so each expert's weights are read once per 8 of its rows,
    /// or once per tile of 32 on tensor cores (long prompts).
    fn expert_matvec(&self, w: &DMat, src: Buf, per: usize, dst: Buf, rows: usize) -> Result<()> {
        if self.tensor_cores() && gemm::supports(&w.q, w.cols) {
            return self.expert_gemm_tc(w, src, per, dst, rows, 0);
        }
        let (x, y) = (rd::<Bf16>(self.buf(src)), wr::<Bf16>(self.buf(dst)));
        let (n, k, per) = (int(w.rows), int(w.cols), int(per));
        if rows > self.cfg.top_k {
            let a = moe::ExpertMatvecGroupedArgs {
                w: w.stacked(),
                off: rd(self.st.grp_off),
                rows: rd(self.st.grp_rows),
                per,
                x,
                y,
                n,
                k,
            };
            moe::expert_matvec_grouped(&self.dev, &a, self.cfg.num_experts)
        } else {
            let a = moe::ExpertMatvecArgs { w: w.stacked(), idx: rd(self.st.topk_idx), per, x, y, n, k };
            moe::expert_matvec(&self.dev, &a, rows)
        }
    }

    /// `rows` selected-expert rows of a long prompt's chunk on tensor cores, over the tile
    /// table `group_experts` made: row q reads x row q / per; `bias` (`[E, w.rows]` f32) or 0.
    fn expert_gemm_tc(&self, w: &DMat, src: Buf, per: usize, dst: Buf, rows: usize, bias: u64) -> Result<()> {
        let a = gemm::ExpertGemmArgs {
            w: w.stacked(),
            tiles: rd(self.st.grp_tiles),
            off: rd(self.st.grp_off),
            rows: rd(self.st.grp_rows),
            per: int(per),
            x: rd(self.buf(src)),
            bias: rd(bias),
            y: wr(self.buf(dst)),
            n: int(w.rows),
            k: int(w.cols),
        };
        gemm::expert_gemm(&self.dev, &a, rows, self.cfg.num_experts)
    }

    /// Selected-expert rows with the experts' biases (`bias [E, rows]` f32): GPT-OSS, any
    /// expert format incl. MXFP4; decode a block column per routed row, prefill grouped by
    /// expert (the grouping `ExpertGateUp` computed), bit-identical either way — or, for a
    /// long prompt's chunk, on tensor cores (the tile table of the same grouping).
    fn expert_bias_matvec(&self, w: &DMat, bias: u64, src: Buf, per: usize, dst: Buf, rows: usize) -> Result<()> {
        if self.tensor_cores() && gemm::supports(&w.q, w.cols) {
            return self.expert_gemm_tc(w, src, per, dst, rows, bias);
        }
        if rows > self.cfg.top_k {
            let a = gpt_oss::ExpertBiasMatvecGroupedArgs {
                w: w.stacked(),
                off: rd(self.st.grp_off),
                rows: rd(self.st.grp_rows),
                per: int(per),
                x: rd(self.buf(src)),
                bias: rd(bias),
                y: wr(self.buf(dst)),
                n: int(w.rows),
                k: int(w.cols),
            };
            return gpt_oss::expert_bias_matvec_grouped(&self.dev, &a, self.cfg.num_experts);
        }
        let a = gpt_oss::ExpertBiasMatvecArgs {
            w: w.stacked(),
            idx: rd(self.st.topk_idx),
            per: int(per),
            x: rd(self.buf(src)),
            bias: rd(bias),
            y: wr(self.buf(dst)),
            n: int(w.rows),
            k: int(w.cols),
        };
        gpt_oss::expert_bias_matvec(&self.dev, &a, rows)
    }

    /// Per-head mat-vecs of MLA: row (token, head) of `dst` = `w[head] · src_row[0:w.cols]`,
    /// source rows `x_ld` elements apart (`head_matvec` in mla.cu; `head_gemm_tc` for a
    /// prompt chunk on tensor cores).
    fn head_matvec(&self, w: &DMat, src: Buf, x_ld: usize, dst: Buf, m: usize) -> Result<()> {
        let a = mla::HeadMatvecArgs {
            w: w.stacked(),
            x: rd(self.buf(src)),
            x_ld: x_ld as i64,
            nh: int(self.cfg.num_heads),
            y: wr(self.buf(dst)),
            n: int(w.rows),
            k: int(w.cols),
            m: int(m),
            lanes: 32,
        };
        if self.tensor_cores() && gemm::supports(&w.q, w.cols) && x_ld.is_multiple_of(8) {
            gemm::head_gemm(&self.dev, &a)
        } else {
            mla::head_matvec(&self.dev, &a)
        }
    }

    /// Runs every step of the plan over `m` rows, keeping the rows `self.keep` at
    /// `LastRow`; returns the rows of logits produced.
    fn run_plan(&mut self, m: usize) -> Result<usize> {
        // The steps are taken out for the loop (`step` borrows the backend mutably).
        let tc = self.tc_chunk;
        let steps = std::mem::take(&mut self.exec.pick(m, tc).steps);
        let r = self.run_steps(&steps, m, &[]);
        self.exec.pick(m, tc).steps = steps;
        r
    }

    /// Launches `steps` over `m` rows; returns the rows of logits produced. `marks` (one
    /// event before each step and one after the last, or none) are recorded as graph nodes
    /// for `profile_decode`.
    fn run_steps(&mut self, steps: &[Step], m: usize, marks: &[super::Event]) -> Result<usize> {
        let mut rows = m;
        for (i, s) in steps.iter().enumerate() {
            if let Some(e) = marks.get(i) {
                self.dev.record_in_graph(e)?;
            }
            self.step(s, &mut rows)?;
        }
        if let Some(e) = marks.get(steps.len()) {
            self.dev.record_in_graph(e)?;
        }
        Ok(rows)
    }

    fn read_logits(&self, rows: usize, out: &mut Vec<f32>) -> Result<()> {
        let v = self.cfg.vocab_size;
        let start = out.len();
        out.resize(start + rows * v, 0.0);
        self.dev.read(self.buf(Buf::Logits), &mut out[start..])
    }

    /// Runs `tokens` through the plan in chunks of [`CHUNK`], appending them to slot 0's
    /// cache; copies the logits (every row, or the last token's) to `out` when given. A single
    /// token is a decode step: replayed from a captured graph when graphs are on.
    fn run_tokens(&mut self, tokens: &[u32], all_logits: bool, out: Option<&mut Vec<f32>>) -> Result<()> {
        let pos0 = self.seqs[0];
        crate::backend::check_tokens(&self.cfg, tokens, pos0)?;
        if pos0 + tokens.len() > self.slot_ctx {
            return Err(Error::Arg(format!(
                "context of {} tokens exceeds the CUDA KV cache ({})",
                pos0 + tokens.len(),
                self.slot_ctx
            )));
        }
        self.run_rows(&Row::of_tokens(0, pos0, tokens, tokens.len(), all_logits), out)
    }

    /// Runs checked `rows` through the plan in chunks of [`CHUNK`], appending each to its
    /// slot's cache; copies the logits of the rows that ask, in order, to `out` when given
    /// (the plan's `LastRow` keeps only those rows, so the head runs for them alone). A
    /// chunk of at most `BATCH_ROWS` rows that all ask for logits (a decode step, or a batch
    /// of them) replays the graph captured for its size when graphs are on.
    ///
    /// A chunk of one slot's [`Row::long_prompt`] rows runs on tensor cores (when the device
    /// allows them), whatever its size: the tensor-core kernels compute each row alone (a
    /// row's sums do not depend on the other rows of its tile, and attention visits the keys
    /// in tiles fixed from position 0), so a long prompt's rows come out the same in any
    /// chunking and any batch. Every other chunk stays on the row-per-token kernels,
    /// bit-identical to decode.
    fn run_rows(&mut self, rows: &[Row], mut out: Option<&mut Vec<f32>>) -> Result<()> {
        for chunk in rows.chunks(self.chunk) {
            let slot = chunk[0].slot;
            self.tc_chunk = self.tc_allowed && chunk.iter().all(|r| r.long_prompt && r.slot == slot);
            // A chunk with no row asking still runs its head for one (LastRow keeps ≥ 1 row).
            self.keep = (0..chunk.len()).filter(|&i| chunk[i].logits).collect();
            let read = !self.keep.is_empty();
            if !read {
                self.keep.push(chunk.len() - 1);
            }
            self.write_io(chunk)?;
            // Decode steps and decode batches replay a graph; prompt chunks and mixed batches
            // (only some rows ask for logits: `LastRow` gathers them by host-known index) run
            // eagerly.
            let m = chunk.len();
            let graphed = self.use_graph && !self.tc_chunk && m <= lower::BATCH_ROWS && self.keep.len() == m;
            let n = if graphed {
                if !self.graphs.contains_key(&m) {
                    self.dev.begin_capture()?;
                    let r = self.run_plan(m);
                    let g = self.dev.end_capture();
                    r?;
                    self.graphs.insert(m, g?);
                }
                self.graphs[&m].launch().map_err(|e| Error::Cuda(e.to_string()))?;
                m
            } else {
                self.run_plan(m)?
            };
            for r in chunk {
                self.seqs[r.slot] = r.pos + 1;
            }
            if let Some(out) = out.as_deref_mut()
                && read
            {
                self.read_logits(n, out)?;
            }
        }
        self.tc_chunk = false;
        Ok(())
    }

    /// Runs a checked batch ([`Backend::forward_rows`]): each slot's [`Row::long_prompt`] rows
    /// as a prompt of their own (tensor cores, see `run_rows`), the other rows together (slots
    /// are independent, so the order of the groups does not matter); returns the logits of
    /// the rows that ask, in batch order.
    fn run_batch(&mut self, rows: &[Row]) -> Result<Vec<f32>> {
        let mut logits = Vec::new();
        if !self.tc_allowed || !rows.iter().any(|r| r.long_prompt) {
            self.run_rows(rows, Some(&mut logits))?;
            return Ok(logits);
        }
        // Row indices of each long-prompt slot, then of every other row.
        let mut groups: Vec<(Option<usize>, Vec<usize>)> = Vec::new();
        for (i, r) in rows.iter().enumerate() {
            let key = r.long_prompt.then_some(r.slot);
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, g)) => g.push(i),
                None => groups.push((key, vec![i])),
            }
        }
        // Where each asking row's logits go: its rank among the asking rows.
        let v = self.cfg.vocab_size;
        let mut rank = vec![0usize; rows.len()];
        let mut asking = 0;
        for (i, r) in rows.iter().enumerate() {
            rank[i] = asking;
            asking += r.logits as usize;
        }
        logits.resize(asking * v, 0.0);
        let mut out = Vec::new();
        for (_, g) in groups {
            let sub: Vec<Row> = g.iter().map(|&i| rows[i]).collect();
            out.clear();
            self.run_rows(&sub, Some(&mut out))?;
            for (&i, l) in g.iter().filter(|&&i| rows[i].logits).zip(out.chunks_exact(v)) {
                logits[rank[i] * v..][..v].copy_from_slice(l);
            }
        }
        Ok(logits)
    }

    /// GPU time of each step of one decode step at the current position, measured inside
    /// a captured graph with a timing event between consecutive steps (so launch gaps count
    /// as they do in real decode), averaged over `replays` replays after one warm-up. The
    /// token at the current position is written to the cache but the position does not
    /// advance, and the conv states (which every replay moves on) are restored after.
    pub fn profile_decode(&mut self, replays: usize) -> Result<Vec<StepTime>> {
        if self.seqs[0] >= self.slot_ctx {
            return Err(Error::Arg("profile: the KV cache is full".into()));
        }
        self.save_conv_states(false)?;
        let r = self.profile_replays(replays);
        self.save_conv_states(true)?;
        r
    }

    /// [`CudaBackend::profile_decode`] without the conv-state restore.
    fn profile_replays(&mut self, replays: usize) -> Result<Vec<StepTime>> {
        self.tc_chunk = false;
        let steps = self.exec.decode.steps.clone();
        let events = (0..=steps.len()).map(|_| self.dev.event()).collect::<Result<Vec<_>>>()?;
        self.write_io(&[Row { slot: 0, pos: self.seqs[0], token: 0, logits: true, long_prompt: false }])?;
        self.keep = vec![0];
        self.dev.begin_capture()?;
        let r = self.run_steps(&steps, 1, &events);
        let g = self.dev.end_capture();
        r?;
        let g = g?;
        let mut us = vec![0f64; steps.len()];
        for i in 0..=replays {
            g.launch().map_err(|e| Error::Cuda(e.to_string()))?;
            self.dev.sync()?;
            if i > 0 {
                for (j, t) in us.iter_mut().enumerate() {
                    *t += self.dev.elapsed_ms(&events[j], &events[j + 1])? as f64 * 1e3 / replays as f64;
                }
            }
        }
        Ok(steps.iter().zip(us).map(|(s, us)| StepTime::of(s, us)).collect())
    }

    /// GPU time of each step of one prompt chunk — the first `min(tokens.len(), chunk)` of
    /// `tokens` at slot 0's position — launched eagerly with an event between steps, twice
    /// (the second is reported). Slot 0's position and conv states are left as they were.
    pub fn profile_prefill(&mut self, tokens: &[u32]) -> Result<Vec<StepTime>> {
        let prompt_len = tokens.len();
        let tokens = &tokens[..tokens.len().min(self.chunk)];
        let (n, pos0) = (tokens.len(), self.seqs[0]);
        crate::backend::check_tokens(&self.cfg, tokens, pos0)?;
        if n < 2 || pos0 + n > self.slot_ctx {
            return Err(Error::Arg(format!(
                "prefill profile: {n} tokens at position {pos0} (needs 2 or more, within the {}-token cache)",
                self.slot_ctx
            )));
        }
        let rows = Row::of_tokens(0, pos0, tokens, prompt_len, false);
        self.save_conv_states(false)?;
        let r = self.profile_chunk(&rows);
        self.tc_chunk = false;
        self.save_conv_states(true)?;
        r
    }

    /// [`CudaBackend::profile_prefill`] without the conv-state restore.
    fn profile_chunk(&mut self, rows: &[Row]) -> Result<Vec<StepTime>> {
        let n = rows.len();
        self.tc_chunk = self.tc_allowed && rows.iter().all(|r| r.long_prompt);
        let steps = self.exec.pick(n, self.tc_chunk).steps.clone();
        let events = (0..=steps.len()).map(|_| self.dev.event()).collect::<Result<Vec<_>>>()?;
        let mut us = vec![0f64; steps.len()];
        for _ in 0..2 {
            self.keep = vec![n - 1];
            self.write_io(rows)?;
            let mut m = n;
            for (s, e) in steps.iter().zip(&events) {
                self.dev.record(e)?;
                self.step(s, &mut m)?;
            }
            self.dev.record(&events[steps.len()])?;
            for (j, t) in us.iter_mut().enumerate() {
                *t = self.dev.elapsed_ms(&events[j], &events[j + 1])? as f64 * 1e3;
            }
        }
        Ok(steps.iter().zip(us).map(|(s, us)| StepTime::of(s, us)).collect())
    }

    /// The row counts a graph has been captured for, smallest first.
    pub fn captured_graphs(&self) -> Vec<usize> {
        self.graphs.keys().copied().collect()
    }

    /// Switches graph capture of decode steps and batches on or off (for eager-vs-graph
    /// comparisons).
    pub fn set_use_graph(&mut self, on: bool) {
        self.use_graph = on;
    }

    /// Lets prompt chunks take the tensor cores (`on`, where the device has them: sm_80+ and
    /// not `ZMOE_TC=0`) or keeps every chunk on the row kernels (tests compare both).
    pub fn set_tensor_cores(&mut self, on: bool) {
        self.tc_allowed = on && self.dev.tensor_cores();
    }

    /// Splits prompts into chunks of `n` tokens (1 ..= [`CHUNK`], the default): tests use
    /// small chunks to cross sliding windows and conv states at chunk edges, and to check
    /// that a long prompt's rows on tensor cores do not depend on the chunking.
    pub fn set_prefill_chunk(&mut self, n: usize) -> Result<()> {
        if !(1..=CHUNK).contains(&n) {
            return Err(Error::Arg(format!("prefill chunk of {n} tokens: must be 1 ..= {CHUNK}")));
        }
        self.chunk = n;
        Ok(())
    }
}

/// A fused step's parts do not have the shape its kernel expects (a bug in `plan::patterns`).
fn bad_parts() -> Error {
    Error::Cuda("a fused step's parts do not match its kernel".into())
}

/// `(src, w, dst)` of an `AddRmsNorm` fused step: `X += src`, `dst = rmsnorm(X) ⊙ w`.
fn add_rms_norm_parts(parts: &[Step]) -> Result<(Buf, NormRef, Buf)> {
    match parts {
        [Step::Add { src, .. }, Step::RmsNorm { w, dst, .. }] => Ok((*src, *w, *dst)),
        _ => Err(bad_parts()),
    }
}

/// The layer of a fused step.
fn fused_layer(step: &Step) -> Result<usize> {
    step.layer().ok_or_else(bad_parts)
}

impl Backend for CudaBackend {
    fn name(&self) -> String {
        let pack = self.packs.summary().map(|s| format!(", {s}")).unwrap_or_default();
        let pdl = if self.dev.pdl() { ", pdl" } else { "" };
        let tc = if self.tc_allowed { ", tc" } else { "" };
        format!("cuda ({}{}{pdl}{tc}{pack})", self.dev.name, if self.use_graph { ", graph" } else { ", eager" })
    }

    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn position(&self) -> usize {
        self.seqs[0]
    }

    fn max_context(&self) -> usize {
        self.slot_ctx
    }

    fn reset(&mut self) {
        self.seqs.iter_mut().for_each(|p| *p = 0);
    }

    fn slots(&self) -> usize {
        self.seqs.len()
    }

    /// Splits the allocated cache rows into `n` slots (each `rows / n` tokens: build the
    /// backend with [`CudaBackend::with_slots`] to size every slot's context up front); the
    /// rings and conv states, a fixed size per slot, grow to `n` slots.
    fn set_slots(&mut self, n: usize) -> Result<()> {
        if n == 0 || self.cache_rows / n == 0 {
            return Err(Error::Arg(format!(
                "{n} sequence slots: the CUDA KV cache holds {} tokens in all (at least one per slot)",
                self.cache_rows
            )));
        }
        if n > self.ring_slots {
            // Rings and conv states are a fixed size per slot: room for the new slots. The
            // old ones stay in the device arena until the backend drops (set_slots is a
            // start-up call).
            for l in 0..self.caches.len() {
                if matches!(self.caches[l], LayerCache::Ring { .. } | LayerCache::Conv { .. }) {
                    self.caches[l] = LayerCache::alloc(&mut self.dev, &self.cfg, l, 0, n)?;
                }
            }
            self.ring_slots = n;
        }
        self.slot_ctx = self.cache_rows / n;
        self.seqs = vec![0; n];
        // The graphs hold cache pointers and slot sizes.
        self.graphs.clear();
        Ok(())
    }

    fn slot_position(&self, slot: usize) -> usize {
        self.seqs[slot]
    }

    fn reset_slot(&mut self, slot: usize) {
        self.seqs[slot] = 0;
    }

    fn forward_rows(&mut self, rows: &[Row]) -> Result<Vec<f32>> {
        crate::backend::check_rows(&self.cfg, rows, self.seqs.len(), self.slot_ctx, |s| self.seqs[s])?;
        // A failed forward leaves the slots where they were (the rows it wrote past them are
        // overwritten by the next).
        let before = self.seqs.clone();
        let r = self.run_batch(rows).and_then(|logits| {
            let v = self.cfg.vocab_size;
            let asked = rows.iter().filter(|r| r.logits);
            match asked.zip(logits.chunks_exact(v)).find(|(_, l)| l.iter().any(|x| !x.is_finite())) {
                Some((r, _)) => {
                    Err(Error::NonFinite { position: r.pos, origin: crate::sample::NON_FINITE_HINT.into() })
                }
                None => Ok(logits),
            }
        });
        if r.is_err() {
            self.seqs = before;
        }
        r
    }

    fn plan(&self) -> &Plan {
        &self.plan
    }

    fn exec_plans(&self) -> &ExecPlans {
        &self.exec
    }

    fn set_plan(&mut self, plan: Plan) -> Result<()> {
        self.exec = lower::cuda(&plan, &self.weights, &self.packs.available())?;
        self.plan = plan;
        self.graphs.clear();
        self.reset();
        Ok(())
    }

    fn device_info(&self) -> DeviceInfo {
        DeviceInfo {
            name: self.dev.name.clone(),
            driver: Some(self.dev.driver.clone()),
            memory_bytes: Some(self.dev.total_mem as u64),
        }
    }

    fn peak_memory(&self) -> Option<usize> {
        Some(self.dev.memory().1)
    }

    fn measure_copy_bandwidth(&mut self) -> Result<f64> {
        self.dev.copy_bandwidth()
    }

    fn forward(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>> {
        let mut logits = Vec::new();
        self.run_tokens(tokens, all_logits, Some(&mut logits))?;
        crate::sample::check_finite(&logits, self.cfg.vocab_size, self.seqs[0], crate::sample::NON_FINITE_HINT)?;
        Ok(logits)
    }

    fn forward_sample(&mut self, tokens: &[u32], sampler: &mut Sampler) -> Result<u32> {
        self.run_tokens(tokens, false, None)?;
        let p = sampler.params;
        let a = sample::SampleArgs {
            logits: rd(self.buf(Buf::Logits)),
            v: int(self.cfg.vocab_size),
            temp: p.temperature,
            top_p: p.top_p,
            top_k: p.top_k.min(i32::MAX as usize) as i32,
            seed: p.seed,
            step: sampler.step(),
            out: wr(self.st.sample_out),
        };
        sample::sample(&self.dev, &a)?;
        let mut out = [0i32; 2];
        self.dev.read(self.st.sample_out, &mut out)?;
        if out[1] == 2 {
            // sample_token found a NaN or infinite logit.
            let origin = crate::sample::NON_FINITE_HINT.into();
            return Err(Error::NonFinite { position: self.seqs[0] - 1, origin });
        }
        if out[1] != 0 {
            // Too many candidates for the device sort: sample the copied logits on the host.
            let mut logits = Vec::new();
            self.read_logits(1, &mut logits)?;
            crate::sample::check_finite(&logits, self.cfg.vocab_size, self.seqs[0], crate::sample::NON_FINITE_HINT)?;
            return Ok(sampler.sample(&logits));
        }
        sampler.advance();
        Ok(out[0] as u32)
    }

    fn supports_profile(&self) -> bool {
        true
    }

    fn profile_decode(&mut self, replays: usize) -> Result<Vec<StepTime>> {
        CudaBackend::profile_decode(self, replays)
    }

    fn profile_prefill(&mut self, tokens: &[u32]) -> Result<Vec<StepTime>> {
        CudaBackend::profile_prefill(self, tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_capacity_defaults_bounds_and_refuses() {
        let mut c = crate::checkpoint::synth::preset_config("qwen3_moe", "tiny")
            .map(|v| ModelConfig::parse(&v.to_string(), std::path::Path::new("config.json")).unwrap())
            .unwrap();
        let gib = 1usize << 30;
        // Plenty of memory: the default, bounded by max_position_embeddings.
        assert_eq!(kv_capacity(&c, None, 4096, 80 * gib).unwrap(), DEFAULT_MAX_CTX);
        c.max_position_embeddings = 1000;
        assert_eq!(kv_capacity(&c, None, 4096, 80 * gib).unwrap(), 1000);
        assert_eq!(kv_capacity(&c, Some(20), 4096, 80 * gib).unwrap(), 20);
        // Little memory: the default shrinks to what fits; an explicit --ctx is refused.
        c.max_position_embeddings = 1 << 20;
        let free = CTX_RESERVE_BYTES + 100 * 4096;
        assert_eq!(kv_capacity(&c, None, 4096, free).unwrap(), 100);
        let e = kv_capacity(&c, Some(101), 4096, free).unwrap_err().to_string();
        assert!(e.contains("--ctx 101") && e.contains("at most 100"), "{e}");
        let e = kv_capacity(&c, None, 4096, CTX_RESERVE_BYTES).unwrap_err().to_string();
        assert!(e.contains("KV cache") && e.contains("smaller --ctx"), "{e}");
    }
}
