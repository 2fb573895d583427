//! Numbers a user (or an attacker) controls: sizes in config.json, non-finite weights and
//! config values, sampling flags, the context limit, exit codes. Each must end in a clear
//! error naming the file, field or flag (exit 1), never an abort, a panic or silent garbage.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{copy_model, copy_with_tensors, s, zmoe};
use zmoe::checkpoint::synth::SynthQuant;

/// The tiny model this binary's tests share (read-only).
fn model() -> &'static Path {
    common::shared_tiny(SynthQuant::Bf16, 5)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs zmoe with the cache in `cache` (so matrix/demo never touch the user's cache).
fn zmoe_in(cache: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zmoe")).args(args).env("ZMOE_CACHE", cache).output().expect("run zmoe")
}

/// Expects exit status `code` and a clean one-line error (no panic, no abort); returns stderr.
fn expect_exit(out: &Output, code: i32, what: &str) -> String {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{what}: exit status {:?}\nstderr:\n{err}", out.status);
    assert!(!err.contains("panicked") && !err.contains("memory allocation"), "{what}:\n{err}");
    err
}

/// A copy of the model whose config.json was edited by `edit`.
fn with_config(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    copy_model(model(), tmp.path());
    let p = tmp.path().join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
    tmp
}

/// Every command that reads a config, on model folder `m`.
fn config_commands(m: &str, out: &str) -> Vec<Vec<String>> {
    let v = |a: &[&str]| a.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    vec![
        v(&["forward", "--model", m, "--tokens", "1,2", "--backend", "cpu"]),
        v(&["generate", "--model", m, "--prompt-tokens", "1,2", "--max-tokens", "2", "--backend", "cpu", "--json"]),
        v(&["patterns", "--model", m]),
        v(&["matrix", "catalog", "--model", m]),
        v(&["export", "gguf", "--model", m, "--quant", "q8_0", "--out", out]),
    ]
}

// ---- item 2: absurd sizes ----

#[test]
fn absurd_sizes_are_clear_errors_in_every_command() {
    let cache = tempfile::tempdir().unwrap();
    for (field, value) in [
        ("num_hidden_layers", serde_json::json!(1_000_000_000u64)),
        ("num_hidden_layers", serde_json::json!(1_000_000_000_000u64)),
        ("head_dim", serde_json::json!(1_000_000_000_000u64)),
        ("partial_rotary_factor", serde_json::json!(1e12)),
        ("vocab_size", serde_json::json!(1u64 << 40)),
        ("num_experts", serde_json::json!(1u64 << 33)),
    ] {
        let dir = with_config(|c| c[field] = value.clone());
        let gguf = dir.path().join("out.gguf");
        for args in config_commands(s(dir.path()), s(&gguf)) {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = zmoe_in(cache.path(), &args);
            let err = expect_exit(&out, 1, &format!("{field}={value} {args:?}"));
            assert!(err.contains("config.json") && err.contains(&format!("`{field}`")), "{field} {args:?}:\n{err}");
        }
        assert!(!gguf.exists(), "nothing written for a bad config");
    }
}

#[test]
fn config_layers_are_checked_against_the_checkpoint() {
    // Within bounds, but the checkpoint has 4 layers: say so by field, not by a missing tensor.
    let dir = with_config(|c| c["num_hidden_layers"] = 1000.into());
    let out = zmoe(&["forward", "--model", s(dir.path()), "--tokens", "1", "--backend", "cpu"]);
    let err = expect_exit(&out, 1, "1000 layers");
    assert!(err.contains("config.json") && err.contains("`num_hidden_layers`") && err.contains("0..=3"), "{err}");
}

// ---- item 3: non-finite numbers ----

/// The bf16 model with every weight of `tensor` set to NaN (bf16 0x7FC0).
fn nan_model(tensor: &str) -> tempfile::TempDir {
    copy_with_tensors(model(), |l| {
        let t = l.iter_mut().find(|t| t.0 == tensor).unwrap_or_else(|| panic!("no {tensor}"));
        assert_eq!(t.1, safetensors::Dtype::BF16);
        for c in t.3.chunks_exact_mut(2) {
            c.copy_from_slice(&0x7FC0u16.to_le_bytes());
        }
    })
}

#[test]
fn nan_weights_stop_forward_and_generate_naming_the_layer() {
    let dir = nan_model("model.layers.1.self_attn.o_proj.weight");
    let m = s(dir.path());
    let out = zmoe(&["forward", "--model", m, "--tokens", "1,2,3", "--backend", "cpu", "--json"]);
    let err = expect_exit(&out, 1, "forward");
    assert!(err.contains("non-finite") && err.contains("layer 1") && err.contains("linear o"), "{err}");
    assert!(!text(&out.stdout).contains("null"), "no logits printed");
    let out = zmoe(&["generate", "--model", m, "--prompt-tokens", "1,2", "--backend", "cpu", "--json"]);
    let err = expect_exit(&out, 1, "generate");
    assert!(err.contains("non-finite") && err.contains("position 1"), "{err}");
}

#[test]
fn validate_bench_and_matrix_fail_on_non_finite_output() {
    let dir = nan_model("model.norm.weight");
    let m = s(dir.path());
    let capsule = dir.path().join("validate.json");
    let out = zmoe(&[
        "validate",
        "--model",
        m,
        "--backend",
        "cpu",
        "--max-tokens",
        "4",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--prompt-len",
        "4",
        "--capsule",
        s(&capsule),
    ]);
    let err = expect_exit(&out, 3, "validate");
    let stdout = text(&out.stdout);
    assert!(stdout.contains("[FAIL]") && !stdout.contains("[PASS]") && stdout.contains("non-finite"), "{stdout}");
    assert!(err.contains("fidelity FAIL"), "{err}");
    // The capsule of such a run (no timed runs: NaN medians, written as null) reads back.
    let out = zmoe(&["report", s(&capsule)]);
    assert!(out.status.success() && text(&out.stdout).contains("non-finite"), "{}", text(&out.stderr));

    let out = zmoe(&[
        "bench",
        "--model",
        m,
        "--backend",
        "cpu",
        "--prompt-tokens",
        "4",
        "--gen-tokens",
        "2",
        "--runs",
        "1",
        "--warmup",
        "0",
    ]);
    let err = expect_exit(&out, 1, "bench");
    assert!(err.contains("non-finite"), "{err}");

    let tmp = tempfile::tempdir().unwrap();
    let ledger = tmp.path().join("m.jsonl");
    let args = [
        "matrix",
        "run",
        "--backend",
        "cpu",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--max-tokens",
        "4",
        "--prompt-len",
        "4",
        "--ledger",
        s(&ledger),
        "--model",
        m,
    ];
    let out = zmoe_in(tmp.path(), &args);
    let err = expect_exit(&out, 3, "matrix run");
    assert!(text(&out.stdout).contains("1 FAIL"), "{}\n{err}", text(&out.stdout));
    let (entries, _) = zmoe::matrix::Ledger::read(&ledger).unwrap();
    assert_eq!(entries.len(), 1, "the FAIL is recorded");
    assert_eq!(entries[0].fidelity.verdict, zmoe::matrix::Verdict::Fail);
}

#[test]
fn impossible_config_values_are_refused_at_load() {
    for (field, value, want) in [
        ("rope_theta", serde_json::json!(0.0), "rope_theta"),
        ("rope_theta", serde_json::json!(-10000.0), "rope_theta"),
        ("rms_norm_eps", serde_json::json!(-1e-6), "rms_norm_eps"),
        ("partial_rotary_factor", serde_json::json!(0.0), "partial_rotary_factor"),
    ] {
        let dir = with_config(|c| c[field] = value.clone());
        let out = zmoe(&["forward", "--model", s(dir.path()), "--tokens", "1", "--backend", "cpu"]);
        let err = expect_exit(&out, 1, &format!("{field}={value}"));
        assert!(err.contains("config.json") && err.contains(want), "{field}={value}:\n{err}");
    }
}

#[test]
fn non_finite_sampling_flags_are_refused() {
    let m = s(model());
    for (flag, v) in [("--temperature", "NaN"), ("--temperature", "inf"), ("--temperature", "-1"), ("--top-p", "NaN")] {
        let out = zmoe(&["generate", "--model", m, "--prompt-tokens", "1", "--backend", "cpu", flag, v]);
        let err = text(&out.stderr);
        assert!(!out.status.success() && err.contains(flag), "{flag} {v}:\n{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

// ---- item 4: the context limit ----

fn gen_json(m: &str, extra: &[&str]) -> (Output, serde_json::Value) {
    let mut args = vec!["generate", "--model", m, "--backend", "cpu", "--json"];
    args.extend_from_slice(extra);
    let out = zmoe(&args);
    let v = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out, v)
}

#[test]
fn generate_stops_at_the_context_limit_with_finish_reason_length() {
    let m = s(model());
    let (out, v) = gen_json(m, &["--prompt-tokens", "1,2,3", "--max-tokens", "20", "--ignore-eos", "--ctx", "8"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(v["tokens"].as_array().unwrap().len(), 5, "prompt 3 + 5 generated = the 8-token context");
    assert_eq!(v["finish_reason"], "length");
    assert!(text(&out.stderr).contains("context"), "{}", text(&out.stderr));

    // The model's own limit, without --ctx.
    let dir = with_config(|c| c["max_position_embeddings"] = 6.into());
    let (out, v) = gen_json(s(dir.path()), &["--prompt-tokens", "1,2", "--max-tokens", "20", "--ignore-eos"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(v["tokens"].as_array().unwrap().len(), 4);
    assert_eq!(v["finish_reason"], "length");

    // max_tokens reached: also `length`; an EOS: `stop`.
    let (out, v) = gen_json(m, &["--prompt-tokens", "1,2,3", "--max-tokens", "3", "--ignore-eos"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(v["finish_reason"], "length");
    let second = v["tokens"][1].as_u64().unwrap();
    let first = v["tokens"][0].as_u64().unwrap();
    if first != second {
        let dir = with_config(|c| c["eos_token_id"] = second.into());
        let (out, v) = gen_json(s(dir.path()), &["--prompt-tokens", "1,2,3", "--max-tokens", "10"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(v["tokens"].as_array().unwrap().len(), 2);
        assert_eq!(v["finish_reason"], "stop");
    }
}

#[test]
fn ctx_flag_is_checked() {
    let m = s(model());
    let out = zmoe(&["generate", "--model", m, "--prompt-tokens", "1", "--backend", "cpu", "--ctx", "100000"]);
    let err = expect_exit(&out, 1, "--ctx beyond the model");
    assert!(err.contains("--ctx") && err.contains("max_position_embeddings"), "{err}");
    let out = zmoe(&["generate", "--model", m, "--prompt-tokens", "1", "--backend", "cpu", "--ctx", "0"]);
    assert!(!out.status.success() && text(&out.stderr).contains("--ctx"), "{}", text(&out.stderr));
    let out = zmoe(&["forward", "--model", m, "--tokens", "1,2,3", "--backend", "cpu", "--ctx", "2"]);
    let err = expect_exit(&out, 1, "forward beyond --ctx");
    assert!(err.contains("--ctx") || err.contains("context"), "{err}");
    let out = zmoe(&["generate", "--model", m, "--prompt-tokens", "1,2,3", "--backend", "cpu", "--ctx", "3"]);
    let err = expect_exit(&out, 1, "prompt fills the context");
    assert!(err.contains("context"), "{err}");
}

// ---- item 6 (numbers): eos ids, exit codes, unused layers, negative flags ----

#[test]
fn eos_token_ids_out_of_u32_range_are_errors_naming_the_file() {
    for value in [serde_json::json!(4_294_967_296u64), serde_json::json!(-1), serde_json::json!([1, 5_000_000_000u64])]
    {
        let dir = with_config(|c| c["eos_token_id"] = value.clone());
        let out = zmoe(&["patterns", "--model", s(dir.path())]);
        let err = expect_exit(&out, 1, &format!("eos {value}"));
        assert!(err.contains("config.json") && err.contains("eos_token_id"), "{value}:\n{err}");
    }
    let tmp = tempfile::tempdir().unwrap();
    copy_model(model(), tmp.path());
    std::fs::write(tmp.path().join("generation_config.json"), r#"{"eos_token_id": [1023, -5]}"#).unwrap();
    let out = zmoe(&["forward", "--model", s(tmp.path()), "--tokens", "1", "--backend", "cpu"]);
    let err = expect_exit(&out, 1, "generation_config eos");
    assert!(err.contains("generation_config.json") && err.contains("eos_token_id"), "{err}");
}

#[test]
fn exit_codes_are_documented() {
    let out = zmoe(&["--help"]);
    let help = text(&out.stdout);
    assert!(help.contains("Exit status") && help.contains("3") && help.contains("fidelity"), "{help}");
}

#[test]
fn unused_checkpoint_layers_warn_once_and_mtp_layers_do_not() {
    let add_layer = |l: &mut Vec<common::RawTensor>, layer: usize| {
        let norm = l.iter().find(|t| t.0 == "model.norm.weight").unwrap().clone();
        l.push((format!("model.layers.{layer}.input_layernorm.weight"), norm.1, norm.2.clone(), norm.3.clone()));
        l.push((format!("model.layers.{layer}.post_attention_layernorm.weight"), norm.1, norm.2, norm.3));
    };
    let dir = copy_with_tensors(model(), |l| add_layer(l, 40));
    let out = zmoe(&["forward", "--model", s(dir.path()), "--tokens", "1", "--backend", "cpu"]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(err.matches("warning").count(), 1, "{err}");
    assert!(err.contains("model.layers.40") && err.contains("num_hidden_layers"), "{err}");

    // An MTP layer right after the decoder layers (num_nextn_predict_layers) is expected.
    let dir = copy_with_tensors(model(), |l| add_layer(l, 4));
    let p = dir.path().join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["num_nextn_predict_layers"] = 1.into();
    std::fs::write(&p, v.to_string()).unwrap();
    let out = zmoe(&["forward", "--model", s(dir.path()), "--tokens", "1", "--backend", "cpu"]);
    let err = text(&out.stderr);
    assert!(out.status.success() && !err.contains("warning"), "{err}");
}

#[test]
fn negative_numbers_say_what_is_accepted() {
    let m = s(model());
    for (args, flag) in [
        (vec!["generate", "--model", m, "--prompt-tokens", "1", "--seed", "-1"], "--seed"),
        (vec!["generate", "--model", m, "--prompt-tokens", "1", "--max-tokens", "-5"], "--max-tokens"),
        (vec!["bench", "--model", m, "--runs", "-1"], "--runs"),
        (vec!["validate", "--model", m, "--warmup", "-2"], "--warmup"),
    ] {
        let out = zmoe(&args);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(err.contains(flag) && err.contains("non-negative integer") && err.contains("-"), "{args:?}:\n{err}");
    }
}
