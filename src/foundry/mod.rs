//! The kernel foundry: kernel *templates* with knobs, sampled into candidates, compiled,
//! checked against the CPU, timed honestly, and promoted into a per-GPU kernel pack only on
//! statistical evidence (the seeds' `zmlx.foundry` and `zmlx.kd`, inventory §5).
//!
//! ```text
//!  ops (CPU reference, inputs, shapes, bytes)      templates/<op>/<t>.cu with {{KNOB}}s
//!             │                                              │ knobs::render → source + hash
//!             ▼                                              ▼
//!  sample: cases = (shape, one candidate per template, random order)
//!             │
//!             ▼   harness::Runner (CudaRunner: NVRTC, poisoned outputs, CUDA events, L2 flush;
//!                                  MockRunner: deterministic timing model, for CI)
//!  attempts.ndjson  (one line per attempt, append-only)
//!             │
//!             ├──► report / compare: success rates, p50 + IQR, pairwise sign tests, bucket winners, SVG
//!             └──► promote: pack-<arch>.json (op × token bucket → template + knobs + source hash)
//!                           └──► runtime: pack::KernelPack::load → lookup(op, tokens), stale hashes dropped
//! ```
//!
//! Why it is shaped this way:
//! - **Matched cases.** Every case runs *every* template on the same inputs and shape, in a
//!   seeded random order (the seeds found a fixed order biases latency), so templates are
//!   compared pairwise on identical work and a sign test needs no model of the noise.
//! - **A ledger, not a database.** Attempts are appended one JSON line at a time and never
//!   rewritten; a crashed campaign loses at most the line being written, and a corrupt line
//!   is reported with its number and skipped. Reports and promotion are pure functions of the
//!   ledger, so the CI tests run them on mock ledgers.
//! - **Numerics are declared.** A template is numerics-preserving (bit-identical to the
//!   production kernel, checked bit for bit on the GPU) or numerics-changing (within
//!   tolerance of the CPU, and promotable only with a `zmoe validate` fidelity PASS).
//! - **Source hashes pin evidence to code.** A pack entry names the hash of the exact source
//!   it measured (template + knobs + the shared `common.cuh`); the runtime ignores an entry
//!   whose template has since changed, rather than trusting stale measurements.

pub mod attempts;
pub mod cli;
pub mod harness;
pub mod knobs;
mod num;
pub mod ops;
pub mod pack;
pub mod report;
pub mod sample;
pub mod stats;
pub mod templates;

use serde::{Deserialize, Serialize};

/// Whether a candidate reproduces the production kernel's results bit for bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Numerics {
    /// Same reductions in the same order as the production kernel: bit-identical outputs
    /// (the harness checks it bit for bit against the production configuration).
    Preserving,
    /// Another rounding (a different reduction order, block size, compensation...): within
    /// tolerance of the CPU reference, and needs a token-fidelity PASS to be promoted.
    Changing,
}

impl Numerics {
    /// `preserving` / `changing`.
    pub fn name(self) -> &'static str {
        match self {
            Numerics::Preserving => "preserving",
            Numerics::Changing => "changing",
        }
    }
}

/// A token-count bucket: decode-centric regimes that are analysed (and promoted) separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Bucket {
    /// 1..8 tokens (single-sequence and small-batch decode).
    #[serde(rename = "1..8")]
    Small,
    /// 9..32 tokens.
    #[serde(rename = "9..32")]
    Medium,
    /// 33..256 tokens (and more: prefill chunks).
    #[serde(rename = "33..256")]
    Large,
}

impl Bucket {
    /// Every bucket, smallest first.
    pub const ALL: [Bucket; 3] = [Bucket::Small, Bucket::Medium, Bucket::Large];

    /// The bucket of a token count (0 counts as 1; more than 256 as the large bucket).
    pub fn of(tokens: usize) -> Bucket {
        match tokens {
            0..=8 => Bucket::Small,
            9..=32 => Bucket::Medium,
            _ => Bucket::Large,
        }
    }

    /// `1..8`, `9..32`, `33..256`.
    pub fn name(self) -> &'static str {
        match self {
            Bucket::Small => "1..8",
            Bucket::Medium => "9..32",
            Bucket::Large => "33..256",
        }
    }

    /// Inclusive token range (the large bucket is open-ended at run time).
    pub fn range(self) -> (usize, usize) {
        match self {
            Bucket::Small => (1, 8),
            Bucket::Medium => (9, 32),
            Bucket::Large => (33, 256),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_the_token_range() {
        for t in 1..=300 {
            let b = Bucket::of(t);
            let (lo, hi) = b.range();
            assert!(t >= lo && (t <= hi || b == Bucket::Large), "{t} in {b:?}");
        }
        assert_eq!(serde_json::to_string(&Bucket::Medium).unwrap(), "\"9..32\"");
    }
}
