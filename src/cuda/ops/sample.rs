//! The end of a forward pass (`sample.cu`): keeping the last token's row, and sampling the
//! next token on the device like the host `Sampler` (one block of 1024 threads).

use super::{Bf16, F32, I32, In, KernelArgs, Out, kernel_args};
use crate::cuda::Device;
use crate::error::Result;

kernel_args! {
    /// `take_row`: `y[0:n] = x[row, 0:n]`.
    pub struct TakeRowArgs { x: In<Bf16>, y: Out<Bf16>, row: i32, n: i32 }
    /// `sample_token`: `out = [token, needs_host]` from `logits[v]`.
    pub struct SampleArgs {
        logits: In<F32>, v: i32, temp: f32, top_p: f32, top_k: i32, seed: u64, step: u64, out: Out<I32>,
    }
}

/// The C declarations of this file's argument structs.
pub fn decls() -> String {
    [TakeRowArgs::c_decl(), SampleArgs::c_decl()].concat()
}

/// Copies one row.
pub fn take_row(dev: &Device, a: &TakeRowArgs) -> Result<()> {
    dev.launch_args("take_row", (1, 1, 1), 256, a)
}

/// Samples one token.
pub fn sample(dev: &Device, a: &SampleArgs) -> Result<()> {
    dev.launch_args("sample_token", (1, 1, 1), 1024, a)
}
