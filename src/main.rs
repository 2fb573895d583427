//! The `zmoe` command line. `anyhow` lives only here; the library returns typed errors.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use zmoe::bench::{BenchOptions, BenchReport, RunPhase, run_bench_with};
use zmoe::chat::Message;
use zmoe::checkpoint::synth::{self, SynthQuant, SynthSpec};
use zmoe::generate::{GenerateOptions, GenerateStats, generate};
use zmoe::plan::lower::PackKernel;
use zmoe::plan::patterns::{Selection, describe, patched_plan};
use zmoe::sample::SamplingParams;
use zmoe::tokenizer::{self, StreamDecoder};
use zmoe::validate::{ValidateOptions, ValidateReport, validate_model_ctx};
use zmoe::{BackendKind, Model};

#[derive(Parser)]
#[command(
    name = "zmoe",
    version,
    about = "Fast, token-faithful Mixture-of-Experts decode",
    long_about = None,
    after_help = EXIT_STATUS
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// `zmoe serve --help`'s closing notes.
const SERVE_HELP: &str = "Examples:
  zmoe serve --model DIR --port 8080
  curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{\"model\": \"NAME\", \"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}'

Parameters: messages, prompt (text or token ids), max_tokens / max_completion_tokens,
temperature (default 1), top_p, seed, stop (strings and token id arrays), n = 1, stream,
stream_options.include_usage, logprobs / top_logprobs, user; extensions: top_k, ignore_eos.
/health and /metrics (Prometheus text) need no API key.";

/// The exit statuses, for `zmoe --help` (and the README).
const EXIT_STATUS: &str = "Exit status:
  0  success
  1  error: bad input (model folder, config.json, flags), I/O, non-finite (NaN/inf) output
  2  command-line usage error (unknown flag, missing or malformed value)
  3  fidelity FAIL (validate, matrix run): the patched plan's tokens differ from the
     reference plan's, or a plan's output was not finite";

#[derive(Subcommand)]
enum Cmd {
    /// Synthesise (or reuse) a tiny model in the cache folder and generate from it.
    Demo {
        /// Device: auto (best available), cpu or cuda.
        #[arg(long, default_value = "auto")]
        backend: BackendKind,
        /// Tokens to generate.
        #[arg(long, default_value_t = 48, value_parser = zmoe::args::count, allow_negative_numbers = true)]
        max_tokens: usize,
    },
    /// Write a synthetic model folder (config.json, safetensors, tokenizer.json).
    Synth {
        /// Model family: qwen3_moe, glm4_moe_lite, deepseek_v3, lfm2_moe, gpt_oss.
        #[arg(long, default_value = "qwen3_moe")]
        family: String,
        /// Shape preset: tiny, qwen3-30b-a3b (qwen3_moe); glm-tiny, glm-tiny-l512, glm-4.7-flash
        /// (glm4_moe_lite); deepseek-tiny, kimi-k2-tiny (deepseek_v3); lfm2-tiny, lfm2-8b-a1b,
        /// lfm2-24b-a2b (lfm2_moe); gpt-oss-tiny, gpt-oss-20b (gpt_oss).
        #[arg(long, default_value = "tiny")]
        preset: String,
        /// Weight format: bf16, affine4, affine8, mxfp4 (gpt_oss: the openai release layout).
        #[arg(long, default_value = "affine4")]
        quant: String,
        /// Quantization group size (affine): 32, 64 or 128.
        #[arg(long, default_value_t = 64, value_parser = zmoe::args::count, allow_negative_numbers = true)]
        group_size: usize,
        /// RNG seed for the weights.
        #[arg(long, default_value_t = 0, value_parser = zmoe::args::seed, allow_negative_numbers = true)]
        seed: u64,
        /// Output folder (must not exist or be empty).
        #[arg(long)]
        out: PathBuf,
        /// Replace a folder at --out that zmoe synth wrote (it carries a .zmoe-synth marker and
        /// nothing else); any other folder is never replaced.
        #[arg(long)]
        force: bool,
        /// Largest safetensors shard in MiB (bigger models get an index + shards).
        #[arg(long, default_value_t = 4096, value_parser = zmoe::args::count, allow_negative_numbers = true)]
        max_shard_mb: usize,
        /// Write no weights, only their recipe (model.zmoe-synth.json beside config.json and the
        /// tokenizer): zmoe generates the same weights in memory each time it opens the folder
        /// (seconds of CPU instead of gigabytes on disk; other engines cannot read it).
        #[arg(long)]
        generated: bool,
    },
    /// Generate text (streamed) from a prompt.
    Generate {
        #[command(flatten)]
        run: RunArgs,
        /// Prompt text (needs tokenizer.json in the model folder); `-` reads it from stdin.
        #[arg(
            long,
            conflicts_with_all = ["prompt_tokens", "prompt_file"],
            required_unless_present_any = ["prompt_tokens", "prompt_file"]
        )]
        prompt: Option<String>,
        /// Read the prompt text from this file (a regular file, taken as it is).
        #[arg(long, conflicts_with = "prompt_tokens")]
        prompt_file: Option<PathBuf>,
        /// Prompt as comma-separated token ids, e.g. 1,2,3.
        #[arg(long)]
        prompt_tokens: Option<String>,
        /// Chat: render the prompt as a user message through the model's chat template
        /// (chat_template.jinja or tokenizer_config.json's chat_template), ending with the
        /// opening of the assistant's turn.
        #[arg(long, conflicts_with = "prompt_tokens")]
        chat: bool,
        /// With --chat: a system message before the user's.
        #[arg(long, requires = "chat")]
        system: Option<String>,
        /// Most tokens to generate.
        #[arg(long, default_value_t = 128, value_parser = zmoe::args::count, allow_negative_numbers = true)]
        max_tokens: usize,
        /// Sampling temperature; 0 = greedy.
        #[arg(long, default_value_t = 0.0, value_parser = zmoe::args::non_negative, allow_negative_numbers = true)]
        temperature: f32,
        /// Nucleus sampling mass (1 = off).
        #[arg(long, default_value_t = 1.0, value_parser = zmoe::args::number, allow_negative_numbers = true)]
        top_p: f32,
        /// Keep only the k most likely tokens (0 = off).
        #[arg(long, default_value_t = 0, value_parser = zmoe::args::count, allow_negative_numbers = true)]
        top_k: usize,
        /// Sampling seed.
        #[arg(long, default_value_t = 0, value_parser = zmoe::args::seed, allow_negative_numbers = true)]
        seed: u64,
        /// Do not stop at end-of-sequence tokens.
        #[arg(long)]
        ignore_eos: bool,
        /// Print {"tokens": [...], "prompt_tokens": [...]} (generated and prompt ids) instead
        /// of text.
        #[arg(long)]
        json: bool,
    },
    /// Serve the model over HTTP: an OpenAI-compatible API (POST /v1/chat/completions and
    /// /v1/completions, streaming or not; GET /v1/models, /health, /metrics) with continuous
    /// batching. A request's tokens do not depend on what else is in the batch.
    #[command(after_help = SERVE_HELP)]
    Serve {
        #[command(flatten)]
        run: RunArgs,
        /// Address to listen on (use 0.0.0.0 to accept other machines).
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Port to listen on (0: a free one, printed at start).
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Sequences decoded together, each its own KV-cache slot of --ctx tokens (CUDA: the
        /// default --ctx shrinks so that every slot fits in device memory).
        #[arg(long, default_value_t = 4, value_parser = zmoe::args::count, allow_negative_numbers = true)]
        parallel: usize,
        /// Requests that may wait for a slot; beyond that a request gets 429 with Retry-After.
        #[arg(long, default_value_t = 64, value_parser = zmoe::args::count, allow_negative_numbers = true)]
        queue: usize,
        /// Most prompt tokens run per step: a long prompt's prefill is split so running
        /// streams wait at most one chunk.
        #[arg(long, default_value_t = 256, value_parser = zmoe::args::count, allow_negative_numbers = true)]
        prefill_chunk: usize,
        /// Require `Authorization: Bearer KEY` on /v1 requests (compared in constant time).
        #[arg(long)]
        api_key: Option<String>,
        /// The model name clients send (default: the model folder's name).
        #[arg(long)]
        model_name: Option<String>,
    },
    /// Run a prefill over a token sequence and print the logits of every position.
    Forward {
        #[command(flatten)]
        run: RunArgs,
        /// Comma-separated token ids, e.g. 1,2,3.
        #[arg(long)]
        tokens: String,
        /// Print {"logits": [[...] per position]}; otherwise a summary per position.
        #[arg(long)]
        json: bool,
    },
    /// Measure prefill and decode tok/s against the device's copy-bandwidth roofline.
    ///
    /// One warm-up run, then --runs timed greedy generations (EOS ignored) of a fixed
    /// pseudo-random prompt; prints medians, bytes of weights read per decoded token,
    /// achieved GB/s and % of the copy bandwidth measured in the same run.
    Bench {
        #[command(flatten)]
        run: RunArgs,
        /// Prompt length in tokens (prefill).
        #[arg(long, default_value_t = 512, value_parser = zmoe::args::count, allow_negative_numbers = true)]
        prompt_tokens: usize,
        /// Tokens to generate per run (the first comes from prefill; at least 2).
        #[arg(long, default_value_t = 128, value_parser = zmoe::args::count, allow_negative_numbers = true)]
        gen_tokens: usize,
        /// Timed runs (the median is reported).
        #[arg(long, default_value_t = 3, value_parser = zmoe::args::count, allow_negative_numbers = true)]
        runs: usize,
        /// Untimed warm-up runs before the timed ones.
        #[arg(long, default_value_t = 1, value_parser = zmoe::args::count, allow_negative_numbers = true)]
        warmup: usize,
        /// Write the results as a JSON capsule to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Overwrite an existing --json file.
        #[arg(long)]
        force: bool,
        /// Also time every step of one decode step (CUDA) and print the time per step kind.
        #[arg(long)]
        profile: bool,
    },
    /// Show which fused patterns apply to a model's layers, and why others do not.
    Patterns {
        /// Model folder (only config.json is read, unless --exec).
        #[arg(long)]
        model: PathBuf,
        #[command(flatten)]
        patterns: PatternArgs,
        /// Also print, step by step, the prefill and decode plans the CUDA backend runs for
        /// the patched plan (fused steps it runs as their parts, kernel-pack kernels); loads
        /// the weights (their formats decide), needs no GPU.
        #[arg(long)]
        exec: bool,
        /// With --exec: the kernel pack to apply (default: none).
        #[arg(long, requires = "exec")]
        pack: Option<PathBuf>,
    },
    /// Check that the patched plan generates exactly the reference plan's tokens, and how much
    /// faster it decodes (one model load, both plans, greedy, EOS ignored).
    ///
    /// Prints `FIDELITY: m/n tokens identical [PASS|FAIL]` and a speed table; exits non-zero
    /// on FAIL.
    Validate {
        #[command(flatten)]
        run: RunArgs,
        /// Tokens generated and compared per run.
        #[arg(long, default_value_t = 200, value_parser = zmoe::args::count, allow_negative_numbers = true)]
        max_tokens: usize,
        /// Timed runs per plan (the median is reported).
        #[arg(long, default_value_t = 3, value_parser = zmoe::args::count, allow_negative_numbers = true)]
        runs: usize,
        /// Untimed warm-up runs per plan.
        #[arg(long, default_value_t = 1, value_parser = zmoe::args::count, allow_negative_numbers = true)]
        warmup: usize,
        /// Prompt text (needs tokenizer.json); default: a fixed pseudo-random prompt.
        #[arg(long, conflicts_with = "prompt_tokens")]
        prompt: Option<String>,
        /// Prompt as comma-separated token ids.
        #[arg(long)]
        prompt_tokens: Option<String>,
        /// Length of the default pseudo-random prompt.
        #[arg(long, default_value_t = 64, value_parser = zmoe::args::count, allow_negative_numbers = true)]
        prompt_len: usize,
        /// Write a repro capsule (JSON) to this file.
        #[arg(long)]
        capsule: Option<PathBuf>,
        /// Overwrite an existing --capsule file.
        #[arg(long)]
        force: bool,
    },
    /// Print bench / validate capsules as tables.
    Report {
        /// Capsule files (from `zmoe bench --json` or `zmoe validate --capsule`).
        #[arg(required = true)]
        capsules: Vec<PathBuf>,
    },
    /// The benchmark ledger (bench/matrix.jsonl): run and record validations, list what can
    /// run (catalog), and the history, report, diff, csv and html views.
    Matrix {
        #[command(subcommand)]
        cmd: zmoe::matrix::cli::MatrixCmd,
    },
    /// The kernel foundry: search kernel variants (templates × knobs), measure them honestly
    /// (list, run, report, compare), and promote winners into a per-GPU kernel pack.
    Foundry {
        #[command(subcommand)]
        cmd: zmoe::foundry::cli::FoundryCmd,
    },
    /// Write a zmoe model in another engine's format (GGUF for llama.cpp).
    Export {
        #[command(subcommand)]
        cmd: ExportCmd,
    },
}

/// Options shared by every command that runs a model.
#[derive(clap::Args)]
struct RunArgs {
    /// Model folder (config.json + safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Device: auto (best available), cpu or cuda.
    #[arg(long, default_value = "auto")]
    backend: BackendKind,
    #[command(flatten)]
    patterns: PatternArgs,
    /// CUDA: launch decode kernels one by one instead of replaying a captured graph.
    #[arg(long)]
    eager: bool,
    /// MLA models, CPU only: run attention in transformers' expanded form (every cached
    /// latent expanded to per-head K/V each step) instead of the absorbed reference form.
    #[arg(long)]
    mla_expanded: bool,
    /// Context length in tokens (KV-cache capacity; generation stops there with finish reason
    /// `length`). Default: the model's max_position_embeddings; on CUDA at most 8192 and what
    /// fits in free device memory.
    #[arg(long, value_parser = zmoe::args::count, allow_negative_numbers = true)]
    ctx: Option<usize>,
    /// CPU only (generate, forward, bench): split the routed experts over N simulated
    /// expert-parallel ranks, contiguous blocks of experts each, partials combined in slot
    /// order (bit-identical to one rank). Multi-GPU expert parallelism is not built.
    #[arg(long, value_parser = zmoe::args::count, allow_negative_numbers = true)]
    ranks: Option<usize>,
}

/// Which fused patterns to apply (default: the family's policy; see `zmoe patterns`).
#[derive(clap::Args)]
struct PatternArgs {
    /// Patterns to apply, comma-separated (moe_mlp, swiglu_mlp, norm_qkv, qkv_proj,
    /// qk_norm_rope, residual_norm, shared_expert, conv_mixer), or `none` for the reference
    /// plan. Default: the family's defaults.
    #[arg(long)]
    patterns: Option<String>,
    /// Patterns to leave out, comma-separated.
    #[arg(long)]
    exclude: Option<String>,
}

impl PatternArgs {
    fn selection(&self) -> Result<Selection> {
        Ok(Selection::parse(self.patterns.as_deref(), self.exclude.as_deref())?)
    }
}

impl RunArgs {
    /// The model and the plan the flags choose.
    fn model_and_plan(&self) -> Result<(Model, zmoe::plan::Plan)> {
        let sel = self.patterns.selection()?;
        let model = load_model(&self.model)?;
        let (mut plan, _) = patched_plan(model.config(), &sel);
        if self.mla_expanded {
            if model.config().mla.is_none() {
                bail!("--mla-expanded: {} has no MLA attention", self.model.display());
            }
            plan = plan.with_expanded_mla();
        }
        Ok((model, plan))
    }

    fn open(&self) -> Result<(Model, Box<dyn zmoe::Backend>)> {
        let (model, plan) = self.model_and_plan()?;
        let mut backend = model.backend_ctx(self.backend, plan, !self.eager, self.ctx)?;
        if let Some(n) = self.ranks {
            backend.set_ranks(n).with_context(|| format!("--ranks {n} on {}", self.model.display()))?;
        }
        Ok((model, backend))
    }

    /// Refuses `--ranks` for a command that does not run it (serve, validate).
    fn no_ranks(&self, cmd: &str) -> Result<()> {
        if self.ranks.is_some() {
            bail!("--ranks is not a {cmd} option: simulated expert-parallel ranks run in generate, forward and bench");
        }
        Ok(())
    }
}

/// Loads a model folder and prints the checkpoint's warnings (once, to stderr).
fn load_model(dir: &Path) -> Result<Model> {
    let model = Model::load(dir)?;
    for w in &model.checkpoint.warnings {
        eprintln!("warning: {w}");
    }
    Ok(model)
}

/// Parses `1,2,3` into token ids.
fn parse_tokens(flag: &str, s: &str) -> Result<Vec<u32>> {
    let ids: Vec<u32> = s
        .split(',')
        .map(str::trim)
        .map(|t| {
            t.parse::<u32>().with_context(|| {
                format!("{flag}: `{t}` is not a token id (expected comma-separated non-negative integers, e.g. 1,2,3)")
            })
        })
        .collect::<Result<_>>()?;
    if ids.is_empty() {
        bail!("{flag}: no token ids given");
    }
    Ok(ids)
}

/// The prompt text of `--prompt TEXT` (`-`: all of stdin) or `--prompt-file PATH`, if given.
fn prompt_text(prompt: Option<String>, file: Option<PathBuf>) -> Result<Option<String>> {
    Ok(match (prompt, file) {
        (Some(p), _) if p == "-" => {
            Some(std::io::read_to_string(std::io::stdin()).context("--prompt -: cannot read the prompt from stdin")?)
        }
        (Some(p), _) => Some(p),
        (None, Some(path)) => Some(zmoe::input::read_to_string(&path).context("--prompt-file")?),
        (None, None) => None,
    })
}

/// `user` (after an optional `system` message) rendered through the chat template of model
/// folder `dir`, opening the assistant's turn.
fn chat_prompt(dir: &Path, system: Option<String>, user: String) -> Result<String> {
    let template = zmoe::chat::ChatTemplate::load(dir).context("--chat")?;
    let mut messages: Vec<Message> = system.into_iter().map(|s| Message::new("system", s)).collect();
    messages.push(Message::new("user", user));
    Ok(template.render(&messages, true)?)
}

/// Writes to stdout; a closed pipe (e.g. `| head`) ends the program quietly.
fn emit(s: &str) {
    let mut out = std::io::stdout().lock();
    if out.write_all(s.as_bytes()).and_then(|_| out.flush()).is_err() {
        std::process::exit(0);
    }
}

fn print_stats(backend: &str, s: &GenerateStats) {
    eprintln!(
        "\n[{backend}] prefill: {} tokens in {:.3} s ({:.1} tok/s) | decode: {} tokens in {:.3} s ({:.1} tok/s){}",
        s.prompt_tokens,
        s.prefill_secs,
        s.prefill_tps(),
        s.tokens.len(),
        s.decode_secs,
        s.decode_tps(),
        if s.hit_eos {
            " | stopped at EOS".to_string()
        } else if s.context_full {
            format!(" | stopped at the end of the context ({} tokens; --ctx)", s.prompt_tokens + s.tokens.len())
        } else {
            String::new()
        }
    );
}

/// Generates from `model` and streams text (or prints ids as JSON).
fn run_generate(
    model: &Model,
    backend: &mut dyn zmoe::Backend,
    prompt: Vec<u32>,
    opts: &GenerateOptions,
    json: bool,
) -> Result<()> {
    let tok = if json { None } else { Some(tokenizer::load(&model.tokenizer_path())?) };
    let mut dec = StreamDecoder::default();
    let stats = generate(backend, &prompt, opts, |id| {
        if let Some(t) = &tok {
            emit(&dec.push(t, id));
        }
    })?;
    if let Some(t) = &tok {
        emit(&dec.finish(t));
    }
    if json {
        let v = serde_json::json!({
            "tokens": stats.tokens,
            "finish_reason": stats.finish_reason.as_str(),
            "prompt_tokens": prompt,
        });
        emit(&format!("{v}\n"));
    }
    print_stats(&backend.name(), &stats);
    Ok(())
}

/// Writes a capsule as pretty JSON; without `force` never replaces a file.
fn write_capsule(flag: &str, path: &Path, report: &impl serde::Serialize, force: bool) -> Result<()> {
    let mut text = serde_json::to_string_pretty(report).context("serialising the capsule")?;
    text.push('\n');
    Ok(zmoe::output::write_new(flag, path, text.as_bytes(), force)?)
}

/// `1536` → `1.50 KiB`.
fn human_bytes(n: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n:.0} B") } else { format!("{v:.2} {}", units[u]) }
}

/// The bench report as a table for humans.
fn bench_table(r: &BenchReport) -> String {
    let mut rows: Vec<(&str, String)> = Vec::new();
    let dev = &r.device;
    let mut device = dev.name.clone();
    if let Some(d) = &dev.driver {
        device += &format!(", driver {d}");
    }
    if let Some(m) = dev.memory_bytes {
        device += &format!(", {} memory", human_bytes(m as f64));
    }
    rows.push(("device", device));
    rows.push(("backend", r.backend.clone()));
    rows.push(("plan", if r.plan.is_empty() { "reference".into() } else { r.plan.clone() }));
    let m = &r.model;
    rows.push((
        "model",
        format!(
            "{} ({}, {} layers, {} experts top-{}, vocab {})",
            m.dir, m.family, m.num_layers, m.num_experts, m.top_k, m.vocab_size
        ),
    ));
    rows.push(("weights", m.quant_line()));
    let s = &r.settings;
    rows.push((
        "settings",
        format!(
            "prompt {} tokens, generate {} (greedy, EOS ignored), {} run{} + {} warm-up",
            s.prompt_tokens,
            s.gen_tokens,
            s.runs,
            if s.runs == 1 { "" } else { "s" },
            s.warmup
        ),
    ));
    let spread =
        |x: &zmoe::bench::Spread| format!("{:>10.1} tok/s   (median; min {:.1}, max {:.1})", x.median, x.min, x.max);
    rows.push(("prefill", spread(&r.prefill_tok_s)));
    if r.ttft_ms.median.is_finite() {
        let t = &r.ttft_ms;
        rows.push((
            "first token",
            format!(
                "{:>10.1} ms      (median; min {:.1}, max {:.1}: prompt forward + first sample)",
                t.median, t.min, t.max
            ),
        ));
    }
    rows.push(("decode", spread(&r.decode_tok_s)));
    rows.push((
        "peak memory",
        r.peak_memory_bytes.map_or("not tracked by this backend".into(), |b| human_bytes(b as f64)),
    ));
    rows.push((
        "bytes/token",
        format!(
            "{} ({} B of weights read per decoded token)",
            human_bytes(r.bytes_per_token as f64),
            r.bytes_per_token
        ),
    ));
    rows.push(("copy", format!("{:>10.2} GB/s   (read + write, measured in this run: the roofline)", r.copy_gb_s)));
    rows.push(("achieved", format!("{:>10.3} GB/s   (bytes/token × median decode tok/s)", r.achieved_gb_s)));
    rows.push((
        "roofline",
        format!("{:>10.2} %      (of copy bandwidth; roofline decode {:.1} tok/s)", r.roofline_pct, r.roofline_tok_s),
    ));
    if !r.identical_tokens {
        rows.push(("warning", "runs generated different tokens (greedy decode is not deterministic)".into()));
    }
    rows.push(("zmoe", r.provenance.line()));
    let mut out: String = rows.iter().map(|(k, v)| format!("{k:<12} {v}\n")).collect();
    if !r.profile.is_empty() {
        let total: f64 = r.profile.iter().map(|s| s.us).sum();
        out += &format!(
            "\nprofile of one decode step at context {} ({} steps, {:.1} µs in the profiled graph; \
             a plain graph step takes {:.1} µs at the median decode speed):\n",
            r.settings.prompt_tokens,
            r.profile.len(),
            total,
            1e6 / r.decode_tok_s.median
        );
        out += &format!(
            "  {:<28} {:>6} {:>10} {:>7} {:>9} {:>10} {:>8}\n",
            "step kind", "steps", "µs/token", "%", "µs/step", "MB/step", "GB/s"
        );
        for k in zmoe::bench::profile_by_kind(&r.profile) {
            let pct = k.us / total * 100.0;
            let mb = k.bytes as f64 / k.steps.max(1) as f64 / 1e6;
            out += &format!(
                "  {:<28} {:>6} {:>10.1} {:>6.1}% {:>9.2} {mb:>10.3} {:>8.0}\n",
                k.kind,
                k.steps,
                k.us,
                pct,
                k.us_per_step(),
                k.gb_s()
            );
        }
    }
    if !r.prefill_profile.is_empty() {
        let total: f64 = r.prefill_profile.iter().map(|s| s.us).sum();
        let chunk = r.settings.prompt_tokens.min(zmoe::cuda::CHUNK);
        out += &format!(
            "\nprofile of the first prompt chunk ({chunk} tokens, {} steps, {:.1} µs eager = {:.0} tok/s):\n",
            r.prefill_profile.len(),
            total,
            chunk as f64 / total * 1e6
        );
        out += &format!(
            "  {:<28} {:>6} {:>10} {:>7} {:>9} {:>10} {:>8}\n",
            "step kind", "steps", "µs/chunk", "%", "µs/step", "GFLOP/step", "TFLOP/s"
        );
        for k in zmoe::bench::profile_by_kind(&r.prefill_profile) {
            out += &format!(
                "  {:<28} {:>6} {:>10.1} {:>6.1}% {:>9.2} {:>10.2} {:>8.1}\n",
                k.kind,
                k.steps,
                k.us,
                k.us / total * 100.0,
                k.us_per_step(),
                k.flops / k.steps.max(1) as f64 / 1e9,
                k.tflop_s()
            );
        }
    }
    out
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Demo { backend, max_tokens } => {
            // The tiny preset, synthesised once into the cache (as `matrix run --preset` does).
            let (_, model) = zmoe::matrix::run::load_preset(
                &zmoe::cache_dir(),
                "qwen3_moe",
                "tiny",
                SynthQuant::Affine4,
                &mut |l| eprintln!("{l}"),
            )?;
            let (plan, _) = patched_plan(model.config(), &Selection::default());
            let mut be = model.backend(backend, plan)?;
            let tok = tokenizer::load(&model.tokenizer_path())?;
            let text = "The router picks the top experts for every token";
            let prompt = tokenizer::encode(&tok, text)?;
            eprintln!("backend: {} | model: synthetic random weights, so the text is gibberish by design", be.name());
            emit(text);
            let opts = GenerateOptions {
                max_tokens,
                sampling: SamplingParams { temperature: 0.8, top_p: 0.95, top_k: 0, seed: 0 },
                ignore_eos: false,
            };
            let mut dec = StreamDecoder::default();
            let stats = generate(be.as_mut(), &prompt, &opts, |id| emit(&dec.push(&tok, id)))?;
            emit(&dec.finish(&tok));
            print_stats(&be.name(), &stats);
        }
        Cmd::Synth { family, preset, quant, group_size, seed, out, force, max_shard_mb, generated } => {
            let quant_kind = SynthQuant::parse(&quant)?;
            let spec =
                SynthSpec { family, preset, quant: quant_kind, group_size, seed, max_shard_bytes: max_shard_mb << 20 };
            let weights = if generated { synth::Weights::Generated } else { synth::Weights::Files };
            synth::write_as(&spec, &out, force, weights)?;
            let how = if generated { ", weights generated when loaded" } else { "" };
            eprintln!("wrote {} ({}/{}, {quant}, seed {seed}{how})", out.display(), spec.family, spec.preset);
        }
        Cmd::Generate {
            run,
            prompt,
            prompt_file,
            prompt_tokens,
            chat,
            system,
            max_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            ignore_eos,
            json,
        } => {
            let sampling = SamplingParams { temperature, top_p, top_k, seed };
            sampling.check()?;
            // The prompt text and the chat template before the weights: their errors come first.
            let text = prompt_text(prompt, prompt_file)?;
            let text = match (text, chat) {
                (Some(user), true) => Some(chat_prompt(&run.model, system, user)?),
                (text, _) => text,
            };
            let (model, mut be) = run.open()?;
            let ids = match (text, prompt_tokens) {
                (_, Some(t)) => parse_tokens("--prompt-tokens", &t)?,
                // No special tokens are added: a chat template writes its own BOS.
                (Some(p), None) => tokenizer::encode(&tokenizer::load(&model.tokenizer_path())?, &p)?,
                (None, None) => bail!("give --prompt TEXT, --prompt-file PATH or --prompt-tokens 1,2,3"),
            };
            let opts = GenerateOptions { max_tokens, sampling, ignore_eos };
            run_generate(&model, be.as_mut(), ids, &opts, json)?;
        }
        Cmd::Serve { run, host, port, parallel, queue, prefill_chunk, api_key, model_name } => {
            run.no_ranks("serve")?;
            let (model, plan) = run.model_and_plan()?;
            let opts = zmoe::serve::ServeOptions { host, port, parallel, queue, prefill_chunk, api_key, model_name };
            zmoe::serve::serve(model, run.backend, plan, !run.eager, run.ctx, opts)?;
        }
        Cmd::Forward { run, tokens, json } => {
            let ids = parse_tokens("--tokens", &tokens)?;
            let (model, mut be) = run.open()?;
            if ids.len() > be.max_context() {
                bail!("--tokens: {} tokens exceed the context of {} tokens (--ctx)", ids.len(), be.max_context());
            }
            let logits = be.forward(&ids, true)?;
            let v = model.config().vocab_size;
            if json {
                let rows: Vec<&[f32]> = logits.chunks_exact(v).collect();
                emit(&format!("{}\n", serde_json::json!({ "logits": rows })));
            } else {
                for (p, row) in logits.chunks_exact(v).enumerate() {
                    let best = zmoe::sample::argmax(row);
                    emit(&format!("position {p}: token {} -> argmax {best} (logit {:.4})\n", ids[p], row[best]));
                }
            }
        }
        Cmd::Bench { run, prompt_tokens, gen_tokens, runs, warmup, json, force, profile } => {
            let opts = BenchOptions { prompt_tokens, gen_tokens, runs, warmup, seed: 0, profile };
            opts.validate(None)?;
            if let Some(path) = &json {
                zmoe::output::check_out_path("--json", path, force)?;
            }
            // config.json first: a context-length error should not wait for the weights.
            // (If it does not load, Model::load below says why, naming the folder.)
            if let Ok(cfg) = zmoe::config::ModelConfig::load(&run.model) {
                opts.validate(Some(&cfg))?;
            }
            let (model, mut be) = run.open()?;
            eprintln!(
                "bench: {} on {} — prompt {prompt_tokens}, generate {gen_tokens}, {warmup} warm-up + {runs} timed",
                model.checkpoint.dir.display(),
                be.name()
            );
            let report = run_bench_with(&model, be.as_mut(), &opts, &mut |phase, r| {
                let label = match phase {
                    RunPhase::Warmup(i, n) => format!("warm-up {}/{n}", i + 1),
                    RunPhase::Timed(i, n) => format!("run {}/{n}", i + 1),
                };
                eprintln!(
                    "  {label}: prefill {:.1} tok/s ({:.3} s), decode {:.1} tok/s ({:.3} s)",
                    r.prefill_tok_s, r.prefill_secs, r.decode_tok_s, r.decode_secs
                );
            })?;
            emit(&bench_table(&report));
            if let Some(path) = &json {
                write_capsule("--json", path, &report, force)?;
                eprintln!("wrote {}", path.display());
            }
        }
        Cmd::Patterns { model, patterns, exec, pack } => {
            let cfg = zmoe::config::ModelConfig::load(&model)?;
            let sel = patterns.selection()?;
            emit(&describe(&cfg, &sel));
            if exec {
                let m = Model::load(&model)?;
                let kernels = match &pack {
                    Some(p) => {
                        let pack = zmoe::kernels::pack::KernelPack::load(p)?;
                        pack.warnings().iter().for_each(|w| eprintln!("warning: {}: {w}", p.display()));
                        PackKernel::from_pack(&pack)
                    }
                    None => Vec::new(),
                };
                let exec = zmoe::plan::lower::cuda(&patched_plan(m.config(), &sel).0, &m.weights, &kernels)?;
                emit(&format!("\nCUDA prefill plan ({} steps):\n{}", exec.prefill.steps.len(), exec.prefill.listing()));
                emit(&format!("\nCUDA batch plan ({} steps):\n{}", exec.batch.steps.len(), exec.batch.listing()));
                emit(&format!("\nCUDA decode plan ({} steps):\n{}", exec.decode.steps.len(), exec.decode.listing()));
            }
        }
        Cmd::Validate { run, max_tokens, runs, warmup, prompt, prompt_tokens, prompt_len, capsule, force } => {
            if let Some(path) = &capsule {
                zmoe::output::check_out_path("--capsule", path, force)?;
            }
            run.no_ranks("validate")?;
            let sel = run.patterns.selection()?;
            if run.mla_expanded {
                bail!("--mla-expanded is not a validate option: validate compares the reference and patched plans");
            }
            let model = load_model(&run.model)?;
            let cfg = model.config();
            let prompt = match (prompt, prompt_tokens) {
                (Some(text), _) => tokenizer::encode(&tokenizer::load(&model.tokenizer_path())?, &text)?,
                (None, Some(ids)) => parse_tokens("--prompt-tokens", &ids)?,
                (None, None) => zmoe::bench::bench_prompt(cfg, prompt_len, 1),
            };
            let opts = ValidateOptions { prompt, max_tokens, runs, warmup };
            let report =
                validate_model_ctx(&model, run.backend, !run.eager, run.ctx, &sel, &opts, &mut |l| eprintln!("{l}"))?;
            emit(&validate_table(&report));
            if let Some(path) = &capsule {
                write_capsule("--capsule", path, &report, force)?;
                eprintln!("wrote {}", path.display());
            }
            if !report.fidelity.passed() {
                let why = match &report.fidelity.non_finite {
                    Some(e) => format!("non-finite output ({e})"),
                    None => "the patched plan's tokens differ from the reference plan's".into(),
                };
                return Err(zmoe::Error::Fidelity(format!("fidelity FAIL: {why}")).into());
            }
        }
        Cmd::Report { capsules } => {
            for (i, path) in capsules.iter().enumerate() {
                let text = zmoe::input::read_to_string(path)?;
                let v: serde_json::Value =
                    serde_json::from_str(&text).with_context(|| format!("{}: not a JSON capsule", path.display()))?;
                let table = match v.get("kind").and_then(|k| k.as_str()) {
                    Some(zmoe::bench::CAPSULE_KIND) => bench_table(
                        &serde_json::from_value(v)
                            .with_context(|| format!("{}: malformed bench capsule", path.display()))?,
                    ),
                    Some(zmoe::validate::CAPSULE_KIND) => validate_table(
                        &serde_json::from_value(v)
                            .with_context(|| format!("{}: malformed validate capsule", path.display()))?,
                    ),
                    other => bail!(
                        "{}: unknown capsule kind {other:?} (expected zmoe-bench or zmoe-validate)",
                        path.display()
                    ),
                };
                emit(&format!("{}== {} ==\n{table}", if i > 0 { "\n" } else { "" }, path.display()));
            }
        }
        Cmd::Matrix { cmd } => run_matrix(&cmd)?,
        Cmd::Foundry { cmd } => zmoe::foundry::cli::execute_with(&cmd, &mut emit, &mut |l| eprintln!("{l}"))?,
        Cmd::Export { cmd } => run_export(cmd)?,
    }
    Ok(())
}

/// The validate result as text: the fidelity line, then reference vs patched.
fn validate_table(r: &ValidateReport) -> String {
    let mut out = format!("{}\n\n", r.fidelity.line());
    out += &format!(
        "{} on {} ({}), {} prompt tokens, {} generated, {} runs\n",
        r.model.dir,
        r.device.name,
        r.backend,
        r.settings.prompt.len(),
        r.settings.max_tokens,
        r.settings.runs
    );
    let pats: Vec<String> = r.patterns_applied.iter().map(|(p, n)| format!("{p} ×{n}")).collect();
    out += &format!("patterns: {} ({} primitive steps fused)\n\n", pats.join(", "), r.steps_replaced);
    out += &format!(
        "{:<10} {:>6} {:>14} {:>14} {:>12} {:>10} {:>10}\n",
        "plan", "steps", "prefill tok/s", "decode tok/s", "peak memory", "GB/s", "roofline"
    );
    for (label, p) in [("reference", &r.reference), ("patched", &r.patched)] {
        out += &format!(
            "{label:<10} {:>6} {:>14.1} {:>14.1} {:>12} {:>10.1} {:>9.2}%\n",
            p.steps,
            p.prefill_tok_s.median,
            p.decode_tok_s.median,
            p.peak_memory_bytes.map_or("n/a".into(), |b| human_bytes(b as f64)),
            p.achieved_gb_s,
            p.roofline_pct
        );
    }
    out += &format!(
        "\ndecode speedup {:.3}x, prefill speedup {:.3}x (medians; copy bandwidth {:.1} GB/s, {} B/token)\n",
        r.decode_speedup, r.prefill_speedup, r.copy_gb_s, r.bytes_per_token
    );
    for (label, p) in [("reference", &r.reference), ("patched", &r.patched)] {
        if !p.deterministic {
            out += &format!("warning: the {label} plan's runs generated different tokens\n");
        }
    }
    out += &format!("zmoe {}\n", r.provenance.line());
    out
}

// ---- zmoe matrix: the benchmark ledger (the handlers live in zmoe::matrix::cli) ----

/// Runs a `matrix` subcommand: output to stdout and warnings to stderr, as they come.
fn run_matrix(cmd: &zmoe::matrix::cli::MatrixCmd) -> Result<()> {
    zmoe::matrix::cli::execute_with(cmd, &mut emit, &mut |line| eprintln!("{line}"))?;
    Ok(())
}

// ---- end of zmoe matrix ----

// ---- zmoe export: other engines' formats (the exporter lives in zmoe::export) ----

/// `zmoe export <format>`.
#[derive(Subcommand)]
enum ExportCmd {
    /// GGUF for llama.cpp (`qwen3moe`, `lfm2moe`, `gpt-oss`; GLM / DeepSeek / Kimi as
    /// `deepseek2`): matrices re-quantized to Q4_0, Q8_0 or BF16 (GPT-OSS experts: MXFP4, an
    /// MXFP4 source carried over exactly), norms and router f32, no vocabulary
    /// (`tokenizer.ggml.model = none`; enough for llama-bench, not for text).
    Gguf {
        /// Model folder (config.json + safetensors).
        #[arg(long)]
        model: PathBuf,
        /// Matrix format: q4_0, q8_0 or bf16.
        #[arg(long)]
        quant: String,
        /// Output .gguf file (must not exist unless --force).
        #[arg(long)]
        out: PathBuf,
        /// Overwrite an existing --out file.
        #[arg(long)]
        force: bool,
        /// Also compare sampled rows of every tensor in the written file with the source.
        #[arg(long)]
        check: bool,
    },
}

fn run_export(cmd: ExportCmd) -> Result<()> {
    let ExportCmd::Gguf { model, quant, out, force, check } = cmd;
    let opts =
        zmoe::export::ExportOptions { quant: zmoe::export::GgufQuant::parse(&quant)?, force, check, progress: true };
    let s = zmoe::export::export_gguf(&model, &out, &opts, &mut |w| eprintln!("warning: {w}"))?;
    let checked = if s.checked_rows > 0 { format!(", {} sampled rows checked", s.checked_rows) } else { String::new() };
    let params = if s.params >= 1_000_000_000 {
        format!("{:.2} B", s.params as f64 / 1e9)
    } else {
        format!("{:.1} M", s.params as f64 / 1e6)
    };
    eprintln!(
        "wrote {} ({} {}, {} tensors, {params} params, {}) in {:.1} s{checked}",
        s.out.display(),
        s.arch,
        s.quant.name(),
        s.tensors,
        human_bytes(s.bytes as f64),
        s.secs
    );
    Ok(())
}

// ---- end of zmoe export ----

/// The error and its causes joined with `: `, each cause only if its text is not already in
/// what comes before it: a library [`zmoe::Error::Io`] prints its OS message itself and also
/// hands it on as its source, and an anyhow context may quote its cause, so `{:#}` would
/// print the same OS message twice.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if text.is_empty() {
            text = s;
        } else if !text.contains(&s) {
            text += ": ";
            text += &s;
        }
    }
    text
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            // 3: fidelity FAIL (see EXIT_STATUS); every other error 1.
            match e.downcast_ref::<zmoe::Error>() {
                Some(zmoe::Error::Fidelity(_)) => ExitCode::from(3),
                _ => ExitCode::FAILURE,
            }
        }
    }
}
