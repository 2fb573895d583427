//! Exporting a zmoe model folder to another engine's format — today GGUF for llama.cpp
//! (`zmoe export gguf`), so the same weights can be benchmarked against llama.cpp and
//! users can take a zmoe model there.
//!
//! Why it is shaped this way:
//!
//! - **Through [`Weights`], not the safetensors keys.** The model is opened with the same
//!   loader the backends use, so every on-disk layout zmoe reads (HF per-expert keys, MLX
//!   stacked experts, affine 2–8 bit, MXFP4, bf16) exports the same way, and each matrix is
//!   dequantized exactly ([`Mat::dequant_row`]) before being re-quantized to Q4_0 / Q8_0
//!   with ggml's reference rounding, or rounded to BF16 ([`gguf`]); gpt-oss experts go to
//!   MXFP4, which an MXFP4 source survives bit for bit. Norms, the router and its
//!   correction bias stay f32, as llama.cpp's converter keeps them. MLA attention goes out
//!   in the absorbed form llama.cpp's `deepseek2` graph runs (see `plan`).
//! - **One table entry per family** ([`GGUF_ARCHS`]): the llama.cpp architecture name and
//!   what that architecture's loader can represent (which layers may be dense, biases,
//!   partial rotary, fixed top-k renormalisation; for MLA also its rope pairing, latent-norm
//!   epsilon and YaRN scales). Tensor names are llama.cpp's standard ones
//!   (`blk.N.attn_q.weight`, `blk.N.ffn_gate_exps.weight`, …) and metadata keys are
//!   `<arch>.…`, so a family whose [`Weights`] fit the same fields needs nothing else. What
//!   the loader cannot represent is reported as a warning, not silently dropped.
//! - **Streaming.** The 30B-A3B preset is ~17 GB at 4 bits: tensors are converted one at a
//!   time, in chunks of rows (parallel over rows with rayon), and appended to a temporary
//!   file in the output's folder that is renamed into place only after it has been read
//!   back and checked. Peak memory is one chunk, not one model.
//! - **No vocabulary.** The GGUF carries `tokenizer.ggml.model = "none"` and
//!   `<arch>.vocab_size`: enough for `llama-bench` (random token ids), not for text.

pub mod gguf;

use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;

use crate::checkpoint::{Checkpoint, Mat};
use crate::config::{Family, MlaConfig, ModelConfig, RouterKind, YarnParams, yarn_mscale};
use crate::error::{Error, Result};
use crate::model::{Attn, Linear, Mlp, Weights};
use gguf::{GgmlType, GgufFile, GgufWriter, TensorSpec, Value};

/// The GGUF type of the exported weight matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufQuant {
    /// ggml Q4_0: 32-element blocks, f16 scale, 4-bit codes (4.5 bits per weight).
    Q4_0,
    /// ggml Q8_0: 32-element blocks, f16 scale, 8-bit codes (8.5 bits per weight).
    Q8_0,
    /// bfloat16 (16 bits per weight, round to nearest even: exact for a bf16 source).
    Bf16,
}

impl GgufQuant {
    /// Parses `q4_0|q8_0|bf16` (as given to `--quant`).
    pub fn parse(s: &str) -> Result<GgufQuant> {
        match s.to_ascii_lowercase().as_str() {
            "q4_0" => Ok(GgufQuant::Q4_0),
            "q8_0" => Ok(GgufQuant::Q8_0),
            "bf16" => Ok(GgufQuant::Bf16),
            _ => Err(Error::Arg(format!("unknown --quant `{s}` (expected q4_0, q8_0 or bf16)"))),
        }
    }

    /// The ggml tensor type of quantized matrices.
    pub fn ggml_type(self) -> GgmlType {
        match self {
            GgufQuant::Q4_0 => GgmlType::Q4_0,
            GgufQuant::Q8_0 => GgmlType::Q8_0,
            GgufQuant::Bf16 => GgmlType::Bf16,
        }
    }

    /// `general.file_type` (llama.cpp's `LLAMA_FTYPE_MOSTLY_Q4_0` = 2, `…_Q8_0` = 7,
    /// `…_BF16` = 32).
    pub fn file_type(self) -> u32 {
        match self {
            GgufQuant::Q4_0 => 2,
            GgufQuant::Q8_0 => 7,
            GgufQuant::Bf16 => 32,
        }
    }

    /// `q4_0` / `q8_0` / `bf16`.
    pub fn name(self) -> &'static str {
        self.ggml_type().name()
    }
}

/// Which layers llama.cpp's loader for an architecture lets have a dense MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenseLayers {
    /// No layer: every layer must be MoE.
    Never,
    /// The first `<arch>.leading_dense_block_count` layers (DeepSeek's
    /// `first_k_dense_replace`); every later layer must be MoE.
    Leading,
}

/// A family's llama.cpp architecture and what its loader can represent.
#[derive(Debug, Clone, Copy)]
pub struct GgufArch {
    /// The zmoe family.
    pub family: Family,
    /// llama.cpp's architecture name (`general.architecture`, prefix of the metadata keys).
    pub arch: &'static str,
    /// Which layers may have a dense MLP (`blk.N.ffn_gate/up/down.weight`).
    pub dense_ffn: DenseLayers,
    /// The loader reads optional q/k/v biases (`blk.N.attn_q.bias`, …; MLA: q_a / kv_a).
    pub qkv_bias: bool,
    /// The loader reads an output-projection bias (`blk.N.attn_output.bias`).
    pub out_bias: bool,
    /// The graph supports rotary on fewer dims than the head's rotary slot (the head for
    /// GQA, `qk_rope_head_dim` for MLA) — `rope.dimension_count` smaller than that slot.
    pub partial_rope: bool,
    /// `Some(b)`: the graph always renormalises the top-k router weights (`b = true`) or
    /// never does; `None`: it reads `<arch>.expert_weights_norm` (or, like `gpt-oss`,
    /// routes in a way that has no renormalisation switch).
    pub topk_norm: Option<bool>,
    /// The tensor name of the norm before the MLP: `ffn_norm`, or `post_attention_norm`
    /// (`gpt-oss`).
    pub post_norm: &'static str,
    /// Experts are written as MXFP4 whatever `--quant` says (the `gpt-oss` release format;
    /// an MXFP4 source is carried over exactly), with their biases.
    pub experts_mxfp4: bool,
}

/// The `deepseek2` entry, shared by the MLA families (see [`GGUF_ARCHS`]).
const fn deepseek2(family: Family) -> GgufArch {
    GgufArch {
        family,
        arch: "deepseek2",
        dense_ffn: DenseLayers::Leading,
        qkv_bias: false,
        out_bias: false,
        partial_rope: false,
        topk_norm: None,
        post_norm: "ffn_norm",
        experts_mxfp4: false,
    }
}

/// Family → llama.cpp architecture. Adding a family is one entry here (read its loader in
/// llama.cpp's `src/models/<arch>.cpp` to fill in the flags).
pub const GGUF_ARCHS: &[GgufArch] = &[
    // src/models/qwen3moe.cpp: every layer MoE, q/k/v biases optional (create_tensor_qkv),
    // no attn_output bias, asserts n_rot == head dim, build_moe_ffn(..., norm_w = true).
    GgufArch {
        family: Family::Qwen3Moe,
        arch: "qwen3moe",
        dense_ffn: DenseLayers::Never,
        qkv_bias: true,
        out_bias: false,
        partial_rope: false,
        topk_norm: Some(true),
        post_norm: "ffn_norm",
        experts_mxfp4: false,
    },
    // src/models/openai-moe-iswa.cpp ("gpt-oss"): q/k/v/o and expert biases, attn_sinks,
    // post_attention_norm, every other layer sliding (set_swa_pattern(2), window from
    // `attention.sliding_window`), YaRN from `rope.scaling.*`, top-k on the router logits
    // with softmax over the k, the clamped SwiGLU (its limit 7 and alpha 1.702 built in).
    GgufArch {
        family: Family::GptOss,
        arch: "gpt-oss",
        dense_ffn: DenseLayers::Never,
        qkv_bias: true,
        out_bias: true,
        partial_rope: false,
        topk_norm: None,
        post_norm: "post_attention_norm",
        experts_mxfp4: true,
    },
    // src/models/lfm2moe.cpp + lfm2.cpp: `n_layer_dense_lead` dense layers, short-conv
    // layers where `attention.head_count_kv[l] == 0` (`shortconv.{in_proj,conv,out_proj}`),
    // q/k norms, no biases; build_moe_ffn(..., exp_probs_b, norm_w = true, scale_w = false,
    // expert_gating_func); the final norm is `token_embd_norm`.
    GgufArch {
        family: Family::Lfm2Moe,
        arch: "lfm2moe",
        dense_ffn: DenseLayers::Leading,
        qkv_bias: false,
        out_bias: false,
        partial_rope: false,
        topk_norm: Some(true),
        post_norm: "ffn_norm",
        experts_mxfp4: false,
    },
    // src/models/deepseek2.cpp, which llama.cpp's convert_hf_to_gguf.py targets for
    // GLM-4.7-Flash (`Glm4MoeLiteForCausalLM`), DeepSeek-V2/V3 and Kimi-K2: MLA (absorbed
    // attn_k_b / attn_v_b), the first leading_dense_block_count layers dense and the rest
    // MoE with shared experts (required), gating, selection bias (`exp_probs_b`), expert
    // groups, expert_weights_norm / _scale all read from the file; no attention biases;
    // rope NORM (consecutive pairs) on the whole qk_rope_head_dim slot.
    deepseek2(Family::Glm4MoeLite),
    deepseek2(Family::DeepseekV3),
];

/// Layers `0..n` have a dense MLP and layer `n` (if any) is MoE: DeepSeek's
/// `first_k_dense_replace` as llama.cpp's `leading_dense_block_count`.
fn leading_dense(cfg: &ModelConfig) -> usize {
    (0..cfg.num_layers).take_while(|&l| !cfg.is_moe_layer(l)).count()
}

/// What llama.cpp's deepseek2 YaRN does with the parameters this exporter writes
/// (`rope.scaling.factor` f, `rope.scaling.yarn_log_multiplier` = 0.1 · mscale_all_dim):
/// the multipliers of cos/sin and of the softmax scale. `llama-context.cpp` sets
/// yarn_attn_factor = get_mscale(f, mscale) / get_mscale(f, mscale_all_dim) taking `mscale`
/// to be mscale_all_dim for deepseek2 (so 1), or get_mscale(f, 1) without mscale_all_dim;
/// ggml's `rope_yarn` scales cos/sin by it, and `deepseek2.cpp` multiplies kq_scale by
/// (it · (1 + 0.1 · mscale_all_dim · ln f))².
fn llama_yarn_scales(y: &YarnParams) -> (f64, f64) {
    let f = y.factor;
    let rope = if y.mscale_all_dim.is_some() { 1.0 } else { yarn_mscale(f, 1.0) };
    let kq = rope * (1.0 + 0.1 * y.mscale_all_dim.unwrap_or(0.0) * f.ln());
    (rope, kq * kq)
}

impl GgufArch {
    /// The entry for `family`.
    pub fn for_family(family: Family) -> Result<&'static GgufArch> {
        GGUF_ARCHS.iter().find(|a| a.family == family).ok_or_else(|| {
            Error::Arg(format!("GGUF export does not know family `{}` yet (add it to GGUF_ARCHS)", family.model_type()))
        })
    }

    /// What in `cfg` llama.cpp's loader for this architecture cannot represent: each line
    /// is a reason the exported file will not load there, or will not compute the same
    /// function. Empty when the export is faithful.
    pub fn gaps(&self, cfg: &ModelConfig) -> Vec<String> {
        let a = self.arch;
        let mut out = Vec::new();
        let dense: Vec<usize> = (0..cfg.num_layers).filter(|&l| !cfg.is_moe_layer(l)).collect();
        match self.dense_ffn {
            DenseLayers::Never if !dense.is_empty() => out.push(format!(
                "layers {dense:?} have a dense MLP, which llama.cpp's `{a}` loader does not accept \
                 (written as blk.N.ffn_gate/ffn_up/ffn_down; the file will not load in llama.cpp)"
            )),
            DenseLayers::Leading => {
                let lead = leading_dense(cfg);
                let late: Vec<usize> = dense.into_iter().filter(|&l| l >= lead).collect();
                if !late.is_empty() {
                    out.push(format!(
                        "layers {late:?} have a dense MLP after a MoE layer; llama.cpp's `{a}` loader takes \
                         only the first leading_dense_block_count ({lead}) layers as dense (the file will \
                         not load in llama.cpp)"
                    ));
                }
            }
            DenseLayers::Never => {}
        }
        if cfg.attention_bias && !self.qkv_bias {
            out.push(format!("attention biases are not read by llama.cpp's `{a}` loader (file will not load)"));
        }
        if cfg.attention_bias && !self.out_bias {
            out.push(format!(
                "the o_proj bias is not read by llama.cpp's `{a}` loader (written as attn_output.bias; \
                 the file will not load in llama.cpp)"
            ));
        }
        let slot = cfg.mla.as_ref().map_or(cfg.head_dim, |m| m.qk_rope_head_dim);
        if !self.partial_rope && cfg.rope.dim != slot {
            out.push(format!(
                "rotary on {} of {slot} dims (partial_rotary_factor) is not supported by llama.cpp's `{a}` graph",
                cfg.rope.dim
            ));
        }
        if let Some(g) = &cfg.gpt_oss {
            let alternating = g.sliding.iter().enumerate().all(|(l, &s)| s == (l % 2 == 0));
            if !alternating {
                out.push(format!(
                    "llama.cpp's `{a}` graph slides every other layer from layer 0; this model's layer_types differ"
                ));
            }
            if g.swiglu_limit != 7.0 || g.swiglu_alpha != 1.702 {
                out.push(format!("llama.cpp's `{a}` graph has swiglu_limit 7 and alpha 1.702 built in"));
            }
        }
        if let Some(norm) = self.topk_norm
            && cfg.num_experts > 0
            && norm != cfg.norm_topk_prob
        {
            out.push(format!(
                "llama.cpp's `{a}` graph uses norm_topk_prob = {norm}, the model {} (outputs will differ)",
                cfg.norm_topk_prob
            ));
        }
        if cfg.conv.as_ref().is_some_and(|cv| cv.bias) {
            out.push(format!(
                "conv_bias: llama.cpp's `{a}` graph has no short-conv biases (they are not written; outputs will differ)"
            ));
        }
        if cfg.conv.as_ref().is_some_and(|cv| cv.kernel < 2) {
            out.push(format!("conv_L_cache 1: llama.cpp's `{a}` graph needs a kernel of 2 or more (will not load)"));
        }
        if let RouterKind::SigmoidBias { expert_bias, routed_scaling_factor } = cfg.router {
            if routed_scaling_factor != 1.0 {
                out.push(format!(
                    "routed_scaling_factor {routed_scaling_factor}: llama.cpp's `{a}` graph does not scale the \
                     routing weights (outputs will differ)"
                ));
            }
            if !expert_bias {
                out.push(format!(
                    "use_expert_bias false: llama.cpp's `{a}` loader requires exp_probs_b (will not load)"
                ));
            }
        }
        if let Some(m) = &cfg.mla {
            self.mla_gaps(cfg, m, &mut out);
        }
        out
    }

    /// The gaps of llama.cpp's MLA graph (`deepseek2.cpp`), which differs from transformers'
    /// GLM / DeepSeek-V3 in a few corners.
    fn mla_gaps(&self, cfg: &ModelConfig, m: &MlaConfig, out: &mut Vec<String>) {
        let a = self.arch;
        if !cfg.rope.interleaved {
            out.push(format!(
                "llama.cpp's `{a}` graph rotates consecutive pairs (rope NORM), the model rotates halves \
                 (rope_interleave = false): outputs will differ"
            ));
        }
        if m.latent_norm_eps != cfg.rms_norm_eps {
            out.push(format!(
                "llama.cpp's `{a}` graph normalises the q/kv latents with rms_norm_eps ({:e}), the model \
                 with {:e} (q_a_layernorm / kv_a_layernorm): outputs differ slightly",
                cfg.rms_norm_eps, m.latent_norm_eps
            ));
        }
        if cfg.num_experts > 0 && cfg.n_shared_experts == 0 {
            out.push(format!(
                "the model has no shared experts, which llama.cpp's `{a}` loader requires in every MoE \
                 layer (ffn_*_shexp; the file will not load)"
            ));
        }
        // deepseek2.cpp's `is_lite`: these layer counts are taken for DeepSeek-V2-Lite, whose
        // loader ignores q_lora_rank and wants a plain attn_q.
        let lite = matches!(cfg.num_layers, 26 | 27) || (cfg.num_layers == 48 && cfg.vocab_size == 128256);
        if lite && m.q_lora_rank.is_some() {
            out.push(format!(
                "llama.cpp's `{a}` loader takes a {}-layer model for DeepSeek-V2-Lite and ignores \
                 q_lora_rank (the file will not load)",
                cfg.num_layers
            ));
        }
        if let Some(y) = &cfg.rope.yarn {
            if y.beta_fast != 32.0 || y.beta_slow != 1.0 || !y.truncate {
                out.push(format!(
                    "YaRN beta_fast / beta_slow {} / {} (truncate {}): llama.cpp's `{a}` loader always uses \
                     32 / 1 with whole-dim bounds (outputs will differ)",
                    y.beta_fast, y.beta_slow, y.truncate
                ));
            }
            let (rope, kq) = llama_yarn_scales(y);
            let off = |x: f64, want: f32| (x - want as f64).abs() > 1e-5 * x.abs().max(1.0);
            if off(rope, cfg.rope.attention_scaling) || off(kq, cfg.rope.softmax_mscale) {
                out.push(format!(
                    "YaRN scales: llama.cpp multiplies cos/sin by {rope:.6} and the softmax scale by {kq:.6} \
                     (it assumes mscale = 1 and reads mscale_all_dim only), the model by {:.6} and {:.6} \
                     (mscale {:?}, mscale_all_dim {:?}, attention_factor {:?}): outputs will differ",
                    cfg.rope.attention_scaling, cfg.rope.softmax_mscale, y.mscale, y.mscale_all_dim, y.attention_factor
                ));
            }
        }
    }
}

/// How to export.
#[derive(Debug, Clone, Copy)]
pub struct ExportOptions {
    /// Type of the weight matrices (norms and router stay f32).
    pub quant: GgufQuant,
    /// Replace an existing file at the output path.
    pub force: bool,
    /// After writing, also compare sampled rows of every tensor with the source weights
    /// (the file's structure is always read back and checked).
    pub check: bool,
    /// Draw a progress bar on stderr for large models.
    pub progress: bool,
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportSummary {
    /// The GGUF file.
    pub out: PathBuf,
    /// llama.cpp architecture.
    pub arch: &'static str,
    /// Matrix type.
    pub quant: GgufQuant,
    /// Number of tensors.
    pub tensors: usize,
    /// Number of parameters (elements of all tensors).
    pub params: u64,
    /// File size in bytes.
    pub bytes: u64,
    /// Wall time of the export, seconds.
    pub secs: f64,
    /// What llama.cpp cannot represent (see [`GgufArch::gaps`]).
    pub warnings: Vec<String>,
    /// Rows compared with the source by `check` (0 without it).
    pub checked_rows: usize,
}

/// Where a GGUF tensor's rows come from.
enum Src<'a> {
    /// Rows of these matrices, one after another (stacked experts: E matrices).
    Mats(Vec<&'a Mat>),
    /// A single row.
    Vector(&'a [f32]),
    /// A row-major matrix of rows of `width` (LFM2's conv kernel `[H, L]`, stacked expert
    /// biases `[E, width]`).
    Rows(&'a [f32], usize),
}

impl Src<'_> {
    fn n_rows(&self) -> usize {
        match self {
            Src::Mats(ms) => ms.iter().map(|m| m.rows).sum(),
            Src::Vector(_) => 1,
            Src::Rows(v, w) => v.len() / w,
        }
    }

    fn row(&self, r: usize, out: &mut [f32]) {
        match self {
            Src::Mats(ms) => {
                let per = ms[0].rows;
                ms[r / per].dequant_row(r % per, out);
            }
            Src::Vector(v) => out.copy_from_slice(v),
            Src::Rows(v, w) => out.copy_from_slice(&v[r * w..][..*w]),
        }
    }
}

/// One GGUF tensor and its source.
struct Item<'a> {
    spec: TensorSpec,
    src: Src<'a>,
}

/// Builds the tensor list in llama.cpp's names and dims (`ne`, innermost first).
struct Planner<'a> {
    items: Vec<Item<'a>>,
    quant: GgmlType,
}

impl<'a> Planner<'a> {
    fn push(&mut self, name: String, dims: Vec<u64>, ty: GgmlType, src: Src<'a>) {
        self.items.push(Item { spec: TensorSpec { name, dims, ty }, src });
    }

    /// A quantized matrix `[out, in]` → `ne = [in, out]`.
    fn mat(&mut self, name: String, m: &'a Mat) {
        self.push(name, vec![m.cols as u64, m.rows as u64], self.quant, Src::Mats(vec![m]));
    }

    /// An f32 matrix (router).
    fn mat_f32(&mut self, name: String, m: &'a Mat) {
        self.push(name, vec![m.cols as u64, m.rows as u64], GgmlType::F32, Src::Mats(vec![m]));
    }

    /// A stack of `E` matrices `[out, in]` (experts, or MLA's per-head k_b / v_b) →
    /// `ne = [in, out, E]`, in `ty`.
    fn stack(&mut self, name: String, ms: &'a [Mat], ty: GgmlType) {
        let (r, c) = (ms[0].rows as u64, ms[0].cols as u64);
        self.push(name, vec![c, r, ms.len() as u64], ty, Src::Mats(ms.iter().collect()));
    }

    /// Stacked expert biases `[E, n]` (f32) → `ne = [n, E]`.
    fn expert_bias(&mut self, name: String, b: &'a [f32], experts: usize) {
        let n = b.len() / experts;
        self.push(name, vec![n as u64, experts as u64], GgmlType::F32, Src::Rows(b, n));
    }

    fn vector(&mut self, name: String, v: &'a [f32]) {
        self.push(name, vec![v.len() as u64], GgmlType::F32, Src::Vector(v));
    }

    /// A linear layer: weight, and its bias when present.
    fn linear(&mut self, base: &str, l: &'a Linear) {
        self.mat(format!("{base}.weight"), &l.w);
        if let Some(b) = &l.b {
            self.vector(format!("{base}.bias"), b);
        }
    }
}

/// The tensor list in llama.cpp's names. MLA attention is written the way llama.cpp's
/// `deepseek2` loader wants it when `attention.key_length_mla` is set (every GGUF its
/// converter writes today): `attn_k_b` = per head `W_UKᵀ [kv_lora, qk_nope]` and `attn_v_b`
/// = per head `W_UV [v_head, kv_lora]` — exactly zmoe's absorbed `embed_q` / `unembed_out`,
/// which [`Weights::load`] builds from either on-disk layout (HF's `kv_b_proj` is split and
/// transposed there; mlx-community checkpoints store the two stacks), so both layouts export
/// the same file. The unsplit `attn_kv_b` is llama.cpp's legacy non-MLA path (full K/V
/// cache) and is not written. Multi-token-prediction layers are never run and not in
/// [`Weights`]; llama.cpp's converter skips them for deepseek2 as well.
fn plan<'a>(a: &GgufArch, w: &'a Weights, tied: bool, quant: GgmlType) -> Vec<Item<'a>> {
    let mut p = Planner { items: Vec::new(), quant };
    let expert_ty = if a.experts_mxfp4 { GgmlType::Mxfp4 } else { quant };
    p.mat("token_embd.weight".into(), &w.embed);
    for (i, l) in w.layers.iter().enumerate() {
        let b = format!("blk.{i}");
        p.vector(format!("{b}.attn_norm.weight"), &l.input_norm);
        // GGUF_ARCHS has GQA and short-conv families only: MLA models are refused before
        // planning.
        match &l.attn {
            Attn::Gqa { q, k, v, q_norm, k_norm } => {
                p.linear(&format!("{b}.attn_q"), q);
                p.linear(&format!("{b}.attn_k"), k);
                p.linear(&format!("{b}.attn_v"), v);
                p.linear(&format!("{b}.attn_output"), &l.o);
                p.vector(format!("{b}.attn_q_norm.weight"), q_norm);
                p.vector(format!("{b}.attn_k_norm.weight"), k_norm);
            }
            Attn::Conv(cv) => {
                // Weights only (llama.cpp's graph has no conv biases: a `gaps` warning).
                p.mat(format!("{b}.shortconv.in_proj.weight"), &cv.in_proj.w);
                let width = cv.kernel.len() / l.input_norm.len();
                let dims = vec![width as u64, l.input_norm.len() as u64];
                p.push(format!("{b}.shortconv.conv.weight"), dims, GgmlType::F32, Src::Rows(&cv.kernel, width));
                p.mat(format!("{b}.shortconv.out_proj.weight"), &l.o.w);
            }
            Attn::Sink { q, k, v, sinks } => {
                p.linear(&format!("{b}.attn_q"), q);
                p.linear(&format!("{b}.attn_k"), k);
                p.linear(&format!("{b}.attn_v"), v);
                p.linear(&format!("{b}.attn_output"), &l.o);
                p.vector(format!("{b}.attn_sinks.weight"), sinks);
            }
            Attn::Mla(m) => {
                match &m.q_a {
                    Some(q_a) => {
                        p.linear(&format!("{b}.attn_q_a"), q_a);
                        p.vector(format!("{b}.attn_q_a_norm.weight"), &m.q_a_norm);
                        p.linear(&format!("{b}.attn_q_b"), &m.q);
                    }
                    None => p.linear(&format!("{b}.attn_q"), &m.q),
                }
                p.linear(&format!("{b}.attn_kv_a_mqa"), &m.kv_a);
                p.vector(format!("{b}.attn_kv_a_norm.weight"), &m.kv_a_norm);
                // nH × [kv_lora, qk_nope] → ne [qk_nope, kv_lora, nH]
                p.stack(format!("{b}.attn_k_b.weight"), &m.embed_q, p.quant);
                // nH × [v_head, kv_lora] → ne [kv_lora, v_head, nH]
                p.stack(format!("{b}.attn_v_b.weight"), &m.unembed_out, p.quant);
                p.linear(&format!("{b}.attn_output"), &l.o);
            }
        }
        p.vector(format!("{b}.{}.weight", a.post_norm), &l.post_norm);
        match &l.mlp {
            Mlp::Moe { router, correction_bias, experts, shared } => {
                p.mat_f32(format!("{b}.ffn_gate_inp.weight"), &router.w);
                if let Some(bias) = &router.b {
                    p.vector(format!("{b}.ffn_gate_inp.bias"), bias);
                }
                if let Some(bias) = correction_bias {
                    // A selection-only bias (GLM/DeepSeek e_score_correction_bias, LFM2 expert_bias).
                    p.vector(format!("{b}.exp_probs_b.bias"), bias);
                }
                p.stack(format!("{b}.ffn_gate_exps.weight"), &experts.gate, expert_ty);
                p.stack(format!("{b}.ffn_up_exps.weight"), &experts.up, expert_ty);
                p.stack(format!("{b}.ffn_down_exps.weight"), &experts.down, expert_ty);
                if let Some(eb) = &experts.bias {
                    let e = experts.gate.len();
                    p.expert_bias(format!("{b}.ffn_gate_exps.bias"), &eb.gate, e);
                    p.expert_bias(format!("{b}.ffn_up_exps.bias"), &eb.up, e);
                    p.expert_bias(format!("{b}.ffn_down_exps.bias"), &eb.down, e);
                }
                if let Some(f) = shared {
                    p.linear(&format!("{b}.ffn_gate_shexp"), &f.gate);
                    p.linear(&format!("{b}.ffn_up_shexp"), &f.up);
                    p.linear(&format!("{b}.ffn_down_shexp"), &f.down);
                }
            }
            Mlp::Dense(f) => {
                p.linear(&format!("{b}.ffn_gate"), &f.gate);
                p.linear(&format!("{b}.ffn_up"), &f.up);
                p.linear(&format!("{b}.ffn_down"), &f.down);
            }
        }
    }
    // llama.cpp names LFM2's final norm (transformers' `embedding_norm`) `token_embd_norm`.
    let norm = if a.family == Family::Lfm2Moe { "token_embd_norm.weight" } else { "output_norm.weight" };
    p.vector(norm.into(), &w.norm);
    if !tied {
        p.linear("output", &w.lm_head);
    }
    p.items
}

/// llama.cpp's `LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID` (`<arch>.expert_gating_func`).
const GATING_SIGMOID: u32 = 2;

/// The metadata llama.cpp reads for `arch` (types as its loader expects them: u32 counts,
/// f32 epsilon, rope base and scales).
fn metadata(a: &GgufArch, cfg: &ModelConfig, name: &str, quant: GgufQuant) -> Vec<(String, Value)> {
    let arch = a.arch;
    let u = |x: usize| Value::U32(x as u32);
    let mut kv: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::Str(arch.into())),
        ("general.name".into(), Value::Str(name.into())),
        ("general.file_type".into(), Value::U32(quant.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
        ("general.alignment".into(), Value::U32(gguf::ALIGNMENT as u32)),
        ("general.quantized_by".into(), Value::Str(format!("zmoe {}", env!("CARGO_PKG_VERSION")))),
    ];
    let mut add = |k: &str, v: Value| kv.push((format!("{arch}.{k}"), v));
    add("context_length", u(cfg.max_position_embeddings));
    add("embedding_length", u(cfg.hidden_size));
    add("block_count", u(cfg.num_layers));
    if cfg.intermediate_size > 0 {
        add("feed_forward_length", u(cfg.intermediate_size));
    }
    add("attention.head_count", u(cfg.num_heads));
    match &cfg.mla {
        None => {
            if cfg.conv.is_some() {
                // Hybrid models: per layer, 0 KV heads marks a short-conv (recurrent) layer.
                let kv =
                    (0..cfg.num_layers).map(|l| u(if cfg.is_conv_layer(l) { 0 } else { cfg.num_kv_heads })).collect();
                add("attention.head_count_kv", Value::Array(gguf::ValueType::U32, kv));
            } else {
                add("attention.head_count_kv", u(cfg.num_kv_heads));
            }
            add("attention.key_length", u(cfg.head_dim));
            add("attention.value_length", u(cfg.head_dim));
        }
        Some(m) => {
            // llama.cpp runs MLA as MQA over the cached latent: one KV head whose key is
            // [latent | k_pe] and whose value is the latent; the _mla widths are the heads
            // after k_b / v_b. q_lora_rank 0 selects the plain attn_q.
            add("attention.head_count_kv", u(1));
            add("attention.key_length", u(m.kv_lora_rank + m.qk_rope_head_dim));
            add("attention.value_length", u(m.kv_lora_rank));
            add("attention.key_length_mla", u(m.qk_head_dim()));
            add("attention.value_length_mla", u(m.v_head_dim));
            add("attention.q_lora_rank", u(m.q_lora_rank.unwrap_or(0)));
            add("attention.kv_lora_rank", u(m.kv_lora_rank));
        }
    }
    add("attention.layer_norm_rms_epsilon", Value::F32(cfg.rms_norm_eps));
    // MLA: the k_pe width, whatever part of it is rotated (a gap if not all of it).
    add("rope.dimension_count", u(cfg.mla.as_ref().map_or(cfg.rope.dim, |m| m.qk_rope_head_dim)));
    add("rope.freq_base", Value::F32(cfg.rope.theta as f32));
    if let Some(y) = &cfg.rope.yarn {
        add("rope.scaling.type", Value::Str("yarn".into()));
        add("rope.scaling.factor", Value::F32(y.factor as f32));
        add("rope.scaling.original_context_length", u(y.original_max_position_embeddings as usize));
        if let Some(all) = y.mscale_all_dim {
            // deepseek2's loader divides this by 0.1 (convert_hf_to_gguf.py writes it so).
            add("rope.scaling.yarn_log_multiplier", Value::F32((0.1 * all) as f32));
        }
    }
    if cfg.num_experts > 0 {
        add("expert_count", u(cfg.num_experts));
        add("expert_used_count", u(cfg.top_k));
        add("expert_feed_forward_length", u(cfg.moe_intermediate_size));
        add("expert_weights_norm", Value::Bool(cfg.norm_topk_prob));
    }
    if let Some(cv) = &cfg.conv {
        add("shortconv.l_cache", u(cv.kernel));
        add("expert_gating_func", Value::U32(GATING_SIGMOID));
    }
    if let Some(g) = &cfg.gpt_oss {
        add("attention.sliding_window", u(g.sliding_window));
    }
    if let RouterKind::SigmoidGrouped { n_group, topk_group, routed_scaling_factor } = cfg.router {
        add("expert_shared_count", u(cfg.n_shared_experts));
        add("expert_weights_scale", Value::F32(routed_scaling_factor));
        add("expert_gating_func", Value::U32(GATING_SIGMOID));
        // Keeping every group is no grouping, and llama.cpp asserts used < count.
        if n_group > 1 && topk_group < n_group {
            add("expert_group_count", u(n_group));
            add("expert_group_used_count", u(topk_group));
        }
    }
    if a.dense_ffn == DenseLayers::Leading {
        add("leading_dense_block_count", u(leading_dense(cfg)));
    }
    add("vocab_size", u(cfg.vocab_size));
    kv.push(("tokenizer.ggml.model".into(), Value::Str("none".into())));
    kv
}

/// A sample of rows of a tensor with `n` rows: first, last and a few in between.
fn sample_rows(n: usize, salt: u64) -> Vec<usize> {
    let mut rows: Vec<usize> = vec![0, n - 1];
    for k in 0..6u64 {
        rows.push((crate::rng::mix64(salt.wrapping_mul(31).wrapping_add(k)) % n as u64) as usize);
    }
    rows.sort_unstable();
    rows.dedup();
    rows
}

/// Reads `path` back and checks it against the plan: same tensors (name, dims, type) in
/// the same order, the metadata as written; with `rows`, also compares sampled rows of
/// every tensor with the source within the type's error bound. Returns the rows compared.
fn verify(path: &Path, items: &[Item], kv: &[(String, Value)], rows: bool) -> Result<usize> {
    let f = GgufFile::open(path)?;
    let bad = |why: String| Error::format(path, format!("read-back check failed: {why}"));
    if f.kv != kv {
        return Err(bad("metadata differs from what was written".into()));
    }
    if f.tensors.len() != items.len() {
        return Err(bad(format!("{} tensors, expected {}", f.tensors.len(), items.len())));
    }
    let mut checked = 0;
    for (i, (t, it)) in f.tensors.iter().zip(items).enumerate() {
        if t.name != it.spec.name || t.dims != it.spec.dims || t.ty != it.spec.ty {
            return Err(bad(format!("tensor #{i} is `{}` {:?} {:?}, expected {:?}", t.name, t.dims, t.ty, it.spec)));
        }
        if !rows {
            continue;
        }
        let n = t.row_len();
        let (mut got, mut want) = (vec![0f32; n], vec![0f32; n]);
        for r in sample_rows(t.n_rows(), i as u64) {
            f.dequant_row(t, r, &mut got)?;
            it.src.row(r, &mut want);
            let blk = t.ty.block_len().max(gguf::QK);
            for (b, (g, w)) in got.chunks(blk).zip(want.chunks(blk)).enumerate() {
                let bound = gguf::block_error_bound(t.ty, w);
                if let Some((j, (x, y))) = g.iter().zip(w).enumerate().find(|(_, (x, y))| (*x - *y).abs() > bound) {
                    return Err(bad(format!(
                        "tensor `{}` row {r} element {}: {x} vs source {y}, |Δ| > bound {bound}",
                        t.name,
                        b * blk + j
                    )));
                }
            }
            checked += 1;
        }
    }
    Ok(checked)
}

/// Exports the model folder `model` to the GGUF file `out`. `warn` receives each
/// [`GgufArch::gaps`] line before the (long) conversion starts.
pub fn export_gguf(
    model: &Path,
    out: &Path,
    opts: &ExportOptions,
    warn: &mut dyn FnMut(&str),
) -> Result<ExportSummary> {
    let t0 = Instant::now();
    crate::output::check_out_path("--out", out, opts.force)?;
    let ck = Checkpoint::open(model)?;
    for w in &ck.warnings {
        warn(w);
    }
    let cfg = ck.config.clone();
    let arch = GgufArch::for_family(cfg.family)?;
    let weights = Weights::load(&ck)?;
    let warnings = arch.gaps(&cfg);
    for w in &warnings {
        warn(w);
    }
    let tied = cfg.tie_word_embeddings && !ck.has("lm_head.weight");
    let items = plan(arch, &weights, tied, opts.quant.ggml_type());
    for it in &items {
        if it.spec.ty.row_bytes(it.spec.dims[0] as usize).is_none() {
            return Err(Error::tensor(
                &ck.dir,
                &it.spec.name,
                format!(
                    "row length {} is not a multiple of {} ({} blocks); this model cannot be exported as {}",
                    it.spec.dims[0],
                    it.spec.ty.block_len(),
                    it.spec.ty.name(),
                    opts.quant.name()
                ),
            ));
        }
    }
    let name = ck.dir.canonicalize().unwrap_or(ck.dir.clone());
    let name = name.file_name().map_or("zmoe model".into(), |n| n.to_string_lossy().into_owned());
    let kv = metadata(arch, &cfg, &name, opts.quant);

    // A new file with a random name beside `out`, never a planted link (see crate::output).
    let tmp = crate::output::TempFile::new("--out", out)?;
    let file = tmp.file().try_clone().map_err(|e| Error::io(tmp.path(), e))?;
    let checked_rows = write_file(file, tmp.path(), &ck.dir, &items, &kv, opts)
        .and_then(|_| verify(tmp.path(), &items, &kv, opts.check))?;
    tmp.commit(opts.force)?;
    let bytes = std::fs::metadata(out).map_err(|e| Error::io(out, e))?.len();
    Ok(ExportSummary {
        out: out.to_path_buf(),
        arch: arch.arch,
        quant: opts.quant,
        tensors: items.len(),
        params: items.iter().map(|i| i.spec.dims.iter().product::<u64>()).sum(),
        bytes,
        secs: t0.elapsed().as_secs_f64(),
        warnings,
        checked_rows,
    })
}

/// Output bytes converted per parallel chunk.
const CHUNK_F32_BYTES: usize = 32 << 20;

fn write_file(
    file: std::fs::File,
    path: &Path,
    model_dir: &Path,
    items: &[Item],
    kv: &[(String, Value)],
    opts: &ExportOptions,
) -> Result<()> {
    let specs: Vec<TensorSpec> = items.iter().map(|i| i.spec.clone()).collect();
    let mut w = GgufWriter::new(BufWriter::with_capacity(8 << 20, file), path, kv, &specs)?;
    let total = w.file_size();
    let bar = ProgressBar::hidden();
    if opts.progress && total > 64 << 20 {
        bar.set_draw_target(ProgressDrawTarget::stderr());
        bar.set_length(total);
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})")
                .expect("static template")
                .progress_chars("=> "),
        );
        bar.set_message(format!("gguf {}", opts.quant.name()));
    }
    let mut buf = Vec::new();
    for it in items {
        let (ty, cols) = (it.spec.ty, it.spec.dims[0] as usize);
        let rb = ty.row_bytes(cols).expect("checked by the caller");
        let n_rows = it.src.n_rows();
        let per_chunk = (CHUNK_F32_BYTES / (cols * 4)).clamp(1, n_rows);
        for r0 in (0..n_rows).step_by(per_chunk) {
            let n = per_chunk.min(n_rows - r0);
            buf.resize(n * rb, 0);
            buf.par_chunks_mut(rb).enumerate().try_for_each_init(
                || vec![0f32; cols],
                |x, (i, dst)| {
                    it.src.row(r0 + i, x);
                    gguf::quantize_row(ty, x, dst)
                        .map_err(|why| Error::tensor(model_dir, &it.spec.name, format!("row {}: {why}", r0 + i)))
                },
            )?;
            w.write_data(&buf)?;
            bar.inc(buf.len() as u64);
        }
    }
    let file = w.finish()?.into_inner().map_err(|e| Error::io(path, e.into_error()))?;
    file.sync_all().map_err(|e| Error::io(path, e))?;
    bar.finish_and_clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::gguf::*;

    fn q4(x: &[f32]) -> Vec<u8> {
        let mut out = vec![0u8; x.len() / 32 * 18];
        quantize_row_q4_0(x, &mut out).unwrap();
        out
    }

    fn q8(x: &[f32]) -> Vec<u8> {
        let mut out = vec![0u8; x.len() / 32 * 34];
        quantize_row_q8_0(x, &mut out).unwrap();
        out
    }

    #[test]
    fn q4_0_hand_computed_ramp() {
        // x[j] = j - 16: the largest magnitude is x[0] = -16, so d = -16 / -8 = 2 (f16
        // 0x4000), id = 0.5, code(j) = min(15, trunc((j-16)/2 + 8.5)) = min(15, trunc(j/2 + 0.5)).
        let x: Vec<f32> = (0..32).map(|j| j as f32 - 16.0).collect();
        let b = q4(&x);
        assert_eq!(&b[..2], &[0x00, 0x40]);
        let code = |j: usize| ((j / 2) + (j % 2)).min(15) as u8;
        for j in 0..16 {
            assert_eq!(b[2 + j], code(j) | (code(j + 16) << 4), "byte {j}");
        }
        // 0 → 0, 1 → 1 (0.5 + 0.5 = 1.0), 2 → 1 (1.5 truncates), 31 → 16 clamps to 15.
        assert_eq!(b[2] & 0xf, 0);
        assert_eq!(b[3] & 0xf, 1);
        assert_eq!(b[4] & 0xf, 1);
        assert_eq!(b[2 + 15] >> 4, 15);
        let mut back = vec![0f32; 32];
        dequantize_row(GgmlType::Q4_0, &b, &mut back).unwrap();
        assert_eq!(back[0], -16.0);
        assert_eq!(back[1], -14.0); // (1 - 8) · 2
        assert_eq!(back[31], 14.0); // clamped: (15 - 8) · 2
    }

    #[test]
    fn q4_0_positive_max_gives_negative_scale() {
        // max = +1 → d = -0.125 (f16 0xB000), id = -8: 1 → 0, -0.5 → trunc(12.5) = 12, 0 → 8.
        let mut x = vec![0f32; 32];
        x[0] = 1.0;
        x[1] = -0.5;
        x[16] = 0.25; // → trunc(-2 + 8.5) = 6, high nibble of byte 0
        let b = q4(&x);
        assert_eq!(&b[..2], &[0x00, 0xB0]);
        assert_eq!(b[2], 6 << 4);
        assert_eq!(b[3], 12 | (8 << 4));
        assert!(b[4..].iter().all(|&v| v == 0x88));
        let mut back = vec![0f32; 32];
        dequantize_row(GgmlType::Q4_0, &b, &mut back).unwrap();
        assert_eq!((back[0], back[1], back[16], back[2]), (1.0, -0.5, 0.25, 0.0));
    }

    #[test]
    fn q8_0_hand_computed_rounds_half_away_from_zero() {
        // amax = 127 → d = 1 (f16 0x3C00): codes are round(x), halves away from zero.
        let mut x = vec![0f32; 32];
        let vals = [-127.0, 63.5, -63.5, 0.5, -0.5, 1.5, 2.5, 126.4];
        x[..vals.len()].copy_from_slice(&vals);
        let b = q8(&x);
        assert_eq!(&b[..2], &[0x00, 0x3C]);
        let codes: Vec<i8> = b[2..10].iter().map(|&c| c as i8).collect();
        assert_eq!(codes, vec![-127, 64, -64, 1, -1, 2, 3, 126]);
    }

    #[test]
    fn q8_0_ramp_scale_is_f16_of_f32_scale() {
        // x[j] = j - 16: amax 16, d = 16/127 in f32, stored as f16 (round to nearest even);
        // codes use the f32 d: round((j-16) · 127/16).
        let x: Vec<f32> = (0..32).map(|j| j as f32 - 16.0).collect();
        let b = q8(&x);
        let d = 16f32 / 127.0;
        assert_eq!(u16::from_le_bytes([b[0], b[1]]), half::f16::from_f32(d).to_bits());
        let id = 1.0 / d;
        for j in 0..32 {
            assert_eq!(b[2 + j] as i8, ((j as f32 - 16.0) * id).round() as i8, "code {j}");
        }
        assert_eq!(b[2] as i8, -127);
        assert_eq!(b[33] as i8, 119); // 15 · 7.9375 = 119.06
    }

    #[test]
    fn zero_block_and_refusals() {
        // 0 / -8 is -0.0 in f32, so ggml stores the scale as f16 -0.0 (0x8000) too.
        let b = q4(&[0.0; 32]);
        assert_eq!(&b[..2], &[0x00, 0x80]);
        assert!(b[2..].iter().all(|&v| v == 0x88));
        assert!(q8(&[0.0; 32]).iter().all(|&v| v == 0));
        let mut out = vec![0u8; 18];
        let mut x = [0f32; 32];
        x[3] = f32::NAN;
        assert!(quantize_row_q4_0(&x, &mut out).unwrap_err().contains("non-finite"));
        x[3] = 1e9; // d = 1.25e8 does not fit in f16
        assert!(quantize_row_q4_0(&x, &mut out).unwrap_err().contains("f16"));
    }

    #[test]
    fn bf16_rounds_to_nearest_even_and_refuses_overflow() {
        // 1 + 2^-8 is halfway between 1 (0x3F80) and 1 + 2^-7 (0x3F81): ties to even, 0x3F80;
        // 1 + 3·2^-8 is halfway between 0x3F81 and 0x3F82: ties to even, 0x3F82.
        let x = [1.0f32, 1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8), -2.5];
        let mut out = [0u8; 8];
        quantize_row(GgmlType::Bf16, &x, &mut out).unwrap();
        let bits: Vec<u16> = out.chunks(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
        assert_eq!(bits, vec![0x3F80, 0x3F80, 0x3F82, 0xC020]);
        let mut back = [0f32; 4];
        dequantize_row(GgmlType::Bf16, &out, &mut back).unwrap();
        assert_eq!(back, [1.0, 1.0, 1.0 + 2f32.powi(-6), -2.5]);
        let mut one = [0u8; 2];
        assert!(quantize_row(GgmlType::Bf16, &[f32::MAX], &mut one).unwrap_err().contains("overflows bf16"));
        assert!(quantize_row(GgmlType::Bf16, &[f32::NAN], &mut one).unwrap_err().contains("non-finite"));
    }

    #[test]
    fn random_rows_within_bound() {
        let mut rng = crate::rng::Rng::new(7);
        for ty in [GgmlType::Q4_0, GgmlType::Q8_0] {
            for _ in 0..200 {
                let scale = 10f32.powi((rng.next_u64() % 6) as i32 - 4);
                let x: Vec<f32> = (0..64).map(|_| rng.normal() * scale).collect();
                let mut q = vec![0u8; ty.row_bytes(64).unwrap()];
                quantize_row(ty, &x, &mut q).unwrap();
                let mut y = vec![0f32; 64];
                dequantize_row(ty, &q, &mut y).unwrap();
                for (xb, yb) in x.chunks(32).zip(y.chunks(32)) {
                    let bound = block_error_bound(ty, xb);
                    for (a, b) in xb.iter().zip(yb) {
                        assert!((a - b).abs() <= bound, "{ty:?}: {a} vs {b}, bound {bound}");
                    }
                }
            }
        }
    }

    /// A preset's config with `edit` applied, parsed.
    fn preset(family: &str, name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> crate::config::ModelConfig {
        let mut j = crate::checkpoint::synth::preset_config(family, name).unwrap();
        edit(&mut j);
        crate::config::ModelConfig::parse(&j.to_string(), std::path::Path::new("config.json")).unwrap()
    }

    fn deepseek2_gaps(family: &str, name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> Vec<String> {
        let cfg = preset(family, name, edit);
        let a = crate::export::GgufArch::for_family(cfg.family).unwrap();
        assert_eq!(a.arch, "deepseek2");
        a.gaps(&cfg)
    }

    #[test]
    fn deepseek2_gaps_name_what_llama_cpp_cannot_represent() {
        let one = |g: Vec<String>, what: &str| {
            assert_eq!(g.len(), 1, "{g:?}");
            assert!(g[0].contains(what), "{g:?}");
        };
        // The presets as released: GLM's latent-norm eps is the only difference.
        one(deepseek2_gaps("glm4_moe_lite", "glm-tiny", |_| {}), "rms_norm_eps (1e-5)");
        one(deepseek2_gaps("glm4_moe_lite", "glm-4.7-flash", |_| {}), "rms_norm_eps (1e-5)");
        assert!(deepseek2_gaps("deepseek_v3", "deepseek-tiny", |_| {}).is_empty());
        assert!(deepseek2_gaps("deepseek_v3", "kimi-k2-tiny", |_| {}).is_empty());
        let ds = |edit: fn(&mut serde_json::Value)| deepseek2_gaps("deepseek_v3", "deepseek-tiny", edit);
        // A dense layer after a MoE one: llama.cpp has only leading dense layers.
        let g = deepseek2_gaps("glm4_moe_lite", "glm-tiny", |j| {
            j["mlp_layer_types"] = serde_json::json!(["dense", "sparse", "dense", "sparse"]);
        });
        assert!(g.iter().any(|w| w.contains("layers [2] have a dense MLP after a MoE layer")), "{g:?}");
        one(ds(|j| j["rope_interleave"] = false.into()), "rotates halves");
        one(ds(|j| j["n_shared_experts"] = 0.into()), "no shared experts");
        one(ds(|j| j["rope_scaling"]["beta_fast"] = 16.0.into()), "beta_fast / beta_slow 16 / 1");
        one(ds(|j| j["rope_scaling"]["truncate"] = false.into()), "truncate false");
        // mscale ≠ mscale_all_dim: transformers scales cos/sin by their ratio, llama.cpp by 1.
        one(ds(|j| j["rope_scaling"]["mscale"] = 0.707.into()), "YaRN scales");
        // No mscale_all_dim: llama.cpp still folds get_mscale(f, 1)² into the softmax scale.
        one(ds(|j| j["rope_scaling"].as_object_mut().unwrap().retain(|k, _| k != "mscale_all_dim")), "YaRN scales");
        one(ds(|j| j["partial_rotary_factor"] = 0.5.into()), "rotary on 16 of 32 dims");
        one(
            ds(|j| {
                j["num_hidden_layers"] = 27.into();
                j["first_k_dense_replace"] = 1.into();
            }),
            "DeepSeek-V2-Lite",
        );
    }

    #[test]
    fn writer_reader_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let kv = vec![
            ("general.architecture".to_string(), Value::Str("test".into())),
            ("general.alignment".to_string(), Value::U32(32)),
            ("a.u8".to_string(), Value::U8(7)),
            ("a.f64".to_string(), Value::F64(-2.5)),
            ("a.arr".to_string(), Value::Array(ValueType::Str, vec![Value::Str("x".into()), Value::Str("yz".into())])),
            ("a.empty".to_string(), Value::Array(ValueType::I32, vec![])),
            ("a.bool".to_string(), Value::Bool(true)),
        ];
        let specs = vec![
            TensorSpec { name: "v".into(), dims: vec![3], ty: GgmlType::F32 },
            TensorSpec { name: "m".into(), dims: vec![64, 2], ty: GgmlType::Q8_0 },
        ];
        let file = std::fs::File::create(&path).unwrap();
        let mut w = GgufWriter::new(file, &path, &kv, &specs).unwrap();
        let size = w.file_size();
        w.write_data(&[0u8; 4]).unwrap();
        w.write_data(&[1u8; 8]).unwrap();
        let q = [0u8; 2 * 68];
        assert!(w.write_data(&[0u8; 2 * 68 + 1]).unwrap_err().to_string().contains("a bug"));
        w.write_data(&q[..10]).unwrap();
        w.write_data(&q[10..]).unwrap();
        w.finish().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), size);
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.kv, kv);
        assert_eq!(f.tensors.len(), 2);
        assert_eq!(f.tensors[1].offset, 32);
        assert_eq!(f.data_start % 32, 0);
        assert_eq!(f.data(&f.tensors[0])[..4], [0, 0, 0, 0]);
        // Truncation is detected and named.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 40]).unwrap();
        let e = GgufFile::open(&path).unwrap_err().to_string();
        assert!(e.contains("t.gguf") && e.contains("truncated"), "{e}");
        std::fs::write(&path, b"GGML not a gguf file at all, really").unwrap();
        assert!(GgufFile::open(&path).unwrap_err().to_string().contains("not a GGUF file"));
    }

    #[cfg(unix)]
    #[test]
    fn export_never_writes_through_a_planted_link() {
        use crate::checkpoint::synth::{self, SynthQuant, SynthSpec};
        let tmp = tempfile::tempdir().unwrap();
        let model = tmp.path().join("m");
        let spec = SynthSpec {
            family: "qwen3_moe".into(),
            preset: "tiny".into(),
            quant: SynthQuant::Bf16,
            group_size: 64,
            seed: 1,
            max_shard_bytes: synth::SHARD_BYTES,
        };
        synth::write(&spec, &model, false).unwrap();
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, "secret").unwrap();
        // A link at the temporary name older builds used (`.<name>.partial-<pid>`).
        let out = tmp.path().join("x.gguf");
        let planted = tmp.path().join(format!(".x.gguf.partial-{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        let opts = crate::export::ExportOptions {
            quant: crate::export::GgufQuant::Q8_0,
            force: false,
            check: false,
            progress: false,
        };
        crate::export::export_gguf(&model, &out, &opts, &mut |_| {}).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"secret");
        assert!(GgufFile::open(&out).is_ok());
    }
}
