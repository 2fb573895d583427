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
use crate::error::{Error, Result};
use crate::model::Weights;
use crate::plan::Plan;

/// Executes a plan for one sequence.
pub trait Backend {
    /// Human-readable device description (e.g. `cpu (2 threads)`).
    fn name(&self) -> String;
    /// The model's config.
    fn config(&self) -> &ModelConfig;
    /// Tokens already in the KV cache.
    fn position(&self) -> usize;
    /// Empties the KV cache.
    fn reset(&mut self);
    /// Runs `tokens` at positions `position()..position()+T` and appends them to the cache.
    /// Returns logits `[T, V]` if `all_logits`, else `[1, V]` for the last token.
    fn forward(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>>;
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

    /// A backend of the given kind running `plan`.
    pub fn backend(&self, kind: BackendKind, plan: Plan) -> Result<Box<dyn Backend>> {
        match kind {
            BackendKind::Auto | BackendKind::Cpu => {
                Ok(Box::new(CpuBackend::new(self.config().clone(), self.weights.clone(), plan)))
            }
            BackendKind::Cuda => {
                Err(Error::Unavailable("this build of zmoe has no CUDA backend yet; use --backend cpu".into()))
            }
        }
    }
}
