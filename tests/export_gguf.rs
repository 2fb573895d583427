//! `zmoe export gguf`: synthetic models exported to Q4_0, Q8_0 and BF16 and read back with
//! the GGUF reader — every tensor llama.cpp's loader expects (name, dims, type), metadata
//! equal to config.json, and data within the quantizer's error bound of the source weights
//! — for Qwen3-MoE (`qwen3moe`) and for GLM-4.7-Flash / DeepSeek-V3 / Kimi-K2 (`deepseek2`,
//! MLA, from both the HF `kv_b_proj` and the mlx-community `embed_q` / `unembed_out`
//! layouts), plus a clear one-line error for each kind of bad input.
//!
//! The expected tensor lists, metadata and bounds are written out here from llama.cpp's
//! loaders (`src/models/qwen3moe.cpp`, `src/models/deepseek2.cpp`) and config.json,
//! independently of the exporter's own tables.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::{zmoe, zmoe_err};
use zmoe::checkpoint::synth::SynthQuant;
use zmoe::checkpoint::{Checkpoint, Mat};
use zmoe::config::ModelConfig;
use zmoe::export::gguf::{GgmlType, GgufFile, Value};
use zmoe::model::{Attn, Mlp, Weights};
use zmoe::rng::Rng;

/// One tiny affine-4 model shared by the tests of this binary (read-only).
fn model() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let p = common::synth_tiny(tmp.path(), "tiny", SynthQuant::Affine4, 5);
        (tmp, p)
    })
    .1
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs `zmoe export gguf` and returns stderr; panics with it on failure.
fn export(model: &Path, quant: &str, out: &Path, extra: &[&str]) -> String {
    let mut args = vec!["export", "gguf", "--model", s(model), "--quant", quant, "--out", s(out)];
    args.extend_from_slice(extra);
    let o = zmoe(&args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "export failed:\n{err}");
    err
}

/// Which rows of the source a GGUF tensor holds.
enum Source<'a> {
    Mats(Vec<&'a Mat>),
    Vector(&'a [f32]),
}

/// llama.cpp's tensor list for a qwen3moe model (names, `ne` innermost first, type).
fn expected<'a>(
    c: &ModelConfig,
    w: &'a Weights,
    q: GgmlType,
    tied: bool,
) -> Vec<(String, Vec<u64>, GgmlType, Source<'a>)> {
    let (h, d, v) = (c.hidden_size as u64, c.head_dim as u64, c.vocab_size as u64);
    let (nq, nkv) = (c.num_heads as u64 * d, c.num_kv_heads as u64 * d);
    let f32t = GgmlType::F32;
    let mut t = vec![("token_embd.weight".to_string(), vec![h, v], q, Source::Mats(vec![&w.embed]))];
    for (l, layer) in w.layers.iter().enumerate() {
        let b = |n: &str| format!("blk.{l}.{n}");
        let Attn::Gqa { q: wq, k: wk, v: wv, q_norm, k_norm } = &layer.attn else { panic!("qwen3_moe layers are GQA") };
        t.push((b("attn_norm.weight"), vec![h], f32t, Source::Vector(&layer.input_norm)));
        t.push((b("attn_q.weight"), vec![h, nq], q, Source::Mats(vec![&wq.w])));
        t.push((b("attn_k.weight"), vec![h, nkv], q, Source::Mats(vec![&wk.w])));
        t.push((b("attn_v.weight"), vec![h, nkv], q, Source::Mats(vec![&wv.w])));
        t.push((b("attn_output.weight"), vec![nq, h], q, Source::Mats(vec![&layer.o.w])));
        t.push((b("attn_q_norm.weight"), vec![d], f32t, Source::Vector(q_norm)));
        t.push((b("attn_k_norm.weight"), vec![d], f32t, Source::Vector(k_norm)));
        t.push((b("ffn_norm.weight"), vec![h], f32t, Source::Vector(&layer.post_norm)));
        match &layer.mlp {
            Mlp::Moe { router, experts, .. } => {
                assert!(c.is_moe_layer(l));
                let (e, i) = (c.num_experts as u64, c.moe_intermediate_size as u64);
                t.push((b("ffn_gate_inp.weight"), vec![h, e], f32t, Source::Mats(vec![&router.w])));
                t.push((b("ffn_gate_exps.weight"), vec![h, i, e], q, Source::Mats(experts.gate.iter().collect())));
                t.push((b("ffn_up_exps.weight"), vec![h, i, e], q, Source::Mats(experts.up.iter().collect())));
                t.push((b("ffn_down_exps.weight"), vec![i, h, e], q, Source::Mats(experts.down.iter().collect())));
            }
            Mlp::Dense(f) => {
                let n = c.intermediate_size as u64;
                t.push((b("ffn_gate.weight"), vec![h, n], q, Source::Mats(vec![&f.gate.w])));
                t.push((b("ffn_up.weight"), vec![h, n], q, Source::Mats(vec![&f.up.w])));
                t.push((b("ffn_down.weight"), vec![n, h], q, Source::Mats(vec![&f.down.w])));
            }
        }
    }
    t.push(("output_norm.weight".into(), vec![h], f32t, Source::Vector(&w.norm)));
    if !tied {
        t.push(("output.weight".into(), vec![h, v], q, Source::Mats(vec![&w.lm_head.w])));
    }
    t
}

fn source_row(src: &Source, r: usize, out: &mut [f32]) {
    match src {
        Source::Mats(ms) => ms[r / ms[0].rows].dequant_row(r % ms[0].rows, out),
        Source::Vector(v) => out.copy_from_slice(v),
    }
}

/// Per-block bound on |dequant − source|: Q4_0 error ≤ |d| = amax/8 (one element may
/// clamp from code 16 to 15), Q8_0 ≤ d/2 with d = amax/127; both plus the f16 rounding of
/// the scale (relative 2^-11 per code unit). BF16 rounds each element to nearest: half an
/// ulp, ≤ 2^-8 of the block's largest magnitude. f32 is exact.
fn bound(ty: GgmlType, block: &[f32]) -> f32 {
    let amax = block.iter().fold(0f32, |a, x| a.max(x.abs()));
    match ty {
        GgmlType::Q4_0 => amax / 8.0 * (1.0 + 8.0 / 2048.0) + 1e-7,
        GgmlType::Q8_0 => amax / 127.0 * (0.5 + 127.0 / 2048.0) + 1e-7,
        GgmlType::Bf16 => amax / 256.0,
        GgmlType::F32 => 0.0,
        other => panic!("unexpected type {other:?}"),
    }
}

/// Compares sampled rows (first, last, four random) of every tensor in `want` with their
/// source within [`bound`]; `exact`: bit for bit. Returns the rows compared.
fn check_rows(f: &GgufFile, want: &[(String, Vec<u64>, GgmlType, Source)], seed: u64, exact: bool) -> usize {
    let mut rng = Rng::new(seed);
    let mut rows_checked = 0;
    for (name, dims, ty, src) in want {
        let t = f.tensor(name).unwrap_or_else(|| panic!("missing {name}"));
        assert_eq!((&t.dims, t.ty), (dims, *ty), "{name}");
        let n = t.row_len();
        let (mut g, mut x) = (vec![0f32; n], vec![0f32; n]);
        let mut rows = vec![0, t.n_rows() - 1];
        rows.extend((0..4).map(|_| (rng.next_u64() % t.n_rows() as u64) as usize));
        for r in rows {
            f.dequant_row(t, r, &mut g).unwrap();
            source_row(src, r, &mut x);
            for (bi, (gb, xb)) in g.chunks(32).zip(x.chunks(32)).enumerate() {
                let b = if exact { 0.0 } else { bound(*ty, xb) };
                for (j, (p, q)) in gb.iter().zip(xb).enumerate() {
                    assert!((p - q).abs() <= b, "{name} row {r} elem {}: {p} vs {q}, bound {b}", bi * 32 + j);
                }
            }
            rows_checked += 1;
        }
    }
    rows_checked
}

/// Reads `path` back and checks structure, metadata and sampled data against the model.
fn check_file(path: &Path, model: &Path, q: GgmlType, file_type: u32, tied: bool) {
    let ck = Checkpoint::open(model).unwrap();
    let w = Weights::load(&ck).unwrap();
    let c = &ck.config;
    let f = GgufFile::open(path).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.alignment, 32);
    assert_eq!(f.data_start % 32, 0);

    // Metadata equals the config, with the types llama.cpp's loader insists on.
    let a = "qwen3moe";
    let u = |k: &str| f.get(k).and_then(Value::as_u32).unwrap_or_else(|| panic!("u32 {k}")) as usize;
    let fl = |k: &str| f.get(k).and_then(Value::as_f32).unwrap_or_else(|| panic!("f32 {k}"));
    assert_eq!(f.get("general.architecture").and_then(Value::as_str), Some(a));
    assert_eq!(f.get("tokenizer.ggml.model").and_then(Value::as_str), Some("none"));
    assert_eq!(u("general.file_type"), file_type as usize);
    assert_eq!(u("general.alignment"), 32);
    assert_eq!(u("general.quantization_version"), 2);
    assert_eq!(u(&format!("{a}.context_length")), c.max_position_embeddings);
    assert_eq!(u(&format!("{a}.embedding_length")), c.hidden_size);
    assert_eq!(u(&format!("{a}.block_count")), c.num_layers);
    assert_eq!(u(&format!("{a}.feed_forward_length")), c.intermediate_size);
    assert_eq!(u(&format!("{a}.expert_feed_forward_length")), c.moe_intermediate_size);
    assert_eq!(u(&format!("{a}.attention.head_count")), c.num_heads);
    assert_eq!(u(&format!("{a}.attention.head_count_kv")), c.num_kv_heads);
    assert_eq!(u(&format!("{a}.attention.key_length")), c.head_dim);
    assert_eq!(u(&format!("{a}.attention.value_length")), c.head_dim);
    assert_eq!(u(&format!("{a}.rope.dimension_count")), c.rope.dim);
    assert_eq!(u(&format!("{a}.expert_count")), c.num_experts);
    assert_eq!(u(&format!("{a}.expert_used_count")), c.top_k);
    assert_eq!(u(&format!("{a}.vocab_size")), c.vocab_size);
    assert_eq!(fl(&format!("{a}.rope.freq_base")), c.rope.theta as f32);
    assert_eq!(fl(&format!("{a}.attention.layer_norm_rms_epsilon")), c.rms_norm_eps);
    assert_eq!(f.get(&format!("{a}.expert_weights_norm")).and_then(Value::as_bool), Some(c.norm_topk_prob));

    // Exactly the expected tensors, in llama.cpp's names, dims and types.
    let want = expected(c, &w, q, tied);
    let got: Vec<&str> = f.tensors.iter().map(|t| t.name.as_str()).collect();
    let names: Vec<&str> = want.iter().map(|t| t.0.as_str()).collect();
    assert_eq!(got, names, "tensor list");
    assert!(check_rows(&f, &want, 11, false) > 100);
}

#[test]
fn q4_0_and_q8_0_read_back_with_llama_cpp_names_and_bounded_error() {
    let tmp = tempfile::tempdir().unwrap();
    for (quant, ty, ft) in [("q4_0", GgmlType::Q4_0, 2), ("q8_0", GgmlType::Q8_0, 7)] {
        let out = tmp.path().join(format!("tiny-{quant}.gguf"));
        let err = export(model(), quant, &out, &["--check"]);
        assert!(err.contains("wrote") && err.contains("qwen3moe") && err.contains("sampled rows checked"), "{err}");
        // The tiny preset's layer 0 is dense, which llama.cpp's qwen3moe cannot load: said.
        assert!(err.contains("warning: layers [0] have a dense MLP"), "{err}");
        check_file(&out, model(), ty, ft, false);
    }
    // Q8_0 of the same weights is closer to them than Q4_0 (and both are ~4.5 / 8.5 bpw).
    let size = |q: &str| std::fs::metadata(tmp.path().join(format!("tiny-{q}.gguf"))).unwrap().len() as f64;
    let ratio = size("q8_0") / size("q4_0");
    assert!(ratio > 1.6 && ratio < 1.95, "q8_0 / q4_0 size {ratio}");
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 2, "temporary files left behind: {leftovers:?}");
}

#[test]
fn tied_embeddings_have_no_output_tensor() {
    let m = common::copy_with_tensors(model(), |list| list.retain(|t| !t.0.starts_with("lm_head.")));
    let cfg_path = m.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["tie_word_embeddings"] = true.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let out = m.path().join("tied.gguf");
    export(m.path(), "q8_0", &out, &[]);
    check_file(&out, m.path(), GgmlType::Q8_0, 7, true);
}

#[test]
fn bad_input_gives_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.gguf");
    let mut errors = Vec::new();
    let mut fail = |args: &[&str]| {
        let e = zmoe_err(args);
        errors.push(e.clone());
        e
    };
    let missing = tmp.path().join("no-such-model");
    let e = fail(&["export", "gguf", "--model", s(&missing), "--quant", "q4_0", "--out", s(&out)]);
    assert!(e.contains("no-such-model") && e.contains("does not exist"), "{e}");
    assert!(!out.exists());

    let e = fail(&["export", "gguf", "--model", s(model()), "--quant", "q5_k", "--out", s(&out)]);
    assert!(e.contains("unknown --quant `q5_k`") && e.contains("q4_0, q8_0 or bf16"), "{e}");
    assert!(!out.exists());

    std::fs::write(&out, b"precious").unwrap();
    let e = fail(&["export", "gguf", "--model", s(model()), "--quant", "q4_0", "--out", s(&out)]);
    assert!(e.contains("x.gguf") && e.contains("--force"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");

    let e = fail(&["export", "gguf", "--model", s(model()), "--quant", "q4_0", "--out", s(tmp.path())]);
    assert!(e.contains("is a folder"), "{e}");
    let nested = tmp.path().join("no-dir").join("y.gguf");
    let e = fail(&["export", "gguf", "--model", s(model()), "--quant", "q4_0", "--out", s(&nested)]);
    assert!(e.contains("no-dir") && e.contains("does not exist"), "{e}");

    // A model folder without weights is named.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    std::fs::copy(model().join("config.json"), empty.join("config.json")).unwrap();
    let z = tmp.path().join("z.gguf");
    let e = fail(&["export", "gguf", "--model", s(&empty), "--quant", "q8_0", "--out", s(&z)]);
    assert!(e.contains("empty") && e.contains("model.safetensors"), "{e}");
    assert!(!z.exists());

    for e in &errors {
        assert_eq!(e.trim_end().lines().count(), 1, "not one line: {e}");
    }
    // --force replaces the file (atomically, through a temporary sibling).
    export(model(), "q4_0", &out, &["--force"]);
    assert!(GgufFile::open(&out).is_ok());
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn help_mentions_formats() {
    let o = zmoe(&["export", "gguf", "--help"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("q4_0, q8_0 or bf16") && text.contains("deepseek2") && text.contains("--force"), "{text}");
}

// ---- deepseek2: GLM-4.7-Flash, DeepSeek-V3, Kimi-K2 (MLA) ----

/// A model folder's config.json as written (the test's own reading of it).
fn raw_config(model: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap()
}

fn num(j: &serde_json::Value, k: &str) -> u64 {
    j[k].as_u64().unwrap_or_else(|| panic!("config.json `{k}`"))
}

/// Layers with a dense MLP before the first MoE one: GLM's `mlp_layer_types`, DeepSeek's
/// `first_k_dense_replace`.
fn leading_dense(j: &serde_json::Value) -> u64 {
    match j["mlp_layer_types"].as_array() {
        Some(kinds) => kinds.iter().take_while(|k| k.as_str() == Some("dense")).count() as u64,
        None => num(j, "first_k_dense_replace"),
    }
}

/// llama.cpp's deepseek2 tensor list with MLA (`load_arch_tensors` in
/// src/models/deepseek2.cpp): q_a / q_a_norm / q_b, kv_a_mqa / kv_a_norm, k_b `{qk_nope,
/// kv_lora, n_head}`, v_b `{kv_lora, v_head, n_head}`; the first leading_dense_block_count
/// layers dense, the rest MoE with an optional exp_probs_b and shared experts.
fn expected_deepseek2<'a>(
    j: &serde_json::Value,
    w: &'a Weights,
    q: GgmlType,
) -> Vec<(String, Vec<u64>, GgmlType, Source<'a>)> {
    let n = |k: &str| num(j, k);
    let (h, v, nh) = (n("hidden_size"), n("vocab_size"), n("num_attention_heads"));
    let (ql, kl, nope, rope, vd) =
        (n("q_lora_rank"), n("kv_lora_rank"), n("qk_nope_head_dim"), n("qk_rope_head_dim"), n("v_head_dim"));
    let (e, fe, fs) =
        (n("n_routed_experts"), n("moe_intermediate_size"), n("moe_intermediate_size") * n("n_shared_experts"));
    let f32t = GgmlType::F32;
    let mut t = vec![("token_embd.weight".to_string(), vec![h, v], q, Source::Mats(vec![&w.embed]))];
    for (l, layer) in w.layers.iter().enumerate() {
        let b = |s: &str| format!("blk.{l}.{s}");
        let Attn::Mla(m) = &layer.attn else { panic!("MLA layers") };
        t.push((b("attn_norm.weight"), vec![h], f32t, Source::Vector(&layer.input_norm)));
        t.push((b("attn_q_a.weight"), vec![h, ql], q, Source::Mats(vec![&m.q_a.as_ref().unwrap().w])));
        t.push((b("attn_q_a_norm.weight"), vec![ql], f32t, Source::Vector(&m.q_a_norm)));
        t.push((b("attn_q_b.weight"), vec![ql, nh * (nope + rope)], q, Source::Mats(vec![&m.q.w])));
        t.push((b("attn_kv_a_mqa.weight"), vec![h, kl + rope], q, Source::Mats(vec![&m.kv_a.w])));
        t.push((b("attn_kv_a_norm.weight"), vec![kl], f32t, Source::Vector(&m.kv_a_norm)));
        t.push((b("attn_k_b.weight"), vec![nope, kl, nh], q, Source::Mats(m.embed_q.iter().collect())));
        t.push((b("attn_v_b.weight"), vec![kl, vd, nh], q, Source::Mats(m.unembed_out.iter().collect())));
        t.push((b("attn_output.weight"), vec![nh * vd, h], q, Source::Mats(vec![&layer.o.w])));
        t.push((b("ffn_norm.weight"), vec![h], f32t, Source::Vector(&layer.post_norm)));
        if (l as u64) < leading_dense(j) {
            let Mlp::Dense(f) = &layer.mlp else { panic!("layer {l} is dense") };
            let ff = n("intermediate_size");
            t.push((b("ffn_gate.weight"), vec![h, ff], q, Source::Mats(vec![&f.gate.w])));
            t.push((b("ffn_down.weight"), vec![ff, h], q, Source::Mats(vec![&f.down.w])));
            t.push((b("ffn_up.weight"), vec![h, ff], q, Source::Mats(vec![&f.up.w])));
        } else {
            let Mlp::Moe { router, correction_bias, experts, shared } = &layer.mlp else { panic!("layer {l} is MoE") };
            let sh = shared.as_ref().unwrap();
            t.push((b("ffn_gate_inp.weight"), vec![h, e], f32t, Source::Mats(vec![&router.w])));
            t.push((b("exp_probs_b.bias"), vec![e], f32t, Source::Vector(correction_bias.as_ref().unwrap())));
            t.push((b("ffn_gate_exps.weight"), vec![h, fe, e], q, Source::Mats(experts.gate.iter().collect())));
            t.push((b("ffn_up_exps.weight"), vec![h, fe, e], q, Source::Mats(experts.up.iter().collect())));
            t.push((b("ffn_down_exps.weight"), vec![fe, h, e], q, Source::Mats(experts.down.iter().collect())));
            t.push((b("ffn_gate_shexp.weight"), vec![h, fs], q, Source::Mats(vec![&sh.gate.w])));
            t.push((b("ffn_up_shexp.weight"), vec![h, fs], q, Source::Mats(vec![&sh.up.w])));
            t.push((b("ffn_down_shexp.weight"), vec![fs, h], q, Source::Mats(vec![&sh.down.w])));
        }
    }
    t.push(("output_norm.weight".into(), vec![h], f32t, Source::Vector(&w.norm)));
    t.push(("output.weight".into(), vec![h, v], q, Source::Mats(vec![&w.lm_head.w])));
    t
}

/// The metadata a deepseek2 file must carry, from config.json: what the loader reads, in
/// the types it reads (llama-model.cpp `load_hparams`, deepseek2.cpp `load_arch_hparams`,
/// llama-context.cpp for YaRN), and nothing else.
fn expected_deepseek2_kv(j: &serde_json::Value, file_type: u32) -> Vec<(String, Value)> {
    let n = |k: &str| num(j, k) as u32;
    let a = |k: &str| format!("deepseek2.{k}");
    let f = |x: &serde_json::Value| x.as_f64().unwrap() as f32;
    let yarn = &j["rope_scaling"];
    let theta = j.get("rope_theta").or_else(|| yarn.get("rope_theta")).map_or(10000.0, f);
    let mut kv = vec![
        (a("context_length"), Value::U32(n("max_position_embeddings"))),
        (a("embedding_length"), Value::U32(n("hidden_size"))),
        (a("block_count"), Value::U32(n("num_hidden_layers"))),
        (a("feed_forward_length"), Value::U32(n("intermediate_size"))),
        (a("attention.head_count"), Value::U32(n("num_attention_heads"))),
        (a("attention.head_count_kv"), Value::U32(1)),
        (a("attention.key_length"), Value::U32(n("kv_lora_rank") + n("qk_rope_head_dim"))),
        (a("attention.value_length"), Value::U32(n("kv_lora_rank"))),
        (a("attention.key_length_mla"), Value::U32(n("qk_nope_head_dim") + n("qk_rope_head_dim"))),
        (a("attention.value_length_mla"), Value::U32(n("v_head_dim"))),
        (a("attention.q_lora_rank"), Value::U32(n("q_lora_rank"))),
        (a("attention.kv_lora_rank"), Value::U32(n("kv_lora_rank"))),
        (a("attention.layer_norm_rms_epsilon"), Value::F32(f(&j["rms_norm_eps"]))),
        (a("rope.dimension_count"), Value::U32(n("qk_rope_head_dim"))),
        (a("rope.freq_base"), Value::F32(theta)),
        (a("expert_count"), Value::U32(n("n_routed_experts"))),
        (a("expert_used_count"), Value::U32(n("num_experts_per_tok"))),
        (a("expert_feed_forward_length"), Value::U32(n("moe_intermediate_size"))),
        (a("expert_weights_norm"), Value::Bool(j["norm_topk_prob"].as_bool().unwrap())),
        (a("expert_shared_count"), Value::U32(n("n_shared_experts"))),
        (a("expert_weights_scale"), Value::F32(f(&j["routed_scaling_factor"]))),
        (a("expert_gating_func"), Value::U32(2)), // LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID
        (a("leading_dense_block_count"), Value::U32(leading_dense(j) as u32)),
        (a("vocab_size"), Value::U32(n("vocab_size"))),
        ("general.architecture".into(), Value::Str("deepseek2".into())),
        ("general.file_type".into(), Value::U32(file_type)),
        ("general.quantization_version".into(), Value::U32(2)),
        ("general.alignment".into(), Value::U32(32)),
        ("tokenizer.ggml.model".into(), Value::Str("none".into())),
    ];
    if n("n_group") > 1 && n("topk_group") < n("n_group") {
        kv.push((a("expert_group_count"), Value::U32(n("n_group"))));
        kv.push((a("expert_group_used_count"), Value::U32(n("topk_group"))));
    }
    if yarn["rope_type"].as_str() == Some("yarn") {
        kv.push((a("rope.scaling.type"), Value::Str("yarn".into())));
        kv.push((a("rope.scaling.factor"), Value::F32(f(&yarn["factor"]))));
        kv.push((
            a("rope.scaling.original_context_length"),
            Value::U32(num(yarn, "original_max_position_embeddings") as u32),
        ));
        kv.push((
            a("rope.scaling.yarn_log_multiplier"),
            Value::F32((0.1 * yarn["mscale_all_dim"].as_f64().unwrap()) as f32),
        ));
    }
    kv
}

/// Reads a deepseek2 export back: metadata (every key but the two free-text ones), the
/// tensor list, and sampled rows against the model's weights. Returns the rows compared.
fn check_deepseek2(path: &Path, model: &Path, q: GgmlType, file_type: u32, exact: bool) -> usize {
    let j = raw_config(model);
    let ck = Checkpoint::open(model).unwrap();
    let w = Weights::load(&ck).unwrap();
    let f = GgufFile::open(path).unwrap();
    assert_eq!((f.version, f.alignment), (3, 32));
    let mut got: Vec<(String, Value)> =
        f.kv.iter().filter(|(k, _)| k != "general.name" && k != "general.quantized_by").cloned().collect();
    let mut want = expected_deepseek2_kv(&j, file_type);
    got.sort_by(|x, y| x.0.cmp(&y.0));
    want.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(got, want, "metadata of {}", path.display());
    let want = expected_deepseek2(&j, &w, q);
    let mut names: Vec<&str> = f.tensors.iter().map(|t| t.name.as_str()).collect();
    let mut expect: Vec<&str> = want.iter().map(|t| t.0.as_str()).collect();
    names.sort_unstable();
    expect.sort_unstable();
    assert_eq!(names, expect, "tensor list of {}", path.display());
    check_rows(&f, &want, 13, exact)
}

/// The warnings (`warning: ` lines) of an export's stderr.
fn warnings(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.starts_with("warning: ")).collect()
}

#[test]
fn glm_tiny_exports_as_deepseek2_from_both_layouts() {
    let tmp = tempfile::tempdir().unwrap();
    // bf16 synth: HF layout (kv_b_proj); affine4: mlx-community (embed_q / unembed_out).
    for (layout, sq) in [("hf", SynthQuant::Bf16), ("mlx", SynthQuant::Affine4)] {
        let model = common::synth_preset(tmp.path(), layout, "glm4_moe_lite/glm-tiny", sq, 21);
        let has_kv_b = Checkpoint::open(&model).unwrap().has("model.layers.0.self_attn.kv_b_proj.weight");
        assert_eq!(has_kv_b, layout == "hf");
        for (quant, ty, ft) in [("q4_0", GgmlType::Q4_0, 2), ("q8_0", GgmlType::Q8_0, 7), ("bf16", GgmlType::Bf16, 32)]
        {
            let out = tmp.path().join(format!("{layout}-{quant}.gguf"));
            let err = export(&model, quant, &out, &["--check"]);
            assert!(err.contains(&format!("(deepseek2 {quant},")) && err.contains("sampled rows checked"), "{err}");
            // GLM's q/kv latent norms use eps 1e-6, llama.cpp rms_norm_eps (1e-5): said, once.
            let w = warnings(&err);
            assert_eq!(w.len(), 1, "{err}");
            assert!(w[0].contains("rms_norm_eps (1e-5)") && w[0].contains("1e-6"), "{err}");
            // A bf16 source goes to BF16 unchanged.
            let exact = layout == "hf" && quant == "bf16";
            assert!(check_deepseek2(&out, &model, ty, ft, exact) > 300);
        }
    }
}

#[test]
fn glm_hf_kv_b_proj_becomes_k_b_and_v_b() {
    // convert_hf_to_gguf.py's split, computed here from the raw kv_b_proj rows: per head,
    // rows [h·(nope+v), +nope) are W_UK (k_b = its transpose), the next v rows W_UV (v_b).
    let tmp = tempfile::tempdir().unwrap();
    let model = common::synth_preset(tmp.path(), "hf", "glm4_moe_lite/glm-tiny", SynthQuant::Bf16, 22);
    let out = tmp.path().join("m.gguf");
    export(&model, "bf16", &out, &[]);
    let j = raw_config(&model);
    let (nh, lat, nope, v) = (
        num(&j, "num_attention_heads") as usize,
        num(&j, "kv_lora_rank") as usize,
        num(&j, "qk_nope_head_dim") as usize,
        num(&j, "v_head_dim") as usize,
    );
    let ck = Checkpoint::open(&model).unwrap();
    let f = GgufFile::open(&out).unwrap();
    for l in 0..num(&j, "num_hidden_layers") as usize {
        let kv_b = ck.mat(&format!("model.layers.{l}.self_attn.kv_b_proj"), nh * (nope + v), lat).unwrap();
        let rows: Vec<Vec<f32>> = (0..kv_b.rows)
            .map(|r| {
                let mut x = vec![0f32; lat];
                kv_b.dequant_row(r, &mut x);
                x
            })
            .collect();
        assert!(rows.iter().flatten().all(|x| *x != 0.0), "random weights have no zeros");
        let k_b = f.tensor(&format!("blk.{l}.attn_k_b.weight")).unwrap();
        let v_b = f.tensor(&format!("blk.{l}.attn_v_b.weight")).unwrap();
        assert_eq!(
            (&k_b.dims, &v_b.dims),
            (&vec![nope as u64, lat as u64, nh as u64], &vec![lat as u64, v as u64, nh as u64])
        );
        let (mut kr, mut vr) = (vec![0f32; nope], vec![0f32; lat]);
        for (h, head) in rows.chunks(nope + v).enumerate() {
            let (w_uk, w_uv) = head.split_at(nope);
            for r in 0..lat {
                f.dequant_row(k_b, h * lat + r, &mut kr).unwrap();
                let want: Vec<f32> = w_uk.iter().map(|row| row[r]).collect();
                assert_eq!(kr, want, "layer {l} head {h} k_b row {r}");
            }
            for (r, want) in w_uv.iter().enumerate() {
                f.dequant_row(v_b, h * v + r, &mut vr).unwrap();
                assert_eq!(&vr, want, "layer {l} head {h} v_b row {r}");
            }
        }
    }
}

#[test]
fn deepseek_and_kimi_tiny_write_yarn_and_groups() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, preset, sq) in [
        ("ds", "deepseek_v3/deepseek-tiny", SynthQuant::Affine4),
        ("kimi", "deepseek_v3/kimi-k2-tiny", SynthQuant::Bf16),
    ] {
        let model = common::synth_preset(tmp.path(), name, preset, sq, 23);
        let out = tmp.path().join(format!("{name}.gguf"));
        let err = export(&model, "q4_0", &out, &[]);
        // YaRN with mscale = mscale_all_dim = 1 and default betas, eps 1e-6 everywhere:
        // llama.cpp computes the same function, so nothing to warn about.
        assert!(warnings(&err).is_empty(), "{err}");
        assert!(check_deepseek2(&out, &model, GgmlType::Q4_0, 2, false) > 300);
        let f = GgufFile::open(&out).unwrap();
        let groups = f.get("deepseek2.expert_group_count").and_then(Value::as_u32);
        // deepseek-tiny keeps 2 of 4 expert groups; kimi-k2-tiny has one group (no key).
        assert_eq!(groups, if name == "ds" { Some(4) } else { None });
        assert_eq!(f.get("deepseek2.rope.scaling.type").and_then(Value::as_str), Some("yarn"));
    }
}

/// gpt-oss (llama.cpp's `gpt-oss` architecture): the tensors its loader creates — biases,
/// `attn_sinks`, `post_attention_norm`, MXFP4 experts with `[n, E]` bias tensors — and the
/// keys it reads (sliding window, YaRN). From the MXFP4 release layout the expert rows are
/// carried over exactly; from bf16 they are re-quantized to MXFP4 within its bound (`--check`).
#[test]
fn gpt_oss_exports_mxfp4_experts() {
    let tmp = tempfile::tempdir().unwrap();
    for (q, seed) in [(SynthQuant::Mxfp4, 11u64), (SynthQuant::Bf16, 12)] {
        let dir = common::synth_preset(tmp.path(), q.name(), "gpt_oss/gpt-oss-tiny", q, seed);
        let out = tmp.path().join(format!("{}.gguf", q.name()));
        export(&dir, "q8_0", &out, &["--check"]);
        let f = GgufFile::open(&out).unwrap();
        let ck = Checkpoint::open(&dir).unwrap();
        let c = &ck.config;
        let w = Weights::load(&ck).unwrap();
        let (h, e, i, d) =
            (c.hidden_size as u64, c.num_experts as u64, c.moe_intermediate_size as u64, c.head_dim as u64);
        let (nh, nkv) = (c.num_heads as u64, c.num_kv_heads as u64);
        assert_eq!(f.get("general.architecture").and_then(Value::as_str), Some("gpt-oss"));
        for (k, want) in [
            ("gpt-oss.attention.sliding_window", 6),
            ("gpt-oss.expert_count", e as u32),
            ("gpt-oss.expert_used_count", 4),
            ("gpt-oss.expert_feed_forward_length", i as u32),
            ("gpt-oss.rope.scaling.original_context_length", 4096),
        ] {
            assert_eq!(f.get(k).and_then(Value::as_u32), Some(want), "{k}");
        }
        assert_eq!(f.get("gpt-oss.rope.scaling.type").and_then(Value::as_str), Some("yarn"));
        assert_eq!(f.get("gpt-oss.rope.scaling.factor").and_then(Value::as_f32), Some(32.0));
        for (name, dims, ty) in [
            ("blk.1.attn_q.weight", vec![h, nh * d], GgmlType::Q8_0),
            ("blk.1.attn_q.bias", vec![nh * d], GgmlType::F32),
            ("blk.1.attn_k.bias", vec![nkv * d], GgmlType::F32),
            ("blk.1.attn_output.bias", vec![h], GgmlType::F32),
            ("blk.1.attn_sinks.weight", vec![nh], GgmlType::F32),
            ("blk.1.post_attention_norm.weight", vec![h], GgmlType::F32),
            ("blk.1.ffn_gate_inp.weight", vec![h, e], GgmlType::F32),
            ("blk.1.ffn_gate_inp.bias", vec![e], GgmlType::F32),
            ("blk.1.ffn_gate_exps.weight", vec![h, i, e], GgmlType::Mxfp4),
            ("blk.1.ffn_up_exps.weight", vec![h, i, e], GgmlType::Mxfp4),
            ("blk.1.ffn_down_exps.weight", vec![i, h, e], GgmlType::Mxfp4),
            ("blk.1.ffn_gate_exps.bias", vec![i, e], GgmlType::F32),
            ("blk.1.ffn_down_exps.bias", vec![h, e], GgmlType::F32),
        ] {
            let t = f.tensor(name).unwrap_or_else(|| panic!("{q:?}: no {name}"));
            assert_eq!((&t.dims, t.ty), (&dims, ty), "{q:?}: {name}");
        }
        assert!(f.tensor("blk.1.ffn_norm.weight").is_none() && f.tensor("blk.1.attn_q_norm.weight").is_none());
        let Mlp::Moe { experts, .. } = &w.layers[1].mlp else { panic!("gpt-oss layers are MoE") };
        let t = f.tensor("blk.1.ffn_up_exps.weight").unwrap();
        let (mut got, mut want) = (vec![0f32; h as usize], vec![0f32; h as usize]);
        let mut worst = 0f32;
        for r in [0usize, 5, 3 * i as usize + 7, (e * i) as usize - 1] {
            f.dequant_row(t, r, &mut got).unwrap();
            experts.up[r / i as usize].dequant_row(r % i as usize, &mut want);
            worst = got.iter().zip(&want).fold(worst, |m, (a, b)| m.max((a - b).abs()));
        }
        if q == SynthQuant::Mxfp4 {
            assert_eq!(worst, 0.0, "MXFP4 source rows must be carried over exactly");
        }
        let b = f.tensor("blk.1.ffn_down_exps.bias").unwrap();
        f.dequant_row(b, 3, &mut got).unwrap();
        assert_eq!(got, experts.bias.as_ref().unwrap().down[3 * h as usize..][..h as usize]);
        let Attn::Sink { sinks, .. } = &w.layers[1].attn else { panic!("gpt-oss attention has sinks") };
        let mut s = vec![0f32; nh as usize];
        f.dequant_row(f.tensor("blk.1.attn_sinks.weight").unwrap(), 0, &mut s).unwrap();
        assert_eq!(&s, sinks);
    }
}

/// ggml's MXFP4 block by hand: exponent byte first, then element j in the low nibble of
/// byte j and element j+16 in its high nibble (not the checkpoint's 2k / 2k+1 pairing).
#[test]
fn mxfp4_block_layout_by_hand() {
    // Block max 3 → e = ceil(log2(3/6)) = -1 → byte 126; x / 2^-1 = 2x: 0.5 → 1.0 (code 2),
    // -3 → -6 (code 15), 0.25 → 0.5 (code 1), 1.25 → 2.5 (a tie between 2 and 3: code 4).
    let mut x = [0f32; 32];
    (x[0], x[16], x[1], x[17]) = (0.5, -3.0, 0.25, 1.25);
    let mut b = [0u8; 17];
    zmoe::export::gguf::quantize_row_mxfp4(&x, &mut b).unwrap();
    assert_eq!(b[0], 126);
    assert_eq!((b[1], b[2]), (0x2 | (0xF << 4), 0x1 | (0x4 << 4)));
    assert!(b[3..].iter().all(|&v| v == 0));
    let mut back = [0f32; 32];
    zmoe::export::gguf::dequantize_row(GgmlType::Mxfp4, &b, &mut back).unwrap();
    assert_eq!((back[0], back[16], back[1], back[17]), (0.5, -3.0, 0.25, 1.0));
}
