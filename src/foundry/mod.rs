//! The kernel foundry: kernel *templates* with knobs, sampled into candidates, compiled,
//! checked against the CPU, timed honestly, and promoted into a per-GPU kernel pack only on
//! statistical evidence (the seeds' `zmlx.foundry` and `zmlx.kd`, inventory §5).
//!
//! ```text
//!  ops (CPU reference, inputs, shapes, bytes)      templates/<op>/<t>.cu with {{KNOB}}s
//!             │                                              │ knobs::render → source + hash
//!             ▼                                              ▼
//!  sample: cases = (shape, one candidate per template, random order)
//!             │
//!             ▼   harness::Runner (CudaRunner: NVRTC, poisoned outputs, CUDA events, L2 flush;
//!                                  MockRunner: deterministic timing model, for CI)
//!  attempts.ndjson  (one line per attempt, append-only)
//!             │
//!             ├──► report / compare: success rates, p50 + IQR, pairwise sign tests, bucket winners, SVG
//!             └──► promote: pack-<arch>.json (op × token bucket → template + knobs + source hash)
//!                           └──► runtime: pack::KernelPack::load → lookup(op, tokens), stale hashes dropped
//! ```
//!
//! Why it is shaped this way:
//! - **Matched cases.** Every case runs *every* template on the same inputs and shape, in a
//!   seeded random order (the seeds found a fixed order biases latency), so templates are
//!   compared pairwise on identical work and a sign test needs no model of the noise.
//! - **A ledger, not a database.** Attempts are appended one JSON line at a time and never
//!   rewritten; a crashed campaign loses at most the line being written, and a corrupt line
//!   is reported with its number and skipped. Reports and promotion are pure functions of the
//!   ledger, so the CI tests run them on mock ledgers.
//! - **Numerics are declared.** A template is numerics-preserving (bit-identical to the
//!   production kernel, checked bit for bit on the GPU) or numerics-changing (within
//!   tolerance of the CPU, and promotable only with a `zmoe validate` fidelity PASS).
//! - **Source hashes pin evidence to code.** A pack entry names the hash of the exact source
//!   it measured (template + knobs + the shared `common.cuh`); the runtime ignores an entry
//!   whose template has since changed, rather than trusting stale measurements.

pub mod attempts;
pub mod cli;
pub mod harness;
pub mod ops;
pub mod pack;
pub mod report;
pub mod sample;
pub mod stats;

pub use crate::kernels::{Bucket, Numerics, knobs, templates};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::foundry::ops::{OpId, PRESETS};

    #[test]
    fn every_template_renders_every_combo_and_defaults_are_valid() {
        for op in OpId::ALL {
            let ts = templates::for_op(op);
            assert!(ts.len() >= 3, "{op:?} has {} templates", ts.len());
            assert!(ts[0].name.starts_with("t0_"));
            assert_eq!(
                templates::baseline(op).0.numerics(&templates::baseline(op).1),
                Numerics::Preserving,
                "{op:?} t0 defaults"
            );
            let mut hashes = std::collections::BTreeSet::new();
            for t in ts {
                let d = t.default_knobs();
                knobs::check(t.space, &d).unwrap_or_else(|e| panic!("{} defaults: {e}", t.name));
                assert!(t.text.contains(&format!("foundry_{}(", op.name())), "{} entry point", t.name);
                for kn in knobs::enumerate(t.space) {
                    let r = t.render(&kn).unwrap_or_else(|e| panic!("{}: {e}", t.label(&kn)));
                    assert!(!r.source.contains("{{"));
                    assert!(hashes.insert(r.hash.clone()), "duplicate hash {}", t.label(&kn));
                }
                // t0 (production) runs every preset; another template may be limited to some
                // formats (t3_mma: 4-bit codes) but must run at least one.
                let mut fitting = 0;
                for p in &PRESETS {
                    let s = p.shape(3);
                    let combos = t.combos(&s);
                    assert!(!combos.is_empty() || !t.name.starts_with("t0_"), "{} has no combo for {}", t.name, p.name);
                    fitting += usize::from(!combos.is_empty());
                    for kn in combos {
                        let l = (t.launch)(&s, &kn);
                        assert!(l.block >= 32 && l.block <= 1024 && l.grid.iter().all(|&g| g >= 1), "{}", t.label(&kn));
                    }
                }
                assert!(fitting > 0, "{} runs no preset", t.name);
            }
        }
    }
}
