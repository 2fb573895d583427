//! L2 prefetch (`prefetch.cu`): one small kernel that brings spans of weights into L2 ahead
//! of the step that reads them (the schedule and the table are `cuda::prefetch`).

use super::{I32, In, KernelArgs, U64, kernel_args};
use crate::cuda::Device;
use crate::error::Result;

/// Bytes a thread's bulk prefetch covers at most.
pub const PF_PIECE: u64 = 16 << 10;
/// Threads of a prefetch block.
const PF_THREADS: u32 = 64;

kernel_args! {
    /// `l2_prefetch`: entries `first .. first+n` of `table` (`[N, 4]`: p, bytes, stride, 0);
    /// strided entries repeat for each of the `nidx` experts in `idx` (`[nidx]`, those in
    /// `0..nexp`).
    pub struct PrefetchArgs { table: In<U64>, first: i32, n: i32, idx: In<I32>, nidx: i32, nexp: i32 }
}

/// The C declarations of this file's argument structs.
pub fn decls() -> String {
    PrefetchArgs::c_decl()
}

/// Launches the prefetch over `blocks` blocks on the device's side stream, after the work
/// queued so far on the main stream (see [`Device::launch_side`]).
pub fn l2_prefetch(dev: &Device, a: &PrefetchArgs, blocks: u32) -> Result<()> {
    dev.launch_side("l2_prefetch", blocks, PF_THREADS, a)
}
