//! GQA positions and the KV cache (`rope.cu`): half-split RoPE, the KV append, and the
//! fused `qk_norm_rope_kv` (`qk_norm_rope`).

use super::{Bf16, F32, I32, In, KernelArgs, Out, kernel_args};
use crate::cuda::Device;
use crate::error::Result;

kernel_args! {
    /// `rope`: q `[M, nh, d]` and k `[M, nkv, d]` in place, the first `d_rot` dims, row m at
    /// position `pos[m]` (`[M]`).
    pub struct RopeArgs {
        q: Out<Bf16>, k: Out<Bf16>, inv_freq: In<F32>, pos: In<I32>, nh: i32, nkv: i32, d: i32, d_rot: i32,
    }
    /// `kv_append`: rows of k and v (`w` wide) to the caches, row m at cache row
    /// `base[m] + pos[m]` (`[M]` each: its sequence slot's first row, its position).
    pub struct KvAppendArgs {
        k: In<Bf16>, v: In<Bf16>, kc: Out<Bf16>, vc: Out<Bf16>, pos: In<I32>, base: In<I32>, w: i32,
    }
    /// `qk_norm_rope_kv`: head norms, RoPE and the KV append in one launch.
    pub struct QkNormRopeKvArgs {
        q: Out<Bf16>, k: Out<Bf16>, v: In<Bf16>, qw: In<F32>, kw: In<F32>, inv_freq: In<F32>, pos: In<I32>,
        base: In<I32>, kc: Out<Bf16>, vc: Out<Bf16>, nh: i32, nkv: i32, d: i32, d_rot: i32, eps: f32,
    }
}

/// The C declarations of this file's argument structs.
pub fn decls() -> String {
    [RopeArgs::c_decl(), KvAppendArgs::c_decl(), QkNormRopeKvArgs::c_decl()].concat()
}

/// RoPE of `m` tokens' q and k heads: a block per (token, head).
pub fn rope(dev: &Device, a: &RopeArgs, m: usize) -> Result<()> {
    dev.launch_args("rope", ((m * (a.nh + a.nkv) as usize) as u32, 1, 1), 64, a)
}

/// Appends `m` rows to the K and V caches.
pub fn kv_append(dev: &Device, a: &KvAppendArgs, m: usize) -> Result<()> {
    dev.launch_args("kv_append", (m as u32, 1, 1), 256, a)
}

/// The fused head norms, RoPE and KV append of `m` tokens: a block per (token, q/k/v head).
pub fn qk_norm_rope_kv(dev: &Device, a: &QkNormRopeKvArgs, m: usize) -> Result<()> {
    let heads = (a.nh + 2 * a.nkv) as usize;
    dev.launch_args("qk_norm_rope_kv", ((m * heads) as u32, 1, 1), super::norm::HEAD_NORM_THREADS, a)
}
