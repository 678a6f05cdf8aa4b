//! Stamps the version string (`CGTPROXY_VERSION`, read by src/args.rs) with the
//! git revision the binary is built from: `0.1.0 (git abcdef1)`.
//!
//! The revision comes from `CGTPROXY_GIT_REV` when the packaging sets it (Nix
//! builds have no .git), else from `git rev-parse` when this crate is the top of
//! a git work tree. Without either (a tarball, crates.io) the version is plain.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=CGTPROXY_GIT_REV");
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let rev = match std::env::var("CGTPROXY_GIT_REV") {
        Ok(rev) if !rev.trim().is_empty() => Some(rev.trim().to_owned()),
        _ => git_rev(&manifest_dir),
    };
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    let version = match rev {
        Some(rev) => format!("{version} (git {rev})"),
        None => version,
    };
    println!("cargo:rustc-env=CGTPROXY_VERSION={version}");
}

/// `git -C dir ARGS`, its trimmed output when it succeeds.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    Some(text.trim().to_owned()).filter(|t| !t.is_empty())
}

/// The short revision of HEAD, if `dir` is the top of a git work tree (not a
/// tarball unpacked inside someone else's repository), and the files that
/// change when HEAD moves, for cargo to re-run this script.
fn git_rev(dir: &Path) -> Option<String> {
    let top = git(dir, &["rev-parse", "--show-toplevel"])?;
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if !same(Path::new(&top), dir) {
        return None;
    }
    let rev = git(dir, &["rev-parse", "--short", "HEAD"])?;
    // HEAD (a checkout), the branch it points to (a commit) and packed-refs (a
    // gc); `--git-path` resolves each in a linked work tree too. A path that
    // does not exist would make cargo re-run this on every build.
    let mut watch = vec![git(dir, &["rev-parse", "--git-path", "HEAD"])];
    watch.push(git(dir, &["rev-parse", "--git-path", "packed-refs"]));
    if let Some(branch) = git(dir, &["symbolic-ref", "-q", "HEAD"]) {
        watch.push(git(dir, &["rev-parse", "--git-path", &branch]));
    }
    for path in watch.into_iter().flatten() {
        let path = dir.join(path);
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    Some(rev)
}
