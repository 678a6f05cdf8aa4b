//! `cgtproxy explain`: how the traffic of a process, cgroup or unit is
//! classified — the planner's own decision — and whether the kernel agrees.

use std::fmt::Write;

use crate::config::{Action, Config, Datapath};
use crate::core::cgroup::{Cgroup, is_within};
use crate::core::links::Why;
use crate::core::table;
use crate::core::tree::Tree;
use crate::kernel::inspect;
use crate::watch::containers::discover;
use crate::watch::hierarchy::{self, Hierarchy};

use super::status::{StatusError, class_name, why};

fn describe(cfg: &Config, a: Option<Action>) -> String {
    match a {
        None => "unclassified (untouched)".into(),
        Some(Action::Direct) => "direct".into(),
        Some(Action::Drop) => "drop".into(),
        Some(Action::Tproxy(i)) => {
            let t = &cfg.targets[usize::from(i)];
            format!("tproxy {} (port {}, mark {:#x})", t.name, t.port, t.mark)
        }
    }
}

fn resolve(hier: &Hierarchy, what: &str) -> Result<Vec<Cgroup>, StatusError> {
    if let Ok(pid) = what.parse::<u32>() {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .map_err(|source| StatusError::Pid { pid, source })?;
        // The cgroup2 line is "0::/path".
        let path = text
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or_else(|| StatusError::NotFound(what.to_owned()))?;
        return resolve(hier, path);
    }
    let all = hierarchy::walk(hier);
    let found: Vec<Cgroup> = if what.starts_with('/') {
        all.into_iter().filter(|c| &*c.path == what).collect()
    } else {
        all.into_iter()
            .filter(|c| c.path.rsplit('/').next() == Some(what))
            .collect()
    };
    if found.is_empty() {
        return Err(StatusError::NotFound(what.to_owned()));
    }
    Ok(found)
}

/// What the kernel holds, from either datapath.
enum Kernel {
    Nft(Option<inspect::Installed>),
    Ebpf(Option<crate::kernel::bpf::Installed>),
}

impl Kernel {
    fn read(cfg: &Config) -> Result<Kernel, StatusError> {
        Ok(match cfg.datapath {
            Datapath::Nft => Kernel::Nft(inspect::read(&cfg.table)?),
            Datapath::Ebpf => Kernel::Ebpf(crate::kernel::bpf::inspect()?),
        })
    }

    fn present(&self) -> bool {
        match self {
            Kernel::Nft(i) => i.is_some(),
            Kernel::Ebpf(i) => i.is_some(),
        }
    }

    /// The class the kernel holds for cgroup `id` at `level`.
    fn element(&self, level: u32, id: u64) -> Option<u32> {
        match self {
            Kernel::Nft(i) => i.as_ref()?.maps.get(&level)?.get(&id).copied(),
            Kernel::Ebpf(i) => i.as_ref()?.cgroups.get(&id).copied(),
        }
    }

    /// The class the kernel holds for interface `index` (nft only).
    fn iface(&self, index: u32) -> Option<u32> {
        match self {
            Kernel::Nft(i) => i.as_ref()?.ifaces.get(&index).copied(),
            Kernel::Ebpf(_) => None,
        }
    }

    fn absent(&self, cfg: &Config) -> String {
        match self {
            Kernel::Nft(_) => format!("table inet {} is not installed", cfg.table),
            Kernel::Ebpf(_) => "no cgtproxy eBPF programs are loaded".into(),
        }
    }

    fn where_(&self, level: u32) -> String {
        match self {
            Kernel::Nft(_) => format!("element at level {level}"),
            Kernel::Ebpf(_) => "cgroups map entry".into(),
        }
    }
}

/// Explains how the traffic of `what` is classified, and whether the kernel agrees.
pub fn explain(cfg: &Config, what: &str) -> Result<(String, bool), StatusError> {
    let hier = Hierarchy::discover(&cfg.cgroup_root)?;
    let installed = Kernel::read(cfg)?;
    let mut o = String::new();
    let mut all_agree = true;
    let found = resolve(&hier, what)?;
    // Containers are judged against the whole tree: what decides them may be
    // any ancestor, and their processes any descendant.
    // The eBPF datapath never meets forwarded traffic: no interfaces.
    let links = match cfg.datapath {
        Datapath::Nft => discover(&hier, cfg, &Tree::build(cfg, &hierarchy::walk(&hier)))?,
        Datapath::Ebpf => crate::core::links::LinkPlan::default(),
    };
    for cg in found {
        let _ = writeln!(o, "cgroup {} (id {}, level {})", cg.path, cg.id, cg.level);
        // Ancestors-or-self from the top, with the rule each matches.
        let mut chain = Vec::new();
        let mut p = cg.path.to_string();
        loop {
            chain.push(p.clone());
            match p.rsplit_once('/') {
                Some(("", _)) | None => break,
                Some((parent, _)) => p = parent.to_owned(),
            }
        }
        chain.reverse();
        // The planner's own decision, from the planner's own tree of the chain.
        let known: Vec<Cgroup> = chain.iter().filter_map(|p| hier.describe(p)).collect();
        let tree = Tree::build(cfg, &known);
        let decision = tree.decision(&cg.path);
        for path in &chain {
            let rule = cfg
                .rules
                .iter()
                .position(|r| r.regex.is_match(path))
                .map(|i| (i, &cfg.rules[i]));
            match rule {
                Some((i, r)) => {
                    let _ = writeln!(
                        o,
                        "  {path}: rules[{i}] {:?} → {}",
                        r.regex.as_str(),
                        describe(cfg, Some(r.action))
                    );
                }
                None => {
                    let _ = writeln!(o, "  {path}: no rule matches");
                }
            }
        }
        let _ = writeln!(
            o,
            "decision: {}{}",
            describe(cfg, decision.map(|d| d.0)),
            decision
                .map(|(_, by)| format!(", decided by {by}"))
                .unwrap_or_default()
        );
        // What the kernel will do: the deepest ancestor-or-self with an element.
        let mut kernel = None;
        for path in chain.iter().rev() {
            if let Some(c) = hier.describe(path)
                && let Some(v) = installed.element(c.level, c.id)
            {
                kernel = Some((path.clone(), c.level, v));
                break;
            }
        }
        // No element is as good as an unclassified one: the walk finds no class.
        let says = kernel
            .as_ref()
            .map_or(table::UNCLASSIFIED_CLASS, |(_, _, c)| *c);
        let agrees = says == table::element_class(cfg, decision.map(|d| d.0));
        all_agree &= agrees && installed.present();
        match (installed.present(), kernel) {
            (false, _) => {
                let _ = writeln!(o, "kernel: {}", installed.absent(cfg));
            }
            (true, None) => {
                let _ = writeln!(
                    o,
                    "kernel: no element for it or an ancestor (traffic untouched): {}",
                    if agrees { "agrees" } else { "DISAGREES" }
                );
            }
            (true, Some((p, level, class))) => {
                let _ = writeln!(
                    o,
                    "kernel: {} for {p} → class {}: {}",
                    installed.where_(level),
                    class_name(cfg, class),
                    if agrees { "agrees" } else { "DISAGREES" }
                );
            }
        }
        let related = |p: &str| is_within(p, &cg.path) || is_within(&cg.path, p);
        for e in &links.entries {
            let Why::Container(p) = &e.why else { continue };
            if !related(p) {
                continue;
            }
            let kernel = installed.iface(e.index);
            let mapped = links.elements.contains_key(&e.index);
            let verdict = match (&e.bridge, kernel) {
                (Some(b), _) if !mapped => {
                    format!("it stays on bridge {b}, whose verdict (if any) it follows")
                }
                (_, Some(c)) if c == table::class(cfg, e.action) => "kernel agrees".into(),
                (_, Some(c)) => format!("kernel DISAGREES ({})", class_name(cfg, c)),
                (_, None) => "kernel DISAGREES (no element)".into(),
            };
            all_agree &= !mapped || verdict == "kernel agrees";
            let _ = writeln!(
                o,
                "forwarded from its network namespace through interface {} ({}): {}; {verdict}",
                e.name,
                why(cfg, e),
                describe(cfg, Some(e.action))
            );
        }
    }
    Ok((o, all_agree))
}
