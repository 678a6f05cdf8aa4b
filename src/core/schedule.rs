//! The daemon's deadlines: retries of failed kernel updates, repairs after
//! foreign damage, walks of the tree after watcher failures, and deferred
//! status lines. Pure: every method takes the time, so the policy (backoff,
//! coalescing, rate limits) is unit-tested without a clock; the daemon arms
//! one timerfd for [`Schedule::next`].

use std::time::{Duration, Instant};

/// Longest wait between attempts of anything that keeps failing.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A retried action: the delay doubles after each attempt, up to a maximum, and
/// starts over after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    delay: Duration,
    at: Option<Instant>,
}

impl Backoff {
    pub const fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            delay: first,
            at: None,
        }
    }

    /// Schedules an attempt after the current delay, unless one is pending;
    /// returns when it runs.
    pub fn arm(&mut self, now: Instant) -> Instant {
        if let Some(at) = self.at {
            return at;
        }
        let at = now + self.delay;
        self.at = Some(at);
        self.delay = (self.delay * 2).min(self.max);
        at
    }

    /// The delay the next [`Backoff::arm`] will use.
    pub fn delay(&self) -> Duration {
        self.delay
    }

    /// It worked: nothing pending, and the next failure waits the first delay.
    pub fn reset(&mut self) {
        self.delay = self.first;
        self.at = None;
    }

    /// Whether the attempt is due; it is then no longer pending.
    pub fn take_due(&mut self, now: Instant) -> bool {
        let due = self.at.is_some_and(|t| t <= now);
        if due {
            self.at = None;
        }
        due
    }
}

/// First repair this soon after damage: coalesces the burst of notifications
/// one `nft flush ruleset` produces.
pub const HEAL_DELAY: Duration = Duration::from_millis(10);
/// This many repairs within [`HEAL_WINDOW`] means someone keeps undoing us.
pub const HEAL_BURST: usize = 5;
pub const HEAL_WINDOW: Duration = Duration::from_secs(30);

/// Repairs after foreign damage: soon after the first, slower while damage
/// keeps recurring.
#[derive(Debug, Clone)]
pub struct Heal {
    at: Option<Instant>,
    delay: Duration,
    recent: Vec<Instant>,
}

impl Default for Heal {
    fn default() -> Self {
        Heal {
            at: None,
            delay: HEAL_DELAY,
            recent: Vec::new(),
        }
    }
}

impl Heal {
    /// Damage seen: a repair is scheduled after the current delay (one for a
    /// whole burst of notifications).
    pub fn damaged(&mut self, now: Instant) {
        if self.at.is_none() {
            self.at = Some(now + self.delay);
        }
    }

    /// Whether a repair is due; it is then recorded as done.
    pub fn take_due(&mut self, now: Instant) -> bool {
        if self.at.is_none_or(|t| t > now) {
            return false;
        }
        self.at = None;
        self.recent.retain(|t| now.duration_since(*t) < HEAL_WINDOW);
        self.recent.push(now);
        if self.recent.len() >= HEAL_BURST {
            self.delay = (self.delay * 2).min(MAX_BACKOFF);
        } else if self.recent.len() == 1 {
            self.delay = HEAL_DELAY;
        }
        true
    }

    /// Repairs within the last [`HEAL_WINDOW`] and the wait before the next,
    /// when they recur so often that the wait grew.
    pub fn recurring(&self) -> Option<(usize, Duration)> {
        (self.recent.len() >= HEAL_BURST).then_some((self.recent.len(), self.delay))
    }
}

/// `STATUS=` at most this often: a burst of cgroups must not flood PID 1.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// The rate limit of status lines.
#[derive(Debug, Clone, Default)]
pub struct StatusLine {
    sent: Option<Instant>,
    at: Option<Instant>,
}

impl StatusLine {
    /// Whether a new status line may go out now (then it counts as sent); if
    /// not, one is scheduled for when it may.
    pub fn send_now(&mut self, now: Instant) -> bool {
        match self.sent {
            Some(t) if now < t + STATUS_INTERVAL => {
                self.at.get_or_insert(t + STATUS_INTERVAL);
                false
            }
            _ => {
                self.sent = Some(now);
                true
            }
        }
    }

    /// Whether a deferred line is due; it then counts as sent.
    pub fn take_due(&mut self, now: Instant) -> bool {
        let due = self.at.is_some_and(|t| t <= now);
        if due {
            self.at = None;
            self.sent = Some(now);
        }
        due
    }
}

/// After a cgroup appears, the daemon looks this long later (each) for
/// containers: a manager moves the container's first process into its cgroup
/// and its links into its namespace around the same moment, in no set order.
/// Dense at first, where managers are: a look finds nothing until the
/// process is in, and each miss costs the gap to the next.
pub const PROBE_AFTER: [Duration; 11] = [
    // At once: systemd puts a scope's first process in as it creates it.
    Duration::ZERO,
    Duration::from_millis(1),
    Duration::from_millis(3),
    Duration::from_millis(6),
    Duration::from_millis(10),
    Duration::from_millis(20),
    Duration::from_millis(50),
    Duration::from_millis(100),
    Duration::from_millis(300),
    Duration::from_secs(1),
    Duration::from_secs(5),
];

/// Looks for containers again after a failed look or after a container's
/// cgroup went away, on the schedule of a new cgroup's follow-ups, coalesced.
/// (New cgroups' own follow-ups are kept per cgroup, in
/// `watch::containers`.)
#[derive(Debug, Clone, Default)]
pub struct Probes {
    due: Vec<Instant>,
}

/// Follow-ups closer than this to a pending one merge into it (here and in
/// `watch::containers`).
pub const PROBE_COALESCE: Duration = Duration::from_micros(500);

impl Probes {
    /// Schedules looks at [`PROBE_AFTER`] from `now`.
    /// A pending look close to a new one merges into the later of the two:
    /// never earlier than a cgroup's own follow-up, which it would miss.
    pub fn look_again(&mut self, now: Instant) {
        for d in PROBE_AFTER {
            let at = now + d;
            match self
                .due
                .iter_mut()
                .find(|t| (**t).max(at) - (**t).min(at) < PROBE_COALESCE)
            {
                Some(t) => *t = (*t).max(at),
                None => self.due.push(at),
            }
        }
        self.due.sort_unstable();
    }

    /// Whether a look is due; those due are then no longer pending.
    pub fn take_due(&mut self, now: Instant) -> bool {
        let before = self.due.len();
        self.due.retain(|&t| t > now);
        self.due.len() != before
    }

    fn at(&self) -> Option<Instant> {
        self.due.first().copied()
    }
}

/// All of the daemon's deadlines.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Rebuilding the table after a failed update.
    pub retry: Backoff,
    /// Walking the tree after a watcher failure.
    pub rescan: Backoff,
    pub heal: Heal,
    pub status: StatusLine,
    pub probes: Probes,
}

/// First retry of a failed kernel update.
pub const RETRY_DELAY: Duration = Duration::from_millis(100);
/// First retry of a failed walk of the tree.
pub const RESCAN_DELAY: Duration = Duration::from_millis(500);

impl Default for Schedule {
    fn default() -> Self {
        Schedule {
            retry: Backoff::new(RETRY_DELAY, MAX_BACKOFF),
            rescan: Backoff::new(RESCAN_DELAY, MAX_BACKOFF),
            heal: Heal::default(),
            status: StatusLine::default(),
            probes: Probes::default(),
        }
    }
}

impl Schedule {
    /// The earliest pending deadline.
    pub fn next(&self) -> Option<Instant> {
        [
            self.retry.at,
            self.rescan.at,
            self.heal.at,
            self.status.at,
            self.probes.at(),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_storm_of_new_cgroups_costs_as_many_looks_as_one() {
        let t0 = Instant::now();
        let mut p = Probes::default();
        let last = t0 + Duration::from_nanos(999 * 400);
        for i in 0..1000 {
            p.look_again(t0 + Duration::from_nanos(i * 400));
        }
        assert_eq!(p.due.len(), PROBE_AFTER.len());
        // Merged into the later: no cgroup's follow-up comes early.
        assert_eq!(p.at(), Some(last));
        assert!(!p.take_due(t0 + Duration::from_micros(300)));
        assert!(p.take_due(last), "at once");
        assert!(!p.take_due(last + Duration::from_micros(900)));
        assert!(p.take_due(last + ms(3)), "the next two at once");
        assert_eq!(p.due.len(), PROBE_AFTER.len() - 3);
        p.look_again(t0 + ms(3000));
        assert_eq!(p.due.len(), 2 * PROBE_AFTER.len() - 3);
    }

    #[test]
    fn a_backoff_doubles_to_its_maximum_and_starts_over_after_a_success() {
        let t0 = Instant::now();
        let mut b = Backoff::new(ms(100), ms(350));
        assert_eq!(b.arm(t0), t0 + ms(100));
        assert_eq!(b.arm(t0 + ms(50)), t0 + ms(100), "one attempt pending");
        assert!(!b.take_due(t0 + ms(99)));
        assert!(b.take_due(t0 + ms(100)));
        assert!(!b.take_due(t0 + ms(100)), "taken once");
        assert_eq!(b.arm(t0), t0 + ms(200));
        b.take_due(t0 + ms(200));
        assert_eq!(b.arm(t0), t0 + ms(350), "capped");
        b.reset();
        assert_eq!(b.arm(t0), t0 + ms(100));
    }

    #[test]
    fn a_burst_of_damage_is_one_repair_and_recurring_damage_slows_repairs() {
        let t0 = Instant::now();
        let mut h = Heal::default();
        h.damaged(t0);
        h.damaged(t0 + ms(2));
        assert!(!h.take_due(t0 + ms(5)));
        assert!(h.take_due(t0 + HEAL_DELAY));
        assert!(!h.take_due(t0 + ms(100)), "one repair for the burst");
        let mut now = t0 + HEAL_DELAY;
        for _ in 1..HEAL_BURST {
            now += ms(100);
            h.damaged(now);
            now += ms(100);
            assert!(h.take_due(now));
        }
        let (n, wait) = h.recurring().expect("recurring");
        assert_eq!(n, HEAL_BURST);
        assert!(wait > HEAL_DELAY, "{wait:?}");
        // Quiet for a window: the first repair after it is quick again.
        now += HEAL_WINDOW * 2;
        h.damaged(now);
        assert!(!h.take_due(now + HEAL_DELAY), "still the grown delay once");
        assert!(h.take_due(now + wait));
        assert_eq!(h.recurring(), None);
        h.damaged(now + wait);
        assert!(h.take_due(now + wait + HEAL_DELAY));
    }

    #[test]
    fn status_lines_go_out_at_most_once_a_second_and_the_last_is_never_lost() {
        let t0 = Instant::now();
        let mut s = StatusLine::default();
        assert!(s.send_now(t0));
        assert!(!s.send_now(t0 + ms(10)));
        assert!(!s.send_now(t0 + ms(20)));
        assert!(!s.take_due(t0 + ms(999)));
        assert!(
            s.take_due(t0 + STATUS_INTERVAL),
            "the deferred line goes out"
        );
        assert!(!s.send_now(t0 + STATUS_INTERVAL + ms(1)));
    }

    #[test]
    fn the_timer_is_armed_for_the_earliest_deadline() {
        let t0 = Instant::now();
        let mut s = Schedule::default();
        assert_eq!(s.next(), None, "idle: no wake-up");
        s.rescan.arm(t0);
        s.heal.damaged(t0);
        assert_eq!(s.next(), Some(t0 + HEAL_DELAY));
        s.heal.take_due(t0 + HEAL_DELAY);
        assert_eq!(s.next(), Some(t0 + RESCAN_DELAY));
    }
}
