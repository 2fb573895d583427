//! [`CudaBackend`]: executes a [`Plan`] on the GPU with bf16 activations and f32
//! accumulation (router and logits in f32).
//!
//! Every buffer and the KV cache are allocated once (the device `RunState`), sized for a
//! prefill chunk of [`CHUNK`] tokens. Prefill runs the plan eagerly over chunks; decode
//! (one token) runs the same plan captured once into a CUDA graph and replayed per token —
//! the position and the token live in device memory, so replay needs no re-capture.

use std::sync::Arc;

use half::bf16;

use super::{Arg, Device};
use crate::backend::{Backend, DeviceInfo, StepTime};
use crate::checkpoint::{Mat, MatKind};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::{Attn, Ffn, Linear, MlaWeights, Mlp, Weights};
use crate::plan::{Buf, LinRef, NormRef, Plan, Step};
use crate::sample::Sampler;

/// Most tokens per prefill launch (activation buffers are sized for it).
pub const CHUNK: usize = 64;
/// Blocks per (token, head) of attention: each takes 1/ATTN_SPLITS of the keys.
const ATTN_SPLITS: usize = 16;
/// Threads of an attention block (`ATTN_THREADS` in primitives.cu).
const ATTN_THREADS: u32 = 128;
/// MLA attention: key splits per (token, head).
const MLA_SPLITS: usize = 16;
/// Default KV-cache capacity (tokens) when the model allows more (`--ctx` overrides it).
const DEFAULT_MAX_CTX: usize = 8192;
/// Device memory left free after the KV cache, for the activation buffers (CHUNK rows).
const CTX_RESERVE_BYTES: usize = 512 << 20;

/// The KV-cache capacity in tokens, given `free` bytes of device memory after the weights and
/// `token_bytes` of cache per token (all layers): `--ctx` when given (an error naming the
/// sizes if its cache does not fit), else [`DEFAULT_MAX_CTX`] bounded by the model's
/// `max_position_embeddings` and by what fits.
fn kv_capacity(c: &ModelConfig, requested: Option<usize>, token_bytes: usize, free: usize) -> Result<usize> {
    let avail = free.saturating_sub(CTX_RESERVE_BYTES);
    let fits = avail / token_bytes.max(1);
    let mib = |b: usize| format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64);
    let n = requested.unwrap_or(c.max_position_embeddings.min(DEFAULT_MAX_CTX).min(fits)).max(1);
    if n > fits {
        return Err(Error::Arg(format!(
            "{}: a KV cache of {n} tokens needs {} ({token_bytes} B per token) but {} of device memory are free \
             after the weights ({} kept for activations); pass a smaller --ctx (at most {fits})",
            if requested.is_some() { format!("--ctx {n}") } else { "CUDA".into() },
            mib(n.saturating_mul(token_bytes)),
            mib(free),
            mib(CTX_RESERVE_BYTES)
        )));
    }
    Ok(n)
}

/// A weight matrix on the device (see `struct QMat` in common.cuh).
#[derive(Debug, Clone, Copy)]
struct DMat {
    w: u64,
    s: u64,
    b: u64,
    fmt: i32,
    bits: i32,
    group: i32,
    rows: usize,
    cols: usize,
    /// Elements of storage per matrix (stacked experts: offset of expert e = e·w_stride).
    w_stride: i64,
    /// Scales/biases per matrix.
    sb_stride: i64,
}

impl DMat {
    fn args(&self) -> [Arg; 6] {
        [
            Arg::Ptr(self.w),
            Arg::Ptr(self.s),
            Arg::Ptr(self.b),
            Arg::I32(self.fmt),
            Arg::I32(self.bits),
            Arg::I32(self.group),
        ]
    }
}

#[derive(Debug, Clone, Copy)]
struct DLinear {
    m: DMat,
    /// f32 bias or 0.
    bias: u64,
}

struct DLayer {
    input_norm: u64,
    post_norm: u64,
    attn: DAttn,
    o: DLinear,
    mlp: DMlp,
    /// bf16 `[max_ctx, nKV·D]`; MLA: the latent cache `[max_ctx, kv_lora + rope]`.
    k_cache: u64,
    /// bf16 `[max_ctx, nKV·D]` (0 for MLA).
    v_cache: u64,
}

/// A layer's attention weights on the device (mirrors [`Attn`]).
#[allow(clippy::large_enum_variant)] // one per layer
enum DAttn {
    Gqa { q: DLinear, k: DLinear, v: DLinear, q_norm: u64, k_norm: u64 },
    Mla(DMla),
}

/// MLA weights (mirrors [`MlaWeights`]); per-head matrices stacked like experts.
struct DMla {
    q_a: Option<DLinear>,
    q_a_norm: u64,
    q: DLinear,
    kv_a: DLinear,
    kv_a_norm: u64,
    /// `[nH, kv_lora, qk_nope]`.
    embed_q: DMat,
    /// `[nH, v_head, kv_lora]`.
    unembed_out: DMat,
}

/// A layer's feed-forward block on the device (mirrors [`Mlp`]).
#[allow(clippy::large_enum_variant)] // one per layer
enum DMlp {
    /// gate, up, down.
    Dense([DLinear; 3]),
    /// Router (+ f32 correction bias or 0), gate/up/down of all experts stacked
    /// `[E, rows, ...]`, and the shared experts' gate/up/down.
    Moe { router: DLinear, bias: u64, experts: [DMat; 3], shared: Option<[DLinear; 3]> },
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
    /// Prefill expert grouping: `[E + 1]` i32 row offsets per expert and `[CHUNK·K]` i32 rows.
    grp_off: u64,
    grp_rows: u64,
    /// `[2]` i32: sampled token, host-fallback flag.
    sample_out: u64,
    /// `[CHUNK·nH]` i32 finished-block counters (`last_to_finish` in common.cuh) of the
    /// attention merge, the fused router and o_proj_add_rmsnorm: each kernel leaves them at
    /// zero, and kernels on the one stream never overlap.
    tickets: u64,
    /// `[pos, tokens[CHUNK]]` as i32: written by the host before each forward.
    io: u64,
    part_o: u64,
    part_ml: u64,
    /// Elements currently in Gate/Up/Act (dense and expert widths differ).
    act_elems: usize,
}

/// The CUDA backend.
pub struct CudaBackend {
    dev: Device,
    cfg: ModelConfig,
    plan: Plan,
    embed: DMat,
    lm_head: DLinear,
    final_norm: u64,
    inv_freq: u64,
    layers: Vec<DLayer>,
    st: RunState,
    max_ctx: usize,
    pos: usize,
    use_graph: bool,
    graph: Option<cudarc::driver::CudaGraph>,
    /// Foundry kernel-pack kernels (src/cuda/packs.rs; patched plans only).
    packs: super::packs::PackKernels,
}

fn unsupported(what: String) -> Error {
    Error::Unavailable(format!("CUDA backend: {what}; use --backend cpu"))
}

/// Uploads `mats` (one matrix, or E stacked experts) in a device format.
fn upload_mats(dev: &mut Device, mats: &[Mat]) -> Result<DMat> {
    let (rows, cols) = (mats[0].rows, mats[0].cols);
    match &mats[0].kind {
        MatKind::Float(_) => {
            if cols % 8 != 0 {
                return Err(unsupported(format!("bf16 matrix with {cols} columns (need a multiple of 8)")));
            }
            let mut host: Vec<u16> = Vec::with_capacity(mats.len() * rows * cols);
            let mut row = vec![0f32; cols];
            for m in mats {
                for r in 0..rows {
                    m.dequant_row(r, &mut row);
                    host.extend(row.iter().map(|&x| bf16::from_f32(x).to_bits()));
                }
            }
            let w = dev.upload(&host)?;
            Ok(DMat {
                w,
                s: 0,
                b: 0,
                fmt: 0,
                bits: 16,
                group: 0,
                rows,
                cols,
                w_stride: (rows * cols) as i64,
                sb_stride: 0,
            })
        }
        MatKind::Affine { bits, group, scales, .. } => {
            if !matches!(bits, 4 | 8) || cols % 32 != 0 || group % 32 != 0 {
                return Err(unsupported(format!("affine {bits}-bit group {group} with {cols} columns")));
            }
            if scales.dtype != crate::checkpoint::FloatType::Bf16 {
                return Err(unsupported(format!("{} quantization scales (only bf16)", scales.dtype.name())));
            }
            let (mut w, mut s, mut b) = (Vec::new(), Vec::new(), Vec::new());
            for m in mats {
                let MatKind::Affine { packed, scales, biases, .. } = &m.kind else {
                    return Err(unsupported("mixed expert formats".into()));
                };
                w.extend_from_slice(packed.as_slice());
                s.extend_from_slice(scales.data.as_slice());
                b.extend_from_slice(biases.data.as_slice());
            }
            let groups = rows * cols / group;
            Ok(DMat {
                w: dev.upload(&w)?,
                s: dev.upload(&s)?,
                b: dev.upload(&b)?,
                fmt: 1,
                bits: *bits as i32,
                group: *group as i32,
                rows,
                cols,
                w_stride: (rows * cols * *bits as usize / 32) as i64,
                sb_stride: groups as i64,
            })
        }
        MatKind::Mxfp4 { .. } => Err(unsupported("MXFP4 weights".into())),
    }
}

fn upload_linear(dev: &mut Device, l: &Linear) -> Result<DLinear> {
    let m = upload_mats(dev, std::slice::from_ref(&l.w))?;
    let bias = match &l.b {
        Some(b) => dev.upload(b)?,
        None => 0,
    };
    Ok(DLinear { m, bias })
}

/// The shape arguments `mla_rope` and `latent_norm_rope_append` share:
/// `nh, dqk, nope, row, lat, d_rot, scaling, interleaved`.
fn mla_rope_dims(c: &ModelConfig, m: &crate::config::MlaConfig) -> [Arg; 8] {
    [
        Arg::I32(c.num_heads as i32),
        Arg::I32(c.head_dim as i32),
        Arg::I32(m.qk_nope_head_dim as i32),
        Arg::I32(m.cache_row() as i32),
        Arg::I32(m.kv_lora_rank as i32),
        Arg::I32(c.rope.dim as i32),
        Arg::F32(c.rope.attention_scaling),
        Arg::I32(c.rope.interleaved as i32),
    ]
}

fn upload_ffn(dev: &mut Device, f: &Ffn) -> Result<[DLinear; 3]> {
    Ok([upload_linear(dev, &f.gate)?, upload_linear(dev, &f.up)?, upload_linear(dev, &f.down)?])
}

fn upload_mla(dev: &mut Device, m: &MlaWeights) -> Result<DMla> {
    Ok(DMla {
        q_a: m.q_a.as_ref().map(|l| upload_linear(dev, l)).transpose()?,
        q_a_norm: if m.q_a_norm.is_empty() { 0 } else { dev.upload(&m.q_a_norm)? },
        q: upload_linear(dev, &m.q)?,
        kv_a: upload_linear(dev, &m.kv_a)?,
        kv_a_norm: dev.upload(&m.kv_a_norm)?,
        embed_q: upload_mats(dev, &m.embed_q)?,
        unembed_out: upload_mats(dev, &m.unembed_out)?,
    })
}

impl RunState {
    fn width(&self, b: Buf) -> usize {
        self.widths[b as usize]
    }
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
        let mut dev = Device::open()?;
        let c = &cfg;
        let (h, d) = (c.hidden_size, c.head_dim);
        match &c.mla {
            None if d % 8 != 0 || d > 256 => {
                return Err(unsupported(format!("head_dim {d} (need a multiple of 8, at most 256)")));
            }
            Some(m)
                if m.kv_lora_rank % 8 != 0
                    || m.kv_lora_rank > 512
                    || m.qk_rope_head_dim % 8 != 0
                    || m.qk_rope_head_dim > 64 =>
            {
                return Err(unsupported(format!(
                    "MLA kv_lora_rank {} / qk_rope_head_dim {} (need multiples of 8, at most 512 / 64)",
                    m.kv_lora_rank, m.qk_rope_head_dim
                )));
            }
            _ => {}
        }
        if let crate::config::RouterKind::SigmoidGrouped { n_group, .. } = c.router
            && n_group > 32
        {
            return Err(unsupported(format!("n_group {n_group} (at most 32)")));
        }
        if c.num_experts > 1024 || c.top_k > 16 {
            return Err(unsupported(format!("{} experts / top-{} (at most 1024 / 16)", c.num_experts, c.top_k)));
        }
        let embed = upload_mats(&mut dev, std::slice::from_ref(&weights.embed))?;
        let lm_head = upload_linear(&mut dev, &weights.lm_head)?;
        let final_norm = dev.upload(&weights.norm)?;
        let inv_freq = dev.upload(&c.rope.inv_freq)?;
        // Cached bf16 values per token and layer: K and V rows, or MLA's latent row.
        let (k_row, v_row) = match &c.mla {
            Some(m) => (m.cache_row(), 0),
            None => (c.num_kv_heads * d, c.num_kv_heads * d),
        };
        let mut layers = Vec::with_capacity(c.num_layers);
        for lw in &weights.layers {
            let mlp = match &lw.mlp {
                Mlp::Dense(f) => DMlp::Dense(upload_ffn(&mut dev, f)?),
                Mlp::Moe { router, correction_bias, experts, shared } => DMlp::Moe {
                    router: upload_linear(&mut dev, router)?,
                    bias: correction_bias.as_ref().map(|b| dev.upload(b)).transpose()?.unwrap_or(0),
                    experts: [
                        upload_mats(&mut dev, &experts.gate)?,
                        upload_mats(&mut dev, &experts.up)?,
                        upload_mats(&mut dev, &experts.down)?,
                    ],
                    shared: shared.as_deref().map(|f| upload_ffn(&mut dev, f)).transpose()?,
                },
            };
            let attn = match &lw.attn {
                Attn::Gqa { q, k, v, q_norm, k_norm } => DAttn::Gqa {
                    q: upload_linear(&mut dev, q)?,
                    k: upload_linear(&mut dev, k)?,
                    v: upload_linear(&mut dev, v)?,
                    q_norm: dev.upload(q_norm)?,
                    k_norm: dev.upload(k_norm)?,
                },
                Attn::Mla(m) => DAttn::Mla(upload_mla(&mut dev, m)?),
            };
            layers.push(DLayer {
                input_norm: dev.upload(&lw.input_norm)?,
                post_norm: dev.upload(&lw.post_norm)?,
                attn,
                o: upload_linear(&mut dev, &lw.o)?,
                mlp,
                k_cache: 0,
                v_cache: 0,
            });
        }
        // The KV cache after the weights, sized to the memory they left free.
        let (free, _) = cudarc::driver::result::mem_get_info().map_err(|e| Error::Cuda(e.to_string()))?;
        let max_ctx = kv_capacity(c, ctx, (k_row + v_row) * 2 * c.num_layers, free)?;
        for ly in &mut layers {
            ly.k_cache = dev.alloc(max_ctx * k_row * 2)?;
            ly.v_cache = if v_row > 0 { dev.alloc(max_ctx * v_row * 2)? } else { 0 };
        }
        // Activation buffers for CHUNK rows.
        let (k, nh) = (c.top_k.max(1), c.num_heads);
        let ffn = (k * c.moe_intermediate_size).max(c.intermediate_size).max(c.shared_intermediate_size());
        let (q_lora, lat) = c.mla.as_ref().map_or((0, 0), |m| (m.q_lora_rank.unwrap_or(0), m.kv_lora_rank));
        let kv_row = c.num_kv_heads * d;
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
            (Buf::Kva, k_row, 2),
            (Buf::QLat, nh * lat, 2),
            (Buf::OLat, nh * lat, 2),
            (Buf::SharedOut, if c.n_shared_experts > 0 { h } else { 0 }, 2),
        ];
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
            sample_out: dev.alloc(8)?,
            tickets: dev.alloc(CHUNK * nh.max(1) * 4)?,
            io: dev.alloc((1 + CHUNK) * 4)?,
            part_o: dev.alloc(CHUNK * nh * (ATTN_SPLITS * d).max(MLA_SPLITS * lat) * 4)?,
            part_ml: dev.alloc(CHUNK * nh * ATTN_SPLITS.max(MLA_SPLITS) * 2 * 4)?,
            act_elems: 0,
        };
        dev.fill(st.tickets, 0, CHUNK * nh.max(1) * 4)?;
        let packs = super::packs::PackKernels::load(&dev);
        Ok(CudaBackend {
            dev,
            cfg,
            plan,
            embed,
            lm_head,
            final_norm,
            inv_freq,
            layers,
            st,
            max_ctx,
            pos: 0,
            use_graph,
            graph: None,
            packs,
        })
    }

    fn buf(&self, b: Buf) -> u64 {
        self.st.bufs[b as usize]
    }

    fn pos_ptr(&self) -> u64 {
        self.st.io
    }

    fn tokens_ptr(&self) -> u64 {
        self.st.io + 4
    }

    fn linear(&self, r: LinRef) -> Result<&DLinear> {
        let miss = |what: &str| Error::Cuda(format!("plan asks for {what} of layer {:?}, which has none", r.layer()));
        let layer = |l: usize| &self.layers[l];
        let ffn = |l: usize, shared: bool| match (&layer(l).mlp, shared) {
            (DMlp::Dense(w), false) => Ok(w),
            (DMlp::Moe { shared: Some(w), .. }, true) => Ok(w),
            _ => Err(miss(if shared { "shared experts" } else { "a dense MLP" })),
        };
        Ok(match r {
            LinRef::Q(l) => match &layer(l).attn {
                DAttn::Gqa { q, .. } => q,
                DAttn::Mla(m) => &m.q,
            },
            LinRef::K(l) | LinRef::V(l) => match &layer(l).attn {
                DAttn::Gqa { k, v, .. } => {
                    if matches!(r, LinRef::K(_)) {
                        k
                    } else {
                        v
                    }
                }
                DAttn::Mla(_) => return Err(miss("k/v projections")),
            },
            LinRef::QA(l) => self.mla(l)?.q_a.as_ref().ok_or_else(|| miss("q_a_proj"))?,
            LinRef::KvA(l) => &self.mla(l)?.kv_a,
            LinRef::O(l) => &layer(l).o,
            LinRef::DenseGate(l) => &ffn(l, false)?[0],
            LinRef::DenseUp(l) => &ffn(l, false)?[1],
            LinRef::DenseDown(l) => &ffn(l, false)?[2],
            LinRef::SharedGate(l) => &ffn(l, true)?[0],
            LinRef::SharedUp(l) => &ffn(l, true)?[1],
            LinRef::SharedDown(l) => &ffn(l, true)?[2],
            LinRef::Router(l) => match &layer(l).mlp {
                DMlp::Moe { router, .. } => router,
                DMlp::Dense(_) => return Err(miss("a router")),
            },
            LinRef::LmHead => &self.lm_head,
        })
    }

    fn norm(&self, r: NormRef) -> Result<u64> {
        let gqa = |l: usize, q: bool| match &self.layers[l].attn {
            DAttn::Gqa { q_norm, k_norm, .. } => Ok(if q { *q_norm } else { *k_norm }),
            DAttn::Mla(_) => Err(Error::Cuda(format!("plan asks for per-head q/k norms of MLA layer {l}"))),
        };
        Ok(match r {
            NormRef::Input(l) => self.layers[l].input_norm,
            NormRef::Post(l) => self.layers[l].post_norm,
            NormRef::QHead(l) => gqa(l, true)?,
            NormRef::KHead(l) => gqa(l, false)?,
            NormRef::QLatent(l) => self.mla(l)?.q_a_norm,
            NormRef::KvLatent(l) => self.mla(l)?.kv_a_norm,
            NormRef::Final => self.final_norm,
        })
    }

    fn mla(&self, l: usize) -> Result<&DMla> {
        match &self.layers[l].attn {
            DAttn::Mla(m) => Ok(m),
            DAttn::Gqa { .. } => Err(Error::Cuda(format!("plan asks for MLA weights of GQA layer {l}"))),
        }
    }

    /// `(q, k, v, q_norm, k_norm)` of a GQA layer.
    fn gqa(&self, l: usize) -> Result<(DLinear, DLinear, DLinear, u64, u64)> {
        match &self.layers[l].attn {
            DAttn::Gqa { q, k, v, q_norm, k_norm } => Ok((*q, *k, *v, *q_norm, *k_norm)),
            DAttn::Mla(_) => Err(Error::Cuda(format!("plan asks for q/k/v projections of MLA layer {l}"))),
        }
    }

    fn experts(&self, l: usize) -> Result<&[DMat; 3]> {
        match &self.layers[l].mlp {
            DMlp::Moe { experts, .. } => Ok(experts),
            DMlp::Dense(_) => Err(Error::Cuda(format!("plan asks for experts of dense layer {l}"))),
        }
    }

    /// Launches one step over `m` rows (m may shrink to 1 at `LastRow`).
    fn step(&mut self, step: &Step, m: &mut usize, all_logits: bool) -> Result<()> {
        use Arg::{F32, I32, I64, Ptr};
        // The fused MoE and residual-norm kernels are decode kernels; prefill runs their
        // components (expert mat-vecs grouped by expert). Same results either way, bit for bit.
        // The fused gate+up and qkv kernels read their matrices with one format: if a
        // checkpoint quantizes them differently, run the components too.
        let decode_only = matches!(
            step,
            Step::MoeRouter { .. }
                | Step::MoeSigmoidRouter { .. }
                | Step::MoeGateUpSwiglu { .. }
                | Step::MoeDownCombineAdd { .. }
                | Step::MoeDownCombineSharedAdd { .. }
                | Step::OProjAddRmsNorm { .. }
        );
        if decode_only && *m > 1 || !self.fused_formats_match(step)? {
            return step.components().iter().try_for_each(|s| self.step(s, m, all_logits));
        }
        let c = &self.cfg;
        let (h, d, nh, nkv, k) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads, c.top_k);
        let eps = c.rms_norm_eps;
        let mm = *m;
        // A foundry kernel-pack entry for this step and token bucket replaces the built-in kernel.
        if self.pack_step(step, mm)? {
            return Ok(());
        }
        let dev = &self.dev;
        match *step {
            Step::Embed => {
                let mut a = self.embed.args().to_vec();
                a.extend([Ptr(self.tokens_ptr()), Ptr(self.buf(Buf::X)), I32(h as i32)]);
                dev.launch("embed", (mm as u32, 1, 1), 256, &a)?;
            }
            Step::RmsNorm { w, src, dst } => {
                // Width: the norm's; row stride: the source buffer's (Kva rows are wider).
                let (n, ld) = match w {
                    NormRef::QLatent(_) => (self.st.width(Buf::QA), self.st.width(Buf::QA)),
                    NormRef::KvLatent(_) => (c.mla.as_ref().map_or(0, |m| m.kv_lora_rank), self.st.width(Buf::Kva)),
                    _ => (h, h),
                };
                let a = [Ptr(self.buf(src)), Ptr(self.norm(w)?), Ptr(self.buf(dst)), I32(n as i32), I32(ld as i32)];
                dev.launch("rmsnorm", (mm as u32, 1, 1), 256, &[&a[..], &[F32(w.eps(c))]].concat())?;
            }
            Step::HeadNorm { w, buf } => {
                let heads = if buf == Buf::Q { nh } else { nkv };
                let p = self.buf(buf);
                let a = [Ptr(p), Ptr(self.norm(w)?), Ptr(p), I32(d as i32), I32(d as i32), F32(eps)];
                dev.launch("rmsnorm", ((mm * heads) as u32, 1, 1), 128, &a)?;
            }
            Step::Linear { w, src, dst } => {
                let lin = *self.linear(w)?;
                let out_f32 = matches!(dst, Buf::RouterLogits | Buf::Logits);
                let (n, kk) = (lin.m.rows, lin.m.cols);
                let mut a = lin.m.args().to_vec();
                a.extend([
                    Ptr(self.buf(src)),
                    Ptr(self.buf(dst)),
                    Ptr(lin.bias),
                    I32(n as i32),
                    I32(kk as i32),
                    I32(mm as i32),
                    I32(out_f32 as i32),
                ]);
                let name = if mm == 1 { "matvec1" } else { "matvec" };
                dev.launch(name, (n.div_ceil(4) as u32, 1, mm.div_ceil(8) as u32), 128, &a)?;
                if matches!(dst, Buf::Gate | Buf::Up) {
                    self.st.act_elems = mm * n;
                }
            }
            Step::Rope => {
                let a = [
                    Ptr(self.buf(Buf::Q)),
                    Ptr(self.buf(Buf::K)),
                    Ptr(self.inv_freq),
                    Ptr(self.pos_ptr()),
                    I32(nh as i32),
                    I32(nkv as i32),
                    I32(d as i32),
                    I32(c.rope.dim as i32),
                ];
                dev.launch("rope", ((mm * (nh + nkv)) as u32, 1, 1), 64, &a)?;
            }
            Step::KvAppend { layer } => {
                let ly = &self.layers[layer];
                let a = [
                    Ptr(self.buf(Buf::K)),
                    Ptr(self.buf(Buf::V)),
                    Ptr(ly.k_cache),
                    Ptr(ly.v_cache),
                    Ptr(self.pos_ptr()),
                    I32((nkv * d) as i32),
                ];
                dev.launch("kv_append", (mm as u32, 1, 1), 256, &a)?;
            }
            Step::Attention { layer } => {
                let ly = &self.layers[layer];
                let a = [
                    Ptr(self.buf(Buf::Q)),
                    Ptr(ly.k_cache),
                    Ptr(ly.v_cache),
                    Ptr(self.pos_ptr()),
                    Ptr(self.st.part_o),
                    Ptr(self.st.part_ml),
                    Ptr(self.st.tickets),
                    Ptr(self.buf(Buf::Attn)),
                    I32(nh as i32),
                    I32(nkv as i32),
                    I32(d as i32),
                    F32(c.attn_scale()),
                    I32(ATTN_SPLITS as i32),
                ];
                dev.launch("attention", ((mm * nh) as u32, ATTN_SPLITS as u32, 1), ATTN_THREADS, &a)?;
            }
            Step::Add { dst, src } => {
                let n = (mm * h) as i64;
                dev.launch(
                    "add_inplace",
                    ((mm * h).div_ceil(256) as u32, 1, 1),
                    256,
                    &[Ptr(self.buf(dst)), Ptr(self.buf(src)), I64(n)],
                )?;
            }
            Step::RouterTopK => {
                let a = [
                    Ptr(self.buf(Buf::RouterLogits)),
                    I32(c.num_experts as i32),
                    I32(k as i32),
                    I32(c.norm_topk_prob as i32),
                    Ptr(self.st.topk_idx),
                    Ptr(self.st.topk_w),
                ];
                dev.launch("router_topk", (mm as u32, 1, 1), 32, &a)?;
            }
            Step::ExpertGateUp { layer } => {
                let ex = *self.experts(layer)?;
                if mm > 1 {
                    let (idx, off, rows) = (self.st.topk_idx, self.st.grp_off, self.st.grp_rows);
                    let a = [Ptr(idx), I32((mm * k) as i32), I32(c.num_experts as i32), Ptr(off), Ptr(rows)];
                    dev.launch("moe_group", (1, 1, 1), c.num_experts.next_multiple_of(32) as u32, &a)?;
                }
                for (w, dst) in [(ex[0], Buf::Gate), (ex[1], Buf::Up)] {
                    self.expert_matvec(&w, Buf::H, k, dst, mm * k)?;
                }
                self.st.act_elems = mm * k * c.moe_intermediate_size;
            }
            Step::Swiglu => {
                let n = self.st.act_elems;
                let a = [Ptr(self.buf(Buf::Gate)), Ptr(self.buf(Buf::Up)), Ptr(self.buf(Buf::Act)), I64(n as i64)];
                dev.launch("swiglu", (n.div_ceil(256).min(4096) as u32, 1, 1), 256, &a)?;
            }
            Step::ExpertDown { layer } => {
                let ex = *self.experts(layer)?;
                self.expert_matvec(&ex[2], Buf::Act, 1, Buf::ExpertOut, mm * k)?;
            }
            Step::Combine => {
                let a = [
                    Ptr(self.buf(Buf::ExpertOut)),
                    Ptr(self.st.topk_w),
                    Ptr(self.buf(Buf::Out)),
                    I32(k as i32),
                    I32(h as i32),
                ];
                dev.launch("combine", (mm as u32, h.div_ceil(256) as u32, 1), 256, &a)?;
            }
            Step::MoeRouter { layer } => {
                let DMlp::Moe { router, .. } = &self.layers[layer].mlp else {
                    return Err(Error::Cuda(format!("plan asks for the router of dense layer {layer}")));
                };
                let e = c.num_experts;
                let mut a = router.m.args().to_vec();
                a.extend([
                    Ptr(self.buf(Buf::H)),
                    Ptr(self.buf(Buf::RouterLogits)),
                    Ptr(router.bias),
                    I32(e as i32),
                    I32(h as i32),
                    I32(k as i32),
                    I32(c.norm_topk_prob as i32),
                    Ptr(self.st.tickets),
                    Ptr(self.st.topk_idx),
                    Ptr(self.st.topk_w),
                ]);
                dev.launch("moe_router", (e.div_ceil(4) as u32, 1, mm as u32), 128, &a)?;
            }
            Step::MoeGateUpSwiglu { layer } => {
                let [g, u, _] = *self.experts(layer)?;
                let i = c.moe_intermediate_size;
                let mut a = g.args().to_vec();
                a.extend([Ptr(u.w), Ptr(u.s), Ptr(u.b), I64(g.w_stride), I64(g.sb_stride), Ptr(self.st.topk_idx)]);
                a.extend([I32(k as i32), Ptr(self.buf(Buf::H)), Ptr(self.buf(Buf::Act)), I32(i as i32), I32(h as i32)]);
                dev.launch("moe_gate_up_swiglu", (i.div_ceil(4) as u32, (mm * k) as u32, 1), 128, &a)?;
            }
            Step::MoeDownCombineAdd { layer } | Step::MoeDownCombineSharedAdd { layer } => {
                let [_, _, dn] = *self.experts(layer)?;
                let shared =
                    if matches!(step, Step::MoeDownCombineSharedAdd { .. }) { self.buf(Buf::SharedOut) } else { 0 };
                let mut a = dn.args().to_vec();
                a.extend([I64(dn.w_stride), I64(dn.sb_stride), Ptr(self.st.topk_idx), Ptr(self.st.topk_w)]);
                a.extend([I32(k as i32), Ptr(self.buf(Buf::Act)), Ptr(self.buf(Buf::X)), I32(h as i32)]);
                a.extend([I32(c.moe_intermediate_size as i32), Ptr(shared)]);
                dev.launch("moe_down_combine_add", (h as u32, 1, mm as u32), 32 * k as u32, &a)?;
            }
            Step::MoeSigmoidRouter { layer } => {
                let DMlp::Moe { router, bias, .. } = &self.layers[layer].mlp else {
                    return Err(Error::Cuda(format!("plan asks for the router of dense layer {layer}")));
                };
                let crate::config::RouterKind::SigmoidGrouped { n_group, topk_group, routed_scaling_factor } = c.router
                else {
                    return Err(Error::Cuda("moe_router_sigmoid on a softmax-router model".into()));
                };
                let e = c.num_experts;
                let mut a = router.m.args().to_vec();
                a.extend([Ptr(self.buf(Buf::H)), Ptr(self.buf(Buf::RouterLogits)), Ptr(*bias)]);
                a.extend([I32(e as i32), I32(h as i32), I32(k as i32), I32(n_group as i32), I32(topk_group as i32)]);
                a.extend([I32(c.norm_topk_prob as i32), F32(routed_scaling_factor), Ptr(self.st.tickets)]);
                a.extend([Ptr(self.st.topk_idx), Ptr(self.st.topk_w)]);
                dev.launch("moe_router_sigmoid", (e.div_ceil(4) as u32, 1, mm as u32), 128, &a)?;
            }
            Step::MlaInProj { layer, q_lora } => {
                let (first, dst) = if q_lora { (LinRef::QA(layer), Buf::QA) } else { (LinRef::Q(layer), Buf::Q) };
                let (q, kv) = (*self.linear(first)?, *self.linear(LinRef::KvA(layer))?);
                let mut a = q.m.args().to_vec();
                a.extend([Ptr(kv.m.w), Ptr(kv.m.s), Ptr(kv.m.b), Ptr(kv.m.w), Ptr(kv.m.s), Ptr(kv.m.b)]);
                a.extend([Ptr(q.bias), Ptr(kv.bias), Ptr(0), Ptr(self.buf(Buf::H))]);
                a.extend([Ptr(self.buf(dst)), Ptr(self.buf(Buf::Kva)), Ptr(0)]);
                a.extend([I32(q.m.rows as i32), I32(kv.m.rows as i32), I32(0), I32(h as i32), I32(mm as i32)]);
                let name = if mm == 1 { "qkv_proj1" } else { "qkv_proj" };
                let rows = q.m.rows + kv.m.rows;
                dev.launch(name, (rows.div_ceil(4) as u32, 1, mm.div_ceil(8) as u32), 128, &a)?;
            }
            Step::LatentNormRopeAppend { layer } => {
                let m = c.mla.as_ref().ok_or_else(|| Error::Cuda("latent norm without MLA dims".into()))?;
                let mut a = vec![
                    Ptr(self.buf(Buf::Q)),
                    Ptr(self.buf(Buf::Kva)),
                    Ptr(self.norm(NormRef::KvLatent(layer))?),
                    Ptr(self.inv_freq),
                    Ptr(self.pos_ptr()),
                    Ptr(self.layers[layer].k_cache),
                ];
                a.extend(mla_rope_dims(c, m));
                a.push(F32(NormRef::KvLatent(layer).eps(c)));
                dev.launch("latent_norm_rope_append", ((mm * (nh + 1)) as u32, 1, 1), 256, &a)?;
            }
            Step::OProjAddRmsNorm { layer } => {
                let ly = &self.layers[layer];
                let mut a = ly.o.m.args().to_vec();
                a.extend([Ptr(self.buf(Buf::Attn)), Ptr(ly.o.bias), Ptr(self.buf(Buf::X)), Ptr(ly.post_norm)]);
                a.extend([
                    Ptr(self.buf(Buf::H)),
                    I32(h as i32),
                    I32(ly.o.m.cols as i32),
                    F32(eps),
                    Ptr(self.st.tickets),
                ]);
                dev.launch("o_proj_add_rmsnorm", (h.div_ceil(8) as u32, 1, 1), 256, &a)?;
            }
            Step::DenseGateUpSwiglu { layer } | Step::SharedGateUpSwiglu { layer } => {
                let (gr, ur) = match step {
                    Step::DenseGateUpSwiglu { .. } => (LinRef::DenseGate(layer), LinRef::DenseUp(layer)),
                    _ => (LinRef::SharedGate(layer), LinRef::SharedUp(layer)),
                };
                let (g, u) = (*self.linear(gr)?, *self.linear(ur)?);
                let f = g.m.rows;
                let mut a = g.m.args().to_vec();
                a.extend([Ptr(u.m.w), Ptr(u.m.s), Ptr(u.m.b), Ptr(g.bias), Ptr(u.bias)]);
                a.extend([
                    Ptr(self.buf(Buf::H)),
                    Ptr(self.buf(Buf::Act)),
                    I32(f as i32),
                    I32(h as i32),
                    I32(mm as i32),
                ]);
                dev.launch("dense_gate_up_swiglu", (f.div_ceil(4) as u32, 1, mm.div_ceil(8) as u32), 128, &a)?;
            }
            Step::QkvProj { layer } => {
                let (q, kp, v, _, _) = self.gqa(layer)?;
                let rows = q.m.rows + kp.m.rows + v.m.rows;
                let mut a = q.m.args().to_vec();
                a.extend([Ptr(kp.m.w), Ptr(kp.m.s), Ptr(kp.m.b), Ptr(v.m.w), Ptr(v.m.s), Ptr(v.m.b)]);
                a.extend([Ptr(q.bias), Ptr(kp.bias), Ptr(v.bias), Ptr(self.buf(Buf::H))]);
                a.extend([Ptr(self.buf(Buf::Q)), Ptr(self.buf(Buf::K)), Ptr(self.buf(Buf::V))]);
                a.extend([I32(q.m.rows as i32), I32(kp.m.rows as i32), I32(v.m.rows as i32), I32(h as i32)]);
                a.push(I32(mm as i32));
                let name = if mm == 1 { "qkv_proj1" } else { "qkv_proj" };
                dev.launch(name, (rows.div_ceil(4) as u32, 1, mm.div_ceil(8) as u32), 128, &a)?;
            }
            Step::AddRmsNorm { w, src, dst } => {
                let x = self.buf(Buf::X);
                let a = [Ptr(x), Ptr(self.buf(src)), Ptr(self.norm(w)?), Ptr(self.buf(dst)), I32(h as i32), F32(eps)];
                dev.launch("add_rmsnorm", (mm as u32, 1, 1), 256, &a)?;
            }
            Step::QkNormRopeKv { layer } => {
                let (_, _, _, qn, kn) = self.gqa(layer)?;
                let ly = &self.layers[layer];
                let a = [
                    Ptr(self.buf(Buf::Q)),
                    Ptr(self.buf(Buf::K)),
                    Ptr(self.buf(Buf::V)),
                    Ptr(qn),
                    Ptr(kn),
                    Ptr(self.inv_freq),
                    Ptr(self.pos_ptr()),
                    Ptr(ly.k_cache),
                    Ptr(ly.v_cache),
                    I32(nh as i32),
                    I32(nkv as i32),
                    I32(d as i32),
                    I32(c.rope.dim as i32),
                    F32(eps),
                ];
                dev.launch("qk_norm_rope_kv", ((mm * (nh + 2 * nkv)) as u32, 1, 1), 128, &a)?;
            }
            Step::SigmoidTopK { layer } => {
                let DMlp::Moe { bias, .. } = &self.layers[layer].mlp else {
                    return Err(Error::Cuda(format!("plan asks for the router bias of dense layer {layer}")));
                };
                let crate::config::RouterKind::SigmoidGrouped { n_group, topk_group, routed_scaling_factor } = c.router
                else {
                    return Err(Error::Cuda("sigmoid_topk on a softmax-router model".into()));
                };
                let a = [
                    Ptr(self.buf(Buf::RouterLogits)),
                    Ptr(*bias),
                    I32(c.num_experts as i32),
                    I32(k as i32),
                    I32(n_group as i32),
                    I32(topk_group as i32),
                    I32(c.norm_topk_prob as i32),
                    F32(routed_scaling_factor),
                    Ptr(self.st.topk_idx),
                    Ptr(self.st.topk_w),
                ];
                dev.launch("router_sigmoid", (mm as u32, 1, 1), 32, &a)?;
            }
            Step::MlaRope => {
                let m = c.mla.as_ref().ok_or_else(|| Error::Cuda("mla_rope without MLA dims".into()))?;
                let mut a =
                    vec![Ptr(self.buf(Buf::Q)), Ptr(self.buf(Buf::Kva)), Ptr(self.inv_freq), Ptr(self.pos_ptr())];
                a.extend(mla_rope_dims(c, m));
                dev.launch("mla_rope", ((mm * (nh + 1)) as u32, 1, 1), 32, &a)?;
            }
            Step::LatentAppend { layer } => {
                let w = self.st.width(Buf::Kva);
                let a = [Ptr(self.buf(Buf::Kva)), Ptr(self.layers[layer].k_cache), Ptr(self.pos_ptr()), I32(w as i32)];
                dev.launch("cache_append", (mm as u32, 1, 1), 256, &a)?;
            }
            Step::MlaQAbsorb { layer } => {
                let w = self.mla(layer)?.embed_q;
                self.head_matvec(&w, Buf::Q, d, Buf::QLat, mm)?;
            }
            Step::MlaVUp { layer } => {
                let w = self.mla(layer)?.unembed_out;
                self.head_matvec(&w, Buf::OLat, w.cols, Buf::Attn, mm)?;
            }
            Step::MlaAttention { layer } => {
                let m = c.mla.as_ref().ok_or_else(|| Error::Cuda("mla_attention without MLA dims".into()))?;
                let a = [
                    Ptr(self.buf(Buf::QLat)),
                    Ptr(self.buf(Buf::Q)),
                    Ptr(self.layers[layer].k_cache),
                    Ptr(self.pos_ptr()),
                    Ptr(self.st.part_o),
                    Ptr(self.st.part_ml),
                    Ptr(self.st.tickets),
                    Ptr(self.buf(Buf::OLat)),
                    I32(nh as i32),
                    I32(d as i32),
                    I32(m.qk_nope_head_dim as i32),
                    I32(m.kv_lora_rank as i32),
                    I32(m.qk_rope_head_dim as i32),
                    F32(c.attn_scale()),
                    I32(MLA_SPLITS as i32),
                ];
                let grid = ((mm * nh) as u32, MLA_SPLITS as u32, 1);
                dev.launch("mla_attention", grid, ATTN_THREADS, &a)?;
            }
            Step::MlaAttentionExpanded { .. } => {
                return Err(unsupported("the expanded MLA form (a CPU oracle)".into()));
            }
            Step::LastRow => {
                if !all_logits && mm > 1 {
                    let x = self.buf(Buf::X);
                    let a = [Ptr(x), Ptr(self.buf(Buf::Out)), I32((mm - 1) as i32), I32(h as i32)];
                    dev.launch("take_row", (1, 1, 1), 256, &a)?;
                    let a = [Ptr(self.buf(Buf::Out)), Ptr(x), I32(0), I32(h as i32)];
                    dev.launch("take_row", (1, 1, 1), 256, &a)?;
                    *m = 1;
                }
            }
        }
        Ok(())
    }

    /// Whether the matrices a fused kernel reads with one format share it (other steps: true).
    fn fused_formats_match(&self, step: &Step) -> Result<bool> {
        let same = |a: &DMat, b: &DMat| (a.fmt, a.bits, a.group) == (b.fmt, b.bits, b.group);
        Ok(match *step {
            Step::QkvProj { layer } => {
                let (q, k, v, _, _) = self.gqa(layer)?;
                same(&q.m, &k.m) && same(&q.m, &v.m)
            }
            Step::MoeGateUpSwiglu { layer } => {
                let ex = self.experts(layer)?;
                same(&ex[0], &ex[1])
            }
            Step::DenseGateUpSwiglu { layer } => {
                same(&self.linear(LinRef::DenseGate(layer))?.m, &self.linear(LinRef::DenseUp(layer))?.m)
            }
            Step::SharedGateUpSwiglu { layer } => {
                same(&self.linear(LinRef::SharedGate(layer))?.m, &self.linear(LinRef::SharedUp(layer))?.m)
            }
            Step::MlaInProj { layer, q_lora } => {
                let first = if q_lora { LinRef::QA(layer) } else { LinRef::Q(layer) };
                same(&self.linear(first)?.m, &self.linear(LinRef::KvA(layer))?.m)
            }
            _ => true,
        })
    }

    /// Launches the kernel-pack kernel for `step` at `mm` tokens if the plan is a patched one
    /// and the pack has an entry for it (src/cuda/packs.rs); `false` otherwise.
    fn pack_step(&self, step: &Step, mm: usize) -> Result<bool> {
        use crate::foundry::ops::{Gating, OpId, Shape};
        if self.packs.is_empty() || self.plan.name == "reference" {
            return Ok(false);
        }
        // The op's tensors in the foundry's order (crate::foundry::ops::OpId::inputs), and the
        // expert weights' (bits, group) for the gather op; other steps have no pack kernel.
        let (op, ptrs, quant) = match *step {
            Step::Combine => {
                (OpId::MoeCombine, vec![self.buf(Buf::ExpertOut), self.st.topk_w, self.buf(Buf::Out)], None)
            }
            Step::RouterTopK => {
                (OpId::TopkGating, vec![self.buf(Buf::RouterLogits), 0, self.st.topk_idx, self.st.topk_w], None)
            }
            Step::AddRmsNorm { w, src, dst } => {
                (OpId::RmsnormResidual, vec![self.buf(Buf::X), self.buf(src), self.norm(w)?, self.buf(dst)], None)
            }
            Step::MoeGateUpSwiglu { layer } => {
                let [g, u, _] = *self.experts(layer)?;
                if g.fmt != 1 {
                    return Ok(false); // the templates read MLX affine weights only
                }
                let (idx, h, act) = (self.st.topk_idx, self.buf(Buf::H), self.buf(Buf::Act));
                let ptrs = vec![g.w, g.s, g.b, u.w, u.s, u.b, idx, h, act];
                (OpId::GatherQmmSwiglu, ptrs, Some((g.bits as u32, g.group as usize)))
            }
            _ => return Ok(false),
        };
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
        self.packs.launch(&self.dev, op, &shape, &ptrs)
    }

    /// `rows` selected-expert mat-vecs: row q reads x row q / per and expert topk_idx[q].
    /// One token (decode) launches a block column per row; more tokens (prefill) use the
    /// grouping `moe_group` made, so each expert's weights are read once per 8 of its rows.
    fn expert_matvec(&self, w: &DMat, src: Buf, per: usize, dst: Buf, rows: usize) -> Result<()> {
        let mut a = w.args().to_vec();
        a.extend([Arg::I64(w.w_stride), Arg::I64(w.sb_stride)]);
        let grouped = rows > self.cfg.top_k;
        if grouped {
            a.extend([Arg::Ptr(self.st.grp_off), Arg::Ptr(self.st.grp_rows)]);
        } else {
            a.push(Arg::Ptr(self.st.topk_idx));
        }
        a.extend([
            Arg::I32(per as i32),
            Arg::Ptr(self.buf(src)),
            Arg::Ptr(self.buf(dst)),
            Arg::I32(w.rows as i32),
            Arg::I32(w.cols as i32),
        ]);
        let gx = w.rows.div_ceil(4) as u32;
        if grouped {
            self.dev.launch("expert_matvec_grouped", (gx, self.cfg.num_experts as u32, 1), 128, &a)
        } else {
            self.dev.launch("expert_matvec", (gx, rows as u32, 1), 128, &a)
        }
    }

    /// Per-head mat-vecs of MLA: row (token, head) of `dst` = `w[head] · src_row[0:w.cols]`,
    /// source rows `x_ld` elements apart (`head_matvec` in primitives.cu).
    fn head_matvec(&self, w: &DMat, src: Buf, x_ld: usize, dst: Buf, m: usize) -> Result<()> {
        let mut a = w.args().to_vec();
        a.extend([Arg::I64(w.w_stride), Arg::I64(w.sb_stride), Arg::Ptr(self.buf(src)), Arg::I64(x_ld as i64)]);
        a.extend([
            Arg::I32(self.cfg.num_heads as i32),
            Arg::Ptr(self.buf(dst)),
            Arg::I32(w.rows as i32),
            Arg::I32(w.cols as i32),
            Arg::I32(m as i32),
        ]);
        let name = if m == 1 { "head_matvec1" } else { "head_matvec" };
        self.dev.launch(name, (w.rows.div_ceil(4) as u32, self.cfg.num_heads as u32, 1), 128, &a)
    }

    /// Runs every step of the plan over `m` rows; returns the rows of logits produced.
    fn run_plan(&mut self, m: usize, all_logits: bool) -> Result<usize> {
        // Only the steps are taken out: the plan's name stays (pack_step reads it).
        let steps = std::mem::take(&mut self.plan.steps);
        let mut rows = m;
        let r = steps.iter().try_for_each(|s| self.step(s, &mut rows, all_logits));
        self.plan.steps = steps;
        r.map(|_| rows)
    }

    fn read_logits(&self, rows: usize, out: &mut Vec<f32>) -> Result<()> {
        let v = self.cfg.vocab_size;
        let start = out.len();
        out.resize(start + rows * v, 0.0);
        self.dev.read(self.buf(Buf::Logits), &mut out[start..])
    }

    /// Runs `tokens` through the plan in chunks of [`CHUNK`], appending them to the cache;
    /// copies the logits (every row, or the last token's) to `out` when given. A single
    /// token is a decode step: replayed from the captured graph when graphs are on.
    fn run_tokens(&mut self, tokens: &[u32], all_logits: bool, mut out: Option<&mut Vec<f32>>) -> Result<()> {
        crate::cpu::check_tokens(&self.cfg, tokens, self.pos)?;
        if self.pos + tokens.len() > self.max_ctx {
            return Err(Error::Arg(format!(
                "context of {} tokens exceeds the CUDA KV cache ({})",
                self.pos + tokens.len(),
                self.max_ctx
            )));
        }
        for (ci, chunk) in tokens.chunks(CHUNK).enumerate() {
            let last = (ci + 1) * CHUNK >= tokens.len();
            let mut io = vec![self.pos as i32];
            io.extend(chunk.iter().map(|&t| t as i32));
            self.dev.write(self.st.io, &io)?;
            let rows = if chunk.len() == 1 && self.use_graph {
                if self.graph.is_none() {
                    self.dev.begin_capture()?;
                    let r = self.run_plan(1, false);
                    let g = self.dev.end_capture();
                    r?;
                    self.graph = Some(g?);
                }
                self.graph.as_ref().expect("captured").launch().map_err(|e| Error::Cuda(e.to_string()))?;
                1
            } else {
                self.run_plan(chunk.len(), all_logits)?
            };
            self.pos += chunk.len();
            if let Some(out) = out.as_deref_mut()
                && (all_logits || last)
            {
                self.read_logits(rows, out)?;
            }
        }
        Ok(())
    }

    /// GPU time of each step of one decode step at the current position, measured inside
    /// a captured graph with a timing event between consecutive steps (so launch gaps count
    /// as they do in real decode), averaged over `replays` replays after one warm-up. The
    /// token at the current position is written to the cache but the position does not
    /// advance.
    pub fn profile_decode(&mut self, replays: usize) -> Result<Vec<StepTime>> {
        if self.pos >= self.max_ctx {
            return Err(Error::Arg("profile: the KV cache is full".into()));
        }
        let steps = self.plan.steps.clone();
        let events = (0..=steps.len()).map(|_| self.dev.event()).collect::<Result<Vec<_>>>()?;
        self.dev.write(self.st.io, &[self.pos as i32, 0])?;
        self.dev.begin_capture()?;
        let mut rows = 1;
        let r = steps.iter().zip(&events).try_for_each(|(s, e)| {
            self.dev.record_in_graph(e)?;
            self.step(s, &mut rows, false)
        });
        let r = r.and_then(|_| self.dev.record_in_graph(&events[steps.len()]));
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
        Ok(steps.iter().zip(us).map(|(s, us)| StepTime { kind: s.kind(), us }).collect())
    }

    /// Switches graph capture of decode steps on or off (for eager-vs-graph comparisons).
    pub fn set_use_graph(&mut self, on: bool) {
        self.use_graph = on;
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> String {
        let pack = self.packs.summary().map(|s| format!(", {s}")).unwrap_or_default();
        format!("cuda ({}{}{pack})", self.dev.name, if self.use_graph { ", graph" } else { ", eager" })
    }

    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn position(&self) -> usize {
        self.pos
    }

    fn reset(&mut self) {
        self.pos = 0;
    }

    fn plan(&self) -> &Plan {
        &self.plan
    }

    fn set_plan(&mut self, plan: Plan) {
        self.plan = plan;
        self.graph = None;
        self.pos = 0;
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
        crate::sample::check_finite(&logits, self.cfg.vocab_size, self.pos, crate::sample::NON_FINITE_HINT)?;
        Ok(logits)
    }

    fn forward_sample(&mut self, tokens: &[u32], sampler: &mut Sampler) -> Result<u32> {
        use Arg::{F32, I32, I64, Ptr};
        self.run_tokens(tokens, false, None)?;
        let p = sampler.params;
        let a = [
            Ptr(self.buf(Buf::Logits)),
            I32(self.cfg.vocab_size as i32),
            F32(p.temperature),
            F32(p.top_p),
            I32(p.top_k.min(i32::MAX as usize) as i32),
            I64(p.seed as i64),
            I64(sampler.step() as i64),
            Ptr(self.st.sample_out),
        ];
        self.dev.launch("sample_token", (1, 1, 1), 1024, &a)?;
        let mut out = [0i32; 2];
        self.dev.read(self.st.sample_out, &mut out)?;
        if out[1] == 2 {
            // sample_token found a NaN or infinite logit.
            let origin = crate::sample::NON_FINITE_HINT.into();
            return Err(Error::NonFinite { position: self.pos - 1, origin });
        }
        if out[1] != 0 {
            // Too many candidates for the device sort: sample the copied logits on the host.
            let mut logits = Vec::new();
            self.read_logits(1, &mut logits)?;
            crate::sample::check_finite(&logits, self.cfg.vocab_size, self.pos, crate::sample::NON_FINITE_HINT)?;
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
