//! The model's weights on the device: the host weight tree ([`Weights`]) in the device
//! store [`Gpu`] — matrices and stacks as [`DMat`] (one format per matrix, ready for the
//! kernels' [`QMat`]), vectors as device pointers — uploaded once by [`Upload`]. The role
//! lookups are the tree's own (`Weights::linear`, `Weights::norm`, ...), written once for
//! every store.

use half::bf16;

use super::Device;
use super::ops::{QMat, Stacked, rd};
use crate::checkpoint::{Mat, MatKind};
use crate::error::{Error, Result};
use crate::model::{Attn, Convert, Linear, Mlp, Store, Weights};

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

/// The device store: matrices and stacks as [`DMat`], vectors as device pointers (0 = none).
#[derive(Debug, Clone)]
pub(crate) struct Gpu;

impl Store for Gpu {
    type Mat = DMat;
    type Stack = DMat;
    type Vector = u64;
}

/// A linear layer on the device.
pub(crate) type DLinear = Linear<Gpu>;

/// Every weight of the model on the device: the host tree, converted ([`Upload`]).
pub(crate) type DeviceWeights = Weights<Gpu>;

impl DLinear {
    /// The f32 bias on the device, or 0.
    pub fn bias(&self) -> u64 {
        self.b.unwrap_or(0)
    }
}

/// Uploads the host tree's tensors in the kernels' formats (refusing what they cannot read).
pub(crate) struct Upload<'a>(pub &'a mut Device);

impl Convert<Gpu> for Upload<'_> {
    fn mat(&mut self, m: &Mat) -> Result<DMat> {
        if matches!(m.kind, MatKind::Mxfp4 { .. }) {
            return Err(unsupported("MXFP4 outside the experts (only GPT-OSS's expert kernels read it)".into()));
        }
        upload_mats(self.0, std::slice::from_ref(m))
    }

    fn stack(&mut self, ms: &[Mat]) -> Result<DMat> {
        upload_mats(self.0, ms)
    }

    fn vector(&mut self, v: &[f32]) -> Result<u64> {
        if v.is_empty() { Ok(0) } else { self.0.upload(v) }
    }
}

impl DeviceWeights {
    /// `(q, k, v, q_norm, k_norm)` of GQA layer `l`.
    pub(crate) fn gqa(&self, l: usize) -> Result<(&DLinear, &DLinear, &DLinear, u64, u64)> {
        match &self.layers[l].attn {
            Attn::Gqa { q, k, v, q_norm, k_norm } => Ok((q, k, v, *q_norm, *k_norm)),
            _ => Err(Error::Cuda(format!("plan asks for the q/k/v projections and q/k norms of layer {l}"))),
        }
    }

    /// The router and its f32 correction bias (or 0) of MoE layer `l`.
    pub(crate) fn router(&self, l: usize) -> Result<(&DLinear, u64)> {
        match &self.layers[l].mlp {
            Mlp::Moe { router, correction_bias, .. } => Ok((router, correction_bias.unwrap_or(0))),
            Mlp::Dense(_) => Err(Error::Cuda(format!("plan asks for the router of dense layer {l}"))),
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
        MatKind::Mxfp4 { .. } => {
            // As stored: codes [rows, cols/2] bytes (16-byte blocks), E8M0 scales [rows, cols/32].
            let (mut w, mut s) = (Vec::new(), Vec::new());
            for m in mats {
                let MatKind::Mxfp4 { packed, scales } = &m.kind else {
                    return Err(unsupported("mixed expert formats".into()));
                };
                w.extend_from_slice(packed.as_slice());
                s.extend_from_slice(scales.as_slice());
            }
            let (w, s) = (dev.upload(&w)?, dev.upload(&s)?);
            let fmt = super::ops::gpt_oss::FMT_MXFP4;
            let q = QMat { w: rd(w), s: rd(s), b: rd(0), fmt, bits: 4, group: 32 };
            Ok(DMat { q, rows, cols, w_stride: (rows * cols / 8) as i64, sb_stride: (rows * cols / 32) as i64 })
        }
    }
}
