//! Admission: how many TCP connections or UDP flows may be open at once, in
//! all and per source address. A flood from one source then costs that source
//! its own share, never the descriptors the host's other apps need.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

use super::target::Limiter;

/// What a gate counts, for its log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kind {
    /// Plural noun: `connections`, `UDP flows`.
    pub what: &'static str,
    /// The command-line flag of the total limit.
    pub total_flag: &'static str,
    /// The command-line flag of the per-source limit.
    pub source_flag: &'static str,
}

/// TCP connections.
pub const CONNECTIONS: Kind = Kind {
    what: "connections",
    total_flag: "--max-connections",
    source_flag: "--max-connections-per-source",
};

/// UDP flows (one per app address and original destination).
pub const UDP_FLOWS: Kind = Kind {
    what: "UDP flows",
    total_flag: "--max-udp-flows",
    source_flag: "--max-udp-flows-per-source",
};

/// Why a new connection or flow was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `limit` are open in all.
    Total { kind: Kind, limit: usize },
    /// `limit` are open from `src`.
    Source {
        kind: Kind,
        limit: usize,
        src: IpAddr,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Total { kind, limit } => write!(
                f,
                "limit reached: {limit} {} open in all ({})",
                kind.what, kind.total_flag
            ),
            Refusal::Source { kind, limit, src } => write!(
                f,
                "limit reached: {limit} {} open from {src} ({})",
                kind.what, kind.source_flag
            ),
        }
    }
}

#[derive(Default)]
struct Counts {
    open: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// Counts what is open, in all and per source, against two limits.
pub struct Gate {
    kind: Kind,
    total: usize,
    per_source: usize,
    counts: Mutex<Counts>,
    /// Woken whenever the last open one closes.
    idle: Notify,
    /// Refusals are logged apart from other warnings, and each limit apart
    /// from the other, so that neither line is lost among the rest.
    total_log: Limiter,
    source_log: Limiter,
}

impl Gate {
    /// A gate admitting up to `total` at once, `per_source` of them from one
    /// address.
    pub fn new(kind: Kind, total: usize, per_source: usize) -> Arc<Gate> {
        Arc::new(Gate {
            kind,
            total,
            per_source,
            counts: Mutex::default(),
            idle: Notify::new(),
            total_log: Limiter::new(),
            source_log: Limiter::new(),
        })
    }

    /// Logs a refusal by this gate (`msg` says whose and what), a few a second
    /// per limit.
    pub fn warn(&self, refusal: &Refusal, msg: impl FnOnce() -> String) {
        match refusal {
            Refusal::Total { .. } => self.total_log.warn(msg),
            Refusal::Source { .. } => self.source_log.warn(msg),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Counts> {
        // Counts stay consistent under every early exit: a poisoned lock's data
        // is still right.
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits one more from `src`, or says which limit stands in the way. The
    /// pass gives its place back when dropped.
    pub fn admit(self: &Arc<Gate>, src: IpAddr) -> Result<Pass, Refusal> {
        let src = src.to_canonical();
        let mut c = self.lock();
        if c.open >= self.total {
            return Err(Refusal::Total {
                kind: self.kind,
                limit: self.total,
            });
        }
        let mine = c.by_source.entry(src).or_default();
        if *mine >= self.per_source {
            return Err(Refusal::Source {
                kind: self.kind,
                limit: self.per_source,
                src,
            });
        }
        *mine += 1;
        c.open += 1;
        Ok(Pass {
            gate: self.clone(),
            src,
        })
    }

    /// How many are open now.
    pub fn open(&self) -> usize {
        self.lock().open
    }

    /// Waits until none is open or `timeout` passes; returns whether none is.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let until_idle = async {
            loop {
                let woken = self.idle.notified();
                tokio::pin!(woken);
                // Registered before the check: a close in between still wakes us.
                woken.as_mut().enable();
                if self.open() == 0 {
                    return;
                }
                woken.await;
            }
        };
        tokio::time::timeout(timeout, until_idle).await.is_ok()
    }
}

/// One admitted connection or flow.
pub struct Pass {
    gate: Arc<Gate>,
    src: IpAddr,
}

impl Drop for Pass {
    fn drop(&mut self) {
        let mut c = self.gate.lock();
        c.open = c.open.saturating_sub(1);
        if let Some(n) = c.by_source.get_mut(&self.src) {
            *n -= 1;
            if *n == 0 {
                // Sources come and go: the map holds only those with something open.
                c.by_source.remove(&self.src);
            }
        }
        if c.open == 0 {
            self.gate.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn per_source_then_total_limits_hold_and_free_on_drop() {
        let g = Gate::new(CONNECTIONS, 3, 2);
        let a1 = g.admit(ip("10.0.0.1")).unwrap();
        let _a2 = g.admit(ip("10.0.0.1")).unwrap();
        let e = g.admit(ip("10.0.0.1")).err().unwrap();
        assert_eq!(
            e.to_string(),
            "limit reached: 2 connections open from 10.0.0.1 (--max-connections-per-source)"
        );
        // The v4-mapped form is the same source.
        assert!(g.admit(ip("::ffff:10.0.0.1")).is_err());
        let _b = g.admit(ip("10.0.0.2")).unwrap();
        let e = g.admit(ip("10.0.0.3")).err().unwrap();
        assert_eq!(
            e.to_string(),
            "limit reached: 3 connections open in all (--max-connections)"
        );
        drop(a1);
        assert_eq!(g.open(), 2);
        assert!(g.admit(ip("10.0.0.1")).is_ok());
    }

    #[test]
    fn sources_leave_the_map_when_their_last_one_closes() {
        let g = Gate::new(UDP_FLOWS, 10, 10);
        let p = g.admit(ip("fd00::1")).unwrap();
        drop(p);
        assert!(g.lock().by_source.is_empty());
    }

    #[tokio::test]
    async fn wait_idle_returns_when_the_last_closes() {
        let g = Gate::new(CONNECTIONS, 10, 10);
        assert!(g.wait_idle(Duration::from_millis(1)).await);
        let p = g.admit(ip("10.0.0.1")).unwrap();
        assert!(!g.wait_idle(Duration::from_millis(20)).await);
        let waiter = {
            let g = g.clone();
            tokio::spawn(async move { g.wait_idle(Duration::from_secs(5)).await })
        };
        drop(p);
        assert!(waiter.await.unwrap());
    }
}
