//! Qwen3-MoE (model-spec §2.4): GQA attention with per-head q/k norms, softmax top-k router.

use super::{ffn_block, head};
use crate::config::ModelConfig;
use crate::plan::{AttnOp, Buf, LinRef, NormRef, Plan, Step};

/// The reference plan.
pub fn reference(cfg: &ModelConfig) -> Plan {
    use Buf::*;
    let mut s = vec![Step::Embed];
    for l in 0..cfg.num_layers {
        s.extend([
            Step::RmsNorm { w: NormRef::Input(l), src: X, dst: H },
            Step::Linear { w: LinRef::Q(l), src: H, dst: Q },
            Step::Linear { w: LinRef::K(l), src: H, dst: K },
            Step::Linear { w: LinRef::V(l), src: H, dst: V },
            Step::HeadNorm { w: NormRef::QHead(l), buf: Q },
            Step::HeadNorm { w: NormRef::KHead(l), buf: K },
            Step::Attn { layer: l, op: AttnOp::Rope },
            Step::Attn { layer: l, op: AttnOp::KvAppend },
            Step::Attn { layer: l, op: AttnOp::Attention },
        ]);
        ffn_block(cfg, l, &mut s);
    }
    head(&mut s);
    Plan { name: "reference".into(), steps: s }
}
