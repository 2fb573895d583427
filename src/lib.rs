//! # zmoe — fast, token-faithful Mixture-of-Experts decode
//!
//! zmoe runs MoE language models (Qwen3-MoE first) from HuggingFace / mlx-community model
//! folders, on an f32 CPU reference backend and a CUDA backend with fused kernels, and
//! proves that the fused (patched) plan produces the same tokens as the reference plan.
//!
//! The picture in one screen:
//!
//! ```text
//!  model folder ──► checkpoint (mmap, validated) ──► Weights (typed, shape-checked)
//!  config.json  ──► ModelConfig ──► Plan::reference  (one primitive Step per op)
//!                                        │  patterns rewrite runs of steps (fused)
//!                                        ▼
//!                         Backend::forward(tokens) ──► logits ──► sample ──► tokens
//!                         (cpu: f32 oracle; cuda: kernels + graph)
//! ```
//!
//! - [`config`]: config.json in all its spellings → [`config::ModelConfig`].
//! - [`checkpoint`]: safetensors shards, MLX affine / MXFP4 formats, synthetic checkpoints.
//! - [`model`]: [`model::Weights`], every tensor with its shape.
//! - [`plan`]: the forward pass as data ([`plan::Plan`], [`plan::Step`]); [`plan::patterns`]
//!   rewrites it with fused steps, per family policy.
//! - [`cpu`]: the reference executor.
//! - [`cuda`]: the GPU executor (NVRTC kernels, arena, graphs).
//! - [`backend`], [`generate`], [`sample`], [`tokenizer`]: running a model ([`args`]: the
//!   CLI's numeric flag parsers).
//! - [`bench`], [`validate`], [`matrix`]: measuring it (throughput, fidelity, the ledger).
//! - [`foundry`]: searching kernel variants, measuring them honestly, promoting winners into
//!   per-GPU kernel packs.

#![deny(missing_docs)]

pub mod args;
pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod cpu;
pub mod cuda;
pub mod error;
pub mod export;
pub mod foundry;
pub mod generate;
pub mod jsonl;
pub mod matrix;
pub mod model;
pub mod output;
pub mod plan;
pub mod rng;
pub mod sample;
pub mod tokenizer;
pub mod validate;

pub use backend::{Backend, BackendKind, Model};
pub use error::{Error, Result};

/// zmoe's cache folder: `$ZMOE_CACHE` if set, else `$XDG_CACHE_HOME/zmoe`, else
/// `~/.cache/zmoe` (the system temp folder if there is no home). It holds the demo model,
/// the synthesised `zmoe matrix` presets (`presets/`) and compiled kernels (`kernels/`).
pub fn cache_dir() -> std::path::PathBuf {
    use std::path::{Path, PathBuf};
    if let Some(d) = std::env::var_os("ZMOE_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")));
    base.unwrap_or_else(std::env::temp_dir).join("zmoe")
}
