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
    /// Shared-expert activation `silu(Gate) ⊙ Up` `[T, I_shared]`: its own buffer, so the
    /// shared down can follow the routed experts' gate/up (which write `Act`) and share the
    /// routed down's kernel.
    SharedAct,
    /// LFM2 short conv's in_proj output `[T, 3H]`: the gates B, C and the input X.
    Bcx,
}

impl Buf {
    /// Every buffer, for backends that allocate them up front.
    pub const ALL: [Buf; 20] = [
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
        Buf::SharedAct,
        Buf::Bcx,
    ];
}

/// One step of a plan: a primitive op of the reference plan, or a fused step that a
/// [pattern](patterns) put in place of a run of primitives, carrying that run as its
/// [`parts`](Step::components).
///
/// Why this shape: the ops that belong to one layer's mixer or experts are grouped
/// ([`AttnOp`], [`MoeOp`]) under `Step::Attn` / `Step::Moe` with the layer once; a new mixer
/// (LFM2's short convolution, GPT-OSS's sliding window) adds variants to its own sub-enum,
/// not to `Step`. A fused step is [`Step::Fused`]: which kernel ([`Fusion`]) and the exact
/// primitive run it replaces, as data — so "a fused step is exactly its components" holds by
/// construction, and its kernel reads its weights and buffers from its parts.
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
    /// `dst += src`.
    Add {
        /// Accumulator.
        dst: Buf,
        /// Addend.
        src: Buf,
    },
    /// `Act = silu(Gate) ⊙ Up`.
    Swiglu,
    /// Keep only the last row of `X` unless every position's logits were requested.
    LastRow,
    /// An op of a layer's attention (its mixer).
    Attn {
        /// Layer.
        layer: usize,
        /// The op.
        op: AttnOp,
    },
    /// An op of a layer's routed experts.
    Moe {
        /// Layer.
        layer: usize,
        /// The op.
        op: MoeOp,
    },
    /// One kernel for exactly `parts` (primitive steps), run in order, bit for bit.
    Fused {
        /// Which fused kernel.
        op: Fusion,
        /// The primitive run it replaces, in order.
        parts: Vec<Step>,
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

/// The ops of a layer's attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnOp {
    /// GQA: rotary embedding of Q and K in place at positions `pos..pos+T`.
    Rope,
    /// GQA: append K and V rows to the layer's cache.
    KvAppend,
    /// GQA: causal attention of Q over the layer's cache → `Attn`.
    Attention,
    /// MLA: interleaved RoPE on the rope slice of every query head (`Q`) and on the shared
    /// `k_pe` (the last `rope` columns of `Kva`), positions `pos..pos+T`.
    MlaRope,
    /// MLA: append the `Kva` rows (latent + roped `k_pe`) to the layer's latent cache.
    LatentAppend,
    /// MLA: `QLat[t,h] = W_UK[h]ᵀ q_nope[t,h]` (weights absorbed into the query).
    MlaQAbsorb,
    /// MLA: causal attention of every head over the latent cache (one shared KV "head" of
    /// width kv_lora + rope): `score = QLat·c_s + q_pe·k_pe_s`, scaled; `OLat = Σ p_s c_s`.
    MlaAttention,
    /// MLA: `Attn[t,h] = W_UV[h] OLat[t,h]`.
    MlaVUp,
    /// MLA as transformers writes it: expand every cached latent to per-head keys and values
    /// (`kv_b_proj`), then attend — `Q` → `Attn`. Same math as `MlaQAbsorb`, `MlaAttention`,
    /// `MlaVUp`, different rounding and O(S) projections per step (CPU only; see
    /// [`Plan::with_expanded_mla`]).
    MlaAttentionExpanded,
    /// LFM2 gated short convolution (model-spec §4.4) of `Bcx` → `Attn` `[T, H]`:
    /// `u = B ⊙ X`, causal depthwise convolution of `u` over the layer's conv state (the last
    /// `L − 1` values of `u`) and this chunk, `Attn = C ⊙ conv`; the state moves on by `T`.
    ShortConv,
    /// GPT-OSS: causal attention of Q over the layer's cache with one sink logit per query
    /// head as an extra softmax column that is then dropped, over the layer's sliding
    /// window (`ModelConfig::window`) or all keys → `Attn`.
    SinkAttention,
}

/// The ops of a layer's routed experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoeOp {
    /// Softmax over experts, top-k (lowest index wins ties), optional renormalisation.
    RouterTopK,
    /// GLM / DeepSeek router on `RouterLogits`: sigmoid, the layer's correction bias for
    /// selection, group limiting, top-k (lowest index wins ties), renormalise, scale.
    SigmoidTopK,
    /// LFM2 router on `RouterLogits`: sigmoid, the layer's expert bias for selection, top-k
    /// (lowest index wins ties), weights the unbiased scores renormalised (`/ (sum + 1e-6)`)
    /// and scaled.
    SigmoidBiasTopK,
    /// GPT-OSS router on `RouterLogits` (bias included): top-k on the logits (lowest index
    /// wins ties), softmax over the k selected.
    TopKSoftmax,
    /// Gate and up projections of each token's selected experts: `H` → `Gate`, `Up` `[T·K, I]`
    /// (+ the experts' biases where they have them).
    ExpertGateUp,
    /// Shared experts' activation: `SharedAct = silu(Gate) ⊙ Up` `[T, I_shared]`.
    SharedSwiglu,
    /// GPT-OSS expert activation: `Act = (clamp(Up, ±L) + 1) · g · σ(α·g)` with
    /// `g = min(Gate, L)` (model-spec §5.5 step 8).
    ClampSwiglu,
    /// Down projection of each selected expert: `Act` → `ExpertOut` `[T·K, H]` (+ the down
    /// bias, before the routing weight).
    ExpertDown,
    /// `Out[t] = Σ_j w[t,j] · ExpertOut[t·K+j]`, f32 accumulation in slot order.
    Combine,
}

/// The fused kernels, each standing for one shape of primitive run (`patterns` builds them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fusion {
    /// `moe_mlp`: router projection + top-k (softmax, or the grouped sigmoid router).
    MoeRouter,
    /// `moe_mlp`: gate and up projections of the selected experts and SwiGLU.
    MoeGateUpSwiglu,
    /// `moe_mlp`: down projection of the selected experts, weighted combine (+ shared
    /// experts' output) and `X += Out`.
    MoeDownCombineAdd,
    /// `swiglu_mlp` / `shared_expert`: a dense gate and up projection and SwiGLU.
    GateUpSwiglu,
    /// `residual_norm`: `X += src`, then `dst = rmsnorm(X) ⊙ w`.
    AddRmsNorm,
    /// `residual_norm`: o_proj, the residual add and the post-attention norm.
    OProjAddRmsNorm,
    /// `qkv_proj`: two or three projections of `H` in one kernel (q, k, v; MLA: q_a or q,
    /// and kv_a).
    InProj,
    /// `norm_qkv`: the layer's input RMSNorm (`H = rmsnorm(X) ⊙ w`) and the q, k and v
    /// projections of `H` in one kernel (decode).
    NormInProj,
    /// `qk_norm_rope`: per-head q and k norms, RoPE and the KV-cache append.
    QkNormRopeKv,
    /// `qk_norm_rope` for MLA: the latent norm, RoPE of q_pe and k_pe, the latent-cache append.
    LatentNormRopeAppend,
    /// `conv_mixer`: LFM2's in_proj and gated short convolution (one token).
    ConvMixer,
}

impl Step {
    /// The primitive steps a fused (or packed) step stands for, in order (empty for a
    /// primitive step). A backend may run a fused step as these; the CPU reference does.
    pub fn components(&self) -> Vec<Step> {
        match self {
            Step::Fused { parts, .. } => parts.clone(),
            Step::Packed { step, .. } => vec![(**step).clone()],
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
            Step::RmsNorm { w, .. } | Step::HeadNorm { w, .. } => w.layer(),
            Step::Attn { layer, .. } | Step::Moe { layer, .. } => Some(*layer),
            Step::Fused { parts, .. } => parts.iter().find_map(Step::layer),
            Step::Packed { step, .. } => step.layer(),
            Step::Embed | Step::Add { .. } | Step::Swiglu | Step::LastRow => None,
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
            Step::Embed => "embed".into(),
            Step::Swiglu => "swiglu".into(),
            Step::LastRow => "last_row".into(),
            Step::Attn { op, .. } => op.name().into(),
            Step::Moe { op, .. } => op.name().into(),
            Step::Fused { op, parts } => format!("{} (fused)", op.name(parts)),
            Step::Packed { step, .. } => format!("{} [pack]", step.kind()),
        }
    }
}

impl AttnOp {
    /// The op's name in plans and profiles.
    pub fn name(self) -> &'static str {
        match self {
            AttnOp::Rope => "rope",
            AttnOp::KvAppend => "kv_append",
            AttnOp::Attention => "attention",
            AttnOp::MlaRope => "mla_rope",
            AttnOp::LatentAppend => "latent_append",
            AttnOp::MlaQAbsorb => "mla_q_absorb",
            AttnOp::MlaAttention => "mla_attention",
            AttnOp::MlaVUp => "mla_v_up",
            AttnOp::MlaAttentionExpanded => "mla_attention_expanded",
            AttnOp::ShortConv => "short_conv",
            AttnOp::SinkAttention => "sink_attention",
        }
    }
}

impl MoeOp {
    /// The op's name in plans and profiles.
    pub fn name(self) -> &'static str {
        match self {
            MoeOp::RouterTopK => "router_topk",
            MoeOp::SigmoidTopK => "sigmoid_topk",
            MoeOp::SigmoidBiasTopK => "sigmoid_bias_topk",
            MoeOp::TopKSoftmax => "topk_softmax",
            MoeOp::SharedSwiglu => "shared_swiglu",
            MoeOp::ClampSwiglu => "clamp_swiglu",
            MoeOp::ExpertGateUp => "expert_gate_up",
            MoeOp::ExpertDown => "expert_down",
            MoeOp::Combine => "combine",
        }
    }
}

impl Fusion {
    /// The fused kernel's name for these parts (the same kernel serves related runs: the
    /// sigmoid router, the shared-expert add, the shared experts' gate/up, MLA's in-proj).
    pub fn name(self, parts: &[Step]) -> String {
        let has = |f: &dyn Fn(&Step) -> bool| parts.iter().any(f);
        match self {
            Fusion::MoeRouter if has(&|s| matches!(s, Step::Moe { op: MoeOp::SigmoidTopK, .. })) => {
                "moe_sigmoid_router".into()
            }
            Fusion::MoeRouter if has(&|s| matches!(s, Step::Moe { op: MoeOp::SigmoidBiasTopK, .. })) => {
                "moe_sigmoid_bias_router".into()
            }
            Fusion::MoeRouter if has(&|s| matches!(s, Step::Moe { op: MoeOp::TopKSoftmax, .. })) => {
                "moe_topk_softmax_router".into()
            }
            Fusion::MoeRouter => "moe_router".into(),
            Fusion::MoeGateUpSwiglu if has(&|s| matches!(s, Step::Moe { op: MoeOp::ClampSwiglu, .. })) => {
                "moe_gate_up_clamp_swiglu".into()
            }
            Fusion::MoeGateUpSwiglu if has(&|s| matches!(s, Step::Linear { w: LinRef::SharedGate(_), .. })) => {
                "moe_shared_gate_up_swiglu".into()
            }
            Fusion::MoeGateUpSwiglu => "moe_gate_up_swiglu".into(),
            Fusion::MoeDownCombineAdd if has(&|s| matches!(s, Step::Add { src: Buf::SharedOut, .. })) => {
                "moe_down_combine_shared_add".into()
            }
            Fusion::MoeDownCombineAdd => "moe_down_combine_add".into(),
            Fusion::GateUpSwiglu if has(&|s| matches!(s, Step::Linear { w: LinRef::SharedGate(_), .. })) => {
                "shared_gate_up_swiglu".into()
            }
            Fusion::GateUpSwiglu => "dense_gate_up_swiglu".into(),
            Fusion::AddRmsNorm => match parts.get(1) {
                Some(Step::RmsNorm { w, .. }) => format!("add_rms_norm {}", w.role()),
                _ => "add_rms_norm".into(),
            },
            Fusion::OProjAddRmsNorm => "o_proj_add_rms_norm".into(),
            Fusion::InProj if has(&|s| matches!(s, Step::Linear { w: LinRef::KvA(_), .. })) => "mla_in_proj".into(),
            Fusion::InProj => "qkv_proj".into(),
            Fusion::NormInProj => "norm_qkv_proj".into(),
            Fusion::QkNormRopeKv => "qk_norm_rope_kv".into(),
            Fusion::LatentNormRopeAppend => "latent_norm_rope_append".into(),
            Fusion::ConvMixer => "conv_in_short_conv".into(),
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
            Step::Attn { layer, op } => write!(f, "{} (layer {layer})", op.name()),
            Step::Moe { layer, op } => write!(f, "{} (layer {layer})", op.name()),
            Step::Fused { op, parts } => {
                let ps: Vec<String> = parts.iter().map(|p| p.to_string()).collect();
                write!(f, "{} (fused: {})", op.name(parts), ps.join("; "))
            }
            Step::Packed { step, kernels } => {
                let ks: Vec<String> = kernels.iter().map(|k| format!("{} at {}", k.tag, k.bucket.name())).collect();
                write!(f, "{step} [pack: {}]", ks.join(", "))
            }
            Step::Embed => f.write_str("embed"),
            Step::Swiglu => f.write_str("swiglu"),
            Step::LastRow => f.write_str("last_row"),
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
            Family::Lfm2Moe => family::lfm2_moe::reference(cfg),
            Family::GptOss => family::gpt_oss::reference(cfg),
        }
    }

    /// The same plan with MLA attention in transformers' expanded form
    /// ([`Step::MlaAttentionExpanded`]) instead of the absorbed steps: the oracle that the
    /// absorbed form is checked against (same math, different rounding).
    pub fn with_expanded_mla(&self) -> Plan {
        let mut steps = Vec::with_capacity(self.steps.len());
        for s in self.primitives_only().steps {
            match s {
                Step::Attn { op: AttnOp::MlaQAbsorb | AttnOp::MlaVUp, .. } => {}
                Step::Attn { layer, op: AttnOp::MlaAttention } => {
                    steps.push(Step::Attn { layer, op: AttnOp::MlaAttentionExpanded })
                }
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
        let moe = p.steps.iter().filter(|s| matches!(s, Step::Moe { op: MoeOp::RouterTopK, .. })).count();
        let dense = p.steps.iter().filter(|s| matches!(s, Step::Linear { w: LinRef::DenseGate(_), .. })).count();
        assert_eq!((moe, dense), (2, 1));
        assert_eq!(p.steps.first(), Some(&Step::Embed));
        assert!(matches!(p.steps.last(), Some(Step::Linear { w: LinRef::LmHead, .. })));
    }
}
