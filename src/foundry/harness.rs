//! Running a campaign: the [`Runner`] trait and its two implementations, and the loop that
//! turns each (case, candidate) into one line of `attempts.ndjson`.
//!
//! - [`CudaRunner`] compiles each candidate with NVRTC (compile errors are recorded, never
//!   fatal), runs it on the case's fresh random inputs with every output poisoned (NaN
//!   bytes), compares with the CPU reference — and, for a numerics-preserving candidate, bit
//!   for bit with the production configuration (`t0` defaults) on the same inputs — then
//!   times it with CUDA events: warm-up launches, then each timed launch after a 256 MiB
//!   device write that evicts the L2 (H200: 60 MiB), so every repeat reads from HBM as a
//!   decode step does. In-place inputs are restored before every launch.
//! - [`MockRunner`] needs no GPU: a deterministic timing model per (op, template, knobs,
//!   shape) plus seeded noise, and deterministic build and correctness failures for some
//!   knob combinations, so CI exercises every branch of sampling, recording, statistics,
//!   reports and promotion.
//!
//! Why a trait with `begin_case` / `attempt`: the expensive per-case work (inputs, the CPU
//! reference, the production baseline) is done once per case and shared by its candidates,
//! which is also what makes the candidates' timings comparable.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Instant, SystemTime};

use super::attempts::{self, Appender, Attempt, BenchInfo, BuildInfo, CampaignInfo, CorrectnessInfo, Status};
use super::knobs::{self, Knobs};
use super::ops::{CheckResult, Data, OpId, Role, Shape, Tensor};
use super::sample::{Candidate, Case, SampleSpec, sample};
use super::stats;
use super::templates::{self, Launch, Rendered};
use super::{Bucket, Numerics};
use crate::error::{Error, Result};
use crate::rng::{Rng, mix64};

/// Warm-up and timed launches per attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Untimed launches before timing.
    pub warmup: usize,
    /// Timed launches (each after an L2 flush).
    pub repeats: usize,
}

/// What ran the campaign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceDesc {
    /// `cuda` or `mock`.
    pub backend: String,
    /// GPU name.
    pub gpu: String,
    /// `sm_90`, or `mock`.
    pub arch: String,
    /// Driver version.
    pub driver: Option<String>,
}

/// The result of one attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Compilation.
    pub build: BuildInfo,
    /// Correctness (None if it did not build).
    pub correctness: Option<CorrectnessInfo>,
    /// Timing (None unless correct).
    pub bench: Option<BenchInfo>,
}

/// Something that can compile, check and time candidates.
pub trait Runner {
    /// The device (recorded in every attempt).
    fn device(&self) -> DeviceDesc;
    /// Prepares a case: inputs, reference, baseline. Returns a warning to show, if any.
    /// An error is fatal for the campaign.
    fn begin_case(&mut self, op: OpId, case: &Case) -> Result<Option<String>>;
    /// Builds, checks and times one candidate of the current case. Failures of the candidate
    /// are in the [`Outcome`]; an error means the device is unusable (fatal).
    fn attempt(&mut self, op: OpId, case: &Case, cand: &Candidate, src: &Rendered, s: &Settings) -> Result<Outcome>;
}

/// `t` or, if longer than `max` characters, its first `max` and a note.
fn truncate(t: &str, max: usize) -> String {
    if t.chars().count() <= max {
        t.to_string()
    } else {
        format!("{}… [truncated]", t.chars().take(max).collect::<String>())
    }
}

/// Timing statistics of repeat latencies (µs).
pub fn bench_info(us: &[f64], warmup: usize, bytes: f64, flops: f64) -> BenchInfo {
    let (p10, p50, p90) = stats::p10_50_90(us);
    BenchInfo {
        ok: true,
        warmup,
        repeats: us.len(),
        p10_us: p10,
        p50_us: p50,
        p90_us: p90,
        min_us: us.iter().cloned().fold(f64::INFINITY, f64::min),
        mean_us: us.iter().sum::<f64>() / us.len().max(1) as f64,
        gb_s: bytes / (p50 * 1e-6) / 1e9,
        gflop_s: flops / (p50 * 1e-6) / 1e9,
        error: None,
    }
}

// ---------------------------------------------------------------------------------------
// Mock

/// A deterministic stand-in for a GPU (see the module docs). Its model is public so tests
/// can state what a campaign must find.
#[derive(Debug, Clone)]
pub struct MockRunner {
    seed: u64,
}

impl MockRunner {
    /// A mock whose noise is seeded with `seed`.
    pub fn new(seed: u64) -> MockRunner {
        MockRunner { seed }
    }

    fn combo_hash(op: OpId, template: &str, k: &Knobs) -> u64 {
        knobs::fnv1a64(format!("{}/{template}/{}", op.name(), knobs::display(k)).as_bytes())
    }

    fn is_baseline(op: OpId, template: &str, k: &Knobs) -> bool {
        let (t, d) = templates::baseline(op);
        t.name == template && &d == k
    }

    /// Whether the mock fails to compile this combination (≈ 1 in 23; never the baseline).
    pub fn build_fails(op: OpId, template: &str, k: &Knobs) -> bool {
        !Self::is_baseline(op, template, k) && Self::combo_hash(op, template, k) % 23 == 7
    }

    /// Whether the mock computes wrong results with this combination (≈ 1 in 29).
    pub fn incorrect(op: OpId, template: &str, k: &Knobs) -> bool {
        !Self::is_baseline(op, template, k) && Self::combo_hash(op, template, k) % 29 == 11
    }

    /// The model's speed factor of a template relative to `t0` (< 1 is faster). Each op
    /// has a story: a template that wins one token bucket and ties elsewhere.
    pub fn factor(op: OpId, template: &str, k: &Knobs, s: &Shape) -> f64 {
        let b = Bucket::of(s.tokens);
        let kv = |n: &str| k.get(n).copied().unwrap_or(0);
        match (op, template) {
            // 1..8: vector loads win, more with wider vectors; elsewhere a tie.
            (OpId::MoeCombine, "t1_vec") if b == Bucket::Small => match kv("VEC") {
                8 => 0.80,
                4 => 0.86,
                _ => 0.93,
            },
            // 33..256: the row tile wins (the seeds' result), more with more rows per block.
            (OpId::MoeCombine, "t2_row_tile") if b == Bucket::Large => {
                if kv("ROWS") >= 4 {
                    0.72
                } else {
                    0.85
                }
            }
            // 9..32: the numerics-changing dual accumulator wins.
            (OpId::MoeCombine, "t3_dual_acc") if b == Bucket::Medium => 0.85,
            // Fewer registers scanned per round: faster everywhere, best at the smallest PER.
            (OpId::TopkGating, "t1_lane_regs") => {
                let waste = (32.0 * kv("PER") as f64 / s.experts as f64).max(1.0);
                0.6 + 0.05 * waste.log2()
            }
            (OpId::TopkGating, "t2_block") => {
                if b == Bucket::Small {
                    1.3
                } else {
                    0.95
                }
            }
            (OpId::GatherQmmSwiglu, "t2_grouped") => match b {
                Bucket::Small => 1.8,
                Bucket::Medium => 0.95,
                Bucket::Large => 0.45,
            },
            (OpId::GatherQmmSwiglu, "t1_split_k") => {
                if b == Bucket::Small {
                    0.85
                } else {
                    1.05
                }
            }
            (OpId::RmsnormResidual, "t1_warp_row") => {
                if b == Bucket::Small {
                    0.7
                } else {
                    1.1
                }
            }
            (OpId::RmsnormResidual, "t2_vec_block") if b == Bucket::Large => 0.9,
            (OpId::RmsnormResidual, "t0_block") if kv("TPB") != 256 => 1.04,
            _ => 1.0,
        }
    }

    /// Noise-free model latency: 2.5 µs launch + bytes at 3 TB/s, times [`MockRunner::factor`].
    pub fn model_us(op: OpId, template: &str, k: &Knobs, s: &Shape) -> f64 {
        (2.5 + op.bytes(s) / 3.0e6) * Self::factor(op, template, k, s)
    }
}

impl Runner for MockRunner {
    fn device(&self) -> DeviceDesc {
        DeviceDesc {
            backend: "mock".into(),
            gpu: "mock (deterministic timing model, no GPU)".into(),
            arch: "mock".into(),
            driver: None,
        }
    }

    fn begin_case(&mut self, _op: OpId, _case: &Case) -> Result<Option<String>> {
        Ok(None)
    }

    fn attempt(&mut self, op: OpId, case: &Case, cand: &Candidate, _src: &Rendered, s: &Settings) -> Result<Outcome> {
        let (t, k) = (cand.template.name, &cand.knobs);
        if Self::build_fails(op, t, k) {
            let error = format!(
                "mock: simulated NVRTC error for {}\nzmoe.cu(42): error: identifier \"MOCK\" is undefined",
                cand.template.label(k)
            );
            return Ok(Outcome {
                build: BuildInfo { ok: false, ms: 0.5, error: Some(error) },
                correctness: None,
                bench: None,
            });
        }
        let build = BuildInfo { ok: true, ms: 1.0, error: None };
        let numerics = cand.template.numerics(k);
        if Self::incorrect(op, t, k) {
            let check = CheckResult {
                ok: false,
                max_abs_err: 0.5,
                max_rel_err: 1.0,
                rel_l2: 0.3,
                bad_elements: 17,
                near_tie_swaps: 0,
                fail_reason: Some("mock: simulated wrong output (element 3 is 0.5 off)".into()),
            };
            let correctness = CorrectnessInfo { ok: false, check, bitexact_vs_baseline: Some(false) };
            return Ok(Outcome { build, correctness: Some(correctness), bench: None });
        }
        let err = if numerics == Numerics::Preserving { 0.0 } else { 0.0039 };
        let check =
            CheckResult { ok: true, max_abs_err: err, max_rel_err: err, rel_l2: err / 10.0, ..Default::default() };
        let correctness =
            CorrectnessInfo { ok: true, check, bitexact_vs_baseline: Some(numerics == Numerics::Preserving) };
        let mut r = Rng::for_stream(self.seed ^ mix64(case.input_seed), &format!("mock.{t}.{}", knobs::display(k)));
        let pos = case.candidates.iter().position(|c| c.template.name == t).unwrap_or(0);
        // Per-attempt offset (run-to-run variance) and a cold-start penalty for the first
        // kernel of a case: what randomising the order averages out.
        let base = Self::model_us(op, t, k, &case.shape)
            * (0.02 * r.normal() as f64).exp()
            * if pos == 0 { 1.03 } else { 1.0 };
        let us: Vec<f64> = (0..s.repeats.max(1)).map(|_| base * (0.03 * r.normal() as f64).exp()).collect();
        let bench = bench_info(&us, s.warmup, op.bytes(&case.shape), op.flops(&case.shape));
        Ok(Outcome { build, correctness: Some(correctness), bench: Some(bench) })
    }
}

// ---------------------------------------------------------------------------------------
// CUDA

/// Bytes written between timed repeats to evict the L2 cache.
pub const L2_FLUSH_BYTES: usize = 256 << 20;

struct CaseState {
    shape: Shape,
    inputs: Vec<Tensor>,
    ptrs: Vec<u64>,
    /// Device copies of in-place tensors' initial contents (index → copy).
    pristine: Vec<(usize, u64)>,
    want: Vec<Data>,
    baseline: Vec<Data>,
    mark: usize,
}

/// Compiles, checks and times candidates on GPU 0 (see the module docs).
pub struct CudaRunner {
    dev: crate::cuda::Device,
    flush: u64,
    /// Build result per source hash: each distinct source is compiled and loaded once.
    modules: HashMap<String, std::result::Result<crate::cuda::Module, String>>,
    case: Option<CaseState>,
}

impl CudaRunner {
    /// Opens the GPU (an error if there is none) and allocates the L2-flush buffer.
    pub fn new() -> Result<CudaRunner> {
        let mut dev = crate::cuda::Device::open()?;
        let flush = dev.alloc(L2_FLUSH_BYTES)?;
        Ok(CudaRunner { dev, flush, modules: HashMap::new(), case: None })
    }

    /// Compiles and loads `src` (cached by hash); the error text if it fails.
    fn build(&mut self, op: OpId, src: &Rendered) -> std::result::Result<(), String> {
        if !self.modules.contains_key(&src.hash) {
            let name = op.kernel_name();
            let m = self.dev.load_module(&src.source, &[&name]).map_err(|e| match e {
                Error::Compile { log } => truncate(&format!("NVRTC: {log}"), 4000),
                other => truncate(&other.to_string(), 4000),
            });
            self.modules.insert(src.hash.clone(), m);
        }
        self.modules[&src.hash].as_ref().map(|_| ()).map_err(|e| e.clone())
    }

    fn launch(&self, op: OpId, hash: &str, l: Launch) -> Result<()> {
        let st = self.case.as_ref().ok_or_else(|| Error::Cuda("no case prepared".into()))?;
        let m = self.modules[hash].as_ref().map_err(|e| Error::Cuda(e.clone()))?;
        let args = op.kernel_args(&st.shape, &st.ptrs);
        self.dev.launch_in(m, &op.kernel_name(), (l.grid[0], l.grid[1], l.grid[2]), l.block, &args)
    }

    /// Restores in-place tensors and, if `poison`, fills outputs with 0xFF bytes (NaN).
    fn reset_io(&self, poison: bool) -> Result<()> {
        let st = self.case.as_ref().ok_or_else(|| Error::Cuda("no case prepared".into()))?;
        for &(i, copy) in &st.pristine {
            self.dev.copy(st.ptrs[i], copy, st.inputs[i].data.bytes())?;
        }
        if poison {
            for (t, &p) in st.inputs.iter().zip(&st.ptrs) {
                if t.role == Role::Out {
                    self.dev.fill(p, 0xFF, t.data.bytes())?;
                }
            }
        }
        Ok(())
    }

    /// Reads every Out / InOut tensor back.
    fn read_outputs(&self) -> Result<Vec<Data>> {
        let st = self.case.as_ref().ok_or_else(|| Error::Cuda("no case prepared".into()))?;
        let mut out = Vec::new();
        for (t, &p) in st.inputs.iter().zip(&st.ptrs) {
            if t.role == Role::In {
                continue;
            }
            let mut d = t.data.zeros_like();
            match &mut d {
                Data::Bf16(v) => self.dev.read(p, v)?,
                Data::F32(v) => self.dev.read(p, v)?,
                Data::I32(v) => self.dev.read(p, v)?,
                Data::U32(v) => self.dev.read(p, v)?,
            }
            out.push(d);
        }
        Ok(out)
    }

    /// One correctness launch: poisoned outputs, restored inputs; the outputs, or the
    /// launch error.
    fn run_once(&self, op: OpId, hash: &str, l: Launch) -> Result<std::result::Result<Vec<Data>, String>> {
        self.reset_io(true)?;
        if let Err(e) = self.launch(op, hash, l) {
            self.dev.sync()?; // a sticky error (the context is gone) is fatal
            return Ok(Err(format!("launch failed: {e}")));
        }
        match self.dev.sync() {
            Ok(()) => Ok(Ok(self.read_outputs()?)),
            Err(e) => Err(Error::Cuda(format!("the kernel faulted and the CUDA context is lost: {e}"))),
        }
    }
}

impl Runner for CudaRunner {
    fn device(&self) -> DeviceDesc {
        DeviceDesc {
            backend: "cuda".into(),
            gpu: self.dev.name.clone(),
            arch: self.dev.arch(),
            driver: Some(self.dev.driver.clone()),
        }
    }

    fn begin_case(&mut self, op: OpId, case: &Case) -> Result<Option<String>> {
        if let Some(old) = self.case.take() {
            self.dev.release_to(old.mark)?;
        }
        let s = &case.shape;
        let inputs = op.inputs(s, case.input_seed);
        let want = op.reference(s, &inputs);
        let mark = self.dev.mark();
        let mut ptrs = Vec::with_capacity(inputs.len());
        let mut pristine = Vec::new();
        for (i, t) in inputs.iter().enumerate() {
            let p = match &t.data {
                Data::Bf16(v) => self.dev.upload(v)?,
                Data::F32(v) => self.dev.upload(v)?,
                Data::I32(v) => self.dev.upload(v)?,
                Data::U32(v) => self.dev.upload(v)?,
            };
            if t.role == Role::InOut {
                let copy = self.dev.alloc(t.data.bytes())?;
                self.dev.copy(copy, p, t.data.bytes())?;
                pristine.push((i, copy));
            }
            ptrs.push(p);
        }
        self.case = Some(CaseState { shape: s.clone(), inputs, ptrs, pristine, want, baseline: Vec::new(), mark });
        // The production configuration on the same inputs: what preserving candidates must equal.
        let (bt, bk) = templates::baseline(op);
        let src = bt.render(&bk).map_err(|e| Error::Cuda(format!("rendering the baseline {}: {e}", bt.label(&bk))))?;
        self.build(op, &src).map_err(|e| Error::Cuda(format!("the baseline {} does not build: {e}", bt.label(&bk))))?;
        let out = self
            .run_once(op, &src.hash, (bt.launch)(s, &bk))?
            .map_err(|e| Error::Cuda(format!("the baseline {}: {e}", bt.label(&bk))))?;
        let st = self.case.as_mut().expect("just set");
        let check = op.check(s, &st.inputs, &st.want, &out);
        st.baseline = out;
        Ok((!check.ok).then(|| {
            format!(
                "warning: case {}: the production configuration {} itself is outside tolerance of the CPU reference: {}",
                case.index,
                bt.label(&bk),
                check.fail_reason.unwrap_or_default()
            )
        }))
    }

    fn attempt(&mut self, op: OpId, case: &Case, cand: &Candidate, src: &Rendered, s: &Settings) -> Result<Outcome> {
        let t0 = Instant::now();
        let built = self.build(op, src);
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        if let Err(e) = built {
            return Ok(Outcome { build: BuildInfo { ok: false, ms, error: Some(e) }, correctness: None, bench: None });
        }
        let build = BuildInfo { ok: true, ms, error: None };
        let l = (cand.template.launch)(&case.shape, &cand.knobs);
        let fail = |why: String| CorrectnessInfo {
            ok: false,
            check: CheckResult { fail_reason: Some(why), ..Default::default() },
            bitexact_vs_baseline: None,
        };
        let got = match self.run_once(op, &src.hash, l)? {
            Ok(g) => g,
            Err(e) => return Ok(Outcome { build, correctness: Some(fail(e)), bench: None }),
        };
        let st = self.case.as_ref().expect("begin_case ran");
        let mut check = op.check(&case.shape, &st.inputs, &st.want, &got);
        let diff: usize = got
            .iter()
            .zip(&st.baseline)
            .map(|(a, b)| match (a, b) {
                (Data::Bf16(x), Data::Bf16(y)) => x.iter().zip(y).filter(|(p, q)| p != q).count(),
                (Data::F32(x), Data::F32(y)) => x.iter().zip(y).filter(|(p, q)| p.to_bits() != q.to_bits()).count(),
                (Data::I32(x), Data::I32(y)) => x.iter().zip(y).filter(|(p, q)| p != q).count(),
                _ => usize::MAX / 4,
            })
            .sum();
        let bitexact = diff == 0;
        let numerics = cand.template.numerics(&cand.knobs);
        let mut ok = check.ok;
        if check.ok && numerics == Numerics::Preserving && !bitexact {
            ok = false;
            let (bt, bk) = templates::baseline(op);
            check.fail_reason = Some(format!(
                "declared numerics-preserving, but {diff} output elements differ from the production configuration {}",
                bt.label(&bk)
            ));
        }
        let correctness = CorrectnessInfo { ok, check, bitexact_vs_baseline: Some(bitexact) };
        if !ok {
            return Ok(Outcome { build, correctness: Some(correctness), bench: None });
        }
        // Timing: warm-up, then each repeat after restoring in-place inputs and flushing L2.
        let (e0, e1) = (self.dev.event()?, self.dev.event()?);
        let mut us = Vec::with_capacity(s.repeats);
        let mut error = None;
        for i in 0..s.warmup + s.repeats {
            self.reset_io(false)?;
            let timed = i >= s.warmup;
            if timed {
                self.dev.fill(self.flush, (i & 0xFF) as u8, L2_FLUSH_BYTES)?;
                self.dev.record(&e0)?;
            }
            if let Err(e) = self.launch(op, &src.hash, l) {
                error = Some(format!("launch failed while timing: {e}"));
                break;
            }
            if timed {
                self.dev.record(&e1)?;
                us.push(self.dev.elapsed_ms(&e0, &e1)? as f64 * 1e3);
            }
        }
        self.dev.sync()?;
        let bench = match error {
            Some(e) => BenchInfo { ok: false, error: Some(e), ..bench_info(&[f64::NAN], s.warmup, 0.0, 0.0) },
            None => bench_info(&us, s.warmup, op.bytes(&case.shape), op.flops(&case.shape)),
        };
        Ok(Outcome { build, correctness: Some(correctness), bench: Some(bench) })
    }
}

// ---------------------------------------------------------------------------------------
// The campaign loop

/// What a campaign did.
#[derive(Debug, Clone, PartialEq)]
pub struct CampaignSummary {
    /// Campaign id (cases are matched within it).
    pub id: String,
    /// Attempts written.
    pub attempts: usize,
    /// Attempts per status.
    pub by_status: Vec<(Status, usize)>,
    /// The device.
    pub device: DeviceDesc,
}

/// Samples `spec`'s cases and runs every candidate of every case on `runner`, appending one
/// line per attempt to `ledger` as it goes; `progress` gets one line per case.
pub fn run_campaign(
    runner: &mut dyn Runner,
    spec: &SampleSpec,
    settings: &Settings,
    ledger: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<CampaignSummary> {
    if spec.templates.is_empty() || spec.presets.is_empty() || spec.cases == 0 {
        return Err(Error::Arg("a campaign needs at least one template, one preset and one case".into()));
    }
    if settings.repeats == 0 {
        return Err(Error::Arg("--repeats must be at least 1".into()));
    }
    let op = spec.op;
    let dev = runner.device();
    let prov = crate::bench::Provenance::now();
    let started = crate::bench::rfc3339_utc(SystemTime::now());
    // Unique even for two campaigns started in the same second with the same seed.
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let tag = mix64(nanos as u64 ^ ((std::process::id() as u64) << 32)) & 0xffff;
    let id = format!("{}-s{}-{tag:04x}", started.replace(':', ""), spec.seed);
    let cases = sample(spec);
    let mut out = Appender::open(ledger)?;
    let mut counts: HashMap<Status, usize> = HashMap::new();
    let mut written = 0usize;
    for case in &cases {
        if let Some(w) = runner.begin_case(op, case)? {
            progress(&w);
        }
        let order: Vec<String> = case.candidates.iter().map(|c| c.template.name.to_string()).collect();
        let mut line = Vec::new();
        for (pos, cand) in case.candidates.iter().enumerate() {
            let numerics = cand.template.numerics(&cand.knobs);
            let (outcome, hash) = match cand.template.render(&cand.knobs) {
                Ok(src) => (runner.attempt(op, case, cand, &src, settings)?, src.hash),
                Err(e) => (
                    Outcome {
                        build: BuildInfo { ok: false, ms: 0.0, error: Some(format!("render: {e}")) },
                        correctness: None,
                        bench: None,
                    },
                    String::new(),
                ),
            };
            let a = Attempt {
                schema_version: attempts::SCHEMA_VERSION,
                id: format!("{id}/{}/{}", case.index, cand.template.name),
                ts: crate::bench::rfc3339_utc(SystemTime::now()),
                campaign: CampaignInfo {
                    id: id.clone(),
                    seed: spec.seed,
                    mode: spec.mode.name().into(),
                    case: case.index,
                    case_mode: case.mode.name().into(),
                    order_pos: pos,
                    order: order.clone(),
                },
                op: op.name().into(),
                template: cand.template.name.into(),
                knobs: cand.knobs.clone(),
                numerics,
                shape: case.shape.clone(),
                dtype: op.dtype().into(),
                source_hash: hash,
                launch: Some((cand.template.launch)(&case.shape, &cand.knobs)),
                backend: dev.backend.clone(),
                gpu: dev.gpu.clone(),
                arch: dev.arch.clone(),
                driver: dev.driver.clone(),
                build: outcome.build,
                correctness: outcome.correctness,
                bench: outcome.bench,
                bytes: op.bytes(&case.shape),
                flops: op.flops(&case.shape),
                zmoe_version: prov.zmoe_version.clone(),
                git_commit: prov.git_commit.clone(),
            };
            out.append(&a)?;
            written += 1;
            let st = a.status();
            *counts.entry(st).or_default() += 1;
            line.push(match st {
                Status::Ok => format!("{} {:.2} µs", cand.template.label(&cand.knobs), a.p50().unwrap_or(f64::NAN)),
                Status::BuildError => format!("{} BUILD ERROR", cand.template.label(&cand.knobs)),
                Status::Incorrect => format!("{} INCORRECT", cand.template.label(&cand.knobs)),
                Status::BenchError => format!("{} BENCH ERROR", cand.template.label(&cand.knobs)),
            });
        }
        progress(&format!("case {}/{} {}: {}", case.index + 1, cases.len(), case.shape.describe(op), line.join(" · ")));
    }
    let mut by_status: Vec<(Status, usize)> = counts.into_iter().collect();
    by_status.sort();
    Ok(CampaignSummary { id, attempts: written, by_status, device: dev })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::foundry::attempts::read;
    use crate::foundry::ops::PRESETS;
    use crate::foundry::sample::Mode;
    use crate::foundry::templates::for_op;

    #[test]
    fn mock_campaign_writes_one_line_per_attempt_with_every_status() {
        let tmp = tempfile::tempdir().unwrap();
        let ledger = tmp.path().join("attempts.ndjson");
        let mut total = 0;
        for op in OpId::ALL {
            let spec = SampleSpec {
                op,
                mode: Mode::Coverage,
                cases: 40,
                seed: 5,
                templates: for_op(op),
                presets: PRESETS.iter().collect(),
                max_tokens: 256,
                pinned: Default::default(),
            };
            let mut lines = Vec::new();
            let sum =
                run_campaign(&mut MockRunner::new(1), &spec, &Settings { warmup: 2, repeats: 5 }, &ledger, &mut |l| {
                    lines.push(l.to_string())
                })
                .unwrap();
            assert_eq!(lines.len(), 40);
            assert!(lines[0].starts_with("case 1/40 "), "{}", lines[0]);
            total += sum.attempts;
        }
        let (got, bad) = read(&ledger).unwrap();
        assert!(bad.is_empty());
        assert_eq!(got.len(), total);
        for st in [Status::Ok, Status::BuildError, Status::Incorrect] {
            assert!(got.iter().any(|a| a.status() == st), "no attempt with {st:?}");
        }
        let a = got.iter().find(|a| a.status() == Status::Ok).unwrap();
        let b = a.bench.as_ref().unwrap();
        assert!(b.p10_us <= b.p50_us && b.p50_us <= b.p90_us && b.gb_s > 0.0 && b.repeats == 5);
        assert!(a.source_hash.starts_with("fnv1a64:") && a.launch.is_some() && a.arch == "mock");
        // Mock failures are deterministic per knob combination.
        for a in &got {
            let op = OpId::parse(&a.op).unwrap();
            assert_eq!(a.status() == Status::BuildError, MockRunner::build_fails(op, &a.template, &a.knobs));
        }
    }
}
