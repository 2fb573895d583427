//! LFM2-MoE on the CPU reference: the conv state across prefill chunks and decode steps
//! (where bugs hide: model-spec §4.6), config parsing of both `layer_types` spellings and the
//! aliases, and clear errors for configs and checkpoints that cannot be right.

mod common;

use std::path::Path;

use zmoe::checkpoint::synth::SynthQuant;
use zmoe::config::{Family, ModelConfig, RouterKind};
use zmoe::plan::{AttnOp, Plan, Step};
use zmoe::{BackendKind, Model};

/// Fresh per run, so no test passes on one lucky model.
fn fresh_seed() -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    (t.as_nanos() as u64 ^ u64::from(std::process::id())) % 100_000
}

/// Tokens spread over the vocabulary, different per seed.
fn tokens(n: usize, v: usize, seed: u64) -> Vec<u32> {
    (0..n as u64).map(|k| ((k * 389 + 7 * seed + 5) % v as u64) as u32).collect()
}

/// The tiny preset in every format plus every golden fixture of the family.
fn models(tmp: &Path, seed: u64) -> Vec<std::path::PathBuf> {
    let mut dirs: Vec<_> = [SynthQuant::Bf16, SynthQuant::Affine4, SynthQuant::Affine8]
        .into_iter()
        .enumerate()
        .map(|(i, q)| common::synth_preset(tmp, &format!("m{i}"), "lfm2_moe/lfm2-tiny", q, seed + i as u64))
        .collect();
    let golden = common::golden_dirs(Path::new(env!("CARGO_MANIFEST_DIR")));
    dirs.extend(golden.into_iter().filter(|d| d.to_string_lossy().contains("lfm2_moe")));
    assert!(dirs.len() >= 6, "{dirs:?}");
    dirs
}

#[test]
fn prefill_equals_step_by_step_decode() {
    let tmp = tempfile::tempdir().unwrap();
    let seed = fresh_seed();
    for dir in models(tmp.path(), seed) {
        let model = Model::load(&dir).unwrap();
        let cfg = model.config();
        assert_eq!(cfg.family, Family::Lfm2Moe);
        let v = cfg.vocab_size;
        let toks = tokens(11, v, seed);
        let mut be = model.backend(BackendKind::Cpu, Plan::reference(cfg)).unwrap();
        let prefill = be.forward(&toks, true).unwrap();
        be.reset();
        for (p, &t) in toks.iter().enumerate() {
            let step = be.forward(&[t], false).unwrap();
            let want = &prefill[p * v..(p + 1) * v];
            let worst = step.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            // The same products summed in the same order: equal, not close.
            assert!(worst == 0.0, "{}: position {p}: max |Δ| {worst}", dir.display());
        }
    }
}

/// A prompt prefilled in chunks of every shape, then decoded, equals one long prefill: the
/// conv state carries the last L − 1 gated inputs across chunk boundaries.
#[test]
fn chunked_prefill_then_decode_equals_one_prefill() {
    let tmp = tempfile::tempdir().unwrap();
    let seed = fresh_seed();
    for dir in models(tmp.path(), seed) {
        let model = Model::load(&dir).unwrap();
        let v = model.config().vocab_size;
        let toks = tokens(14, v, seed + 1);
        let mut be = model.backend(BackendKind::Cpu, Plan::reference(model.config())).unwrap();
        let want = be.forward(&toks, true).unwrap();
        for chunks in [&[1usize, 1, 12][..], &[2, 5, 1, 6], &[7, 7], &[3, 3, 3, 3, 1, 1]] {
            be.reset();
            let mut got = Vec::new();
            let mut at = 0;
            for &n in chunks {
                got.extend(be.forward(&toks[at..at + n], true).unwrap());
                at += n;
            }
            assert_eq!(be.position(), toks.len());
            let scale = want.iter().fold(1f32, |m, x| m.max(x.abs()));
            let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst == 0.0, "{}: chunks {chunks:?}: max |Δ| {worst} (scale {scale})", dir.display());
        }
        // The state matters: the last token after a reset (no left context) differs.
        be.reset();
        let alone = be.forward(&toks[toks.len() - 1..], false).unwrap();
        assert_ne!(alone, want[(toks.len() - 1) * v..].to_vec(), "{}", dir.display());
        // And reset really clears it: the same prompt again gives the same logits.
        be.reset();
        assert_eq!(be.forward(&toks, true).unwrap(), want, "{}", dir.display());
    }
}

#[test]
fn plan_has_a_short_conv_per_conv_layer() {
    let json = zmoe::checkpoint::synth::preset_config("lfm2_moe", "lfm2-8b-a1b").unwrap();
    let cfg = ModelConfig::parse(&json.to_string(), Path::new("config.json")).unwrap();
    let plan = Plan::reference(&cfg);
    let conv: Vec<usize> = plan
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::Attn { layer, op: AttnOp::ShortConv } => Some(*layer),
            _ => None,
        })
        .collect();
    let attn: Vec<usize> = plan
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::Attn { layer, op: AttnOp::Attention } => Some(*layer),
            _ => None,
        })
        .collect();
    assert_eq!(attn, vec![2, 6, 10, 14, 18, 21]);
    assert_eq!(conv.len(), 18);
    assert!(conv.iter().all(|l| !attn.contains(l)));
    assert_eq!((0..24).filter(|&l| cfg.is_moe_layer(l)).count(), 22, "num_dense_layers 2");
    assert!(cfg.tie_word_embeddings && cfg.norm_topk_prob && (cfg.head_dim, cfg.num_kv_heads) == (64, 8));
}

/// A small LFM2 config.json in the HF v5 spelling.
fn base() -> serde_json::Value {
    serde_json::json!({
        "model_type": "lfm2_moe", "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
        "moe_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2,
        "num_dense_layers": 1, "layer_types": ["conv", "full_attention", "conv", "conv"],
        "norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
        "tie_word_embeddings": true, "eos_token_id": 7
    })
}

fn parse(v: &serde_json::Value) -> zmoe::Result<ModelConfig> {
    ModelConfig::parse(&v.to_string(), Path::new("m/config.json"))
}

#[test]
fn both_spellings_and_aliases_parse_to_one_config() {
    let v5 = parse(&base()).unwrap();
    // The older LFM2 spelling: full_attn_idxs, tie_embedding, top-level rope_theta.
    let mut old = base();
    let o = old.as_object_mut().unwrap();
    o.remove("layer_types");
    o.remove("tie_word_embeddings");
    o.remove("rope_parameters");
    o.insert("full_attn_idxs".into(), serde_json::json!([1]));
    o.insert("tie_embedding".into(), true.into());
    o.insert("rope_theta".into(), 1e6.into());
    assert_eq!(parse(&old).unwrap(), v5);
    let cv = v5.conv.as_ref().unwrap();
    assert_eq!((cv.layers.clone(), cv.kernel, cv.bias), (vec![true, false, true, true], 3, false));
    assert_eq!((v5.rms_norm_eps, v5.head_dim), (1e-5, 16));
    assert_eq!(v5.router, RouterKind::SigmoidBias { expert_bias: true, routed_scaling_factor: 1.0 });
    assert!(!v5.is_moe_layer(0) && v5.is_moe_layer(1) && v5.is_moe_layer(3));
    // Defaults as transformers' Lfm2MoeConfig: tied, two dense layers, L = 3, normalised
    // top-k, rope θ 1e6.
    let mut d = base();
    for k in ["tie_word_embeddings", "num_dense_layers"] {
        d.as_object_mut().unwrap().remove(k);
    }
    d.as_object_mut().unwrap().remove("rope_parameters");
    let d = parse(&d).unwrap();
    assert!(d.tie_word_embeddings && !d.is_moe_layer(1) && d.is_moe_layer(2) && d.norm_topk_prob);
    assert_eq!(d.rope, v5.rope, "default rope θ 1e6");
    // Explicit values win over the aliases' defaults.
    let mut x = base();
    x["tie_embedding"] = false.into();
    x.as_object_mut().unwrap().remove("tie_word_embeddings");
    x["conv_L_cache"] = 4.into();
    x["conv_bias"] = true.into();
    x["use_expert_bias"] = false.into();
    x["routed_scaling_factor"] = 2.5.into();
    let x = parse(&x).unwrap();
    assert!(!x.tie_word_embeddings);
    assert_eq!((x.conv.as_ref().unwrap().kernel, x.conv.as_ref().unwrap().state_len()), (4, 3));
    assert_eq!(x.router, RouterKind::SigmoidBias { expert_bias: false, routed_scaling_factor: 2.5 });
}

#[test]
fn bad_configs_are_refused_by_field() {
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("layer_types", serde_json::Value::Null, "missing required field `layer_types` / `full_attn_idxs`"),
        ("layer_types", serde_json::json!(["conv", "conv"]), "`layer_types` has 2 entries for 4 layers"),
        ("layer_types", serde_json::json!(["conv", "mamba", "conv", "conv"]), "field `layer_types`"),
        ("layer_types", serde_json::json!("conv"), "field `layer_types`"),
        ("conv_L_cache", serde_json::json!(0), "`conv_L_cache`"),
        ("conv_L_cache", serde_json::json!(1000), "`conv_L_cache`"),
        ("num_attention_heads", serde_json::json!(3), "num_attention_heads"),
        ("routed_scaling_factor", serde_json::json!(-1.0), "`routed_scaling_factor`"),
        ("use_expert_bias", serde_json::json!("yes"), "`use_expert_bias`"),
        ("norm_eps", serde_json::json!(0.0), "`norm_eps`"),
        ("num_dense_layers", serde_json::json!(-1), "`num_dense_layers`"),
    ];
    for (field, value, want) in cases {
        let mut v = base();
        if value.is_null() {
            v.as_object_mut().unwrap().remove(field);
        } else {
            v[field] = value.clone();
        }
        let e = parse(&v).unwrap_err().to_string();
        assert!(e.contains("m/config.json") && e.contains(want), "{field}={value}: {e}");
    }
    let mut v = base();
    v.as_object_mut().unwrap().remove("layer_types");
    v["full_attn_idxs"] = serde_json::json!([1, 9]);
    let e = parse(&v).unwrap_err().to_string();
    assert!(e.contains("`full_attn_idxs` names layer 9"), "{e}");
    // hidden_size must be heads × head_dim (the conv mixer and attention share H).
    let mut v = base();
    v["head_dim"] = 8.into();
    let e = parse(&v).unwrap_err().to_string();
    assert!(e.contains("num_attention_heads (4) × head_dim (8)"), "{e}");
}

/// A conv kernel of the wrong shape, a missing expert bias or a missing conv weight: one
/// clear error naming the file and the tensor, not a panic.
#[test]
fn bad_checkpoints_are_refused_by_tensor() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/lfm2_moe/bf16_hf");
    let conv = "model.layers.0.conv.conv.weight";
    type Edit = Box<dyn Fn(&mut Vec<common::RawTensor>)>;
    let edits: Vec<(&str, Edit)> = vec![
        (
            "expected shape [64, 3, 1]",
            Box::new(move |ts| {
                let t = ts.iter_mut().find(|t| t.0 == conv).unwrap();
                t.2 = vec![64, 3];
            }),
        ),
        ("missing from the checkpoint", Box::new(move |ts| ts.retain(|t| t.0 != conv))),
        ("missing from the checkpoint", Box::new(|ts| ts.retain(|t| t.0 != "model.layers.2.feed_forward.expert_bias"))),
    ];
    for (want, edit) in edits {
        let dir = common::copy_with_tensors(&fixture, |ts| edit(ts));
        let e = Model::load(dir.path()).err().expect("load must fail").to_string();
        assert!(e.contains(want) && (e.contains("conv.conv.weight") || e.contains("expert_bias")), "{e}");
    }
}

/// Every pattern alone and all together is bit-identical to the reference plan on the CPU
/// (prefill and decode), on the tiny preset in every format and on every golden fixture.
#[test]
fn patched_plans_are_bit_identical_on_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    common::assert_patterns_bitexact(BackendKind::Cpu, &models(tmp.path(), fresh_seed()), 11, 6);
}

/// Where each pattern fires in an LFM2 plan: the attention projections and norms only in
/// attention layers, o_proj + residual + norm after every mixer (conv layers too: out_proj is
/// the layer's `O`), the MoE fusions with the expert-bias router; every subset expands back.
#[test]
fn patterns_fire_where_expected_and_expand_back() {
    use zmoe::plan::Fusion;
    use zmoe::plan::patterns::{Pattern, apply, expand, policy};
    let json = zmoe::checkpoint::synth::preset_config("lfm2_moe", "lfm2-tiny").unwrap();
    let cfg = ModelConfig::parse(&json.to_string(), Path::new("config.json")).unwrap();
    let reference = Plan::reference(&cfg);
    for mask in 0..1u32 << Pattern::ALL.len() {
        let pats: Vec<Pattern> =
            Pattern::ALL.into_iter().enumerate().filter(|(i, _)| mask >> i & 1 == 1).map(|(_, p)| p).collect();
        assert_eq!(expand(&apply(&reference, &pats).0).steps, reference.steps, "{pats:?}");
    }
    let defaults = policy(Family::Lfm2Moe).defaults;
    assert!(!defaults.contains(&Pattern::SharedExpert) && defaults.len() == 5);
    let (plan, applied) = apply(&reference, &defaults);
    let count = |p: Pattern| applied.iter().filter(|a| a.pattern == p).count();
    let (layers, attn, moe) = (6, 2, 5);
    assert_eq!(count(Pattern::QkvProj), attn);
    assert_eq!(count(Pattern::QkNormRope), attn);
    assert_eq!(count(Pattern::MoeMlp), 3 * moe);
    assert_eq!(count(Pattern::SwigluMlp), layers - moe);
    let fused_at = |op: Fusion, l: usize| {
        plan.steps.iter().any(|s| matches!(s, Step::Fused { op: o, .. } if *o == op && s.layer() == Some(l)))
    };
    for l in 0..layers {
        assert!(fused_at(Fusion::OProjAddRmsNorm, l), "o_proj + residual + norm in layer {l}");
    }
    let kinds: Vec<String> = plan.steps.iter().map(Step::kind).collect();
    assert!(kinds.iter().any(|k| k == "moe_sigmoid_bias_router (fused)"), "{kinds:?}");
    let text = zmoe::plan::patterns::describe(&cfg, &zmoe::plan::patterns::Selection::default());
    assert!(text.contains("not in layers 0-1,3,5: short-conv layer (no attention)"), "{text}");
    assert!(text.contains("conv_mixer     opt-in (--patterns)"), "{text}");
    // conv_mixer, asked for: in_proj + short conv in every conv layer, nowhere else; a
    // decode-only kernel, so the CUDA prefill plan runs its parts.
    let (plan, applied) = apply(&reference, &[Pattern::ConvMixer]);
    let layers: Vec<usize> = applied.iter().filter_map(|a| a.step.layer()).collect();
    assert_eq!(layers, vec![0, 1, 3, 5]);
    assert!(plan.steps.iter().any(|s| s.kind() == "conv_in_short_conv (fused)"));
    let text = zmoe::plan::patterns::describe(
        &cfg,
        &zmoe::plan::patterns::Selection::parse(Some("conv_mixer"), None).unwrap(),
    );
    assert!(text.contains("not in layers 2,4: attention layer (no short conv)"), "{text}");
}

/// `zmoe export gguf` writes llama.cpp's `lfm2moe` layout (src/models/lfm2moe.cpp, written
/// out here independently of the exporter): `shortconv.{in_proj,conv,out_proj}` in conv
/// layers, the attention tensors elsewhere, `exp_probs_b.bias` for the expert bias,
/// `token_embd_norm` as the final norm, no `output` (tied), per-layer KV heads (0 = conv),
/// and the file reads back with every tensor within its type's error bound (`--check`).
#[test]
fn export_gguf_writes_llama_cpp_lfm2moe() {
    use zmoe::export::gguf::{GgmlType, GgufFile, Value};
    use zmoe::model::{Attn, Mlp, Weights};
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::synth_preset(tmp.path(), "m", "lfm2_moe/lfm2-tiny", SynthQuant::Affine4, fresh_seed());
    let out = tmp.path().join("m.gguf");
    let o = common::zmoe(&[
        "export",
        "gguf",
        "--model",
        common::s(&dir),
        "--quant",
        "q8_0",
        "--out",
        common::s(&out),
        "--check",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("lfm2moe") && !err.contains("warning"), "{err}");

    let ck = zmoe::checkpoint::Checkpoint::open(&dir).unwrap();
    let (c, w) = (&ck.config, Weights::load(&ck).unwrap());
    let f = GgufFile::open(&out).unwrap();
    let a = "lfm2moe";
    let u = |k: &str| f.get(&format!("{a}.{k}")).and_then(Value::as_u32).unwrap_or_else(|| panic!("u32 {k}")) as usize;
    assert_eq!(f.get("general.architecture").and_then(Value::as_str), Some(a));
    assert_eq!((u("shortconv.l_cache"), u("leading_dense_block_count"), u("expert_gating_func")), (3, 1, 2));
    assert_eq!((u("block_count"), u("attention.head_count"), u("expert_count")), (6, 8, 16));
    let Some(Value::Array(_, kv)) = f.get(&format!("{a}.attention.head_count_kv")) else {
        panic!("per-layer kv heads")
    };
    let kv: Vec<u32> = kv.iter().map(|v| v.as_u32().unwrap()).collect();
    assert_eq!(kv, vec![0, 0, 2, 0, 2, 0]);

    let (h, q8) = (c.hidden_size as u64, GgmlType::Q8_0);
    let mut want: Vec<(String, Vec<u64>, GgmlType)> =
        vec![("token_embd.weight".into(), vec![h, c.vocab_size as u64], q8)];
    for (l, layer) in w.layers.iter().enumerate() {
        let b = |n: &str| format!("blk.{l}.{n}");
        want.push((b("attn_norm.weight"), vec![h], GgmlType::F32));
        match &layer.attn {
            Attn::Conv(_) => {
                want.push((b("shortconv.in_proj.weight"), vec![h, 3 * h], q8));
                want.push((b("shortconv.conv.weight"), vec![3, h], GgmlType::F32));
                want.push((b("shortconv.out_proj.weight"), vec![h, h], q8));
            }
            _ => {
                let (d, kvd) = (c.head_dim as u64, (c.num_kv_heads * c.head_dim) as u64);
                want.push((b("attn_q.weight"), vec![h, h], q8));
                want.push((b("attn_k.weight"), vec![h, kvd], q8));
                want.push((b("attn_v.weight"), vec![h, kvd], q8));
                want.push((b("attn_output.weight"), vec![h, h], q8));
                want.push((b("attn_q_norm.weight"), vec![d], GgmlType::F32));
                want.push((b("attn_k_norm.weight"), vec![d], GgmlType::F32));
            }
        }
        want.push((b("ffn_norm.weight"), vec![h], GgmlType::F32));
        let (e, i, fi) = (c.num_experts as u64, c.moe_intermediate_size as u64, c.intermediate_size as u64);
        match &layer.mlp {
            Mlp::Moe { .. } => {
                want.push((b("ffn_gate_inp.weight"), vec![h, e], GgmlType::F32));
                want.push((b("exp_probs_b.bias"), vec![e], GgmlType::F32));
                want.push((b("ffn_gate_exps.weight"), vec![h, i, e], q8));
                want.push((b("ffn_up_exps.weight"), vec![h, i, e], q8));
                want.push((b("ffn_down_exps.weight"), vec![i, h, e], q8));
            }
            Mlp::Dense(_) => {
                want.push((b("ffn_gate.weight"), vec![h, fi], q8));
                want.push((b("ffn_up.weight"), vec![h, fi], q8));
                want.push((b("ffn_down.weight"), vec![fi, h], q8));
            }
        }
    }
    want.push(("token_embd_norm.weight".into(), vec![h], GgmlType::F32));
    let got: Vec<(String, Vec<u64>, GgmlType)> =
        f.tensors.iter().map(|t| (t.name.clone(), t.dims.clone(), t.ty)).collect();
    assert_eq!(got, want);
    // The conv kernel and the expert bias are copied exactly (f32): row c of the GGUF conv
    // tensor is channel c's L taps, oldest first, as the HF kernel [H, 1, L].
    let Attn::Conv(cv) = &w.layers[0].attn else { panic!("layer 0 is conv") };
    let t = f.tensor("blk.0.shortconv.conv.weight").unwrap();
    let mut row = vec![0f32; 3];
    for ch in [0, 17, c.hidden_size - 1] {
        f.dequant_row(t, ch, &mut row).unwrap();
        assert_eq!(row, cv.kernel[ch * 3..ch * 3 + 3].to_vec());
    }
    let Mlp::Moe { correction_bias: Some(bias), .. } = &w.layers[1].mlp else { panic!("layer 1 is MoE") };
    let mut row = vec![0f32; bias.len()];
    f.dequant_row(f.tensor("blk.1.exp_probs_b.bias").unwrap(), 0, &mut row).unwrap();
    assert_eq!(&row, bias);

    // What llama.cpp's graph cannot compute is said: conv biases, routing-weight scaling,
    // raw (unnormalised) weights — the f32 golden fixture has all three (and experts of
    // width 24, which no 32-element GGUF block holds: a clear error, no file).
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/lfm2_moe/f32_untied_convbias_l4");
    let out = tmp.path().join("f.gguf");
    let err = common::zmoe_err(&[
        "export",
        "gguf",
        "--model",
        common::s(&fixture),
        "--quant",
        "q8_0",
        "--out",
        common::s(&out),
    ]);
    for w in ["conv_bias", "routed_scaling_factor 2", "norm_topk_prob = true", "row length 24 is not a multiple of 32"]
    {
        assert!(err.contains(w), "{w}: {err}");
    }
    assert!(!out.exists());
}
