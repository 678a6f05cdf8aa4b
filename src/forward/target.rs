//! What the tasks of one target share: its name, its current upstream (swapped by
//! a reload without touching established flows) and rate-limited warnings.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use super::upstream::Upstream;

pub struct TargetState {
    pub name: String,
    pub port: u16,
    upstream: RwLock<Arc<Upstream>>,
    no_udp_logged: AtomicBool,
    warnings: Limiter,
}

impl TargetState {
    pub fn new(name: String, port: u16, upstream: Upstream) -> TargetState {
        TargetState {
            name,
            port,
            upstream: RwLock::new(Arc::new(upstream)),
            no_udp_logged: AtomicBool::new(false),
            warnings: Limiter::new(),
        }
    }

    /// The upstream new flows use now.
    pub fn upstream(&self) -> Arc<Upstream> {
        match self.upstream.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the upstream for new flows; returns whether it changed.
    pub fn set_upstream(&self, up: Upstream) -> bool {
        let mut g = match self.upstream.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if **g == up {
            return false;
        }
        *g = Arc::new(up);
        self.no_udp_logged.store(false, Ordering::Relaxed);
        true
    }

    /// True the first time it is called for the current upstream.
    pub fn first_udp_drop(&self) -> bool {
        !self.no_udp_logged.swap(true, Ordering::Relaxed)
    }

    /// Logs a per-flow warning, at most a few a second; the rest are counted and
    /// reported with the next one that passes.
    pub fn warn(&self, msg: impl FnOnce() -> String) {
        self.warnings.warn(|| format!("{}: {}", self.name, msg()));
    }
}

/// Lets `BURST` events through per second. Each kind of event that must not
/// drown in another (a limit reached, a loop refused) has a limiter of its own.
pub struct Limiter {
    start: Instant,
    /// Current second (since `start`) in the high 32 bits, count in the low 32.
    window: AtomicU64,
    skipped: AtomicU64,
}

const BURST: u64 = 5;

impl Default for Limiter {
    fn default() -> Limiter {
        Limiter::new()
    }
}

impl Limiter {
    /// A limiter whose first second starts now.
    pub fn new() -> Limiter {
        Limiter {
            start: Instant::now(),
            window: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
        }
    }

    /// Logs `msg` as a warning if this event passes, with the count of those
    /// suppressed since the last that passed.
    pub fn warn(&self, msg: impl FnOnce() -> String) {
        if let Some(skipped) = self.pass() {
            let more = if skipped > 0 {
                format!(" ({skipped} similar messages suppressed)")
            } else {
                String::new()
            };
            tracing::warn!("{}{more}", msg());
        }
    }

    /// `Some(skipped so far)` if this event may be logged.
    fn pass(&self) -> Option<u64> {
        let sec = self.start.elapsed().as_secs() & 0xffff_ffff;
        let mut cur = self.window.load(Ordering::Relaxed);
        loop {
            let (s, n) = (cur >> 32, cur & 0xffff_ffff);
            let next = if s == sec {
                (s << 32) | (n + 1)
            } else {
                sec << 32 | 1
            };
            if s == sec && n >= BURST {
                self.skipped.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            match self
                .window
                .compare_exchange(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(self.skipped.swap(0, Ordering::Relaxed)),
                Err(c) => cur = c,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_passes_a_burst_then_counts() {
        let l = Limiter::new();
        for _ in 0..BURST {
            assert_eq!(l.pass(), Some(0));
        }
        assert_eq!(l.pass(), None);
        assert_eq!(l.pass(), None);
        assert_eq!(l.skipped.load(Ordering::Relaxed), 2);
    }
}
