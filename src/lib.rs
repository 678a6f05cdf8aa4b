//! cgtproxy: per-application transparent proxying by cgroup v2 path.
//!
//! - [`config`]: the configuration's schema and validation.
//! - [`core`]: pure — the classification tree, the table spec, rule precedence,
//!   reverse-path filters, the daemon's deadlines, nft syntax.
//! - [`kernel`]: netlink — nftables, policy routing, notifications, sockets.
//! - [`watch`]: the cgroup2 hierarchy and its inotify watcher.
//! - [`daemon`]: `cgtproxy run`, the event loop.
//! - [`cli`]: `status`, `explain`, `doctor`, `exec`.
//! - [`forward`]: `cgtproxy forward`, the built-in transparent forwarder.

pub mod cli;
pub mod config;
pub mod core;
pub mod daemon;
pub mod forward;
pub mod kernel;
pub mod watch;
