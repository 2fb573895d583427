//! Multi-head latent attention (`mla.cu`): per-head absorbed projections (`head_matvec`),
//! RoPE of the rope slices, the latent cache append, split attention over the latent cache
//! (a long prompt's chunks on tensor cores: `mla_attention_tc`), and the fused
//! `latent_norm_rope_append` (`qk_norm_rope` for MLA).

use super::{ATTN_THREADS, Bf16, F32, I32, In, KernelArgs, Out, Stacked, blocks, kernel_args};
use crate::cuda::Device;
use crate::error::Result;

/// MLA attention: key splits per (token, head) (at most 32: a lane each in the merge); 32
/// beat 16 on the H100 (GLM decode 169.7 vs 166.2 tok/s, bench/RESULTS.md, session 9).
pub const MLA_SPLITS: usize = 32;
/// MLA attention: query heads a block serves (a warp each), sharing each cache row it loads.
pub const MLA_HEADS_PER_BLOCK: usize = ATTN_THREADS as usize / 32;
const _: () = assert!(MLA_SPLITS <= 32);

kernel_args! {
    /// The shapes `mla_rope` and `latent_norm_rope_append` share.
    pub struct MlaDims {
        /// Query heads.
        nh: i32,
        /// Query head width (nope + rope).
        dqk: i32,
        /// Offset of the rope slice in a query head.
        nope: i32,
        /// Width of a Kva / latent-cache row (latent + rope).
        row: i32,
        /// Latent width (offset of k_pe in the row).
        lat: i32,
        /// Rotated dims.
        d_rot: i32,
        /// YaRN attention factor on cos and sin.
        scaling: f32,
        /// 1 = interleaved pairs, 0 = half-split.
        interleaved: i32,
    }
    /// `head_matvec` / `head_matvec1`: row (m, h) of y `[M·nh, n]` = `W[h] · x[m, h][0:k]`.
    /// `lanes`: lanes a row for one token (`head_matvec1`), set by [`head_matvec`].
    pub struct HeadMatvecArgs {
        w: Stacked, x: In<Bf16>, x_ld: i64, nh: i32, y: Out<Bf16>, n: i32, k: i32, m: i32, lanes: i32,
    }
    /// `mla_rope`: the rope slices of q and of Kva's k_pe, in place, row m at position `pos[m]`.
    pub struct MlaRopeArgs { q: Out<Bf16>, kva: Out<Bf16>, inv_freq: In<F32>, pos: In<I32>, dims: MlaDims }
    /// `cache_append`: rows `[M, w]` to the cache, row m at cache row `base[m] + pos[m]`.
    pub struct CacheAppendArgs { x: In<Bf16>, cache: Out<Bf16>, pos: In<I32>, base: In<I32>, w: i32 }
    /// `mla_attention`: absorbed queries over the latent cache → `[M, nh·l]`; row m over the
    /// rows `base[m]..=base[m] + pos[m]` of its sequence.
    pub struct MlaAttentionArgs {
        qlat: In<Bf16>, q: In<Bf16>, cache: In<Bf16>, pos: In<I32>, base: In<I32>,
        part_o: Out<F32>, part_ml: Out<F32>, tickets: Out<I32>, out: Out<Bf16>,
        nh: i32, dqk: i32, nope: i32, l: i32, r: i32, scale: f32, nsplit: i32,
    }
    /// `mla_attention_tc`: a prompt chunk's `m` tokens — one sequence's consecutive positions
    /// from `pos[0]`, cache rows from `base[0]` — over the latent cache on tensor cores
    /// → `[m·nh, 512]`. Latent width 512 and rope width 64 only ([`tc_supports`]).
    pub struct MlaFlashArgs {
        qlat: In<Bf16>, q: In<Bf16>, cache: In<Bf16>, pos: In<I32>, base: In<I32>, out: Out<Bf16>,
        nh: i32, dqk: i32, nope: i32, scale: f32, m: i32,
    }
    /// `latent_norm_rope_append`: latent norm, RoPE of q_pe and k_pe, latent-cache append.
    pub struct LatentNormRopeAppendArgs {
        q: Out<Bf16>, kva: Out<Bf16>, nw: In<F32>, inv_freq: In<F32>, pos: In<I32>, base: In<I32>,
        cache: Out<Bf16>, dims: MlaDims, eps: f32,
    }
}

/// The C declarations of this file's argument structs.
pub fn decls() -> String {
    [
        MlaDims::c_decl(),
        HeadMatvecArgs::c_decl(),
        MlaRopeArgs::c_decl(),
        CacheAppendArgs::c_decl(),
        MlaAttentionArgs::c_decl(),
        MlaFlashArgs::c_decl(),
        LatentNormRopeAppendArgs::c_decl(),
    ]
    .concat()
}

/// Lanes a row of `k` elements of `w` takes in `head_matvec1`: the fewest powers of two
/// that hold its 16-byte chunks (bf16: 8 elements; affine: 128 / bits), at most a warp.
/// GLM-4.7-Flash's absorbed W_UKᵀ rows (192 wide, 4-bit: 6 chunks) take 8 lanes, 4 rows a
/// warp, where a warp a row left 26 of 32 lanes idle.
pub fn head_lanes(w: &super::QMat, k: usize) -> u32 {
    let chunks = if w.fmt == 0 { k / 8 } else { k * w.bits as usize / 128 };
    (chunks.max(1).next_power_of_two() as u32).min(32)
}

/// Per-head mat-vecs of `a.m` tokens: grid (rows / 4, heads); one token: grid (rows /
/// (4 · rows a warp), heads), [`head_lanes`] lanes a row.
pub fn head_matvec(dev: &Device, a: &HeadMatvecArgs) -> Result<()> {
    if a.m == 1 {
        let lanes = head_lanes(&a.w.w, a.k as usize);
        let a = HeadMatvecArgs { lanes: lanes as i32, ..*a };
        let rows_a_block = 4 * (32 / lanes) as usize;
        return dev.launch_args("head_matvec1", (blocks(a.n as usize, rows_a_block), a.nh as u32, 1), 128, &a);
    }
    dev.launch_args("head_matvec", (blocks(a.n as usize, 4), a.nh as u32, 1), 128, a)
}

/// RoPE of `m` tokens: a block per (token, query head) plus one for k_pe.
pub fn mla_rope(dev: &Device, a: &MlaRopeArgs, m: usize) -> Result<()> {
    dev.launch_args("mla_rope", ((m * (a.dims.nh as usize + 1)) as u32, 1, 1), 32, a)
}

/// Appends `m` rows to the latent cache.
pub fn cache_append(dev: &Device, a: &CacheAppendArgs, m: usize) -> Result<()> {
    dev.launch_args("cache_append", (m as u32, 1, 1), 256, a)
}

/// MLA attention of `m` tokens (`a.nsplit` must be [`MLA_SPLITS`]): a block per (token, group
/// of [`MLA_HEADS_PER_BLOCK`] heads, split).
pub fn mla_attention(dev: &Device, a: &MlaAttentionArgs, m: usize) -> Result<()> {
    let groups = (a.nh as usize).div_ceil(MLA_HEADS_PER_BLOCK);
    dev.launch_args("mla_attention", ((m * groups) as u32, a.nsplit as u32, 1), ATTN_THREADS, a)
}

/// Whether `mla_attention_tc` takes latent rows of `l` + `r` (its tiles are built for 512 + 64:
/// GLM-4.7-Flash, DeepSeek-V3, Kimi-K2).
pub fn tc_supports(l: usize, r: usize) -> bool {
    l == 512 && r == 64
}

/// MLA attention of a prompt chunk on tensor cores: 32 query rows (token, head) a block.
pub fn mla_attention_tc(dev: &Device, a: &MlaFlashArgs) -> Result<()> {
    dev.launch_args("mla_attention_tc", (((a.m * a.nh) as u32).div_ceil(32), 1, 1), 256, a)
}

/// The fused latent norm, RoPE and append of `m` tokens.
pub fn latent_norm_rope_append(dev: &Device, a: &LatentNormRopeAppendArgs, m: usize) -> Result<()> {
    let grid = ((m * (a.dims.nh as usize + 1)) as u32, 1, 1);
    dev.launch_args("latent_norm_rope_append", grid, super::norm::NORM_THREADS, a)
}
