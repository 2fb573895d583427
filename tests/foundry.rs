//! `zmoe foundry` end to end on the mock backend (CI has no GPU): run → report → compare →
//! promote through the binary, and the runtime's pack lookup on what promote wrote.
//!
//! The mock's timing model (zmoe::foundry::harness::MockRunner::factor) makes, for
//! moe_combine: t1_vec faster at 1..8 tokens (most with VEC=8), t3_dual_acc (numerics-
//! changing) faster at 9..32, t2_row_tile faster at 33..256, and every other pair a tie up to
//! noise. These tests check that the statistics find exactly that, and nothing else.

mod common;

use std::path::Path;

use common::{zmoe, zmoe_err};
use zmoe::foundry::Bucket;
use zmoe::foundry::ops::OpId;
use zmoe::foundry::pack::KernelPack;

fn ok(args: &[&str]) -> (String, String) {
    let out = zmoe(args);
    let (so, se) =
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(out.status.success(), "zmoe {args:?} failed:\n{se}\n{so}");
    (so, se)
}

fn run_mock(dir: &Path, extra: &[&str]) -> (String, String) {
    let d = dir.to_str().unwrap();
    let mut args = vec!["foundry", "run", "--op", "moe_combine", "--backend", "mock", "--out", d, "--warmup", "1"];
    args.extend_from_slice(&["--repeats", "9"]);
    args.extend_from_slice(extra);
    ok(&args)
}

/// The line of the bucket table for `bucket`.
fn bucket_line<'a>(report: &'a str, bucket: &str) -> &'a str {
    let start = report.find("winners per token bucket").expect("bucket table");
    report[start..].lines().find(|l| l.starts_with(bucket)).unwrap_or_else(|| panic!("no {bucket} row in\n{report}"))
}

#[test]
fn campaign_report_compare_and_promote_find_the_modelled_winners() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("camp");
    let d = dir.to_str().unwrap();
    let (so, se) = run_mock(&dir, &["--cases", "120", "--seed", "3"]);
    assert!(so.starts_with("wrote 480 attempts to "), "{so}");
    assert!(so.contains("build errors") && so.contains("ok"), "{so}");
    assert!(se.contains("case 120/120 "), "{se}");
    assert!(!se.contains("appending"), "a new ledger is not an append: {se}");

    let (report, _) = ok(&["foundry", "report", d]);
    assert!(report.starts_with("moe_combine on mock"), "{report}");
    for t in ["t0_basic", "t1_vec", "t2_row_tile", "t3_dual_acc"] {
        assert!(report.contains(t), "{t} missing");
    }
    assert!(bucket_line(&report, "1..8").contains("t1_vec (p ≤"), "{report}");
    assert!(bucket_line(&report, "9..32").contains("t3_dual_acc (p ≤"), "{report}");
    assert!(bucket_line(&report, "33..256").contains("t2_row_tile (p ≤"), "{report}");
    let svg = std::fs::read_to_string(dir.join("latency-moe_combine-mock.svg")).unwrap();
    assert!(svg.contains("<polyline") && svg.contains("t2_row_tile") && svg.trim_end().ends_with("</svg>"));
    // A report regenerates its own plot, but never replaces someone else's file.
    ok(&["foundry", "report", d]);
    std::fs::write(dir.join("latency-moe_combine-mock.svg"), "mine").unwrap();
    let (_, se) = ok(&["foundry", "report", d]);
    assert!(se.contains("not replacing"), "{se}");
    assert_eq!(std::fs::read_to_string(dir.join("latency-moe_combine-mock.svg")).unwrap(), "mine");

    let (cmp, _) = ok(&["foundry", "compare", d, "--templates", "t0_basic,t1_vec"]);
    for section in
        ["all cases", "tokens 1..8", "tokens 9..32", "tokens 33..256", "preset qwen3-30b-a3b", "preset small"]
    {
        assert!(cmp.contains(section), "{section} missing from\n{cmp}");
    }
    // At 1..8, t1_vec (b) wins most matched cases against t0_basic (a).
    let small = cmp.split("tokens 1..8").nth(1).unwrap().lines().nth(3).unwrap();
    let cells: Vec<&str> = small.split_whitespace().collect();
    let (a_wins, b_wins): (usize, usize) = (cells[3].parse().unwrap(), cells[4].parse().unwrap());
    assert!(b_wins > 3 * a_wins.max(1), "{small}");

    // Promote: 1..8 and 33..256 are numerics-preserving winners; 9..32's winner changes
    // numerics and waits for a fidelity PASS.
    let (prom, _) = ok(&["foundry", "promote", d]);
    assert!(prom.contains("PROMOTED moe_combine        1..8     t1_vec{"), "{prom}");
    assert!(prom.contains("PROMOTED moe_combine        33..256  t2_row_tile{"), "{prom}");
    assert!(prom.contains("9..32    t3_dual_acc{") && prom.contains("pending"), "{prom}");
    let pack = KernelPack::load(&dir.join("pack-mock.json")).unwrap();
    assert!(pack.dropped.is_empty());
    assert_eq!(pack.entries.len(), 2);
    let small = pack.lookup(OpId::MoeCombine, 3).expect("1..8 entry");
    assert_eq!(small.template, "t1_vec");
    assert_eq!(small.knobs["VEC"], 8, "the model makes VEC=8 the best knob: {:?}", small.knobs);
    assert!(small.evidence.opponents.iter().all(|o| o.p < 0.01 && o.wins > o.losses && o.n >= 8));
    let large = pack.lookup(OpId::MoeCombine, 100).expect("33..256 entry");
    assert_eq!(large.template, "t2_row_tile");
    assert!(large.knobs["ROWS"] >= 4, "the model makes ROWS ≥ 4 best: {:?}", large.knobs);
    assert!(pack.lookup(OpId::MoeCombine, 16).is_none(), "numerics-changing winner promoted without fidelity");
    assert!(pack.lookup(OpId::TopkGating, 1).is_none());
    // Never a candidate whose knobs failed correctness anywhere.
    for e in &pack.entries {
        assert!(!zmoe::foundry::harness::MockRunner::incorrect(OpId::MoeCombine, &e.template, &e.knobs));
    }

    // The pending pack names the t3 entry; a FAIL capsule does not vouch for it, a PASS does.
    let pending = KernelPack::load(&dir.join("pack-mock.pending.json")).unwrap();
    let t3 = pending.lookup(OpId::MoeCombine, 16).expect("pending t3 entry").clone();
    assert_eq!(t3.template, "t3_dual_acc");
    let capsule = |verdict: &str| {
        serde_json::json!({
            "kind": "zmoe-validate",
            "backend": format!("cuda (NVIDIA H200, graph, foundry: {})", t3.tag()),
            "fidelity": {"verdict": verdict, "identical": 200, "total": 200},
        })
        .to_string()
    };
    let fail = tmp.path().join("fail.json");
    std::fs::write(&fail, capsule("FAIL")).unwrap();
    let err = zmoe_err(&["foundry", "promote", d, "--fidelity", fail.to_str().unwrap()]);
    assert!(err.contains("file exists; pass --force"), "{err}");
    let (prom, _) = ok(&["foundry", "promote", d, "--fidelity", fail.to_str().unwrap(), "--force"]);
    assert!(prom.contains("pending"), "{prom}");
    let pass = tmp.path().join("pass.json");
    std::fs::write(&pass, capsule("PASS")).unwrap();
    let (prom, _) = ok(&["foundry", "promote", d, "--fidelity", pass.to_str().unwrap(), "--force"]);
    assert!(prom.contains("PROMOTED moe_combine        9..32    t3_dual_acc{"), "{prom}");
    let pack = KernelPack::load(&dir.join("pack-mock.json")).unwrap();
    let e = pack.lookup(OpId::MoeCombine, 16).expect("validated t3");
    assert!(e.fidelity.as_deref().unwrap().starts_with("PASS: "));
    assert_eq!(pack.entries.len(), 3);
}

#[test]
fn a_tie_up_to_noise_is_not_promoted() {
    // t0_basic and t2_row_tile are modelled equal below 33 tokens.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tie");
    let d = dir.to_str().unwrap();
    run_mock(&dir, &["--cases", "80", "--templates", "t0_basic,t2_row_tile", "--max-tokens", "32", "--seed", "9"]);
    let (report, _) = ok(&["foundry", "report", d, "--no-plot"]);
    for b in ["1..8", "9..32"] {
        assert!(bucket_line(&report, b).contains("none: "), "{b}: {report}");
    }
    assert!(!dir.join("latency-moe_combine-mock.svg").exists());
    let (prom, _) = ok(&["foundry", "promote", d]);
    assert!(prom.contains("0 entries") && prom.contains("no significant winner"), "{prom}");
    let pack = KernelPack::load(&dir.join("pack-mock.json")).unwrap();
    assert!(pack.entries.is_empty());
    assert_eq!(pack.refused.len(), 2);
}

#[test]
fn corrupt_lines_are_skipped_with_their_number_and_runs_append() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    let d = dir.to_str().unwrap();
    run_mock(&dir, &["--cases", "6"]);
    let ledger = dir.join("attempts.ndjson");
    let lines = std::fs::read_to_string(&ledger).unwrap().lines().count();
    assert_eq!(lines, 24);
    // A torn line, as an interrupted append leaves it.
    let mut text = std::fs::read_to_string(&ledger).unwrap();
    text += "{\"schema_version\":1,\"id\":\"torn";
    std::fs::write(&ledger, text).unwrap();
    let (_, se) = run_mock(&dir, &["--cases", "6", "--seed", "2"]);
    assert!(se.contains("appending to the existing ledger") && se.contains("(24 attempts already"), "{se}");
    let (report, se) = ok(&["foundry", "report", d]);
    let want = format!("warning: {}:25: not valid JSON", ledger.display());
    assert!(se.contains(&want), "{se}");
    assert!(se.trim_end().ends_with(", skipped"), "{se}");
    assert!(report.contains("48 attempts, 12 cases, 2 campaigns"), "{report}");
}

#[test]
fn runtime_ignores_pack_entries_whose_source_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("p");
    run_mock(&dir, &["--cases", "60", "--max-tokens", "8", "--templates", "t0_basic,t1_vec", "--seed", "4"]);
    ok(&["foundry", "promote", dir.to_str().unwrap()]);
    let path = dir.join("pack-mock.json");
    let pack = KernelPack::load(&path).unwrap();
    let e = pack.lookup(OpId::MoeCombine, 1).expect("t1_vec at 1..8").clone();
    assert_eq!(e.template, "t1_vec");
    // Simulate a template edit after the campaign: the measured hash no longer matches.
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["entries"][0]["source_hash"] = "fnv1a64:00000000deadbeef".into();
    let stale = tmp.path().join("stale.json");
    std::fs::write(&stale, v.to_string()).unwrap();
    let pack = KernelPack::load(&stale).unwrap();
    assert!(pack.lookup(OpId::MoeCombine, 1).is_none());
    assert_eq!(pack.dropped.len(), 1);
    let w = pack.warnings().join("\n");
    assert!(
        w.contains("t1_vec at 1..8: source hash mismatch") && w.contains("deadbeef") && w.contains(&e.source_hash),
        "{w}"
    );
    assert_eq!(Bucket::of(1), e.bucket);
}

#[test]
fn every_op_runs_on_the_mock_and_bad_input_is_a_clean_error() {
    let tmp = tempfile::tempdir().unwrap();
    for op in ["topk_gating", "gather_qmm_swiglu", "rmsnorm_residual"] {
        let dir = tmp.path().join(op);
        let (so, _) = ok(&[
            "foundry",
            "run",
            "--op",
            op,
            "--backend",
            "mock",
            "--cases",
            "12",
            "--mode",
            "coverage",
            "--out",
            dir.to_str().unwrap(),
        ]);
        assert!(so.contains("attempts to "), "{so}");
        let (report, _) = ok(&["foundry", "report", dir.to_str().unwrap()]);
        assert!(report.starts_with(&format!("{op} on mock")), "{report}");
    }
    let (list, _) = ok(&["foundry", "list"]);
    assert!(list.contains("gather_qmm_swiglu") && list.contains("glm-4.7-flash"));
    let (src, se) =
        ok(&["foundry", "source", "--op", "moe_combine", "--template", "t1_vec", "--knobs", "TPB=64,VEC=4,UNROLL=2"]);
    assert!(src.contains("constexpr int TPB = 64, VEC = 4;") && src.contains("#pragma unroll 2"), "{src}");
    assert!(se.contains("fnv1a64:") && se.contains("[preserving]"), "{se}");

    let d = tmp.path().join("x");
    let d = d.to_str().unwrap();
    assert!(
        zmoe_err(&["foundry", "run", "--op", "nope", "--backend", "mock", "--out", d]).contains("known: moe_combine")
    );
    assert!(
        zmoe_err(&["foundry", "run", "--op", "moe_combine", "--templates", "t9", "--backend", "mock", "--out", d])
            .contains("t0_basic")
    );
    assert!(
        zmoe_err(&["foundry", "run", "--op", "moe_combine", "--presets", "big", "--backend", "mock", "--out", d])
            .contains("qwen3-30b-a3b")
    );
    assert!(zmoe_err(&["foundry", "report", d]).contains("no such ledger"));
    assert!(
        zmoe_err(&["foundry", "compare", tmp.path().join("topk_gating").to_str().unwrap(), "--templates", "t0_warp"])
            .contains("at least two")
    );
    assert!(
        zmoe_err(&["foundry", "source", "--op", "moe_combine", "--template", "t0_basic", "--knobs", "TPB=100"])
            .contains("TPB=100")
    );
}

#[test]
fn source_builtin_prints_the_module_the_cuda_backend_compiles() {
    let out = common::zmoe(&["foundry", "source", "--builtin"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let src = String::from_utf8_lossy(&out.stdout);
    assert!(src.contains("struct MatvecArgs {") && src.contains("static_assert(sizeof(MatvecArgs)"), "prelude");
    assert!(
        src.contains("void matvec1_r2(const MatvecArgs p)")
            && src.contains("void mla_attention(const MlaAttentionArgs a)")
    );
    let err = common::zmoe_err(&["foundry", "source"]);
    assert!(err.contains("--op") || err.contains("--builtin"), "{err}");
}

/// No copied kernels: each op's `t0` baseline and the production kernel it stands for call
/// one device function of `common.cuh` for the whole algorithm, and neither defines it
/// (only `common.cuh` does), so the baseline cannot drift from production.
#[test]
fn t0_baselines_call_the_production_device_functions() {
    use zmoe::kernels::{COMMON, templates};
    let module = zmoe::cuda::ops::module_source();
    // (op, the production kernel, the device functions both must call)
    let cases: [(OpId, &str, &[&str]); 4] = [
        (OpId::MoeCombine, "combine", &["combine_slots"]),
        (OpId::RmsnormResidual, "add_rmsnorm", &["add_rmsnorm_row"]),
        (OpId::TopkGating, "router_topk", &["router_topk_warp"]),
        (OpId::GatherQmmSwiglu, "moe_gate_up_swiglu", &["gate_up_swiglu_row"]),
    ];
    let kernel_body = |name: &str| -> String {
        // The kernel's name is the last word before `(` (attribute macros may precede it).
        let start = module
            .match_indices("__global__ void ")
            .map(|(i, _)| i)
            .find(|&i| module[i..].split('(').next().and_then(|h| h.split_whitespace().last()) == Some(name))
            .unwrap_or_else(|| panic!("production kernel {name} not in the built-in module"));
        let end = module[start..].find("\n}\n").expect("kernel end") + start;
        module[start..end].to_string()
    };
    for (op, kernel, fns) in cases {
        let (t0, _) = templates::baseline(op);
        assert!(t0.name.starts_with("t0"), "{op:?}: baseline {}", t0.name);
        let body = kernel_body(kernel);
        for f in fns {
            assert!(t0.text.contains(&format!("{f}(")), "{op:?}: {} does not call {f}", t0.name);
            assert!(body.contains(&format!("{f}(")), "production {kernel} does not call {f}");
            assert!(COMMON.contains(&format!(" {f}(")), "{f} is not defined in common.cuh");
            let defs = module.matches(&format!(" {f}(const")).count() + module.matches(&format!(" {f}(bf16")).count();
            assert!(defs <= 1, "{f} is defined {defs} times in the built-in module");
        }
    }
    // Sigmoid mode of the topk_gating baseline is the production GLM router.
    let (t0, _) = templates::baseline(OpId::TopkGating);
    assert!(t0.text.contains("router_sigmoid_warp(") && kernel_body("router_sigmoid").contains("router_sigmoid_warp("));
}
