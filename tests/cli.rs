//! The command line as a user meets it: help on every subcommand, the happy paths, and a
//! clear one-line error (never a panic) for each kind of bad input.

mod common;

use std::path::Path;

use common::{copy_model, s, zmoe, zmoe_err};
use safetensors::Dtype;
use zmoe::checkpoint::synth::SynthQuant;

/// The tiny model this binary's tests share (read-only).
fn model() -> &'static Path {
    common::shared_tiny(SynthQuant::Affine4, 3)
}

/// Copies the shared model and rewrites its safetensors through `edit`.
fn with_tensors(edit: impl FnOnce(&mut Vec<common::RawTensor>)) -> tempfile::TempDir {
    common::copy_with_tensors(model(), edit)
}

#[test]
fn help_for_every_subcommand() {
    for sub in ["demo", "synth", "generate", "forward", "bench"] {
        let out = zmoe(&[sub, "--help"]);
        assert!(out.status.success(), "{sub} --help");
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage: zmoe"), "{sub}");
    }
    assert!(zmoe(&["--help"]).status.success());
}

#[test]
fn forward_json_and_generate_json() {
    let out = zmoe(&["forward", "--model", s(model()), "--tokens", "1,2,3", "--backend", "cpu", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = v["logits"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0].as_array().unwrap().len(), 1024);

    let run_gen = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", s(model()), "--prompt-tokens", "5,6,7", "--max-tokens", "6"];
        args.extend_from_slice(extra);
        args.push("--json");
        let out = zmoe(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect::<Vec<_>>()
    };
    let greedy = run_gen(&["--ignore-eos"]);
    assert_eq!(greedy.len(), 6);
    assert_eq!(greedy, run_gen(&["--ignore-eos"]), "greedy is deterministic");
    let sampled = run_gen(&["--temperature", "1.0", "--top-k", "50", "--seed", "9", "--ignore-eos"]);
    assert_eq!(sampled, run_gen(&["--temperature", "1.0", "--top-k", "50", "--seed", "9", "--ignore-eos"]));
    // Greedy from forward's argmax agrees with generate's first token.
    let out = zmoe(&["forward", "--model", s(model()), "--tokens", "5,6,7", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let last: Vec<f32> = v["logits"][2].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    assert_eq!(zmoe::sample::argmax(&last) as u64, greedy[0]);
}

#[test]
fn generate_streams_text_with_stats() {
    let out = zmoe(&["generate", "--model", s(model()), "--prompt", "Hello experts", "--max-tokens", "8"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("prefill:") && err.contains("decode:") && err.contains("tok/s"), "{err}");
}

#[test]
fn missing_folder_and_files() {
    let e = zmoe_err(&["forward", "--model", "/nonexistent/model", "--tokens", "1"]);
    assert!(e.contains("/nonexistent/model") && e.contains("does not exist"), "{e}");
    let tmp = tempfile::tempdir().unwrap();
    let e = zmoe_err(&["forward", "--model", s(tmp.path()), "--tokens", "1"]);
    assert!(e.contains("config.json"), "{e}");
    std::fs::copy(model().join("config.json"), tmp.path().join("config.json")).unwrap();
    let e = zmoe_err(&["forward", "--model", s(tmp.path()), "--tokens", "1"]);
    assert!(e.contains("no model.safetensors"), "{e}");
    // --prompt needs a tokenizer.json.
    let tmp = tempfile::tempdir().unwrap();
    copy_model(model(), tmp.path());
    std::fs::remove_file(tmp.path().join("tokenizer.json")).unwrap();
    let e = zmoe_err(&["generate", "--model", s(tmp.path()), "--prompt", "hi"]);
    assert!(e.contains("tokenizer.json") && e.contains("not found"), "{e}");
}

#[test]
fn truncated_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    copy_model(model(), tmp.path());
    let p = tmp.path().join("model.safetensors");
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(len - 1000).unwrap();
    let e = zmoe_err(&["forward", "--model", s(tmp.path()), "--tokens", "1"]);
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");
    // Cut inside the header.
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(100).unwrap();
    let e = zmoe_err(&["forward", "--model", s(tmp.path()), "--tokens", "1"]);
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::write(&p, b"abc").unwrap();
    let e = zmoe_err(&["forward", "--model", s(tmp.path()), "--tokens", "1"]);
    assert!(e.contains("not a safetensors file"), "{e}");
}

#[test]
fn lying_header() {
    // Claim a bigger shape for a tensor without changing its bytes: offsets no longer match.
    let tmp = tempfile::tempdir().unwrap();
    copy_model(model(), tmp.path());
    let p = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    let lie = header.replacen("\"shape\":[256]", "\"shape\":[512]", 1);
    assert_ne!(lie, header);
    let mut out = (lie.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(lie.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&p, out).unwrap();
    let e = zmoe_err(&["forward", "--model", s(tmp.path()), "--tokens", "1"]);
    assert!(e.contains("model.safetensors") && e.contains("header lies"), "{e}");
}

#[test]
fn wrong_shape_wrong_dtype_missing_tensor() {
    let t = with_tensors(|l| {
        let x = l.iter_mut().find(|t| t.0 == "model.norm.weight").unwrap();
        x.2 = vec![128];
        x.3.truncate(256);
    });
    let e = zmoe_err(&["forward", "--model", s(t.path()), "--tokens", "1"]);
    assert!(e.contains("model.norm.weight") && e.contains("expected shape [256], got [128]"), "{e}");

    let t = with_tensors(|l| {
        let x = l.iter_mut().find(|t| t.0 == "model.layers.0.input_layernorm.weight").unwrap();
        x.1 = Dtype::I16;
    });
    let e = zmoe_err(&["forward", "--model", s(t.path()), "--tokens", "1"]);
    assert!(e.contains("model.layers.0.input_layernorm.weight") && e.contains("expected a float tensor"), "{e}");

    let t = with_tensors(|l| {
        let x = l.iter_mut().find(|t| t.0 == "model.layers.1.mlp.switch_mlp.up_proj.weight").unwrap();
        x.1 = Dtype::F32; // packed codes must be U32
    });
    let e = zmoe_err(&["forward", "--model", s(t.path()), "--tokens", "1"]);
    assert!(e.contains("switch_mlp.up_proj.weight") && e.contains("expected U32"), "{e}");

    let t = with_tensors(|l| l.retain(|t| t.0 != "model.layers.2.self_attn.k_norm.weight"));
    let e = zmoe_err(&["forward", "--model", s(t.path()), "--tokens", "1"]);
    assert!(e.contains("model.layers.2.self_attn.k_norm.weight") && e.contains("missing"), "{e}");
}

#[test]
fn bad_config() {
    let tmp = tempfile::tempdir().unwrap();
    copy_model(model(), tmp.path());
    let cfg = tmp.path().join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("\"qwen3_moe\"", "\"mamba\"")).unwrap();
    let e = zmoe_err(&["forward", "--model", s(tmp.path()), "--tokens", "1"]);
    assert!(e.contains("config.json") && e.contains("unknown model_type `mamba`"), "{e}");
    std::fs::write(&cfg, "{ not json").unwrap();
    let e = zmoe_err(&["forward", "--model", s(tmp.path()), "--tokens", "1"]);
    assert!(e.contains("config.json") && e.contains("not valid JSON"), "{e}");
    // Quantized tensors without a quantization block.
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v.as_object_mut().unwrap().remove("quantization");
    v.as_object_mut().unwrap().remove("quantization_config");
    std::fs::write(&cfg, v.to_string()).unwrap();
    let e = zmoe_err(&["forward", "--model", s(tmp.path()), "--tokens", "1"]);
    assert!(e.contains("quantization"), "{e}");
}

#[test]
fn bad_token_lists() {
    let m = s(model());
    let e = zmoe_err(&["forward", "--model", m, "--tokens", "1,x,3"]);
    assert!(e.contains("`x` is not a token id"), "{e}");
    let e = zmoe_err(&["generate", "--model", m, "--prompt-tokens", "1,-2"]);
    assert!(e.contains("`-2` is not a token id"), "{e}");
    let e = zmoe_err(&["forward", "--model", m, "--tokens", "1,99999"]);
    assert!(e.contains("99999") && e.contains("outside the vocabulary"), "{e}");
    let e = zmoe_err(&["generate", "--model", m, "--prompt-tokens", "1", "--top-p", "0"]);
    assert!(e.contains("--top-p"), "{e}");
    let e = zmoe_err(&["forward", "--model", m, "--tokens", "1", "--backend", "tpu"]);
    assert!(e.contains("unknown backend `tpu`"), "{e}");
}

#[test]
fn synth_never_overwrites_without_asking() {
    let tmp = tempfile::tempdir().unwrap();
    let user = tmp.path().join("notes");
    std::fs::create_dir(&user).unwrap();
    std::fs::write(user.join("mine.txt"), "precious").unwrap();
    let e = zmoe_err(&["synth", "--preset", "tiny", "--out", s(&user)]);
    assert!(e.contains("not empty") && e.contains("--force"), "{e}");
    let e = zmoe_err(&["synth", "--preset", "tiny", "--out", s(&user), "--force"]);
    assert!(e.contains("refusing") && e.contains(".zmoe-synth"), "{e}");
    assert_eq!(std::fs::read_to_string(user.join("mine.txt")).unwrap(), "precious");
    let e = zmoe_err(&["synth", "--preset", "huge", "--out", s(&tmp.path().join("x"))]);
    assert!(e.contains("unknown family/preset"), "{e}");
    let e = zmoe_err(&["synth", "--quant", "int3", "--out", s(&tmp.path().join("x"))]);
    assert!(e.contains("unknown --quant"), "{e}");
}

/// `zmoe synth --generated` writes the recipe instead of the weights, and opening that folder
/// generates exactly the bytes a full synth stores, tensor by tensor, for every family and
/// format (affine 4/8-bit, bf16, MXFP4; MLA, shared experts, conv layers, sinks); a forward
/// pass gives the same logits. A broken recipe or an edited config.json is a clear error
/// naming the file.
#[test]
fn synth_generated_weights_equal_the_files() {
    use zmoe::checkpoint::Checkpoint;
    let tmp = tempfile::tempdir().unwrap();
    for (i, (family, preset, quant)) in [
        ("qwen3_moe", "tiny", "affine4"),
        ("glm4_moe_lite", "glm-tiny", "bf16"),
        ("deepseek_v3", "deepseek-tiny", "affine8"),
        ("lfm2_moe", "lfm2-tiny", "affine4"),
        ("gpt_oss", "gpt-oss-tiny", "mxfp4"),
    ]
    .into_iter()
    .enumerate()
    {
        let seed = (40 + i).to_string();
        let (files, lazy) = (tmp.path().join(format!("f{i}")), tmp.path().join(format!("g{i}")));
        for (out, extra) in [(&files, None), (&lazy, Some("--generated"))] {
            let mut args = vec!["synth", "--family", family, "--preset", preset, "--quant", quant, "--seed", &seed];
            args.extend(["--out", s(out)]);
            args.extend(extra);
            let run = zmoe(&args);
            assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        }
        assert!(lazy.join(zmoe::checkpoint::synth::RECIPE).is_file());
        assert!(!lazy.join("model.safetensors").exists() && !lazy.join("model.safetensors.index.json").exists());
        let (a, b) = (Checkpoint::open(&files).unwrap(), Checkpoint::open(&lazy).unwrap());
        let mut names: Vec<&str> = a.names().collect();
        names.sort();
        let mut gen_names: Vec<&str> = b.names().collect();
        gen_names.sort();
        assert_eq!(names, gen_names, "{family}/{preset}");
        for n in names {
            let (ta, tb) = (a.tensor(n).unwrap(), b.tensor(n).unwrap());
            assert_eq!((ta.dtype, &ta.shape), (tb.dtype, &tb.shape), "{family}/{preset} {n}");
            assert!(a.bytes(ta).as_slice() == b.bytes(tb).as_slice(), "{family}/{preset} {n}: bytes differ");
        }
        let logits = |m: &Path| {
            let run = zmoe(&["forward", "--model", s(m), "--tokens", "3,1,4,1,5", "--backend", "cpu", "--json"]);
            assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
            run.stdout
        };
        assert_eq!(logits(&files), logits(&lazy), "{family}/{preset}: forward differs");
    }

    let lazy = tmp.path().join("g0");
    let recipe = lazy.join(zmoe::checkpoint::synth::RECIPE);
    let good = std::fs::read_to_string(&recipe).unwrap();
    std::fs::write(&recipe, "{\"family\": \"qwen3_moe\"").unwrap();
    let e = zmoe_err(&["forward", "--model", s(&lazy), "--tokens", "1"]);
    assert!(e.contains("model.zmoe-synth.json") && e.contains("not valid JSON"), "{e}");
    std::fs::write(&recipe, good.replace("\"generator\": 1", "\"generator\": 0")).unwrap();
    let e = zmoe_err(&["forward", "--model", s(&lazy), "--tokens", "1"]);
    assert!(e.contains("model.zmoe-synth.json") && e.contains("weight generator version 0"), "{e}");
    std::fs::write(&recipe, good.replace("\"tiny\"", "\"huge\"")).unwrap();
    let e = zmoe_err(&["forward", "--model", s(&lazy), "--tokens", "1"]);
    assert!(e.contains("model.zmoe-synth.json") && e.contains("unknown family/preset"), "{e}");
    std::fs::write(&recipe, &good).unwrap();
    let cfg = lazy.join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("\"num_hidden_layers\": 4", "\"num_hidden_layers\": 3")).unwrap();
    let e = zmoe_err(&["forward", "--model", s(&lazy), "--tokens", "1"]);
    assert!(e.contains("config.json") && e.contains("differs from the config of the recipe"), "{e}");
}
