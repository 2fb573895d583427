//! Synthetic checkpoints: complete model folders in the real on-disk formats, with random
//! weights from a seed.
//!
//! Shapes come from presets (`tiny`, and the real shapes of released models); formats are
//! HF bf16 with per-expert keys, or mlx-community affine 4/8-bit with stacked `switch_mlp`
//! experts and an 8-bit router override; GPT-OSS in its own layouts (transformers-5 fused
//! `[E, in, out]` bf16 experts, the MXFP4 release's `*_blocks`/`*_scales`, mlx-community's
//! split experts) — so loading a synthetic model exercises the same code as loading a
//! downloaded one. Nothing is trivially 1 or 0: norm weights are
//! `1 + 0.1·N(0,1)`, quantization scales have random signs. The folder also has a real
//! tokenizer.json (a byte-level BPE ending in the family's chat special tokens) and a
//! tokenizer_config.json with the family's released chat template ([`family_chat`]), so the
//! tiny models chat through the same code as downloaded ones.
//!
//! The full-size presets (tens of GB) are streamed: each tensor is a lazy safetensors
//! [`View`] whose bytes are generated (in parallel chunks, each chunk its own RNG stream)
//! only when the writer asks for them, so peak memory is one tensor. Quantized tensors are
//! generated directly as codes + scales + biases rather than by quantizing floats; the
//! biases re-derive their group's scale from the scale stream so each group is centred.
//! Output is written to a temporary sibling folder and renamed into place at the end.

use std::borrow::Cow;
use std::path::Path;

use half::{bf16, f16};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use safetensors::{Dtype, View};
use serde_json::{Value, json};

use crate::checkpoint::mat::FloatType;
use crate::config::{ModelConfig, QuantMode, QuantParams};
use crate::error::{Error, Result};
use crate::rng::Rng;

mod lfm2;

/// Weight storage of a synthetic checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthQuant {
    /// HF layout, bf16 tensors, per-expert keys.
    Bf16,
    /// MLX affine 4-bit (router 8-bit), stacked experts.
    Affine4,
    /// MLX affine 8-bit, stacked experts.
    Affine8,
    /// GPT-OSS only: the original release, MXFP4 experts (`*_blocks` / `*_scales`, E8M0
    /// scales), everything else bf16, `quantization_config.quant_method = "mxfp4"`.
    Mxfp4,
}

impl SynthQuant {
    /// Every format `synth` can write, in CLI order.
    pub const ALL: [SynthQuant; 4] = [SynthQuant::Bf16, SynthQuant::Affine4, SynthQuant::Affine8, SynthQuant::Mxfp4];

    /// The CLI name: `bf16`, `affine4`, `affine8` or `mxfp4`.
    pub fn name(self) -> &'static str {
        match self {
            SynthQuant::Bf16 => "bf16",
            SynthQuant::Affine4 => "affine4",
            SynthQuant::Affine8 => "affine8",
            SynthQuant::Mxfp4 => "mxfp4",
        }
    }

    /// Parses `bf16|affine4|affine8|mxfp4`.
    pub fn parse(s: &str) -> Result<SynthQuant> {
        SynthQuant::ALL
            .into_iter()
            .find(|q| q.name() == s)
            .ok_or_else(|| Error::Arg(format!("unknown --quant `{s}` (expected bf16, affine4, affine8 or mxfp4)")))
    }

    /// Whether `synth` writes this format for `family` (MXFP4 is the gpt-oss release's).
    pub fn fits(self, family: &str) -> bool {
        self != SynthQuant::Mxfp4 || family == "gpt_oss"
    }

    fn bits(self) -> Option<u32> {
        match self {
            SynthQuant::Bf16 | SynthQuant::Mxfp4 => None,
            SynthQuant::Affine4 => Some(4),
            SynthQuant::Affine8 => Some(8),
        }
    }
}

/// What to synthesise.
#[derive(Debug, Clone)]
pub struct SynthSpec {
    /// Model family (`qwen3_moe`).
    pub family: String,
    /// Preset name (see [`PRESETS`]).
    pub preset: String,
    /// Storage format.
    pub quant: SynthQuant,
    /// Quantization group size (affine only).
    pub group_size: usize,
    /// RNG seed.
    pub seed: u64,
    /// Split safetensors into shards of at most this many bytes (HF style, with an index).
    pub max_shard_bytes: usize,
}

/// Known (family, preset) pairs with a one-line description.
pub const PRESETS: [(&str, &str, &str); 12] = [
    ("qwen3_moe", "tiny", "4 layers, H 256, 16 experts top-4, one dense layer; for tests and the demo"),
    ("qwen3_moe", "qwen3-30b-a3b", "Qwen3-30B-A3B shapes: 48 layers, H 2048, 128 experts top-8, vocab 151936"),
    ("glm4_moe_lite", "glm-tiny", "4 layers, H 256, MLA (q_lora 128, kv_lora 128), 16 experts top-4 + 1 shared"),
    (
        "glm4_moe_lite",
        "glm-4.7-flash",
        "GLM-4.7-Flash shapes: 47 layers, H 2048, 20 MLA heads, 64 experts top-4 + 1 shared, vocab 154880",
    ),
    (
        "glm4_moe_lite",
        "glm-tiny-l512",
        "glm-tiny at GLM-4.7-Flash's attention widths (20 MLA heads, kv_lora 512, rope 64), 2 layers: \
         MLA prompt chunks on tensor cores",
    ),
    (
        "deepseek_v3",
        "deepseek-tiny",
        "DeepSeek-V3-shaped, small: 4 layers, YaRN, 32 experts in 4 groups (2 kept) top-4",
    ),
    ("deepseek_v3", "kimi-k2-tiny", "Kimi-K2-shaped (model_type kimi_k2), small: 4 layers, 48 experts top-8, YaRN"),
    ("lfm2_moe", "lfm2-tiny", "6 layers (4 short conv, 2 attention), H 256, 16 experts top-4, one dense layer"),
    (
        "lfm2_moe",
        "lfm2-8b-a1b",
        "LFM2-8B-A1B shapes: 24 layers (18 conv + 6 attention), H 2048, 32 experts top-4, vocab 65536",
    ),
    (
        "lfm2_moe",
        "lfm2-24b-a2b",
        "LFM2-24B-A2B shapes: 40 layers (30 conv + 10 attention), H 2048, 64 experts top-4, vocab 65536",
    ),
    (
        "gpt_oss",
        "gpt-oss-tiny",
        "GPT-OSS-shaped, small: 4 layers (sliding window 6 / full), H 256, sinks, YaRN, 16 experts top-4",
    ),
    (
        "gpt_oss",
        "gpt-oss-20b",
        "gpt-oss-20b shapes: 24 layers (sliding 128 / full), H 2880, 64 heads, 32 experts top-4, vocab 201088",
    ),
];

/// The error for a family/preset pair not in [`PRESETS`].
fn unknown_preset(family: &str, preset: &str) -> Error {
    let known: Vec<String> = PRESETS.iter().map(|(f, p, _)| format!("{f}/{p}")).collect();
    Error::Arg(format!("unknown family/preset `{family}/{preset}` (known: {})", known.join(", ")))
}

/// The chat side of a family's synthetic tokenizer: the special tokens its released chat
/// template writes (the last ids of the vocabulary, in this order), the tokens
/// tokenizer_config.json names, and the template itself, so a synthetic model chats through
/// the same code path as a downloaded one and its rendered prompts tokenize to real special
/// tokens.
#[derive(Debug, Clone, Copy)]
pub struct FamilyChat {
    /// Special tokens, appended in this order at the end of the vocabulary.
    pub specials: &'static [&'static str],
    /// tokenizer_config.json's `bos_token` (and config.json's `bos_token_id`), if the family
    /// has one.
    pub bos: Option<&'static str>,
    /// tokenizer_config.json's `eos_token` (and config.json's `eos_token_id`).
    pub eos: &'static str,
    /// The family's released chat template (see the comment at its top).
    pub template: &'static str,
    /// Write bos/eos as `{"__type": "AddedToken", "content": ...}` objects, as the family's
    /// release does.
    pub token_objects: bool,
}

/// The chat tokens and template of `family` (qwen3_moe, glm4_moe_lite, deepseek_v3, lfm2_moe).
pub fn family_chat(family: &str) -> Result<FamilyChat> {
    match family {
        "qwen3_moe" => Ok(FamilyChat {
            specials: &crate::tokenizer::SPECIALS,
            bos: None,
            eos: "<|im_end|>",
            template: include_str!("templates/qwen3_moe.jinja"),
            token_objects: false,
        }),
        "glm4_moe_lite" => Ok(FamilyChat {
            specials: &[
                "<|endoftext|>",
                "[MASK]",
                "[gMASK]",
                "[sMASK]",
                "<sop>",
                "<eop>",
                "<|system|>",
                "<|user|>",
                "<|assistant|>",
                "<|observation|>",
                "<think>",
                "</think>",
            ],
            bos: None,
            eos: "<|endoftext|>",
            template: include_str!("templates/glm4_moe_lite.jinja"),
            token_objects: false,
        }),
        "deepseek_v3" => Ok(FamilyChat {
            specials: &[
                "<｜begin▁of▁sentence｜>",
                "<｜end▁of▁sentence｜>",
                "<｜User｜>",
                "<｜Assistant｜>",
                "<think>",
                "</think>",
                "<｜tool▁calls▁begin｜>",
                "<｜tool▁calls▁end｜>",
                "<｜tool▁call▁begin｜>",
                "<｜tool▁call▁end｜>",
                "<｜tool▁sep｜>",
                "<｜tool▁output▁begin｜>",
                "<｜tool▁output▁end｜>",
            ],
            bos: Some("<｜begin▁of▁sentence｜>"),
            eos: "<｜end▁of▁sentence｜>",
            template: include_str!("templates/deepseek_v3.jinja"),
            token_objects: true,
        }),
        "lfm2_moe" => Ok(FamilyChat {
            specials: &[
                "<|pad|>",
                "<|startoftext|>",
                "<|endoftext|>",
                "<|im_start|>",
                "<|im_end|>",
                "<|tool_list_start|>",
                "<|tool_list_end|>",
                "<|tool_call_start|>",
                "<|tool_call_end|>",
                "<|tool_response_start|>",
                "<|tool_response_end|>",
            ],
            bos: Some("<|startoftext|>"),
            eos: "<|im_end|>",
            template: include_str!("templates/lfm2_moe.jinja"),
            token_objects: false,
        }),
        "gpt_oss" => Ok(FamilyChat {
            specials: &[
                "<|endoftext|>",
                "<|startoftext|>",
                "<|return|>",
                "<|constrain|>",
                "<|channel|>",
                "<|start|>",
                "<|end|>",
                "<|message|>",
                "<|call|>",
            ],
            bos: None,
            eos: "<|return|>",
            template: include_str!("templates/gpt_oss.jinja"),
            token_objects: false,
        }),
        _ => Err(Error::Arg(format!(
            "unknown family `{family}` (known: qwen3_moe, glm4_moe_lite, deepseek_v3, lfm2_moe, gpt_oss)"
        ))),
    }
}

impl FamilyChat {
    /// The id of special token `name` in a synthetic vocabulary of `vocab` ids.
    pub fn id(&self, vocab: usize, name: &str) -> Option<usize> {
        self.specials.iter().position(|s| *s == name).map(|i| vocab - self.specials.len() + i)
    }

    /// The tokenizer_config.json of a synthetic model of this family.
    pub fn tokenizer_config(&self, max_len: Option<u64>) -> Value {
        let token = |t: &str| {
            if self.token_objects {
                json!({"__type": "AddedToken", "content": t, "lstrip": false, "normalized": true,
                       "rstrip": false, "single_word": false})
            } else {
                json!(t)
            }
        };
        json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos.map(token),
            "eos_token": token(self.eos),
            "pad_token": token(self.specials[0]),
            "model_max_length": max_len,
            "clean_up_tokenization_spaces": false,
            "chat_template": self.template,
        })
    }
}

/// The HF-style config.json of a preset (without quantization block).
pub fn preset_config(family: &str, preset: &str) -> Result<Value> {
    if family == "lfm2_moe" {
        return lfm2::preset_config(preset);
    }
    if family == "gpt_oss" {
        return gpt_oss_preset_config(preset);
    }
    if family != "qwen3_moe" {
        return mla_preset_config(family, preset);
    }
    let (vocab, hidden, layers, heads, kv, hd, experts, topk, moe_i, inter, dense): (
        usize,
        _,
        _,
        _,
        _,
        _,
        _,
        _,
        _,
        _,
        Vec<usize>,
    ) = match (family, preset) {
        ("qwen3_moe", "tiny") => (1024, 256, 4, 8, 2, 32, 16, 4, 128, 512, vec![0]),
        ("qwen3_moe", "qwen3-30b-a3b") => (151936, 2048, 48, 32, 4, 128, 128, 8, 768, 6144, vec![]),
        _ => return Err(unknown_preset(family, preset)),
    };
    let n_special = crate::tokenizer::SPECIALS.len();
    Ok(json!({
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd,
        "num_experts": experts, "num_experts_per_tok": topk,
        "moe_intermediate_size": moe_i, "intermediate_size": inter,
        "decoder_sparse_step": 1, "mlp_only_layers": dense, "norm_topk_prob": true,
        "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "max_position_embeddings": 40960,
        "tie_word_embeddings": false, "attention_bias": false, "use_sliding_window": false,
        "hidden_act": "silu", "torch_dtype": "bfloat16",
        "bos_token_id": vocab - n_special, "eos_token_id": vocab - 1,
    }))
}

/// MLA presets (model-spec §3.2 for GLM-4.7-Flash; DeepSeek-V3 / Kimi-K2 shaped small ones).
fn mla_preset_config(family: &str, preset: &str) -> Result<Value> {
    let chat = family_chat(family)?;
    let yarn = json!({"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                      "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                      "rope_theta": 10000.0});
    // (model_type, vocab, hidden, layers, heads, q_lora, kv_lora, nope, rope, v, E, top-k,
    //  moe_i, inter, n_group, topk_group, scaling, first dense layers)
    #[allow(clippy::type_complexity)]
    let (mt, vocab, hidden, layers, heads, q_lora, kv_lora, nope, rope, v, e, k, moe_i, inter, ng, tg, scale, dense): (
        &str,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        f64,
        usize,
    ) = match (family, preset) {
        ("glm4_moe_lite", "glm-tiny") => {
            ("glm4_moe_lite", 1024, 256, 4, 4, 128, 128, 64, 32, 64, 16, 4, 128, 512, 1, 1, 1.8, 1)
        }
        ("glm4_moe_lite", "glm-tiny-l512") => {
            ("glm4_moe_lite", 1024, 256, 2, 20, 128, 512, 64, 64, 64, 16, 4, 128, 512, 1, 1, 1.8, 1)
        }
        ("glm4_moe_lite", "glm-4.7-flash") => {
            ("glm4_moe_lite", 154880, 2048, 47, 20, 768, 512, 192, 64, 256, 64, 4, 1536, 10240, 1, 1, 1.8, 1)
        }
        ("deepseek_v3", "deepseek-tiny") => ("deepseek_v3", 1024, 256, 4, 4, 192, 128, 64, 32, 64, 32, 4, 128, 512, 4, 2, 2.5, 1),
        ("deepseek_v3", "kimi-k2-tiny") => {
            ("kimi_k2", 1024, 256, 4, 4, 192, 128, 64, 32, 64, 48, 8, 64, 512, 1, 1, 2.827, 1)
        }
        _ => return Err(unknown_preset(family, preset)),
    };
    let mut c = json!({
        "model_type": mt,
        "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": heads,
        "q_lora_rank": q_lora, "kv_lora_rank": kv_lora, "qk_nope_head_dim": nope,
        "qk_rope_head_dim": rope, "v_head_dim": v,
        "n_routed_experts": e, "num_experts_per_tok": k, "n_shared_experts": 1,
        "moe_intermediate_size": moe_i, "intermediate_size": inter,
        "n_group": ng, "topk_group": tg, "routed_scaling_factor": scale, "norm_topk_prob": true,
        "rope_interleave": true, "attention_bias": false, "tie_word_embeddings": false,
        "hidden_act": "silu", "torch_dtype": "bfloat16",
        "eos_token_id": chat.id(vocab, chat.eos),
    });
    if let Some(bos) = chat.bos {
        c["bos_token_id"] = json!(chat.id(vocab, bos));
    }
    if family == "glm4_moe_lite" {
        c["architectures"] = json!(["Glm4MoeLiteForCausalLM"]);
        c["rms_norm_eps"] = json!(1e-5);
        c["rope_theta"] = json!(1_000_000.0);
        c["max_position_embeddings"] = json!(202752);
        let kinds: Vec<&str> = (0..layers).map(|l| if l < dense { "dense" } else { "sparse" }).collect();
        c["mlp_layer_types"] = json!(kinds);
    } else {
        c["architectures"] = json!(["DeepseekV3ForCausalLM"]);
        c["rms_norm_eps"] = json!(1e-6);
        c["rope_scaling"] = yarn;
        c["max_position_embeddings"] = json!(163840);
        c["first_k_dense_replace"] = json!(dense);
    }
    Ok(c)
}

/// GPT-OSS presets (model-spec §5.2 for gpt-oss-20b; the tiny one keeps its structure —
/// alternating sliding/full layers starting with sliding, sinks, YaRN with truncate false —
/// with a window of 6 so that short prompts cross it).
fn gpt_oss_preset_config(preset: &str) -> Result<Value> {
    let chat = family_chat("gpt_oss")?;
    // (vocab, hidden, layers, heads, kv heads, head_dim, experts, top-k, intermediate, window)
    let (vocab, hidden, layers, heads, kv, hd, e, k, inter, window): (
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
    ) = match preset {
        "gpt-oss-tiny" => (1024, 256, 4, 8, 2, 32, 16, 4, 256, 6),
        "gpt-oss-20b" => (201088, 2880, 24, 64, 8, 64, 32, 4, 2880, 128),
        _ => {
            let known: Vec<String> = PRESETS.iter().map(|(f, p, _)| format!("{f}/{p}")).collect();
            return Err(Error::Arg(format!("unknown family/preset `gpt_oss/{preset}` (known: {})", known.join(", "))));
        }
    };
    let kinds: Vec<&str> =
        (0..layers).map(|l| if l % 2 == 0 { "sliding_attention" } else { "full_attention" }).collect();
    Ok(json!({
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd,
        "num_local_experts": e, "num_experts_per_tok": k, "experts_per_token": k,
        "intermediate_size": inter, "sliding_window": window, "layer_types": kinds,
        "rms_norm_eps": 1e-5, "rope_theta": 150000.0,
        "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "original_max_position_embeddings": 4096, "truncate": false},
        "max_position_embeddings": 131072, "initial_context_length": 4096,
        "swiglu_limit": 7.0, "attention_bias": true, "tie_word_embeddings": false,
        "hidden_act": "silu", "torch_dtype": "bfloat16",
        "pad_token_id": chat.id(vocab, "<|endoftext|>"), "eos_token_id": chat.id(vocab, chat.eos),
    }))
}

/// How a tensor's bytes are produced.
#[derive(Debug, Clone)]
enum Gen {
    /// `center + std·N(0,1)` stored as `dtype`.
    Float { center: f32, std: f32, dtype: FloatType },
    /// Uniform random packed codes (u32 words).
    Codes,
    /// Per-group scales of magnitude ≈ `std·√12 / 2^bits`, random sign, bf16.
    Scales { bits: u32, std: f32 },
    /// Per-group biases centring each group: `−scale·(2^bits−1)/2 + noise`, bf16.
    Biases { bits: u32, std: f32, scales: String },
    /// E8M0 exponent bytes, uniform in `lo..=hi` (MXFP4 block scales).
    E8m0 { lo: u8, hi: u8 },
}

/// A lazily generated tensor.
struct Lazy {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    source: Gen,
    seed: u64,
    bar: ProgressBar,
}

const CHUNK: usize = 1 << 16;

fn scale_of(rng: &mut Rng, bits: u32, std: f32) -> f32 {
    let mag = std * 12f32.sqrt() / (1u32 << bits) as f32 * (1.0 + 0.25 * rng.normal()).abs().max(0.1);
    if rng.next_u64() & 1 == 0 { mag } else { -mag }
}

impl Lazy {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    fn elem_size(&self) -> usize {
        match self.dtype {
            Dtype::F32 | Dtype::U32 => 4,
            Dtype::U8 => 1,
            _ => 2,
        }
    }

    fn generate(&self) -> Vec<u8> {
        let es = self.elem_size();
        let mut out = vec![0u8; self.numel() * es];
        let stream = |name: &str, c: usize| Rng::for_stream(self.seed, &format!("{name}#{c}"));
        out.par_chunks_mut(CHUNK * es).enumerate().for_each(|(c, buf)| {
            let mut r = stream(&self.name, c);
            match &self.source {
                Gen::Float { center, std, dtype } => {
                    for e in buf.chunks_exact_mut(es) {
                        let v = center + std * r.normal();
                        match dtype {
                            FloatType::F32 => e.copy_from_slice(&v.to_le_bytes()),
                            FloatType::F16 => e.copy_from_slice(&f16::from_f32(v).to_le_bytes()),
                            FloatType::Bf16 => e.copy_from_slice(&bf16::from_f32(v).to_le_bytes()),
                        }
                    }
                }
                Gen::Codes => buf.chunks_mut(8).for_each(|e| {
                    let w = r.next_u64().to_le_bytes();
                    e.copy_from_slice(&w[..e.len()]);
                }),
                Gen::Scales { bits, std } => {
                    for e in buf.chunks_exact_mut(2) {
                        e.copy_from_slice(&bf16::from_f32(scale_of(&mut r, *bits, *std)).to_le_bytes());
                    }
                }
                Gen::E8m0 { lo, hi } => {
                    for e in buf.iter_mut() {
                        *e = lo + (r.next_u64() % (*hi - *lo + 1) as u64) as u8;
                    }
                }
                Gen::Biases { bits, std, scales } => {
                    let mut rs = stream(scales, c);
                    let half_range = ((1u32 << bits) - 1) as f32 / 2.0;
                    for e in buf.chunks_exact_mut(2) {
                        let s = bf16::from_f32(scale_of(&mut rs, *bits, *std)).to_f32();
                        let b = -s * half_range + 0.1 * std * r.normal();
                        e.copy_from_slice(&bf16::from_f32(b).to_le_bytes());
                    }
                }
            }
        });
        out
    }
}

impl View for &Lazy {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let d = self.generate();
        self.bar.inc(d.len() as u64);
        Cow::Owned(d)
    }
    fn data_len(&self) -> usize {
        self.numel() * self.elem_size()
    }
}

/// The SwiGLU projection names of HF and mlx-community checkpoints.
const PROJ: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

/// Collects the tensor list of a checkpoint.
struct Builder {
    tensors: Vec<Lazy>,
    seed: u64,
    bar: ProgressBar,
    quant: Option<QuantParams>,
}

impl Builder {
    fn push(&mut self, name: String, dtype: Dtype, shape: Vec<usize>, source: Gen) {
        self.tensors.push(Lazy { name, dtype, shape, source, seed: self.seed, bar: self.bar.clone() });
    }

    /// A norm weight `[n]`: 1 + 0.1·N.
    fn norm(&mut self, name: String, n: usize) {
        self.push(name, Dtype::BF16, vec![n], Gen::Float { center: 1.0, std: 0.1, dtype: FloatType::Bf16 });
    }

    /// A bf16 vector (linear biases, sinks): `std·N(0,1)`.
    fn bias(&mut self, name: String, shape: Vec<usize>, std: f32) {
        self.push(name, Dtype::BF16, shape, Gen::Float { center: 0.0, std, dtype: FloatType::Bf16 });
    }

    /// An unquantized bf16 linear weight `[out, in]`, whatever the checkpoint's format.
    fn linear_float(&mut self, path: &str, out: usize, inp: usize) {
        let source = Gen::Float { center: 0.0, std: 0.02, dtype: FloatType::Bf16 };
        self.push(format!("{path}.weight"), Dtype::BF16, vec![out, inp], source);
    }

    /// A dense SwiGLU FFN `{p}.{gate,up,down}` of width `f` over hidden `h`; `names` are the
    /// family's projection names (`gate_proj`, `up_proj`, `down_proj`; LFM2's HF `w1`, `w3`, `w2`).
    fn ffn(&mut self, p: &str, names: [&str; 3], f: usize, h: usize) {
        let [gate, up, down] = names;
        self.linear(&format!("{p}.{gate}"), None, f, h, None);
        self.linear(&format!("{p}.{up}"), None, f, h, None);
        self.linear(&format!("{p}.{down}"), None, h, f, None);
    }

    /// `e` routed experts of width `i` under the MLP prefix `p`: mlx-community's stacked
    /// `{p}.switch_mlp.*` when `stacked`, else HF's per-expert `{p}.experts.{x}.*`.
    fn experts(&mut self, p: &str, names: [&str; 3], (e, i, h): (usize, usize, usize), stacked: bool) {
        let [gate, up, down] = names;
        if stacked {
            let sw = format!("{p}.switch_mlp");
            self.linear(&format!("{sw}.{gate}"), Some(e), i, h, None);
            self.linear(&format!("{sw}.{up}"), Some(e), i, h, None);
            self.linear(&format!("{sw}.{down}"), Some(e), h, i, None);
        } else {
            for x in 0..e {
                self.ffn(&format!("{p}.experts.{x}"), names, i, h);
            }
        }
    }

    /// A linear module `[stack?, out, in]`, quantized with `q` (or the builder's default).
    fn linear(&mut self, path: &str, stack: Option<usize>, out: usize, inp: usize, q: Option<QuantParams>) {
        let std = 0.02;
        let lead: Vec<usize> = stack.into_iter().collect();
        let shape = |last: usize| lead.iter().copied().chain([out, last]).collect::<Vec<_>>();
        match q.or(self.quant) {
            None => self.push(
                format!("{path}.weight"),
                Dtype::BF16,
                shape(inp),
                Gen::Float { center: 0.0, std, dtype: FloatType::Bf16 },
            ),
            Some(q) => {
                let bits = q.bits;
                self.push(format!("{path}.weight"), Dtype::U32, shape(inp * bits as usize / 32), Gen::Codes);
                let scales = format!("{path}.scales");
                self.push(scales.clone(), Dtype::BF16, shape(inp / q.group_size), Gen::Scales { bits, std });
                self.push(
                    format!("{path}.biases"),
                    Dtype::BF16,
                    shape(inp / q.group_size),
                    Gen::Biases { bits, std, scales },
                );
            }
        }
    }
}

/// Writes a complete synthetic model folder to `out` (given as `--out`), marked as zmoe's
/// (see [`crate::outdir`]). Refuses to replace an existing non-empty folder unless `force` is
/// set and zmoe wrote that folder; the new folder is built beside it and swapped in when
/// complete.
pub fn write(spec: &SynthSpec, out: &Path, force: bool) -> Result<()> {
    write_as(spec, out, force, Weights::Files)
}

/// Where a synthetic folder keeps its weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weights {
    /// safetensors files, like a downloaded model (what every other engine reads).
    Files,
    /// Only the recipe ([`RECIPE`]): zmoe generates the same bytes in memory whenever it
    /// opens the folder ([`generate`]), so a 30B-shaped model costs seconds of CPU instead
    /// of 17 GB written and read back (benchmarks on the GPU machine, where every second of
    /// device time counts), and larger shapes need no disk at all.
    Generated,
}

/// The file of a folder written with [`Weights::Generated`]: the family, preset, format,
/// group size and seed its weights come from, and [`GENERATOR`].
pub const RECIPE: &str = "model.zmoe-synth.json";

/// Whether `name` is a file `zmoe synth` writes into a model folder (what a killed run may
/// leave in its staging folder: `outdir::Staging::begin` removes such folders).
pub fn writes_file(name: &str) -> bool {
    matches!(
        name,
        "config.json"
            | "tokenizer.json"
            | "tokenizer_config.json"
            | "model.safetensors"
            | "model.safetensors.index.json"
            | RECIPE
    ) || (name.starts_with("model-") && name.ends_with(".safetensors"))
}

/// The version of the weight generator (the streams and formulas of `Lazy::generate` and the
/// tensor list of each preset). A recipe is regenerated by whatever zmoe opens it, so a change
/// to those must bump this: a recipe of another version is refused instead of silently
/// becoming another model.
pub const GENERATOR: u64 = 1;

/// [`write`], with the weights as files or as a recipe.
pub fn write_as(spec: &SynthSpec, out: &Path, force: bool, weights: Weights) -> Result<()> {
    crate::outdir::check_target("--out", out, force)?;
    let (cfg_json, cfg, tensors, bar) = plan(spec)?;
    let total: usize = tensors.iter().map(|t| (&t).data_len()).sum();
    if total > 64 << 20 && weights == Weights::Files {
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        bar.set_length(total as u64);
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})")
                .expect("static template")
                .progress_chars("=> "),
        );
        bar.set_message(format!("synth {}", spec.preset));
    }

    let wrote = json!({"family": spec.family, "preset": spec.preset, "quant": spec.quant.name(), "seed": spec.seed});
    let staging = crate::outdir::Staging::begin("--out", out, force, wrote, &writes_file)?;
    let result = match weights {
        Weights::Files => write_files(&tensors, &cfg_json, &cfg, spec, staging.path()),
        Weights::Generated => write_small_files(&cfg_json, &cfg, spec, staging.path()).and_then(|()| {
            let recipe = Recipe {
                family: spec.family.clone(),
                preset: spec.preset.clone(),
                quant: spec.quant.name().to_string(),
                group_size: spec.group_size,
                seed: spec.seed,
                generator: GENERATOR,
            };
            let p = staging.path().join(RECIPE);
            std::fs::write(&p, serde_json::to_string_pretty(&recipe).expect("recipe serialises"))
                .map_err(|e| Error::io(&p, e))
        }),
    };
    bar.finish_and_clear();
    result?;
    staging.finish()
}

/// The [`RECIPE`] file: what [`generate`] needs to make a folder's weights again.
#[derive(serde::Serialize, serde::Deserialize)]
struct Recipe {
    family: String,
    preset: String,
    quant: String,
    group_size: usize,
    seed: u64,
    generator: u64,
}

/// One tensor generated in memory from a recipe.
pub struct Generated {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Little-endian bytes, exactly what [`write`] stores in the safetensors file.
    pub data: Vec<u8>,
}

/// The tensors of a folder written with [`Weights::Generated`]: reads its recipe (`recipe`,
/// the [`RECIPE`] file) and generates every tensor, after checking that `config_json` (the
/// folder's config.json, parsed) is the one the recipe's preset writes — an edited config
/// would not match the generated shapes.
pub fn generate(recipe: &Path, config_json: &Value) -> Result<Vec<Generated>> {
    let text = crate::input::read_to_string(recipe)?;
    let r: Recipe = serde_json::from_str(&text).map_err(|e| {
        let what = if e.is_data() { "not a zmoe synth recipe" } else { "not valid JSON" };
        Error::format(recipe, format!("{what}: {e}"))
    })?;
    let version = r.generator;
    if version != GENERATOR {
        return Err(Error::format(
            recipe,
            format!(
                "written for weight generator version {version}, this zmoe has version {GENERATOR}: the weights \
                 would differ (write the folder again with this zmoe's `synth --generated`)"
            ),
        ));
    }
    let quant = SynthQuant::parse(&r.quant).map_err(|e| Error::format(recipe, e.to_string()))?;
    let spec = SynthSpec {
        family: r.family,
        preset: r.preset,
        quant,
        group_size: r.group_size,
        seed: r.seed,
        max_shard_bytes: SHARD_BYTES,
    };
    let (cfg_json, _, tensors, _) = plan(&spec).map_err(|e| Error::format(recipe, e.to_string()))?;
    if &cfg_json != config_json {
        return Err(Error::format(
            recipe.with_file_name("config.json"),
            format!(
                "differs from the config of the recipe's preset ({}/{}): the generated weights would not fit it \
                 (write the folder again with `zmoe synth --generated`)",
                spec.family, spec.preset
            ),
        ));
    }
    Ok(tensors
        .par_iter()
        .map(|t| Generated { name: t.name.clone(), dtype: t.dtype, shape: t.shape.clone(), data: t.generate() })
        .collect())
}

/// The config JSON, parsed config and tensor list of a synthetic checkpoint (the bar is
/// hidden; [`write_as`] shows it for large files).
fn plan(spec: &SynthSpec) -> Result<(Value, ModelConfig, Vec<Lazy>, ProgressBar)> {
    let mut cfg_json = preset_config(&spec.family, &spec.preset)?;
    let gpt_oss = spec.family == "gpt_oss";
    if !spec.quant.fits(&spec.family) {
        return Err(Error::Arg("--quant mxfp4 is the gpt-oss release format: use it with --family gpt_oss".into()));
    }
    if spec.quant == SynthQuant::Mxfp4 {
        cfg_json["quantization_config"] = json!({"quant_method": "mxfp4", "modules_to_not_convert":
            ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]});
    }
    let quant =
        spec.quant.bits().map(|bits| QuantParams { mode: QuantMode::Affine, bits, group_size: spec.group_size });
    if let Some(q) = quant {
        if !matches!(q.group_size, 32 | 64 | 128) {
            return Err(Error::Arg(format!("--group-size {} not in {{32, 64, 128}}", q.group_size)));
        }
        let mut block = json!({"group_size": q.group_size, "bits": q.bits, "mode": "affine"});
        let layers = cfg_json["num_hidden_layers"].as_u64().unwrap_or(0);
        for l in 0..layers {
            // mlx-lm's default: the Qwen3 router stays 8-bit, group 64 (model-spec §6.3); the
            // GLM / DeepSeek router is not an nn.Linear there and stays bf16.
            if spec.family == "qwen3_moe" {
                block[format!("model.layers.{l}.mlp.gate")] = json!({"group_size": 64, "bits": 8});
            }
            // mlx-lm's LFM2-MoE default likewise: `feed_forward.gate` 8-bit.
            if spec.family == "lfm2_moe" {
                block[format!("model.layers.{l}.feed_forward.gate")] = json!({"group_size": 64, "bits": 8});
            }
            if gpt_oss {
                block[format!("model.layers.{l}.mlp.router")] = json!({"group_size": 64, "bits": 8});
            }
        }
        cfg_json["quantization"] = block.clone();
        cfg_json["quantization_config"] = block;
    }
    cfg_json["zmoe_synth"] = json!({"preset": spec.preset, "quant": spec.quant.name(), "seed": spec.seed});
    let cfg = ModelConfig::parse(&cfg_json.to_string(), Path::new("<synthetic config.json>"))?;

    let bar = ProgressBar::hidden();
    let mut b = Builder { tensors: Vec::new(), seed: spec.seed, bar: bar.clone(), quant };
    let (h, d) = (cfg.hidden_size, cfg.head_dim);
    let router_q = quant.map(|_| QuantParams { mode: QuantMode::Affine, bits: 8, group_size: 64 });
    if spec.family == "lfm2_moe" {
        lfm2::tensors(&mut b, &cfg, router_q);
    } else if gpt_oss {
        b.linear("model.embed_tokens", None, cfg.vocab_size, h, None);
        gpt_oss_layers(&mut b, &cfg, spec.quant, router_q);
        b.norm("model.norm.weight".into(), h);
        b.linear("lm_head", None, cfg.vocab_size, h, None);
    } else {
        b.linear("model.embed_tokens", None, cfg.vocab_size, h, None);
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            b.norm(format!("{p}.input_layernorm.weight"), h);
            b.norm(format!("{p}.post_attention_layernorm.weight"), h);
            match &cfg.mla {
                None => {
                    b.linear(&format!("{p}.self_attn.q_proj"), None, cfg.num_heads * d, h, None);
                    b.linear(&format!("{p}.self_attn.k_proj"), None, cfg.num_kv_heads * d, h, None);
                    b.linear(&format!("{p}.self_attn.v_proj"), None, cfg.num_kv_heads * d, h, None);
                    b.norm(format!("{p}.self_attn.q_norm.weight"), d);
                    b.norm(format!("{p}.self_attn.k_norm.weight"), d);
                }
                Some(m) => {
                    let a = format!("{p}.self_attn");
                    let (nh, lat, nope, v) = (cfg.num_heads, m.kv_lora_rank, m.qk_nope_head_dim, m.v_head_dim);
                    let q_in = match m.q_lora_rank {
                        Some(r) => {
                            b.linear(&format!("{a}.q_a_proj"), None, r, h, None);
                            b.norm(format!("{a}.q_a_layernorm.weight"), r);
                            b.linear(&format!("{a}.q_b_proj"), None, nh * d, r, None);
                            r
                        }
                        None => h,
                    };
                    if m.q_lora_rank.is_none() {
                        b.linear(&format!("{a}.q_proj"), None, nh * d, q_in, None);
                    }
                    b.linear(&format!("{a}.kv_a_proj_with_mqa"), None, m.cache_row(), h, None);
                    b.norm(format!("{a}.kv_a_layernorm.weight"), lat);
                    if quant.is_some() {
                        // mlx-lm's layout: kv_b_proj split per head (model-spec §6.5).
                        b.linear(&format!("{a}.embed_q"), Some(nh), lat, nope, None);
                        b.linear(&format!("{a}.unembed_out"), Some(nh), v, lat, None);
                    } else {
                        b.linear(&format!("{a}.kv_b_proj"), None, nh * (nope + v), lat, None);
                    }
                }
            }
            b.linear(&format!("{p}.self_attn.o_proj"), None, h, cfg.num_heads * cfg.v_head_dim, None);
            if cfg.is_moe_layer(l) {
                let (e, i) = (cfg.num_experts, cfg.moe_intermediate_size);
                if cfg.mla.is_some() {
                    // GLM / DeepSeek: the router stays bf16 in mlx-lm (not an nn.Linear), its
                    // correction bias f32 and large enough to change selections.
                    b.linear_float(&format!("{p}.mlp.gate"), e, h);
                    b.push(
                        format!("{p}.mlp.gate.e_score_correction_bias"),
                        Dtype::F32,
                        vec![e],
                        Gen::Float { center: 0.0, std: 0.05, dtype: FloatType::F32 },
                    );
                    let sh = format!("{p}.mlp.shared_experts");
                    let fs = cfg.shared_intermediate_size();
                    b.ffn(&sh, PROJ, fs, h);
                } else {
                    b.linear(&format!("{p}.mlp.gate"), None, e, h, router_q);
                }
                b.experts(&format!("{p}.mlp"), PROJ, (e, i, h), quant.is_some());
            } else {
                b.ffn(&format!("{p}.mlp"), PROJ, cfg.intermediate_size, h);
            }
        }
        b.norm("model.norm.weight".into(), h);
        b.linear("lm_head", None, cfg.vocab_size, h, None);
    }
    Ok((cfg_json, cfg, b.tensors, bar))
}

/// GPT-OSS decoder layers in the layout of `quant`: HF bf16 (fused `[E, in, out]` experts with
/// interleaved gate/up columns), the MXFP4 release (`*_blocks [E, out, in/32, 16]`,
/// `*_scales [E, out, in/32]`), or mlx-community (split `mlp.experts.{gate,up,down}_proj`
/// in the builder's MLX mode, router 8-bit). Biases and sinks are random, never zero.
fn gpt_oss_layers(b: &mut Builder, cfg: &ModelConfig, quant: SynthQuant, router_q: Option<QuantParams>) {
    let (h, d, e, i) = (cfg.hidden_size, cfg.head_dim, cfg.num_experts, cfg.moe_intermediate_size);
    let (qo, kvo) = (cfg.num_heads * d, cfg.num_kv_heads * d);
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        b.norm(format!("{p}.input_layernorm.weight"), h);
        b.norm(format!("{p}.post_attention_layernorm.weight"), h);
        let a = format!("{p}.self_attn");
        for (name, out, inp) in [("q_proj", qo, h), ("k_proj", kvo, h), ("v_proj", kvo, h), ("o_proj", h, qo)] {
            b.linear(&format!("{a}.{name}"), None, out, inp, None);
            b.bias(format!("{a}.{name}.bias"), vec![out], 0.05);
        }
        b.bias(format!("{a}.sinks"), vec![cfg.num_heads], 1.0);
        b.linear(&format!("{p}.mlp.router"), None, e, h, router_q);
        b.bias(format!("{p}.mlp.router.bias"), vec![e], 0.1);
        let x = format!("{p}.mlp.experts");
        match quant {
            SynthQuant::Bf16 => {
                let w = Gen::Float { center: 0.0, std: 0.02, dtype: FloatType::Bf16 };
                b.push(format!("{x}.gate_up_proj"), Dtype::BF16, vec![e, h, 2 * i], w.clone());
                b.push(format!("{x}.down_proj"), Dtype::BF16, vec![e, i, h], w);
            }
            SynthQuant::Mxfp4 => {
                for (name, out, inp) in [("gate_up_proj", 2 * i, h), ("down_proj", h, i)] {
                    b.push(format!("{x}.{name}_blocks"), Dtype::U8, vec![e, out, inp / 32, 16], Gen::Codes);
                    b.push(
                        format!("{x}.{name}_scales"),
                        Dtype::U8,
                        vec![e, out, inp / 32],
                        Gen::E8m0 { lo: 118, hi: 121 },
                    );
                }
            }
            SynthQuant::Affine4 | SynthQuant::Affine8 => {
                for (name, out, inp) in [("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)] {
                    b.linear(&format!("{x}.{name}"), Some(e), out, inp, None);
                    b.bias(format!("{x}.{name}.bias"), vec![e, out], 0.05);
                }
            }
        }
        if matches!(quant, SynthQuant::Bf16 | SynthQuant::Mxfp4) {
            b.bias(format!("{x}.gate_up_proj_bias"), vec![e, 2 * i], 0.05);
            b.bias(format!("{x}.down_proj_bias"), vec![e, h], 0.05);
        }
    }
}

/// Default shard size: checkpoints above it are split into model-0000i-of-0000n files.
pub const SHARD_BYTES: usize = 4 << 30;

fn write_files(tensors: &[Lazy], cfg_json: &Value, cfg: &ModelConfig, spec: &SynthSpec, dir: &Path) -> Result<()> {
    write_small_files(cfg_json, cfg, spec, dir)?;
    write_tensors(tensors, spec, dir)
}

/// config.json, tokenizer.json and tokenizer_config.json.
fn write_small_files(cfg_json: &Value, cfg: &ModelConfig, spec: &SynthSpec, dir: &Path) -> Result<()> {
    let cfg_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(cfg_json).expect("config serialises");
    std::fs::write(&cfg_path, text).map_err(|e| Error::io(&cfg_path, e))?;
    let tok_path = dir.join("tokenizer.json");
    let chat = family_chat(&spec.family)?;
    crate::tokenizer::synthetic_with(cfg.vocab_size, spec.seed, chat.specials)?
        .save(&tok_path, false)
        .map_err(|e| Error::format(&tok_path, format!("cannot write tokenizer: {e}")))?;
    let tc_path = dir.join(crate::chat::TOKENIZER_CONFIG);
    let tc = chat.tokenizer_config(cfg_json["max_position_embeddings"].as_u64());
    std::fs::write(&tc_path, serde_json::to_string_pretty(&tc).expect("tokenizer config serialises"))
        .map_err(|e| Error::io(&tc_path, e))
}

/// The safetensors file(s), with an index when there are several.
fn write_tensors(tensors: &[Lazy], spec: &SynthSpec, dir: &Path) -> Result<()> {
    let mut shards: Vec<Vec<&Lazy>> = vec![Vec::new()];
    let mut size = 0;
    for t in tensors {
        let n = (&t).data_len();
        if size + n > spec.max_shard_bytes && !shards.last().is_some_and(Vec::is_empty) {
            shards.push(Vec::new());
            size = 0;
        }
        size += n;
        shards.last_mut().expect("non-empty").push(t);
    }
    let single = shards.len() == 1;
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let fname = if single {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, shards.len())
        };
        let path = dir.join(&fname);
        let meta = [("format".to_string(), "pt".to_string())].into_iter().collect();
        safetensors::serialize_to_file(shard.iter().map(|t| (t.name.clone(), *t)), Some(meta), &path)
            .map_err(|e| Error::format(&path, format!("cannot write safetensors: {e}")))?;
        for t in shard {
            weight_map.insert(t.name.clone(), Value::from(fname.clone()));
        }
    }
    if !single {
        let total: usize = tensors.iter().map(|t| (&t).data_len()).sum();
        let idx = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let p = dir.join("model.safetensors.index.json");
        std::fs::write(&p, serde_json::to_string_pretty(&idx).expect("index serialises"))
            .map_err(|e| Error::io(&p, e))?;
    }
    Ok(())
}
