//! Shared helpers for integration tests: synthetic models in temp folders, CLI runs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use zmoe::checkpoint::synth::{self, SynthQuant, SynthSpec};

/// Writes a synthetic tiny qwen3_moe model into `dir/name` and returns its path.
pub fn synth_tiny(dir: &Path, name: &str, quant: SynthQuant, seed: u64) -> PathBuf {
    synth_preset(dir, name, "qwen3_moe/tiny", quant, seed)
}

/// Writes synthetic preset `family/preset` (e.g. `glm4_moe_lite/glm-tiny`) into `dir/name`.
pub fn synth_preset(dir: &Path, name: &str, family_preset: &str, quant: SynthQuant, seed: u64) -> PathBuf {
    let out = dir.join(name);
    let (family, preset) = family_preset.split_once('/').expect("family/preset");
    let spec = SynthSpec {
        family: family.into(),
        preset: preset.into(),
        quant,
        group_size: 64,
        seed,
        max_shard_bytes: synth::SHARD_BYTES,
    };
    synth::write(&spec, &out, false).expect("synth preset");
    out
}

/// Runs the zmoe binary.
pub fn zmoe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zmoe")).args(args).output().expect("run zmoe")
}

/// Runs zmoe, expects failure, returns stderr; checks it is a clean error, not a panic.
pub fn zmoe_err(args: &[&str]) -> String {
    let out = zmoe(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "expected failure for {args:?}, got success");
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "panic for {args:?}:\n{err}");
    assert!(err.starts_with("error: ") || err.contains("error:"), "no clean error for {args:?}:\n{err}");
    err
}

/// Copies a model folder.
pub fn copy_model(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

/// One tensor of a safetensors file: (name, dtype, shape, bytes).
pub type RawTensor = (String, Dtype, Vec<usize>, Vec<u8>);

/// A copy of model folder `src` whose model.safetensors was rewritten through `edit`
/// (which may change, add or drop tensors). The copy lives as long as the returned folder.
pub fn copy_with_tensors(src: &Path, edit: impl FnOnce(&mut Vec<RawTensor>)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    copy_model(src, tmp.path());
    let path = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut list: Vec<RawTensor> =
        st.tensors().into_iter().map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect();
    edit(&mut list);
    let views: Vec<(String, TensorView)> =
        list.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
    tmp
}

/// Every golden fixture folder (`tests/golden/<family>/<variant>/` with a golden.json) under
/// the repository at `repo`, sorted.
pub fn golden_dirs(repo: &Path) -> Vec<PathBuf> {
    let root = repo.join("tests/golden");
    let mut v = Vec::new();
    for fam in std::fs::read_dir(&root).unwrap_or_else(|e| panic!("cannot read {}: {e}", root.display())) {
        for var in std::fs::read_dir(fam.unwrap().path()).unwrap() {
            let p = var.unwrap().path();
            if p.join("golden.json").exists() {
                v.push(p);
            }
        }
    }
    v.sort();
    v
}

/// The bit-identity test body, one for every backend: for each model folder, the logits of
/// the reference plan — a prefill of `prompt` tokens (every position) and `decode` greedy
/// decode steps — against those of every pattern alone and of all patterns together, bit for
/// bit. Every pattern must fire, except where the model has nothing for it to fuse.
pub fn assert_patterns_bitexact(kind: zmoe::BackendKind, dirs: &[PathBuf], prompt: usize, decode: usize) {
    use zmoe::plan::Plan;
    use zmoe::plan::patterns::{Pattern, apply};
    let mut subsets: Vec<Vec<Pattern>> = Pattern::ALL.iter().map(|p| vec![*p]).collect();
    subsets.push(Pattern::ALL.to_vec());
    for dir in dirs {
        let model = zmoe::Model::load(dir).unwrap();
        let cfg = model.config();
        let v = cfg.vocab_size as u32;
        let tokens: Vec<u32> = (0..prompt as u32).map(|i| (i * 7919 + 11) % v).collect();
        let run = |plan: Plan| {
            let mut be = model.backend(kind, plan).unwrap();
            let mut out = be.forward(&tokens, true).unwrap();
            let mut last = out[out.len() - v as usize..].to_vec();
            for _ in 0..decode {
                let t = zmoe::sample::argmax(&last) as u32;
                last = be.forward(&[t], false).unwrap();
                out.extend_from_slice(&last);
            }
            out
        };
        let reference = Plan::reference(cfg);
        let want = run(reference.clone());
        assert!(want.iter().all(|x| x.is_finite()), "{}: non-finite reference logits", dir.display());
        for pats in &subsets {
            let (plan, applied) = apply(&reference, pats);
            let nothing_to_fuse = match pats.as_slice() {
                [Pattern::SharedExpert] => cfg.n_shared_experts == 0,
                [Pattern::SwigluMlp] => (0..cfg.num_layers).all(|l| cfg.is_moe_layer(l)),
                [Pattern::ConvMixer] => cfg.conv.is_none(),
                // GPT-OSS has no q/k head norms for qk_norm_rope to start from.
                [Pattern::QkNormRope] => cfg.gpt_oss.is_some(),
                // MLA's in-projection is two matrices, not q, k and v.
                [Pattern::NormQkv] => cfg.mla.is_some(),
                _ => false,
            };
            if nothing_to_fuse {
                assert!(applied.is_empty(), "{}: {pats:?} fused something", dir.display());
                continue;
            }
            assert!(!applied.is_empty(), "{}: {pats:?} fused nothing", dir.display());
            assert!(plan.steps.len() < reference.steps.len());
            let got = run(plan);
            let diff = got.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            assert!(diff == 0 && got.len() == want.len(), "{}: {pats:?}: {diff} logits differ", dir.display());
        }
        println!("{}: every pattern bit-exact (prefill {prompt} + decode {decode})", dir.display());
    }
}

/// A tiny qwen3_moe model synthesised once per test binary, quant and seed (read-only; its
/// temporary folder lives until the process exits).
pub fn shared_tiny(quant: SynthQuant, seed: u64) -> &'static Path {
    static DIRS: std::sync::Mutex<Vec<(SynthQuant, u64, &'static Path)>> = std::sync::Mutex::new(Vec::new());
    let mut dirs = DIRS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(&(_, _, p)) = dirs.iter().find(|d| d.0 == quant && d.1 == seed) {
        return p;
    }
    let tmp = Box::leak(Box::new(tempfile::tempdir().unwrap()));
    let p: &'static Path = Box::leak(synth_tiny(tmp.path(), "tiny", quant, seed).into_boxed_path());
    dirs.push((quant, seed, p));
    p
}

/// A path as a command-line argument.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The batch-invariance test body, one for every backend: `seqs` greedy sequences (prompts of
/// 2..=10 tokens, every fifth a long one of 21 or more, `decode` steps each) run through `slots` sequence slots with continuous
/// batching — two arrive per step, prompts prefilled in chunks of 3 rows beside the others'
/// decode rows, rows in a different slot order every step, a finished sequence's slot reset
/// and reused — must give, for every sequence, the logits of every prompt position and every
/// decode step bit for bit equal to the same sequence run alone through [`Backend::forward`].
///
/// Returns `false` (without asserting) only when the backend refuses `slots` slots with
/// [`zmoe::Error::Unavailable`] (a backend without slots).
pub fn assert_batch_invariant(kind: zmoe::BackendKind, dir: &Path, slots: usize, seqs: usize, decode: usize) -> bool {
    use zmoe::backend::Row;
    use zmoe::plan::patterns::{Selection, patched_plan};
    let model = zmoe::Model::load(dir).unwrap();
    let cfg = model.config();
    let v = cfg.vocab_size;
    let (plan, _) = patched_plan(cfg, &Selection::default());
    // Short prompts (2–10 tokens, on every backend's decode kernels) and every fifth one long
    // (more than BATCH_ROWS tokens: CUDA runs its rows on tensor cores, alone in one chunk,
    // together in chunks of 3 — the same numbers either way).
    let len = |i: usize| if i % 5 == 4 { 17 + i } else { 2 + (i * 5) % 9 };
    let prompts: Vec<Vec<u32>> =
        (0..seqs).map(|i| (0..len(i)).map(|k| ((i * 7919 + k * 104_729 + 13) % v) as u32).collect()).collect();

    // Alone: each sequence on a fresh single-sequence backend.
    let mut alone_be = model.backend(kind, plan.clone()).unwrap();
    let alone: Vec<Vec<f32>> = prompts
        .iter()
        .map(|p| {
            alone_be.reset();
            let mut out = alone_be.forward(p, true).unwrap();
            for _ in 0..decode {
                let t = zmoe::sample::argmax(&out[out.len() - v..]) as u32;
                let row = alone_be.forward(&[t], false).unwrap();
                out.extend_from_slice(&row);
            }
            out
        })
        .collect();

    // Together: continuous batching over `slots` slots.
    let mut be = model.backend(kind, plan).unwrap();
    match be.set_slots(slots) {
        Err(zmoe::Error::Unavailable(why)) => {
            println!("{}: {slots} slots unavailable: {why}", dir.display());
            return false;
        }
        r => r.unwrap(),
    }
    assert_eq!(be.slots(), slots);
    struct Seq {
        id: usize,
        slot: usize,
        fed: usize,
        logits: Vec<f32>,
        decoded: usize,
    }
    let mut got: Vec<Vec<f32>> = vec![Vec::new(); seqs];
    let (mut running, mut free, mut next, mut step) = (Vec::<Seq>::new(), (0..slots).collect::<Vec<_>>(), 0, 0);
    let mut max_batch = 0;
    while next < seqs || !running.is_empty() {
        for _ in 0..2 {
            if next < seqs && !free.is_empty() {
                let slot = free.remove(0);
                assert_eq!(be.slot_position(slot), 0, "slot {slot} reused without a reset");
                running.push(Seq { id: next, slot, fed: 0, logits: Vec::new(), decoded: 0 });
                next += 1;
            }
        }
        // Each running sequence's rows: a prefill chunk (every row's logits) or a decode row.
        let mut groups: Vec<Vec<Row>> = running
            .iter()
            .map(|s| {
                let p = &prompts[s.id];
                if s.fed < p.len() {
                    // Chunks of 3: a long prompt's rows keep their flag in every chunk.
                    let long_prompt = zmoe::backend::long_prompt(p.len());
                    (s.fed..p.len().min(s.fed + 3))
                        .map(|i| Row { slot: s.slot, pos: i, token: p[i], logits: true, long_prompt })
                        .collect()
                } else {
                    let t = zmoe::sample::argmax(&s.logits[s.logits.len() - v..]) as u32;
                    vec![Row { slot: s.slot, pos: p.len() + s.decoded, token: t, logits: true, long_prompt: false }]
                }
            })
            .collect();
        let order: Vec<usize> = (0..groups.len()).map(|i| (i * 7 + step) % groups.len()).collect();
        let mut uniq = order.clone();
        uniq.sort_unstable();
        uniq.dedup();
        let order = if uniq.len() == groups.len() { order } else { (0..groups.len()).rev().collect() };
        let rows: Vec<Row> = order.iter().flat_map(|&g| std::mem::take(&mut groups[g])).collect();
        max_batch = max_batch.max(rows.len());
        let logits = be.forward_rows(&rows).unwrap();
        assert_eq!(logits.len(), rows.len() * v);
        for (r, l) in rows.iter().zip(logits.chunks_exact(v)) {
            let s = running.iter_mut().find(|s| s.slot == r.slot).unwrap();
            s.logits.extend_from_slice(l);
            if s.fed < prompts[s.id].len() {
                s.fed += 1;
            } else {
                s.decoded += 1;
            }
        }
        // A sequence is done after its prompt and `decode` decode rows.
        running.retain_mut(|s| {
            let done = s.fed == prompts[s.id].len() && s.decoded == decode;
            if done {
                got[s.id] = std::mem::take(&mut s.logits);
                be.reset_slot(s.slot);
                free.push(s.slot);
            }
            !done
        });
        step += 1;
    }
    assert!(max_batch > slots, "the schedule never mixed prefill chunks with decode rows");
    for (i, (g, a)) in got.iter().zip(&alone).enumerate() {
        assert_eq!(g.len(), a.len(), "sequence {i}: {} logits batched vs {} alone", g.len(), a.len());
        let diff = g.iter().zip(a).position(|(x, y)| x.to_bits() != y.to_bits());
        assert!(diff.is_none(), "sequence {i}: batched logits differ from alone at row {}", diff.unwrap() / v);
        assert!(a.iter().all(|x| x.is_finite()));
    }
    println!(
        "{}: {seqs} sequences over {slots} slots ({step} steps, up to {max_batch} rows) bit-identical to alone",
        dir.display()
    );
    true
}
