//! Renders a desired table in nft syntax, for `cgtproxy render` and for reading
//! golden files. The netlink backend builds the same table from the same spec.
//! For the eBPF datapath, what its maps would hold instead.

use std::collections::HashMap;
use std::fmt::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::config::{CONN_TAG_BASE, CONN_TAG_MASK};
use crate::core::table::{self, ChainSpec, Family, Hook, SetKind, Stmt, TableSpec, Verdict};

fn verdict(v: &Verdict) -> String {
    match v {
        Verdict::Accept => "accept".into(),
        Verdict::Drop => "drop".into(),
        Verdict::Return => "return".into(),
        Verdict::Goto(c) => format!("goto {c}"),
        Verdict::Jump(c) => format!("jump {c}"),
    }
}

fn addr(f: Family, v: u128) -> String {
    match f {
        Family::V4 => Ipv4Addr::from(v as u32).to_string(),
        Family::V6 => Ipv6Addr::from(v).to_string(),
    }
}

fn stmt(s: &Stmt) -> String {
    match s {
        Stmt::CtReply => "ct direction reply".into(),
        Stmt::NfProto(Family::V4) => "meta nfproto ipv4".into(),
        Stmt::NfProto(Family::V6) => "meta nfproto ipv6".into(),
        Stmt::L4Proto(p) => format!("meta l4proto {}", p.name()),
        Stmt::NotTcpUdp => "meta l4proto != tcp meta l4proto != udp".into(),
        Stmt::DaddrIn(Family::V4, s) => format!("ip daddr @{s}"),
        Stmt::DaddrIn(Family::V6, s) => format!("ip6 daddr @{s}"),
        Stmt::Daddr(IpAddr::V4(a)) => format!("ip daddr {a}"),
        Stmt::Daddr(IpAddr::V6(a)) => format!("ip6 daddr {a}"),
        Stmt::Dport(p) => format!("th dport {p}"),
        Stmt::Mark(m) => format!("meta mark {m:#x}"),
        Stmt::Marked => "meta mark != 0x0".into(),
        Stmt::OifNotLoopback => "oif != \"lo\"".into(),
        Stmt::IifNotLoopback => "iif != \"lo\"".into(),
        Stmt::Unmarked => "meta mark 0x0".into(),
        Stmt::IifIn(set) => format!("iif @{set}"),
        Stmt::FibDaddrType(t) => format!(
            "fib daddr type {}",
            match t {
                2 => "local".to_owned(),
                3 => "broadcast".to_owned(),
                5 => "multicast".to_owned(),
                t => t.to_string(),
            }
        ),
        Stmt::Iif(i) => format!("iif {i}"),
        Stmt::PktTypeHost => "meta pkttype host".into(),
        Stmt::Broute => "meta broute set 1".into(),
        Stmt::IfaceClass => format!(
            "meta mark set iif map @{} meta mark vmap @{}",
            table::IFACES,
            table::CLASSES
        ),
        Stmt::CtMark(m) => format!("ct mark {m:#x}"),
        Stmt::CtMarkTagged => format!("ct mark & {CONN_TAG_MASK:#x} == {CONN_TAG_BASE:#x}"),
        Stmt::SaveCtMark => "ct mark set meta mark".into(),
        Stmt::SetCtMark(m) => format!("ct mark set {m:#x}"),
        Stmt::SetMark(m) => format!("meta mark set {m:#x}"),
        Stmt::CgroupAtLevel(level) => format!("socket cgroupv2 level {level} != 0"),
        Stmt::CgroupClass { level, map } => format!(
            "meta mark set socket cgroupv2 level {level} map @{map} meta mark vmap @{}",
            table::CLASSES
        ),
        Stmt::Tproxy(IpAddr::V4(a), port) => format!("tproxy ip to {a}:{port}"),
        Stmt::Tproxy(IpAddr::V6(a), port) => format!("tproxy ip6 to [{a}]:{port}"),
        Stmt::Dnat(IpAddr::V4(a), p) => format!("dnat ip to {a}:{p}"),
        Stmt::Dnat(IpAddr::V6(a), p) => format!("dnat ip6 to [{a}]:{p}"),
        Stmt::Counter => "counter".into(),
        Stmt::NamedCounter(n) => format!("counter name \"{n}\""),
        Stmt::Verdict(v) => verdict(v),
    }
}

/// Writes one chain with its hook line and rules.
fn write_chain(o: &mut String, c: &ChainSpec) {
    let _ = writeln!(o, "\tchain {} {{", c.name);
    match c.hook {
        Some(Hook::OutputRoute) => {
            let _ = writeln!(
                o,
                "\t\ttype route hook output priority mangle; policy accept;"
            );
        }
        Some(Hook::PreroutingFilter) => {
            let _ = writeln!(
                o,
                "\t\ttype filter hook prerouting priority mangle; policy accept;"
            );
        }
        Some(Hook::PreroutingNat) => {
            let _ = writeln!(
                o,
                "\t\ttype nat hook prerouting priority dstnat; policy accept;"
            );
        }
        Some(Hook::OutputNat) => {
            let _ = writeln!(o, "\t\ttype nat hook output priority -100; policy accept;");
        }
        Some(Hook::BridgePrerouting) => {
            let _ = writeln!(
                o,
                "\t\ttype filter hook prerouting priority -200; policy accept;"
            );
        }
        Some(Hook::PostroutingFilter) => {
            let _ = writeln!(
                o,
                "\t\ttype filter hook postrouting priority mangle; policy accept;"
            );
        }
        None => {}
    }
    for r in &c.rules {
        let parts: Vec<String> = r.iter().map(stmt).collect();
        let _ = writeln!(o, "\t\t{}", parts.join(" "));
    }
    let _ = writeln!(o, "\t}}");
}

/// The table as an nft script that replaces any previous table of the same name.
/// `paths` names cgroup ids for the comments.
pub fn render(t: &TableSpec, paths: &HashMap<u64, String>) -> String {
    let mut o = String::new();
    // `add` then `delete`: replacing works whether or not the table exists.
    let _ = writeln!(o, "add table inet {}", t.name);
    let _ = writeln!(o, "delete table inet {}", t.name);
    let _ = writeln!(o, "table inet {} {{", t.name);
    for c in &t.counters {
        let _ = writeln!(o, "\tcounter {c} {{\n\t}}");
    }
    for s in &t.sets {
        let keyword = match s.kind {
            SetKind::Bypass(..) => "set",
            SetKind::Level(..) | SetKind::Classes(..) | SetKind::Ifaces(..) => "map",
        };
        let _ = writeln!(o, "\t{keyword} {} {{", s.name);
        if let Some(size) = s.kind.size() {
            let _ = writeln!(o, "\t\tsize {size}");
        }
        match &s.kind {
            SetKind::Bypass(f, ranges) => {
                let ty = match f {
                    Family::V4 => "ipv4_addr",
                    Family::V6 => "ipv6_addr",
                };
                let _ = writeln!(o, "\t\ttype {ty}");
                let _ = writeln!(o, "\t\tflags interval");
                if !ranges.is_empty() {
                    let elems: Vec<String> = ranges
                        .iter()
                        .map(|&(a, b)| {
                            if a == b {
                                addr(*f, a)
                            } else {
                                format!("{}-{}", addr(*f, a), addr(*f, b))
                            }
                        })
                        .collect();
                    let _ = writeln!(o, "\t\telements = {{ {} }}", elems.join(", "));
                }
            }
            SetKind::Level(_, range) => {
                let _ = writeln!(o, "\t\ttype cgroupsv2 : mark");
                // nft takes cgroupsv2 keys as paths below /sys/fs/cgroup, which is
                // not where every system mounts it: ids go in comments.
                for (id, class) in t.level_elements.get(range.clone()).unwrap_or_default() {
                    let path = paths.get(id).map(String::as_str).unwrap_or("?");
                    let _ = writeln!(o, "\t\t# {id} : {class:#x}  ({path})");
                }
            }
            SetKind::Ifaces(elems) => {
                let _ = writeln!(o, "\t\ttype iface_index : mark");
                // Indices are the running system's: they go in comments.
                for (index, class) in elems {
                    let _ = writeln!(o, "\t\t# {index} : {class:#x}");
                }
            }
            SetKind::Classes(list) => {
                let _ = writeln!(o, "\t\ttype mark : verdict");
                let elems: Vec<String> = list
                    .iter()
                    .map(|(c, v)| format!("{c:#x} : {}", verdict(v)))
                    .collect();
                let _ = writeln!(o, "\t\telements = {{ {} }}", elems.join(", "));
            }
        }
        let _ = writeln!(o, "\t}}");
    }
    for c in &t.chains {
        write_chain(&mut o, c);
    }
    let _ = writeln!(o, "}}");
    if !t.broute.is_empty() {
        let _ = writeln!(o, "add table bridge {}", t.name);
        let _ = writeln!(o, "delete table bridge {}", t.name);
        let _ = writeln!(o, "table bridge {} {{", t.name);
        write_chain(&mut o, &table::broute_chain(&t.broute, t.can_broute));
        let _ = writeln!(o, "}}");
    }
    o
}

/// What the eBPF datapath's maps would hold for `cfg` and `elements` (see
/// [`crate::core::bpfmaps`]), as `#`-commented text; `paths` names cgroup ids.
pub fn render_ebpf(
    cfg: &crate::config::Config,
    elements: &crate::core::tree::Elements,
    paths: &HashMap<u64, String>,
) -> String {
    use crate::core::bpfmaps;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# datapath ebpf: cgroup socket programs at the cgroup2 root; no nft table, marks or routes"
    );
    let _ = writeln!(o, "# targets (class: TCP connect() redirected to)");
    for t in &cfg.targets {
        let udp = if t.no_udp {
            "direct"
        } else {
            "refused (EPERM)"
        };
        let v6 = if t.no_ipv6 { ", IPv6 direct" } else { "" };
        let _ = writeln!(
            o,
            "{} class {:#x}: 127.0.0.1 / [::1] port {}; UDP {udp}{v6}",
            t.name, t.mark, t.port
        );
    }
    let b = bpfmaps::bypass(cfg);
    let _ = writeln!(o, "# bypass (untouched destinations)");
    for (a, len) in &b.v4 {
        let _ = writeln!(o, "{}/{len}", Ipv4Addr::from(*a));
    }
    for (a, len) in &b.v6 {
        let _ = writeln!(o, "{}/{len}", Ipv6Addr::from(*a));
    }
    let map = bpfmaps::cgroups(cfg, elements);
    let _ = writeln!(o, "# cgroups (id: class), {} entries", map.len());
    for (id, class) in &map {
        let name = match *class {
            crate::config::DIRECT_CLASS => "direct".to_owned(),
            crate::config::DROP_CLASS => "drop".to_owned(),
            c => cfg
                .targets
                .iter()
                .find(|t| t.mark == c)
                .map_or_else(|| format!("{c:#x}"), |t| t.name.clone()),
        };
        match paths.get(id) {
            Some(p) => {
                let _ = writeln!(o, "{id}: {name} # {p}");
            }
            None => {
                let _ = writeln!(o, "{id}: {name}");
            }
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Action, Config};
    use crate::core::table::{levels, table};
    use crate::core::tree::Elements;

    #[test]
    fn golden_ruleset() {
        let cfg = Config::parse(
            r#"{"version":1,"route-table":300,"bypass":["127.0.0.0/8","10.0.0.1","::1/128"],
            "tproxies":{"proxy":{"port":7893,"mark":3000,"no-udp":true,
               "dns-hijack":{"ip":"127.0.0.1","ip6":"::1","port":1053,"stub":true}},
               "other":{"port":7894,"mark":3001}},
            "rules":[{"match":"x","tproxy":"proxy"},{"match":"y","drop":true},{"match":"z","direct":true}]}"#,
            "t",
        )
        .unwrap();
        let elements: Elements = [
            ((2, 11), Some(Action::Tproxy(0))),
            ((2, 12), Some(Action::Drop)),
            ((2, 14), None),
            ((4, 13), Some(Action::Direct)),
        ]
        .into();
        let paths: HashMap<u64, String> =
            [(11, "/a/proxy".to_owned()), (13, "/a/b/c/d".to_owned())].into();
        let list: Vec<_> = elements.into_iter().collect();
        let ifaces = [(5, 3001)].into();
        let got = render(
            &table(&cfg, &levels(&list), &list, &ifaces, &[5], true, 0),
            &paths,
        );
        let want = include_str!("../../tests/golden/render.nft");
        assert_eq!(got, want, "got:\n{got}");
    }

    #[test]
    fn ebpf_maps_named_in_text() {
        let cfg = Config::parse(
            r#"{"version":1,"datapath":"ebpf","bypass":["127.0.0.0/8","::1/128"],
            "tproxies":{"proxy":{"port":7893,"mark":3000,"no-udp":true}},
            "rules":[{"match":"x","tproxy":"proxy"},{"match":"y","drop":true}]}"#,
            "t",
        )
        .unwrap();
        let elements: Elements = [
            ((2, 11), Some(Action::Tproxy(0))),
            ((2, 13), None),
            ((3, 12), Some(Action::Drop)),
        ]
        .into();
        let paths: HashMap<u64, String> = [(11, "/a/x".to_owned())].into();
        assert_eq!(
            render_ebpf(&cfg, &elements, &paths),
            "# datapath ebpf: cgroup socket programs at the cgroup2 root; no nft table, marks or routes
# targets (class: TCP connect() redirected to)
proxy class 0xbb8: 127.0.0.1 / [::1] port 7893; UDP direct
# bypass (untouched destinations)
127.0.0.0/8
::1/128
# cgroups (id: class), 2 entries
11: proxy # /a/x
12: drop
"
        );
    }
}
