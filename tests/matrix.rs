//! The benchmark ledger: schema round-trip, atomic and concurrent appends, corrupt lines,
//! and every `zmoe matrix` view on the fixture ledgers in `tests/fixtures/matrix/`.
//!
//! `ledger.jsonl` holds six lines: qwen3-30b-a3b on H200 (03-01), glm-4.7-flash on H200
//! (FAIL, notes with quotes, a comma, HTML and a newline), a truncated line (3), qwen3 on
//! H100 (dated 02-20 but appended later), qwen3 on H200 again (03-05, dirty tree) and
//! lfm2-8b-a1b on H200. `ledger_b.jsonl` is a later ledger: qwen3/H200 faster, glm now
//! PASS, gpt-oss-20b new.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::{synth_tiny, zmoe, zmoe_err};
use zmoe::checkpoint::synth::SynthQuant;
use zmoe::matrix::{
    Divergence, Entry, Fidelity, Hardware, Ledger, ModelInfo, PlanRun, SCHEMA_VERSION, Settings, Software, Speedup,
    Verdict,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/matrix").join(name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A complete entry (every optional field set) with `notes`.
fn sample(notes: &str) -> Entry {
    let reference =
        PlanRun::from_runs(vec![150.0, 152.0, 151.0], vec![2000.0, 2010.0], Some(18 << 30), 1 << 30, 4000.0);
    let patched = PlanRun::from_runs(vec![160.5, 161.0, 160.0], vec![2050.0, 2040.0], Some(19 << 30), 1 << 30, 4000.0);
    Entry {
        schema_version: SCHEMA_VERSION,
        timestamp_utc: "2026-03-01T10:00:00Z".into(),
        model: ModelInfo { id: "qwen3-30b-a3b".into(), family: "qwen3_moe".into(), quant: Some("affine4g64".into()) },
        patterns_applied: vec!["moe_mlp".into(), "swiglu_mlp".into()],
        steps_patched: 96,
        hardware: Hardware { name: "NVIDIA H200".into(), memory_bytes: Some(150_754_820_096) },
        software: Software {
            zmoe_version: "0.1.0".into(),
            git_commit: "abc1234".into(),
            git_dirty: Some(true),
            driver: Some("580.95.05".into()),
            cuda: Some("13.0".into()),
        },
        fidelity: Fidelity {
            verdict: Verdict::Fail,
            identical: 37,
            total: 200,
            first_divergence: Some(Divergence {
                position: 37,
                reference_token: 15043,
                patched_token: 9906,
                margin: 0.0125,
            }),
            non_finite: None,
        },
        speedup: Speedup::of(&reference, &patched),
        reference,
        patched,
        settings: Settings {
            runs: 3,
            warmup: Some(1),
            max_tokens: 200,
            prompt_tokens: 64,
            patterns_requested: Some(vec!["moe_mlp".into(), "swiglu_mlp".into()]),
            backend: "cuda".into(),
        },
        notes: notes.into(),
    }
}

#[test]
fn schema_round_trip() {
    let e = sample("quotes \" commas, <tags> & a\nnewline, ünïcödé");
    let line = serde_json::to_string(&e).unwrap();
    assert!(!line.contains('\n'), "an entry is one line");
    let back: Entry = serde_json::from_str(&line).unwrap();
    assert_eq!(back, e);

    // The field names are the documented schema.
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["schema_version"], 1);
    assert_eq!(v["model"]["id"], "qwen3-30b-a3b");
    assert_eq!(v["hardware"]["name"], "NVIDIA H200");
    assert_eq!(v["software"]["git_commit"], "abc1234");
    assert_eq!(v["fidelity"]["verdict"], "FAIL");
    assert_eq!(v["fidelity"]["first_divergence"]["patched_token"], 9906);
    assert_eq!(v["reference"]["decode_tps"], serde_json::json!([150.0, 152.0, 151.0]));
    assert_eq!(v["reference"]["decode_median"], 151.0);
    assert_eq!(v["patched"]["decode_median"], 160.5);
    assert_eq!(v["settings"]["patterns_requested"], serde_json::json!(["moe_mlp", "swiglu_mlp"]));
    assert!((v["speedup"]["decode"].as_f64().unwrap() - 160.5 / 151.0).abs() < 1e-12);

    // Every fixture line that parses re-serialises to the same JSON value: nothing is lost
    // or renamed between the file and the struct.
    let text = std::fs::read_to_string(fixture("ledger.jsonl")).unwrap();
    let mut checked = 0;
    for line in text.lines() {
        if let Ok(e) = serde_json::from_str::<Entry>(line) {
            let original: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(serde_json::to_value(&e).unwrap(), original);
            checked += 1;
        }
    }
    assert_eq!(checked, 5);
}

#[test]
fn now_utc_is_rfc3339_whole_seconds() {
    let t = zmoe::matrix::now_utc();
    assert!(t.len() == 20 && t.ends_with('Z') && t.as_bytes()[10] == b'T' && t.starts_with("20"), "{t}");
}

#[test]
fn append_after_a_truncated_line_keeps_it_and_isolates_it() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("matrix.jsonl");
    let good = serde_json::to_string(&sample("good")).unwrap();
    let half = &good[..good.len() / 2];
    let before = format!("{good}\n{half}");
    std::fs::write(&path, &before).unwrap();

    Ledger::append(&path, &sample("new")).unwrap();
    let after = std::fs::read_to_string(&path).unwrap();
    assert!(after.starts_with(&before), "existing bytes must be untouched");
    let tail = &after[before.len()..];
    assert!(tail.starts_with('\n') && tail.ends_with('\n') && tail.matches('\n').count() == 2, "{tail:?}");

    let (entries, corrupt) = Ledger::read(&path).unwrap();
    assert_eq!(entries.iter().map(|e| e.notes.as_str()).collect::<Vec<_>>(), ["good", "new"]);
    assert_eq!(corrupt.len(), 1);
    assert_eq!(corrupt[0].line_no, 2);
    assert!(corrupt[0].why.contains("not valid JSON"), "{}", corrupt[0].why);

    // The file now ends in a newline: the next append adds exactly one line.
    Ledger::append(&path, &sample("third")).unwrap();
    let again = std::fs::read_to_string(&path).unwrap();
    assert!(again.starts_with(&after));
    assert_eq!(again[after.len()..].matches('\n').count(), 1);
    let (entries, corrupt) = Ledger::read(&path).unwrap();
    assert_eq!(entries.len(), 3);
    assert_eq!(corrupt.iter().map(|c| c.line_no).collect::<Vec<_>>(), [2]);
}

#[test]
fn an_unterminated_last_line_is_reported_as_incomplete() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("m.jsonl");
    let good = serde_json::to_string(&sample("good")).unwrap();
    std::fs::write(&path, format!("{good}\n{}", &good[..40])).unwrap();
    let (entries, corrupt) = Ledger::read(&path).unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(corrupt[0].line_no, 2);
    assert!(corrupt[0].why.starts_with("incomplete last line"), "{}", corrupt[0].why);
    // A complete entry without the final newline (hand-edited) is still read.
    std::fs::write(&path, &good).unwrap();
    let (entries, corrupt) = Ledger::read(&path).unwrap();
    assert_eq!((entries.len(), corrupt.len()), (1, 0));
}

#[test]
fn append_creates_the_file_and_its_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("a/b/matrix.jsonl");
    Ledger::append(&path, &sample("one")).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 1);
    assert!(text.ends_with('\n'));
    let (entries, corrupt) = Ledger::read(&path).unwrap();
    assert_eq!((entries, corrupt.len()), (vec![sample("one")], 0));
}

#[test]
fn concurrent_appends_give_whole_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("matrix.jsonl");
    // Long notes make each line far bigger than a pipe buffer or a page.
    let pad = "x".repeat(70_000);
    std::thread::scope(|scope| {
        for t in 0..6 {
            let (path, pad) = (&path, &pad);
            scope.spawn(move || {
                for i in 0..15 {
                    Ledger::append(path, &sample(&format!("t{t}-{i} {pad}"))).unwrap();
                }
            });
        }
    });
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.ends_with('\n'));
    assert_eq!(text.lines().count(), 90, "no extra or merged lines");
    let (entries, corrupt) = Ledger::read(&path).unwrap();
    assert!(corrupt.is_empty(), "{corrupt:?}");
    let notes: BTreeSet<String> = entries.iter().map(|e| e.notes.split(' ').next().unwrap().to_string()).collect();
    assert_eq!(notes.len(), 90);
    assert!(entries.iter().all(|e| e.notes.len() == pad.len() + e.notes.find(' ').unwrap() + 1));
}

#[test]
fn fixture_corrupt_line_is_reported_and_skipped() {
    let (entries, corrupt) = Ledger::read(&fixture("ledger.jsonl")).unwrap();
    assert_eq!(entries.len(), 5);
    assert_eq!(corrupt.len(), 1);
    assert_eq!(corrupt[0].line_no, 3);
    assert!(corrupt[0].why.starts_with("not valid JSON"), "{}", corrupt[0].why);
    let ids: Vec<&str> = entries.iter().map(|e| e.model.id.as_str()).collect();
    assert_eq!(ids, ["qwen3-30b-a3b", "glm-4.7-flash", "qwen3-30b-a3b", "qwen3-30b-a3b", "lfm2-8b-a1b"]);
    // latest(): one per (model, GPU), later lines win, sorted by model then GPU.
    let latest = zmoe::matrix::latest(&entries);
    let keys: Vec<(&str, &str, &str)> = latest.iter().map(|e| (e.key().0, e.key().1, e.date())).collect();
    assert_eq!(
        keys,
        [
            ("glm-4.7-flash", "NVIDIA H200", "2026-03-02"),
            ("lfm2-8b-a1b", "NVIDIA H200", "2026-03-06"),
            ("qwen3-30b-a3b", "NVIDIA H100 80GB HBM3", "2026-02-20"),
            ("qwen3-30b-a3b", "NVIDIA H200", "2026-03-05"),
        ]
    );
}

/// Runs `zmoe matrix ARGS…`, expects success, returns (stdout, stderr).
fn matrix(args: &[&str]) -> (String, String) {
    let mut all = vec!["matrix"];
    all.extend_from_slice(args);
    let out = zmoe(&all);
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(out.status.success(), "zmoe {all:?} failed:\n{stderr}");
    (stdout, stderr)
}

fn assert_warned_line_3(stderr: &str, ledger: &Path) {
    let want = format!("warning: {}:3: not valid JSON", ledger.display());
    assert!(stderr.lines().any(|l| l.starts_with(&want) && l.ends_with(", skipped")), "{stderr}");
    assert_eq!(stderr.lines().filter(|l| l.starts_with("warning:")).count(), 1, "{stderr}");
}

#[test]
fn report_shows_the_latest_entry_per_model_and_gpu() {
    let ledger = fixture("ledger.jsonl");
    let (out, err) = matrix(&["report", "--ledger", s(&ledger)]);
    assert_warned_line_3(&err, &ledger);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 6, "{out}");
    for h in
        ["model", "family", "GPU", "fidelity", "ref tok/s", "patched tok/s", "speedup", "roofline", "date", "commit"]
    {
        assert!(lines[0].contains(h), "header lacks {h}: {}", lines[0]);
    }
    assert!(lines[1].chars().all(|c| c == '-' || c == ' '));
    let cells = |l: &str| l.split("  ").map(str::trim).filter(|c| !c.is_empty()).map(String::from).collect::<Vec<_>>();
    assert_eq!(
        cells(lines[2]),
        [
            "glm-4.7-flash",
            "glm4_moe_lite",
            "NVIDIA H200",
            "FAIL 37/200",
            "84.6",
            "70.8",
            "0.837x",
            "2.6%",
            "2026-03-02",
            "a1b2c3d"
        ]
    );
    assert_eq!(cells(lines[3])[0], "lfm2-8b-a1b");
    assert_eq!(cells(lines[3])[6], "1.123x");
    assert_eq!(
        cells(lines[4]),
        [
            "qwen3-30b-a3b",
            "qwen3_moe",
            "NVIDIA H100 80GB HBM3",
            "PASS 200/200",
            "120.0",
            "123.6",
            "1.030x",
            "7.0%",
            "2026-02-20",
            "9f8e7d6"
        ]
    );
    assert_eq!(
        cells(lines[5]),
        [
            "qwen3-30b-a3b",
            "qwen3_moe",
            "NVIDIA H200",
            "PASS 200/200",
            "150.9",
            "168.9",
            "1.119x",
            "7.0%",
            "2026-03-05",
            "b4c5d6e-dirty"
        ]
    );
    // Columns line up: every row's speedup ends where the header's does.
    let end = lines[0].find("speedup").unwrap() + "speedup".len();
    for l in &lines[2..] {
        assert_eq!(&l[end - 1..end], "x", "misaligned row: {l}");
    }

    let (out, _) = matrix(&["report", "--ledger", s(&ledger), "--gpu", "h100"]);
    assert_eq!(out.lines().count(), 3, "{out}");
    assert!(out.contains("NVIDIA H100 80GB HBM3"));
    let (out, _) = matrix(&["report", "--ledger", s(&ledger), "--gpu", "B200"]);
    assert!(out.contains("no entries on a GPU matching `B200`"), "{out}");
}

#[test]
fn history_lists_matching_entries_oldest_first() {
    let ledger = fixture("ledger.jsonl");
    let (out, err) = matrix(&["history", "QWEN3", "--ledger", s(&ledger)]);
    assert_warned_line_3(&err, &ledger);
    let rows: Vec<&str> = out.lines().skip(2).collect();
    assert_eq!(rows.len(), 3, "{out}");
    // By timestamp, not ledger order: the H100 entry was appended later but ran first.
    assert!(rows[0].starts_with("2026-02-20T08:00:00Z") && rows[0].contains("NVIDIA H100"), "{}", rows[0]);
    assert!(rows[1].starts_with("2026-03-01T10:00:00Z") && rows[1].ends_with("first H200 run"), "{}", rows[1]);
    assert!(rows[2].starts_with("2026-03-05T16:45:10Z") && rows[2].contains("1.119x"), "{}", rows[2]);
    assert!(rows[2].contains("b4c5d6e-dirty") && rows[2].contains("moe_mlp") && rows[2].ends_with("fused combine"));

    // Notes with a newline stay on one line.
    let (out, _) = matrix(&["history", "glm", "--ledger", s(&ledger)]);
    assert_eq!(out.lines().count(), 3, "{out}");
    assert!(out.contains(r#"rmsnorm check: "fails", <b>regress</b> & more\nsecond line"#), "{out}");
    assert!(out.contains("FAIL 37/200"));

    let (out, _) = matrix(&["history", "deepseek", "--ledger", s(&ledger)]);
    assert!(out.contains("no entry") && out.contains("glm-4.7-flash, lfm2-8b-a1b, qwen3-30b-a3b"), "{out}");
}

#[test]
fn diff_matches_model_and_gpu_and_lists_the_rest() {
    let (a, b) = (fixture("ledger.jsonl"), fixture("ledger_b.jsonl"));
    let (out, err) = matrix(&["diff", s(&a), s(&b)]);
    assert_warned_line_3(&err, &a);
    let row = |model: &str| out.lines().find(|l| l.starts_with(model)).unwrap_or_else(|| panic!("no {model}:\n{out}"));
    let glm = row("glm-4.7-flash");
    assert!(glm.contains("FAIL 37/200 → PASS 200/200") && glm.contains("0.837x → 1.060x"), "{glm}");
    assert!(glm.contains("70.8 → 89.0") && glm.contains("+25.7%"), "{glm}");
    let qwen = row("qwen3-30b-a3b  NVIDIA H200");
    assert!(qwen.contains("PASS 200/200  ") && !qwen.contains("PASS 200/200 →"), "unchanged fidelity once: {qwen}");
    assert!(qwen.contains("168.9 → 170.3") && qwen.contains("+0.8%") && qwen.contains("1.119x → 1.132x"), "{qwen}");
    let only_a = out.split("only in A:").nth(1).expect("only in A section");
    let only_a = only_a.split("only in B:").next().unwrap();
    assert!(only_a.contains("lfm2-8b-a1b on NVIDIA H200") && only_a.contains("qwen3-30b-a3b on NVIDIA H100"), "{out}");
    let only_b = out.split("only in B:").nth(1).expect("only in B section");
    assert!(only_b.contains("gpt-oss-20b on NVIDIA H200: PASS 200/200, 200.0 → 204.0 tok/s (1.020x)"), "{out}");
    assert!(!only_b.contains("lfm2"));
}

/// A minimal RFC 4180 reader: rows of fields.
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let (mut rows, mut row, mut field) = (Vec::new(), Vec::new(), String::new());
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') if field.is_empty() => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (false, c) => field.push(c),
        }
    }
    assert!(!quoted && field.is_empty() && row.is_empty(), "CSV must end with a newline");
    rows
}

#[test]
fn csv_has_one_quoted_row_per_entry() {
    let ledger = fixture("ledger.jsonl");
    let (out, err) = matrix(&["csv", "--ledger", s(&ledger)]);
    assert_warned_line_3(&err, &ledger);
    let rows = parse_csv(&out);
    assert_eq!(rows.len(), 6, "header + 5 entries");
    let header = &rows[0];
    assert!(rows.iter().all(|r| r.len() == header.len()), "ragged rows");
    let col = |name: &str| header.iter().position(|h| h == name).unwrap_or_else(|| panic!("no column {name}"));
    // Ledger order.
    let ids: Vec<&str> = rows[1..].iter().map(|r| r[col("model_id")].as_str()).collect();
    assert_eq!(ids, ["qwen3-30b-a3b", "glm-4.7-flash", "qwen3-30b-a3b", "qwen3-30b-a3b", "lfm2-8b-a1b"]);
    let glm = &rows[2];
    assert_eq!(glm[col("notes")], "rmsnorm check: \"fails\", <b>regress</b> & more\nsecond line");
    assert_eq!(glm[col("fidelity")], "FAIL");
    assert_eq!(glm[col("first_divergence")], "37");
    assert_eq!(glm[col("patterns_requested")], "rmsnorm");
    assert_eq!(rows[1][col("patterns_requested")], "default");
    assert_eq!(rows[1][col("ref_decode_runs")], "150.1;151.3;150.7");
    assert_eq!(rows[1][col("patched_decode_tps")], "158.5");
    assert_eq!(rows[4][col("git_dirty")], "true");
    assert_eq!(rows[5][col("notes")], "plain, with comma");
    assert!(out.contains("\"plain, with comma\""));
}

#[test]
fn html_is_self_contained_escaped_and_never_overwrites() {
    let tmp = tempfile::tempdir().unwrap();
    let page = tmp.path().join("matrix.html");
    let ledger = fixture("ledger.jsonl");
    let (out, err) = matrix(&["html", "--ledger", s(&ledger), "--out", s(&page)]);
    assert!(out.is_empty());
    assert_warned_line_3(&err, &ledger);
    assert!(err.contains(&format!("wrote {} (4 model × GPU rows from 5 entries)", page.display())), "{err}");
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>") && html.trim_end().ends_with("</html>"));
    assert_eq!(html.matches("<svg").count(), 1);
    assert_eq!(html.matches("</svg>").count(), 1);
    // Two bars (speedup, roofline) per model × GPU and no other rects.
    assert_eq!(html.matches("<rect").count(), 8);
    assert_eq!(html.matches("<rect class=\"roofline\"").count(), 4);
    assert_eq!(html.matches("<rect class=\"speedup fail\"").count(), 1);
    assert_eq!(html.matches("<rect class=\"speedup up\"").count(), 3);
    assert_eq!(html.matches("<line class=\"ref\"").count(), 1, "the 1.0× reference line");
    // Table: header + 4 rows, latest entry per model × GPU, sorted.
    assert_eq!(html.matches("<tr>").count(), 5);
    let order: Vec<usize> =
        [">glm-4.7-flash</td>", ">lfm2-8b-a1b</td>", ">NVIDIA H100 80GB HBM3</td>", ">b4c5d6e-dirty</td>"]
            .iter()
            .map(|k| html.find(k).unwrap_or_else(|| panic!("no {k}")))
            .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
    assert!(html.contains("1.119x") && html.contains("0.837x FAIL"));
    // Escaping: the notes' markup is text, not markup.
    assert!(html.contains("rmsnorm check: &quot;fails&quot;, &lt;b&gt;regress&lt;/b&gt; &amp; more\nsecond line"));
    assert!(!html.contains("<b>regress"));
    // Self-contained: nothing fetched.
    for bad in ["<script", "<link", "src=", "href=", "url(", "@import"] {
        assert!(!html.contains(bad), "page contains {bad}");
    }
    assert_eq!(html.matches("http").count(), 1, "only the SVG namespace");

    // Never overwrite without --force; with it, replace.
    std::fs::write(&page, "keep me").unwrap();
    let e = zmoe_err(&["matrix", "html", "--ledger", s(&ledger), "--out", s(&page)]);
    assert!(e.contains("file exists") && e.contains("--force"), "{e}");
    assert_eq!(std::fs::read_to_string(&page).unwrap(), "keep me");
    matrix(&["html", "--ledger", s(&ledger), "--out", s(&page), "--force"]);
    assert!(std::fs::read_to_string(&page).unwrap().starts_with("<!DOCTYPE html>"));
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1, "no temporary file left behind");

    let e = zmoe_err(&["matrix", "html", "--ledger", s(&ledger), "--out", s(&tmp.path().join("no/such/dir/x.html"))]);
    assert!(e.contains("does not exist"), "{e}");
}

#[test]
fn missing_and_empty_ledgers() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope.jsonl");
    for sub in ["report", "csv", "history"] {
        let mut args = vec!["matrix", sub, "--ledger", s(&missing)];
        if sub == "history" {
            args.insert(2, "qwen");
        }
        let e = zmoe_err(&args);
        assert!(e.contains(&format!("no ledger at {}", missing.display())), "{e}");
    }
    let e = zmoe_err(&["matrix", "diff", s(&fixture("ledger.jsonl")), s(&missing)]);
    assert!(e.contains(&format!("no ledger at {}", missing.display())), "{e}");
    let e = zmoe_err(&["matrix", "report", "--ledger", s(tmp.path())]);
    assert!(e.contains("is a folder"), "{e}");

    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let (out, _) = matrix(&["report", "--ledger", s(&empty)]);
    assert_eq!(out, format!("{}: the ledger has no entries\n", empty.display()));
    let (out, _) = matrix(&["history", "x", "--ledger", s(&empty)]);
    assert!(out.contains("the ledger has no entries"));
    let (out, err) = matrix(&["csv", "--ledger", s(&empty)]);
    assert_eq!(out.lines().count(), 1, "header only");
    assert!(err.contains("the ledger has no entries"));
    let e = zmoe_err(&["matrix", "html", "--ledger", s(&empty), "--out", s(&tmp.path().join("x.html"))]);
    assert!(e.contains("no entries; nothing to render"), "{e}");
    assert!(!tmp.path().join("x.html").exists());

    // Only corrupt lines: warnings, then "no entries".
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{oops\n").unwrap();
    let (out, err) = matrix(&["report", "--ledger", s(&bad)]);
    assert!(out.contains("no entries") && err.contains(":1: not valid JSON"), "{out}{err}");
}

#[test]
fn matrix_help() {
    for sub in ["history", "report", "diff", "csv", "html", "catalog", "run"] {
        let (out, _) = matrix(&[sub, "--help"]);
        assert!(out.contains("Usage: zmoe matrix"), "{out}");
    }
    let (out, _) = matrix(&["report", "--help"]);
    assert!(out.contains("--ledger") && out.contains("bench/matrix.jsonl"), "{out}");
}

// ---- matrix catalog / matrix run ----

/// Runs `zmoe ARGS…` with `ZMOE_CACHE` set to `cache`: (success, stdout, stderr).
fn zmoe_in(cache: &Path, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_zmoe"))
        .args(args)
        .env("ZMOE_CACHE", cache)
        .output()
        .expect("run zmoe");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// The cells of the catalog row starting with `name`.
fn catalog_row(out: &str, name: &str) -> Vec<String> {
    let line = out.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("no {name}:\n{out}"));
    line.split("  ").map(str::trim).filter(|c| !c.is_empty()).map(String::from).collect()
}

#[test]
fn catalog_lists_presets_and_model_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let tiny = synth_tiny(tmp.path(), "tiny-a4", SynthQuant::Affine4, 0);
    let (out, _) = matrix(&["catalog", "--model", s(&tiny)]);
    let header = out.lines().next().unwrap();
    for h in ["model", "family", "params", "active/token", "quant", "default patterns", "excluded patterns"] {
        assert!(header.contains(h), "header lacks {h}: {header}");
    }
    let defaults = qwen3_defaults();
    let all = defaults.join(",");
    let all = all.as_str();
    assert_eq!(
        catalog_row(&out, "qwen3_moe/tiny"),
        [
            "qwen3_moe/tiny",
            "qwen3_moe",
            "6.31M",
            "2.51M",
            "bf16|affine4|affine8",
            all,
            "shared_expert (no shared experts in this family); conv_mixer (no short-conv layers in this family); \
             norm_qkv (opt-in (--patterns): not yet measured on a GPU)"
        ]
    );
    assert_eq!(
        catalog_row(&out, "qwen3_moe/qwen3-30b-a3b"),
        [
            "qwen3_moe/qwen3-30b-a3b",
            "qwen3_moe",
            "30.53B",
            "3.04B",
            "bf16|affine4|affine8",
            all,
            "shared_expert (no shared experts in this family); conv_mixer (no short-conv layers in this family); \
             norm_qkv (opt-in (--patterns): not yet measured on a GPU)"
        ]
    );
    // The folder: counted from its config, format from its weights (the router stays 8-bit).
    assert_eq!(
        catalog_row(&out, "tiny-a4"),
        [
            "tiny-a4",
            "qwen3_moe",
            "6.31M",
            "2.51M",
            "affine4g64 (router affine8g64)",
            all,
            "shared_expert (no shared experts in this family); conv_mixer (no short-conv layers in this family); \
             norm_qkv (opt-in (--patterns): not yet measured on a GPU)"
        ]
    );
    assert!(out.contains(&format!("tiny-a4: {}", tiny.display())), "{out}");
    assert!(out.contains("qwen3_moe/qwen3-30b-a3b: Qwen3-30B-A3B shapes"), "{out}");
    assert!(out.contains("one embedding row"), "the counting rule is stated: {out}");

    // Presets alone; a bf16 folder says bf16.
    let bf16 = synth_tiny(tmp.path(), "tiny-bf16", SynthQuant::Bf16, 0);
    let (out, _) = matrix(&["catalog", "--model", s(&bf16)]);
    assert_eq!(catalog_row(&out, "tiny-bf16")[4], "bf16");
    let (out, _) = matrix(&["catalog"]);
    assert!(out.contains("qwen3_moe/tiny") && !out.contains("tiny-bf16"), "{out}");

    // A bad folder is an error naming it.
    let missing = tmp.path().join("no-such-model");
    let e = zmoe_err(&["matrix", "catalog", "--model", s(&missing)]);
    assert!(e.contains(&format!("--model {}", missing.display())) && e.contains("cannot load"), "{e}");
    std::fs::create_dir(tmp.path().join("empty")).unwrap();
    let e = zmoe_err(&["matrix", "catalog", "--model", s(&tmp.path().join("empty"))]);
    assert!(e.contains("empty") && e.contains("config.json"), "{e}");
}

/// The qwen3_moe family's default patterns, in application order.
fn qwen3_defaults() -> Vec<String> {
    let policy = zmoe::plan::patterns::policy(zmoe::config::Family::Qwen3Moe);
    policy.defaults.iter().map(|p| p.name().to_string()).collect()
}

/// `matrix run` on the CPU, tiny settings.
fn run_args<'a>(ledger: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["matrix", "run", "--backend", "cpu", "--runs", "1", "--max-tokens", "8", "--ledger", s(ledger)];
    v.extend_from_slice(extra);
    v
}

fn ledger_entries(path: &Path) -> Vec<Entry> {
    let (entries, corrupt) = Ledger::read(path).unwrap();
    assert!(corrupt.is_empty(), "{corrupt:?}");
    entries
}

#[test]
fn run_appends_one_entry_per_model_and_never_rewrites() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let tiny = synth_tiny(tmp.path(), "tiny", SynthQuant::Affine4, 0);
    let ledger = tmp.path().join("bench/matrix.jsonl");

    let (ok, out, err) = zmoe_in(&cache, &run_args(&ledger, &["--model", s(&tiny), "--notes", "first, \"quoted\""]));
    assert!(ok, "{err}");
    assert!(out.contains("== tiny ==\nFIDELITY: 8/8 tokens identical [PASS]"), "{out}");
    assert!(out.contains(&format!("appended to {}", ledger.display())), "{out}");
    assert!(out.contains("matrix run: 1 model: 1 PASS, 0 FAIL, 0 could not run; 1 entry appended"), "{out}");
    assert!(err.contains("reference") && err.contains("patched") && err.contains("decode"), "progress: {err}");
    // The one-row report is the `matrix report` row.
    let row = out.lines().find(|l| l.starts_with("tiny  ")).unwrap_or_else(|| panic!("no report row:\n{out}"));
    assert!(row.contains("qwen3_moe") && row.contains("PASS 8/8") && row.contains('x'), "{row}");

    let first = std::fs::read(&ledger).unwrap();
    assert_eq!(first.iter().filter(|&&b| b == b'\n').count(), 1, "exactly one line");
    let entries = ledger_entries(&ledger);
    let e = &entries[0];
    assert_eq!(e.schema_version, SCHEMA_VERSION);
    assert_eq!(e.model, ModelInfo { id: "tiny".into(), family: "qwen3_moe".into(), quant: Some("affine4g64".into()) });
    assert_eq!(e.fidelity.verdict, Verdict::Pass);
    assert_eq!((e.fidelity.identical, e.fidelity.total, &e.fidelity.first_divergence), (8, 8, &None));
    let applied: BTreeSet<&String> = e.patterns_applied.iter().collect();
    assert_eq!(applied, qwen3_defaults().iter().collect(), "every default pattern applies to tiny");
    assert!(e.steps_patched > 0);
    for p in [&e.reference, &e.patched] {
        assert_eq!((p.decode_tps.len(), p.prefill_tps.len()), (1, 1));
        assert!(p.decode_median > 0.0 && p.prefill_median > 0.0);
        assert!(p.achieved_gbps > 0.0 && p.copy_gbps > 0.0 && p.roofline_pct > 0.0);
    }
    assert!(e.speedup.decode > 0.0 && e.speedup.prefill > 0.0);
    assert!(!e.hardware.name.is_empty());
    assert_eq!(e.software.zmoe_version, env!("CARGO_PKG_VERSION"));
    assert!(!e.software.git_commit.is_empty());
    assert_eq!((&e.software.driver, &e.software.cuda), (&None, &None), "CPU run");
    assert_eq!(e.settings.runs, 1);
    assert_eq!(e.settings.warmup, Some(1));
    assert_eq!((e.settings.max_tokens, e.settings.prompt_tokens), (8, 64));
    assert_eq!(e.settings.patterns_requested, None);
    assert!(e.settings.backend.starts_with("cpu"), "{}", e.settings.backend);
    assert_eq!(e.notes, "first, \"quoted\"");
    let t = &e.timestamp_utc;
    assert!(t.len() == 20 && t.ends_with('Z'), "{t}");

    // A second run appends a second line and leaves the first byte for byte.
    let (ok, _, err) =
        zmoe_in(&cache, &run_args(&ledger, &["--model", s(&tiny), "--patterns", "moe_mlp", "--notes", "second"]));
    assert!(ok, "{err}");
    let both = std::fs::read(&ledger).unwrap();
    assert!(both.starts_with(&first), "the first entry was rewritten");
    assert_eq!(both[first.len()..].iter().filter(|&&b| b == b'\n').count(), 1);
    let entries = ledger_entries(&ledger);
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0], *e);
    assert_eq!(entries[1].notes, "second");
    assert_eq!(entries[1].patterns_applied, ["moe_mlp"]);
    assert_eq!(entries[1].settings.patterns_requested, Some(vec!["moe_mlp".to_string()]));

    // The views read what run wrote.
    let (out, _) = matrix(&["history", "tiny", "--ledger", s(&ledger)]);
    assert_eq!(out.lines().count(), 4, "{out}");
    assert!(out.contains("second"), "{out}");
}

#[test]
fn run_synthesises_presets_into_the_cache_and_reuses_them() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let ledger = tmp.path().join("m.jsonl");
    let (ok, out, err) = zmoe_in(&cache, &run_args(&ledger, &["--preset", "tiny"]));
    assert!(ok, "{err}");
    let dir = cache.join("presets/qwen3_moe-tiny-affine4-seed0");
    assert!(dir.join("config.json").is_file() && dir.join("model.safetensors").is_file());
    assert!(err.contains("synthesising preset qwen3_moe/tiny"), "{err}");
    assert!(out.contains("== qwen3_moe/tiny@affine4 ==") && out.contains("[PASS]"), "{out}");
    let entries = ledger_entries(&ledger);
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].model.id, "qwen3_moe/tiny@affine4");
    assert_eq!(entries[0].model.quant.as_deref(), Some("affine4g64"));

    // Cached the second time; `family/preset@quant` picks another format.
    let (ok, _, err) = zmoe_in(&cache, &run_args(&ledger, &["--preset", "qwen3_moe/tiny"]));
    assert!(ok, "{err}");
    assert!(err.contains("using cached preset") && !err.contains("synthesising"), "{err}");
    assert_eq!(ledger_entries(&ledger).len(), 2);

    let (ok, _, err) = zmoe_in(&cache, &run_args(&ledger, &["--preset", "nope"]));
    assert!(!ok && err.contains("unknown preset") && err.contains("qwen3_moe/tiny"), "{err}");
    assert_eq!(ledger_entries(&ledger).len(), 2, "an argument error runs nothing");
}

#[test]
fn run_reports_a_broken_model_runs_the_rest_and_fails_at_the_end() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let tiny = synth_tiny(tmp.path(), "tiny", SynthQuant::Affine4, 0);
    let missing = tmp.path().join("missing-model");
    let ledger = tmp.path().join("m.jsonl");
    let (ok, out, err) = zmoe_in(&cache, &run_args(&ledger, &["--model", s(&missing), "--model", s(&tiny)]));
    assert!(!ok, "a model that cannot run fails the command");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains(&format!("error: missing-model: --model {}: no such model folder", missing.display())),
        "{err}"
    );
    assert!(err.lines().last().unwrap().contains("could not run (not recorded): missing-model"), "{err}");
    assert!(out.contains("matrix run: 2 models: 1 PASS, 0 FAIL, 1 could not run; 1 entry appended"), "{out}");
    let entries = ledger_entries(&ledger);
    assert_eq!(
        entries.iter().map(|e| e.model.id.as_str()).collect::<Vec<_>>(),
        ["tiny"],
        "nothing for the missing one"
    );

    // Nothing to run at all: a usage error.
    let (ok, _, err) = zmoe_in(&cache, &["matrix", "run", "--ledger", s(&ledger)]);
    assert!(!ok && err.contains("--model") && err.contains("--preset") && err.contains("--all"), "{err}");
}
