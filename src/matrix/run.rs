//! `zmoe matrix run`: validate models and append one ledger [`Entry`] per model.
//!
//! Models are model folders (`--model DIR`, id = the folder's name) and synthetic presets
//! (`--preset NAME`, `--all`; id = `family/preset@quant`). A preset is synthesised once into
//! `<cache>/presets/<family>-<preset>-<quant>-seed0` ([`crate::cache::cache_dir`]) and reused after
//! that. Each model is loaded, validated exactly as `zmoe validate` does (same prompt, both
//! plans on one backend) and recorded; a FAIL is recorded too — that is what a ledger is for.
//! One model's error (it does not load, no pattern applies) is reported and the others
//! still run; the command fails at the end if any model failed or could not run.

use std::path::{Path, PathBuf};

use super::report::{one_line, report_table};
use super::{DEFAULT_LEDGER, Entry, Ledger, Verdict};
use crate::checkpoint::synth::{self, SynthQuant, SynthSpec};
use crate::error::{Error, Result};
use crate::plan::patterns::Selection;
use crate::runtime::{BackendKind, Model};
use crate::validate::{ValidateOptions, validate_model};

/// `zmoe matrix run` options.
#[derive(Debug, Clone, clap::Args)]
#[command(group(clap::ArgGroup::new("what").required(true).multiple(true).args(["models", "presets", "all"])))]
pub struct RunArgs {
    /// A model folder to validate (repeatable); its entry's id is the folder's name.
    #[arg(long = "model", value_name = "DIR")]
    pub models: Vec<PathBuf>,
    /// A synthetic preset to validate (repeatable): `tiny`, `qwen3_moe/qwen3-30b-a3b`, or
    /// with a format, `tiny@bf16`. See `zmoe matrix catalog`.
    #[arg(long = "preset", value_name = "NAME")]
    pub presets: Vec<String>,
    /// Validate every preset (after any --model folders).
    #[arg(long)]
    pub all: bool,
    /// Weight format of synthesised presets: bf16, affine4 or affine8.
    #[arg(long, default_value = "affine4")]
    pub quant: String,
    /// Device: auto (best available), cpu or cuda.
    #[arg(long, default_value = "auto")]
    pub backend: BackendKind,
    /// Timed runs per plan (the median is recorded, and every run).
    #[arg(long, default_value_t = 3, value_parser = crate::args::count, allow_negative_numbers = true)]
    pub runs: usize,
    /// Greedy tokens generated and compared per run.
    #[arg(long, default_value_t = 200, value_parser = crate::args::count, allow_negative_numbers = true)]
    pub max_tokens: usize,
    /// Untimed warm-up runs per plan.
    #[arg(long, default_value_t = 1, value_parser = crate::args::count, allow_negative_numbers = true)]
    pub warmup: usize,
    /// Length of the fixed pseudo-random prompt (the one `zmoe validate` uses).
    #[arg(long, default_value_t = 64, value_parser = crate::args::count, allow_negative_numbers = true)]
    pub prompt_len: usize,
    /// Patterns to apply, comma-separated, instead of each family's defaults.
    #[arg(long)]
    pub patterns: Option<String>,
    /// Patterns to leave out, comma-separated.
    #[arg(long)]
    pub exclude: Option<String>,
    /// Free text recorded with every entry of this run.
    #[arg(long, default_value = "")]
    pub notes: String,
    /// The ledger to append to (created with its folders if missing).
    #[arg(long, default_value = DEFAULT_LEDGER)]
    pub ledger: PathBuf,
    /// CUDA: launch decode kernels one by one instead of replaying a captured graph.
    #[arg(long)]
    pub eager: bool,
}

/// One model to validate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A model folder.
    Folder(PathBuf),
    /// A synthetic preset (seed 0, group size 64 when quantized).
    Preset {
        /// Family, e.g. `qwen3_moe`.
        family: &'static str,
        /// Preset name, e.g. `qwen3-30b-a3b`.
        preset: &'static str,
        /// Storage format.
        quant: SynthQuant,
    },
}

impl Source {
    /// The ledger's model id: the folder's name, or `family/preset@quant`.
    pub fn id(&self) -> String {
        match self {
            Source::Folder(dir) => super::catalog::folder_id(dir),
            Source::Preset { family, preset, quant } => format!("{family}/{preset}@{}", quant.name()),
        }
    }
}

/// Finds a preset of [`synth::PRESETS`] by `preset` or `family/preset`.
pub fn find_preset(name: &str) -> Result<(&'static str, &'static str)> {
    let hits: Vec<(&'static str, &'static str)> = synth::PRESETS
        .iter()
        .filter(|(f, p, _)| name == *p || name == format!("{f}/{p}"))
        .map(|(f, p, _)| (*f, *p))
        .collect();
    let known = || synth::PRESETS.iter().map(|(f, p, _)| format!("{f}/{p}")).collect::<Vec<_>>().join(", ");
    match hits.as_slice() {
        [one] => Ok(*one),
        [] => Err(Error::Arg(format!("--preset `{name}`: unknown preset (known: {})", known()))),
        _ => Err(Error::Arg(format!("--preset `{name}`: several families have it; write family/preset ({})", known()))),
    }
}

/// The models `args` names, in order: folders, then presets (`--preset` in order, then the
/// rest of `--all`), without repeating a preset.
pub fn sources(args: &RunArgs) -> Result<Vec<Source>> {
    let default_quant = SynthQuant::parse(&args.quant)?;
    let mut out: Vec<Source> = args.models.iter().cloned().map(Source::Folder).collect();
    let mut presets: Vec<Source> = Vec::new();
    let mut add = |s: Source| {
        if !presets.contains(&s) {
            presets.push(s);
        }
    };
    for name in &args.presets {
        let (name, quant) = match name.split_once('@') {
            Some((n, q)) => (n, SynthQuant::parse(q).map_err(|e| Error::Arg(format!("--preset `{name}`: {e}")))?),
            None => (name.as_str(), default_quant),
        };
        let (family, preset) = find_preset(name)?;
        add(Source::Preset { family, preset, quant });
    }
    if args.all {
        for (family, preset, _) in synth::PRESETS {
            add(Source::Preset { family, preset, quant: default_quant });
        }
    }
    out.extend(presets);
    Ok(out)
}

/// Where a preset is cached: `<cache>/presets/<family>-<preset>-<quant>-seed0`.
pub fn preset_dir(cache: &Path, family: &str, preset: &str, quant: SynthQuant) -> PathBuf {
    cache.join("presets").join(format!("{family}-{preset}-{}-seed0", quant.name()))
}

/// The folder of a preset under `cache`, synthesising it first if it is not there.
pub fn ensure_preset(
    cache: &Path,
    family: &str,
    preset: &str,
    quant: SynthQuant,
    stderr: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    let dir = preset_dir(cache, family, preset, quant);
    let complete = dir.join("config.json").is_file()
        && (dir.join("model.safetensors").is_file() || dir.join("model.safetensors.index.json").is_file());
    if complete {
        stderr(&format!("using cached preset {}", dir.display()));
        return Ok(dir);
    }
    stderr(&format!("synthesising preset {family}/{preset} ({}, seed 0) into {}", quant.name(), dir.display()));
    let parent = dir.parent().expect("preset folders have a parent");
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    synth::write(&preset_spec(family, preset, quant), &dir, true).map_err(|e| {
        Error::Arg(format!("cached preset {}: {e} (to start over, clear it: {})", dir.display(), rm_rf(&dir)))
    })?;
    Ok(dir)
}

/// What [`ensure_preset`] synthesises.
fn preset_spec(family: &str, preset: &str, quant: SynthQuant) -> SynthSpec {
    SynthSpec {
        family: family.into(),
        preset: preset.into(),
        quant,
        group_size: 64,
        seed: 0,
        max_shard_bytes: synth::SHARD_BYTES,
    }
}

/// `rm -rf <dir>`, quoted for a shell.
fn rm_rf(dir: &Path) -> String {
    format!("`rm -rf {}`", crate::outdir::shell_quote(dir))
}

/// A cached preset, loaded: [`ensure_preset`], then [`Model::load`]. A cache folder that does
/// not load is re-synthesised once if zmoe wrote it (it carries zmoe's marker and nothing
/// else); any other is left alone, and the error names it and the command that clears it.
pub fn load_preset(
    cache: &Path,
    family: &str,
    preset: &str,
    quant: SynthQuant,
    stderr: &mut dyn FnMut(&str),
) -> Result<(PathBuf, Model)> {
    let dir = ensure_preset(cache, family, preset, quant, stderr)?;
    let e = match Model::load(&dir) {
        Ok(m) => return Ok((dir, m)),
        Err(e) => e,
    };
    if !crate::outdir::is_ours(&dir) {
        return Err(Error::Arg(format!(
            "cached preset {} does not load ({e}); zmoe did not write that folder (no {} marker), so it is not \
             replaced: clear it with {} and run again",
            dir.display(),
            crate::outdir::MARKER,
            rm_rf(&dir)
        )));
    }
    stderr(&format!("cached preset {} does not load ({e}); re-synthesising it", dir.display()));
    synth::write(&preset_spec(family, preset, quant), &dir, true)?;
    let model = Model::load(&dir).map_err(|e| {
        Error::Arg(format!("cached preset {} does not load ({e}); clear it with {}", dir.display(), rm_rf(&dir)))
    })?;
    Ok((dir, model))
}

/// The NVIDIA kernel driver's version (`580.95.05`) from `/proc/driver/nvidia/version`, if
/// this host has one.
pub fn nvidia_driver_version() -> Option<String> {
    parse_nvidia_version(&std::fs::read_to_string("/proc/driver/nvidia/version").ok()?)
}

/// The first `N.N[.N]` word of the file's first line.
fn parse_nvidia_version(text: &str) -> Option<String> {
    text.lines().next()?.split_whitespace().find_map(|w| {
        let ok = w.contains('.')
            && w.starts_with(|c: char| c.is_ascii_digit())
            && w.chars().all(|c| c.is_ascii_digit() || c == '.');
        ok.then(|| w.to_string())
    })
}

/// How one model ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Validated and appended.
    Recorded(Box<Entry>),
    /// Could not be validated (nothing appended); the error's text.
    Error(String),
}

/// Runs `zmoe matrix run`: every model of `args` in turn, appending an entry per validated
/// model to `args.ledger`. `stdout` receives each model's fidelity line and one-row report
/// as it finishes; `stderr` progress and per-model errors. Returns each model's outcome;
/// [`run`] turns FAILs and errors into the command's error.
pub fn run_all(
    args: &RunArgs,
    cache: &Path,
    stdout: &mut dyn FnMut(&str),
    stderr: &mut dyn FnMut(&str),
) -> Result<Vec<(String, Outcome)>> {
    // Argument errors stop everything before any model runs.
    let sel = Selection::parse(args.patterns.as_deref(), args.exclude.as_deref())?;
    let sources = sources(args)?;
    // Before any model runs: a ledger that cannot take the entries fails now, not after.
    crate::output::check_appendable("--ledger", &args.ledger)?;
    let n = sources.len();
    let mut outcomes = Vec::with_capacity(n);
    for (i, source) in sources.iter().enumerate() {
        let id = source.id();
        stderr(&format!("matrix run [{}/{n}] {}", i + 1, one_line(&id)));
        let outcome = match run_one(source, &id, args, &sel, cache, stdout, stderr) {
            Ok(entry) => Outcome::Recorded(Box::new(entry)),
            Err(e) => {
                let msg = e.to_string();
                stderr(&format!("error: {}: {msg} (nothing appended)", one_line(&id)));
                Outcome::Error(msg)
            }
        };
        outcomes.push((id, outcome));
    }
    Ok(outcomes)
}

/// [`run_all`], then a summary line on `stdout`; an error if any model failed fidelity or
/// could not run (after all of them ran).
pub fn run(args: &RunArgs, cache: &Path, stdout: &mut dyn FnMut(&str), stderr: &mut dyn FnMut(&str)) -> Result<()> {
    let outcomes = run_all(args, cache, stdout, stderr)?;
    let ids = |keep: &dyn Fn(&Outcome) -> bool| -> Vec<String> {
        outcomes.iter().filter(|(_, o)| keep(o)).map(|(id, _)| one_line(id)).collect()
    };
    let pass = ids(&|o| matches!(o, Outcome::Recorded(e) if e.fidelity.verdict == Verdict::Pass));
    let fail = ids(&|o| matches!(o, Outcome::Recorded(e) if e.fidelity.verdict == Verdict::Fail));
    let errors = ids(&|o| matches!(o, Outcome::Error(_)));
    let recorded = pass.len() + fail.len();
    let plural = |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    stdout(&format!(
        "matrix run: {}: {} PASS, {} FAIL, {} could not run; {} appended to {}\n",
        plural(outcomes.len(), "model", "models"),
        pass.len(),
        fail.len(),
        errors.len(),
        plural(recorded, "entry", "entries"),
        args.ledger.display()
    ));
    let mut why = Vec::new();
    if !fail.is_empty() {
        why.push(format!("fidelity FAIL (recorded): {}", fail.join(", ")));
    }
    if !errors.is_empty() {
        why.push(format!("could not run (not recorded): {}", errors.join(", ")));
    }
    let msg = format!("matrix run: {}", why.join("; "));
    match (fail.is_empty(), errors.is_empty()) {
        (true, true) => Ok(()),
        // Only fidelity FAILs: exit status 3, like `zmoe validate`.
        (false, true) => Err(Error::Fidelity(msg)),
        _ => Err(Error::Arg(msg)),
    }
}

/// Validates one model and appends its entry.
fn run_one(
    source: &Source,
    id: &str,
    args: &RunArgs,
    sel: &Selection,
    cache: &Path,
    stdout: &mut dyn FnMut(&str),
    stderr: &mut dyn FnMut(&str),
) -> Result<Entry> {
    let model = match source {
        Source::Folder(dir) => {
            if !dir.is_dir() {
                return Err(Error::Arg(format!("--model {}: no such model folder", dir.display())));
            }
            Model::load(dir).map_err(|e| Error::Arg(format!("cannot load model folder {}: {e}", dir.display())))?
        }
        Source::Preset { family, preset, quant } => load_preset(cache, family, preset, *quant, stderr)?.1,
    };
    for w in &model.checkpoint.warnings {
        stderr(&format!("warning: {w}"));
    }
    let cfg = model.config();
    let opts = ValidateOptions {
        prompt: crate::bench::bench_prompt(cfg, args.prompt_len, 1),
        max_tokens: args.max_tokens,
        runs: args.runs,
        warmup: args.warmup,
    };
    let report = validate_model(&model, args.backend, !args.eager, sel, &opts, &mut |l| stderr(&format!("  {l}")))?;
    let requested =
        (*sel != Selection::default()).then(|| sel.resolve(cfg.family).iter().map(|p| p.name().to_string()).collect());
    let mut entry = Entry::from_validate(&report, id, &args.notes, requested);
    if entry.software.cuda.is_some() {
        entry.software.driver = nvidia_driver_version();
    }
    let pats: Vec<String> = report.patterns_applied.iter().map(|(p, n)| format!("{p} ×{n}")).collect();
    let mut out = format!("== {} ==\n{}\n", one_line(id), report.fidelity.line());
    out += &format!(
        "{}; patterns {} ({} primitive steps fused); prefill speedup {}\n",
        one_line(&report.backend),
        pats.join(", "),
        report.steps_replaced,
        super::report::fmt_speedup(entry.speedup.prefill)
    );
    out += &report_table(&[&entry]).render();
    stdout(&out);
    Ledger::append(&args.ledger, &entry)?;
    stdout(&format!("appended to {}\n\n", args.ledger.display()));
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_version_from_proc() {
        let closed =
            "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.95.05  Thu Sep 25 2025\nGCC version: gcc 12.3\n";
        assert_eq!(parse_nvidia_version(closed).as_deref(), Some("580.95.05"));
        let open =
            "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.124.06  Release Build  (dvs-builder@U16)";
        assert_eq!(parse_nvidia_version(open).as_deref(), Some("570.124.06"));
        assert_eq!(parse_nvidia_version("garbage"), None);
        assert_eq!(parse_nvidia_version(""), None);
    }

    #[test]
    fn preset_names_and_ids() {
        assert_eq!(find_preset("tiny").unwrap(), ("qwen3_moe", "tiny"));
        assert_eq!(find_preset("qwen3_moe/qwen3-30b-a3b").unwrap(), ("qwen3_moe", "qwen3-30b-a3b"));
        let e = find_preset("llama").unwrap_err().to_string();
        assert!(e.contains("unknown preset") && e.contains("qwen3_moe/tiny"), "{e}");
        let p = Source::Preset { family: "qwen3_moe", preset: "qwen3-30b-a3b", quant: SynthQuant::Affine4 };
        assert_eq!(p.id(), "qwen3_moe/qwen3-30b-a3b@affine4");
        assert_eq!(Source::Folder("/models/Qwen3-30B-A3B-4bit/".into()).id(), "Qwen3-30B-A3B-4bit");
        assert_eq!(
            preset_dir(Path::new("/c"), "qwen3_moe", "tiny", SynthQuant::Bf16),
            Path::new("/c/presets/qwen3_moe-tiny-bf16-seed0")
        );
    }

    #[test]
    fn sources_keep_order_and_skip_repeats() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunArgs,
        }
        let args = |a: &[&str]| Cli::try_parse_from(std::iter::once("run").chain(a.iter().copied())).map(|c| c.run);
        let a = args(&["--model", "/m/a", "--preset", "tiny@bf16", "--preset", "qwen3_moe/tiny", "--all"]).unwrap();
        let ids: Vec<String> = sources(&a).unwrap().iter().map(Source::id).collect();
        assert_eq!(
            ids,
            [
                "a",
                "qwen3_moe/tiny@bf16",
                "qwen3_moe/tiny@affine4",
                "qwen3_moe/qwen3-30b-a3b@affine4",
                "glm4_moe_lite/glm-tiny@affine4",
                "glm4_moe_lite/glm-4.7-flash@affine4",
                "glm4_moe_lite/glm-tiny-l512@affine4",
                "deepseek_v3/deepseek-tiny@affine4",
                "deepseek_v3/kimi-k2-tiny@affine4",
                "lfm2_moe/lfm2-tiny@affine4",
                "lfm2_moe/lfm2-8b-a1b@affine4",
                "lfm2_moe/lfm2-24b-a2b@affine4",
                "gpt_oss/gpt-oss-tiny@affine4",
                "gpt_oss/gpt-oss-20b@affine4"
            ],
            "folders first, then presets in order, --all adding the rest"
        );
        assert_eq!((a.runs, a.max_tokens, a.warmup, a.ledger.as_path()), (3, 200, 1, Path::new(DEFAULT_LEDGER)));
        let e = sources(&args(&["--preset", "tiny@int3"]).unwrap()).unwrap_err().to_string();
        assert!(e.contains("tiny@int3") && e.contains("affine8"), "{e}");
        assert!(args(&["--runs", "1"]).is_err(), "a model, preset or --all is required");
    }
}
