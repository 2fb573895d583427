//! GLM-4.7-Flash / DeepSeek-V3 / Kimi-K2: multi-head latent attention (absorbed, over a
//! latent cache), grouped sigmoid router, shared experts.

use super::{ffn_block, head};
use crate::config::ModelConfig;
use crate::plan::{AttnOp, Buf, LinRef, NormRef, Plan, Step};

/// GLM-4.7-Flash / DeepSeek-V3 (model-spec §3.4–3.6): MLA attention in the absorbed form
/// over a latent cache, sigmoid-grouped routing, shared experts.
pub fn reference(cfg: &ModelConfig) -> Plan {
    use Buf::*;
    let m = cfg.mla.as_ref().expect("MLA family");
    let mut s = vec![Step::Embed];
    for l in 0..cfg.num_layers {
        s.push(Step::RmsNorm { w: NormRef::Input(l), src: X, dst: H });
        // Both projections of H first (q_a or q, then kv_a): `qkv_proj` fuses them.
        if m.q_lora_rank.is_some() {
            s.extend([
                Step::Linear { w: LinRef::QA(l), src: H, dst: QA },
                Step::Linear { w: LinRef::KvA(l), src: H, dst: Kva },
                Step::RmsNorm { w: NormRef::QLatent(l), src: QA, dst: QA },
                Step::Linear { w: LinRef::Q(l), src: QA, dst: Q },
            ]);
        } else {
            s.extend([
                Step::Linear { w: LinRef::Q(l), src: H, dst: Q },
                Step::Linear { w: LinRef::KvA(l), src: H, dst: Kva },
            ]);
        }
        s.extend([
            Step::RmsNorm { w: NormRef::KvLatent(l), src: Kva, dst: Kva },
            Step::Attn { layer: l, op: AttnOp::MlaRope },
            Step::Attn { layer: l, op: AttnOp::LatentAppend },
            Step::Attn { layer: l, op: AttnOp::MlaQAbsorb },
            Step::Attn { layer: l, op: AttnOp::MlaAttention },
            Step::Attn { layer: l, op: AttnOp::MlaVUp },
        ]);
        ffn_block(cfg, l, &mut s);
    }
    head(&mut s);
    Plan { name: "reference".into(), steps: s }
}
