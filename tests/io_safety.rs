//! What zmoe does with the user's files (issue 14): `--force` replaces only what zmoe wrote
//! itself, never through a symbolic link; outputs are checked before a long run; inputs that
//! are not regular files are refused instead of hanging; errors name the OS problem once;
//! capsules record the commit the binary was built from; a broken demo cache says how to
//! clear it.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{copy_model, s, zmoe, zmoe_err};
use zmoe::checkpoint::synth::SynthQuant;

/// The tiny model this binary's tests share (read-only).
fn model() -> &'static Path {
    common::shared_tiny(SynthQuant::Affine4, 3)
}

/// Runs zmoe in `cwd` with extra environment variables.
fn zmoe_in(cwd: &Path, env: &[(&str, &Path)], args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_zmoe"));
    c.current_dir(cwd).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run zmoe")
}

/// Like `zmoe_err`, for [`zmoe_in`]'s output.
fn failed(out: &Output, what: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "expected failure for {what}, got success:\n{err}");
    assert_eq!(out.status.code(), Some(1), "{what}: exit code\n{err}");
    assert!(!err.contains("panicked"), "panic for {what}:\n{err}");
    assert!(err.contains("error: "), "no clean error for {what}:\n{err}");
    err
}

fn synth(out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["synth", "--preset", "tiny", "--quant", "bf16", "--out", s(out)];
    args.extend_from_slice(extra);
    zmoe(&args)
}

/// Names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn synth_force_replaces_only_folders_zmoe_wrote() {
    let tmp = tempfile::tempdir().unwrap();
    // The reported data loss: `--out . --force` in a folder that holds a config.json.
    let user = tmp.path().join("project");
    std::fs::create_dir(&user).unwrap();
    std::fs::write(user.join("config.json"), "{\"mine\": true}").unwrap();
    std::fs::write(user.join("notes.txt"), "precious").unwrap();
    for out in [".", "./", "../project", s(&user)] {
        let e = failed(&zmoe_in(&user, &[], &["synth", "--preset", "tiny", "--out", out, "--force"]), out);
        assert!(e.contains("--out") && e.contains("refusing"), "{e}");
        assert_eq!(names(&user), ["config.json", "notes.txt"], "{out}");
    }
    assert_eq!(std::fs::read_to_string(user.join("notes.txt")).unwrap(), "precious");
    assert_eq!(names(tmp.path()), ["project"], "nothing left beside it");
    // `..` (the parent of the current folder) is never replaced either.
    let sub = user.join("sub");
    std::fs::create_dir(&sub).unwrap();
    failed(&zmoe_in(&sub, &[], &["synth", "--preset", "tiny", "--out", "..", "--force"]), "..");
    assert_eq!(std::fs::read_to_string(user.join("notes.txt")).unwrap(), "precious");

    // A folder zmoe wrote is replaced with --force (and only with it)...
    let m = tmp.path().join("m");
    assert!(synth(&m, &[]).status.success());
    let first = names(&m);
    assert!(first.contains(&".zmoe-synth".to_string()), "marker written: {first:?}");
    let e = zmoe_err(&["synth", "--preset", "tiny", "--out", s(&m)]);
    assert!(e.contains("--force"), "{e}");
    let out = synth(&m, &["--force", "--seed", "7"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(std::fs::read_to_string(m.join("config.json")).unwrap().contains("\"seed\": 7"));
    // ... but not once it holds a file zmoe did not write.
    std::fs::write(m.join("my-notes.md"), "mine").unwrap();
    let e = zmoe_err(&["synth", "--preset", "tiny", "--out", s(&m), "--force"]);
    assert!(e.contains("my-notes.md") && e.contains("refusing"), "{e}");
    assert_eq!(std::fs::read_to_string(m.join("my-notes.md")).unwrap(), "mine");
    std::fs::remove_file(m.join("my-notes.md")).unwrap();
    // Nor from inside it, nor when it is the home folder.
    failed(&zmoe_in(&m, &[], &["synth", "--preset", "tiny", "--out", ".", "--force"]), ". (zmoe's)");
    let e = failed(&zmoe_in(&m, &[], &["synth", "--preset", "tiny", "--out", s(&m), "--force"]), "cwd");
    assert!(e.contains("current folder"), "{e}");
    let e =
        failed(&zmoe_in(tmp.path(), &[("HOME", &m)], &["synth", "--preset", "tiny", "--out", "m", "--force"]), "home");
    assert!(e.contains("home folder"), "{e}");
    // A folder without the marker, even one that looks like a model, is not replaced.
    let look = tmp.path().join("lookalike");
    copy_model(model(), &look);
    let _ = std::fs::remove_file(look.join(".zmoe-synth"));
    let e = zmoe_err(&["synth", "--preset", "tiny", "--out", s(&look), "--force"]);
    assert!(e.contains(".zmoe-synth") && e.contains("refusing"), "{e}");
    // Nor a symbolic link to a zmoe folder.
    #[cfg(unix)]
    {
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&m, &link).unwrap();
        let e = zmoe_err(&["synth", "--preset", "tiny", "--out", s(&link), "--force"]);
        assert!(e.contains("symbolic link"), "{e}");
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    }
    assert!(
        names(tmp.path()).iter().all(|n| !n.contains("partial") && !n.contains("zmoe-old")),
        "{:?}",
        names(tmp.path())
    );
}

#[test]
fn synth_cleans_up_only_its_own_stale_partial_folders() {
    let tmp = tempfile::tempdir().unwrap();
    // A synth killed mid-write: a big preset, killed once its partial folder has the marker.
    let mut child = Command::new(env!("CARGO_BIN_EXE_zmoe"))
        .args(["synth", "--preset", "qwen3-30b-a3b", "--out", s(&tmp.path().join("big"))])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let partial = loop {
        let found = names(tmp.path()).into_iter().find(|n| n.starts_with(".big.zmoe-partial-"));
        if let Some(p) = found.map(|n| tmp.path().join(n)).filter(|p| p.join(".zmoe-synth").exists()) {
            break Some(p);
        }
        if t0.elapsed() > Duration::from_secs(60) || child.try_wait().unwrap().is_some() {
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let _ = child.kill();
    child.wait().unwrap();
    let partial = partial.unwrap_or_else(|| panic!("no partial folder with a marker: {:?}", names(tmp.path())));
    assert!(partial.is_dir());
    // Partial-looking folders zmoe did not make stay.
    let foreign = tmp.path().join(".data.zmoe-partial-0000000000000000");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("keep.txt"), "mine").unwrap();
    let mixed = tmp.path().join(".x.zmoe-partial-1111111111111111");
    copy_model(model(), &mixed);
    std::fs::write(mixed.join("keep.txt"), "mine").unwrap();

    let out = synth(&tmp.path().join("small"), &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!partial.exists(), "stale partial left: {:?}", names(tmp.path()));
    assert_eq!(std::fs::read_to_string(foreign.join("keep.txt")).unwrap(), "mine");
    assert_eq!(std::fs::read_to_string(mixed.join("keep.txt")).unwrap(), "mine");
    assert_eq!(names(tmp.path()), [".data.zmoe-partial-0000000000000000", ".x.zmoe-partial-1111111111111111", "small"]);
}

#[cfg(unix)]
#[test]
fn force_never_writes_through_or_replaces_a_symlink() {
    use std::os::unix::fs::symlink;
    let tmp = tempfile::tempdir().unwrap();
    let victim = tmp.path().join("victim.txt");
    std::fs::write(&victim, "secret").unwrap();
    let link = |name: &str| {
        let p = tmp.path().join(name);
        symlink(&victim, &p).unwrap();
        p
    };
    let check = |e: &str, p: &Path| {
        assert!(e.contains(s(p)) && e.contains("symbolic link"), "{e}");
        assert!(std::fs::symlink_metadata(p).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "secret");
    };
    let cap = link("cap.json");
    let m = s(model());
    for force in [false, true] {
        let mut a = vec!["validate", "--model", m, "--backend", "cpu", "--max-tokens", "2", "--runs", "1"];
        a.extend_from_slice(&["--warmup", "0", "--prompt-len", "3", "--capsule", s(&cap)]);
        if force {
            a.push("--force");
        }
        check(&zmoe_err(&a), &cap);
    }
    let gguf = link("x.gguf");
    check(&zmoe_err(&["export", "gguf", "--model", m, "--quant", "q8_0", "--out", s(&gguf), "--force"]), &gguf);
    let page = link("page.html");
    let ledger = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/matrix/ledger.jsonl");
    check(&zmoe_err(&["matrix", "html", "--ledger", s(&ledger), "--out", s(&page), "--force"]), &page);
    let camp = tmp.path().join("camp");
    let d = s(&camp);
    let r = zmoe(&["foundry", "run", "--op", "moe_combine", "--backend", "mock", "--out", d, "--cases", "4"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let pack = link("pack.json");
    check(&zmoe_err(&["foundry", "promote", d, "--out", s(&pack), "--force"]), &pack);
    // A ledger that is a link is not appended through either.
    let l = link("ledger.jsonl");
    let e = zmoe_err(&["matrix", "run", "--model", m, "--backend", "cpu", "--runs", "1", "--ledger", s(&l)]);
    check(&e, &l);
    let camp2 = tmp.path().join("camp2");
    std::fs::create_dir(&camp2).unwrap();
    symlink(&victim, camp2.join("attempts.ndjson")).unwrap();
    let e = zmoe_err(&["foundry", "run", "--op", "moe_combine", "--backend", "mock", "--out", s(&camp2)]);
    check(&e, &camp2.join("attempts.ndjson"));
}

/// Outputs that cannot be written are named before the long run starts (`/proc/self` takes no
/// new files, even for root).
#[cfg(target_os = "linux")]
#[test]
fn unwritable_outputs_fail_before_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let m = s(model());
    let bad = Path::new("/proc/self/zmoe-out.json");
    let fast = |args: &[&str], flag: &str| {
        let out = zmoe_in(tmp.path(), &[("ZMOE_CACHE", tmp.path())], args);
        let e = failed(&out, flag);
        assert!(e.contains(flag) && e.contains(s(bad)), "{e}");
        assert!(!e.contains("run 1/") && !e.contains("reference plan"), "the run started:\n{e}");
        assert!(e.lines().count() <= 2, "{e}");
    };
    let common = ["--model", m, "--backend", "cpu", "--runs", "1"];
    let mut a = vec!["bench"];
    a.extend_from_slice(&common);
    a.extend_from_slice(&["--prompt-tokens", "4", "--gen-tokens", "2", "--json", s(bad)]);
    fast(&a, "--json");
    let mut a = vec!["validate"];
    a.extend_from_slice(&common);
    a.extend_from_slice(&["--max-tokens", "2", "--capsule", s(bad)]);
    fast(&a, "--capsule");
    fast(&["export", "gguf", "--model", m, "--quant", "q8_0", "--out", s(bad)], "--out");
    let mut a = vec!["matrix", "run", "--preset", "tiny", "--backend", "cpu", "--runs", "1", "--ledger", s(bad)];
    a.extend_from_slice(&["--max-tokens", "2"]);
    fast(&a, "--ledger");
    assert!(!tmp.path().join("presets").exists(), "the preset was synthesised before the ledger was checked");
    let camp = Path::new("/proc/self/zmoe-camp");
    let e = zmoe_err(&["foundry", "run", "--op", "moe_combine", "--backend", "mock", "--out", s(camp)]);
    assert!(e.contains("--out") && e.contains(s(camp)), "{e}");
    // A ledger folder that is a file is named too.
    let file = tmp.path().join("f");
    std::fs::write(&file, "x").unwrap();
    let l = file.join("ledger.jsonl");
    let mut a = vec!["matrix", "run", "--model", m, "--backend", "cpu", "--runs", "1", "--ledger", s(&l)];
    a.extend_from_slice(&["--max-tokens", "2"]);
    let e = zmoe_err(&a);
    assert!(e.contains("--ledger") && e.contains(s(&file)), "{e}");
}

#[test]
fn os_errors_are_printed_once() {
    let tmp = tempfile::tempdir().unwrap();
    let e = zmoe_err(&["patterns", "--model", s(tmp.path())]);
    assert_eq!(e.matches("No such file or directory").count(), 1, "{e}");
    assert!(e.contains("config.json"), "{e}");
    let e = zmoe_err(&["matrix", "report", "--ledger", s(tmp.path())]);
    assert!(e.matches("os error").count() <= 1, "{e}");
    let e = zmoe_err(&["foundry", "report", s(&tmp.path().join("attempts.ndjson"))]);
    assert!(e.matches("os error").count() <= 1, "{e}");
}

/// Runs zmoe and kills it if it takes longer than `secs` (a hang is a failure).
fn zmoe_timeout(args: &[&str], secs: u64) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_zmoe"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > Duration::from_secs(secs) {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!("zmoe {args:?} hung; stderr so far:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[cfg(unix)]
#[test]
fn non_regular_inputs_are_refused_not_read() {
    let mkfifo = |p: &Path| {
        let ok = Command::new("mkfifo").arg(p).status().map(|s| s.success()).unwrap_or(false);
        assert!(ok, "mkfifo {}", p.display());
    };
    for (file, kind) in [
        ("config.json", "fifo"),
        ("model.safetensors", "fifo"),
        ("tokenizer.json", "fifo"),
        ("model.safetensors", "folder"),
        ("model.safetensors", "dev"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        copy_model(model(), tmp.path());
        let p = tmp.path().join(file);
        std::fs::remove_file(&p).unwrap();
        match kind {
            "fifo" => mkfifo(&p),
            "folder" => std::fs::create_dir(&p).unwrap(),
            _ => std::os::unix::fs::symlink("/dev/zero", &p).unwrap(),
        }
        let out = zmoe_timeout(&["generate", "--model", s(tmp.path()), "--prompt", "hi", "--max-tokens", "2"], 30);
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{file} as {kind}: succeeded");
        assert!(e.contains(s(&p)) && e.contains("not a regular file"), "{file} as {kind}: {e}");
    }
    // A capsule given to `report` and a ledger that are pipes.
    let tmp = tempfile::tempdir().unwrap();
    let pipe = tmp.path().join("pipe.json");
    mkfifo(&pipe);
    let e = String::from_utf8_lossy(&zmoe_timeout(&["report", s(&pipe)], 30).stderr).into_owned();
    assert!(e.contains("not a regular file"), "{e}");
    let e = String::from_utf8_lossy(&zmoe_timeout(&["matrix", "report", "--ledger", s(&pipe)], 30).stderr).into_owned();
    assert!(e.contains("not a regular file"), "{e}");
}

#[test]
fn capsules_record_the_binarys_build_commit_not_the_folders() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let git = |dir: &Path, args: &[&str]| {
        Command::new("git").current_dir(dir).args(args).output().ok().filter(|o| o.status.success())
    };
    let Some(head) = git(repo, &["rev-parse", "--short", "HEAD"]) else {
        eprintln!("skipped: not built from a git checkout");
        return;
    };
    let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
    // Run in a folder that is not a checkout: the commit is still the build's.
    let tmp = tempfile::tempdir().unwrap();
    let cap = tmp.path().join("b.json");
    let mut c = Command::new(env!("CARGO_BIN_EXE_zmoe"));
    c.current_dir(tmp.path());
    c.args(["bench", "--model", s(model()), "--backend", "cpu", "--runs", "1", "--warmup", "0"]);
    c.args(["--prompt-tokens", "4", "--gen-tokens", "2", "--json", s(&cap)]);
    let out = c.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cap).unwrap()).unwrap();
    assert_eq!(v["git_commit"], head.as_str(), "{v}");
}

#[test]
fn a_broken_demo_cache_says_how_to_clear_it_or_is_rebuilt() {
    let demo =
        |cache: &Path| zmoe_in(cache, &[("ZMOE_CACHE", cache)], &["demo", "--backend", "cpu", "--max-tokens", "2"]);
    // A folder zmoe did not write (no marker): named, with the command that clears it.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("presets/qwen3_moe-tiny-affine4-seed0");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), "{ broken").unwrap();
    std::fs::write(dir.join("model.safetensors"), "broken").unwrap();
    let e = failed(&demo(tmp.path()), "demo");
    assert!(e.contains(&format!("rm -rf {}", dir.display())), "{e}");
    assert_eq!(std::fs::read_to_string(dir.join("config.json")).unwrap(), "{ broken");
    // zmoe's own cache folder, damaged: re-synthesised.
    std::fs::remove_dir_all(&dir).unwrap();
    let out = demo(tmp.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(dir.join(".zmoe-synth").is_file());
    std::fs::write(dir.join("model.safetensors"), "truncated").unwrap();
    let out = demo(tmp.path());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{e}");
    assert!(e.contains("re-synthesising"), "{e}");
}
