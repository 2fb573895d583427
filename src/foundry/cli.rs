//! The `zmoe foundry` subcommands: argument definitions and handlers.
//!
//! Like `zmoe matrix`, they live in the library so the binary only dispatches
//! ([`execute_with`]) and tests can call them; a handler hands stdout text to one callback and
//! warnings and progress to another, and never prints itself.
//!
//! Files: `run --out DIR` appends to `DIR/attempts.ndjson` (a ledger: appending is the point,
//! and `run` says when it does); `report` writes `DIR/latency-<op>-<arch>.svg`, replacing
//! only a plot it wrote itself (the file starts with its marker); `promote` writes
//! `DIR/pack-<arch>.json` (and `.pending.json`) and refuses to replace them without
//! `--force`.

use std::path::{Path, PathBuf};

use super::attempts::{self, Attempt, Status};
use super::harness::{CudaRunner, MockRunner, Runner, Settings, run_campaign};
use super::knobs;
use super::ops::{OpId, PRESETS, Preset, preset};
use super::pack::{self, PromoteOptions};
use super::report::{analyse, group, render_compare, render_report, svg};
use super::sample::{Mode, SampleSpec};
use super::templates::{self, NumericsRule, Template};
use crate::error::{Error, Result};

/// Which runner executes a campaign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RunnerKind {
    /// CUDA if a GPU is usable, else the mock (the attempts record which).
    Auto,
    /// NVRTC + the GPU (an error without one).
    Cuda,
    /// The deterministic timing model (no GPU; for CI and dry runs).
    Mock,
}

/// `zmoe foundry run` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// The op (see `zmoe foundry list`).
    #[arg(long)]
    pub op: String,
    /// How shapes and knobs are sampled.
    #[arg(long, value_enum, default_value = "mix")]
    pub mode: Mode,
    /// Cases; each runs every template once on the same inputs, in a random order.
    #[arg(long, default_value_t = 24, value_parser = crate::args::count, allow_negative_numbers = true)]
    pub cases: usize,
    /// Campaign seed (same seed, same cases).
    #[arg(long, default_value_t = 1, value_parser = crate::args::seed, allow_negative_numbers = true)]
    pub seed: u64,
    /// Untimed launches before timing each candidate.
    #[arg(long, default_value_t = 10, value_parser = crate::args::count, allow_negative_numbers = true)]
    pub warmup: usize,
    /// Timed launches per candidate (each after an L2 flush); p10/p50/p90 over them.
    #[arg(long, default_value_t = 30, value_parser = crate::args::count, allow_negative_numbers = true)]
    pub repeats: usize,
    /// Campaign folder (attempts.ndjson is appended to); default `foundry/<op>`.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// auto, cuda or mock.
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: RunnerKind,
    /// Only these templates (comma-separated; default: all of the op's).
    #[arg(long, value_delimiter = ',')]
    pub templates: Vec<String>,
    /// Only these shape presets (comma-separated; default: all).
    #[arg(long, value_delimiter = ',')]
    pub presets: Vec<String>,
    /// Largest token count sampled.
    #[arg(long, default_value_t = 256, value_parser = crate::args::count, allow_negative_numbers = true)]
    pub max_tokens: usize,
    /// Fix a template's knobs instead of sampling them, e.g. `t1_vec:TPB=128,VEC=8,UNROLL=2`
    /// (repeatable): a confirmation campaign for one candidate.
    #[arg(long = "pin", value_name = "TEMPLATE:KNOBS")]
    pub pin: Vec<String>,
}

/// `zmoe foundry …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum FoundryCmd {
    /// Ops, their templates (knob spaces, numerics class, defaults) and the shape presets.
    List,
    /// Run a campaign: compile each candidate with NVRTC, check it against the CPU reference
    /// on fresh random inputs with poisoned outputs, time it with CUDA events (warm-up, L2
    /// flushed between repeats), and append one line per attempt to DIR/attempts.ndjson.
    Run(RunArgs),
    /// Per-template success rates, p50 and IQR, pairwise wins with sign tests, winners per
    /// token bucket, best knobs; writes a latency-vs-tokens SVG per op into DIR.
    Report {
        /// Campaign folder (or its attempts.ndjson).
        dir: PathBuf,
        /// Only this op.
        #[arg(long)]
        op: Option<String>,
        /// Significance level for "significant winner".
        #[arg(long, default_value_t = 0.01)]
        alpha: f64,
        /// Do not write the SVG plot.
        #[arg(long)]
        no_plot: bool,
    },
    /// Pairwise comparison of some templates on matched cases: overall, per token bucket and
    /// per preset.
    Compare {
        /// Campaign folder (or its attempts.ndjson).
        dir: PathBuf,
        /// Templates to compare (comma-separated, at least two).
        #[arg(long, value_delimiter = ',', required = true)]
        templates: Vec<String>,
        /// Only this op (needed if the folder holds several that share template names).
        #[arg(long)]
        op: Option<String>,
    },
    /// Write a kernel pack per GPU architecture (DIR/pack-ARCH.json): per op and token
    /// bucket, the template that beats every other at p < alpha, with its best knobs and
    /// source hash. Numerics-changing winners also need a `zmoe validate` PASS (--fidelity).
    Promote {
        /// Campaign folder (or its attempts.ndjson).
        dir: PathBuf,
        /// Significance level of every pairwise sign test.
        #[arg(long, default_value_t = 0.01)]
        alpha: f64,
        /// A `zmoe validate --capsule` file that passed with the pending pack (repeatable).
        #[arg(long = "fidelity", value_name = "CAPSULE")]
        fidelity: Vec<PathBuf>,
        /// Pack file to write (default DIR/pack-ARCH.json; only with one architecture).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Replace existing pack files.
        #[arg(long)]
        force: bool,
    },
    /// Print the full source of a candidate (what NVRTC compiles) and its hash.
    Source {
        /// The op.
        #[arg(long, required_unless_present = "builtin")]
        op: Option<String>,
        /// The template.
        #[arg(long, required_unless_present = "builtin")]
        template: Option<String>,
        /// Print the built-in kernel module instead (common.cuh, the argument-struct prelude,
        /// src/cuda/ops/*.cu): what the CUDA backend compiles (scripts/nvrtc_check.sh).
        #[arg(long, conflicts_with_all = ["op", "template", "knobs"])]
        builtin: bool,
        /// Knobs, e.g. TPB=128,VEC=8 (default: the template's defaults).
        #[arg(long)]
        knobs: Option<String>,
    },
}

/// Runs a `foundry` subcommand: stdout text to `stdout` as it is produced, warnings and
/// progress lines to `stderr`.
pub fn execute_with(cmd: &FoundryCmd, stdout: &mut dyn FnMut(&str), stderr: &mut dyn FnMut(&str)) -> Result<()> {
    match cmd {
        FoundryCmd::List => stdout(&list()),
        FoundryCmd::Run(args) => run(args, stdout, stderr)?,
        FoundryCmd::Report { dir, op, alpha, no_plot } => report(dir, op.as_deref(), *alpha, !no_plot, stdout, stderr)?,
        FoundryCmd::Compare { dir, templates, op } => compare(dir, templates, op.as_deref(), stdout, stderr)?,
        FoundryCmd::Promote { dir, alpha, fidelity, out, force } => {
            promote(dir, *alpha, fidelity, out.as_deref(), *force, stdout, stderr)?
        }
        FoundryCmd::Source { builtin: true, .. } => stdout(&crate::cuda::ops::module_source()),
        FoundryCmd::Source { op: Some(op), template: Some(template), knobs: k, .. } => {
            let t = templates::find(OpId::parse(op)?, template)?;
            let k = match k {
                Some(s) => knobs::parse(s)?,
                None => t.default_knobs(),
            };
            let r = t.render(&k).map_err(|e| Error::Arg(format!("{}: {e}", t.label(&k))))?;
            stderr(&format!("{} [{}] {}", t.label(&k), t.numerics(&k).name(), r.hash));
            stdout(&r.source);
        }
        FoundryCmd::Source { .. } => {
            return Err(Error::Arg("foundry source: give --op and --template, or --builtin".into()));
        }
    }
    Ok(())
}

fn numerics_text(t: &Template) -> String {
    match t.numerics {
        NumericsRule::Preserving => "preserving".into(),
        NumericsRule::Changing => "changing".into(),
        NumericsRule::PreservingIf(k, v) => format!("preserving only at {k}={v}"),
    }
}

/// `foundry list`.
pub fn list() -> String {
    let mut s = String::new();
    for op in OpId::ALL {
        s += &format!("{} — {}\n", op.name(), op.summary());
        s += &format!("  production: {}\n  kernel: foundry_{}{}\n", op.production(), op.name(), op.signature());
        for t in templates::for_op(op) {
            s += &format!(
                "  {:<13} [{}] {} ({} combos; default {})\n      {}\n",
                t.name,
                numerics_text(t),
                t.space_text(),
                knobs::enumerate(t.space).len(),
                knobs::display(&t.default_knobs()),
                t.summary
            );
        }
        s += "\n";
    }
    s += "shape presets (tokens sampled 1..256: half in 1..8, 30% in 9..32, 20% in 33..256)\n";
    for p in &PRESETS {
        s += &format!("  {:<14} {}\n", p.name, p.about);
    }
    s
}

/// The ledger path of a campaign folder argument (or the file itself).
fn ledger_path(dir: &Path) -> PathBuf {
    if dir.extension().is_some_and(|e| e == "ndjson") { dir.to_path_buf() } else { dir.join(attempts::FILE_NAME) }
}

fn campaign_dir(dir: &Path) -> PathBuf {
    if dir.extension().is_some_and(|e| e == "ndjson") {
        dir.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
    } else {
        dir.to_path_buf()
    }
}

fn run(args: &RunArgs, stdout: &mut dyn FnMut(&str), stderr: &mut dyn FnMut(&str)) -> Result<()> {
    let op = OpId::parse(&args.op)?;
    let all = templates::for_op(op);
    let chosen: Vec<&'static Template> = if args.templates.is_empty() {
        all
    } else {
        args.templates.iter().map(|n| templates::find(op, n.trim())).collect::<Result<_>>()?
    };
    let presets: Vec<&'static Preset> = if args.presets.is_empty() {
        PRESETS.iter().collect()
    } else {
        args.presets.iter().map(|n| preset(n.trim())).collect::<Result<_>>()?
    };
    let mut pinned = std::collections::BTreeMap::new();
    for p in &args.pin {
        let (name, ks) =
            p.split_once(':').ok_or_else(|| Error::Arg(format!("--pin {p}: expected TEMPLATE:NAME=VALUE,...")))?;
        let t = templates::find(op, name.trim())?;
        let k = knobs::parse(ks)?;
        knobs::check(t.space, &k).map_err(|e| Error::Arg(format!("--pin {p}: {e}")))?;
        pinned.insert(t.name.to_string(), k);
    }
    if args.cases == 0 || args.repeats == 0 {
        return Err(Error::Arg("--cases and --repeats must be at least 1".into()));
    }
    let dir = args.out.clone().unwrap_or_else(|| PathBuf::from("foundry").join(op.name()));
    if dir.exists() && !dir.is_dir() {
        return Err(Error::Arg(format!("--out {}: is a file; give a folder", dir.display())));
    }
    let ledger = dir.join(attempts::FILE_NAME);
    // Before the campaign: a ledger that cannot take the attempts fails now, not after.
    crate::output::check_appendable("--out", &ledger)?;
    if ledger.exists() {
        let (prev, _) = attempts::read(&ledger)?;
        stderr(&format!(
            "note: appending to the existing ledger {} ({} attempts already; cases are matched within each campaign)",
            ledger.display(),
            prev.len()
        ));
    }
    let mut runner: Box<dyn Runner> = match args.backend {
        RunnerKind::Mock => Box::new(MockRunner::new(args.seed)),
        RunnerKind::Cuda => Box::new(CudaRunner::new()?),
        RunnerKind::Auto => match crate::cuda::available().then(CudaRunner::new) {
            Some(Ok(r)) => Box::new(r),
            Some(Err(e)) => {
                stderr(&format!("note: CUDA unavailable ({e}); using the mock backend"));
                Box::new(MockRunner::new(args.seed))
            }
            None => {
                stderr("note: no CUDA driver/NVRTC on this machine; using the mock backend");
                Box::new(MockRunner::new(args.seed))
            }
        },
    };
    let dev = runner.device();
    stderr(&format!(
        "foundry run: {}, {} cases ({}, seed {}), templates {}, presets {}, warm-up {} + {} repeats, on {} [{}, {}]",
        op.name(),
        args.cases,
        args.mode.name(),
        args.seed,
        chosen.iter().map(|t| t.name).collect::<Vec<_>>().join(","),
        presets.iter().map(|p| p.name).collect::<Vec<_>>().join(","),
        args.warmup,
        args.repeats,
        dev.gpu,
        dev.arch,
        dev.backend
    ));
    let spec = SampleSpec {
        op,
        mode: args.mode,
        cases: args.cases,
        seed: args.seed,
        templates: chosen,
        presets,
        max_tokens: args.max_tokens,
        pinned,
    };
    let settings = Settings { warmup: args.warmup, repeats: args.repeats };
    let sum = run_campaign(runner.as_mut(), &spec, &settings, &ledger, &mut |l| stderr(l))?;
    let counts: Vec<String> = sum
        .by_status
        .iter()
        .map(|(s, n)| {
            let what = match s {
                Status::Ok => "ok",
                Status::BuildError => "build errors",
                Status::Incorrect => "incorrect",
                Status::BenchError => "timing errors",
            };
            format!("{n} {what}")
        })
        .collect();
    stdout(&format!(
        "wrote {} attempts to {} (campaign {}, {} [{}]): {}\nnext: zmoe foundry report {}\n",
        sum.attempts,
        ledger.display(),
        sum.id,
        sum.device.gpu,
        sum.device.backend,
        counts.join(", "),
        dir.display()
    ));
    Ok(())
}

/// Reads a campaign's attempts, warning about skipped lines.
fn load(dir: &Path, stderr: &mut dyn FnMut(&str)) -> Result<Vec<Attempt>> {
    let path = ledger_path(dir);
    if !path.exists() {
        return Err(Error::Arg(format!("{}: no such ledger (run `zmoe foundry run --out DIR` first)", path.display())));
    }
    let (atts, bad) = attempts::read(&path)?;
    for c in &bad {
        stderr(&c.warning(&path));
    }
    if atts.is_empty() {
        return Err(Error::Arg(format!("{}: no attempts", path.display())));
    }
    Ok(atts)
}

fn keep_op(atts: Vec<Attempt>, op: Option<&str>) -> Result<Vec<Attempt>> {
    let Some(op) = op else { return Ok(atts) };
    OpId::parse(op)?;
    let v: Vec<Attempt> = atts.into_iter().filter(|a| a.op == op).collect();
    if v.is_empty() {
        return Err(Error::Arg(format!("no attempts of op {op}")));
    }
    Ok(v)
}

/// Marker that [`svg`] puts on its first line.
const PLOT_MARKER: &str = "<!-- zmoe foundry report";

fn report(
    dir: &Path,
    op: Option<&str>,
    alpha: f64,
    plot: bool,
    stdout: &mut dyn FnMut(&str),
    stderr: &mut dyn FnMut(&str),
) -> Result<()> {
    let atts = keep_op(load(dir, stderr)?, op)?;
    for (i, ((op, arch), g)) in group(&atts).into_iter().enumerate() {
        let an = analyse(&g, alpha);
        let mut text = if i > 0 { "\n".to_string() } else { String::new() };
        text += &render_report(&an);
        if plot {
            let path = campaign_dir(dir).join(format!("latency-{op}-{arch}.svg"));
            // Nothing there, or a regular file this command wrote (never a link or a pipe).
            let ours = match std::fs::symlink_metadata(&path) {
                Err(_) => true,
                Ok(m) if m.is_file() => {
                    crate::input::read_to_string(&path).map(|s| s.starts_with(PLOT_MARKER)).unwrap_or(false)
                }
                Ok(_) => false,
            };
            if ours {
                crate::output::write_new("plot", &path, svg(&an, &g).as_bytes(), true)?;
                text += &format!("\nplot: {}\n", path.display());
            } else {
                stderr(&format!("warning: not replacing {} (not written by zmoe foundry report)", path.display()));
            }
        }
        stdout(&text);
    }
    Ok(())
}

fn compare(
    dir: &Path,
    names: &[String],
    op: Option<&str>,
    stdout: &mut dyn FnMut(&str),
    stderr: &mut dyn FnMut(&str),
) -> Result<()> {
    let names: Vec<String> = names.iter().map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect();
    if names.len() < 2 {
        return Err(Error::Arg("--templates needs at least two templates".into()));
    }
    let atts = keep_op(load(dir, stderr)?, op)?;
    let mut any = false;
    for ((_, _), g) in group(&atts) {
        if !g.iter().any(|a| names.contains(&a.template)) {
            continue;
        }
        any = true;
        let an = analyse(&g, 0.01);
        stdout(&render_compare(&an, &g, &names));
    }
    if !any {
        return Err(Error::Arg(format!("no attempts of templates {}", names.join(", "))));
    }
    Ok(())
}

fn promote(
    dir: &Path,
    alpha: f64,
    fidelity: &[PathBuf],
    out: Option<&Path>,
    force: bool,
    stdout: &mut dyn FnMut(&str),
    stderr: &mut dyn FnMut(&str),
) -> Result<()> {
    if !(alpha > 0.0 && alpha < 1.0) {
        return Err(Error::Arg(format!("--alpha must be in (0, 1), got {alpha}")));
    }
    let mut caps = Vec::new();
    for p in fidelity {
        let text = crate::input::read_to_string(p)?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::format(p, format!("not a JSON capsule: {e}")))?;
        if v.get("kind").and_then(|k| k.as_str()) != Some(crate::validate::CAPSULE_KIND) {
            return Err(Error::format(p, "not a `zmoe validate --capsule` file"));
        }
        caps.push((p.clone(), v));
    }
    let atts = load(dir, stderr)?;
    let cdir = campaign_dir(dir);
    let opts = PromoteOptions { alpha, fidelity: caps, source: cdir.display().to_string() };
    let proms = pack::promote(&atts, &opts);
    if out.is_some() && proms.len() > 1 {
        return Err(Error::Arg("--out names one file, but the campaign has several GPU architectures".into()));
    }
    // Check every destination before writing anything.
    let mut plan = Vec::new();
    for p in &proms {
        let path = out.map(Path::to_path_buf).unwrap_or_else(|| cdir.join(format!("pack-{}.json", p.pack.arch)));
        crate::output::check_out_path("--out", &path, force)?;
        let pending = path.with_extension("pending.json");
        if !p.pending.is_empty() {
            crate::output::check_out_path("--out (pending pack)", &pending, force)?;
        }
        plan.push((path, pending));
    }
    for (p, (path, pending)) in proms.iter().zip(plan) {
        let json = serde_json::to_string_pretty(&p.pack).map_err(|e| Error::format(&path, e.to_string()))?;
        crate::output::write_new("--out", &path, format!("{json}\n").as_bytes(), force)?;
        let mut text = pack::render(p);
        text += &format!("wrote {}\n", path.display());
        if !p.pending.is_empty() {
            let mut pp = p.pack.clone();
            pp.entries.extend(p.pending.iter().cloned());
            let json = serde_json::to_string_pretty(&pp).map_err(|e| Error::format(&pending, e.to_string()))?;
            crate::output::write_new("--out", &pending, format!("{json}\n").as_bytes(), force)?;
            text += &format!(
                "\n{} numerics-changing winner{} pending a token-fidelity check. Pack kernels replace built-in \
                 ones only in patched plans, and only where the plan has their step: validate with the pending \
                 pack, then promote again with the capsule(s):\n",
                p.pending.len(),
                if p.pending.len() == 1 { "" } else { "s" },
            );
            let mut flags: Vec<&str> = p.pending.iter().map(|e| validate_flags(&e.op)).collect();
            flags.sort_unstable();
            flags.dedup();
            for (i, f) in flags.iter().enumerate() {
                text += &format!(
                    "  ZMOE_KERNEL_PACK={} zmoe validate --model MODEL --backend cuda{f} --capsule fidelity{i}.json\n",
                    pending.display()
                );
            }
            let caps: Vec<String> = (0..flags.len()).map(|i| format!("--fidelity fidelity{i}.json")).collect();
            text += &format!(
                "  zmoe foundry promote {} {} --force\nwrote {}\n",
                cdir.display(),
                caps.join(" "),
                pending.display()
            );
        }
        stdout(&text);
    }
    Ok(())
}

/// The `zmoe validate` flags under which a pack kernel of `op` runs: its step must be in
/// the patched plan (Combine, RouterTopK and AddRmsNorm appear when the moe_mlp fusion is
/// excluded; MoeGateUpSwiglu is part of it).
fn validate_flags(op: &str) -> &'static str {
    match op {
        "gather_qmm_swiglu" => "",
        _ => " --exclude moe_mlp",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_names_every_op_template_and_preset() {
        let s = list();
        for t in templates::TEMPLATES.iter() {
            assert!(s.contains(t.name), "{}", t.name);
        }
        for p in &PRESETS {
            assert!(s.contains(p.name));
        }
        assert!(s.contains("preserving only at TPB=256"));
    }
}
