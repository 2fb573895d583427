//! The backend interface: what every executor (CPU, CUDA) offers. Loading a model and
//! picking a backend is [`crate::runtime`]'s job, above the executors.
//!
//! A backend is small on purpose (candle's lesson): run some tokens through the plan,
//! append them to the cache, hand back logits. Generation, validation and benchmarks are
//! written once against [`Backend`] and work on every device.
//!
//! Serving many sequences at once adds *slots*: a backend may hold several sequences, each
//! its own per-layer cache and position, and [`Backend::forward_rows`] runs one batch of
//! [`Row`]s, each naming its slot and position. A prompt's prefill (rows of one slot at
//! consecutive positions) and a batched decode step (one row per slot) are the same call, so
//! continuous batching mixes them freely. Row-wise steps (linears, norms, experts) run over
//! every row; rope, the cache append and attention use each row's own slot and position.
//! A row's arithmetic never depends on the other rows in the batch (batch invariance).
//! [`Backend::forward`] is slot 0, so single-sequence callers see no slots at all.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::plan::Plan;
use crate::plan::lower::{BATCH_ROWS, ExecPlans};
use crate::sample::Sampler;

/// One row of a batched forward ([`Backend::forward_rows`]): `token` of the sequence in
/// `slot`, at position `pos` of that sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    /// The sequence slot (`0..slots()`).
    pub slot: usize,
    /// Position in that sequence: the slot's rows in a batch are at consecutive positions
    /// starting at [`Backend::slot_position`].
    pub pos: usize,
    /// Token id.
    pub token: u32,
    /// Whether this row's logits are returned.
    pub logits: bool,
    /// The row is a token of a prompt of more than [`BATCH_ROWS`] tokens ([`long_prompt`]).
    /// A backend may run such rows on its throughput kernels (CUDA: tensor cores), whose sums
    /// run in another order than decode's; it computes every such row the same way whatever
    /// the batch and the chunking, so batch invariance holds. Rows of shorter prompts and
    /// decode rows stay bit-identical to one-token decode (batched decode and exact
    /// speculative verification rely on it). All rows of one slot in a batch share the flag.
    ///
    /// The flag belongs to the whole prompt: a caller feeding a prompt in chunks sets it from
    /// the prompt's length on every chunk (the server does). [`Backend::forward`] treats the
    /// tokens of each call as a prompt of their own, so a 17-token prompt fed as 16 + 1
    /// tokens is two short prompts (exact), and fed at once is one long prompt.
    pub long_prompt: bool,
}

impl Row {
    /// The rows of `tokens` — a chunk of a prompt of `prompt_len` tokens — fed to `slot` from
    /// position `pos0` (logits for every row with `all_logits`, else for the last), flagged
    /// [`Row::long_prompt`] by the whole prompt's length.
    pub fn of_tokens(slot: usize, pos0: usize, tokens: &[u32], prompt_len: usize, all_logits: bool) -> Vec<Row> {
        let (n, long_prompt) = (tokens.len(), long_prompt(prompt_len));
        (tokens.iter().enumerate())
            .map(|(i, &token)| Row { slot, pos: pos0 + i, token, logits: all_logits || i + 1 == n, long_prompt })
            .collect()
    }
}

/// Whether a prompt of `tokens` tokens is long: more than [`BATCH_ROWS`], the most rows the
/// batch plan (and its bit-exactness with decode) is built for.
pub fn long_prompt(tokens: usize) -> bool {
    tokens > BATCH_ROWS
}

/// Executes a plan for one sequence, or for several in slots.
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
    /// The plan being run, as chosen (reference or patched).
    fn plan(&self) -> &Plan;
    /// What actually runs for it on this backend: the prefill and decode plans
    /// ([`crate::plan::lower`]), built once when the plan is set.
    fn exec_plans(&self) -> &ExecPlans;
    /// Runs `plan` from now on (same weights and buffers); empties the KV cache. A plan that
    /// names weights the model lacks is an error.
    fn set_plan(&mut self, plan: Plan) -> Result<()>;
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
    /// Sequence slots this backend holds ([`Backend::set_slots`]; 1 when built).
    fn slots(&self) -> usize;
    /// Holds `n ≥ 1` sequence slots from now on, all empty.
    fn set_slots(&mut self, n: usize) -> Result<()>;
    /// Runs the routed experts split over `n` expert-parallel ranks ([`crate::parallel`]),
    /// bit-identical to one rank. Only the CPU backend simulates ranks (in one process);
    /// elsewhere this is [`Error::Unavailable`].
    fn set_ranks(&mut self, n: usize) -> Result<()> {
        Err(Error::Unavailable(format!(
            "--ranks {n}: expert-parallel ranks are simulated on the CPU backend only (--backend cpu); \
             multi-GPU expert parallelism is not built"
        )))
    }
    /// Tokens already in slot `slot`'s cache (slot 0 is [`Backend::position`]).
    fn slot_position(&self, slot: usize) -> usize;
    /// Empties slot `slot`'s cache.
    fn reset_slot(&mut self, slot: usize);
    /// Runs one batch of rows (any slots, each slot's rows at consecutive positions from
    /// [`Backend::slot_position`], in order) and appends every row to its slot's cache.
    /// Returns the logits `[R, V]` of the `R` rows with `logits` set, in row order (at least
    /// one row must ask). Checked by [`check_rows`]; a failed forward leaves every slot's
    /// position as it was.
    fn forward_rows(&mut self, rows: &[Row]) -> Result<Vec<f32>>;
    /// Whether [`Backend::profile_decode`] is supported.
    fn supports_profile(&self) -> bool {
        false
    }
    /// Per-step time of one decode step at the current position, in plan order (CUDA only).
    fn profile_decode(&mut self, replays: usize) -> Result<Vec<StepTime>> {
        let _ = replays;
        Err(Error::Unavailable(format!("per-step decode profile: not supported by the {} backend", self.name())))
    }
    /// Per-step time of one prompt chunk (the first chunk of `tokens`) at the current
    /// position, in the order of the plan that chunk runs (CUDA only); the position and every
    /// state stay as they were.
    fn profile_prefill(&mut self, tokens: &[u32]) -> Result<Vec<StepTime>> {
        let _ = tokens;
        Err(Error::Unavailable(format!("per-step prefill profile: not supported by the {} backend", self.name())))
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

/// Rejects empty input, out-of-vocabulary ids and contexts beyond the model's limit.
pub fn check_tokens(cfg: &ModelConfig, tokens: &[u32], pos: usize) -> Result<()> {
    if tokens.is_empty() {
        return Err(Error::Arg("no input tokens".into()));
    }
    if let Some(&bad) = tokens.iter().find(|&&x| x as usize >= cfg.vocab_size) {
        return Err(Error::Arg(format!("token id {bad} is outside the vocabulary (size {})", cfg.vocab_size)));
    }
    if pos + tokens.len() > cfg.max_position_embeddings {
        return Err(Error::Arg(format!(
            "context of {} tokens exceeds max_position_embeddings {}",
            pos + tokens.len(),
            cfg.max_position_embeddings
        )));
    }
    Ok(())
}

/// Checks a batch for [`Backend::forward_rows`]: not empty, at least one row asking for
/// logits, every slot below `slots`, every token in the vocabulary, each slot's rows at
/// consecutive positions starting at `position(slot)` and inside the context of `ctx` tokens,
/// sharing one [`Row::long_prompt`] flag.
pub fn check_rows(
    cfg: &ModelConfig,
    rows: &[Row],
    slots: usize,
    ctx: usize,
    position: impl Fn(usize) -> usize,
) -> Result<()> {
    if rows.is_empty() {
        return Err(Error::Arg("no input rows".into()));
    }
    if !rows.iter().any(|r| r.logits) {
        return Err(Error::Arg("no row asks for logits".into()));
    }
    let mut next: Vec<Option<usize>> = vec![None; slots];
    let mut flags: Vec<Option<bool>> = vec![None; slots];
    for r in rows {
        if r.slot >= slots {
            return Err(Error::Arg(format!("slot {} does not exist (the backend holds {slots})", r.slot)));
        }
        if r.token as usize >= cfg.vocab_size {
            return Err(Error::Arg(format!(
                "token id {} is outside the vocabulary (size {})",
                r.token, cfg.vocab_size
            )));
        }
        if *flags[r.slot].get_or_insert(r.long_prompt) != r.long_prompt {
            return Err(Error::Arg(format!("slot {}: rows with and without the long-prompt flag", r.slot)));
        }
        let want = *next[r.slot].get_or_insert_with(|| position(r.slot));
        if r.pos != want {
            return Err(Error::Arg(format!("slot {}: row at position {} where {want} comes next", r.slot, r.pos)));
        }
        if r.pos >= ctx {
            return Err(Error::Arg(format!(
                "slot {}: position {} is beyond the context of {ctx} tokens",
                r.slot, r.pos
            )));
        }
        next[r.slot] = Some(want + 1);
    }
    Ok(())
}

/// Time of one step of a profiled decode step.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepTime {
    /// [`Step::kind`](crate::plan::Step::kind), e.g. `linear q`.
    pub kind: String,
    /// Microseconds (mean over replays).
    pub us: f64,
    /// Bytes the step reads (weights and cache; filled in by `zmoe bench`, 0 if unknown).
    #[serde(default)]
    pub bytes: usize,
    /// Floating-point operations of the step (prompt-chunk profiles; filled in by `zmoe
    /// bench`, 0 if unknown).
    #[serde(default)]
    pub flops: f64,
}

impl StepTime {
    /// `us` microseconds of `step`, its bytes and operations not yet counted.
    pub fn of(step: &crate::plan::Step, us: f64) -> StepTime {
        StepTime { kind: step.kind(), us, bytes: 0, flops: 0.0 }
    }
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
