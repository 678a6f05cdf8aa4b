//! The datapath's cost: CPU time per connection and per byte with the daemon's
//! table, against a table that only turns conntrack on (what every stateful
//! firewall costs anyway), and what one level of the per-level lookups costs.
//!
//! Why CPU time, not rates: on this shared two-core machine a connect loop's
//! wall clock measures the other developer's load and any SYN lost to an
//! overflowing accept queue (a 1 s retransmit). A table cannot make a
//! connection cheaper, but a stalled baseline made it look 3 to 20 times
//! faster. CPU time spent on our own packets barely moves when another
//! process takes the CPU away: we are then simply not running.
//!
//! Which CPU time: every packet of the measurement is made by the client (in
//! the bench's namespace, where the table is) or by the server (in the peer
//! namespace), both processes in cgroups the bench created. The output hook
//! runs either in the sending syscall (SYN, data, the closing RST) or in the
//! NET_RX softirq (the handshake's ACK; data sent when an ACK opens the
//! window). veth's transmit queues the packet on the local CPU and raises
//! NET_RX there, which runs as soon as the sender re-enables bottom halves,
//! on its stack: the receiving stack of the other namespace and the replies
//! it sends run on the sender's time too. Without CONFIG_IRQ_TIME_ACCOUNTING
//! (this kernel's setting; [`irq_time_accounting`] reads it and the bench
//! prints it) the scheduler charges softirq time to the task it interrupted,
//! so the client's and server's CPU time hold the whole path. With it, softirq
//! time is taken out of every task's runtime and these figures would miss the
//! rules' cost in softirq. What the kernel defers to ksoftirqd under load is
//! charged to ksoftirqd, not to us: its time in the same window is shown as a
//! share of ours, so such a leak is seen, not hidden.
//!
//! The client reads its own CPU clock (`CLOCK_PROCESS_CPUTIME_ID`, the same
//! runtime cgroups add up) around its loop, so its start-up is not counted;
//! the server's is its cgroup's `usage_usec` over the client's run.
//!
//! Rounds alternate: table, baseline, table, …, table (the daemon started and
//! stopped for each table phase). Each baseline is compared with the mean of
//! the table phases before and after it, so a slow drift of the machine
//! cancels. A ratio whose rounds disagree, or that says the table made the
//! datapath cheaper by more than measurement error can, is printed as
//! `unstable` or `implausible` with its rounds, and is null in bench-json.

use std::fs;
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use super::{Lab, median, nft, round1, round3, step};

/// Depths (absolute cgroup levels) the client runs at. The classified
/// cgroups sit at levels 2 to 8, so the table has seven level maps: at depth
/// 1 every lookup ends before its map, at depth d the maps of levels 2..=d
/// are looked up (and miss: the client's cgroups are unclassified).
pub const DEPTHS: [u32; 3] = [1, 4, 8];

/// Settings of one run: full, or short for iterating (`CGTPROXY_BENCH_QUICK=1`).
pub struct Plan {
    /// Baseline phases; there is one table phase more.
    pub rounds: usize,
    /// Connections per client run.
    pub connects: usize,
    /// Bytes of the bulk upload.
    pub bulk_bytes: u64,
}

impl Plan {
    pub fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                rounds: 2,
                connects: 3000,
                bulk_bytes: 64 << 20,
            }
        } else {
            Plan {
                rounds: 5,
                connects: 10_000,
                bulk_bytes: 256 << 20,
            }
        }
    }
}

/// A ratio of the baseline's cost over the table's (so 1.0 means free and
/// less means dearer), taken per round: its median, or why it is no figure.
pub enum Ratio {
    Median(f64),
    /// Rounds that disagree: the machine's noise is larger than what is measured.
    Unstable(Vec<f64>),
    /// A round in which the table made the datapath cheaper by more than
    /// [`Ratio::PLAUSIBLE`] allows: a broken measurement, not a gain.
    Implausible(Vec<f64>),
}

impl Ratio {
    /// Above this a ratio is a broken measurement.
    const PLAUSIBLE: f64 = 1.10;
    /// Largest over smallest round beyond which rounds disagree.
    const SPREAD: f64 = 1.10;

    fn of(mut rounds: Vec<f64>) -> Ratio {
        let lo = rounds.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = rounds.iter().copied().fold(0.0, f64::max);
        if rounds.is_empty() || !lo.is_finite() || lo <= 0.0 {
            return Ratio::Unstable(rounds);
        }
        if hi > Self::PLAUSIBLE {
            return Ratio::Implausible(rounds);
        }
        if hi > lo * Self::SPREAD {
            return Ratio::Unstable(rounds);
        }
        Ratio::Median(median(&mut rounds))
    }

    pub fn value(&self) -> Option<f64> {
        match self {
            Ratio::Median(m) => Some(*m),
            Ratio::Unstable(_) | Ratio::Implausible(_) => None,
        }
    }
}

impl std::fmt::Display for Ratio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |r: &[f64]| {
            let v: Vec<String> = r.iter().map(|x| format!("{x:.3}")).collect();
            v.join(", ")
        };
        match self {
            Ratio::Median(m) => write!(f, "{m:.3}"),
            Ratio::Unstable(r) => write!(f, "unstable ({})", list(r)),
            Ratio::Implausible(r) => write!(f, "implausible ({})", list(r)),
        }
    }
}

/// What one phase (one table state) measured.
struct Phase {
    /// CPU time per connection (µs), client at each of [`DEPTHS`].
    connect_us: [f64; 3],
    /// CPU time per MiB uploaded (µs), client at the deepest depth.
    bulk_us_per_mib: f64,
    /// Each connect's latency (µs), client at the deepest depth.
    latency_us: Vec<f64>,
    /// CPU time of everything else on the machine over the phase, as a share
    /// of all CPUs' time: the other developer's load.
    foreign: f64,
    /// ksoftirqd's CPU time over the phase, as a share of ours.
    ksoftirqd: f64,
}

/// One client run's own accounting.
struct Run {
    /// Client plus server CPU time.
    cpu_us: f64,
    latency_us: Vec<f64>,
}

/// Runs the client at `depth` with `args` and adds the server's CPU time.
fn run(lab: &Lab, depth: u32, args: &[&str]) -> Run {
    let server0 = usage_usec(lab);
    let out = lab.client_in(&Lab::spine(depth), args);
    // The server accepts asynchronously: let it drain its queue first.
    sleep(Duration::from_millis(20));
    let server = usage_usec(lab).saturating_sub(server0);
    let v: Value = serde_json::from_str(&out).expect("client output is JSON");
    let client_ns = v["cpu_ns"].as_f64().expect("cpu_ns");
    let latency_us = v["lat_ns"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_f64)
                .map(|ns| ns / 1e3)
                .collect()
        })
        .unwrap_or_default();
    Run {
        cpu_us: client_ns / 1e3 + server as f64,
        latency_us,
    }
}

/// Measures the datapath as the table is now.
fn phase(lab: &Lab, plan: &Plan) -> Phase {
    let busy0 = busy_us();
    let soft0 = ksoftirqd_us();
    let t0 = Instant::now();
    let mut ours = 0.0;
    let mut connect_us = [0.0; 3];
    let mut latency_us = Vec::new();
    let n = plan.connects.to_string();
    for (i, &depth) in DEPTHS.iter().enumerate() {
        let r = run(lab, depth, &["connect", &n]);
        ours += r.cpu_us;
        connect_us[i] = r.cpu_us / plan.connects as f64;
        if i == DEPTHS.len() - 1 {
            latency_us = r.latency_us;
        }
    }
    let deepest = DEPTHS[DEPTHS.len() - 1];
    let bulk = run(lab, deepest, &["bulk", &plan.bulk_bytes.to_string()]);
    ours += bulk.cpu_us;
    let wall_us = t0.elapsed().as_secs_f64() * 1e6;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let foreign = (busy_us().saturating_sub(busy0) as f64 - ours).max(0.0) / (wall_us * cpus);
    Phase {
        connect_us,
        bulk_us_per_mib: bulk.cpu_us / (plan.bulk_bytes >> 20) as f64,
        latency_us,
        foreign,
        ksoftirqd: ksoftirqd_us().saturating_sub(soft0) as f64 / ours,
    }
}

/// A table that only turns conntrack on (as any stateful firewall does): the
/// baseline that isolates the cost of our own rules from conntrack's, which
/// our output chain's `ct direction` needs and a bare namespace lacks.
pub fn conntrack_only(on: bool) {
    if on {
        nft(&["add table inet ctonly"]);
        nft(&["add chain inet ctonly out { type filter hook output priority 0; }"]);
        nft(&["add rule inet ctonly out ct direction reply return"]);
    } else {
        nft(&["delete table inet ctonly"]);
    }
}

/// The comparison at one size.
pub struct Comparison {
    /// Start-up times to READY=1 of the table phases (ms).
    pub startups_ms: Vec<f64>,
    connect: Ratio,
    bulk: Ratio,
    /// Median CPU µs per connection and per MiB, table and baseline.
    connect_us: (f64, f64),
    bulk_us_per_mib: (f64, f64),
    /// Connect latency p50 and p99 (µs), table and baseline.
    latency: ((f64, f64), (f64, f64)),
    /// Cost of one level's lookup per connection (ns), per round.
    per_level_ns: Vec<f64>,
    /// Extra CPU per connection over the baseline at each depth (ns), medians.
    extra_ns: [f64; 3],
    /// Largest foreign load and ksoftirqd share seen in any phase.
    foreign_max: f64,
    ksoftirqd_max: f64,
}

/// Alternates table and conntrack-only phases; `label` names the size.
pub fn compare(lab: &mut Lab, plan: &Plan, label: &str, started: Instant) -> Comparison {
    let settle = || sleep(Duration::from_millis(300));
    let mut startups_ms = Vec::new();
    let mut table_phase = |lab: &mut Lab| {
        startups_ms.push(lab.start_daemon().as_secs_f64() * 1e3);
        settle();
        let p = phase(lab, plan);
        lab.stop_daemon();
        settle();
        p
    };
    // Warm up: conntrack's module, the caches, the server's threads.
    step(&format!("datapath at {label}: warm-up"), started);
    conntrack_only(true);
    let warm = Plan {
        rounds: 0,
        connects: plan.connects / 4,
        bulk_bytes: plan.bulk_bytes / 4,
    };
    phase(lab, &warm);
    conntrack_only(false);

    let mut table = vec![table_phase(lab)];
    let mut base = Vec::new();
    for round in 0..plan.rounds {
        step(
            &format!(
                "datapath at {label}: round {} of {}",
                round + 1,
                plan.rounds
            ),
            started,
        );
        conntrack_only(true);
        base.push(phase(lab, plan));
        conntrack_only(false);
        table.push(table_phase(lab));
    }
    Comparison::of(startups_ms, &table, &base)
}

impl Comparison {
    fn of(startups_ms: Vec<f64>, table: &[Phase], base: &[Phase]) -> Comparison {
        // Each baseline phase against the mean of its two neighbouring table phases.
        let around = |i: usize, f: &dyn Fn(&Phase) -> f64| (f(&table[i]) + f(&table[i + 1])) / 2.0;
        let ratio = |f: &dyn Fn(&Phase) -> f64| {
            Ratio::of(
                base.iter()
                    .enumerate()
                    .map(|(i, b)| f(b) / around(i, f))
                    .collect(),
            )
        };
        let deep = DEPTHS.len() - 1;
        let extra =
            |i: usize, d: usize| (around(i, &|p| p.connect_us[d]) - base[i].connect_us[d]) * 1e3;
        let per_level_ns = (0..base.len())
            .map(|i| slope(&DEPTHS.map(f64::from), &[0, 1, 2].map(|d| extra(i, d))))
            .collect();
        let extra_ns = [0, 1, 2]
            .map(|d| median(&mut (0..base.len()).map(|i| extra(i, d)).collect::<Vec<_>>()));
        let med = |ps: &[Phase], f: &dyn Fn(&Phase) -> f64| {
            median(&mut ps.iter().map(f).collect::<Vec<_>>())
        };
        let pcts = |ps: &[Phase]| {
            let mut all: Vec<f64> = ps
                .iter()
                .flat_map(|p| p.latency_us.iter().copied())
                .collect();
            all.sort_by(f64::total_cmp);
            (percentile(&all, 50), percentile(&all, 99))
        };
        let max = |f: &dyn Fn(&Phase) -> f64| table.iter().chain(base).map(f).fold(0.0, f64::max);
        Comparison {
            startups_ms,
            connect: ratio(&|p| p.connect_us[deep]),
            bulk: ratio(&|p| p.bulk_us_per_mib),
            connect_us: (
                med(table, &|p| p.connect_us[deep]),
                med(base, &|p| p.connect_us[deep]),
            ),
            bulk_us_per_mib: (
                med(table, &|p| p.bulk_us_per_mib),
                med(base, &|p| p.bulk_us_per_mib),
            ),
            latency: (pcts(table), pcts(base)),
            per_level_ns,
            extra_ns,
            foreign_max: max(&|p| p.foreign),
            ksoftirqd_max: max(&|p| p.ksoftirqd),
        }
    }

    /// The rows of the result table for size `label`, through `row`.
    pub fn rows(&self, label: &str, row: &mut dyn FnMut(&str, String, &str)) {
        row(
            &format!("connect CPU us: table / ct-only, {label}"),
            format!("{:.2} / {:.2}", self.connect_us.0, self.connect_us.1),
            "",
        );
        row(
            &format!("  connect ratio ct-only/table, {label}"),
            self.connect.to_string(),
            ">= 0.95",
        );
        row(
            &format!("bulk CPU us/MiB: table / ct-only, {label}"),
            format!(
                "{:.0} / {:.0}",
                self.bulk_us_per_mib.0, self.bulk_us_per_mib.1
            ),
            "",
        );
        row(
            &format!("  bulk ratio ct-only/table, {label}"),
            self.bulk.to_string(),
            ">= 0.95",
        );
        let ((t50, t99), (b50, b99)) = self.latency;
        row(
            &format!("connect p50/p99 us: table; ct-only, {label}"),
            format!("{t50:.0}/{t99:.0}; {b50:.0}/{b99:.0}"),
            "",
        );
        row(
            &format!("  extra ns/connection at depth 1/4/8, {label}"),
            format!(
                "{:.0} / {:.0} / {:.0}",
                self.extra_ns[0], self.extra_ns[1], self.extra_ns[2]
            ),
            "",
        );
        let mut levels = self.per_level_ns.clone();
        let rounds: Vec<String> = self
            .per_level_ns
            .iter()
            .map(|x| format!("{x:.0}"))
            .collect();
        row(
            &format!("  one level's lookup, ns/connection, {label}"),
            format!("{:.0} ({})", median(&mut levels), rounds.join(", ")),
            "",
        );
        row(
            &format!("  noise: foreign load, ksoftirqd max, {label}"),
            format!(
                "{:.0} %, {:.1} %",
                self.foreign_max * 100.0,
                self.ksoftirqd_max * 100.0
            ),
            "",
        );
    }

    /// bench-json keys for size `tag` (`10k`, `50k`).
    pub fn json(&self, tag: &str) -> Map<String, Value> {
        let mut levels = self.per_level_ns.clone();
        let ((t50, t99), (b50, b99)) = self.latency;
        let mut m = Map::new();
        let mut put = |k: &str, v: Value| {
            m.insert(k.replace("SIZE", tag), v);
        };
        put(
            "connect_ratio_SIZE_vs_conntrack",
            json!(self.connect.value().map(round3)),
        );
        put(
            "throughput_ratio_SIZE_vs_conntrack",
            json!(self.bulk.value().map(round3)),
        );
        put("connect_cpu_us_SIZE", json!(round3(self.connect_us.0)));
        put(
            "connect_cpu_us_SIZE_conntrack",
            json!(round3(self.connect_us.1)),
        );
        put(
            "bulk_cpu_us_per_mib_SIZE",
            json!(round1(self.bulk_us_per_mib.0)),
        );
        put(
            "bulk_cpu_us_per_mib_SIZE_conntrack",
            json!(round1(self.bulk_us_per_mib.1)),
        );
        put("connect_p50_us_SIZE", json!(round1(t50)));
        put("connect_p99_us_SIZE", json!(round1(t99)));
        put("connect_p50_us_SIZE_conntrack", json!(round1(b50)));
        put("connect_p99_us_SIZE_conntrack", json!(round1(b99)));
        put(
            "level_lookup_ns_per_connection_SIZE",
            json!(round1(median(&mut levels))),
        );
        put(
            "datapath_foreign_load_max_SIZE",
            json!(round3(self.foreign_max)),
        );
        put(
            "datapath_ksoftirqd_share_max_SIZE",
            json!(round3(self.ksoftirqd_max)),
        );
        m
    }
}

/// Least-squares slope of `y` over `x`.
fn slope(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let cov: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let var: f64 = x.iter().map(|a| (a - mx) * (a - mx)).sum();
    cov / var
}

fn percentile(sorted: &[f64], p: usize) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[(sorted.len() * p).div_ceil(100).saturating_sub(1)]
}

/// The server cgroup's CPU time so far (µs).
fn usage_usec(lab: &Lab) -> u64 {
    let stat = fs::read_to_string(lab.cg(Lab::SERVER).join("cpu.stat")).unwrap_or_default();
    stat.lines()
        .find_map(|l| l.strip_prefix("usage_usec ")?.parse().ok())
        .unwrap_or(0)
}

/// All CPUs' busy time so far (µs), from /proc/stat (user to steal; ticks of 10 ms).
fn busy_us() -> u64 {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: u64 = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|v| v.parse::<u64>().ok())
                .enumerate()
                // user nice system [idle iowait] irq softirq steal
                .filter(|(i, _)| !matches!(i, 3 | 4) && *i < 8)
                .map(|(_, v)| v)
                .sum()
        })
        .unwrap_or(0);
    ticks * 10_000
}

/// All ksoftirqd threads' CPU time so far (µs), from their schedstat.
fn ksoftirqd_us() -> u64 {
    let Ok(procs) = fs::read_dir("/proc") else {
        return 0;
    };
    procs
        .flatten()
        .filter(|e| {
            fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.starts_with("ksoftirqd/"))
        })
        .filter_map(|e| {
            let s = fs::read_to_string(e.path().join("schedstat")).ok()?;
            s.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum::<u64>()
        / 1000
}

/// Whether the kernel takes softirq time out of tasks' runtime, from its
/// configuration (None where the kernel does not publish it).
pub fn irq_time_accounting() -> Option<bool> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let boot = format!("/boot/config-{}", release.trim());
    let text = match fs::read_to_string(&boot) {
        Ok(t) => t,
        Err(_) => {
            let out = Command::new("zcat").arg("/proc/config.gz").output().ok()?;
            out.status.success().then_some(())?;
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    Some(text.lines().any(|l| l == "CONFIG_IRQ_TIME_ACCOUNTING=y"))
}
