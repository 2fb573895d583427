//! From the plan a user chose to the plans a backend runs: [`ExecPlans`], built once when a
//! backend is made (and again on `set_plan`), printed by `zmoe patterns --exec`.
//!
//! Why a separate step: a fused step is a promise about *what* is computed, but a backend
//! may not have a kernel for every case of it. The CUDA backend's fused MoE and
//! residual-norm kernels are decode kernels (one token), its fused two-matrix kernels read
//! both matrices in one weight format, and a kernel pack may replace a built-in kernel at
//! some token counts. Deciding that while running (as the executor once did) meant the plan
//! printed was not always the plan run. Here it is decided once, as a rewrite that keeps
//! the meaning: a fused step the backend cannot run becomes its [components](Step::components)
//! (bit-identical by the numerics contract), and a pack kernel wraps the step it replaces
//! ([`Step::Packed`]), naming the kernel and the token buckets it serves.

use super::{AttnOp, Fusion, LinRef, MoeOp, Plan, Step};
use crate::checkpoint::{Mat, MatKind};
use crate::error::{Error, Result};
use crate::kernels::Bucket;
use crate::kernels::ops::OpId;
use crate::kernels::pack::KernelPack;
use crate::model::Weights;

/// The name of the reference plan; kernel packs are patches and never apply to it.
pub const REFERENCE: &str = "reference";

/// A kernel-pack kernel a backend has ready (compiled) for an op at a token bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackKernel {
    /// The op it implements.
    pub op: OpId,
    /// Token bucket it serves.
    pub bucket: Bucket,
    /// `op/template@hash`, e.g. `moe_combine/t0_basic@0123456789abcdef`.
    pub tag: String,
}

impl PackKernel {
    /// The usable entries of a kernel pack (what a backend would compile from it).
    pub fn from_pack(pack: &KernelPack) -> Vec<PackKernel> {
        pack.entries
            .iter()
            .filter_map(|e| Some(PackKernel { op: OpId::parse(&e.op).ok()?, bucket: e.bucket, tag: e.tag() }))
            .collect()
    }
}

/// The plans a backend runs: one for a single token (decode; also the last one-token chunk
/// of a prompt), one for batches of rows on the row-per-token kernels, one for prompt chunks
/// on tensor cores.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecPlans {
    /// Run for every chunk of a long prompt ([`crate::backend::long_prompt`]: more than
    /// [`BATCH_ROWS`] tokens), whatever the chunk's size (CUDA: products and attention on
    /// tensor cores, `cuda::ops::gemm`).
    pub prefill: Plan,
    /// Run for every other chunk of several rows (short prompts, batched decode, the rows of
    /// several slots): the row-per-token kernels, bit-identical to decode.
    pub batch: Plan,
    /// Run for one token (captured into the CUDA decode graph).
    pub decode: Plan,
}

/// The longest prompt (tokens of one forward) whose rows stay on the batch plan's row-per-token
/// kernels, bit-identical to decode: longer prompts are [`crate::backend::long_prompt`] and
/// run their products on tensor cores (CUDA). Also the largest decode batch CUDA replays from
/// a captured graph.
pub const BATCH_ROWS: usize = 16;

impl ExecPlans {
    /// All plans the same: a backend that runs every step as written (the CPU).
    pub fn same(plan: &Plan) -> ExecPlans {
        ExecPlans { prefill: plan.clone(), batch: plan.clone(), decode: plan.clone() }
    }

    /// The plan for a chunk of `m` rows; `tensor_cores`: a long prompt's chunk on tensor
    /// cores, which takes the prefill plan whatever its size (even one row), so its rows are
    /// computed the same way in every chunking.
    pub fn pick(&mut self, m: usize, tensor_cores: bool) -> &mut Plan {
        match m {
            _ if tensor_cores => &mut self.prefill,
            1 => &mut self.decode,
            _ => &mut self.batch,
        }
    }
}

/// The op a kernel-pack kernel can stand in for at this step, if any.
fn pack_op(step: &Step, w: &Weights) -> Option<OpId> {
    match step {
        Step::Moe { op: MoeOp::Combine, .. } => Some(OpId::MoeCombine),
        Step::Moe { op: MoeOp::RouterTopK, .. } => Some(OpId::TopkGating),
        Step::Fused { op: Fusion::AddRmsNorm, .. } => Some(OpId::RmsnormResidual),
        // The gather templates read MLX affine experts only, and no shared experts.
        Step::Fused { op: Fusion::MoeGateUpSwiglu, parts }
            if parts.iter().any(|p| matches!(p, Step::Linear { .. })) =>
        {
            None
        }
        Step::Fused { op: Fusion::MoeGateUpSwiglu, .. } => match w.experts(step.layer()?).ok()?.gate.first()?.kind {
            MatKind::Affine { .. } => Some(OpId::GatherQmmSwiglu),
            _ => None,
        },
        _ => None,
    }
}

/// Whether two matrices share the weight format a fused CUDA kernel reads both with: any
/// float dtype (uploaded as bf16), or MLX affine with the same bits and group size.
fn same_format(a: &Mat, b: &Mat) -> bool {
    match (&a.kind, &b.kind) {
        (MatKind::Float(_), MatKind::Float(_)) => true,
        (MatKind::Affine { bits: ba, group: ga, .. }, MatKind::Affine { bits: bb, group: gb, .. }) => {
            (ba, ga) == (bb, gb)
        }
        _ => false,
    }
}

/// Whether the CUDA kernel of fused step `s` can read its matrices (other steps: true):
/// `moe_gate_up_swiglu` reads gate and up rows with the gate's format (the routed experts',
/// and the shared experts' with theirs); the two- and three-matrix projections are held to
/// the same rule until a GPU test covers mixed formats. The MoE kernels add no bias to the
/// shared experts' projections they run: with one, the step runs as its components.
fn cuda_formats_ok(s: &Step, w: &Weights) -> Result<bool> {
    let Step::Fused { op, parts } = s else { return Ok(true) };
    let lins: Vec<&crate::model::Linear> = parts
        .iter()
        .filter_map(|p| match p {
            Step::Linear { w: r, .. } => Some(w.linear(*r)),
            _ => None,
        })
        .collect::<Result<_>>()?;
    if matches!(op, Fusion::MoeGateUpSwiglu | Fusion::MoeDownCombineAdd) && !lins.is_empty() {
        let ws: Vec<&Mat> = lins.iter().map(|l| &l.w).collect();
        return Ok(lins.iter().all(|l| l.b.is_none()) && ws.iter().all(|m| same_format(m, ws[0])) && {
            let ex = w.experts(s.layer().unwrap_or(usize::MAX))?;
            let routed: Vec<&Mat> = ex.gate.iter().chain(&ex.up).collect();
            *op == Fusion::MoeDownCombineAdd || routed.iter().all(|m| same_format(m, routed[0]))
        });
    }
    // norm_qkv normalises the hidden state in shared memory.
    if *op == Fusion::NormInProj && lins.first().is_some_and(|l| l.w.cols > NORM_QKV_MAX_HIDDEN) {
        return Ok(false);
    }
    let mats: Vec<&Mat> = match op {
        // GPT-OSS's kernel (moe_gate_up_clamp) reads the gate and up stacks each in its own
        // format, MXFP4 included.
        Fusion::MoeGateUpSwiglu if parts.iter().any(|p| matches!(p, Step::Moe { op: MoeOp::ClampSwiglu, .. })) => {
            return Ok(true);
        }
        Fusion::MoeGateUpSwiglu => {
            let ex = w.experts(s.layer().unwrap_or(usize::MAX))?;
            ex.gate.iter().chain(&ex.up).collect()
        }
        Fusion::InProj | Fusion::NormInProj | Fusion::GateUpSwiglu => lins.iter().map(|l| &l.w).collect(),
        _ => return Ok(true),
    };
    Ok(mats.iter().all(|m| same_format(m, mats[0])))
}

/// Widest hidden state the CUDA `norm_qkv` kernel normalises (in shared memory); wider
/// models run the step as its parts.
pub const NORM_QKV_MAX_HIDDEN: usize = 8192;

/// What the CUDA kernel of a fused step serves: one token, a few rows (the row-per-token
/// kernels), or any chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Serves {
    Decode,
    Batch,
    Any,
}

/// Which chunks a fused step's CUDA kernel serves. Others run its components, bit for bit
/// the same: the expert mat-vecs grouped by expert; and in prompt chunks (tensor cores,
/// `cuda::ops::gemm`) the projections one by one, so that the reference and the patched
/// plan run the same tensor-core products and stay token-identical. The in-projection
/// (qkv_proj, MLA's two) serves prompt chunks too: there its products are the tiles of the
/// separate ones in one launch (`gemm::gemm_qkv`), the same bits.
fn serves(s: &Step) -> Serves {
    match s {
        Step::Fused {
            op:
                Fusion::MoeRouter
                | Fusion::MoeGateUpSwiglu
                | Fusion::MoeDownCombineAdd
                | Fusion::OProjAddRmsNorm
                | Fusion::NormInProj
                | Fusion::ConvMixer,
            ..
        } => Serves::Decode,
        Step::Fused { op: Fusion::GateUpSwiglu, .. } => Serves::Batch,
        _ => Serves::Any,
    }
}

/// The steps `s` runs as in chunks `chunk`: itself where its kernel serves them and reads
/// its matrices, else its parts, lowered the same way. moe_mlp's MoE kernels with the
/// shared experts' rows fall back to the shared steps (their gate/up as shared_expert's
/// fused kernel) and moe_mlp's routed-only kernel, each lowered again; norm_qkv to the norm
/// and qkv_proj's step.
fn lower_step(s: &Step, chunk: Serves, w: &Weights) -> Result<Vec<Step>> {
    if serves(s) >= chunk && cuda_formats_ok(s, w)? {
        return Ok(vec![s.clone()]);
    }
    let mut parts = s.components();
    let shared_first =
        matches!(parts.first(), Some(Step::Linear { w: LinRef::SharedGate(_) | LinRef::SharedDown(_), .. }));
    match s {
        Step::Fused { op: Fusion::MoeGateUpSwiglu, .. } if shared_first => {
            let routed = parts.split_off(3);
            parts = vec![
                Step::Fused { op: Fusion::GateUpSwiglu, parts },
                Step::Fused { op: Fusion::MoeGateUpSwiglu, parts: routed },
            ];
        }
        Step::Fused { op: Fusion::MoeDownCombineAdd, .. } if shared_first => {
            let routed = parts.split_off(1);
            parts.push(Step::Fused { op: Fusion::MoeDownCombineAdd, parts: routed });
        }
        // norm_qkv outside decode: the norm, then qkv_proj's fused projections.
        Step::Fused { op: Fusion::NormInProj, .. } => {
            let qkv = parts.split_off(1);
            parts.push(Step::Fused { op: Fusion::InProj, parts: qkv });
        }
        _ => {}
    }
    let mut out = Vec::with_capacity(parts.len());
    for p in parts {
        if matches!(p, Step::Fused { .. }) { out.extend(lower_step(&p, chunk, w)?) } else { out.push(p) }
    }
    Ok(out)
}

/// The plans the CUDA backend runs for `plan` over `w`, with the pack kernels it has
/// compiled (`packs`; ignored for the reference plan).
pub fn cuda(plan: &Plan, w: &Weights, packs: &[PackKernel]) -> Result<ExecPlans> {
    plan.check(w)?;
    let packs = if plan.name == REFERENCE { &[][..] } else { packs };
    let lower = |chunk: Serves| -> Result<Plan> {
        let prefill = chunk != Serves::Decode;
        let mut steps = Vec::with_capacity(plan.steps.len());
        for s in &plan.steps {
            for p in lower_step(s, chunk, w)? {
                // A pack kernel serves the buckets this plan can see: decode one token only.
                let kernels: Vec<PackKernel> = pack_op(&p, w)
                    .map(|op| {
                        packs.iter().filter(|k| k.op == op && (prefill || k.bucket == Bucket::of(1))).cloned().collect()
                    })
                    .unwrap_or_default();
                steps.push(if kernels.is_empty() { p } else { Step::Packed { step: Box::new(p), kernels } });
            }
        }
        Ok(Plan { name: plan.name.clone(), steps })
    };
    Ok(ExecPlans { prefill: lower(Serves::Any)?, batch: lower(Serves::Batch)?, decode: lower(Serves::Decode)? })
}

impl Plan {
    /// Checks that every weight and cache the plan names exists in `w` (a plan built for
    /// another model is one clear error here, not a failure halfway through a forward pass).
    pub fn check(&self, w: &Weights) -> Result<()> {
        let bad = |s: &Step, e: Error| Error::Arg(format!("plan `{}`, step `{s}`: {e}", self.name));
        for s in self.steps.iter().flat_map(Step::primitives) {
            let r = match s {
                Step::Linear { w: r, .. } => w.linear(r).map(drop),
                Step::RmsNorm { w: r, .. } | Step::HeadNorm { w: r, .. } => w.norm(r).map(drop),
                Step::Moe {
                    layer,
                    op:
                        MoeOp::ExpertGateUp
                        | MoeOp::ExpertDown
                        | MoeOp::SigmoidTopK
                        | MoeOp::SigmoidBiasTopK
                        | MoeOp::ClampSwiglu,
                } => w.experts(layer).map(drop),
                Step::Attn { layer, op: AttnOp::ShortConv } => w.conv(layer).map(drop),
                Step::Attn { layer, op: AttnOp::Rope | AttnOp::KvAppend | AttnOp::Attention } => {
                    w.linear(LinRef::K(layer)).map(drop)
                }
                Step::Attn { layer, op: AttnOp::SinkAttention } => w.sinks(layer).map(drop),
                Step::Attn { layer, .. } => w.mla(layer).map(drop),
                _ => Ok(()),
            };
            r.map_err(|e| bad(&s, e))?;
        }
        Ok(())
    }

    /// The plan one line per step (`zmoe patterns --exec`): fused and pack steps marked.
    pub fn listing(&self) -> String {
        let mut out = String::new();
        for (i, s) in self.steps.iter().enumerate() {
            out.push_str(&format!("{i:5}  {s}\n"));
        }
        out
    }
}
