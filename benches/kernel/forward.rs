//! The forwarder comparison (issue 8): `cgtproxy forward`, v2ray's dokodemo-door
//! and redsocks side by side in one run, over the same path to the same upstream.
//!
//! The path: an app in a cgroup of its own sends to a server in the peer
//! namespace; its traffic is taken to the proxy under test, which relays it
//! through microsocks (SOCKS5, TCP) or dante (SOCKS5 UDP ASSOCIATE, since
//! microsocks has no UDP) in the peer namespace.
//!
//! - cgtproxy: `cgtproxy run` classifies the app's cgroup to a target whose
//!   port `cgtproxy forward` serves (TPROXY).
//! - v2ray: the same daemon rules, TPROXY to dokodemo-door (`followRedirect`,
//!   sockopt `tproxy`), SOCKS outbounds: TCP to microsocks, UDP to dante.
//! - redsocks: TCP only, by an nft `redirect` rule on the app's cgroup (the way
//!   redsocks is meant to be used).
//! - direct: the app talks to the server without any proxy, for scale.
//!
//! Every proxy runs in an unclassified cgroup, so its own upstream connections
//! are never captured again. All processes live in cgroups below the bench's
//! subtree, so removing it kills whatever is left.

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use super::{Lab, PEER, median, reset_on_close, round1, round3, rss_kib, sh, step};

const MICROSOCKS: u16 = 1080;
const DANTE: u16 = 1081;
/// The address dante connects out from (its `external:`).
const DANTE_OUT: &str = "10.99.0.3";
/// Peer servers: a bulk sink, a request/response server, an echo server for
/// held connections, and a UDP echo.
const BULK: u16 = 9100;
const RR: u16 = 9101;
const HOLD: u16 = 9102;
const UDP_ECHO: u16 = 9103;
/// Listening ports of the proxies under test.
const CGT_PORT: u16 = 7893;
const V2RAY_PORT: u16 = 7894;
const CGT_UDP_PORT: u16 = 7895;
const REDSOCKS_PORT: u16 = 12345;

/// Alternating rounds; the figures are medians over them.
const ROUNDS: usize = 5;
const BULK_BYTES: u64 = 256 << 20;
const RR_TIME: Duration = Duration::from_millis(1500);
/// Client threads making short connections at once.
const RR_THREADS: usize = 4;
const RR_SIZE: usize = 64;
const UDP_TIME: Duration = Duration::from_millis(1500);
/// Datagrams in flight in the UDP echo test.
const UDP_WINDOW: usize = 32;
const HOLD_CONNS: usize = 1000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    Cgtproxy,
    V2ray,
    Redsocks,
    /// The app speaks SOCKS5 to microsocks itself: the upstream's own ceiling.
    Socks,
    Direct,
}

const ALL: [Via; 5] = [
    Via::Cgtproxy,
    Via::V2ray,
    Via::Redsocks,
    Via::Socks,
    Via::Direct,
];

impl Via {
    fn name(self) -> &'static str {
        match self {
            Via::Cgtproxy => "cgtproxy forward",
            Via::V2ray => "v2ray dokodemo-door",
            Via::Redsocks => "redsocks",
            Via::Socks => "app -> microsocks",
            Via::Direct => "direct (no proxy)",
        }
    }

    /// The app's cgroup for TCP.
    fn app(self) -> &'static str {
        match self {
            Via::Cgtproxy => "fwd/app-cgt",
            Via::V2ray => "fwd/app-v2ray",
            Via::Redsocks => "fwd/app-redsocks",
            Via::Socks | Via::Direct => "fwd/app-direct",
        }
    }

    /// The proxy's log file in the lab directory.
    fn log(self) -> Option<&'static str> {
        match self {
            Via::Cgtproxy => Some("forward.log"),
            Via::V2ray => Some("v2ray.log"),
            Via::Redsocks => Some("redsocks.log"),
            Via::Socks | Via::Direct => None,
        }
    }

    /// The app's cgroup for UDP, if this proxy carries UDP: cgtproxy's UDP goes
    /// to a target whose upstream is dante.
    fn udp_app(self) -> Option<&'static str> {
        match self {
            Via::Cgtproxy => Some("fwd/app-cgtu"),
            Via::Redsocks | Via::Socks => None,
            v => Some(v.app()),
        }
    }
}

/// Figures of one proxy: one value per round.
#[derive(Default)]
struct Figures {
    gbps: Vec<f64>,
    conn_per_s: Vec<f64>,
    conn_errors: u64,
    udp_kpps: Vec<f64>,
    /// The proxy's CPU time (user + system) per GB relayed, in seconds.
    cpu_s_per_gb: Vec<f64>,
    /// The proxy's CPU time per short connection, in microseconds.
    cpu_us_per_conn: Vec<f64>,
    rss_idle_kib: u64,
    rss_1k_kib: u64,
    /// Why there is no UDP figure.
    udp_note: Option<String>,
}

/// Processes started by this section, killed when it ends.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs the comparison in `lab`; returns its table and its bench-json keys.
pub fn bench(lab: &mut Lab, started: Instant) -> (String, Map<String, Value>) {
    step("forwarder comparison: setting up", started);
    for tool in ["microsocks", "danted", "v2ray", "redsocks"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "the forwarder comparison needs {tool}: dist/ensure-deps.sh microsocks dante-server v2ray redsocks"
        );
    }
    let peer = lab.peer.as_ref().expect("peer namespace").pid();
    let mut procs = Procs(Vec::new());
    for rel in [
        "fwd/app-cgt",
        "fwd/app-cgtu",
        "fwd/app-v2ray",
        "fwd/app-redsocks",
        "fwd/app-direct",
        "fwd/peer",
    ] {
        fs::create_dir_all(lab.cg(rel)).unwrap();
    }
    // Hundreds of short connections a second: let clients reuse TIME_WAIT ports.
    let tune = "sysctl -qw net.ipv4.tcp_tw_reuse=1 net.ipv4.ip_local_port_range='10000 65000'";
    sh(tune);
    sh(&format!(
        "nsenter -t {peer} -n sh -c \"ip addr add {DANTE_OUT}/24 dev veth1 && {tune}\""
    ));

    // The peer: servers, microsocks, dante.
    let mut server = spawn_in(
        lab,
        "fwd/peer",
        Some(peer),
        &format!("'{}' fwd-serve", exe()),
        Stdio::piped(),
    );
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready", "forward bench servers did not start");
    procs.0.push(server);
    let dir = lab.dir.clone();
    let log = |name: &str| dir.join(name);
    procs.0.push(spawn_logged(
        lab,
        "fwd/peer",
        Some(peer),
        &format!("microsocks -i {PEER} -p {MICROSOCKS}"),
        &log("microsocks.log"),
    ));
    let dante_conf = log("danted.conf");
    fs::write(
        &dante_conf,
        format!(
            "logoutput: stderr
internal: {PEER} port = {DANTE}
external: {DANTE_OUT}
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 }}
socks pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 }}
"
        ),
    )
    .unwrap();
    procs.0.push(spawn_logged(
        lab,
        "fwd/peer",
        Some(peer),
        &format!(
            "danted -f '{}' -p '{}'",
            dante_conf.display(),
            log("danted.pid").display()
        ),
        &log("danted.log"),
    ));
    wait_listen(Some(peer), MICROSOCKS);
    wait_listen(Some(peer), DANTE);

    // Our side: the daemon's rules, then the three proxies.
    let config = daemon_config(lab);
    lab.start_daemon_with(&config);
    let cgt = spawn_logged(
        lab,
        "fwd/proxy-cgt",
        None,
        &format!(
            "'{}' forward --config '{}'",
            super::DAEMON,
            config.display()
        ),
        &log("forward.log"),
    );
    let cgt_pid = cgt.id();
    procs.0.push(cgt);
    let v2ray_conf = log("v2ray.json");
    fs::write(&v2ray_conf, v2ray_config().to_string()).unwrap();
    let v2ray = spawn_logged(
        lab,
        "fwd/proxy-v2ray",
        None,
        &format!("v2ray -config '{}'", v2ray_conf.display()),
        &log("v2ray.log"),
    );
    let v2ray_pid = v2ray.id();
    procs.0.push(v2ray);
    let rs_conf = log("redsocks.conf");
    fs::write(
        &rs_conf,
        format!(
            "base {{ log_debug = off; log_info = off; log = stderr; daemon = off; redirector = iptables; }}
redsocks {{ local_ip = 127.0.0.1; local_port = {REDSOCKS_PORT}; ip = {PEER}; port = {MICROSOCKS}; type = socks5; }}
"
        ),
    )
    .unwrap();
    let redsocks = spawn_logged(
        lab,
        "fwd/proxy-redsocks",
        None,
        &format!("redsocks -c '{}'", rs_conf.display()),
        &log("redsocks.log"),
    );
    let redsocks_pid = redsocks.id();
    procs.0.push(redsocks);
    // redsocks takes TCP by NAT: redirect the app cgroup's connections.
    let nat = log("redsocks.nft");
    fs::write(
        &nat,
        format!(
            "table ip fwdbench {{
                chain out {{
                    type nat hook output priority -100; policy accept;
                    socket cgroupv2 level 3 \"{}/fwd/app-redsocks\" ip daddr {PEER} meta l4proto tcp redirect to :{REDSOCKS_PORT}
                }}
            }}",
            lab.base
        ),
    )
    .unwrap();
    super::nft(&["-f", nat.to_str().unwrap()]);
    for port in [CGT_PORT, CGT_UDP_PORT, V2RAY_PORT, REDSOCKS_PORT] {
        wait_listen(None, port);
    }
    let pids = |via| match via {
        Via::Cgtproxy => Some(cgt_pid),
        Via::V2ray => Some(v2ray_pid),
        Via::Redsocks => Some(redsocks_pid),
        Via::Socks | Via::Direct => None,
    };

    let mut figs: Vec<Figures> = ALL.iter().map(|_| Figures::default()).collect();
    // Runs a client mode from `app`; the SOCKS row's client speaks SOCKS5 itself.
    let run = |via: Via, app: &str, args: &[&str]| {
        let mut args = args.to_vec();
        let socks = format!("socks={PEER}:{MICROSOCKS}");
        if via == Via::Socks {
            args.push(&socks);
        }
        lab.client_in(app, &args)
    };
    let (rr, ms) = (RR.to_string(), RR_TIME.as_millis().to_string());
    let rr_args = ["fwd-rr", PEER, &rr, &ms, &RR_THREADS.to_string()];
    // One untimed pass: first connections, UDP associations, lazy allocations.
    for via in ALL {
        run(via, via.app(), &["fwd-rr", PEER, &rr, "200", "1"]);
    }
    for (i, via) in ALL.iter().enumerate() {
        if let Some(pid) = pids(*via) {
            figs[i].rss_idle_kib = rss_kib(pid);
        }
    }
    let bulk = ["fwd-bulk", PEER, &BULK.to_string(), &BULK_BYTES.to_string()];
    let udp_args = [
        "fwd-udp",
        PEER,
        &UDP_ECHO.to_string(),
        &UDP_TIME.as_millis().to_string(),
    ];
    for round in 0..ROUNDS {
        step(&format!("forwarder round {}", round + 1), started);
        for (i, via) in ALL.iter().enumerate() {
            let f = &mut figs[i];
            let pid = pids(*via);
            let cpu0 = pid.map(cpu_secs);
            let (bytes, secs, _) = parse(&run(*via, via.app(), &bulk));
            f.gbps.push(bytes * 8.0 / secs / 1e9);
            if let (Some(p), Some(c)) = (pid, cpu0) {
                f.cpu_s_per_gb.push((cpu_secs(p) - c) / (bytes / 1e9));
            }
            let cpu0 = pid.map(cpu_secs);
            let (n, secs, errors) = parse(&run(*via, via.app(), &rr_args));
            f.conn_per_s.push(n / secs);
            f.conn_errors += errors as u64;
            if let (Some(p), Some(c)) = (pid, cpu0) {
                f.cpu_us_per_conn.push((cpu_secs(p) - c) / n * 1e6);
            }
            if let Some(app) = via.udp_app() {
                let (n, secs, _) = parse(&run(*via, app, &udp_args));
                // No answer at all (the proxy carries no UDP here): not a figure.
                if n > 0.0 {
                    f.udp_kpps.push(n / secs / 1e3);
                } else if f.udp_note.is_none() {
                    // Its log and dante's say where the datagrams died.
                    let tail = |file: &str| {
                        let text = fs::read_to_string(log(file)).unwrap_or_default();
                        let last: Vec<&str> = text.lines().rev().take(2).collect();
                        last.join(" | ")
                    };
                    f.udp_note = Some(format!(
                        "no UDP answer; its log: {}; dante: {}",
                        via.log().map(tail).unwrap_or_default(),
                        tail("danted.log")
                    ));
                }
            }
        }
    }
    step("forwarder RSS with 1,000 open connections", started);
    for (i, via) in ALL.iter().enumerate() {
        if let Some(pid) = pids(*via) {
            figs[i].rss_1k_kib = rss_with_held(lab, via.app(), pid);
        }
    }
    lab.stop_daemon();
    super::nft(&["delete table ip fwdbench"]);
    drop(procs);
    report(&figs)
}

/// Opens [`HOLD_CONNS`] connections from `app` (each with one echo round trip,
/// so that every tunnel is complete), then reads the RSS of `pid`.
fn rss_with_held(lab: &Lab, app: &str, pid: u32) -> u64 {
    let mut child = spawn_in(
        lab,
        app,
        None,
        &format!("'{}' client fwd-hold {PEER} {HOLD} {HOLD_CONNS}", exe()),
        Stdio::piped(),
    );
    let stdin: Option<ChildStdin> = child.stdin.take();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(
        line.trim(),
        "held",
        "{app}: holding {HOLD_CONNS} connections"
    );
    // Let a garbage collector (v2ray's) or lazy frees settle first.
    std::thread::sleep(Duration::from_millis(1000));
    let rss = rss_kib(pid);
    drop(stdin); // the client closes everything and exits
    let _ = child.wait();
    std::thread::sleep(Duration::from_millis(300));
    rss
}

/// CPU time (user + system, all threads) that `pid` used so far, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|w| w.parse().unwrap_or(0.0))
        .collect();
    // utime and stime are fields 14 and 15 of stat(5); `rest` starts at field 3.
    // Clock ticks are 100 per second on every Linux ABI that sets USER_HZ.
    (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / 100.0
}

fn med(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    median(&mut v.to_vec())
}

/// The table, and the bench-json keys.
fn report(figs: &[Figures]) -> (String, Map<String, Value>) {
    let mut t = String::new();
    let at = |via: Via| &figs[ALL.iter().position(|v| *v == via).unwrap()];
    let (cgt, v2ray, rs) = (at(Via::Cgtproxy), at(Via::V2ray), at(Via::Redsocks));
    let _ = writeln!(
        t,
        "forwarder comparison: microsocks (TCP) / dante (UDP) upstream in the peer namespace; medians of {ROUNDS} alternating rounds; CPU is the proxy's; RSS in KiB"
    );
    let _ = writeln!(
        t,
        "{:<22} {:>10} {:>10} {:>11} {:>8} {:>8} {:>9} {:>9}",
        "via",
        "TCP Gbit/s",
        "CPU s/GB",
        "connects/s",
        "CPU us/c",
        "UDP kpps",
        "RSS idle",
        "RSS 1k c"
    );
    let opt = |x: f64, prec: usize| {
        if x.is_nan() {
            "n/a".to_owned()
        } else {
            format!("{x:.prec$}")
        }
    };
    for (via, f) in ALL.iter().zip(figs) {
        let rss = |k: u64| {
            if matches!(via, Via::Direct | Via::Socks) {
                "-".to_owned()
            } else {
                k.to_string()
            }
        };
        let _ = writeln!(
            t,
            "{:<22} {:>10} {:>10} {:>11} {:>8} {:>8} {:>9} {:>9}",
            via.name(),
            opt(med(&f.gbps), 2),
            opt(med(&f.cpu_s_per_gb), 2),
            opt(med(&f.conn_per_s), 0),
            opt(med(&f.cpu_us_per_conn), 0),
            opt(med(&f.udp_kpps), 1),
            rss(f.rss_idle_kib),
            rss(f.rss_1k_kib),
        );
    }
    for (via, f) in ALL.iter().zip(figs) {
        if let Some(note) = &f.udp_note {
            let _ = writeln!(t, "  {}: {note}", via.name());
        }
    }
    let errors: u64 = figs.iter().map(|f| f.conn_errors).sum();
    if errors > 0 {
        for (via, f) in ALL.iter().zip(figs) {
            if f.conn_errors > 0 {
                let _ = writeln!(
                    t,
                    "  {}: {} failed short connections",
                    via.name(),
                    f.conn_errors
                );
            }
        }
    }
    let ratio = |a: f64, b: f64| round3(a / b);
    let tcp_v2 = ratio(med(&cgt.gbps), med(&v2ray.gbps));
    let conn_v2 = ratio(med(&cgt.conn_per_s), med(&v2ray.conn_per_s));
    let rss_v2 = ratio(cgt.rss_1k_kib as f64, v2ray.rss_1k_kib as f64);
    let _ = writeln!(
        t,
        "targets: TCP {tcp_v2:.2}x v2ray (>= 1.5), connects {conn_v2:.2}x v2ray (>= 1.5), \
         RSS {rss_v2:.2}x v2ray (<= 0.25); vs redsocks: TCP {:.2}x, connects {:.2}x (> 1)",
        ratio(med(&cgt.gbps), med(&rs.gbps)),
        ratio(med(&cgt.conn_per_s), med(&rs.conn_per_s)),
    );
    let _ = writeln!(
        t,
        "({BULK_BYTES_MIB} MiB bulk upload, {RR_THREADS} threads of connect + {RR_SIZE} B request/answer for {} s, UDP echo with {UDP_WINDOW} in flight for {} s, {HOLD_CONNS} idle connections)",
        RR_TIME.as_secs_f64(),
        UDP_TIME.as_secs_f64(),
    );
    let num = |x: f64| {
        if x.is_finite() { json!(x) } else { Value::Null }
    };
    let mut m = Map::new();
    let mut put = |k: &str, v: Value| {
        m.insert(k.to_owned(), v);
    };
    put("fwd_tcp_gbps", num(round3(med(&cgt.gbps))));
    put("fwd_tcp_ratio_vs_v2ray", num(tcp_v2));
    put("fwd_conn_per_s", num(med(&cgt.conn_per_s).round()));
    put("fwd_conn_ratio_vs_v2ray", num(conn_v2));
    put("fwd_udp_kpps", num(round1(med(&cgt.udp_kpps))));
    put(
        "fwd_udp_ratio_vs_v2ray",
        num(ratio(med(&cgt.udp_kpps), med(&v2ray.udp_kpps))),
    );
    put("fwd_rss_kib_1k_conns", json!(cgt.rss_1k_kib));
    put("fwd_rss_ratio_vs_v2ray", num(rss_v2));
    put(
        "fwd_tcp_ratio_vs_redsocks",
        num(ratio(med(&cgt.gbps), med(&rs.gbps))),
    );
    put(
        "fwd_conn_ratio_vs_redsocks",
        num(ratio(med(&cgt.conn_per_s), med(&rs.conn_per_s))),
    );
    put(
        "fwd_rss_ratio_vs_redsocks",
        num(ratio(cgt.rss_1k_kib as f64, rs.rss_1k_kib as f64)),
    );
    put("fwd_cpu_s_per_gb", num(round3(med(&cgt.cpu_s_per_gb))));
    put(
        "fwd_cpu_us_per_conn",
        num(med(&cgt.cpu_us_per_conn).round()),
    );
    put(
        "fwd_v2ray_cpu_s_per_gb",
        num(round3(med(&v2ray.cpu_s_per_gb))),
    );
    put(
        "fwd_v2ray_cpu_us_per_conn",
        num(med(&v2ray.cpu_us_per_conn).round()),
    );
    put("fwd_v2ray_tcp_gbps", num(round3(med(&v2ray.gbps))));
    put("fwd_v2ray_conn_per_s", num(med(&v2ray.conn_per_s).round()));
    put("fwd_v2ray_udp_kpps", num(round1(med(&v2ray.udp_kpps))));
    put("fwd_v2ray_rss_kib_1k_conns", json!(v2ray.rss_1k_kib));
    put("fwd_redsocks_tcp_gbps", num(round3(med(&rs.gbps))));
    put("fwd_redsocks_conn_per_s", num(med(&rs.conn_per_s).round()));
    put("fwd_redsocks_rss_kib_1k_conns", json!(rs.rss_1k_kib));
    let ceiling = at(Via::Socks);
    put("fwd_microsocks_tcp_gbps", num(round3(med(&ceiling.gbps))));
    put(
        "fwd_microsocks_conn_per_s",
        num(med(&ceiling.conn_per_s).round()),
    );
    let direct = at(Via::Direct);
    put("fwd_direct_tcp_gbps", num(round3(med(&direct.gbps))));
    put(
        "fwd_direct_conn_per_s",
        num(med(&direct.conn_per_s).round()),
    );
    put("fwd_direct_udp_kpps", num(round1(med(&direct.udp_kpps))));
    (t, m)
}

const BULK_BYTES_MIB: u64 = BULK_BYTES >> 20;

/// "A B C" from a client: two or three numbers.
fn parse(out: &str) -> (f64, f64, f64) {
    let v: Vec<f64> = out
        .split_whitespace()
        .map(|w| w.parse().unwrap_or_else(|_| panic!("client said {out:?}")))
        .collect();
    (v[0], v[1], v.get(2).copied().unwrap_or(0.0))
}

fn exe() -> String {
    std::env::current_exe().unwrap().display().to_string()
}

/// The daemon's configuration: target `cgt` (microsocks) and `cgtu` (dante,
/// for UDP) served by `cgtproxy forward`, `v2ray` served by v2ray.
fn daemon_config(lab: &Lab) -> std::path::PathBuf {
    let re = |app: &str| format!("^/{}/fwd/{app}$", regex::escape(&lab.base));
    let cfg = json!({
        "version": 1,
        "cgroup-root": lab.mount,
        "route-table": 300,
        "bypass": ["127.0.0.0/8", "::1/128"],
        "tproxies": {
            "cgt": {"port": CGT_PORT, "mark": 3000,
                    "upstream": format!("socks5://{PEER}:{MICROSOCKS}")},
            "cgtu": {"port": CGT_UDP_PORT, "mark": 3002,
                     "upstream": format!("socks5://{PEER}:{DANTE}")},
            "v2ray": {"port": V2RAY_PORT, "mark": 3001},
        },
        "rules": [
            {"match": re("app-cgt"), "tproxy": "cgt"},
            {"match": re("app-cgtu"), "tproxy": "cgtu"},
            {"match": re("app-v2ray"), "tproxy": "v2ray"},
        ],
    });
    let p = lab.dir.join("forward-config.json");
    fs::write(&p, cfg.to_string()).unwrap();
    p
}

/// dokodemo-door with TPROXY in; SOCKS out, TCP to microsocks, UDP to dante.
fn v2ray_config() -> Value {
    let socks = |tag: &str, port: u16| {
        json!({"tag": tag, "protocol": "socks",
               "settings": {"servers": [{"address": PEER, "port": port}]}})
    };
    json!({
        "log": {"loglevel": "warning"},
        "inbounds": [{
            "port": V2RAY_PORT,
            "protocol": "dokodemo-door",
            "settings": {"network": "tcp,udp", "followRedirect": true},
            "streamSettings": {"sockopt": {"tproxy": "tproxy"}},
        }],
        "outbounds": [socks("microsocks", MICROSOCKS), socks("dante", DANTE)],
        "routing": {"rules": [{"type": "field", "network": "udp", "outboundTag": "dante"}]},
    })
}

/// Runs shell command `cmd` in cgroup `rel` (below the bench's subtree), in the
/// network namespace of `netns` if given.
fn spawn_in(lab: &Lab, rel: &str, netns: Option<u32>, cmd: &str, stdout: Stdio) -> Child {
    let dir = lab.cg(rel);
    fs::create_dir_all(&dir).unwrap();
    let enter = netns.map_or(String::new(), |p| format!("nsenter -t {p} -n "));
    Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > '{}/cgroup.procs' && exec {enter}{cmd}",
            dir.display()
        ))
        .stdin(Stdio::piped())
        .stdout(stdout)
        .spawn()
        .unwrap()
}

/// Like [`spawn_in`], with stdout and stderr going to `log`.
fn spawn_logged(lab: &Lab, rel: &str, netns: Option<u32>, cmd: &str, log: &Path) -> Child {
    let cmd = format!("{cmd} >'{}' 2>&1", log.display());
    spawn_in(lab, rel, netns, &cmd, Stdio::null())
}

/// Waits until something listens on TCP `port` (in `netns` if given).
fn wait_listen(netns: Option<u32>, port: u16) {
    let enter = netns.map_or(String::new(), |p| format!("nsenter -t {p} -n "));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("{enter}ss -Hltn 'sport = :{port}'"))
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout).contains(&format!(":{port}")) {
            return;
        }
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// Traffic: the peer's servers and the app's clients, as bench subcommands.

/// `fwd-serve`, in the peer namespace: the bulk sink (an 8-byte length, then
/// that many bytes, answered with the count), request/answer (read
/// [`RR_SIZE`] bytes, answer as many, close), echo for held connections, and a
/// UDP echo. Prints "ready".
pub fn serve() {
    let udp = UdpSocket::bind((PEER, UDP_ECHO)).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        loop {
            if let Ok((n, from)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(&buf[..n], from);
            }
        }
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio::net::TcpListener;
        let bulk = TcpListener::bind((PEER, BULK)).await.unwrap();
        let rr = TcpListener::bind((PEER, RR)).await.unwrap();
        let hold = TcpListener::bind((PEER, HOLD)).await.unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = bulk.accept().await {
                tokio::spawn(async move {
                    let Ok(len) = s.read_u64().await else { return };
                    let mut buf = vec![0u8; 1 << 18];
                    let mut got = 0u64;
                    while got < len {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got += n as u64,
                        }
                    }
                    let _ = s.write_u64(got).await;
                });
            }
        });
        tokio::spawn(async move {
            while let Ok((mut s, _)) = rr.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; RR_SIZE];
                    if s.read_exact(&mut buf).await.is_ok() {
                        let _ = s.write_all(&buf).await;
                    }
                });
            }
        });
        tokio::spawn(async move {
            while let Ok((mut s, _)) = hold.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        println!("ready");
        std::io::stdout().flush().unwrap();
        std::future::pending::<()>().await;
    });
}

/// The app's side, as `client fwd-…`:
/// `fwd-bulk HOST PORT BYTES` → "BYTES SECONDS";
/// `fwd-rr HOST PORT MILLIS THREADS` → "CONNECTIONS SECONDS ERRORS";
/// `fwd-udp HOST PORT MILLIS` → "ANSWERS SECONDS";
/// `fwd-hold HOST PORT N` → "held" once N connections are open, until stdin closes.
/// A last argument `socks=HOST:PORT` makes TCP modes go through that SOCKS5
/// server, spoken to by the client itself.
pub fn client(args: &[String]) {
    let addr: SocketAddr = format!("{}:{}", args[1], args[2]).parse().unwrap();
    let socks: Option<SocketAddr> = args
        .last()
        .and_then(|a| a.strip_prefix("socks="))
        .map(|a| a.parse().unwrap());
    match args[0].as_str() {
        "fwd-bulk" => {
            let bytes: u64 = args[3].parse().unwrap();
            let buf = vec![0x5au8; 1 << 20];
            let t0 = Instant::now();
            let mut s = open(addr, socks).expect("connect");
            s.write_all(&bytes.to_be_bytes()).unwrap();
            let mut left = bytes;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                s.write_all(&buf[..n]).unwrap();
                left -= n as u64;
            }
            let mut ack = [0u8; 8];
            s.read_exact(&mut ack).unwrap();
            assert_eq!(u64::from_be_bytes(ack), bytes, "bulk bytes lost");
            println!("{bytes} {}", t0.elapsed().as_secs_f64());
        }
        "fwd-rr" => {
            let window = Duration::from_millis(args[3].parse().unwrap());
            let threads: usize = args[4].parse().unwrap();
            let t0 = Instant::now();
            let workers: Vec<_> = (0..threads)
                .map(|_| std::thread::spawn(move || rr_loop(addr, socks, t0 + window)))
                .collect();
            let (mut n, mut errors) = (0, 0);
            for w in workers {
                let (a, b) = w.join().unwrap();
                n += a;
                errors += b;
            }
            println!("{n} {} {errors}", t0.elapsed().as_secs_f64());
        }
        "fwd-udp" => {
            let window = Duration::from_millis(args[3].parse().unwrap());
            udp_echo(addr, window);
        }
        "fwd-hold" => {
            let n: usize = args[3].parse().unwrap();
            let mut held = Vec::with_capacity(n);
            for i in 0..n {
                let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("#{i}: {e}"));
                s.write_all(b"x").unwrap();
                let mut b = [0u8; 1];
                s.read_exact(&mut b).unwrap_or_else(|e| panic!("#{i}: {e}"));
                held.push(s);
            }
            println!("held");
            std::io::stdout().flush().unwrap();
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            for s in &held {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        other => panic!("unknown client mode {other}"),
    }
}

/// Short connections until `deadline`: connect, send, read the answer, close
/// with RST (no TIME_WAIT on the app's side). Returns (completed, failed).
fn rr_loop(addr: SocketAddr, socks: Option<SocketAddr>, deadline: Instant) -> (u64, u64) {
    let (mut n, mut errors) = (0, 0);
    let req = [0x42u8; RR_SIZE];
    while Instant::now() < deadline {
        let once = || -> std::io::Result<()> {
            let mut s = open(addr, socks)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(&req)?;
            let mut ans = [0u8; RR_SIZE];
            s.read_exact(&mut ans)?;
            reset_on_close(&s)?;
            Ok(())
        };
        match once() {
            Ok(()) => n += 1,
            Err(_) => {
                errors += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    (n, errors)
}

/// A TCP connection to `addr`, through SOCKS5 server `socks` if given.
fn open(addr: SocketAddr, socks: Option<SocketAddr>) -> std::io::Result<TcpStream> {
    let Some(server) = socks else {
        return TcpStream::connect(addr);
    };
    let SocketAddr::V4(v4) = addr else {
        panic!("SOCKS client: IPv4 only");
    };
    let mut s = TcpStream::connect(server)?;
    s.write_all(&[5, 1, 0])?;
    let mut choice = [0u8; 2];
    s.read_exact(&mut choice)?;
    let mut req = vec![5, 1, 0, 1];
    req.extend(v4.ip().octets());
    req.extend(v4.port().to_be_bytes());
    s.write_all(&req)?;
    // Version, status, reserved, and an IPv4 bound address (microsocks's).
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply)?;
    if choice != [5, 0] || reply[1] != 0 {
        return Err(std::io::Error::other("SOCKS5 server refused"));
    }
    Ok(s)
}

/// UDP echo with [`UDP_WINDOW`] datagrams in flight; prints "ANSWERS SECONDS"
/// ("0 …" when nothing ever answers).
fn udp_echo(addr: SocketAddr, window: Duration) {
    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
    s.connect(addr).unwrap();
    let msg = [0x17u8; 64];
    let mut buf = [0u8; 2048];
    // First datagram: sets up the flow (and its SOCKS association).
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let up = (0..10).any(|_| {
        let _ = s.send(&msg);
        s.recv(&mut buf).is_ok()
    });
    if !up {
        println!("0 1");
        return;
    }
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let t0 = Instant::now();
    let mut n = 0u64;
    for _ in 0..UDP_WINDOW {
        let _ = s.send(&msg);
    }
    while t0.elapsed() < window {
        match s.recv(&mut buf) {
            Ok(_) => {
                n += 1;
                let _ = s.send(&msg);
            }
            // Lost datagrams: refill the window.
            Err(_) => {
                for _ in 0..UDP_WINDOW {
                    let _ = s.send(&msg);
                }
            }
        }
    }
    println!("{n} {}", t0.elapsed().as_secs_f64());
}
