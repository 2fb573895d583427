//! Foundry GPU checks (run on a CUDA machine by `scripts/gpu_test.sh`; ignored in CI).
//!
//! A tiny real campaign per op through the CUDA runner: every template compiles with NVRTC,
//! and the production template `t0` (any knobs) passes the correctness check — against the
//! CPU reference on fresh random inputs with poisoned outputs, and bit for bit against the
//! production configuration where it is declared numerics-preserving. And the runtime side:
//! a kernel pack of numerics-preserving entries changes no bit of a patched plan's logits.

mod common;

use zmoe::Backend;
use zmoe::checkpoint::synth::SynthQuant;
use zmoe::cuda::{CudaBackend, Device};
use zmoe::foundry::Bucket;
use zmoe::foundry::attempts::{self, Status};
use zmoe::foundry::harness::{CudaRunner, Settings, run_campaign};
use zmoe::foundry::ops::{OpId, PRESETS};
use zmoe::foundry::pack::{Entry, Evidence, KernelPack, PACK_KIND, PACK_VERSION};
use zmoe::foundry::sample::{Mode, SampleSpec};
use zmoe::foundry::templates::{find, for_op};
use zmoe::plan::patterns::{Selection, patched_plan};

#[test]
#[ignore]
fn foundry_campaign_every_op_t0_correct() {
    let tmp = tempfile::tempdir().unwrap();
    let mut runner = CudaRunner::new().unwrap();
    let mut failures = Vec::new();
    for op in OpId::ALL {
        let ledger = tmp.path().join(format!("{}.ndjson", op.name()));
        let spec = SampleSpec {
            op,
            mode: Mode::Coverage,
            cases: 9,
            seed: 7,
            templates: for_op(op),
            presets: PRESETS.iter().collect(),
            max_tokens: 64,
            pinned: Default::default(),
        };
        run_campaign(&mut runner, &spec, &Settings { warmup: 2, repeats: 5 }, &ledger, &mut |l| println!("{l}"))
            .unwrap();
        let (atts, bad) = attempts::read(&ledger).unwrap();
        assert!(bad.is_empty());
        for t in for_op(op) {
            let mine: Vec<_> = atts.iter().filter(|a| a.template == t.name).collect();
            let ok = mine.iter().filter(|a| a.status() == Status::Ok).count();
            let bitexact = mine
                .iter()
                .filter(|a| a.correctness.as_ref().and_then(|c| c.bitexact_vs_baseline) == Some(true))
                .count();
            println!(
                "foundry gpu: {} {}: {ok}/{} ok, {bitexact} bit-exact to production",
                op.name(),
                t.name,
                mine.len()
            );
            for a in mine.iter().filter(|a| a.status() != Status::Ok) {
                let why = match a.status() {
                    Status::BuildError => a.build.error.clone().unwrap_or_default(),
                    Status::Incorrect => {
                        a.correctness.as_ref().and_then(|c| c.check.fail_reason.clone()).unwrap_or_default()
                    }
                    _ => a.bench.as_ref().and_then(|b| b.error.clone()).unwrap_or_default(),
                };
                let line = format!(
                    "{} {}{{{}}} on {}: {:?}: {}",
                    op.name(),
                    t.name,
                    zmoe::foundry::knobs::display(&a.knobs),
                    a.shape.describe(op),
                    a.status(),
                    why.lines().take(6).collect::<Vec<_>>().join(" | ")
                );
                println!("  FAIL {line}");
                // Every template must compile; t0 (the production algorithm) must also be correct.
                if a.status() == Status::BuildError || t.name.starts_with("t0_") {
                    failures.push(line);
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

fn entry(op: OpId, template: &str, knobs: &[(&str, i64)], bucket: Bucket) -> Entry {
    let t = find(op, template).unwrap();
    let k = zmoe::foundry::knobs::knobs(knobs);
    Entry {
        op: op.name().into(),
        bucket,
        template: template.into(),
        source_hash: t.render(&k).unwrap().hash,
        numerics: t.numerics(&k),
        knobs: k,
        evidence: Evidence {
            bucket_cases: 0,
            opponents: vec![],
            knob_cases: 0,
            knob_wins: 0,
            knob_median_ratio: 1.0,
            median_p50_us: 0.0,
        },
        fidelity: None,
    }
}

/// Prefill + greedy decode logits of `plan` on a fresh CUDA backend, and its name after.
fn run(model: &zmoe::Model, plan: zmoe::plan::Plan, tokens: &[u32]) -> (Vec<f32>, String) {
    let mut gpu = CudaBackend::new(model.config().clone(), &model.weights, plan, true).unwrap();
    let mut logits = gpu.forward(tokens, true).unwrap();
    let v = model.config().vocab_size;
    for _ in 0..8 {
        let last = &logits[logits.len() - v..];
        let next = (0..v).max_by(|&a, &b| last[a].total_cmp(&last[b]).then(b.cmp(&a))).unwrap() as u32;
        logits.extend(gpu.forward(&[next], false).unwrap());
    }
    (logits, gpu.name())
}

/// A pack of numerics-preserving entries (combine, router, residual norm at every bucket;
/// the grouped gate+up+SwiGLU at decode) replaces those steps in patched plans with
/// bit-identical logits, is named in the backend name, and never touches the reference plan.
#[test]
#[ignore]
fn pack_kernels_replace_patched_steps_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::synth_tiny(tmp.path(), "tiny4", SynthQuant::Affine4, 31);
    let model = zmoe::Model::load(&dir).unwrap();
    let arch = Device::open().unwrap().arch();
    let mut entries = Vec::new();
    for b in Bucket::ALL {
        entries.push(entry(OpId::MoeCombine, "t1_vec", &[("TPB", 64), ("VEC", 8), ("UNROLL", 2)], b));
        entries.push(entry(OpId::TopkGating, "t1_lane_regs", &[("WPB", 2), ("PER", 2)], b));
        entries.push(entry(OpId::RmsnormResidual, "t0_block", &[("TPB", 256)], b));
    }
    entries.push(entry(OpId::GatherQmmSwiglu, "t2_grouped", &[("RPB", 4), ("MT", 4)], Bucket::Small));
    let pack = KernelPack {
        kind: PACK_KIND.into(),
        version: PACK_VERSION,
        arch,
        gpu: "test".into(),
        created_utc: String::new(),
        zmoe_version: String::new(),
        git_commit: String::new(),
        source: "tests/foundry_gpu.rs".into(),
        alpha: 0.01,
        entries,
        refused: vec![],
        dropped: vec![],
    };
    let path = tmp.path().join("pack.json");
    std::fs::write(&path, serde_json::to_string(&pack).unwrap()).unwrap();
    let cfg = model.config();
    let v = cfg.vocab_size;
    let tokens: Vec<u32> = (0..40).map(|i| (i * 7919 + 13) % v as u32).collect();
    // moe_mlp excluded: Combine, RouterTopK and AddRmsNorm run as steps; default patterns:
    // the fused MoeGateUpSwiglu at decode.
    for (label, sel) in [
        ("exclude moe_mlp", Selection::parse(None, Some("moe_mlp")).unwrap()),
        ("defaults", Selection::parse(None, None).unwrap()),
    ] {
        let (plan, _) = patched_plan(cfg, &sel);
        // SAFETY: the GPU tests run one at a time (--test-threads 1); nothing reads the
        // environment concurrently.
        unsafe { std::env::set_var("ZMOE_KERNEL_PACK", "off") };
        let (want, name0) = run(&model, plan.clone(), &tokens);
        unsafe { std::env::set_var("ZMOE_KERNEL_PACK", &path) };
        let (got, name) = run(&model, plan, &tokens);
        let (_, ref_name) = run(&model, zmoe::plan::Plan::reference(cfg), &tokens);
        unsafe { std::env::remove_var("ZMOE_KERNEL_PACK") };
        println!("foundry gpu: pack ({label}): {name}");
        assert!(!name0.contains("foundry:") && !ref_name.contains("foundry:"), "{name0} / {ref_name}");
        let expect: &[&str] = if label == "defaults" {
            &["gather_qmm_swiglu/t2_grouped@"]
        } else {
            &["moe_combine/t1_vec@", "topk_gating/t1_lane_regs@", "rmsnorm_residual/t0_block@"]
        };
        for tag in expect {
            assert!(name.contains(tag), "{label}: {tag} not used: {name}");
        }
        let diff = want.iter().zip(&got).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        println!("foundry gpu: pack ({label}): {diff} of {} logits differ (bit-exact expected)", want.len());
        assert_eq!(diff, 0, "{label}");
    }
}
