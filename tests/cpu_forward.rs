//! CPU reference: prefill of N tokens and N single-token decode steps must agree, every
//! storage format loads, sharded and single-file checkpoints are the same model.

mod common;

use zmoe::checkpoint::synth::{self, SynthQuant, SynthSpec};
use zmoe::plan::Plan;
use zmoe::{BackendKind, Model};

fn logits(model: &Model, tokens: &[u32], all: bool) -> Vec<f32> {
    let mut be = model.backend(BackendKind::Cpu, Plan::reference(model.config())).unwrap();
    be.forward(tokens, all).unwrap()
}

#[test]
fn prefill_equals_step_by_step_decode() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, quant) in [SynthQuant::Bf16, SynthQuant::Affine4, SynthQuant::Affine8].into_iter().enumerate() {
        let dir = common::synth_tiny(tmp.path(), &format!("m{i}"), quant, 11 + i as u64);
        let model = Model::load(&dir).unwrap();
        let v = model.config().vocab_size;
        let tokens: Vec<u32> = (0..13).map(|k| (k * 389 + 17 * i as u32 + 5) % v as u32).collect();
        let prefill = logits(&model, &tokens, true);
        assert_eq!(prefill.len(), tokens.len() * v);
        assert!(prefill.iter().all(|x| x.is_finite()));
        let mut be = model.backend(BackendKind::Cpu, Plan::reference(model.config())).unwrap();
        for (p, &t) in tokens.iter().enumerate() {
            let step = be.forward(&[t], false).unwrap();
            assert_eq!(be.position(), p + 1);
            let want = &prefill[p * v..(p + 1) * v];
            let worst = step.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            // Same dot products in the same order: equal up to nothing.
            assert!(worst == 0.0, "{quant:?} position {p}: max |Δ| {worst}");
        }
        // Last-position-only prefill is the last row of the full one.
        assert_eq!(logits(&model, &tokens, false), prefill[(tokens.len() - 1) * v..].to_vec());
        // The cache matters: the last token alone gives different logits.
        assert_ne!(logits(&model, &tokens[tokens.len() - 1..], false), prefill[(tokens.len() - 1) * v..].to_vec());
    }
}

#[test]
fn sharded_checkpoint_is_the_same_model() {
    let tmp = tempfile::tempdir().unwrap();
    let single = common::synth_tiny(tmp.path(), "single", SynthQuant::Affine4, 5);
    let sharded = tmp.path().join("sharded");
    let spec = SynthSpec {
        family: "qwen3_moe".into(),
        preset: "tiny".into(),
        quant: SynthQuant::Affine4,
        group_size: 64,
        seed: 5,
        max_shard_bytes: 1 << 20,
    };
    synth::write(&spec, &sharded, false).unwrap();
    assert!(sharded.join("model.safetensors.index.json").exists());
    assert!(!sharded.join("model.safetensors").exists());
    let n_shards = std::fs::read_dir(&sharded)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "safetensors"))
        .count();
    assert!(n_shards >= 2, "{n_shards} shards");
    let tokens = [3, 1, 4, 1, 5, 9, 2, 6];
    let a = logits(&Model::load(&single).unwrap(), &tokens, true);
    let b = logits(&Model::load(&sharded).unwrap(), &tokens, true);
    assert_eq!(a, b);
}

#[test]
fn synthetic_weights_are_not_trivial() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::synth_tiny(tmp.path(), "m", SynthQuant::Affine4, 1);
    let model = Model::load(&dir).unwrap();
    let w = &model.weights;
    // Norm weights randomised around 1, never constant.
    let n = &w.layers[0].input_norm;
    assert!(n.iter().any(|&x| (x - 1.0).abs() > 0.05) && n.iter().all(|&x| x > 0.2 && x < 1.8));
    // Quantization scales of both signs occur.
    if let zmoe::checkpoint::MatKind::Affine { scales, .. } = &w.layers[0].o.w.kind {
        let s = scales.to_vec();
        assert!(s.iter().any(|&x| x < 0.0) && s.iter().any(|&x| x > 0.0));
    } else {
        panic!("affine4 synth should store o_proj quantized");
    }
    // Router is the 8-bit override; experts are 4-bit.
    if let zmoe::model::Mlp::Moe { router, experts, .. } = &w.layers[1].mlp {
        assert_eq!(router.w.format_name(), "affine8g64");
        assert_eq!(experts.gate[3].format_name(), "affine4g64");
    } else {
        panic!("layer 1 of tiny is MoE");
    }
    assert!(matches!(w.layers[0].mlp, zmoe::model::Mlp::Dense(_)), "layer 0 of tiny is dense");
}

/// MLA: the absorbed form (the reference plan: `W_UKᵀ` folded into the query, attention over
/// the latent cache, `W_UV` after it) and transformers' expanded form (every cached latent
/// expanded to per-head keys and values) are the same math: on every MLA golden fixture and
/// MLA preset, prefill + decode logits agree to f32 rounding and greedy tokens are identical.
#[test]
fn mla_absorbed_equals_expanded() {
    let tmp = tempfile::tempdir().unwrap();
    let mut dirs: Vec<_> = common::golden_dirs(std::path::Path::new(env!("CARGO_MANIFEST_DIR")))
        .into_iter()
        .filter(|d| ["glm4_moe_lite", "deepseek_v3"].iter().any(|f| d.to_string_lossy().contains(f)))
        .collect();
    dirs.push(common::synth_preset(tmp.path(), "g", "glm4_moe_lite/glm-tiny", SynthQuant::Affine4, 7));
    dirs.push(common::synth_preset(tmp.path(), "d", "deepseek_v3/deepseek-tiny", SynthQuant::Bf16, 8));
    assert!(dirs.len() >= 7, "MLA fixtures and presets: {dirs:?}");
    for dir in dirs {
        let model = Model::load(&dir).unwrap();
        assert!(model.config().mla.is_some(), "{}", dir.display());
        let v = model.config().vocab_size;
        let absorbed = Plan::reference(model.config());
        let expanded = absorbed.with_expanded_mla();
        assert!(
            expanded
                .steps
                .iter()
                .any(|s| matches!(s, zmoe::plan::Step::Attn { op: zmoe::plan::AttnOp::MlaAttentionExpanded, .. }))
        );
        let run = |plan: Plan| {
            let mut be = model.backend(BackendKind::Cpu, plan).unwrap();
            let tokens: Vec<u32> = (0..9).map(|k| (k * 389 + 5) % v as u32).collect();
            let mut out = be.forward(&tokens, true).unwrap();
            let mut greedy = Vec::new();
            let mut t = zmoe::sample::argmax(&out[out.len() - v..]) as u32;
            for _ in 0..12 {
                greedy.push(t);
                let step = be.forward(&[t], false).unwrap();
                t = zmoe::sample::argmax(&step) as u32;
                out.extend(step);
            }
            (out, greedy)
        };
        let ((a, ga), (e, ge)) = (run(absorbed), run(expanded));
        assert_eq!(ga, ge, "{}: greedy tokens", dir.display());
        let scale = e.iter().fold(0f32, |m, x| m.max(x.abs()));
        let worst = a.iter().zip(&e).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-4 * scale.max(1.0), "{}: max |Δ| {worst} (scale {scale})", dir.display());
    }
}
