//! Qwen3-MoE (model-spec §2.4): GQA attention with per-head q/k norms, softmax top-k router.

use super::{ffn_block, gqa_qk_norm_attention, head};
use crate::config::ModelConfig;
use crate::plan::{Buf, NormRef, Plan, Step};

/// The reference plan.
pub fn reference(cfg: &ModelConfig) -> Plan {
    use Buf::*;
    let mut s = vec![Step::Embed];
    for l in 0..cfg.num_layers {
        s.push(Step::RmsNorm { w: NormRef::Input(l), src: X, dst: H });
        gqa_qk_norm_attention(l, &mut s);
        ffn_block(cfg, l, &mut s);
    }
    head(&mut s);
    Plan { name: "reference".into(), steps: s }
}
