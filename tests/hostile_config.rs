//! The configuration parser fed random and mutated JSON, through the command a
//! user runs (`cgtproxy check --config /dev/stdin`): every input ends in exit 0
//! (valid) or 1 (with a message), never a panic (101) or a signal. Needs no
//! root.

use std::io::Write;
use std::process::{Command, Stdio};

use proptest::prelude::*;
use serde_json::{Map, Value, json};

/// A configuration using every key, so mutations reach every validation.
fn full() -> Value {
    json!({
        "version": 1,
        "cgroup-root": "AUTO",
        "route-table": 300,
        "table": "cgtproxy",
        "rule-priority": 100,
        "bypass": ["127.0.0.0/8", "10.0.0.0/8", "::1/128", "fc00::/7"],
        "tproxies": {
            "proxy": {
                "port": 7893, "mark": 3000, "no-udp": false, "no-ipv6": false,
                "dns-hijack": { "ip": "127.0.0.1", "ip6": "::1", "port": 1053, "tcp": true, "stub": true }
            },
            "tor": { "port": 7894, "mark": 3001, "upstream": "socks5://127.0.0.1:9050",
                     "upstream-auth-file": "/run/credentials/x/cgtproxy.tor" },
            "corp": { "port": 7896, "mark": 3003, "upstream": "http://proxy.corp:3128" }
        },
        "rules": [
            { "match": "^/system\\.slice/mihomo\\.service$", "direct": true },
            { "match": "/cgtproxy-drop\\.slice(/|$)", "drop": true },
            { "match": "/cgtproxy-proxy\\.slice(/|$)", "tproxy": "proxy" }
        ]
    })
}

/// Runs `cgtproxy check` on `text`; returns its exit code and stderr.
fn check(text: &[u8]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cgtproxy"))
        .args(["check", "--config", "/dev/stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running cgtproxy check");
    let mut stdin = child.stdin.take().expect("piped stdin");
    // A parser that stops reading early closes the pipe: not a failure here.
    let _ = stdin.write_all(text);
    drop(stdin);
    let out = child
        .wait_with_output()
        .expect("waiting for cgtproxy check");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "\\PC{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("AUTO"),
            Just("/"),
            Just("socks5://[::1]:1"),
            Just("http://h:0"),
            Just("0.0.0.0/0"),
            Just("::/0"),
            Just("("),
            Just("proxy"),
            Just("direct"),
        ]
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z-]{1,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Every node of `v`, as JSON pointers.
fn pointers(v: &Value, here: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                pointers(c, format!("{here}/{k}"), out);
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                pointers(c, format!("{here}/{i}"), out);
            }
        }
        _ => {}
    }
    out.push(here);
}

fn judge(text: &[u8]) -> Result<(), TestCaseError> {
    let (code, stderr) = check(text);
    prop_assert!(
        code == Some(0) || (code == Some(1) && !stderr.trim().is_empty()),
        "exit {code:?} for {:?}:\n{stderr}",
        String::from_utf8_lossy(text)
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Arbitrary JSON documents, top level and as the value of a known key.
    #[test]
    fn random_json_is_judged_cleanly(v in arb_json(), key in prop_oneof![
        Just("version"), Just("tproxies"), Just("rules"), Just("bypass"), Just("route-table"),
        Just("cgroup-root"), Just("table"), Just("rule-priority")]) {
        judge(v.to_string().as_bytes())?;
        let mut cfg = full();
        cfg[key] = v;
        judge(cfg.to_string().as_bytes())?;
    }

    /// The full configuration with one node replaced by random JSON, or removed.
    #[test]
    fn mutated_config_is_judged_cleanly(pick in any::<prop::sample::Index>(), v in arb_json(), remove in any::<bool>()) {
        let mut cfg = full();
        let mut all = Vec::new();
        pointers(&cfg, String::new(), &mut all);
        let at = pick.get(&all).clone();
        if at.is_empty() {
            cfg = v;
        } else if remove {
            let (parent, last) = at.rsplit_once('/').unwrap_or(("", ""));
            match cfg.pointer_mut(parent) {
                Some(Value::Object(m)) => { m.remove(last); }
                Some(Value::Array(a)) => {
                    if let Ok(i) = last.parse::<usize>() { a.remove(i); }
                }
                _ => {}
            }
        } else if let Some(slot) = cfg.pointer_mut(&at) {
            *slot = v;
        }
        judge(cfg.to_string().as_bytes())?;
    }

    /// The full configuration's text with bytes changed, inserted or cut:
    /// broken syntax, broken UTF-8, truncation.
    #[test]
    fn mutated_text_is_judged_cleanly(changes in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..6),
                                      keep in any::<prop::sample::Index>()) {
        let mut text = full().to_string().into_bytes();
        for (i, b, how) in changes {
            let i = i.index(text.len());
            match how {
                0 => text[i] = b,
                1 => text.insert(i, b),
                _ => { text.remove(i); }
            }
        }
        let keep = keep.index(text.len() + 1);
        text.truncate(keep.max(text.len() / 2));
        judge(&text)?;
    }
}

#[test]
fn the_full_configuration_is_valid() {
    let (code, stderr) = check(full().to_string().as_bytes());
    assert_eq!(code, Some(0), "{stderr}");
}
