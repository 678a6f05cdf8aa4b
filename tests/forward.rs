//! Kernel tests of `cgtproxy forward`: apps in a proxied cgroup, cgtproxy's rules
//! (`cgtproxy run`) sending their traffic to the forwarder (in a cgroup of its
//! own), and real upstreams in the peer namespace: microsocks (SOCKS5, with and
//! without a password), dante (SOCKS5 with UDP ASSOCIATE) and tinyproxy (HTTP
//! CONNECT). The destination tells which address it saw: 10.99.0.2/fd99::2 for
//! microsocks and tinyproxy, 10.99.0.3/fd99::3 for dante, 10.99.0.1/fd99::1 for a
//! direct connection. Root only.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use support::*;

const BULK_PORT: u16 = 9000;
const MICROSOCKS: u16 = 1080;
const TINYPROXY: u16 = 3128;
/// A second UDP service in the peer, besides DNS on 53.
const UDP_PORT: u16 = 5300;
const FAST: Duration = Duration::from_secs(3);

/// A lab whose peer also has a bulk server.
fn lab(name: &str) -> Lab {
    let mut lab = Lab::new(name);
    // Limits that fit this machine's hard open-file limit (20000 here; the
    // shipped unit gives 65536 for the defaults), so the forwarder has no
    // reason to warn.
    lab.forward_args = ["--max-connections", "2048", "--max-udp-flows", "2048"]
        .map(String::from)
        .to_vec();
    let bulk = format!(
        "python3 '{}' serve {BULK_PORT}",
        helper("bulk.py").display()
    );
    lab.start_peer_service(&bulk, BULK_PORT);
    lab
}

fn microsocks(lab: &mut Lab, auth: &str) {
    lab.start_peer_service(
        &format!("microsocks -i {PEER4} -p {MICROSOCKS} {auth}"),
        MICROSOCKS,
    );
}

fn tinyproxy(lab: &mut Lab) {
    let conf = lab.dir.join("tinyproxy.conf");
    std::fs::write(
        &conf,
        format!(
            "User nobody\nGroup nogroup\nPort {TINYPROXY}\nListen {PEER4}\nTimeout 60\n\
             MaxClients 100\nAllow 10.99.0.0/24\nLogLevel Info\nPidFile \"{}\"\n",
            lab.dir.join("tinyproxy.pid").display()
        ),
    )
    .unwrap();
    lab.start_peer_service(&format!("tinyproxy -d -c '{}'", conf.display()), TINYPROXY);
}

/// A target entry: `name` on `port` with `mark`, relaying to `upstream`.
fn target(name: &str, port: u16, mark: u32, upstream: &str, auth: Option<&Path>) -> String {
    let auth = auth
        .map(|p| format!(r#","upstream-auth-file":"{}""#, p.display()))
        .unwrap_or_default();
    format!(r#""{name}":{{"port":{port},"mark":{mark},"upstream":"{upstream}"{auth}}}"#)
}

/// Rules: cgroup `app-NAME` goes to target NAME, for each name. The forwarder's
/// cgroup `fwd` is left unclassified.
fn rules(lab: &Lab, names: &[&str]) -> String {
    let r: Vec<String> = names
        .iter()
        .map(|n| {
            format!(
                r#"{{"match":"{}","tproxy":"{n}"}}"#,
                lab.re(&format!("app-{n}"))
            )
        })
        .collect();
    format!("[{}]", r.join(",")).replace('\\', "\\\\")
}

/// Writes the config, starts `cgtproxy run` and `cgtproxy forward` (in cgroup
/// `fwd`), and creates the app cgroups. Returns the forwarder.
fn start(lab: &mut Lab, targets: &[String], names: &[&str]) -> (PathBuf, Daemon) {
    for n in names {
        lab.mkcg(&format!("app-{n}"));
    }
    let cfg = lab.write_config(
        "c.json",
        &format!("{{{}}}", targets.join(",")),
        &rules(lab, names),
    );
    lab.start_daemon(&cfg);
    let fwd = lab.start_cgtproxy("forward", &cfg, Some("fwd"));
    (cfg, fwd)
}

/// Runs a bulk.py client in cgroup `rel`.
fn bulk(lab: &Lab, rel: &str, args: &str) -> String {
    let cmd = format!("python3 '{}' {args}", helper("bulk.py").display());
    let out = lab
        .spawn_in(rel, &cmd, Stdio::piped())
        .wait_with_output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn socks_target(port: u16) -> String {
    target(
        "proxy",
        PROXY_PORT,
        MARK,
        &format!("socks5://{PEER4}:{port}"),
        None,
    )
}

#[test]
fn tcp_over_ipv4_and_ipv6_through_socks5_intact_and_half_closed() {
    in_namespaces(
        "tcp_over_ipv4_and_ipv6_through_socks5_intact_and_half_closed",
        || {
            let mut lab = lab("fwd-tcp");
            microsocks(&mut lab, "");
            dante(&mut lab);
            let targets = [
                socks_target(MICROSOCKS),
                target(
                    "dante",
                    PROXY_PORT + 1,
                    MARK + 1,
                    &format!("socks5://[{PEER6}]:{DANTE}"),
                    None,
                ),
            ];
            let (_, fwd) = start(&mut lab, &targets, &["proxy", "dante"]);
            for (dst, seen) in [(PEER4, DANTE4), (PEER6, DANTE6)] {
                // The destination sees the upstream's address, not ours.
                let a = lab.talk("app-proxy", "tcp", dst, PEER_PORT);
                assert_eq!(a, format!("peer {dst}"), "via microsocks to {dst}");
                let a = lab.talk("app-dante", "tcp", dst, PEER_PORT);
                assert_eq!(a, format!("peer {seen}"), "via dante to {dst}");
            }
            // A cgroup without a rule still goes direct.
            lab.mkcg("other");
            let a = lab.talk("other", "tcp", PEER4, PEER_PORT);
            assert_eq!(a, "peer 10.99.0.1");
            // 50 MiB each way. `up` needs the app's half-close to reach the
            // server and the answer to come back after it; microsocks closes both
            // ways at the first EOF, so that one goes through dante.
            let n = 50 * 1024 * 1024;
            for dst in [PEER4, PEER6] {
                let up = bulk(&lab, "app-dante", &format!("up {dst} {BULK_PORT} {n}"));
                assert!(up.starts_with(&format!("OK up {n}")), "{dst}: {up}");
                for app in ["app-proxy", "app-dante"] {
                    let down = bulk(&lab, app, &format!("down {dst} {BULK_PORT} {n}"));
                    assert!(
                        down.starts_with(&format!("OK down {n}")),
                        "{app} {dst}: {down}"
                    );
                    eprintln!("50 MiB from {dst} to {app}: {down}");
                }
                eprintln!("50 MiB to {dst} via dante: {up}");
            }
            assert!(!fwd.log().contains("WARN"), "{}", fwd.log());
            assert_eq!(fwd.stop(), 0);
        },
    );
}

#[test]
fn udp_through_dante_answers_from_the_original_destination() {
    in_namespaces(
        "udp_through_dante_answers_from_the_original_destination",
        || {
            let mut lab = lab("fwd-udp");
            dante(&mut lab);
            // DNS-style services in the peer (answer "LABEL <client>"), bound to
            // the destination addresses: a wildcard-bound UDP server would answer
            // dante from dante's own address (both live in the peer namespace).
            for (port, label) in [(53, "dns"), (UDP_PORT, "peer")] {
                let cmd = format!(
                    "python3 '{}' {port} {label} {PEER4} {PEER6}",
                    helper("server.py").display()
                );
                lab.start_peer_service(&cmd, port);
            }
            let (_, fwd) = start(&mut lab, &[socks_target(DANTE)], &["proxy"]);
            for (dst, seen) in [(PEER4, DANTE4), (PEER6, DANTE6)] {
                for port in [53, UDP_PORT] {
                    let a = lab.talk("app-proxy", "udp", dst, port);
                    let label = if port == 53 { "dns" } else { "peer" };
                    assert_eq!(
                        a,
                        format!("{label} {seen} from {dst}"),
                        "UDP {dst}:{port}; dante log:\n{}",
                        std::fs::read_to_string(lab.dir.join("danted.log")).unwrap_or_default()
                    );
                }
                // TCP through dante too.
                let a = lab.talk("app-proxy", "tcp", dst, PEER_PORT);
                assert_eq!(a, format!("peer {seen}"), "TCP {dst} via dante");
            }
            assert_eq!(fwd.stop(), 0);
        },
    );
}

#[test]
fn http_connect_through_tinyproxy_and_udp_dropped_with_one_log_line() {
    in_namespaces(
        "http_connect_through_tinyproxy_and_udp_dropped_with_one_log_line",
        || {
            let mut lab = lab("fwd-http");
            tinyproxy(&mut lab);
            let t = target(
                "proxy",
                PROXY_PORT,
                MARK,
                &format!("http://{PEER4}:{TINYPROXY}"),
                None,
            );
            let (_, fwd) = start(&mut lab, &[t], &["proxy"]);
            // The server speaks first: its greeting must come through.
            for dst in [PEER4, PEER6] {
                let a = lab.talk("app-proxy", "tcp", dst, PEER_PORT);
                assert_eq!(a, format!("peer {dst}"), "via tinyproxy to {dst}");
            }
            // tinyproxy closes both ways at the first EOF: no half-close test here.
            let n = 50 * 1024 * 1024;
            let down = bulk(&lab, "app-proxy", &format!("down {PEER6} {BULK_PORT} {n}"));
            assert!(down.starts_with(&format!("OK down {n}")), "{down}");
            // UDP cannot go through HTTP CONNECT: dropped, never direct.
            for _ in 0..3 {
                let a = lab.talk("app-proxy", "udp", PEER4, PEER_PORT);
                assert!(a.starts_with("ERR"), "UDP over an HTTP upstream: {a}");
            }
            let once = |l: &str| l.matches("carries no UDP").count() == 1;
            assert!(lab.eventually(FAST, || once(&fwd.log())), "{}", fwd.log());
            std::thread::sleep(Duration::from_millis(200));
            assert!(once(&fwd.log()), "{}", fwd.log());
            assert_eq!(fwd.stop(), 0);
        },
    );
}

#[test]
fn socks5_password_accepted_and_rejected_with_a_clear_log_line() {
    in_namespaces(
        "socks5_password_accepted_and_rejected_with_a_clear_log_line",
        || {
            let mut lab = lab("fwd-auth");
            microsocks(&mut lab, "-u alice -P s3cret");
            let good = lab.dir.join("good.auth");
            let bad = lab.dir.join("bad.auth");
            std::fs::write(&good, "alice:s3cret\n").unwrap();
            std::fs::write(&bad, "alice:wrong\n").unwrap();
            let up = format!("socks5://{PEER4}:{MICROSOCKS}");
            let targets = [
                target("good", PROXY_PORT, MARK, &up, Some(&good)),
                target("bad", PROXY_PORT + 1, MARK + 1, &up, Some(&bad)),
                target("none", PROXY_PORT + 2, MARK + 2, &up, None),
            ];
            let (_, fwd) = start(&mut lab, &targets, &["good", "bad", "none"]);
            let a = lab.talk("app-good", "tcp", PEER4, PEER_PORT);
            assert_eq!(a, format!("peer {PEER4}"));
            for t in ["bad", "none"] {
                let t0 = Instant::now();
                let a = lab.talk(&format!("app-{t}"), "tcp", PEER4, PEER_PORT);
                assert!(a.starts_with("ERR") || a.is_empty(), "{t}: {a}");
                assert!(t0.elapsed() < Duration::from_secs(2), "{t}: slow failure");
            }
            let logged = |what: &str| lab.eventually(FAST, || fwd.log().contains(what));
            assert!(
                logged("bad: 10.99.0.1") && logged("SOCKS5 upstream rejected the user/password"),
                "{}",
                fwd.log()
            );
            assert!(
                logged("none: 10.99.0.1") && logged("accepts none of our login methods"),
                "{}",
                fwd.log()
            );
            assert_eq!(fwd.stop(), 0);
        },
    );
}

#[test]
fn upstream_down_fails_the_app_at_once_and_never_goes_direct() {
    in_namespaces(
        "upstream_down_fails_the_app_at_once_and_never_goes_direct",
        || {
            let mut lab = lab("fwd-down");
            // Nothing listens on 1999 in the peer.
            let (_, fwd) = start(&mut lab, &[socks_target(1999)], &["proxy"]);
            for dst in [PEER4, PEER6] {
                let t0 = Instant::now();
                let a = lab.talk("app-proxy", "tcp", dst, PEER_PORT);
                let took = t0.elapsed();
                assert!(a.starts_with("ERR") || a.is_empty(), "{dst}: {a}");
                assert!(took < Duration::from_millis(1500), "{dst}: took {took:?}");
                eprintln!("upstream down: app saw {a:?} after {took:?}");
            }
            assert!(
                lab.eventually(FAST, || fwd.log().contains("connecting to upstream")),
                "{}",
                fwd.log()
            );
            assert_eq!(fwd.stop(), 0);
        },
    );
}

#[test]
fn reload_switches_upstream_and_keeps_open_flows() {
    in_namespaces("reload_switches_upstream_and_keeps_open_flows", || {
        let mut lab = lab("fwd-reload");
        microsocks(&mut lab, "");
        dante(&mut lab);
        let (cfg, fwd) = start(&mut lab, &[socks_target(MICROSOCKS)], &["proxy"]);
        // A long-lived flow through microsocks.
        let held = Held::open(&lab, "app-proxy");

        // Switch to dante and reload.
        let text = std::fs::read_to_string(&cfg).unwrap().replace(
            &format!("{PEER4}:{MICROSOCKS}"),
            &format!("{PEER4}:{DANTE}"),
        );
        std::fs::write(&cfg, text).unwrap();
        fwd.signal(Signal::SIGHUP);
        fwd.wait_notify("READY=1", Duration::from_secs(5));
        assert!(
            lab.eventually(FAST, || fwd
                .log()
                .contains("upstream now socks5://10.99.0.2:1081")),
            "{}",
            fwd.log()
        );
        let a = lab.talk("app-proxy", "tcp", PEER4, PEER_PORT);
        assert_eq!(a, format!("peer {DANTE4}"), "new flows use dante");

        // The old flow still works.
        assert_eq!(held.release(), "OK hold");

        // An invalid config keeps the running one.
        std::fs::write(&cfg, "{").unwrap();
        fwd.signal(Signal::SIGHUP);
        fwd.wait_notify("READY=1", Duration::from_secs(5));
        let a = lab.talk("app-proxy", "tcp", PEER6, PEER_PORT);
        assert_eq!(a, format!("peer {DANTE6}"));
        assert_eq!(fwd.stop(), 0);
    });
}

#[test]
fn a_thousand_concurrent_connections() {
    in_namespaces("a_thousand_concurrent_connections", || {
        let mut lab = lab("fwd-many");
        microsocks(&mut lab, "");
        let (_, fwd) = start(&mut lab, &[socks_target(MICROSOCKS)], &["proxy"]);
        let a = bulk(&lab, "app-proxy", &format!("many {PEER4} {BULK_PORT} 1000"));
        assert!(a.starts_with("OK many 1000"), "{a}");
        eprintln!(
            "1000 concurrent connections: {a}; forwarder peak RSS {} KiB",
            status_kib(&fwd, "VmHWM")
        );
        assert_eq!(fwd.stop(), 0);
    });
}

/// A TCP connection from cgroup `rel` to the bulk server through the forwarder,
/// held open by bulk.py (it has exchanged a first line) until released.
struct Held {
    child: std::process::Child,
    out: std::process::ChildStdout,
    go: PathBuf,
}

impl Held {
    fn open(lab: &Lab, rel: &str) -> Held {
        Held::open_to(lab, rel, PEER4)
    }

    /// Held open to the bulk server at `host`; each has its own release file.
    fn open_to(lab: &Lab, rel: &str, host: &str) -> Held {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let go = lab.dir.join(format!("go-{n}"));
        let cmd = format!(
            "python3 '{}' hold {host} {BULK_PORT} '{}'",
            helper("bulk.py").display(),
            go.display()
        );
        let mut child = lab.spawn_in(rel, &cmd, Stdio::piped());
        let mut out = child.stdout.take().unwrap();
        let mut first = [0u8; 5];
        std::io::Read::read_exact(&mut out, &mut first).unwrap();
        assert_eq!(&first, b"held\n");
        Held { child, out, go }
    }

    /// Lets the connection finish its exchange; returns bulk.py's verdict.
    fn release(mut self) -> String {
        std::fs::write(&self.go, "").unwrap();
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut self.out, &mut rest).unwrap();
        self.child.wait().unwrap();
        rest.trim().to_owned()
    }
}

/// A field of the forwarder's /proc/PID/status, in KiB.
fn status_kib(d: &Daemon, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{}/status", d.child.id())).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or_else(|| panic!("no {field} in status"))
}

#[test]
fn sigterm_drains_open_connections() {
    in_namespaces("sigterm_drains_open_connections", || {
        let mut lab = lab("fwd-drain");
        microsocks(&mut lab, "");
        let (_, mut fwd) = start(&mut lab, &[socks_target(MICROSOCKS)], &["proxy"]);
        let held = Held::open(&lab, "app-proxy");
        fwd.signal(Signal::SIGTERM);
        fwd.wait_notify("STOPPING=1", FAST);
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            fwd.child.try_wait().unwrap().is_none(),
            "exited with a flow open"
        );
        assert_eq!(held.release(), "OK hold");
        let t0 = Instant::now();
        let status = fwd.child.wait().unwrap();
        assert_eq!(status.code(), Some(0));
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "slow exit after drain"
        );
        assert!(
            lab.eventually(FAST, || fwd.log().contains("all connections finished")),
            "{}",
            fwd.log()
        );
    });
}

#[test]
fn a_flood_of_udp_flows_is_bounded() {
    in_namespaces("a_flood_of_udp_flows_is_bounded", || {
        let mut lab = lab("fwd-flood");
        // An upstream nobody answers (10.99.0.99 has no owner on the link): every
        // flow waits in its handshake for seconds, holding its table entry.
        let t = target("proxy", PROXY_PORT, MARK, "socks5://10.99.0.99:1080", None);
        lab.forward_args = ["--max-connections", "2048", "--max-udp-flows", "1500"]
            .map(String::from)
            .to_vec();
        let (_, fwd) = start(&mut lab, &[t], &["proxy"]);
        let before = status_kib(&fwd, "VmRSS");
        // From the host's IPv4 address: its share (1024 by default) and no more.
        let a = bulk(&lab, "app-proxy", &format!("flood {PEER4} 20000 5000"));
        assert!(a.starts_with("OK flood 5000"), "{a}");
        let logged =
            |what: &str| lab.eventually(Duration::from_secs(5), || fwd.log().contains(what));
        assert!(
            logged(
                "limit reached: 1024 UDP flows open from 10.99.0.1 (--max-udp-flows-per-source)"
            ),
            "{}",
            fwd.log()
        );
        // From its IPv6 address, a second source: the rest of the total.
        let a = bulk(&lab, "app-proxy", &format!("flood {PEER6} 20000 5000"));
        assert!(a.starts_with("OK flood 5000"), "{a}");
        assert!(
            logged("limit reached: 1500 UDP flows open in all (--max-udp-flows)"),
            "{}",
            fwd.log()
        );
        let peak = status_kib(&fwd, "VmHWM");
        eprintln!("10000 new UDP flows: RSS {before} KiB before, peak {peak} KiB");
        assert!(peak < before + 64 * 1024, "peak RSS {peak} KiB");
        assert_eq!(fwd.stop(), 0);
    });
}

/// The forwarder's own upstream connections carry its mark and are never
/// captured, even when a rule classifies its cgroup to its own target.
#[test]
fn the_forwarders_own_traffic_is_never_captured() {
    in_namespaces("the_forwarders_own_traffic_is_never_captured", || {
        let mut lab = lab("fwd-own");
        microsocks(&mut lab, "");
        lab.mkcg("app-proxy");
        let rules = format!(
            r#"[{{"match":"{}","tproxy":"proxy"}},{{"match":"{}","tproxy":"proxy"}}]"#,
            lab.re("fwd"),
            lab.re("app-proxy")
        )
        .replace('\\', "\\\\");
        let cfg = lab.write_config(
            "c.json",
            &format!("{{{}}}", socks_target(MICROSOCKS)),
            &rules,
        );
        lab.start_daemon(&cfg);
        let fwd = lab.start_cgtproxy("forward", &cfg, Some("fwd"));
        for dst in [PEER4, PEER6] {
            let a = lab.talk("app-proxy", "tcp", dst, PEER_PORT);
            assert_eq!(a, format!("peer {dst}"), "via microsocks to {dst}");
        }
        assert_eq!(fwd.stop(), 0);
        assert_eq!(lab.take_daemon().stop(), 0);
    });
}

/// A TCP connection that moves nothing either way for the idle timeout is
/// closed; one that keeps talking, however slowly, is not. The timeout is
/// shortened to 600 ms by the test-only `CGTPROXY_TEST_TCP_IDLE_MS`.
#[test]
fn idle_tcp_connections_are_closed() {
    in_namespaces("idle_tcp_connections_are_closed", || {
        let mut lab = lab("fwd-idle");
        microsocks(&mut lab, "");
        lab.daemon_env
            .push(("CGTPROXY_TEST_TCP_IDLE_MS".into(), "600".into()));
        let (_, fwd) = start(&mut lab, &[socks_target(MICROSOCKS)], &["proxy"]);
        // 8 lines 250 ms apart: 2 s in all, never 600 ms quiet.
        let a = bulk(
            &lab,
            "app-proxy",
            &format!("trickle {PEER4} {BULK_PORT} 8 250"),
        );
        assert_eq!(a, "OK trickle 8", "a slow but live connection was cut");
        // Quiet for 1.5 s: closed by then, so the second echo never comes.
        let held = Held::open(&lab, "app-proxy");
        std::thread::sleep(Duration::from_millis(1500));
        let rest = held.release();
        assert!(
            rest.starts_with("ERR"),
            "idle connection still open: {rest}"
        );
        assert_eq!(fwd.stop(), 0);
    });
}

/// In the peer: counts new connections to the upstream ports `ports` (a nft
/// set literal such as `{ 1080 }`) and what the host sends to the peer's
/// services directly, around the upstream: connection attempts (SYN; data
/// needs a connection) and UDP datagrams. Not the bare ACK or RST that a closed
/// connection's end sends without a full socket (`socket cgroupv2` cannot
/// classify it; measured: one per connection): that is the daemon's table's
/// concern, not the forwarder's.
fn watch(lab: &Lab, ports: &str) {
    let out = lab.in_peer(&format!(
        "nft add table inet watch && \
         nft add counter inet watch upstream && nft add counter inet watch direct && \
         nft add chain inet watch in \"{{ type filter hook input priority 0; }}\" && \
         nft add rule inet watch in tcp dport {ports} tcp flags syn counter name upstream && \
         nft add set inet watch services \"{{ type inet_service; elements = {{ {PEER_PORT}, {BULK_PORT}, 53, {UDP_PORT} }}; }}\" && \
         nft add set inet watch host \"{{ type ipv4_addr; elements = {{ 10.99.0.1 }}; }}\" && \
         nft add set inet watch host6 \"{{ type ipv6_addr; elements = {{ fd99::1 }}; }}\" && \
         nft add chain inet watch from-host && \
         nft add rule inet watch in ip saddr @host jump from-host && \
         nft add rule inet watch in ip6 saddr @host6 jump from-host && \
         nft add rule inet watch from-host tcp dport @services \"tcp flags & (syn | ack) == syn\" counter name direct && \
         nft add rule inet watch from-host udp dport @services counter name direct && \
         echo watching"
    ));
    assert!(out.contains("watching"), "{out}");
}

/// Packets counted by the peer's counter `name` (see [`watch`]).
fn watched(lab: &Lab, name: &str) -> u64 {
    let out = lab.in_peer(&format!("nft list counter inet watch {name}"));
    out.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter {name}: {out}"))
}

fn neighbour(lab: &Lab, args: &str) -> String {
    lab.in_peer(&format!(
        "python3 '{}' {args}",
        helper("neighbour.py").display()
    ))
}

/// A neighbour on the LAN connects (TCP) and sends (UDP) to every target port
/// on the host's addresses: refused or nothing, no upstream connection made.
/// While it floods them, the host's own apps keep being served.
#[test]
fn neighbours_reach_no_listener_and_cannot_starve_the_hosts_apps() {
    in_namespaces(
        "neighbours_reach_no_listener_and_cannot_starve_the_hosts_apps",
        || {
            let mut lab = lab("sec-lan");
            microsocks(&mut lab, "");
            let up = format!("socks5://{PEER4}:{MICROSOCKS}");
            let targets = [
                target("proxy", PROXY_PORT, MARK, &up, None),
                target("proxy2", PROXY_PORT + 1, MARK + 1, &up, None),
            ];
            let (_, fwd) = start(&mut lab, &targets, &["proxy", "proxy2"]);
            watch(&lab, &format!("{{ {MICROSOCKS} }}"));
            let ports = format!("{PROXY_PORT},{}", PROXY_PORT + 1);
            let probe = neighbour(&lab, &format!("probe {ports} 10.99.0.1 fd99::1"));
            let lines: Vec<&str> = probe.lines().collect();
            assert_eq!(lines.len(), 8, "{probe}");
            for l in &lines {
                let ok = if l.starts_with("tcp") {
                    l.ends_with(" refused")
                } else {
                    l.ends_with(" refused") || l.ends_with(" silent")
                };
                assert!(ok, "the neighbour reached a listener: {l}");
            }
            assert_eq!(watched(&lab, "upstream"), 0, "upstream connections");

            // Flood every port and address for 3 s while the host's apps talk.
            let flood = std::process::Command::new("nsenter")
                .args(["-t", &lab.peer_pid().to_string(), "-n", "python3"])
                .arg(helper("neighbour.py"))
                .args(["flood", "3", &ports, "10.99.0.1", "fd99::1"])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut talks = 0;
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(2) {
                for (dst, app) in [(PEER4, "app-proxy"), (PEER6, "app-proxy2")] {
                    let a = lab.talk(app, "tcp", dst, PEER_PORT);
                    assert_eq!(a, format!("peer {dst}"), "{app} to {dst} during the flood");
                    talks += 1;
                }
            }
            let out = flood.wait_with_output().unwrap();
            let out = String::from_utf8_lossy(&out.stdout);
            eprintln!(
                "neighbour: {}; host apps: {talks} connections served meanwhile",
                out.trim()
            );
            assert!(out.starts_with("OK flood "), "{out}");
            // One upstream connection per app connection, none for the neighbour.
            assert_eq!(watched(&lab, "upstream"), talks);
            assert_eq!(watched(&lab, "direct"), 0, "sent around the upstream");
            let log = fwd.log();
            assert!(!log.contains("WARN"), "{log}");
            assert_eq!(fwd.stop(), 0);
        },
    );
}

/// A flow to this host's own address on a target's port (TCP and UDP, through
/// TPROXY or straight to the loopback listener) would loop through the upstream
/// back to us: refused, logged, nothing sent upstream.
#[test]
fn flows_back_to_our_own_ports_are_refused() {
    in_namespaces("flows_back_to_our_own_ports_are_refused", || {
        let mut lab = lab("sec-loop");
        microsocks(&mut lab, "");
        let (_, fwd) = start(&mut lab, &[socks_target(MICROSOCKS)], &["proxy"]);
        watch(&lab, &format!("{{ {MICROSOCKS} }}"));
        // 10.99.0.1 and fd99::1 go through TPROXY; 127.0.0.1 and ::1 are in
        // bypass and reach the loopback listener directly.
        for host in ["10.99.0.1", "fd99::1", "127.0.0.1", "::1"] {
            let t0 = Instant::now();
            let a = lab.talk("app-proxy", "tcp", host, PROXY_PORT);
            assert!(a.starts_with("ERR") || a.is_empty(), "TCP to {host}: {a}");
            assert!(
                t0.elapsed() < Duration::from_secs(1),
                "TCP to {host}: slow refusal"
            );
        }
        for host in ["10.99.0.1", "fd99::1", "127.0.0.1"] {
            let a = lab.talk("app-proxy", "udp", host, PROXY_PORT);
            assert!(a.starts_with("ERR"), "UDP to {host}: {a}");
        }
        let expected = [
            "→ 10.99.0.1:7893: refused: the destination is this host's own listener port (a loop)",
            "→ [fd99::1]:7893: refused",
            "→ 127.0.0.1:7893: refused",
            "→ [::1]:7893: refused",
            "UDP 10.99.0.1:",
        ];
        // The log arrives through a pipe: wait for all of it.
        let all = lab.eventually(FAST, || {
            let log = fwd.log();
            expected.iter().all(|what| log.contains(what))
        });
        let log = fwd.log();
        for what in expected {
            assert!(all && log.contains(what), "no {what:?} in\n{log}");
        }
        assert_eq!(watched(&lab, "upstream"), 0, "a loop reached the upstream");
        // Other flows are served as before.
        let a = lab.talk("app-proxy", "tcp", PEER4, PEER_PORT);
        assert_eq!(a, format!("peer {PEER4}"));
        assert_eq!(watched(&lab, "upstream"), 1);
        assert_eq!(fwd.stop(), 0);
    });
}

/// Beyond --max-connections-per-source and --max-connections new connections
/// are reset at once with a log line naming the flag; closing one makes room.
#[test]
fn connection_limits_refuse_with_a_clear_log_line() {
    in_namespaces("connection_limits_refuse_with_a_clear_log_line", || {
        let mut lab = lab("sec-limits");
        microsocks(&mut lab, "");
        lab.forward_args = [
            "--max-connections",
            "4",
            "--max-connections-per-source",
            "3",
        ]
        .map(String::from)
        .to_vec();
        let (_, fwd) = start(&mut lab, &[socks_target(MICROSOCKS)], &["proxy"]);
        // The host's IPv4 and IPv6 addresses are two sources.
        let mut v4: Vec<Held> = (0..3)
            .map(|_| Held::open_to(&lab, "app-proxy", PEER4))
            .collect();
        let a = lab.talk("app-proxy", "tcp", PEER4, PEER_PORT);
        assert!(
            a.starts_with("ERR") || a.is_empty(),
            "4th from one source: {a}"
        );
        let v6 = Held::open_to(&lab, "app-proxy", PEER6);
        let a = lab.talk("app-proxy", "tcp", PEER6, PEER_PORT);
        assert!(a.starts_with("ERR") || a.is_empty(), "5th in all: {a}");
        let logged = |what: &str| lab.eventually(FAST, || fwd.log().contains(what));
        assert!(
            logged(
                "limit reached: 3 connections open from 10.99.0.1 (--max-connections-per-source); reset"
            ),
            "{}",
            fwd.log()
        );
        assert!(
            logged("limit reached: 4 connections open in all (--max-connections); reset"),
            "{}",
            fwd.log()
        );
        // Held connections are untouched; closing one makes room.
        assert_eq!(v4.pop().unwrap().release(), "OK hold");
        assert!(
            lab.eventually(FAST, || lab.talk("app-proxy", "tcp", PEER4, PEER_PORT)
                == format!("peer {PEER4}")),
            "no room after a connection closed"
        );
        assert_eq!(v6.release(), "OK hold");
        for h in v4 {
            assert_eq!(h.release(), "OK hold");
        }
        assert_eq!(fwd.stop(), 0);
    });
}

/// The lowest descriptor number a process has free: with its open-file limit
/// there, it can open nothing more (the limit caps descriptor numbers).
fn lowest_free_fd(pid: u32) -> u64 {
    let open: std::collections::BTreeSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|n| !open.contains(n)).unwrap()
}

/// A process's CPU time so far, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // utime and stime: fields 14 and 15, the 12th and 13th after the command's
    // closing parenthesis.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Out of descriptors (EMFILE on accept): the listener backs off without
/// spinning, open connections go on, and once descriptors are available again
/// the connection that waited is served.
#[test]
fn running_out_of_descriptors_backs_off_and_recovers() {
    in_namespaces("running_out_of_descriptors_backs_off_and_recovers", || {
        let mut lab = lab("sec-emfile");
        microsocks(&mut lab, "");
        let (_, fwd) = start(&mut lab, &[socks_target(MICROSOCKS)], &["proxy"]);
        let pid = fwd.child.id();
        let held = Held::open(&lab, "app-proxy");
        let mut free = lowest_free_fd(pid);
        assert!(lab.eventually(FAST, || {
            let now = lowest_free_fd(pid);
            let settled = now == free;
            free = now;
            settled
        }));
        // Soft limit only: raising it back needs no privilege.
        let limit = |n: u64| {
            let out = sh_any(&format!("prlimit --pid {pid} --nofile={n}: && echo set"));
            assert!(out.contains("set"), "{out}");
        };
        limit(free);
        std::thread::scope(|s| {
            let waiting = s.spawn(|| {
                let cmd = format!(
                    "python3 '{}' tcp {PEER4} {PEER_PORT} 10",
                    helper("client.py").display()
                );
                let out = lab
                    .spawn_in("app-proxy", &cmd, Stdio::piped())
                    .wait_with_output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout).trim().to_owned()
            });
            assert!(
                lab.eventually(FAST, || fwd.log().contains("Too many open files")),
                "{}",
                fwd.log()
            );
            // Out of descriptors for a second: backing off costs next to no CPU.
            let t0 = cpu_ticks(pid);
            std::thread::sleep(Duration::from_secs(1));
            let spent = cpu_ticks(pid) - t0;
            eprintln!("EMFILE for 1 s: {spent} ticks of CPU");
            assert!(spent <= 10, "{spent} ticks in 1 s: a busy loop");
            assert!(!waiting.is_finished(), "the waiting connection was dropped");
            limit(4096);
            assert_eq!(waiting.join().unwrap(), format!("peer {PEER4}"));
        });
        assert_eq!(held.release(), "OK hold");
        let log = fwd.log();
        assert!(
            log.contains("Too many open files (os error 24); retrying in"),
            "{log}"
        );
        assert_eq!(
            lab.talk("app-proxy", "tcp", PEER4, PEER_PORT),
            format!("peer {PEER4}")
        );
        assert_eq!(fwd.stop(), 0);
    });
}

/// Upstreams that answer wrongly, cut their replies, send oversized headers,
/// never answer or trickle: each app connection ends closed within the
/// handshake timeout, with a log line, and nothing goes direct. A relay that
/// answers UDP with malformed datagrams has them dropped.
#[test]
fn a_hostile_upstream_never_breaks_the_relay() {
    in_namespaces("a_hostile_upstream_never_breaks_the_relay", || {
        let mut lab = lab("sec-hostile");
        microsocks(&mut lab, "");
        lab.forward_args
            .extend(["--handshake-timeout", "1"].map(String::from));
        let modes = [
            ("socks5", "garbage"),
            ("socks5", "socks4"),
            ("socks5", "method-cut"),
            ("socks5", "atyp"),
            ("socks5", "reply-cut"),
            ("socks5", "huge-name"),
            ("socks5", "refused"),
            ("socks5", "silent"),
            ("socks5", "trickle"),
            ("http", "http-garbage"),
            ("http", "http-endless"),
            ("http", "http-trickle"),
            ("http", "http-cut"),
            ("http", "silent"),
        ];
        let mut targets = vec![socks_target(MICROSOCKS)];
        let mut names = vec!["proxy".to_owned()];
        for (i, (scheme, mode)) in modes.iter().enumerate() {
            let port = 2000 + i as u16;
            let cmd = format!(
                "python3 '{}' {mode} {PEER4} {port}",
                helper("hostile.py").display()
            );
            lab.start_peer_service(&cmd, port);
            let name = format!("h{i}");
            let up = format!("{scheme}://{PEER4}:{port}");
            targets.push(target(
                &name,
                PROXY_PORT + 1 + i as u16,
                MARK + 1 + i as u32,
                &up,
                None,
            ));
            names.push(name);
        }
        let udp_port = 2100;
        let cmd = format!(
            "python3 '{}' udp-junk {PEER4} {udp_port}",
            helper("hostile.py").display()
        );
        lab.start_peer_service(&cmd, udp_port);
        targets.push(target(
            "hu",
            PROXY_PORT + 50,
            MARK + 50,
            &format!("socks5://{PEER4}:{udp_port}"),
            None,
        ));
        names.push("hu".into());
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let (_, fwd) = start(&mut lab, &targets, &names);
        watch(&lab, "{ 1080 }");
        for (i, (_, mode)) in modes.iter().enumerate() {
            for dst in [PEER4, PEER6] {
                let t0 = Instant::now();
                let a = lab.talk(&format!("app-h{i}"), "tcp", dst, PEER_PORT);
                let took = t0.elapsed();
                assert!(
                    a.starts_with("ERR") || a.is_empty(),
                    "{mode} to {dst}: the app got {a:?}"
                );
                assert!(
                    took < Duration::from_millis(1900),
                    "{mode} to {dst}: closed after {took:?}"
                );
                eprintln!("hostile upstream {mode}: app saw {a:?} after {took:?}");
            }
            assert!(
                lab.eventually(FAST, || fwd.log().contains(&format!("h{i}: 10.99.0.1"))),
                "no log line for {mode}:\n{}",
                fwd.log()
            );
        }
        // Malformed datagrams from the relay are dropped; the good one arrives.
        let a = lab.talk("app-hu", "udp", PEER4, UDP_PORT);
        assert_eq!(
            a,
            format!("good {PEER4} from {PEER4}"),
            "UDP through a junk relay"
        );
        assert_eq!(watched(&lab, "direct"), 0, "sent around the upstream");
        // And the forwarder still serves.
        let a = lab.talk("app-proxy", "tcp", PEER4, PEER_PORT);
        assert_eq!(a, format!("peer {PEER4}"));
        assert_eq!(fwd.stop(), 0);
    });
}
