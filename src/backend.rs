//! The backend interface and model loading.
//!
//! A backend is small on purpose (candle's lesson): run some tokens through the plan,
//! append them to the cache, hand back logits. Generation, validation and benchmarks are
//! written once against [`Backend`] and work on every device.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::cpu::CpuBackend;
use crate::cuda::CudaBackend;
use crate::error::{Error, Result};
use crate::model::Weights;
use crate::plan::Plan;
use crate::sample::Sampler;

/// Executes a plan for one sequence.
pub trait Backend {
    /// Human-readable device description (e.g. `cpu (2 threads)`).
    fn name(&self) -> String;
    /// The model's config.
    fn config(&self) -> &ModelConfig;
    /// Tokens already in the KV cache.
    fn position(&self) -> usize;
    /// The most tokens the KV cache holds (`--ctx`; at most the model's
    /// `max_position_embeddings`). [`crate::generate::generate`] stops there.
    fn max_context(&self) -> usize {
        self.config().max_position_embeddings
    }
    /// Empties the KV cache.
    fn reset(&mut self);
    /// The plan being run.
    fn plan(&self) -> &Plan;
    /// Runs `plan` from now on (same weights and buffers); empties the KV cache.
    fn set_plan(&mut self, plan: Plan);
    /// Runs `tokens` at positions `position()..position()+T` and appends them to the cache.
    /// Returns logits `[T, V]` if `all_logits`, else `[1, V]` for the last token.
    fn forward(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>>;
    /// Runs `tokens` like [`Backend::forward`] and picks the next token from the last row's
    /// logits with `sampler`. Backends that can sample on the device override this and skip
    /// copying the logits to the host.
    fn forward_sample(&mut self, tokens: &[u32], sampler: &mut Sampler) -> Result<u32> {
        let logits = self.forward(tokens, false)?;
        Ok(sampler.sample(&logits))
    }
    /// Whether [`Backend::profile_decode`] is supported.
    fn supports_profile(&self) -> bool {
        false
    }
    /// Per-step time of one decode step at the current position, in plan order (CUDA only).
    fn profile_decode(&mut self, replays: usize) -> Result<Vec<StepTime>> {
        let _ = replays;
        Err(Error::Unavailable(format!("per-step decode profile: not supported by the {} backend", self.name())))
    }
    /// Describes the device: name, driver version, total memory.
    fn device_info(&self) -> DeviceInfo {
        DeviceInfo::host()
    }
    /// Peak device memory in use since the backend was created, if tracked (bytes).
    fn peak_memory(&self) -> Option<usize> {
        None
    }
    /// Measures copy bandwidth in GB/s (bytes read + bytes written per second) — the roofline.
    fn measure_copy_bandwidth(&mut self) -> Result<f64> {
        measure_host_copy_bandwidth()
    }
}

/// Time of one step of a profiled decode step.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepTime {
    /// [`Step::kind`](crate::plan::Step::kind), e.g. `linear q`.
    pub kind: String,
    /// Microseconds (mean over replays).
    pub us: f64,
}

/// What a backend runs on, as recorded in benchmark capsules.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceInfo {
    /// Device name, e.g. `NVIDIA H200` or the CPU model.
    pub name: String,
    /// Driver version, where there is one (GPUs).
    pub driver: Option<String>,
    /// Total device memory in bytes, if known (system RAM for the host).
    pub memory_bytes: Option<u64>,
}

impl DeviceInfo {
    /// The host CPU: its model name from `/proc/cpuinfo` (`cpu` if unreadable) and
    /// `MemTotal` from `/proc/meminfo`.
    pub fn host() -> DeviceInfo {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        DeviceInfo {
            name: cpu_model_name(&cpuinfo).unwrap_or_else(|| "cpu".into()),
            driver: None,
            memory_bytes: mem_total_bytes(&meminfo),
        }
    }
}

/// The first `model name` (x86) or `Model`/`Hardware` (some ARM kernels) line of `/proc/cpuinfo`.
fn cpu_model_name(cpuinfo: &str) -> Option<String> {
    ["model name", "Model", "Hardware"].iter().find_map(|key| {
        cpuinfo.lines().find_map(|line| {
            let (k, v) = line.split_once(':')?;
            let v = v.trim();
            (k.trim() == *key && !v.is_empty()).then(|| v.split_whitespace().collect::<Vec<_>>().join(" "))
        })
    })
}

/// `MemTotal:  16318256 kB` → bytes.
fn mem_total_bytes(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut parts = line["MemTotal:".len()..].split_whitespace();
    let n: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") | None => n.checked_mul(1024),
        _ => None,
    }
}

/// Host memory copy bandwidth in GB/s, counting bytes read + bytes written.
///
/// Copies a 256 MiB buffer a few times with `copy_from_slice` — split into chunks over the
/// rayon pool, since the CPU backend also reads its weights from every thread — and keeps
/// the best pass. The first pass also faults the pages in and is not counted.
pub fn measure_host_copy_bandwidth() -> Result<f64> {
    use rayon::prelude::*;
    const BYTES: usize = 256 << 20;
    const PASSES: usize = 5;
    let alloc = |fill: u8| -> Result<Vec<u8>> {
        let mut v = Vec::new();
        v.try_reserve_exact(BYTES).map_err(|e| {
            Error::Unavailable(format!("cannot allocate {} MiB to measure copy bandwidth: {e}", BYTES >> 20))
        })?;
        v.resize(BYTES, fill);
        Ok(v)
    };
    let src = alloc(1)?;
    let mut dst = alloc(0)?;
    let chunk = BYTES.div_ceil(rayon::current_num_threads().max(1) * 4).next_multiple_of(4096);
    let mut best = f64::INFINITY;
    for pass in 0..=PASSES {
        let t = std::time::Instant::now();
        dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s));
        std::hint::black_box(&mut dst);
        let secs = t.elapsed().as_secs_f64();
        if pass > 0 {
            best = best.min(secs);
        }
    }
    if dst[BYTES - 1] != 1 {
        return Err(Error::Unavailable("copy-bandwidth test: the copy did not happen".into()));
    }
    Ok(2.0 * BYTES as f64 / best.max(1e-9) / 1e9)
}

/// Which device to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// The best available (CUDA when present, else CPU).
    Auto,
    /// The f32 CPU reference.
    Cpu,
    /// NVIDIA GPU.
    Cuda,
}

impl std::str::FromStr for BackendKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<BackendKind> {
        match s {
            "auto" => Ok(BackendKind::Auto),
            "cpu" => Ok(BackendKind::Cpu),
            "cuda" => Ok(BackendKind::Cuda),
            _ => Err(Error::Arg(format!("unknown backend `{s}` (expected auto, cpu or cuda)"))),
        }
    }
}

/// A loaded model: checkpoint (memory-mapped) and typed weights.
pub struct Model {
    /// The opened checkpoint.
    pub checkpoint: Checkpoint,
    /// Its weights, shared with backends.
    pub weights: Arc<Weights>,
}

impl Model {
    /// Opens a model folder and checks every tensor the plan needs.
    pub fn load(dir: &Path) -> Result<Model> {
        let checkpoint = Checkpoint::open(dir)?;
        let weights = Arc::new(Weights::load(&checkpoint)?);
        Ok(Model { checkpoint, weights })
    }

    /// The config.
    pub fn config(&self) -> &ModelConfig {
        &self.checkpoint.config
    }

    /// `tokenizer.json` beside the weights.
    pub fn tokenizer_path(&self) -> PathBuf {
        self.checkpoint.dir.join("tokenizer.json")
    }

    /// A backend of the given kind running `plan` (CUDA decode graph-captured).
    pub fn backend(&self, kind: BackendKind, plan: Plan) -> Result<Box<dyn Backend>> {
        self.backend_with(kind, plan, true)
    }

    /// Like [`Model::backend`]; `cuda_graph: false` launches every decode kernel eagerly.
    pub fn backend_with(&self, kind: BackendKind, plan: Plan, cuda_graph: bool) -> Result<Box<dyn Backend>> {
        self.backend_ctx(kind, plan, cuda_graph, None)
    }

    /// Like [`Model::backend_with`], with a context of `ctx` tokens (`--ctx`; default: the
    /// model's `max_position_embeddings`, on CUDA at most 8192 and what fits in free memory).
    pub fn backend_ctx(
        &self,
        kind: BackendKind,
        plan: Plan,
        cuda_graph: bool,
        ctx: Option<usize>,
    ) -> Result<Box<dyn Backend>> {
        let mpe = self.config().max_position_embeddings;
        if let Some(n) = ctx
            && (n == 0 || n > mpe)
        {
            return Err(Error::Arg(format!(
                "--ctx {n}: the context must be 1..={mpe} tokens (the model's max_position_embeddings)"
            )));
        }
        let cuda = |plan| CudaBackend::with_context(self.config().clone(), &self.weights, plan, cuda_graph, ctx);
        match kind {
            BackendKind::Cpu => {
                let cpu = CpuBackend::new(self.config().clone(), self.weights.clone(), plan);
                Ok(Box::new(cpu.with_max_context(ctx.unwrap_or(mpe))))
            }
            BackendKind::Cuda => Ok(Box::new(cuda(plan)?)),
            // The best available: CUDA when a GPU can run this model, else the CPU.
            BackendKind::Auto => match cuda(plan.clone()) {
                Ok(b) => Ok(Box::new(b)),
                Err(Error::Unavailable(_)) => self.backend_ctx(BackendKind::Cpu, plan, cuda_graph, ctx),
                Err(e) => Err(e),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let cpu = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R)  CPU @ 2.20GHz\n";
        assert_eq!(cpu_model_name(cpu).as_deref(), Some("Intel(R) Xeon(R) CPU @ 2.20GHz"));
        assert_eq!(cpu_model_name("processor : 0\n"), None);
        assert_eq!(mem_total_bytes("MemTotal:       16318256 kB\nMemFree: 1 kB\n"), Some(16318256 * 1024));
        assert_eq!(mem_total_bytes("MemFree: 1 kB\n"), None);
        let host = DeviceInfo::host();
        assert!(!host.name.is_empty());
    }
}
