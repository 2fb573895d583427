//! LFM2-MoE (model-spec §4.4): a heterogeneous mixer — gated short-convolution layers beside
//! GQA layers with per-head q/k norms — then the shared FFN block (dense SwiGLU for the first
//! `num_dense_layers`, else the sigmoid router with an expert bias and routed experts).
//!
//! A conv layer is `in_proj` (an ordinary linear step into `Bcx`), one [`AttnOp::ShortConv`]
//! (gating, the causal depthwise convolution over the layer's conv state, gating) into
//! `Attn`, and `out_proj` as the layer's `O` — so the steps after the mixer (o-proj, residual,
//! post norm, FFN) are the ones every family shares, and `residual_norm` / `moe_mlp` fuse
//! them unchanged.

use super::{ffn_block, head};
use crate::config::ModelConfig;
use crate::plan::{AttnOp, Buf, LinRef, NormRef, Plan, Step};

/// The reference plan.
pub fn reference(cfg: &ModelConfig) -> Plan {
    use Buf::*;
    let mut s = vec![Step::Embed];
    for l in 0..cfg.num_layers {
        s.push(Step::RmsNorm { w: NormRef::Input(l), src: X, dst: H });
        if cfg.is_conv_layer(l) {
            s.extend([
                Step::Linear { w: LinRef::ConvIn(l), src: H, dst: Bcx },
                Step::Attn { layer: l, op: AttnOp::ShortConv },
            ]);
        } else {
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
        ffn_block(cfg, l, &mut s);
    }
    head(&mut s);
    Plan { name: "reference".into(), steps: s }
}
