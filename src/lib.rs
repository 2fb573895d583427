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
//! - [`parallel`]: expert parallelism (which rank owns which experts, the slot-order combine
//!   that keeps N ranks bit-identical to one); simulated on the CPU (`--ranks N`).
//! - [`cuda`]: the GPU executor (NVRTC kernels, arena, graphs).
//! - [`backend`], [`generate`], [`sample`], [`tokenizer`], [`chat`]: running a model ([`args`]: the
//!   CLI's numeric flag parsers).
//! - [`serve`]: `zmoe serve`, the OpenAI-compatible server (continuous batching over
//!   sequence slots), above the runtime.
//! - [`bench`], [`validate`], [`matrix`]: measuring it (throughput, fidelity, the ledger).
//! - [`input`], [`output`], [`outdir`]: the files zmoe reads (regular files only) and writes
//!   (never through a link; `--force` replaces only what zmoe wrote).
//! - [`foundry`]: searching kernel variants, measuring them honestly, promoting winners into
//!   per-GPU kernel packs.

#![deny(missing_docs)]

pub mod args;
pub mod backend;
pub mod bench;
pub mod cache;
pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod cpu;
pub mod cuda;
pub mod date;
pub mod error;
pub mod export;
pub mod foundry;
pub mod generate;
pub mod input;
pub mod jsonl;
pub mod kernels;
pub mod matrix;
pub mod model;
pub mod outdir;
pub mod output;
pub mod parallel;
pub mod plan;
pub mod rng;
pub mod runtime;
pub mod sample;
pub mod serve;
pub mod tokenizer;
pub mod validate;

pub use backend::Backend;
pub use cache::cache_dir;
pub use error::{Error, Result};
pub use runtime::{BackendKind, Model};
