//! The command line as a user meets it, without privileges.

use std::process::Command;

fn cgtproxy(args: &[&str]) -> (String, i32) {
    let out = Command::new(env!("CARGO_BIN_EXE_cgtproxy"))
        .args(args)
        .output()
        .expect("running cgtproxy");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (text, out.status.code().unwrap_or(-1))
}

#[test]
fn an_error_names_its_cause_once() {
    let (out, code) = cgtproxy(&["check", "--config", "/nonexistent/config.json"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("cannot read /nonexistent/config.json"),
        "{out}"
    );
    assert_eq!(out.matches("No such file or directory").count(), 1, "{out}");
}

#[test]
fn check_names_every_problem_with_its_key() {
    let dir = std::env::temp_dir().join(format!("cgtproxy-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("c.json");
    std::fs::write(
        &cfg,
        r#"{"version":1,"rule-priority":0,"tproxies":{"p":{"port":1,"mark":51820}},
           "rules":[{"match":"x","tproxy":"nope"}]}"#,
    )
    .unwrap();
    let (out, code) = cgtproxy(&["check", "--config", cfg.to_str().unwrap()]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, 1, "{out}");
    for key in ["rule-priority:", "tproxies.p.mark:", "rules[0].tproxy:"] {
        assert!(out.contains(key), "{key} missing: {out}");
    }
}
