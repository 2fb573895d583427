//! [`Weights`]: every tensor a family's plan reads, typed and shape-checked at load.
//!
//! Like llama2.c's `TransformerWeights`, each field carries its shape. Loading resolves the
//! on-disk layouts of the same model — HF per-expert keys (`mlp.experts.{e}.gate_proj.weight`)
//! and mlx-community stacked keys (`mlp.switch_mlp.gate_proj.weight [E, I, H·bits/32]`); for
//! MLA, HF's `kv_b_proj` and mlx-lm's per-head `embed_q` / `unembed_out`; for GPT-OSS, the
//! fused `[E, in, out]` tensors, the MXFP4 release and mlx-community's split experts (see
//! [`crate::checkpoint::gpt_oss`]) — into one in-memory shape, so backends never care where
//! a checkpoint came from.
//!
//! Backends look weights up by role ([`Weights::linear`], [`Weights::norm`]): the plan names
//! roles ([`LinRef`], [`NormRef`], defined here with the weights they name), and a plan that
//! names a weight the model lacks is an error, not a panic. The tree is generic over where
//! its tensors live ([`Store`]): the CUDA backend holds the same tree on the device.

use crate::checkpoint::{Checkpoint, Mat};
use crate::config::{Family, ModelConfig};
use crate::error::{Error, Result};

/// A linear layer, by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinRef {
    /// Layer's q_proj (MLA: q_b_proj, or q_proj without a query LoRA).
    Q(usize),
    /// MLA q_a_proj.
    QA(usize),
    /// MLA kv_a_proj_with_mqa.
    KvA(usize),
    /// Layer's k_proj.
    K(usize),
    /// Layer's v_proj.
    V(usize),
    /// Layer's o_proj.
    O(usize),
    /// Dense MLP gate_proj.
    DenseGate(usize),
    /// Dense MLP up_proj.
    DenseUp(usize),
    /// Dense MLP down_proj.
    DenseDown(usize),
    /// Shared-expert gate_proj.
    SharedGate(usize),
    /// Shared-expert up_proj.
    SharedUp(usize),
    /// Shared-expert down_proj.
    SharedDown(usize),
    /// MoE router.
    Router(usize),
    /// LFM2 short conv's in_proj `[3H, H]` (its out_proj is the layer's `O`).
    ConvIn(usize),
    /// Output head.
    LmHead,
}

/// A norm weight, by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormRef {
    /// input_layernorm of a layer.
    Input(usize),
    /// post_attention_layernorm of a layer.
    Post(usize),
    /// Per-head q_norm.
    QHead(usize),
    /// Per-head k_norm.
    KHead(usize),
    /// MLA q_a_layernorm (over the query latent).
    QLatent(usize),
    /// MLA kv_a_layernorm (over the KV latent, the first kv_lora columns of `Kva`).
    KvLatent(usize),
    /// Final model.norm.
    Final,
}

impl LinRef {
    /// The role without the layer, e.g. `q` or `router`.
    pub fn role(self) -> &'static str {
        match self {
            LinRef::Q(_) => "q",
            LinRef::K(_) => "k",
            LinRef::V(_) => "v",
            LinRef::O(_) => "o",
            LinRef::DenseGate(_) => "dense_gate",
            LinRef::DenseUp(_) => "dense_up",
            LinRef::DenseDown(_) => "dense_down",
            LinRef::QA(_) => "q_a",
            LinRef::KvA(_) => "kv_a",
            LinRef::SharedGate(_) => "shared_gate",
            LinRef::SharedUp(_) => "shared_up",
            LinRef::SharedDown(_) => "shared_down",
            LinRef::Router(_) => "router",
            LinRef::ConvIn(_) => "conv_in",
            LinRef::LmHead => "lm_head",
        }
    }

    /// The layer whose weight this is (`None` for the output head).
    pub fn layer(self) -> Option<usize> {
        match self {
            LinRef::Q(l) | LinRef::K(l) | LinRef::V(l) | LinRef::O(l) | LinRef::QA(l) | LinRef::KvA(l) => Some(l),
            LinRef::DenseGate(l) | LinRef::DenseUp(l) | LinRef::DenseDown(l) | LinRef::Router(l) => Some(l),
            LinRef::SharedGate(l) | LinRef::SharedUp(l) | LinRef::SharedDown(l) | LinRef::ConvIn(l) => Some(l),
            LinRef::LmHead => None,
        }
    }
}

impl NormRef {
    /// The role without the layer, e.g. `input` or `q_head`.
    pub fn role(self) -> &'static str {
        match self {
            NormRef::Input(_) => "input",
            NormRef::Post(_) => "post",
            NormRef::QHead(_) => "q_head",
            NormRef::KHead(_) => "k_head",
            NormRef::QLatent(_) => "q_latent",
            NormRef::KvLatent(_) => "kv_latent",
            NormRef::Final => "final",
        }
    }

    /// The layer whose weight this is (`None` for the final norm).
    pub fn layer(self) -> Option<usize> {
        match self {
            NormRef::Input(l) | NormRef::Post(l) | NormRef::QHead(l) | NormRef::KHead(l) => Some(l),
            NormRef::QLatent(l) | NormRef::KvLatent(l) => Some(l),
            NormRef::Final => None,
        }
    }

    /// The norm's epsilon: `rms_norm_eps`, except MLA's latent norms (model-spec §3.8).
    pub fn eps(self, cfg: &ModelConfig) -> f32 {
        match (self, &cfg.mla) {
            (NormRef::QLatent(_) | NormRef::KvLatent(_), Some(m)) => m.latent_norm_eps,
            _ => cfg.rms_norm_eps,
        }
    }
}

/// Where a weight tree keeps its tensors, and in which form: the host (checkpoint matrices
/// in their on-disk formats, f32 vectors) or a device (see `cuda::weights`).
///
/// Why one tree generic over the store: the shape of a model — which layer has which
/// weights, and the role lookup the plans use ([`Weights::linear`], [`Weights::norm`]) —
/// is written once, here; a backend only says how one matrix, one stack of matrices and one
/// vector are held, and converts the host tree with [`Convert`].
pub trait Store: Clone + std::fmt::Debug {
    /// One matrix `[rows, cols]`.
    type Mat: Clone + std::fmt::Debug;
    /// `E` matrices of one shape, stacked (experts, MLA heads).
    type Stack: Clone + std::fmt::Debug;
    /// An f32 vector (norm weights, biases).
    type Vector: Clone + std::fmt::Debug;
}

/// The host store: what [`Weights::load`] reads (memory-mapped, exactly as on disk).
#[derive(Debug, Clone)]
pub struct Host;

impl Store for Host {
    type Mat = Mat;
    type Stack = Vec<Mat>;
    type Vector = Vec<f32>;
}

/// A conversion of the host tree's tensors into another store (e.g. an upload to a GPU).
pub trait Convert<T: Store> {
    /// One matrix.
    fn mat(&mut self, m: &Mat) -> Result<T::Mat>;
    /// A stack of matrices of one shape.
    fn stack(&mut self, ms: &[Mat]) -> Result<T::Stack>;
    /// An f32 vector (possibly empty: a weight the model has not got).
    fn vector(&mut self, v: &[f32]) -> Result<T::Vector>;
}

/// A linear layer: weight `[out, in]` and optional bias `[out]` (f32).
#[derive(Debug, Clone)]
pub struct Linear<S: Store = Host> {
    /// Weight `[out, in]`.
    pub w: S::Mat,
    /// Bias `[out]`, decoded to f32.
    pub b: Option<S::Vector>,
}

/// Routed experts of one MoE layer.
#[derive(Debug, Clone)]
pub struct Experts<S: Store = Host> {
    /// `E × [I, H]`.
    pub gate: S::Stack,
    /// `E × [I, H]`.
    pub up: S::Stack,
    /// `E × [H, I]`.
    pub down: S::Stack,
    /// Per-expert biases (GPT-OSS); `None` for bias-free experts.
    pub bias: Option<ExpertBias<S>>,
}

/// Per-expert biases of the gate, up and down projections (f32, experts stacked).
#[derive(Debug, Clone)]
pub struct ExpertBias<S: Store = Host> {
    /// `[E, I]`.
    pub gate: S::Vector,
    /// `[E, I]`.
    pub up: S::Vector,
    /// `[E, H]`, added before the routing weight scales the expert output.
    pub down: S::Vector,
}

/// A SwiGLU feed-forward block (dense MLPs and shared experts).
#[derive(Debug, Clone)]
pub struct Ffn<S: Store = Host> {
    /// gate_proj `[F, H]`.
    pub gate: Linear<S>,
    /// up_proj `[F, H]`.
    pub up: Linear<S>,
    /// down_proj `[H, F]`.
    pub down: Linear<S>,
}

/// A layer's feed-forward block.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // one per layer; boxing would only add indirection
pub enum Mlp<S: Store = Host> {
    /// SwiGLU MLP: gate/up `[F, H]`, down `[H, F]`.
    Dense(Ffn<S>),
    /// Router + routed experts (+ shared experts).
    Moe {
        /// Router `[E, H]`.
        router: Linear<S>,
        /// Sigmoid routers: `e_score_correction_bias [E]` (f32), added for selection only.
        correction_bias: Option<S::Vector>,
        /// The experts.
        experts: Experts<S>,
        /// Shared experts `[Fs, H]` / `[H, Fs]`, run on every token (GLM / DeepSeek).
        shared: Option<Box<Ffn<S>>>,
    },
}

/// Multi-head latent attention weights (model-spec §3.3–3.4), in the absorbed layout.
#[derive(Debug, Clone)]
pub struct MlaWeights<S: Store = Host> {
    /// q_a_proj `[q_lora, H]` (absent without a query LoRA).
    pub q_a: Option<Linear<S>>,
    /// q_a_layernorm `[q_lora]` (empty without a query LoRA).
    pub q_a_norm: S::Vector,
    /// q_b_proj `[nH·Dqk, q_lora]`, or q_proj `[nH·Dqk, H]` without a query LoRA.
    pub q: Linear<S>,
    /// kv_a_proj_with_mqa `[kv_lora + rope, H]`.
    pub kv_a: Linear<S>,
    /// kv_a_layernorm `[kv_lora]`.
    pub kv_a_norm: S::Vector,
    /// Per head, `W_UKᵀ`: `nH × [kv_lora, qk_nope]` (mlx-lm's `embed_q`): `q_lat = W_UKᵀ q_nope`.
    pub embed_q: S::Stack,
    /// Per head, `W_UV`: `nH × [v_head, kv_lora]` (mlx-lm's `unembed_out`).
    pub unembed_out: S::Stack,
}

/// LFM2's gated short convolution (model-spec §4.4): `in_proj` → `B, C, X`; a causal
/// depthwise convolution of `B ⊙ X`; gated by `C` (its out_proj is the layer's `o`).
#[derive(Debug, Clone)]
pub struct ShortConv<S: Store = Host> {
    /// in_proj `[3H, H]` (rows: B, then C, then X).
    pub in_proj: Linear<S>,
    /// Depthwise kernel `[H, L]` row-major (`w[c·L + k]`; `k = L − 1` multiplies the current
    /// token), f32. HF stores it `[H, 1, L]`, MLX `[H, L, 1]`: the same order in memory.
    pub kernel: S::Vector,
    /// Convolution bias `[H]` (`conv_bias`).
    pub bias: Option<S::Vector>,
}

/// A layer's attention projections.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
pub enum Attn<S: Store = Host> {
    /// Grouped-query attention with per-head q/k norms (Qwen3).
    Gqa {
        /// `[nH·D, H]`.
        q: Linear<S>,
        /// `[nKV·D, H]`.
        k: Linear<S>,
        /// `[nKV·D, H]`.
        v: Linear<S>,
        /// Per-head q norm `[D]`.
        q_norm: S::Vector,
        /// Per-head k norm `[D]`.
        k_norm: S::Vector,
    },
    /// Multi-head latent attention (GLM / DeepSeek).
    Mla(MlaWeights<S>),
    /// LFM2's short convolution in place of attention.
    Conv(ShortConv<S>),
    /// Grouped-query attention with one attention-sink logit per query head and no q/k
    /// norms (GPT-OSS).
    Sink {
        /// `[nH·D, H]`.
        q: Linear<S>,
        /// `[nKV·D, H]`.
        k: Linear<S>,
        /// `[nKV·D, H]`.
        v: Linear<S>,
        /// Sink logits `[nH]`.
        sinks: S::Vector,
    },
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct Layer<S: Store = Host> {
    /// `[H]`.
    pub input_norm: S::Vector,
    /// Attention projections.
    pub attn: Attn<S>,
    /// o_proj `[H, nH·Dv]`.
    pub o: Linear<S>,
    /// `[H]`.
    pub post_norm: S::Vector,
    /// Feed-forward block.
    pub mlp: Mlp<S>,
}

/// All weights of a model.
#[derive(Debug, Clone)]
pub struct Weights<S: Store = Host> {
    /// Token embedding `[V, H]` (possibly quantized).
    pub embed: S::Mat,
    /// Decoder layers.
    pub layers: Vec<Layer<S>>,
    /// Final norm `[H]`.
    pub norm: S::Vector,
    /// Output head `[V, H]` (the embedding matrix when tied; never has a bias).
    pub lm_head: Linear<S>,
}

fn missing(what: String) -> Error {
    Error::Arg(format!("the plan asks for {what}, which this model does not have"))
}

impl Weights {
    /// Loads and checks every tensor the family's plan needs.
    pub fn load(ck: &Checkpoint) -> Result<Weights> {
        let c = &ck.config;
        if c.family == Family::Lfm2Moe {
            return load_lfm2(ck);
        }
        let h = c.hidden_size;
        let embed = ck.mat("model.embed_tokens", c.vocab_size, h)?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let p = format!("model.layers.{l}");
            let ab = c.attention_bias;
            let attn = match c.family {
                Family::Qwen3Moe => {
                    let d = c.head_dim;
                    Attn::Gqa {
                        q: linear(ck, &format!("{p}.self_attn.q_proj"), c.num_heads * d, h, ab)?,
                        k: linear(ck, &format!("{p}.self_attn.k_proj"), c.num_kv_heads * d, h, ab)?,
                        v: linear(ck, &format!("{p}.self_attn.v_proj"), c.num_kv_heads * d, h, ab)?,
                        q_norm: ck.vector(&format!("{p}.self_attn.q_norm.weight"), d)?,
                        k_norm: ck.vector(&format!("{p}.self_attn.k_norm.weight"), d)?,
                    }
                }
                Family::Glm4MoeLite | Family::DeepseekV3 => Attn::Mla(mla(ck, &p)?),
                Family::Lfm2Moe => unreachable!("loaded by load_lfm2"),
                Family::GptOss => {
                    let (d, kv) = (c.head_dim, c.num_kv_heads * c.head_dim);
                    Attn::Sink {
                        q: linear(ck, &format!("{p}.self_attn.q_proj"), c.num_heads * d, h, ab)?,
                        k: linear(ck, &format!("{p}.self_attn.k_proj"), kv, h, ab)?,
                        v: linear(ck, &format!("{p}.self_attn.v_proj"), kv, h, ab)?,
                        sinks: ck.vector(&format!("{p}.self_attn.sinks"), c.num_heads)?,
                    }
                }
            };
            layers.push(Layer {
                input_norm: ck.vector(&format!("{p}.input_layernorm.weight"), h)?,
                attn,
                o: linear(ck, &format!("{p}.self_attn.o_proj"), h, c.num_heads * c.v_head_dim, ab)?,
                post_norm: ck.vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
                mlp: mlp(ck, &p, l)?,
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

    /// The same tree in another store: every tensor converted once, the shape kept.
    pub fn convert<T: Store>(&self, c: &mut impl Convert<T>) -> Result<Weights<T>> {
        fn lin<T: Store>(c: &mut impl Convert<T>, l: &Linear) -> Result<Linear<T>> {
            Ok(Linear { w: c.mat(&l.w)?, b: l.b.as_deref().map(|b| c.vector(b)).transpose()? })
        }
        fn ffn<T: Store>(c: &mut impl Convert<T>, f: &Ffn) -> Result<Ffn<T>> {
            Ok(Ffn { gate: lin(c, &f.gate)?, up: lin(c, &f.up)?, down: lin(c, &f.down)? })
        }
        let mut layers = Vec::with_capacity(self.layers.len());
        for ly in &self.layers {
            let attn = match &ly.attn {
                Attn::Gqa { q, k, v, q_norm, k_norm } => Attn::Gqa {
                    q: lin(c, q)?,
                    k: lin(c, k)?,
                    v: lin(c, v)?,
                    q_norm: c.vector(q_norm)?,
                    k_norm: c.vector(k_norm)?,
                },
                Attn::Mla(m) => Attn::Mla(MlaWeights {
                    q_a: m.q_a.as_ref().map(|l| lin(c, l)).transpose()?,
                    q_a_norm: c.vector(&m.q_a_norm)?,
                    q: lin(c, &m.q)?,
                    kv_a: lin(c, &m.kv_a)?,
                    kv_a_norm: c.vector(&m.kv_a_norm)?,
                    embed_q: c.stack(&m.embed_q)?,
                    unembed_out: c.stack(&m.unembed_out)?,
                }),
                Attn::Conv(cv) => Attn::Conv(ShortConv {
                    in_proj: lin(c, &cv.in_proj)?,
                    kernel: c.vector(&cv.kernel)?,
                    bias: cv.bias.as_deref().map(|b| c.vector(b)).transpose()?,
                }),
                Attn::Sink { q, k, v, sinks } => {
                    Attn::Sink { q: lin(c, q)?, k: lin(c, k)?, v: lin(c, v)?, sinks: c.vector(sinks)? }
                }
            };
            let mlp = match &ly.mlp {
                Mlp::Dense(f) => Mlp::Dense(ffn(c, f)?),
                Mlp::Moe { router, correction_bias, experts, shared } => Mlp::Moe {
                    router: lin(c, router)?,
                    correction_bias: correction_bias.as_deref().map(|b| c.vector(b)).transpose()?,
                    experts: Experts {
                        gate: c.stack(&experts.gate)?,
                        up: c.stack(&experts.up)?,
                        down: c.stack(&experts.down)?,
                        bias: match &experts.bias {
                            Some(b) => Some(ExpertBias {
                                gate: c.vector(&b.gate)?,
                                up: c.vector(&b.up)?,
                                down: c.vector(&b.down)?,
                            }),
                            None => None,
                        },
                    },
                    shared: shared.as_deref().map(|f| ffn(c, f).map(Box::new)).transpose()?,
                },
            };
            layers.push(Layer {
                input_norm: c.vector(&ly.input_norm)?,
                attn,
                o: lin(c, &ly.o)?,
                post_norm: c.vector(&ly.post_norm)?,
                mlp,
            });
        }
        Ok(Weights { embed: c.mat(&self.embed)?, layers, norm: c.vector(&self.norm)?, lm_head: lin(c, &self.lm_head)? })
    }

    /// Bytes of weights read to decode one token: everything but the unselected experts
    /// and the embedding table (one row of it is read).
    pub fn bytes_per_token(&self, cfg: &ModelConfig) -> usize {
        let lin = |l: &Linear| l.w.nbytes() + l.b.as_ref().map_or(0, |b| b.len() * 4);
        let ffn = |f: &Ffn| lin(&f.gate) + lin(&f.up) + lin(&f.down);
        let mats = |m: &[Mat]| m.iter().map(Mat::nbytes).sum::<usize>();
        let mut total = self.embed.nbytes() / self.embed.rows + lin(&self.lm_head) + 4 * self.norm.len();
        for layer in &self.layers {
            total += lin(&layer.o) + 4 * (layer.input_norm.len() + layer.post_norm.len());
            total += match &layer.attn {
                Attn::Gqa { q, k, v, q_norm, k_norm } => lin(q) + lin(k) + lin(v) + 4 * (q_norm.len() + k_norm.len()),
                Attn::Sink { q, k, v, sinks } => lin(q) + lin(k) + lin(v) + 4 * sinks.len(),
                Attn::Mla(m) => {
                    m.q_a.as_ref().map_or(0, lin)
                        + lin(&m.q)
                        + lin(&m.kv_a)
                        + 4 * (m.q_a_norm.len() + m.kv_a_norm.len())
                        + mats(&m.embed_q)
                        + mats(&m.unembed_out)
                }
                Attn::Conv(cv) => lin(&cv.in_proj) + 4 * (cv.kernel.len() + cv.bias.as_ref().map_or(0, Vec::len)),
            };
            total += match &layer.mlp {
                Mlp::Dense(f) => ffn(f),
                Mlp::Moe { router, correction_bias, experts, shared } => {
                    let bias = experts.bias.as_ref().map_or(0, |b| 4 * (b.gate.len() + b.up.len() + b.down.len()));
                    let one = experts.gate[0].nbytes()
                        + experts.up[0].nbytes()
                        + experts.down[0].nbytes()
                        + bias / experts.gate.len();
                    lin(router)
                        + correction_bias.as_ref().map_or(0, |b| 4 * b.len())
                        + cfg.top_k * one
                        + shared.as_deref().map_or(0, ffn)
                }
            };
        }
        total
    }
}

/// The role lookups, for every store: the plan names roles, the tree answers.
impl<S: Store> Weights<S> {
    /// The linear layer with role `r`.
    pub fn linear(&self, r: LinRef) -> Result<&Linear<S>> {
        let layer = |l: usize| self.layers.get(l).ok_or_else(|| missing(format!("layer {l}")));
        let mla = |l: usize| match &layer(l)?.attn {
            Attn::Mla(m) => Ok(m),
            _ => Err(missing(format!("MLA weights in layer {l}"))),
        };
        let ffn = |l: usize, shared: bool| -> Result<&Ffn<S>> {
            match (&layer(l)?.mlp, shared) {
                (Mlp::Dense(f), false) => Ok(f),
                (Mlp::Moe { shared: Some(f), .. }, true) => Ok(f),
                _ => Err(missing(format!("{} MLP in layer {l}", if shared { "a shared-expert" } else { "a dense" }))),
            }
        };
        Ok(match r {
            LinRef::Q(l) => match &layer(l)?.attn {
                Attn::Gqa { q, .. } | Attn::Sink { q, .. } => q,
                Attn::Mla(m) => &m.q,
                Attn::Conv(_) => return Err(missing(format!("q_proj in short-conv layer {l}"))),
            },
            LinRef::K(l) | LinRef::V(l) => match &layer(l)?.attn {
                Attn::Gqa { k, v, .. } | Attn::Sink { k, v, .. } => {
                    if matches!(r, LinRef::K(_)) {
                        k
                    } else {
                        v
                    }
                }
                _ => return Err(missing(format!("k/v projections in layer {l}"))),
            },
            LinRef::QA(l) => mla(l)?.q_a.as_ref().ok_or_else(|| missing(format!("q_a_proj in layer {l}")))?,
            LinRef::KvA(l) => &mla(l)?.kv_a,
            LinRef::ConvIn(l) => &self.conv(l)?.in_proj,
            LinRef::O(l) => &layer(l)?.o,
            LinRef::DenseGate(l) => &ffn(l, false)?.gate,
            LinRef::DenseUp(l) => &ffn(l, false)?.up,
            LinRef::DenseDown(l) => &ffn(l, false)?.down,
            LinRef::SharedGate(l) => &ffn(l, true)?.gate,
            LinRef::SharedUp(l) => &ffn(l, true)?.up,
            LinRef::SharedDown(l) => &ffn(l, true)?.down,
            LinRef::Router(l) => match &layer(l)?.mlp {
                Mlp::Moe { router, .. } => router,
                Mlp::Dense(_) => return Err(missing(format!("a router in dense layer {l}"))),
            },
            LinRef::LmHead => &self.lm_head,
        })
    }

    /// The norm weight with role `r`.
    pub fn norm(&self, r: NormRef) -> Result<&S::Vector> {
        let layer = |l: usize| self.layers.get(l).ok_or_else(|| missing(format!("layer {l}")));
        let gqa = |l: usize, q: bool| match &layer(l)?.attn {
            Attn::Gqa { q_norm, k_norm, .. } => Ok(if q { q_norm } else { k_norm }),
            _ => Err(missing(format!("per-head q/k norms in layer {l}"))),
        };
        let mla = |l: usize| match &layer(l)?.attn {
            Attn::Mla(m) => Ok(m),
            _ => Err(missing(format!("MLA norms in layer {l}"))),
        };
        Ok(match r {
            NormRef::Input(l) => &layer(l)?.input_norm,
            NormRef::Post(l) => &layer(l)?.post_norm,
            NormRef::QHead(l) => gqa(l, true)?,
            NormRef::KHead(l) => gqa(l, false)?,
            NormRef::QLatent(l) => &mla(l)?.q_a_norm,
            NormRef::KvLatent(l) => &mla(l)?.kv_a_norm,
            NormRef::Final => &self.norm,
        })
    }

    /// The routed experts of MoE layer `l`.
    pub fn experts(&self, l: usize) -> Result<&Experts<S>> {
        match &self.layers.get(l).ok_or_else(|| missing(format!("layer {l}")))?.mlp {
            Mlp::Moe { experts, .. } => Ok(experts),
            Mlp::Dense(_) => Err(missing(format!("experts in dense layer {l}"))),
        }
    }

    /// The MLA weights of layer `l`.
    pub fn mla(&self, l: usize) -> Result<&MlaWeights<S>> {
        match &self.layers.get(l).ok_or_else(|| missing(format!("layer {l}")))?.attn {
            Attn::Mla(m) => Ok(m),
            _ => Err(missing(format!("MLA weights in layer {l}"))),
        }
    }

    /// The short-convolution weights of LFM2 conv layer `l`.
    pub fn conv(&self, l: usize) -> Result<&ShortConv<S>> {
        match &self.layers.get(l).ok_or_else(|| missing(format!("layer {l}")))?.attn {
            Attn::Conv(cv) => Ok(cv),
            _ => Err(missing(format!("short-conv weights in attention layer {l}"))),
        }
    }

    /// The attention-sink logits `[nH]` of layer `l`.
    pub fn sinks(&self, l: usize) -> Result<&S::Vector> {
        match &self.layers.get(l).ok_or_else(|| missing(format!("layer {l}")))?.attn {
            Attn::Sink { sinks, .. } => Ok(sinks),
            _ => Err(missing(format!("attention sinks in layer {l}"))),
        }
    }
}

pub(crate) fn linear(ck: &Checkpoint, path: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
    let w = ck.mat(path, out, inp)?;
    let b = if bias { Some(ck.vector(&format!("{path}.bias"), out)?) } else { None };
    Ok(Linear { w, b })
}

fn ffn(ck: &Checkpoint, p: &str, f: usize, h: usize) -> Result<Ffn> {
    Ok(Ffn {
        gate: linear(ck, &format!("{p}.gate_proj"), f, h, false)?,
        up: linear(ck, &format!("{p}.up_proj"), f, h, false)?,
        down: linear(ck, &format!("{p}.down_proj"), h, f, false)?,
    })
}

/// Experts in either layout: per-expert HF keys (`{prefix}.experts.{e}.{names}`: gate, up,
/// down) or stacked MLX `switch_mlp` tensors.
fn experts(ck: &Checkpoint, prefix: &str, e: usize, inter: usize, hidden: usize, names: [&str; 3]) -> Result<Experts> {
    let stacked = format!("{prefix}.switch_mlp");
    if ck.has(&format!("{stacked}.gate_proj.weight")) {
        return Ok(Experts {
            gate: ck.linear(&format!("{stacked}.gate_proj"), Some(e), inter, hidden)?,
            up: ck.linear(&format!("{stacked}.up_proj"), Some(e), inter, hidden)?,
            down: ck.linear(&format!("{stacked}.down_proj"), Some(e), hidden, inter)?,
            bias: None,
        });
    }
    let one = |name: &str, out, inp| -> Result<Vec<Mat>> {
        (0..e).map(|i| ck.mat(&format!("{prefix}.experts.{i}.{name}"), out, inp)).collect()
    };
    Ok(Experts {
        gate: one(names[0], inter, hidden)?,
        up: one(names[1], inter, hidden)?,
        down: one(names[2], hidden, inter)?,
        bias: None,
    })
}

/// The names of HF's per-expert SwiGLU projections, most families' (LFM2 says w1, w3, w2).
const GATE_UP_DOWN: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

/// Layer `l`'s MLP (`p` = `model.layers.{l}`): dense, or router + experts (+ shared).
fn mlp(ck: &Checkpoint, p: &str, l: usize) -> Result<Mlp> {
    let c = &ck.config;
    let h = c.hidden_size;
    if !c.is_moe_layer(l) {
        return Ok(Mlp::Dense(ffn(ck, &format!("{p}.mlp"), c.intermediate_size, h)?));
    }
    if c.family == Family::GptOss {
        return crate::checkpoint::gpt_oss::moe(ck, p);
    }
    let sigmoid = c.family.is_mla();
    Ok(Mlp::Moe {
        router: linear(ck, &format!("{p}.mlp.gate"), c.num_experts, h, false)?,
        correction_bias: if sigmoid {
            Some(ck.vector(&format!("{p}.mlp.gate.e_score_correction_bias"), c.num_experts)?)
        } else {
            None
        },
        experts: experts(ck, &format!("{p}.mlp"), c.num_experts, c.moe_intermediate_size, h, GATE_UP_DOWN)?,
        shared: if c.n_shared_experts > 0 {
            Some(Box::new(ffn(ck, &format!("{p}.mlp.shared_experts"), c.shared_intermediate_size(), h)?))
        } else {
            None
        },
    })
}

/// MLA weights of one layer (`p` = `model.layers.{l}`), from HF `kv_b_proj` or mlx-lm's
/// per-head `embed_q` / `unembed_out` (model-spec §6.5).
fn mla(ck: &Checkpoint, p: &str) -> Result<MlaWeights> {
    let c = &ck.config;
    let m = c.mla.as_ref().expect("MLA family has MLA dims");
    let (h, nh, ab) = (c.hidden_size, c.num_heads, c.attention_bias);
    let (nope, v, lat) = (m.qk_nope_head_dim, m.v_head_dim, m.kv_lora_rank);
    let a = format!("{p}.self_attn");
    let q_out = nh * m.qk_head_dim();
    let (q_a, q_a_norm, q) = match m.q_lora_rank {
        Some(r) => (
            Some(linear(ck, &format!("{a}.q_a_proj"), r, h, ab)?),
            ck.vector(&format!("{a}.q_a_layernorm.weight"), r)?,
            linear(ck, &format!("{a}.q_b_proj"), q_out, r, false)?,
        ),
        None => (None, Vec::new(), linear(ck, &format!("{a}.q_proj"), q_out, h, false)?),
    };
    let (embed_q, unembed_out) = if ck.has(&format!("{a}.kv_b_proj.weight")) {
        let kv_b = ck.mat(&format!("{a}.kv_b_proj"), nh * (nope + v), lat)?;
        let head = |i: usize| i * (nope + v);
        (
            (0..nh).map(|i| kv_b.row_slice(head(i), nope).transposed_f32()).collect(),
            (0..nh).map(|i| kv_b.row_slice(head(i) + nope, v)).collect(),
        )
    } else {
        (
            ck.linear(&format!("{a}.embed_q"), Some(nh), lat, nope)?,
            ck.linear(&format!("{a}.unembed_out"), Some(nh), v, lat)?,
        )
    };
    Ok(MlaWeights {
        q_a,
        q_a_norm,
        q,
        kv_a: linear(ck, &format!("{a}.kv_a_proj_with_mqa"), lat + m.qk_rope_head_dim, h, ab)?,
        kv_a_norm: ck.vector(&format!("{a}.kv_a_layernorm.weight"), lat)?,
        embed_q,
        unembed_out,
    })
}

/// LFM2-MoE (model-spec §4.3; MLX names §6.5): `operator_norm` / `ffn_norm` are the layer's
/// input / post norms and `embedding_norm` the final norm; attention layers have `out_proj`
/// and `q_layernorm` / `k_layernorm`; conv layers `conv.{in_proj, conv, out_proj}`; the FFN
/// is `feed_forward` with HF's `w1`/`w3`/`w2` or MLX's `gate_proj`/`up_proj`/`down_proj`, the
/// router `feed_forward.gate` and its selection bias `feed_forward.expert_bias` (f32).
fn load_lfm2(ck: &Checkpoint) -> Result<Weights> {
    let c = &ck.config;
    let (h, d) = (c.hidden_size, c.head_dim);
    let cv = c.conv.as_ref().expect("lfm2_moe has a short-conv config");
    let embed = ck.mat("model.embed_tokens", c.vocab_size, h)?;
    let mut layers = Vec::with_capacity(c.num_layers);
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        let (attn, o) = if c.is_conv_layer(l) {
            let k = format!("{p}.conv.conv.weight");
            let kernel = match ck.tensor(&k)?.shape.as_slice() {
                [_, 1, n] if *n == cv.kernel => ck.floats(&k, &[h, 1, cv.kernel])?.to_vec(),
                _ => ck.floats(&k, &[h, cv.kernel, 1])?.to_vec(),
            };
            let conv = ShortConv {
                in_proj: linear(ck, &format!("{p}.conv.in_proj"), 3 * h, h, cv.bias)?,
                kernel,
                bias: if cv.bias { Some(ck.vector(&format!("{p}.conv.conv.bias"), h)?) } else { None },
            };
            (Attn::Conv(conv), linear(ck, &format!("{p}.conv.out_proj"), h, h, cv.bias)?)
        } else {
            let a = format!("{p}.self_attn");
            let gqa = Attn::Gqa {
                q: linear(ck, &format!("{a}.q_proj"), c.num_heads * d, h, false)?,
                k: linear(ck, &format!("{a}.k_proj"), c.num_kv_heads * d, h, false)?,
                v: linear(ck, &format!("{a}.v_proj"), c.num_kv_heads * d, h, false)?,
                q_norm: ck.vector(&format!("{a}.q_layernorm.weight"), d)?,
                k_norm: ck.vector(&format!("{a}.k_layernorm.weight"), d)?,
            };
            (gqa, linear(ck, &format!("{a}.out_proj"), h, c.num_heads * d, false)?)
        };
        let f = format!("{p}.feed_forward");
        let mlp = if c.is_moe_layer(l) {
            let expert_bias = matches!(c.router, crate::config::RouterKind::SigmoidBias { expert_bias: true, .. });
            let names = if ck.has(&format!("{f}.experts.0.w1.weight")) { ["w1", "w3", "w2"] } else { GATE_UP_DOWN };
            Mlp::Moe {
                router: linear(ck, &format!("{f}.gate"), c.num_experts, h, false)?,
                correction_bias: if expert_bias {
                    Some(ck.vector(&format!("{f}.expert_bias"), c.num_experts)?)
                } else {
                    None
                },
                experts: experts(ck, &f, c.num_experts, c.moe_intermediate_size, h, names)?,
                shared: None,
            }
        } else {
            let (fi, names) = (
                c.intermediate_size,
                if ck.has(&format!("{f}.w1.weight")) { ["w1", "w3", "w2"] } else { GATE_UP_DOWN },
            );
            Mlp::Dense(Ffn {
                gate: linear(ck, &format!("{f}.{}", names[0]), fi, h, false)?,
                up: linear(ck, &format!("{f}.{}", names[1]), fi, h, false)?,
                down: linear(ck, &format!("{f}.{}", names[2]), h, fi, false)?,
            })
        };
        layers.push(Layer {
            input_norm: ck.vector(&format!("{p}.operator_norm.weight"), h)?,
            attn,
            o,
            post_norm: ck.vector(&format!("{p}.ffn_norm.weight"), h)?,
            mlp,
        });
    }
    let head = if c.tie_word_embeddings && !ck.has("lm_head.weight") {
        embed.clone()
    } else {
        ck.mat("lm_head", c.vocab_size, h)?
    };
    Ok(Weights {
        embed,
        layers,
        norm: ck.vector("model.embedding_norm.weight", h)?,
        lm_head: Linear { w: head, b: None },
    })
}
