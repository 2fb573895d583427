//! A model's forward pass as data: a [`Plan`] is an ordered list of [`Step`]s over named
//! activation buffers ([`Buf`]).
//!
//! Why data and not code: the *reference plan* (one primitive op per step, like a framework
//! runs it) is what fused kernels must reproduce. Patterns rewrite a run of primitive steps
//! into one fused step; with the plan as a value, a rewrite is a pure function that can be
//! unit-tested on the CPU, printed, and switched on or off per pattern. Both backends
//! execute the same steps, so the CPU is an oracle for every plan, fused or not.
//!
//! Steps refer to weights by role ([`LinRef`], [`NormRef`]) and read dimensions from the
//! [`ModelConfig`]; buffers hold `T` rows (tokens in this call) of a fixed width.

mod family;
pub mod lower;
pub mod patterns;

use std::fmt;

use crate::config::{Family, ModelConfig};
pub use crate::model::{LinRef, NormRef};

/// Activation buffers. Widths per row; `T` rows = tokens in this forward call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Buf {
    /// Residual stream `[T, H]`.
    X,
    /// Normalised input of attention / MLP `[T, H]`.
    H,
    /// Queries `[T, nH·D]`.
    Q,
    /// Keys `[T, nKV·D]`.
    K,
    /// Values `[T, nKV·D]`.
    V,
    /// Attention output, heads concatenated `[T, nH·D]`.
    Attn,
    /// Output of o_proj / MLP before the residual add `[T, H]`.
    Out,
    /// Router logits `[T, E]`.
    RouterLogits,
    /// Gate projections: dense `[T, F]`, experts `[T·K, I]` (row t·K+j = slot j of token t).
    Gate,
    /// Up projections, same shape as `Gate`.
    Up,
    /// `silu(Gate) ⊙ Up`, same shape as `Gate`.
    Act,
    /// Per-slot expert outputs `[T·K, H]`.
    ExpertOut,
    /// Output logits `[T', V]` (T' = 1 unless every position's logits were asked for).
    Logits,
    /// MLA query latent `[T, q_lora]` (q_a_proj output, normalised in place).
    QA,
    /// MLA `kv_a_proj_with_mqa` output `[T, kv_lora + rope]`: the latent `c` (normalised in
    /// place) and the shared rope key `k_pe` (roped in place) — one KV-cache row per token.
    Kva,
    /// MLA absorbed queries `[T, nH·kv_lora]`: `W_UKᵀ q_nope` per head.
    QLat,
    /// MLA attention output in latent space `[T, nH·kv_lora]`: `Σ_s p_s c_s` per head.
    OLat,
    /// Shared-expert output `[T, H]`.
    SharedOut,
}

impl Buf {
    /// Every buffer, for backends that allocate them up front.
    pub const ALL: [Buf; 18] = [
        Buf::X,
        Buf::H,
        Buf::Q,
        Buf::K,
        Buf::V,
        Buf::Attn,
        Buf::Out,
        Buf::RouterLogits,
        Buf::Gate,
        Buf::Up,
        Buf::Act,
        Buf::ExpertOut,
        Buf::Logits,
        Buf::QA,
        Buf::Kva,
        Buf::QLat,
        Buf::OLat,
        Buf::SharedOut,
    ];
}

/// One step of a plan: a primitive op of the reference plan, or a fused step that a
/// [pattern](patterns) put in place of a run of primitives ([`Step::components`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// `X = embed[tokens]`.
    Embed,
    /// `dst = rmsnorm(src) ⊙ w` row-wise over the first `w.len()` columns of each row (the
    /// rest of the row is left as is; MLA normalises the latent part of `Kva` in place).
    RmsNorm {
        /// Weight.
        w: NormRef,
        /// Input buffer.
        src: Buf,
        /// Output buffer.
        dst: Buf,
    },
    /// `dst = src Wᵀ (+ b)`.
    Linear {
        /// Weight.
        w: LinRef,
        /// Input buffer.
        src: Buf,
        /// Output buffer.
        dst: Buf,
    },
    /// Per-head RMSNorm of `buf` in place (head width D, weight `[D]` shared by heads).
    HeadNorm {
        /// Weight.
        w: NormRef,
        /// Q or K.
        buf: Buf,
    },
    /// Rotary embedding of Q and K in place at positions `pos..pos+T`.
    Rope,
    /// Append K and V rows to the layer's cache.
    KvAppend {
        /// Layer.
        layer: usize,
    },
    /// Causal GQA attention of Q over the layer's cache → `Attn`.
    Attention {
        /// Layer.
        layer: usize,
    },
    /// `dst += src`.
    Add {
        /// Accumulator.
        dst: Buf,
        /// Addend.
        src: Buf,
    },
    /// Softmax over experts, top-k (lowest index wins ties), optional renormalisation.
    RouterTopK,
    /// Gate and up projections of each token's selected experts: `H` → `Gate`, `Up` `[T·K, I]`.
    ExpertGateUp {
        /// Layer.
        layer: usize,
    },
    /// `Act = silu(Gate) ⊙ Up`.
    Swiglu,
    /// Down projection of each selected expert: `Act` → `ExpertOut` `[T·K, H]`.
    ExpertDown {
        /// Layer.
        layer: usize,
    },
    /// `Out[t] = Σ_j w[t,j] · ExpertOut[t·K+j]`, f32 accumulation in slot order.
    Combine,
    /// Keep only the last row of `X` unless every position's logits were requested.
    LastRow,
    /// MLA: interleaved RoPE on the rope slice of every query head (`Q`) and on the shared
    /// `k_pe` (the last `rope` columns of `Kva`), positions `pos..pos+T`.
    MlaRope,
    /// MLA: append the `Kva` rows (latent + roped `k_pe`) to the layer's latent cache.
    LatentAppend {
        /// Layer.
        layer: usize,
    },
    /// MLA: `QLat[t,h] = W_UK[h]ᵀ q_nope[t,h]` (weights absorbed into the query).
    MlaQAbsorb {
        /// Layer.
        layer: usize,
    },
    /// MLA: causal attention of every head over the latent cache (one shared KV "head" of
    /// width kv_lora + rope): `score = QLat·c_s + q_pe·k_pe_s`, scaled; `OLat = Σ p_s c_s`.
    MlaAttention {
        /// Layer.
        layer: usize,
    },
    /// MLA: `Attn[t,h] = W_UV[h] OLat[t,h]`.
    MlaVUp {
        /// Layer.
        layer: usize,
    },
    /// MLA as transformers writes it: expand every cached latent to per-head keys and values
    /// (`kv_b_proj`), then attend — `Q` → `Attn`. Same math as `MlaQAbsorb`, `MlaAttention`,
    /// `MlaVUp`, different rounding and O(S) projections per step (CPU only; see
    /// [`Plan::with_expanded_mla`]).
    MlaAttentionExpanded {
        /// Layer.
        layer: usize,
    },
    /// GLM / DeepSeek router on `RouterLogits`: sigmoid, correction bias for selection,
    /// group limiting, top-k (lowest index wins ties), renormalise, scale.
    SigmoidTopK {
        /// Layer (its correction bias).
        layer: usize,
    },

    // Fused steps. Each is exactly its `components()`, run in order, bit for bit.
    /// `moe_mlp`: router projection + softmax-top-k in one kernel.
    MoeRouter {
        /// Layer.
        layer: usize,
    },
    /// `moe_mlp`: gate and up projections of the selected experts and SwiGLU, reading `H` once.
    MoeGateUpSwiglu {
        /// Layer.
        layer: usize,
    },
    /// `moe_mlp`: down projection of the selected experts, weighted combine and `X += Out`.
    MoeDownCombineAdd {
        /// Layer.
        layer: usize,
    },
    /// `swiglu_mlp`: dense gate and up projections and SwiGLU.
    DenseGateUpSwiglu {
        /// Layer.
        layer: usize,
    },
    /// `residual_norm`: `X += src`, then `dst = rmsnorm(X) ⊙ w`.
    AddRmsNorm {
        /// Weight.
        w: NormRef,
        /// Addend of the residual.
        src: Buf,
        /// Normalised output.
        dst: Buf,
    },
    /// `residual_norm`: o_proj, the residual add and the post-attention norm in one kernel.
    OProjAddRmsNorm {
        /// Layer.
        layer: usize,
    },
    /// `qkv_proj`: the q, k and v projections of `H` in one kernel.
    QkvProj {
        /// Layer.
        layer: usize,
    },
    /// `qk_norm_rope`: per-head q and k norms, RoPE and the KV-cache append.
    QkNormRopeKv {
        /// Layer.
        layer: usize,
    },
    /// `moe_mlp` (sigmoid routers): router projection + sigmoid-grouped top-k in one kernel.
    MoeSigmoidRouter {
        /// Layer.
        layer: usize,
    },
    /// `moe_mlp` with shared experts: expert down, combine, `Out += SharedOut`, `X += Out`.
    MoeDownCombineSharedAdd {
        /// Layer.
        layer: usize,
    },
    /// `shared_expert`: the shared experts' gate and up projections and SwiGLU.
    SharedGateUpSwiglu {
        /// Layer.
        layer: usize,
    },
    /// `qkv_proj` for MLA: the projections of `H` (q_a or q, and kv_a) in one kernel.
    MlaInProj {
        /// Layer.
        layer: usize,
        /// Whether the query goes through q_a (a query LoRA) rather than q_proj.
        q_lora: bool,
    },
    /// `qk_norm_rope` for MLA: the latent norm, RoPE of q_pe and k_pe, the latent-cache append.
    LatentNormRopeAppend {
        /// Layer.
        layer: usize,
    },
    /// A kernel-pack kernel in place of `step` at the token buckets of `kernels` (the
    /// built-in kernel at the others). Only in the plans a backend runs ([`lower`]).
    Packed {
        /// The step it replaces (its only component).
        step: Box<Step>,
        /// The pack kernels, one per bucket served.
        kernels: Vec<lower::PackKernel>,
    },
}

impl Step {
    /// The primitive steps a fused step stands for, in order (empty for a primitive step).
    /// A backend may run a fused step as these; the CPU reference does exactly that.
    pub fn components(&self) -> Vec<Step> {
        use Buf::*;
        match *self {
            Step::MoeRouter { layer } => {
                vec![Step::Linear { w: LinRef::Router(layer), src: H, dst: RouterLogits }, Step::RouterTopK]
            }
            Step::MoeGateUpSwiglu { layer } => vec![Step::ExpertGateUp { layer }, Step::Swiglu],
            Step::MoeDownCombineAdd { layer } => {
                vec![Step::ExpertDown { layer }, Step::Combine, Step::Add { dst: X, src: Out }]
            }
            Step::OProjAddRmsNorm { layer } => vec![
                Step::Linear { w: LinRef::O(layer), src: Attn, dst: Out },
                Step::Add { dst: X, src: Out },
                Step::RmsNorm { w: NormRef::Post(layer), src: X, dst: H },
            ],
            Step::DenseGateUpSwiglu { layer } => vec![
                Step::Linear { w: LinRef::DenseGate(layer), src: H, dst: Gate },
                Step::Linear { w: LinRef::DenseUp(layer), src: H, dst: Up },
                Step::Swiglu,
            ],
            Step::AddRmsNorm { w, src, dst } => vec![Step::Add { dst: X, src }, Step::RmsNorm { w, src: X, dst }],
            Step::QkvProj { layer } => vec![
                Step::Linear { w: LinRef::Q(layer), src: H, dst: Q },
                Step::Linear { w: LinRef::K(layer), src: H, dst: K },
                Step::Linear { w: LinRef::V(layer), src: H, dst: V },
            ],
            Step::QkNormRopeKv { layer } => vec![
                Step::HeadNorm { w: NormRef::QHead(layer), buf: Q },
                Step::HeadNorm { w: NormRef::KHead(layer), buf: K },
                Step::Rope,
                Step::KvAppend { layer },
            ],
            Step::MoeSigmoidRouter { layer } => {
                vec![Step::Linear { w: LinRef::Router(layer), src: H, dst: RouterLogits }, Step::SigmoidTopK { layer }]
            }
            Step::MoeDownCombineSharedAdd { layer } => vec![
                Step::ExpertDown { layer },
                Step::Combine,
                Step::Add { dst: Out, src: SharedOut },
                Step::Add { dst: X, src: Out },
            ],
            Step::SharedGateUpSwiglu { layer } => vec![
                Step::Linear { w: LinRef::SharedGate(layer), src: H, dst: Gate },
                Step::Linear { w: LinRef::SharedUp(layer), src: H, dst: Up },
                Step::Swiglu,
            ],
            Step::MlaInProj { layer, q_lora } => vec![
                if q_lora {
                    Step::Linear { w: LinRef::QA(layer), src: H, dst: QA }
                } else {
                    Step::Linear { w: LinRef::Q(layer), src: H, dst: Q }
                },
                Step::Linear { w: LinRef::KvA(layer), src: H, dst: Kva },
            ],
            Step::LatentNormRopeAppend { layer } => vec![
                Step::RmsNorm { w: NormRef::KvLatent(layer), src: Kva, dst: Kva },
                Step::MlaRope,
                Step::LatentAppend { layer },
            ],
            Step::Packed { ref step, .. } => vec![(**step).clone()],
            _ => Vec::new(),
        }
    }

    /// The primitive steps a step stands for, fused steps inside fused steps expanded too
    /// (a primitive step: itself).
    pub fn primitives(&self) -> Vec<Step> {
        let parts = self.components();
        if parts.is_empty() { vec![self.clone()] } else { parts.iter().flat_map(Step::primitives).collect() }
    }

    /// The layer a step belongs to, if it reads one layer's weights or cache.
    pub fn layer(&self) -> Option<usize> {
        match self {
            Step::Linear { w, .. } => w.layer(),
            Step::RmsNorm { w, .. } | Step::HeadNorm { w, .. } | Step::AddRmsNorm { w, .. } => w.layer(),
            Step::LatentAppend { layer }
            | Step::MlaQAbsorb { layer }
            | Step::MlaAttention { layer }
            | Step::MlaVUp { layer }
            | Step::MlaAttentionExpanded { layer }
            | Step::SigmoidTopK { layer }
            | Step::KvAppend { layer }
            | Step::Attention { layer }
            | Step::ExpertGateUp { layer }
            | Step::ExpertDown { layer }
            | Step::MoeRouter { layer }
            | Step::MoeGateUpSwiglu { layer }
            | Step::MoeDownCombineAdd { layer }
            | Step::OProjAddRmsNorm { layer }
            | Step::DenseGateUpSwiglu { layer }
            | Step::QkvProj { layer }
            | Step::QkNormRopeKv { layer }
            | Step::MoeSigmoidRouter { layer }
            | Step::MoeDownCombineSharedAdd { layer }
            | Step::SharedGateUpSwiglu { layer }
            | Step::MlaInProj { layer, .. }
            | Step::LatentNormRopeAppend { layer } => Some(*layer),
            Step::Packed { step, .. } => step.layer(),
            _ => None,
        }
    }

    /// What the step does, without its layer (`linear q`, `attention`, ...): the key that
    /// per-step timings are summed by.
    pub fn kind(&self) -> String {
        match self {
            Step::RmsNorm { w, .. } => format!("rms_norm {}", w.role()),
            Step::Linear { w, .. } => format!("linear {}", w.role()),
            Step::HeadNorm { w, .. } => format!("head_norm {}", w.role()),
            Step::Add { dst, src } => format!("add {dst:?} += {src:?}"),
            Step::KvAppend { .. } => "kv_append".into(),
            Step::Attention { .. } => "attention".into(),
            Step::ExpertGateUp { .. } => "expert_gate_up".into(),
            Step::ExpertDown { .. } => "expert_down".into(),
            Step::Embed => "embed".into(),
            Step::Rope => "rope".into(),
            Step::RouterTopK => "router_topk".into(),
            Step::Swiglu => "swiglu".into(),
            Step::Combine => "combine".into(),
            Step::LastRow => "last_row".into(),
            Step::MlaRope => "mla_rope".into(),
            Step::LatentAppend { .. } => "latent_append".into(),
            Step::MlaQAbsorb { .. } => "mla_q_absorb".into(),
            Step::MlaAttention { .. } => "mla_attention".into(),
            Step::MlaVUp { .. } => "mla_v_up".into(),
            Step::MlaAttentionExpanded { .. } => "mla_attention_expanded".into(),
            Step::SigmoidTopK { .. } => "sigmoid_topk".into(),
            Step::MoeRouter { .. } => "moe_router (fused)".into(),
            Step::MoeGateUpSwiglu { .. } => "moe_gate_up_swiglu (fused)".into(),
            Step::MoeDownCombineAdd { .. } => "moe_down_combine_add (fused)".into(),
            Step::OProjAddRmsNorm { .. } => "o_proj_add_rms_norm (fused)".into(),
            Step::DenseGateUpSwiglu { .. } => "dense_gate_up_swiglu (fused)".into(),
            Step::AddRmsNorm { w, .. } => format!("add_rms_norm {} (fused)", w.role()),
            Step::QkvProj { .. } => "qkv_proj (fused)".into(),
            Step::QkNormRopeKv { .. } => "qk_norm_rope_kv (fused)".into(),
            Step::MoeSigmoidRouter { .. } => "moe_sigmoid_router (fused)".into(),
            Step::MoeDownCombineSharedAdd { .. } => "moe_down_combine_shared_add (fused)".into(),
            Step::SharedGateUpSwiglu { .. } => "shared_gate_up_swiglu (fused)".into(),
            Step::MlaInProj { .. } => "mla_in_proj (fused)".into(),
            Step::LatentNormRopeAppend { .. } => "latent_norm_rope_append (fused)".into(),
            Step::Packed { step, .. } => format!("{} [pack]", step.kind()),
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::RmsNorm { w, src, dst } => write!(f, "rms_norm {w:?}: {src:?} -> {dst:?}"),
            Step::Linear { w, src, dst } => write!(f, "linear {w:?}: {src:?} -> {dst:?}"),
            Step::HeadNorm { w, buf } => write!(f, "head_norm {w:?}: {buf:?}"),
            Step::Add { dst, src } => write!(f, "add {dst:?} += {src:?}"),
            Step::Packed { step, kernels } => {
                let ks: Vec<String> = kernels.iter().map(|k| format!("{} at {}", k.tag, k.bucket.name())).collect();
                write!(f, "{step} [pack: {}]", ks.join(", "))
            }
            other => write!(f, "{other:?}"),
        }
    }
}

/// A named sequence of steps.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// `reference` or a description of the applied patterns.
    pub name: String,
    /// The steps, in execution order.
    pub steps: Vec<Step>,
}

impl Plan {
    /// The reference plan of a model: primitive steps only (model-spec §2.4 for Qwen3-MoE).
    pub fn reference(cfg: &ModelConfig) -> Plan {
        match cfg.family {
            Family::Qwen3Moe => family::qwen3_moe::reference(cfg),
            Family::Glm4MoeLite | Family::DeepseekV3 => family::mla_moe::reference(cfg),
        }
    }

    /// The same plan with MLA attention in transformers' expanded form
    /// ([`Step::MlaAttentionExpanded`]) instead of the absorbed steps: the oracle that the
    /// absorbed form is checked against (same math, different rounding).
    pub fn with_expanded_mla(&self) -> Plan {
        let mut steps = Vec::with_capacity(self.steps.len());
        for s in self.primitives_only().steps {
            match s {
                Step::MlaQAbsorb { .. } | Step::MlaVUp { .. } => {}
                Step::MlaAttention { layer } => steps.push(Step::MlaAttentionExpanded { layer }),
                other => steps.push(other),
            }
        }
        Plan { name: format!("{} (expanded MLA)", self.name), steps }
    }

    /// Every fused step replaced by its primitives.
    pub fn primitives_only(&self) -> Plan {
        Plan { name: self.name.clone(), steps: self.steps.iter().flat_map(Step::primitives).collect() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn reference_plan_shape() {
        let cfg = ModelConfig::parse(
            r#"{"model_type":"qwen3_moe","vocab_size":64,"hidden_size":32,"num_hidden_layers":3,
               "num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,"num_experts":8,
               "num_experts_per_tok":2,"moe_intermediate_size":16,"intermediate_size":48,
               "mlp_only_layers":[1]}"#,
            Path::new("config.json"),
        )
        .unwrap();
        let p = Plan::reference(&cfg);
        let moe = p.steps.iter().filter(|s| matches!(s, Step::RouterTopK)).count();
        let dense = p.steps.iter().filter(|s| matches!(s, Step::Linear { w: LinRef::DenseGate(_), .. })).count();
        assert_eq!((moe, dense), (2, 1));
        assert_eq!(p.steps.first(), Some(&Step::Embed));
        assert!(matches!(p.steps.last(), Some(Step::Linear { w: LinRef::LmHead, .. })));
    }
}
