//! Embeds the commit zmoe is built from, so capsules and ledger entries record the binary's
//! own source (`ZMOE_BUILD_COMMIT`, `ZMOE_BUILD_DIRTY`) rather than the git state of whatever
//! folder it runs in. Outside a git checkout of this package (a source tarball, even one
//! unpacked inside another repository) or without git, the commit is `unknown`: this script
//! never fails the build.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `git args` in `dir`, trimmed stdout on success.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    // GIT_OPTIONAL_LOCKS=0: `git status` must not rewrite the index (which would rerun this).
    let out = Command::new("git").args(args).current_dir(dir).env("GIT_OPTIONAL_LOCKS", "0").output().ok()?;
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}

fn main() {
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| ".".into()));
    for p in ["build.rs", "Cargo.toml", "Cargo.lock", "src"] {
        println!("cargo:rerun-if-changed={p}");
    }
    let (mut commit, mut dirty) = ("unknown".to_string(), String::new());
    let top = git(&dir, &["rev-parse", "--show-toplevel"]).and_then(|t| Path::new(&t).canonicalize().ok());
    if top.is_some() && top == dir.canonicalize().ok() {
        if let Some(c) = git(&dir, &["rev-parse", "--short", "HEAD"]) {
            commit = c;
            if let Some(status) = Command::new("git")
                .args(["status", "--porcelain", "--untracked-files=no"])
                .current_dir(&dir)
                .env("GIT_OPTIONAL_LOCKS", "0")
                .output()
                .ok()
                .filter(|o| o.status.success())
            {
                dirty = (!status.stdout.is_empty()).to_string();
            }
        }
        // Rebuild when HEAD moves (a commit, a checkout) or the index changes. A worktree has
        // its own HEAD and index; branch refs live in the common folder.
        let abs = |p: String| if Path::new(&p).is_absolute() { PathBuf::from(p) } else { dir.join(p) };
        if let Some(gd) = git(&dir, &["rev-parse", "--git-dir"]).map(abs) {
            for f in ["HEAD", "index"] {
                rerun_if_exists(&gd.join(f));
            }
        }
        if let Some(common) = git(&dir, &["rev-parse", "--git-common-dir"]).map(abs) {
            rerun_if_exists(&common.join("packed-refs"));
            if let Some(r) = git(&dir, &["symbolic-ref", "-q", "HEAD"]) {
                rerun_if_exists(&common.join(r));
            }
        }
    }
    println!("cargo:rustc-env=ZMOE_BUILD_COMMIT={commit}");
    println!("cargo:rustc-env=ZMOE_BUILD_DIRTY={dirty}");
}

/// A missing path would make cargo rerun this script on every build.
fn rerun_if_exists(p: &Path) {
    if p.exists() {
        println!("cargo:rerun-if-changed={}", p.display());
    }
}
