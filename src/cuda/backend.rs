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
use crate::backend::{Backend, DeviceInfo};
use crate::checkpoint::{Mat, MatKind};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::{Linear, Mlp, Weights};
use crate::plan::{Buf, LinRef, NormRef, Plan, Step};

/// Most tokens per prefill launch (activation buffers are sized for it).
pub const CHUNK: usize = 64;
/// Keys per attention split (pass 1 block).
const ATTN_CHUNK: usize = 256;
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
    topk_idx: u64,
    topk_w: u64,
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
    nsplit: usize,
    pos: usize,
    use_graph: bool,
    graph: Option<cudarc::driver::CudaGraph>,
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
        if d % 2 != 0 || d > 256 {
            return Err(unsupported(format!("head_dim {d} (need an even number, at most 256)")));
        }
        if c.num_experts > 1024 || c.top_k > 16 {
            return Err(unsupported(format!("{} experts / top-{} (at most 1024 / 16)", c.num_experts, c.top_k)));
        }
        let max_ctx = c.max_position_embeddings.min(DEFAULT_MAX_CTX);
        let nsplit = max_ctx.div_ceil(ATTN_CHUNK);
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
            io: dev.alloc((1 + CHUNK) * 4)?,
            part_o: dev.alloc(CHUNK * nh * nsplit * d * 4)?,
            part_ml: dev.alloc(CHUNK * nh * nsplit * 2 * 4)?,
            act_elems: 0,
        };
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
            nsplit,
            pos: 0,
            use_graph,
            graph: None,
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
        let c = &self.cfg;
        let (h, d, nh, nkv, k) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads, c.top_k);
        let eps = c.rms_norm_eps;
        let mm = *m;
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
                dev.launch("matvec", (n.div_ceil(4) as u32, 1, mm.div_ceil(8) as u32), 128, &a)?;
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
                    I32(nh as i32),
                    I32(nkv as i32),
                    I32(d as i32),
                    F32(1.0 / (d as f32).sqrt()),
                    I32(ATTN_CHUNK as i32),
                    I32(self.nsplit as i32),
                ];
                dev.launch("attn_partial", ((mm * nh) as u32, self.nsplit as u32, 1), 128, &a)?;
                let a = [
                    Ptr(self.st.part_o),
                    Ptr(self.st.part_ml),
                    Ptr(self.buf(Buf::Attn)),
                    I32(d as i32),
                    I32(self.nsplit as i32),
                ];
                dev.launch("attn_combine", ((mm * nh) as u32, 1, 1), 128, &a)?;
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
                dev.launch("combine", (mm as u32, 1, 1), 256, &a)?;
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

    /// `rows` selected-expert mat-vecs: row q reads x row q / per and expert topk_idx[q].
    fn expert_matvec(&self, w: &DMat, src: Buf, per: usize, dst: Buf, rows: usize) -> Result<()> {
        let mut a = w.args().to_vec();
        a.extend([
            Arg::I64(w.w_stride),
            Arg::I64(w.sb_stride),
            Arg::Ptr(self.st.topk_idx),
            Arg::I32(per as i32),
            Arg::Ptr(self.buf(src)),
            Arg::Ptr(self.buf(dst)),
            Arg::I32(w.rows as i32),
            Arg::I32(w.cols as i32),
        ]);
        self.dev.launch("expert_matvec", (w.rows.div_ceil(4) as u32, rows as u32, 1), 128, &a)
    }

    /// Runs every step of the plan over `m` rows; returns the rows of logits produced.
    fn run_plan(&mut self, m: usize, all_logits: bool) -> Result<usize> {
        let plan = std::mem::replace(&mut self.plan, Plan { name: String::new(), steps: Vec::new() });
        let mut rows = m;
        let r = plan.steps.iter().try_for_each(|s| self.step(s, &mut rows, all_logits));
        self.plan = plan;
        r.map(|_| rows)
    }

    fn read_logits(&self, rows: usize, out: &mut Vec<f32>) -> Result<()> {
        let v = self.cfg.vocab_size;
        let start = out.len();
        out.resize(start + rows * v, 0.0);
        self.dev.read(self.buf(Buf::Logits), &mut out[start..])
    }

    /// Switches graph capture of decode steps on or off (for eager-vs-graph comparisons).
    pub fn set_use_graph(&mut self, on: bool) {
        self.use_graph = on;
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> String {
        format!("cuda ({}{})", self.dev.name, if self.use_graph { ", graph" } else { ", eager" })
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
        crate::cpu::check_tokens(&self.cfg, tokens, self.pos)?;
        if self.pos + tokens.len() > self.max_ctx {
            return Err(Error::Arg(format!(
                "context of {} tokens exceeds the CUDA KV cache ({})",
                self.pos + tokens.len(),
                self.max_ctx
            )));
        }
        let mut logits = Vec::new();
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
            if all_logits || last {
                self.read_logits(rows, &mut logits)?;
            }
        }
        Ok(logits)
    }
}
