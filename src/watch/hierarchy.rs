//! cgroup2 discovery: where the hierarchy is mounted, and what a directory in it
//! means (its path relative to the hierarchy root, its id and its absolute level).

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirEntryExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{Mode, fstatat};

use crate::config::CgroupRoot;
use crate::core::cgroup::{Cgroup, child_path};

/// `CGROUP2_SUPER_MAGIC`.
const CGROUP2_MAGIC: i64 = 0x6367_7270;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no cgroup2 mount in /proc/self/mountinfo; mount one or set cgroup-root")]
    NoMount,
    #[error("cgroup-root: {0} is not a cgroup2 mount")]
    NotCgroup2(PathBuf),
}

/// A mounted cgroup2 hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Where it is mounted.
    pub mount: PathBuf,
    /// The cgroup the mount shows as its root ("" for the real root), so that paths
    /// and levels stay absolute even for a mount of a subtree.
    pub prefix: String,
}

/// One cgroup2 line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    root: String,
    point: PathBuf,
    read_only: bool,
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            out.push(v as u8);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn cgroup2_mounts(mountinfo: &str) -> Vec<Mount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            if fstype != "cgroup2" {
                return None;
            }
            let f: Vec<&str> = left.split_whitespace().collect();
            let (root, point, opts) = (f.get(3)?, f.get(4)?, f.get(5)?);
            Some(Mount {
                root: unescape(root),
                point: PathBuf::from(unescape(point)),
                read_only: opts.split(',').any(|o| o == "ro"),
            })
        })
        .collect()
}

fn prefix_of(root: &str) -> String {
    root.trim_end_matches('/').to_owned()
}

/// Picks the cgroup2 mount to watch: the one showing the whole hierarchy, writable
/// before read-only, shortest path first, so systemd's extra (often read-only or
/// subtree) mounts do not win.
fn pick(mounts: &[Mount]) -> Option<&Mount> {
    mounts
        .iter()
        .min_by_key(|m| (m.root != "/", m.read_only, m.point.as_os_str().len()))
}

impl Hierarchy {
    /// Finds the hierarchy from the configuration's `cgroup-root`.
    pub fn discover(root: &CgroupRoot) -> Result<Hierarchy, CgroupError> {
        let mi = "/proc/self/mountinfo";
        let text = std::fs::read_to_string(mi).map_err(|source| CgroupError::Io {
            path: mi.into(),
            source,
        })?;
        let mounts = cgroup2_mounts(&text);
        match root {
            CgroupRoot::Auto => {
                let m = pick(&mounts).ok_or(CgroupError::NoMount)?;
                Ok(Hierarchy {
                    mount: m.point.clone(),
                    prefix: prefix_of(&m.root),
                })
            }
            CgroupRoot::Path(p) => {
                let st = nix::sys::statfs::statfs(p).map_err(|e| CgroupError::Io {
                    path: p.clone(),
                    source: e.into(),
                })?;
                if st.filesystem_type().0 as i64 != CGROUP2_MAGIC {
                    return Err(CgroupError::NotCgroup2(p.clone()));
                }
                let canon = p.canonicalize().unwrap_or_else(|_| p.clone());
                let prefix = mounts
                    .iter()
                    .find(|m| m.point == canon)
                    .map(|m| prefix_of(&m.root))
                    .unwrap_or_default();
                Ok(Hierarchy {
                    mount: canon,
                    prefix,
                })
            }
        }
    }

    /// The cgroup path of the mount itself ("/" unless a subtree is mounted).
    pub fn root_path(&self) -> &str {
        if self.prefix.is_empty() {
            "/"
        } else {
            &self.prefix
        }
    }

    /// The filesystem directory of cgroup `path`; `None` for a cgroup outside a
    /// subtree mount.
    pub fn dir(&self, path: &str) -> Option<PathBuf> {
        let rel = path.strip_prefix(self.prefix.as_str())?;
        if !(rel.is_empty() || rel.starts_with('/')) {
            return None;
        }
        let rel = rel.trim_start_matches('/');
        Some(if rel.is_empty() {
            self.mount.clone()
        } else {
            self.mount.join(rel)
        })
    }

    /// One process of cgroup `path` (the first `cgroup.procs` lists), if it
    /// has any: a container's namespaces are found through it.
    pub fn first_pid(&self, path: &str) -> Option<u32> {
        let procs = std::fs::read_to_string(self.dir(path)?.join("cgroup.procs")).ok()?;
        procs.lines().next()?.trim().parse().ok()
    }

    /// Whether cgroup `path` or any cgroup below it has a process (`populated`
    /// in its `cgroup.events`); `None` when that cannot be read.
    pub fn populated(&self, path: &str) -> Option<bool> {
        let events = std::fs::read_to_string(self.dir(path)?.join("cgroup.events")).ok()?;
        events
            .lines()
            .find_map(|l| l.strip_prefix("populated "))
            .map(|v| v.trim() == "1")
    }

    /// Describes cgroup `path`; `None` if its directory vanished.
    pub fn describe(&self, path: &str) -> Option<Cgroup> {
        let meta = std::fs::symlink_metadata(self.dir(path)?).ok()?;
        if !meta.is_dir() {
            return None;
        }
        let level = if path == "/" {
            0
        } else {
            path.matches('/').count() as u32
        };
        Some(Cgroup {
            path: path.into(),
            id: meta.ino(),
            level,
        })
    }
}

/// Lists the sub-directories (child cgroups) of `dir` with their inode numbers,
/// straight from the directory entries (no stat per child); a vanished directory
/// lists as empty.
pub fn children(dir: &Path) -> Vec<(String, u64)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(Result::ok)
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .filter_map(|e| {
            let ino = e.ino();
            e.file_name().into_string().ok().map(|n| (n, ino))
        })
        .collect()
}

/// Whether `dir` may have sub-directories. cgroup2 (kernfs) reports a directory's
/// link count as 2 plus its sub-directories, so 2 means none: one `statx` instead
/// of opening and listing a directory full of control files. Read after the
/// watch is added, so a child created later is still seen as an event. Other
/// file systems may report 1 ("not counted"): those are listed.
fn has_subdirs(dir: &Path) -> bool {
    std::fs::symlink_metadata(dir).map_or(true, |m| m.nlink() != 2)
}

/// [`has_subdirs`] of `dir` through its parent's open directory, if any: a
/// `statx` of one name, not of the whole path. At 50,000 cgroups the walk
/// spent about half its time resolving paths 9 or 10 components deep (kernfs
/// revalidates each one and checks permission on it); one component is
/// 5 µs instead of 12 per cgroup. Any failure falls back to the path, and
/// from there to listing.
fn has_subdirs_in(parent: Option<&File>, dir: &Path) -> bool {
    match (parent, dir.file_name()) {
        (Some(p), Some(name)) => fstatat(p, name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_or_else(|_| has_subdirs(dir), |st| st.st_nlink != 2),
        _ => has_subdirs(dir),
    }
}

/// Walks the tree from cgroup `top` (as [`Hierarchy::describe`] found it) down.
/// `enter(cgroup, parent)` runs before a directory is listed (the watcher adds
/// its watch there), with the parent's open directory when there is one, and
/// returns false for a directory that vanished, which is then skipped.
pub fn walk_with<E>(
    hier: &Hierarchy,
    top: Cgroup,
    mut enter: impl FnMut(&Cgroup, Option<&Rc<File>>) -> Result<bool, E>,
) -> Result<Vec<Cgroup>, E> {
    let mut found = Vec::new();
    // Each cgroup with its parent's directory, held open while children of it
    // wait on the stack: at most one per level of the tree.
    let mut stack: Vec<(Cgroup, Option<Rc<File>>)> = vec![(top, None)];
    while let Some((cg, parent)) = stack.pop() {
        if !enter(&cg, parent.as_ref())? {
            continue;
        }
        let Some(dir) = hier.dir(&cg.path) else {
            continue;
        };
        if !has_subdirs_in(parent.as_deref(), &dir) {
            found.push(cg);
            continue;
        }
        let open = File::open(&dir).ok().map(Rc::new);
        for (name, id) in children(&dir) {
            let child = Cgroup {
                path: child_path(&cg.path, &name).into(),
                id,
                level: cg.level + 1,
            };
            stack.push((child, open.clone()));
        }
        found.push(cg);
    }
    Ok(found)
}

/// Lists every cgroup of the hierarchy without watching it (for `render`).
pub fn walk(hier: &Hierarchy) -> Vec<Cgroup> {
    let Some(root) = hier.describe(hier.root_path()) else {
        return Vec::new();
    };
    walk_with(hier, root, |_, _| Ok::<_, std::convert::Infallible>(true)).unwrap_or_default()
}

/// The process's working directory, moved into the directory whose children a
/// walk is watching and put back when dropped. `inotify_add_watch` takes a path
/// and has no form relative to a directory descriptor: from the parent, a
/// cgroup is one component away instead of nine or ten, each of which kernfs
/// revalidates and checks permission on (a fifth of start-up at 50,000
/// cgroups). The daemon is single-threaded, so nothing else resolves relative
/// paths meanwhile (a configuration path given relative is read only after the
/// walk has put the directory back), and every other path the walk uses is
/// absolute (the configuration's `cgroup-root` must be).
#[derive(Default)]
pub struct WorkDir {
    /// Where to return to, opened before the first move (a walk that never
    /// moves, as for one new cgroup without children, opens nothing).
    home: Option<OwnedFd>,
    /// The directory we are in now, if we moved.
    here: Option<Rc<File>>,
}

impl WorkDir {
    /// Moves into `dir` (unless already there); false when it cannot, or when
    /// the current directory cannot be opened to come back to, and the caller
    /// then uses the whole path.
    pub fn enter(&mut self, dir: &Rc<File>) -> bool {
        if self.here.as_ref().is_some_and(|h| Rc::ptr_eq(h, dir)) {
            return true;
        }
        if self.home.is_none() {
            let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
            match nix::fcntl::open(".", flags, Mode::empty()) {
                Ok(home) => self.home = Some(home),
                Err(_) => return false,
            }
        }
        match nix::unistd::fchdir(dir.as_fd()) {
            Ok(()) => {
                self.here = Some(Rc::clone(dir));
                true
            }
            Err(_) => false,
        }
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let (Some(home), Some(_)) = (&self.home, &self.here) {
            if nix::unistd::fchdir(home.as_fd()).is_err() {
                let _ = nix::unistd::chdir("/");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
33 25 0:28 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
34 33 0:29 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
35 33 0:30 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
90 34 0:29 /system.slice/foo.service /run/foo/cg ro,relatime - cgroup2 cgroup2 rw
91 34 0:29 / /run/protected\\040dir/cg ro,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn hybrid_layout_picks_the_unified_mount() {
        let mounts = cgroup2_mounts(HYBRID);
        assert_eq!(mounts.len(), 3);
        let m = pick(&mounts).unwrap();
        assert_eq!(m.point, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(mounts[2].point, PathBuf::from("/run/protected dir/cg"));
        assert!(mounts[2].read_only);
    }

    #[test]
    fn read_only_whole_mount_still_wins_over_subtree() {
        let text = "\
1 0 0:29 /system.slice /a rw - cgroup2 cgroup2 rw
2 0 0:29 / /sys/fs/cgroup ro - cgroup2 cgroup2 rw
";
        let mounts = cgroup2_mounts(text);
        assert_eq!(
            pick(&mounts).unwrap().point,
            PathBuf::from("/sys/fs/cgroup")
        );
        assert!(pick(&cgroup2_mounts("1 0 0:1 / / rw - ext4 /dev/sda rw\n")).is_none());
    }

    #[test]
    fn paths_and_levels_are_absolute_for_subtree_mounts() {
        let h = Hierarchy {
            mount: "/mnt/cg".into(),
            prefix: prefix_of("/system.slice/foo.service"),
        };
        assert_eq!(h.root_path(), "/system.slice/foo.service");
        assert_eq!(h.dir("/system.slice/foo.service"), Some("/mnt/cg".into()));
        assert_eq!(
            h.dir("/system.slice/foo.service/x"),
            Some("/mnt/cg/x".into())
        );
        assert_eq!(h.dir("/system.slice"), None);
        assert_eq!(h.dir("/system.slice/foo.service2"), None);
        let root = Hierarchy {
            mount: "/sys/fs/cgroup".into(),
            prefix: prefix_of("/"),
        };
        assert_eq!(root.root_path(), "/");
        assert_eq!(root.dir("/"), Some("/sys/fs/cgroup".into()));
        assert_eq!(root.dir("/a/b"), Some("/sys/fs/cgroup/a/b".into()));
        assert_eq!(child_path("/", "a"), "/a");
        assert_eq!(child_path("/a", "b"), "/a/b");
    }

    #[test]
    fn only_directories_with_subdirectories_are_listed() {
        let dir = std::env::temp_dir().join(format!("cgtproxy-nlink-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("leaf")).unwrap();
        std::fs::write(dir.join("leaf/cgroup.procs"), "").unwrap();
        assert!(has_subdirs(&dir));
        assert!(
            !has_subdirs(&dir.join("leaf")),
            "files are not sub-directories"
        );
        assert!(has_subdirs(&dir.join("gone")), "unknown: list it");
        let parent = File::open(&dir).unwrap();
        assert!(!has_subdirs_in(Some(&parent), &dir.join("leaf")));
        assert!(has_subdirs_in(Some(&parent), &dir.join("gone")));
        assert!(has_subdirs_in(None, &dir));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn describe_reports_inode_and_level() {
        let dir = std::env::temp_dir().join(format!("cgtproxy-describe-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("a/b")).unwrap();
        let h = Hierarchy {
            mount: dir.clone(),
            prefix: String::new(),
        };
        let cg = h.describe("/a/b").unwrap();
        assert_eq!(&*cg.path, "/a/b");
        assert_eq!(cg.level, 2);
        assert_eq!(cg.id, std::fs::metadata(dir.join("a/b")).unwrap().ino());
        assert_eq!(h.describe("/").unwrap().level, 0);
        assert!(h.describe("/gone").is_none());
        let a_ino = std::fs::metadata(dir.join("a")).unwrap().ino();
        assert_eq!(children(&dir), vec![("a".to_owned(), a_ino)]);
        let all = walk(&h);
        let mut paths: Vec<(&str, u32)> = all.iter().map(|c| (&*c.path, c.level)).collect();
        paths.sort();
        assert_eq!(paths, [("/", 0), ("/a", 1), ("/a/b", 2)]);
        assert_eq!(all.iter().find(|c| &*c.path == "/a/b").unwrap().id, cg.id);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
