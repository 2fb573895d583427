//! Expert parallelism simulated on the CPU (issue 21, the half a CPU can check): the routed
//! experts split over N ranks (contiguous blocks of experts, each rank computing only the
//! slots of the experts it owns with only its block of weights), partials gathered and added
//! in slot order, give the logits of one rank bit for bit — over a prefill and several decode
//! steps, on Qwen3 (softmax router), GLM (MLA, shared expert, grouped sigmoid router) and
//! GPT-OSS (expert biases, clamped SwiGLU).

mod common;

use zmoe::BackendKind;
use zmoe::checkpoint::synth::SynthQuant;
use zmoe::plan::patterns::{Selection, patched_plan};
use zmoe::rng::Rng;

/// Logits of a random prompt of `prompt` tokens (every position) and of `decode` greedy
/// steps after it (each chosen from the previous logits), on a fresh CPU backend with
/// `ranks` simulated ranks (`None`: the plain path).
fn run(dir: &std::path::Path, ranks: Option<usize>, seed: u64, prompt: usize, decode: usize) -> Vec<Vec<f32>> {
    let model = zmoe::Model::load(dir).unwrap();
    let cfg = model.config();
    let (plan, _) = patched_plan(cfg, &Selection::default());
    let mut be = model.backend(BackendKind::Cpu, plan).unwrap();
    if let Some(n) = ranks {
        be.set_ranks(n).unwrap();
        assert!(be.name().contains(&format!("{n} simulated expert-parallel ranks")), "{}", be.name());
    }
    let mut rng = Rng::new(seed);
    let v = cfg.vocab_size;
    let tokens: Vec<u32> = (0..prompt).map(|_| (rng.next_u64() % v as u64) as u32).collect();
    let mut out = vec![be.forward(&tokens, true).unwrap()];
    for _ in 0..decode {
        let last = out.last().unwrap();
        let next = zmoe::sample::argmax(&last[last.len() - v..]) as u32;
        out.push(be.forward(&[next], false).unwrap());
    }
    out
}

fn assert_ranks_bit_identical(name: &str, preset: &str, quant: SynthQuant, seed: u64) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::synth_preset(tmp.path(), name, preset, quant, seed);
    let one = run(&dir, None, seed ^ 0x21, 9, 6);
    assert!(one.iter().flatten().all(|x| x.is_finite()));
    for n in 1..=4 {
        let ranked = run(&dir, Some(n), seed ^ 0x21, 9, 6);
        assert_eq!(ranked.len(), one.len());
        for (step, (a, b)) in ranked.iter().zip(&one).enumerate() {
            assert_eq!(a.len(), b.len(), "{name} N={n} step {step}");
            let diff = a.iter().zip(b).position(|(x, y)| x.to_bits() != y.to_bits());
            assert!(diff.is_none(), "{name}: {n} ranks differ from one at step {step}, logit {diff:?}");
        }
    }
}

#[test]
fn qwen3_ranks_equal_one_rank_bit_for_bit() {
    assert_ranks_bit_identical("q4", "qwen3_moe/tiny", SynthQuant::Affine4, 2101);
}

#[test]
fn glm_ranks_equal_one_rank_bit_for_bit() {
    assert_ranks_bit_identical("g4", "glm4_moe_lite/glm-tiny", SynthQuant::Affine4, 2102);
}

#[test]
fn gpt_oss_ranks_equal_one_rank_bit_for_bit() {
    assert_ranks_bit_identical("o4", "gpt_oss/gpt-oss-tiny", SynthQuant::Mxfp4, 2103);
}

#[test]
fn ranked_batches_stay_batch_invariant() {
    // Several sequences in slots, chunked prefill mixed with decode rows, on 3 ranks.
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::synth_preset(tmp.path(), "g4", "glm4_moe_lite/glm-tiny", SynthQuant::Affine4, 2104);
    let model = zmoe::Model::load(&dir).unwrap();
    let cfg = model.config();
    let plan = zmoe::plan::Plan::reference(cfg);
    let (mut plain, mut ranked) =
        (model.backend(BackendKind::Cpu, plan.clone()).unwrap(), model.backend(BackendKind::Cpu, plan).unwrap());
    ranked.set_ranks(3).unwrap();
    let mut rng = Rng::new(2104);
    let rows: Vec<zmoe::backend::Row> = (0..3)
        .flat_map(|slot| (0..4).map(move |pos| (slot, pos)))
        .map(|(slot, pos)| zmoe::backend::Row {
            slot,
            pos,
            token: (rng.next_u64() % cfg.vocab_size as u64) as u32,
            logits: true,
            long_prompt: false,
        })
        .collect();
    for be in [&mut plain, &mut ranked] {
        be.set_slots(3).unwrap();
    }
    let (a, b) = (plain.forward_rows(&rows).unwrap(), ranked.forward_rows(&rows).unwrap());
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "3 ranks over 3 slots differ from one rank");
}

#[test]
fn bad_rank_counts_are_clear_errors() {
    let model = zmoe::Model::load(common::shared_tiny(SynthQuant::Affine4, 2105)).unwrap();
    let mut be = model.backend(BackendKind::Cpu, zmoe::plan::Plan::reference(model.config())).unwrap();
    let e = be.set_ranks(17).unwrap_err().to_string();
    assert!(e.contains("17 ranks for 16 routed experts"), "{e}");
    let e = be.set_ranks(0).unwrap_err().to_string();
    assert!(e.contains("at least one rank"), "{e}");
    // The largest count is fine: one expert per rank.
    be.set_ranks(16).unwrap();
}

#[test]
fn cli_ranks_flag() {
    let dir = common::shared_tiny(SynthQuant::Affine4, 2106);
    let d = common::s(dir);
    let forward = |extra: &[&str]| {
        let mut args = vec!["forward", "--model", d, "--backend", "cpu", "--tokens", "5,77,301,9", "--json"];
        args.extend_from_slice(extra);
        let out = common::zmoe(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    };
    assert_eq!(forward(&["--ranks", "3"]), forward(&[]), "forward --ranks 3 logits differ from one rank");
    let e = common::zmoe_err(&["forward", "--model", d, "--backend", "cpu", "--tokens", "5", "--ranks", "17"]);
    assert!(e.contains("17 ranks for 16 routed experts"), "{e}");
    let e = common::zmoe_err(&["validate", "--model", d, "--backend", "cpu", "--ranks", "2"]);
    assert!(e.contains("--ranks is not a validate option"), "{e}");
}
