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
}

impl Family {
    /// The `model_type` string in config.json.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Qwen3Moe => "qwen3_moe",
        }
    }

    /// Parses a `model_type` string.
    pub fn from_model_type(s: &str) -> Option<Family> {
        match s {
            "qwen3_moe" => Some(Family::Qwen3Moe),
            _ => None,
        }
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

/// RoPE parameters (only the default rope type is needed by Qwen3-MoE).
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    /// Base θ of the inverse frequencies.
    pub theta: f64,
    /// Rotated dims per head (`head_dim · partial_rotary_factor`).
    pub dim: usize,
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
    /// Per-head dimension (from config; not necessarily hidden / heads).
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// Rotary embedding parameters.
    pub rope: RopeConfig,
    /// Whether q/k/v/o projections carry biases.
    pub attention_bias: bool,
    /// Routed experts per MoE layer (0 = dense model).
    pub num_experts: usize,
    /// Experts selected per token.
    pub top_k: usize,
    /// Expert FFN width.
    pub moe_intermediate_size: usize,
    /// Dense-layer FFN width.
    pub intermediate_size: usize,
    /// Renormalise the top-k router probabilities to sum to one.
    pub norm_topk_prob: bool,
    /// Layer l is MoE iff (l+1) % step == 0 (and not in `mlp_only_layers`).
    pub decoder_sparse_step: usize,
    /// Layers forced to a dense MLP.
    pub mlp_only_layers: Vec<usize>,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Token ids that end generation.
    pub eos_token_ids: Vec<u32>,
    /// Beginning-of-sequence id, if any.
    pub bos_token_id: Option<u32>,
    /// Longest supported context.
    pub max_position_embeddings: usize,
    /// MLX quantization block, if the checkpoint is quantized.
    pub quantization: Option<QuantConfig>,
}

impl ModelConfig {
    /// Reads and parses `dir/config.json`.
    pub fn load(dir: &Path) -> Result<ModelConfig> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        ModelConfig::parse(&text, &path)
    }

    /// Parses config.json text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<ModelConfig> {
        let v: Value = serde_json::from_str(text).map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        let c = Fields { v: &v, path: path.to_path_buf() };
        let model_type = c.string(&["model_type"])?;
        let family = Family::from_model_type(&model_type)
            .ok_or_else(|| Error::format(path, format!("unknown model_type `{model_type}` (supported: qwen3_moe)")))?;
        let hidden_size = c.usize(&["hidden_size"])?;
        let num_heads = c.usize(&["num_attention_heads"])?;
        let head_dim = match c.opt_usize(&["head_dim"])? {
            Some(d) => d,
            None => hidden_size / num_heads.max(1),
        };
        let rope = c.rope(head_dim)?;
        let num_experts = c.opt_usize(&["num_experts", "num_local_experts"])?.unwrap_or(0);
        let quantization = match v.get("quantization").or_else(|| v.get("quantization_config")) {
            Some(q) => parse_quant(q, path)?,
            None => None,
        };
        let cfg = ModelConfig {
            family,
            vocab_size: c.usize(&["vocab_size"])?,
            hidden_size,
            num_layers: c.usize(&["num_hidden_layers"])?,
            num_heads,
            num_kv_heads: c.opt_usize(&["num_key_value_heads"])?.unwrap_or(num_heads),
            head_dim,
            rms_norm_eps: c.opt_f64(&["rms_norm_eps"])?.unwrap_or(1e-6) as f32,
            rope,
            attention_bias: c.opt_bool(&["attention_bias"])?.unwrap_or(false),
            num_experts,
            top_k: c.opt_usize(&["num_experts_per_tok"])?.unwrap_or(if num_experts > 0 { 1 } else { 0 }),
            moe_intermediate_size: c.opt_usize(&["moe_intermediate_size"])?.unwrap_or(0),
            intermediate_size: c.opt_usize(&["intermediate_size"])?.unwrap_or(0),
            norm_topk_prob: c.opt_bool(&["norm_topk_prob"])?.unwrap_or(false),
            decoder_sparse_step: c.opt_usize(&["decoder_sparse_step"])?.unwrap_or(1),
            mlp_only_layers: c.opt_usize_list(&["mlp_only_layers"])?.unwrap_or_default(),
            tie_word_embeddings: c.opt_bool(&["tie_word_embeddings"])?.unwrap_or(false),
            eos_token_ids: c.opt_usize_or_list(&["eos_token_id"])?.unwrap_or_default(),
            bos_token_id: c.opt_usize(&["bos_token_id"])?.map(|x| x as u32),
            max_position_embeddings: c.opt_usize(&["max_position_embeddings"])?.unwrap_or(32768),
            quantization,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Whether layer `l` has a routed-experts MLP (model-spec §2.1).
    pub fn is_moe_layer(&self, l: usize) -> bool {
        !self.mlp_only_layers.contains(&l)
            && self.num_experts > 0
            && (l + 1).is_multiple_of(self.decoder_sparse_step.max(1))
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
            ("decoder_sparse_step", self.decoder_sparse_step),
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
        if self.num_experts > 0 {
            if self.top_k == 0 || self.top_k > self.num_experts {
                return bad(format!("num_experts_per_tok {} must be in 1..={}", self.top_k, self.num_experts));
            }
            if self.moe_intermediate_size == 0 {
                return bad("`moe_intermediate_size` must be positive for an MoE model".into());
            }
        }
        let dense_layers = (0..self.num_layers).any(|l| !self.is_moe_layer(l));
        if dense_layers && self.intermediate_size == 0 {
            return bad("`intermediate_size` must be positive when a layer has a dense MLP".into());
        }
        if let Some(&t) = self.eos_token_ids.iter().find(|&&t| t as usize >= self.vocab_size) {
            return bad(format!("eos_token_id {t} is outside the vocabulary ({})", self.vocab_size));
        }
        Ok(())
    }
}

/// Parses an MLX `quantization` block (model-spec §6.3). transformers-style blocks
/// (`quant_method`) without MLX fields are rejected: zmoe reads MLX layouts only.
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
    fn usize(&self, names: &[&str]) -> Result<usize> {
        self.opt_usize(names)?.ok_or_else(|| self.missing(names))
    }
    fn opt_usize(&self, names: &[&str]) -> Result<Option<usize>> {
        self.get(names)
            .map(|(n, v)| v.as_u64().map(|x| x as usize).ok_or_else(|| self.err(n, "a non-negative integer", v)))
            .transpose()
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
    fn opt_usize_or_list(&self, names: &[&str]) -> Result<Option<Vec<u32>>> {
        let Some((n, v)) = self.get(names) else { return Ok(None) };
        if let Some(x) = v.as_u64() {
            return Ok(Some(vec![x as u32]));
        }
        Ok(self.opt_usize_list(&[n])?.map(|l| l.into_iter().map(|x| x as u32).collect()))
    }
    /// `rope_theta` (4.x) or `rope_parameters.rope_theta` (5.x); only the default rope type.
    fn rope(&self, head_dim: usize) -> Result<RopeConfig> {
        let params = self.get(&["rope_parameters", "rope_scaling"]).map(|(_, v)| v);
        if let Some(p) = params {
            let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str).unwrap_or("default");
            if kind != "default" {
                return Err(Error::format(
                    &self.path,
                    format!("rope type `{kind}` is not supported for this family (only `default`)"),
                ));
            }
        }
        let theta = match self.opt_f64(&["rope_theta"])? {
            Some(t) => t,
            None => params
                .and_then(|p| p.get("rope_theta"))
                .map(|t| t.as_f64().ok_or_else(|| self.err("rope_parameters.rope_theta", "a number", t)))
                .transpose()?
                .unwrap_or(10000.0),
        };
        let factor = self
            .opt_f64(&["partial_rotary_factor"])?
            .or_else(|| params.and_then(|p| p.get("partial_rotary_factor")).and_then(Value::as_f64))
            .unwrap_or(1.0);
        Ok(RopeConfig { theta, dim: (head_dim as f64 * factor) as usize })
    }
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
