//! GPT-OSS (`gpt_oss.cu`): YaRN-scaled RoPE, the ring KV append of sliding layers, the
//! top-k-then-softmax router, expert mat-vecs with biases (MXFP4 read in registers, or any
//! other expert format), the clamped SwiGLU. Its attention (sinks, sliding windows, the ring)
//! is the shared split kernel's (`attention.rs`).

use super::{Bf16, F32, I32, In, KernelArgs, Out, QMat, Stacked, blocks, kernel_args};
use crate::cuda::Device;
use crate::error::Result;

/// `QMat::fmt` of MXFP4 weights: codes `[rows, K/2]` bytes as u32 words, E8M0 scales
/// `[rows, K/32]` bytes in `s` (`FMT_MXFP4` in `gpt_oss.cu`).
pub const FMT_MXFP4: i32 = 2;

kernel_args! {
    /// `expert_bias_matvec`: row q of y `[R, n]` = `W[idx[q]] · x[q / per] + bias[idx[q]]`.
    pub struct ExpertBiasMatvecArgs {
        w: Stacked, idx: In<I32>, per: i32, x: In<Bf16>, bias: In<F32>, y: Out<Bf16>, n: i32, k: i32,
    }
    /// `expert_bias_matvec_grouped` (prefill): the rows of each expert (`moe_group`), 8 at a time.
    pub struct ExpertBiasMatvecGroupedArgs {
        w: Stacked, off: In<I32>, rows: In<I32>, per: i32, x: In<Bf16>, bias: In<F32>, y: Out<Bf16>, n: i32, k: i32,
    }
    /// `clamp_swiglu`: `act = (clamp(u, ±limit) + 1) · g·σ(alpha·g)`, `g = min(g, limit)`.
    pub struct ClampSwigluArgs { g: In<Bf16>, u: In<Bf16>, act: Out<Bf16>, n: i64, limit: f32, alpha: f32 }
    /// `router_topk_softmax`: top-k on the logits, softmax over the k.
    pub struct TopkSoftmaxArgs { logits: In<F32>, e: i32, k: i32, idx: Out<I32>, wout: Out<F32> }
    /// `rope_scaled`: half-split RoPE with cos/sin times `scaling` (YaRN's attention factor),
    /// row m at position `pos[m]`.
    pub struct RopeScaledArgs {
        q: Out<Bf16>, k: Out<Bf16>, inv_freq: In<F32>, pos: In<I32>, nh: i32, nkv: i32, d: i32, d_rot: i32,
        scaling: f32,
    }
    /// `kv_append_ring`: row m of k and v (`w` wide) at position `pos[m]` of slot `slot[m]`,
    /// each slot owning `slot_rows` cache rows (its ring of `ring` rows when > 0, position
    /// modulo `ring`).
    pub struct KvAppendRingArgs {
        k: In<Bf16>, v: In<Bf16>, kc: Out<Bf16>, vc: Out<Bf16>, pos: In<I32>, slot: In<I32>, w: i32,
        slot_rows: i32, ring: i32,
    }
    /// `moe_router_topk_softmax` (decode): router logits (+ bias), then top-k-then-softmax.
    pub struct MoeRouterTopkSoftmaxArgs {
        w: QMat, x: In<Bf16>, logits: Out<F32>, bias: In<F32>, e: i32, h: i32, k: i32, tickets: Out<I32>,
        idx: Out<I32>, wout: Out<F32>,
    }
    /// `moe_gate_up_clamp` (decode): gate and up (+ biases) of each slot's expert, clamped SwiGLU.
    pub struct MoeGateUpClampArgs {
        gate: Stacked, up: Stacked, gbias: In<F32>, ubias: In<F32>, idx: In<I32>, k: i32, x: In<Bf16>,
        act: Out<Bf16>, i: i32, h: i32, limit: f32, alpha: f32,
    }
    /// `moe_down_bias_combine_add` (decode): down (+ bias) of each slot, combine, `x +=`.
    pub struct MoeDownBiasCombineAddArgs {
        down: Stacked, bias: In<F32>, idx: In<I32>, wts: In<F32>, k: i32, act: In<Bf16>, x: Out<Bf16>, h: i32,
        i: i32,
    }
}

/// The C declarations of this file's argument structs.
pub fn decls() -> String {
    [
        ExpertBiasMatvecArgs::c_decl(),
        ExpertBiasMatvecGroupedArgs::c_decl(),
        ClampSwigluArgs::c_decl(),
        TopkSoftmaxArgs::c_decl(),
        RopeScaledArgs::c_decl(),
        KvAppendRingArgs::c_decl(),
        MoeRouterTopkSoftmaxArgs::c_decl(),
        MoeGateUpClampArgs::c_decl(),
        MoeDownBiasCombineAddArgs::c_decl(),
    ]
    .concat()
}

/// Selected-expert rows with biases: `rows` = M·K (token, slot) rows, a block column each.
pub fn expert_bias_matvec(dev: &Device, a: &ExpertBiasMatvecArgs, rows: usize) -> Result<()> {
    dev.launch_args("expert_bias_matvec", (blocks(a.n as usize, 4), rows as u32, 1), 128, a)
}

/// Selected-expert rows with biases grouped by expert (prefill), for `experts` experts.
pub fn expert_bias_matvec_grouped(dev: &Device, a: &ExpertBiasMatvecGroupedArgs, experts: usize) -> Result<()> {
    dev.launch_args("expert_bias_matvec_grouped", (blocks(a.n as usize, 4), experts as u32, 1), 128, a)
}

/// The clamped SwiGLU over `a.n` elements.
pub fn clamp_swiglu(dev: &Device, a: &ClampSwigluArgs) -> Result<()> {
    dev.launch_args("clamp_swiglu", (blocks(a.n as usize, 256).min(4096), 1, 1), 256, a)
}

/// The GPT-OSS router of `m` tokens (a warp each).
pub fn router_topk_softmax(dev: &Device, a: &TopkSoftmaxArgs, m: usize) -> Result<()> {
    dev.launch_args("router_topk_softmax", (m as u32, 1, 1), 32, a)
}

/// YaRN-scaled RoPE of `m` tokens' q and k heads: a block per (token, head).
pub fn rope_scaled(dev: &Device, a: &RopeScaledArgs, m: usize) -> Result<()> {
    dev.launch_args("rope_scaled", ((m * (a.nh + a.nkv) as usize) as u32, 1, 1), 64, a)
}

/// Appends `m` rows to a (ring) KV cache.
pub fn kv_append_ring(dev: &Device, a: &KvAppendRingArgs, m: usize) -> Result<()> {
    dev.launch_args("kv_append_ring", (m as u32, 1, 1), 256, a)
}

/// The fused GPT-OSS router of `m` tokens.
pub fn moe_router_topk_softmax(dev: &Device, a: &MoeRouterTopkSoftmaxArgs, m: usize) -> Result<()> {
    dev.launch_args(
        "moe_router_topk_softmax",
        (super::moe::ROUTER_BLOCKS, 1, m as u32),
        super::moe::ROUTER_SIGMOID_THREADS,
        a,
    )
}

/// The fused gate, up and clamped SwiGLU of `slots` (token, slot) rows.
pub fn moe_gate_up_clamp(dev: &Device, a: &MoeGateUpClampArgs, slots: usize) -> Result<()> {
    dev.launch_args("moe_gate_up_clamp", (blocks(a.i as usize, 4), slots as u32, 1), 128, a)
}

/// The fused down (+ bias), combine and residual add of `m` tokens: a warp per slot.
pub fn moe_down_bias_combine_add(dev: &Device, a: &MoeDownBiasCombineAddArgs, m: usize) -> Result<()> {
    dev.launch_args("moe_down_bias_combine_add", (a.h as u32, 1, m as u32), 32 * a.k as u32, a)
}
