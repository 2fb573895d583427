//! Mixture of experts (`moe.cu`): the routers, the selected-expert mat-vecs (decode: a
//! block column per slot; prefill: grouped by expert so each expert's rows are read once per
//! 8 routed rows), SwiGLU, the weighted combine, and the fused `moe_mlp` kernels.

use super::{Bf16, F32, I32, In, KernelArgs, Out, QMat, Stacked, blocks, kernel_args};
use crate::cuda::Device;
use crate::error::Result;

kernel_args! {
    /// `expert_matvec` (decode): row q of y `[R, n]` = `W[idx[q]] · x[q / per]`.
    pub struct ExpertMatvecArgs { w: Stacked, idx: In<I32>, per: i32, x: In<Bf16>, y: Out<Bf16>, n: i32, k: i32 }
    /// `moe_group`: the `r` (token, slot) rows grouped by expert: offsets `[e + 1]`, rows,
    /// and (`tiles` non-null) the tensor-core tile table of [`super::gemm::ExpertGemmArgs`].
    pub struct MoeGroupArgs { idx: In<I32>, r: i32, e: i32, off: Out<I32>, rows: Out<I32>, tiles: Out<I32> }
    /// `expert_matvec_grouped` (prefill): the rows of each expert, 8 at a time.
    pub struct ExpertMatvecGroupedArgs {
        w: Stacked, off: In<I32>, rows: In<I32>, per: i32, x: In<Bf16>, y: Out<Bf16>, n: i32, k: i32,
    }
    /// `router_sigmoid`: grouped sigmoid top-k with a selection bias.
    pub struct RouterSigmoidArgs {
        logits: In<F32>, bias: In<F32>, e: i32, k: i32, n_group: i32, topk_group: i32, norm: i32, scale: f32,
        idx: Out<I32>, wout: Out<F32>,
    }
    /// `router_sigmoid_bias`: LFM2's bf16-rounded sigmoid top-k with an f32 expert bias
    /// (`bias` 0: none).
    pub struct RouterSigmoidBiasArgs {
        logits: In<F32>, bias: In<F32>, e: i32, k: i32, norm: i32, scale: f32, idx: Out<I32>, wout: Out<F32>,
    }
    /// `router_topk`: softmax top-k (optionally renormalised).
    pub struct RouterTopkArgs { logits: In<F32>, e: i32, k: i32, norm: i32, idx: Out<I32>, wout: Out<F32> }
    /// `swiglu`: `act = bf16(bf16(silu(g)) · u)` over `n` elements.
    pub struct SwigluArgs { g: In<Bf16>, u: In<Bf16>, act: Out<Bf16>, n: i64 }
    /// `combine`: `out[m] = bf16(Σ_j w[m, j] · y[m·k + j])`.
    pub struct CombineArgs { y: In<Bf16>, w: In<F32>, out: Out<Bf16>, k: i32, h: i32 }
    /// `moe_router` (decode): router logits, then softmax top-k ([`ROUTER_BLOCKS`]).
    pub struct MoeRouterArgs {
        w: QMat, x: In<Bf16>, logits: Out<F32>, bias: In<F32>, e: i32, h: i32, k: i32, norm: i32,
        tickets: Out<I32>, idx: Out<I32>, wout: Out<F32>,
    }
    /// `moe_router_sigmoid` (decode): router logits, then the grouped sigmoid top-k.
    pub struct MoeRouterSigmoidArgs {
        w: QMat, x: In<Bf16>, logits: Out<F32>, ebias: In<F32>, e: i32, h: i32, k: i32, n_group: i32,
        topk_group: i32, norm: i32, scale: f32, tickets: Out<I32>, idx: Out<I32>, wout: Out<F32>,
    }
    /// `moe_router_sigmoid_bias` (decode): router logits, then LFM2's sigmoid top-k.
    pub struct MoeRouterSigmoidBiasArgs {
        w: QMat, x: In<Bf16>, logits: Out<F32>, ebias: In<F32>, e: i32, h: i32, k: i32, norm: i32, scale: f32,
        tickets: Out<I32>, idx: Out<I32>, wout: Out<F32>,
    }
    /// `moe_gate_up_swiglu` (decode): gate, up and SwiGLU of each slot's expert.
    pub struct MoeGateUpArgs {
        gate: QMat, up: QMat, w_stride: i64, sb_stride: i64, idx: In<I32>, k: i32, x: In<Bf16>, act: Out<Bf16>,
        i: i32, h: i32,
    }
    /// `moe_shared_gate_up_swiglu` (decode): `routed`'s slots of `m` tokens, then the shared
    /// experts' gate, up and SwiGLU (`sgate`, `sup` `[si, h]` → `sact` `[m, si]`).
    pub struct MoeSharedGateUpArgs {
        routed: MoeGateUpArgs, m: i32, sgate: QMat, sup: QMat, sact: Out<Bf16>, si: i32,
    }
    /// `moe_down_combine_add` (decode): down of each slot, combine, `+ shared`, `x +=`.
    pub struct MoeDownCombineAddArgs {
        down: Stacked, idx: In<I32>, wts: In<F32>, k: i32, act: In<Bf16>, x: Out<Bf16>, h: i32, i: i32,
        shared: In<Bf16>,
    }
    /// `moe_shared_down_combine_add` (decode): `routed` with the shared experts' down
    /// computed in the kernel (`sdown` `[h, si]` · `sact` `[m, si]`) as the `+ shared`.
    pub struct MoeSharedDownCombineAddArgs {
        routed: MoeDownCombineAddArgs, sdown: QMat, sact: In<Bf16>, si: i32,
    }
}

/// The C declarations of this file's argument structs.
pub fn decls() -> String {
    [
        ExpertMatvecArgs::c_decl(),
        MoeGroupArgs::c_decl(),
        ExpertMatvecGroupedArgs::c_decl(),
        RouterSigmoidArgs::c_decl(),
        RouterSigmoidBiasArgs::c_decl(),
        RouterTopkArgs::c_decl(),
        SwigluArgs::c_decl(),
        CombineArgs::c_decl(),
        MoeRouterArgs::c_decl(),
        MoeRouterSigmoidArgs::c_decl(),
        MoeRouterSigmoidBiasArgs::c_decl(),
        MoeGateUpArgs::c_decl(),
        MoeSharedGateUpArgs::c_decl(),
        MoeDownCombineAddArgs::c_decl(),
        MoeSharedDownCombineAddArgs::c_decl(),
    ]
    .concat()
}

/// Selected-expert rows of one token's slots (`rows` = M·K rows, block column each).
pub fn expert_matvec(dev: &Device, a: &ExpertMatvecArgs, rows: usize) -> Result<()> {
    dev.launch_args("expert_matvec", (blocks(a.n as usize, 4), rows as u32, 1), 128, a)
}

/// Groups the routed rows by expert (one block; a thread per expert, E ≤ 1024).
pub fn moe_group(dev: &Device, a: &MoeGroupArgs) -> Result<()> {
    dev.launch_args("moe_group", (1, 1, 1), (a.e as usize).next_multiple_of(32) as u32, a)
}

/// Selected-expert rows grouped by expert, for `experts` experts.
pub fn expert_matvec_grouped(dev: &Device, a: &ExpertMatvecGroupedArgs, experts: usize) -> Result<()> {
    dev.launch_args("expert_matvec_grouped", (blocks(a.n as usize, 4), experts as u32, 1), 128, a)
}

/// The sigmoid router of `m` tokens (a warp each).
pub fn router_sigmoid(dev: &Device, a: &RouterSigmoidArgs, m: usize) -> Result<()> {
    dev.launch_args("router_sigmoid", (m as u32, 1, 1), 32, a)
}

/// LFM2's router of `m` tokens (a warp each).
pub fn router_sigmoid_bias(dev: &Device, a: &RouterSigmoidBiasArgs, m: usize) -> Result<()> {
    dev.launch_args("router_sigmoid_bias", (m as u32, 1, 1), 32, a)
}

/// The softmax router of `m` tokens (a warp each).
pub fn router_topk(dev: &Device, a: &RouterTopkArgs, m: usize) -> Result<()> {
    dev.launch_args("router_topk", (m as u32, 1, 1), 32, a)
}

/// SwiGLU over `a.n` elements.
pub fn swiglu(dev: &Device, a: &SwigluArgs) -> Result<()> {
    dev.launch_args("swiglu", (blocks(a.n as usize, 256).min(4096), 1, 1), 256, a)
}

/// The weighted combine of `m` tokens.
pub fn combine(dev: &Device, a: &CombineArgs, m: usize) -> Result<()> {
    dev.launch_args("combine", (m as u32, blocks(a.h as usize, 256), 1), 256, a)
}

/// Blocks of a fused router a token: on sm_90 one thread-block cluster (8, the portable
/// maximum), whose blocks meet at the cluster barrier; before sm_90 at a ticket. Each warp
/// computes logit rows, then block 0 picks the experts (`moe.cu`, `block_select_topk`).
pub const ROUTER_BLOCKS: u32 = 8;
/// Threads of a softmax router block: 8 × 16 warps hold Qwen3's 128 logit rows in one pass
/// (≤ 128 registers a thread).
pub const ROUTER_THREADS: u32 = 512;
/// Threads of the other routers' blocks (the sigmoid routers, GPT-OSS's top-k-then-softmax):
/// 8 × 8 warps hold their E ≤ 64 logit rows (GLM, LFM2, GPT-OSS) in one pass.
pub const ROUTER_SIGMOID_THREADS: u32 = 256;

/// The fused softmax router of `m` tokens.
pub fn moe_router(dev: &Device, a: &MoeRouterArgs, m: usize) -> Result<()> {
    dev.launch_args("moe_router", (ROUTER_BLOCKS, 1, m as u32), ROUTER_THREADS, a)
}

/// The fused sigmoid router of `m` tokens.
pub fn moe_router_sigmoid(dev: &Device, a: &MoeRouterSigmoidArgs, m: usize) -> Result<()> {
    dev.launch_args("moe_router_sigmoid", (ROUTER_BLOCKS, 1, m as u32), ROUTER_SIGMOID_THREADS, a)
}

/// The fused LFM2 router of `m` tokens.
pub fn moe_router_sigmoid_bias(dev: &Device, a: &MoeRouterSigmoidBiasArgs, m: usize) -> Result<()> {
    dev.launch_args("moe_router_sigmoid_bias", (ROUTER_BLOCKS, 1, m as u32), ROUTER_SIGMOID_THREADS, a)
}

/// The fused gate, up and SwiGLU of `slots` (token, slot) rows.
pub fn moe_gate_up_swiglu(dev: &Device, a: &MoeGateUpArgs, slots: usize) -> Result<()> {
    dev.launch_args("moe_gate_up_swiglu", (blocks(a.i as usize, 4), slots as u32, 1), 128, a)
}

/// [`moe_gate_up_swiglu`] of `a.m` tokens with their shared experts: a block column per
/// (token, slot), then one per token's shared experts. Its own kernel instance and
/// arguments, so models without shared experts launch exactly the routed-only kernel
/// (one kernel for both measured 1.2–1.8 % slower Qwen3 decode on the H100).
pub fn moe_shared_gate_up_swiglu(dev: &Device, a: &MoeSharedGateUpArgs) -> Result<()> {
    let grid = (blocks(a.routed.i.max(a.si) as usize, 4), (a.m * (a.routed.k + 1)) as u32, 1);
    dev.launch_args("moe_shared_gate_up_swiglu", grid, 128, a)
}

/// Output rows of a `moe_down_combine_add` block (each slot's warp computes them all, their
/// loads in flight together). 2, 4 and 8 measured alike on the H200 (bench/RESULTS.md,
/// 2026-12-07 session 10); 2 keeps the registers lowest (66 against 96 and 128).
pub const MOE_DOWN_ROWS: usize = 2;

/// The fused down, combine and residual add of `m` tokens: a warp per slot,
/// [`MOE_DOWN_ROWS`] rows a block.
pub fn moe_down_combine_add(dev: &Device, a: &MoeDownCombineAddArgs, m: usize) -> Result<()> {
    let grid = (blocks(a.h as usize, MOE_DOWN_ROWS), 1, m as u32);
    dev.launch_args("moe_down_combine_add", grid, 32 * a.k as u32, a)
}

/// [`moe_down_combine_add`] with the shared experts' down in one more warp a block.
pub fn moe_shared_down_combine_add(dev: &Device, a: &MoeSharedDownCombineAddArgs, m: usize) -> Result<()> {
    let grid = (blocks(a.routed.h as usize, MOE_DOWN_ROWS), 1, m as u32);
    dev.launch_args("moe_shared_down_combine_add", grid, 32 * (a.routed.k + 1) as u32, a)
}
