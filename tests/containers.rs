//! Kernel tests of forwarded traffic: containers routed by their cgroup, and
//! gateway mode (`interfaces` rules). "Containers" are made as container
//! managers make them: a process in its own network namespace and its own
//! cgroup, named like a docker or podman scope, linked to this host by a veth
//! (directly, or through a bridge), this host its default gateway. Real
//! packets; what went direct is counted at "the internet".

mod support;

use std::os::unix::fs::MetadataExt;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// A container: its process (the namespace's holder) and the host end of its
/// link. Addresses 10.77.N.2 and fd77:N::2; this host is .1 and ::1.
struct Container {
    holder: Child,
    host_if: String,
}

impl Container {
    fn pid(&self) -> u32 {
        self.holder.id()
    }

    /// One TCP or UDP exchange from inside the container.
    fn talk(&self, proto: &str, host: &str, port: u16) -> String {
        sh_any(&format!(
            "nsenter -t {} -n python3 {}/tests/helpers/client.py {proto} {host} {port} 1",
            self.pid(),
            env!("CARGO_MANIFEST_DIR")
        ))
        .trim()
        .to_owned()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// Forwarding on in this (the test's) namespace, and "the internet" routes
/// the containers' and LAN's addresses back to us.
fn be_a_router(lab: &Lab) {
    let out =
        sh_any("sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 && echo done");
    assert!(out.contains("done"), "{out}");
    let out = lab.in_peer(
        "ip route add 10.64.0.0/10 via 10.99.0.1 && ip -6 route add fd00::/8 via fd99::1 && echo done",
    );
    assert!(out.contains("done"), "{out}");
}

/// Starts container `n` in cgroup `rel`, its link's host end named `host_if`;
/// with `bridge`, that end is a port of this bridge (which holds .1/::1).
fn container(lab: &Lab, rel: &str, n: u8, host_if: &str, bridge: Option<&str>) -> Container {
    lab.mkcg(rel);
    let holder = lab.spawn_in(rel, "unshare --net sleep 3600", Stdio::null());
    let pid = holder.id();
    let mine = std::fs::read_link("/proc/self/ns/net").unwrap();
    let own_ns = lab.eventually(Duration::from_secs(5), || {
        std::fs::read_link(format!("/proc/{pid}/ns/net")).is_ok_and(|l| l != mine)
    });
    assert!(own_ns, "container {rel} has no namespace of its own");
    let host_side = match bridge {
        None => format!(
            "ip addr add 10.77.{n}.1/24 dev {host_if} && ip addr add fd77:{n}::1/64 dev {host_if} nodad"
        ),
        Some(br) => format!("ip link set {host_if} master {br}"),
    };
    let gw = match bridge {
        None => n,
        Some(_) => 0,
    };
    let out = sh_any(&format!(
        "ip link add {host_if} type veth peer name eth0 netns {pid} && {host_side} &&
         ip link set {host_if} up &&
         nsenter -t {pid} -n sh -c 'ip link set lo up &&
           ip addr add 10.77.{gw}.{a}/24 dev eth0 && ip addr add fd77:{gw}::{a}/64 dev eth0 nodad &&
           ip link set eth0 up && ip route add default via 10.77.{gw}.1 &&
           ip -6 route add default via fd77:{gw}::1' && echo done",
        a = if bridge.is_some() { 10 + n } else { 2 },
    ));
    assert!(out.contains("done"), "container {rel}: {out}");
    Container {
        holder,
        host_if: host_if.to_owned(),
    }
}

/// A bridge on this host with address 10.77.0.1/24 and fd77:0::1/64.
fn bridge(name: &str) {
    let out = sh_any(&format!(
        "ip link add {name} type bridge && ip addr add 10.77.0.1/24 dev {name} &&
         ip addr add fd77:0::1/64 dev {name} nodad && ip link set {name} up && echo done"
    ));
    assert!(out.contains("done"), "{out}");
}

/// The interfaces in the daemon's `ifaces` map (nft names them; an index
/// whose interface is gone prints as a number).
fn mapped() -> Vec<String> {
    let out = nft("-j list map inet cgtproxy ifaces");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    let mut out = Vec::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        for e in item["map"]["elem"].as_array().into_iter().flatten() {
            match &e[0] {
                serde_json::Value::String(name) => out.push(name.clone()),
                other => out.push(other.to_string()),
            }
        }
    }
    out
}

/// The inodes process `pid`'s inotify descriptors watch (`ino:` in fdinfo,
/// hex).
fn inotify_watches(pid: u32) -> Vec<u64> {
    let mut inodes = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .flatten()
    {
        let info = std::fs::read_to_string(fd.path()).unwrap_or_default();
        for line in info.lines().filter(|l| l.starts_with("inotify wd:")) {
            let ino = line
                .split_whitespace()
                .find_map(|f| f.strip_prefix("ino:"))
                .and_then(|h| u64::from_str_radix(h, 16).ok());
            inodes.extend(ino);
        }
    }
    inodes
}

fn rules(lab: &Lab) -> String {
    format!(
        r#"[{{"match":"{}","direct":true}},{{"match":"{}","tproxy":"proxy"}},
            {{"match":"{}","direct":true}},{{"match":"{}","drop":true}}]"#,
        lab.re("core"),
        lab.re("proxy"),
        lab.re("direct"),
        lab.re("drop")
    )
    .replace('\\', "\\\\")
}

#[test]
fn containers_get_their_cgroups_verdict_live() {
    in_namespaces("containers_get_their_cgroups_verdict_live", || {
        let mut lab = Lab::new("containers");
        be_a_router(&lab);
        lab.start_listener("core", PROXY_PORT, "proxy");
        let proxied_c = container(&lab, "proxy/docker-3f2a.scope", 1, "veth3f2a", None);
        let direct_c = container(&lab, "direct/libpod-b0b0.scope", 2, "vethb0b0", None);
        let dropped_c = container(&lab, "drop/machine-c.scope", 3, "ve-c", None);
        // The target hijacks DNS to a resolver stand-in on an address of this
        // host (not loopback: the kernel refuses 127.0.0.1 from other
        // interfaces unless route_localnet is set).
        let out = sh_any("ip addr add 10.55.0.53/32 dev lo && echo done");
        assert!(out.contains("done"), "{out}");
        lab.start_local_server(1053, "dns", &["10.55.0.53"]);
        let target = format!(
            r#"{{"proxy":{{"port":{PROXY_PORT},"mark":{MARK},"dns-hijack":{{"ip":"10.55.0.53","port":1053,"tcp":true}}}}}}"#
        );
        let cfg = lab.write_config("c.json", &target, &rules(&lab));
        lab.start_daemon(&cfg);
        let log = lab.daemon.as_ref().unwrap().log();
        assert!(
            log.contains("forwarded traffic from interface veth3f2a (container ")
                && log.contains("docker-3f2a.scope): tproxy proxy"),
            "{log}"
        );

        let (out, code) = cgtproxy(&["explain", "docker-3f2a.scope", "--config"], &cfg);
        assert!(
            out.contains("through interface veth3f2a (container /")
                && out.contains("tproxy proxy (port 7893, mark 0xbb8); kernel agrees"),
            "{out}"
        );
        assert_eq!(code, 0, "{out}");
        let (out, code) = cgtproxy(&["status", "--config"], &cfg);
        assert!(
            out.contains("machine-c.scope): forwarded traffic drop: installed"),
            "{out}"
        );
        assert_eq!(code, 0, "{out}");

        // Direct first: it is the one that may reach the peer.
        let a = direct_c.talk("tcp", PEER4, PEER_PORT);
        assert!(a.starts_with("peer 10.77.2.2"), "direct container: {a}");
        install_counter(lab.peer_pid());

        for (proto, dst) in [
            ("tcp", PEER4),
            ("udp", PEER4),
            ("tcp", PEER6),
            ("udp", PEER6),
        ] {
            let a = proxied_c.talk(proto, dst, PEER_PORT);
            assert!(
                proxied(&a, dst),
                "{proto} to {dst} from the proxied container: {a}"
            );
            let a = dropped_c.talk(proto, dst, PEER_PORT);
            assert!(
                a.starts_with("ERR"),
                "{proto} to {dst} from the dropped container: {a}"
            );
        }
        // DNS is hijacked: the answer comes from the resolver stand-in, which
        // sees the container; the reply appears to come from 9.9.9.9.
        let a = proxied_c.talk("udp", "9.9.9.9", 53);
        assert_eq!(a, "dns 10.77.1.2 from 9.9.9.9", "hijacked UDP DNS");
        let a = proxied_c.talk("tcp", "9.9.9.9", 53);
        assert_eq!(a, "dns 10.77.1.2", "hijacked TCP DNS");
        // Its own gateway's address is this host's: never proxied.
        lab.start_local_server(9099, "host", &["10.77.1.1"]);
        let a = proxied_c.talk("tcp", "10.77.1.1", 9099);
        assert!(a.starts_with("host 10.77.1.2"), "to this host: {a}");
        assert_eq!(counted(lab.peer_pid()), 0, "went direct");

        // wg-quick's src_valid_mark with a strict reverse-path filter: the
        // kernel checks the source against the route our mark selects and
        // drops forwarded IPv4. doctor names it; the traffic fails closed.
        sh_any(
            "sysctl -qw net.ipv4.conf.all.src_valid_mark=1 net.ipv4.conf.all.rp_filter=1 net.ipv4.conf.veth3f2a.rp_filter=1",
        );
        let (out, code) = cgtproxy(&["doctor", "--config"], &cfg);
        assert!(
            out.contains(
                "FAIL forwarded: veth3f2a (tproxy proxy): strict rp_filter with src_valid_mark"
            ) && out.contains("net.ipv4.conf.veth3f2a.rp_filter=2"),
            "{out}"
        );
        assert_ne!(code, 0, "{out}");
        let a = proxied_c.talk("tcp", PEER4, PEER_PORT);
        assert!(a.starts_with("ERR"), "strict rp_filter: {a}");
        assert_eq!(counted(lab.peer_pid()), 0, "went direct");
        sh_any(
            "sysctl -qw net.ipv4.conf.all.src_valid_mark=0 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.veth3f2a.rp_filter=0",
        );
        let (out, _) = cgtproxy(&["doctor", "--config"], &cfg);
        assert!(
            out.contains("ok   forwarded: veth3f2a (tproxy proxy): no known pitfall"),
            "{out}"
        );

        // A container started later, then stopped.
        let t0 = Instant::now();
        let late = container(&lab, "proxy/docker-1a7e.scope", 4, "veth1a7e", None);
        let name = late.host_if.clone();
        let seen = lab.eventually(Duration::from_secs(10), || mapped().contains(&name));
        assert!(
            seen,
            "a container started later is not classified: {:?}",
            mapped()
        );
        eprintln!(
            "container classified {:?} after its cgroup appeared",
            t0.elapsed()
        );
        let a = late.talk("tcp", PEER4, PEER_PORT);
        assert!(proxied(&a, PEER4), "late container: {a}");
        assert_eq!(counted(lab.peer_pid()), 0, "went direct");
        drop(late);
        let gone = lab.eventually(Duration::from_secs(10), || mapped().len() == 3);
        let mut left = mapped();
        left.sort();
        assert!(gone, "a stopped container's link stays mapped: {left:?}");
        assert_eq!(left, ["ve-c", "veth3f2a", "vethb0b0"]);

        // A manager that moves the container's process into its cgroup last:
        // links up first (from a cgroup no rule matches), then the cgroup,
        // then the process. The daemon looked at the cgroup while it was
        // empty; only its populated watch can bring the look that finds it.
        let last = container(&lab, "unmatched/late-join", 5, "veth5e1f", None);
        let dir = lab.mkcg("proxy/docker-5e1f.scope");
        let events = std::fs::metadata(dir.join("cgroup.events")).unwrap().ino();
        let daemon = lab.daemon.as_ref().unwrap().child.id();
        let watched = lab.eventually(Duration::from_secs(10), || {
            inotify_watches(daemon).contains(&events)
        });
        assert!(
            watched,
            "the new cgroup's first look did not end in a populated watch"
        );
        assert!(
            !mapped().contains(&last.host_if),
            "mapped before its process came"
        );
        std::fs::write(dir.join("cgroup.procs"), last.pid().to_string()).unwrap();
        let seen = lab.eventually(Duration::from_secs(10), || mapped().contains(&last.host_if));
        assert!(
            seen,
            "a container whose process joined its cgroup last is not classified: {:?}",
            mapped()
        );
        let a = last.talk("tcp", PEER4, PEER_PORT);
        assert!(proxied(&a, PEER4), "container joined last: {a}");
        drop(last);
        let gone = lab.eventually(Duration::from_secs(10), || mapped().len() == 3);
        let mut left = mapped();
        left.sort();
        assert!(gone, "a stopped container's link stays mapped: {left:?}");
        assert_eq!(left, ["ve-c", "veth3f2a", "vethb0b0"]);

        // Bypass destinations: neither proxied nor dropped, forwarded as they
        // are (last: the peer's arrival counter must stay 0 until here).
        for proto in ["tcp", "udp"] {
            for (c, n) in [(&proxied_c, 1), (&dropped_c, 3)] {
                for (dst, from) in [
                    (BYPASSED4, format!("10.77.{n}.2")),
                    (BYPASSED6, format!("fd77:{n}::2")),
                ] {
                    let a = c.talk(proto, dst, PEER_PORT);
                    assert!(
                        a.starts_with(&format!("peer {from}")),
                        "{proto} to bypassed {dst} from {from}: {a}"
                    );
                }
            }
        }
    });
}

#[test]
fn gateway_mode_routes_what_interfaces_forward_even_when_they_appear_later() {
    in_namespaces(
        "gateway_mode_routes_what_interfaces_forward_even_when_they_appear_later",
        || {
            let mut lab = Lab::new("gateway");
            be_a_router(&lab);
            lab.start_listener("core", PROXY_PORT, "proxy");
            // LAN clients are namespaces in no classified cgroup: only their
            // interface decides.
            let lan = container(&lab, "lan-client", 5, "lan0", None);
            let cfg = lab.write_config_with(
                "g.json",
                &proxy_target(),
                &rules(&lab),
                r#"[{"match":"^lan","tproxy":"proxy"},{"match":"^guest","drop":true}]"#,
            );
            lab.start_daemon(&cfg);
            install_counter(lab.peer_pid());
            for (proto, dst) in [
                ("tcp", PEER4),
                ("udp", PEER4),
                ("tcp", PEER6),
                ("udp", PEER6),
            ] {
                let a = lan.talk(proto, dst, PEER_PORT);
                assert!(proxied(&a, dst), "{proto} to {dst} from the LAN: {a}");
            }
            let guest = container(&lab, "guest-client", 6, "guest0", None);
            let seen = lab.eventually(Duration::from_secs(10), || {
                mapped().contains(&"guest0".to_owned())
            });
            assert!(seen, "an interface that appeared later is not classified");
            for (proto, dst) in [("tcp", PEER4), ("udp", PEER6)] {
                let a = guest.talk(proto, dst, PEER_PORT);
                assert!(a.starts_with("ERR"), "{proto} from the guest network: {a}");
            }
            assert_eq!(counted(lab.peer_pid()), 0, "went direct");
            let log = lab.daemon.as_ref().unwrap().log();
            assert!(
                log.contains(
                    "forwarded traffic from interface guest0 (interfaces[1] /^guest/): drop"
                ),
                "{log}"
            );
            // A reload that drops the LAN takes effect without a restart.
            lab.write_config_with(
                "g.json",
                &proxy_target(),
                &rules(&lab),
                r#"[{"match":"^lan","drop":true}]"#,
            );
            let d = lab.daemon.as_ref().unwrap();
            d.signal(nix::sys::signal::Signal::SIGHUP);
            let reloaded = lab.eventually(Duration::from_secs(10), || {
                d.log().contains("configuration reloaded")
            });
            assert!(reloaded, "{}", d.log());
            for (proto, dst) in [("tcp", PEER4), ("udp", PEER6)] {
                let a = lan.talk(proto, dst, PEER_PORT);
                assert!(
                    a.starts_with("ERR"),
                    "{proto} from the LAN after the reload: {a}"
                );
            }
            assert!(!mapped().contains(&"guest0".to_owned()), "{:?}", mapped());
            assert_eq!(counted(lab.peer_pid()), 0, "went direct");

            // With no interface classified the prerouting chain leaves
            // forwarded traffic alone (no lookup per packet); the first
            // interface classified again brings the jump back.
            let forwarding =
                || nft("list chain inet cgtproxy prerouting").contains("jump forwarded");
            let reload = |interfaces: &str, reloads: usize| {
                lab.write_config_with("g.json", &proxy_target(), &rules(&lab), interfaces);
                d.signal(nix::sys::signal::Signal::SIGHUP);
                let done = lab.eventually(Duration::from_secs(10), || {
                    d.log().matches("configuration reloaded").count() == reloads
                });
                assert!(done, "{}", d.log());
            };
            reload(r#"[{"match":"^nothing-here","drop":true}]"#, 2);
            assert!(mapped().is_empty(), "{:?}", mapped());
            assert!(
                !forwarding(),
                "{}",
                nft("list chain inet cgtproxy prerouting")
            );
            let a = lan.talk("tcp", PEER4, PEER_PORT);
            assert!(
                !a.starts_with("ERR") && !proxied(&a, PEER4),
                "tcp from an unclassified LAN: {a}"
            );
            assert!(
                counted(lab.peer_pid()) > 0,
                "went direct, to the peer itself"
            );
            reload(r#"[{"match":"^lan","tproxy":"proxy"}]"#, 3);
            assert!(
                forwarding(),
                "{}",
                nft("list chain inet cgtproxy prerouting")
            );
            for (proto, dst) in [("tcp", PEER4), ("udp", PEER6)] {
                let a = lan.talk(proto, dst, PEER_PORT);
                assert!(proxied(&a, dst), "{proto} to {dst} from the LAN again: {a}");
            }
        },
    );
}

/// Whether this kernel can route bridge ports (nft `meta broute`: Linux 6.4
/// and later, built with CONFIG_NFT_BRIDGE_META), from its own config and
/// version, not from the daemon: the tests check the daemon's probe by it.
fn kernel_routes_bridge_ports() -> bool {
    let config = sh_any("zcat /proc/config.gz 2>/dev/null || cat /boot/config-$(uname -r)");
    let meta = config
        .lines()
        .any(|l| l == "CONFIG_NFT_BRIDGE_META=y" || l == "CONFIG_NFT_BRIDGE_META=m");
    assert!(
        meta || config.contains("CONFIG_NFT_BRIDGE_META is not set"),
        "cannot tell from the kernel's config whether it has CONFIG_NFT_BRIDGE_META"
    );
    let release = sh_any("uname -r");
    let mut v = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let version = (v.next().unwrap_or(0), v.next().unwrap_or(0));
    meta && version >= (6, 4)
}

/// br_netfilter on (Docker's default) or off, in this namespace only.
fn br_netfilter(on: bool) {
    let v = u8::from(on);
    let out = sh_any(&format!(
        "sysctl -qw net.bridge.bridge-nf-call-iptables={v} net.bridge.bridge-nf-call-ip6tables={v} && echo done"
    ));
    assert!(out.contains("done"), "br_netfilter sysctls: {out}");
}

#[test]
fn bridged_containers_get_their_cgroups_verdict_with_and_without_br_netfilter() {
    in_namespaces(
        "bridged_containers_get_their_cgroups_verdict_with_and_without_br_netfilter",
        || {
            let mut lab = Lab::new("bridge");
            be_a_router(&lab);
            lab.start_listener("core", PROXY_PORT, "proxy");
            bridge("br-apps");
            let p = container(
                &lab,
                "proxy/docker-aaaa.scope",
                1,
                "vethaaaa",
                Some("br-apps"),
            );
            let d = container(
                &lab,
                "drop/docker-bbbb.scope",
                2,
                "vethbbbb",
                Some("br-apps"),
            );
            let direct = container(
                &lab,
                "direct/docker-cccc.scope",
                3,
                "vethcccc",
                Some("br-apps"),
            );
            let cfg = lab.write_config("b.json", &proxy_target(), &rules(&lab));
            lab.start_daemon(&cfg);
            let routes = kernel_routes_bridge_ports();
            let log = lab.daemon.as_ref().unwrap().log();
            assert_eq!(
                !routes,
                log.contains("vethaaaa is a port of bridge br-apps and its traffic is tproxy proxy, but this kernel cannot route bridge ports"),
                "{log}"
            );
            let (out, code) = cgtproxy(&["status", "--config"], &cfg);
            let state = if routes {
                "installed (routed, not bridged, on bridge br-apps)"
            } else {
                "DROPPED: a port of bridge br-apps, and this kernel cannot route bridge ports"
            };
            assert!(
                out.contains(&format!(
                    "docker-aaaa.scope): forwarded traffic tproxy proxy: {state}"
                )) && out.contains(
                    "docker-cccc.scope): forwarded traffic direct: stays on bridge br-apps"
                ),
                "{out}"
            );
            assert_eq!(code, if routes { 0 } else { 3 }, "{out}");
            install_counter(lab.peer_pid());
            for bnf in [true, false] {
                br_netfilter(bnf);
                let a = direct.talk("tcp", PEER4, PEER_PORT);
                assert!(
                    a.starts_with("peer 10.77.0.13"),
                    "direct, br_netfilter {bnf}: {a}"
                );
                // What the direct container sent is all that may arrive,
                // once its connection's last packets have.
                let ended = lab.eventually(Duration::from_secs(5), || {
                    !peer_connections_open(lab.peer_pid())
                });
                assert!(ended, "the direct container's connection never ended");
                let before = counted(lab.peer_pid());
                for (proto, dst) in [
                    ("tcp", PEER4),
                    ("udp", PEER4),
                    ("tcp", PEER6),
                    ("udp", PEER6),
                ] {
                    let a = p.talk(proto, dst, PEER_PORT);
                    if routes {
                        assert!(
                            proxied(&a, dst),
                            "{proto} to {dst}, br_netfilter {bnf}: {a}"
                        );
                    } else {
                        assert!(
                            a.starts_with("ERR"),
                            "{proto} to {dst} fails closed, br_netfilter {bnf}: {a}"
                        );
                    }
                    let a = d.talk(proto, dst, PEER_PORT);
                    assert!(
                        a.starts_with("ERR"),
                        "{proto} to {dst} dropped, br_netfilter {bnf}: {a}"
                    );
                }
                // The bridge's own address is this host's: never proxied.
                if routes {
                    lab.start_local_server(9100 + u16::from(bnf), "host", &["10.77.0.1"]);
                    let a = p.talk("tcp", "10.77.0.1", 9100 + u16::from(bnf));
                    assert!(a.starts_with("host 10.77.0.11"), "to this host: {a}");
                }
                assert_eq!(
                    counted(lab.peer_pid()),
                    before,
                    "went direct, br_netfilter {bnf}"
                );
            }
            // Stopping the daemon takes the bridge table too.
            lab.take_daemon().stop();
            let left = sh_any("nft list tables");
            assert!(!left.contains("cgtproxy"), "{left}");
        },
    );
}

#[test]
fn a_bridge_rule_routes_its_ports_with_and_without_br_netfilter() {
    in_namespaces(
        "a_bridge_rule_routes_its_ports_with_and_without_br_netfilter",
        || {
            let mut lab = Lab::new("vmbridge");
            be_a_router(&lab);
            lab.start_listener("core", PROXY_PORT, "proxy");
            bridge("br-vms");
            let cfg = lab.write_config_with(
                "v.json",
                &proxy_target(),
                &rules(&lab),
                r#"[{"match":"^br-vms$","tproxy":"proxy"}]"#,
            );
            lab.start_daemon(&cfg);
            // A VM's tap joins the bridge after the daemon started.
            let vm = container(&lab, "vm-1", 4, "tap-vm1", Some("br-vms"));
            if kernel_routes_bridge_ports() {
                let seen = lab.eventually(Duration::from_secs(10), || {
                    mapped().contains(&"tap-vm1".to_owned())
                });
                assert!(
                    seen,
                    "a port that joined later is not classified: {:?}",
                    mapped()
                );
            }
            install_counter(lab.peer_pid());
            let routes = kernel_routes_bridge_ports();
            for bnf in [true, false] {
                br_netfilter(bnf);
                let (out, _) = cgtproxy(&["doctor", "--config"], &cfg);
                assert_eq!(
                    out.contains("FAIL forwarded: br-vms (tproxy proxy): a bridge whose ports this kernel cannot route"),
                    !routes && bnf,
                    "{out}"
                );
                for (proto, dst) in [("tcp", PEER4), ("udp", PEER6)] {
                    let a = vm.talk(proto, dst, PEER_PORT);
                    // Without `meta broute` the port stays bridged: the bridge's
                    // rule reaches it, except in br_netfilter's bridge pass,
                    // where tproxy cannot deliver: it fails closed there.
                    if routes || !bnf {
                        assert!(
                            proxied(&a, dst),
                            "{proto} to {dst}, br_netfilter {bnf}: {a}"
                        );
                    } else {
                        assert!(
                            a.starts_with("ERR"),
                            "{proto} to {dst}, br_netfilter {bnf}: {a}"
                        );
                    }
                }
            }
            assert_eq!(counted(lab.peer_pid()), 0, "went direct");
        },
    );
}
