//! Causal GQA attention over the KV cache (`attention.cu`), split over the keys: a block per
//! (token, KV head, chunk of [`ATTN_HEADS_PER_BLOCK`] of its query heads) and key split, so
//! the heads sharing a KV head read its rows once; the last split block to finish merges
//! (`merge_splits_warp`, shared with MLA attention). Sliding windows, ring caches and sink
//! logits (GPT-OSS) are arguments of the same kernel. Prompt chunks on tensor cores take
//! `attention_tc` (flash-attention style, one sequence's consecutive rows).

use super::{ATTN_THREADS, Bf16, F32, I32, In, KernelArgs, Out, kernel_args};
use crate::cuda::Device;
use crate::error::{Error, Result};

/// Key splits per (token, head) (at most 32: a lane each in the merge). Measured on the H100
/// (bench/RESULTS.md, session 9): at decode depth ~600, 32 splits of a head group beat 16 —
/// the kernel is bound by each block's serial chain (tile, scores, softmax, values), not by
/// bytes, so shorter splits and more blocks win.
pub const ATTN_SPLITS: usize = 32;
/// Query heads of one KV head a block serves (`ATTN_HB` in `attention.cu`: one per warp).
/// Two per warp halved the blocks and lost (qwen3 decode 243.7 vs 261.0 tok/s at 32 splits).
pub const ATTN_HEADS_PER_BLOCK: usize = ATTN_THREADS as usize / 32;
const _: () = assert!(ATTN_HEADS_PER_BLOCK.is_multiple_of(ATTN_THREADS as usize / 32));
const _: () = assert!(ATTN_SPLITS <= 32);

kernel_args! {
    /// `attention`: q `[M, nh, d]` over the caches `[S, nkv, d]` → out `[M, nh·d]`; row m
    /// over the rows `base[m]..=base[m] + pos[m]` of its sequence (`[M]` each) — the last
    /// `window` of them when `window` > 0; with `ring` > 0 key j of row m is cache row
    /// `slot[m]·ring + j mod ring` instead (a sliding layer's ring). `sinks` (`[nh]` f32, or
    /// null) puts each head's sink logit in the softmax denominator (GPT-OSS).
    pub struct AttentionArgs {
        q: In<Bf16>, kc: In<Bf16>, vc: In<Bf16>, pos: In<I32>, base: In<I32>, slot: In<I32>, sinks: In<F32>,
        part_o: Out<F32>, part_ml: Out<F32>, tickets: Out<I32>, out: Out<Bf16>,
        nh: i32, nkv: i32, d: i32, scale: f32, nsplit: i32, window: i32, ring: i32,
    }
    /// `attention_tc`: a prompt chunk's `m` rows — one sequence's consecutive positions from
    /// `pos[0]`, cache rows from `base[0]` — over its cache, on tensor cores; `window`,
    /// `ring` (with `slot[0]`) and `sinks` as in [`AttentionArgs`].
    pub struct FlashArgs {
        q: In<Bf16>, kc: In<Bf16>, vc: In<Bf16>, pos: In<I32>, base: In<I32>, slot: In<I32>, sinks: In<F32>,
        out: Out<Bf16>, nh: i32, nkv: i32, d: i32, scale: f32, m: i32, window: i32, ring: i32,
    }
}

/// The C declarations of this file's argument structs.
pub fn decls() -> String {
    [AttentionArgs::c_decl(), FlashArgs::c_decl()].concat()
}

/// Whether `attention_tc` takes heads of dimension `d`.
pub fn tc_supports(d: usize) -> bool {
    d == 64 || d == 128
}

/// Attention of a prompt chunk on tensor cores: 64 queries a block (see [`FlashArgs`]). A
/// ring must hold the chunk's keys: `window + m − 1 ≤ ring`.
pub fn attention_tc(dev: &Device, a: &FlashArgs) -> Result<()> {
    if a.ring > 0 && !(a.window > 0 && a.window + a.m - 1 <= a.ring) {
        return Err(Error::Cuda(format!(
            "attention_tc over a ring of {} rows needs window + chunk − 1 ≤ ring (window {}, chunk {})",
            a.ring, a.window, a.m
        )));
    }
    dev.launch_args("attention_tc", ((a.m as u32).div_ceil(64), a.nh as u32, 1), 128, a)
}

/// Attention of `m` tokens (`a.nsplit` must be [`ATTN_SPLITS`]; the partials are sized for it).
/// A ring cache needs a window no longer than the ring (a split then wraps at most once).
pub fn attention(dev: &Device, a: &AttentionArgs, m: usize) -> Result<()> {
    if a.ring > 0 && !(1..=a.ring).contains(&a.window) {
        return Err(Error::Cuda(format!(
            "attention over a ring of {} rows needs a window of 1..={0}, not {}",
            a.ring, a.window
        )));
    }
    let group = (a.nh / a.nkv) as usize;
    let grid = ((m * a.nkv as usize * group.div_ceil(ATTN_HEADS_PER_BLOCK)) as u32, a.nsplit as u32, 1);
    dev.launch_args("attention", grid, ATTN_THREADS, a)
}
