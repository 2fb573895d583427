//! The kernels' shared side: `common.cuh`, the CUDA building blocks every kernel is made of
//! (the built-in kernels in `src/cuda/ops/*.cu` and the foundry's templates alike), and, in
//! Rust, what the runtime needs to know about kernel *variants*: the template registry ([`templates`], `templates/<op>/*.cu`), knob rendering
//! and source hashes ([`knobs`]), the ops a variant can stand for ([`ops`]) and the kernel
//! pack file format ([`pack`]).
//!
//! Why this sits in the runtime, below the foundry: the CUDA backend launches pack kernels,
//! so the registry and the pack format are runtime facts; the foundry (a tool) searches,
//! measures and promotes variants *of* this registry. Templates are compiled after
//! `common.cuh`, so a template that keeps the production algorithm calls the very device
//! functions the production kernel calls.

pub mod knobs;
pub mod ops;
pub mod pack;
pub mod templates;

use serde::{Deserialize, Serialize};

/// The shared device functions: compiled first into the built-in module and into every
/// foundry template.
pub const COMMON: &str = include_str!("common.cuh");

/// A kernel argument, passed by value (8 bytes of parameter space each).
#[derive(Debug, Clone, Copy)]
pub enum Arg {
    /// Device pointer (0 = null).
    Ptr(u64),
    /// `int`.
    I32(i32),
    /// `long`.
    I64(i64),
    /// `float`.
    F32(f32),
}

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
