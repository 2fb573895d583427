//! `config.json` → [`ModelConfig`].
//!
//! Real checkpoints come from transformers 4.x and 5.x and from mlx-lm's converter, which
//! spell the same field several ways (`rope_theta` vs `rope_parameters.rope_theta`,
//! `num_experts` vs `num_local_experts`, `torch_dtype` vs `dtype`). We read the JSON as an
//! untyped value and pull each field through one accessor that knows its aliases, so an
//! absent or mistyped field produces an error naming the file and the field instead of a
//! serde message about line/column.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

/// The model families zmoe knows how to build a plan for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Qwen3-MoE (`model_type: "qwen3_moe"`), e.g. Qwen3-30B-A3B.
    Qwen3Moe,
    /// GLM-4.7-Flash (`glm4_moe_lite`): MLA attention, sigmoid grouped router, shared experts.
    Glm4MoeLite,
    /// DeepSeek-V3 (`deepseek_v3`) and Kimi-K2 (`kimi_k2`, the same architecture): the GLM
    /// code path with `first_k_dense_replace` choosing the dense layers.
    DeepseekV3,
    /// LFM2-MoE (`lfm2_moe`, LFM2-8B-A1B / LFM2-24B-A2B): gated short-convolution layers
    /// beside GQA layers, a sigmoid router with an expert bias (model-spec §4).
    Lfm2Moe,
    /// GPT-OSS (`gpt_oss`, gpt-oss-20b / 120b): attention sinks, alternating sliding-window
    /// and full layers, biases everywhere, top-k-then-softmax router, clamped SwiGLU.
    GptOss,
}

impl Family {
    /// The `model_type` string in config.json.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Qwen3Moe => "qwen3_moe",
            Family::Glm4MoeLite => "glm4_moe_lite",
            Family::DeepseekV3 => "deepseek_v3",
            Family::Lfm2Moe => "lfm2_moe",
            Family::GptOss => "gpt_oss",
        }
    }

    /// Parses a `model_type` string (`kimi_k2` is read as `deepseek_v3`).
    pub fn from_model_type(s: &str) -> Option<Family> {
        match s {
            "qwen3_moe" => Some(Family::Qwen3Moe),
            "glm4_moe_lite" => Some(Family::Glm4MoeLite),
            "deepseek_v3" | "kimi_k2" => Some(Family::DeepseekV3),
            "lfm2_moe" => Some(Family::Lfm2Moe),
            "gpt_oss" => Some(Family::GptOss),
            _ => None,
        }
    }

    /// Whether the family uses multi-head latent attention and the sigmoid router.
    pub fn is_mla(self) -> bool {
        matches!(self, Family::Glm4MoeLite | Family::DeepseekV3)
    }
}

/// The `model_type` values zmoe reads, for error messages.
pub const SUPPORTED_MODEL_TYPES: &str = "qwen3_moe, glm4_moe_lite, deepseek_v3, kimi_k2, lfm2_moe, gpt_oss";

/// The largest sizes zmoe reads from a config.json, checked as each field is read, before
/// anything is allocated from it. They admit every real model with a wide margin
/// (DeepSeek-V3 / Kimi-K2: 61 layers, hidden 7168, 128 heads, 256 / 384 experts, vocab
/// 163,840) and keep every product of them — parameter counts, byte sizes — far below
/// `u64::MAX`; [`MAX_PARAMS`] bounds the product of them all (checked arithmetic).
pub mod limits {
    /// `num_hidden_layers` (and `num_nextn_predict_layers`).
    pub const MAX_LAYERS: usize = 1024;
    /// `hidden_size`.
    pub const MAX_HIDDEN: usize = 1 << 16;
    /// `num_attention_heads`, `num_key_value_heads`.
    pub const MAX_HEADS: usize = 1024;
    /// `head_dim`, MLA's `qk_nope_head_dim`, `qk_rope_head_dim` and `v_head_dim`.
    pub const MAX_HEAD_DIM: usize = 4096;
    /// `vocab_size` (2^24).
    pub const MAX_VOCAB: usize = 1 << 24;
    /// Routed experts per layer.
    pub const MAX_EXPERTS: usize = 4096;
    /// `n_shared_experts`.
    pub const MAX_SHARED_EXPERTS: usize = 64;
    /// `intermediate_size`, `moe_intermediate_size` (2^20).
    pub const MAX_FFN: usize = 1 << 20;
    /// MLA's `kv_lora_rank` and `q_lora_rank`.
    pub const MAX_LORA_RANK: usize = 1 << 16;
    /// `max_position_embeddings` (2^24).
    pub const MAX_POSITIONS: usize = 1 << 24;
    /// LFM2's `conv_L_cache` (the short convolution's kernel width; 3 in every release).
    pub const MAX_CONV_KERNEL: usize = 64;
    /// Weight elements of the whole model (2^44, about 17.6 trillion).
    pub const MAX_PARAMS: u64 = 1 << 44;
}

/// Multi-head latent attention dimensions (model-spec §3.4).
#[derive(Debug, Clone, PartialEq)]
pub struct MlaConfig {
    /// Rank of the query down-projection (`None`: a plain `q_proj`).
    pub q_lora_rank: Option<usize>,
    /// Width of the cached KV latent `c`.
    pub kv_lora_rank: usize,
    /// Per-head query/key dims without RoPE.
    pub qk_nope_head_dim: usize,
    /// Per-head dims with RoPE (the shared `k_pe` has this width).
    pub qk_rope_head_dim: usize,
    /// Per-head value width.
    pub v_head_dim: usize,
    /// Epsilon of `q_a_layernorm` / `kv_a_layernorm`: the RMSNorm class default 1e-6 in
    /// transformers, not `rms_norm_eps` (model-spec §3.8).
    pub latent_norm_eps: f32,
}

impl MlaConfig {
    /// Query/key head width `qk_nope + qk_rope`.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Cached floats per token and layer: the latent and the roped key `[kv_lora | k_pe]`.
    pub fn cache_row(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }
}

/// GPT-OSS specifics (model-spec §5.1): which layers attend through a sliding window, and
/// the clamped SwiGLU of its experts.
#[derive(Debug, Clone, PartialEq)]
pub struct GptOssConfig {
    /// Keys a sliding layer sees, the current token included (`sliding_window`, 128 released).
    pub sliding_window: usize,
    /// Per layer: `layer_types[l] == "sliding_attention"` (default: even layers).
    pub sliding: Vec<bool>,
    /// `swiglu_limit`: the gate is clamped from above and the linear branch to ±limit.
    pub swiglu_limit: f32,
    /// `swiglu_alpha` (1.702): `glu = g · σ(alpha · g)`.
    pub swiglu_alpha: f32,
}

/// How a MoE layer picks its experts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RouterKind {
    /// Qwen3: softmax over experts, top-k, optional renormalisation (model-spec §2.5).
    Softmax,
    /// GLM / DeepSeek-V3 (model-spec §3.6): sigmoid scores; selection on scores plus the
    /// correction bias, limited to the `topk_group` best of `n_group` groups; weights are
    /// the unbiased scores, optionally renormalised, times `routed_scaling_factor`.
    SigmoidGrouped {
        /// Expert groups.
        n_group: usize,
        /// Groups kept per token.
        topk_group: usize,
        /// Multiplier of the routing weights.
        routed_scaling_factor: f32,
    },
    /// LFM2-MoE (model-spec §4.5): sigmoid scores; selection on scores plus the layer's
    /// `expert_bias` (when `use_expert_bias`); weights are the unbiased scores, optionally
    /// renormalised (`/ (sum + 1e-6)`), times `routed_scaling_factor`.
    SigmoidBias {
        /// Whether the layers carry an `expert_bias` used for selection.
        expert_bias: bool,
        /// Multiplier of the routing weights.
        routed_scaling_factor: f32,
    },
    /// GPT-OSS (model-spec §5.5 step 7): top-k on the raw logits (router bias included),
    /// then softmax over the k selected logits.
    TopKSoftmax,
}

/// LFM2's gated short convolution (model-spec §4.4): which layers use it instead of
/// attention and the kernel's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ShortConvConfig {
    /// Per layer: a short-convolution mixer (`true`) or GQA attention (`false`), from
    /// `layer_types` (`"conv"` / `"full_attention"`) or the older `full_attn_idxs`.
    pub layers: Vec<bool>,
    /// Kernel width `L` (`conv_L_cache`); the cache holds the last `L − 1` gated inputs.
    pub kernel: usize,
    /// `conv_bias`: in_proj, the convolution and out_proj carry biases.
    pub bias: bool,
}

impl ShortConvConfig {
    /// Values the conv state keeps per channel: the last `L − 1` gated inputs `B ⊙ X`.
    pub fn state_len(&self) -> usize {
        self.kernel - 1
    }
}

/// How one module's weights are quantized (MLX conventions, model-spec §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantParams {
    /// Affine (scale·q + bias) or MXFP4 (E2M1 codes, E8M0 scales).
    pub mode: QuantMode,
    /// Bits per weight (affine: 2–8; mxfp4: 4).
    pub bits: u32,
    /// Elements per scale group along the input axis.
    pub group_size: usize,
}

/// MLX quantization mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantMode {
    /// `w = scale · q + bias`, q unsigned.
    Affine,
    /// OCP MX FP4: E2M1 codes, one E8M0 exponent per 32 elements.
    Mxfp4,
}

/// The `quantization` block of an MLX config: global parameters plus per-module overrides.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantConfig {
    /// Parameters for every quantized module without an override.
    pub default: QuantParams,
    /// MLX module path → override (`None` = this module is not quantized).
    pub overrides: BTreeMap<String, Option<QuantParams>>,
}

impl QuantConfig {
    /// The quantization of module `path` (e.g. `model.layers.0.mlp.gate`), if its weights are
    /// stored quantized. VLM wrappers prefix `language_model.`; both spellings are looked up.
    pub fn for_module(&self, path: &str) -> Option<QuantParams> {
        let prefixed = format!("language_model.{path}");
        match self.overrides.get(path).or_else(|| self.overrides.get(&prefixed)) {
            Some(o) => *o,
            None => Some(self.default),
        }
    }
}

/// RoPE parameters: the default rope type, or YaRN (DeepSeek-V3, Kimi-K2).
///
/// The frequency table is computed once here (in f32, as transformers does) so that every
/// backend rotates with the same numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    /// Base θ of the inverse frequencies.
    pub theta: f64,
    /// Rotated dims per head (`head_dim · partial_rotary_factor`).
    pub dim: usize,
    /// Pairing: `(x[2i], x[2i+1])` (GPT-J, GLM/DeepSeek) instead of `(x[i], x[i+d/2])`.
    pub interleaved: bool,
    /// `inv_freq [dim/2]` (YaRN-blended when scaled).
    pub inv_freq: Vec<f32>,
    /// Multiplier of cos and sin (YaRN `attention_factor`; 1 for the default type).
    pub attention_scaling: f32,
    /// YaRN's softmax-scale factor `mscale(factor, mscale_all_dim)²` (1 when unused).
    pub softmax_mscale: f32,
    /// The YaRN parameters the three fields above were derived from (`None`: default type).
    pub yarn: Option<YarnParams>,
}

/// YaRN's parameters as config.json gives them (defaults filled in). The backends use only
/// the derived [`RopeConfig`] numbers; these are kept for writers of other engines' formats
/// (GGUF), which describe the same rotation by its parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct YarnParams {
    /// Context extension factor.
    pub factor: f64,
    /// `original_max_position_embeddings`.
    pub original_max_position_embeddings: f64,
    /// Ramp bound in rotations (default 32).
    pub beta_fast: f64,
    /// Ramp bound in rotations (default 1).
    pub beta_slow: f64,
    /// `mscale`, if given (non-zero).
    pub mscale: Option<f64>,
    /// `mscale_all_dim`, if given (non-zero).
    pub mscale_all_dim: Option<f64>,
    /// An explicit `attention_factor`, if given.
    pub attention_factor: Option<f64>,
    /// Whether the ramp bounds are rounded to whole dims (transformers' `truncate`).
    pub truncate: bool,
}

impl RopeConfig {
    /// Default-type RoPE: `inv_freq[i] = 1 / θ^(2i/dim)` in f32 (model-spec §1.3).
    pub fn default_type(theta: f64, dim: usize, interleaved: bool) -> RopeConfig {
        RopeConfig {
            theta,
            dim,
            interleaved,
            inv_freq: base_inv_freq(theta, dim),
            attention_scaling: 1.0,
            softmax_mscale: 1.0,
            yarn: None,
        }
    }
}

/// `1 / θ^(2i / dim)`, computed in f64 and rounded once to f32 (torch computes it in f32;
/// the two differ by at most an ulp, far below the golden tolerance).
fn base_inv_freq(theta: f64, dim: usize) -> Vec<f32> {
    (0..dim / 2).map(|i| (1.0 / theta.powf((2 * i) as f64 / dim as f64)) as f32).collect()
}

/// YaRN `get_mscale`: `0.1 · m · ln(scale) + 1` for scale > 1, else 1.
pub fn yarn_mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 }
}

/// Everything the plan builders need from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Which family's plan to build.
    pub family: Family,
    /// Vocabulary size (rows of the embedding and lm_head).
    pub vocab_size: usize,
    /// Residual stream width H.
    pub hidden_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA: query head h uses KV head h / (heads / kv_heads)).
    pub num_kv_heads: usize,
    /// Per-head query/key dimension (from config; not necessarily hidden / heads). For MLA
    /// families: `qk_nope_head_dim + qk_rope_head_dim` (transformers' `head_dim` attribute
    /// is the rope dim there, model-spec §3.1).
    pub head_dim: usize,
    /// Per-head value / attention-output dimension (= `head_dim` except MLA's `v_head_dim`).
    pub v_head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// Rotary embedding parameters.
    pub rope: RopeConfig,
    /// Whether q/k/v/o projections carry biases (MLA: q_a, kv_a and o).
    pub attention_bias: bool,
    /// Multi-head latent attention dims (GLM / DeepSeek); `None` for standard GQA.
    pub mla: Option<MlaConfig>,
    /// LFM2's short-convolution layers; `None` for families whose every layer is attention.
    pub conv: Option<ShortConvConfig>,
    /// GPT-OSS sliding windows and clamped SwiGLU; `None` for other families.
    pub gpt_oss: Option<GptOssConfig>,
    /// Routed experts per MoE layer (0 = dense model).
    pub num_experts: usize,
    /// Experts selected per token.
    pub top_k: usize,
    /// How experts are selected and weighted.
    pub router: RouterKind,
    /// Shared experts per MoE layer, run on every token (their FFN width is
    /// `moe_intermediate_size · n_shared_experts`).
    pub n_shared_experts: usize,
    /// Expert FFN width.
    pub moe_intermediate_size: usize,
    /// Dense-layer FFN width.
    pub intermediate_size: usize,
    /// Renormalise the top-k router probabilities to sum to one.
    pub norm_topk_prob: bool,
    /// Per layer: whether its MLP is MoE. Qwen3: `(l+1) % decoder_sparse_step == 0` and not
    /// in `mlp_only_layers`; GLM: `mlp_layer_types` (default: layer 0 dense); DeepSeek-V3:
    /// `l >= first_k_dense_replace` — each family as transformers reads it.
    pub moe_layers: Vec<bool>,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Token ids that end generation.
    pub eos_token_ids: Vec<u32>,
    /// Beginning-of-sequence id, if any.
    pub bos_token_id: Option<u32>,
    /// Longest supported context.
    pub max_position_embeddings: usize,
    /// Multi-token-prediction layers stored after the decoder layers
    /// (`num_nextn_predict_layers`, GLM / DeepSeek-V3): in the checkpoint, never run.
    pub mtp_layers: usize,
    /// MLX quantization block, if the checkpoint is quantized.
    pub quantization: Option<QuantConfig>,
    /// A non-MLX `quantization_config.quant_method` (e.g. DeepSeek-V3's `fp8`): the config
    /// parses (plans, catalogs, patterns work), loading its weights is refused by name.
    pub foreign_quantization: Option<String>,
}

impl ModelConfig {
    /// Reads and parses `dir/config.json`, adding the `eos_token_id`s of
    /// `dir/generation_config.json` when there is one (as transformers' `generate` does).
    pub fn load(dir: &Path) -> Result<ModelConfig> {
        let path = dir.join("config.json");
        let text = crate::input::read_to_string(&path)?;
        let mut cfg = ModelConfig::parse(&text, &path)?;
        let gen_path = dir.join("generation_config.json");
        if gen_path.is_file() {
            let text = crate::input::read_to_string(&gen_path)?;
            for id in generation_eos_ids(&text, &gen_path)? {
                if id as usize >= cfg.vocab_size {
                    return Err(Error::format(
                        &gen_path,
                        format!("eos_token_id {id} is outside the vocabulary ({})", cfg.vocab_size),
                    ));
                }
                if !cfg.eos_token_ids.contains(&id) {
                    cfg.eos_token_ids.push(id);
                }
            }
        }
        Ok(cfg)
    }

    /// Parses config.json text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<ModelConfig> {
        let v: Value = serde_json::from_str(text).map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        let c = Fields { v: &v, path: path.to_path_buf() };
        let model_type = c.string(&["model_type"])?;
        let family = Family::from_model_type(&model_type).ok_or_else(|| {
            Error::format(path, format!("unknown model_type `{model_type}` (supported: {SUPPORTED_MODEL_TYPES})"))
        })?;
        use limits::*;
        let hidden_size = c.size(&["hidden_size"], MAX_HIDDEN)?;
        let num_heads = c.size(&["num_attention_heads"], MAX_HEADS)?;
        let num_layers = c.size(&["num_hidden_layers"], MAX_LAYERS)?;
        let num_experts =
            c.opt_size(&["num_experts", "num_local_experts", "n_routed_experts"], MAX_EXPERTS)?.unwrap_or(0);
        let block = v.get("quantization").or_else(|| v.get("quantization_config"));
        let method = block.and_then(|q| q.get("quant_method")).and_then(Value::as_str).map(str::to_owned);
        let (quantization, foreign_quantization) = match (block, method) {
            // transformers-style blocks (fp8, compressed-tensors, ...) describe weights zmoe
            // cannot read; MLX blocks carry no quant_method (or "mlx").
            // The original gpt-oss release: MXFP4 `*_blocks` / `*_scales` experts, read as such.
            (Some(_), Some(m)) if m == "mxfp4" && family == Family::GptOss => (None, None),
            (Some(_), Some(m)) if m != "mlx" => (None, Some(m)),
            (Some(q), _) => (parse_quant(q, path)?, None),
            (None, _) => (None, None),
        };
        let mla = if family.is_mla() { Some(c.mla(family)?) } else { None };
        let (head_dim, v_head_dim, rope) = match &mla {
            Some(m) => {
                let interleaved = c.opt_bool(&["rope_interleave"])?.unwrap_or(true);
                (m.qk_head_dim(), m.v_head_dim, c.rope(m.qk_rope_head_dim, interleaved, true)?)
            }
            None => {
                let d = c.opt_size(&["head_dim"], MAX_HEAD_DIM)?.unwrap_or(hidden_size / num_heads.max(1));
                let mut rope = c.rope(d, false, family == Family::GptOss)?;
                // transformers' LFM2-MoE default θ is 1e6 (the others': 1e4).
                let theta_given = c.get(&["rope_theta"]).is_some()
                    || ["rope_parameters", "rope_scaling"]
                        .iter()
                        .any(|k| v.get(k).and_then(|p| p.get("rope_theta")).is_some());
                if family == Family::Lfm2Moe && !theta_given {
                    rope = RopeConfig::default_type(1e6, rope.dim, false);
                }
                (d, d, rope)
            }
        };
        let router = if family == Family::Lfm2Moe {
            RouterKind::SigmoidBias {
                expert_bias: c.opt_bool(&["use_expert_bias"])?.unwrap_or(true),
                routed_scaling_factor: c.positive(&["routed_scaling_factor"], 1e6)?.unwrap_or(1.0) as f32,
            }
        } else if family.is_mla() {
            let (g, tg, s) = match family {
                Family::DeepseekV3 => (8, 4, 2.5),
                _ => (1, 1, 1.8),
            };
            RouterKind::SigmoidGrouped {
                n_group: c.opt_size(&["n_group"], MAX_EXPERTS)?.unwrap_or(g),
                topk_group: c.opt_size(&["topk_group"], MAX_EXPERTS)?.unwrap_or(tg),
                routed_scaling_factor: c.positive(&["routed_scaling_factor"], 1e6)?.unwrap_or(s) as f32,
            }
        } else if family == Family::GptOss {
            RouterKind::TopKSoftmax
        } else {
            RouterKind::Softmax
        };
        let moe_layers = c.moe_layers(family, num_layers, num_experts)?;
        let conv = if family == Family::Lfm2Moe { Some(c.short_conv(num_layers)?) } else { None };
        let gpt_oss = if family == Family::GptOss { Some(c.gpt_oss(num_layers)?) } else { None };
        // GPT-OSS names the expert width `intermediate_size` (it has no dense layers).
        let moe_i_names: &[&str] =
            if family == Family::GptOss { &["intermediate_size"] } else { &["moe_intermediate_size"] };
        let cfg = ModelConfig {
            family,
            vocab_size: c.size(&["vocab_size"], MAX_VOCAB)?,
            hidden_size,
            num_layers,
            num_heads,
            // MLA has one latent KV row shared by all heads; transformers' DeepSeek default of
            // 128 KV heads would only confuse the GQA arithmetic, so it is not read there.
            num_kv_heads: if family.is_mla() {
                num_heads
            } else {
                c.opt_size(&["num_key_value_heads"], MAX_HEADS)?.unwrap_or(num_heads)
            },
            head_dim,
            v_head_dim,
            rms_norm_eps: c.positive(&["rms_norm_eps", "norm_eps"], 1.0)?.unwrap_or(1e-6) as f32,
            rope,
            attention_bias: c.opt_bool(&["attention_bias"])?.unwrap_or(false),
            mla,
            conv,
            gpt_oss,
            num_experts,
            top_k: c
                .opt_size(&["num_experts_per_tok", "experts_per_token"], MAX_EXPERTS)?
                .unwrap_or(if num_experts > 0 { 1 } else { 0 }),
            router,
            n_shared_experts: if family.is_mla() {
                c.opt_size(&["n_shared_experts"], MAX_SHARED_EXPERTS)?.unwrap_or(1)
            } else {
                0
            },
            moe_intermediate_size: c.opt_size(moe_i_names, MAX_FFN)?.unwrap_or(0),
            intermediate_size: c.opt_size(&["intermediate_size"], MAX_FFN)?.unwrap_or(0),
            norm_topk_prob: c.opt_bool(&["norm_topk_prob"])?.unwrap_or(family.is_mla() || family == Family::Lfm2Moe),
            moe_layers,
            // LFM2 configs spell it `tie_embedding` too, and tie by default.
            tie_word_embeddings: c
                .opt_bool(&["tie_word_embeddings", "tie_embedding"])?
                .unwrap_or(family == Family::Lfm2Moe),
            eos_token_ids: c.token_ids(&["eos_token_id"])?.unwrap_or_default(),
            bos_token_id: c.token_ids(&["bos_token_id"])?.and_then(|ids| ids.first().copied()),
            max_position_embeddings: c.opt_size(&["max_position_embeddings"], MAX_POSITIONS)?.unwrap_or(32768),
            mtp_layers: c.opt_bounded(&["num_nextn_predict_layers"], 0, MAX_LAYERS)?.unwrap_or(0),
            quantization,
            foreign_quantization,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Whether layer `l` has a routed-experts MLP.
    pub fn is_moe_layer(&self, l: usize) -> bool {
        self.num_experts > 0 && self.moe_layers.get(l).copied().unwrap_or(false)
    }

    /// Whether layer `l` mixes tokens with LFM2's short convolution instead of attention.
    pub fn is_conv_layer(&self, l: usize) -> bool {
        self.conv.as_ref().is_some_and(|c| c.layers.get(l).copied().unwrap_or(false))
    }

    /// Attention softmax scale: `head_dim^-1/2`, times YaRN's `mscale²` where it applies.
    pub fn attn_scale(&self) -> f32 {
        ((self.head_dim as f64).powf(-0.5) * self.rope.softmax_mscale as f64) as f32
    }

    /// The sliding window of layer `l` (keys seen, the current token included), or `None`
    /// for full attention.
    pub fn window(&self, l: usize) -> Option<usize> {
        let g = self.gpt_oss.as_ref()?;
        g.sliding.get(l).copied().unwrap_or(false).then_some(g.sliding_window)
    }

    /// FFN width of a layer's shared experts (0 without them).
    pub fn shared_intermediate_size(&self) -> usize {
        self.moe_intermediate_size * self.n_shared_experts
    }

    /// Consistency checks that would otherwise surface as out-of-bounds indexing later.
    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |why: String| Err(Error::format(path, why));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("v_head_dim", self.v_head_dim),
        ] {
            if v == 0 {
                return bad(format!("`{name}` must be positive"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) || !self.rope.dim.is_multiple_of(2) || self.rope.dim > self.head_dim {
            return bad(format!(
                "head_dim {} / rotary dim {} must be even, rotary ≤ head_dim",
                self.head_dim, self.rope.dim
            ));
        }
        if let Some(m) = &self.mla
            && (m.kv_lora_rank == 0 || m.qk_nope_head_dim == 0 || m.q_lora_rank == Some(0))
        {
            return bad("MLA ranks (`kv_lora_rank`, `q_lora_rank`) and `qk_nope_head_dim` must be positive".into());
        }
        if self.num_experts > 0 {
            if self.top_k == 0 || self.top_k > self.num_experts {
                return bad(format!("num_experts_per_tok {} must be in 1..={}", self.top_k, self.num_experts));
            }
            if self.moe_intermediate_size == 0 {
                return bad("`moe_intermediate_size` must be positive for an MoE model".into());
            }
        }
        if let RouterKind::SigmoidGrouped { n_group, topk_group, .. } = self.router {
            let per = self.num_experts.checked_div(n_group).unwrap_or(0);
            if n_group == 0 || !self.num_experts.is_multiple_of(n_group) || topk_group == 0 || topk_group > n_group {
                return bad(format!(
                    "n_group {n_group} must divide n_routed_experts {} and topk_group {topk_group} be in 1..=n_group",
                    self.num_experts
                ));
            }
            if n_group > 1 && (per < 2 || self.top_k > topk_group * per) {
                return bad(format!(
                    "grouped routing needs ≥ 2 experts per group and top-k {} ≤ topk_group·experts per group ({})",
                    self.top_k,
                    topk_group * per
                ));
            }
        }
        let dense_layers = (0..self.num_layers).any(|l| !self.is_moe_layer(l));
        if dense_layers && self.intermediate_size == 0 {
            return bad("`intermediate_size` must be positive when a layer has a dense MLP".into());
        }
        if let Some(&t) = self.eos_token_ids.iter().find(|&&t| t as usize >= self.vocab_size) {
            return bad(format!("eos_token_id {t} is outside the vocabulary ({})", self.vocab_size));
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return bad(format!("`rms_norm_eps` must be a finite number > 0, got {}", self.rms_norm_eps));
        }
        if self.family == Family::Lfm2Moe && self.num_heads * self.head_dim != self.hidden_size {
            return bad(format!(
                "hidden_size {} must be num_attention_heads ({}) × head_dim ({}) for lfm2_moe",
                self.hidden_size, self.num_heads, self.head_dim
            ));
        }
        if let RouterKind::SigmoidGrouped { routed_scaling_factor: s, .. }
        | RouterKind::SigmoidBias { routed_scaling_factor: s, .. } = self.router
            && !(s.is_finite() && s > 0.0)
        {
            return bad(format!("`routed_scaling_factor` must be a finite number > 0, got {s}"));
        }
        if !self.attn_scale().is_finite() {
            return bad(format!("the attention scale {} is not finite (head dims / rope scaling)", self.attn_scale()));
        }
        match self.weight_elements() {
            Some(n) if n <= limits::MAX_PARAMS => Ok(()),
            n => bad(format!(
                "the shapes describe {} weights, more than zmoe reads ({} = 2^44; see the README, What loads)",
                n.map_or("over 2^64".to_string(), |n| n.to_string()),
                limits::MAX_PARAMS
            )),
        }
    }

    /// Weight elements the shapes describe (an upper bound: every layer counted with both a
    /// dense and an MoE MLP), in checked arithmetic; `None` on overflow. Once this is below
    /// [`limits::MAX_PARAMS`], no product of config sizes anywhere (counts, byte sizes)
    /// can overflow.
    pub fn weight_elements(&self) -> Option<u64> {
        let n = |x: usize| x as u64;
        let mul = |xs: &[u64]| xs.iter().try_fold(1u64, |a, &x| a.checked_mul(x));
        let (h, nh, l) = (n(self.hidden_size), n(self.num_heads), n(self.num_layers));
        let q = mul(&[h, nh, n(self.head_dim)])?;
        let kv = mul(&[2, h, n(self.num_kv_heads), n(self.head_dim)])?;
        let o = mul(&[h, nh, n(self.v_head_dim)])?;
        let mla = match &self.mla {
            Some(m) => {
                let lat = n(m.kv_lora_rank);
                let r = n(m.q_lora_rank.unwrap_or(0));
                mul(&[r, h])?
                    .checked_add(mul(&[r, nh, n(self.head_dim)])?)?
                    .checked_add(mul(&[h, lat + n(m.qk_rope_head_dim)])?)?
                    .checked_add(mul(&[lat, nh, n(m.qk_nope_head_dim) + n(m.v_head_dim)])?)?
            }
            None => 0,
        };
        let experts = mul(&[3, n(self.num_experts) + n(self.n_shared_experts), h, n(self.moe_intermediate_size)])?;
        let router = mul(&[n(self.num_experts) + 1, h])?;
        let dense = mul(&[3, h, n(self.intermediate_size)])?;
        // LFM2 short conv: in_proj [3H, H], out_proj [H, H], the kernel [H, L].
        let conv = match &self.conv {
            Some(cv) => mul(&[4, h, h])?.checked_add(mul(&[h, n(cv.kernel)])?)?,
            None => 0,
        };
        let per_layer =
            [kv, o, mla, conv, experts, router, dense, 8 * h].iter().try_fold(q, |a, &x| a.checked_add(x))?;
        mul(&[per_layer, l])?.checked_add(mul(&[2, n(self.vocab_size), h])?)
    }
}

/// The `eos_token_id`s of a generation_config.json (none if it has no such field).
fn generation_eos_ids(text: &str, path: &Path) -> Result<Vec<u32>> {
    let v: Value = serde_json::from_str(text).map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
    let c = Fields { v: &v, path: path.to_path_buf() };
    Ok(c.token_ids(&["eos_token_id"])?.unwrap_or_default())
}

/// Parses an MLX `quantization` block (model-spec §6.3). transformers-style blocks
/// (`quant_method` other than `mlx`) never get here: see `ModelConfig::foreign_quantization`.
fn parse_quant(q: &Value, path: &Path) -> Result<Option<QuantConfig>> {
    let Some(obj) = q.as_object() else {
        return Err(Error::format(path, "`quantization` must be an object"));
    };
    let default = parse_quant_params(q, path, "quantization")?;
    let mut overrides = BTreeMap::new();
    for (k, v) in obj {
        if matches!(k.as_str(), "group_size" | "bits" | "mode" | "quant_method") {
            continue;
        }
        match v {
            Value::Bool(false) => {
                overrides.insert(k.clone(), None);
            }
            Value::Object(_) => {
                overrides.insert(k.clone(), Some(parse_quant_params(v, path, k)?));
            }
            _ => {} // unrelated keys (e.g. converter metadata)
        }
    }
    Ok(Some(QuantConfig { default, overrides }))
}

fn parse_quant_params(v: &Value, path: &Path, what: &str) -> Result<QuantParams> {
    let bad = |why: &str| Error::format(path, format!("quantization `{what}`: {why}"));
    let mode = match v.get("mode").and_then(Value::as_str) {
        None | Some("affine") => QuantMode::Affine,
        Some("mxfp4") => QuantMode::Mxfp4,
        Some(m) => return Err(bad(&format!("unsupported mode `{m}` (supported: affine, mxfp4)"))),
    };
    let (dg, db) = match mode {
        QuantMode::Affine => (64, 4),
        QuantMode::Mxfp4 => (32, 4),
    };
    let group_size = v
        .get("group_size")
        .map(|g| g.as_u64().ok_or_else(|| bad("group_size must be an integer")))
        .transpose()?
        .unwrap_or(dg) as usize;
    let bits =
        v.get("bits").map(|g| g.as_u64().ok_or_else(|| bad("bits must be an integer"))).transpose()?.unwrap_or(db)
            as u32;
    match mode {
        QuantMode::Affine if !matches!(bits, 2 | 3 | 4 | 5 | 6 | 8) => {
            Err(bad(&format!("affine bits {bits} not in {{2,3,4,5,6,8}}")))
        }
        QuantMode::Affine if !matches!(group_size, 32 | 64 | 128) => {
            Err(bad(&format!("group_size {group_size} not in {{32,64,128}}")))
        }
        QuantMode::Mxfp4 if bits != 4 || group_size != 32 => Err(bad("mxfp4 needs bits 4 and group_size 32")),
        _ => Ok(QuantParams { mode, bits, group_size }),
    }
}

/// `5` or `[5, 6]` as u32 token ids; `None` if any is not an integer in `0..=u32::MAX`.
fn parse_token_ids(v: &Value) -> Option<Vec<u32>> {
    let one = |x: &Value| x.as_u64().and_then(|x| u32::try_from(x).ok());
    match v {
        Value::Array(a) => a.iter().map(one).collect(),
        x => one(x).map(|id| vec![id]),
    }
}

/// Field accessor with aliases and error messages naming the file.
struct Fields<'a> {
    v: &'a Value,
    path: PathBuf,
}

impl Fields<'_> {
    fn get<'n>(&self, names: &[&'n str]) -> Option<(&'n str, &Value)> {
        names.iter().find_map(|n| self.v.get(*n).filter(|x| !x.is_null()).map(|x| (*n, x)))
    }
    fn err(&self, field: &str, want: &str, got: &Value) -> Error {
        Error::format(&self.path, format!("field `{field}`: expected {want}, got {got}"))
    }
    fn missing(&self, names: &[&str]) -> Error {
        Error::format(&self.path, format!("missing required field `{}`", names.join("` / `")))
    }
    fn string(&self, names: &[&str]) -> Result<String> {
        let (n, v) = self.get(names).ok_or_else(|| self.missing(names))?;
        v.as_str().map(str::to_owned).ok_or_else(|| self.err(n, "a string", v))
    }
    fn opt_usize(&self, names: &[&str]) -> Result<Option<usize>> {
        self.get(names)
            .map(|(n, v)| v.as_u64().map(|x| x as usize).ok_or_else(|| self.err(n, "a non-negative integer", v)))
            .transpose()
    }
    /// A size in `0..=max`: bounded here, before anything is allocated from it.
    fn size(&self, names: &[&str], max: usize) -> Result<usize> {
        self.bounded(names, 0, max)
    }
    fn opt_size(&self, names: &[&str], max: usize) -> Result<Option<usize>> {
        self.opt_bounded(names, 0, max)
    }
    fn bounded(&self, names: &[&str], min: usize, max: usize) -> Result<usize> {
        self.opt_bounded(names, min, max)?.ok_or_else(|| self.missing(names))
    }
    fn opt_bounded(&self, names: &[&str], min: usize, max: usize) -> Result<Option<usize>> {
        let Some((n, v)) = self.get(names) else { return Ok(None) };
        let x = v.as_u64().ok_or_else(|| self.err(n, "a non-negative integer", v))?;
        if x < min as u64 || x > max as u64 {
            return Err(Error::format(
                &self.path,
                format!("field `{n}` is {x}, outside the range zmoe reads ({min}..={max}; see the README, What loads)"),
            ));
        }
        Ok(Some(x as usize))
    }
    /// A finite number in `(0, max]`.
    fn positive(&self, names: &[&str], max: f64) -> Result<Option<f64>> {
        let Some((n, v)) = self.get(names) else { return Ok(None) };
        match v.as_f64() {
            Some(x) if x.is_finite() && x > 0.0 && x <= max => Ok(Some(x)),
            _ => Err(self.err(n, &format!("a finite number in (0, {max}]"), v)),
        }
    }
    /// A token id (`0..=u32::MAX`) or a list of them, as `eos_token_id` is spelled.
    fn token_ids(&self, names: &[&str]) -> Result<Option<Vec<u32>>> {
        let Some((n, v)) = self.get(names) else { return Ok(None) };
        parse_token_ids(v).map(Some).ok_or_else(|| self.err(n, "a token id 0..=4294967295 or a list of them", v))
    }
    fn opt_f64(&self, names: &[&str]) -> Result<Option<f64>> {
        self.get(names).map(|(n, v)| v.as_f64().ok_or_else(|| self.err(n, "a number", v))).transpose()
    }
    fn opt_bool(&self, names: &[&str]) -> Result<Option<bool>> {
        self.get(names).map(|(n, v)| v.as_bool().ok_or_else(|| self.err(n, "true or false", v))).transpose()
    }
    fn opt_usize_list(&self, names: &[&str]) -> Result<Option<Vec<usize>>> {
        let Some((n, v)) = self.get(names) else { return Ok(None) };
        let arr = v.as_array().ok_or_else(|| self.err(n, "a list of integers", v))?;
        arr.iter()
            .map(|x| x.as_u64().map(|x| x as usize).ok_or_else(|| self.err(n, "a list of integers", v)))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
    /// RoPE from `rope_theta` (4.x) or `rope_parameters` / `rope_scaling` (5.x / older):
    /// the default type, or YaRN where the family allows it (model-spec §5.4).
    fn rope(&self, head_dim: usize, interleaved: bool, allow_yarn: bool) -> Result<RopeConfig> {
        let params = self.get(&["rope_parameters", "rope_scaling"]).map(|(_, v)| v);
        let pf = |k: &str| params.and_then(|p| p.get(k)).filter(|x| !x.is_null());
        let num = |k: &str| -> Result<Option<f64>> {
            pf(k)
                .map(|x| x.as_f64().ok_or_else(|| self.err(&format!("rope_parameters.{k}"), "a number", x)))
                .transpose()
        };
        let kind = pf("rope_type").or_else(|| pf("type")).and_then(Value::as_str).unwrap_or("default").to_string();
        let theta = match self.opt_f64(&["rope_theta"])? {
            Some(t) => t,
            None => num("rope_theta")?.unwrap_or(10000.0),
        };
        if !(theta.is_finite() && theta > 1.0) {
            return Err(Error::format(
                &self.path,
                format!("field `rope_theta` must be a finite number > 1, got {theta}"),
            ));
        }
        let factor = match self.opt_f64(&["partial_rotary_factor"])? {
            Some(f) => f,
            None => num("partial_rotary_factor")?.unwrap_or(1.0),
        };
        if !(factor > 0.0 && factor <= 1.0) {
            return Err(Error::format(
                &self.path,
                format!("field `partial_rotary_factor` must be in (0, 1], got {factor}"),
            ));
        }
        let dim = (head_dim as f64 * factor) as usize;
        let mut rope = RopeConfig::default_type(theta, dim, interleaved);
        match kind.as_str() {
            "default" => {}
            "yarn" if allow_yarn => {
                let missing = |k: &str| Error::format(&self.path, format!("yarn rope needs `rope_parameters.{k}`"));
                let orig = num("original_max_position_embeddings")?
                    .ok_or_else(|| missing("original_max_position_embeddings"))?;
                let factor = match num("factor")? {
                    Some(f) => f,
                    None => self.opt_f64(&["max_position_embeddings"])?.ok_or_else(|| missing("factor"))? / orig,
                };
                let positive = |k: &str, x: f64| {
                    if x.is_finite() && x > 0.0 {
                        Ok(())
                    } else {
                        Err(Error::format(
                            &self.path,
                            format!("yarn rope: `rope_parameters.{k}` must be a finite number > 0, got {x}"),
                        ))
                    }
                };
                positive("original_max_position_embeddings", orig)?;
                positive("factor", factor)?;
                let (mscale, mscale_all) = (num("mscale")?, num("mscale_all_dim")?);
                let explicit_factor = num("attention_factor")?;
                let attention_factor = match explicit_factor {
                    Some(a) => a,
                    None => match (mscale, mscale_all) {
                        (Some(m), Some(ma)) if m != 0.0 && ma != 0.0 => {
                            yarn_mscale(factor, m) / yarn_mscale(factor, ma)
                        }
                        _ => yarn_mscale(factor, 1.0),
                    },
                };
                let beta_fast = num("beta_fast")?.filter(|&b| b != 0.0).unwrap_or(32.0);
                let beta_slow = num("beta_slow")?.filter(|&b| b != 0.0).unwrap_or(1.0);
                positive("beta_fast", beta_fast)?;
                positive("beta_slow", beta_slow)?;
                let truncate = pf("truncate").and_then(Value::as_bool).unwrap_or(true);
                rope.inv_freq = yarn_inv_freq(theta, dim, factor, orig, beta_fast, beta_slow, truncate);
                rope.attention_scaling = attention_factor as f32;
                // MLA attention multiplies its softmax scale by mscale(factor, mscale_all_dim)².
                if let Some(ma) = mscale_all.filter(|&m| m != 0.0) {
                    rope.softmax_mscale = (yarn_mscale(factor, ma) * yarn_mscale(factor, ma)) as f32;
                }
                rope.yarn = Some(YarnParams {
                    factor,
                    original_max_position_embeddings: orig,
                    beta_fast,
                    beta_slow,
                    mscale: mscale.filter(|&m| m != 0.0),
                    mscale_all_dim: mscale_all.filter(|&m| m != 0.0),
                    attention_factor: explicit_factor,
                    truncate,
                });
                // Whatever mscale / attention_factor say, the numbers the kernels use must be finite.
                let finite = rope.inv_freq.iter().all(|f| f.is_finite())
                    && rope.attention_scaling.is_finite()
                    && rope.attention_scaling > 0.0
                    && rope.softmax_mscale.is_finite()
                    && rope.softmax_mscale > 0.0;
                if !finite {
                    return Err(Error::format(
                        &self.path,
                        format!(
                            "yarn rope parameters give non-finite or non-positive scales (attention factor {}, \
                             softmax mscale {}); check `rope_parameters`",
                            rope.attention_scaling, rope.softmax_mscale
                        ),
                    ));
                }
            }
            other => {
                return Err(Error::format(
                    &self.path,
                    format!(
                        "rope type `{other}` is not supported for this family (supported: default{})",
                        if allow_yarn { ", yarn" } else { "" }
                    ),
                ));
            }
        }
        Ok(rope)
    }

    /// MLA dimensions (model-spec §3.1). `q_lora_rank` absent → the family default; an
    /// explicit `null` → a plain `q_proj`.
    fn mla(&self, family: Family) -> Result<MlaConfig> {
        let q_lora_rank = match self.v.get("q_lora_rank") {
            None => Some(if family == Family::DeepseekV3 { 1536 } else { 768 }),
            Some(Value::Null) => None,
            Some(_) => Some(self.size(&["q_lora_rank"], limits::MAX_LORA_RANK)?),
        };
        Ok(MlaConfig {
            q_lora_rank,
            kv_lora_rank: self.size(&["kv_lora_rank"], limits::MAX_LORA_RANK)?,
            qk_nope_head_dim: self.size(&["qk_nope_head_dim"], limits::MAX_HEAD_DIM)?,
            qk_rope_head_dim: self.bounded(&["qk_rope_head_dim"], 0, limits::MAX_HEAD_DIM)?,
            v_head_dim: self.size(&["v_head_dim"], limits::MAX_HEAD_DIM)?,
            latent_norm_eps: 1e-6,
        })
    }

    /// Which layers are MoE, per family as transformers decides it (see [`ModelConfig::moe_layers`]).
    fn moe_layers(&self, family: Family, layers: usize, experts: usize) -> Result<Vec<bool>> {
        if experts == 0 {
            return Ok(vec![false; layers]);
        }
        match family {
            Family::Qwen3Moe => {
                let step = self.opt_usize(&["decoder_sparse_step"])?.unwrap_or(1);
                if step == 0 {
                    return Err(Error::format(&self.path, "`decoder_sparse_step` must be positive"));
                }
                let dense = self.opt_usize_list(&["mlp_only_layers"])?.unwrap_or_default();
                Ok((0..layers).map(|l| !dense.contains(&l) && (l + 1).is_multiple_of(step)).collect())
            }
            Family::Glm4MoeLite => match self.get(&["mlp_layer_types"]) {
                None => Ok((0..layers).map(|l| l > 0).collect()),
                Some((n, v)) => {
                    let kinds = v.as_array().ok_or_else(|| self.err(n, "a list of \"dense\"/\"sparse\"", v))?;
                    if kinds.len() != layers {
                        return Err(Error::format(
                            &self.path,
                            format!("`mlp_layer_types` has {} entries for {layers} layers", kinds.len()),
                        ));
                    }
                    kinds
                        .iter()
                        .map(|k| match k.as_str() {
                            Some("sparse") => Ok(true),
                            Some("dense") => Ok(false),
                            _ => Err(self.err(n, "a list of \"dense\"/\"sparse\"", v)),
                        })
                        .collect()
                }
            },
            Family::DeepseekV3 => {
                let k = self.opt_usize(&["first_k_dense_replace"])?.unwrap_or(3);
                Ok((0..layers).map(|l| l >= k).collect())
            }
            Family::Lfm2Moe => {
                let k = self.opt_bounded(&["num_dense_layers"], 0, limits::MAX_LAYERS)?.unwrap_or(2);
                Ok((0..layers).map(|l| l >= k).collect())
            }
            Family::GptOss => Ok(vec![true; layers]),
        }
    }

    /// LFM2's short-convolution layers (model-spec §4.1): `layer_types` (`"conv"` /
    /// `"full_attention"`, required by transformers v5) or the older `full_attn_idxs` (the
    /// attention layers' indices, every other layer conv).
    fn short_conv(&self, layers: usize) -> Result<ShortConvConfig> {
        let kinds = match (self.get(&["layer_types"]), self.get(&["full_attn_idxs"])) {
            (Some((n, v)), _) => {
                let want = "a list of \"conv\" / \"full_attention\"";
                let kinds = v.as_array().ok_or_else(|| self.err(n, want, v))?;
                if kinds.len() != layers {
                    return Err(Error::format(
                        &self.path,
                        format!("`layer_types` has {} entries for {layers} layers", kinds.len()),
                    ));
                }
                kinds
                    .iter()
                    .map(|k| match k.as_str() {
                        Some("conv") => Ok(true),
                        Some("full_attention") => Ok(false),
                        _ => Err(self.err(n, want, k)),
                    })
                    .collect::<Result<Vec<bool>>>()?
            }
            (None, Some(_)) => {
                let idx = self.opt_usize_list(&["full_attn_idxs"])?.unwrap_or_default();
                if let Some(&bad) = idx.iter().find(|&&i| i >= layers) {
                    return Err(Error::format(
                        &self.path,
                        format!("`full_attn_idxs` names layer {bad}, but the model has {layers} layers"),
                    ));
                }
                (0..layers).map(|l| !idx.contains(&l)).collect()
            }
            (None, None) => return Err(self.missing(&["layer_types", "full_attn_idxs"])),
        };
        Ok(ShortConvConfig {
            layers: kinds,
            kernel: self.opt_bounded(&["conv_L_cache"], 1, limits::MAX_CONV_KERNEL)?.unwrap_or(3),
            bias: self.opt_bool(&["conv_bias"])?.unwrap_or(false),
        })
    }

    /// GPT-OSS fields (model-spec §5.1): `sliding_window`, `layer_types` (default: even
    /// layers slide), `swiglu_limit` (7), `swiglu_alpha` (1.702).
    fn gpt_oss(&self, layers: usize) -> Result<GptOssConfig> {
        let sliding_window = self.opt_bounded(&["sliding_window"], 1, limits::MAX_POSITIONS)?.unwrap_or(128);
        let sliding = match self.get(&["layer_types"]) {
            None => (0..layers).map(|l| l % 2 == 0).collect(),
            Some((n, v)) => {
                let want = "a list of \"sliding_attention\"/\"full_attention\"";
                let kinds = v.as_array().ok_or_else(|| self.err(n, want, v))?;
                if kinds.len() != layers {
                    return Err(Error::format(
                        &self.path,
                        format!("`layer_types` has {} entries for {layers} layers", kinds.len()),
                    ));
                }
                kinds
                    .iter()
                    .map(|k| match k.as_str() {
                        Some("sliding_attention") => Ok(true),
                        Some("full_attention") => Ok(false),
                        _ => Err(self.err(n, want, v)),
                    })
                    .collect::<Result<_>>()?
            }
        };
        Ok(GptOssConfig {
            sliding_window,
            sliding,
            swiglu_limit: self.positive(&["swiglu_limit"], 1e6)?.unwrap_or(7.0) as f32,
            swiglu_alpha: self.positive(&["swiglu_alpha"], 1e6)?.unwrap_or(1.702) as f32,
        })
    }
}

/// YaRN inverse frequencies (transformers `_compute_yarn_parameters`): a linear ramp over
/// the pair index blends interpolated (`/factor`) and extrapolated frequencies.
fn yarn_inv_freq(theta: f64, dim: usize, factor: f64, orig: f64, fast: f64, slow: f64, truncate: bool) -> Vec<f32> {
    let corr = |rot: f64| (dim as f64 * (orig / (rot * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * theta.ln());
    let (mut low, mut high) = (corr(fast), corr(slow));
    if truncate {
        (low, high) = (low.floor(), high.ceil());
    }
    let (low, mut high) = (low.max(0.0), high.min(dim as f64 - 1.0));
    if low == high {
        high += 0.001;
    }
    base_inv_freq(theta, dim)
        .into_iter()
        .enumerate()
        .map(|(i, extra)| {
            let ramp = (((i as f32) - low as f32) / (high - low) as f32).clamp(0.0, 1.0);
            let extra_factor = 1.0 - ramp;
            let inter = extra / factor as f32;
            inter * (1.0 - extra_factor) + extra * extra_factor
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Value {
        serde_json::json!({
            "model_type": "qwen3_moe", "vocab_size": 100, "hidden_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 32, "num_experts": 8, "num_experts_per_tok": 2,
            "moe_intermediate_size": 16, "intermediate_size": 48, "eos_token_id": [5, 6]
        })
    }

    fn parse(v: &serde_json::Value) -> Result<ModelConfig> {
        ModelConfig::parse(&v.to_string(), Path::new("x/config.json"))
    }

    #[test]
    fn accepts_v4_and_v5_spellings() {
        let mut v4 = base();
        v4["rope_theta"] = 1e6.into();
        v4["torch_dtype"] = "bfloat16".into();
        let mut v5 = base();
        v5.as_object_mut().unwrap().remove("num_experts");
        v5["num_local_experts"] = 8.into();
        v5["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 1e6});
        v5["dtype"] = "bfloat16".into();
        let (a, b) = (parse(&v4).unwrap(), parse(&v5).unwrap());
        assert_eq!(a, b);
        assert_eq!(a.rope.theta, 1e6);
        assert_eq!(a.eos_token_ids, vec![5, 6]);
    }

    #[test]
    fn sparse_step_and_mlp_only_layers() {
        let mut v = base();
        v["num_hidden_layers"] = 4.into();
        v["decoder_sparse_step"] = 2.into();
        v["mlp_only_layers"] = serde_json::json!([3]);
        let c = parse(&v).unwrap();
        let moe: Vec<bool> = (0..4).map(|l| c.is_moe_layer(l)).collect();
        assert_eq!(moe, vec![false, true, false, false]);
    }

    #[test]
    fn quant_block_with_overrides() {
        let mut v = base();
        v["quantization"] = serde_json::json!({
            "group_size": 32, "bits": 4,
            "model.layers.0.mlp.gate": {"group_size": 64, "bits": 8},
            "model.layers.1.mlp.gate": false
        });
        let q = parse(&v).unwrap().quantization.unwrap();
        assert_eq!(q.for_module("model.layers.0.mlp.gate").unwrap().bits, 8);
        assert_eq!(q.for_module("model.layers.1.mlp.gate"), None);
        assert_eq!(q.for_module("model.layers.0.self_attn.q_proj").unwrap().group_size, 32);
    }

    /// DeepSeek-V3 as released (legacy `rope_scaling` spelling, fp8 quantization_config).
    fn deepseek_v3_released() -> serde_json::Value {
        serde_json::json!({
            "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
            "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
            "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_nextn_predict_layers": 1,
            "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
            "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512,
            "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
            "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
            "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": true,
            "scoring_func": "sigmoid", "max_position_embeddings": 163840, "rms_norm_eps": 1e-6,
            "rope_theta": 10000, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40,
            "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
            "tie_word_embeddings": false, "bos_token_id": 0, "eos_token_id": 1,
            "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
            "weight_block_size": [128, 128]}
        })
    }

    #[test]
    fn deepseek_v3_and_kimi_k2_released_configs() {
        let c = parse(&deepseek_v3_released()).unwrap();
        assert_eq!(c.family, Family::DeepseekV3);
        assert_eq!((c.head_dim, c.v_head_dim, c.num_kv_heads, c.rope.dim), (192, 128, 128, 64));
        assert_eq!(c.moe_layers.iter().filter(|&&m| !m).count(), 3, "first_k_dense_replace 3");
        assert!(!c.is_moe_layer(2) && c.is_moe_layer(3) && c.is_moe_layer(60));
        assert_eq!(c.router, RouterKind::SigmoidGrouped { n_group: 8, topk_group: 4, routed_scaling_factor: 2.5 });
        assert_eq!(c.foreign_quantization.as_deref(), Some("fp8"));
        assert!(c.quantization.is_none());
        // YaRN (worked values from transformers' _compute_yarn_parameters): the original
        // frequency below the ramp, /40 above it, cos/sin unscaled, softmax scale × mscale².
        let f = &c.rope.inv_freq;
        assert_eq!(f.len(), 32);
        for (i, want) in [(0, 1.0), (1, 0.74989), (2, 0.56234), (3, 0.42170), (9, 0.074989), (10, 0.056234)] {
            assert!((f[i] - want).abs() < 2e-5 * want, "inv_freq[{i}] {} vs {want}", f[i]);
        }
        assert!((f[11] - 0.039007).abs() < 1e-5 && (f[31] - 3.3338e-6).abs() < 1e-9, "{} {}", f[11], f[31]);
        assert_eq!(c.rope.attention_scaling, 1.0);
        assert!((c.attn_scale() - 0.135_233_78).abs() < 1e-7, "{}", c.attn_scale());
        let plan = crate::plan::Plan::reference(&c);
        assert!(
            plan.steps
                .iter()
                .any(|s| matches!(s, crate::plan::Step::Moe { layer: 3, op: crate::plan::MoeOp::SigmoidTopK }))
        );

        // Kimi-K2: the same architecture under model_type kimi_k2.
        let mut k = deepseek_v3_released();
        for (f, v) in [
            ("model_type", serde_json::json!("kimi_k2")),
            ("num_attention_heads", 64.into()),
            ("num_key_value_heads", 64.into()),
            ("n_routed_experts", 384.into()),
            ("n_group", 1.into()),
            ("topk_group", 1.into()),
            ("first_k_dense_replace", 1.into()),
            ("routed_scaling_factor", 2.827.into()),
            ("vocab_size", 163840.into()),
            ("rope_theta", 50000.0.into()),
            ("max_position_embeddings", 131072.into()),
            ("eos_token_id", 163585.into()),
        ] {
            k[f] = v;
        }
        k["rope_scaling"]["factor"] = 32.0.into();
        k["rope_scaling"]["beta_fast"] = 1.0.into();
        let k = parse(&k).unwrap();
        assert_eq!((k.family, k.num_experts, k.top_k, k.num_heads), (Family::DeepseekV3, 384, 8, 64));
        assert_eq!(k.moe_layers.iter().filter(|&&m| !m).count(), 1);
        // beta_fast = beta_slow = 1: original frequency up to pair 19, /32 from pair 20.
        let base = RopeConfig::default_type(50000.0, 64, true).inv_freq;
        assert_eq!(k.rope.inv_freq[..20], base[..20]);
        assert!((k.rope.inv_freq[20] - base[20] / 32.0).abs() <= 1e-6 * base[20]);

        // GLM-4.7-Flash as released: no head_dim, no mlp_layer_types (layer 0 dense).
        let json = crate::checkpoint::synth::preset_config("glm4_moe_lite", "glm-4.7-flash").unwrap();
        let mut g = json.clone();
        g.as_object_mut().unwrap().remove("mlp_layer_types");
        let g = parse(&g).unwrap();
        assert_eq!((g.head_dim, g.v_head_dim, g.rope.dim, g.top_k), (256, 256, 64, 4));
        assert!(!g.is_moe_layer(0) && g.is_moe_layer(1) && g.is_moe_layer(46));
        assert_eq!(g.mla.as_ref().unwrap().cache_row() * 2 * 47, 54_144, "latent cache bytes per token");
    }

    /// gpt-oss-20b as released (model-spec §5.2): YaRN with truncate false and the attention
    /// factor on cos/sin, alternating sliding/full layers, the MXFP4 quantization_config read
    /// as the release layout (not refused), the expert width from `intermediate_size`.
    #[test]
    fn gpt_oss_20b_released_config() {
        let json = crate::checkpoint::synth::preset_config("gpt_oss", "gpt-oss-20b").unwrap();
        let mut v = json.clone();
        v["quantization_config"] = serde_json::json!({"quant_method": "mxfp4",
            "modules_to_not_convert": ["model.layers.*.self_attn", "lm_head"]});
        let c = parse(&v).unwrap();
        assert_eq!(c.family, Family::GptOss);
        assert!(c.quantization.is_none() && c.foreign_quantization.is_none());
        assert_eq!((c.num_experts, c.top_k, c.moe_intermediate_size, c.head_dim), (32, 4, 2880, 64));
        assert_eq!(c.router, RouterKind::TopKSoftmax);
        assert!((0..24).all(|l| c.is_moe_layer(l)));
        assert_eq!((c.window(0), c.window(1), c.window(22), c.window(23)), (Some(128), None, Some(128), None));
        // model-spec §5.4 sanity values.
        let f = &c.rope.inv_freq;
        assert_eq!(f.len(), 32);
        for (i, want) in [(0, 1.0f32), (1, 0.689_044_3), (2, 0.474_782_05), (3, 0.327_145_87), (31, 3.023_511_4e-7)] {
            assert!((f[i] - want).abs() <= 2e-6 * want, "inv_freq[{i}] {} vs {want}", f[i]);
        }
        // Below the ramp (i ≤ 8) the original frequency, above it (i ≥ 18) divided by 32.
        let base = RopeConfig::default_type(150000.0, 64, false).inv_freq;
        assert_eq!(f[..9], base[..9]);
        assert!((18..32).all(|i| (f[i] - base[i] / 32.0).abs() <= 1e-6 * base[i]));
        assert!((c.rope.attention_scaling - 1.346_573_6).abs() < 1e-6, "{}", c.rope.attention_scaling);
        assert_eq!(c.attn_scale(), 0.125);
        let g = c.gpt_oss.as_ref().unwrap();
        assert_eq!((g.swiglu_limit, g.swiglu_alpha), (7.0, 1.702));

        // Without layer_types: even layers slide. The other mxfp4-less spellings parse too.
        let mut d = json.clone();
        d.as_object_mut().unwrap().remove("layer_types");
        let d = parse(&d).unwrap();
        assert_eq!(d.gpt_oss.as_ref().unwrap().sliding, (0..24).map(|l| l % 2 == 0).collect::<Vec<_>>());
    }

    #[test]
    fn gpt_oss_config_errors_name_the_field() {
        let json = crate::checkpoint::synth::preset_config("gpt_oss", "gpt-oss-tiny").unwrap();
        for (field, value, want) in [
            ("layer_types", serde_json::json!(["sliding_attention"]), "`layer_types` has 1 entries for 4 layers"),
            (
                "layer_types",
                serde_json::json!(["sliding_attention", "x", "full_attention", "full_attention"]),
                "`layer_types`",
            ),
            ("sliding_window", serde_json::json!(0), "`sliding_window`"),
            ("swiglu_limit", serde_json::json!(-7.0), "`swiglu_limit`"),
            ("num_experts_per_tok", serde_json::json!(17), "num_experts_per_tok 17"),
        ] {
            let mut v = json.clone();
            v[field] = value;
            let e = parse(&v).unwrap_err().to_string();
            assert!(e.contains("x/config.json") && e.contains(want), "{field}: {e}");
        }
        // A quant_method other than mxfp4 is still refused by name at load.
        let mut v = json.clone();
        v["quantization_config"] = serde_json::json!({"quant_method": "fp8"});
        assert_eq!(parse(&v).unwrap().foreign_quantization.as_deref(), Some("fp8"));
    }

    #[test]
    fn foreign_quantization_is_refused_at_load_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(&p, deepseek_v3_released().to_string()).unwrap();
        let e = crate::checkpoint::Checkpoint::open(dir.path()).err().unwrap().to_string();
        assert!(e.contains("config.json") && e.contains("`fp8`"), "{e}");
    }

    #[test]
    fn absurd_sizes_are_refused_by_field_before_allocation() {
        for (field, value) in [
            ("num_hidden_layers", serde_json::json!(1_000_000_000_000u64)),
            ("num_hidden_layers", serde_json::json!(1025)),
            ("head_dim", serde_json::json!(1_000_000_000_000u64)),
            ("hidden_size", serde_json::json!(1u64 << 40)),
            ("vocab_size", serde_json::json!((1u64 << 24) + 1)),
            ("num_experts", serde_json::json!(5000)),
            ("moe_intermediate_size", serde_json::json!(1u64 << 21)),
            ("max_position_embeddings", serde_json::json!(1u64 << 40)),
        ] {
            let mut v = base();
            v[field] = value.clone();
            let e = parse(&v).unwrap_err().to_string();
            assert!(e.contains("x/config.json") && e.contains(&format!("`{field}`")), "{field}={value}: {e}");
        }
        // Every size within its bound, but the product is too large: checked, not wrapped.
        let mut v = base();
        for (f, x) in [
            ("hidden_size", 1u64 << 16),
            ("num_hidden_layers", 1024),
            ("num_experts", 4096),
            ("moe_intermediate_size", 1 << 20),
        ] {
            v[f] = x.into();
        }
        let e = parse(&v).unwrap_err().to_string();
        assert!(e.contains("weights, more than zmoe reads"), "{e}");
        // The largest real models load (also checked in deepseek_v3_and_kimi_k2_released_configs).
        let c = parse(&deepseek_v3_released()).unwrap();
        assert!(c.weight_elements().unwrap() > 600_000_000_000 && c.weight_elements().unwrap() < limits::MAX_PARAMS);
    }

    #[test]
    fn impossible_numbers_are_refused() {
        for (field, value, want) in [
            ("rope_theta", serde_json::json!(0.0), "`rope_theta`"),
            ("rope_theta", serde_json::json!(-1.0), "`rope_theta`"),
            ("rms_norm_eps", serde_json::json!(-1e-6), "`rms_norm_eps`"),
            ("rms_norm_eps", serde_json::json!(0.0), "`rms_norm_eps`"),
            ("partial_rotary_factor", serde_json::json!(1e12), "`partial_rotary_factor`"),
            ("partial_rotary_factor", serde_json::json!(0.0), "`partial_rotary_factor`"),
            ("eos_token_id", serde_json::json!(4_294_967_296u64), "`eos_token_id`"),
            ("eos_token_id", serde_json::json!(-1), "`eos_token_id`"),
            ("eos_token_id", serde_json::json!([5, -1]), "`eos_token_id`"),
            ("bos_token_id", serde_json::json!(1u64 << 33), "`bos_token_id`"),
        ] {
            let mut v = base();
            v[field] = value.clone();
            let e = parse(&v).unwrap_err().to_string();
            assert!(e.contains("x/config.json") && e.contains(want), "{field}={value}: {e}");
        }
        for (k, x) in
            [("factor", 0.0), ("factor", -2.0), ("original_max_position_embeddings", 0.0), ("beta_fast", -1.0)]
        {
            let mut v = deepseek_v3_released();
            v["rope_scaling"][k] = x.into();
            let e = parse(&v).unwrap_err().to_string();
            assert!(e.contains(&format!("rope_parameters.{k}")), "{k}={x}: {e}");
        }
        let mut v = deepseek_v3_released();
        v["routed_scaling_factor"] = (-1.0).into();
        assert!(parse(&v).unwrap_err().to_string().contains("routed_scaling_factor"));
    }

    #[test]
    fn generation_config_eos_ids_are_added_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), base().to_string()).unwrap();
        std::fs::write(dir.path().join("generation_config.json"), r#"{"eos_token_id": [6, 7]}"#).unwrap();
        assert_eq!(ModelConfig::load(dir.path()).unwrap().eos_token_ids, vec![5, 6, 7]);
        for bad in [r#"{"eos_token_id": 4294967296}"#, r#"{"eos_token_id": [-1]}"#, r#"{"eos_token_id": 100}"#] {
            std::fs::write(dir.path().join("generation_config.json"), bad).unwrap();
            let e = ModelConfig::load(dir.path()).unwrap_err().to_string();
            assert!(e.contains("generation_config.json") && e.contains("eos_token_id"), "{bad}: {e}");
        }
    }

    #[test]
    fn errors_name_the_field() {
        let mut v = base();
        v["model_type"] = "llama".into();
        let e = parse(&v).unwrap_err().to_string();
        assert!(e.contains("x/config.json") && e.contains("unknown model_type `llama`"), "{e}");
        let mut v = base();
        v["hidden_size"] = "big".into();
        let e = parse(&v).unwrap_err().to_string();
        assert!(e.contains("`hidden_size`"), "{e}");
        let mut v = base();
        v.as_object_mut().unwrap().remove("vocab_size");
        assert!(parse(&v).unwrap_err().to_string().contains("missing required field `vocab_size`"));
        let mut v = base();
        v["quantization"] = serde_json::json!({"group_size": 48, "bits": 4});
        assert!(parse(&v).unwrap_err().to_string().contains("group_size 48"));
    }
}
