//! A cgroup as the planner sees it, and the arithmetic of cgroup paths.

use std::rc::Rc;

/// A cgroup: its path, id and level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    /// Relative to the hierarchy root, with a leading `/`. Shared (not copied)
    /// between the planner's tree and the watcher's table: with tens of thousands
    /// of cgroups the paths are most of the daemon's memory.
    pub path: Rc<str>,
    /// The directory's inode number: the id `socket cgroupv2` compares against.
    pub id: u64,
    /// Absolute level: 0 for the root.
    pub level: u32,
}

/// The cgroup path of child `name` of cgroup `parent`.
pub fn child_path(parent: &str, name: &str) -> String {
    if parent == "/" {
        format!("/{name}")
    } else {
        format!("{parent}/{name}")
    }
}

/// The parent of cgroup `path`, or `None` at the top: the root, which is never
/// classified, counts as no parent.
pub fn parent_of(path: &str) -> Option<&str> {
    match path.rsplit_once('/') {
        Some(("", _)) | None => None,
        Some((parent, _)) => Some(parent),
    }
}

/// Whether cgroup `path` is `top` or below it (`/a/bc` is not below `/a/b`).
pub fn is_within(path: &str, top: &str) -> bool {
    top == "/"
        || path
            .strip_prefix(top)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_means_self_or_below_never_a_sibling_prefix() {
        assert!(is_within("/a/b", "/a/b"));
        assert!(is_within("/a/b/c", "/a/b"));
        assert!(!is_within("/a/bc", "/a/b"));
        assert!(!is_within("/a", "/a/b"));
        assert!(is_within("/a", "/"));
    }

    #[test]
    fn paths_compose_and_decompose() {
        assert_eq!(child_path("/", "a.slice"), "/a.slice");
        assert_eq!(child_path("/a.slice", "b.scope"), "/a.slice/b.scope");
        assert_eq!(parent_of("/a.slice/b.scope"), Some("/a.slice"));
        assert_eq!(
            parent_of("/a.slice"),
            None,
            "the root is never a parent here"
        );
    }
}
