//! `zmoe validate`: token fidelity and throughput of a patched plan against the reference
//! plan, on one loaded model (the seeds' `python -m zmlx.validate`).
//!
//! Both plans run on the same backend (same weights, same buffers; [`Backend::set_plan`]),
//! greedy, EOS ignored, from the same prompt: first the reference plan (warm-up + timed
//! runs), then the patched one. Fidelity is the length of the common prefix of the two
//! greedy continuations; at the first divergence the reference's own logits say how close
//! the call was (the margin between the two tokens). Speed is the ratio of the median decode
//! tok/s measured in this one process. The result is a serialisable capsule.

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, DeviceInfo};
use crate::bench::{ModelSummary, Provenance, RunResult, Spread};
use crate::error::{Error, Result};
use crate::generate::{GenerateOptions, generate};
use crate::plan::Plan;
use crate::plan::patterns::{Applied, Selection, patched_plan};
use crate::runtime::{BackendKind, Model};
use crate::sample::SamplingParams;

/// The `kind` field of a validate capsule.
pub const CAPSULE_KIND: &str = "zmoe-validate";
/// Version of the validate capsule layout.
pub const CAPSULE_VERSION: u32 = 1;

/// What to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidateOptions {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Greedy tokens generated per run (all compared).
    pub max_tokens: usize,
    /// Timed runs per plan.
    pub runs: usize,
    /// Untimed warm-up runs per plan (the first also captures the CUDA graph).
    pub warmup: usize,
}

impl ValidateOptions {
    /// Checks the settings; messages name the CLI flags.
    pub fn check(&self, cfg: &crate::config::ModelConfig) -> Result<()> {
        if self.runs < 1 {
            return Err(Error::Arg(format!("--runs must be at least 1, got {}", self.runs)));
        }
        if self.max_tokens < 2 {
            return Err(Error::Arg(format!("--max-tokens must be at least 2, got {}", self.max_tokens)));
        }
        if self.prompt.is_empty() {
            return Err(Error::Arg("the prompt is empty".into()));
        }
        let total = self.prompt.len() + self.max_tokens;
        if total > cfg.max_position_embeddings {
            return Err(Error::Arg(format!(
                "prompt {} + --max-tokens {} = {total} exceeds the model's max_position_embeddings {}",
                self.prompt.len(),
                self.max_tokens,
                cfg.max_position_embeddings
            )));
        }
        Ok(())
    }
}

/// One plan's runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanResult {
    /// The plan's name (`reference`, or the applied patterns joined with `+`).
    pub plan: String,
    /// Steps in the plan.
    pub steps: usize,
    /// Every timed run.
    pub runs: Vec<RunResult>,
    /// Prefill tok/s over the runs.
    pub prefill_tok_s: Spread,
    /// Decode tok/s over the runs.
    pub decode_tok_s: Spread,
    /// Peak device memory of the backend (weights + buffers), if tracked. Both plans share
    /// one backend, so this is the peak over everything run so far.
    pub peak_memory_bytes: Option<usize>,
    /// `bytes_per_token × median decode tok/s`, GB/s.
    #[serde(with = "crate::jsonl::nan_as_null")]
    pub achieved_gb_s: f64,
    /// `achieved / copy bandwidth × 100`.
    #[serde(with = "crate::jsonl::nan_as_null")]
    pub roofline_pct: f64,
    /// The greedy tokens of the first timed run.
    pub tokens: Vec<u32>,
    /// Whether every run (warm-ups included) generated those same tokens. Fidelity is FAIL
    /// unless both plans are deterministic.
    pub deterministic: bool,
}

/// Where the two plans first chose different tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Divergence {
    /// Index into the generated tokens.
    pub position: usize,
    /// The reference plan's token.
    pub reference_token: u32,
    /// The patched plan's token.
    pub patched_token: u32,
    /// Reference logit of its token minus its logit of the patched token (how close a call).
    pub margin: f32,
}

/// Token fidelity of the patched plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fidelity {
    /// `PASS` when every token of every patched run equals the reference's (and each plan's
    /// runs agree among themselves), else `FAIL`.
    pub verdict: String,
    /// Tokens identical before the first divergence (the worst patched run).
    pub identical: usize,
    /// Tokens compared.
    pub total: usize,
    /// The first divergence, if any.
    pub first_divergence: Option<Divergence>,
    /// Set when a plan's output was not finite (NaN / infinite logits): the error, naming
    /// the plan. Always a FAIL, however many tokens agree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub non_finite: Option<String>,
}

impl Fidelity {
    /// Whether the verdict is PASS.
    pub fn passed(&self) -> bool {
        self.verdict == "PASS"
    }

    /// `FIDELITY: m/n tokens identical [PASS]` plus the divergence, one line.
    pub fn line(&self) -> String {
        let mut s = format!("FIDELITY: {}/{} tokens identical [{}]", self.identical, self.total, self.verdict);
        if let Some(d) = &self.first_divergence {
            s += &format!(
                " — first divergence at token {}: reference {} vs patched {} (reference logit margin {:.4})",
                d.position, d.reference_token, d.patched_token, d.margin
            );
        }
        if let Some(why) = &self.non_finite {
            s += &format!(" — non-finite output: {why}");
        }
        s
    }
}

/// Everything one validate measured: a repro capsule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidateReport {
    /// Always [`CAPSULE_KIND`].
    pub kind: String,
    /// [`CAPSULE_VERSION`] of the writer.
    pub capsule_version: u32,
    /// Which zmoe, commit, time and command line.
    #[serde(flatten)]
    pub provenance: Provenance,
    /// The model.
    pub model: ModelSummary,
    /// The backend's name.
    pub backend: String,
    /// The device (for CUDA, `driver` is the CUDA driver API version).
    pub device: DeviceInfo,
    /// The settings.
    pub settings: ValidateOptions,
    /// Fused steps per pattern: `(pattern, count)`.
    pub patterns_applied: Vec<(String, usize)>,
    /// Primitive steps inside the patched plan's fused steps.
    pub steps_replaced: usize,
    /// The reference plan's runs.
    pub reference: PlanResult,
    /// The patched plan's runs.
    pub patched: PlanResult,
    /// Token fidelity.
    pub fidelity: Fidelity,
    /// Patched / reference median decode tok/s.
    #[serde(with = "crate::jsonl::nan_as_null")]
    pub decode_speedup: f64,
    /// Patched / reference median prefill tok/s.
    #[serde(with = "crate::jsonl::nan_as_null")]
    pub prefill_speedup: f64,
    /// Bytes of weights read per decoded token.
    pub bytes_per_token: usize,
    /// Copy bandwidth measured in this run, GB/s: the roofline.
    pub copy_gb_s: f64,
}

/// Which plan and run a progress callback reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress<'a> {
    /// The plan's name.
    pub plan: &'a str,
    /// Index among the plan's warm-ups, or among its timed runs.
    pub run: usize,
    /// Whether it is a warm-up.
    pub warmup: bool,
}

/// What one plan's runs gave.
struct PlanRuns {
    /// The timed runs' timings.
    runs: Vec<RunResult>,
    /// The tokens of every run, warm-ups first.
    tokens: Vec<Vec<u32>>,
    /// The error of a run whose logits were not finite (the runs stop there).
    non_finite: Option<String>,
}

/// Runs `plan`'s warm-ups and timed runs on `backend` (see [`PlanRuns`]).
fn run_plan(
    backend: &mut dyn Backend,
    plan: Plan,
    opts: &ValidateOptions,
    progress: &mut dyn FnMut(Progress, &RunResult),
) -> Result<PlanRuns> {
    let name = plan.name.clone();
    backend.set_plan(plan)?;
    let gen_opts =
        GenerateOptions { max_tokens: opts.max_tokens, sampling: SamplingParams::default(), ignore_eos: true };
    let (mut runs, mut tokens) = (Vec::new(), Vec::new());
    for i in 0..opts.warmup + opts.runs {
        let stats = match generate(backend, &opts.prompt, &gen_opts, |_| {}) {
            Ok(s) => s,
            Err(e @ Error::NonFinite { .. }) => {
                return Ok(PlanRuns { runs, tokens, non_finite: Some(format!("{name} plan: {e}")) });
            }
            Err(e) => return Err(e),
        };
        let r = RunResult::from_stats(&stats);
        let warmup = i < opts.warmup;
        progress(Progress { plan: &name, run: if warmup { i } else { i - opts.warmup }, warmup }, &r);
        tokens.push(stats.tokens);
        if !warmup {
            runs.push(r);
        }
    }
    Ok(PlanRuns { runs, tokens, non_finite: None })
}

/// Length of the common prefix of two token sequences.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Validates `model`'s patched plan for `sel` against its reference plan on a new backend of
/// `kind`, sending a header line and one line per run to `log`. Errors if no pattern applies.
pub fn validate_model(
    model: &Model,
    kind: BackendKind,
    cuda_graph: bool,
    sel: &Selection,
    opts: &ValidateOptions,
    log: &mut dyn FnMut(&str),
) -> Result<ValidateReport> {
    validate_model_ctx(model, kind, cuda_graph, None, sel, opts, log)
}

/// [`validate_model`] on a backend with a context of `ctx` tokens (`--ctx`, see
/// [`Model::backend_ctx`]).
pub fn validate_model_ctx(
    model: &Model,
    kind: BackendKind,
    cuda_graph: bool,
    ctx: Option<usize>,
    sel: &Selection,
    opts: &ValidateOptions,
    log: &mut dyn FnMut(&str),
) -> Result<ValidateReport> {
    let cfg = model.config();
    opts.check(cfg)?;
    let reference = Plan::reference(cfg);
    let (patched, applied) = patched_plan(cfg, sel);
    if applied.is_empty() {
        return Err(Error::Arg(format!(
            "no pattern applies to this model with this selection (see `zmoe patterns --model {}`)",
            model.checkpoint.dir.display()
        )));
    }
    let mut backend = model.backend_ctx(kind, reference.clone(), cuda_graph, ctx)?;
    log(&format!(
        "validate: {} on {} — reference ({} steps) vs `{}` ({} steps), prompt {} tokens, {} greedy tokens, \
         {} warm-up + {} timed per plan",
        model.checkpoint.dir.display(),
        backend.name(),
        reference.steps.len(),
        patched.name,
        patched.steps.len(),
        opts.prompt.len(),
        opts.max_tokens,
        opts.warmup,
        opts.runs
    ));
    run_validate(model, backend.as_mut(), reference, patched, &applied, opts, &mut |p, r| {
        log(&format!(
            "  {:<10} {} {}: prefill {:.1} tok/s, decode {:.1} tok/s",
            if p.plan == "reference" { "reference" } else { "patched" },
            if p.warmup { "warm-up" } else { "run" },
            p.run + 1,
            r.prefill_tok_s,
            r.decode_tok_s
        ))
    })
}

/// Validates `patched` (with the fused steps `applied`) against `reference` on `backend`.
pub fn run_validate(
    model: &Model,
    backend: &mut dyn Backend,
    reference: Plan,
    patched: Plan,
    applied: &[Applied],
    opts: &ValidateOptions,
    progress: &mut dyn FnMut(Progress, &RunResult),
) -> Result<ValidateReport> {
    let cfg = model.config();
    opts.check(cfg)?;
    crate::generate::check_context(backend, opts.prompt.len(), opts.max_tokens)?;
    let (ref_name, ref_steps) = (reference.name.clone(), reference.steps.len());
    let (pat_name, pat_steps) = (patched.name.clone(), patched.steps.len());
    let pat_fused = crate::plan::patterns::fused_primitives(&patched);
    let PlanRuns { runs: ref_runs, tokens: ref_all, non_finite: ref_bad } =
        run_plan(backend, reference.clone(), opts, progress)?;
    let PlanRuns { runs: pat_runs, tokens: pat_all, non_finite: pat_bad } = run_plan(backend, patched, opts, progress)?;
    let non_finite = ref_bad.or(pat_bad);
    let same = |all: &[Vec<u32>]| all.iter().all(|t| *t == all[0]);
    let (ref_same, pat_same) = (same(&ref_all), same(&pat_all));
    // The reference's first timed run against every patched run (warm-ups too): the worst
    // patched run is the one judged, so a run-to-run difference cannot hide.
    let ref_tokens = ref_all.get(opts.warmup).cloned().unwrap_or_default();
    let pat_tokens =
        pat_all.iter().min_by_key(|t| (common_prefix(&ref_tokens, t), t.len())).cloned().unwrap_or_default();
    let identical = common_prefix(&ref_tokens, &pat_tokens);
    let total = ref_tokens.len();
    let first_divergence = if non_finite.is_none() && identical < total.max(pat_tokens.len()) {
        // The reference's logits where the choice was made, computed as generation computed
        // them: the prompt's prefill, then one decode step per token of the common prefix (a
        // single prefill of prompt + prefix would run the prefix through the prompt kernels,
        // which round differently from decode on tensor cores).
        backend.set_plan(reference)?;
        let mut logits = backend.forward(&opts.prompt, false)?;
        for &t in &ref_tokens[..identical] {
            logits = backend.forward(&[t], false)?;
        }
        let (r, p) = (ref_tokens.get(identical).copied(), pat_tokens.get(identical).copied());
        let margin = match (r, p) {
            (Some(r), Some(p)) => logits[r as usize] - logits[p as usize],
            _ => f32::NAN,
        };
        Some(Divergence {
            position: identical,
            reference_token: r.unwrap_or(u32::MAX),
            patched_token: p.unwrap_or(u32::MAX),
            margin,
        })
    } else {
        None
    };
    let fidelity = Fidelity {
        // PASS needs every run of both plans to give the same max_tokens tokens.
        verdict: if non_finite.is_none()
            && first_divergence.is_none()
            && total == opts.max_tokens
            && ref_same
            && pat_same
        {
            "PASS"
        } else {
            "FAIL"
        }
        .into(),
        identical,
        total,
        first_divergence,
        non_finite,
    };

    backend.reset();
    let peak = backend.peak_memory();
    let copy_gb_s = backend.measure_copy_bandwidth()?;
    let bytes_per_token = model.weights.bytes_per_token(cfg);
    let result = |plan: String, steps: usize, runs: Vec<RunResult>, tokens: Vec<u32>, same: bool| {
        let prefill = Spread::of(&runs.iter().map(|r| r.prefill_tok_s).collect::<Vec<_>>());
        let decode = Spread::of(&runs.iter().map(|r| r.decode_tok_s).collect::<Vec<_>>());
        let achieved = bytes_per_token as f64 * decode.median / 1e9;
        PlanResult {
            plan,
            steps,
            runs,
            prefill_tok_s: prefill,
            decode_tok_s: decode,
            peak_memory_bytes: peak,
            achieved_gb_s: achieved,
            roofline_pct: achieved / copy_gb_s * 100.0,
            tokens,
            deterministic: same,
        }
    };
    let reference = result(ref_name, ref_steps, ref_runs, ref_tokens, ref_same);
    let pat_first = pat_all.get(opts.warmup).cloned().unwrap_or_default();
    let patched = result(pat_name, pat_steps, pat_runs, pat_first, pat_same);
    let mut per_pattern: Vec<(String, usize)> = Vec::new();
    for a in applied {
        match per_pattern.iter_mut().find(|(n, _)| n == a.pattern.name()) {
            Some((_, c)) => *c += 1,
            None => per_pattern.push((a.pattern.name().into(), 1)),
        }
    }
    Ok(ValidateReport {
        kind: CAPSULE_KIND.into(),
        capsule_version: CAPSULE_VERSION,
        provenance: Provenance::now(),
        model: ModelSummary::of(model),
        backend: backend.name(),
        device: backend.device_info(),
        settings: opts.clone(),
        patterns_applied: per_pattern,
        steps_replaced: pat_fused,
        decode_speedup: patched.decode_tok_s.median / reference.decode_tok_s.median,
        prefill_speedup: patched.prefill_tok_s.median / reference.prefill_tok_s.median,
        reference,
        patched,
        fidelity,
        bytes_per_token,
        copy_gb_s,
    })
}
