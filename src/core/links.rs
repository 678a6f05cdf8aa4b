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
    /// The bridge a container's link is a port of: what it forwards arrives as
    /// the bridge's traffic, so this link is not in the map (see [`plan`]).
    pub bridge: Option<String>,
}

/// The interfaces map and what explains it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkPlan {
    /// Interface index → class (see [`class`]): the `ifaces` map's elements.
    pub elements: BTreeMap<u32, u32>,
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
/// stricter one ([`stricter`]) and a warning. A container's link that is a
/// bridge port is reported and left out: its traffic reaches this host's
/// prerouting as the bridge's, so only an `interfaces` rule on the bridge
/// classifies it.
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
    for l in links.iter().filter(|l| l.index != LOOPBACK) {
        let (action, why) = if let Some((i, a)) = cfg.classify_interface(&l.name) {
            (a, Why::Rule(i))
        } else if let Some(&(a, path)) = l.peer_netns.and_then(|n| by_netns.get(&n)) {
            (a, Why::Container(path.to_owned()))
        } else {
            continue;
        };
        let bridge = match (&why, l.master) {
            (Why::Container(_), Some(m)) => Some(name_of(m).unwrap_or_else(|| format!("#{m}"))),
            _ => None,
        };
        if let (Some(b), Why::Container(path)) = (&bridge, &why) {
            out.warnings.push(format!(
                "{path} reaches this host through {} on bridge {b}: its traffic arrives as the bridge's and is not classified by its cgroup; give the bridge an `interfaces` rule or the container a direct veth",
                l.name
            ));
        } else {
            out.elements.insert(l.index, class(cfg, action));
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
    fn a_bridged_container_link_is_reported_not_mapped() {
        let links = [
            link(3, "docker0", None, None),
            link(4, "veth1", Some(7), Some(3)),
        ];
        let p = plan(&cfg(), &links, &[container("/d.scope", Action::Drop, 7)]);
        assert!(p.elements.is_empty());
        assert_eq!(p.entries[0].bridge.as_deref(), Some("docker0"));
        assert!(
            p.warnings[0].contains("through veth1 on bridge docker0"),
            "{:?}",
            p.warnings
        );
    }

    #[test]
    fn diff_replaces_changed_classes() {
        let old = BTreeMap::from([(2, 10), (3, 20)]);
        let new = BTreeMap::from([(3, 10), (4, 20)]);
        assert_eq!(diff(&old, &new), (vec![2, 3], vec![(3, 10), (4, 20)]));
        assert_eq!(diff(&new, &new), (vec![], vec![]));
    }
}
