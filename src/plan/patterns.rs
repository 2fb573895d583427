//! Patterns: rewrites of the reference plan that put one fused step in place of a run of
//! primitive steps (the seeds' `patch(model)`), and the per-family policy of which to use.
//!
//! Why rewrites of data: a pattern is a pure function from a plan to a plan, so what it
//! changes can be printed (`zmoe patterns`), unit-tested on the CPU and switched per pattern.
//! A fused step is defined by the run it replaces ([`Step::components`]): a rewrite only
//! fires where the plan holds exactly that run, and expanding every fused step gives back
//! the reference plan (tested). The CPU runs a fused step as its components; the CUDA
//! kernels of fused steps call the same device functions in the same order as the primitive
//! kernels, so patched logits are bit-identical to reference logits (tested on both).
//!
//! Every pattern here is bit-identical. A future variant that changes the order of a
//! reduction must be marked numerics-changing and may only become a default once
//! `zmoe validate` passes it on every fixture and preset.

use std::fmt;

use super::{AttnOp, Buf, Fusion, LinRef, MoeOp, NormRef, Plan, Step};
use crate::config::{Family, ModelConfig};
use crate::error::{Error, Result};

/// A plan rewrite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Pattern {
    /// Router + top-k in one kernel; expert gate+up+SwiGLU in one; down+combine+residual in one.
    MoeMlp,
    /// Dense MLP gate+up+SwiGLU in one kernel.
    SwigluMlp,
    /// The layer's input RMSNorm and its q, k and v projections in one kernel (decode).
    NormQkv,
    /// The q, k and v projections in one kernel (one launch instead of three).
    QkvProj,
    /// Per-head q/k norm + RoPE + KV-cache append in one kernel.
    QkNormRope,
    /// Residual add + the RMSNorm that follows it in one kernel.
    ResidualNorm,
    /// Shared experts' gate+up+SwiGLU in one kernel (GLM / DeepSeek).
    SharedExpert,
    /// LFM2's in_proj and gated short convolution in one kernel (decode).
    ConvMixer,
}

impl Pattern {
    /// Every pattern, in the order rewrites are applied (`moe_mlp` claims the residual add
    /// after the expert combine before `residual_norm` looks for adds; `norm_qkv` claims the
    /// q, k and v projections before `qkv_proj` does).
    pub const ALL: [Pattern; 8] = [
        Pattern::MoeMlp,
        Pattern::SwigluMlp,
        Pattern::NormQkv,
        Pattern::QkvProj,
        Pattern::QkNormRope,
        Pattern::ResidualNorm,
        Pattern::SharedExpert,
        Pattern::ConvMixer,
    ];

    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Pattern::MoeMlp => "moe_mlp",
            Pattern::SwigluMlp => "swiglu_mlp",
            Pattern::NormQkv => "norm_qkv",
            Pattern::QkvProj => "qkv_proj",
            Pattern::QkNormRope => "qk_norm_rope",
            Pattern::ResidualNorm => "residual_norm",
            Pattern::SharedExpert => "shared_expert",
            Pattern::ConvMixer => "conv_mixer",
        }
    }

    /// One line on what it fuses.
    pub fn summary(self) -> &'static str {
        match self {
            Pattern::MoeMlp => {
                "router+top-k | expert (+shared experts') gate+up+SwiGLU | expert (+shared) down+combine+residual add"
            }
            Pattern::SwigluMlp => "dense gate+up+SwiGLU",
            Pattern::NormQkv => "input RMSNorm + q, k and v projections (decode; GQA layers)",
            Pattern::QkvProj => "q, k and v projections (MLA: q_a/q and kv_a)",
            Pattern::QkNormRope => "q/k head norms + RoPE + KV-cache append (MLA: latent norm + RoPE + append)",
            Pattern::ResidualNorm => "residual add + RMSNorm (with o_proj before it after attention)",
            Pattern::SharedExpert => "shared experts' gate+up+SwiGLU (without moe_mlp; with it, moe_mlp's)",
            Pattern::ConvMixer => "short conv's in_proj + gating + causal conv + gating (one token)",
        }
    }

    /// Parses a CLI name.
    pub fn parse(s: &str) -> Result<Pattern> {
        Pattern::ALL.into_iter().find(|p| p.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Pattern::ALL.iter().map(|p| p.name()).collect();
            Error::Arg(format!("unknown pattern `{s}` (known: {}, or none)", names.join(", ")))
        })
    }

    /// The fused step this pattern would put at the start of `rest`, if `rest` starts with
    /// exactly the run of primitive steps that fused step stands for.
    fn fuse_at(self, rest: &[Step]) -> Option<Step> {
        use Buf::*;
        let lin = |w, src, dst| Step::Linear { w, src, dst };
        let moe = |layer, op| Step::Moe { layer, op };
        let attn = |layer, op| Step::Attn { layer, op };
        // The run each fused kernel stands for, given the step it starts at.
        let (op, parts): (Fusion, Vec<Step>) = match (self, rest.first()?) {
            (Pattern::MoeMlp, Step::Linear { w: LinRef::Router(l), .. }) => {
                let top_k = match rest.get(1)? {
                    Step::Moe {
                        op: op @ (MoeOp::SigmoidTopK | MoeOp::SigmoidBiasTopK | MoeOp::TopKSoftmax), ..
                    } => *op,
                    _ => MoeOp::RouterTopK,
                };
                (Fusion::MoeRouter, vec![lin(LinRef::Router(*l), H, RouterLogits), moe(*l, top_k)])
            }
            // With shared experts: theirs and the routed experts' gate/up in one kernel.
            (Pattern::MoeMlp, Step::Linear { w: LinRef::SharedGate(l), .. }) => (
                Fusion::MoeGateUpSwiglu,
                vec![
                    lin(LinRef::SharedGate(*l), H, Gate),
                    lin(LinRef::SharedUp(*l), H, Up),
                    moe(*l, MoeOp::SharedSwiglu),
                    moe(*l, MoeOp::ExpertGateUp),
                    Step::Swiglu,
                ],
            ),
            // ... and their down with the routed down, combine and residual.
            (Pattern::MoeMlp, Step::Linear { w: LinRef::SharedDown(l), .. }) => (
                Fusion::MoeDownCombineAdd,
                vec![
                    lin(LinRef::SharedDown(*l), SharedAct, SharedOut),
                    moe(*l, MoeOp::ExpertDown),
                    moe(*l, MoeOp::Combine),
                    Step::Add { dst: Out, src: SharedOut },
                    Step::Add { dst: X, src: Out },
                ],
            ),
            (Pattern::MoeMlp, Step::Moe { layer, op: MoeOp::ExpertGateUp }) => {
                // GPT-OSS's experts end in the clamped SwiGLU instead.
                let act = match rest.get(1)? {
                    Step::Moe { op: MoeOp::ClampSwiglu, .. } => moe(*layer, MoeOp::ClampSwiglu),
                    _ => Step::Swiglu,
                };
                (Fusion::MoeGateUpSwiglu, vec![moe(*layer, MoeOp::ExpertGateUp), act])
            }
            (Pattern::MoeMlp, Step::Moe { layer, op: MoeOp::ExpertDown }) => {
                let mut run = vec![moe(*layer, MoeOp::ExpertDown), moe(*layer, MoeOp::Combine)];
                if matches!(rest.get(2), Some(Step::Add { src: SharedOut, .. })) {
                    run.push(Step::Add { dst: Out, src: SharedOut });
                }
                run.push(Step::Add { dst: X, src: Out });
                (Fusion::MoeDownCombineAdd, run)
            }
            (Pattern::ConvMixer, Step::Linear { w: LinRef::ConvIn(l), .. }) => {
                (Fusion::ConvMixer, vec![lin(LinRef::ConvIn(*l), H, Bcx), attn(*l, AttnOp::ShortConv)])
            }
            (Pattern::SharedExpert, Step::Linear { w: LinRef::SharedGate(l), .. }) => (
                Fusion::GateUpSwiglu,
                vec![
                    lin(LinRef::SharedGate(*l), H, Gate),
                    lin(LinRef::SharedUp(*l), H, Up),
                    moe(*l, MoeOp::SharedSwiglu),
                ],
            ),
            (Pattern::SwigluMlp, Step::Linear { w: LinRef::DenseGate(l), .. }) => (
                Fusion::GateUpSwiglu,
                vec![lin(LinRef::DenseGate(*l), H, Gate), lin(LinRef::DenseUp(*l), H, Up), Step::Swiglu],
            ),
            (Pattern::NormQkv, Step::RmsNorm { w: NormRef::Input(l), src: X, dst: H }) => (
                Fusion::NormInProj,
                vec![
                    Step::RmsNorm { w: NormRef::Input(*l), src: X, dst: H },
                    lin(LinRef::Q(*l), H, Q),
                    lin(LinRef::K(*l), H, K),
                    lin(LinRef::V(*l), H, V),
                ],
            ),
            (Pattern::QkvProj, Step::Linear { w: LinRef::QA(l), .. }) => {
                (Fusion::InProj, vec![lin(LinRef::QA(*l), H, QA), lin(LinRef::KvA(*l), H, Kva)])
            }
            (Pattern::QkvProj, Step::Linear { w: LinRef::Q(l), .. })
                if matches!(rest.get(1), Some(Step::Linear { w: LinRef::KvA(_), .. })) =>
            {
                (Fusion::InProj, vec![lin(LinRef::Q(*l), H, Q), lin(LinRef::KvA(*l), H, Kva)])
            }
            (Pattern::QkvProj, Step::Linear { w: LinRef::Q(l), .. }) => {
                (Fusion::InProj, vec![lin(LinRef::Q(*l), H, Q), lin(LinRef::K(*l), H, K), lin(LinRef::V(*l), H, V)])
            }
            (Pattern::QkNormRope, Step::RmsNorm { w: NormRef::KvLatent(l), .. }) => (
                Fusion::LatentNormRopeAppend,
                vec![
                    Step::RmsNorm { w: NormRef::KvLatent(*l), src: Kva, dst: Kva },
                    attn(*l, AttnOp::MlaRope),
                    attn(*l, AttnOp::LatentAppend),
                ],
            ),
            (Pattern::QkNormRope, Step::HeadNorm { w: NormRef::QHead(l), .. }) => (
                Fusion::QkNormRopeKv,
                vec![
                    Step::HeadNorm { w: NormRef::QHead(*l), buf: Q },
                    Step::HeadNorm { w: NormRef::KHead(*l), buf: K },
                    attn(*l, AttnOp::Rope),
                    attn(*l, AttnOp::KvAppend),
                ],
            ),
            (Pattern::ResidualNorm, Step::Linear { w: LinRef::O(l), .. }) => (
                Fusion::OProjAddRmsNorm,
                vec![
                    lin(LinRef::O(*l), Attn, Out),
                    Step::Add { dst: X, src: Out },
                    Step::RmsNorm { w: NormRef::Post(*l), src: X, dst: H },
                ],
            ),
            (Pattern::ResidualNorm, Step::Add { dst: X, src }) => match rest.get(1)? {
                Step::RmsNorm { w, src: X, dst } => (
                    Fusion::AddRmsNorm,
                    vec![Step::Add { dst: X, src: *src }, Step::RmsNorm { w: *w, src: X, dst: *dst }],
                ),
                _ => return None,
            },
            _ => return None,
        };
        rest.starts_with(&parts).then_some(Step::Fused { op, parts })
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A family's patterns: the defaults, and the ones left out with the reason.
#[derive(Debug, Clone, PartialEq)]
pub struct FamilyPolicy {
    /// Applied when the user names none.
    pub defaults: Vec<Pattern>,
    /// Not applied by default: `(pattern, reason)`; the user may still ask for them.
    pub excluded: Vec<(Pattern, &'static str)>,
}

impl FamilyPolicy {
    /// Every pattern is a default except the `excluded` ones.
    fn excluding(excluded: Vec<(Pattern, &'static str)>) -> FamilyPolicy {
        let defaults = Pattern::ALL.into_iter().filter(|p| !excluded.iter().any(|(x, _)| x == p)).collect();
        FamilyPolicy { defaults, excluded }
    }
}

/// The policy of a family (the seeds' `_PERF_EXCLUDES` / `_FIDELITY_EXCLUDES`).
pub fn policy(family: Family) -> FamilyPolicy {
    const NO_SHARED: (Pattern, &str) = (Pattern::SharedExpert, "no shared experts in this family");
    const NO_CONV: (Pattern, &str) = (Pattern::ConvMixer, "no short-conv layers in this family");
    // Bit-identical by construction, opt-in until measured on a GPU (bench/RESULTS.md session 15).
    const NORM_QKV: (Pattern, &str) = (Pattern::NormQkv, "opt-in (--patterns): not yet measured on a GPU");
    FamilyPolicy::excluding(match family {
        // All five are bit-identical; measured on the H200 (bench/RESULTS.md, "patched vs
        // reference"), none costs speed on the qwen3-30b-a3b preset.
        Family::Qwen3Moe => vec![NO_SHARED, NO_CONV, NORM_QKV],
        // The same six, in their MLA / sigmoid-router / shared-expert forms (bit-identical).
        Family::Glm4MoeLite | Family::DeepseekV3 => vec![NO_CONV, NORM_QKV],
        // LFM2: the Qwen3 five on its attention layers, its dense and MoE FFNs; o_proj +
        // residual + norm also after every short conv (its out_proj is the layer's `O`).
        // conv_mixer is bit-identical but opt-in until its decode speedup is measured on a GPU.
        Family::Lfm2Moe => {
            vec![
                NO_SHARED,
                (Pattern::ConvMixer, "opt-in (--patterns): measured 0.985x decode on an H100 (lfm2-8b-a1b)"),
                NORM_QKV,
            ]
        }
        // GPT-OSS: its router (top-k on logits, softmax over k) and clamped SwiGLU in the
        // moe_mlp kernels, the biased q/k/v projections in one, o_proj + residual + norm.
        Family::GptOss => vec![
            (Pattern::SwigluMlp, "no dense MLP layers in this family"),
            (Pattern::QkNormRope, "no q/k norms in this family (RoPE and the KV append stay two steps)"),
            NO_SHARED,
            NO_CONV,
            NORM_QKV,
        ],
    })
}

/// What the user asked for on the command line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selection {
    /// `--patterns a,b` (`none` = the empty list); `None` = the family defaults.
    pub patterns: Option<Vec<Pattern>>,
    /// `--exclude c,d`, removed from either.
    pub exclude: Vec<Pattern>,
}

impl Selection {
    /// Parses `--patterns` and `--exclude` values (comma-separated names; `none`).
    pub fn parse(patterns: Option<&str>, exclude: Option<&str>) -> Result<Selection> {
        let list = |s: &str| -> Result<Vec<Pattern>> {
            let s = s.trim();
            if s == "none" || s.is_empty() {
                return Ok(Vec::new());
            }
            s.split(',').map(|p| Pattern::parse(p.trim())).collect()
        };
        Ok(Selection {
            patterns: patterns.map(list).transpose()?,
            exclude: exclude.map(list).transpose()?.unwrap_or_default(),
        })
    }

    /// The reference plan: no patterns.
    pub fn none() -> Selection {
        Selection { patterns: Some(Vec::new()), exclude: Vec::new() }
    }

    /// The patterns to apply for `family`, in application order.
    pub fn resolve(&self, family: Family) -> Vec<Pattern> {
        let chosen = self.patterns.clone().unwrap_or_else(|| policy(family).defaults);
        Pattern::ALL.into_iter().filter(|p| chosen.contains(p) && !self.exclude.contains(p)).collect()
    }
}

/// One fused step put into a plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// The pattern.
    pub pattern: Pattern,
    /// The fused step.
    pub step: Step,
}

/// Applies `patterns` (in [`Pattern::ALL`] order) to `plan`; returns the patched plan and
/// every fused step it put in.
pub fn apply(plan: &Plan, patterns: &[Pattern]) -> (Plan, Vec<Applied>) {
    let mut steps = plan.steps.clone();
    let mut applied = Vec::new();
    for pattern in Pattern::ALL.into_iter().filter(|p| patterns.contains(p)) {
        let mut out = Vec::with_capacity(steps.len());
        let mut i = 0;
        while i < steps.len() {
            match pattern.fuse_at(&steps[i..]) {
                Some(fused) => {
                    i += fused.components().len();
                    applied.push(Applied { pattern, step: fused.clone() });
                    out.push(fused);
                }
                None => {
                    out.push(steps[i].clone());
                    i += 1;
                }
            }
        }
        steps = out;
    }
    let mut names: Vec<&str> =
        Pattern::ALL.iter().filter(|p| applied.iter().any(|a| a.pattern == **p)).map(|p| p.name()).collect();
    if names.is_empty() {
        names.push("reference");
    }
    (Plan { name: names.join("+"), steps }, applied)
}

/// The plan a model runs for a selection: the reference plan with the selected patterns.
pub fn patched_plan(cfg: &ModelConfig, sel: &Selection) -> (Plan, Vec<Applied>) {
    apply(&Plan::reference(cfg), &sel.resolve(cfg.family))
}

/// Expands every fused step into its components (the inverse of [`apply`]).
pub fn expand(plan: &Plan) -> Plan {
    Plan { name: "reference".into(), steps: plan.steps.iter().flat_map(Step::primitives).collect() }
}

/// Primitive steps inside the fused steps of `plan`.
pub fn fused_primitives(plan: &Plan) -> usize {
    plan.steps.iter().filter(|s| !s.components().is_empty()).map(|s| s.primitives().len()).sum()
}

/// `0-3,5,7-9` for a sorted list of layers.
fn ranges(layers: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < layers.len() {
        let mut j = i;
        while j + 1 < layers.len() && layers[j + 1] == layers[j] + 1 {
            j += 1;
        }
        out.push(if i == j { layers[i].to_string() } else { format!("{}-{}", layers[i], layers[j]) });
        i = j + 1;
    }
    out.join(",")
}

/// Why `pattern` fused nothing in `layer` (with the `chosen` patterns).
fn not_applied_reason(cfg: &ModelConfig, pattern: Pattern, layer: usize, chosen: &[Pattern]) -> &'static str {
    let moe = cfg.is_moe_layer(layer);
    match pattern {
        Pattern::MoeMlp if !moe => "dense MLP layer (no router)",
        Pattern::SwigluMlp if moe => "MoE layer (its MLP is moe_mlp's)",
        Pattern::SharedExpert if cfg.n_shared_experts == 0 => "the family has no shared experts",
        Pattern::SharedExpert if !moe => "dense MLP layer (no shared experts)",
        Pattern::SharedExpert if chosen.contains(&Pattern::MoeMlp) => {
            "MoE layer (moe_mlp runs the shared experts with the routed experts' kernels)"
        }
        Pattern::QkvProj | Pattern::QkNormRope if cfg.is_conv_layer(layer) => "short-conv layer (no attention)",
        Pattern::ConvMixer if !cfg.is_conv_layer(layer) => "attention layer (no short conv)",
        Pattern::QkNormRope if cfg.gpt_oss.is_some() => "no q/k head norms (GPT-OSS)",
        _ => "the steps it replaces are not in this layer's plan",
    }
}

/// The text `zmoe patterns` prints: the family policy, what the selection resolves to, and
/// per pattern the layers it fuses and why it leaves the others.
pub fn describe(cfg: &ModelConfig, sel: &Selection) -> String {
    let pol = policy(cfg.family);
    let chosen = sel.resolve(cfg.family);
    let (plan, applied) = patched_plan(cfg, sel);
    let reference = Plan::reference(cfg);
    let mut out = format!(
        "family {} — {} layers ({} MoE); reference plan {} steps, patched plan `{}` {} steps\n",
        cfg.family.model_type(),
        cfg.num_layers,
        (0..cfg.num_layers).filter(|&l| cfg.is_moe_layer(l)).count(),
        reference.steps.len(),
        plan.name,
        plan.steps.len()
    );
    for p in Pattern::ALL {
        let status = if chosen.contains(&p) {
            if pol.defaults.contains(&p) { "on (family default)" } else { "on (requested)" }
        } else if sel.exclude.contains(&p) {
            "off (--exclude)"
        } else if let Some((_, why)) = pol.excluded.iter().find(|(e, _)| *e == p) {
            if sel.patterns.is_none() { why } else { "off (not requested)" }
        } else if sel.patterns.is_some() {
            "off (not requested)"
        } else {
            "off"
        };
        out += &format!("\n{:<14} {status}\n  fuses: {}; numerics: bit-identical\n", p.name(), p.summary());
        if !chosen.contains(&p) {
            continue;
        }
        let mine: Vec<&Applied> = applied.iter().filter(|a| a.pattern == p).collect();
        let mut layers: Vec<usize> = mine.iter().filter_map(|a| a.step.layer()).collect();
        layers.dedup();
        let global = mine.iter().filter(|a| a.step.layer().is_none()).count();
        if mine.is_empty() {
            out += "  applied: nowhere\n";
        } else {
            out += &format!(
                "  applied: {} fused steps, each replacing {} primitive steps, layers {}{}\n",
                mine.len(),
                {
                    let mut n: Vec<usize> = mine.iter().map(|a| a.step.primitives().len()).collect();
                    n.sort();
                    n.dedup();
                    n.iter().map(|k| k.to_string()).collect::<Vec<_>>().join(" or ")
                },
                if layers.is_empty() { "none".into() } else { ranges(&layers) },
                if global > 0 { format!(" (+{global} outside layers)") } else { String::new() }
            );
        }
        let mut why: Vec<(&str, Vec<usize>)> = Vec::new();
        for l in (0..cfg.num_layers).filter(|l| !layers.contains(l)) {
            let r = not_applied_reason(cfg, p, l, &chosen);
            match why.iter_mut().find(|(w, _)| *w == r) {
                Some((_, ls)) => ls.push(l),
                None => why.push((r, vec![l])),
            }
        }
        for (r, ls) in why {
            out += &format!("  not in layers {}: {r}\n", ranges(&ls));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg(extra: &str) -> ModelConfig {
        ModelConfig::parse(
            &format!(
                r#"{{"model_type":"qwen3_moe","vocab_size":64,"hidden_size":32,"num_hidden_layers":4,
               "num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,"num_experts":8,
               "num_experts_per_tok":2,"moe_intermediate_size":16,"intermediate_size":48{extra}}}"#
            ),
            Path::new("config.json"),
        )
        .unwrap()
    }

    #[test]
    fn every_subset_expands_back_to_the_reference() {
        let c = cfg(r#","mlp_only_layers":[1]"#);
        let reference = Plan::reference(&c);
        for mask in 0..1u32 << Pattern::ALL.len() {
            let pats: Vec<Pattern> =
                Pattern::ALL.into_iter().enumerate().filter(|(i, _)| mask >> i & 1 == 1).map(|(_, p)| p).collect();
            let (plan, applied) = apply(&reference, &pats);
            assert_eq!(expand(&plan).steps, reference.steps, "{pats:?}");
            let replaced: usize = applied.iter().map(|a| a.step.components().len() - 1).sum();
            assert_eq!(plan.steps.len() + replaced, reference.steps.len());
            // qkv_proj finds nothing left where norm_qkv took every layer's projections.
            let claimed = |p: Pattern| p == Pattern::QkvProj && pats.contains(&Pattern::NormQkv);
            for p in pats.iter().filter(|&&p| !matches!(p, Pattern::SharedExpert | Pattern::ConvMixer) && !claimed(p)) {
                assert!(applied.iter().any(|a| a.pattern == *p), "{p} fused nothing");
            }
        }
    }

    #[test]
    fn mla_subsets_expand_back_and_every_pattern_fires() {
        for q_lora in ["128", "null"] {
            let c = ModelConfig::parse(
                &format!(
                    r#"{{"model_type":"glm4_moe_lite","vocab_size":64,"hidden_size":64,"num_hidden_layers":3,
                       "num_attention_heads":2,"q_lora_rank":{q_lora},"kv_lora_rank":32,"qk_nope_head_dim":16,
                       "qk_rope_head_dim":8,"v_head_dim":16,"n_routed_experts":8,"num_experts_per_tok":2,
                       "moe_intermediate_size":16,"intermediate_size":48}}"#
                ),
                std::path::Path::new("config.json"),
            )
            .unwrap();
            let reference = Plan::reference(&c);
            for mask in 0..1u32 << Pattern::ALL.len() {
                let pats: Vec<Pattern> =
                    Pattern::ALL.into_iter().enumerate().filter(|(i, _)| mask >> i & 1 == 1).map(|(_, p)| p).collect();
                let (plan, applied) = apply(&reference, &pats);
                assert_eq!(expand(&plan).steps, reference.steps, "{pats:?}");
                // moe_mlp claims the shared experts' gate/up (with the routed experts').
                let claimed = |p: Pattern| p == Pattern::SharedExpert && pats.contains(&Pattern::MoeMlp);
                // norm_qkv is for GQA layers (q, k, v): MLA's in-projection is two matrices.
                for p in pats.iter().filter(|&&p| !matches!(p, Pattern::ConvMixer | Pattern::NormQkv) && !claimed(p)) {
                    assert!(applied.iter().any(|a| a.pattern == *p), "{p} fused nothing (q_lora {q_lora})");
                }
            }
            let (plan, _) = apply(&reference, &Pattern::ALL);
            let kinds: Vec<String> = plan.steps.iter().map(Step::kind).collect();
            for k in [
                "moe_sigmoid_router (fused)",
                "moe_shared_gate_up_swiglu (fused)",
                "moe_down_combine_shared_add (fused)",
                "latent_norm_rope_append (fused)",
                "mla_in_proj (fused)",
            ] {
                assert!(kinds.iter().any(|x| x == k), "{k} missing (q_lora {q_lora})");
            }
            let has = |f: fn(&Step) -> bool| plan.steps.iter().any(f);
            assert!(!has(|s| matches!(s, Step::Moe { op: MoeOp::SigmoidTopK | MoeOp::Combine, .. })));
            // Three kernels a MoE layer's MLP: no shared-expert step of its own.
            assert!(!has(|s| matches!(s, Step::Linear { w: LinRef::SharedDown(_), .. })));
            assert!(!has(|s| matches!(s, Step::Fused { op: Fusion::GateUpSwiglu, parts }
                if parts.iter().any(|p| matches!(p, Step::Linear { w: LinRef::SharedGate(_), .. })))));
        }
    }

    #[test]
    fn gpt_oss_subsets_expand_back_and_policy_patterns_fire() {
        let json = crate::checkpoint::synth::preset_config("gpt_oss", "gpt-oss-tiny").unwrap();
        let c = ModelConfig::parse(&json.to_string(), Path::new("config.json")).unwrap();
        let reference = Plan::reference(&c);
        for mask in 0..1u32 << Pattern::ALL.len() {
            let pats: Vec<Pattern> =
                Pattern::ALL.into_iter().enumerate().filter(|(i, _)| mask >> i & 1 == 1).map(|(_, p)| p).collect();
            let (plan, _) = apply(&reference, &pats);
            assert_eq!(expand(&plan).steps, reference.steps, "{pats:?}");
        }
        let (plan, applied) = patched_plan(&c, &Selection::default());
        let count = |p: Pattern| applied.iter().filter(|a| a.pattern == p).count();
        // 4 layers × (router, gate/up + clamped SwiGLU, down + combine + add); q/k/v per layer;
        // o_proj + add + norm per layer and the MoE add feeding the next input norm: none
        // (moe_mlp claims it).
        assert_eq!((count(Pattern::MoeMlp), count(Pattern::QkvProj), count(Pattern::ResidualNorm)), (12, 4, 4));
        let kinds: Vec<String> = plan.steps.iter().map(Step::kind).collect();
        for k in ["moe_topk_softmax_router (fused)", "moe_gate_up_clamp_swiglu (fused)", "qkv_proj (fused)"] {
            assert!(kinds.iter().any(|x| x == k), "{k} missing: {kinds:?}");
        }
        assert!(!plan.steps.iter().any(|s| matches!(s, Step::Moe { op: MoeOp::TopKSoftmax | MoeOp::ClampSwiglu, .. })));
        let text = describe(&c, &Selection::default());
        assert!(text.contains("no q/k norms in this family"), "{text}");
    }

    #[test]
    fn all_patterns_fuse_where_expected() {
        let c = cfg(r#","mlp_only_layers":[1]"#);
        // Every pattern but the opt-in norm_qkv (which takes qkv_proj's place: checked below).
        let all: Vec<Pattern> = Pattern::ALL.into_iter().filter(|p| *p != Pattern::NormQkv).collect();
        let (plan, applied) = apply(&Plan::reference(&c), &all);
        let count = |p: Pattern| applied.iter().filter(|a| a.pattern == p).count();
        // 3 MoE layers × 3 fused steps; 1 dense layer; 4 layers of q/k norm + rope.
        assert_eq!((count(Pattern::MoeMlp), count(Pattern::SwigluMlp), count(Pattern::QkNormRope)), (9, 1, 4));
        // o_proj + add + post norm in every layer (4) and the dense layer 0's MLP add feeding
        // layer 1's input norm (1). Not after moe_mlp's down step (its residual add is inside
        // it; folding the next norm in too measured slower: bench/RESULTS.md), not the last
        // layer's (last_row comes first).
        assert_eq!(count(Pattern::ResidualNorm), 5);
        let fused = |op: Fusion, layer: usize| {
            plan.steps.iter().any(|s| matches!(s, Step::Fused { op: o, .. } if *o == op && s.layer() == Some(layer)))
        };
        assert!(fused(Fusion::OProjAddRmsNorm, 0));
        assert_eq!(count(Pattern::QkvProj), 4);
        assert_eq!(plan.name, "moe_mlp+swiglu_mlp+qkv_proj+qk_norm_rope+residual_norm");
        assert!(fused(Fusion::MoeDownCombineAdd, 3));
        assert_eq!(
            fused_primitives(&plan),
            expand(&plan).steps.len() - plan.steps.iter().filter(|s| s.components().is_empty()).count()
        );
        // norm_qkv claims each layer's input norm and q/k/v before qkv_proj and residual_norm
        // look (layer 1's input norm then no longer joins the dense MLP's residual add).
        let (plan, applied) = apply(&Plan::reference(&c), &Pattern::ALL);
        let count = |p: Pattern| applied.iter().filter(|a| a.pattern == p).count();
        assert_eq!((count(Pattern::NormQkv), count(Pattern::QkvProj), count(Pattern::ResidualNorm)), (4, 0, 4));
        assert!((0..4).all(|l| {
            plan.steps.iter().any(|s| matches!(s, Step::Fused { op: Fusion::NormInProj, .. }) && s.layer() == Some(l))
        }));
        assert_eq!(expand(&plan).steps, Plan::reference(&c).steps);
    }

    #[test]
    fn selection_and_policy() {
        let c = cfg("");
        assert_eq!(Selection::default().resolve(c.family), policy(c.family).defaults);
        let s = Selection::parse(Some("residual_norm, moe_mlp"), None).unwrap();
        assert_eq!(s.resolve(c.family), vec![Pattern::MoeMlp, Pattern::ResidualNorm]);
        let s = Selection::parse(None, Some("moe_mlp")).unwrap();
        assert!(!s.resolve(c.family).contains(&Pattern::MoeMlp));
        assert!(Selection::parse(Some("none"), None).unwrap().resolve(c.family).is_empty());
        let e = Selection::parse(Some("moe_mlp,fast"), None).unwrap_err().to_string();
        assert!(e.contains("unknown pattern `fast`") && e.contains("residual_norm"), "{e}");
        let (plan, applied) = patched_plan(&c, &Selection::none());
        assert!(applied.is_empty());
        assert_eq!(plan, Plan::reference(&c));
    }

    #[test]
    fn describe_names_layers_and_reasons() {
        let c = cfg(r#","mlp_only_layers":[1]"#);
        let text = describe(&c, &Selection::default());
        assert!(text.contains("moe_mlp        on (family default)"), "{text}");
        assert!(text.contains("layers 0,2-3"), "{text}");
        assert!(text.contains("not in layers 1: dense MLP layer (no router)"), "{text}");
        assert!(text.contains("not in layers 0,2-3: MoE layer"), "{text}");
        let text = describe(&c, &Selection::parse(None, Some("qk_norm_rope")).unwrap());
        assert!(text.contains("qk_norm_rope   off (--exclude)"), "{text}");
        assert_eq!(ranges(&[0, 1, 2, 4, 6, 7]), "0-2,4,6-7");
    }
}
