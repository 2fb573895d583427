//! The GGUF file format (version 3), as llama.cpp reads it: a writer that streams tensor
//! data, a small reader, the Q4_0 / Q8_0 block quantizers and BF16 rounding.
//!
//! Layout of a file (little-endian throughout; `ggml/src/gguf.cpp` is the authority):
//!
//! ```text
//!  "GGUF" u32 version=3  u64 n_tensors  u64 n_kv
//!  n_kv ×  { string key, u32 value_type, value }          string = u64 len + UTF-8 bytes
//!  n_tensors × { string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset }
//!  zero padding to `general.alignment` (default 32)
//!  data: each tensor at its offset (relative to the data start), padded to the alignment
//! ```
//!
//! `ne[0]` is the contiguous (innermost) dimension, so a PyTorch `[out, in]` weight is
//! `ne = [in, out]` and stacked experts `[E, out, in]` are `ne = [in, out, E]`. llama.cpp
//! insists that offsets are consecutive (each tensor starts where the previous one's padded
//! data ends), so the writer fixes every offset up front from the tensor list and then
//! accepts data strictly in that order — which is also what lets a 17 GB file be produced
//! one tensor (one chunk of rows) at a time.
//!
//! The quantizers reproduce ggml's reference rounding exactly (`quantize_row_q4_0_ref`,
//! `quantize_row_q8_0_ref` in `ggml-quants.c`): the scale is computed in f32, codes are
//! derived from the f32 scale, and only then is the scale stored as f16 (round to nearest
//! even). Non-finite inputs and scales that overflow f16 are refused rather than written.

use std::io::Write;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;

use crate::checkpoint::FloatType;
use crate::checkpoint::mat::decode_floats;
use crate::error::{Error, Result};

/// The four magic bytes at the start of every GGUF file.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// The GGUF version this module writes (and the only one it reads).
pub const VERSION: u32 = 3;
/// Data alignment written to `general.alignment` (also the GGUF default).
pub const ALIGNMENT: u64 = 32;
/// llama.cpp's `GGML_MAX_NAME`: tensor names must be shorter than this.
pub const MAX_NAME: usize = 64;
/// llama.cpp's `GGML_MAX_DIMS`.
pub const MAX_DIMS: usize = 4;

/// A ggml tensor element type (the subset whose sizes this module knows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// IEEE single.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
    /// 32 elements: f16 scale + 16 bytes of 4-bit codes (symmetric, offset 8).
    Q4_0,
    /// 32 elements: f16 scale and min + 4-bit codes.
    Q4_1,
    /// 32 elements: f16 scale + 5-bit codes.
    Q5_0,
    /// 32 elements: f16 scale and min + 5-bit codes.
    Q5_1,
    /// 32 elements: f16 scale + 32 signed bytes.
    Q8_0,
    /// 32 elements: f16 scale and sum + 32 signed bytes.
    Q8_1,
    /// K-quant, 256 elements, 2-bit.
    Q2K,
    /// K-quant, 256 elements, 3-bit.
    Q3K,
    /// K-quant, 256 elements, 4-bit.
    Q4K,
    /// K-quant, 256 elements, 5-bit.
    Q5K,
    /// K-quant, 256 elements, 6-bit.
    Q6K,
    /// K-quant, 256 elements, 8-bit (intermediate type).
    Q8K,
    /// Signed 8-bit integer.
    I8,
    /// Signed 16-bit integer.
    I16,
    /// Signed 32-bit integer.
    I32,
    /// Signed 64-bit integer.
    I64,
    /// IEEE double.
    F64,
    /// OCP MXFP4: 32 elements, an E8M0 exponent byte + 16 bytes of E2M1 codes (element j in
    /// the low nibble of byte j, element j+16 in its high nibble — ggml's `block_mxfp4`).
    Mxfp4,
}

/// (type, ggml id, name, elements per block, bytes per block) — from `ggml.h` /
/// `ggml-common.h`.
const TYPES: [(GgmlType, u32, &str, usize, usize); 21] = [
    (GgmlType::F32, 0, "f32", 1, 4),
    (GgmlType::F16, 1, "f16", 1, 2),
    (GgmlType::Q4_0, 2, "q4_0", 32, 18),
    (GgmlType::Q4_1, 3, "q4_1", 32, 20),
    (GgmlType::Q5_0, 6, "q5_0", 32, 22),
    (GgmlType::Q5_1, 7, "q5_1", 32, 24),
    (GgmlType::Q8_0, 8, "q8_0", 32, 34),
    (GgmlType::Q8_1, 9, "q8_1", 32, 36),
    (GgmlType::Q2K, 10, "q2_K", 256, 84),
    (GgmlType::Q3K, 11, "q3_K", 256, 110),
    (GgmlType::Q4K, 12, "q4_K", 256, 144),
    (GgmlType::Q5K, 13, "q5_K", 256, 176),
    (GgmlType::Q6K, 14, "q6_K", 256, 210),
    (GgmlType::Q8K, 15, "q8_K", 256, 292),
    (GgmlType::I8, 24, "i8", 1, 1),
    (GgmlType::I16, 25, "i16", 1, 2),
    (GgmlType::I32, 26, "i32", 1, 4),
    (GgmlType::I64, 27, "i64", 1, 8),
    (GgmlType::F64, 28, "f64", 1, 8),
    (GgmlType::Bf16, 30, "bf16", 1, 2),
    (GgmlType::Mxfp4, 39, "mxfp4", 32, 17),
];

impl GgmlType {
    fn row(self) -> &'static (GgmlType, u32, &'static str, usize, usize) {
        TYPES.iter().find(|t| t.0 == self).expect("every variant is in TYPES")
    }

    /// The `ggml_type` id stored in tensor infos.
    pub fn id(self) -> u32 {
        self.row().1
    }

    /// The type with ggml id `id`, if this module knows its size.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        TYPES.iter().find(|t| t.1 == id).map(|t| t.0)
    }

    /// ggml's name for the type (`q4_0`, `f32`, …).
    pub fn name(self) -> &'static str {
        self.row().2
    }

    /// Elements per block (1 for plain types).
    pub fn block_len(self) -> usize {
        self.row().3
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        self.row().4
    }

    /// Bytes of a row of `n` elements, or `None` if `n` is not a whole number of blocks.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        n.is_multiple_of(self.block_len()).then(|| n / self.block_len() * self.block_bytes())
    }
}

/// The type tag of a metadata value (`gguf_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    /// `uint8`.
    U8,
    /// `int8`.
    I8,
    /// `uint16`.
    U16,
    /// `int16`.
    I16,
    /// `uint32`.
    U32,
    /// `int32`.
    I32,
    /// `float32`.
    F32,
    /// `bool` (one byte, 0 or 1).
    Bool,
    /// `string`.
    Str,
    /// `array` of one element type.
    Array,
    /// `uint64`.
    U64,
    /// `int64`.
    I64,
    /// `float64`.
    F64,
}

impl ValueType {
    /// The `gguf_type` id.
    pub fn id(self) -> u32 {
        match self {
            ValueType::U8 => 0,
            ValueType::I8 => 1,
            ValueType::U16 => 2,
            ValueType::I16 => 3,
            ValueType::U32 => 4,
            ValueType::I32 => 5,
            ValueType::F32 => 6,
            ValueType::Bool => 7,
            ValueType::Str => 8,
            ValueType::Array => 9,
            ValueType::U64 => 10,
            ValueType::I64 => 11,
            ValueType::F64 => 12,
        }
    }

    /// The type with `gguf_type` id `id`.
    pub fn from_id(id: u32) -> Option<ValueType> {
        use ValueType::*;
        [U8, I8, U16, I16, U32, I32, F32, Bool, Str, Array, U64, I64, F64].into_iter().find(|t| t.id() == id)
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `uint8`.
    U8(u8),
    /// `int8`.
    I8(i8),
    /// `uint16`.
    U16(u16),
    /// `int16`.
    I16(i16),
    /// `uint32` (what llama.cpp expects for counts and lengths).
    U32(u32),
    /// `int32`.
    I32(i32),
    /// `float32` (what llama.cpp expects for epsilons and rope bases).
    F32(f32),
    /// `bool`.
    Bool(bool),
    /// `string`.
    Str(String),
    /// An array whose elements all have the given (non-array) type.
    Array(ValueType, Vec<Value>),
    /// `uint64`.
    U64(u64),
    /// `int64`.
    I64(i64),
    /// `float64`.
    F64(f64),
}

impl Value {
    /// The value's type tag.
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::Str(_) => ValueType::Str,
            Value::Array(..) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// The value as a `u32`, if it is one.
    pub fn as_u32(&self) -> Option<u32> {
        if let Value::U32(x) = self { Some(*x) } else { None }
    }

    /// The value as an `f32`, if it is one.
    pub fn as_f32(&self) -> Option<f32> {
        if let Value::F32(x) = self { Some(*x) } else { None }
    }

    /// The value as a string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        if let Value::Str(x) = self { Some(x) } else { None }
    }

    /// The value as a bool, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        if let Value::Bool(x) = self { Some(*x) } else { None }
    }

    fn encode(&self, out: &mut Vec<u8>) -> std::result::Result<(), String> {
        match self {
            Value::U8(x) => out.push(*x),
            Value::I8(x) => out.push(*x as u8),
            Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::Bool(x) => out.push(*x as u8),
            Value::Str(s) => put_str(out, s),
            Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::Array(t, items) => {
                if *t == ValueType::Array {
                    return Err("nested arrays are not supported".into());
                }
                out.extend_from_slice(&t.id().to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for v in items {
                    if v.value_type() != *t {
                        return Err(format!("array of {t:?} holds a {:?}", v.value_type()));
                    }
                    v.encode(out)?;
                }
            }
        }
        Ok(())
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn pad_to(n: u64, align: u64) -> u64 {
    n.div_ceil(align) * align
}

/// One tensor's entry in the file: name, dims (`ne`, innermost first), type, data offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name, e.g. `blk.0.ffn_gate_exps.weight`.
    pub name: String,
    /// `ne[0..n_dims]`: `ne[0]` is the row length (contiguous), then rows, then stacks.
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
    /// Byte offset of the data, relative to the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Elements per row (`ne[0]`).
    pub fn row_len(&self) -> usize {
        self.dims.first().copied().unwrap_or(1) as usize
    }

    /// Number of rows (product of `ne[1..]`).
    pub fn n_rows(&self) -> usize {
        self.dims.iter().skip(1).product::<u64>() as usize
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.ty.row_bytes(self.row_len()).unwrap_or(0)
    }

    /// Bytes of the tensor's data (without padding).
    pub fn n_bytes(&self) -> u64 {
        self.row_bytes() as u64 * self.n_rows() as u64
    }
}

/// A tensor to be written: name, dims (`ne`, innermost first) and type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Tensor name (shorter than [`MAX_NAME`] bytes, unique).
    pub name: String,
    /// `ne`, innermost first (1 to [`MAX_DIMS`] entries, all positive).
    pub dims: Vec<u64>,
    /// Element type; `dims[0]` must be a whole number of its blocks.
    pub ty: GgmlType,
}

/// Streams a GGUF file: header, metadata and tensor infos on creation, then each tensor's
/// data in order (in as many chunks as the caller likes), then [`GgufWriter::finish`].
pub struct GgufWriter<W: Write> {
    w: W,
    path: PathBuf,
    tensors: Vec<TensorInfo>,
    /// Index of the tensor whose data is being written.
    current: usize,
    /// Bytes of the current tensor written so far.
    in_tensor: u64,
    /// Bytes written to `w` in total.
    written: u64,
    /// Bytes of header, metadata, tensor infos and padding.
    head_len: u64,
}

impl<W: Write> GgufWriter<W> {
    /// Writes the header, `kv` and the infos of `tensors` (offsets computed here) to `w`.
    /// `path` is used in error messages only.
    pub fn new(mut w: W, path: &Path, kv: &[(String, Value)], tensors: &[TensorSpec]) -> Result<GgufWriter<W>> {
        let bad = |why: String| Error::format(path, why);
        let mut head = Vec::with_capacity(1 << 16);
        head.extend_from_slice(&MAGIC);
        head.extend_from_slice(&VERSION.to_le_bytes());
        head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(kv.len() as u64).to_le_bytes());
        let mut keys = std::collections::HashSet::new();
        for (k, v) in kv {
            if !keys.insert(k.as_str()) {
                return Err(bad(format!("metadata key `{k}` given twice")));
            }
            if k == "general.alignment" && *v != Value::U32(ALIGNMENT as u32) {
                return Err(bad(format!("general.alignment must be u32 {ALIGNMENT}")));
            }
            put_str(&mut head, k);
            head.extend_from_slice(&v.value_type().id().to_le_bytes());
            v.encode(&mut head).map_err(|e| bad(format!("metadata `{k}`: {e}")))?;
        }
        let mut infos = Vec::with_capacity(tensors.len());
        let mut names = std::collections::HashSet::new();
        let mut offset = 0u64;
        for t in tensors {
            if t.name.len() >= MAX_NAME || t.name.is_empty() {
                return Err(bad(format!("tensor name `{}` must be 1..{} bytes", t.name, MAX_NAME - 1)));
            }
            if !names.insert(t.name.as_str()) {
                return Err(bad(format!("tensor `{}` given twice", t.name)));
            }
            if t.dims.is_empty() || t.dims.len() > MAX_DIMS || t.dims.contains(&0) {
                return Err(bad(format!(
                    "tensor `{}`: dims {:?} must be 1..={MAX_DIMS} positive sizes",
                    t.name, t.dims
                )));
            }
            if t.ty.row_bytes(t.dims[0] as usize).is_none() {
                return Err(bad(format!(
                    "tensor `{}`: row length {} is not a multiple of the {} block size {}",
                    t.name,
                    t.dims[0],
                    t.ty.name(),
                    t.ty.block_len()
                )));
            }
            let info = TensorInfo { name: t.name.clone(), dims: t.dims.clone(), ty: t.ty, offset };
            put_str(&mut head, &info.name);
            head.extend_from_slice(&(info.dims.len() as u32).to_le_bytes());
            for d in &info.dims {
                head.extend_from_slice(&d.to_le_bytes());
            }
            head.extend_from_slice(&info.ty.id().to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            offset += pad_to(info.n_bytes(), ALIGNMENT);
            infos.push(info);
        }
        head.resize(pad_to(head.len() as u64, ALIGNMENT) as usize, 0);
        w.write_all(&head).map_err(|e| Error::io(path, e))?;
        Ok(GgufWriter {
            w,
            path: path.to_path_buf(),
            tensors: infos,
            current: 0,
            in_tensor: 0,
            written: head.len() as u64,
            head_len: head.len() as u64,
        })
    }

    /// The tensor infos, with their offsets.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// Total file size once every tensor is written.
    pub fn file_size(&self) -> u64 {
        self.head_len + self.tensors.iter().map(|t| pad_to(t.n_bytes(), ALIGNMENT)).sum::<u64>()
    }

    /// Appends `chunk` to the data of the current tensor (the first not yet complete);
    /// pads and moves to the next tensor when it is complete. A chunk may not run past the
    /// end of the current tensor.
    pub fn write_data(&mut self, chunk: &[u8]) -> Result<()> {
        let Some(t) = self.tensors.get(self.current) else {
            return Err(Error::format(&self.path, "more tensor data than the tensor infos announce (a bug)"));
        };
        let (need, name) = (t.n_bytes(), t.name.clone());
        if self.in_tensor + chunk.len() as u64 > need {
            return Err(Error::format(
                &self.path,
                format!(
                    "tensor `{name}`: {} bytes written but it holds {need} (a bug)",
                    self.in_tensor + chunk.len() as u64
                ),
            ));
        }
        self.w.write_all(chunk).map_err(|e| Error::io(&self.path, e))?;
        self.in_tensor += chunk.len() as u64;
        self.written += chunk.len() as u64;
        if self.in_tensor == need {
            let pad = (pad_to(need, ALIGNMENT) - need) as usize;
            self.w.write_all(&[0u8; ALIGNMENT as usize][..pad]).map_err(|e| Error::io(&self.path, e))?;
            self.written += pad as u64;
            self.current += 1;
            self.in_tensor = 0;
        }
        Ok(())
    }

    /// Checks that every tensor was written in full, flushes, and returns the sink.
    pub fn finish(mut self) -> Result<W> {
        if let Some(t) = self.tensors.get(self.current) {
            return Err(Error::format(
                &self.path,
                format!(
                    "tensor `{}` is incomplete: {} of {} bytes written (a bug)",
                    t.name,
                    self.in_tensor,
                    t.n_bytes()
                ),
            ));
        }
        debug_assert_eq!(self.written, self.file_size(), "bytes written vs layout");
        self.w.flush().map_err(|e| Error::io(&self.path, e))?;
        Ok(self.w)
    }
}

/// An opened GGUF file: metadata and tensor infos parsed and checked, data memory-mapped.
pub struct GgufFile {
    /// The file.
    pub path: PathBuf,
    /// GGUF version (always 3 here).
    pub version: u32,
    /// Data alignment (`general.alignment`, default 32).
    pub alignment: u64,
    /// Metadata in file order.
    pub kv: Vec<(String, Value)>,
    /// Tensor infos in file order.
    pub tensors: Vec<TensorInfo>,
    /// Absolute file offset of the data section.
    pub data_start: u64,
    map: Mmap,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GgufFile({}, v{}, {} kv, {} tensors)",
            self.path.display(),
            self.version,
            self.kv.len(),
            self.tensors.len()
        )
    }
}

/// A bounds-checked little-endian cursor over the file bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn bad(&self, why: String) -> Error {
        Error::format(self.path, why)
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if self.buf.len() - self.pos < n {
            return Err(self.bad(format!(
                "truncated GGUF file: {what} needs {n} bytes at offset {} but the file has {}",
                self.pos,
                self.buf.len()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N, what)?.try_into().expect("length checked"))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    /// A count of things each at least `min_size` bytes long: bounded by what is left.
    fn count(&mut self, what: &str, min_size: usize) -> Result<usize> {
        let n = self.u64(what)?;
        let left = (self.buf.len() - self.pos) as u64;
        if n > left / min_size.max(1) as u64 {
            return Err(self.bad(format!("{what} {n} cannot fit in the {left} bytes left (corrupt header)")));
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(what, 1)?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.bad(format!("{what} is not valid UTF-8")))
    }
    fn value(&mut self, t: ValueType, key: &str) -> Result<Value> {
        Ok(match t {
            ValueType::U8 => Value::U8(self.arr::<1>(key)?[0]),
            ValueType::I8 => Value::I8(self.arr::<1>(key)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.arr(key)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.arr(key)?)),
            ValueType::U32 => Value::U32(self.u32(key)?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.arr(key)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.arr(key)?)),
            ValueType::Bool => match self.arr::<1>(key)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.bad(format!("metadata `{key}`: bool byte {b} is not 0 or 1"))),
            },
            ValueType::Str => Value::Str(self.string(key)?),
            ValueType::U64 => Value::U64(self.u64(key)?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.arr(key)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.arr(key)?)),
            ValueType::Array => {
                let id = self.u32(key)?;
                let et = ValueType::from_id(id)
                    .ok_or_else(|| self.bad(format!("metadata `{key}`: unknown array element type {id}")))?;
                if et == ValueType::Array {
                    return Err(self.bad(format!("metadata `{key}`: nested arrays are not supported")));
                }
                let n = self.count(key, 1)?;
                let items = (0..n).map(|_| self.value(et, key)).collect::<Result<Vec<_>>>()?;
                Value::Array(et, items)
            }
        })
    }
}

impl GgufFile {
    /// Opens and validates `path`: magic, version 3, metadata, tensor infos (known types,
    /// whole blocks per row, consecutive aligned offsets) and that the data fits in the file.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = crate::input::open(path)?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < 24 {
            return Err(Error::format(path, format!("not a GGUF file: {len} bytes is shorter than the header")));
        }
        // SAFETY: read-only map; a file changed under us is the caller's problem, as with
        // every mmap-based loader (see checkpoint::Checkpoint::open).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let mut c = Cursor { buf: &map, pos: 0, path };
        let magic = c.arr::<4>("magic")?;
        if magic != MAGIC {
            return Err(Error::format(path, format!("not a GGUF file: magic {magic:02x?}, expected \"GGUF\"")));
        }
        let version = c.u32("version")?;
        if version != VERSION {
            return Err(Error::format(path, format!("GGUF version {version} is not supported (only {VERSION})")));
        }
        // Each tensor info is at least 8+4+8+4+8 bytes, each kv at least 8+4+1.
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.count("metadata count", 13)?;
        let mut kv = Vec::with_capacity(n_kv);
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"))?;
            let id = c.u32(&key)?;
            let t = ValueType::from_id(id)
                .ok_or_else(|| Error::format(path, format!("metadata `{key}`: unknown value type {id}")))?;
            let v = c.value(t, &key)?;
            kv.push((key, v));
        }
        let alignment = match kv.iter().find(|(k, _)| k == "general.alignment") {
            None => ALIGNMENT,
            Some((_, Value::U32(a))) if a.is_power_of_two() => *a as u64,
            Some((_, v)) => {
                return Err(Error::format(path, format!("general.alignment must be a u32 power of two, got {v:?}")));
            }
        };
        if n_tensors > ((len - c.pos as u64) / 32) {
            return Err(Error::format(
                path,
                format!("tensor count {n_tensors} cannot fit in the file (corrupt header)"),
            ));
        }
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut expect = 0u64;
        for i in 0..n_tensors {
            let name = c.string(&format!("tensor name #{i}"))?;
            let n_dims = c.u32(&name)? as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(Error::format(path, format!("tensor `{name}`: {n_dims} dims (expected 1..={MAX_DIMS})")));
            }
            let dims = (0..n_dims).map(|_| c.u64(&name)).collect::<Result<Vec<_>>>()?;
            let id = c.u32(&name)?;
            let ty = GgmlType::from_id(id)
                .ok_or_else(|| Error::format(path, format!("tensor `{name}`: unsupported ggml type id {id}")))?;
            let offset = c.u64(&name)?;
            let elems = dims.iter().try_fold(1u64, |a, &d| if d == 0 { None } else { a.checked_mul(d) });
            if elems.is_none_or(|e| e > len * 8) {
                return Err(Error::format(path, format!("tensor `{name}`: implausible dims {dims:?}")));
            }
            let info = TensorInfo { name, dims, ty, offset };
            if ty.row_bytes(info.row_len()).is_none() {
                return Err(Error::format(
                    path,
                    format!(
                        "tensor `{}`: row length {} is not a multiple of the {} block size {}",
                        info.name,
                        info.row_len(),
                        ty.name(),
                        ty.block_len()
                    ),
                ));
            }
            if offset != expect {
                return Err(Error::format(
                    path,
                    format!(
                        "tensor `{}`: data offset {offset}, expected {expect} (offsets must be consecutive)",
                        info.name
                    ),
                ));
            }
            expect += pad_to(info.n_bytes(), alignment);
            tensors.push(info);
        }
        let data_start = pad_to(c.pos as u64, alignment);
        let data_end = data_start + tensors.last().map_or(0, |t| t.offset + t.n_bytes());
        if data_end > len {
            return Err(Error::format(
                path,
                format!("truncated GGUF file: tensor data ends at byte {data_end} but the file has {len}"),
            ));
        }
        Ok(GgufFile { path: path.to_path_buf(), version, alignment, kv, tensors, data_start, map })
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.kv.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// A tensor info by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor's data.
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        let s = (self.data_start + t.offset) as usize;
        &self.map[s..s + t.n_bytes() as usize]
    }

    /// Decodes row `row` of `t` (f32, f16, bf16, q4_0 or q8_0) into `out` (`row_len` long).
    pub fn dequant_row(&self, t: &TensorInfo, row: usize, out: &mut [f32]) -> Result<()> {
        if row >= t.n_rows() || out.len() != t.row_len() {
            return Err(Error::format(
                &self.path,
                format!("tensor `{}`: no row {row} of length {}", t.name, out.len()),
            ));
        }
        let rb = t.row_bytes();
        let bytes = &self.data(t)[row * rb..(row + 1) * rb];
        dequantize_row(t.ty, bytes, out).map_err(|why| Error::format(&self.path, format!("tensor `{}`: {why}", t.name)))
    }
}

/// Elements per Q4_0 / Q8_0 block.
pub const QK: usize = 32;

fn check_finite(x: &[f32]) -> std::result::Result<(), String> {
    match x.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(format!("non-finite value {} at element {i}", x[i])),
        None => Ok(()),
    }
}

fn store_scale(d: f32, out: &mut [u8]) -> std::result::Result<(), String> {
    let h = f16::from_f32(d);
    if !h.is_finite() {
        return Err(format!("block scale {d} does not fit in f16 (values too large)"));
    }
    out.copy_from_slice(&h.to_le_bytes());
    Ok(())
}

/// Quantizes `x` (a multiple of 32 long) to Q4_0 blocks in `out` (18 bytes per block),
/// exactly as ggml's `quantize_row_q4_0_ref`: per block, `d = max / -8` where `max` is the
/// value of largest magnitude (first one on ties), codes `min(15, trunc(x/d + 8.5))`, two
/// per byte (element j in the low nibble of byte j, element j+16 in its high nibble).
pub fn quantize_row_q4_0(x: &[f32], out: &mut [u8]) -> std::result::Result<(), String> {
    assert!(x.len().is_multiple_of(QK) && out.len() == x.len() / QK * 18, "q4_0 row shape");
    check_finite(x)?;
    for (xb, yb) in x.chunks_exact(QK).zip(out.chunks_exact_mut(18)) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in xb {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        store_scale(d, &mut yb[..2])?;
        for j in 0..QK / 2 {
            let x0 = xb[j] * id;
            let x1 = xb[QK / 2 + j] * id;
            let q0 = ((x0 + 8.5) as i8).min(15) as u8;
            let q1 = ((x1 + 8.5) as i8).min(15) as u8;
            yb[2 + j] = q0 | (q1 << 4);
        }
    }
    Ok(())
}

/// Quantizes `x` (a multiple of 32 long) to Q8_0 blocks in `out` (34 bytes per block),
/// exactly as ggml's `quantize_row_q8_0_ref`: `d = amax / 127`, codes `round(x / d)`
/// (halves away from zero).
pub fn quantize_row_q8_0(x: &[f32], out: &mut [u8]) -> std::result::Result<(), String> {
    assert!(x.len().is_multiple_of(QK) && out.len() == x.len() / QK * 34, "q8_0 row shape");
    check_finite(x)?;
    for (xb, yb) in x.chunks_exact(QK).zip(out.chunks_exact_mut(34)) {
        let amax = xb.iter().fold(0f32, |a, v| if a > v.abs() { a } else { v.abs() });
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        store_scale(d, &mut yb[..2])?;
        for j in 0..QK {
            yb[2 + j] = (xb[j] * id).round() as i8 as u8;
        }
    }
    Ok(())
}

/// Quantizes `x` (a multiple of 32 long) to MXFP4 blocks in `out` (17 bytes per block): per
/// block the E8M0 exponent `e = ceil(log2(amax / 6))` (the smallest that fits the largest
/// magnitude in E2M1's ±6), each element the nearest E2M1 value of `x / 2^e` (the smaller
/// magnitude on ties). Values that are already MXFP4 (`LUT · 2^s` per block, as dequantized
/// from an MXFP4 checkpoint) come back exactly: `e ≤ s`, and `LUT · 2^(s−e) ≤ 6` is in the LUT.
pub fn quantize_row_mxfp4(x: &[f32], out: &mut [u8]) -> std::result::Result<(), String> {
    assert!(x.len().is_multiple_of(QK) && out.len() == x.len() / QK * 17, "mxfp4 row shape");
    check_finite(x)?;
    const MAGS: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
    for (xb, yb) in x.chunks_exact(QK).zip(out.chunks_exact_mut(17)) {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        let e = if amax == 0.0 { -127 } else { ((amax as f64 / 6.0).log2().ceil() as i32).clamp(-127, 127) };
        let inv = 2f64.powi(-e);
        let code = |v: f32| -> u8 {
            let a = (v.abs() as f64 * inv) as f32;
            let m = (0..8).min_by(|&i, &j| (MAGS[i] - a).abs().total_cmp(&(MAGS[j] - a).abs())).unwrap_or(0) as u8;
            if v < 0.0 && m != 0 { m | 8 } else { m }
        };
        yb[0] = (e + 127) as u8;
        for j in 0..QK / 2 {
            yb[1 + j] = code(xb[j]) | (code(xb[j + QK / 2]) << 4);
        }
    }
    Ok(())
}

/// Encodes one row of f32 values as `ty` (f32, f16, bf16, q4_0, q8_0 or mxfp4) into `out`.
pub fn quantize_row(ty: GgmlType, x: &[f32], out: &mut [u8]) -> std::result::Result<(), String> {
    match ty {
        GgmlType::Q4_0 => quantize_row_q4_0(x, out),
        GgmlType::Q8_0 => quantize_row_q8_0(x, out),
        GgmlType::Mxfp4 => quantize_row_mxfp4(x, out),
        GgmlType::F32 => {
            check_finite(x)?;
            for (o, v) in out.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_le_bytes());
            }
            Ok(())
        }
        GgmlType::F16 => {
            check_finite(x)?;
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
            }
            Ok(())
        }
        GgmlType::Bf16 => {
            // Round to nearest even, as ggml_compute_fp32_to_bf16 does for finite values.
            check_finite(x)?;
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                let b = bf16::from_f32(*v);
                if !b.is_finite() {
                    return Err(format!("{v} overflows bf16"));
                }
                o.copy_from_slice(&b.to_le_bytes());
            }
            Ok(())
        }
        other => Err(format!("writing {} is not supported", other.name())),
    }
}

/// Decodes one row of `ty` (f32, f16, bf16, q4_0, q8_0 or mxfp4) from `bytes` into `out`.
pub fn dequantize_row(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> std::result::Result<(), String> {
    if ty.row_bytes(out.len()) != Some(bytes.len()) {
        return Err(format!("{} bytes are not a {} row of {} elements", bytes.len(), ty.name(), out.len()));
    }
    let half = |b: &[u8]| f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
    match ty {
        GgmlType::F32 => decode_floats(FloatType::F32, bytes, out),
        GgmlType::F16 => decode_floats(FloatType::F16, bytes, out),
        GgmlType::Bf16 => decode_floats(FloatType::Bf16, bytes, out),
        GgmlType::Q4_0 => {
            for (ob, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(18)) {
                let d = half(b);
                for j in 0..QK / 2 {
                    ob[j] = ((b[2 + j] & 0x0f) as i32 - 8) as f32 * d;
                    ob[j + QK / 2] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        GgmlType::Mxfp4 => {
            for (ob, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(17)) {
                let s = crate::checkpoint::quant::e8m0_to_f32(b[0]);
                for j in 0..QK / 2 {
                    ob[j] = crate::checkpoint::quant::FP4_LUT[(b[1 + j] & 0x0f) as usize] * s;
                    ob[j + QK / 2] = crate::checkpoint::quant::FP4_LUT[(b[1 + j] >> 4) as usize] * s;
                }
            }
        }
        GgmlType::Q8_0 => {
            for (ob, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(34)) {
                let d = half(b);
                for j in 0..QK {
                    ob[j] = b[2 + j] as i8 as f32 * d;
                }
            }
        }
        other => return Err(format!("decoding {} is not supported", other.name())),
    }
    Ok(())
}

/// The largest |dequant(quant(x)) − x| that `ty` may produce for one block `x`.
///
/// Q4_0: codes are `x/d` rounded half up with `|d| = amax/8`, except the element of
/// magnitude amax opposite in sign to the scale, which clamps from 8 to 7: error ≤ |d|,
/// plus the f16 rounding of d (≤ 2^-11·|d| per unit of code, codes ≤ 8). Q8_0: error ≤
/// d/2 with `d = amax/127`, plus 127 × the f16 rounding of d. Each bound also allows
/// the f16 subnormal spacing (2^-24) per code unit.
pub fn block_error_bound(ty: GgmlType, x: &[f32]) -> f32 {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let ulp16 = |d: f32| d * 2f32.powi(-11) + 2f32.powi(-24);
    match ty {
        GgmlType::Q4_0 => {
            let d = amax / 8.0;
            d + 8.0 * ulp16(d) + amax * 1e-6
        }
        GgmlType::Q8_0 => {
            let d = amax / 127.0;
            0.5 * d + 127.0 * ulp16(d) + amax * 1e-6
        }
        GgmlType::F16 => amax * 2f32.powi(-11) + 2f32.powi(-24),
        GgmlType::Bf16 => amax * 2f32.powi(-8),
        // Half the widest E2M1 gap (4 → 6) at the block's exponent.
        GgmlType::Mxfp4 => 2f32.powf((amax / 6.0).log2().ceil()) + amax * 1e-6,
        _ => 0.0,
    }
}
