//! The ops a kernel pack can replace a built-in kernel for: their ids, the one kernel
//! signature all of an op's templates share, and the shape a launch is made for.
//!
//! Why in the runtime: the CUDA backend launches pack kernels through exactly these
//! definitions. The foundry adds what only a search needs (CPU references, input
//! generators, checks, bytes and FLOPs) in `crate::foundry::ops`, on the same types.

use serde::{Deserialize, Serialize};

use super::Arg;
use crate::error::{Error, Result};

/// An op the foundry can search kernels for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpId {
    /// `out[t] = bf16(Σ_j w[t,j] · y[t·K+j])`: the weighted combine of K expert outputs.
    MoeCombine,
    /// Router top-k: softmax (Qwen3) or sigmoid + selection bias (GLM-4.7-Flash).
    TopkGating,
    /// Quantized gate + up projections of the selected experts, then SwiGLU.
    GatherQmmSwiglu,
    /// `x = bf16(x + src)`, then `y = rmsnorm(x) ⊙ w`.
    RmsnormResidual,
}

impl OpId {
    /// Every op.
    pub const ALL: [OpId; 4] = [OpId::MoeCombine, OpId::TopkGating, OpId::GatherQmmSwiglu, OpId::RmsnormResidual];

    /// The CLI / record name.
    pub fn name(self) -> &'static str {
        match self {
            OpId::MoeCombine => "moe_combine",
            OpId::TopkGating => "topk_gating",
            OpId::GatherQmmSwiglu => "gather_qmm_swiglu",
            OpId::RmsnormResidual => "rmsnorm_residual",
        }
    }

    /// Parses a CLI name.
    pub fn parse(s: &str) -> Result<OpId> {
        OpId::ALL.into_iter().find(|o| o.name() == s).ok_or_else(|| {
            let names: Vec<&str> = OpId::ALL.iter().map(|o| o.name()).collect();
            Error::Arg(format!("unknown foundry op `{s}` (known: {})", names.join(", ")))
        })
    }

    /// What it computes, one line.
    pub fn summary(self) -> &'static str {
        match self {
            OpId::MoeCombine => "out[t] = bf16(Σ_j w[t,j]·y[t·K+j]) — weighted combine of K expert outputs (f32 acc)",
            OpId::TopkGating => "router top-k: softmax (opt. renormalised) or sigmoid + selection bias × scale",
            OpId::GatherQmmSwiglu => {
                "act[q] = swiglu(bf16(gate_e·x), bf16(up_e·x)) for the selected experts, MLX affine weights"
            }
            OpId::RmsnormResidual => "x = bf16(x + src); y = bf16(w ⊙ x·rsqrt(mean(x²) + eps))",
        }
    }

    /// The production step(s) it stands for.
    pub fn production(self) -> &'static str {
        match self {
            OpId::MoeCombine => "`combine` (Step::Combine)",
            OpId::TopkGating => "`router_topk` (Step::RouterTopK; softmax only in production)",
            OpId::GatherQmmSwiglu => "`moe_gate_up_swiglu` (Step::MoeGateUpSwiglu, decode)",
            OpId::RmsnormResidual => "`add_rmsnorm` (Step::AddRmsNorm)",
        }
    }

    /// The kernel's entry point in every template of this op: `foundry_<op>`.
    pub fn kernel_name(self) -> String {
        format!("foundry_{}", self.name())
    }

    /// Element type of the main data (the record's `dtype`).
    pub fn dtype(self) -> &'static str {
        match self {
            OpId::TopkGating => "f32",
            _ => "bf16",
        }
    }

    /// The kernel signature, as documentation.
    pub fn signature(self) -> &'static str {
        match self {
            OpId::MoeCombine => "(const bf16* y, const float* w, bf16* out, int M, int K, int H)",
            OpId::TopkGating => {
                "(const float* logits, const float* bias, int M, int E, int K, int mode, int norm, float scale, \
                 int* idx, float* wout)"
            }
            OpId::GatherQmmSwiglu => {
                "(const u32* gw, const bf16* gs, const bf16* gb, const u32* uw, const bf16* us, const bf16* ub, \
                 long w_stride, long sb_stride, const int* idx, const bf16* x, bf16* act, int M, int K, int E, \
                 int I, int H, int bits, int group)"
            }
            OpId::RmsnormResidual => "(bf16* x, const bf16* src, const float* w, bf16* y, int M, int n, float eps)",
        }
    }
}

/// How a router turns logits into (experts, weights).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Gating {
    /// Softmax over all experts, top-k, renormalised (Qwen3 with norm_topk_prob).
    SoftmaxNorm,
    /// Softmax over all experts, top-k, not renormalised.
    Softmax,
    /// `s = sigmoid(l)`, top-k of `s + bias`, weights = chosen `s / (Σ + 1e-20) × scale`.
    SigmoidBias,
}

/// One problem size: a preset's dimensions at a token count. Every field is recorded (an
/// op uses the ones it needs), so a record stays meaningful if a preset changes later.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shape {
    /// The preset it came from.
    pub preset: String,
    /// Tokens in the call (M).
    pub tokens: usize,
    /// Hidden size (H, n).
    pub hidden: usize,
    /// Routed experts (E).
    pub experts: usize,
    /// Experts per token (K).
    pub k: usize,
    /// Expert intermediate size (I).
    pub inter: usize,
    /// Affine weight bits.
    pub bits: u32,
    /// Quantization group size.
    pub group: usize,
    /// Router kind.
    pub gating: Gating,
    /// Routed scaling factor (sigmoid router).
    pub scale: f32,
    /// RMSNorm epsilon.
    pub eps: f32,
}

impl Shape {
    /// The fields `op` uses, for tables: `qwen3-30b-a3b M=4 K=8 H=2048`.
    pub fn describe(&self, op: OpId) -> String {
        let dims = match op {
            OpId::MoeCombine => format!("M={} K={} H={}", self.tokens, self.k, self.hidden),
            OpId::TopkGating => format!("M={} E={} K={} {:?}", self.tokens, self.experts, self.k, self.gating),
            OpId::GatherQmmSwiglu => format!(
                "M={} K={} E={} I={} H={} q{}g{}",
                self.tokens, self.k, self.experts, self.inter, self.hidden, self.bits, self.group
            ),
            OpId::RmsnormResidual => format!("M={} n={}", self.tokens, self.hidden),
        };
        format!("{} {dims}", self.preset)
    }
}

impl OpId {
    /// The kernel's arguments: `ptrs` are the device addresses of the tensors of
    /// [`OpId::inputs`], in order.
    pub fn kernel_args(self, s: &Shape, ptrs: &[u64]) -> Vec<Arg> {
        use Arg::{F32, I32, I64, Ptr};
        let (m, h, k, e) = (s.tokens as i32, s.hidden as i32, s.k as i32, s.experts as i32);
        match self {
            OpId::MoeCombine => vec![Ptr(ptrs[0]), Ptr(ptrs[1]), Ptr(ptrs[2]), I32(m), I32(k), I32(h)],
            OpId::TopkGating => {
                let (mode, norm) = match s.gating {
                    Gating::SoftmaxNorm => (0, 1),
                    Gating::Softmax => (0, 0),
                    Gating::SigmoidBias => (1, 1),
                };
                vec![
                    Ptr(ptrs[0]),
                    Ptr(ptrs[1]),
                    I32(m),
                    I32(e),
                    I32(k),
                    I32(mode),
                    I32(norm),
                    F32(s.scale),
                    Ptr(ptrs[2]),
                    Ptr(ptrs[3]),
                ]
            }
            OpId::GatherQmmSwiglu => {
                let w_stride = (s.inter * s.hidden * s.bits as usize / 32) as i64;
                let sb_stride = (s.inter * s.hidden / s.group) as i64;
                let mut a: Vec<Arg> = ptrs[..6].iter().map(|&p| Ptr(p)).collect();
                a.extend([I64(w_stride), I64(sb_stride), Ptr(ptrs[6]), Ptr(ptrs[7]), Ptr(ptrs[8])]);
                a.extend([
                    I32(m),
                    I32(k),
                    I32(e),
                    I32(s.inter as i32),
                    I32(h),
                    I32(s.bits as i32),
                    I32(s.group as i32),
                ]);
                a
            }
            OpId::RmsnormResidual => {
                vec![Ptr(ptrs[0]), Ptr(ptrs[1]), Ptr(ptrs[2]), Ptr(ptrs[3]), I32(m), I32(h), F32(s.eps)]
            }
        }
    }

    /// Whether this op can run `shape` (the kernels' limits).
    pub fn supports(self, s: &Shape) -> std::result::Result<(), String> {
        let need = |ok: bool, why: &str| if ok { Ok(()) } else { Err(why.to_string()) };
        need(s.tokens >= 1, "at least one token")?;
        match self {
            OpId::MoeCombine => need(s.hidden.is_multiple_of(8) && s.k <= 16, "H a multiple of 8 and K ≤ 16"),
            OpId::TopkGating => need(s.experts <= 1024 && s.k <= 16 && s.k <= s.experts, "E ≤ 1024, K ≤ min(16, E)"),
            OpId::GatherQmmSwiglu => need(
                matches!(s.bits, 4 | 8)
                    && s.group.is_multiple_of(32)
                    && s.hidden.is_multiple_of(s.group)
                    && s.k <= s.experts,
                "affine 4/8-bit, group a multiple of 32 dividing H",
            ),
            OpId::RmsnormResidual => need(s.hidden.is_multiple_of(8), "n a multiple of 8"),
        }
    }
}
