//! The foundry's ops: what a kernel must compute, on which shapes, and how to check it.
//!
//! Each op ([`OpId`]) has one kernel signature shared by all its templates (so the harness
//! and the runtime launch any of them the same way), a CPU reference, an input generator,
//! a correctness check with a dtype-appropriate tolerance, and a bytes / FLOPs estimate for
//! achieved GB/s. Shapes come from [`PRESETS`]: the real sizes of the models zmoe targets
//! (Qwen3-30B-A3B, GLM-4.7-Flash) plus a small one.
//!
//! Why the checks look the way they do: the CPU reference fixes *what* is computed, not the
//! GPU's reduction order, so float outputs are compared with a tolerance (relative to the
//! element, plus a floor relative to the output's RMS for values near zero after
//! cancellation). Exact things are compared exactly: the residual stream `x = bf16(x +
//! src)`, and the router's expert indices — except between experts whose keys differ by
//! less than f32 rounding (a near tie cannot be decided the same way by two different `exp`
//! implementations). Identical inputs are an exact tie on every implementation, so the
//! lowest-index rule is still checked exactly: the generators put exact ties in every row.
//! Bit-identity to the production kernel is checked separately, on the GPU (`harness`).

use half::bf16;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
pub use crate::kernels::ops::{Gating, OpId, Shape};
use crate::rng::Rng;

/// A model's sizes, as the foundry's ops see them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preset {
    /// Name used on the command line and in records.
    pub name: &'static str,
    /// What it is.
    pub about: &'static str,
    /// Hidden size.
    pub hidden: usize,
    /// Routed experts.
    pub experts: usize,
    /// Experts per token.
    pub k: usize,
    /// Expert intermediate size.
    pub inter: usize,
    /// Bits of the affine expert weights.
    pub bits: u32,
    /// Quantization group size.
    pub group: usize,
    /// Router kind.
    pub gating: Gating,
    /// Routed scaling factor (sigmoid router).
    pub scale: f32,
    /// RMSNorm epsilon.
    pub eps: f32,
}

/// The shape regimes campaigns sample from: real model sizes and one small shape.
pub const PRESETS: [Preset; 3] = [
    Preset {
        name: "qwen3-30b-a3b",
        about: "Qwen3-30B-A3B: H 2048, 128 experts top-8, I 768, affine4 g64, softmax renormalised",
        hidden: 2048,
        experts: 128,
        k: 8,
        inter: 768,
        bits: 4,
        group: 64,
        gating: Gating::SoftmaxNorm,
        scale: 1.0,
        eps: 1e-6,
    },
    Preset {
        name: "glm-4.7-flash",
        about: "GLM-4.7-Flash: H 2048, 64 experts top-4, I 1536, affine4 g64, sigmoid + bias × 1.8",
        hidden: 2048,
        experts: 64,
        k: 4,
        inter: 1536,
        bits: 4,
        group: 64,
        gating: Gating::SigmoidBias,
        scale: 1.8,
        eps: 1e-5,
    },
    Preset {
        name: "small",
        about: "small (the tiny preset's sizes): H 256, 16 experts top-4, I 128, affine8 g64, softmax",
        hidden: 256,
        experts: 16,
        k: 4,
        inter: 128,
        bits: 8,
        group: 64,
        gating: Gating::Softmax,
        scale: 1.0,
        eps: 1e-6,
    },
];

/// Looks a preset up by name.
pub fn preset(name: &str) -> Result<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name).ok_or_else(|| {
        let names: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
        Error::Arg(format!("unknown foundry preset `{name}` (known: {})", names.join(", ")))
    })
}

impl Preset {
    /// This preset's shape at `tokens`.
    pub fn shape(&self, tokens: usize) -> Shape {
        Shape {
            preset: self.name.to_string(),
            tokens,
            hidden: self.hidden,
            experts: self.experts,
            k: self.k,
            inter: self.inter,
            bits: self.bits,
            group: self.group,
            gating: self.gating,
            scale: self.scale,
            eps: self.eps,
        }
    }
}

/// Host data of one kernel argument buffer.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    /// bf16 bit patterns.
    Bf16(Vec<u16>),
    /// f32.
    F32(Vec<f32>),
    /// i32.
    I32(Vec<i32>),
    /// u32 (packed quantized codes).
    U32(Vec<u32>),
}

impl Data {
    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        match self {
            Data::Bf16(v) => v.len() * 2,
            Data::F32(v) => v.len() * 4,
            Data::I32(v) => v.len() * 4,
            Data::U32(v) => v.len() * 4,
        }
    }

    /// The same kind and length, zero-filled (a read-back buffer).
    pub fn zeros_like(&self) -> Data {
        match self {
            Data::Bf16(v) => Data::Bf16(vec![0; v.len()]),
            Data::F32(v) => Data::F32(vec![0.0; v.len()]),
            Data::I32(v) => Data::I32(vec![0; v.len()]),
            Data::U32(v) => Data::U32(vec![0; v.len()]),
        }
    }

    /// Whether two buffers hold the same bits.
    pub fn bit_equal(&self, other: &Data) -> bool {
        match (self, other) {
            (Data::Bf16(a), Data::Bf16(b)) => a == b,
            (Data::I32(a), Data::I32(b)) => a == b,
            (Data::U32(a), Data::U32(b)) => a == b,
            (Data::F32(a), Data::F32(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
            }
            _ => false,
        }
    }
}

/// How the kernel uses a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Read only.
    In,
    /// Written (poisoned before each correctness launch).
    Out,
    /// Read and written in place (restored before each launch).
    InOut,
}

/// One argument buffer of a kernel.
#[derive(Debug, Clone)]
pub struct Tensor {
    /// Name (as in the kernel signature).
    pub name: &'static str,
    /// In, out or in-out.
    pub role: Role,
    /// Host data: inputs, or the initial contents of outputs (ignored: they are poisoned).
    pub data: Data,
}

/// The verdict of comparing a kernel's outputs with the reference.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct CheckResult {
    /// Whether every output is within tolerance (and exact where it must be).
    pub ok: bool,
    /// Largest |got − want| over float outputs.
    #[serde(with = "crate::jsonl::nan_as_null")]
    pub max_abs_err: f64,
    /// Largest |got − want| / |want| over float outputs with want ≠ 0.
    #[serde(with = "crate::jsonl::nan_as_null")]
    pub max_rel_err: f64,
    /// ‖got − want‖ / ‖want‖ over float outputs.
    #[serde(with = "crate::jsonl::nan_as_null")]
    pub rel_l2: f64,
    /// Elements outside tolerance (NaN — a poisoned output never written — counts).
    pub bad_elements: usize,
    /// Router slots where the kernel chose another expert whose key differs from the
    /// reference's choice by less than f32 rounding (accepted).
    #[serde(default)]
    pub near_tie_swaps: usize,
    /// Why it failed: the first bad element.
    pub fail_reason: Option<String>,
}

/// Element tolerance: `|got − want| ≤ rtol·|want| + atol_rms·rms(want)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    /// Relative to the element.
    pub rtol: f64,
    /// Relative to the RMS of the whole output (values near zero after cancellation).
    pub atol_rms: f64,
}

/// One bf16 ulp at 1.0 (2^-7): where rounding to bf16 may land one step apart.
const BF16_ULP: f64 = 1.0 / 128.0;

impl OpId {
    /// Tolerance of float outputs against the CPU reference.
    pub fn tolerance(self) -> Tolerance {
        match self {
            // One rounding to bf16 at the end: one ulp apart at most.
            OpId::MoeCombine | OpId::RmsnormResidual => Tolerance { rtol: BF16_ULP * 1.01, atol_rms: BF16_ULP / 2.0 },
            // g and u are rounded to bf16 before SwiGLU, whose output is rounded again: a
            // one-ulp flip of g or u moves the result by a few ulps.
            OpId::GatherQmmSwiglu => Tolerance { rtol: 4.0 * BF16_ULP, atol_rms: 2.0 * BF16_ULP },
            // f32 weights: exp implementations and summation orders differ by a few ulps.
            OpId::TopkGating => Tolerance { rtol: 1e-5, atol_rms: 1e-6 },
        }
    }

    /// Fresh random inputs for `shape` (and the output buffers), from `seed`. Never zeros;
    /// router logits on a 1/64 grid, so every row has exact ties and no sub-ulp near ties.
    pub fn inputs(self, s: &Shape, seed: u64) -> Vec<Tensor> {
        let (m, h, k, e) = (s.tokens, s.hidden, s.k, s.experts);
        let t = |name, role, data| Tensor { name, role, data };
        match self {
            OpId::MoeCombine => {
                let mut r = Rng::for_stream(seed, "combine.w");
                let w: Vec<f32> = (0..m * k).map(|_| 0.02 + r.uniform()).collect();
                vec![
                    t("y", Role::In, Data::Bf16(normal_bf16(seed, "combine.y", m * k * h, 1.0))),
                    t("w", Role::In, Data::F32(w)),
                    t("out", Role::Out, Data::Bf16(vec![0; m * h])),
                ]
            }
            OpId::TopkGating => {
                let mut r = Rng::for_stream(seed, "gating.logits");
                let mut logits: Vec<f32> = (0..m * e).map(|_| (r.normal() * 2.0 * 64.0).round() / 64.0).collect();
                let mut rb = Rng::for_stream(seed, "gating.bias");
                let mut bias: Vec<f32> = (0..e).map(|_| (rb.normal() * 0.25 * 64.0).round() / 64.0).collect();
                // An exact tie in every row, between experts 1 and 3 (the bias too).
                if e > 3 {
                    for row in logits.chunks_exact_mut(e) {
                        row[3] = row[1];
                    }
                    bias[3] = bias[1];
                }
                vec![
                    t("logits", Role::In, Data::F32(logits)),
                    t("bias", Role::In, Data::F32(bias)),
                    t("idx", Role::Out, Data::I32(vec![0; m * k])),
                    t("w", Role::Out, Data::F32(vec![0.0; m * k])),
                ]
            }
            OpId::GatherQmmSwiglu => {
                let (i, bits, g) = (s.inter, s.bits as usize, s.group);
                let words = e * i * h * bits / 32;
                let groups = e * i * h / g;
                let idx = distinct_experts(seed, m, e, k);
                vec![
                    t("gw", Role::In, Data::U32(random_words(seed, "gather.gw", words))),
                    t("gs", Role::In, Data::Bf16(affine_scales(seed, "gather.gs", groups, bits as u32))),
                    t("gb", Role::In, Data::Bf16(affine_biases(seed, "gather.gb", groups))),
                    t("uw", Role::In, Data::U32(random_words(seed, "gather.uw", words))),
                    t("us", Role::In, Data::Bf16(affine_scales(seed, "gather.us", groups, bits as u32))),
                    t("ub", Role::In, Data::Bf16(affine_biases(seed, "gather.ub", groups))),
                    t("idx", Role::In, Data::I32(idx)),
                    t("x", Role::In, Data::Bf16(normal_bf16(seed, "gather.x", m * h, 1.0))),
                    t("act", Role::Out, Data::Bf16(vec![0; m * k * i])),
                ]
            }
            OpId::RmsnormResidual => {
                let mut r = Rng::for_stream(seed, "rms.w");
                let w: Vec<f32> = (0..h).map(|_| 1.0 + 0.1 * r.normal()).collect();
                vec![
                    t("x", Role::InOut, Data::Bf16(normal_bf16(seed, "rms.x", m * h, 3.0))),
                    t("src", Role::In, Data::Bf16(normal_bf16(seed, "rms.src", m * h, 1.0))),
                    t("w", Role::In, Data::F32(w)),
                    t("y", Role::Out, Data::Bf16(vec![0; m * h])),
                ]
            }
        }
    }

    /// The CPU reference: the expected contents of every Out / InOut tensor, in order.
    pub fn reference(self, s: &Shape, ins: &[Tensor]) -> Vec<Data> {
        let (m, h, k, e) = (s.tokens, s.hidden, s.k, s.experts);
        match self {
            OpId::MoeCombine => {
                let (Data::Bf16(y), Data::F32(w)) = (&ins[0].data, &ins[1].data) else {
                    unreachable!("combine inputs")
                };
                vec![Data::Bf16(combine_ref(y, w, m, k, h))]
            }
            OpId::TopkGating => {
                let (Data::F32(l), Data::F32(b)) = (&ins[0].data, &ins[1].data) else { unreachable!("gating inputs") };
                let (idx, w) = gating_ref(l, b, e, k, s.gating, s.scale);
                vec![Data::I32(idx.iter().map(|&i| i as i32).collect()), Data::F32(w)]
            }
            OpId::GatherQmmSwiglu => vec![Data::Bf16(gather_ref(s, ins))],
            OpId::RmsnormResidual => {
                let (Data::Bf16(x), Data::Bf16(src), Data::F32(w)) = (&ins[0].data, &ins[1].data, &ins[2].data) else {
                    unreachable!("rmsnorm inputs")
                };
                let (x2, y) = rmsnorm_residual_ref(x, src, w, h, s.eps);
                vec![Data::Bf16(x2), Data::Bf16(y)]
            }
        }
    }

    /// Compares a kernel's outputs (`got`, same order as [`OpId::reference`]) with the
    /// reference (`want`) for the inputs `ins`.
    pub fn check(self, s: &Shape, ins: &[Tensor], want: &[Data], got: &[Data]) -> CheckResult {
        let tol = self.tolerance();
        match self {
            OpId::MoeCombine | OpId::GatherQmmSwiglu => {
                let name = if self == OpId::MoeCombine { "out" } else { "act" };
                let (Data::Bf16(w), Data::Bf16(g)) = (&want[0], &got[0]) else { return wrong_kind() };
                compare(name, &bf16_to_f32(w), &bf16_to_f32(g), tol)
            }
            OpId::RmsnormResidual => {
                let (Data::Bf16(wx), Data::Bf16(gx), Data::Bf16(wy), Data::Bf16(gy)) =
                    (&want[0], &got[0], &want[1], &got[1])
                else {
                    return wrong_kind();
                };
                let mut r = compare("y", &bf16_to_f32(wy), &bf16_to_f32(gy), tol);
                if let Some(i) = wx.iter().zip(gx).position(|(a, b)| a != b) {
                    r.ok = false;
                    r.bad_elements += wx.iter().zip(gx).filter(|(a, b)| a != b).count();
                    r.fail_reason = Some(format!(
                        "x[{i}] (the residual x + src, exact) is {} but should be {}",
                        show_bf16(gx[i]),
                        show_bf16(wx[i])
                    ));
                }
                r
            }
            OpId::TopkGating => {
                let (Data::F32(l), Data::F32(b)) = (&ins[0].data, &ins[1].data) else { return wrong_kind() };
                let (Data::I32(gi), Data::F32(gw)) = (&got[0], &got[1]) else { return wrong_kind() };
                let Data::I32(wi) = &want[0] else { return wrong_kind() };
                check_gating(l, b, s, wi, gi, gw, tol)
            }
        }
    }

    /// Bytes an ideal kernel moves (each input read once, each output written once): the
    /// numerator of achieved GB/s, the same for every template.
    pub fn bytes(self, s: &Shape) -> f64 {
        let (m, h, k, e, i) = (s.tokens as f64, s.hidden as f64, s.k as f64, s.experts as f64, s.inter as f64);
        match self {
            OpId::MoeCombine => m * k * h * 2.0 + m * k * 4.0 + m * h * 2.0,
            OpId::TopkGating => {
                let bias = if s.gating == Gating::SigmoidBias { e * 4.0 } else { 0.0 };
                m * e * 4.0 + bias + m * k * 8.0
            }
            OpId::GatherQmmSwiglu => {
                // Expected distinct experts among M tokens' top-k picks (uniform routing).
                let distinct = e * (1.0 - (1.0 - k / e).powf(m));
                let per_expert = 2.0 * i * (h * s.bits as f64 / 8.0 + h / s.group as f64 * 4.0);
                distinct * per_expert + m * h * 2.0 + m * k * 4.0 + m * k * i * 2.0
            }
            OpId::RmsnormResidual => m * h * 8.0 + h * 4.0,
        }
    }

    /// Floating-point operations (multiply-add = 2).
    pub fn flops(self, s: &Shape) -> f64 {
        let (m, h, k, e, i) = (s.tokens as f64, s.hidden as f64, s.k as f64, s.experts as f64, s.inter as f64);
        match self {
            OpId::MoeCombine => 2.0 * m * k * h,
            OpId::TopkGating => m * e * 8.0,
            OpId::GatherQmmSwiglu => 4.0 * m * k * i * h + 6.0 * m * k * i,
            OpId::RmsnormResidual => 6.0 * m * h,
        }
    }
}

fn wrong_kind() -> CheckResult {
    CheckResult { fail_reason: Some("outputs of the wrong kind (harness bug)".into()), ..Default::default() }
}

fn show_bf16(b: u16) -> String {
    format!("{} (0x{b:04x})", bf16::from_bits(b).to_f32())
}

/// `bf16` bit patterns as f32.
pub fn bf16_to_f32(v: &[u16]) -> Vec<f32> {
    v.iter().map(|&b| bf16::from_bits(b).to_f32()).collect()
}

/// Round-to-nearest-even f32 → bf16 bits (as `f2bf` in common.cuh).
pub fn f32_to_bf16(x: f32) -> u16 {
    bf16::from_f32(x).to_bits()
}

fn bf(x: u16) -> f32 {
    bf16::from_bits(x).to_f32()
}

/// Element-wise comparison of float outputs with `tol`; NaN in `got` (an element never
/// written over the poison) is always bad.
pub fn compare(name: &str, want: &[f32], got: &[f32], tol: Tolerance) -> CheckResult {
    if want.len() != got.len() {
        return CheckResult {
            fail_reason: Some(format!("{name}: {} values, expected {}", got.len(), want.len())),
            ..Default::default()
        };
    }
    let rms = (want.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / want.len().max(1) as f64).sqrt();
    let floor = tol.atol_rms * rms;
    let (mut max_abs, mut max_rel, mut num, mut den, mut bad) = (0f64, 0f64, 0f64, 0f64, 0usize);
    let mut first = None;
    for (i, (&w, &g)) in want.iter().zip(got).enumerate() {
        let (w, g) = (w as f64, g as f64);
        let d = (g - w).abs();
        den += w * w;
        if !g.is_finite() || d > tol.rtol * w.abs() + floor {
            bad += 1;
            if first.is_none() {
                first = Some(format!(
                    "{name}[{i}] = {g} but the reference is {w} (|Δ| {d:.3e} > {:.2e}·|ref| + {floor:.2e})",
                    tol.rtol
                ));
            }
        }
        if g.is_finite() {
            num += d * d;
            max_abs = max_abs.max(d);
            if w != 0.0 {
                max_rel = max_rel.max(d / w.abs());
            }
        } else {
            num = f64::INFINITY;
            max_abs = f64::INFINITY;
        }
    }
    let rel_l2 = if den > 0.0 { (num / den).sqrt() } else { num.sqrt() };
    CheckResult {
        ok: bad == 0,
        max_abs_err: max_abs,
        max_rel_err: max_rel,
        rel_l2,
        bad_elements: bad,
        near_tie_swaps: 0,
        fail_reason: first,
    }
}

fn normal_bf16(seed: u64, stream: &str, n: usize, scale: f32) -> Vec<u16> {
    const CHUNK: usize = 1 << 16;
    let mut out = vec![0u16; n];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, part)| {
        let mut r = Rng::for_stream(seed ^ (c as u64).wrapping_mul(0x9E37_79B9), stream);
        for v in part {
            // Never exactly zero: a zero hides a missing multiply.
            let x = r.normal() * scale;
            *v = f32_to_bf16(if x == 0.0 { 0.5 * scale } else { x });
        }
    });
    out
}

fn random_words(seed: u64, stream: &str, n: usize) -> Vec<u32> {
    const CHUNK: usize = 1 << 16;
    let mut out = vec![0u32; n];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, part)| {
        let mut r = Rng::for_stream(seed ^ (c as u64).wrapping_mul(0x9E37_79B9), stream);
        for v in part {
            *v = r.next_u64() as u32;
        }
    });
    out
}

/// Affine scales of either sign (MLX negates them when |min| ≤ |max|), magnitude
/// ≈ 0.06 / 2^bits, so weights are O(0.03).
fn affine_scales(seed: u64, stream: &str, n: usize, bits: u32) -> Vec<u16> {
    let mut r = Rng::for_stream(seed, stream);
    let unit = 0.06 / (1u32 << bits) as f32;
    (0..n)
        .map(|_| {
            let mag = unit * (0.5 + r.uniform());
            f32_to_bf16(if r.next_u64() & 1 == 0 { mag } else { -mag })
        })
        .collect()
}

fn affine_biases(seed: u64, stream: &str, n: usize) -> Vec<u16> {
    let mut r = Rng::for_stream(seed, stream);
    (0..n).map(|_| f32_to_bf16(0.03 * r.normal() + 0.001)).collect()
}

/// K distinct experts per token, uniformly.
fn distinct_experts(seed: u64, m: usize, e: usize, k: usize) -> Vec<i32> {
    let mut r = Rng::for_stream(seed, "gather.idx");
    let mut idx = Vec::with_capacity(m * k);
    for _ in 0..m {
        let mut chosen: Vec<i32> = Vec::with_capacity(k);
        while chosen.len() < k {
            let c = (r.next_u64() % e as u64) as i32;
            if !chosen.contains(&c) {
                chosen.push(c);
            }
        }
        idx.extend(chosen);
    }
    idx
}

/// moe_combine reference: the production arithmetic exactly (one fused multiply-add per
/// slot in slot order, f32, then round to bf16), so it is bit-identical to `combine`.
pub fn combine_ref(y: &[u16], w: &[f32], m: usize, k: usize, h: usize) -> Vec<u16> {
    let mut out = vec![0u16; m * h];
    out.par_chunks_mut(h).enumerate().for_each(|(t, row)| {
        for (c, o) in row.iter_mut().enumerate() {
            let mut a = 0f32;
            for j in 0..k {
                a = w[t * k + j].mul_add(bf(y[(t * k + j) * h + c]), a);
            }
            *o = f32_to_bf16(a);
        }
    });
    out
}

/// Router keys of one row: softmax probabilities, or `sigmoid(l) + bias`; and the weight
/// source of each expert (the probabilities, or the unbiased sigmoid).
fn gating_keys(row: &[f32], bias: &[f32], gating: Gating) -> (Vec<f32>, Vec<f32>) {
    match gating {
        Gating::SigmoidBias => {
            let s: Vec<f32> = row.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect();
            let key = s.iter().zip(bias).map(|(&a, &b)| a + b).collect();
            (key, s)
        }
        _ => {
            let mut p = row.to_vec();
            crate::sample::softmax(&mut p);
            (p.clone(), p)
        }
    }
}

/// The weights of the experts `sel` (in selection order) from their weight sources.
fn gating_weights(src: &[f32], sel: &[usize], gating: Gating, scale: f32) -> Vec<f32> {
    let vals: Vec<f32> = sel.iter().map(|&i| src[i]).collect();
    let tot: f32 = vals.iter().fold(0.0, |a, &v| a + v);
    match gating {
        Gating::SoftmaxNorm => vals.iter().map(|v| v / tot).collect(),
        Gating::Softmax => vals,
        Gating::SigmoidBias => vals.iter().map(|v| v / (tot + 1e-20) * scale).collect(),
    }
}

/// topk_gating reference: per row, the top-k experts by key (largest first, lowest index
/// wins ties) and their weights. Softmax rows are `cpu::ops::softmax_topk`.
pub fn gating_ref(
    logits: &[f32],
    bias: &[f32],
    e: usize,
    k: usize,
    gating: Gating,
    scale: f32,
) -> (Vec<usize>, Vec<f32>) {
    if gating != Gating::SigmoidBias {
        return crate::cpu::ops::softmax_topk(logits, e, k, gating == Gating::SoftmaxNorm);
    }
    let (mut idx, mut w) = (Vec::new(), Vec::new());
    for row in logits.chunks_exact(e) {
        let (key, s) = gating_keys(row, bias, gating);
        let sel = crate::cpu::ops::topk(&key, k);
        w.extend(gating_weights(&s, &sel, gating, scale));
        idx.extend(sel);
    }
    (idx, w)
}

fn check_gating(
    logits: &[f32],
    bias: &[f32],
    s: &Shape,
    want_idx: &[i32],
    got_idx: &[i32],
    got_w: &[f32],
    tol: Tolerance,
) -> CheckResult {
    let (e, k) = (s.experts, s.k);
    let mut swaps = 0;
    let mut expect_w = Vec::with_capacity(got_w.len());
    for (t, row) in logits.chunks_exact(e).enumerate() {
        let (key, src) = gating_keys(row, bias, s.gating);
        let gi = &got_idx[t * k..(t + 1) * k];
        let wi = &want_idx[t * k..(t + 1) * k];
        let fail = |why: String| CheckResult { fail_reason: Some(format!("token {t}: {why}")), ..Default::default() };
        let mut sel = Vec::with_capacity(k);
        for &g in gi {
            if g < 0 || g as usize >= e || sel.contains(&(g as usize)) {
                return fail(format!("expert indices {gi:?} are not {k} distinct experts of {e}"));
            }
            sel.push(g as usize);
        }
        // Near tie: keys within f32 rounding, from different inputs (identical inputs are an
        // exact tie everywhere and must go to the lowest index).
        let near = |a: usize, b: usize| {
            let same_input = row[a] == row[b] && (s.gating != Gating::SigmoidBias || bias[a] == bias[b]);
            !same_input && (key[a] - key[b]).abs() <= 2e-6 * key[a].abs().max(key[b].abs()).max(1e-30)
        };
        for (j, (&g, &w)) in gi.iter().zip(wi).enumerate() {
            if g != w {
                if near(g as usize, w as usize) {
                    swaps += 1;
                } else {
                    return fail(format!(
                        "slot {j} chose expert {g} (key {}) but the reference chose {w} (key {}); kernel {gi:?}, \
                         reference {wi:?}",
                        key[g as usize], key[w as usize]
                    ));
                }
            }
        }
        expect_w.extend(gating_weights(&src, &sel, s.gating, s.scale));
    }
    let mut r = compare("w", &expect_w, got_w, tol);
    r.near_tie_swaps = swaps;
    r
}

/// A stacked affine matrix `[E, rows, cols]`: packed codes, bf16 scales and biases.
struct AffineStack<'a> {
    words: &'a [u32],
    scales: &'a [u16],
    biases: &'a [u16],
}

/// Dequantized row `r` of expert `e` of `m` (`rows` rows per expert, `s.hidden` columns).
fn dequant_row(m: &AffineStack, s: &Shape, rows: usize, e: usize, r: usize, out: &mut [f32]) {
    let AffineStack { words, scales, biases } = *m;
    let (cols, bits, g) = (s.hidden, s.bits as usize, s.group);
    let per_word = 32 / bits;
    let row = e * rows + r;
    let wrow = &words[row * cols / per_word..][..cols / per_word];
    let gpr = cols / g;
    let mask = (1u32 << bits) - 1;
    for (c, o) in out.iter_mut().enumerate() {
        let q = (wrow[c / per_word] >> (bits * (c % per_word))) & mask;
        let gi = row * gpr + c / g;
        *o = bf(scales[gi]) * q as f32 + bf(biases[gi]);
    }
}

/// gather_qmm_swiglu reference: per slot q (expert `idx[q]`, token q / K) and row r, the gate
/// and up dot products in f64, each rounded to f32 then bf16, then `bf16(bf16(silu(g))·u)`.
pub fn gather_ref(s: &Shape, ins: &[Tensor]) -> Vec<u16> {
    let get_u32 = |i: usize| match &ins[i].data {
        Data::U32(v) => v.as_slice(),
        _ => unreachable!("gather tensor {i}"),
    };
    let get_bf = |i: usize| match &ins[i].data {
        Data::Bf16(v) => v.as_slice(),
        _ => unreachable!("gather tensor {i}"),
    };
    let gate = AffineStack { words: get_u32(0), scales: get_bf(1), biases: get_bf(2) };
    let up = AffineStack { words: get_u32(3), scales: get_bf(4), biases: get_bf(5) };
    let Data::I32(idx) = &ins[6].data else { unreachable!("gather idx") };
    let x = bf16_to_f32(get_bf(7));
    let (h, i, k) = (s.hidden, s.inter, s.k);
    let mut out = vec![0u16; idx.len() * i];
    // Per expert and row: dequantize the gate and up rows once, then every slot routed there.
    let mut by_expert: Vec<Vec<usize>> = vec![Vec::new(); s.experts];
    for (q, &e) in idx.iter().enumerate() {
        by_expert[e as usize].push(q);
    }
    let results: Vec<(usize, usize, u16)> = by_expert
        .par_iter()
        .enumerate()
        .filter(|(_, qs)| !qs.is_empty())
        .flat_map_iter(|(e, qs)| {
            let (mut grow, mut urow) = (vec![0f32; h], vec![0f32; h]);
            let mut res = Vec::with_capacity(qs.len() * i);
            for r in 0..i {
                dequant_row(&gate, s, i, e, r, &mut grow);
                dequant_row(&up, s, i, e, r, &mut urow);
                for &q in qs {
                    let xt = &x[(q / k) * h..][..h];
                    let (mut ga, mut ua) = (0f64, 0f64);
                    for c in 0..h {
                        ga += grow[c] as f64 * xt[c] as f64;
                        ua += urow[c] as f64 * xt[c] as f64;
                    }
                    let g = bf(f32_to_bf16(ga as f32));
                    let u = bf(f32_to_bf16(ua as f32));
                    let sg = bf(f32_to_bf16(g / (1.0 + (-g).exp())));
                    res.push((q, r, f32_to_bf16(sg * u)));
                }
            }
            res
        })
        .collect();
    for (q, r, v) in results {
        out[q * i + r] = v;
    }
    out
}

/// rmsnorm_residual reference: `x' = bf16(x + src)` (exact in f32, then rounded), the sum
/// of squares in f64, `y = bf16(w · (x' · inv))` in f32.
pub fn rmsnorm_residual_ref(x: &[u16], src: &[u16], w: &[f32], n: usize, eps: f32) -> (Vec<u16>, Vec<u16>) {
    let x2: Vec<u16> = x.iter().zip(src).map(|(&a, &b)| f32_to_bf16(bf(a) + bf(b))).collect();
    let mut y = vec![0u16; x.len()];
    for (xr, yr) in x2.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
        let ss: f64 = xr.iter().map(|&v| (bf(v) as f64).powi(2)).sum();
        let inv = (1.0 / (ss / n as f64 + eps as f64).sqrt()) as f32;
        for ((o, &xv), &wv) in yr.iter_mut().zip(xr).zip(w) {
            *o = f32_to_bf16(wv * (bf(xv) * inv));
        }
    }
    (x2, y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::Arg;

    fn small(op: OpId, tokens: usize) -> Shape {
        let _ = op;
        PRESETS[2].shape(tokens)
    }

    /// A bf16 value's distance from `want` in ulps of bf16 at `want`'s magnitude.
    fn ulps(got: f32, want: f64) -> f64 {
        let ulp = 2f64.powi((want.abs().max(1e-30)).log2().floor() as i32 - 7);
        (got as f64 - want).abs() / ulp
    }

    #[test]
    fn combine_ref_matches_a_naive_f64_sum() {
        let s = small(OpId::MoeCombine, 5);
        let ins = OpId::MoeCombine.inputs(&s, 11);
        let (Data::Bf16(y), Data::F32(w)) = (&ins[0].data, &ins[1].data) else { panic!() };
        let Data::Bf16(out) = &OpId::MoeCombine.reference(&s, &ins)[0] else { panic!() };
        let (h, k) = (s.hidden, s.k);
        let mut worst = 0f64;
        for t in 0..s.tokens {
            for c in 0..h {
                let exact: f64 = (0..k).map(|j| w[t * k + j] as f64 * bf(y[(t * k + j) * h + c]) as f64).sum();
                worst = worst.max(ulps(bf(out[t * h + c]), exact));
            }
        }
        // f32 accumulation then one rounding to bf16: within about half an ulp.
        assert!(worst < 0.6, "worst {worst} ulps");
        assert!(out.iter().all(|&v| v != 0));
    }

    #[test]
    fn gating_ref_matches_brute_force_and_breaks_ties_low() {
        for preset in &PRESETS {
            let s = preset.shape(6);
            let ins = OpId::TopkGating.inputs(&s, 3);
            let (Data::F32(l), Data::F32(b)) = (&ins[0].data, &ins[1].data) else { panic!() };
            let (e, k) = (s.experts, s.k);
            let out = OpId::TopkGating.reference(&s, &ins);
            let (Data::I32(idx), Data::F32(w)) = (&out[0], &out[1]) else { panic!() };
            for t in 0..s.tokens {
                let row = &l[t * e..(t + 1) * e];
                // Independent: keys in f64, then repeatedly take the best remaining.
                let key: Vec<f64> = match s.gating {
                    Gating::SigmoidBias => {
                        row.iter().zip(b).map(|(&x, &bb)| 1.0 / (1.0 + (-(x as f64)).exp()) + bb as f64).collect()
                    }
                    _ => {
                        let mx = row.iter().fold(f64::MIN, |a, &x| a.max(x as f64));
                        let z: f64 = row.iter().map(|&x| (x as f64 - mx).exp()).sum();
                        row.iter().map(|&x| (x as f64 - mx).exp() / z).collect()
                    }
                };
                let mut left: Vec<usize> = (0..e).collect();
                let mut sel = Vec::new();
                for _ in 0..k {
                    let best = *left.iter().max_by(|&&a, &&c| key[a].total_cmp(&key[c]).then(c.cmp(&a))).unwrap();
                    sel.push(best);
                    left.retain(|&x| x != best);
                }
                let got: Vec<usize> = idx[t * k..(t + 1) * k].iter().map(|&i| i as usize).collect();
                assert_eq!(got, sel, "{} token {t}", preset.name);
                // The planted tie: expert 3 never ranks before expert 1.
                if let (Some(p1), Some(p3)) = (got.iter().position(|&x| x == 1), got.iter().position(|&x| x == 3)) {
                    assert!(p1 < p3);
                }
                let src: Vec<f64> = match s.gating {
                    Gating::SigmoidBias => sel.iter().map(|&i| 1.0 / (1.0 + (-(row[i] as f64)).exp())).collect(),
                    _ => sel.iter().map(|&i| key[i]).collect(),
                };
                let tot: f64 = src.iter().sum();
                for (j, v) in src.iter().enumerate() {
                    let expect = match s.gating {
                        Gating::SoftmaxNorm => v / tot,
                        Gating::Softmax => *v,
                        Gating::SigmoidBias => v / tot * s.scale as f64,
                    };
                    assert!(
                        (w[t * k + j] as f64 - expect).abs() < 1e-6 * expect.abs().max(1e-3),
                        "{} {expect}",
                        w[t * k + j]
                    );
                }
            }
        }
    }

    #[test]
    fn gather_ref_matches_naive_dequant_and_dot() {
        for (preset, tokens) in [(&PRESETS[2], 3usize), (&PRESETS[0], 1)] {
            let s = preset.shape(tokens);
            let ins = OpId::GatherQmmSwiglu.inputs(&s, 5);
            let Data::Bf16(act) = &OpId::GatherQmmSwiglu.reference(&s, &ins)[0] else { panic!() };
            let (Data::U32(gw), Data::Bf16(gs), Data::Bf16(gb)) = (&ins[0].data, &ins[1].data, &ins[2].data) else {
                panic!()
            };
            let (Data::U32(uw), Data::Bf16(us), Data::Bf16(ub)) = (&ins[3].data, &ins[4].data, &ins[5].data) else {
                panic!()
            };
            let (Data::I32(idx), Data::Bf16(x)) = (&ins[6].data, &ins[7].data) else { panic!() };
            let (h, i, k, bits, g) = (s.hidden, s.inter, s.k, s.bits, s.group);
            let rb = h * bits as usize / 8;
            let mut checked = 0;
            for q in 0..idx.len() {
                let e = idx[q] as usize;
                for r in (0..i).step_by(37) {
                    let row = e * i + r;
                    // Independent: the checkpoint's own affine dequantizer on the row's bytes.
                    let deq = |w: &[u32], sc: &[u16], bi: &[u16]| {
                        let bytes: Vec<u8> =
                            w[row * rb / 4..(row + 1) * rb / 4].iter().flat_map(|x| x.to_le_bytes()).collect();
                        let scf: Vec<f32> = sc[row * h / g..(row + 1) * h / g].iter().map(|&v| bf(v)).collect();
                        let bif: Vec<f32> = bi[row * h / g..(row + 1) * h / g].iter().map(|&v| bf(v)).collect();
                        let mut out = vec![0f32; h];
                        crate::checkpoint::quant::affine_dequant_row(&bytes, bits, g, &scf, &bif, &mut out);
                        out
                    };
                    let (gr, ur) = (deq(gw, gs, gb), deq(uw, us, ub));
                    let xt: Vec<f64> = x[(q / k) * h..(q / k + 1) * h].iter().map(|&v| bf(v) as f64).collect();
                    let gd: f64 = gr.iter().zip(&xt).map(|(&a, b)| a as f64 * b).sum();
                    let ud: f64 = ur.iter().zip(&xt).map(|(&a, b)| a as f64 * b).sum();
                    let want = gd / (1.0 + (-gd).exp()) * ud;
                    let got = bf(act[q * i + r]) as f64;
                    assert!((got - want).abs() <= 0.03 * want.abs() + 1e-3, "q {q} r {r}: {got} vs {want}");
                    assert!(got != 0.0);
                    checked += 1;
                }
            }
            assert!(checked > 10);
        }
    }

    #[test]
    fn rmsnorm_residual_ref_matches_f64() {
        let s = PRESETS[0].shape(3);
        let ins = OpId::RmsnormResidual.inputs(&s, 9);
        let (Data::Bf16(x), Data::Bf16(src), Data::F32(w)) = (&ins[0].data, &ins[1].data, &ins[2].data) else {
            panic!()
        };
        let out = OpId::RmsnormResidual.reference(&s, &ins);
        let (Data::Bf16(x2), Data::Bf16(y)) = (&out[0], &out[1]) else { panic!() };
        let n = s.hidden;
        for t in 0..3 {
            let xs: Vec<f64> = (0..n).map(|c| bf(x[t * n + c]) as f64 + bf(src[t * n + c]) as f64).collect();
            for c in 0..n {
                assert!(ulps(bf(x2[t * n + c]), xs[c]) <= 0.5 + 1e-9);
            }
            let r: Vec<f64> = (0..n).map(|c| bf(x2[t * n + c]) as f64).collect();
            let inv = 1.0 / (r.iter().map(|v| v * v).sum::<f64>() / n as f64 + s.eps as f64).sqrt();
            for c in 0..n {
                let want = w[c] as f64 * r[c] * inv;
                assert!(ulps(bf(y[t * n + c]), want) < 0.6, "{} vs {want}", bf(y[t * n + c]));
            }
        }
    }

    #[test]
    fn checks_catch_poison_wrong_values_and_wrong_experts() {
        let s = small(OpId::MoeCombine, 4);
        let ins = OpId::MoeCombine.inputs(&s, 1);
        let want = OpId::MoeCombine.reference(&s, &ins);
        assert!(OpId::MoeCombine.check(&s, &ins, &want, &want).ok);
        let Data::Bf16(mut bad) = want[0].clone() else { panic!() };
        bad[7] = 0xFFFF; // NaN: the poison
        let r = OpId::MoeCombine.check(&s, &ins, &want, &[Data::Bf16(bad.clone())]);
        assert!(!r.ok && r.fail_reason.unwrap().contains("out[7]"));
        let Data::Bf16(w0) = &want[0] else { panic!() };
        bad[7] = f32_to_bf16(bf(w0[7]) * 1.1);
        assert!(!OpId::MoeCombine.check(&s, &ins, &want, &[Data::Bf16(bad)]).ok);

        // Router: a swapped expert (not a near tie) fails; one ulp off in weights passes.
        let s = PRESETS[1].shape(5);
        let ins = OpId::TopkGating.inputs(&s, 2);
        let want = OpId::TopkGating.reference(&s, &ins);
        assert!(OpId::TopkGating.check(&s, &ins, &want, &want).ok);
        let (Data::I32(wi), Data::F32(ww)) = (&want[0], &want[1]) else { panic!() };
        let mut ww2 = ww.clone();
        ww2[0] = f32::from_bits(ww2[0].to_bits() + 1);
        assert!(OpId::TopkGating.check(&s, &ins, &want, &[Data::I32(wi.clone()), Data::F32(ww2)]).ok);
        let mut wi2 = wi.clone();
        wi2.swap(0, 1);
        let r = OpId::TopkGating.check(&s, &ins, &want, &[Data::I32(wi2), Data::F32(ww.clone())]);
        assert!(!r.ok && r.fail_reason.unwrap().contains("token 0: slot 0"));

        // rmsnorm: the residual must be exact.
        let s = small(OpId::RmsnormResidual, 2);
        let ins = OpId::RmsnormResidual.inputs(&s, 4);
        let want = OpId::RmsnormResidual.reference(&s, &ins);
        let Data::Bf16(mut x2) = want[0].clone() else { panic!() };
        x2[3] ^= 1;
        let r = OpId::RmsnormResidual.check(&s, &ins, &want, &[Data::Bf16(x2), want[1].clone()]);
        assert!(!r.ok && r.fail_reason.unwrap().contains("x[3]"));
    }

    #[test]
    fn every_preset_fits_every_op_and_inputs_match_args() {
        for op in OpId::ALL {
            for p in &PRESETS {
                let s = p.shape(2);
                op.supports(&s).unwrap();
                let ins = op.inputs(&s, 0);
                let ptrs: Vec<u64> = (1..=ins.len() as u64).collect();
                let args = op.kernel_args(&s, &ptrs);
                let n_ptr = args.iter().filter(|a| matches!(a, Arg::Ptr(_))).count();
                assert_eq!(n_ptr, ins.len(), "{op:?}");
                assert!(op.bytes(&s) > 0.0 && op.flops(&s) > 0.0);
                assert_eq!(op.reference(&s, &ins).len(), ins.iter().filter(|t| t.role != Role::In).count());
            }
            assert_eq!(OpId::parse(op.name()).unwrap(), op);
        }
        assert!(OpId::parse("nope").is_err());
    }
}
