//! LFM2-MoE synthetic checkpoints (model-spec §4.2–4.3, MLX names §6.5): its presets and
//! its tensor list, kept beside the generic writer because every name differs from the other
//! families (`operator_norm`, `conv.*`, `feed_forward.*`, `embedding_norm`, no lm_head).

use safetensors::Dtype;
use serde_json::{Value, json};

use super::{Builder, Gen, family_chat, unknown_preset};
use crate::checkpoint::mat::FloatType;
use crate::config::{ModelConfig, QuantParams};
use crate::error::Result;

/// `layer_types` with attention at `attn` and short conv elsewhere.
fn layer_types(layers: usize, attn: &[usize]) -> Vec<&'static str> {
    (0..layers).map(|l| if attn.contains(&l) { "full_attention" } else { "conv" }).collect()
}

/// The config.json of an LFM2-MoE preset (HF v5 spelling).
///
/// `lfm2-8b-a1b`: the released shapes (model-spec §4.2). `lfm2-24b-a2b`: Liquid AI's
/// release post (liquid.ai/blog/lfm2-24b-a2b) and model card (LiquidAI/LFM2-24B-A2B):
/// hidden 2048 and the 8B's attention configuration (32 heads, 8 KV heads), 40 layers of
/// which 10 attention, 64 experts top-4 of width 1536, the first two layers dense, vocab
/// 65,536. The card does not list the attention layers' indices nor the dense layers'
/// width: here attention sits at every 4th layer from 2 and at 37 (the 8B's pattern,
/// stretched), the dense width is the 8B's 7168.
pub(super) fn preset_config(preset: &str) -> Result<Value> {
    let chat = family_chat("lfm2_moe")?;
    // (vocab, hidden, layers, attention layers, heads, kv heads, dense layers, dense width,
    //  experts, top-k, expert width)
    #[allow(clippy::type_complexity)]
    let (vocab, hidden, layers, attn, heads, kv, dense, inter, e, k, moe_i): (
        usize,
        usize,
        usize,
        Vec<usize>,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
    ) = match preset {
        "lfm2-tiny" => (1024, 256, 6, vec![2, 4], 8, 2, 1, 512, 16, 4, 128),
        "lfm2-8b-a1b" => (65536, 2048, 24, vec![2, 6, 10, 14, 18, 21], 32, 8, 2, 7168, 32, 4, 1792),
        "lfm2-24b-a2b" => (65536, 2048, 40, vec![2, 6, 10, 14, 18, 22, 26, 30, 34, 37], 32, 8, 2, 7168, 64, 4, 1536),
        _ => return Err(unknown_preset("lfm2_moe", preset)),
    };
    Ok(json!({
        "architectures": ["Lfm2MoeForCausalLM"],
        "model_type": "lfm2_moe",
        "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
        "layer_types": layer_types(layers, &attn),
        "num_attention_heads": heads, "num_key_value_heads": kv,
        "num_dense_layers": dense, "intermediate_size": inter,
        "num_experts": e, "num_experts_per_tok": k, "moe_intermediate_size": moe_i,
        "use_expert_bias": true, "norm_topk_prob": true, "routed_scaling_factor": 1.0,
        "conv_L_cache": 3, "conv_bias": false, "norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
        "max_position_embeddings": 128000, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
        "bos_token_id": chat.bos.and_then(|b| chat.id(vocab, b)), "eos_token_id": chat.id(vocab, chat.eos),
    }))
}

/// Every tensor of an LFM2-MoE checkpoint: HF names (per-expert `w1`/`w3`/`w2`, conv kernel
/// `[H, 1, L]`) or, quantized, mlx-community names (`switch_mlp`, dense `gate_proj`/...,
/// conv kernel `[H, L, 1]`, router 8-bit via `router_q`). Tied: no lm_head.
pub(super) fn tensors(b: &mut Builder, cfg: &ModelConfig, router_q: Option<QuantParams>) {
    let mlx = b.quant.is_some();
    let (h, d) = (cfg.hidden_size, cfg.head_dim);
    let kernel = cfg.conv.as_ref().map_or(3, |c| c.kernel);
    b.linear("model.embed_tokens", None, cfg.vocab_size, h, None);
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        b.norm(format!("{p}.operator_norm.weight"), h);
        b.norm(format!("{p}.ffn_norm.weight"), h);
        if cfg.is_conv_layer(l) {
            b.linear(&format!("{p}.conv.in_proj"), None, 3 * h, h, None);
            let shape = if mlx { vec![h, kernel, 1] } else { vec![h, 1, kernel] };
            let source = Gen::Float { center: 0.0, std: 0.3, dtype: FloatType::Bf16 };
            b.push(format!("{p}.conv.conv.weight"), Dtype::BF16, shape, source);
            b.linear(&format!("{p}.conv.out_proj"), None, h, h, None);
        } else {
            let a = format!("{p}.self_attn");
            b.linear(&format!("{a}.q_proj"), None, cfg.num_heads * d, h, None);
            b.linear(&format!("{a}.k_proj"), None, cfg.num_kv_heads * d, h, None);
            b.linear(&format!("{a}.v_proj"), None, cfg.num_kv_heads * d, h, None);
            b.linear(&format!("{a}.out_proj"), None, h, cfg.num_heads * d, None);
            b.norm(format!("{a}.q_layernorm.weight"), d);
            b.norm(format!("{a}.k_layernorm.weight"), d);
        }
        let f = format!("{p}.feed_forward");
        let [gate, up, down] = if mlx { ["gate_proj", "up_proj", "down_proj"] } else { ["w1", "w3", "w2"] };
        if cfg.is_moe_layer(l) {
            let (e, i) = (cfg.num_experts, cfg.moe_intermediate_size);
            b.linear(&format!("{f}.gate"), None, e, h, router_q);
            // f32 and large enough to change selections (model-spec §7).
            let source = Gen::Float { center: 0.0, std: 0.05, dtype: FloatType::F32 };
            b.push(format!("{f}.expert_bias"), Dtype::F32, vec![e], source);
            if mlx {
                let sw = format!("{f}.switch_mlp");
                b.linear(&format!("{sw}.{gate}"), Some(e), i, h, None);
                b.linear(&format!("{sw}.{up}"), Some(e), i, h, None);
                b.linear(&format!("{sw}.{down}"), Some(e), h, i, None);
            } else {
                for x in 0..e {
                    b.linear(&format!("{f}.experts.{x}.{gate}"), None, i, h, None);
                    b.linear(&format!("{f}.experts.{x}.{up}"), None, i, h, None);
                    b.linear(&format!("{f}.experts.{x}.{down}"), None, h, i, None);
                }
            }
        } else {
            let fi = cfg.intermediate_size;
            b.linear(&format!("{f}.{gate}"), None, fi, h, None);
            b.linear(&format!("{f}.{up}"), None, fi, h, None);
            b.linear(&format!("{f}.{down}"), None, h, fi, None);
        }
    }
    b.norm("model.embedding_norm.weight".into(), h);
}
