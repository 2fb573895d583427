//! Linear layers (`linear.cu`): the embedding gather, mat-vecs, and the fused `qkv_proj`
//! and `swiglu_mlp` kernels. 4 warps per 128-thread block; one output row a warp for tokens
//! in groups of 8 per block (`blockIdx.z`); for one token (`*1` kernels, decode) one row a
//! warp, or two for tall matrices (see [`TWO_ROWS_FROM`]).

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
    /// `norm_qkv_proj1`: `h = rmsnorm(xin) ⊙ nw` (one token, `p.kdim` wide), then
    /// `qkv_proj1` over it (`p.x` unread).
    pub struct NormQkvArgs { p: QkvArgs, xin: In<Bf16>, nw: In<F32>, h: Out<Bf16>, eps: f32 }
    /// `dense_gate_up_swiglu`: `act = swiglu(x gateᵀ + bg, x upᵀ + bu)`, `[M, f]`.
    pub struct DenseGateUpArgs {
        gate: QMat, up: QMat, gbias: In<F32>, ubias: In<F32>, x: In<Bf16>, act: Out<Bf16>, f: i32, h: i32, m: i32,
    }
}

/// The C declarations of this file's argument structs.
pub fn decls() -> String {
    [EmbedArgs::c_decl(), MatvecArgs::c_decl(), QkvArgs::c_decl(), NormQkvArgs::c_decl(), DenseGateUpArgs::c_decl()]
        .concat()
}

/// Warps per block of the mat-vec kernels.
const ROWS: usize = 4;
/// Tokens per block of the multi-token kernels.
const TOKENS: usize = 8;
/// Rows from which the one-token kernels take two rows a warp (`matvec1_r2`, `qkv_proj1_r2`:
/// both rows' loads in flight together, x unpacked once), which still leaves ≥ 2,048 warps.
/// Measured on the H200 (bench/RESULTS.md, 2026-12-07 session 10): two rows a warp gained
/// qwen3 decode 1.3 % over one (qkv 5,120 rows, lm_head 151,936), four lost 1.5 %; on
/// GLM's 1,344-row q_a/kv_a, two lost 4 % and four 9 % (too few warps to fill the GPU).
pub const TWO_ROWS_FROM: usize = 4096;

/// The kernel (of `[one row a warp, two rows a warp]`) and rows a warp of a one-token
/// mat-vec over `rows` output rows.
fn one_token(rows: usize, [one, two]: [&'static str; 2]) -> (&'static str, usize) {
    if rows >= TWO_ROWS_FROM { (two, 2) } else { (one, 1) }
}

/// `m` rows of the embedding table at `tokens`.
pub fn embed(dev: &Device, a: &EmbedArgs, m: usize) -> Result<()> {
    dev.launch_args("embed", (int(m) as u32, 1, 1), 256, a)
}

/// A mat-vec of `a.m` tokens.
pub fn matvec(dev: &Device, a: &MatvecArgs) -> Result<()> {
    if a.m == 1 {
        let (name, r) = one_token(a.n as usize, ["matvec1", "matvec1_r2"]);
        return dev.launch_args(name, (blocks(blocks(a.n as usize, r) as usize, ROWS), 1, 1), 128, a);
    }
    dev.launch_args("matvec", (blocks(a.n as usize, ROWS), 1, blocks(a.m as usize, TOKENS)), 128, a)
}

/// The kernel (of `[one row a warp, two rows a warp]`) and blocks of a one-token q/k/v
/// launch: each matrix in whole groups of its rows a warp, ROWS warps a block.
fn qkv_one_token(a: &QkvArgs, names: [&'static str; 2]) -> (&'static str, u32) {
    let (name, r) = one_token((a.nq + a.nk + a.nv) as usize, names);
    let groups: u32 = [a.nq, a.nk, a.nv].iter().map(|&n| blocks(n as usize, r)).sum();
    (name, blocks(groups as usize, ROWS))
}

/// The fused q/k/v (or q/kv) projections of `a.m` tokens.
pub fn qkv(dev: &Device, a: &QkvArgs) -> Result<()> {
    if a.m == 1 {
        let (name, grid) = qkv_one_token(a, ["qkv_proj1", "qkv_proj1_r2"]);
        return dev.launch_args(name, (grid, 1, 1), 128, a);
    }
    dev.launch_args("qkv_proj", (blocks((a.nq + a.nk + a.nv) as usize, ROWS), 1, blocks(a.m as usize, TOKENS)), 128, a)
}

/// Widest hidden state `norm_qkv` normalises in shared memory (`NORM_QKV_MAXH` in linear.cu;
/// the plan lowering keeps wider models off it).
pub use crate::plan::lower::NORM_QKV_MAX_HIDDEN;

/// One token's input RMSNorm and q/k/v projections (the grid of [`qkv`]'s one-token kernels;
/// each block normalises the hidden state itself, bit for bit as `rmsnorm` does).
pub fn norm_qkv(dev: &Device, a: &NormQkvArgs) -> Result<()> {
    let (name, grid) = qkv_one_token(&a.p, ["norm_qkv_proj1", "norm_qkv_proj1_r2"]);
    dev.launch_args(name, (grid, 1, 1), 128, a)
}

/// The fused dense gate, up and SwiGLU of `a.m` tokens.
pub fn dense_gate_up_swiglu(dev: &Device, a: &DenseGateUpArgs) -> Result<()> {
    let grid = (blocks(a.f as usize, ROWS), 1, blocks(a.m as usize, TOKENS));
    dev.launch_args("dense_gate_up_swiglu", grid, 128, a)
}
