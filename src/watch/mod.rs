//! The cgroup2 hierarchy: where it is mounted, how it is walked, and the inotify
//! watcher that follows it.

pub mod containers;
pub mod hierarchy;
pub mod inotify;
