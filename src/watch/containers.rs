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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use crate::config::Config;
use crate::core::cgroup::{is_within, parent_of};
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
    /// New cgroups still to be looked at.
    pending: Vec<Pending>,
    /// Those that left `pending` (see [`Containers::take_done`]).
    done: Vec<String>,
}

/// A new cgroup: when it appeared, and its next follow-up (an index into
/// [`PROBE_AFTER`]), so that each is looked at once per follow-up, however
/// many other new cgroups wake the daemon.
#[derive(Debug)]
struct Pending {
    path: String,
    added: Instant,
    next: usize,
    /// It just got its first process (see `Watcher::watch_populated`).
    populated: bool,
}

impl Pending {
    fn due(&self, now: Instant) -> bool {
        self.populated
            || PROBE_AFTER
                .get(self.next)
                .is_some_and(|&d| self.added + d <= now)
    }

    /// Past every follow-up that is due at `now`.
    fn advance(&mut self, now: Instant) {
        self.populated = false;
        while self.due(now) {
            self.next += 1;
        }
    }
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
        tracing::debug!(path, ?netns, "looked for a container");
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
        self.pending.push(Pending {
            path: path.to_owned(),
            added: now,
            next: 0,
            populated: false,
        });
    }

    /// New cgroup `path` got its first process: it is looked at next time.
    pub fn populated(&mut self, path: &str) {
        if let Some(p) = self.pending.iter_mut().find(|p| p.path == path) {
            p.populated = true;
        }
    }

    /// New cgroups no longer looked at since the last call: their first
    /// process is not waited for any more.
    pub fn take_done(&mut self) -> Vec<String> {
        std::mem::take(&mut self.done)
    }

    /// Cgroup `path` and its subtree are gone.
    pub fn removed(&mut self, path: &str) {
        self.found.retain(|p, _| !is_within(p, path));
        self.pending.retain(|p| !is_within(&p.path, path));
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
            self.done.extend(self.pending.drain(..).map(|p| p.path));
        } else {
            let accounted = |c: &Containers| -> BTreeSet<i32> {
                c.found.values().chain(c.looked.iter()).copied().collect()
            };
            let unknown = !reached.is_subset(&accounted(self));
            // New cgroups first (all of them when a namespace is unknown: a
            // container's process is most likely in one), each otherwise at
            // its own follow-ups.
            for i in 0..self.pending.len() {
                if unknown || self.pending[i].due(now) {
                    let path = self.pending[i].path.clone();
                    self.look(links, hier, &path, &reached)?;
                }
                self.pending[i].advance(now);
            }
            let (left, kept) = std::mem::take(&mut self.pending)
                .into_iter()
                .partition::<Vec<Pending>, _>(|p| p.next >= PROBE_AFTER.len());
            self.done.extend(left.into_iter().map(|p| p.path));
            self.pending = kept;
            if !reached.is_subset(&accounted(self)) {
                let paths = worth_looking(tree.decided().map(|(p, _)| p), |p| hier.populated(p));
                for path in paths {
                    self.look(links, hier, path, &reached)?;
                }
                self.looked = reached.clone();
            }
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

/// Of the decided cgroups, those a full look must read: one whose parent's
/// subtree holds no process (`populated` false in the parent's
/// `cgroup.events`, read once per parent) is passed over. At 50,000 mostly
/// empty cgroups reading each one's `cgroup.procs` took half a second of every
/// start on a host with containers (veth peers). Unreadable counts as populated.
fn worth_looking<'a>(
    decided: impl Iterator<Item = &'a str>,
    populated: impl Fn(&str) -> Option<bool>,
) -> Vec<&'a str> {
    let mut parents: HashMap<&str, bool> = HashMap::new();
    decided
        .filter(|path| match parent_of(path) {
            Some(parent) => *parents
                .entry(parent)
                .or_insert_with(|| populated(parent) != Some(false)),
            None => true,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn cgroups_below_an_empty_parent_are_passed_over() {
        let decided = ["/a", "/a/b", "/a/b/c", "/a/b/d", "/e/f", "/e/g", "/h/i"];
        let asked = std::cell::RefCell::new(Vec::new());
        let looked = worth_looking(decided.into_iter(), |p| {
            asked.borrow_mut().push(p.to_owned());
            match p {
                "/a/b" => Some(false),
                "/a" | "/e" => Some(true),
                _ => None,
            }
        });
        // "/a/b" itself is read (its parent has processes); "/h" is unreadable.
        assert_eq!(looked, ["/a", "/a/b", "/e/f", "/e/g", "/h/i"]);
        // Each parent once; a top-level cgroup has none to ask.
        assert_eq!(*asked.borrow(), ["/a", "/a/b", "/e", "/h"]);
    }

    #[test]
    fn a_new_cgroup_is_looked_at_once_per_follow_up() {
        let t0 = Instant::now();
        let mut p = Pending {
            path: "/c.scope".into(),
            added: t0,
            next: 0,
            populated: false,
        };
        assert!(p.due(t0), "at once");
        p.advance(t0);
        assert!(!p.due(t0), "not twice for one follow-up");
        let late = t0 + Duration::from_millis(15);
        assert!(p.due(late));
        p.advance(late);
        assert_eq!(
            PROBE_AFTER[p.next],
            Duration::from_millis(20),
            "missed ones skipped"
        );
        p.populated = true;
        assert!(p.due(late), "its first process arrived");
        p.advance(late);
        assert!(!p.due(late));
        p.advance(t0 + Duration::from_secs(6));
        assert_eq!(p.next, PROBE_AFTER.len(), "done after the last");
    }
}
