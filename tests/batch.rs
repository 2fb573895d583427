//! Batch invariance on the CPU: sequences run together through sequence slots (continuous
//! batching, chunked prefill, slots reused) give the logits they give alone, bit for bit, on
//! every family's per-sequence state (GQA KV cache, MLA latent cache, LFM2's conv states,
//! GPT-OSS's sliding window with sinks). The same body runs on the GPU in tests/gpu.rs.

mod common;

use zmoe::BackendKind;
use zmoe::checkpoint::synth::SynthQuant;

#[test]
fn batched_equals_alone_on_every_family() {
    let tmp = tempfile::tempdir().unwrap();
    // gpt-oss-tiny's window is 6 keys: sequences of 8..=22 tokens cross it.
    for (name, preset, quant, seed, decode) in [
        ("q4", "qwen3_moe/tiny", SynthQuant::Affine4, 71, 6),
        ("g4", "glm4_moe_lite/glm-tiny", SynthQuant::Affine4, 72, 6),
        ("db", "deepseek_v3/deepseek-tiny", SynthQuant::Bf16, 73, 6),
        ("l4", "lfm2_moe/lfm2-tiny", SynthQuant::Affine4, 74, 6),
        ("o4", "gpt_oss/gpt-oss-tiny", SynthQuant::Mxfp4, 75, 12),
    ] {
        let dir = common::synth_preset(tmp.path(), name, preset, quant, seed);
        let ok = common::assert_batch_invariant(BackendKind::Cpu, &dir, 16, 20, decode);
        assert!(ok, "{name}: the CPU has slots");
    }
}

#[test]
fn bad_rows_are_errors_and_leave_the_caches_alone() {
    use zmoe::backend::Row;
    let model = zmoe::Model::load(common::shared_tiny(SynthQuant::Affine4, 3)).unwrap();
    let mut be = model.backend(BackendKind::Cpu, zmoe::plan::Plan::reference(model.config())).unwrap();
    be.set_slots(2).unwrap();
    let row = |slot, pos, token| Row { slot, pos, token, logits: true, long_prompt: false };
    be.forward_rows(&[row(0, 0, 5), row(0, 1, 6), row(1, 0, 7)]).unwrap();
    let v = model.config().vocab_size as u32;
    for (rows, want) in [
        (vec![], "no input rows"),
        (vec![Row { logits: false, ..row(0, 2, 1) }], "no row asks for logits"),
        (vec![row(2, 0, 1)], "slot 2 does not exist"),
        (vec![row(0, 2, v)], "outside the vocabulary"),
        (vec![row(0, 3, 1)], "slot 0: row at position 3 where 2 comes next"),
        (vec![row(1, 1, 1), row(1, 1, 2)], "slot 1: row at position 1 where 2 comes next"),
        (
            vec![row(0, 2, 1), Row { long_prompt: true, ..row(0, 3, 1) }],
            "slot 0: rows with and without the long-prompt flag",
        ),
    ] {
        let err = be.forward_rows(&rows).unwrap_err().to_string();
        assert!(err.contains(want), "{rows:?}: {err}");
    }
    assert_eq!((be.slot_position(0), be.slot_position(1)), (2, 1));
    be.reset_slot(0);
    assert_eq!((be.slot_position(0), be.slot_position(1)), (0, 1));
    assert!(be.set_slots(0).is_err());
}
