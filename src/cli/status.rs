//! `cgtproxy status`: what the kernel holds, compared with what the
//! configuration asks for. Read from the kernel, never from a daemon.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde_json::json;

use crate::config::{Config, Datapath};
use crate::core::bpfmaps;
use crate::core::links::{self, LinkPlan, Why};
use crate::core::precedence;
use crate::core::table::{self, Family};
use crate::core::tree::{self, Tree};
use crate::daemon::runstate;
use crate::kernel::inspect::{self, Installed};
use crate::kernel::route::{FAMILIES, Routes, has_rule, ip_command};
use crate::watch::hierarchy::{self, Hierarchy};

/// Exit status when the kernel state differs from the configuration.
pub const EXIT_DRIFT: u8 = 3;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Inspect(#[from] inspect::InspectError),
    #[error(transparent)]
    Route(#[from] crate::kernel::route::RouteError),
    #[error(transparent)]
    Cgroup(#[from] crate::watch::hierarchy::CgroupError),
    #[error(transparent)]
    Links(#[from] crate::kernel::links::LinksError),
    #[error("probing the kernel: {0}")]
    Nft(#[from] crate::kernel::nft::NftError),
    #[error(transparent)]
    Bpf(#[from] crate::kernel::bpf::BpfError),
    #[error("cannot read /proc/{pid}/cgroup: {source}")]
    Pid { pid: u32, source: std::io::Error },
    #[error("no cgroup named {0:?} (give a PID, a cgroup path starting with /, or a unit name)")]
    NotFound(String),
}

/// What a class in a level map means.
pub(super) fn class_name(cfg: &Config, class: u32) -> String {
    match class {
        crate::config::DIRECT_CLASS => "direct".into(),
        crate::config::DROP_CLASS => "drop".into(),
        crate::core::table::UNCLASSIFIED_CLASS => "unclassified (untouched)".into(),
        c => match cfg.targets.iter().find(|t| t.mark == c) {
            Some(t) => t.name.clone(),
            None => format!("unknown class {c:#x}"),
        },
    }
}

/// A table's flags by name (`owner`, `persist`), `none` without any.
fn flag_names(flags: u32) -> Vec<&'static str> {
    use crate::kernel::nft::{TABLE_F_OWNER, TABLE_F_PERSIST};
    let names: Vec<&str> = [(TABLE_F_OWNER, "owner"), (TABLE_F_PERSIST, "persist")]
        .into_iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, n)| n)
        .collect();
    if names.is_empty() {
        vec!["none"]
    } else {
        names
    }
}

/// Map elements that differ between what the configuration wants and what the
/// kernel holds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Drift {
    /// Wanted, absent.
    missing: usize,
    /// Present with another class.
    wrong: usize,
    /// Present, not wanted.
    extra: usize,
}

impl Drift {
    fn none(&self) -> bool {
        self.missing + self.wrong + self.extra == 0
    }
}

/// Compares the wanted elements with the installed maps.
fn drift(cfg: &Config, want: &tree::Elements, inst: &Installed) -> Drift {
    let mut d = Drift::default();
    for (&(level, id), &a) in want {
        match inst.maps.get(&level).and_then(|m| m.get(&id)) {
            None => d.missing += 1,
            Some(&c) if c != table::element_class(cfg, a) => d.wrong += 1,
            Some(_) => {}
        }
    }
    for (level, m) in &inst.maps {
        d.extra += m
            .keys()
            .filter(|id| !want.contains_key(&(*level, **id)))
            .count();
    }
    d
}

/// Adds the interface map's differences to `d`.
fn iface_drift(d: &mut Drift, want: &BTreeMap<u32, u32>, have: &BTreeMap<u32, u32>) {
    for (i, c) in want {
        match have.get(i) {
            None => d.missing += 1,
            Some(h) if h != c => d.wrong += 1,
            Some(_) => {}
        }
    }
    d.extra += have.keys().filter(|i| !want.contains_key(i)).count();
}

/// How an interface got its verdict.
pub(super) fn why(cfg: &Config, e: &links::Entry) -> String {
    match &e.why {
        Why::Rule(i) => format!("interfaces[{i}] {:?}", cfg.interfaces[*i].regex.as_str()),
        Why::Port(i) => format!(
            "a port of a bridge interfaces[{i}] {:?} matches",
            cfg.interfaces[*i].regex.as_str()
        ),
        Why::Container(path) => format!("container {path}"),
    }
}

/// One ip rule or route of ours: its family, the mark of a rule (`None` for the
/// route) and whether the kernel has it.
type RoutingEntry = (Family, Option<u32>, bool);

/// What `status` found in the kernel, against the configuration.
struct Report {
    installed: Option<Installed>,
    cgroups: usize,
    direct: usize,
    drop: usize,
    /// Cgroups per target, in the configuration's order.
    per_target: Vec<usize>,
    routing: Vec<RoutingEntry>,
    /// Foreign ip rules that take marked packets before ours.
    preceding: Vec<String>,
    degraded: Option<String>,
    drift: Drift,
    /// The interfaces that classify forwarded traffic.
    links: LinkPlan,
    /// Whether the kernel can route bridge ports (probed only when some
    /// bridge port is to be routed).
    can_broute: bool,
}

impl Report {
    fn gather(cfg: &Config) -> Result<Report, StatusError> {
        let installed = inspect::read(&cfg.table)?;
        let hier = Hierarchy::discover(&cfg.cgroup_root)?;
        let tree = Tree::build(cfg, &hierarchy::walk(&hier));
        let mut routes = Routes::open()?;
        let marks: Vec<u32> = cfg.targets.iter().map(|t| t.mark).collect();
        // One dump of the rules serves both the order and the presence checks.
        let rules = routes.all_rules()?;
        let preceding = precedence::preceding(&rules, &marks, cfg.route_table);
        let mut routing = Vec::new();
        for fam in FAMILIES {
            for t in &cfg.targets {
                routing.push((
                    fam,
                    Some(t.mark),
                    has_rule(&rules, fam, t.mark, cfg.route_table),
                ));
            }
            if !cfg.targets.is_empty() {
                routing.push((fam, None, routes.route_exists(fam, cfg.route_table)?));
            }
        }
        let mut links = crate::watch::containers::discover(&hier, cfg, &tree)?;
        let can_broute = links.broute.is_empty()
            || crate::kernel::nft::Nft::open()?
                .can_broute(&format!("{}-broute-probe", cfg.table), 0)?;
        if !can_broute {
            links::note_no_broute(cfg, &mut links);
        }
        let none = Installed::default();
        let inst = installed.as_ref().unwrap_or(&none);
        let mut drift = drift(cfg, &tree.elements(), inst);
        iface_drift(&mut drift, &links.elements, &inst.ifaces);
        let (direct, drop, per_target) = tree.counts(cfg.targets.len());
        Ok(Report {
            installed,
            cgroups: tree.len(),
            direct,
            drop,
            per_target,
            routing,
            preceding,
            degraded: runstate::degraded(),
            drift,
            links,
            can_broute,
        })
    }

    /// All as configured: installed, routed, first in rule order, no drift,
    /// not degraded.
    fn ok(&self) -> bool {
        self.installed.is_some()
            && self.routing.iter().all(|r| r.2)
            && self.preceding.is_empty()
            && self.drift.none()
            && self.degraded.is_none()
            && (self.can_broute || self.links.broute.is_empty())
    }

    fn counters(&self, name: &str) -> (u64, u64) {
        self.installed
            .as_ref()
            .and_then(|i| i.counters.get(name).copied())
            .unwrap_or((0, 0))
    }

    fn json(&self, cfg: &Config) -> String {
        let maps = self.installed.as_ref().map(|i| &i.maps);
        // Kernel map elements per class name (direct, drop, a target's name).
        let mut by_class: BTreeMap<String, usize> = BTreeMap::new();
        for m in maps.into_iter().flat_map(|m| m.values()) {
            for &c in m.values() {
                *by_class.entry(class_name(cfg, c)).or_default() += 1;
            }
        }
        let targets: Vec<_> = cfg
            .targets
            .iter()
            .zip(&self.per_target)
            .map(|(t, n)| {
                let (packets, bytes) = self.counters(&t.name);
                json!({"name": t.name, "port": t.port, "mark": t.mark, "cgroups": n,
                       "packets": packets, "bytes": bytes})
            })
            .collect();
        let routing: Vec<_> = self
            .routing
            .iter()
            .map(|(fam, mark, present)| {
                json!({"family": if *fam == Family::V4 { "ipv4" } else { "ipv6" },
                       "kind": if mark.is_some() { "rule" } else { "route" },
                       "mark": mark, "table": cfg.route_table, "present": present})
            })
            .collect();
        let interfaces: Vec<_> = self
            .links
            .entries
            .iter()
            .map(|e| {
                json!({"name": e.name, "index": e.index,
                       "verdict": links::describe(cfg, e.action), "why": why(cfg, e),
                       "bridge": e.bridge,
                       "installed": self.installed.as_ref()
                           .and_then(|i| i.ifaces.get(&e.index))
                           .map(|&c| class_name(cfg, c))})
            })
            .collect();
        let d = self.drift;
        let v = json!({
            "table": cfg.table, "installed": self.installed.is_some(), "ok": self.ok(),
            "cgroups": self.cgroups, "direct": self.direct, "drop": self.drop,
            "targets": targets,
            "elements": maps.map_or(0, |m| m.values().map(BTreeMap::len).sum::<usize>()),
            "routing": routing,
            "preceding_rules": self.preceding,
            "degraded": self.degraded,
            "table_flags": self.installed.as_ref().map(|i| flag_names(i.state.flags)),
            "drift": {"missing": d.missing, "wrong": d.wrong, "extra": d.extra},
            "elements_by_class": by_class,
            "interfaces": interfaces,
            "link_warnings": self.links.warnings,
        });
        format!("{v:#}\n")
    }

    fn text(&self, cfg: &Config) -> String {
        let mut o = String::new();
        match &self.installed {
            None => {
                let _ = writeln!(o, "table inet {}: not installed", cfg.table);
            }
            Some(i) => {
                let n: usize = i.maps.values().map(BTreeMap::len).sum();
                let _ = writeln!(
                    o,
                    "table inet {}: installed, {} map elements in {} level maps; flags: {}",
                    cfg.table,
                    n,
                    i.maps.len(),
                    flag_names(i.state.flags).join(", ")
                );
            }
        }
        let _ = writeln!(
            o,
            "cgroups: {} ({} direct, {} dropped, the rest per target below or untouched)",
            self.cgroups, self.direct, self.drop
        );
        for (t, n) in cfg.targets.iter().zip(&self.per_target) {
            let (packets, bytes) = self.counters(&t.name);
            let _ = writeln!(
                o,
                "target {}: port {}, mark {:#x}: {n} cgroups, {packets} packets, {bytes} bytes marked",
                t.name, t.port, t.mark
            );
        }
        for (fam, mark, present) in &self.routing {
            let f = ip_command(*fam);
            let what = match mark {
                Some(m) => format!("{f} rule fwmark {m:#x} lookup {}", cfg.route_table),
                None => format!("{f} route local default dev lo table {}", cfg.route_table),
            };
            let _ = writeln!(
                o,
                "{what}: {}",
                if *present { "present" } else { "MISSING" }
            );
        }
        for e in &self.links.entries {
            let kernel = self
                .installed
                .as_ref()
                .and_then(|i| i.ifaces.get(&e.index).copied());
            let mapped = self.links.elements.contains_key(&e.index);
            let state = match (&e.bridge, kernel) {
                (Some(b), _) if !mapped => {
                    format!("stays on bridge {b}, whose verdict (if any) it follows")
                }
                (Some(b), _) if !self.can_broute => format!(
                    "DROPPED: a port of bridge {b}, and this kernel cannot route bridge ports (nft `meta broute`)"
                ),
                (_, Some(k)) if k == table::class(cfg, e.action) => match &e.bridge {
                    Some(b) => format!("installed (routed, not bridged, on bridge {b})"),
                    None => "installed".to_owned(),
                },
                (_, Some(k)) => format!("the kernel has {}", class_name(cfg, k)),
                (_, None) => "MISSING in the kernel".to_owned(),
            };
            let _ = writeln!(
                o,
                "interface {} ({}): forwarded traffic {}: {state}",
                e.name,
                why(cfg, e),
                links::describe(cfg, e.action)
            );
        }
        for rule in &self.preceding {
            let _ = writeln!(
                o,
                "ip rule {rule}: takes marked packets before ours (they are dropped, not proxied): remove it, or set rule-priority below it"
            );
        }
        if let Some(d) = &self.degraded {
            let _ = writeln!(o, "daemon DEGRADED: {d}");
        }
        let d = self.drift;
        if d.none() {
            let _ = writeln!(o, "drift: none");
        } else {
            let _ = writeln!(
                o,
                "drift: {} elements missing, {} with another verdict, {} not wanted (is the daemon running with this config?)",
                d.missing, d.wrong, d.extra
            );
        }
        o
    }
}

/// The eBPF datapath's report: our programs, and the `cgroups` map against the
/// configuration. Returns the text (or JSON) and whether all is as configured.
fn ebpf_status(cfg: &Config, as_json: bool) -> Result<(String, bool), StatusError> {
    let installed = crate::kernel::bpf::inspect()?;
    let hier = Hierarchy::discover(&cfg.cgroup_root)?;
    let tree = Tree::build(cfg, &hierarchy::walk(&hier));
    let want = bpfmaps::cgroups(cfg, &tree.elements());
    let none = crate::kernel::bpf::Installed::default();
    let have = &installed.as_ref().unwrap_or(&none).cgroups;
    let mut d = Drift::default();
    for (id, c) in &want {
        match have.get(id) {
            None => d.missing += 1,
            Some(h) if h != c => d.wrong += 1,
            Some(_) => {}
        }
    }
    d.extra = have.keys().filter(|id| !want.contains_key(id)).count();
    let (direct, drop, per_target) = tree.counts(cfg.targets.len());
    let degraded = runstate::degraded();
    let programs = installed.as_ref().map_or(0, |i| i.programs);
    let ok = installed.is_some() && d.none() && degraded.is_none();
    let mut by_class: BTreeMap<String, usize> = BTreeMap::new();
    for &c in have.values() {
        *by_class.entry(class_name(cfg, c)).or_default() += 1;
    }
    if as_json {
        let targets: Vec<_> = cfg
            .targets
            .iter()
            .zip(&per_target)
            .map(|(t, n)| json!({"name": t.name, "port": t.port, "cgroups": n}))
            .collect();
        let v = json!({
            "datapath": "ebpf", "installed": installed.is_some(), "ok": ok,
            "programs": programs, "cgroups": tree.len(), "direct": direct, "drop": drop,
            "targets": targets, "elements": have.len(), "degraded": degraded,
            "drift": {"missing": d.missing, "wrong": d.wrong, "extra": d.extra},
            "elements_by_class": by_class,
        });
        return Ok((format!("{v:#}\n"), ok));
    }
    let mut o = String::new();
    match &installed {
        None => {
            let _ = writeln!(o, "datapath ebpf: no cgtproxy programs loaded");
        }
        Some(i) => {
            let _ = writeln!(
                o,
                "datapath ebpf: {} programs loaded and attached; {} cgroups in the map",
                i.programs,
                i.cgroups.len()
            );
        }
    }
    let _ = writeln!(
        o,
        "cgroups: {} ({direct} direct, {drop} dropped, the rest per target below or untouched)",
        tree.len()
    );
    for (t, n) in cfg.targets.iter().zip(&per_target) {
        let _ = writeln!(
            o,
            "target {}: TCP redirected to 127.0.0.1/[::1] port {}: {n} cgroups",
            t.name, t.port
        );
    }
    if let Some(r) = &degraded {
        let _ = writeln!(o, "daemon DEGRADED: {r}");
    }
    if d.none() {
        let _ = writeln!(o, "drift: none");
    } else {
        let _ = writeln!(
            o,
            "drift: {} cgroups missing, {} with another verdict, {} not wanted (is the daemon running with this config?)",
            d.missing, d.wrong, d.extra
        );
    }
    Ok((o, ok))
}

/// The status report; returns the text (or JSON) and whether all is as configured.
pub fn status(cfg: &Config, as_json: bool) -> Result<(String, bool), StatusError> {
    if cfg.datapath == Datapath::Ebpf {
        return ebpf_status(cfg, as_json);
    }
    let r = Report::gather(cfg)?;
    let text = if as_json { r.json(cfg) } else { r.text(cfg) };
    Ok((text, r.ok()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Action;

    #[test]
    fn drift_counts_missing_wrong_and_extra_elements() {
        let cfg = Config::parse(
            r#"{"version":1,"tproxies":{"p":{"port":1,"mark":3000}}}"#,
            "t",
        )
        .unwrap();
        let want: tree::Elements = [
            ((2, 10), Some(Action::Tproxy(0))),
            ((2, 11), Some(Action::Drop)),
            ((3, 12), Some(Action::Direct)),
            ((3, 14), None),
        ]
        .into();
        let mut inst = Installed::default();
        inst.maps
            .insert(2, [(10, 3000), (11, 3000), (13, 3000)].into());
        inst.maps.insert(3, [(14, 3000)].into());
        assert_eq!(
            drift(&cfg, &want, &inst),
            Drift {
                missing: 1,
                wrong: 2,
                extra: 1
            }
        );
        inst.maps
            .insert(2, [(10, 3000), (11, crate::config::DROP_CLASS)].into());
        inst.maps
            .insert(3, [(12, crate::config::DIRECT_CLASS), (14, 0)].into());
        assert!(drift(&cfg, &want, &inst).none());
    }
}
