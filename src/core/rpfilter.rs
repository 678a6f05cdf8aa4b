//! Finds reverse-path filters that would drop our looped-back packets. Pure: it
//! reads a ruleset as `nft -j list ruleset` prints it, so `doctor` can judge the
//! host's firewall and the cases are unit-tested on fixed rulesets.
//!
//! A marked packet loops through `lo` into prerouting; a prerouting chain that
//! checks the source with `fib` and drops what fails (NixOS's `rpfilter` chain
//! with `checkReversePath`, firewalld's `IPv6_rpfilter`, hand-written ones)
//! drops it unless an earlier rule, or a chain it jumps to, accepts our marks
//! (measured on Linux 6.18: the fib lookup fails for these packets).

use serde_json::Value;

/// A prerouting chain that drops packets carrying `mark`: (family, table, chain).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub family: String,
    pub table: String,
    pub chain: String,
}

impl std::fmt::Display for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "chain {} {} {}", self.family, self.table, self.chain)
    }
}

/// What a chain does with a looped packet carrying our mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Accepted,
    Dropped,
    /// Falls through (to the policy, or back to the calling chain).
    Continues,
}

struct Ruleset<'a> {
    items: Vec<&'a Value>,
}

fn contains_key(v: &Value, key: &str) -> bool {
    match v {
        Value::Object(m) => m.contains_key(key) || m.values().any(|v| contains_key(v, key)),
        Value::Array(a) => a.iter().any(|v| contains_key(v, key)),
        _ => false,
    }
}

/// Whether a `match` expression selects packets by `meta mark` and `mark` is
/// among its values.
fn matches_mark(expr: &Value, mark: u32) -> Option<bool> {
    let m = expr.get("match")?;
    let left = m.get("left")?.get("meta")?.get("key")?;
    if left != "mark" {
        return None;
    }
    let right = m.get("right")?;
    let hit = match right {
        Value::Number(n) => n.as_u64() == Some(u64::from(mark)),
        Value::Object(o) => o
            .get("set")
            .and_then(Value::as_array)
            .is_some_and(|s| s.iter().any(|v| v.as_u64() == Some(u64::from(mark)))),
        _ => false,
    };
    let negated = m.get("op").and_then(Value::as_str) == Some("!=");
    Some(hit != negated)
}

/// What a `match` expression on the input interface (`iifname`, `iif`) says
/// about a looped packet, which arrives on `lo`.
fn matches_lo(expr: &Value) -> Option<bool> {
    let m = expr.get("match")?;
    let key = m.get("left")?.get("meta")?.get("key")?.as_str()?;
    if key != "iifname" && key != "iif" {
        return None;
    }
    let right = m.get("right")?;
    let is_lo = match right {
        Value::String(name) => name == "lo",
        Value::Object(o) => o
            .get("set")
            .and_then(Value::as_array)
            .is_some_and(|s| s.iter().any(|v| v == "lo")),
        _ => return None,
    };
    let negated = m.get("op").and_then(Value::as_str) == Some("!=");
    Some(is_lo != negated)
}

/// What a condition says about a looped packet carrying `mark`: true, false, or
/// unknown (`None`).
fn condition(expr: &Value, mark: u32) -> Option<bool> {
    matches_mark(expr, mark).or_else(|| matches_lo(expr))
}

impl<'a> Ruleset<'a> {
    fn parse(json: &'a Value) -> Ruleset<'a> {
        Ruleset {
            items: json
                .get("nftables")
                .and_then(Value::as_array)
                .map(|a| a.iter().collect())
                .unwrap_or_default(),
        }
    }

    fn rules(&self, family: &str, table: &str, chain: &str) -> Vec<&'a Value> {
        self.items
            .iter()
            .filter_map(|i| i.get("rule"))
            .filter(|r| {
                r.get("family").and_then(Value::as_str) == Some(family)
                    && r.get("table").and_then(Value::as_str) == Some(table)
                    && r.get("chain").and_then(Value::as_str) == Some(chain)
            })
            .collect()
    }

    /// What `chain` does with a looped packet carrying `mark`; `depth` bounds
    /// jumps (a loop of jumps is refused by the kernel anyway).
    fn fate(&self, family: &str, table: &str, chain: &str, mark: u32, depth: u8) -> Fate {
        if depth > 16 {
            return Fate::Continues;
        }
        for rule in self.rules(family, table, chain) {
            let Some(exprs) = rule.get("expr").and_then(Value::as_array) else {
                continue;
            };
            // Conditions this packet surely fails make the rule irrelevant.
            if exprs.iter().any(|e| condition(e, mark) == Some(false)) {
                continue;
            }
            let selected = exprs.iter().any(|e| condition(e, mark) == Some(true));
            let uses_fib = exprs.iter().any(|e| contains_key(e, "fib"));
            let other_conditions = exprs
                .iter()
                .filter(|e| e.get("match").is_some() && condition(e, mark).is_none())
                .count();
            for e in exprs {
                if e.get("accept").is_some() && selected && other_conditions == 0 {
                    return Fate::Accepted;
                }
                if e.get("drop").is_some() && uses_fib {
                    return Fate::Dropped;
                }
                for verb in ["jump", "goto"] {
                    let target = e
                        .get(verb)
                        .and_then(|j| j.get("target"))
                        .and_then(Value::as_str);
                    if let Some(t) = target
                        && other_conditions == 0
                    {
                        match self.fate(family, table, t, mark, depth + 1) {
                            Fate::Continues if verb == "jump" => {}
                            Fate::Continues => return Fate::Continues,
                            f => return f,
                        }
                    }
                }
            }
        }
        Fate::Continues
    }
}

/// The prerouting chains of `json` (`nft -j list ruleset`) that would drop a
/// looped packet carrying `mark`: a base chain that filters by `fib` and drops
/// what fails, or whose policy is drop, with no earlier rule accepting the mark.
pub fn dropping(json: &Value, mark: u32) -> Vec<Filter> {
    let rs = Ruleset::parse(json);
    let mut out = Vec::new();
    for chain in rs.items.iter().filter_map(|i| i.get("chain")) {
        if chain.get("hook").and_then(Value::as_str) != Some("prerouting") {
            continue;
        }
        let s = |k: &str| chain.get(k).and_then(Value::as_str).unwrap_or_default();
        let (family, table, name) = (s("family"), s("table"), s("name"));
        let uses_fib = rs
            .rules(family, table, name)
            .iter()
            .any(|r| contains_key(r, "fib"));
        let dropped = match rs.fate(family, table, name, mark, 0) {
            Fate::Dropped => true,
            Fate::Accepted => false,
            Fate::Continues => uses_fib && s("policy") == "drop",
        };
        if dropped {
            out.push(Filter {
                family: family.into(),
                table: table.into(),
                chain: name.into(),
            });
        }
    }
    out
}

/// Whether `iptables-save` output holds an `rpfilter` match that drops in mangle
/// or raw PREROUTING without `--validmark` (which looks up the source with the
/// packet's mark, and so lets our looped packets pass).
pub fn iptables_drops(save: &str) -> Vec<String> {
    save.lines()
        .filter(|l| l.starts_with("-A PREROUTING") || l.starts_with("-A nixos-fw-rpfilter"))
        .filter(|l| l.contains("-m rpfilter") && !l.contains("--validmark"))
        .filter(|l| l.contains("-j DROP") || l.contains("--invert"))
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// NixOS's nftables firewall with `checkReversePath = true`, as `nft -j`
    /// lists it; `allow` fills its `rpfilter-allow` chain.
    fn nixos(allow: Vec<Value>) -> Value {
        let fib = json!({"match": {"op": "==", "left": {"fib": {"result": "oif",
            "flags": ["saddr", "mark", "iif"]}}, "right": true}});
        let mut items = vec![
            json!({"chain": {"family": "inet", "table": "nixos-fw", "name": "rpfilter",
                "type": "filter", "hook": "prerouting", "prio": -140, "policy": "drop"}}),
            json!({"chain": {"family": "inet", "table": "nixos-fw", "name": "rpfilter-allow"}}),
            json!({"rule": {"family": "inet", "table": "nixos-fw", "chain": "rpfilter",
                "expr": [{"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv4"}},
                         {"accept": null}]}}),
            json!({"rule": {"family": "inet", "table": "nixos-fw", "chain": "rpfilter",
                "expr": [fib, {"accept": null}]}}),
            json!({"rule": {"family": "inet", "table": "nixos-fw", "chain": "rpfilter",
                "expr": [{"jump": {"target": "rpfilter-allow"}}]}}),
        ];
        for expr in allow {
            items.push(json!({"rule": {"family": "inet", "table": "nixos-fw",
                "chain": "rpfilter-allow", "expr": expr}}));
        }
        json!({ "nftables": items })
    }

    fn accept_marks(marks: Value) -> Value {
        json!([{"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": marks}},
               {"accept": null}])
    }

    #[test]
    fn the_nixos_rpfilter_drops_our_packets_without_its_exemption() {
        let found = dropping(&nixos(vec![]), 3000);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].to_string(), "chain inet nixos-fw rpfilter");
    }

    #[test]
    fn an_exemption_for_our_marks_lets_them_pass() {
        let set = accept_marks(json!({"set": [3000, 3001]}));
        assert!(dropping(&nixos(vec![set.clone()]), 3000).is_empty());
        assert_eq!(dropping(&nixos(vec![set]), 3002).len(), 1, "not our mark");
        assert!(dropping(&nixos(vec![accept_marks(json!(3000))]), 3000).is_empty());
    }

    #[test]
    fn an_explicit_fib_drop_rule_drops_and_chains_without_fib_do_not() {
        let rs = json!({"nftables": [
            {"chain": {"family": "ip6", "table": "firewalld", "name": "filter_PREROUTING",
                "hook": "prerouting", "policy": "accept"}},
            {"rule": {"family": "ip6", "table": "firewalld", "chain": "filter_PREROUTING",
                "expr": [{"match": {"op": "==", "left": {"fib": {"result": "oif",
                    "flags": ["saddr", "mark", "iif"]}}, "right": false}}, {"drop": null}]}},
            {"chain": {"family": "inet", "table": "filter", "name": "pre",
                "hook": "prerouting", "policy": "drop"}},
        ]});
        let found = dropping(&rs, 3000);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].table, "firewalld");
    }

    /// wg-quick's anti-spoofing rule (its add_default), and the remedy the
    /// README gives: accept what arrives on `lo` first.
    #[test]
    fn wg_quicks_anti_spoofing_rule_is_found_and_the_lo_exemption_clears_it() {
        let chain = json!({"chain": {"family": "ip", "table": "wg-quick-wg0",
            "name": "preraw", "hook": "prerouting", "prio": -300, "policy": "accept"}});
        let spoof = json!({"rule": {"family": "ip", "table": "wg-quick-wg0", "chain": "preraw",
            "expr": [
                {"match": {"op": "!=", "left": {"meta": {"key": "iifname"}}, "right": "wg0"}},
                {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                    "right": "10.77.0.1"}},
                {"match": {"op": "!=", "left": {"fib": {"flags": ["saddr"], "result": "type"}},
                    "right": "local"}},
                {"drop": null}]}});
        let lo = json!({"rule": {"family": "ip", "table": "wg-quick-wg0", "chain": "preraw",
            "expr": [
                {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "lo"}},
                {"accept": null}]}});
        let found = dropping(&json!({"nftables": [chain, spoof]}), 3000);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].to_string(), "chain ip wg-quick-wg0 preraw");
        assert!(dropping(&json!({"nftables": [chain, lo, spoof]}), 3000).is_empty());
    }

    #[test]
    fn iptables_rpfilter_without_validmark_is_found() {
        let save = "*mangle\n-A PREROUTING -m rpfilter --invert -j DROP\n\
                    -A PREROUTING -m rpfilter --validmark --invert -j DROP\nCOMMIT\n";
        assert_eq!(
            iptables_drops(save),
            ["-A PREROUTING -m rpfilter --invert -j DROP"]
        );
    }
}
