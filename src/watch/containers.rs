//! Finding containers: classified cgroups whose processes live in another
//! network namespace that a link of this host reaches. A cgroup's first
//! process (`cgroup.procs`, readable by anyone) is asked its namespace id
//! (`RTM_GETNSID`): no `/proc` walk, which the daemon's unit hides
//! (`ProtectProc=invisible`), and no `setns`.
//!
//! Looking costs one file read and one netlink exchange per cgroup, so new
//! cgroups are looked at on their own, a few times while their manager fills
//! them (one found empty waits for its first process instead, which its
//! `cgroup.events` watch reports), and the whole tree only when a link
//! reaches a namespace that neither they, nor a known container, nor an
//! earlier look accounts for.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use crate::config::Config;
use crate::core::cgroup::{is_within, parent_of};
use crate::core::links::{self, Container, Link, LinkPlan};
use crate::core::schedule::{PROBE_AFTER, PROBE_COALESCE};
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

/// A new cgroup: when it appeared (or got its first process), and its next
/// follow-up (an index into [`PROBE_AFTER`]), so that each is looked at once
/// per follow-up, however many other new cgroups wake the daemon.
#[derive(Debug)]
struct Pending {
    path: String,
    added: Instant,
    next: usize,
    /// It just got its first process (see `Watcher::watch_populated`).
    populated: bool,
    /// The last look found no process in it or below it. A cgroup without
    /// one cannot be a container: no timed follow-ups until its first
    /// process arrives, which the populated watch reports. Most new cgroups
    /// stay empty for good (slices, a manager's scratch cgroups), and each
    /// follow-up is a link dump that delays the next cgroup's element.
    empty: bool,
    /// A failed look was to serve it: looked at in the next one, whenever
    /// that is.
    missed: bool,
    /// It was looked at once at least.
    looked: bool,
    /// Its populated watch was asked for (see [`Containers::to_watch`]).
    watched: bool,
}

impl Pending {
    fn new(path: &str, now: Instant) -> Pending {
        Pending {
            path: path.to_owned(),
            added: now,
            next: 0,
            populated: false,
            empty: false,
            missed: false,
            looked: false,
            watched: false,
        }
    }

    /// When it is next to be looked at; `None` while it waits for a process.
    fn next_at(&self) -> Option<Instant> {
        if self.populated {
            return Some(self.added);
        }
        if self.empty {
            return None;
        }
        PROBE_AFTER.get(self.next).map(|&d| self.added + d)
    }

    fn due(&self, now: Instant) -> bool {
        self.next_at().is_some_and(|t| t <= now)
    }

    /// Past every follow-up that is due at `now`.
    fn advance(&mut self, now: Instant) {
        self.populated = false;
        while self.due(now) {
            self.next += 1;
        }
    }

    /// Past its last follow-up (an empty cgroup: past the time it would have
    /// been).
    fn finished(&self, now: Instant) -> bool {
        self.next >= PROBE_AFTER.len()
            || (self.empty && now > self.added + PROBE_AFTER[PROBE_AFTER.len() - 1])
    }
}

impl Containers {
    /// Looks at cgroup `path`: remembers it when its first process lives in
    /// one of the namespaces `reached`. True when it has no process of its
    /// own.
    fn look(
        &mut self,
        links: &mut Links,
        hier: &Hierarchy,
        path: &str,
        reached: &BTreeSet<i32>,
    ) -> Result<bool, LinksError> {
        let pid = hier.first_pid(path);
        let netns = match pid {
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
        Ok(pid.is_none())
    }

    /// A decided cgroup appeared: it is looked at over the next seconds.
    pub fn added(&mut self, path: &str, now: Instant) {
        self.pending.push(Pending::new(path, now));
    }

    /// New cgroup `path` got its first process at `now`: it is looked at
    /// next time, and its follow-ups start over from then (its manager moves
    /// the links around the same moment).
    pub fn populated(&mut self, path: &str, now: Instant) {
        if let Some(p) = self.pending.iter_mut().find(|p| p.path == path) {
            *p = Pending {
                populated: true,
                looked: p.looked,
                watched: p.watched,
                ..Pending::new(path, now)
            };
        }
    }

    /// New cgroups still followed up after their first look whose populated
    /// watch is yet to be added, each with whether that look found its
    /// subtree without a process (only the watch can then bring the next
    /// look). Each is returned once.
    pub fn to_watch(&mut self) -> Vec<(String, bool)> {
        self.pending
            .iter_mut()
            .filter(|p| p.looked && !p.watched)
            .map(|p| {
                p.watched = true;
                (p.path.clone(), p.empty)
            })
            .collect()
    }

    /// When to look at new cgroups next, if any is waiting: the earliest
    /// follow-up plus [`PROBE_COALESCE`], so that one look serves every
    /// follow-up that close (a storm of new cgroups costs as many looks as
    /// one) and none comes before its time.
    pub fn next_look(&self) -> Option<Instant> {
        let first = self.pending.iter().filter_map(Pending::next_at).min()?;
        Some(first + PROBE_COALESCE)
    }

    /// Whether a new cgroup's follow-up is due at `now`.
    pub fn look_due(&self, now: Instant) -> bool {
        self.pending.iter().any(|p| p.due(now))
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
        let planned = self.plan_now(links, hier, cfg, tree, now);
        if planned.is_err() {
            self.failed(now);
        }
        planned
    }

    /// A look failed: the follow-ups it was for are taken all the same (the
    /// daemon retries on a schedule of its own, and one due for ever would
    /// keep it busy); the cgroups not served are looked at next time.
    fn failed(&mut self, now: Instant) {
        for p in self.pending.iter_mut().filter(|p| p.due(now)) {
            p.missed = true;
            p.advance(now);
        }
    }

    fn plan_now(
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
                let p = &self.pending[i];
                if unknown || p.missed || p.due(now) {
                    let path = p.path.clone();
                    let none_of_its_own = self.look(links, hier, &path, &reached)?;
                    let p = &mut self.pending[i];
                    // Its whole subtree, so that the populated watch reports
                    // any process that arrives, wherever below it.
                    p.empty = none_of_its_own && hier.populated(&path) == Some(false);
                    p.looked = true;
                }
                self.pending[i].missed = false;
                self.pending[i].advance(now);
            }
            let (left, kept) = std::mem::take(&mut self.pending)
                .into_iter()
                .partition::<Vec<Pending>, _>(|p| p.finished(now));
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
        let mut p = Pending::new("/c.scope", t0);
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
        assert_eq!(p.next_at(), Some(t0 + Duration::from_millis(20)));
        p.populated = true;
        assert!(p.due(late), "its first process arrived");
        p.advance(late);
        assert!(!p.due(late));
        assert!(!p.finished(late));
        p.advance(t0 + Duration::from_secs(6));
        assert_eq!(p.next, PROBE_AFTER.len(), "done after the last");
        assert!(p.finished(t0 + Duration::from_secs(6)));
        assert_eq!(p.next_at(), None);
    }

    #[test]
    fn follow_ups_close_together_are_one_look() {
        let t0 = Instant::now();
        let mut c = Containers::default();
        c.added("/a.scope", t0);
        c.added("/b.scope", t0 + PROBE_COALESCE / 2);
        let at = t0 + PROBE_COALESCE;
        assert_eq!(c.next_look(), Some(at), "never before /b's own time");
        assert!(c.look_due(at));
        for p in &mut c.pending {
            assert!(p.due(at), "one look serves both");
            p.advance(at);
        }
        assert_eq!(c.next_look(), Some(t0 + PROBE_AFTER[1] + PROBE_COALESCE));
    }

    #[test]
    fn an_empty_cgroup_waits_for_its_first_process_without_timers() {
        let t0 = Instant::now();
        let mut c = Containers::default();
        c.added("/c.scope", t0);
        assert!(c.to_watch().is_empty(), "not before its first look");
        // The first look found nobody in it.
        c.pending[0].empty = true;
        c.pending[0].looked = true;
        c.pending[0].advance(t0);
        assert_eq!(c.to_watch(), [("/c.scope".to_owned(), true)]);
        assert!(c.to_watch().is_empty(), "once");
        assert_eq!(c.next_look(), None, "no timer while it is empty");
        for ms in [1, 3, 100, 1000] {
            assert!(!c.look_due(t0 + Duration::from_millis(ms)));
        }
        // Its populated watch fired: a look at once, follow-ups from then.
        let t1 = t0 + Duration::from_secs(2);
        c.populated("/c.scope", t1);
        assert!(c.to_watch().is_empty(), "still watched");
        assert!(c.look_due(t1));
        c.pending[0].advance(t1);
        assert_eq!(c.next_look(), Some(t1 + PROBE_AFTER[1] + PROBE_COALESCE));
        assert!(!c.pending[0].finished(t1 + Duration::from_secs(4)));

        // Never populated: done once its follow-ups would have been.
        let mut e = Pending::new("/e.scope", t0);
        e.advance(t0);
        e.empty = true;
        assert!(!e.finished(t0 + Duration::from_secs(4)));
        assert!(e.finished(t0 + Duration::from_secs(6)));
    }

    #[test]
    fn a_failed_look_takes_its_follow_ups_and_serves_them_next_time() {
        let t0 = Instant::now();
        let mut c = Containers::default();
        c.added("/c.scope", t0);
        c.added("/later.scope", t0 + Duration::from_millis(50));
        c.failed(t0);
        // Not due for ever (the daemon would spin), and remembered.
        assert!(!c.look_due(t0));
        assert_eq!(c.next_look(), Some(t0 + PROBE_AFTER[1] + PROBE_COALESCE));
        assert!(c.pending[0].missed);
        assert!(!c.pending[1].missed, "not due yet: not missed");
    }
}
