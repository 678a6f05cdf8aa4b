//! `cgtproxy doctor`: probes of what the daemon depends on, each with a one-line
//! verdict and, when something is wrong, the fix.

use std::collections::BTreeSet;
use std::fmt::Write;

use crate::cgroup::{self, Hierarchy};
use crate::config::Config;
use crate::nft::{Nft, Txn};
use crate::plan;

/// A probe's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
}

struct Probe {
    verdict: Verdict,
    name: &'static str,
    detail: String,
    fix: Option<String>,
}

fn read_sysctl(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

/// The kernel features, probed by committing a throw-away table that uses them
/// and deleting it in the same transaction, so nothing is left behind.
fn probe_kernel(cfg: &Config) -> Probe {
    let mut probe_cfg = cfg.clone();
    probe_cfg.table = "cgtproxy-doctor".into();
    if probe_cfg.targets.is_empty() {
        // A target exercises tproxy; any port and mark will do for a probe.
        if let Ok(c) = Config::parse(
            r#"{"version":1,"tproxies":{"probe":{"port":1,"mark":1,"dns-hijack":{"ip":"127.0.0.1"}}}}"#,
            "doctor probe",
        ) {
            probe_cfg.targets = c.targets;
        }
    }
    let levels: BTreeSet<u32> = [1].into();
    let spec = plan::table(&probe_cfg, &levels, &Default::default());
    let result = Nft::open().and_then(|mut nft| {
        let mut txn = Txn::new();
        txn.replace_table(&spec)?;
        txn.delete_table(&spec.name)?;
        nft.commit(txn)
    });
    match result {
        Ok(()) => Probe {
            verdict: Verdict::Ok,
            name: "nftables",
            detail: "nf_tables accepts socket cgroupv2, verdict maps, tproxy and nat".into(),
            fix: None,
        },
        Err(e) => Probe {
            verdict: Verdict::Fail,
            name: "nftables",
            detail: e.to_string(),
            fix: Some(
                "run as root (CAP_NET_ADMIN); the kernel needs nf_tables with nft_socket, nft_tproxy and nft_nat (modprobe nft_socket nft_tproxy nft_nat)".into(),
            ),
        },
    }
}

fn probe_cgroups(cfg: &Config) -> (Probe, Option<Probe>) {
    let hier = match Hierarchy::discover(&cfg.cgroup_root) {
        Ok(h) => h,
        Err(e) => {
            return (
                Probe {
                    verdict: Verdict::Fail,
                    name: "cgroup2",
                    detail: e.to_string(),
                    fix: Some("mount cgroup2 (mount -t cgroup2 none /sys/fs/cgroup/unified) or set cgroup-root".into()),
                },
                None,
            );
        }
    };
    let n = cgroup::walk(&hier).len();
    let found = Probe {
        verdict: Verdict::Ok,
        name: "cgroup2",
        detail: format!("{} cgroups under {}", n, hier.mount.display()),
        fix: None,
    };
    let limit: usize = read_sysctl("/proc/sys/fs/inotify/max_user_watches")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let watches = if limit > 0 && n * 10 > limit * 8 {
        Probe {
            verdict: if n >= limit {
                Verdict::Fail
            } else {
                Verdict::Warn
            },
            name: "inotify",
            detail: format!("{n} cgroups need as many watches; the limit is {limit}"),
            fix: Some(format!(
                "sysctl -w fs.inotify.max_user_watches={}",
                (n * 2).max(65536)
            )),
        }
    } else {
        Probe {
            verdict: Verdict::Ok,
            name: "inotify",
            detail: format!("{n} watches needed, limit {limit}"),
            fix: None,
        }
    };
    (found, Some(watches))
}

fn probe_rp_filter() -> Probe {
    let all = read_sysctl("/proc/sys/net/ipv4/conf/all/rp_filter").unwrap_or_default();
    let lo = read_sysctl("/proc/sys/net/ipv4/conf/lo/rp_filter").unwrap_or_default();
    let valid_mark = read_sysctl("/proc/sys/net/ipv4/conf/all/src_valid_mark").unwrap_or_default();
    // Strict mode validates the looped-back packet's source without its mark.
    if (all == "1" || lo == "1") && valid_mark != "1" {
        Probe {
            verdict: Verdict::Warn,
            name: "rp_filter",
            detail: format!(
                "strict reverse-path filtering (all={all}, lo={lo}) without src_valid_mark"
            ),
            fix: Some(
                "sysctl -w net.ipv4.conf.all.src_valid_mark=1 (or rp_filter=2, loose)".into(),
            ),
        }
    } else {
        Probe {
            verdict: Verdict::Ok,
            name: "rp_filter",
            detail: format!("all={all}, lo={lo}, src_valid_mark={valid_mark}"),
            fix: None,
        }
    }
}

/// Whether something listens on `port` in /proc/net/{tcp,tcp6} (state LISTEN) or
/// is bound to it in /proc/net/{udp,udp6}.
fn bound(port: u16, files: &[&str], listen_only: bool) -> bool {
    let hex = format!(":{port:04X}");
    files.iter().any(|f| {
        std::fs::read_to_string(f).is_ok_and(|t| {
            t.lines().skip(1).any(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.get(1).is_some_and(|local| local.ends_with(&hex))
                    && (!listen_only || cols.get(3) == Some(&"0A"))
            })
        })
    })
}

fn probe_listeners(cfg: &Config) -> Vec<Probe> {
    cfg.targets
        .iter()
        .map(|t| {
            let tcp = bound(t.port, &["/proc/net/tcp", "/proc/net/tcp6"], true);
            let udp = t.no_udp || bound(t.port, &["/proc/net/udp", "/proc/net/udp6"], false);
            let (verdict, detail) = match (tcp, udp) {
                (true, true) => (Verdict::Ok, format!("port {} has TCP and UDP listeners", t.port)),
                (true, false) => (Verdict::Warn, format!("port {}: TCP only, UDP is dropped by the proxy (set no-udp to send it direct)", t.port)),
                _ => (Verdict::Fail, format!("nothing listens on TCP port {}", t.port)),
            };
            Probe {
                verdict,
                name: "listener",
                fix: (verdict != Verdict::Ok).then(|| {
                    format!(
                        "start the proxy core with a TPROXY (IP_TRANSPARENT) listener on port {} for target {}",
                        t.port, t.name
                    )
                }),
                detail: format!("target {}: {detail}", t.name),
            }
        })
        .collect()
}

fn probe_flush() -> Probe {
    let conf = std::fs::read_to_string("/etc/nftables.conf").unwrap_or_default();
    let enabled = [
        "/etc/systemd/system/multi-user.target.wants/nftables.service",
        "/etc/systemd/system/sysinit.target.wants/nftables.service",
    ]
    .iter()
    .any(|p| std::path::Path::new(p).exists());
    if enabled
        && conf
            .lines()
            .any(|l| l.trim_start().starts_with("flush ruleset"))
    {
        Probe {
            verdict: Verdict::Warn,
            name: "flush ruleset",
            detail: "nftables.service is enabled and /etc/nftables.conf starts with `flush ruleset`: each (re)start of it removes our table until the daemon repairs it".into(),
            fix: Some("replace `flush ruleset` by deleting only your own tables (`destroy table inet filter`)".into()),
        }
    } else {
        Probe {
            verdict: Verdict::Ok,
            name: "flush ruleset",
            detail: "no enabled nftables.service flushing the whole ruleset found".into(),
            fix: None,
        }
    }
}

/// Runs every probe; returns the report and whether nothing failed.
pub fn doctor(cfg: &Config) -> (String, bool) {
    let mut probes = vec![probe_kernel(cfg)];
    let (cg, watches) = probe_cgroups(cfg);
    probes.push(cg);
    probes.extend(watches);
    probes.push(probe_rp_filter());
    probes.extend(probe_listeners(cfg));
    probes.push(probe_flush());
    let mut o = String::new();
    for p in &probes {
        let v = match p.verdict {
            Verdict::Ok => "ok  ",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        };
        let _ = writeln!(o, "{v} {}: {}", p.name, p.detail);
        if let Some(fix) = &p.fix {
            let _ = writeln!(o, "     fix: {fix}");
        }
    }
    let ok = probes.iter().all(|p| p.verdict != Verdict::Fail);
    (o, ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_listeners_are_found_by_port() {
        let dir = std::env::temp_dir().join(format!("cgtproxy-doctor-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tcp = dir.join("tcp");
        std::fs::write(
            &tcp,
            "  sl  local_address rem_address   st\n   0: 00000000:1ED5 00000000:0000 0A 0\n   1: 0100007F:0035 0100007F:9999 01 0\n",
        )
        .unwrap();
        let f = tcp.to_str().unwrap();
        assert!(bound(7893, &[f], true), "0x1ED5 = 7893 in LISTEN");
        assert!(
            !bound(53, &[f], true),
            "port 53 is only an established socket"
        );
        assert!(bound(53, &[f], false));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
