//! GPT-OSS on the CPU reference, beyond the golden fixtures: the sliding window across
//! chunked prefill (chunks == one prefill == decode, bit for bit), the window and the sinks
//! each change what they should and nothing else, the three expert layouts load to the same
//! numbers, MXFP4 dequantisation of a hand-written block, and load errors that name the
//! tensor.

mod common;

use std::path::Path;

use zmoe::checkpoint::quant;
use zmoe::checkpoint::synth::SynthQuant;
use zmoe::checkpoint::{Checkpoint, Mat, MatKind};
use zmoe::plan::Plan;
use zmoe::{BackendKind, Model};

fn fresh_seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64
}

fn tiny(dir: &Path, name: &str, quant: SynthQuant, seed: u64) -> std::path::PathBuf {
    common::synth_preset(dir, name, "gpt_oss/gpt-oss-tiny", quant, seed)
}

/// Every position's logits of `tokens` fed in chunks of the given sizes (in turn, cycling).
fn chunked(model: &Model, tokens: &[u32], sizes: &[usize]) -> Vec<f32> {
    let mut be = model.backend(BackendKind::Cpu, Plan::reference(model.config())).unwrap();
    let (mut out, mut at) = (Vec::new(), 0);
    for &n in sizes.iter().cycle() {
        if at == tokens.len() {
            break;
        }
        let end = (at + n).min(tokens.len());
        out.extend(be.forward(&tokens[at..end], true).unwrap());
        at = end;
    }
    out
}

/// The window of gpt-oss-tiny is 6 keys; 23 tokens cross it several times, in chunks that
/// straddle it (1, 5, 7 tokens) and one token at a time: all bit-identical to one prefill.
#[test]
fn sliding_window_across_chunked_prefill() {
    let tmp = tempfile::tempdir().unwrap();
    let seed = fresh_seed() % 1000;
    for (i, q) in [SynthQuant::Bf16, SynthQuant::Mxfp4, SynthQuant::Affine4].into_iter().enumerate() {
        let model = Model::load(&tiny(tmp.path(), &format!("m{i}"), q, seed + i as u64)).unwrap();
        assert_eq!(model.config().window(0), Some(6));
        let v = model.config().vocab_size as u32;
        let tokens: Vec<u32> = (0..23).map(|k| (k * 389 + 7 * seed as u32 + 5) % v).collect();
        let whole = chunked(&model, &tokens, &[tokens.len()]);
        assert!(whole.iter().all(|x| x.is_finite()));
        for sizes in [&[1][..], &[5, 7, 1], &[7], &[6, 6]] {
            let got = chunked(&model, &tokens, sizes);
            let diff = got.iter().zip(&whole).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            assert!(diff == 0 && got.len() == whole.len(), "{q:?} chunks {sizes:?}: {diff} logits differ");
        }
    }
}

/// A copy of `src` whose config.json is edited by `f`.
fn with_config(src: &Path, f: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    common::copy_model(src, tmp.path());
    let p = tmp.path().join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
    tmp
}

/// Widening the window changes nothing while the sequence fits in it (the window counts the
/// current token: positions 0..=5 see all their keys either way) and everything after.
/// Zeroing the sinks changes every position (a sink always takes probability mass).
#[test]
fn window_and_sinks_change_what_they_should() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny(tmp.path(), "m", SynthQuant::Bf16, fresh_seed() % 1000);
    let model = Model::load(&dir).unwrap();
    let v = model.config().vocab_size;
    let tokens: Vec<u32> = (0..12).map(|k| (k * 131 + 3) % v as u32).collect();
    let base = chunked(&model, &tokens, &[12]);
    let row = |x: &[f32], p: usize| x[p * v..(p + 1) * v].to_vec();

    let wide = with_config(&dir, |c| c["sliding_window"] = 4096.into());
    let wide = chunked(&Model::load(wide.path()).unwrap(), &tokens, &[12]);
    for p in 0..12 {
        assert_eq!(row(&wide, p) == row(&base, p), p < 6, "window 6 vs 4096 at position {p}");
    }

    let no_sinks = common::copy_with_tensors(&dir, |ts| {
        for (name, _, _, bytes) in ts.iter_mut().filter(|t| t.0.ends_with("self_attn.sinks")) {
            assert!(bytes.iter().any(|&b| b != 0), "{name} is already zero");
            bytes.fill(0);
        }
    });
    let no_sinks = chunked(&Model::load(no_sinks.path()).unwrap(), &tokens, &[12]);
    for p in 0..12 {
        assert_ne!(row(&no_sinks, p), row(&base, p), "sinks ignored at position {p}");
    }
}

/// A hand-written MXFP4 block (model-spec §5.8): low nibble first, E8M0 scale 126 = ×0.5.
#[test]
fn mxfp4_hand_computed_block() {
    // Bytes → (low, high) codes: 0x21 → (1, 2), 0xF7 → (7, 15), 0x8A → (10, 8), 0x5C → (12, 5).
    let mut row = vec![0x21u8, 0xF7, 0x8A, 0x5C];
    row.resize(16, 0x99); // code 9 = −0.5 in both nibbles
    let mut out = vec![f32::NAN; 32];
    quant::mxfp4_dequant_row(&row, &[126], &mut out);
    let want = [0.25, 0.5, 3.0, -3.0, -0.5, -0.0, -1.0, 1.5];
    assert_eq!(out[..8], want);
    assert_eq!(out[5].to_bits(), (-0.0f32).to_bits(), "code 8 is negative zero");
    assert!(out[8..].iter().all(|&x| x == -0.25));
}

/// The release layout's gate/up rows are interleaved (row 2j = gate j, 2j+1 = up j): the
/// loaded up matrix of expert 3, row 5 is the raw row 11 of `gate_up_proj_blocks`.
#[test]
fn mxfp4_release_rows_are_deinterleaved() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny(tmp.path(), "m", SynthQuant::Mxfp4, fresh_seed() % 1000);
    let ck = Checkpoint::open(&dir).unwrap();
    let (h, i) = (ck.config.hidden_size, ck.config.moe_intermediate_size);
    let raw = |name: &str| ck.bytes(ck.tensor(&format!("model.layers.1.mlp.experts.{name}")).unwrap());
    let (blocks, scales) = (raw("gate_up_proj_blocks"), raw("gate_up_proj_scales"));
    let model = Model::load(&dir).unwrap();
    let ex = model.weights.experts(1).unwrap();
    let (e, j) = (3, 5);
    for (mat, r) in [(&ex.gate[e], 2 * j), (&ex.up[e], 2 * j + 1)] {
        assert!(matches!(mat.kind, MatKind::Mxfp4 { .. }));
        let mut got = vec![0.0; h];
        mat.dequant_row(j, &mut got);
        let at = e * 2 * i + r;
        let mut want = vec![0.0; h];
        quant::mxfp4_dequant_row(
            &blocks.as_slice()[at * h / 2..][..h / 2],
            &scales.as_slice()[at * h / 32..][..h / 32],
            &mut want,
        );
        assert_eq!(got, want);
    }
    // The down projection is used in place: [H, I] rows as stored.
    assert_eq!((ex.down[0].rows, ex.down[0].cols), (h, i));
}

/// The transformers-5 bf16 layout is [E, in, out] with interleaved columns: the loaded gate
/// of expert 2 is column 2j of the stored matrix, up column 2j+1, exactly (bf16 kept).
#[test]
fn hf_fused_layout_is_transposed_and_deinterleaved() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny(tmp.path(), "m", SynthQuant::Bf16, fresh_seed() % 1000);
    let ck = Checkpoint::open(&dir).unwrap();
    let (h, i) = (ck.config.hidden_size, ck.config.moe_intermediate_size);
    let gu = ck.floats("model.layers.0.mlp.experts.gate_up_proj", &[16, h, 2 * i]).unwrap().to_vec();
    let model = Model::load(&dir).unwrap();
    let ex = model.weights.experts(0).unwrap();
    let e = 2;
    let dense = |m: &Mat| m.to_f32();
    let (g, u) = (dense(&ex.gate[e]), dense(&ex.up[e]));
    for j in [0, 7, i - 1] {
        for k in [0, 100, h - 1] {
            assert_eq!(g[j * h + k], gu[(e * h + k) * 2 * i + 2 * j]);
            assert_eq!(u[j * h + k], gu[(e * h + k) * 2 * i + 2 * j + 1]);
        }
    }
    assert_eq!(ex.gate[e].format_name(), "bf16");
    let b = ex.bias.as_ref().unwrap();
    let gub = ck.floats("model.layers.0.mlp.experts.gate_up_proj_bias", &[16, 2 * i]).unwrap().to_vec();
    assert_eq!((b.gate[e * i + 7], b.up[e * i + 7]), (gub[e * 2 * i + 14], gub[e * 2 * i + 15]));
}

/// Broken checkpoints are refused by name: a NaN E8M0 scale, blocks of the wrong shape,
/// missing sinks.
#[test]
fn bad_gpt_oss_checkpoints_name_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny(tmp.path(), "m", SynthQuant::Mxfp4, 3);
    let load = |d: &Path| Model::load(d).err().map(|e| e.to_string()).unwrap_or_default();
    let nan = common::copy_with_tensors(&dir, |ts| {
        let t = ts.iter_mut().find(|t| t.0 == "model.layers.2.mlp.experts.down_proj_scales").unwrap();
        t.3[17] = 255;
    });
    let e = load(nan.path());
    assert!(e.contains("model.layers.2.mlp.experts.down_proj_scales") && e.contains("255"), "{e}");
    let shape = common::copy_with_tensors(&dir, |ts| {
        let t = ts.iter_mut().find(|t| t.0 == "model.layers.0.mlp.experts.gate_up_proj_blocks").unwrap();
        t.2 = vec![t.2[0], t.2[1], t.2[2] * 16];
    });
    let e = load(shape.path());
    assert!(e.contains("gate_up_proj_blocks") && e.contains("expected U8"), "{e}");
    let sinks = common::copy_with_tensors(&dir, |ts| ts.retain(|t| t.0 != "model.layers.3.self_attn.sinks"));
    let e = load(sinks.path());
    assert!(e.contains("model.layers.3.self_attn.sinks") && e.contains("missing"), "{e}");
}

/// The CUDA lowering of GPT-OSS's patched plan: the fused `moe_mlp` kernels (router with
/// top-k-then-softmax, gate + up + clamped SwiGLU, down + bias + combine + add) and the
/// fused projections in the decode plan, MXFP4 experts included; prefill runs the moe_mlp
/// components (decode-only kernels). Both expand to the reference plan; `zmoe patterns
/// --exec` prints exactly these.
#[test]
fn cuda_lowering_of_gpt_oss() {
    use zmoe::plan::patterns::{Selection, expand, patched_plan};
    use zmoe::plan::{Fusion, Step, lower};
    let tmp = tempfile::tempdir().unwrap();
    let model = Model::load(&tiny(tmp.path(), "m", SynthQuant::Mxfp4, 9)).unwrap();
    let (plan, applied) = patched_plan(model.config(), &Selection::default());
    assert!(!applied.is_empty());
    let exec = lower::cuda(&plan, &model.weights, &[]).unwrap();
    let fused =
        |p: &Plan, op: Fusion| p.steps.iter().filter(|s| matches!(s, Step::Fused { op: o, .. } if *o == op)).count();
    for op in [Fusion::MoeRouter, Fusion::MoeGateUpSwiglu, Fusion::MoeDownCombineAdd] {
        assert_eq!((fused(&exec.decode, op), fused(&exec.prefill, op)), (4, 0), "{op:?}");
    }
    assert_eq!(fused(&exec.decode, Fusion::InProj), 4);
    assert_eq!(fused(&exec.decode, Fusion::OProjAddRmsNorm), 4);
    for p in [&exec.decode, &exec.prefill] {
        assert_eq!(expand(p).steps, Plan::reference(model.config()).steps);
    }
}
