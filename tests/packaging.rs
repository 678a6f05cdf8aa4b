//! What packaging relies on, through the built binary: the version string and
//! the packagers' `generate-assets`, which users never see.

use std::path::Path;
use std::process::Command;

fn cgtproxy(args: &[&str]) -> (String, String, Option<i32>) {
    let out = Command::new(env!("CARGO_BIN_EXE_cgtproxy"))
        .args(args)
        .output()
        .expect("running cgtproxy");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code(),
    )
}

/// The revision build.rs should have found: the packaging's variable, else
/// git's answer when this crate is the top of a work tree.
fn expected_rev() -> Option<String> {
    if let Some(rev) = option_env!("CGTPROXY_GIT_REV").filter(|r| !r.trim().is_empty()) {
        return Some(rev.trim().to_owned());
    }
    let dir = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let top = git(&["rev-parse", "--show-toplevel"])?;
    let same = Path::new(&top).canonicalize().ok() == Path::new(dir).canonicalize().ok();
    if !same {
        return None;
    }
    git(&["rev-parse", "--short", "HEAD"])
}

#[test]
fn version_names_the_release_and_the_revision() {
    let (out, _, code) = cgtproxy(&["--version"]);
    assert_eq!(code, Some(0));
    let want = match expected_rev() {
        Some(rev) => format!("cgtproxy {} (git {rev})\n", env!("CARGO_PKG_VERSION")),
        None => format!("cgtproxy {}\n", env!("CARGO_PKG_VERSION")),
    };
    assert_eq!(out, want);
}

#[test]
fn generate_assets_is_hidden_from_help() {
    let (out, _, code) = cgtproxy(&["--help"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("doctor"), "{out}");
    assert!(!out.contains("generate-assets"), "{out}");
}

#[test]
fn generate_assets_writes_pages_completions_and_the_example() {
    let dir = std::env::temp_dir().join(format!("cgtproxy-packaging-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let dir_arg = dir.to_str().expect("temporary directory is UTF-8");
    let (_, err, code) = cgtproxy(&["generate-assets", dir_arg]);
    assert_eq!(code, Some(0), "{err}");
    for file in [
        "man/cgtproxy.1",
        "man/cgtproxy-run.1",
        "man/cgtproxy-exec.1",
        "completions/cgtproxy.bash",
        "completions/_cgtproxy",
        "completions/cgtproxy.fish",
        "examples/config.json",
    ] {
        let len = std::fs::metadata(dir.join(file))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(len > 0, "{file} missing or empty");
    }
    // The example is a configuration the binary accepts.
    let example = dir.join("examples/config.json");
    let (out, err, code) = cgtproxy(&["check", "--config", example.to_str().expect("UTF-8")]);
    assert_eq!(code, Some(0), "{out}{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn generate_assets_fails_on_an_unwritable_directory() {
    let (_, err, code) = cgtproxy(&["generate-assets", "/proc/self/cgtproxy-assets"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("/proc/self/cgtproxy-assets"), "{err}");
}
