//! The `zmoe` command line. `anyhow` lives only here; the library returns typed errors.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use zmoe::bench::{BenchOptions, BenchReport, RunPhase, run_bench_with};
use zmoe::checkpoint::synth::{self, SynthQuant, SynthSpec};
use zmoe::generate::{GenerateOptions, GenerateStats, generate};
use zmoe::plan::Plan;
use zmoe::sample::SamplingParams;
use zmoe::tokenizer::{self, StreamDecoder};
use zmoe::{BackendKind, Model};

#[derive(Parser)]
#[command(name = "zmoe", version, about = "Fast, token-faithful Mixture-of-Experts decode", long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Synthesise (or reuse) a tiny model in the cache folder and generate from it.
    Demo {
        /// Device: auto (best available), cpu or cuda.
        #[arg(long, default_value = "auto")]
        backend: BackendKind,
        /// Tokens to generate.
        #[arg(long, default_value_t = 48)]
        max_tokens: usize,
    },
    /// Write a synthetic model folder (config.json, safetensors, tokenizer.json).
    Synth {
        /// Model family.
        #[arg(long, default_value = "qwen3_moe")]
        family: String,
        /// Shape preset: tiny, qwen3-30b-a3b.
        #[arg(long, default_value = "tiny")]
        preset: String,
        /// Weight format: bf16, affine4, affine8.
        #[arg(long, default_value = "affine4")]
        quant: String,
        /// Quantization group size (affine): 32, 64 or 128.
        #[arg(long, default_value_t = 64)]
        group_size: usize,
        /// RNG seed for the weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output folder (must not exist or be empty).
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing model folder at --out.
        #[arg(long)]
        force: bool,
        /// Largest safetensors shard in MiB (bigger models get an index + shards).
        #[arg(long, default_value_t = 4096)]
        max_shard_mb: usize,
    },
    /// Generate text (streamed) from a prompt.
    Generate {
        #[command(flatten)]
        run: RunArgs,
        /// Prompt text (needs tokenizer.json in the model folder).
        #[arg(long, conflicts_with = "prompt_tokens", required_unless_present = "prompt_tokens")]
        prompt: Option<String>,
        /// Prompt as comma-separated token ids, e.g. 1,2,3.
        #[arg(long)]
        prompt_tokens: Option<String>,
        /// Most tokens to generate.
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        /// Sampling temperature; 0 = greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Nucleus sampling mass (1 = off).
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// Keep only the k most likely tokens (0 = off).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Sampling seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Do not stop at end-of-sequence tokens.
        #[arg(long)]
        ignore_eos: bool,
        /// Print {"tokens": [...]} (generated ids) instead of text.
        #[arg(long)]
        json: bool,
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
        #[arg(long, default_value_t = 512)]
        prompt_tokens: usize,
        /// Tokens to generate per run (the first comes from prefill; at least 2).
        #[arg(long, default_value_t = 128)]
        gen_tokens: usize,
        /// Timed runs (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Untimed warm-up runs before the timed ones.
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// Write the results as a JSON capsule to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Overwrite an existing --json file.
        #[arg(long)]
        force: bool,
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
    /// Plan to run: reference.
    #[arg(long, default_value = "reference")]
    plan: String,
    /// CUDA: launch decode kernels one by one instead of replaying a captured graph.
    #[arg(long)]
    eager: bool,
}

impl RunArgs {
    fn open(&self) -> Result<(Model, Box<dyn zmoe::Backend>)> {
        let model = Model::load(&self.model)?;
        if self.plan != "reference" {
            bail!("unknown --plan `{}` (available: reference)", self.plan);
        }
        let plan = Plan::reference(model.config());
        let backend = model.backend_with(self.backend, plan, !self.eager)?;
        Ok((model, backend))
    }
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
        if s.hit_eos { " | stopped at EOS" } else { "" }
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
    if json {
        emit(&format!("{}\n", serde_json::json!({ "tokens": stats.tokens })));
    }
    print_stats(&backend.name(), &stats);
    Ok(())
}

/// Checks that the capsule can be written before spending time on the bench.
fn check_capsule_path(path: &Path, force: bool) -> Result<()> {
    if path.is_dir() {
        bail!("--json {}: is a folder; give a file name", path.display());
    }
    if path.exists() && !force {
        bail!("--json {}: file exists; pass --force to overwrite it", path.display());
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.is_dir()
    {
        bail!("--json {}: folder {} does not exist", path.display(), parent.display());
    }
    Ok(())
}

/// Writes the capsule; without `force` never replaces a file (even one created meanwhile).
fn write_capsule(path: &Path, report: &BenchReport, force: bool) -> Result<()> {
    let mut text = serde_json::to_string_pretty(report).context("serialising the bench capsule")?;
    text.push('\n');
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true);
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    let mut f = opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            anyhow::anyhow!("--json {}: file exists; pass --force to overwrite it", path.display())
        } else {
            anyhow::anyhow!("--json {}: {e}", path.display())
        }
    })?;
    f.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
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
    let dirty = match r.git_dirty {
        Some(true) => " (modified)",
        _ => "",
    };
    rows.push(("zmoe", format!("{} at commit {}{dirty}, {}", r.zmoe_version, r.git_commit, r.timestamp_utc)));
    rows.iter().map(|(k, v)| format!("{k:<12} {v}\n")).collect()
}

/// Where the demo model is cached.
fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("ZMOE_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")));
    base.unwrap_or_else(std::env::temp_dir).join("zmoe")
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Demo { backend, max_tokens } => {
            let spec = SynthSpec {
                family: "qwen3_moe".into(),
                preset: "tiny".into(),
                quant: SynthQuant::Affine4,
                group_size: 64,
                seed: 0,
                max_shard_bytes: synth::SHARD_BYTES,
            };
            let dir = cache_dir().join("demo-qwen3_moe-tiny-affine4-seed0");
            if dir.join("config.json").exists() && dir.join("model.safetensors").exists() {
                eprintln!("using cached demo model {}", dir.display());
            } else {
                eprintln!("synthesising demo model (qwen3_moe tiny, MLX affine 4-bit) into {}", dir.display());
                std::fs::create_dir_all(dir.parent().expect("cache has a parent"))
                    .with_context(|| format!("creating {}", dir.display()))?;
                synth::write(&spec, &dir, true)?;
            }
            let model = Model::load(&dir)?;
            let mut be = model.backend(backend, Plan::reference(model.config()))?;
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
            print_stats(&be.name(), &stats);
        }
        Cmd::Synth { family, preset, quant, group_size, seed, out, force, max_shard_mb } => {
            let quant_kind = SynthQuant::parse(&quant)?;
            let spec =
                SynthSpec { family, preset, quant: quant_kind, group_size, seed, max_shard_bytes: max_shard_mb << 20 };
            synth::write(&spec, &out, force)?;
            eprintln!("wrote {} ({}/{}, {quant}, seed {seed})", out.display(), spec.family, spec.preset);
        }
        Cmd::Generate { run, prompt, prompt_tokens, max_tokens, temperature, top_p, top_k, seed, ignore_eos, json } => {
            if !(top_p > 0.0 && top_p <= 1.0) {
                bail!("--top-p must be in (0, 1], got {top_p}");
            }
            let (model, mut be) = run.open()?;
            let ids = match (prompt, prompt_tokens) {
                (_, Some(t)) => parse_tokens("--prompt-tokens", &t)?,
                (Some(p), None) => tokenizer::encode(&tokenizer::load(&model.tokenizer_path())?, &p)?,
                (None, None) => bail!("give --prompt TEXT or --prompt-tokens 1,2,3"),
            };
            let opts = GenerateOptions {
                max_tokens,
                sampling: SamplingParams { temperature, top_p, top_k, seed },
                ignore_eos,
            };
            run_generate(&model, be.as_mut(), ids, &opts, json)?;
        }
        Cmd::Forward { run, tokens, json } => {
            let ids = parse_tokens("--tokens", &tokens)?;
            let (model, mut be) = run.open()?;
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
        Cmd::Bench { run, prompt_tokens, gen_tokens, runs, warmup, json, force } => {
            let opts = BenchOptions { prompt_tokens, gen_tokens, runs, warmup, seed: 0 };
            opts.validate(None)?;
            if let Some(path) = &json {
                check_capsule_path(path, force)?;
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
                write_capsule(path, &report, force)?;
                eprintln!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
