//! A loaded model and the backends that run it: the top of the runtime.
//!
//! Why its own module: the executors ([`crate::cpu`], [`crate::cuda`]) implement
//! [`Backend`], and choosing between them needs both; keeping the choice here (above them)
//! and the interface in [`crate::backend`] (below them) keeps the dependencies one-way.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backend::Backend;
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::cpu::CpuBackend;
use crate::cuda::CudaBackend;
use crate::error::{Error, Result};
use crate::model::Weights;
use crate::plan::Plan;

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
        self.backend_slots(kind, plan, cuda_graph, ctx, 1)
    }

    /// Like [`Model::backend_ctx`], holding `slots` sequences ([`Backend::set_slots`]) of
    /// `ctx` tokens each (on CUDA the caches of every slot are allocated up front, and the
    /// default context is bounded so that they all fit).
    pub fn backend_slots(
        &self,
        kind: BackendKind,
        plan: Plan,
        cuda_graph: bool,
        ctx: Option<usize>,
        slots: usize,
    ) -> Result<Box<dyn Backend>> {
        if slots == 0 {
            return Err(Error::Arg("a backend needs at least one sequence slot".into()));
        }
        let mpe = self.config().max_position_embeddings;
        if let Some(n) = ctx
            && (n == 0 || n > mpe)
        {
            return Err(Error::Arg(format!(
                "--ctx {n}: the context must be 1..={mpe} tokens (the model's max_position_embeddings)"
            )));
        }
        let cuda = |plan| CudaBackend::with_slots(self.config().clone(), &self.weights, plan, cuda_graph, ctx, slots);
        match kind {
            BackendKind::Cpu => {
                let mut cpu = CpuBackend::new(self.config().clone(), self.weights.clone(), plan)?;
                cpu.set_slots(slots)?;
                Ok(Box::new(cpu.with_max_context(ctx.unwrap_or(mpe))))
            }
            BackendKind::Cuda => Ok(Box::new(cuda(plan)?)),
            // The best available: CUDA when a GPU can run this model, else the CPU.
            BackendKind::Auto => match cuda(plan.clone()) {
                Ok(b) => Ok(Box::new(b)),
                Err(Error::Unavailable(_)) => self.backend_slots(BackendKind::Cpu, plan, cuda_graph, ctx, slots),
                Err(e) => Err(e),
            },
        }
    }
}
