//! What the eBPF datapath's maps should hold for a configuration and tree: the
//! same decisions as the nft table's (classes from [`table::class`]), keyed the
//! way the programs look them up. Pure: the kernel side is `kernel::bpf`.

use std::collections::BTreeMap;

use ipnet::IpNet;

use crate::config::Config;
use crate::core::table;
use crate::core::tree::{Delta, Elements};

/// A target as the programs see it, under its class (the target's mark).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetEntry {
    /// The loopback listener's port.
    pub port: u16,
    /// UDP goes direct.
    pub no_udp: bool,
    /// IPv6 goes direct.
    pub no_ipv6: bool,
}

/// The `targets` map: class → target.
pub fn targets(cfg: &Config) -> BTreeMap<u32, TargetEntry> {
    cfg.targets
        .iter()
        .map(|t| {
            let entry = TargetEntry {
                port: t.port,
                no_udp: t.no_udp,
                no_ipv6: t.no_ipv6,
            };
            (t.mark, entry)
        })
        .collect()
}

/// The bypass tries: (address bytes, prefix length) per family.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Bypass {
    pub v4: Vec<([u8; 4], u32)>,
    pub v6: Vec<([u8; 16], u32)>,
}

/// The bypass destinations, each network once (host bits cleared).
pub fn bypass(cfg: &Config) -> Bypass {
    let mut b = Bypass::default();
    for net in &cfg.bypass {
        match net.trunc() {
            IpNet::V4(n) => b.v4.push((n.addr().octets(), u32::from(n.prefix_len()))),
            IpNet::V6(n) => b.v6.push((n.addr().octets(), u32::from(n.prefix_len()))),
        }
    }
    b.v4.sort_unstable();
    b.v4.dedup();
    b.v6.sort_unstable();
    b.v6.dedup();
    b
}

/// The `cgroups` map: cgroup id → class, of classified cgroups only. Levels
/// do not matter here: the programs look up each ancestor of the calling
/// task's cgroup by id, and remember the outcome per cgroup, so the elements
/// of unclassified cgroups that the nft maps hold to cut their walk short
/// would buy nothing.
pub fn cgroups(cfg: &Config, elements: &Elements) -> BTreeMap<u64, u32> {
    elements
        .iter()
        .filter_map(|((_, id), a)| a.map(|a| (*id, table::class(cfg, a))))
        .collect()
}

/// A tree delta as map updates: ids to delete, then entries to write. An id
/// both deleted and added (a changed verdict) is only written.
pub fn changes(cfg: &Config, delta: &Delta) -> (Vec<u64>, Vec<(u64, u32)>) {
    let add: Vec<(u64, u32)> = delta
        .add
        .iter()
        .filter_map(|((_, id), a)| a.map(|a| (*id, table::class(cfg, a))))
        .collect();
    let del = delta
        .del
        .iter()
        .filter(|(_, a)| a.is_some())
        .map(|((_, id), _)| *id)
        .filter(|id| !add.iter().any(|(a, _)| a == id))
        .collect();
    (del, add)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Action, DIRECT_CLASS, DROP_CLASS};

    fn cfg() -> Config {
        Config::parse(
            r#"{"version":1,"cgroup-root":"AUTO","route-table":300,
            "bypass":["127.0.0.0/8","::1/128","10.1.2.3/16","10.1.0.0/16"],
            "tproxies":{"p":{"port":7893,"mark":3000,"no-udp":true}},
            "rules":[{"match":"a","tproxy":"p"}]}"#,
            "test",
        )
        .unwrap()
    }

    #[test]
    fn targets_are_keyed_by_their_mark() {
        let t = targets(&cfg());
        assert_eq!(
            t,
            BTreeMap::from([(
                3000,
                TargetEntry {
                    port: 7893,
                    no_udp: true,
                    no_ipv6: false
                }
            )])
        );
    }

    #[test]
    fn bypass_networks_lose_host_bits_and_duplicates() {
        let b = bypass(&cfg());
        assert_eq!(b.v4, vec![([10, 1, 0, 0], 16), ([127, 0, 0, 0], 8)]);
        let mut one = [0u8; 16];
        one[15] = 1;
        assert_eq!(b.v6, vec![(one, 128)]);
    }

    #[test]
    fn cgroups_map_ids_to_the_same_classes_as_the_table() {
        let c = cfg();
        let elements = Elements::from([
            ((2, 10), Some(Action::Tproxy(0))),
            ((2, 13), None),
            ((3, 11), Some(Action::Direct)),
            ((5, 12), Some(Action::Drop)),
        ]);
        assert_eq!(
            cgroups(&c, &elements),
            BTreeMap::from([(10, 3000), (11, DIRECT_CLASS), (12, DROP_CLASS)])
        );
    }

    #[test]
    fn a_changed_verdict_is_written_not_deleted_and_unclassified_ones_never_go_in() {
        let c = cfg();
        let delta = Delta {
            del: vec![
                ((2, 10), Some(Action::Direct)),
                ((2, 11), Some(Action::Drop)),
                ((2, 14), None),
                ((2, 15), Some(Action::Drop)),
            ],
            add: vec![
                ((2, 10), Some(Action::Tproxy(0))),
                ((2, 13), None),
                ((2, 15), None),
            ],
            decisive: true,
        };
        assert_eq!(changes(&c, &delta), (vec![11, 15], vec![(10, 3000)]));
    }
}
