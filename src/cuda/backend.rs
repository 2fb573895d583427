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
use crate::model::{Linear, Mlp, Weights};
use crate::plan::{Buf, LinRef, NormRef, Plan, Step};
use crate::sample::Sampler;

/// Most tokens per prefill launch (activation buffers are sized for it).
pub const CHUNK: usize = 64;
/// Blocks per (token, head) of attention: each takes 1/ATTN_SPLITS of the keys.
const ATTN_SPLITS: usize = 16;
/// Threads of an attention block (`ATTN_THREADS` in primitives.cu).
const ATTN_THREADS: u32 = 128;
/// Default KV-cache capacity (tokens) when the model allows more.
const DEFAULT_MAX_CTX: usize = 8192;

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
    q_norm: u64,
    k_norm: u64,
    q: DLinear,
    k: DLinear,
    v: DLinear,
    o: DLinear,
    mlp: DMlp,
    k_cache: u64,
    v_cache: u64,
}

/// A layer's feed-forward block on the device (mirrors [`Mlp`]).
enum DMlp {
    /// gate, up, down.
    Dense([DLinear; 3]),
    /// Router, and gate/up/down of all experts stacked `[E, rows, ...]`.
    Moe { router: DLinear, experts: [DMat; 3] },
}

/// Device activation buffers, one per [`Buf`], plus router state and scalars.
struct RunState {
    bufs: [u64; Buf::ALL.len()],
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

impl CudaBackend {
    /// Opens the GPU and uploads `weights`; `use_graph` captures decode steps into a graph.
    pub fn new(cfg: ModelConfig, weights: &Arc<Weights>, plan: Plan, use_graph: bool) -> Result<CudaBackend> {
        let mut dev = Device::open()?;
        let c = &cfg;
        let (h, d) = (c.hidden_size, c.head_dim);
        if d % 8 != 0 || d > 256 {
            return Err(unsupported(format!("head_dim {d} (need a multiple of 8, at most 256)")));
        }
        if c.num_experts > 1024 || c.top_k > 16 {
            return Err(unsupported(format!("{} experts / top-{} (at most 1024 / 16)", c.num_experts, c.top_k)));
        }
        let max_ctx = c.max_position_embeddings.min(DEFAULT_MAX_CTX);
        let embed = upload_mats(&mut dev, std::slice::from_ref(&weights.embed))?;
        let lm_head = upload_linear(&mut dev, &weights.lm_head)?;
        let final_norm = dev.upload(&weights.norm)?;
        let inv_freq: Vec<f32> =
            (0..c.rope.dim / 2).map(|i| (1.0 / c.rope.theta.powf((2 * i) as f64 / c.rope.dim as f64)) as f32).collect();
        let inv_freq = dev.upload(&inv_freq)?;
        let kv_row = c.num_kv_heads * d;
        let mut layers = Vec::with_capacity(c.num_layers);
        for lw in &weights.layers {
            let mlp = match &lw.mlp {
                Mlp::Dense { gate, up, down } => DMlp::Dense([
                    upload_linear(&mut dev, gate)?,
                    upload_linear(&mut dev, up)?,
                    upload_linear(&mut dev, down)?,
                ]),
                Mlp::Moe { router, experts } => DMlp::Moe {
                    router: upload_linear(&mut dev, router)?,
                    experts: [
                        upload_mats(&mut dev, &experts.gate)?,
                        upload_mats(&mut dev, &experts.up)?,
                        upload_mats(&mut dev, &experts.down)?,
                    ],
                },
            };
            layers.push(DLayer {
                input_norm: dev.upload(&lw.input_norm)?,
                post_norm: dev.upload(&lw.post_norm)?,
                q_norm: dev.upload(&lw.q_norm)?,
                k_norm: dev.upload(&lw.k_norm)?,
                q: upload_linear(&mut dev, &lw.q)?,
                k: upload_linear(&mut dev, &lw.k)?,
                v: upload_linear(&mut dev, &lw.v)?,
                o: upload_linear(&mut dev, &lw.o)?,
                mlp,
                k_cache: dev.alloc(max_ctx * kv_row * 2)?,
                v_cache: dev.alloc(max_ctx * kv_row * 2)?,
            });
        }
        // Activation buffers for CHUNK rows.
        let (k, nh) = (c.top_k.max(1), c.num_heads);
        let ffn = (k * c.moe_intermediate_size).max(c.intermediate_size);
        let widths: [(Buf, usize, usize); 13] = [
            (Buf::X, h, 2),
            (Buf::H, h, 2),
            (Buf::Q, nh * d, 2),
            (Buf::K, kv_row, 2),
            (Buf::V, kv_row, 2),
            (Buf::Attn, nh * d, 2),
            (Buf::Out, h, 2),
            (Buf::RouterLogits, c.num_experts.max(1), 4),
            (Buf::Gate, ffn, 2),
            (Buf::Up, ffn, 2),
            (Buf::Act, ffn, 2),
            (Buf::ExpertOut, k * h, 2),
            (Buf::Logits, c.vocab_size, 4),
        ];
        let mut bufs = [0u64; Buf::ALL.len()];
        for (b, width, elem) in widths {
            bufs[b as usize] = dev.alloc(CHUNK * width * elem)?;
        }
        let st = RunState {
            bufs,
            topk_idx: dev.alloc(CHUNK * k * 4)?,
            topk_w: dev.alloc(CHUNK * k * 4)?,
            grp_off: dev.alloc((c.num_experts + 1) * 4)?,
            grp_rows: dev.alloc(CHUNK * k * 4)?,
            sample_out: dev.alloc(8)?,
            tickets: dev.alloc(CHUNK * nh.max(1) * 4)?,
            io: dev.alloc((1 + CHUNK) * 4)?,
            part_o: dev.alloc(CHUNK * nh * ATTN_SPLITS * d * 4)?,
            part_ml: dev.alloc(CHUNK * nh * ATTN_SPLITS * 2 * 4)?,
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
        let dense = |l: usize, i: usize| match &self.layers[l].mlp {
            DMlp::Dense(w) => Ok(&w[i]),
            DMlp::Moe { .. } => Err(Error::Cuda(format!("plan asks for a dense MLP weight of MoE layer {l}"))),
        };
        Ok(match r {
            LinRef::Q(l) => &self.layers[l].q,
            LinRef::K(l) => &self.layers[l].k,
            LinRef::V(l) => &self.layers[l].v,
            LinRef::O(l) => &self.layers[l].o,
            LinRef::DenseGate(l) => dense(l, 0)?,
            LinRef::DenseUp(l) => dense(l, 1)?,
            LinRef::DenseDown(l) => dense(l, 2)?,
            LinRef::Router(l) => match &self.layers[l].mlp {
                DMlp::Moe { router, .. } => router,
                DMlp::Dense(_) => return Err(Error::Cuda(format!("plan asks for the router of dense layer {l}"))),
            },
            LinRef::LmHead => &self.lm_head,
        })
    }

    fn norm(&self, r: NormRef) -> u64 {
        match r {
            NormRef::Input(l) => self.layers[l].input_norm,
            NormRef::Post(l) => self.layers[l].post_norm,
            NormRef::QHead(l) => self.layers[l].q_norm,
            NormRef::KHead(l) => self.layers[l].k_norm,
            NormRef::Final => self.final_norm,
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
                | Step::MoeGateUpSwiglu { .. }
                | Step::MoeDownCombineAdd { .. }
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
                let a = [Ptr(self.buf(src)), Ptr(self.norm(w)), Ptr(self.buf(dst)), I32(h as i32), F32(eps)];
                dev.launch("rmsnorm", (mm as u32, 1, 1), 256, &a)?;
            }
            Step::HeadNorm { w, buf } => {
                let heads = if buf == Buf::Q { nh } else { nkv };
                let p = self.buf(buf);
                let a = [Ptr(p), Ptr(self.norm(w)), Ptr(p), I32(d as i32), F32(eps)];
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
                    F32(1.0 / (d as f32).sqrt()),
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
            Step::MoeDownCombineAdd { layer } => {
                let [_, _, dn] = *self.experts(layer)?;
                let mut a = dn.args().to_vec();
                a.extend([I64(dn.w_stride), I64(dn.sb_stride), Ptr(self.st.topk_idx), Ptr(self.st.topk_w)]);
                a.extend([I32(k as i32), Ptr(self.buf(Buf::Act)), Ptr(self.buf(Buf::X)), I32(h as i32)]);
                a.push(I32(c.moe_intermediate_size as i32));
                dev.launch("moe_down_combine_add", (h as u32, 1, mm as u32), 32 * k as u32, &a)?;
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
            Step::DenseGateUpSwiglu { layer } => {
                let (g, u) = (*self.linear(LinRef::DenseGate(layer))?, *self.linear(LinRef::DenseUp(layer))?);
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
                let ly = &self.layers[layer];
                let (q, kp, v) = (ly.q, ly.k, ly.v);
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
                let a = [Ptr(x), Ptr(self.buf(src)), Ptr(self.norm(w)), Ptr(self.buf(dst)), I32(h as i32), F32(eps)];
                dev.launch("add_rmsnorm", (mm as u32, 1, 1), 256, &a)?;
            }
            Step::QkNormRopeKv { layer } => {
                let ly = &self.layers[layer];
                let a = [
                    Ptr(self.buf(Buf::Q)),
                    Ptr(self.buf(Buf::K)),
                    Ptr(self.buf(Buf::V)),
                    Ptr(ly.q_norm),
                    Ptr(ly.k_norm),
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
                let ly = &self.layers[layer];
                same(&ly.q.m, &ly.k.m) && same(&ly.q.m, &ly.v.m)
            }
            Step::MoeGateUpSwiglu { layer } => {
                let ex = self.experts(layer)?;
                same(&ex[0], &ex[1])
            }
            Step::DenseGateUpSwiglu { layer } => {
                same(&self.linear(LinRef::DenseGate(layer))?.m, &self.linear(LinRef::DenseUp(layer))?.m)
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
        let c = &self.cfg;
        let gating = if c.norm_topk_prob { Gating::SoftmaxNorm } else { Gating::Softmax };
        let mut shape = Shape {
            preset: "model".into(),
            tokens: mm,
            hidden: c.hidden_size,
            experts: c.num_experts,
            k: c.top_k,
            inter: c.moe_intermediate_size,
            bits: 0,
            group: 0,
            gating,
            scale: 1.0,
            eps: c.rms_norm_eps,
        };
        // The op's tensors in the foundry's order (crate::foundry::ops::OpId::inputs).
        let (op, ptrs) = match *step {
            Step::Combine => (OpId::MoeCombine, vec![self.buf(Buf::ExpertOut), self.st.topk_w, self.buf(Buf::Out)]),
            Step::RouterTopK => {
                (OpId::TopkGating, vec![self.buf(Buf::RouterLogits), 0, self.st.topk_idx, self.st.topk_w])
            }
            Step::AddRmsNorm { w, src, dst } => {
                (OpId::RmsnormResidual, vec![self.buf(Buf::X), self.buf(src), self.norm(w), self.buf(dst)])
            }
            Step::MoeGateUpSwiglu { layer } => {
                let [g, u, _] = *self.experts(layer)?;
                if g.fmt != 1 {
                    return Ok(false); // the templates read MLX affine weights only
                }
                (shape.bits, shape.group) = (g.bits as u32, g.group as usize);
                let (idx, h, act) = (self.st.topk_idx, self.buf(Buf::H), self.buf(Buf::Act));
                (OpId::GatherQmmSwiglu, vec![g.w, g.s, g.b, u.w, u.s, u.b, idx, h, act])
            }
            _ => return Ok(false),
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
        if out[1] != 0 {
            // Too many candidates for the device sort: sample the copied logits on the host.
            let mut logits = Vec::new();
            self.read_logits(1, &mut logits)?;
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
