//! Coexistence: what else runs on a host — VPN and mesh clients' policy rules,
//! firewalls that flush the ruleset or filter by reverse path, a proxy core that
//! dies — never sends proxied traffic past the proxy. Real packets; every test
//! counts what reached the destination, or a tunnel, directly.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

fn rules(lab: &Lab) -> String {
    format!(
        r#"[{{"match":"{}","direct":true}},{{"match":"{}","direct":true}},
            {{"match":"{}","tproxy":"proxy"}}]"#,
        lab.re("listener"),
        lab.re("direct"),
        lab.re("proxy")
    )
    .replace('\\', "\\\\")
}

const FAST: Duration = Duration::from_secs(5);

/// Addresses of the peer ("the internet") that this host reaches only by its
/// default route, not a connected one: what a full tunnel takes over.
const INET4: &str = "192.0.2.1";
const INET6: &str = "2001:db8::1";

fn default_route_to_the_peer(lab: &Lab) {
    lab.in_peer(&format!(
        "ip addr add {INET4}/32 dev lo && ip -6 addr add {INET6}/128 dev lo"
    ));
    let out = sh_any(&format!(
        "ip route add default via {PEER4} && ip -6 route add default via {PEER6} && echo done"
    ));
    assert!(out.contains("done"), "{out}");
}

/// A stand-in for a VPN tunnel or an exit node: a namespace behind `vpn0`,
/// which routing table `table` sends everything to. Counts what arrives.
struct Tunnel {
    far: Netns,
}

impl Tunnel {
    fn new(table: u32) -> Tunnel {
        let far = Netns::new();
        let pid = far.pid();
        let out = sh_any(&format!(
            "ip link add vpn0 type veth peer name vpn1 netns {pid} &&
             ip addr add 10.98.0.1/24 dev vpn0 && ip addr add fd98::1/64 dev vpn0 nodad &&
             ip link set vpn0 up &&
             nsenter -t {pid} -n sh -c 'ip link set lo up && ip addr add 10.98.0.2/24 dev vpn1 &&
               ip addr add fd98::2/64 dev vpn1 nodad && ip link set vpn1 up' &&
             ip route add default via 10.98.0.2 dev vpn0 table {table} &&
             ip -6 route add default via fd98::2 dev vpn0 table {table} && echo done"
        ));
        assert!(out.contains("done"), "tunnel: {out}");
        install_counter(pid);
        Tunnel { far }
    }

    fn arrived(&self) -> u64 {
        counted(self.far.pid())
    }
}

/// wg-quick's nftables rules for interface `dev` with addresses `v4` and `v6`,
/// as its add_default() writes them (wireguard-tools, linux.bash).
fn load_wg_quick_nft(dev: &str, v4: &str, v6: &str) {
    for (pf, addr) in [("ip", v4), ("ip6", v6)] {
        let t = format!("wg-quick-{dev}");
        let script = format!(
            "add table {pf} {t}
add chain {pf} {t} preraw {{ type filter hook prerouting priority -300; }}
add chain {pf} {t} premangle {{ type filter hook prerouting priority -150; }}
add chain {pf} {t} postmangle {{ type filter hook postrouting priority -150; }}
add rule {pf} {t} preraw iifname != \"{dev}\" {pf} daddr {addr} fib saddr type != local drop
add rule {pf} {t} postmangle meta l4proto udp mark 51820 ct mark set mark
add rule {pf} {t} premangle meta l4proto udp meta mark set ct mark
"
        );
        let out = sh_any(&format!("printf '%s' '{script}' | nft -f - && echo loaded"));
        assert!(out.contains("loaded"), "wg-quick's rules: {out}");
    }
}

/// The priority of our v4 rule (`fwmark 0xbb8`), and of the first rule that
/// looks up `table`, as `ip rule` lists them.
fn priorities(family: &str, table: &str) -> (Option<u32>, Option<u32>) {
    let list = sh_any(&format!("ip {family} rule"));
    let prio = |pat: &str| {
        list.lines()
            .find(|l| l.contains(pat))
            .and_then(|l| l.split(':').next())
            .and_then(|p| p.trim().parse().ok())
    };
    (
        prio("fwmark 0xbb8 lookup 300"),
        prio(&format!("lookup {table}")),
    )
}

/// Proxied TCP and UDP over both families, while the tunnel gets none of it.
fn all_proxied(lab: &Lab, tunnel: &Tunnel, when: &str) {
    for (proto, dst) in [
        ("tcp", INET4),
        ("udp", INET4),
        ("tcp", INET6),
        ("udp", INET6),
    ] {
        let a = lab.talk("proxy", proto, dst, PEER_PORT);
        assert!(proxied(&a, dst), "{when}: {proto} to {dst}: {a}");
    }
    assert_eq!(
        tunnel.arrived(),
        0,
        "{when}: proxied packets went into the tunnel"
    );
}

/// wg-quick brings a full tunnel up with two rules added without a priority:
/// the kernel places them just before the second rule of the list, ours. The
/// daemon must move ahead of them, and a packet routed into the tunnel in
/// between must be dropped, not delivered.
#[test]
fn wg_quick_rules_added_after_the_daemon_never_take_proxied_traffic() {
    in_namespaces(
        "wg_quick_rules_added_after_the_daemon_never_take_proxied_traffic",
        || {
            let mut lab = Lab::new("wgquick");
            lab.start_listener("listener", PROXY_PORT, "proxy");
            lab.mkcg("proxy");
            lab.mkcg("direct");
            default_route_to_the_peer(&lab);
            let tunnel = Tunnel::new(51820);
            let cfg = lab.write_config("c.json", &proxy_target(), &rules(&lab));
            lab.start_daemon(&cfg);
            assert_eq!(priorities("", "51820").0, Some(100), "the default priority");

            // A stream runs while the tunnel comes up: nothing may leak.
            let stream = lab.spawn_in(
                "proxy",
                &format!(
                    "python3 '{}/tests/helpers/stream.py' {INET4} {PEER_PORT} 3 200 20",
                    env!("CARGO_MANIFEST_DIR")
                ),
                Stdio::piped(),
            );
            let flowing = lab.eventually(FAST, || {
                sh_any("nft list counter inet cgtproxy proxy").contains("packets")
                    && !sh_any("nft list counter inet cgtproxy proxy").contains("packets 0 ")
            });
            assert!(flowing, "the stream never started");
            for fam in ["-4", "-6"] {
                // wg-quick's own commands (add_default in wg-quick/linux.bash).
                sh_any(&format!(
                    "ip {fam} rule add not fwmark 51820 table 51820 &&
                     ip {fam} rule add table main suppress_prefixlength 0"
                ));
            }
            let out = stream.wait_with_output().unwrap();
            let counts = String::from_utf8_lossy(&out.stdout);
            assert!(counts.contains("\"udp_proxy\""), "stream: {counts}");
            assert!(!counts.contains("peer"), "stream: {counts}");

            for fam in ["-4", "-6"] {
                let moved = lab.eventually(FAST, || {
                    let (ours, theirs) = priorities(fam, "51820");
                    ours.zip(theirs).is_some_and(|(o, t)| o < t)
                });
                assert!(
                    moved,
                    "our rules not ahead:\n{}",
                    sh_any("ip rule; ip -6 rule")
                );
            }
            all_proxied(&lab, &tunnel, "after wg-quick's rules");

            // wg-quick's nftables table too. Its anti-spoofing rule drops what
            // reaches the tunnel's own address from another interface with a
            // foreign source: exactly the proxy's answers (from the original
            // destination) to an app whose connection took the tunnel's address
            // as its source, chosen before our mark re-routed it. Proxied
            // traffic then fails, closed.
            load_wg_quick_nft("vpn0", "10.98.0.1", "fd98::1");
            for (proto, dst) in [("tcp", INET4), ("udp", INET6)] {
                let a = lab.talk("proxy", proto, dst, PEER_PORT);
                assert!(
                    a.starts_with("ERR"),
                    "{proto} {dst} through wg-quick's filter: {a}"
                );
            }
            assert_eq!(
                tunnel.arrived(),
                0,
                "failed closed, nothing into the tunnel"
            );
            // The README's remedy: let wg-quick's filter pass what arrives on lo.
            for fam in ["ip", "ip6"] {
                let out = sh_any(&format!(
                    "nft insert rule {fam} wg-quick-vpn0 preraw iifname lo accept && echo ok"
                ));
                assert!(out.contains("ok"), "{out}");
            }
            all_proxied(&lab, &tunnel, "with wg-quick's filter and the remedy");
            // The tunnel does take what is not ours: the test can see a leak.
            assert!(
                lab.talk("direct", "udp", INET4, PEER_PORT)
                    .starts_with("ERR")
            );
            assert!(tunnel.arrived() > 0, "direct traffic must enter the tunnel");
            let d = lab.daemon.as_ref().unwrap();
            let said = lab.eventually(FAST, || {
                d.log().contains("not from all fwmark 0xca6c lookup 51820")
            });
            let log = d.log();
            assert!(said, "{log}");
            assert!(
                !log.contains("restored"),
                "a move is no damage to repair: {log}"
            );

            // A restart with the tunnel up places the rules ahead at once. A
            // clean stop takes the rules away: until the start, what the
            // kernel sends for earlier connections is unclassified (measured:
            // the reset answering a SYN-ACK the listener retransmits for the
            // connection wg-quick's filter broke above). Counted from the start.
            assert_eq!(lab.take_daemon().stop(), 0);
            lab.start_daemon(&cfg);
            let before = tunnel.arrived();
            let (ours, theirs) = priorities("", "51820");
            assert!(ours.unwrap() < theirs.unwrap(), "{}", sh_any("ip rule"));
            for (proto, dst) in [("tcp", INET4), ("udp", INET6)] {
                let a = lab.talk("proxy", proto, dst, PEER_PORT);
                assert!(proxied(&a, dst), "after a restart: {proto} {dst}: {a}");
            }
            assert_eq!(tunnel.arrived(), before, "after a restart");

            // wg-quick down: our rules go back to the configured priority.
            for fam in ["-4", "-6"] {
                sh_any(&format!(
                    "ip {fam} rule del table 51820; ip {fam} rule del table main suppress_prefixlength 0"
                ));
            }
            let back = lab.eventually(FAST, || priorities("", "51820").0 == Some(100));
            assert!(back, "{}", sh_any("ip rule"));
            assert_eq!(lab.take_daemon().stop(), 0);
            assert!(!sh_any("ip rule; ip -6 rule").contains("0xbb8"));
        },
    );
}

/// Tailscale with an exit node: its rules sit at 5210–5270 and table 52 holds
/// a default route. Our default priority precedes them.
#[test]
fn tailscale_exit_node_rules_never_take_proxied_traffic() {
    in_namespaces(
        "tailscale_exit_node_rules_never_take_proxied_traffic",
        || {
            let mut lab = Lab::new("tailscale");
            lab.start_listener("listener", PROXY_PORT, "proxy");
            lab.mkcg("proxy");
            lab.mkcg("direct");
            default_route_to_the_peer(&lab);
            let tunnel = Tunnel::new(52);
            for fam in ["-4", "-6"] {
                // `ip rule` as tailscaled installs it with an exit node.
                sh_any(&format!(
                    "ip {fam} rule add pref 5210 fwmark 0x80000/0xff0000 table main &&
                 ip {fam} rule add pref 5230 fwmark 0x80000/0xff0000 table default &&
                 ip {fam} rule add pref 5250 fwmark 0x80000/0xff0000 unreachable &&
                 ip {fam} rule add pref 5270 table 52"
                ));
            }
            let cfg = lab.write_config("c.json", &proxy_target(), &rules(&lab));
            lab.start_daemon(&cfg);
            all_proxied(&lab, &tunnel, "with Tailscale's exit-node rules");
            assert!(
                lab.talk("direct", "tcp", INET4, PEER_PORT)
                    .starts_with("ERR")
            );
            assert!(
                tunnel.arrived() > 0,
                "direct traffic must go to the exit node"
            );
            let (out, code) = cgtproxy(&["status", "--config"], &cfg);
            assert_eq!(code, 0, "{out}");
        },
    );
}

/// Runs `cgtproxy ARGS… CONFIG`; returns stdout+stderr and the exit code.
/// A rule nothing can precede (priority 0, after `local`) is reported by
/// `status` and `doctor`, and marked packets are dropped, not delivered.
#[test]
fn a_rule_that_cannot_be_preceded_fails_closed_and_is_reported() {
    in_namespaces(
        "a_rule_that_cannot_be_preceded_fails_closed_and_is_reported",
        || {
            let mut lab = Lab::new("pref0");
            lab.start_listener("listener", PROXY_PORT, "proxy");
            lab.mkcg("proxy");
            let tunnel = Tunnel::new(51820);
            let cfg = lab.write_config("c.json", &proxy_target(), &rules(&lab));
            lab.start_daemon(&cfg);
            sh_any("ip rule add pref 0 not fwmark 51820 table 51820");
            let d = lab.daemon.as_ref().unwrap();
            let blocked = lab.eventually(FAST, || d.log().contains("at priority 0"));
            assert!(blocked, "{}", d.log());
            let a = lab.talk("proxy", "udp", PEER4, PEER_PORT);
            assert!(a.starts_with("ERR"), "{a}");
            assert!(
                lab.talk("proxy", "tcp", PEER4, PEER_PORT)
                    .starts_with("ERR")
            );
            assert_eq!(tunnel.arrived(), 0, "marked packets entered the tunnel");
            let (out, code) = cgtproxy(&["status", "--config"], &cfg);
            assert_eq!(code, 3, "{out}");
            assert!(
                out.contains("0: not from all fwmark 0xca6c lookup 51820"),
                "{out}"
            );
            let (out, code) = cgtproxy(&["doctor", "--config"], &cfg);
            assert_eq!(code, 3, "{out}");
            assert!(out.contains("FAIL ip rule order"), "{out}");
            sh_any("ip rule del pref 0 not fwmark 51820 table 51820");
            let ok = lab.eventually(FAST, || {
                proxied(&lab.talk("proxy", "udp", PEER4, PEER_PORT), PEER4)
            });
            assert!(ok);
        },
    );
}

/// NixOS's nftables.service with `flushRuleset` runs `flush ruleset` plus its
/// tables in one `nft -f` on every reload. The table is flagged owner: the
/// flush leaves it, so not one packet of a running stream goes direct, and a
/// foreign delete is refused.
#[test]
fn flush_ruleset_reloads_never_let_a_packet_through() {
    in_namespaces("flush_ruleset_reloads_never_let_a_packet_through", || {
        let mut lab = Lab::new("flush");
        lab.start_listener("listener", PROXY_PORT, "proxy");
        lab.mkcg("proxy");
        install_counter(lab.peer_pid());
        let cfg = lab.write_config("c.json", &proxy_target(), &rules(&lab));
        lab.start_daemon(&cfg);
        let conf = lab.dir.join("nftables.conf");
        std::fs::write(
            &conf,
            "flush ruleset\ntable inet filter {\n\tchain input {\n\t\ttype filter hook input priority filter; policy accept;\n\t}\n}\n",
        )
        .unwrap();
        let stream = lab.spawn_in(
            "proxy",
            &format!(
                "python3 '{}/tests/helpers/stream.py' {PEER4} {PEER_PORT} 3 500 50",
                env!("CARGO_MANIFEST_DIR")
            ),
            Stdio::piped(),
        );
        for _ in 0..6 {
            std::thread::sleep(Duration::from_millis(300));
            let out = sh_any(&format!("nft -f '{}' && echo reloaded", conf.display()));
            assert!(out.contains("reloaded"), "{out}");
        }
        let out = stream.wait_with_output().unwrap();
        let counts = String::from_utf8_lossy(&out.stdout);
        assert!(counts.contains("\"tcp_proxy\""), "{counts}");
        assert!(
            !counts.contains("peer"),
            "answered by the destination: {counts}"
        );
        assert_eq!(
            counted(lab.peer_pid()),
            0,
            "packets reached the destination"
        );
        let refused = sh_any("nft delete table inet cgtproxy");
        assert!(refused.contains("Operation not permitted"), "{refused}");
        assert!(proxied(&lab.talk("proxy", "tcp", PEER4, PEER_PORT), PEER4));
    });
}

/// The proxy core is the kill switch: while it is down, proxied TCP and UDP
/// fail and nothing goes direct; when it is back, they work again.
#[test]
fn a_dead_proxy_core_fails_closed() {
    in_namespaces("a_dead_proxy_core_fails_closed", || {
        let mut lab = Lab::new("coredown");
        lab.mkcg("proxy");
        install_counter(lab.peer_pid());
        let cfg = lab.write_config("c.json", &proxy_target(), &rules(&lab));
        lab.start_daemon(&cfg);
        for (proto, dst) in [
            ("tcp", PEER4),
            ("udp", PEER4),
            ("tcp", PEER6),
            ("udp", PEER6),
        ] {
            let a = lab.talk("proxy", proto, dst, PEER_PORT);
            assert!(a.starts_with("ERR"), "no listener: {proto} {dst}: {a}");
        }
        assert_eq!(counted(lab.peer_pid()), 0, "went direct with the core down");
        lab.start_listener("listener", PROXY_PORT, "proxy");
        assert!(proxied(&lab.talk("proxy", "udp", PEER6, PEER_PORT), PEER6));
        assert!(proxied(&lab.talk("proxy", "tcp", PEER4, PEER_PORT), PEER4));
    });
}

/// NixOS's firewall with `checkReversePath` (its `rpfilter` chain, policy
/// drop) drops the looped packets unless `rpfilter-allow` accepts our marks, as
/// the NixOS module makes it do; `doctor` says which.
#[test]
fn a_strict_reverse_path_filter_is_found_and_the_exemption_works() {
    in_namespaces(
        "a_strict_reverse_path_filter_is_found_and_the_exemption_works",
        || {
            let mut lab = Lab::new("rpfilter");
            lab.start_listener("listener", PROXY_PORT, "proxy");
            lab.mkcg("proxy");
            install_counter(lab.peer_pid());
            let cfg = lab.write_config("c.json", &proxy_target(), &rules(&lab));
            lab.start_daemon(&cfg);
            // The chain NixOS's nftables firewall writes for checkReversePath = true.
            let firewall = |allow: &str| {
                format!(
                    "table inet nixos-fw {{
                       chain rpfilter-allow {{
                         {allow}
                       }}
                       chain rpfilter {{
                         type filter hook prerouting priority mangle + 10; policy drop;
                         meta nfproto ipv4 udp sport . udp dport {{ 67 . 68, 68 . 67 }} accept comment \"DHCPv4 client/server\"
                         fib saddr . mark . iif oif exists accept
                         jump rpfilter-allow
                       }}
                     }}"
                )
            };
            let load = |text: String| {
                let f = lab.dir.join("fw.nft");
                // `add` then `delete`: nft 1.0.6 has no `destroy`.
                let replace = "add table inet nixos-fw\ndelete table inet nixos-fw";
                std::fs::write(&f, format!("{replace}\n{text}\n")).unwrap();
                let out = sh_any(&format!("nft -f '{}' && echo loaded", f.display()));
                assert!(out.contains("loaded"), "{out}");
            };
            load(firewall(""));
            let a = lab.talk("proxy", "tcp", PEER4, PEER_PORT);
            assert!(a.starts_with("ERR"), "the strict filter drops them: {a}");
            let (out, code) = cgtproxy(&["doctor", "--config"], &cfg);
            assert_eq!(code, 3, "{out}");
            assert!(
                out.contains("FAIL firewall rpfilter") && out.contains("nixos-fw rpfilter"),
                "{out}"
            );
            load(firewall(&format!("meta mark {{ {MARK} }} accept")));
            for (proto, dst) in [("tcp", PEER4), ("udp", PEER6)] {
                let a = lab.talk("proxy", proto, dst, PEER_PORT);
                assert!(proxied(&a, dst), "with the exemption: {proto} {dst}: {a}");
            }
            let (out, _) = cgtproxy(&["doctor", "--config"], &cfg);
            assert!(out.contains("ok   firewall rpfilter"), "{out}");
            assert_eq!(counted(lab.peer_pid()), 0);
        },
    );
}

/// The inotify watch limit (simulated below one cgroup: the real one is
/// host-wide) never takes the rules down: the tree is still classified, the
/// daemon says it is degraded, and recovers once there is room again.
#[test]
fn the_watch_limit_degrades_without_removing_anything() {
    in_namespaces("the_watch_limit_degrades_without_removing_anything", || {
        let mut lab = Lab::new("watchlimit");
        lab.start_listener("listener", PROXY_PORT, "proxy");
        lab.mkcg("proxy/full");
        let cfg = lab.write_config("c.json", &proxy_target(), &rules(&lab));
        lab.daemon_env = vec![
            (
                "CGTPROXY_TEST_WATCHES_FULL_BELOW".into(),
                format!("{}/proxy/full", lab.base),
            ),
            ("RUNTIME_DIRECTORY".into(), lab.dir.display().to_string()),
        ];
        lab.start_daemon(&cfg);
        for i in 0..5 {
            lab.mkcg(&format!("proxy/full/app{i}.scope"));
        }
        let d = lab.daemon.as_ref().unwrap();
        d.wait_notify("degraded:", FAST);
        let said = lab.eventually(FAST, || d.log().contains("max_user_watches"));
        assert!(said, "{}", d.log());
        // Nothing was removed, and cgroups below the unwatched ones are covered
        // by their routed ancestor.
        lab.mkcg("proxy/full/app4.scope/deeper");
        let a = lab.talk("proxy/full/app4.scope/deeper", "tcp", PEER4, PEER_PORT);
        assert!(proxied(&a, PEER4), "{a}");
        let status = Command::new(env!("CARGO_BIN_EXE_cgtproxy"))
            .args(["status", "--config"])
            .arg(&cfg)
            .env("RUNTIME_DIRECTORY", &lab.dir)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&status.stdout);
        assert_eq!(status.status.code(), Some(3), "{text}");
        assert!(text.contains("DEGRADED"), "{text}");
        std::fs::remove_dir(lab.cg_dir("proxy/full/app4.scope/deeper")).unwrap();
        for i in 0..5 {
            std::fs::remove_dir(lab.cg_dir(&format!("proxy/full/app{i}.scope"))).unwrap();
        }
        let back = lab.eventually(Duration::from_secs(40), || {
            d.log().contains("no longer degraded")
        });
        assert!(back, "{}", d.log());
        assert!(!lab.dir.join("degraded").exists());
    });
}

/// A reload to a cgroup root that cannot be used changes nothing: the old
/// table, rules and watcher stay in charge.
#[test]
fn a_failing_reload_changes_nothing() {
    in_namespaces("a_failing_reload_changes_nothing", || {
        let mut lab = Lab::new("badreload");
        lab.start_listener("listener", PROXY_PORT, "proxy");
        let cfg = lab.write_config("c.json", &proxy_target(), &rules(&lab));
        lab.start_daemon(&cfg);
        let before = sh_any("nft list table inet cgtproxy; ip rule");
        let text = std::fs::read_to_string(&cfg).unwrap().replace(
            &format!("\"cgroup-root\":\"{}\"", lab.mount.display()),
            "\"cgroup-root\":\"/proc\"",
        );
        std::fs::write(&cfg, text).unwrap();
        let d = lab.daemon.as_ref().unwrap();
        d.signal(nix::sys::signal::Signal::SIGHUP);
        d.wait_notify("READY=1", FAST);
        // The log arrives through a pipe: wait for it, as for the kernel.
        let said = lab.eventually(FAST, || d.log().contains("reload failed"));
        assert!(said, "{}", d.log());
        assert_eq!(sh_any("nft list table inet cgtproxy; ip rule"), before);
        // The old watcher still works: a new cgroup is routed.
        lab.mkcg("proxy/late.scope");
        let ok = lab.eventually(FAST, || {
            proxied(
                &lab.talk("proxy/late.scope", "tcp", PEER4, PEER_PORT),
                PEER4,
            )
        });
        assert!(ok);
    });
}
