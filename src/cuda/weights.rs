//! The model's weights on the device: a mirror of [`Weights`] in device formats ([`DMat`]:
//! one matrix or a stack of experts / heads), uploaded once, looked up by the plan's roles.
//!
//! Why a mirror and not the host tree with device handles: the host tree holds memory-mapped
//! checkpoint data in several on-disk formats; the device holds one format per matrix, ready
//! for the kernels' [`QMat`]. Lookups fail with an error (never a panic) when a plan names a
//! weight the model lacks, though `Plan::check` has refused such plans already.

use half::bf16;

use super::Device;
use super::ops::{QMat, Stacked, rd};
use crate::checkpoint::{Mat, MatKind};
use crate::error::{Error, Result};
use crate::model::{Attn, Ffn, Linear, MlaWeights, Mlp, Weights};
use crate::plan::{LinRef, NormRef};

/// A weight matrix on the device, or `E` of them stacked (experts, MLA heads).
#[derive(Debug, Clone, Copy)]
pub(crate) struct DMat {
    /// What the kernels read (of matrix 0 when stacked).
    pub q: QMat,
    /// Output rows (of one matrix).
    pub rows: usize,
    /// Input columns.
    pub cols: usize,
    /// Storage elements per matrix (stacked: matrix e starts at e·w_stride).
    pub w_stride: i64,
    /// Scales/biases per matrix.
    pub sb_stride: i64,
}

impl DMat {
    /// The stack as the expert / head kernels take it.
    pub fn stacked(&self) -> Stacked {
        Stacked { w: self.q, w_stride: self.w_stride, sb_stride: self.sb_stride }
    }
}

/// A linear layer on the device.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DLinear {
    /// Weight.
    pub m: DMat,
    /// f32 bias or 0.
    pub bias: u64,
}

/// A layer's weights on the device (mirrors `model::Layer`).
pub(crate) struct DLayer {
    /// input_layernorm `[H]` f32.
    pub input_norm: u64,
    /// post_attention_layernorm `[H]` f32.
    pub post_norm: u64,
    /// Attention.
    pub attn: DAttn,
    /// o_proj.
    pub o: DLinear,
    /// The feed-forward block.
    pub mlp: DMlp,
}

/// A layer's attention weights on the device (mirrors [`Attn`]).
#[allow(clippy::large_enum_variant)] // one per layer
pub(crate) enum DAttn {
    /// q/k/v projections and per-head norms `[D]` f32.
    Gqa { q: DLinear, k: DLinear, v: DLinear, q_norm: u64, k_norm: u64 },
    /// Multi-head latent attention.
    Mla(DMla),
}

/// MLA weights (mirrors [`MlaWeights`]); per-head matrices stacked like experts.
pub(crate) struct DMla {
    pub q_a: Option<DLinear>,
    pub q_a_norm: u64,
    pub q: DLinear,
    pub kv_a: DLinear,
    pub kv_a_norm: u64,
    /// `[nH, kv_lora, qk_nope]`.
    pub embed_q: DMat,
    /// `[nH, v_head, kv_lora]`.
    pub unembed_out: DMat,
}

/// A layer's feed-forward block on the device (mirrors [`Mlp`]).
#[allow(clippy::large_enum_variant)] // one per layer
pub(crate) enum DMlp {
    /// gate, up, down.
    Dense([DLinear; 3]),
    /// Router (+ f32 correction bias or 0), gate/up/down of all experts stacked
    /// `[E, rows, ...]`, and the shared experts' gate/up/down.
    Moe { router: DLinear, bias: u64, experts: [DMat; 3], shared: Option<[DLinear; 3]> },
}

/// Every weight of the model on the device.
pub(crate) struct DeviceWeights {
    /// Token embedding `[V, H]`.
    pub embed: DMat,
    /// Output head.
    pub lm_head: DLinear,
    /// Final norm `[H]` f32.
    pub final_norm: u64,
    /// The decoder layers.
    pub layers: Vec<DLayer>,
}

impl DeviceWeights {
    /// Uploads `w` in the kernels' formats (refusing what they cannot read).
    pub fn upload(dev: &mut Device, w: &Weights) -> Result<DeviceWeights> {
        let mut layers = Vec::with_capacity(w.layers.len());
        for lw in &w.layers {
            let mlp = match &lw.mlp {
                Mlp::Dense(f) => DMlp::Dense(upload_ffn(dev, f)?),
                Mlp::Moe { router, correction_bias, experts, shared } => DMlp::Moe {
                    router: upload_linear(dev, router)?,
                    bias: correction_bias.as_ref().map(|b| dev.upload(b)).transpose()?.unwrap_or(0),
                    experts: [
                        upload_mats(dev, &experts.gate)?,
                        upload_mats(dev, &experts.up)?,
                        upload_mats(dev, &experts.down)?,
                    ],
                    shared: shared.as_deref().map(|f| upload_ffn(dev, f)).transpose()?,
                },
            };
            let attn = match &lw.attn {
                Attn::Gqa { q, k, v, q_norm, k_norm } => DAttn::Gqa {
                    q: upload_linear(dev, q)?,
                    k: upload_linear(dev, k)?,
                    v: upload_linear(dev, v)?,
                    q_norm: dev.upload(q_norm)?,
                    k_norm: dev.upload(k_norm)?,
                },
                Attn::Mla(m) => DAttn::Mla(upload_mla(dev, m)?),
            };
            layers.push(DLayer {
                input_norm: dev.upload(&lw.input_norm)?,
                post_norm: dev.upload(&lw.post_norm)?,
                attn,
                o: upload_linear(dev, &lw.o)?,
                mlp,
            });
        }
        Ok(DeviceWeights {
            embed: upload_mats(dev, std::slice::from_ref(&w.embed))?,
            lm_head: upload_linear(dev, &w.lm_head)?,
            final_norm: dev.upload(&w.norm)?,
            layers,
        })
    }

    pub(crate) fn linear(&self, r: LinRef) -> Result<&DLinear> {
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

    pub(crate) fn norm(&self, r: NormRef) -> Result<u64> {
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

    pub(crate) fn mla(&self, l: usize) -> Result<&DMla> {
        match &self.layers[l].attn {
            DAttn::Mla(m) => Ok(m),
            DAttn::Gqa { .. } => Err(Error::Cuda(format!("plan asks for MLA weights of GQA layer {l}"))),
        }
    }

    /// `(q, k, v, q_norm, k_norm)` of a GQA layer.
    pub(crate) fn gqa(&self, l: usize) -> Result<(DLinear, DLinear, DLinear, u64, u64)> {
        match &self.layers[l].attn {
            DAttn::Gqa { q, k, v, q_norm, k_norm } => Ok((*q, *k, *v, *q_norm, *k_norm)),
            DAttn::Mla(_) => Err(Error::Cuda(format!("plan asks for q/k/v projections of MLA layer {l}"))),
        }
    }

    pub(crate) fn experts(&self, l: usize) -> Result<&[DMat; 3]> {
        match &self.layers[l].mlp {
            DMlp::Moe { experts, .. } => Ok(experts),
            DMlp::Dense(_) => Err(Error::Cuda(format!("plan asks for experts of dense layer {l}"))),
        }
    }
}

/// A model the CUDA kernels cannot run: the CPU backend can.
pub(crate) fn unsupported(what: String) -> Error {
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
            let q = QMat { w: rd(w), s: rd(0), b: rd(0), fmt: 0, bits: 16, group: 0 };
            Ok(DMat { q, rows, cols, w_stride: (rows * cols) as i64, sb_stride: 0 })
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
            let (w, s, b) = (dev.upload(&w)?, dev.upload(&s)?, dev.upload(&b)?);
            let q = QMat { w: rd(w), s: rd(s), b: rd(b), fmt: 1, bits: *bits as i32, group: *group as i32 };
            let w_stride = (rows * cols * *bits as usize / 32) as i64;
            Ok(DMat { q, rows, cols, w_stride, sb_stride: groups as i64 })
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
