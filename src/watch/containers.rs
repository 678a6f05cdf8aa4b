//! Finding containers: classified cgroups whose processes live in another
//! network namespace that a link of this host reaches. A cgroup's first
//! process (`cgroup.procs`, readable by anyone) is asked its namespace id
//! (`RTM_GETNSID`): no `/proc` walk, which the daemon's unit hides
//! (`ProtectProc=invisible`), and no `setns`.
//!
//! Looking costs one file read and one netlink exchange per cgroup, so new
//! cgroups are looked at on their own, a few times while their manager fills
//! them, and the whole tree only when a link reaches a namespace that neither
//! they, nor a known container, nor an earlier look accounts for.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::core::links::{self, Container, Link, LinkPlan};
use crate::core::schedule::PROBE_AFTER;
use crate::core::tree::Tree;
use crate::kernel::links::{Links, LinksError};
use crate::watch::hierarchy::Hierarchy;

/// Containers found so far, and what is left to look at.
#[derive(Debug, Default)]
pub struct Containers {
    /// Cgroup path → the namespace id its first process lives in.
    found: BTreeMap<String, i32>,
    /// The namespaces links reached at the last look at the whole tree.
    looked: BTreeSet<i32>,
    /// New cgroups still to be looked at, until when.
    pending: Vec<(String, Instant)>,
}

/// How long a new cgroup is looked at again (the last follow-up).
fn pending_for() -> Duration {
    PROBE_AFTER.iter().copied().max().unwrap_or_default()
}

impl Containers {
    /// Looks at cgroup `path`: remembers it when its first process lives in
    /// one of the namespaces `reached`.
    fn look(
        &mut self,
        links: &mut Links,
        hier: &Hierarchy,
        path: &str,
        reached: &BTreeSet<i32>,
    ) -> Result<(), LinksError> {
        let netns = match hier.first_pid(path) {
            Some(pid) => links.netns_of(pid)?,
            None => None,
        };
        match netns.filter(|n| reached.contains(n)) {
            Some(n) => {
                self.found.insert(path.to_owned(), n);
            }
            None => {
                self.found.remove(path);
            }
        }
        Ok(())
    }

    /// A decided cgroup appeared: it is looked at over the next seconds.
    pub fn added(&mut self, path: &str, now: Instant) {
        self.pending.push((path.to_owned(), now + pending_for()));
    }

    /// Cgroup `path` and its subtree are gone.
    pub fn removed(&mut self, path: &str) {
        let below = |p: &str| p == path || p.strip_prefix(path).is_some_and(|r| r.starts_with('/'));
        self.found.retain(|p, _| !below(p));
        self.pending.retain(|(p, _)| !below(p));
    }

    /// Lists the links, looks for containers where needed (see the module
    /// comment) and decides which interfaces classify forwarded traffic.
    pub fn plan(
        &mut self,
        links: &mut Links,
        hier: &Hierarchy,
        cfg: &Config,
        tree: &Tree,
        now: Instant,
    ) -> Result<LinkPlan, LinksError> {
        let all: Vec<Link> = links.dump()?;
        let reached: BTreeSet<i32> = all.iter().filter_map(|l| l.peer_netns).collect();
        if cfg.rules.is_empty() || reached.is_empty() {
            self.found.clear();
            self.pending.clear();
        } else {
            // New cgroups first: a container's process is most likely in one.
            let pending: Vec<String> = self.pending.iter().map(|(p, _)| p.clone()).collect();
            for path in pending {
                self.look(links, hier, &path, &reached)?;
            }
            let accounted: BTreeSet<i32> = self
                .found
                .values()
                .chain(self.looked.iter())
                .copied()
                .collect();
            if !reached.is_subset(&accounted) {
                for (path, _) in tree.decided() {
                    self.look(links, hier, path, &reached)?;
                }
                self.looked = reached.clone();
            }
            self.pending.retain(|&(_, until)| until > now);
            // A container's namespace may be gone while its cgroup stays.
            self.found.retain(|_, n| reached.contains(n));
        }
        let containers: Vec<Container> = self
            .found
            .iter()
            .filter_map(|(path, &netns)| {
                tree.decision(path).map(|(action, by)| Container {
                    path: by.to_owned(),
                    action,
                    netns,
                })
            })
            .collect();
        Ok(links::plan(cfg, &all, &containers))
    }
}

/// The interfaces that classify forwarded traffic now, looking at the whole
/// tree: for the one-shot commands (`status`, `explain`, `doctor`).
pub fn discover(hier: &Hierarchy, cfg: &Config, tree: &Tree) -> Result<LinkPlan, LinksError> {
    Containers::default().plan(&mut Links::open()?, hier, cfg, tree, Instant::now())
}
