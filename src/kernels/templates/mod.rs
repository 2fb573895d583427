//! The template registry: every op's CUDA templates (`templates/<op>/<template>.cu`), their
//! knob spaces, launch rules and numerics class.
//!
//! Why templates are compiled *after* `src/kernels/common.cuh`: they call the production
//! device functions (`combine_step`, `affine_partial_pair`, `router_topk_warp`,
//! `rmsnorm_row`...), so a template that keeps the production algorithm is bit-identical to
//! the production kernel by construction, and a change to those functions changes every
//! template's source hash (invalidating stale kernel-pack entries). Template `t0_*` of each
//! op is the production kernel made knob-able: the production kernel and its `t0` are both
//! thin wrappers around one `common.cuh` function (`combine_slots`, `add_rmsnorm_row`,
//! `router_topk_warp` / `router_sigmoid_warp`, `gate_up_swiglu_row`), so the algorithm is
//! written once (`tests/foundry.rs` checks it); its default knobs are the production launch.

use serde::{Deserialize, Serialize};

use super::Numerics;
use super::knobs::{self, KnobSpace, Knobs};
use super::ops::{OpId, Shape};
use crate::error::{Error, Result};

/// The shared device functions every template is compiled with.
pub use super::COMMON;

/// A kernel launch: grid and (1-D) block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launch {
    /// Grid dimensions.
    pub grid: [u32; 3],
    /// Threads per block.
    pub block: u32,
}

/// When a template is numerics-preserving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumericsRule {
    /// Always bit-identical to production.
    Preserving,
    /// Never (another rounding).
    Changing,
    /// Only when the named knob has the given value (e.g. the production block size).
    PreservingIf(&'static str, i64),
}

/// A CUDA template with knobs.
pub struct Template {
    /// The op it implements.
    pub op: OpId,
    /// `t0_basic`, ...
    pub name: &'static str,
    /// What it varies, one line.
    pub summary: &'static str,
    /// The CUDA source with `{{KNOB}}` placeholders.
    pub text: &'static str,
    /// Knobs and their allowed values.
    pub space: KnobSpace,
    /// Default knobs (for `t0`: the production configuration).
    pub defaults: &'static [(&'static str, i64)],
    /// Numerics class.
    pub numerics: NumericsRule,
    /// Grid and block for a shape.
    pub launch: fn(&Shape, &Knobs) -> Launch,
    /// Whether these knobs can run this shape.
    pub fits: fn(&Shape, &Knobs) -> bool,
}

/// A template rendered with knobs: the full source NVRTC compiles, and its hash.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    /// `common.cuh` + the rendered template.
    pub source: String,
    /// [`knobs::source_hash`] of `source`.
    pub hash: String,
}

impl std::fmt::Debug for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.op.name(), self.name)
    }
}

impl Template {
    /// The default knobs.
    pub fn default_knobs(&self) -> Knobs {
        knobs::knobs(self.defaults)
    }

    /// Numerics class of this template with `k`.
    pub fn numerics(&self, k: &Knobs) -> Numerics {
        match self.numerics {
            NumericsRule::Preserving => Numerics::Preserving,
            NumericsRule::Changing => Numerics::Changing,
            NumericsRule::PreservingIf(name, v) if k.get(name) == Some(&v) => Numerics::Preserving,
            NumericsRule::PreservingIf(..) => Numerics::Changing,
        }
    }

    /// Every knob combination that can run `shape`, in enumeration order.
    pub fn combos(&self, shape: &Shape) -> Vec<Knobs> {
        knobs::enumerate(self.space).into_iter().filter(|k| (self.fits)(shape, k)).collect()
    }

    /// Renders with `k` (checked against the knob space).
    pub fn render(&self, k: &Knobs) -> std::result::Result<Rendered, String> {
        knobs::check(self.space, k)?;
        let body = knobs::render(self.text, k)?;
        let source =
            format!("{COMMON}\n// ---- foundry {}/{} {} ----\n{body}", self.op.name(), self.name, knobs::display(k));
        let hash = knobs::source_hash(&source);
        Ok(Rendered { source, hash })
    }

    /// `t1_vec{TPB=256,VEC=8}`.
    pub fn label(&self, k: &Knobs) -> String {
        format!("{}{{{}}}", self.name, knobs::display(k))
    }

    /// The knob space as text: `TPB ∈ {64,128}, VEC ∈ {2,4,8}`.
    pub fn space_text(&self) -> String {
        if self.space.is_empty() {
            return "(no knobs)".into();
        }
        let items: Vec<String> = self
            .space
            .iter()
            .map(|(n, vs)| format!("{n} ∈ {{{}}}", vs.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(",")))
            .collect();
        items.join(", ")
    }
}

fn k(knobs: &Knobs, name: &str) -> u32 {
    knobs.get(name).copied().unwrap_or(1).max(1) as u32
}

fn div(a: usize, b: u32) -> u32 {
    a.div_ceil(b as usize) as u32
}

fn always(_: &Shape, _: &Knobs) -> bool {
    true
}

/// Every template of every op.
pub static TEMPLATES: [Template; 14] = [
    // ---- moe_combine ----
    Template {
        op: OpId::MoeCombine,
        name: "t0_basic",
        summary: "production `combine`: one thread per element, slots in order; block size as a knob",
        text: include_str!("moe_combine/t0_basic.cu"),
        space: &[("TPB", &[64, 128, 256, 512])],
        defaults: &[("TPB", 256)],
        numerics: NumericsRule::Preserving,
        launch: |s, kn| Launch { grid: [s.tokens as u32, div(s.hidden, k(kn, "TPB")), 1], block: k(kn, "TPB") },
        fits: always,
    },
    Template {
        op: OpId::MoeCombine,
        name: "t1_vec",
        summary: "VEC columns per thread (vector loads/stores), slot loop unrolled",
        text: include_str!("moe_combine/t1_vec.cu"),
        space: &[("TPB", &[64, 128, 256]), ("VEC", &[2, 4, 8]), ("UNROLL", &[1, 2, 4, 8])],
        defaults: &[("TPB", 128), ("VEC", 8), ("UNROLL", 2)],
        numerics: NumericsRule::Preserving,
        launch: |s, kn| Launch {
            grid: [s.tokens as u32, div(s.hidden, k(kn, "TPB") * k(kn, "VEC")), 1],
            block: k(kn, "TPB"),
        },
        fits: |s, kn| s.hidden % k(kn, "VEC") as usize == 0,
    },
    Template {
        op: OpId::MoeCombine,
        name: "t2_row_tile",
        summary: "ROWS tokens per block with their routing weights staged in shared memory (the seeds' t2)",
        text: include_str!("moe_combine/t2_row_tile.cu"),
        space: &[("TPB", &[64, 128, 256]), ("VEC", &[2, 4, 8]), ("ROWS", &[1, 2, 4, 8])],
        defaults: &[("TPB", 128), ("VEC", 8), ("ROWS", 4)],
        numerics: NumericsRule::Preserving,
        launch: |s, kn| Launch {
            grid: [div(s.tokens, k(kn, "ROWS")), div(s.hidden, k(kn, "TPB") * k(kn, "VEC")), 1],
            block: k(kn, "TPB"),
        },
        fits: |s, kn| s.hidden % k(kn, "VEC") as usize == 0 && s.k <= 16,
    },
    Template {
        op: OpId::MoeCombine,
        name: "t3_dual_acc",
        summary: "even/odd slots in two FMA chains added at the end (numerics-changing)",
        text: include_str!("moe_combine/t3_dual_acc.cu"),
        space: &[("TPB", &[64, 128, 256]), ("VEC", &[2, 4, 8])],
        defaults: &[("TPB", 128), ("VEC", 8)],
        numerics: NumericsRule::Changing,
        launch: |s, kn| Launch {
            grid: [s.tokens as u32, div(s.hidden, k(kn, "TPB") * k(kn, "VEC")), 1],
            block: k(kn, "TPB"),
        },
        fits: |s, kn| s.hidden % k(kn, "VEC") as usize == 0,
    },
    // ---- topk_gating ----
    Template {
        op: OpId::TopkGating,
        name: "t0_warp",
        summary: "production router_topk_warp (one warp per token) + the same for sigmoid; WPB tokens per block",
        text: include_str!("topk_gating/t0_warp.cu"),
        space: &[("WPB", &[1, 2, 4, 8])],
        defaults: &[("WPB", 1)],
        numerics: NumericsRule::Preserving,
        launch: |s, kn| Launch { grid: [div(s.tokens, k(kn, "WPB")), 1, 1], block: 32 * k(kn, "WPB") },
        fits: always,
    },
    Template {
        op: OpId::TopkGating,
        name: "t1_lane_regs",
        summary: "t0 with PER experts per lane in registers (each top-k round scans PER, not 32)",
        text: include_str!("topk_gating/t1_lane_regs.cu"),
        space: &[("WPB", &[1, 2, 4, 8]), ("PER", &[2, 4, 8, 16, 32])],
        defaults: &[("WPB", 1), ("PER", 4)],
        numerics: NumericsRule::Preserving,
        launch: |s, kn| Launch { grid: [div(s.tokens, k(kn, "WPB")), 1, 1], block: 32 * k(kn, "WPB") },
        fits: |s, kn| 32 * k(kn, "PER") as usize >= s.experts,
    },
    Template {
        op: OpId::TopkGating,
        name: "t2_block",
        summary: "one block per token, block reductions and block argmax (numerics-changing unless TPB=32)",
        text: include_str!("topk_gating/t2_block.cu"),
        space: &[("TPB", &[32, 64, 128, 256])],
        defaults: &[("TPB", 128)],
        numerics: NumericsRule::PreservingIf("TPB", 32),
        launch: |s, kn| Launch { grid: [s.tokens as u32, 1, 1], block: k(kn, "TPB") },
        fits: always,
    },
    // ---- gather_qmm_swiglu ----
    Template {
        op: OpId::GatherQmmSwiglu,
        name: "t0_warp_row",
        summary: "production moe_gate_up_swiglu: one warp per (slot, row), gate+up share x; RPB rows per block",
        text: include_str!("gather_qmm_swiglu/t0_warp_row.cu"),
        space: &[("RPB", &[2, 4, 8])],
        defaults: &[("RPB", 4)],
        numerics: NumericsRule::Preserving,
        launch: |s, kn| Launch {
            grid: [div(s.inter, k(kn, "RPB")), (s.tokens * s.k) as u32, 1],
            block: 32 * k(kn, "RPB"),
        },
        fits: always,
    },
    Template {
        op: OpId::GatherQmmSwiglu,
        name: "t1_split_k",
        summary: "SPLIT warps per row, partial sums added in shared memory (numerics-changing)",
        text: include_str!("gather_qmm_swiglu/t1_split_k.cu"),
        space: &[("RPB", &[1, 2, 4]), ("SPLIT", &[2, 4])],
        defaults: &[("RPB", 2), ("SPLIT", 2)],
        numerics: NumericsRule::Changing,
        launch: |s, kn| Launch {
            grid: [div(s.inter, k(kn, "RPB")), (s.tokens * s.k) as u32, 1],
            block: 32 * k(kn, "RPB") * k(kn, "SPLIT"),
        },
        fits: always,
    },
    Template {
        op: OpId::GatherQmmSwiglu,
        name: "t2_grouped",
        summary: "grouped by expert: each weight row read once per MT routed slots (E block columns)",
        text: include_str!("gather_qmm_swiglu/t2_grouped.cu"),
        space: &[("RPB", &[2, 4, 8]), ("MT", &[2, 4, 8])],
        defaults: &[("RPB", 4), ("MT", 4)],
        numerics: NumericsRule::Preserving,
        launch: |s, kn| Launch { grid: [div(s.inter, k(kn, "RPB")), s.experts as u32, 1], block: 32 * k(kn, "RPB") },
        fits: |s, _| s.tokens <= 1024,
    },
    Template {
        op: OpId::GatherQmmSwiglu,
        name: "t3_mma",
        summary: "4-bit codes to bf16 in registers, Σq·x of 16 rows a warp on tensor cores, a ring of PF blocks in flight (numerics-changing)",
        text: include_str!("gather_qmm_swiglu/t3_mma.cu"),
        space: &[("TILES", &[1, 2, 4]), ("SPLIT", &[1, 2, 4, 8]), ("PF", &[1, 2, 4])],
        defaults: &[("TILES", 2), ("SPLIT", 2), ("PF", 2)],
        numerics: NumericsRule::Changing,
        launch: |s, kn| Launch {
            grid: [div(s.inter, 16 * k(kn, "TILES")), (s.tokens * s.k) as u32, 1],
            block: 32 * k(kn, "TILES") * k(kn, "SPLIT"),
        },
        // PF·TILES·SPLIT > 32 spills under the launch bound (NVRTC sm_90, session 13 review).
        fits: |s, kn| {
            s.bits == 4
                && s.group % 64 == 0
                && s.inter % 16 == 0
                && s.hidden % 64 == 0
                && k(kn, "TILES") * k(kn, "SPLIT") * k(kn, "PF") <= 32
        },
    },
    // ---- rmsnorm_residual ----
    Template {
        op: OpId::RmsnormResidual,
        name: "t0_block",
        summary: "production add_rmsnorm: one block per row; bit-identical only at the production TPB=256",
        text: include_str!("rmsnorm_residual/t0_block.cu"),
        space: &[("TPB", &[128, 256, 512, 1024])],
        defaults: &[("TPB", 256)],
        numerics: NumericsRule::PreservingIf("TPB", 256),
        launch: |s, kn| Launch { grid: [s.tokens as u32, 1, 1], block: k(kn, "TPB") },
        fits: always,
    },
    Template {
        op: OpId::RmsnormResidual,
        name: "t1_warp_row",
        summary: "one warp per row, 16-byte loads, row in registers, optional Kahan sum (numerics-changing)",
        text: include_str!("rmsnorm_residual/t1_warp_row.cu"),
        space: &[("RPB", &[1, 2, 4, 8]), ("COMP", &[0, 1])],
        defaults: &[("RPB", 4), ("COMP", 0)],
        numerics: NumericsRule::Changing,
        launch: |s, kn| Launch { grid: [div(s.tokens, k(kn, "RPB")), 1, 1], block: 32 * k(kn, "RPB") },
        fits: |s, _| s.hidden % 8 == 0,
    },
    Template {
        op: OpId::RmsnormResidual,
        name: "t2_vec_block",
        summary: "one block per row with 16-byte loads (numerics-changing)",
        text: include_str!("rmsnorm_residual/t2_vec_block.cu"),
        space: &[("TPB", &[64, 128, 256])],
        defaults: &[("TPB", 128)],
        numerics: NumericsRule::Changing,
        launch: |s, kn| Launch { grid: [s.tokens as u32, 1, 1], block: k(kn, "TPB") },
        fits: |s, _| s.hidden % 8 == 0,
    },
];

/// The templates of `op`, `t0` first.
pub fn for_op(op: OpId) -> Vec<&'static Template> {
    TEMPLATES.iter().filter(|t| t.op == op).collect()
}

/// Looks a template up by op and name.
pub fn find(op: OpId, name: &str) -> Result<&'static Template> {
    TEMPLATES.iter().find(|t| t.op == op && t.name == name).ok_or_else(|| {
        let names: Vec<&str> = for_op(op).iter().map(|t| t.name).collect();
        Error::Arg(format!("op {} has no template `{name}` (templates: {})", op.name(), names.join(", ")))
    })
}

/// The production configuration of `op`: its `t0` template with default knobs. Outputs of
/// numerics-preserving candidates must equal this one's bit for bit.
pub fn baseline(op: OpId) -> (&'static Template, Knobs) {
    let t = for_op(op)[0];
    (t, t.default_knobs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable_and_tracks_the_source() {
        let t = find(OpId::MoeCombine, "t0_basic").unwrap();
        let a = t.render(&t.default_knobs()).unwrap();
        assert_eq!(a, t.render(&t.default_knobs()).unwrap());
        let b = t.render(&knobs::knobs(&[("TPB", 128)])).unwrap();
        assert_ne!(a.hash, b.hash);
        assert!(a.source.starts_with(COMMON));
        assert!(t.render(&knobs::knobs(&[("TPB", 100)])).is_err());
        assert!(find(OpId::MoeCombine, "t9").unwrap_err().to_string().contains("t0_basic"));
    }
}
