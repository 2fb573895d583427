//! [`Mat`]: a 2-D weight matrix `[rows, cols]` in whatever format it is stored in, read
//! straight from the memory-mapped checkpoint.
//!
//! The CPU reference never materialises a dequantized model (the 30B preset would need
//! 120 GB as f32); it dequantizes one row at a time into f32 — exactly, through
//! [`super::quant`] — and dots it with the activations. Stacked expert tensors
//! `[E, rows, ...]` are just E `Mat`s that share one buffer at different offsets.

use std::sync::Arc;

use half::{bf16, f16};
use rayon::prelude::*;

use super::quant;

/// A shared byte range: a window onto a memory map (or any owned buffer).
#[derive(Clone)]
pub struct Bytes {
    buf: Arc<dyn AsRef<[u8]> + Send + Sync>,
    start: usize,
    len: usize,
}

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bytes[{}..{}]", self.start, self.start + self.len)
    }
}

impl Bytes {
    /// A window `start..start+len` of `buf` (caller guarantees it is in bounds).
    pub fn new(buf: Arc<dyn AsRef<[u8]> + Send + Sync>, start: usize, len: usize) -> Bytes {
        assert!(start + len <= (*buf).as_ref().len(), "Bytes window out of bounds");
        Bytes { buf, start, len }
    }

    /// Wraps an owned buffer.
    pub fn from_vec(v: Vec<u8>) -> Bytes {
        let len = v.len();
        Bytes { buf: Arc::new(v), start: 0, len }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &(*self.buf).as_ref()[self.start..self.start + self.len]
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the window is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A sub-window (relative to this one).
    pub fn slice(&self, start: usize, len: usize) -> Bytes {
        assert!(start + len <= self.len, "Bytes::slice out of bounds");
        Bytes { buf: self.buf.clone(), start: self.start + start, len }
    }
}

/// A float storage type for weights, scales and biases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatType {
    /// IEEE single.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
}

impl FloatType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            FloatType::F32 => 4,
            _ => 2,
        }
    }

    /// Lowercase name (as in the CLI and capsules).
    pub fn name(self) -> &'static str {
        match self {
            FloatType::F32 => "f32",
            FloatType::F16 => "f16",
            FloatType::Bf16 => "bf16",
        }
    }
}

/// Decodes little-endian floats of type `t` from `src` into `out` (lengths must agree).
pub fn decode_floats(t: FloatType, src: &[u8], out: &mut [f32]) {
    match t {
        FloatType::F32 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        FloatType::F16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        FloatType::Bf16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
    }
}

/// A typed float array in a byte window.
#[derive(Debug, Clone)]
pub struct FloatBytes {
    /// Element type.
    pub dtype: FloatType,
    /// The data.
    pub data: Bytes,
}

impl FloatBytes {
    /// Decodes elements `start..start+out.len()` into `out`.
    pub fn read(&self, start: usize, out: &mut [f32]) {
        let s = self.dtype.size();
        decode_floats(self.dtype, &self.data.as_slice()[start * s..(start + out.len()) * s], out);
    }

    /// Decodes everything.
    pub fn to_vec(&self) -> Vec<f32> {
        let mut v = vec![0.0; self.data.len() / self.dtype.size()];
        self.read(0, &mut v);
        v
    }
}

/// How a [`Mat`] is stored.
#[derive(Debug, Clone)]
pub enum MatKind {
    /// Plain floats, row-major.
    Float(FloatBytes),
    /// MLX affine: packed codes `[rows, cols·bits/32]` u32 + scales/biases `[rows, cols/group]`.
    Affine {
        /// Bits per code.
        bits: u32,
        /// Elements per group.
        group: usize,
        /// Packed codes.
        packed: Bytes,
        /// Per-group scales.
        scales: FloatBytes,
        /// Per-group biases.
        biases: FloatBytes,
    },
    /// MLX / OCP MXFP4: codes `[rows, cols/2]` bytes + E8M0 scales `[rows, cols/32]` u8.
    Mxfp4 {
        /// Packed E2M1 codes.
        packed: Bytes,
        /// E8M0 exponents.
        scales: Bytes,
    },
}

/// A weight matrix `[rows, cols]` (PyTorch Linear layout: rows = output features).
#[derive(Debug, Clone)]
pub struct Mat {
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// Storage.
    pub kind: MatKind,
}

impl Mat {
    /// Short description of the storage format, e.g. `affine4g64`, `bf16`.
    pub fn format_name(&self) -> String {
        match &self.kind {
            MatKind::Float(f) => f.dtype.name().into(),
            MatKind::Affine { bits, group, .. } => format!("affine{bits}g{group}"),
            MatKind::Mxfp4 { .. } => "mxfp4".into(),
        }
    }

    /// Bytes that must be read to use the whole matrix once (weights + scales + biases).
    pub fn nbytes(&self) -> usize {
        match &self.kind {
            MatKind::Float(f) => f.data.len(),
            MatKind::Affine { packed, scales, biases, .. } => packed.len() + scales.data.len() + biases.data.len(),
            MatKind::Mxfp4 { packed, scales } => packed.len() + scales.len(),
        }
    }

    /// Dequantizes row `r` into `out` (`out.len() == cols`), exactly per the stored format.
    pub fn dequant_row(&self, r: usize, out: &mut [f32]) {
        let cols = self.cols;
        match &self.kind {
            MatKind::Float(f) => f.read(r * cols, out),
            MatKind::Affine { bits, group, packed, scales, biases } => {
                let row_bytes = cols * *bits as usize / 8;
                let groups = cols / group;
                // Scales and biases of this row: on the stack for every real shape.
                let mut stack = [0f32; 2 * 512];
                let mut heap = Vec::new();
                let sb = if groups <= 512 {
                    &mut stack[..2 * groups]
                } else {
                    heap.resize(2 * groups, 0.0);
                    &mut heap[..]
                };
                let (s, b) = sb.split_at_mut(groups);
                scales.read(r * groups, s);
                biases.read(r * groups, b);
                let row = &packed.as_slice()[r * row_bytes..][..row_bytes];
                quant::affine_dequant_row(row, *bits, *group, s, b, out);
            }
            MatKind::Mxfp4 { packed, scales } => {
                let row = &packed.as_slice()[r * cols / 2..][..cols / 2];
                let sc = &scales.as_slice()[r * cols / 32..][..cols / 32];
                quant::mxfp4_dequant_row(row, sc, out);
            }
        }
    }

    /// Rows `start..start+n` as a matrix sharing this one's storage (MLA splits `kv_b_proj`
    /// into per-head key and value blocks this way).
    pub fn row_slice(&self, start: usize, n: usize) -> Mat {
        assert!(start + n <= self.rows, "row_slice out of bounds");
        let cols = self.cols;
        let kind = match &self.kind {
            MatKind::Float(f) => {
                let s = f.dtype.size() * cols;
                MatKind::Float(FloatBytes { dtype: f.dtype, data: f.data.slice(start * s, n * s) })
            }
            MatKind::Affine { bits, group, packed, scales, biases } => {
                let (rb, g) = (cols * *bits as usize / 8, cols / group);
                let sb = |x: &FloatBytes| FloatBytes {
                    dtype: x.dtype,
                    data: x.data.slice(start * g * x.dtype.size(), n * g * x.dtype.size()),
                };
                MatKind::Affine {
                    bits: *bits,
                    group: *group,
                    packed: packed.slice(start * rb, n * rb),
                    scales: sb(scales),
                    biases: sb(biases),
                }
            }
            MatKind::Mxfp4 { packed, scales } => MatKind::Mxfp4 {
                packed: packed.slice(start * cols / 2, n * cols / 2),
                scales: scales.slice(start * cols / 32, n * cols / 32),
            },
        };
        Mat { rows: n, cols, kind }
    }

    /// The transpose `[cols, rows]`, dequantized exactly into f32.
    pub fn transposed_f32(&self) -> Mat {
        let w = self.to_f32();
        let mut t = Vec::with_capacity(w.len() * 4);
        for c in 0..self.cols {
            for r in 0..self.rows {
                t.extend_from_slice(&w[r * self.cols + c].to_le_bytes());
            }
        }
        let data = FloatBytes { dtype: FloatType::F32, data: Bytes::from_vec(t) };
        Mat { rows: self.cols, cols: self.rows, kind: MatKind::Float(data) }
    }

    /// The whole matrix as f32 (tests and small tensors only).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for (r, row) in out.chunks_exact_mut(self.cols).enumerate() {
            self.dequant_row(r, row);
        }
        out
    }

    /// `y[t, :] = W · x[t, :]` for `t` input rows: x `[t, cols]`, y `[t, rows]`.
    /// Each weight row is dequantized once and dotted with every input row.
    pub fn matmul(&self, x: &[f32], t: usize, y: &mut [f32]) {
        assert_eq!(x.len(), t * self.cols, "matmul input");
        assert_eq!(y.len(), t * self.rows, "matmul output");
        let cols = self.cols;
        let body = |buf: &mut Vec<f32>, r: usize, out: &mut [f32]| {
            self.dequant_row(r, buf);
            for (i, o) in out.iter_mut().enumerate() {
                *o = dot(buf, &x[i * cols..(i + 1) * cols]);
            }
        };
        if t == 1 {
            y.par_chunks_mut(64).enumerate().for_each_init(
                || vec![0f32; cols],
                |buf, (blk, out)| {
                    for (i, o) in out.iter_mut().enumerate() {
                        body(buf, blk * 64 + i, std::slice::from_mut(o));
                    }
                },
            );
            return;
        }
        // [rows, t] then transpose into [t, rows].
        let mut tmp = vec![0f32; self.rows * t];
        tmp.par_chunks_mut(t).enumerate().for_each_init(|| vec![0f32; cols], |buf, (r, out)| body(buf, r, out));
        for r in 0..self.rows {
            for i in 0..t {
                y[i * self.rows + r] = tmp[r * t + i];
            }
        }
    }
}

/// Dot product with 8 independent f32 accumulators (fixed order ⇒ deterministic, and the
/// compiler can vectorise it without reassociation).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}
