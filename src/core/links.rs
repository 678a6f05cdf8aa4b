//! Forwarded traffic: which of this host's interfaces classify what arrives on
//! them. An `interfaces` rule names interfaces (gateway mode: a LAN, a VM
//! network); a classified cgroup whose processes live in another network
//! namespace (a container) classifies the host ends of that namespace's links.
//! Pure: the daemon lists the links and the containers' namespaces.

use std::collections::BTreeMap;

use crate::config::{Action, Config};
use crate::core::table::class;

/// The loopback interface: index 1 in every network namespace. Never
/// classified: looped packets of local apps arrive on it.
pub const LOOPBACK: u32 = 1;

/// One interface of the daemon's network namespace, as rtnetlink lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// For a link whose other end lives in another namespace (a veth's host
    /// end): that namespace's id as this one knows it (`IFLA_LINK_NETNSID`).
    pub peer_netns: Option<i32>,
    /// The bridge (or other master) this link is a port of.
    pub master: Option<u32>,
}

/// A cgroup whose traffic is decided and one of whose processes lives in
/// network namespace `netns` (its id in the daemon's namespace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub path: String,
    pub action: Action,
    pub netns: i32,
}

/// Why an interface has its verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    /// `interfaces[i]` matches its name.
    Rule(usize),
    /// It is a port of a bridge whose name `interfaces[i]` matches.
    Port(usize),
    /// It is a link of the namespace of this cgroup's processes.
    Container(String),
}

/// One interface with a verdict, or one a container would classify but cannot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub index: u32,
    pub name: String,
    pub action: Action,
    pub why: Why,
    /// The bridge (or other master) this link is a port of (see [`plan`]).
    pub bridge: Option<String>,
}

/// The interfaces map and what explains it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkPlan {
    /// Interface index → class (see [`class`]): the `ifaces` map's elements.
    pub elements: BTreeMap<u32, u32>,
    /// Bridge ports routed instead of bridged (see `table::broute_chain`).
    pub broute: Vec<u32>,
    pub entries: Vec<Entry>,
    /// Conflicts and links that cannot be classified, for the log.
    pub warnings: Vec<String>,
}

/// Of two actions for one namespace, the one that keeps more traffic in: drop,
/// then a target (the first by name), then direct. Fail closed.
fn stricter(a: Action, b: Action) -> Action {
    let rank = |x: Action| match x {
        Action::Drop => (0, 0),
        Action::Tproxy(i) => (1, i),
        Action::Direct => (2, 0),
    };
    if rank(b) < rank(a) { b } else { a }
}

/// An action in words: `direct`, `drop`, `tproxy NAME`.
pub fn describe(cfg: &Config, a: Action) -> String {
    match a {
        Action::Direct => "direct".into(),
        Action::Drop => "drop".into(),
        Action::Tproxy(i) => format!("tproxy {}", cfg.targets[usize::from(i)].name),
    }
}

/// Decides every interface: an `interfaces` rule matching its name first (the
/// administrator named it), else the container whose namespace its other end
/// is in. A namespace shared by cgroups with different verdicts gets the
/// stricter one ([`stricter`]) and a warning. The ports of a bridge that a
/// rule proxies or drops get its verdict. A bridge port whose traffic is
/// proxied or dropped is routed instead of bridged, and then classified like
/// a direct link; a direct one stays on the bridge and follows the bridge's
/// verdict, if it has one.
pub fn plan(cfg: &Config, links: &[Link], containers: &[Container]) -> LinkPlan {
    let mut out = LinkPlan::default();
    let mut by_netns: BTreeMap<i32, (Action, &str)> = BTreeMap::new();
    for c in containers {
        match by_netns.get(&c.netns) {
            None => {
                by_netns.insert(c.netns, (c.action, &c.path));
            }
            Some(&(a, first)) if a != c.action => {
                let pick = stricter(a, c.action);
                out.warnings.push(format!(
                    "network namespace {} is shared by {first} ({}) and {} ({}): its links get {}, the stricter",
                    c.netns,
                    describe(cfg, a),
                    c.path,
                    describe(cfg, c.action),
                    describe(cfg, pick)
                ));
                let who = if pick == a { first } else { &c.path };
                by_netns.insert(c.netns, (pick, who));
            }
            Some(_) => {}
        }
    }
    let name_of = |i: u32| links.iter().find(|l| l.index == i).map(|l| l.name.clone());
    let rule_of = |l: &Link| cfg.classify_interface(&l.name);
    let master_rule = |l: &Link| {
        let m = links.iter().find(|m| Some(m.index) == l.master)?;
        rule_of(m).filter(|(_, a)| *a != Action::Direct)
    };
    for l in links.iter().filter(|l| l.index != LOOPBACK) {
        let (action, why) = if let Some((i, a)) = rule_of(l) {
            (a, Why::Rule(i))
        } else if let Some(&(a, path)) = l.peer_netns.and_then(|n| by_netns.get(&n)) {
            (a, Why::Container(path.to_owned()))
        } else if let Some((i, a)) = master_rule(l) {
            // A port of a bridge that a rule proxies or drops: routed on the
            // port, so that br_netfilter's bridge pass never sees it.
            (a, Why::Port(i))
        } else {
            continue;
        };
        let bridge = l
            .master
            .map(|m| name_of(m).unwrap_or_else(|| format!("#{m}")));
        match (&bridge, action) {
            (Some(_), Action::Direct) => {}
            (Some(_), _) => {
                out.broute.push(l.index);
                out.elements.insert(l.index, class(cfg, action));
            }
            (None, _) => {
                out.elements.insert(l.index, class(cfg, action));
            }
        }
        out.entries.push(Entry {
            index: l.index,
            name: l.name.clone(),
            action,
            why,
            bridge,
        });
    }
    out
}

/// On a kernel that cannot route bridge ports: the ports of a bridge that a
/// rule classifies stay bridged (the bridge's verdict reaches them, unless
/// br_netfilter's bridge pass, where `tproxy` cannot deliver, sees them
/// first); the others, containers' links, have their TCP and UDP to other
/// hosts dropped, as nothing else would tell their traffic apart — and say so.
pub fn note_no_broute(cfg: &Config, plan: &mut LinkPlan) {
    for e in &plan.entries {
        if matches!(e.why, Why::Port(_)) {
            plan.broute.retain(|&i| i != e.index);
            plan.elements.remove(&e.index);
        }
    }
    for e in &plan.entries {
        if let (Some(b), true) = (&e.bridge, plan.broute.contains(&e.index)) {
            plan.warnings.push(format!(
                "{} is a port of bridge {b} and its traffic is {}, but this kernel cannot route bridge ports (nft `meta broute`: Linux 6.4 and later with CONFIG_NFT_BRIDGE_META): its TCP and UDP to other hosts are dropped instead",
                e.name,
                describe(cfg, e.action)
            ));
        }
    }
}

/// Elements to delete and to add to turn map `old` into `new`; a changed class
/// is deleted and added again.
pub fn diff(old: &BTreeMap<u32, u32>, new: &BTreeMap<u32, u32>) -> (Vec<u32>, Vec<(u32, u32)>) {
    let del = old
        .iter()
        .filter(|(k, v)| new.get(k) != Some(v))
        .map(|(&k, _)| k)
        .collect();
    let add = new
        .iter()
        .filter(|(k, v)| old.get(k) != Some(v))
        .map(|(&k, &v)| (k, v))
        .collect();
    (del, add)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DIRECT_CLASS, DROP_CLASS};

    fn cfg() -> Config {
        Config::parse(
            r#"{"version":1,"tproxies":{"a":{"port":1,"mark":10},"b":{"port":2,"mark":20}},
            "interfaces":[{"match":"^lan","tproxy":"b"},{"match":"^guest","drop":true}]}"#,
            "t",
        )
        .unwrap()
    }

    fn link(index: u32, name: &str, peer: Option<i32>, master: Option<u32>) -> Link {
        Link {
            index,
            name: name.into(),
            peer_netns: peer,
            master,
        }
    }

    fn container(path: &str, action: Action, netns: i32) -> Container {
        Container {
            path: path.into(),
            action,
            netns,
        }
    }

    #[test]
    fn rules_name_interfaces_and_containers_their_links() {
        let links = [
            link(1, "lo", None, None),
            link(2, "lan0", None, None),
            link(3, "eth0", None, None),
            link(4, "ve-wiki", Some(7), None),
            link(5, "veth9", Some(8), None),
            link(6, "lan-ve", Some(7), None),
        ];
        let p = plan(
            &cfg(),
            &links,
            &[container(
                "/machine.slice/machine-wiki.scope",
                Action::Tproxy(0),
                7,
            )],
        );
        assert_eq!(
            p.elements,
            BTreeMap::from([(2, 20), (4, 10), (6, 20)]),
            "lan0 by its rule; ve-wiki by its container; an interfaces rule beats the container; veth9's namespace is nobody's"
        );
        assert_eq!(
            p.entries[1].why,
            Why::Container("/machine.slice/machine-wiki.scope".into())
        );
        assert!(p.warnings.is_empty());
    }

    #[test]
    fn loopback_is_never_classified() {
        let c = Config::parse(
            r#"{"version":1,"interfaces":[{"match":"","drop":true}]}"#,
            "t",
        )
        .unwrap();
        let p = plan(
            &c,
            &[link(1, "lo", None, None), link(2, "x", None, None)],
            &[],
        );
        assert_eq!(p.elements, BTreeMap::from([(2, DROP_CLASS)]));
    }

    #[test]
    fn a_shared_namespace_gets_the_stricter_verdict_and_a_warning() {
        let links = [link(4, "veth1", Some(7), None)];
        let both = |x: Action, y: Action| {
            plan(
                &cfg(),
                &links,
                &[container("/x.scope", x, 7), container("/y.scope", y, 7)],
            )
        };
        let p = both(Action::Direct, Action::Tproxy(1));
        assert_eq!(p.elements, BTreeMap::from([(4, 20)]));
        assert_eq!(p.entries[0].why, Why::Container("/y.scope".into()));
        assert!(p.warnings[0].contains("shared by /x.scope (direct) and /y.scope (tproxy b)"));
        assert_eq!(
            both(Action::Tproxy(1), Action::Drop).elements[&4],
            DROP_CLASS
        );
        assert_eq!(both(Action::Tproxy(1), Action::Tproxy(0)).elements[&4], 10);
        assert!(both(Action::Direct, Action::Direct).warnings.is_empty());
        assert_eq!(
            both(Action::Direct, Action::Direct).elements[&4],
            DIRECT_CLASS
        );
    }

    #[test]
    fn a_bridged_container_link_is_routed_unless_it_is_direct() {
        let links = [
            link(3, "docker0", None, None),
            link(4, "veth1", Some(7), Some(3)),
            link(5, "veth2", Some(8), Some(3)),
        ];
        let p = plan(
            &cfg(),
            &links,
            &[
                container("/d.scope", Action::Drop, 7),
                container("/e.scope", Action::Direct, 8),
            ],
        );
        assert_eq!(p.elements, BTreeMap::from([(4, DROP_CLASS)]));
        assert_eq!(p.broute, [4]);
        assert_eq!(p.entries[0].bridge.as_deref(), Some("docker0"));
        assert_eq!(p.entries[1].bridge.as_deref(), Some("docker0"));
    }

    #[test]
    fn the_ports_of_a_bridge_a_rule_proxies_are_routed_with_its_verdict() {
        let c = Config::parse(
            r#"{"version":1,"tproxies":{"a":{"port":1,"mark":10}},
            "interfaces":[{"match":"^br-vms$","tproxy":"a"},{"match":"^br-lan$","direct":true},
                          {"match":"^tap-direct$","direct":true}]}"#,
            "t",
        )
        .unwrap();
        let links = [
            link(3, "br-vms", None, None),
            link(4, "tap0", None, Some(3)),
            link(5, "tap-direct", None, Some(3)),
            link(6, "br-lan", None, None),
            link(7, "eth1", None, Some(6)),
        ];
        let p = plan(&c, &links, &[]);
        assert_eq!(
            p.elements,
            BTreeMap::from([(3, 10), (4, 10), (6, DIRECT_CLASS)])
        );
        assert_eq!(p.broute, [4], "a direct bridge's ports stay bridged");
        assert_eq!(p.entries[1].why, Why::Port(0));
        assert_eq!(p.entries[1].bridge.as_deref(), Some("br-vms"));
    }

    #[test]
    fn without_broute_containers_on_bridges_fail_closed_and_bridge_ports_stay() {
        let c = Config::parse(
            r#"{"version":1,"tproxies":{"a":{"port":1,"mark":10}},
            "interfaces":[{"match":"^br-vms$","tproxy":"a"}]}"#,
            "t",
        )
        .unwrap();
        let links = [
            link(3, "br-vms", None, None),
            link(4, "tap0", None, Some(3)),
            link(5, "veth1", Some(7), Some(3)),
        ];
        let mut p = plan(&c, &links, &[container("/d.scope", Action::Tproxy(0), 7)]);
        assert_eq!(p.broute, [4, 5]);
        note_no_broute(&c, &mut p);
        assert_eq!(
            p.broute,
            [5],
            "the container's port is dropped in the bridge table"
        );
        assert_eq!(p.elements, BTreeMap::from([(3, 10), (5, 10)]));
        assert_eq!(p.warnings.len(), 1);
        assert!(p.warnings[0].starts_with("veth1 is a port of bridge br-vms"));
    }

    #[test]
    fn diff_replaces_changed_classes() {
        let old = BTreeMap::from([(2, 10), (3, 20)]);
        let new = BTreeMap::from([(3, 10), (4, 20)]);
        assert_eq!(diff(&old, &new), (vec![2, 3], vec![(3, 10), (4, 20)]));
        assert_eq!(diff(&new, &new), (vec![], vec![]));
    }
}
