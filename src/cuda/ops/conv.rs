//! LFM2's gated short convolution (`conv.cu`): the mixer of a conv layer. Its in_proj and
//! out_proj are ordinary linear launches; this kernel gates, convolves over the layer's conv
//! state (kept on the device, a `LayerCache::Conv`) and gates again.

use super::{Bf16, F32, I32, In, KernelArgs, Out, blocks, kernel_args};
use crate::cuda::Device;
use crate::error::Result;

/// Largest kernel width (`conv_L_cache`) the kernel holds in registers (every release: 3).
pub const CONV_MAX_KERNEL: usize = 8;

kernel_args! {
    /// `short_conv`: `bcx [m, 3h]` → `out [m, h]`, kernel `w [h, l]` (f32), optional bias
    /// `[h]`, state `[l − 1, h]` bf16 read (zeros at `*pos == 0`) and moved on.
    pub struct ShortConvArgs {
        bcx: In<Bf16>, w: In<F32>, bias: In<F32>, state: Out<Bf16>, pos: In<I32>, out: Out<Bf16>, h: i32, l: i32,
        m: i32,
    }
}

/// The C declarations of this file's argument structs.
pub fn decls() -> String {
    ShortConvArgs::c_decl()
}

/// The short convolution of `a.m` tokens: a thread per channel.
pub fn short_conv(dev: &Device, a: &ShortConvArgs) -> Result<()> {
    dev.launch_args("short_conv", (blocks(a.h as usize, 128), 1, 1), 128, a)
}
