//! Linear layers (`linear.cu`): the embedding gather, mat-vecs, and the fused `qkv_proj`
//! and `swiglu_mlp` kernels. One warp per output row, 4 rows per 128-thread block; tokens in
//! groups of 8 per block (`blockIdx.z`), or one (`*1` kernels, decode).

use super::{Bf16, F32, I32, In, KernelArgs, Out, QMat, Void, blocks, int, kernel_args};
use crate::cuda::Device;
use crate::error::Result;

kernel_args! {
    /// `embed`: `out[m] = dequant(table[tokens[m]])`.
    pub struct EmbedArgs { table: QMat, tokens: In<I32>, out: Out<Bf16>, h: i32 }
    /// `matvec` / `matvec1`: `y[M, n] = x[M, k] Wᵀ (+ bias)`, y bf16 or f32 (`out_f32`).
    pub struct MatvecArgs { w: QMat, x: In<Bf16>, y: Out<Void>, bias: In<F32>, n: i32, k: i32, m: i32, out_f32: i32 }
    /// `qkv_proj` / `qkv_proj1`: three (or, with `nv` 0, two) mat-vecs of one input.
    pub struct QkvArgs {
        wq: QMat, wk: QMat, wv: QMat,
        qbias: In<F32>, kbias: In<F32>, vbias: In<F32>,
        x: In<Bf16>, q: Out<Bf16>, k: Out<Bf16>, v: Out<Bf16>,
        nq: i32, nk: i32, nv: i32, kdim: i32, m: i32,
    }
    /// `dense_gate_up_swiglu`: `act = swiglu(x gateᵀ + bg, x upᵀ + bu)`, `[M, f]`.
    pub struct DenseGateUpArgs {
        gate: QMat, up: QMat, gbias: In<F32>, ubias: In<F32>, x: In<Bf16>, act: Out<Bf16>, f: i32, h: i32, m: i32,
    }
}

/// The C declarations of this file's argument structs.
pub fn decls() -> String {
    [EmbedArgs::c_decl(), MatvecArgs::c_decl(), QkvArgs::c_decl(), DenseGateUpArgs::c_decl()].concat()
}

/// Rows per block of the mat-vec kernels (one warp each).
const ROWS: usize = 4;
/// Tokens per block of the multi-token kernels.
const TOKENS: usize = 8;

/// Grid and kernel name of a mat-vec over `rows` output rows and `m` tokens.
fn matvec_launch(base: &str, rows: usize, m: usize) -> (String, (u32, u32, u32)) {
    let name = if m == 1 { format!("{base}1") } else { base.to_string() };
    (name, (blocks(rows, ROWS), 1, blocks(m, TOKENS)))
}

/// `m` rows of the embedding table at `tokens`.
pub fn embed(dev: &Device, a: &EmbedArgs, m: usize) -> Result<()> {
    dev.launch_args("embed", (int(m) as u32, 1, 1), 256, a)
}

/// A mat-vec of `a.m` tokens.
pub fn matvec(dev: &Device, a: &MatvecArgs) -> Result<()> {
    let (name, grid) = matvec_launch("matvec", a.n as usize, a.m as usize);
    dev.launch_args(&name, grid, 128, a)
}

/// The fused q/k/v (or q/kv) projections of `a.m` tokens.
pub fn qkv(dev: &Device, a: &QkvArgs) -> Result<()> {
    let (name, grid) = matvec_launch("qkv_proj", (a.nq + a.nk + a.nv) as usize, a.m as usize);
    dev.launch_args(&name, grid, 128, a)
}

/// The fused dense gate, up and SwiGLU of `a.m` tokens.
pub fn dense_gate_up_swiglu(dev: &Device, a: &DenseGateUpArgs) -> Result<()> {
    let grid = (blocks(a.f as usize, ROWS), 1, blocks(a.m as usize, TOKENS));
    dev.launch_args("dense_gate_up_swiglu", grid, 128, a)
}
