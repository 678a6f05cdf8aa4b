//! Two jobs: the version string, and the eBPF datapath's object.
//!
//! Stamps the version string (`CGTPROXY_VERSION`, read by src/args.rs) with the
//! git revision the binary is built from: `0.1.0 (git abcdef1)`.
//!
//! The revision comes from `CGTPROXY_GIT_REV` when the packaging sets it (Nix
//! builds have no .git), else from `git rev-parse` when this crate is the top of
//! a git work tree. Without either (a tarball, crates.io) the version is plain.
//!
//! Compiles the eBPF datapath's programs (src/kernel/bpf/cgtproxy.bpf.c) with
//! clang into an object the daemon embeds. Needs clang and libbpf's headers
//! (Debian: `clang libbpf-dev`; dist/ensure-deps.sh installs them).
//! `CGTPROXY_CLANG` names another clang; `CGTPROXY_BPF_CFLAGS` adds flags
//! (include paths on systems without Debian's multiarch layout, e.g. Nix).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const BPF_SOURCE: &str = "src/kernel/bpf/cgtproxy.bpf.c";

fn main() {
    stamp_version();
    build_bpf();
}

fn stamp_version() {
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

/// clang -target bpf: the object `src/kernel/bpf/mod.rs` embeds.
fn build_bpf() {
    println!("cargo:rerun-if-changed={BPF_SOURCE}");
    println!("cargo:rerun-if-env-changed=CGTPROXY_CLANG");
    println!("cargo:rerun-if-env-changed=CGTPROXY_BPF_CFLAGS");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let clang = env::var("CGTPROXY_CLANG").unwrap_or_else(|_| "clang".into());
    let mut cmd = Command::new(&clang);
    cmd.args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"]);
    // Debian keeps asm/types.h under the multiarch include directory.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let multiarch = Path::new("/usr/include").join(format!("{arch}-linux-gnu"));
    if multiarch.is_dir() {
        cmd.arg("-I").arg(&multiarch);
    }
    if let Ok(flags) = env::var("CGTPROXY_BPF_CFLAGS") {
        cmd.args(flags.split_whitespace());
    }
    let object = out.join("cgtproxy.bpf.o");
    cmd.arg("-c").arg(BPF_SOURCE).arg("-o").arg(&object);
    let status = cmd.status().unwrap_or_else(|e| {
        panic!(
            "cannot run `{clang}` to build the eBPF datapath ({e}): install clang and libbpf's headers (Debian/Ubuntu: `apt-get install clang libbpf-dev`, or run dist/ensure-deps.sh)"
        )
    });
    assert!(
        status.success(),
        "`{clang}` failed to build {BPF_SOURCE} (libbpf's headers missing? Debian/Ubuntu: `apt-get install libbpf-dev`)"
    );
}
