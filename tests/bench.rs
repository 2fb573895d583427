//! `zmoe bench` end to end on the CPU backend: the table, the JSON capsule, and the
//! refusal to overwrite a capsule.

mod common;

use common::{zmoe, zmoe_err};
use zmoe::bench::BenchReport;
use zmoe::checkpoint::synth::SynthQuant;

/// (folder name, family/preset) of one tiny preset per family, for the per-step accounting tests.
const ONE_PRESET_PER_FAMILY: [(&str, &str); 4] = [
    ("q", "qwen3_moe/tiny"),
    ("g", "glm4_moe_lite/glm-tiny"),
    ("l", "lfm2_moe/lfm2-tiny"),
    ("o", "gpt_oss/gpt-oss-tiny"),
];

fn s(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn bench_writes_a_capsule_and_never_overwrites_one() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::synth_tiny(tmp.path(), "tiny", SynthQuant::Affine4, 5);
    let capsule = tmp.path().join("bench.json");
    let args = |json: &std::path::Path| {
        vec![
            "bench".to_string(),
            "--model".into(),
            s(&model).into(),
            "--backend".into(),
            "cpu".into(),
            "--prompt-tokens".into(),
            "16".into(),
            "--gen-tokens".into(),
            "8".into(),
            "--runs".into(),
            "2".into(),
            "--json".into(),
            s(json).into(),
        ]
    };
    let a = args(&capsule);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let out = zmoe(&a);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let table = String::from_utf8_lossy(&out.stdout);
    for row in ["device", "prefill", "decode", "peak memory", "bytes/token", "copy", "achieved", "roofline"] {
        assert!(table.lines().any(|l| l.starts_with(row)), "no `{row}` row in:\n{table}");
    }

    // The capsule: raw JSON and the typed report agree.
    let text = std::fs::read_to_string(&capsule).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["kind"], "zmoe-bench");
    assert_eq!(v["runs"].as_array().unwrap().len(), 2);
    let r: BenchReport = serde_json::from_str(&text).unwrap();
    assert_eq!((r.settings.prompt_tokens, r.settings.gen_tokens, r.settings.runs), (16, 8, 2));
    assert_eq!(r.model.family, "qwen3_moe");
    assert_eq!(r.model.quant["experts"], "affine4g64");
    assert!(r.backend.starts_with("cpu"), "{}", r.backend);
    assert!(!r.device.name.is_empty());
    let p = &r.provenance;
    assert!(!p.git_commit.is_empty());
    assert!(p.timestamp_utc.ends_with('Z') && p.timestamp_utc.len() == 20, "{}", p.timestamp_utc);
    assert!(p.command.contains("bench") && p.command.contains("--gen-tokens 8"), "{}", p.command);
    assert!(r.identical_tokens, "greedy runs must generate the same tokens");
    let pos = |x: f64| x.is_finite() && x > 0.0;
    for run in &r.runs {
        assert_eq!(run.decode_tokens, 7);
        assert!(pos(run.prefill_tok_s) && pos(run.decode_tok_s) && pos(run.prefill_secs) && pos(run.decode_secs));
        assert!((run.prefill_tok_s - 16.0 / run.prefill_secs).abs() <= 1e-6 * run.prefill_tok_s);
        assert!((run.decode_tok_s - 7.0 / run.decode_secs).abs() <= 1e-6 * run.decode_tok_s);
    }
    // Two runs: the median is their mean, between min and max.
    let mean = |f: fn(&zmoe::bench::RunResult) -> f64| (f(&r.runs[0]) + f(&r.runs[1])) / 2.0;
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(b.abs());
    assert!(close(r.prefill_tok_s.median, mean(|x| x.prefill_tok_s)));
    assert!(close(r.decode_tok_s.median, mean(|x| x.decode_tok_s)));
    assert!(r.decode_tok_s.min <= r.decode_tok_s.median && r.decode_tok_s.median <= r.decode_tok_s.max);
    assert!(r.prefill_tok_s.min <= r.prefill_tok_s.median && r.prefill_tok_s.median <= r.prefill_tok_s.max);
    // Time to first token: the runs' prompt forward + first sample, in ms.
    assert!(close(r.ttft_ms.median, mean(|x| x.prefill_secs) * 1e3));
    assert!(r.ttft_ms.min <= r.ttft_ms.median && r.ttft_ms.median <= r.ttft_ms.max);
    // Roofline arithmetic.
    assert!(r.bytes_per_token > 0);
    assert!(pos(r.copy_gb_s) && pos(r.achieved_gb_s) && pos(r.roofline_pct) && pos(r.roofline_tok_s));
    assert!(close(r.achieved_gb_s, r.bytes_per_token as f64 * r.decode_tok_s.median / 1e9));
    assert!(close(r.roofline_pct, r.achieved_gb_s / r.copy_gb_s * 100.0));
    assert!(close(r.roofline_tok_s, r.copy_gb_s * 1e9 / r.bytes_per_token as f64));

    // A second run to the same path is refused before benchmarking, and the file is untouched.
    let err = zmoe_err(&a);
    assert!(err.contains("exists") && err.contains("--force"), "{err}");
    assert_eq!(std::fs::read_to_string(&capsule).unwrap(), text);

    // --force replaces it.
    let mut forced = a.clone();
    let at = forced.iter().position(|&x| x == "--runs").unwrap();
    forced[at + 1] = "1";
    forced.push("--force");
    let out = zmoe(&forced);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r2: BenchReport = serde_json::from_str(&std::fs::read_to_string(&capsule).unwrap()).unwrap();
    assert_eq!(r2.runs.len(), 1);
}

#[test]
fn bench_rejects_bad_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::synth_tiny(tmp.path(), "tiny", SynthQuant::Bf16, 1);
    let base = ["bench", "--model", s(&model), "--backend", "cpu"];
    let bad = |extra: &[&str], want: &str| {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        let err = zmoe_err(&a);
        assert!(err.contains(want), "{extra:?}: expected `{want}` in:\n{err}");
    };
    bad(&["--runs", "0"], "--runs must be at least 1");
    bad(&["--gen-tokens", "1"], "--gen-tokens must be at least 2");
    bad(&["--prompt-tokens", "0"], "--prompt-tokens must be at least 1");
    bad(&["--prompt-tokens", "40000", "--gen-tokens", "961"], "max_position_embeddings 40960");
    bad(&["--runs=-1"], "invalid value '-1' for '--runs");
    let missing = tmp.path().join("no-such-dir").join("x.json");
    bad(&["--json", s(&missing)], "does not exist");
    bad(&["--json", s(tmp.path())], "is a folder");
    assert!(!missing.exists());
}

#[test]
fn bench_names_a_missing_model_folder() {
    let err = zmoe_err(&["bench", "--model", "/no/such/zmoe-model", "--backend", "cpu"]);
    assert!(err.contains("model folder does not exist"), "{err}");
}

#[test]
fn profile_needs_cuda_and_says_so_before_running() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::synth_tiny(tmp.path(), "tiny", SynthQuant::Affine4, 6);
    let err = zmoe_err(&["bench", "--model", s(&model), "--backend", "cpu", "--profile", "--runs", "1"]);
    assert!(err.contains("--profile") && err.contains("CUDA graph"), "{err}");
    assert!(!err.contains("run 1/1"), "the runs must not happen first: {err}");
}

/// The profile's per-step bytes add up to the bench's bytes per token: at context 0 every
/// byte a decode step reads is a weight, and `step_bytes` over the decode plan (reference or
/// patched, whose fused steps read what their parts read) counts each weight once — for Qwen3
/// (GQA, softmax router, a dense layer), GLM (MLA, sigmoid router with a correction bias,
/// shared experts), LFM2 (short-conv layers beside attention, the expert-bias router) and
/// GPT-OSS (sinks, expert biases). At context `c` (below the sliding window) attention adds
/// exactly its cache.
#[test]
fn profile_step_bytes_add_up_to_the_bytes_per_token() {
    use zmoe::plan::patterns::{Selection, patched_plan};
    use zmoe::plan::{AttnOp, Plan, Step, lower};
    let tmp = tempfile::tempdir().unwrap();
    for (name, preset) in ONE_PRESET_PER_FAMILY {
        let dir = common::synth_preset(tmp.path(), name, preset, SynthQuant::Affine4, 31);
        let model = zmoe::Model::load(&dir).unwrap();
        let cfg = model.config();
        let want = model.weights.bytes_per_token(cfg);
        for plan in [Plan::reference(cfg), patched_plan(cfg, &Selection::default()).0] {
            let exec = lower::cuda(&plan, &model.weights, &[]).unwrap();
            let sum = |ctx| -> usize {
                exec.decode.steps.iter().map(|s| zmoe::bench::step_bytes(s, &model.weights, cfg, ctx)).sum()
            };
            assert_eq!(sum(0), want, "{preset} {}", plan.name);
            let cache_row = match &cfg.mla {
                Some(m) => 2 * m.cache_row(),
                None => 2 * cfg.num_kv_heads * (cfg.head_dim + cfg.v_head_dim),
            };
            // Layers with a KV or latent cache (LFM2's conv layers keep only a conv state).
            let attending = (0..cfg.num_layers)
                .filter(|&l| {
                    exec.decode.steps.iter().flat_map(|s| s.primitives()).any(|p| {
                        matches!(p, Step::Attn { layer, op: AttnOp::Attention | AttnOp::MlaAttention | AttnOp::SinkAttention } if layer == l)
                    })
                })
                .count();
            assert!(attending > 0 && attending <= cfg.num_layers);
            assert_eq!(sum(5) - sum(0), 5 * attending * cache_row, "{preset} {}", plan.name);
        }
    }
}

/// The prompt-chunk profile's operation counts (`step_flops`): a projection is 2·m·rows·cols,
/// the selected experts' gate and up 2·m·top_k·2·I·H, causal attention 2·m·heads·keys·(d_qk +
/// d_v) with keys the average causal count; fused steps count their parts, so the reference
/// and patched plans — and their prefill and batch lowerings — do the same work for m rows.
#[test]
fn prefill_step_flops_count_the_products() {
    use zmoe::bench::{plan_flops, step_flops};
    use zmoe::plan::patterns::{Selection, patched_plan};
    use zmoe::plan::{AttnOp, LinRef, MoeOp, Plan, Step, lower};
    let tmp = tempfile::tempdir().unwrap();
    let m = 37;
    for (name, preset) in ONE_PRESET_PER_FAMILY {
        let dir = common::synth_preset(tmp.path(), name, preset, SynthQuant::Affine4, 32);
        let model = zmoe::Model::load(&dir).unwrap();
        let (cfg, w) = (model.config(), &model.weights);
        let total = |steps: &[Step]| -> f64 { plan_flops(steps, w, cfg, m).iter().sum() };
        let mut totals = Vec::new();
        for plan in [Plan::reference(cfg), patched_plan(cfg, &Selection::default()).0] {
            let exec = lower::cuda(&plan, w, &[]).unwrap();
            totals.extend([total(&plan.steps), total(&exec.prefill.steps), total(&exec.batch.steps)]);
        }
        assert!(totals.iter().all(|t| (t - totals[0]).abs() <= 1e-9 * totals[0]), "{preset}: {totals:?}");
        // One step of each kind by hand.
        let reference = Plan::reference(cfg);
        for s in &reference.steps {
            let got = step_flops(s, w, cfg, m, 0);
            let mf = m as f64;
            let want = match s {
                Step::Linear { w: r @ LinRef::Q(_), .. } => {
                    let l = w.linear(*r).unwrap();
                    2.0 * mf * (l.w.rows * l.w.cols) as f64
                }
                Step::Moe { layer, op: MoeOp::ExpertGateUp } => {
                    let e = w.experts(*layer).unwrap();
                    2.0 * mf * cfg.top_k as f64 * 2.0 * (e.gate[0].rows * e.gate[0].cols) as f64
                }
                Step::Attn { op: AttnOp::Attention, .. } => {
                    2.0 * mf * cfg.num_heads as f64 * m.div_ceil(2) as f64 * (cfg.head_dim + cfg.v_head_dim) as f64
                }
                _ => continue,
            };
            assert_eq!(got, want, "{preset}: {}", s.kind());
        }
        assert!(totals[0] > 0.0);
    }
}

/// The peer script's table maker (`bench/peers/llama_cpp/table.py`, python3 stdlib) on a
/// real zmoe capsule and a llama-bench JSON: the markdown ratios and the `--json` record
/// committed under bench/peers/results/ agree with the inputs.
#[test]
fn peer_table_writes_the_comparison_as_json() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::synth_tiny(tmp.path(), "tiny", SynthQuant::Affine4, 6);
    let capsule = tmp.path().join("zmoe.json");
    let out = zmoe(&[
        "bench",
        "--model",
        s(&model),
        "--backend",
        "cpu",
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "4",
        "--runs",
        "1",
        "--json",
        s(&capsule),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: BenchReport = serde_json::from_str(&std::fs::read_to_string(&capsule).unwrap()).unwrap();
    // llama-bench -o json: pp512 and tg128 with flash attention on, depth 0 and 512; the
    // first sample of each is dropped, so the rates are exactly 2000/200 and 1000/100.
    let entry = |n_prompt: u32, n_gen: u32, depth: u32, samples: [f64; 3]| {
        serde_json::json!({"build_commit": "abc1234", "model_type": "qwen3moe 30B.A3B Q4_0",
            "model_size": 1_000_000_000u64, "model_n_params": 2_000_000_000u64, "n_gpu_layers": 99,
            "flash_attn": 1, "n_prompt": n_prompt, "n_gen": n_gen, "n_depth": depth,
            "samples_ts": samples, "avg_ts": samples[0], "gpu_info": "NVIDIA H200"})
    };
    let llama = serde_json::json!([
        entry(512, 0, 0, [1.0, 2000.0, 2000.0]),
        entry(0, 128, 0, [1.0, 200.0, 200.0]),
        entry(512, 0, 512, [1.0, 1000.0, 1000.0]),
        entry(0, 128, 512, [1.0, 100.0, 100.0]),
    ]);
    let llama_path = tmp.path().join("llama-q4_0.json");
    std::fs::write(&llama_path, llama.to_string()).unwrap();
    let env = tmp.path().join("env.txt");
    std::fs::write(
        &env,
        "date: 2026-12-07T00:00:00Z\ngpu: NVIDIA H200, 580.1, 143771 MiB\nzmoe: zmoe 0.1.0 (scratch/gpu/zmoe, built at commit 4a13f7b)\nfamily: qwen3_moe  preset: tiny\nzmoe env: ZMOE_TC=0 ZMOE_PDL=1 \n",
    )
    .unwrap();
    let json = tmp.path().join("peer.json");
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new("python3")
        .arg(repo.join("bench/peers/llama_cpp/table.py"))
        .args(["--zmoe", s(&capsule), "--llama", s(&llama_path), "--env", s(&env), "--json", s(&json)])
        .output()
        .expect("python3");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("| llama.cpp | Q4_0 | 4.00 | on | 512 |"), "{table}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["kind"], "zmoe-peer-run");
    assert_eq!(v["family"], "qwen3_moe", "the family, not the whole env line");
    assert_eq!((v["gpu"].as_str(), v["driver"].as_str()), (Some("NVIDIA H200"), Some("580.1")));
    assert_eq!(v["zmoe"]["commit"], "4a13f7b");
    assert_eq!(v["zmoe"]["env"], serde_json::json!({"ZMOE_TC": "0", "ZMOE_PDL": "1"}), "the switches of the run");
    assert_eq!(v["llama_cpp"]["commit"], "abc1234");
    let (zp, zd) = (r.prefill_tok_s.median, r.decode_tok_s.median);
    assert_eq!(v["zmoe"]["decode_tok_s"].as_f64(), Some(zd));
    let runs = v["llama_cpp"]["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for (run, depth, pp, tg) in [(&runs[0], 0, 2000.0, 200.0), (&runs[1], 512, 1000.0, 100.0)] {
        assert_eq!((run["quant"].as_str(), run["flash_attn"].as_str()), (Some("q4_0"), Some("on")));
        assert_eq!(run["depth"].as_u64(), Some(depth));
        assert_eq!((run["prefill_tok_s"].as_f64(), run["decode_tok_s"].as_f64()), (Some(pp), Some(tg)));
        assert!((run["prefill_ratio"].as_f64().unwrap() - zp / pp).abs() < 1e-12);
        assert!((run["decode_ratio"].as_f64().unwrap() - zd / tg).abs() < 1e-12);
    }
}

/// `scripts/ncu_steps.py` (python3 stdlib) on an Nsight Compute CSV mixed with the program's
/// own output: kernel time per forward pass (passes = `embed` launches), per kernel name, and
/// the time between kernels against a bench capsule's graph step. A CSV without `embed` is a
/// clear error.
#[test]
fn ncu_steps_sums_kernel_time_per_pass() {
    let tmp = tempfile::tempdir().unwrap();
    let head = r#""ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value""#;
    let row = |id: u32, name: &str, ns: &str| {
        format!(
            r#""{id}","1","zmoe","h","{name}","1","7","(128, 1, 1)","(16, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","ns","{ns}""#
        )
    };
    // Two passes: embed 2.0 + 3.0 µs, moe_router 5.5 + 4.5 µs (one value with a thousands
    // separator), attention 7 µs twice: 2.5 + 5 + 7 = 14.5 µs per pass.
    let csv = [
        "bench: warm-up 1/1 ...".to_string(),
        head.to_string(),
        row(0, "embed", "2,000"),
        row(1, "moe_router(MoeRouterArgs)", "5500"),
        row(2, "attention", "7000"),
        row(3, "embed", "3000"),
        row(4, "moe_router(MoeRouterArgs)", "4500"),
        row(5, "attention", "7000"),
        "decode 123.4 tok/s".to_string(),
    ]
    .join("\n");
    let csv_path = tmp.path().join("ncu.csv");
    std::fs::write(&csv_path, csv).unwrap();
    // A graph step of 20 µs (50,000 tok/s): 5.5 µs between kernels, 3 kernels a pass.
    let bench = tmp.path().join("graph.json");
    std::fs::write(&bench, r#"{"decode_tok_s": {"median": 50000.0}}"#).unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ncu_steps.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .args([s(&csv_path), "--bench", s(&bench)])
        .output()
        .expect("python3");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("2 forward passes, 3 kernels per pass"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("moe_router ") && l.contains(" 5.0 ")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("kernels ") && l.contains(" 14.5")), "{text}");
    assert!(text.contains("between kernels 5.5 µs (27.5 %, 1.83 µs per kernel)"), "{text}");
    // No embed launches: not a zmoe run.
    std::fs::write(&csv_path, [head.to_string(), row(0, "attention", "7000")].join("\n")).unwrap();
    let out = std::process::Command::new("python3").arg(&script).arg(s(&csv_path)).output().expect("python3");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no `embed` launches"));
}
