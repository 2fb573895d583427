//! Reference plans, one file per family: the forward pass of model-spec, one primitive step
//! per op. A new family adds a file here and one arm in [`Plan::reference`](super::Plan::reference);
//! the blocks several families share (Qwen3-style attention, the FFN block, the output head)
//! live in this file.

pub mod gpt_oss;
pub mod lfm2_moe;
pub mod mla_moe;
pub mod qwen3_moe;

use crate::config::{ModelConfig, RouterKind};
use crate::plan::{AttnOp, Buf, LinRef, MoeOp, NormRef, Step};

/// Qwen3-style GQA attention of layer `l` from `H` to `Attn`: q/k/v projections, per-head
/// q/k RMSNorm, RoPE, KV append, attention (Qwen3-MoE, and LFM2-MoE's attention layers).
pub(super) fn gqa_qk_norm_attention(l: usize, s: &mut Vec<Step>) {
    use Buf::*;
    s.extend([
        Step::Linear { w: LinRef::Q(l), src: H, dst: Q },
        Step::Linear { w: LinRef::K(l), src: H, dst: K },
        Step::Linear { w: LinRef::V(l), src: H, dst: V },
        Step::HeadNorm { w: NormRef::QHead(l), buf: Q },
        Step::HeadNorm { w: NormRef::KHead(l), buf: K },
        Step::Attn { layer: l, op: AttnOp::Rope },
        Step::Attn { layer: l, op: AttnOp::KvAppend },
        Step::Attn { layer: l, op: AttnOp::Attention },
    ]);
}

/// The MLP steps of layer `l` from `H` to `Out` (the residual add follows).
pub(super) fn mlp_steps(cfg: &ModelConfig, l: usize, s: &mut Vec<Step>) {
    use Buf::*;
    if cfg.is_moe_layer(l) {
        let router = match cfg.router {
            RouterKind::Softmax => Step::Moe { layer: l, op: MoeOp::RouterTopK },
            RouterKind::SigmoidGrouped { .. } => Step::Moe { layer: l, op: MoeOp::SigmoidTopK },
            RouterKind::SigmoidBias { .. } => Step::Moe { layer: l, op: MoeOp::SigmoidBiasTopK },
            RouterKind::TopKSoftmax => Step::Moe { layer: l, op: MoeOp::TopKSoftmax },
        };
        let act = if cfg.gpt_oss.is_some() { Step::Moe { layer: l, op: MoeOp::ClampSwiglu } } else { Step::Swiglu };
        s.extend([Step::Linear { w: LinRef::Router(l), src: H, dst: RouterLogits }, router]);
        // The shared experts' gate/up just before the routed experts' and their down just
        // before the routed down (into their own SharedAct), so that `moe_mlp` runs each pair
        // in one kernel; the sum is the same in any order.
        let shared = cfg.n_shared_experts > 0;
        if shared {
            s.extend([
                Step::Linear { w: LinRef::SharedGate(l), src: H, dst: Gate },
                Step::Linear { w: LinRef::SharedUp(l), src: H, dst: Up },
                Step::Moe { layer: l, op: MoeOp::SharedSwiglu },
            ]);
        }
        s.extend([Step::Moe { layer: l, op: MoeOp::ExpertGateUp }, act]);
        if shared {
            s.push(Step::Linear { w: LinRef::SharedDown(l), src: SharedAct, dst: SharedOut });
        }
        s.extend([Step::Moe { layer: l, op: MoeOp::ExpertDown }, Step::Moe { layer: l, op: MoeOp::Combine }]);
        if cfg.n_shared_experts > 0 {
            s.push(Step::Add { dst: Out, src: SharedOut });
        }
    } else {
        s.extend([
            Step::Linear { w: LinRef::DenseGate(l), src: H, dst: Gate },
            Step::Linear { w: LinRef::DenseUp(l), src: H, dst: Up },
            Step::Swiglu,
            Step::Linear { w: LinRef::DenseDown(l), src: Act, dst: Out },
        ]);
    }
}

/// After attention: o_proj, residual add, post-attention norm, the MLP, residual add.
pub(super) fn ffn_block(cfg: &ModelConfig, l: usize, s: &mut Vec<Step>) {
    use Buf::*;
    s.extend([
        Step::Linear { w: LinRef::O(l), src: Attn, dst: Out },
        Step::Add { dst: X, src: Out },
        Step::RmsNorm { w: NormRef::Post(l), src: X, dst: H },
    ]);
    mlp_steps(cfg, l, s);
    s.push(Step::Add { dst: X, src: Out });
}

/// The output head: last row, final norm, lm_head.
pub(super) fn head(s: &mut Vec<Step>) {
    use Buf::*;
    s.extend([
        Step::LastRow,
        Step::RmsNorm { w: NormRef::Final, src: X, dst: H },
        Step::Linear { w: LinRef::LmHead, src: H, dst: Logits },
    ]);
}
