//! `zmoe bench`: prefill and decode throughput against the memory-bandwidth roofline.
//!
//! Decode of a MoE model is memory-bound: every token reads the attention weights, the
//! router, the `top_k` chosen experts of each layer and the output head once
//! ([`Weights::bytes_per_token`](crate::model::Weights::bytes_per_token)). So the honest
//! yardstick for a decode speed is the device's copy bandwidth, measured in the same run:
//! `achieved GB/s = bytes/token × decode tok/s`, and `% of roofline = achieved / copy`.
//!
//! A bench is one warm-up generation (not counted) and then `runs` timed generations of
//! the same deterministic pseudo-random prompt, greedy and ignoring EOS so that every run
//! decodes exactly `gen_tokens` tokens. The result, [`BenchReport`], is serialisable: the
//! CLI writes it as a JSON *capsule* (`zmoe bench --json FILE`) for the benchmark ledger.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, DeviceInfo, StepTime};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::generate::{GenerateOptions, GenerateStats, generate};
use crate::model::{Attn, Ffn, Mlp, Weights};
use crate::plan::{AttnOp, MoeOp, Step};
use crate::rng::Rng;
use crate::runtime::Model;
use crate::sample::SamplingParams;

/// The `kind` field of every bench capsule.
pub const CAPSULE_KIND: &str = "zmoe-bench";
/// Version of the capsule layout; bumped when fields change meaning or disappear.
pub const CAPSULE_VERSION: u32 = 1;

/// What to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BenchOptions {
    /// Prompt length (prefill tokens).
    pub prompt_tokens: usize,
    /// Tokens generated per run (the first comes from prefill, so `gen_tokens - 1` are decoded).
    pub gen_tokens: usize,
    /// Timed runs.
    pub runs: usize,
    /// Untimed warm-up runs before them.
    pub warmup: usize,
    /// Seed of the pseudo-random prompt.
    pub seed: u64,
    /// After the runs, time each step of one decode step at context `prompt_tokens`.
    #[serde(default)]
    pub profile: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions { prompt_tokens: 512, gen_tokens: 128, runs: 3, warmup: 1, seed: 0, profile: false }
    }
}

impl BenchOptions {
    /// Checks the settings against each other and (if given) the model's context length.
    /// Messages name the CLI flags, which map one-to-one onto these fields.
    pub fn validate(&self, cfg: Option<&ModelConfig>) -> Result<()> {
        if self.runs < 1 {
            return Err(Error::Arg(format!("--runs must be at least 1, got {}", self.runs)));
        }
        if self.gen_tokens < 2 {
            return Err(Error::Arg(format!(
                "--gen-tokens must be at least 2 (the first token comes from prefill, so decode needs a second), got {}",
                self.gen_tokens
            )));
        }
        if self.prompt_tokens < 1 {
            return Err(Error::Arg(format!("--prompt-tokens must be at least 1, got {}", self.prompt_tokens)));
        }
        if let Some(cfg) = cfg {
            // The last generated token is never fed back, so the cache holds prompt + gen - 1;
            // the bound below is the simpler, slightly stricter one users expect.
            let total = self.prompt_tokens.saturating_add(self.gen_tokens);
            if total > cfg.max_position_embeddings {
                return Err(Error::Arg(format!(
                    "--prompt-tokens {} + --gen-tokens {} = {total} exceeds the model's max_position_embeddings {}",
                    self.prompt_tokens, self.gen_tokens, cfg.max_position_embeddings
                )));
            }
            let eos: std::collections::BTreeSet<u32> =
                cfg.eos_token_ids.iter().copied().filter(|&e| (e as usize) < cfg.vocab_size).collect();
            if eos.len() >= cfg.vocab_size {
                return Err(Error::Arg("every token id in the vocabulary is an EOS id; cannot build a prompt".into()));
            }
        }
        Ok(())
    }
}

/// Timings of one generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// Seconds for the prompt's forward pass and the first sample.
    pub prefill_secs: f64,
    /// Prompt tokens per second.
    pub prefill_tok_s: f64,
    /// Tokens decoded one at a time (`gen_tokens - 1`).
    pub decode_tokens: usize,
    /// Seconds spent decoding them.
    pub decode_secs: f64,
    /// Decoded tokens per second.
    pub decode_tok_s: f64,
}

impl RunResult {
    pub(crate) fn from_stats(s: &GenerateStats) -> RunResult {
        RunResult {
            prefill_secs: s.prefill_secs,
            prefill_tok_s: s.prefill_tps(),
            decode_tokens: s.tokens.len().saturating_sub(1),
            decode_secs: s.decode_secs,
            decode_tok_s: s.decode_tps(),
        }
    }
}

/// Median, minimum and maximum of a per-run number.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    /// Median over the timed runs (mean of the middle two for an even count).
    #[serde(with = "crate::jsonl::nan_as_null")]
    pub median: f64,
    /// Smallest.
    #[serde(with = "crate::jsonl::nan_as_null")]
    pub min: f64,
    /// Largest.
    #[serde(with = "crate::jsonl::nan_as_null")]
    pub max: f64,
}

impl Spread {
    /// No value (a field an older capsule lacks).
    pub fn missing() -> Spread {
        Spread { median: f64::NAN, min: f64::NAN, max: f64::NAN }
    }

    /// Spread of `xs` (NaN everywhere when empty).
    pub fn of(xs: &[f64]) -> Spread {
        let mut v = xs.to_vec();
        let median = median(&mut v);
        Spread { median, min: v.first().copied().unwrap_or(f64::NAN), max: v.last().copied().unwrap_or(f64::NAN) }
    }
}

/// The model as a capsule records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSummary {
    /// The model folder, as given.
    pub dir: String,
    /// `model_type`, e.g. `qwen3_moe`.
    pub family: String,
    /// Decoder layers.
    pub num_layers: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// Routed experts per MoE layer.
    pub num_experts: usize,
    /// Experts chosen per token.
    pub top_k: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Storage format per weight role (`attention`, `experts`, `router`, `dense_mlp`,
    /// `embed`, `lm_head`), e.g. `affine4g64`; several formats are joined with `+`.
    pub quant: BTreeMap<String, String>,
}

impl ModelSummary {
    /// Summarises a loaded model.
    pub fn of(model: &Model) -> ModelSummary {
        let cfg = model.config();
        ModelSummary {
            dir: model.checkpoint.dir.display().to_string(),
            family: cfg.family.model_type().into(),
            num_layers: cfg.num_layers,
            hidden_size: cfg.hidden_size,
            num_experts: cfg.num_experts,
            top_k: cfg.top_k,
            vocab_size: cfg.vocab_size,
            quant: quant_formats(&model.weights),
        }
    }

    /// One line for humans: `attention affine4g64, experts affine4g64, …`.
    pub fn quant_line(&self) -> String {
        let order = ["attention", "experts", "router", "dense_mlp", "embed", "lm_head"];
        let mut parts: Vec<String> =
            order.iter().filter_map(|k| self.quant.get(*k).map(|v| format!("{k} {v}"))).collect();
        parts.extend(self.quant.iter().filter(|(k, _)| !order.contains(&k.as_str())).map(|(k, v)| format!("{k} {v}")));
        parts.join(", ")
    }
}

/// The distinct storage formats of each weight role.
fn quant_formats(w: &Weights) -> BTreeMap<String, String> {
    let mut roles: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut add = |role: &'static str, f: String| {
        let v = roles.entry(role).or_default();
        if !v.contains(&f) {
            v.push(f);
        }
    };
    add("embed", w.embed.format_name());
    add("lm_head", w.lm_head.w.format_name());
    for layer in &w.layers {
        add("attention", layer.o.w.format_name());
        match &layer.attn {
            Attn::Gqa { q, k, v, .. } | Attn::Sink { q, k, v, .. } => {
                [q, k, v].iter().for_each(|l| add("attention", l.w.format_name()))
            }
            Attn::Mla(m) => {
                for l in m.q_a.iter().chain([&m.q, &m.kv_a]) {
                    add("attention", l.w.format_name());
                }
                for x in m.embed_q.iter().chain(&m.unembed_out) {
                    add("mla_heads", x.format_name());
                }
            }
            Attn::Conv(cv) => add("short_conv", cv.in_proj.w.format_name()),
        }
        let ffn = |f: &Ffn| [f.gate.w.format_name(), f.up.w.format_name(), f.down.w.format_name()];
        match &layer.mlp {
            Mlp::Dense(f) => ffn(f).into_iter().for_each(|x| add("dense_mlp", x)),
            Mlp::Moe { router, experts, shared, .. } => {
                add("router", router.w.format_name());
                for m in experts.gate.iter().chain(&experts.up).chain(&experts.down) {
                    add("experts", m.format_name());
                }
                if let Some(f) = shared {
                    ffn(f).into_iter().for_each(|x| add("shared_experts", x));
                }
            }
        }
    }
    roles.into_iter().map(|(k, v)| (k.to_string(), v.join("+"))).collect()
}

/// Where a capsule came from: which zmoe, which commit, when, which command line. Shared by
/// every capsule kind (flattened into the capsule's top level).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// zmoe's crate version.
    pub zmoe_version: String,
    /// The short commit this zmoe binary was built from, embedded at build time, or `unknown`
    /// (see [`build_commit`]).
    pub git_commit: String,
    /// Whether its tree had uncommitted changes to tracked files when built (None if unknown).
    pub git_dirty: Option<bool>,
    /// When the run finished, UTC, RFC 3339 (`2025-01-31T12:00:00Z`).
    pub timestamp_utc: String,
    /// The command line that ran it.
    pub command: String,
}

impl Provenance {
    /// This process, now.
    pub fn now() -> Provenance {
        let (git_commit, git_dirty) = build_commit();
        Provenance {
            zmoe_version: env!("CARGO_PKG_VERSION").into(),
            git_commit,
            git_dirty,
            timestamp_utc: rfc3339_utc(SystemTime::now()),
            command: command_line(),
        }
    }

    /// `0.1.0 at commit abc1234 (modified), 2025-01-31T12:00:00Z`.
    pub fn line(&self) -> String {
        let dirty = if self.git_dirty == Some(true) { " (modified)" } else { "" };
        format!("{} at commit {}{dirty}, {}", self.zmoe_version, self.git_commit, self.timestamp_utc)
    }
}

/// Everything one bench measured, with enough context to compare it with another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    /// Always [`CAPSULE_KIND`].
    pub kind: String,
    /// [`CAPSULE_VERSION`] of the writer.
    pub capsule_version: u32,
    /// Which zmoe, commit, time and command line.
    #[serde(flatten)]
    pub provenance: Provenance,
    /// The model.
    pub model: ModelSummary,
    /// The backend's name, e.g. `cpu (2 threads)`.
    pub backend: String,
    /// The plan that ran: `reference` or the applied patterns joined with `+`.
    #[serde(default)]
    pub plan: String,
    /// The device.
    pub device: DeviceInfo,
    /// Peak device memory in bytes over the whole bench, if the backend tracks it.
    pub peak_memory_bytes: Option<usize>,
    /// The settings.
    pub settings: BenchOptions,
    /// Every timed run, in order.
    pub runs: Vec<RunResult>,
    /// Prefill tokens per second over the runs.
    pub prefill_tok_s: Spread,
    /// Time to first token over the runs, ms: the prompt's forward pass and the first
    /// sample (absent, as NaN, in capsules written before it was recorded).
    #[serde(default = "Spread::missing")]
    pub ttft_ms: Spread,
    /// Decode tokens per second over the runs.
    pub decode_tok_s: Spread,
    /// Whether the warm-up and every run generated the same tokens (greedy is deterministic).
    pub identical_tokens: bool,
    /// Bytes of weights read per decoded token.
    pub bytes_per_token: usize,
    /// Measured copy bandwidth, GB/s (read + write): the roofline.
    pub copy_gb_s: f64,
    /// `bytes_per_token × median decode tok/s`, GB/s.
    pub achieved_gb_s: f64,
    /// `achieved_gb_s / copy_gb_s × 100`.
    pub roofline_pct: f64,
    /// Decode tok/s if every weight byte moved at copy bandwidth: `copy GB/s / bytes per token`.
    pub roofline_tok_s: f64,
    /// With `settings.profile`: each step of one decode step, in plan order.
    #[serde(default)]
    pub profile: Vec<StepTime>,
    /// With `settings.profile`: each step of the prompt's first prefill chunk, in the order
    /// of the plan that chunk runs (bytes not counted).
    #[serde(default)]
    pub prefill_profile: Vec<StepTime>,
}

/// Bytes that one decode step's `step` reads from device memory at context `ctx`: its
/// weights (for the routed-expert ops only the `top_k` selected experts; for the embedding
/// one row) and, for attention, the layer's cache up to `ctx` (bf16). Activations are left
/// out: kilobytes at batch 1, against megabytes of weights. A fused step reads what its parts
/// read. This is the numerator of `zmoe bench --profile`'s per-step GB/s.
pub fn step_bytes(step: &Step, w: &Weights, cfg: &ModelConfig, ctx: usize) -> usize {
    let lin = |r| w.linear(r).map_or(0, |l| l.w.nbytes() + l.b.as_ref().map_or(0, |b| 4 * b.len()));
    // The selected experts' matrices of one projection, and their biases where they have them.
    type Pick = fn(&crate::model::Experts) -> (&Vec<crate::checkpoint::mat::Mat>, Option<&Vec<f32>>);
    let expert = |l: usize, pick: Pick| {
        w.experts(l).map_or(0, |e| {
            let (mats, bias) = pick(e);
            let one = mats.first().map_or(0, |m| m.nbytes()) + bias.map_or(0, |b| 4 * b.len() / mats.len().max(1));
            cfg.top_k * one
        })
    };
    match step {
        Step::Embed => w.embed.nbytes() / w.embed.rows.max(1),
        Step::RmsNorm { w: n, .. } | Step::HeadNorm { w: n, .. } => w.norm(*n).map_or(0, |v| 4 * v.len()),
        Step::Linear { w: r, .. } => lin(*r),
        Step::Add { .. } | Step::Swiglu | Step::LastRow => 0,
        Step::Attn { layer, op } => match op {
            AttnOp::Attention => 2 * cfg.num_kv_heads * (cfg.head_dim + cfg.v_head_dim) * ctx,
            AttnOp::SinkAttention => {
                let keys = cfg.window(*layer).map_or(ctx, |win| ctx.min(win));
                2 * cfg.num_kv_heads * (cfg.head_dim + cfg.v_head_dim) * keys
                    + w.sinks(*layer).map_or(0, |v| 4 * v.len())
            }
            AttnOp::MlaAttention | AttnOp::MlaAttentionExpanded => {
                2 * cfg.mla.as_ref().map_or(0, |m| m.cache_row()) * ctx
            }
            AttnOp::MlaQAbsorb => w.mla(*layer).map_or(0, |m| m.embed_q.iter().map(|x| x.nbytes()).sum()),
            AttnOp::MlaVUp => w.mla(*layer).map_or(0, |m| m.unembed_out.iter().map(|x| x.nbytes()).sum()),
            AttnOp::ShortConv => {
                w.conv(*layer).map_or(0, |c| 4 * (c.kernel.len() + c.bias.as_ref().map_or(0, Vec::len)))
            }
            AttnOp::Rope | AttnOp::KvAppend | AttnOp::MlaRope | AttnOp::LatentAppend => 0,
        },
        Step::Moe { layer, op } => match op {
            MoeOp::ExpertGateUp => {
                expert(*layer, |e| (&e.gate, e.bias.as_ref().map(|b| &b.gate)))
                    + expert(*layer, |e| (&e.up, e.bias.as_ref().map(|b| &b.up)))
            }
            MoeOp::ExpertDown => expert(*layer, |e| (&e.down, e.bias.as_ref().map(|b| &b.down))),
            MoeOp::SigmoidTopK | MoeOp::SigmoidBiasTopK => match w.layers.get(*layer).map(|l| &l.mlp) {
                Some(Mlp::Moe { correction_bias: Some(b), .. }) => 4 * b.len(),
                _ => 0,
            },
            MoeOp::RouterTopK | MoeOp::TopKSoftmax | MoeOp::SharedSwiglu | MoeOp::ClampSwiglu | MoeOp::Combine => 0,
        },
        Step::Fused { parts, .. } => parts.iter().map(|p| step_bytes(p, w, cfg, ctx)).sum(),
        Step::Packed { step, .. } => step_bytes(step, w, cfg, ctx),
    }
}

/// Floating-point operations (2 per multiply-add) of `step` over a prompt chunk of `m` rows
/// whose first row sits at position `p0`: the matrix products and attention, which is what
/// the tensor cores run; element-wise steps count 0. Attention counts each query's causal
/// keys (on average `p0 + (m + 1) / 2`, at most a sliding window). This is the numerator of
/// `zmoe bench --profile`'s per-step TFLOP/s for the prompt chunk.
pub fn step_flops(step: &Step, w: &Weights, cfg: &ModelConfig, m: usize, p0: usize) -> f64 {
    let mf = m as f64;
    let mat = |x: &crate::checkpoint::mat::Mat| 2.0 * mf * (x.rows * x.cols) as f64;
    let slots = |x: Option<&crate::checkpoint::mat::Mat>| x.map_or(0.0, |x| cfg.top_k as f64 * mat(x));
    let keys = |window: Option<usize>| {
        let avg = (p0 + m.div_ceil(2)) as f64;
        window.map_or(avg, |win| avg.min(win as f64))
    };
    let heads = cfg.num_heads as f64;
    match step {
        Step::Linear { w: r, .. } => w.linear(*r).map_or(0.0, |l| mat(&l.w)),
        Step::Attn { layer, op } => match op {
            // A layer without a sliding window (every family but GPT-OSS's sliding layers):
            // `window` is None, all causal keys.
            AttnOp::Attention | AttnOp::SinkAttention => {
                2.0 * mf * heads * keys(cfg.window(*layer)) * (cfg.head_dim + cfg.v_head_dim) as f64
            }
            AttnOp::MlaAttention | AttnOp::MlaAttentionExpanded => cfg
                .mla
                .as_ref()
                .map_or(0.0, |a| 2.0 * mf * heads * keys(None) * (a.cache_row() + a.kv_lora_rank) as f64),
            AttnOp::MlaQAbsorb => w.mla(*layer).map_or(0.0, |a| a.embed_q.iter().map(mat).sum()),
            AttnOp::MlaVUp => w.mla(*layer).map_or(0.0, |a| a.unembed_out.iter().map(mat).sum()),
            _ => 0.0,
        },
        Step::Moe { layer, op } => w.experts(*layer).map_or(0.0, |e| match op {
            MoeOp::ExpertGateUp => slots(e.gate.first()) + slots(e.up.first()),
            MoeOp::ExpertDown => slots(e.down.first()),
            _ => 0.0,
        }),
        Step::Fused { parts, .. } => parts.iter().map(|p| step_flops(p, w, cfg, m, p0)).sum(),
        Step::Packed { step, .. } => step_flops(step, w, cfg, m, p0),
        _ => 0.0,
    }
}

/// [`step_flops`] of each step of a plan run over a prompt chunk of `m` rows from position
/// 0: `m` rows up to `LastRow`, one row after it (the logits of the chunk's last token).
pub fn plan_flops(steps: &[Step], w: &Weights, cfg: &ModelConfig, m: usize) -> Vec<f64> {
    let mut rows = m;
    steps
        .iter()
        .map(|s| {
            let f = step_flops(s, w, cfg, rows, 0);
            if matches!(s, Step::LastRow) {
                rows = 1;
            }
            f
        })
        .collect()
}

/// One step kind's share of a decode profile (see [`profile_by_kind`]).
#[derive(Debug, Clone, PartialEq)]
pub struct KindTotal {
    /// [`Step::kind`], e.g. `fused moe_gate_up_swiglu`.
    pub kind: String,
    /// Steps of this kind per token (one per layer for most kinds).
    pub steps: usize,
    /// Microseconds per token, all steps of the kind.
    pub us: f64,
    /// Bytes those steps read per token ([`step_bytes`]).
    pub bytes: usize,
    /// Floating-point operations of those steps ([`step_flops`]; prompt-chunk profiles).
    pub flops: f64,
}

impl KindTotal {
    /// Microseconds per step (per layer when the kind runs once a layer).
    pub fn us_per_step(&self) -> f64 {
        self.us / self.steps.max(1) as f64
    }

    /// Achieved GB/s: bytes read ÷ time.
    pub fn gb_s(&self) -> f64 {
        if self.us > 0.0 { self.bytes as f64 / (self.us * 1e3) } else { 0.0 }
    }

    /// Achieved TFLOP/s: floating-point operations ÷ time.
    pub fn tflop_s(&self) -> f64 {
        if self.us > 0.0 { self.flops / (self.us * 1e6) } else { 0.0 }
    }
}

/// Per-kind totals of a decode profile, slowest first.
pub fn profile_by_kind(steps: &[StepTime]) -> Vec<KindTotal> {
    let mut by: BTreeMap<&str, KindTotal> = BTreeMap::new();
    for s in steps {
        let e = by.entry(&s.kind).or_insert_with(|| KindTotal {
            kind: s.kind.clone(),
            steps: 0,
            us: 0.0,
            bytes: 0,
            flops: 0.0,
        });
        e.steps += 1;
        e.us += s.us;
        e.bytes += s.bytes;
        e.flops += s.flops;
    }
    let mut v: Vec<KindTotal> = by.into_values().collect();
    v.sort_by(|a, b| b.us.total_cmp(&a.us).then(a.kind.cmp(&b.kind)));
    v
}

/// Which generation a progress callback is reporting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunPhase {
    /// Warm-up `i` (0-based) of `n`; not counted.
    Warmup(usize, usize),
    /// Timed run `i` (0-based) of `n`.
    Timed(usize, usize),
}

/// Median of `xs`, sorting it in place (total order; NaNs sort last). The mean of the middle
/// two for an even count; NaN when empty.
pub fn median(xs: &mut [f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 { xs[n / 2] } else { (xs[n / 2 - 1] + xs[n / 2]) / 2.0 }
}

/// The bench prompt: `n` pseudo-random ids in `[0, vocab)`, never an EOS id.
pub fn bench_prompt(cfg: &ModelConfig, n: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng::for_stream(seed, "zmoe-bench-prompt");
    let v = cfg.vocab_size as u64;
    let mut out = Vec::with_capacity(n);
    while out.len() < n && v > 0 {
        let id = (rng.next_u64() % v) as u32;
        if !cfg.eos_token_ids.contains(&id) {
            out.push(id);
        }
    }
    out
}

/// Runs a bench of `model` on `backend`.
pub fn run_bench(model: &Model, backend: &mut dyn Backend, opts: &BenchOptions) -> Result<BenchReport> {
    run_bench_with(model, backend, opts, &mut |_, _| {})
}

/// [`run_bench`], calling `progress` after each generation (warm-ups included).
pub fn run_bench_with(
    model: &Model,
    backend: &mut dyn Backend,
    opts: &BenchOptions,
    progress: &mut dyn FnMut(RunPhase, &RunResult),
) -> Result<BenchReport> {
    let cfg = model.config();
    opts.validate(Some(cfg))?;
    crate::generate::check_context(backend, opts.prompt_tokens, opts.gen_tokens)?;
    if opts.profile && !backend.supports_profile() {
        return Err(Error::Unavailable(format!(
            "--profile times kernels inside a CUDA graph; the {} backend has none",
            backend.name()
        )));
    }
    let prompt = bench_prompt(cfg, opts.prompt_tokens, opts.seed);
    let gen_opts =
        GenerateOptions { max_tokens: opts.gen_tokens, sampling: SamplingParams::default(), ignore_eos: true };

    let mut first_tokens: Option<Vec<u32>> = None;
    let mut identical = true;
    let mut runs = Vec::with_capacity(opts.runs);
    for i in 0..opts.warmup + opts.runs {
        let stats = generate(backend, &prompt, &gen_opts, |_| {})?;
        if stats.tokens.len() != opts.gen_tokens {
            return Err(Error::Arg(format!(
                "bench: a run generated {} tokens, expected {} (backend `{}`)",
                stats.tokens.len(),
                opts.gen_tokens,
                backend.name()
            )));
        }
        match &first_tokens {
            None => first_tokens = Some(stats.tokens.clone()),
            Some(t) => identical &= *t == stats.tokens,
        }
        let r = RunResult::from_stats(&stats);
        if i < opts.warmup {
            progress(RunPhase::Warmup(i, opts.warmup), &r);
        } else {
            progress(RunPhase::Timed(i - opts.warmup, opts.runs), &r);
            runs.push(r);
        }
    }
    backend.reset();
    let profile = if opts.profile {
        backend.forward(&prompt, false)?;
        let mut p = backend.profile_decode(5)?;
        for (t, s) in p.iter_mut().zip(&backend.exec_plans().decode.steps) {
            t.bytes = step_bytes(s, &model.weights, cfg, opts.prompt_tokens);
        }
        backend.reset();
        p
    } else {
        Vec::new()
    };
    let prefill_profile = if opts.profile {
        let mut p = backend.profile_prefill(&prompt)?;
        backend.reset();
        // The plan the chunk ran (prefill on tensor cores, else batch), to count its work.
        let plans = backend.exec_plans();
        let same = |steps: &[Step]| steps.len() == p.len() && steps.iter().zip(&p).all(|(s, t)| s.kind() == t.kind);
        if let Some(steps) = [&plans.prefill.steps, &plans.batch.steps].into_iter().find(|s| same(s)) {
            let m = opts.prompt_tokens.min(crate::cuda::CHUNK);
            for (t, f) in p.iter_mut().zip(plan_flops(steps, &model.weights, cfg, m)) {
                t.flops = f;
            }
        }
        p
    } else {
        Vec::new()
    };
    // Read the peak before the bandwidth test, whose scratch buffers are not the model's.
    let peak_memory_bytes = backend.peak_memory();
    let copy_gb_s = backend.measure_copy_bandwidth()?;

    let prefill = Spread::of(&runs.iter().map(|r| r.prefill_tok_s).collect::<Vec<_>>());
    let ttft_ms = Spread::of(&runs.iter().map(|r| r.prefill_secs * 1e3).collect::<Vec<_>>());
    let decode = Spread::of(&runs.iter().map(|r| r.decode_tok_s).collect::<Vec<_>>());
    let bytes_per_token = model.weights.bytes_per_token(cfg);
    let achieved_gb_s = bytes_per_token as f64 * decode.median / 1e9;
    Ok(BenchReport {
        kind: CAPSULE_KIND.into(),
        capsule_version: CAPSULE_VERSION,
        provenance: Provenance::now(),
        model: ModelSummary::of(model),
        backend: backend.name(),
        plan: backend.plan().name.clone(),
        device: backend.device_info(),
        peak_memory_bytes,
        settings: *opts,
        runs,
        prefill_tok_s: prefill,
        ttft_ms,
        decode_tok_s: decode,
        identical_tokens: identical,
        bytes_per_token,
        copy_gb_s,
        achieved_gb_s,
        roofline_pct: achieved_gb_s / copy_gb_s * 100.0,
        roofline_tok_s: copy_gb_s * 1e9 / bytes_per_token.max(1) as f64,
        profile,
        prefill_profile,
    })
}

/// The commit this binary was built from and whether its tree had uncommitted changes to
/// tracked files then, as `build.rs` embedded them (`("unknown", None)` when built outside a
/// git checkout). Capsules and ledger entries record this, never the git state of the folder
/// zmoe happens to run in.
pub fn build_commit() -> (String, Option<bool>) {
    let dirty = match env!("ZMOE_BUILD_DIRTY") {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    };
    (env!("ZMOE_BUILD_COMMIT").to_string(), dirty)
}

/// `std::env::args`, joined with spaces; arguments that need it are single-quoted.
fn command_line() -> String {
    std::env::args().map(|a| crate::outdir::shell_word(&a)).collect::<Vec<_>>().join(" ")
}

/// `t` as RFC 3339 UTC with whole seconds, e.g. `2023-11-14T22:13:20Z`.
pub fn rfc3339_utc(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = crate::date::civil_date(days as i64);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn median_odd_even_empty_unsorted() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&mut [7.5]), 7.5);
        assert!(median(&mut []).is_nan());
        let mut v = [5.0, f64::NAN, 1.0];
        assert_eq!(median(&mut v), 5.0, "NaN sorts last");
        let s = Spread::of(&[10.0, 30.0, 20.0]);
        assert_eq!((s.median, s.min, s.max), (20.0, 10.0, 30.0));
    }

    #[test]
    fn rfc3339() {
        let at = |s| rfc3339_utc(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(at(4_102_444_799), "2099-12-31T23:59:59Z");
        assert_eq!(at(1_709_251_199), "2024-02-29T23:59:59Z");
    }

    #[test]
    fn validate_messages() {
        let ok = BenchOptions { prompt_tokens: 4, gen_tokens: 2, runs: 1, warmup: 0, seed: 0, profile: false };
        assert!(ok.validate(None).is_ok());
        let err = |o: BenchOptions| o.validate(None).unwrap_err().to_string();
        assert!(err(BenchOptions { runs: 0, ..ok }).contains("--runs"));
        assert!(err(BenchOptions { gen_tokens: 1, ..ok }).contains("--gen-tokens"));
        assert!(err(BenchOptions { prompt_tokens: 0, ..ok }).contains("--prompt-tokens"));
    }

    fn tiny_config(vocab: usize) -> ModelConfig {
        let mut v = crate::checkpoint::synth::preset_config("qwen3_moe", "tiny").unwrap();
        v["vocab_size"] = vocab.into();
        v["eos_token_id"] = serde_json::json!([0, 1, vocab as u64 - 1]);
        ModelConfig::parse(&v.to_string(), std::path::Path::new("config.json")).unwrap()
    }

    #[test]
    fn validate_against_context_length() {
        let cfg = tiny_config(1024);
        let o = BenchOptions { prompt_tokens: cfg.max_position_embeddings - 8, gen_tokens: 8, ..Default::default() };
        assert!(o.validate(Some(&cfg)).is_ok());
        let msg = BenchOptions { gen_tokens: 9, ..o }.validate(Some(&cfg)).unwrap_err().to_string();
        assert!(msg.contains("max_position_embeddings"), "{msg}");
        let msg = BenchOptions { prompt_tokens: 1, gen_tokens: 2, ..o }.validate(Some(&tiny_config(3))).unwrap_err();
        assert!(msg.to_string().contains("EOS"), "{msg}");
    }

    #[test]
    fn prompt_is_deterministic_in_vocab_and_never_eos() {
        let cfg = tiny_config(4);
        let p = bench_prompt(&cfg, 500, 7);
        assert_eq!(p.len(), 500);
        assert!(p.iter().all(|&t| t == 2), "only id 2 is neither EOS nor out of range");
        let cfg = tiny_config(1024);
        let a = bench_prompt(&cfg, 300, 1);
        assert_eq!(a, bench_prompt(&cfg, 300, 1));
        assert_ne!(a, bench_prompt(&cfg, 300, 2));
        assert!(a.iter().all(|&t| t < 1023 && t > 1));
    }
}
