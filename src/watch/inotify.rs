//! Watching the cgroup2 tree with inotify: one watch per directory, added before the
//! directory is listed so that no child created in between is missed.

use std::collections::{BTreeMap, HashMap};
use std::io::ErrorKind;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::rc::Rc;

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::core::cgroup::{Cgroup, child_path};
use crate::watch::hierarchy::{Hierarchy, WorkDir, walk_with};

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("inotify_init: {0}")]
    Init(std::io::Error),
    #[error("cannot watch {path}: {source}")]
    Watch {
        path: String,
        source: std::io::Error,
    },
    #[error("reading inotify events: {0}")]
    Read(std::io::Error),
}

/// What happened in the tree since the last read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A new directory and everything found below it.
    Added(Vec<Cgroup>),
    /// A directory (cgroup path) is gone.
    Removed(String),
    /// Events were lost (queue overflow or a rename): the whole tree as it is now.
    Rescan(Vec<Cgroup>),
    /// A cgroup watched with [`Watcher::watch_populated`] got its first
    /// process (or lost its last).
    Populated(String),
}

/// Watches one hierarchy.
pub struct Watcher {
    hier: Hierarchy,
    inotify: Inotify,
    /// Watch descriptor (its number: smaller than the crate's handle) → cgroup
    /// path, shared with the cgroup handed out. A B-tree, packed after each
    /// scan: 21 bytes a directory, where a hash map's power-of-two table took 33
    /// (1.6 MB at 50,000 cgroups).
    dirs: BTreeMap<i32, Rc<str>>,
    /// Watches of new cgroups' `cgroup.events` (see
    /// [`Watcher::watch_populated`]): descriptor number → (descriptor, path).
    populated: HashMap<i32, (WatchDescriptor, Rc<str>)>,
    buf: Vec<u8>,
    /// New directories reported by `read` but not yet watched and listed.
    pending: Vec<Cgroup>,
    /// Directories found but not watched because the inotify watch limit was
    /// reached: their cgroups are known, but what appears below them is not seen
    /// until a later [`Watcher::scan`] succeeds. The first one's path, and how many.
    unwatched: Option<(String, usize)>,
    /// Test-only (`CGTPROXY_TEST_INOTIFY_QUEUE`): treat a burst of more events
    /// than this as a queue overflow, since the kernel's queue size is a global
    /// sysctl that a test must not change.
    test_queue: Option<usize>,
    /// Test-only (`CGTPROXY_TEST_WATCHES_FULL_BELOW`): refuse watches of the
    /// directories below this cgroup path with `ENOSPC`, as the kernel does at
    /// `fs.inotify.max_user_watches`, a host-wide limit that a test must not
    /// change (and that other programs' watches would make unpredictable).
    test_full_below: Option<String>,
}

/// Environment variable of the test-only overflow knob.
pub const TEST_QUEUE_ENV: &str = "CGTPROXY_TEST_INOTIFY_QUEUE";
/// Environment variable of the test-only watch-limit knob.
pub const TEST_FULL_BELOW_ENV: &str = "CGTPROXY_TEST_WATCHES_FULL_BELOW";

const MASK: WatchMask = WatchMask::CREATE
    .union(WatchMask::DELETE)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::ONLYDIR)
    .union(WatchMask::DONT_FOLLOW);

impl Watcher {
    pub fn new(hier: Hierarchy) -> Result<Watcher, WatchError> {
        Ok(Watcher {
            hier,
            inotify: Inotify::init().map_err(WatchError::Init)?,
            dirs: BTreeMap::new(),
            populated: HashMap::new(),
            // read() drains the queue in a loop, so a few hundred events a read do.
            buf: vec![0; 16 * 1024],
            pending: Vec::new(),
            unwatched: None,
            test_queue: std::env::var(TEST_QUEUE_ENV)
                .ok()
                .and_then(|v| v.parse().ok()),
            test_full_below: std::env::var(TEST_FULL_BELOW_ENV)
                .ok()
                .map(|p| format!("{}/", p.trim_end_matches('/'))),
        })
    }

    /// Directories not watched because the watch limit was reached: the first
    /// one's path and how many, or `None` when the whole tree is watched.
    pub fn unwatched(&self) -> Option<(&str, usize)> {
        self.unwatched.as_ref().map(|(p, n)| (p.as_str(), *n))
    }

    pub fn hierarchy(&self) -> &Hierarchy {
        &self.hier
    }

    /// The descriptor to poll for events.
    /// Whether events are waiting to be read.
    pub fn more_waiting(&self) -> bool {
        let mut fds = [PollFd::new(self.fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::ZERO).is_ok_and(|n| n > 0)
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.inotify.as_fd()
    }

    /// Watches and lists the whole tree. Directories already watched keep their
    /// watch (inotify returns the same descriptor), so a rescan costs no extra
    /// watches.
    pub fn scan(&mut self) -> Result<Vec<Cgroup>, WatchError> {
        self.dirs.clear();
        self.unwatched = None;
        let Some(root) = self.hier.describe(self.hier.root_path()) else {
            return Ok(Vec::new());
        };
        let mut watched = Vec::new();
        let found = self.walk(root, &mut watched);
        // Built in one go: a B-tree filled entry by entry is left half empty,
        // and nodes discarded by packing it later stay resident as heap holes.
        self.dirs = watched.into_iter().collect();
        found
    }

    /// Watches cgroup `top` and everything below it, returning the cgroups found.
    /// Directories that vanish on the way are skipped; directories beyond the
    /// watch limit are still listed (their cgroups are classified), and counted
    /// in [`Watcher::unwatched`].
    /// The watches added go to `watched` (descriptor number, path), also when the
    /// walk fails half way.
    fn walk(
        &mut self,
        top: Cgroup,
        watched: &mut Vec<(i32, Rc<str>)>,
    ) -> Result<Vec<Cgroup>, WatchError> {
        let (hier, inotify) = (&self.hier, &mut self.inotify);
        let (unwatched, full) = (&mut self.unwatched, self.test_full_below.as_deref());
        let mut cwd = WorkDir::default();
        walk_with(hier, top, |cg, parent| {
            let Some(path) = hier.dir(&cg.path) else {
                return Ok(false);
            };
            // From inside the parent, the name alone (see `WorkDir`).
            let at = match (parent, path.file_name()) {
                (Some(p), Some(name)) if cwd.enter(p) => Path::new(name),
                _ => path.as_path(),
            };
            let added = match full {
                Some(below) if cg.path.starts_with(below) => {
                    Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
                }
                _ => inotify.watches().add(at, MASK),
            };
            match added {
                Ok(wd) => {
                    watched.push((wd.get_watch_descriptor_id(), cg.path.clone()));
                    Ok(true)
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                    let (_, n) = unwatched.get_or_insert_with(|| (cg.path.to_string(), 0));
                    *n += 1;
                    Ok(true)
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
                    Ok(false)
                }
                Err(source) => Err(WatchError::Watch {
                    path: path.display().to_string(),
                    source,
                }),
            }
        })
    }

    /// Drains every queued event (never blocks) into changes. A new directory is
    /// reported at once, unwatched, so that its element can be committed before
    /// the slower watching and listing: call [`Watcher::expand`] next.
    pub fn read(&mut self) -> Result<Vec<Change>, WatchError> {
        let mut raw = Vec::new();
        loop {
            match self.inotify.read_events(&mut self.buf) {
                Ok(events) => {
                    let before = raw.len();
                    for ev in events {
                        raw.push((
                            ev.wd.get_watch_descriptor_id(),
                            ev.mask,
                            ev.name.map(|n| n.to_owned()),
                        ));
                    }
                    if raw.len() == before {
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(WatchError::Read(e)),
            }
        }
        let mut changes = Vec::new();
        let mut lost = self.test_queue.is_some_and(|q| raw.len() > q);
        for (wd, mask, name) in raw {
            if mask.contains(EventMask::Q_OVERFLOW) || mask.contains(EventMask::MOVED_TO) {
                // Lost events, or a renamed subtree whose watches now carry stale
                // paths: only a fresh walk is trustworthy.
                lost = true;
                continue;
            }
            if mask.contains(EventMask::IGNORED) {
                self.dirs.remove(&wd);
                self.populated.remove(&wd);
                continue;
            }
            if mask.contains(EventMask::MODIFY) {
                if let Some((_, path)) = self.populated.get(&wd) {
                    changes.push(Change::Populated(path.to_string()));
                }
                continue;
            }
            if !mask.contains(EventMask::ISDIR) {
                continue;
            }
            let (Some(parent), Some(name)) = (self.dirs.get(&wd), name) else {
                continue;
            };
            let Some(name) = name.to_str() else { continue };
            let path = child_path(parent, name);
            if mask.contains(EventMask::CREATE) {
                if let Some(cg) = self.hier.describe(&path) {
                    self.pending.push(cg.clone());
                    changes.push(Change::Added(vec![cg]));
                }
            } else if mask.intersects(EventMask::DELETE | EventMask::MOVED_FROM) {
                changes.push(Change::Removed(path));
            }
        }
        if lost {
            self.pending.clear();
            return Ok(vec![Change::Rescan(self.scan()?)]);
        }
        Ok(changes)
    }

    /// Reports when cgroup `path` gets its first process: the kernel touches
    /// its `cgroup.events` (`populated 1`) when it does. A container manager
    /// creates the cgroup, then moves the container's process in, which takes
    /// the kernel tens of milliseconds; this event says when it is done. Best
    /// effort: without the watch, follow-up looks still find the process.
    pub fn watch_populated(&mut self, path: &str) {
        let Some(dir) = self.hier.dir(path) else {
            return;
        };
        if let Ok(wd) = self
            .inotify
            .watches()
            .add(dir.join("cgroup.events"), WatchMask::MODIFY)
        {
            self.populated
                .insert(wd.get_watch_descriptor_id(), (wd, path.into()));
        }
    }

    /// Stops reporting cgroup `path`'s first process.
    pub fn unwatch_populated(&mut self, path: &str) {
        let found = self
            .populated
            .iter()
            .find(|(_, (_, p))| &**p == path)
            .map(|(&id, _)| id);
        if let Some((wd, _)) = found.and_then(|id| self.populated.remove(&id)) {
            let _ = self.inotify.watches().remove(wd);
        }
    }

    /// Watches and lists the directories `read` reported, returning what was
    /// created below them in the meantime (the directories themselves are not
    /// repeated). Watch first, then list: nothing created in between is missed.
    pub fn expand(&mut self) -> Result<Vec<Change>, WatchError> {
        let mut changes = Vec::new();
        for top in std::mem::take(&mut self.pending) {
            let path = Rc::clone(&top.path);
            let mut watched = Vec::new();
            let found = self.walk(top, &mut watched);
            self.dirs.extend(watched);
            let below: Vec<Cgroup> = found?.into_iter().filter(|c| c.path != path).collect();
            if !below.is_empty() {
                changes.push(Change::Added(below));
            }
        }
        Ok(changes)
    }
}

#[cfg(test)]
mod tests {
    //! inotify works on any directory tree, so the watcher's bookkeeping is tested on
    //! a plain temporary directory; the kernel tests repeat this on cgroup2.
    use super::*;

    fn tmp(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("cgtproxy-watch-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Walks move the process's working directory (see `WorkDir`): tests that
    /// walk run one at a time, so one reading it sees no other's walk.
    static WALKS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn walks() -> std::sync::MutexGuard<'static, ()> {
        WALKS.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[test]
    fn a_walk_watches_from_inside_parents_and_puts_the_working_directory_back() {
        let d = tmp("cwd");
        std::fs::create_dir_all(d.join("a/b/c")).unwrap();
        std::fs::create_dir_all(d.join("x/y")).unwrap();
        let _walks = walks();
        let before = std::env::current_dir().unwrap();
        let mut w = Watcher::new(Hierarchy {
            mount: d.clone(),
            prefix: String::new(),
        })
        .unwrap();
        assert_eq!(
            paths(&w.scan().unwrap()),
            ["/", "/a", "/a/b", "/a/b/c", "/x", "/x/y"]
        );
        assert_eq!(std::env::current_dir().unwrap(), before);
        // Each watch is on the right directory, though added by its name alone.
        std::fs::create_dir(d.join("a/b/c/new")).unwrap();
        std::fs::create_dir(d.join("x/y/new")).unwrap();
        let mut added = Vec::new();
        for c in w.read().unwrap() {
            match c {
                Change::Added(v) => added.extend(v),
                other => panic!("expected additions, got {other:?}"),
            }
        }
        assert_eq!(paths(&added), ["/a/b/c/new", "/x/y/new"]);
        w.expand().unwrap();
        assert_eq!(std::env::current_dir().unwrap(), before);
    }

    fn paths(v: &[Cgroup]) -> Vec<String> {
        let mut p: Vec<String> = v.iter().map(|c| c.path.to_string()).collect();
        p.sort();
        p
    }

    #[test]
    fn creations_below_new_directories_and_removals_are_seen() {
        let d = tmp("basic");
        std::fs::create_dir_all(d.join("a/b")).unwrap();
        let _walks = walks();
        let mut w = Watcher::new(Hierarchy {
            mount: d.clone(),
            prefix: String::new(),
        })
        .unwrap();
        assert_eq!(paths(&w.scan().unwrap()), ["/", "/a", "/a/b"]);
        // A directory created with children already in it (as if in a burst).
        std::fs::create_dir_all(d.join("a/c/d/e")).unwrap();
        std::fs::remove_dir(d.join("a/b")).unwrap();
        let mut changes = w.read().unwrap();
        changes.extend(w.expand().unwrap());
        let mut added = Vec::new();
        let mut removed = Vec::new();
        for c in changes {
            match c {
                Change::Added(v) => added.extend(v),
                Change::Removed(p) => removed.push(p),
                Change::Rescan(_) => panic!("unexpected rescan"),
                Change::Populated(p) => panic!("unexpected populated {p}"),
            }
        }
        let mut added = paths(&added);
        added.dedup();
        assert_eq!(added, ["/a/c", "/a/c/d", "/a/c/d/e"]);
        assert_eq!(removed, ["/a/b"]);
        assert!(w.read().unwrap().is_empty());
        // The new directories are watched too.
        std::fs::create_dir(d.join("a/c/d/e/f")).unwrap();
        match w.read().unwrap().as_slice() {
            [Change::Added(v)] => assert_eq!(paths(v), ["/a/c/d/e/f"]),
            other => panic!("expected one addition, got {other:?}"),
        }
        assert!(w.expand().unwrap().is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_new_cgroups_first_process_is_reported_until_unwatched() {
        let d = tmp("populated");
        std::fs::create_dir_all(d.join("a")).unwrap();
        // cgroupfs touches this file when the first process enters.
        std::fs::write(d.join("a/cgroup.events"), "populated 0\n").unwrap();
        let _walks = walks();
        let mut w = Watcher::new(Hierarchy {
            mount: d.clone(),
            prefix: String::new(),
        })
        .unwrap();
        w.scan().unwrap();
        w.watch_populated("/a");
        std::fs::write(d.join("a/cgroup.events"), "populated 1\n").unwrap();
        assert_eq!(w.read().unwrap(), [Change::Populated("/a".into())]);
        w.unwatch_populated("/a");
        std::fs::write(d.join("a/cgroup.events"), "populated 0\n").unwrap();
        assert!(w.read().unwrap().is_empty(), "unwatched");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_rename_forces_a_rescan() {
        let d = tmp("rename");
        std::fs::create_dir_all(d.join("x/y")).unwrap();
        let _walks = walks();
        let mut w = Watcher::new(Hierarchy {
            mount: d.clone(),
            prefix: String::new(),
        })
        .unwrap();
        w.scan().unwrap();
        std::fs::rename(d.join("x"), d.join("z")).unwrap();
        let changes = w.read().unwrap();
        match changes.as_slice() {
            [Change::Rescan(all)] => assert_eq!(paths(all), ["/", "/z", "/z/y"]),
            other => panic!("expected a rescan, got {other:?}"),
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_subtree_mount_reports_absolute_cgroup_paths() {
        let d = tmp("subtree");
        std::fs::create_dir_all(d.join("a")).unwrap();
        let _walks = walks();
        let mut w = Watcher::new(Hierarchy {
            mount: d.clone(),
            prefix: "/user.slice".into(),
        })
        .unwrap();
        assert_eq!(paths(&w.scan().unwrap()), ["/user.slice", "/user.slice/a"]);
        std::fs::create_dir(d.join("a/b")).unwrap();
        match w.read().unwrap().as_slice() {
            [Change::Added(v)] => {
                assert_eq!(paths(v), ["/user.slice/a/b"]);
                assert_eq!(v[0].level, 3);
            }
            other => panic!("expected one addition, got {other:?}"),
        }
        assert!(w.expand().unwrap().is_empty());
        std::fs::remove_dir(d.join("a/b")).unwrap();
        assert_eq!(
            w.read().unwrap(),
            [Change::Removed("/user.slice/a/b".into())]
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
