//! The eBPF datapath (`"datapath": "ebpf"`) with real sockets: a REDIRECT-style
//! listener reading SO_ORIGINAL_DST, a peer namespace playing the internet
//! whose arrivals are counted, and the daemon attaching its programs at the
//! root of a cgroup namespace of the test's own (never the host's root).

mod support;

use std::path::PathBuf;

use support::*;

/// A lab whose daemon has exactly the capabilities its unit (with the
/// packaged drop-in) grants: CAP_BPF and CAP_NET_ADMIN. The verifier is
/// stricter without CAP_PERFMON, so full root would hide programs it refuses.
fn lab(name: &str) -> Lab {
    let mut lab = Lab::new(name);
    lab.daemon_wrapper = ["setpriv", "--bounding-set=-all,+bpf,+net_admin", "--"]
        .map(String::from)
        .to_vec();
    lab
}

/// A configuration for the eBPF datapath (see [`Lab::write_config`]).
fn ebpf_config(lab: &Lab, file: &str, tproxies: &str, rules: &str) -> PathBuf {
    let p = lab.write_config(file, tproxies, rules);
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(
        &p,
        text.replacen(r#""version":1,"#, r#""version":1,"datapath":"ebpf","#, 1),
    )
    .unwrap();
    p
}

/// `proxy/direct` direct, the rest of `proxy` proxied, `drop` dropped.
fn rules(lab: &Lab) -> String {
    format!(
        r#"[{{"match":"{}","direct":true}},{{"match":"{}","tproxy":"proxy"}},{{"match":"{}","drop":true}}]"#,
        lab.re("proxy/direct"),
        lab.re("proxy"),
        lab.re("drop"),
    )
    .replace('\\', "\\\\")
}

fn redirected(answer: &str, dst: &str) -> bool {
    answer == format!("proxy {dst} {PEER_PORT}")
}

#[test]
fn ebpf_redirects_tcp_and_udp_refuses_drop_and_detaches_on_stop() {
    in_cgroup_namespace(
        "ebpf_redirects_tcp_and_udp_refuses_drop_and_detaches_on_stop",
        || {
            let mut lab = lab("ebpf");
            lab.start_redirect_listener("svc", PROXY_PORT, "proxy");
            install_counter(lab.peer_pid());
            for rel in ["proxy", "proxy/direct", "drop", "other"] {
                lab.mkcg(rel);
            }
            let cfg = ebpf_config(&lab, "ebpf.json", &proxy_target(), &rules(&lab));
            lab.start_daemon(&cfg);

            // Proxied: TCP v4 and v6 reach the listener with their original
            // destination, and nothing reaches the peer.
            assert!(redirected(
                &lab.talk("proxy", "tcp", PEER4, PEER_PORT),
                PEER4
            ));
            assert!(redirected(
                &lab.talk("proxy", "tcp", PEER6, PEER_PORT),
                PEER6
            ));
            // A cgroup created later, nested below a classified one.
            lab.mkcg("proxy/late/deeper");
            assert!(redirected(
                &lab.talk("proxy/late/deeper", "tcp", PEER4, PEER_PORT),
                PEER4
            ));
            assert_eq!(counted(lab.peer_pid()), 0, "proxied traffic leaked");
            // The app's getpeername() names where it connected, not the
            // listener (v4, v6, and v4 through an IPv6 socket).
            for (fam, dst, want) in [
                ("AF_INET", PEER4, format!("{PEER4} {PEER_PORT}")),
                ("AF_INET6", PEER6, format!("{PEER6} {PEER_PORT}")),
                (
                    "AF_INET6",
                    "::ffff:10.99.0.2",
                    format!("::ffff:10.99.0.2 {PEER_PORT}"),
                ),
            ] {
                let script = format!(
                    "import socket; s = socket.socket(socket.{fam}); s.connect(('{dst}', {PEER_PORT})); a = s.getpeername(); print(a[0], a[1])"
                );
                assert_eq!(lab.python_in("proxy", &script), want, "{dst}");
            }

            // doctor: the kernel loads the programs, the listener is there.
            let (out, code) = cgtproxy(&["doctor", "--config"], &cfg);
            assert_eq!(code, 0, "{out}");
            assert!(out.contains("ok   ebpf: the kernel loads"), "{out}");
            assert!(out.contains("port 7893 has TCP listeners"), "{out}");
            // Its UDP goes to a listener without an upstream: a warning.
            assert!(
                out.contains("warn udp: target proxy: its UDP goes to port 7893"),
                "{out}"
            );

            // status and explain read the programs and the map back.
            let (out, code) = cgtproxy(&["status", "--config"], &cfg);
            assert_eq!(code, 0, "{out}");
            assert!(
                out.contains("9 programs loaded") && out.contains("drift: none"),
                "{out}"
            );
            let by_class = elements_by_class(&cfg);
            assert_eq!(
                by_class,
                [("direct", 1), ("drop", 1), ("proxy", 1)]
                    .map(|(k, n)| (k.to_owned(), n))
                    .into()
            );
            let deeper = format!("{}/proxy/late/deeper", lab.base);
            let (out, code) = cgtproxy(&["explain", &deeper, "--config"], &cfg);
            assert_eq!(code, 0, "{out}");
            assert!(
                out.contains("cgroups map entry for") && out.contains("agrees"),
                "{out}"
            );

            // UDP of a target reaches the listener, which learns the original
            // destination from the datapath and answers from its own address;
            // the app sees the answer come from where it sent. Unconnected and
            // connected, v4, v6, and v4 through an IPv6 socket.
            for proto in ["udp", "udp-connected"] {
                for (dst, orig) in [(PEER4, PEER4), (PEER6, PEER6), ("::ffff:10.99.0.2", PEER4)] {
                    assert_eq!(
                        lab.talk("proxy", proto, dst, PEER_PORT),
                        format!("proxy {orig} {PEER_PORT} from {dst}"),
                        "{proto} to {dst}"
                    );
                }
            }
            // One unconnected IPv4 socket, many destinations (each flow has
            // a source address of its own); each answer comes from where it
            // was sent.
            let script = format!(
                "import socket\n\
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)\n\
for dst in [('{PEER4}', {PEER_PORT}), ('10.99.0.7', 53), ('{PEER4}', {PEER_PORT})]:\n \
s.sendto(b'a', dst); d, src = s.recvfrom(99); print(d.decode().strip(), 'from', src[0], src[1])"
            );
            assert_eq!(
                lab.python_in("proxy", &script),
                format!(
                    "proxy {PEER4} {PEER_PORT} from {PEER4} {PEER_PORT}\n\
                     proxy 10.99.0.7 53 from 10.99.0.7 53\n\
                     proxy {PEER4} {PEER_PORT} from {PEER4} {PEER_PORT}"
                )
            );
            // Where an app sends is told only to a marked socket (the
            // forwarder's: SO_MARK takes CAP_NET_ADMIN). An app's connected
            // socket has sent to the peer; then another process asks about
            // its port, unmarked and marked.
            let port = lab.python_in(
                "proxy",
                &format!(
                    "import socket\n\
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2); s.connect(('{PEER4}', {PEER_PORT})); s.send(b'a'); s.recv(99)\n\
print(s.getsockname()[1])"
                ),
            );
            for (mark, want) in [
                ("", "ERR 92".to_owned()),
                (
                    "q.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x63677466); ",
                    format!("told {PEER4}:{PEER_PORT}"),
                ),
            ] {
                let script = format!(
                    "import socket, struct\n\
q = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); {mark}q.connect(('127.0.0.1', {port}))\n\
try:\n a = q.getsockopt(socket.SOL_IP, 80, 16); print(f'told {{socket.inet_ntoa(a[4:8])}}:{{struct.unpack(\"!H\", a[2:4])[0]}}')\nexcept OSError as e:\n print('ERR', e.errno)"
                );
                assert_eq!(lab.python_in("other", &script), want, "{mark}");
            }
            // IPv6 has one loopback address: a bound or IPv6 socket talks to
            // one destination, a second one would be taken for the first by
            // the listener, so it is refused.
            for (fam, first, second) in [
                ("AF_INET6", PEER6, "fd99::7"),
                ("AF_INET", PEER4, "10.99.0.7"),
            ] {
                let bind = if fam == "AF_INET" {
                    "s.bind(('10.99.0.1', 0)); "
                } else {
                    ""
                };
                let script = format!(
                    "import socket\n\
s = socket.socket(socket.{fam}, socket.SOCK_DGRAM); s.settimeout(2); {bind}s.sendto(b'a', ('{first}', {PEER_PORT})); print(s.recvfrom(99)[0].decode().strip())\n\
try:\n s.sendto(b'b', ('{second}', {PEER_PORT}))\nexcept OSError as e:\n print('ERR', e.errno)"
                );
                assert_eq!(
                    lab.python_in("proxy", &script),
                    format!("proxy {first} {PEER_PORT}\nERR 1"),
                    "{fam}"
                );
            }
            assert_eq!(counted(lab.peer_pid()), 0, "proxied UDP leaked");

            // A dropped cgroup is refused (EPERM).
            assert_eq!(
                lab.talk("drop", "tcp", PEER4, PEER_PORT),
                "ERR PermissionError 1"
            );
            assert_eq!(
                lab.talk("drop", "udp", PEER6, PEER_PORT),
                "ERR PermissionError 1"
            );
            assert_eq!(
                lab.talk("drop", "udp-connected", PEER4, PEER_PORT),
                "ERR PermissionError 1"
            );
            assert_eq!(counted(lab.peer_pid()), 0, "refused traffic leaked");

            // Direct (a classified exception below a proxied cgroup) and
            // unclassified go straight to the peer.
            assert!(
                lab.talk("proxy/direct", "tcp", PEER4, PEER_PORT)
                    .starts_with("peer")
            );
            assert!(
                lab.talk("other", "udp", PEER6, PEER_PORT)
                    .starts_with("peer")
            );
            assert!(counted(lab.peer_pid()) > 0, "direct traffic did not arrive");
            // A bypass destination (10.99.0.99, in every test config) is
            // untouched even from a proxied cgroup.
            lab.in_peer("ip addr add 10.99.0.99/24 dev veth1");
            let a = lab.talk("proxy", "tcp", "10.99.0.99", PEER_PORT);
            assert!(a.starts_with("peer"), "bypass: {a}");

            // A clean stop detaches everything: the same cgroup goes direct.
            let d = lab.take_daemon();
            assert_eq!(d.stop(), 0);
            let (out, code) = cgtproxy(&["status", "--config"], &cfg);
            assert_ne!(code, 0, "{out}");
            assert!(out.contains("no cgtproxy programs loaded"), "{out}");
            assert!(
                lab.talk("proxy", "tcp", PEER4, PEER_PORT)
                    .starts_with("peer")
            );
            assert!(
                lab.talk("drop", "udp", PEER4, PEER_PORT)
                    .starts_with("peer")
            );
        },
    );
}

const MICROSOCKS: u16 = 1080;
const REDSOCKS_PORT: u16 = 12345;
/// The port of the target relaying through dante.
const DANTE_TARGET: u16 = 7894;
/// A UDP service in the peer (answers "peer <client>").
const UDP_PORT: u16 = 5300;

/// The built-in forwarder and redsocks (Debian's, a REDIRECT-style core that
/// reads SO_ORIGINAL_DST) serve the eBPF datapath, each relaying TCP through
/// microsocks in the peer: the destination sees microsocks' address (the
/// peer's own, 10.99.0.2 / fd99::2), never the host's (10.99.0.1 / fd99::1).
/// The forwarder relays UDP through dante (10.99.0.3 / fd99::3).
#[test]
fn ebpf_feeds_the_built_in_forwarder_and_redsocks() {
    in_cgroup_namespace("ebpf_feeds_the_built_in_forwarder_and_redsocks", || {
        let mut lab = lab("ebpf-fwd");
        lab.forward_args = ["--max-connections", "256", "--max-udp-flows", "256"]
            .map(String::from)
            .to_vec();
        lab.start_peer_service(
            &format!("microsocks -i {PEER4} -p {MICROSOCKS}"),
            MICROSOCKS,
        );
        let conf = lab.dir.join("redsocks.conf");
        std::fs::write(
            &conf,
            format!(
                "base {{ log_info = on; log = stderr; daemon = off; redirector = iptables; }}
redsocks {{ local_ip = 127.0.0.1; local_port = {REDSOCKS_PORT}; ip = {PEER4}; port = {MICROSOCKS}; type = socks5; }}
"
            ),
        )
        .unwrap();
        lab.start_service_in(
            "svc",
            &format!("redsocks -c '{}'", conf.display()),
            REDSOCKS_PORT,
        );
        dante(&mut lab);
        let udp = format!(
            "python3 '{}' {UDP_PORT} peer {PEER4} {PEER6}",
            helper("server.py").display()
        );
        lab.start_peer_service(&udp, UDP_PORT);
        let dns = format!(
            "python3 '{}' 53 dns {PEER4} {PEER6}",
            helper("server.py").display()
        );
        lab.start_peer_service(&dns, 53);
        for rel in ["app-fwd", "app-redsocks", "app-dante"] {
            lab.mkcg(rel);
        }
        let tproxies = format!(
            r#"{{"fwd":{{"port":{PROXY_PORT},"mark":{MARK},"upstream":"socks5://{PEER4}:{MICROSOCKS}"}},
                "redsocks":{{"port":{REDSOCKS_PORT},"mark":{},"no-ipv6":true}},
                "dante":{{"port":{DANTE_TARGET},"mark":{},"upstream":"socks5://{PEER4}:{DANTE}"}}}}"#,
            MARK + 1,
            MARK + 2
        );
        let rules = format!(
            r#"[{{"match":"{}","tproxy":"fwd"}},{{"match":"{}","tproxy":"redsocks"}},{{"match":"{}","tproxy":"dante"}}]"#,
            lab.re("app-fwd"),
            lab.re("app-redsocks"),
            lab.re("app-dante"),
        )
        .replace('\\', "\\\\");
        let cfg = ebpf_config(&lab, "fwd.json", &tproxies, &rules);
        lab.start_daemon(&cfg);
        // No forwarder yet: doctor fails on its target's listener.
        let (out, code) = cgtproxy(&["doctor", "--config"], &cfg);
        assert_ne!(code, 0, "{out}");
        assert!(
            out.contains("FAIL listener: target fwd: nothing listens on TCP 127.0.0.1:7893"),
            "{out}"
        );
        // The forwarder runs inside the cgroup it serves: its own upstream
        // sockets (marked) must never be redirected back to it.
        let fwd = lab.start_cgtproxy("forward", &cfg, Some("app-fwd/forwarder"));

        for dst in [PEER4, PEER6] {
            let a = lab.talk("app-fwd", "tcp", dst, PEER_PORT);
            assert_eq!(a, format!("peer {dst}"), "forwarder to {dst}");
        }
        assert_eq!(
            lab.talk("app-redsocks", "tcp", PEER4, PEER_PORT),
            format!("peer {PEER4}"),
            "redsocks"
        );
        // redsocks has no IPv6 listener: its target says no-ipv6, so IPv6 goes
        // direct.
        assert_eq!(
            lab.talk("app-redsocks", "tcp", PEER6, PEER_PORT),
            "peer fd99::1"
        );
        // UDP through dante: the answer comes from where the app sent it,
        // connected or not, v4, v6 and v4 through an IPv6 socket.
        for proto in ["udp", "udp-connected"] {
            for (dst, seen) in [
                (PEER4, DANTE4),
                (PEER6, DANTE6),
                ("::ffff:10.99.0.2", DANTE4),
            ] {
                assert_eq!(
                    lab.talk("app-dante", proto, dst, UDP_PORT),
                    format!("peer {seen} from {dst}"),
                    "{proto} to {dst}; forwarder log:\n{}",
                    fwd.log()
                );
            }
        }
        // One unconnected IPv4 socket, two destinations: two flows.
        let script = format!(
            "import socket\n\
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)\n\
for dst in [('{PEER4}', {UDP_PORT}), ('{PEER4}', 53)]:\n \
s.sendto(b'a', dst); d, src = s.recvfrom(99); print(d.decode().strip(), 'from', src[1])"
        );
        assert_eq!(
            lab.python_in("app-dante", &script),
            format!("peer {DANTE4} from {UDP_PORT}\ndns {DANTE4} from 53"),
            "forwarder log:\n{}",
            fwd.log()
        );
        // An app connecting to the forwarder's port itself has no original
        // destination: refused as a loop, never relayed.
        lab.mkcg("other");
        let a = lab.talk("other", "tcp", "127.0.0.1", PROXY_PORT);
        assert!(!a.starts_with("peer"), "{a}");
        assert_eq!(fwd.stop(), 0);
    });
}

/// What breaks the nft datapath cannot touch this one: another program's
/// `flush ruleset`, a firewall dropping marked packets, wg-quick's policy rules
/// (a blackhole default route stands in for its tunnel), strict reverse-path
/// filtering. Then a reload changes a verdict, a reload to
/// another datapath is refused with the old rules kept, and a killed daemon
/// leaves no program behind.
#[test]
fn ebpf_is_untouched_by_firewalls_and_vpn_rules_reloads_and_detaches_on_crash() {
    in_cgroup_namespace(
        "ebpf_is_untouched_by_firewalls_and_vpn_rules_reloads_and_detaches_on_crash",
        || {
            let mut lab = lab("ebpf-coexist");
            lab.start_redirect_listener("svc", PROXY_PORT, "proxy");
            for rel in ["proxy", "drop"] {
                lab.mkcg(rel);
            }
            let cfg = ebpf_config(&lab, "c.json", &proxy_target(), &rules(&lab));
            lab.start_daemon(&cfg);
            assert!(redirected(
                &lab.talk("proxy", "tcp", PEER4, PEER_PORT),
                PEER4
            ));

            let vpn = "ip rule add not fwmark 51820 table 51820 priority 32764 &&
                 ip rule add table main suppress_prefixlength 0 priority 32763 &&
                 ip route add blackhole default table 51820 &&
                 ip -6 rule add not fwmark 51820 table 51820 priority 32764 &&
                 ip -6 rule add table main suppress_prefixlength 0 priority 32763 &&
                 ip -6 route add blackhole default table 51820 &&
                 sysctl -qw net.ipv4.conf.all.rp_filter=1 net.ipv4.conf.default.rp_filter=1 &&
                 nft flush ruleset &&
                 nft add table inet fw &&
                 nft add chain inet fw out '{ type filter hook output priority 0; policy accept; }' &&
                 nft add rule inet fw out meta mark != 0 drop &&
                 echo done";
            assert!(sh_any(vpn).contains("done"), "setting up the VPN's rules");
            for dst in [PEER4, PEER6] {
                assert!(redirected(&lab.talk("proxy", "tcp", dst, PEER_PORT), dst));
            }
            sh_any("ip rule del priority 32764; ip -6 rule del priority 32764");

            // Reload: the proxied cgroup becomes dropped.
            let swapped =
                format!(r#"[{{"match":"{}","drop":true}}]"#, lab.re("proxy")).replace('\\', "\\\\");
            let new = ebpf_config(&lab, "c.json", &proxy_target(), &swapped);
            let d = lab.daemon.as_ref().unwrap();
            d.signal(nix::sys::signal::Signal::SIGHUP);
            d.wait_notify("READY=1", std::time::Duration::from_secs(10));
            assert_eq!(
                lab.talk("proxy", "tcp", PEER4, PEER_PORT),
                "ERR PermissionError 1"
            );

            // Another datapath needs a restart: refused, the rules stay.
            let text = std::fs::read_to_string(&new).unwrap();
            std::fs::write(
                &new,
                text.replace(r#""datapath":"ebpf""#, r#""datapath":"nft""#),
            )
            .unwrap();
            d.signal(nix::sys::signal::Signal::SIGHUP);
            d.wait_notify("READY=1", std::time::Duration::from_secs(10));
            let refused = lab.eventually(std::time::Duration::from_secs(5), || {
                d.log().contains("from ebpf to nft: that needs a restart")
            });
            assert!(refused, "{}", d.log());
            assert_eq!(
                lab.talk("proxy", "tcp", PEER4, PEER_PORT),
                "ERR PermissionError 1"
            );

            // A crash detaches the programs with the daemon's links: the
            // cgroup's sockets connect directly again (see the README).
            lab.take_daemon().kill();
            assert!(
                lab.talk("proxy", "tcp", PEER4, PEER_PORT)
                    .starts_with("peer")
            );
        },
    );
}
