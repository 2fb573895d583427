//! Patched plans are bit-identical to the reference plan on the CPU (every pattern alone and
//! all together, prefill and decode, every storage format and golden fixture), and the
//! `patterns` / `validate` / `report` commands work end to end.

mod common;

use zmoe::checkpoint::synth::SynthQuant;
use zmoe::plan::Plan;
use zmoe::plan::patterns::Selection;
use zmoe::{BackendKind, Model};

/// Runs zmoe, asserts success, returns stdout.
fn ok(args: &[&str]) -> String {
    let out = common::zmoe(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?} failed: {err}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The one bit-identity test body (tests/common), on the CPU; tests/gpu.rs runs it on CUDA.
#[test]
fn patched_plans_are_bit_identical_on_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let mut dirs = common::golden_dirs(std::path::Path::new(env!("CARGO_MANIFEST_DIR")));
    for (i, q) in [SynthQuant::Affine4, SynthQuant::Affine8, SynthQuant::Bf16].into_iter().enumerate() {
        dirs.push(common::synth_tiny(tmp.path(), &format!("t{i}"), q, 70 + i as u64));
    }
    dirs.push(common::synth_preset(tmp.path(), "k4", "deepseek_v3/kimi-k2-tiny", SynthQuant::Affine4, 74));
    dirs.push(common::synth_preset(tmp.path(), "go", "gpt_oss/gpt-oss-tiny", SynthQuant::Mxfp4, 75));
    common::assert_patterns_bitexact(BackendKind::Cpu, &dirs, 11, 6);
}

#[test]
fn patterns_command_explains_the_plan() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::synth_tiny(tmp.path(), "m", SynthQuant::Affine4, 3);
    let out = ok(&["patterns", "--model", dir.to_str().unwrap()]);
    assert!(out.contains("moe_mlp        on (family default)"), "{out}");
    assert!(out.contains("not in layers 0: dense MLP layer (no router)"), "{out}");
    let out = ok(&["patterns", "--model", dir.to_str().unwrap(), "--patterns", "moe_mlp"]);
    assert!(out.contains("residual_norm  off (not requested)"), "{out}");
    let err = common::zmoe_err(&["patterns", "--model", dir.to_str().unwrap(), "--exclude", "turbo"]);
    assert!(err.contains("unknown pattern `turbo`"), "{err}");
    let err = common::zmoe_err(&["patterns", "--model", tmp.path().join("nope").to_str().unwrap()]);
    assert!(err.contains("nope"), "{err}");
}

#[test]
fn validate_passes_on_cpu_and_writes_a_capsule() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::synth_tiny(tmp.path(), "m", SynthQuant::Affine4, 4);
    let capsule = tmp.path().join("v.json");
    let d = dir.to_str().unwrap();
    let c = capsule.to_str().unwrap();
    let args = ["validate", "--model", d, "--backend", "cpu", "--max-tokens", "12", "--runs", "2", "--capsule", c];
    let out = ok(&args);
    assert!(out.contains("FIDELITY: 12/12 tokens identical [PASS]"), "{out}");
    assert!(out.contains("decode speedup"), "{out}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&capsule).unwrap()).unwrap();
    assert_eq!(v["kind"], "zmoe-validate");
    assert_eq!(v["fidelity"]["verdict"], "PASS");
    assert_eq!(v["reference"]["runs"].as_array().unwrap().len(), 2);
    assert_eq!(v["reference"]["tokens"], v["patched"]["tokens"]);
    assert_eq!(v["patched"]["plan"], "moe_mlp+swiglu_mlp+qkv_proj+qk_norm_rope+residual_norm");
    // The capsule is not overwritten without --force; report prints it.
    let err = common::zmoe_err(&args);
    assert!(err.contains("file exists"), "{err}");
    let rep = ok(&["report", c]);
    assert!(rep.contains("FIDELITY: 12/12 tokens identical [PASS]") && rep.contains("reference"), "{rep}");
    // Nothing to compare: an explicit empty selection.
    let err = common::zmoe_err(&["validate", "--model", d, "--backend", "cpu", "--patterns", "none"]);
    assert!(err.contains("no pattern applies"), "{err}");
    let bad = tmp.path().join("bad.json");
    std::fs::write(&bad, "{\"kind\": \"other\"}").unwrap();
    let err = common::zmoe_err(&["report", bad.to_str().unwrap()]);
    assert!(err.contains("unknown capsule kind"), "{err}");
}

#[test]
fn selection_none_is_the_reference_plan() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::synth_tiny(tmp.path(), "m", SynthQuant::Affine4, 6);
    let model = Model::load(&dir).unwrap();
    let (plan, _) = zmoe::plan::patterns::patched_plan(model.config(), &Selection::none());
    assert_eq!(plan, Plan::reference(model.config()));
}

/// The CUDA backend's plans are the chosen plan rewritten once, visibly: decode runs it as
/// written, batches run the decode-only fused steps as their parts, prompt chunks on tensor
/// cores also the fused projections (so the reference and patched plans share the tensor-core
/// products), pack
/// kernels wrap the steps they replace (never in the reference plan), and a plan for
/// another model is refused up front by `Plan::check`.
#[test]
fn cuda_exec_plans_are_the_chosen_plan_rewritten_once() {
    use zmoe::kernels::{Bucket, ops::OpId};
    use zmoe::plan::Step;
    use zmoe::plan::lower::{self, PackKernel};
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::synth_tiny(tmp.path(), "t", SynthQuant::Affine4, 91);
    let model = Model::load(&dir).unwrap();
    let (plan, _) = zmoe::plan::patterns::patched_plan(model.config(), &Selection::default());
    let exec = lower::cuda(&plan, &model.weights, &[]).unwrap();
    assert_eq!(exec.decode, plan);
    assert_eq!(exec.prefill.primitives_only().steps, plan.primitives_only().steps);
    assert_eq!(exec.batch.primitives_only().steps, plan.primitives_only().steps);
    use zmoe::plan::Fusion;
    let has = |p: &Plan, f: Fusion| p.steps.iter().any(|s| matches!(s, Step::Fused { op, .. } if *op == f));
    for p in [&exec.prefill, &exec.batch] {
        assert!(!has(p, Fusion::MoeRouter) && !has(p, Fusion::MoeDownCombineAdd));
        assert!(has(p, Fusion::AddRmsNorm), "elementwise fusions serve every chunk");
    }
    assert!(has(&exec.batch, Fusion::InProj), "batches keep multi-token fusions");
    assert!(has(&exec.prefill, Fusion::InProj), "tensor-core chunks run the in-projection's tiles in one launch");
    // norm_qkv serves decode; other chunks run the norm and qkv_proj's fused step.
    let sel = Selection::parse(Some("norm_qkv,qkv_proj,moe_mlp"), None).unwrap();
    let (nplan, _) = zmoe::plan::patterns::patched_plan(model.config(), &sel);
    let nexec = lower::cuda(&nplan, &model.weights, &[]).unwrap();
    let sel = Selection::parse(Some("qkv_proj,moe_mlp"), None).unwrap();
    let without =
        lower::cuda(&zmoe::plan::patterns::patched_plan(model.config(), &sel).0, &model.weights, &[]).unwrap();
    assert!(has(&nexec.decode, Fusion::NormInProj) && !has(&nexec.decode, Fusion::InProj));
    for (p, q) in [(&nexec.prefill, &without.prefill), (&nexec.batch, &without.batch)] {
        assert!(!has(p, Fusion::NormInProj) && has(p, Fusion::InProj), "norm_qkv lowers to norm + qkv_proj");
        assert_eq!(p.steps, q.steps, "outside decode, norm_qkv runs as qkv_proj's plan does");
    }
    assert_eq!(nexec.prefill.primitives_only().steps, nplan.primitives_only().steps);

    let packs = [
        PackKernel { op: OpId::MoeCombine, bucket: Bucket::Small, tag: "moe_combine/t@1".into() },
        PackKernel { op: OpId::TopkGating, bucket: Bucket::Large, tag: "topk_gating/t@2".into() },
    ];
    let exec = lower::cuda(&plan, &model.weights, &packs).unwrap();
    let packed = |p: &Plan| p.steps.iter().filter(|s| matches!(s, Step::Packed { .. })).count();
    let moe_layers = (0..model.config().num_layers).filter(|&l| model.config().is_moe_layer(l)).count();
    // Prefill: every combine and router top-k of a MoE layer is packed; decode: the fused
    // MoE steps have no pack op and the large bucket never serves one token.
    assert_eq!(packed(&exec.prefill), 2 * moe_layers);
    assert_eq!(packed(&exec.decode), 0);
    assert_eq!(exec.prefill.primitives_only().steps, plan.primitives_only().steps, "a pack keeps the meaning");
    assert!(exec.prefill.listing().contains("[pack: moe_combine/t@1 at 1..8]"));
    let reference = Plan::reference(model.config());
    assert_eq!(packed(&lower::cuda(&reference, &model.weights, &packs).unwrap().prefill), 0);

    let glm = common::synth_preset(tmp.path(), "g", "glm4_moe_lite/glm-tiny", SynthQuant::Affine4, 92);
    let glm_plan = Plan::reference(Model::load(&glm).unwrap().config());
    let err = lower::cuda(&glm_plan, &model.weights, &[]).unwrap_err().to_string();
    assert!(err.contains("step") && err.contains("does not have"), "{err}");
    let err = model.backend(BackendKind::Cpu, glm_plan).err().expect("refused").to_string();
    assert!(err.contains("does not have"), "{err}");
}

/// `zmoe patterns --exec --pack` prints the plans that run with a kernel pack. The committed
/// pack (bench/foundry/pack-sm_90.json) matches the current
/// kernel sources: its entries are substituted and printed. The same pack with a stale source
/// hash (a pack measured on older kernels) is refused entry by entry, loudly.
#[test]
fn patterns_exec_prints_the_plans_that_run_with_the_pack() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::synth_tiny(tmp.path(), "t", SynthQuant::Affine4, 93);
    let committed = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/foundry/pack-sm_90.json");
    let args = |pack: &std::path::Path| {
        ["patterns", "--model", dir.to_str().unwrap(), "--exec", "--pack", pack.to_str().unwrap()].map(String::from)
    };
    let run = common::zmoe(&args(&committed).each_ref().map(String::as_str));
    let (out, err) = (String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success() && !err.contains("mismatch"), "{err}");
    assert!(out.contains("CUDA prefill plan") && out.contains("CUDA decode plan"), "{out}");
    assert!(out.contains("combine (layer 1) [pack: moe_combine/t0_basic@"), "{out}");
    // Decode runs the fused MoE kernels: only a gather_qmm_swiglu entry at 1..8 (if the pack
    // has one) replaces one of them.
    let decode = &out[out.find("CUDA decode plan").unwrap()..];
    let mut pack: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&committed).unwrap()).unwrap();
    let decode_entry = pack["entries"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["op"] == "gather_qmm_swiglu" && e["bucket"].as_str().unwrap_or("").starts_with("1.."));
    let gate_up = decode.lines().find(|l| l.contains("moe_gate_up_swiglu (fused: expert_gate_up (layer 1)")).unwrap();
    assert_eq!(gate_up.contains("[pack: gather_qmm_swiglu/"), decode_entry, "{decode}");
    let router = decode.lines().find(|l| l.contains("moe_router (fused: linear Router(1)")).expect("fused router");
    assert!(!router.contains("[pack"), "{router}");

    for e in pack["entries"].as_array_mut().unwrap() {
        e["source_hash"] = "0123456789abcdef".into();
    }
    let stale = tmp.path().join("stale.json");
    std::fs::write(&stale, pack.to_string()).unwrap();
    let run = common::zmoe(&args(&stale).each_ref().map(String::as_str));
    let (out, err) = (String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success() && !out.contains("[pack"), "{out}");
    assert!(err.contains("source hash mismatch") && err.contains("re-run it"), "{err}");
}
