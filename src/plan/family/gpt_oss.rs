//! GPT-OSS (model-spec §5.5): GQA attention with biases, YaRN RoPE and per-head sinks over
//! alternating sliding-window and full layers; top-k-then-softmax router; experts with
//! biases and the clamped SwiGLU. No q/k norms, untied head.

use super::{ffn_block, head};
use crate::config::ModelConfig;
use crate::plan::{AttnOp, Buf, LinRef, NormRef, Plan, Step};

/// The reference plan. The window of a layer is not a step of its own: `SinkAttention`
/// reads it from the config (`ModelConfig::window`), so sliding and full layers have the
/// same steps and patterns treat them alike.
pub fn reference(cfg: &ModelConfig) -> Plan {
    use Buf::*;
    let mut s = vec![Step::Embed];
    for l in 0..cfg.num_layers {
        s.extend([
            Step::RmsNorm { w: NormRef::Input(l), src: X, dst: H },
            Step::Linear { w: LinRef::Q(l), src: H, dst: Q },
            Step::Linear { w: LinRef::K(l), src: H, dst: K },
            Step::Linear { w: LinRef::V(l), src: H, dst: V },
            Step::Attn { layer: l, op: AttnOp::Rope },
            Step::Attn { layer: l, op: AttnOp::KvAppend },
            Step::Attn { layer: l, op: AttnOp::SinkAttention },
        ]);
        ffn_block(cfg, l, &mut s);
    }
    head(&mut s);
    Plan { name: "reference".into(), steps: s }
}
