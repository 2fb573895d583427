//! [`Weights`]: every tensor a family's plan reads, typed and shape-checked at load.
//!
//! Like llama2.c's `TransformerWeights`, each field carries its shape. Loading resolves the
//! two on-disk layouts of the same model — HF per-expert keys
//! (`mlp.experts.{e}.gate_proj.weight`) and mlx-community stacked keys
//! (`mlp.switch_mlp.gate_proj.weight [E, I, H·bits/32]`) — into one in-memory shape, so
//! backends never care where a checkpoint came from.

use crate::checkpoint::{Checkpoint, Mat};
use crate::config::{Family, ModelConfig};
use crate::error::Result;

/// A linear layer: weight `[out, in]` and optional bias `[out]`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Weight `[out, in]`.
    pub w: Mat,
    /// Bias `[out]`, decoded to f32.
    pub b: Option<Vec<f32>>,
}

/// Routed experts of one MoE layer.
#[derive(Debug, Clone)]
pub struct Experts {
    /// `E × [I, H]`.
    pub gate: Vec<Mat>,
    /// `E × [I, H]`.
    pub up: Vec<Mat>,
    /// `E × [H, I]`.
    pub down: Vec<Mat>,
}

/// A layer's feed-forward block.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // one per layer; boxing would only add indirection
pub enum Mlp {
    /// SwiGLU MLP: gate/up `[F, H]`, down `[H, F]`.
    Dense {
        /// gate_proj `[F, H]`.
        gate: Linear,
        /// up_proj `[F, H]`.
        up: Linear,
        /// down_proj `[H, F]`.
        down: Linear,
    },
    /// Router + routed experts.
    Moe {
        /// Router `[E, H]`.
        router: Linear,
        /// The experts.
        experts: Experts,
    },
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct Layer {
    /// `[H]`.
    pub input_norm: Vec<f32>,
    /// `[nH·D, H]`.
    pub q: Linear,
    /// `[nKV·D, H]`.
    pub k: Linear,
    /// `[nKV·D, H]`.
    pub v: Linear,
    /// `[H, nH·D]`.
    pub o: Linear,
    /// Per-head q norm `[D]`.
    pub q_norm: Vec<f32>,
    /// Per-head k norm `[D]`.
    pub k_norm: Vec<f32>,
    /// `[H]`.
    pub post_norm: Vec<f32>,
    /// Feed-forward block.
    pub mlp: Mlp,
}

/// All weights of a model.
#[derive(Debug, Clone)]
pub struct Weights {
    /// Token embedding `[V, H]` (possibly quantized).
    pub embed: Mat,
    /// Decoder layers.
    pub layers: Vec<Layer>,
    /// Final norm `[H]`.
    pub norm: Vec<f32>,
    /// Output head `[V, H]` (the embedding matrix when tied; never has a bias).
    pub lm_head: Linear,
}

impl Weights {
    /// Loads and checks every tensor the family's plan needs.
    pub fn load(ck: &Checkpoint) -> Result<Weights> {
        match ck.config.family {
            Family::Qwen3Moe => load_qwen3_moe(ck),
        }
    }

    /// Bytes of weights read to decode one token: everything but the unselected experts
    /// and the embedding table (one row of it is read).
    pub fn bytes_per_token(&self, cfg: &ModelConfig) -> usize {
        let lin = |l: &Linear| l.w.nbytes() + l.b.as_ref().map_or(0, |b| b.len() * 4);
        let mut total = self.embed.nbytes() / self.embed.rows + lin(&self.lm_head) + 4 * self.norm.len();
        for layer in &self.layers {
            total += lin(&layer.q) + lin(&layer.k) + lin(&layer.v) + lin(&layer.o);
            total += 4 * (layer.input_norm.len() + layer.post_norm.len() + layer.q_norm.len() + layer.k_norm.len());
            total += match &layer.mlp {
                Mlp::Dense { gate, up, down } => lin(gate) + lin(up) + lin(down),
                Mlp::Moe { router, experts } => {
                    let one = experts.gate[0].nbytes() + experts.up[0].nbytes() + experts.down[0].nbytes();
                    lin(router) + cfg.top_k * one
                }
            };
        }
        total
    }
}

fn linear(ck: &Checkpoint, path: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
    let w = ck.mat(path, out, inp)?;
    let b = if bias { Some(ck.vector(&format!("{path}.bias"), out)?) } else { None };
    Ok(Linear { w, b })
}

/// Experts in either layout: per-expert HF keys or stacked MLX `switch_mlp` tensors.
fn experts(ck: &Checkpoint, prefix: &str, e: usize, inter: usize, hidden: usize) -> Result<Experts> {
    let stacked = format!("{prefix}.switch_mlp");
    if ck.has(&format!("{stacked}.gate_proj.weight")) {
        return Ok(Experts {
            gate: ck.linear(&format!("{stacked}.gate_proj"), Some(e), inter, hidden)?,
            up: ck.linear(&format!("{stacked}.up_proj"), Some(e), inter, hidden)?,
            down: ck.linear(&format!("{stacked}.down_proj"), Some(e), hidden, inter)?,
        });
    }
    let one = |name: &str, out, inp| -> Result<Vec<Mat>> {
        (0..e).map(|i| ck.mat(&format!("{prefix}.experts.{i}.{name}"), out, inp)).collect()
    };
    Ok(Experts {
        gate: one("gate_proj", inter, hidden)?,
        up: one("up_proj", inter, hidden)?,
        down: one("down_proj", hidden, inter)?,
    })
}

fn load_qwen3_moe(ck: &Checkpoint) -> Result<Weights> {
    let c = &ck.config;
    let (h, d) = (c.hidden_size, c.head_dim);
    let embed = ck.mat("model.embed_tokens", c.vocab_size, h)?;
    let mut layers = Vec::with_capacity(c.num_layers);
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        let ab = c.attention_bias;
        let mlp = if c.is_moe_layer(l) {
            Mlp::Moe {
                router: linear(ck, &format!("{p}.mlp.gate"), c.num_experts, h, false)?,
                experts: experts(ck, &format!("{p}.mlp"), c.num_experts, c.moe_intermediate_size, h)?,
            }
        } else {
            let f = c.intermediate_size;
            Mlp::Dense {
                gate: linear(ck, &format!("{p}.mlp.gate_proj"), f, h, false)?,
                up: linear(ck, &format!("{p}.mlp.up_proj"), f, h, false)?,
                down: linear(ck, &format!("{p}.mlp.down_proj"), h, f, false)?,
            }
        };
        layers.push(Layer {
            input_norm: ck.vector(&format!("{p}.input_layernorm.weight"), h)?,
            q: linear(ck, &format!("{p}.self_attn.q_proj"), c.num_heads * d, h, ab)?,
            k: linear(ck, &format!("{p}.self_attn.k_proj"), c.num_kv_heads * d, h, ab)?,
            v: linear(ck, &format!("{p}.self_attn.v_proj"), c.num_kv_heads * d, h, ab)?,
            o: linear(ck, &format!("{p}.self_attn.o_proj"), h, c.num_heads * d, ab)?,
            q_norm: ck.vector(&format!("{p}.self_attn.q_norm.weight"), d)?,
            k_norm: ck.vector(&format!("{p}.self_attn.k_norm.weight"), d)?,
            post_norm: ck.vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
            mlp,
        });
    }
    let head = if c.tie_word_embeddings && !ck.has("lm_head.weight") {
        embed.clone()
    } else {
        ck.mat("lm_head", c.vocab_size, h)?
    };
    let lm_head = Linear { w: head, b: None };
    Ok(Weights { embed, layers, norm: ck.vector("model.norm.weight", h)?, lm_head })
}
