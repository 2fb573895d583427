//! GPT-OSS experts in the three layouts they are published in (model-spec §5.3, §5.8, §6.5),
//! read into the generic [`Experts`] tree: per expert a gate `[I, H]`, an up `[I, H]` and a
//! down `[H, I]` matrix, plus f32 biases.
//!
//! * transformers-5 bf16: `mlp.experts.gate_up_proj [E, H, 2I]` (**[E, in, out]**, gate and up
//!   interleaved in the output columns: column 2j = gate j, 2j+1 = up j) and
//!   `down_proj [E, I, H]`, biases `gate_up_proj_bias [E, 2I]` (same interleave) and
//!   `down_proj_bias [E, H]`.
//! * the original MXFP4 release: `*_blocks` u8 `[E, out, in/32, 16]` + `*_scales` u8
//!   `[E, out, in/32]` in the PyTorch `[out, in]` orientation, gate/up interleaved by rows.
//!   Each row's 16-byte blocks are exactly [`MatKind::Mxfp4`]'s packed row (low nibble =
//!   even element), so the rows are copied, never re-encoded.
//! * mlx-community: `mlp.experts.{gate,up,down}_proj.{weight,scales[,biases],bias}` stacked
//!   `[E, out, ...]`, already split, in whatever MLX mode config.json says.
//!
//! Why de-interleave at load: every backend then sees the gate and up matrices every other
//! family has, and the interleave exists in one place. The cost is one copy of the gate/up
//! weights when the model is loaded (the down weights of the MXFP4 release and of
//! mlx-community are used in place).

use rayon::prelude::*;
use safetensors::Dtype;

use super::{Bytes, Checkpoint, FloatBytes, Mat, MatKind};
use crate::error::Result;
use crate::model::{ExpertBias, Experts, Mlp};

/// Router and experts of GPT-OSS layer `p` (`model.layers.{l}`), whichever layout it is in.
pub(crate) fn moe(ck: &Checkpoint, p: &str) -> Result<Mlp> {
    let c = &ck.config;
    let (h, e, i) = (c.hidden_size, c.num_experts, c.moe_intermediate_size);
    let router = crate::model::linear(ck, &format!("{p}.mlp.router"), e, h, true)?;
    let x = format!("{p}.mlp.experts");
    let experts = if ck.has(&format!("{x}.gate_up_proj_blocks")) {
        release_mxfp4(ck, &x, e, i, h)?
    } else if ck.has(&format!("{x}.gate_up_proj")) {
        fused_float(ck, &x, e, i, h)?
    } else {
        split(ck, &x, e, i, h)?
    };
    Ok(Mlp::Moe { router, correction_bias: None, experts, shared: None })
}

/// The interleaved `[E, 2I]` gate/up bias as (gate `[E, I]`, up `[E, I]`).
fn split_bias(ck: &Checkpoint, name: &str, e: usize, i: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let b = ck.floats(name, &[e, 2 * i])?.to_vec();
    Ok((b.iter().step_by(2).copied().collect(), b.iter().skip(1).step_by(2).copied().collect()))
}

/// transformers-5 layout: float `[E, in, out]` tensors, transposed here into `[out, in]`
/// rows in the same float type (exact).
fn fused_float(ck: &Checkpoint, x: &str, e: usize, i: usize, h: usize) -> Result<Experts> {
    let gu = ck.floats(&format!("{x}.gate_up_proj"), &[e, h, 2 * i])?;
    let dn = ck.floats(&format!("{x}.down_proj"), &[e, i, h])?;
    let (gate_b, up_b) = split_bias(ck, &format!("{x}.gate_up_proj_bias"), e, i)?;
    let down_b = ck.floats(&format!("{x}.down_proj_bias"), &[e, h])?.to_vec();
    Ok(Experts {
        gate: (0..e).map(|ex| columns_as_rows(&gu, ex, h, 2 * i, i, |j| 2 * j)).collect(),
        up: (0..e).map(|ex| columns_as_rows(&gu, ex, h, 2 * i, i, |j| 2 * j + 1)).collect(),
        down: (0..e).map(|ex| columns_as_rows(&dn, ex, i, h, h, |j| j)).collect(),
        bias: Some(ExpertBias { gate: gate_b, up: up_b, down: down_b }),
    })
}

/// Expert `ex` of a float `[E, inp, out]` tensor as an `[n, inp]` matrix whose row `j` is
/// output column `col(j)`.
fn columns_as_rows(
    f: &FloatBytes,
    ex: usize,
    inp: usize,
    out: usize,
    n: usize,
    col: impl Fn(usize) -> usize + Sync,
) -> Mat {
    let s = f.dtype.size();
    let src = &f.data.as_slice()[ex * inp * out * s..][..inp * out * s];
    let mut buf = vec![0u8; n * inp * s];
    buf.par_chunks_mut(inp * s).enumerate().for_each(|(j, row)| {
        let c = col(j);
        for (k, dst) in row.chunks_exact_mut(s).enumerate() {
            dst.copy_from_slice(&src[(k * out + c) * s..][..s]);
        }
    });
    Mat { rows: n, cols: inp, kind: MatKind::Float(FloatBytes { dtype: f.dtype, data: Bytes::from_vec(buf) }) }
}

/// The MXFP4 release (model-spec §5.8): `*_blocks [E, out, in/32, 16]`, `*_scales [E, out, in/32]`.
fn release_mxfp4(ck: &Checkpoint, x: &str, e: usize, i: usize, h: usize) -> Result<Experts> {
    let gu = mxfp4_tensor(ck, &format!("{x}.gate_up_proj"), e, 2 * i, h)?;
    let dn = mxfp4_tensor(ck, &format!("{x}.down_proj"), e, h, i)?;
    let (gate_b, up_b) = split_bias(ck, &format!("{x}.gate_up_proj_bias"), e, i)?;
    let down_b = ck.floats(&format!("{x}.down_proj_bias"), &[e, h])?.to_vec();
    Ok(Experts {
        gate: (0..e).map(|ex| gu.rows(ex, i, |j| 2 * j)).collect(),
        up: (0..e).map(|ex| gu.rows(ex, i, |j| 2 * j + 1)).collect(),
        down: (0..e).map(|ex| dn.expert(ex)).collect(),
        bias: Some(ExpertBias { gate: gate_b, up: up_b, down: down_b }),
    })
}

/// One `*_blocks` / `*_scales` pair, checked.
struct Mxfp4Tensor {
    blocks: Bytes,
    scales: Bytes,
    /// Rows per expert.
    out: usize,
    /// Elements per row.
    inp: usize,
}

impl Mxfp4Tensor {
    /// Expert `ex` in place (rows as stored).
    fn expert(&self, ex: usize) -> Mat {
        let (rb, sb) = (self.inp / 2, self.inp / 32);
        Mat {
            rows: self.out,
            cols: self.inp,
            kind: MatKind::Mxfp4 {
                packed: self.blocks.slice(ex * self.out * rb, self.out * rb),
                scales: self.scales.slice(ex * self.out * sb, self.out * sb),
            },
        }
    }

    /// Expert `ex`'s rows `row(0..n)`, copied into a new matrix.
    fn rows(&self, ex: usize, n: usize, row: impl Fn(usize) -> usize) -> Mat {
        let (rb, sb) = (self.inp / 2, self.inp / 32);
        let (b, s) = (self.blocks.as_slice(), self.scales.as_slice());
        let (mut packed, mut scales) = (Vec::with_capacity(n * rb), Vec::with_capacity(n * sb));
        for j in 0..n {
            let r = ex * self.out + row(j);
            packed.extend_from_slice(&b[r * rb..][..rb]);
            scales.extend_from_slice(&s[r * sb..][..sb]);
        }
        Mat {
            rows: n,
            cols: self.inp,
            kind: MatKind::Mxfp4 { packed: Bytes::from_vec(packed), scales: Bytes::from_vec(scales) },
        }
    }
}

/// Reads and checks `{path}_blocks` u8 `[e, out, inp/32, 16]` and `{path}_scales` u8
/// `[e, out, inp/32]`; an E8M0 scale of 255 (NaN in the OCP MX spec) is refused by name.
fn mxfp4_tensor(ck: &Checkpoint, path: &str, e: usize, out: usize, inp: usize) -> Result<Mxfp4Tensor> {
    let (bn, sn) = (format!("{path}_blocks"), format!("{path}_scales"));
    if !inp.is_multiple_of(32) {
        return Err(ck.bad(&bn, format!("input dim {inp} is not a multiple of the MXFP4 block (32)")));
    }
    let g = inp / 32;
    for (name, shape) in [(&bn, vec![e, out, g, 16]), (&sn, vec![e, out, g])] {
        let t = ck.tensor(name)?;
        if t.dtype != Dtype::U8 || t.shape != shape {
            return Err(ck.bad(name, format!("expected U8 {shape:?}, got {:?} {:?}", t.dtype, t.shape)));
        }
    }
    let scales = ck.bytes(ck.tensor(&sn)?);
    check_e8m0(ck, &sn, scales.as_slice())?;
    Ok(Mxfp4Tensor { blocks: ck.bytes(ck.tensor(&bn)?), scales, out, inp })
}

/// Refuses E8M0 scale bytes of 255 (NaN): a weight would be NaN, not a number.
pub(crate) fn check_e8m0(ck: &Checkpoint, name: &str, scales: &[u8]) -> Result<()> {
    match scales.par_iter().position_first(|&s| s == 255) {
        Some(at) => Err(ck.bad(name, format!("E8M0 scale byte {at} is 255 (NaN in the OCP MX format)"))),
        None => Ok(()),
    }
}

/// mlx-community: split, stacked experts in an MLX mode, plus `.bias` vectors.
fn split(ck: &Checkpoint, x: &str, e: usize, i: usize, h: usize) -> Result<Experts> {
    let bias =
        |name: &str, n: usize| -> Result<Vec<f32>> { Ok(ck.floats(&format!("{x}.{name}.bias"), &[e, n])?.to_vec()) };
    Ok(Experts {
        gate: ck.linear(&format!("{x}.gate_proj"), Some(e), i, h)?,
        up: ck.linear(&format!("{x}.up_proj"), Some(e), i, h)?,
        down: ck.linear(&format!("{x}.down_proj"), Some(e), h, i)?,
        bias: Some(ExpertBias { gate: bias("gate_proj", i)?, up: bias("up_proj", i)?, down: bias("down_proj", h)? }),
    })
}
