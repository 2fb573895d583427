//! LFM2's gated short convolution (`conv.cu`): the mixer of a conv layer. Its in_proj and
//! out_proj are ordinary linear launches; `short_conv` gates, convolves over the layer's conv
//! state (kept on the device, a `LayerCache::Conv`) and gates again; `conv_mixer` (the
//! `conv_mixer` pattern, one token) does in_proj and all that in one launch.

use super::{Bf16, F32, I32, In, KernelArgs, Out, QMat, blocks, kernel_args};
use crate::cuda::Device;
use crate::error::Result;

/// Largest kernel width (`conv_L_cache`) the kernel holds in registers (every release: 3).
pub const CONV_MAX_KERNEL: usize = 8;

kernel_args! {
    /// `short_conv`: `bcx [m, 3h]` → `out [m, h]`, kernel `w [h, l]` (f32), optional bias
    /// `[h]`; row r moves on slot `slot[r]`'s state (`state [slots, l − 1, h]` bf16, read as
    /// zeros at `pos[r] == 0`).
    pub struct ShortConvArgs {
        bcx: In<Bf16>, w: In<F32>, bias: In<F32>, state: Out<Bf16>, pos: In<I32>, slot: In<I32>, out: Out<Bf16>,
        h: i32, l: i32, m: i32,
    }
    /// `conv_mixer` (decode): in_proj `[3h, h]` (+ `in_bias`) of one token `x [h]`, then
    /// `short_conv` of it (position `pos[0]`, slot `slot[0]`) into `out [h]`.
    pub struct ConvMixerArgs {
        in_proj: QMat, in_bias: In<F32>, x: In<Bf16>, w: In<F32>, bias: In<F32>, state: Out<Bf16>, pos: In<I32>,
        slot: In<I32>, out: Out<Bf16>, h: i32, l: i32,
    }
}

/// The C declarations of this file's argument structs.
pub fn decls() -> String {
    [ShortConvArgs::c_decl(), ConvMixerArgs::c_decl()].concat()
}

/// The short convolution of `a.m` tokens: a thread per channel.
pub fn short_conv(dev: &Device, a: &ShortConvArgs) -> Result<()> {
    dev.launch_args("short_conv", (blocks(a.h as usize, 128), 1, 1), 128, a)
}

/// The fused in_proj + short convolution of one token: a warp per channel.
pub fn conv_mixer(dev: &Device, a: &ConvMixerArgs) -> Result<()> {
    dev.launch_args("conv_mixer", (blocks(a.h as usize, 4), 1, 1), 128, a)
}
