//! Reference plans, one file per family: the forward pass of model-spec, one primitive step
//! per op. A new family adds a file here and one arm in [`Plan::reference`](super::Plan::reference);
//! the blocks every MoE family shares (the FFN block and the output head) live in this file.

pub mod gpt_oss;
pub mod lfm2_moe;
pub mod mla_moe;
pub mod qwen3_moe;

use crate::config::{ModelConfig, RouterKind};
use crate::plan::{Buf, LinRef, MoeOp, NormRef, Step};

/// The MLP steps of layer `l` from `H` to `Out` (the residual add follows).
pub(super) fn mlp_steps(cfg: &ModelConfig, l: usize, s: &mut Vec<Step>) {
    use Buf::*;
    if cfg.is_moe_layer(l) {
        // Shared experts first, so that the routed path ends in one run (down, combine,
        // + shared, + residual) that `moe_mlp` fuses; the sum is the same either way.
        if cfg.n_shared_experts > 0 {
            s.extend([
                Step::Linear { w: LinRef::SharedGate(l), src: H, dst: Gate },
                Step::Linear { w: LinRef::SharedUp(l), src: H, dst: Up },
                Step::Swiglu,
                Step::Linear { w: LinRef::SharedDown(l), src: Act, dst: SharedOut },
            ]);
        }
        let router = match cfg.router {
            RouterKind::Softmax => Step::Moe { layer: l, op: MoeOp::RouterTopK },
            RouterKind::SigmoidGrouped { .. } => Step::Moe { layer: l, op: MoeOp::SigmoidTopK },
            RouterKind::SigmoidBias { .. } => Step::Moe { layer: l, op: MoeOp::SigmoidBiasTopK },
            RouterKind::TopKSoftmax => Step::Moe { layer: l, op: MoeOp::TopKSoftmax },
        };
        let act = if cfg.gpt_oss.is_some() { Step::Moe { layer: l, op: MoeOp::ClampSwiglu } } else { Step::Swiglu };
        s.extend([
            Step::Linear { w: LinRef::Router(l), src: H, dst: RouterLogits },
            router,
            Step::Moe { layer: l, op: MoeOp::ExpertGateUp },
            act,
            Step::Moe { layer: l, op: MoeOp::ExpertDown },
            Step::Moe { layer: l, op: MoeOp::Combine },
        ]);
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
