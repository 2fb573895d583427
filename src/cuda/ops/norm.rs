//! Norms and the residual stream (`norm.cu`): `rmsnorm` (one block per row), the residual
//! add, and the fused `add_rmsnorm` and `o_proj_add_rmsnorm` (`residual_norm`).

use super::{Bf16, F32, I32, In, KernelArgs, Out, QMat, blocks, kernel_args};
use crate::cuda::Device;
use crate::error::Result;

kernel_args! {
    /// `rmsnorm`: rows `ld` elements apart, the first `n` of each normalised (in place allowed).
    pub struct RmsnormArgs { x: In<Bf16>, w: In<F32>, y: Out<Bf16>, n: i32, ld: i32, eps: f32 }
    /// `add_inplace`: `x = bf16(x + y)` over `n` elements.
    pub struct AddArgs { x: Out<Bf16>, y: In<Bf16>, n: i64 }
    /// `add_rmsnorm`: `x += src`, then `y = rmsnorm(x) ⊙ w`, rows of `n`.
    pub struct AddRmsnormArgs { x: Out<Bf16>, src: In<Bf16>, w: In<F32>, y: Out<Bf16>, n: i32, eps: f32 }
    /// `o_proj_add_rmsnorm` (one token): `x += o·attn (+ bias)`, `h = rmsnorm(x) ⊙ nw`.
    pub struct OProjAddRmsnormArgs {
        o: QMat, attn: In<Bf16>, bias: In<F32>, x: Out<Bf16>, nw: In<F32>, h: Out<Bf16>,
        hidden: i32, k: i32, eps: f32, ticket: Out<I32>,
    }
}

/// The C declarations of this file's argument structs.
pub fn decls() -> String {
    [RmsnormArgs::c_decl(), AddArgs::c_decl(), AddRmsnormArgs::c_decl(), OProjAddRmsnormArgs::c_decl()].concat()
}

/// Threads of a row norm (the fused norms use the same, so they reduce identically).
pub const NORM_THREADS: u32 = 256;
/// Threads of a per-head norm (head dims are small).
pub const HEAD_NORM_THREADS: u32 = 128;

/// `rows` row norms with `threads` per row.
pub fn rmsnorm(dev: &Device, a: &RmsnormArgs, rows: usize, threads: u32) -> Result<()> {
    dev.launch_args("rmsnorm", (rows as u32, 1, 1), threads, a)
}

/// The residual add over `a.n` elements.
pub fn add(dev: &Device, a: &AddArgs) -> Result<()> {
    dev.launch_args("add_inplace", (blocks(a.n as usize, 256), 1, 1), 256, a)
}

/// `rows` fused residual adds and norms.
pub fn add_rmsnorm(dev: &Device, a: &AddRmsnormArgs, rows: usize) -> Result<()> {
    dev.launch_args("add_rmsnorm", (rows as u32, 1, 1), NORM_THREADS, a)
}

/// The fused o projection, residual add and post-attention norm of one token.
pub fn o_proj_add_rmsnorm(dev: &Device, a: &OProjAddRmsnormArgs) -> Result<()> {
    dev.launch_args("o_proj_add_rmsnorm", (blocks(a.hidden as usize, 8), 1, 1), NORM_THREADS, a)
}
