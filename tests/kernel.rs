//! Kernel tests: real packets from processes in cgroups, through the daemon's table
//! and routes, checked where they arrive. Root only; they fail (not skip) without it.

mod support;

use std::time::Duration;

use nix::sys::signal::Signal;
use support::*;

/// The usual rules: listener direct, `direct`, `drop` and `proxy` subtrees.
fn rules(lab: &Lab) -> String {
    format!(
        r#"[{{"match":"{}","direct":true}},{{"match":"{}","direct":true}},
            {{"match":"{}","drop":true}},{{"match":"{}","tproxy":"proxy"}}]"#,
        lab.re("listener"),
        lab.re("direct"),
        lab.re("drop"),
        lab.re("proxy")
    )
    .replace('\\', "\\\\")
}

/// Stops the daemon, which must exit 0 and leave no table, ip rule with `mark`
/// (hex, as `ip rule` prints it) or route behind.
fn stop_clean(lab: &mut Lab, mark: &str) {
    assert_eq!(lab.take_daemon().stop(), 0);
    let state = kernel_state();
    assert!(
        !state.contains("cgtproxy") && !state.contains(mark) && !state.contains("table 300"),
        "left behind:\n{state}"
    );
}

fn reached_peer(answer: &str) -> bool {
    answer.starts_with("peer ")
}

fn failed(answer: &str) -> bool {
    answer.starts_with("ERR")
}

const FAST: Duration = Duration::from_secs(3);

#[test]
fn routes_tcp_and_udp_over_ipv4_and_ipv6_by_cgroup() {
    in_namespaces("routes_tcp_and_udp_over_ipv4_and_ipv6_by_cgroup", || {
        let mut lab = Lab::new("routing");
        lab.start_listener("listener", PROXY_PORT, "proxy");
        // A server at a bypass destination (127.0.0.0/8, ::1).
        lab.start_local_server(5301, "local", &["127.0.0.1", "::1"]);
        // Cgroups that exist before the daemon starts.
        lab.mkcg("proxy/app.scope");
        lab.mkcg("direct");
        lab.mkcg("drop");
        lab.mkcg("unclassified");
        let cfg = lab.write_config("c.json", &proxy_target(), &rules(&lab));
        lab.start_daemon(&cfg);
        for proto in ["tcp", "udp"] {
            for dst in [PEER4, PEER6] {
                let a = lab.talk("proxy/app.scope", proto, dst, PEER_PORT);
                assert!(proxied(&a, dst), "{proto} {dst} from proxy: {a}");
                if proto == "udp" {
                    assert!(
                        a.ends_with(&format!("from {dst}")),
                        "UDP answer must come from the original destination: {a}"
                    );
                }
                let a = lab.talk("direct", proto, dst, PEER_PORT);
                assert!(reached_peer(&a), "{proto} {dst} from direct: {a}");
                let a = lab.talk("unclassified", proto, dst, PEER_PORT);
                assert!(reached_peer(&a), "{proto} {dst} from unclassified: {a}");
                let a = lab.talk("drop", proto, dst, PEER_PORT);
                assert!(failed(&a), "{proto} {dst} from drop: {a}");
            }
        }
        // Bypass destinations are never proxied: 10.99.0.99 is in the config's
        // bypass list and unreachable, so a proxied connection would succeed.
        let a = lab.talk("proxy/app.scope", "tcp", "10.99.0.99", PEER_PORT);
        assert!(failed(&a), "bypassed destination was proxied: {a}");
        // Nor dropped: a drop cgroup still reaches them, as a proxied one
        // reaches them directly, on this host and beyond.
        for cg in ["drop", "proxy/app.scope"] {
            for proto in ["tcp", "udp"] {
                for dst in ["127.0.0.1", "::1"] {
                    let a = lab.talk(cg, proto, dst, 5301);
                    assert!(a.starts_with("local "), "{proto} {dst} from {cg}: {a}");
                }
                for dst in [BYPASSED4, BYPASSED6] {
                    let a = lab.talk(cg, proto, dst, PEER_PORT);
                    assert!(reached_peer(&a), "{proto} {dst} from {cg}: {a}");
                }
            }
        }

        let code = lab.take_daemon().stop();
        assert_eq!(code, 0);
        let state = kernel_state();
        assert!(!state.contains("cgtproxy"), "table left behind:\n{state}");
        assert!(!state.contains("0xbb8"), "ip rule left behind:\n{state}");
        assert!(!state.contains("table 300"), "route left behind:\n{state}");
        // With everything removed, proxy-cgroup traffic goes direct again.
        let a = lab.talk("proxy/app.scope", "tcp", PEER4, PEER_PORT);
        assert!(reached_peer(&a), "after stop: {a}");
    });
}

#[test]
fn follows_cgroups_created_nested_removed_and_recreated() {
    in_namespaces(
        "follows_cgroups_created_nested_removed_and_recreated",
        || {
            let mut lab = Lab::new("follow");
            lab.start_listener("listener", PROXY_PORT, "proxy");
            let cfg = lab.write_config("c.json", &proxy_target(), &rules(&lab));
            lab.start_daemon(&cfg);
            // Created after start, then nested deeper.
            lab.mkcg("proxy");
            lab.mkcg("proxy/a/b/c");
            lab.mkcg("proxy/a/b/c/drop");
            // A direct cgroup nested inside a proxied one wins for its subtree.
            lab.mkcg("proxy/a/direct/x");
            assert!(lab.eventually(FAST, || proxied(
                &lab.talk("proxy/a/b/c", "tcp", PEER4, PEER_PORT),
                PEER4
            )));
            // `.../drop` matches the proxy rule first (rules are ordered): proxied.
            assert!(proxied(
                &lab.talk("proxy/a/b/c/drop", "tcp", PEER4, PEER_PORT),
                PEER4
            ));
            let a = lab.talk("proxy/a/direct/x", "tcp", PEER4, PEER_PORT);
            assert!(
                proxied(&a, PEER4),
                "rule order: the proxy rule matches first: {a}"
            );
            lab.mkcg("direct/deep/er");
            assert!(lab.eventually(FAST, || reached_peer(&lab.talk(
                "direct/deep/er",
                "udp",
                PEER6,
                PEER_PORT
            ))));
            lab.mkcg("drop");
            assert!(lab.eventually(FAST, || failed(&lab.talk("drop", "tcp", PEER4, PEER_PORT))));
            // Removed and re-created under the same name: a new cgroup id, still routed.
            std::fs::remove_dir(lab.cg_dir("drop")).unwrap();
            let gone = lab.eventually(FAST, || !elements_by_class(&cfg).contains_key("drop"));
            assert!(gone, "the removed cgroup's element stayed");
            lab.mkcg("drop");
            assert!(lab.eventually(FAST, || failed(&lab.talk("drop", "tcp", PEER4, PEER_PORT))));
            let before = elements_by_class(&cfg);
            assert_eq!(
                before.get("drop"),
                Some(&1),
                "stale element kept: {before:?}"
            );
            assert_eq!(lab.take_daemon().stop(), 0);
        },
    );
}

#[test]
fn a_storm_of_a_thousand_cgroups_converges() {
    in_namespaces("a_storm_of_a_thousand_cgroups_converges", || {
        let mut lab = Lab::new("storm");
        lab.start_listener("listener", PROXY_PORT, "proxy");
        let base = regex_escape(&lab.base);
        let rules = format!(
            r#"[{{"match":"{}","direct":true}},{{"match":"^{base}/storm/d[0-9]+$","drop":true}},
                {{"match":"^{base}/storm/p[0-9]+$","tproxy":"proxy"}}]"#,
            lab.re("listener")
        )
        .replace('\\', "\\\\");
        let cfg = lab.write_config("c.json", &proxy_target(), &rules);
        lab.start_daemon(&cfg);
        lab.mkcg("storm");
        let count = || {
            let m = elements_by_class(&cfg);
            let n = |k: &str| m.get(k).copied().unwrap_or(0);
            (n("drop"), n("proxy"))
        };
        for i in 0..500 {
            lab.mkcg(&format!("storm/d{i}"));
            lab.mkcg(&format!("storm/p{i}"));
        }
        assert!(
            lab.eventually(Duration::from_secs(10), || count() == (500, 500)),
            "after creating: {:?}",
            count()
        );
        assert!(failed(&lab.talk("storm/d499", "tcp", PEER4, PEER_PORT)));
        assert!(proxied(
            &lab.talk("storm/p0", "udp", PEER6, PEER_PORT),
            PEER6
        ));
        for i in 0..500 {
            std::fs::remove_dir(lab.cg_dir(&format!("storm/d{i}"))).unwrap();
            std::fs::remove_dir(lab.cg_dir(&format!("storm/p{i}"))).unwrap();
        }
        assert!(
            lab.eventually(Duration::from_secs(10), || count() == (0, 0)),
            "after removing: {:?}",
            count()
        );
        // Re-created names are new cgroups and are routed again.
        lab.mkcg("storm/d7");
        assert!(lab.eventually(FAST, || failed(
            &lab.talk("storm/d7", "tcp", PEER4, PEER_PORT)
        )));
        let d = lab.daemon.as_ref().unwrap();
        assert!(
            !d.log().contains("ERROR"),
            "errors during the storm:\n{}",
            d.log()
        );
        assert_eq!(lab.take_daemon().stop(), 0);
    });
}

#[test]
fn no_udp_and_no_ipv6_go_direct() {
    in_namespaces("no_udp_and_no_ipv6_go_direct", || {
        let mut lab = Lab::new("noudp");
        lab.start_listener("listener", PROXY_PORT, "proxy");
        lab.start_listener("listener2", PROXY_PORT + 1, "proxy2");
        lab.mkcg("proxy");
        lab.mkcg("p2");
        let targets = format!(
            r#"{{"proxy":{{"port":{PROXY_PORT},"mark":{MARK},"no-udp":true}},
                "p2":{{"port":{},"mark":3001,"no-ipv6":true}}}}"#,
            PROXY_PORT + 1
        );
        let rules = format!(
            r#"[{{"match":"{}","direct":true}},{{"match":"{}","direct":true}},
                {{"match":"{}","tproxy":"proxy"}},{{"match":"{}","tproxy":"p2"}}]"#,
            lab.re("listener"),
            lab.re("listener2"),
            lab.re("proxy"),
            lab.re("p2")
        )
        .replace('\\', "\\\\");
        let cfg = lab.write_config("c.json", &targets, &rules);
        lab.start_daemon(&cfg);
        // no-udp: TCP proxied, UDP reaches the peer directly (not black-holed).
        assert!(proxied(&lab.talk("proxy", "tcp", PEER4, PEER_PORT), PEER4));
        assert!(proxied(&lab.talk("proxy", "tcp", PEER6, PEER_PORT), PEER6));
        for dst in [PEER4, PEER6] {
            let a = lab.talk("proxy", "udp", dst, PEER_PORT);
            assert!(reached_peer(&a), "no-udp UDP to {dst}: {a}");
        }
        // no-ipv6: IPv4 proxied, IPv6 direct.
        for proto in ["tcp", "udp"] {
            let a = lab.talk("p2", proto, PEER4, PEER_PORT);
            assert!(a.starts_with(&format!("proxy2 {PEER4}")), "{proto} v4: {a}");
            let a = lab.talk("p2", proto, PEER6, PEER_PORT);
            assert!(reached_peer(&a), "no-ipv6 {proto} v6: {a}");
        }
        assert_eq!(lab.take_daemon().stop(), 0);
    });
}

#[test]
fn dns_hijack_redirects_port_53_over_both_families() {
    in_namespaces("dns_hijack_redirects_port_53_over_both_families", || {
        let mut lab = Lab::new("dns");
        lab.start_listener("listener", PROXY_PORT, "proxy");
        lab.start_local_server(1053, "dns", &["127.0.0.1", "::1"]);
        // A stand-in for systemd-resolved's stub listener.
        lab.start_local_server(53, "stub", &["127.0.0.53"]);
        lab.mkcg("proxy");
        let targets = format!(
            r#"{{"proxy":{{"port":{PROXY_PORT},"mark":{MARK},
                "dns-hijack":{{"ip":"127.0.0.1","ip6":"::1","port":1053,"tcp":true,"stub":true}}}}}}"#
        );
        let cfg = lab.write_config("c.json", &targets, &rules(&lab));
        lab.start_daemon(&cfg);
        for proto in ["udp", "tcp"] {
            for dst in [PEER4, PEER6] {
                let a = lab.talk("proxy", proto, dst, 53);
                assert!(a.starts_with("dns "), "{proto} DNS to {dst}: {a}");
            }
            // Queries to the resolved stub are hijacked too (127.0.0.0/8 is
            // bypassed otherwise), and the answer comes from the address asked.
            let a = lab.talk("proxy", proto, "127.0.0.53", 53);
            assert!(a.starts_with("dns "), "{proto} to the stub: {a}");
            if proto == "udp" {
                assert!(a.ends_with("from 127.0.0.53"), "{a}");
            }
        }
        // Other ports still go to the proxy.
        assert!(proxied(&lab.talk("proxy", "udp", PEER4, PEER_PORT), PEER4));
        // Unclassified cgroups' DNS is not touched: the stub answers itself, and
        // the peer has nothing on 53.
        lab.mkcg("other");
        assert!(
            lab.talk("other", "udp", "127.0.0.53", 53)
                .starts_with("stub ")
        );
        assert!(failed(&lab.talk("other", "udp", PEER4, 53)));
        assert_eq!(lab.take_daemon().stop(), 0);
    });
}

#[test]
fn reload_applies_new_rules_and_keeps_old_ones_on_a_bad_config() {
    in_namespaces(
        "reload_applies_new_rules_and_keeps_old_ones_on_a_bad_config",
        || {
            let mut lab = Lab::new("reload");
            lab.start_listener("listener", PROXY_PORT, "proxy");
            lab.mkcg("a");
            let rules_a = format!(
                r#"[{{"match":"{}","direct":true}},{{"match":"{}","tproxy":"proxy"}}]"#,
                lab.re("listener"),
                lab.re("a")
            )
            .replace('\\', "\\\\");
            let cfg = lab.write_config("c.json", &proxy_target(), &rules_a);
            lab.start_daemon(&cfg);
            assert!(proxied(&lab.talk("a", "tcp", PEER4, PEER_PORT), PEER4));

            // Same targets, different rules: elements change in place.
            let rules_b = format!(
                r#"[{{"match":"{}","direct":true}},{{"match":"{}","drop":true}}]"#,
                lab.re("listener"),
                lab.re("a")
            )
            .replace('\\', "\\\\");
            lab.write_config("c.json", &proxy_target(), &rules_b);
            let d = lab.daemon.as_ref().unwrap();
            d.signal(Signal::SIGHUP);
            let msg = d.wait_notify("RELOADING=1", FAST);
            assert!(msg.contains("MONOTONIC_USEC="), "{msg}");
            d.wait_notify("READY=1", FAST);
            assert!(failed(&lab.talk("a", "tcp", PEER4, PEER_PORT)));

            // New target and mark: the table is replaced, routing follows.
            let targets = format!(r#"{{"other":{{"port":{PROXY_PORT},"mark":4000}}}}"#);
            let rules_c = format!(
                r#"[{{"match":"{}","direct":true}},{{"match":"{}","tproxy":"other"}}]"#,
                lab.re("listener"),
                lab.re("a")
            )
            .replace('\\', "\\\\");
            lab.write_config("c.json", &targets, &rules_c);
            d.signal(Signal::SIGHUP);
            d.wait_notify("READY=1", FAST);
            assert!(proxied(&lab.talk("a", "udp", PEER6, PEER_PORT), PEER6));
            let rules_now = sh_any("ip rule");
            assert!(
                rules_now.contains("0xfa0") && !rules_now.contains("0xbb8"),
                "{rules_now}"
            );

            // An invalid config: logged, old rules stay, daemon keeps running.
            std::fs::write(
                &cfg,
                r#"{"version":1,"rules":[{"match":"x","tproxy":"nope"}]}"#,
            )
            .unwrap();
            d.signal(Signal::SIGHUP);
            d.wait_notify("READY=1", FAST);
            // The log is read by another thread: it may trail READY=1 a little.
            let said = lab.eventually(FAST, || {
                d.log()
                    .contains(r#"rules[0].tproxy: no target named "nope""#)
            });
            assert!(said, "{}", d.log());
            assert!(proxied(&lab.talk("a", "tcp", PEER4, PEER_PORT), PEER4));
            stop_clean(&mut lab, "0xfa0");
        },
    );
}

/// A cgroup that a reload stops classifying is in its level's map as
/// unclassified; a connection it had open keeps its target (its conntrack
/// mark), new ones go direct.
#[test]
fn an_open_connection_keeps_its_target_when_its_cgroup_stops_being_classified() {
    in_namespaces(
        "an_open_connection_keeps_its_target_when_its_cgroup_stops_being_classified",
        || {
            let mut lab = Lab::new("unclassify");
            lab.start_listener("listener", PROXY_PORT, "proxy");
            lab.mkcg("a");
            let listener = lab.re("listener");
            let rules = |a: &str| {
                format!(r#"[{{"match":"{listener}","direct":true}}{a}]"#).replace('\\', "\\\\")
            };
            let proxy_a = format!(r#",{{"match":"{}","tproxy":"proxy"}}"#, lab.re("a"));
            let cfg = lab.write_config("c.json", &proxy_target(), &rules(&proxy_a));
            lab.start_daemon(&cfg);
            // One UDP flow, an exchange before the reload and one after.
            let mut flow = Flow::open(&lab, "a");
            let first = flow.exchange();
            assert!(proxied(&first, PEER4), "before the reload: {first}");

            lab.write_config("c.json", &proxy_target(), &rules(""));
            let d = lab.daemon.as_ref().unwrap();
            d.signal(Signal::SIGHUP);
            d.wait_notify("READY=1", FAST);
            let by_class = elements_by_class(&cfg);
            assert_eq!(
                by_class.get("unclassified (untouched)"),
                Some(&1),
                "a is in its level's map, unclassified: {by_class:?}"
            );
            let second = flow.exchange();
            assert!(proxied(&second, PEER4), "after the reload: {second}");
            flow.close();
            let a = lab.talk("a", "udp", PEER4, PEER_PORT);
            assert!(reached_peer(&a), "a new flow goes direct: {a}");
            stop_clean(&mut lab, "0xbb8");
        },
    );
}

/// One UDP flow (a connected socket) from a cgroup: each
/// [`Flow::exchange`] sends a datagram and returns the answer, or "ERR …"
/// when none came.
struct Flow {
    child: std::process::Child,
    to: std::process::ChildStdin,
    from: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
    /// The socket's local port.
    port: u16,
}

impl Flow {
    fn open(lab: &Lab, rel: &str) -> Flow {
        use std::io::BufRead;
        let script = format!(
            r#"import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
s.connect(("{PEER4}", {PEER_PORT}))
print(s.getsockname()[1], flush=True)
for line in sys.stdin:
    try:
        s.send(line.encode())
        print(s.recv(200).decode().strip(), flush=True)
    except OSError as e:
        print("ERR", e, flush=True)
"#
        );
        let procs = lab.cg_dir(rel).join("cgroup.procs");
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                r#"echo $$ > '{}' && exec python3 -c "$0""#,
                procs.display()
            ))
            .arg(script)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut from = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let port = from.next().unwrap().unwrap().parse().unwrap();
        Flow {
            to: child.stdin.take().unwrap(),
            from,
            child,
            port,
        }
    }

    /// The flow's connection mark (this namespace's conntrack table).
    fn ct_mark(&self) -> Option<u32> {
        let table = std::fs::read_to_string("/proc/net/nf_conntrack").unwrap();
        let sport = format!(" sport={} ", self.port);
        table
            .lines()
            .find(|l| l.contains(" udp ") && l.contains(&sport))?
            .split_whitespace()
            .find_map(|f| f.strip_prefix("mark="))?
            .parse()
            .ok()
    }

    /// Whether the flow's later packets skip the classification: its
    /// connection carries one of our tags (see `table::output_chain`).
    fn tagged(&self) -> bool {
        use cgtproxy::config::{CONN_TAG_BASE, CONN_TAG_MASK};
        self.ct_mark()
            .is_some_and(|m| m & CONN_TAG_MASK == CONN_TAG_BASE)
    }

    fn exchange(&mut self) -> String {
        use std::io::Write;
        writeln!(self.to, "hello").unwrap();
        self.from.next().unwrap().unwrap()
    }

    fn close(mut self) {
        drop(self.to);
        assert!(self.child.wait().unwrap().success());
    }
}

/// A connection is classified until a packet of it leaves unmarked; its
/// later packets skip the classification until the table changes. Every
/// change reaches open connections at their next packet all the same: a
/// reload that drops, frees or proxies the cgroup, and the element of a
/// cgroup that the daemon had not seen yet when its flow started, at a
/// level the table looks up already (its flow was never let skip) and at
/// one it starts looking up (a new generation).
#[test]
fn a_change_reaches_open_connections_at_their_next_packet() {
    in_namespaces(
        "a_change_reaches_open_connections_at_their_next_packet",
        || {
            let mut lab = Lab::new("nextpacket");
            lab.start_listener("listener", PROXY_PORT, "proxy");
            for rel in ["a", "b", "b/deep", "c", "c/held"] {
                lab.mkcg(rel);
            }
            // c/held decides at the level of b/late: that level is looked
            // up from the start; b/deep/late's is not, until it comes.
            let head = format!(
                r#"{{"match":"{}","direct":true}},{{"match":"{}","direct":true}},{{"match":"{}","drop":true}},{{"match":"{}","drop":true}}"#,
                lab.re("listener"),
                lab.re("c/held"),
                lab.re("b/late"),
                lab.re("b/deep/late"),
            );
            let rules = |a: &str| format!("[{head}{a}]").replace('\\', "\\\\");
            let re_a = lab.re("a");
            let with_a = |verdict: &str| rules(&format!(r#",{{"match":"{re_a}",{verdict}}}"#));
            let cfg = lab.write_config("c.json", &proxy_target(), &rules(""));
            lab.start_daemon(&cfg);
            let reload = |lab: &Lab, rules: &str| {
                lab.write_config("c.json", &proxy_target(), rules);
                let d = lab.daemon.as_ref().unwrap();
                d.signal(Signal::SIGHUP);
                d.wait_notify("READY=1", FAST);
            };

            let mut flow = Flow::open(&lab, "a");
            for n in 1..=2 {
                let got = flow.exchange();
                assert!(reached_peer(&got), "unclassified, datagram {n}: {got}");
                assert!(
                    flow.tagged(),
                    "unclassified, datagram {n}: {:?}",
                    flow.ct_mark()
                );
            }
            reload(&lab, &with_a(r#""drop":true"#));
            for n in 1..=2 {
                let got = flow.exchange();
                assert!(failed(&got), "dropped, datagram {n}: {got}");
            }
            reload(&lab, &rules(""));
            let got = flow.exchange();
            assert!(reached_peer(&got), "unclassified again: {got}");
            reload(&lab, &with_a(r#""tproxy":"proxy""#));
            let got = flow.exchange();
            assert!(proxied(&got, PEER4), "proxied: {got}");
            flow.close();

            // The daemon stopped, a new cgroup's first datagram goes as its
            // parent decides (unclassified); once the daemon has put the
            // cgroup's element in, the same flow is dropped.
            reload(&lab, &rules(""));
            let d = lab.daemon.as_ref().unwrap();
            for (n, rel, skips) in [(1, "b/late", false), (2, "b/deep/late", true)] {
                d.signal(Signal::SIGSTOP);
                lab.mkcg(rel);
                let mut late = Flow::open(&lab, rel);
                let got = late.exchange();
                d.signal(Signal::SIGCONT);
                assert!(reached_peer(&got), "before the daemon saw {rel}: {got}");
                assert_eq!(
                    late.tagged(),
                    skips,
                    "{rel} before its element: {:?}",
                    late.ct_mark()
                );
                let seen = lab.eventually(FAST, || {
                    elements_by_class(&cfg).get("drop").is_some_and(|&k| k >= n)
                });
                assert!(seen, "{:?}", elements_by_class(&cfg));
                let got = late.exchange();
                assert!(failed(&got), "{rel}'s open flow after its element: {got}");
                late.close();
            }

            // b/deep/late gone, no cgroup decides at its level: the table
            // stops looking there, where every socket would miss, and the
            // connections of a cgroup at that level keep their decision.
            std::fs::remove_dir(lab.cg_dir("b/deep/late")).unwrap();
            let gone = lab.eventually(FAST, || {
                elements_by_class(&cfg).get("drop").is_some_and(|&k| k == 1)
            });
            assert!(gone, "{:?}", elements_by_class(&cfg));
            lab.mkcg("b/deep/other");
            let mut flow = Flow::open(&lab, "b/deep/other");
            let got = flow.exchange();
            assert!(reached_peer(&got), "b/deep/other: {got}");
            assert!(flow.tagged(), "b/deep/other: {:?}", flow.ct_mark());
            flow.close();
            stop_clean(&mut lab, "0xbb8");
        },
    );
}

#[test]
fn a_killed_instance_never_blocks_the_next_start() {
    in_namespaces("a_killed_instance_never_blocks_the_next_start", || {
        let mut lab = Lab::new("sigkill");
        lab.start_listener("listener", PROXY_PORT, "proxy");
        lab.mkcg("proxy");
        lab.mkcg("drop");
        let cfg = lab.write_config("c.json", &proxy_target(), &rules(&lab));
        lab.start_daemon(&cfg);
        lab.take_daemon().kill();
        // The table (flagged persist) and the rules outlive the crash and still
        // decide: proxied stays proxied, dropped stays dropped, nothing opens.
        assert!(sh_any("nft list tables").contains("cgtproxy"));
        assert!(proxied(&lab.talk("proxy", "tcp", PEER4, PEER_PORT), PEER4));
        assert!(proxied(&lab.talk("proxy", "udp", PEER6, PEER_PORT), PEER6));
        assert!(failed(&lab.talk("drop", "tcp", PEER4, PEER_PORT)));
        // The orphan belongs to nobody now: an admin could delete it by hand.
        assert!(!sh_any("nft list table inet cgtproxy").contains("flags owner"));
        lab.start_daemon(&cfg);
        assert!(
            sh_any("nft list table inet cgtproxy").contains("flags owner"),
            "the new instance adopted the table"
        );
        assert!(proxied(&lab.talk("proxy", "tcp", PEER4, PEER_PORT), PEER4));
        assert!(failed(&lab.talk("drop", "tcp", PEER4, PEER_PORT)));
        let rules = sh_any("ip rule");
        assert_eq!(
            rules.matches("0xbb8").count(),
            1,
            "duplicate ip rule:\n{rules}"
        );
        stop_clean(&mut lab, "0xbb8");
    });
}

/// Real software as the TPROXY listener: v2ray (Debian's package) with a
/// dokodemo-door inbound in a direct cgroup, as users run it. Its own outgoing
/// connections must not be captured again, or nothing would ever arrive.
#[test]
fn v2ray_as_the_tproxy_listener() {
    in_namespaces("v2ray_as_the_tproxy_listener", || {
        let mut lab = Lab::new("v2ray");
        let access = lab.dir.join("access.log");
        let conf = lab.dir.join("v2ray.json");
        std::fs::write(
            &conf,
            format!(
                r#"{{"log":{{"loglevel":"warning","access":"{}"}},
                "inbounds":[{{"listen":"0.0.0.0","port":{PROXY_PORT},"protocol":"dokodemo-door",
                  "settings":{{"network":"tcp,udp","followRedirect":true}},
                  "streamSettings":{{"sockopt":{{"tproxy":"tproxy"}}}}}}],
                "outbounds":[{{"protocol":"freedom","settings":{{}}}}]}}"#,
                access.display()
            ),
        )
        .unwrap();
        lab.start_service_in(
            "listener",
            &format!("v2ray -config '{}'", conf.display()),
            PROXY_PORT,
        );
        lab.mkcg("proxy/app.scope");
        let cfg = lab.write_config("c.json", &proxy_target(), &rules(&lab));
        lab.start_daemon(&cfg);
        // The peer sees v2ray's connection, made from this host's address.
        for proto in ["tcp", "udp"] {
            let a = lab.talk("proxy/app.scope", proto, PEER4, PEER_PORT);
            assert!(
                a.starts_with("peer 10.99.0.1"),
                "{proto} through v2ray: {a}"
            );
        }
        let log = std::fs::read_to_string(&access).unwrap_or_default();
        assert!(
            log.contains(&format!("accepted tcp:{PEER4}:{PEER_PORT}")),
            "v2ray log:\n{log}"
        );
        assert!(
            log.contains(&format!("accepted udp:{PEER4}:{PEER_PORT}")),
            "v2ray log:\n{log}"
        );
        // Traffic of other cgroups does not pass through v2ray.
        lab.mkcg("direct");
        let before = std::fs::read_to_string(&access)
            .unwrap_or_default()
            .lines()
            .count();
        assert!(reached_peer(&lab.talk("direct", "tcp", PEER4, PEER_PORT)));
        let after = std::fs::read_to_string(&access)
            .unwrap_or_default()
            .lines()
            .count();
        assert_eq!(before, after, "direct traffic went through v2ray");
        assert_eq!(lab.take_daemon().stop(), 0);
    });
}

/// A foreign `nft flush ruleset`, table deletion or `ip rule del` while traffic
/// is classified: the daemon notices and restores everything.
#[test]
fn repairs_what_others_remove() {
    in_namespaces("repairs_what_others_remove", || {
        let mut lab = Lab::new("heal");
        // As on kernels without table flags (before 5.12), where anyone may
        // flush or delete the table; tests/coexistence.rs covers the flags.
        lab.daemon_env = vec![("CGTPROXY_TEST_NO_TABLE_FLAGS".into(), "1".into())];
        lab.start_listener("listener", PROXY_PORT, "proxy");
        lab.mkcg("proxy");
        let cfg = lab.write_config("c.json", &proxy_target(), &rules(&lab));
        lab.start_daemon(&cfg);
        let damage = [
            ("nft flush ruleset", "nft list table inet cgtproxy"),
            (
                "nft delete table inet cgtproxy",
                "nft list table inet cgtproxy",
            ),
            (
                "nft flush chain inet cgtproxy output",
                "nft list chain inet cgtproxy output | grep -q classify",
            ),
            (
                "ip rule del fwmark 3000 lookup 300",
                "ip rule | grep -q 0xbb8",
            ),
            (
                "ip -6 route del local default dev lo table 300",
                "ip -6 route show table 300 | grep -q local",
            ),
        ];
        for (cmd, restored) in damage {
            assert!(proxied(&lab.talk("proxy", "tcp", PEER4, PEER_PORT), PEER4));
            let t0 = std::time::Instant::now();
            assert!(
                std::process::Command::new("sh")
                    .args(["-c", cmd])
                    .status()
                    .unwrap()
                    .success(),
                "{cmd}"
            );
            let back = lab.eventually(FAST, || {
                // nft resolves map keys to cgroup paths by walking /sys/fs/cgroup,
                // slow on a host with many cgroups: hide that tree.
                let check = format!(
                    "mount -t tmpfs none /sys/fs/cgroup && {{ {restored}; }} >/dev/null 2>&1"
                );
                std::process::Command::new("unshare")
                    .args(["-m", "sh", "-c", &check])
                    .status()
                    .is_ok_and(|s| s.success())
            });
            assert!(back, "not restored after `{cmd}`:\n{}", kernel_state());
            eprintln!("restored {:?} after `{cmd}`", t0.elapsed());
            assert!(
                proxied(&lab.talk("proxy", "tcp", PEER4, PEER_PORT), PEER4),
                "after `{cmd}`"
            );
            assert!(
                proxied(&lab.talk("proxy", "udp", PEER6, PEER_PORT), PEER6),
                "after `{cmd}`"
            );
        }
        let d = lab.daemon.as_ref().unwrap();
        let said = lab.eventually(FAST, || d.log().contains("(changed by nft["));
        assert!(said, "the culprit is named:\n{}", d.log());
        stop_clean(&mut lab, "0xbb8");
    });
}

/// `status`, `explain` and `doctor` read the kernel, and say when it differs.
#[test]
fn status_and_explain_read_the_kernel() {
    in_namespaces("status_and_explain_read_the_kernel", || {
        let mut lab = Lab::new("status");
        lab.start_listener("listener", PROXY_PORT, "proxy");
        lab.mkcg("proxy/x");
        lab.mkcg("drop");
        lab.mkcg("plain");
        let cfg = lab.write_config("c.json", &proxy_target(), &rules(&lab));
        lab.start_daemon(&cfg);
        let cli_with = |cfg: &std::path::Path, args: &[&str]| {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_cgtproxy"))
                .args(args)
                .arg("--config")
                .arg(cfg)
                .output()
                .unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
            )
        };
        let cli = |args: &[&str]| cli_with(&cfg, args);
        // Two proxied exchanges, counted by the target's named counter.
        for proto in ["tcp", "udp"] {
            let a = lab.talk("proxy/x", proto, PEER4, PEER_PORT);
            assert!(proxied(&a, PEER4), "{proto}: {a}");
        }
        let (code, out) = cli(&["status"]);
        assert_eq!(code, Some(0), "{out}");
        assert!(
            out.contains("drift: none") && out.contains("lookup 300: present"),
            "{out}"
        );
        let (code, out) = cli(&["status", "--json"]);
        assert_eq!(code, Some(0));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["ok"], true);
        let packets = v["targets"][0]["packets"].as_u64().unwrap_or(0);
        assert!(packets >= 2, "{out}");
        let listed = nft("list counter inet cgtproxy proxy");
        assert!(
            listed.contains(&format!("packets {packets} ")),
            "status and nft disagree:\n{out}\n{listed}"
        );

        let path = format!("{}/proxy/x", lab.base);
        let (code, out) = cli(&["explain", &path]);
        assert_eq!(code, Some(0), "{out}");
        assert!(
            out.contains("decision: tproxy proxy") && out.contains("agrees"),
            "{out}"
        );
        // An unclassified cgroup at a level the table looks up has an element
        // of its own (the walk stops there), which leaves its traffic alone.
        let plain = format!("{}/plain", lab.base);
        let (code, out) = cli(&["explain", &plain]);
        assert_eq!(code, Some(0), "{out}");
        assert!(
            out.contains(&format!(
                "for {plain} → class unclassified (untouched): agrees"
            )),
            "{out}"
        );
        let a = lab.talk("plain", "tcp", PEER4, PEER_PORT);
        assert!(reached_peer(&a), "from plain: {a}");
        let mut sleeper = lab.spawn_in("drop", "sleep 30", std::process::Stdio::null());
        let drop_cg = format!("{}/drop", lab.base);
        let moved = lab.eventually(FAST, || {
            std::fs::read_to_string(format!("/proc/{}/cgroup", sleeper.id()))
                .is_ok_and(|c| c.lines().any(|l| l.ends_with(&drop_cg)))
        });
        assert!(moved, "the process never reached its cgroup");
        let (code, out) = cli(&["explain", &sleeper.id().to_string()]);
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        assert_eq!(code, Some(0), "{out}");
        assert!(out.contains("decision: drop"), "{out}");

        // With the daemon paused, a removed ip rule shows as drift (exit 3).
        let d = lab.daemon.as_ref().unwrap();
        d.signal(Signal::SIGSTOP);
        sh_any("ip rule del fwmark 3000 lookup 300");
        let (code, out) = cli(&["status"]);
        d.signal(Signal::SIGCONT);
        assert_eq!(code, Some(3), "{out}");
        assert!(
            out.contains("ip rule fwmark 0xbb8 lookup 300: MISSING"),
            "{out}"
        );
        // Each status walks the whole (shared, possibly large) cgroup tree.
        let mut last = String::new();
        let healed = lab.eventually(Duration::from_secs(30), || {
            let (code, out) = cli(&["status"]);
            last = out;
            code == Some(0)
        });
        assert!(healed, "not repaired after SIGCONT:\n{last}\n{}", d.log());

        // doctor: the kernel probe leaves nothing behind; the listener is seen.
        let (code, out) = cli(&["doctor"]);
        assert_eq!(code, Some(0), "{out}");
        assert!(
            out.contains("ok   nftables") && out.contains("transparent TCP and UDP listeners"),
            "{out}"
        );
        assert!(!sh_any("nft list tables").contains("cgtproxy-doctor"));
        assert!(
            out.contains("ok   exposure: target proxy: port 7893 is bound to loopback only"),
            "{out}"
        );
        // A listener without IP_TRANSPARENT gets nothing from tproxy: doctor fails.
        lab.start_service_in("plain", "python3 -m http.server 7894 --bind 0.0.0.0", 7894);
        let two = lab.write_config(
            "two.json",
            &format!(
                r#"{{"proxy":{{"port":{PROXY_PORT},"mark":{MARK}}},"plain":{{"port":7894,"mark":3001,"no-udp":true}}}}"#
            ),
            &rules(&lab),
        );
        let (code, out) = cli_with(&two, &["doctor"]);
        assert_eq!(code, Some(3), "{out}");
        assert!(
            out.contains(
                "FAIL listener: target plain: the TCP listener on port 7894 is not transparent"
            ),
            "{out}"
        );
        // Bound to a wildcard address, the network reaches it: doctor warns.
        assert!(
            out.contains("warn exposure: target plain: port 7894 is reachable from the network (TCP on 0.0.0.0)"),
            "{out}"
        );
        assert_eq!(lab.take_daemon().stop(), 0);
    });
}

/// Lost inotify events (queue overflow, forced here through the test-only knob
/// because the real queue size is a host-wide sysctl) end in a rescan that
/// converges on the truth.
#[test]
fn an_event_queue_overflow_rescans_and_converges() {
    in_namespaces("an_event_queue_overflow_rescans_and_converges", || {
        let mut lab = Lab::new("overflow");
        lab.start_listener("listener", PROXY_PORT, "proxy");
        let base = regex_escape(&lab.base);
        let rules = format!(
            r#"[{{"match":"{}","direct":true}},{{"match":"^{base}/burst/d[0-9]+$","drop":true}}]"#,
            lab.re("listener")
        )
        .replace('\\', "\\\\");
        let cfg = lab.write_config("c.json", &proxy_target(), &rules);
        lab.daemon_env
            .push(("CGTPROXY_TEST_INOTIFY_QUEUE".into(), "20".into()));
        lab.start_daemon(&cfg);
        lab.mkcg("burst");
        for i in 0..300 {
            lab.mkcg(&format!("burst/d{i}"));
        }
        let count = || elements_by_class(&cfg).get("drop").copied().unwrap_or(0);
        assert!(
            lab.eventually(Duration::from_secs(10), || count() == 300),
            "{}",
            count()
        );
        for i in 0..150 {
            std::fs::remove_dir(lab.cg_dir(&format!("burst/d{i}"))).unwrap();
        }
        assert!(
            lab.eventually(Duration::from_secs(10), || count() == 150),
            "{}",
            count()
        );
        let d = lab.daemon.as_ref().unwrap();
        assert!(
            lab.eventually(FAST, || d.log().contains("rescanned")),
            "{}",
            d.log()
        );
        assert!(failed(&lab.talk("burst/d299", "tcp", PEER4, PEER_PORT)));
        assert_eq!(lab.take_daemon().stop(), 0);
    });
}

/// SIGKILL in the middle of a 50,000-cgroup startup, then a normal start: the
/// first start's transaction is all or nothing, the second installs everything.
#[test]
fn sigkill_during_a_large_startup_then_restart() {
    in_namespaces("sigkill_during_a_large_startup_then_restart", || {
        let mut lab = Lab::new("bigkill");
        lab.start_listener("listener", PROXY_PORT, "proxy");
        let base = regex_escape(&lab.base);
        let rules = format!(
            r#"[{{"match":"{}","direct":true}},{{"match":"^{base}/many/c[0-9]+$","drop":true}},
                {{"match":"{}","tproxy":"proxy"}}]"#,
            lab.re("listener"),
            lab.re("proxy")
        )
        .replace('\\', "\\\\");
        let cfg = lab.write_config("c.json", &proxy_target(), &rules);
        lab.mkcg("proxy");
        lab.mkcg("many");
        for i in 0..50_000 {
            std::fs::create_dir(lab.cg_dir(&format!("many/c{i}"))).unwrap();
        }
        let first = lab.spawn_daemon(&cfg);
        // Killed while it walks the 50,000 cgroups or commits their table.
        let walking = lab.eventually(FAST, || first.log().contains("watching cgroup2"));
        assert!(walking, "{}", first.log());
        first.kill();
        // All or nothing: no table, or the whole of it.
        let left = elements_by_class(&cfg).get("drop").copied().unwrap_or(0);
        assert!(
            left == 0 || left == 50_000,
            "a partial table was left: {left} elements"
        );
        let t0 = std::time::Instant::now();
        lab.start_daemon(&cfg);
        eprintln!("ready {:?} after a start with 50,000 cgroups", t0.elapsed());
        let count = elements_by_class(&cfg).get("drop").copied().unwrap_or(0);
        assert_eq!(count, 50_000);
        assert!(failed(&lab.talk("many/c49999", "tcp", PEER4, PEER_PORT)));
        assert!(proxied(&lab.talk("proxy", "tcp", PEER4, PEER_PORT), PEER4));
        let rules_now = sh_any("ip rule");
        assert_eq!(rules_now.matches("0xbb8").count(), 1, "{rules_now}");
        stop_clean(&mut lab, "0xbb8");
    });
}
