//! # zmoe — fast, token-faithful Mixture-of-Experts decode
//!
//! zmoe runs MoE language models (Qwen3-MoE first) from HuggingFace / mlx-community model
//! folders, on an f32 CPU reference backend and (later) fused CUDA kernels, and proves that
//! the fused path produces the same tokens as the reference.
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
//! - [`plan`]: the forward pass as data ([`plan::Plan`], [`plan::Step`]).
//! - [`cpu`]: the reference executor.
//! - [`backend`], [`generate`], [`sample`], [`tokenizer`]: running a model.

#![deny(missing_docs)]

pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod cpu;
pub mod cuda;
pub mod error;
pub mod generate;
pub mod model;
pub mod plan;
pub mod rng;
pub mod sample;
pub mod tokenizer;

pub use backend::{Backend, BackendKind, Model};
pub use error::{Error, Result};
