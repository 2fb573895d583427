//! Reading HuggingFace-style model folders: `config.json`, `model.safetensors` or a sharded
//! `model.safetensors.index.json`, and (optionally) `tokenizer.json`. A folder that
//! `zmoe synth --generated` wrote has a recipe instead of weights ([`synth::RECIPE`]): its
//! tensors are generated in memory when it is opened, the bytes a full synth would store.
//!
//! Shards are memory-mapped and their headers validated by the `safetensors` crate (offsets
//! contiguous, sizes matching dtype × shape, file length matching the header), so a truncated
//! or lying file is rejected when the folder is opened, not when a kernel reads garbage.
//! Tensor lookups then check shape and dtype against what the plan expects and name the
//! shard and the tensor on any mismatch.

pub mod mat;
pub mod quant;
pub mod synth;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

pub use mat::{Bytes, FloatBytes, FloatType, Mat, MatKind};

use crate::config::{ModelConfig, QuantMode};
use crate::error::{Error, Result};

/// Where one tensor lives.
#[derive(Debug, Clone)]
pub struct TensorRef {
    /// Index into the shard list.
    pub shard: usize,
    /// Stored element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Absolute byte offset of the data in the shard file.
    pub start: usize,
    /// Byte length.
    pub len: usize,
}

/// A safetensors file (memory-mapped), or one tensor generated in memory (its path is the
/// recipe it came from).
struct Shard {
    path: PathBuf,
    map: Arc<dyn AsRef<[u8]> + Send + Sync>,
}

/// An opened model folder.
pub struct Checkpoint {
    /// The folder.
    pub dir: PathBuf,
    /// Parsed config.json.
    pub config: ModelConfig,
    /// Things worth a warning that do not stop loading (e.g. layers the config does not
    /// use), one line each; the caller prints them.
    pub warnings: Vec<String>,
    shards: Vec<Shard>,
    tensors: HashMap<String, TensorRef>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Checkpoint({}, {} tensors in {} shards)", self.dir.display(), self.tensors.len(), self.shards.len())
    }
}

/// Describes a safetensors parse error in words a user can act on.
fn describe(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => "not a safetensors file: shorter than its 8-byte header length".into(),
        E::HeaderTooLarge | E::InvalidHeaderLength => {
            "header length is larger than the file (truncated or not a safetensors file)".into()
        }
        E::MetadataIncompleteBuffer => {
            "file size does not match the header's tensor offsets (truncated or padded file)".into()
        }
        E::TensorInvalidInfo => "header lies: a tensor's byte range does not match its dtype × shape".into(),
        E::InvalidOffset(n) => format!("header lies: tensor `{n}` has non-contiguous data offsets"),
        other => format!("invalid safetensors file: {other}"),
    }
}

impl Checkpoint {
    /// Opens `dir`: parses config.json and memory-maps and validates every shard.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        if !dir.is_dir() {
            return Err(Error::format(
                dir,
                "model folder does not exist (expected a folder with config.json and model.safetensors)",
            ));
        }
        let config = ModelConfig::load(dir)?;
        if let Some(m) = &config.foreign_quantization {
            return Err(Error::format(
                dir.join("config.json"),
                format!(
                    "weights are quantized with quant_method `{m}`; zmoe reads bf16/f16/f32 and MLX affine/MXFP4 \
                     checkpoints (dequantize to bf16 or convert with mlx-lm first)"
                ),
            ));
        }
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let (files, weight_map) = if index.exists() {
            let text = crate::input::read_to_string(&index)?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::format(&index, format!("not valid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::format(&index, "missing `weight_map` object"))?;
            let mut files: Vec<String> = Vec::new();
            let mut wm = HashMap::new();
            for (k, f) in map {
                let f = f
                    .as_str()
                    .ok_or_else(|| Error::format(&index, format!("weight_map entry `{k}` is not a file name")))?;
                if f.contains('/') || f.contains('\\') || f.starts_with('.') {
                    return Err(Error::format(
                        &index,
                        format!("weight_map entry `{k}` names `{f}`, which is not a file in the model folder"),
                    ));
                }
                if !files.iter().any(|x| x == f) {
                    files.push(f.to_string());
                }
                wm.insert(k.clone(), f.to_string());
            }
            files.sort();
            (files, Some(wm))
        } else if single.exists() {
            (vec!["model.safetensors".to_string()], None)
        } else if dir.join(synth::RECIPE).exists() {
            return Self::generated(dir, config);
        } else {
            return Err(Error::format(dir, "no model.safetensors or model.safetensors.index.json in the model folder"));
        };
        let mut shards = Vec::new();
        let mut tensors = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            let path = dir.join(f);
            let file = crate::input::open(&path)?;
            // SAFETY: the map is read-only; a checkpoint modified while we run is the user's
            // problem as with every mmap-based loader.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
            let (n, meta) = SafeTensors::read_metadata(&map).map_err(|e| Error::format(&path, describe(&e)))?;
            for (name, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                if let Some(wm) = &weight_map
                    && wm.get(&name).map(String::as_str) != Some(f.as_str())
                {
                    return Err(Error::tensor(
                        &path,
                        &name,
                        format!("is not listed for this shard in {}", index.display()),
                    ));
                }
                let t =
                    TensorRef { shard: i, dtype: info.dtype, shape: info.shape.clone(), start: 8 + n + s, len: e - s };
                if tensors.insert(name.clone(), t).is_some() {
                    return Err(Error::tensor(&path, &name, "appears in more than one shard"));
                }
            }
            shards.push(Shard { path, map: Arc::new(map) });
        }
        if let Some(wm) = &weight_map
            && let Some((k, f)) = wm.iter().find(|(k, _)| !tensors.contains_key(*k))
        {
            return Err(Error::tensor(
                dir.join(f),
                k,
                format!("listed in {} but not present in the shard", index.display()),
            ));
        }
        let warnings = check_layers(dir, &config, tensors.keys().map(String::as_str))?;
        Ok(Checkpoint { dir: dir.to_path_buf(), config, warnings, shards, tensors })
    }

    /// A folder that `zmoe synth --generated` wrote: its weights generated in memory from the
    /// recipe ([`synth::generate`]), one buffer a tensor.
    fn generated(dir: &Path, config: ModelConfig) -> Result<Checkpoint> {
        let recipe = dir.join(synth::RECIPE);
        let cfg_path = dir.join("config.json");
        let text = crate::input::read_to_string(&cfg_path)?;
        let cfg_json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::format(&cfg_path, format!("not valid JSON: {e}")))?;
        let mut shards = Vec::new();
        let mut tensors = HashMap::new();
        for (i, t) in synth::generate(&recipe, &cfg_json)?.into_iter().enumerate() {
            let len = t.data.len();
            tensors.insert(t.name, TensorRef { shard: i, dtype: t.dtype, shape: t.shape, start: 0, len });
            shards.push(Shard { path: recipe.clone(), map: Arc::new(t.data) });
        }
        let warnings = check_layers(dir, &config, tensors.keys().map(String::as_str))?;
        Ok(Checkpoint { dir: dir.to_path_buf(), config, warnings, shards, tensors })
    }

    /// Whether a tensor exists.
    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Every tensor name (unordered).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Looks a tensor up, with an error naming the folder if it is missing.
    pub fn tensor(&self, name: &str) -> Result<&TensorRef> {
        self.tensors.get(name).ok_or_else(|| Error::tensor(&self.dir, name, "missing from the checkpoint"))
    }

    /// The shard file a tensor lives in (for messages).
    pub fn path_of(&self, t: &TensorRef) -> &Path {
        &self.shards[t.shard].path
    }

    /// The tensor's bytes (zero-copy).
    pub fn bytes(&self, t: &TensorRef) -> Bytes {
        Bytes::new(self.shards[t.shard].map.clone(), t.start, t.len)
    }

    /// Refuses E8M0 scale bytes of 255 (NaN in the OCP MX format): a weight would be NaN,
    /// not a number. The error names the tensor and the byte.
    pub(crate) fn check_e8m0(&self, name: &str, scales: &[u8]) -> Result<()> {
        use rayon::prelude::*;
        match scales.par_iter().position_first(|&s| s == 255) {
            Some(at) => Err(self.bad(name, format!("E8M0 scale byte {at} is 255 (NaN in the OCP MX format)"))),
            None => Ok(()),
        }
    }

    /// An error about tensor `name` of this checkpoint.
    pub(crate) fn bad(&self, name: &str, why: String) -> Error {
        let path = self.tensors.get(name).map(|t| self.path_of(t).to_path_buf()).unwrap_or_else(|| self.dir.clone());
        Error::tensor(path, name, why)
    }

    /// A float tensor of exactly `shape` (f32, f16 or bf16).
    pub fn floats(&self, name: &str, shape: &[usize]) -> Result<FloatBytes> {
        let t = self.tensor(name)?;
        let dtype = float_type(t.dtype).ok_or_else(|| {
            self.bad(
                name,
                format!("expected a float tensor (f32/f16/bf16) of shape {shape:?}, got dtype {:?}", t.dtype),
            )
        })?;
        if t.shape != shape {
            return Err(self.bad(name, format!("expected shape {shape:?}, got {:?}", t.shape)));
        }
        Ok(FloatBytes { dtype, data: self.bytes(t) })
    }

    /// A float vector of length `n`, decoded to f32 (norm weights, biases).
    pub fn vector(&self, name: &str, n: usize) -> Result<Vec<f32>> {
        Ok(self.floats(name, &[n])?.to_vec())
    }

    /// The weight of a linear module at MLX/HF path `path` (no `.weight` suffix), logical
    /// shape `[out, in]`, optionally stacked `[stack, out, in]` (MLX `switch_mlp` experts).
    /// Quantized iff `<path>.scales` exists, with the config's (possibly overridden) params.
    pub fn linear(&self, path: &str, stack: Option<usize>, out: usize, inp: usize) -> Result<Vec<Mat>> {
        let lead: Vec<usize> = stack.into_iter().collect();
        let n = stack.unwrap_or(1);
        let wname = format!("{path}.weight");
        let sname = format!("{path}.scales");
        let shape = |last: usize| -> Vec<usize> { lead.iter().copied().chain([out, last]).collect() };
        if !self.has(&sname) {
            let f = self.floats(&wname, &shape(inp))?;
            let per = self.product(&wname, &[out, inp, f.dtype.size()])?;
            return Ok((0..n)
                .map(|e| Mat {
                    rows: out,
                    cols: inp,
                    kind: MatKind::Float(FloatBytes { dtype: f.dtype, data: f.data.slice(e * per, per) }),
                })
                .collect());
        }
        let q = self.config.quantization.as_ref().and_then(|q| q.for_module(path)).ok_or_else(|| {
            self.bad(
                &sname,
                "tensor is quantized (has .scales) but config.json's `quantization` block does not cover this module"
                    .into(),
            )
        })?;
        if !inp.is_multiple_of(q.group_size) {
            return Err(self.bad(&wname, format!("input dim {inp} is not a multiple of group_size {}", q.group_size)));
        }
        let groups = inp / q.group_size;
        let w = self.tensor(&wname)?;
        let want_w = shape(self.product(&wname, &[inp, q.bits as usize])? / 32);
        if w.dtype != Dtype::U32 || w.shape != want_w {
            return Err(self.bad(
                &wname,
                format!(
                    "expected U32 packed shape {want_w:?} ({}-bit, group {}), got {:?} {:?}",
                    q.bits, q.group_size, w.dtype, w.shape
                ),
            ));
        }
        let wb = self.bytes(w);
        let row_bytes = self.product(&wname, &[out, inp, q.bits as usize])? / 8;
        match q.mode {
            QuantMode::Affine => {
                let s = self.floats(&sname, &shape(groups))?;
                let b = self.floats(&format!("{path}.biases"), &shape(groups))?;
                let per = out * groups;
                Ok((0..n)
                    .map(|e| Mat {
                        rows: out,
                        cols: inp,
                        kind: MatKind::Affine {
                            bits: q.bits,
                            group: q.group_size,
                            packed: wb.slice(e * row_bytes, row_bytes),
                            scales: FloatBytes {
                                dtype: s.dtype,
                                data: s.data.slice(e * per * s.dtype.size(), per * s.dtype.size()),
                            },
                            biases: FloatBytes {
                                dtype: b.dtype,
                                data: b.data.slice(e * per * b.dtype.size(), per * b.dtype.size()),
                            },
                        },
                    })
                    .collect())
            }
            QuantMode::Mxfp4 => {
                let st = self.tensor(&sname)?;
                if st.dtype != Dtype::U8 || st.shape != shape(groups) {
                    return Err(self.bad(
                        &sname,
                        format!("expected U8 E8M0 scales {:?}, got {:?} {:?}", shape(groups), st.dtype, st.shape),
                    ));
                }
                let sb = self.bytes(st);
                self.check_e8m0(&sname, sb.as_slice())?;
                let per = out * groups;
                Ok((0..n)
                    .map(|e| Mat {
                        rows: out,
                        cols: inp,
                        kind: MatKind::Mxfp4 {
                            packed: wb.slice(e * row_bytes, row_bytes),
                            scales: sb.slice(e * per, per),
                        },
                    })
                    .collect())
            }
        }
    }

    /// `xs` multiplied in checked arithmetic (sizes that come from config.json and headers).
    fn product(&self, name: &str, xs: &[usize]) -> Result<usize> {
        xs.iter().try_fold(1usize, |a, &x| a.checked_mul(x)).ok_or_else(|| {
            self.bad(
                name,
                format!("the size {} overflows", xs.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(" × ")),
            )
        })
    }

    /// A single (unstacked) linear weight `[out, in]`.
    pub fn mat(&self, path: &str, out: usize, inp: usize) -> Result<Mat> {
        Ok(self.linear(path, None, out, inp)?.remove(0))
    }
}

/// Checks config.json's `num_hidden_layers` against the `model.layers.N.*` tensors: an
/// error if the checkpoint stops short of it, a warning (returned) if it holds layers the
/// config does not use — beyond the `num_nextn_predict_layers` MTP layers GLM and DeepSeek-V3
/// store after the decoder layers, which are expected and ignored.
fn check_layers<'a>(dir: &Path, cfg: &ModelConfig, names: impl Iterator<Item = &'a str>) -> Result<Vec<String>> {
    let mut found = std::collections::BTreeSet::new();
    for name in names {
        if let Some(l) = name.strip_prefix("model.layers.").and_then(|r| r.split('.').next()?.parse::<usize>().ok()) {
            found.insert(l);
        }
    }
    let held = match (found.first(), found.last()) {
        (Some(a), Some(b)) => format!("holds layers {a}..={b} only"),
        _ => "holds no `model.layers.N.*` tensors".into(),
    };
    if found.last().is_none_or(|&last| last + 1 < cfg.num_layers) {
        return Err(Error::format(
            dir.join("config.json"),
            format!("field `num_hidden_layers` is {}, but the checkpoint {held}", cfg.num_layers),
        ));
    }
    let expected = cfg.num_layers.saturating_add(cfg.mtp_layers);
    let unused: Vec<usize> = found.range(expected..).copied().collect();
    Ok(match unused.as_slice() {
        [] => Vec::new(),
        [first, rest @ ..] => vec![format!(
            "{}: the checkpoint holds model.layers.{first}{} that config.json does not use \
             (num_hidden_layers {}, num_nextn_predict_layers {}); ignored",
            dir.display(),
            if rest.is_empty() { String::new() } else { format!(" and {} more layers", rest.len()) },
            cfg.num_layers,
            cfg.mtp_layers
        )],
    })
}

/// Maps a safetensors dtype to a float storage type.
pub fn float_type(d: Dtype) -> Option<FloatType> {
    match d {
        Dtype::F32 => Some(FloatType::F32),
        Dtype::F16 => Some(FloatType::F16),
        Dtype::BF16 => Some(FloatType::Bf16),
        _ => None,
    }
}
