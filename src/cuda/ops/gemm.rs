//! Tensor-core products for prefill (`gemm.cu`): the dense `gemm_tc` (a mat-vec's arguments),
//! the expert-grouped `expert_gemm_tc` (the tiles `moe_group` lists) and MLA's per-head
//! `head_gemm_tc` (`head_matvec`'s arguments). Tiles of
//! [`TC_BM`] tokens × 128 output rows, `mma.sync` m16n8k16 bf16 with f32 accumulation.
//!
//! Why only for long prompts ([`crate::backend::long_prompt`]: more than `BATCH_ROWS`
//! tokens): a tensor-core sum runs in another order than the row-per-token mat-vec, so its
//! outputs differ from decode's by f32 rounding (and by each affine weight's fp16 rounding,
//! about as small). Short forwards and batches of decode rows
//! (batched decode, exact speculative verification) stay on the mat-vecs and stay
//! bit-identical to single-token decode. Each output row is computed alone (its sums do not
//! depend on the other rows of its tile), so a long prompt gives the same numbers in any
//! chunking and any batch. The reference
//! and the patched plans run the same prefill kernels, so `zmoe validate` stays exact.

use super::linear::{MatvecArgs, QkvArgs};
use super::mla::HeadMatvecArgs;
use super::{Bf16, F32, I32, In, KernelArgs, Out, QMat, Stacked, blocks, kernel_args};
use crate::cuda::Device;
use crate::error::Result;

/// Token rows per tensor-core tile (also the granule of `moe_group`'s tile table).
pub const TC_BM: usize = 32;
/// Output rows per tensor-core tile.
const TC_BN: usize = 128;
/// k per shared-memory stage: K (and an affine group) must be a multiple of it.
const TC_BK: usize = 32;
kernel_args! {
    /// `expert_gemm_tc`: tile t = (expert `tiles[1 + 2t]`, routed rows from `tiles[2 + 2t]`,
    /// `tiles[0]` tiles in all) of the grouping in `off`/`rows`; row q of y `[R, n]` =
    /// `W[e] · x[q / per]` (+ `bias[e, :]`, `[E, n]` f32, unless null).
    pub struct ExpertGemmArgs {
        w: Stacked, tiles: In<I32>, off: In<I32>, rows: In<I32>, per: i32, x: In<Bf16>, bias: In<F32>, y: Out<Bf16>,
        n: i32, k: i32,
    }
}

/// The C declarations of this file's argument structs.
pub fn decls() -> String {
    ExpertGemmArgs::c_decl()
}

/// Whether the tensor-core kernels take a matrix of this format and width: bf16, MLX affine
/// (groups a multiple of [`TC_BK`]) or MXFP4 (a block of 32 is one k stage), K a multiple of
/// [`TC_BK`].
pub fn supports(w: &QMat, k: usize) -> bool {
    let fmt_ok = match w.fmt {
        0 => true,
        1 => (w.bits == 4 || w.bits == 8) && w.group > 0 && (w.group as usize).is_multiple_of(TC_BK),
        super::gpt_oss::FMT_MXFP4 => TC_BK == 32,
        _ => false,
    };
    fmt_ok && k.is_multiple_of(TC_BK)
}

/// Whether a dense product of `n` output rows pays on tensor cores: one column of tiles
/// (`n` ≤ 128: the routers) keeps a 512-token chunk to 16 blocks on a GPU of 132 SMs, each
/// streaming all of K (qwen3's router: 49 µs a layer, bench/RESULTS.md session 15), where the
/// row kernels (a warp a row, 8 tokens a block) fill the GPU with the decode arithmetic.
pub fn wide_enough(n: usize) -> bool {
    n > TC_BN
}

/// Most tiles of `moe_group`'s table for `r` routed rows over `e` experts.
pub fn max_tiles(r: usize, e: usize) -> usize {
    r.div_ceil(TC_BM) + e
}

/// The kernel for `w`, one of a kernel's twins `[codes, f16]`: `f16` (weights dequantised
/// as staged) unless [`Device::tc_codes`] asks for `codes` and `w` is quantized (a bf16
/// matrix runs the same arithmetic in both, the `f16` twin in 80 registers instead of 127).
fn variant(dev: &Device, w: &QMat, [codes, f16]: [&'static str; 2]) -> &'static str {
    if dev.tc_codes() && w.fmt != 0 { codes } else { f16 }
}

/// `y[M, n] = x[M, k] Wᵀ (+ bias)` on tensor cores (the mat-vec's arguments).
pub fn gemm(dev: &Device, a: &MatvecArgs) -> Result<()> {
    let grid = (blocks(a.n as usize, TC_BN), blocks(a.m as usize, TC_BM), 1);
    dev.launch_args(variant(dev, &a.w, ["gemm_tc", "gemm_tc_f16"]), grid, 128, a)
}

/// qkv_proj's two or three products of `a.m` tokens on tensor cores in one launch (the
/// tiles of three [`gemm`] launches, the same bits; `a.nv` = 0 for MLA's two). Every matrix
/// must pass [`supports`].
pub fn gemm_qkv(dev: &Device, a: &QkvArgs) -> Result<()> {
    let tiles = blocks(a.nq as usize, TC_BN) + blocks(a.nk as usize, TC_BN) + blocks(a.nv as usize, TC_BN);
    let grid = (tiles, blocks(a.m as usize, TC_BM), 1);
    // A bf16 matrix runs the same arithmetic in every twin: the quantized ones pick it.
    let w = [&a.wq, &a.wk, &a.wv].into_iter().find(|w| w.fmt != 0).unwrap_or(&a.wq);
    dev.launch_args(variant(dev, w, ["gemm_tc_qkv", "gemm_tc_qkv_f16"]), grid, 128, a)
}

/// MLA's per-head products of `a.m` tokens on tensor cores (x rows `a.x_ld` apart must start
/// 16-byte aligned: `x_ld` a multiple of 8).
pub fn head_gemm(dev: &Device, a: &HeadMatvecArgs) -> Result<()> {
    let grid = (blocks(a.n as usize, TC_BN), blocks(a.m as usize, TC_BM), a.nh as u32);
    dev.launch_args(variant(dev, &a.w.w, ["head_gemm_tc", "head_gemm_tc_f16"]), grid, 128, a)
}

/// Selected-expert rows grouped by expert on tensor cores, for `r` routed rows over `e`
/// experts (blocks past the table's tile count return at once).
pub fn expert_gemm(dev: &Device, a: &ExpertGemmArgs, r: usize, e: usize) -> Result<()> {
    let grid = (blocks(a.n as usize, TC_BN), max_tiles(r, e) as u32, 1);
    dev.launch_args(variant(dev, &a.w.w, ["expert_gemm_tc", "expert_gemm_tc_f16"]), grid, 128, a)
}
