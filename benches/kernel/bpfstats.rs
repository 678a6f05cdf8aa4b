//! What the eBPF datapath's programs themselves cost: the kernel's BPF
//! statistics (run count and run time of each program, kept while a
//! `BPF_ENABLE_STATS` descriptor is held), read around one measurement. The
//! datapath comparison's CPU time holds the programs and everything around
//! them; this tells the programs' share apart. The kernel's clock reads per
//! run make the programs look slightly dearer here than they are.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;

/// The prefix of our programs' names (see src/kernel/bpf/cgtproxy.bpf.c).
const PREFIX: &str = "cgtproxy_";

/// Keeps the kernel counting while held.
pub struct Counting {
    _fd: OwnedFd,
}

/// Turns the kernel's per-program run-time statistics on.
pub fn start() -> Counting {
    Counting {
        _fd: aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS"),
    }
}

/// Run count and run time (ns) of each of our loaded programs, by name.
pub fn snapshot() -> BTreeMap<String, (u64, u64)> {
    let mut all = BTreeMap::new();
    for info in aya::programs::loaded_programs() {
        let info = info.expect("listing BPF programs");
        let Some(name) = info.name_as_str().filter(|n| n.starts_with(PREFIX)) else {
            continue;
        };
        let e = all
            .entry(name.trim_start_matches(PREFIX).to_owned())
            .or_insert((0, 0));
        e.0 += info.run_count();
        e.1 += info.run_time().as_nanos() as u64;
    }
    all
}

/// Per operation (connection, datagram) between two snapshots: each program
/// that ran, with its runs and nanoseconds per operation, and the total ns.
pub struct PerOp {
    pub programs: Vec<(String, f64, f64)>,
    pub total_ns: f64,
}

impl PerOp {
    pub fn between(
        before: &BTreeMap<String, (u64, u64)>,
        after: &BTreeMap<String, (u64, u64)>,
        ops: u64,
    ) -> PerOp {
        let ops = ops as f64;
        let programs: Vec<(String, f64, f64)> = after
            .iter()
            .filter_map(|(name, &(runs, ns))| {
                let (r0, n0) = before.get(name).copied().unwrap_or_default();
                let runs = runs.saturating_sub(r0);
                (runs > 0).then(|| {
                    (
                        name.clone(),
                        runs as f64 / ops,
                        ns.saturating_sub(n0) as f64 / ops,
                    )
                })
            })
            .collect();
        let total_ns = programs.iter().map(|p| p.2).sum();
        PerOp { programs, total_ns }
    }
}

impl std::fmt::Display for PerOp {
    /// "412 ns: conn4 1.0× 180 ns, sockop 5.0× 232 ns".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.0} ns:", self.total_ns)?;
        for (i, (name, runs, ns)) in self.programs.iter().enumerate() {
            let sep = if i == 0 { " " } else { ", " };
            write!(f, "{sep}{name} {runs:.1}× {ns:.0} ns")?;
        }
        Ok(())
    }
}
