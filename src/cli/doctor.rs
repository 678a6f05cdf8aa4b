//! `cgtproxy doctor`: probes of what the daemon depends on, each with a one-line
//! verdict and, when something is wrong, the fix.

use std::collections::BTreeSet;
use std::fmt::Write;

use crate::config::{Action, Config, Datapath, Target};
use crate::core::precedence::{self, Placement};
use crate::core::rpfilter;
use crate::core::table::{self, Proto};
use crate::kernel::nft::{Nft, TABLE_F_OWNER, TABLE_F_PERSIST, Txn};
use crate::kernel::sockdiag;
use crate::watch::hierarchy::{self, Hierarchy};

/// What a probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Ok,
    Warn,
    Fail,
}

struct Probe {
    verdict: Outcome,
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
/// and deleting it in the same transaction, so nothing is left behind. Also
/// returns the table flags the kernel takes, when the probe worked.
fn probe_kernel(cfg: &Config) -> (Probe, Option<u32>) {
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
    let spec = table::table(&probe_cfg, &levels, &[], &Default::default(), &[], true, 0);
    let result = Nft::open().and_then(|mut nft| {
        let flags = nft.table_flags(&spec.name)?;
        let mut txn = Txn::new();
        txn.replace_table(&spec, false, flags)?;
        txn.delete_table(&spec.name)?;
        nft.commit(txn).map(|()| flags)
    });
    let flags = result.as_ref().ok().copied();
    let probe = match result {
        Ok(flags) => Probe {
            verdict: Outcome::Ok,
            name: "nftables",
            detail: format!(
                "nf_tables accepts socket cgroupv2, verdict maps, tproxy and nat; {}",
                if flags & TABLE_F_PERSIST != 0 {
                    "table flags owner and persist: nobody else can flush or delete the table, and it outlives a crash"
                } else if flags & TABLE_F_OWNER != 0 {
                    "table flag owner (no persist, Linux < 6.9): nobody else can flush the table, but a crash removes it"
                } else {
                    "no table flags (Linux < 5.12): a foreign flush removes the table until the daemon restores it"
                }
            ),
            fix: None,
        },
        Err(e) => Probe {
            verdict: Outcome::Fail,
            name: "nftables",
            detail: e.to_string(),
            fix: Some(
                "run as root (CAP_NET_ADMIN); the kernel needs nf_tables with nft_socket, nft_tproxy and nft_nat (modprobe nft_socket nft_tproxy nft_nat)".into(),
            ),
        },
    };
    (probe, flags)
}

fn probe_cgroups(cfg: &Config) -> (Probe, Option<Probe>) {
    let hier = match Hierarchy::discover(&cfg.cgroup_root) {
        Ok(h) => h,
        Err(e) => {
            return (
                Probe {
                    verdict: Outcome::Fail,
                    name: "cgroup2",
                    detail: e.to_string(),
                    fix: Some("mount cgroup2 (mount -t cgroup2 none /sys/fs/cgroup/unified) or set cgroup-root".into()),
                },
                None,
            );
        }
    };
    let n = hierarchy::walk(&hier).len();
    let found = Probe {
        verdict: Outcome::Ok,
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
                Outcome::Fail
            } else {
                Outcome::Warn
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
            verdict: Outcome::Ok,
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
            verdict: Outcome::Warn,
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
            verdict: Outcome::Ok,
            name: "rp_filter",
            detail: format!("all={all}, lo={lo}, src_valid_mark={valid_mark}"),
            fix: None,
        }
    }
}

/// What the sockets bound to a port say: none, none transparent, some, or
/// transparency not reported (kernels before 5.10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listening {
    Nothing,
    NotTransparent,
    Transparent,
    Unknown,
}

fn listening(found: &[sockdiag::Bound]) -> Listening {
    if found.is_empty() {
        Listening::Nothing
    } else if found.iter().any(|b| b.transparent == Some(true)) {
        Listening::Transparent
    } else if found.iter().any(|b| b.transparent.is_none()) {
        Listening::Unknown
    } else {
        Listening::NotTransparent
    }
}

/// The verdict on one target's listeners (UDP `None` when the target sends no UDP).
fn judge_listeners(port: u16, tcp: Listening, udp: Option<Listening>) -> (Outcome, String) {
    use Listening::*;
    match (tcp, udp) {
        (Nothing, _) => (Outcome::Fail, format!("nothing listens on TCP port {port}")),
        (NotTransparent, _) => (
            Outcome::Fail,
            format!(
                "the TCP listener on port {port} is not transparent (IP_TRANSPARENT): tproxy hands it nothing"
            ),
        ),
        (_, Some(Nothing)) => (
            Outcome::Warn,
            format!(
                "port {port}: TCP only, UDP is dropped by the proxy (set no-udp to send it direct)"
            ),
        ),
        (_, Some(NotTransparent)) => (
            Outcome::Warn,
            format!(
                "the UDP socket on port {port} is not transparent (IP_TRANSPARENT): UDP is lost"
            ),
        ),
        (Unknown, _) | (_, Some(Unknown)) => (
            Outcome::Ok,
            format!(
                "port {port} has listeners (this kernel does not report whether they are transparent)"
            ),
        ),
        (Transparent, Some(Transparent)) => (
            Outcome::Ok,
            format!("port {port} has transparent TCP and UDP listeners"),
        ),
        (Transparent, None) => (
            Outcome::Ok,
            format!("port {port} has a transparent TCP listener (no-udp)"),
        ),
    }
}

fn probe_listeners(cfg: &Config) -> Vec<Probe> {
    // One dump per protocol serves every target.
    let tcp = sockdiag::list(Proto::Tcp);
    let udp = if cfg.targets.iter().all(|t| t.no_udp) {
        Ok(Vec::new())
    } else {
        sockdiag::list(Proto::Udp)
    };
    let on = |list: &[(u16, sockdiag::Bound)], port: u16| {
        let found: Vec<sockdiag::Bound> = list
            .iter()
            .filter(|(p, _)| *p == port)
            .map(|(_, b)| *b)
            .collect();
        listening(&found)
    };
    cfg.targets
        .iter()
        .map(|t| {
            let found = match (&tcp, &udp) {
                (Err(e), _) => Err(e),
                (Ok(tcp), _) if t.no_udp => Ok((on(tcp, t.port), None)),
                (Ok(_), Err(e)) => Err(e),
                (Ok(tcp), Ok(udp)) => Ok((on(tcp, t.port), Some(on(udp, t.port)))),
            };
            let (verdict, detail) = match found {
                Ok((tcp, udp)) => judge_listeners(t.port, tcp, udp),
                Err(e) => (Outcome::Warn, format!("cannot list sockets: {e}")),
            };
            Probe {
                verdict,
                name: "listener",
                fix: (verdict != Outcome::Ok).then(|| {
                    format!(
                        "start the proxy core with a TPROXY (IP_TRANSPARENT) listener on port {} for target {} (mihomo: tproxy-port; sing-box: a tproxy inbound; v2ray/xray: sockopt tproxy \"tproxy\")",
                        t.port, t.name
                    )
                }),
                detail: format!("target {}: {detail}", t.name),
            }
        })
        .collect()
}

/// The sockets among `found` that the network can reach: bound to a wildcard
/// or to a non-loopback address, as "TCP on 0.0.0.0".
fn reachable(proto: &str, found: &[sockdiag::Bound]) -> Vec<String> {
    found
        .iter()
        .filter(|b| !b.addr.to_canonical().is_loopback())
        .map(|b| match b.addr {
            std::net::IpAddr::V6(a) => format!("{proto} on [{a}]"),
            a => format!("{proto} on {a}"),
        })
        .collect()
}

/// Whether a target's listener is reachable from the network. The daemon's
/// tproxy statements deliver to 127.0.0.1 and ::1, so a listener needs no more;
/// one bound to a wildcard or a LAN address also takes connections from
/// neighbours to HOST:PORT, and the proxy relays them, its own port included.
fn probe_exposure(cfg: &Config) -> Vec<Probe> {
    let (tcp, udp) = match (sockdiag::list(Proto::Tcp), sockdiag::list(Proto::Udp)) {
        (Ok(t), Ok(u)) => (t, u),
        // probe_listeners already reports why sockets cannot be listed.
        _ => return Vec::new(),
    };
    let on = |list: &[(u16, sockdiag::Bound)], port: u16| -> Vec<sockdiag::Bound> {
        list.iter()
            .filter(|(p, _)| *p == port)
            .map(|(_, b)| *b)
            .collect()
    };
    cfg.targets
        .iter()
        .filter_map(|t| {
            let tcp = on(&tcp, t.port);
            let udp = if t.no_udp { Vec::new() } else { on(&udp, t.port) };
            if tcp.is_empty() && udp.is_empty() {
                // Nothing listens: probe_listeners says so.
                return None;
            }
            let open: Vec<String> = reachable("TCP", &tcp)
                .into_iter()
                .chain(reachable("UDP", &udp))
                .collect();
            Some(if open.is_empty() {
                Probe {
                    verdict: Outcome::Ok,
                    name: "exposure",
                    detail: format!(
                        "target {}: port {} is bound to loopback only",
                        t.name, t.port
                    ),
                    fix: None,
                }
            } else {
                Probe {
                    verdict: Outcome::Warn,
                    name: "exposure",
                    detail: format!(
                        "target {}: port {} is reachable from the network ({})",
                        t.name,
                        t.port,
                        open.join(", ")
                    ),
                    fix: Some(format!(
                        "bind the listener on port {} to 127.0.0.1 and ::1, where tproxy delivers (mihomo: two `listeners` of type tproxy with `listen: 127.0.0.1` and `listen: \"::1\"`; sing-box: tproxy inbounds with \"listen\": \"127.0.0.1\" and \"::1\"; v2ray/xray: dokodemo-door inbounds with \"listen\")",
                        t.port
                    )),
                }
            })
        })
        .collect()
}

/// An nftables.service that flushes the whole ruleset: harmless where the
/// table is flagged owner (`flags`), a gap in coverage on every reload where not.
fn probe_flush(flags: Option<u32>) -> Probe {
    let conf = std::fs::read_to_string("/etc/nftables.conf").unwrap_or_default();
    let enabled = [
        "/etc/systemd/system/multi-user.target.wants/nftables.service",
        "/etc/systemd/system/sysinit.target.wants/nftables.service",
    ]
    .iter()
    .any(|p| std::path::Path::new(p).exists());
    let flushes = enabled
        && conf
            .lines()
            .any(|l| l.trim_start().starts_with("flush ruleset"));
    if flushes && flags.is_some_and(|f| f & TABLE_F_OWNER != 0) {
        Probe {
            verdict: Outcome::Ok,
            name: "flush ruleset",
            detail: "nftables.service flushes the whole ruleset, which leaves our table alone: it is flagged owner".into(),
            fix: None,
        }
    } else if flushes {
        Probe {
            verdict: Outcome::Warn,
            name: "flush ruleset",
            detail: "nftables.service is enabled and /etc/nftables.conf starts with `flush ruleset`: each (re)start of it removes our table until the daemon repairs it".into(),
            fix: Some("replace `flush ruleset` by deleting only your own tables (`destroy table inet filter`)".into()),
        }
    } else {
        Probe {
            verdict: Outcome::Ok,
            name: "flush ruleset",
            detail: "no enabled nftables.service flushing the whole ruleset found".into(),
            fix: None,
        }
    }
}

/// Whether a foreign ip rule takes (or would take) marked packets before ours.
fn probe_rule_order(cfg: &Config) -> Probe {
    let name = "ip rule order";
    let marks: Vec<u32> = cfg.targets.iter().map(|t| t.mark).collect();
    let rules = match crate::kernel::route::Routes::open().and_then(|mut r| r.all_rules()) {
        Ok(r) => r,
        Err(e) => {
            return Probe {
                verdict: Outcome::Warn,
                name,
                detail: format!("cannot list ip rules: {e}"),
                fix: None,
            };
        }
    };
    let before = precedence::preceding(&rules, &marks, cfg.route_table);
    if !before.is_empty() {
        return Probe {
            verdict: Outcome::Fail,
            name,
            detail: format!(
                "these rules take marked packets before ours, so proxied traffic is dropped: {}",
                before.join("; ")
            ),
            fix: Some(format!(
                "remove them, or set rule-priority below theirs (now {}); the daemon moves ahead of rules added after it by itself",
                cfg.rule_priority
            )),
        };
    }
    match precedence::placement(cfg.rule_priority, &rules, &marks, cfg.route_table) {
        Placement::Blocked { by, .. } => Probe {
            verdict: Outcome::Fail,
            name,
            detail: format!(
                "ip rule {by} takes marked packets at priority 0, where nothing can precede it"
            ),
            fix: Some("remove that rule or give it a priority above 0".into()),
        },
        Placement::Ahead { priority, of } => Probe {
            verdict: Outcome::Warn,
            name,
            detail: format!(
                "ip rule {of} would take marked packets before rule-priority {}; the daemon places its rules at {priority} instead",
                cfg.rule_priority
            ),
            fix: Some(format!(
                "set rule-priority to {priority} or less to say so in the configuration"
            )),
        },
        Placement::Configured(p) => Probe {
            verdict: Outcome::Ok,
            name,
            detail: format!("no foreign ip rule can take marked packets before priority {p}"),
            fix: None,
        },
    }
}

/// Runs a read-only listing command; `None` when it is absent or fails.
fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Reverse-path filters in the host's firewall that would drop looped packets.
fn probe_rpfilter(cfg: &Config) -> Probe {
    let name = "firewall rpfilter";
    let mut found = Vec::new();
    let nft = command_output("nft", &["-j", "list", "ruleset"]);
    if let Some(json) = nft.as_deref().and_then(|t| serde_json::from_str(t).ok()) {
        for t in &cfg.targets {
            for f in rpfilter::dropping(&json, t.mark) {
                let what = format!("nftables {f} (mark {:#x} of {})", t.mark, t.name);
                if !found.contains(&what) {
                    found.push(what);
                }
            }
        }
    }
    for save in ["iptables-save", "ip6tables-save"] {
        if let Some(text) = command_output(save, &["-t", "mangle"]) {
            found.extend(
                rpfilter::iptables_drops(&text)
                    .into_iter()
                    .map(|l| format!("{save}: {l}")),
            );
        }
    }
    if nft.is_none() && found.is_empty() {
        return Probe {
            verdict: Outcome::Warn,
            name,
            detail: "cannot run `nft -j list ruleset`: the firewall's reverse-path filter was not checked".into(),
            fix: None,
        };
    }
    if found.is_empty() {
        return Probe {
            verdict: Outcome::Ok,
            name,
            detail: "no reverse-path filter drops packets carrying the targets' marks".into(),
            fix: None,
        };
    }
    let marks: Vec<String> = cfg
        .targets
        .iter()
        .map(|t| format!("{:#x}", t.mark))
        .collect();
    Probe {
        verdict: Outcome::Fail,
        name,
        detail: format!(
            "a reverse-path filter drops the packets looped to the listeners: {}",
            found.join("; ")
        ),
        fix: Some(format!(
            "accept the marks before the check. NixOS: services.cgtproxy.reversePathExemption = true (the default), or networking.firewall.extraReversePathFilterRules = \"meta mark {{ {m} }} accept\"; firewalld: IPv6_rpfilter=loose in /etc/firewalld/firewalld.conf; wg-quick (its `preraw` chain): `PostUp = nft insert rule ip wg-quick-%i preraw iifname lo accept; nft insert rule ip6 wg-quick-%i preraw iifname lo accept` in the tunnel's config; your own ruleset: `meta mark {{ {m} }} accept` before the fib rule; iptables: `-m rpfilter --validmark`",
            m = marks.join(", ")
        )),
    }
}

/// A sysctl of interface `iface` (`net.ipv4.conf.IFACE.KEY`) that the
/// kernel ORs with `all`'s: on when either is 1.
fn either_on(iface: &str, key: &str) -> bool {
    ["all", iface]
        .iter()
        .any(|d| read_sysctl(&format!("/proc/sys/net/ipv4/conf/{d}/{key}")).as_deref() == Some("1"))
}

/// rp_filter of `iface` as the kernel applies it: the larger of `all`'s and
/// its own.
fn rp_filter(iface: &str) -> u8 {
    ["all", iface]
        .iter()
        .filter_map(|d| read_sysctl(&format!("/proc/sys/net/ipv4/conf/{d}/rp_filter")))
        .filter_map(|v| v.parse().ok())
        .max()
        .unwrap_or(0)
}

/// The pitfalls of forwarded traffic, for each interface that classifies it:
/// strict reverse-path filtering, loopback DNS redirection, bridges.
fn probe_forwarded(cfg: &Config) -> Vec<Probe> {
    let plan = Hierarchy::discover(&cfg.cgroup_root)
        .map_err(|e| e.to_string())
        .and_then(|hier| {
            let tree = crate::core::tree::Tree::build(cfg, &hierarchy::walk(&hier));
            crate::watch::containers::discover(&hier, cfg, &tree).map_err(|e| e.to_string())
        });
    let mut plan = match plan {
        Ok(p) => p,
        Err(e) => {
            return vec![Probe {
                verdict: Outcome::Warn,
                name: "forwarded",
                detail: format!("cannot list the interfaces: {e}"),
                fix: None,
            }];
        }
    };
    if plan.entries.is_empty() {
        return vec![Probe {
            verdict: Outcome::Ok,
            name: "forwarded",
            detail: "no container or interfaces rule classifies forwarded traffic".into(),
            fix: None,
        }];
    }
    // A bridge here is one whose ports the plan names (sysfs shows the
    // namespace that mounted it, not necessarily ours).
    let bridges: BTreeSet<String> = plan
        .entries
        .iter()
        .filter_map(|e| e.bridge.clone())
        .collect();
    let is_bridge = |name: &str| bridges.contains(name);
    let proxied_bridge = plan
        .entries
        .iter()
        .any(|e| matches!(e.action, Action::Tproxy(_)) && is_bridge(&e.name));
    let can_broute = (plan.broute.is_empty() && !proxied_bridge)
        || Nft::open()
            .and_then(|mut n| n.can_broute("cgtproxy-doctor-broute", 0))
            .unwrap_or(false);
    let br_netfilter =
        read_sysctl("/proc/sys/net/bridge/bridge-nf-call-iptables").as_deref() == Some("1");
    if !can_broute {
        // As the daemon does: a bridge's ports stay bridged, containers' are dropped.
        crate::core::links::note_no_broute(cfg, &mut plan);
    }
    let mut out = Vec::new();
    for e in &plan.entries {
        let Action::Tproxy(t) = e.action else {
            continue;
        };
        let target = &cfg.targets[usize::from(t)];
        let routed = plan.broute.contains(&e.index);
        let mut problems = Vec::new();
        let mut fixes = Vec::new();
        let mut verdict = Outcome::Ok;
        if routed && !can_broute {
            verdict = Outcome::Fail;
            problems.push(format!(
                "a port of bridge {} that this kernel cannot route (nft `meta broute`): its traffic is dropped",
                e.bridge.as_deref().unwrap_or("?")
            ));
            fixes.push(
                "Linux 6.4 or later with CONFIG_NFT_BRIDGE_META, or a direct veth".to_owned(),
            );
        }
        if is_bridge(&e.name) && !can_broute && br_netfilter {
            verdict = Outcome::Fail;
            problems.push(
                "a bridge whose ports this kernel cannot route (nft `meta broute`), with br_netfilter on: tproxy cannot deliver in the bridge's pass, so its traffic fails closed".to_owned(),
            );
            fixes.push("Linux 6.4 or later with CONFIG_NFT_BRIDGE_META, or sysctl -w net.bridge.bridge-nf-call-iptables=0 net.bridge.bridge-nf-call-ip6tables=0 if nothing on this host needs them".to_owned());
        }
        let strict = rp_filter(&e.name) == 1;
        if strict && (routed || either_on(&e.name, "src_valid_mark")) {
            verdict = Outcome::Fail;
            problems.push(if routed {
                "strict rp_filter on a bridge port: its IPv4 sources route via the bridge, so the kernel drops them".to_owned()
            } else {
                "strict rp_filter with src_valid_mark: the kernel checks the source against the route our mark selects (loopback) and drops IPv4 packets".to_owned()
            });
            fixes.push(format!(
                "sysctl -w net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.{}.rp_filter=2 (loose)",
                e.name
            ));
        }
        if let Some(d) = &target.dns_hijack {
            if d.ip.is_some_and(|ip| ip.is_loopback()) && !either_on(&e.name, "route_localnet") {
                verdict = verdict.max(Outcome::Warn);
                problems.push(format!(
                    "its DNS goes to {}: the kernel refuses a loopback destination for traffic from another interface",
                    d.ip.map(|i| i.to_string()).unwrap_or_default()
                ));
                fixes.push(format!(
                    "sysctl -w net.ipv4.conf.{}.route_localnet=1, or dns-hijack.ip on an address of this host that it reaches",
                    e.name
                ));
            }
            if d.ip6.is_some_and(|ip| ip.is_loopback()) {
                verdict = verdict.max(Outcome::Warn);
                problems.push(
                    "its IPv6 DNS goes to ::1, which IPv6 never accepts from another interface"
                        .into(),
                );
                fixes.push("dns-hijack.ip6 on an address of this host that it reaches".into());
            }
        }
        out.push(Probe {
            verdict,
            name: "forwarded",
            detail: format!(
                "{} (tproxy {}): {}",
                e.name,
                target.name,
                if problems.is_empty() {
                    "no known pitfall".to_owned()
                } else {
                    problems.join("; ")
                }
            ),
            fix: (!fixes.is_empty()).then(|| fixes.join("; ")),
        });
    }
    out
}

/// The eBPF datapath: the kernel's verifier loads every program (nothing is
/// attached), which needs CAP_BPF and CAP_NET_ADMIN.
fn probe_bpf(cfg: &Config) -> Probe {
    let root = Hierarchy::discover(&cfg.cgroup_root).map(|h| h.mount);
    let loaded = root.map_err(|e| e.to_string()).and_then(|r| {
        let mut d = crate::kernel::bpf::Datapath::load(&r).map_err(|e| e.to_string())?;
        d.verify().map_err(|e| e.to_string())
    });
    match loaded {
        Ok(()) => Probe {
            verdict: Outcome::Ok,
            name: "ebpf",
            detail: "the kernel loads the datapath's programs (cgroup connect4/6, sendmsg4/6, recvmsg4/6, getpeername4/6, getsockopt)".into(),
            fix: None,
        },
        Err(e) => Probe {
            verdict: Outcome::Fail,
            name: "ebpf",
            detail: e,
            fix: Some(
                "run as root (the datapath needs CAP_BPF and CAP_NET_ADMIN, Linux 5.8 or later with cgroup BPF), or use \"datapath\": \"nft\"".into(),
            ),
        },
    }
}

/// The eBPF datapath's listeners: a TCP listener on each target's port, on
/// 127.0.0.1 and (unless no-ipv6) ::1, that reads SO_ORIGINAL_DST.
fn probe_redirect_listeners(cfg: &Config) -> Vec<Probe> {
    let tcp = match sockdiag::list(Proto::Tcp) {
        Ok(t) => t,
        Err(e) => {
            return vec![Probe {
                verdict: Outcome::Warn,
                name: "listener",
                detail: format!("cannot list sockets: {e}"),
                fix: None,
            }];
        }
    };
    cfg.targets
        .iter()
        .map(|t| {
            let families = |v6: bool| {
                tcp.iter().any(|(p, b)| {
                    *p == t.port && (b.addr.is_unspecified() || b.addr.to_canonical().is_loopback()) && b.ipv6 == v6
                })
            };
            let (v4, v6) = (families(false), t.no_ipv6 || families(true));
            let (verdict, detail) = match (v4, v6) {
                (true, true) => (Outcome::Ok, format!("port {} has TCP listeners", t.port)),
                (false, _) => (
                    Outcome::Fail,
                    format!("nothing listens on TCP 127.0.0.1:{}", t.port),
                ),
                (true, false) => (
                    Outcome::Fail,
                    format!("nothing listens on TCP [::1]:{} (IPv6 connections are refused; set no-ipv6 to send them direct)", t.port),
                ),
            };
            Probe {
                verdict,
                name: "listener",
                fix: (verdict != Outcome::Ok).then(|| {
                    format!(
                        "start a REDIRECT-style listener (one that reads SO_ORIGINAL_DST) on port {} for target {}: cgtproxy forward, redsocks, mihomo's redir-port, sing-box's redirect inbound, v2ray's dokodemo-door with followRedirect",
                        t.port, t.name
                    )
                }),
                detail: format!("target {}: {detail}", t.name),
            }
        })
        .chain(cfg.targets.iter().filter_map(udp_without_forwarder))
        .collect()
}

/// A target whose UDP this datapath sends to a proxy core: only the built-in
/// forwarder (a target with an `upstream`) asks the datapath for a redirected
/// datagram's destination; a core's UDP inbound cannot learn it.
fn udp_without_forwarder(t: &Target) -> Option<Probe> {
    (!t.no_udp && t.upstream.is_none()).then(|| Probe {
        verdict: Outcome::Warn,
        name: "udp",
        detail: format!(
            "target {}: its UDP goes to port {}, where a proxy core cannot tell where a redirected datagram was going (only the built-in forwarder asks the datapath)",
            t.name, t.port
        ),
        fix: Some(format!(
            "set \"no-udp\": true on target {} to send its UDP direct, or give it an upstream and run cgtproxy forward",
            t.name
        )),
    })
}

/// Runs every probe; returns the report and whether nothing failed.
pub fn doctor(cfg: &Config) -> (String, bool) {
    if cfg.datapath == Datapath::Ebpf {
        let (cg, watches) = probe_cgroups(cfg);
        let mut probes = vec![probe_bpf(cfg), cg];
        probes.extend(watches);
        probes.extend(probe_redirect_listeners(cfg));
        probes.extend(probe_exposure(cfg));
        return report(&probes);
    }
    let (kernel, flags) = probe_kernel(cfg);
    let mut probes = vec![kernel];
    let (cg, watches) = probe_cgroups(cfg);
    probes.push(cg);
    probes.extend(watches);
    probes.push(probe_rp_filter());
    if !cfg.targets.is_empty() {
        probes.push(probe_rule_order(cfg));
        probes.push(probe_rpfilter(cfg));
    }
    probes.extend(probe_listeners(cfg));
    probes.extend(probe_exposure(cfg));
    probes.extend(probe_forwarded(cfg));
    probes.push(probe_flush(flags));
    report(&probes)
}

/// One line per probe, with its fix; and whether nothing failed.
fn report(probes: &[Probe]) -> (String, bool) {
    let mut o = String::new();
    for p in probes {
        let v = match p.verdict {
            Outcome::Ok => "ok  ",
            Outcome::Warn => "warn",
            Outcome::Fail => "FAIL",
        };
        let _ = writeln!(o, "{v} {}: {}", p.name, p.detail);
        if let Some(fix) = &p.fix {
            let _ = writeln!(o, "     fix: {fix}");
        }
    }
    let ok = probes.iter().all(|p| p.verdict != Outcome::Fail);
    (o, ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_must_be_transparent() {
        use Listening::*;
        let b = |transparent| sockdiag::Bound {
            ipv6: false,
            addr: std::net::Ipv4Addr::LOCALHOST.into(),
            transparent,
        };
        assert_eq!(listening(&[]), Nothing);
        assert_eq!(listening(&[b(Some(false)), b(Some(true))]), Transparent);
        assert_eq!(listening(&[b(Some(false))]), NotTransparent);
        assert_eq!(listening(&[b(None)]), Unknown);
        let v = |tcp, udp| judge_listeners(7893, tcp, udp).0;
        assert_eq!(v(Transparent, Some(Transparent)), Outcome::Ok);
        assert_eq!(v(Transparent, None), Outcome::Ok);
        assert_eq!(v(NotTransparent, Some(Transparent)), Outcome::Fail);
        assert_eq!(v(Nothing, None), Outcome::Fail);
        assert_eq!(v(Transparent, Some(Nothing)), Outcome::Warn);
        assert_eq!(v(Transparent, Some(NotTransparent)), Outcome::Warn);
        assert!(
            judge_listeners(7893, NotTransparent, None)
                .1
                .contains("IP_TRANSPARENT")
        );
    }

    #[test]
    fn wildcard_and_lan_bound_listeners_are_reachable() {
        let b = |addr: &str| sockdiag::Bound {
            ipv6: addr.contains(':'),
            addr: addr.parse().unwrap(),
            transparent: Some(true),
        };
        let found = [
            b("127.0.0.1"),
            b("::1"),
            b("::ffff:127.0.0.1"),
            b("0.0.0.0"),
            b("::"),
            b("192.168.1.5"),
        ];
        assert_eq!(
            reachable("TCP", &found),
            ["TCP on 0.0.0.0", "TCP on [::]", "TCP on 192.168.1.5"]
        );
        assert!(reachable("UDP", &found[..3]).is_empty());
    }
}
