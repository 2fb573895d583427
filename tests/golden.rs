//! Golden tests: zmoe's CPU reference against HuggingFace transformers.
//!
//! Every `tests/golden/<family>/<variant>/` holds a tiny random-weight checkpoint
//! (`config.json`, `model.safetensors`) and `golden.json` with the logits transformers computes
//! for `prompt_tokens` (float32, eager attention and experts) and its greedy continuation.
//! They are produced by `scripts/golden/make_golden.py` (see `scripts/golden/README.md`).
//!
//! For each fixture this runs the `zmoe` binary twice and checks the CLI contract:
//!
//! * `zmoe forward --model DIR --tokens 1,2,3 --backend cpu --json` prints
//!   `{"logits": [[f32; vocab] per position]}`; every entry must satisfy
//!   `|got - expected| <= 1e-3 * max(1, |expected|)`.
//! * `zmoe generate --model DIR --prompt-tokens 1,2,3 --max-tokens N --temperature 0
//!   --ignore-eos --backend cpu --json` prints `{"tokens": [generated ids only]}`, which must
//!   equal `greedy_tokens` exactly. (The fixtures set `eos_token_id` to the third greedy
//!   token, so a generate that does not honour `--ignore-eos` stops early and fails.)
//!
//! All failures of a family are collected before the test panics. Set
//! `ZMOE_GOLDEN_FILTER=<substring>` to run only the fixtures whose `family/variant` contains it.

use serde_json::Value;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Relative tolerance on logits: `|got - want| <= REL_TOL * max(1, |want|)`.
const REL_TOL: f64 = 1e-3;
/// Families with a `#[test]` below; a fixture directory of any other family fails the suite.
const TESTED_FAMILIES: &[&str] = &["qwen3_moe", "glm4_moe_lite", "deepseek_v3", "lfm2_moe", "gpt_oss"];
/// How many individual logit mismatches to print per fixture.
const SHOW_MISMATCHES: usize = 8;

#[test]
fn qwen3_moe_matches_transformers() {
    check_family("qwen3_moe", 3);
}

#[test]
fn glm4_moe_lite_matches_transformers() {
    check_family("glm4_moe_lite", 3);
}

#[test]
fn deepseek_v3_matches_transformers() {
    check_family("deepseek_v3", 2);
}

#[test]
fn lfm2_moe_matches_transformers() {
    check_family("lfm2_moe", 3);
}

#[test]
fn gpt_oss_matches_transformers() {
    check_family("gpt_oss", 4);
}

/// Guards against a broken glob passing vacuously and against fixtures nobody tests.
#[test]
fn golden_fixtures_are_present_and_tested() {
    let all = discover();
    assert!(
        all.len() >= 3,
        "expected at least 3 golden fixtures under {}, found {}",
        golden_root().display(),
        all.len()
    );
    for fx in &all {
        assert!(
            TESTED_FAMILIES.contains(&fx.family.as_str()),
            "fixture {} belongs to family {:?}, which has no #[test] in tests/golden.rs",
            fx.dir.display(),
            fx.family
        );
    }
}

struct Fixture {
    dir: PathBuf,
    family: String,
    variant: String,
    golden: PathBuf,
}

fn golden_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("golden")
}

/// All `tests/golden/*/*/golden.json`, sorted by path.
fn discover() -> Vec<Fixture> {
    let root = golden_root();
    let mut out = Vec::new();
    let families = match std::fs::read_dir(&root) {
        Ok(rd) => rd,
        Err(e) => panic!("cannot read {}: {e}", root.display()),
    };
    for fam in families.flatten() {
        if !fam.path().is_dir() {
            continue;
        }
        let variants =
            std::fs::read_dir(fam.path()).unwrap_or_else(|e| panic!("cannot read {}: {e}", fam.path().display()));
        for var in variants.flatten() {
            let golden = var.path().join("golden.json");
            if golden.is_file() {
                out.push(Fixture {
                    dir: var.path(),
                    family: fam.file_name().to_string_lossy().into_owned(),
                    variant: var.file_name().to_string_lossy().into_owned(),
                    golden,
                });
            }
        }
    }
    out.sort_by(|a, b| a.dir.cmp(&b.dir));
    out
}

fn check_family(family: &str, min_fixtures: usize) {
    let fixtures: Vec<Fixture> = discover().into_iter().filter(|f| f.family == family).collect();
    assert!(
        fixtures.len() >= min_fixtures,
        "expected at least {min_fixtures} golden fixtures for {family} under {}, found {}",
        golden_root().display(),
        fixtures.len()
    );
    let filter = std::env::var("ZMOE_GOLDEN_FILTER").unwrap_or_default();
    let mut failures = Vec::new();
    let mut ran = 0;
    for fx in &fixtures {
        let name = format!("{}/{}", fx.family, fx.variant);
        if !name.contains(filter.as_str()) {
            continue;
        }
        ran += 1;
        match check_fixture(fx) {
            Ok(summary) => eprintln!("golden {name}: ok ({summary})"),
            Err(errors) => {
                for e in errors {
                    failures.push(format!("{name}: {e}"));
                }
            }
        }
    }
    assert!(ran > 0, "ZMOE_GOLDEN_FILTER={filter:?} selected no {family} fixture");
    if !failures.is_empty() {
        panic!("{} golden check(s) failed for {family}:\n\n{}", failures.len(), failures.join("\n\n"));
    }
}

/// Both CLI checks for one fixture; every failure is reported, not only the first.
fn check_fixture(fx: &Fixture) -> Result<String, Vec<String>> {
    let golden = read_json(&fx.golden).map_err(|e| vec![e])?;
    let prompt = ids(&golden, "prompt_tokens").map_err(|e| vec![e])?;
    let want_logits = matrix(&golden, "logits").map_err(|e| vec![e])?;
    let want_tokens = ids(&golden, "greedy_tokens").map_err(|e| vec![e])?;
    if want_logits.len() != prompt.len() || prompt.is_empty() || want_tokens.is_empty() {
        return Err(vec![format!(
            "malformed golden.json: {} prompt tokens, {} logit rows, {} greedy tokens",
            prompt.len(),
            want_logits.len(),
            want_tokens.len()
        )]);
    }
    let model = fx.dir.to_string_lossy().into_owned();
    let prompt_csv = join_ids(&prompt);
    let mut errors = Vec::new();
    let mut summary = Vec::new();

    let forward = vec![
        "forward".to_string(),
        "--model".into(),
        model.clone(),
        "--tokens".into(),
        prompt_csv.clone(),
        "--backend".into(),
        "cpu".into(),
        "--json".into(),
    ];
    match run_zmoe(&forward).and_then(|v| matrix(&v, "logits")) {
        Err(e) => errors.push(format!("forward: {e}")),
        Ok(got) => match compare_logits(&got, &want_logits) {
            Ok(s) => summary.push(s),
            Err(e) => errors.push(format!("forward: {e}\n  reproduce: zmoe {}", forward.join(" "))),
        },
    }

    let generate = vec![
        "generate".to_string(),
        "--model".into(),
        model,
        "--prompt-tokens".into(),
        prompt_csv,
        "--max-tokens".into(),
        want_tokens.len().to_string(),
        "--temperature".into(),
        "0".into(),
        "--ignore-eos".into(),
        "--backend".into(),
        "cpu".into(),
        "--json".into(),
    ];
    match run_zmoe(&generate).and_then(|v| ids(&v, "tokens")) {
        Err(e) => errors.push(format!("generate: {e}")),
        Ok(got) if got == want_tokens => summary.push(format!("{} greedy tokens equal", got.len())),
        Ok(got) => {
            let first =
                got.iter().zip(&want_tokens).position(|(a, b)| a != b).unwrap_or(got.len().min(want_tokens.len()));
            errors.push(format!(
                "generate: greedy tokens differ (first difference at index {first}; lengths {} vs {})\n  got:      {:?}\n  expected: {:?}\n  reproduce: zmoe {}",
                got.len(),
                want_tokens.len(),
                got,
                want_tokens,
                generate.join(" ")
            ));
        }
    }

    if errors.is_empty() { Ok(summary.join(", ")) } else { Err(errors) }
}

/// Element-wise check; Ok(summary) or Err(report listing the worst and first mismatches).
fn compare_logits(got: &[Vec<f64>], want: &[Vec<f64>]) -> Result<String, String> {
    if got.len() != want.len() {
        return Err(format!("{} logit rows, expected {} (one per prompt position)", got.len(), want.len()));
    }
    let mut bad: Vec<(usize, usize, f64, f64)> = Vec::new();
    let mut worst: Option<(f64, usize, usize)> = None; // (|d| / tol, pos, vocab)
    let mut max_abs = 0.0f64;
    for (pos, (g, w)) in got.iter().zip(want).enumerate() {
        if g.len() != w.len() {
            return Err(format!("position {pos}: {} logits, expected {} (vocab size)", g.len(), w.len()));
        }
        for (v, (&a, &e)) in g.iter().zip(w).enumerate() {
            let tol = REL_TOL * e.abs().max(1.0);
            let d = (a - e).abs();
            let ratio = if d.is_nan() { f64::INFINITY } else { d / tol };
            if d.is_nan() || d > tol {
                bad.push((pos, v, a, e));
            }
            if d.is_finite() {
                max_abs = max_abs.max(d);
            }
            if worst.is_none_or(|(r, _, _)| ratio > r) {
                worst = Some((ratio, pos, v));
            }
        }
    }
    if bad.is_empty() {
        return Ok(format!("max |dlogit| {max_abs:.2e} over {} positions", got.len()));
    }
    let total: usize = want.iter().map(Vec::len).sum();
    let mut msg =
        format!("{} of {total} logits outside |got - expected| <= {REL_TOL:e} * max(1, |expected|)", bad.len());
    if let Some((r, p, v)) = worst {
        let _ = write!(
            msg,
            "\n  worst: position {p}, vocab {v}: got {}, expected {} ({r:.1}x tolerance)",
            got[p][v], want[p][v]
        );
    }
    let mut first_bad_pos = None;
    for &(p, v, a, e) in bad.iter().take(SHOW_MISMATCHES) {
        first_bad_pos.get_or_insert(p);
        let _ = write!(msg, "\n  position {p}, vocab {v}: got {a}, expected {e}, |diff| {:.3e}", (a - e).abs());
    }
    if let Some(p) = first_bad_pos {
        let _ = write!(msg, "\n  (first bad position {p}: positions before it agree, so the fault starts there)");
    }
    Err(msg)
}

fn run_zmoe(args: &[String]) -> Result<Value, String> {
    let out =
        Command::new(env!("CARGO_BIN_EXE_zmoe")).args(args).output().map_err(|e| format!("cannot run zmoe: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!("zmoe {} exited with {}\n  stderr: {}", args.join(" "), out.status, tail(&stderr, 2000)));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).map_err(|e| {
        format!(
            "stdout of zmoe {} is not one JSON object ({e})\n  stdout: {}\n  stderr: {}",
            args.join(" "),
            tail(&stdout, 500),
            tail(&stderr, 500)
        )
    })
}

fn read_json(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{} is not valid JSON: {e}", path.display()))
}

fn ids(v: &Value, key: &str) -> Result<Vec<u64>, String> {
    let arr = v.get(key).and_then(Value::as_array).ok_or_else(|| format!("missing array {key:?} in {}", short(v)))?;
    arr.iter().map(|x| x.as_u64().ok_or_else(|| format!("{key:?} holds a non-token value {x}"))).collect()
}

fn matrix(v: &Value, key: &str) -> Result<Vec<Vec<f64>>, String> {
    let rows = v.get(key).and_then(Value::as_array).ok_or_else(|| format!("missing array {key:?} in {}", short(v)))?;
    rows.iter()
        .enumerate()
        .map(|(i, row)| {
            let row = row.as_array().ok_or_else(|| format!("{key:?}[{i}] is not an array"))?;
            row.iter()
                .enumerate()
                .map(|(j, x)| x.as_f64().ok_or_else(|| format!("{key:?}[{i}][{j}] is not a number: {x}")))
                .collect()
        })
        .collect()
}

fn join_ids(ids: &[u64]) -> String {
    ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

fn short(v: &Value) -> String {
    tail(&v.to_string(), 300).to_string()
}

/// The last `n` bytes of `s` (on a char boundary), for error messages.
fn tail(s: &str, n: usize) -> &str {
    if s.len() <= n {
        return s;
    }
    let mut start = s.len() - n;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}
