//! Kernel benchmark: update latency, scale, datapath cost and footprint of
//! the daemon, measured against the real kernel. Root only; run with
//! `cargo bench --bench kernel` (Cargo builds the release daemon binary first).
//!
//! Like the kernel tests, the benchmark re-executes itself under
//! `unshare --mount --net`, so its nftables table, routes and mounts die with it. Its
//! cgroups live in the host's one cgroup2 hierarchy, below `/cgtproxy-bench-PID`,
//! which is removed at the end, on panic, and once more by the outer process if the
//! inner one died without cleaning up.
//!
//! Kernel updates are observed the way an outsider sees them: a NETLINK_NETFILTER
//! socket subscribed to NFNLGRP_NFTABLES reports every committed set element, and its
//! key is the cgroup directory's inode number.
//!
//! The cgroups the daemon classifies sit at levels 2 to 8 below `/BASE`, along
//! a spine `/BASE/d2/…/d8` of unclassified cgroups where the datapath client
//! runs (see `kernel/datapath.rs` for how the datapath is measured).
//!
//! The last line printed is `bench-json: {...}`. `CGTPROXY_BENCH_ONLY=forward`
//! runs only the forwarder comparison (see `kernel/forward.rs`),
//! `CGTPROXY_BENCH_ONLY=update` only the update latency at 10,000 cgroups and
//! its nft CLI comparison, `CGTPROXY_BENCH_ONLY=memory` only start-up and RSS
//! at 10,000 and 50,000.
//! `CGTPROXY_BENCH_QUICK=1` is for iterating on the benchmark itself: no
//! forwarder comparison, fewer and shorter datapath rounds, figures too noisy
//! to quote.

use std::collections::HashMap;
use std::fs::{self, File};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use cgtproxy::kernel::nlmsg::{attr, attrs, messages};
use netlink_sys::{Socket, constants::NETLINK_NETFILTER};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::socket::{MsgFlags, recv, setsockopt, sockopt};
use nix::unistd::Pid;
use serde_json::json;

#[path = "kernel/bpfstats.rs"]
mod bpfstats;
#[path = "kernel/datapath.rs"]
mod datapath;
#[path = "kernel/forward.rs"]
mod forward;
#[path = "../tests/support/netns.rs"]
mod netns;

use netns::{Netns, remove_tree};

/// Set in the environment of the re-executed process: the name of its cgroup subtree.
const INNER: &str = "CGTPROXY_BENCH_BASE";
const DAEMON: &str = env!("CARGO_BIN_EXE_cgtproxy");

const PEER: &str = "10.99.0.2";
/// The source port of untracked datagrams, below the ephemeral range: both
/// client namespaces leave them untracked (see `datapath::Sides`).
const UNTRACKED_SPORT: u16 = 8083;

/// How many new cgroups the update-latency runs create, one at a time.
const UPDATES: usize = 500;
/// How many `nft add element` processes the comparison runs.
const NFT_UPDATES: usize = 150;
/// Pause between two measured creations, so latency is measured, not queueing.
const SPACING: Duration = Duration::from_millis(2);
/// The deepest level of the tree: classified cgroups at levels 2 to this.
const DEEPEST: u32 = 8;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("fwd-serve") => forward::serve(),
        Some("client") => client(&args[2..]),
        // A debugging aid: print the keys of level-map elements as they are added.
        Some("monitor") => {
            let ev = Events::subscribe();
            loop {
                std::thread::sleep(Duration::from_secs(1));
                let mut seen = ev.0.0.lock().unwrap();
                for (key, _) in seen.added.drain() {
                    println!("{key}");
                }
            }
        }
        _ => match std::env::var(INNER) {
            Ok(base) => bench(&base),
            Err(_) => outer(),
        },
    }
}

// ---------------------------------------------------------------------------
// Outer process: namespaces, and a last-resort cleanup.

fn outer() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "the kernel benchmark needs root (namespaces, cgroups, nftables); run `sudo -E cargo bench --bench kernel`"
        );
        std::process::exit(1);
    }
    let base = format!("cgtproxy-bench-{}", std::process::id());
    let started = Instant::now();
    let mut inner = Command::new("unshare")
        .args(["--mount", "--net", "--propagation", "private", "--"])
        .arg(std::env::current_exe().expect("bench binary path"))
        .env(INNER, &base)
        .spawn()
        .expect("running unshare");
    // Ctrl-C reaches the whole process group: the inner process dies, the daemon
    // cleans up after itself, and this process stays to remove the cgroups. Block
    // the signals only now: children inherit the signal mask.
    let mut sigs = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        sigs.add(s);
    }
    sigs.thread_block().expect("blocking signals");
    let status = inner.wait().expect("waiting for the benchmark");
    // The inner process removes its subtree itself; if it was killed, do it here,
    // through the host's cgroup2 mount.
    if let Some(root) = host_cgroup2() {
        for left in [root.join(&base), root.join(format!("{base}-apart"))] {
            if left.exists() {
                eprintln!("removing leftover {}", left.display());
                remove_tree(&left);
            }
        }
    }
    eprintln!("total run time: {:.1} s", started.elapsed().as_secs_f64());
    std::process::exit(status.code().unwrap_or(1));
}

/// The first cgroup2 mount in /proc/self/mountinfo.
fn host_cgroup2() -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let point = pre.split(' ').nth(4)?;
        (post.split(' ').next() == Some("cgroup2")).then(|| PathBuf::from(point))
    })
}

/// Makes closing `s` send RST: no TIME_WAIT, so a connect loop never runs out
/// of ports.
fn reset_on_close(s: &TcpStream) -> nix::Result<()> {
    setsockopt(
        s,
        sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )
}

/// Runs `nft ARGS` and insists that it succeeds.
fn nft(args: &[&str]) {
    let out = Command::new("nft")
        .args(args)
        .output()
        .expect("running nft");
    assert!(
        out.status.success(),
        "nft {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sh(cmd: &str) {
    let out = Command::new("sh").args(["-c", cmd]).output().expect("sh");
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------
// The lab: cgroup2 mounts, the peer namespace, the daemon.

struct Lab {
    dir: PathBuf,
    /// Private cgroup2 mount the daemon is configured with (a non-standard path).
    mount: PathBuf,
    /// Name of our subtree below the cgroup2 root, without a leading `/`.
    base: String,
    peer: Option<Netns>,
    daemon: Option<Daemon>,
}

impl Lab {
    fn new(base: &str) -> Lab {
        let dir = std::env::temp_dir().join(base);
        fs::create_dir_all(&dir).unwrap();
        let mut lab = Lab {
            mount: dir.join("cgroup2"),
            dir,
            base: base.to_owned(),
            peer: None,
            daemon: None,
        };
        fs::create_dir_all(&lab.mount).unwrap();
        sh(&format!("mount -t cgroup2 none '{}'", lab.mount.display()));
        // nft takes cgroupsv2 keys as paths below /sys/fs/cgroup; this host mounts
        // cgroup2 elsewhere (hybrid), so give our mount namespace one there too.
        sh("mount -t cgroup2 none /sys/fs/cgroup");
        fs::create_dir_all(lab.cg(&Lab::spine(DEEPEST))).unwrap();
        fs::create_dir_all(lab.mount.join(lab.apart()).join(Lab::spine(DEEPEST))).unwrap();
        fs::create_dir_all(lab.dir.join("cgns")).unwrap();
        sh("ip link set lo up");
        // The peer namespace plays "the internet".
        let peer = Netns::new();
        let ppid = peer.pid();
        lab.peer = Some(peer);
        sh(&format!(
            "ip link add veth0 type veth peer name veth1 netns {ppid} &&
             ip addr add 10.99.0.1/24 dev veth0 && ip link set veth0 up &&
             nsenter -t {ppid} -n sh -c 'ip link set lo up &&
               ip addr add {PEER}/24 dev veth1 && ip link set veth1 up'"
        ));
        lab
    }

    /// Cgroups in the whole hierarchy: the daemon walks all of them, ours and
    /// anything else on the host.
    fn hierarchy_size(&self) -> u64 {
        fs::read_to_string(self.mount.join("cgroup.stat"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("nr_descendants ")?.parse().ok())
            .unwrap_or(0)
    }

    /// A sibling of our subtree, the same spine inside: the eBPF datapath's
    /// baseline clients run there, outside the subtree its programs cover.
    fn apart(&self) -> String {
        format!("{}-apart", self.base)
    }

    /// Filesystem path of cgroup `rel` below our subtree.
    fn cg(&self, rel: &str) -> PathBuf {
        self.mount.join(&self.base).join(rel)
    }

    /// The spine's cgroup at absolute `level`, relative to our subtree
    /// (`/BASE` itself is level 1).
    fn spine(level: u32) -> String {
        (2..=level)
            .map(|l| format!("d{l}"))
            .collect::<Vec<_>>()
            .join("/")
    }

    /// Directory of the deepest classified cgroups (level 8).
    fn leaf_dir(&self) -> PathBuf {
        self.cg(&Lab::spine(DEEPEST - 1))
    }

    fn config(&self) -> PathBuf {
        let x = format!("^/{}/(d[0-9]/)*x[0-9]+$", regex::escape(&self.base));
        let cfg = json!({
            "version": 1,
            "cgroup-root": self.mount,
            "route-table": 300,
            "bypass": ["127.0.0.0/8", "::1/128"],
            "tproxies": {"proxy": {"port": 7893, "mark": 3000}},
            "rules": [{"match": x, "tproxy": "proxy"}],
        });
        let p = self.dir.join("config.json");
        fs::write(&p, cfg.to_string()).unwrap();
        p
    }

    /// Starts the daemon with the eBPF datapath, its programs attached at our
    /// subtree and never at the host's root: it runs in a cgroup namespace
    /// rooted there, with a cgroup2 mount of its own (rule paths are then
    /// relative to the subtree). Returns the time from spawn to READY=1.
    fn start_ebpf_daemon(&mut self) -> Duration {
        let cgns = self.dir.join("cgns");
        let cfg = json!({
            "version": 1,
            "datapath": "ebpf",
            "cgroup-root": cgns,
            "bypass": ["127.0.0.0/8", "::1/128"],
            "tproxies": {"proxy": {"port": 7893, "mark": 3000}},
            "rules": [{"match": "^/(d[0-9]/)*x[0-9]+$", "tproxy": "proxy"}],
        });
        let config = self.dir.join("config-ebpf.json");
        fs::write(&config, cfg.to_string()).unwrap();
        let launch = format!(
            "echo $$ > '{}/cgroup.procs' && exec unshare --cgroup --mount --propagation private sh -c 'mount -t cgroup2 none \"$0\" && exec \"$@\"' '{}' \"$0\" \"$@\"",
            self.mount.join(&self.base).display(),
            cgns.display()
        );
        self.start_daemon_cmd(&config, None, Some(&launch))
    }

    /// Starts the daemon and returns the time from spawn to READY=1.
    fn start_daemon(&mut self) -> Duration {
        let config = self.config();
        self.start_daemon_with(&config)
    }

    /// Starts the daemon with `config` and returns the time from spawn to READY=1.
    fn start_daemon_with(&mut self, config: &Path) -> Duration {
        self.start_daemon_netns(config, None)
    }

    /// Starts the daemon in the network namespace of process `netns`.
    fn start_daemon_in(&mut self, netns: u32) -> Duration {
        let config = self.config();
        self.start_daemon_netns(&config, Some(netns))
    }

    /// Starts the daemon with `config`, in the network namespace of process
    /// `netns` if any (nsenter execs it: its PID is the daemon's), and returns
    /// the time from spawn to READY=1.
    fn start_daemon_netns(&mut self, config: &Path, netns: Option<u32>) -> Duration {
        self.start_daemon_cmd(config, netns, None)
    }

    /// [`Lab::start_daemon_netns`], through the shell command `launch` (which
    /// execs its arguments: the daemon's command line) if given.
    fn start_daemon_cmd(
        &mut self,
        config: &Path,
        netns: Option<u32>,
        launch: Option<&str>,
    ) -> Duration {
        assert!(self.daemon.is_none());
        let notify_path = self.dir.join("notify");
        let _ = fs::remove_file(&notify_path);
        let sock = UnixDatagram::bind(&notify_path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        // Keep draining the notify socket so STATUS= can never fill it.
        let (tx, notify) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                if let Ok(n) = sock.recv(&mut buf) {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    if tx.send((msg, Instant::now())).is_err() {
                        return;
                    }
                } else if tx.send((String::new(), Instant::now())).is_err() {
                    return; // a timeout tick: only checks that someone listens
                }
            }
        });
        let log = self.dir.join("daemon.log");
        let spawned = Instant::now();
        let mut cmd = match (netns, launch) {
            (_, Some(script)) => {
                let mut c = Command::new("sh");
                c.args(["-c", script, DAEMON]);
                c
            }
            (Some(pid), None) => {
                let mut c = Command::new("nsenter");
                c.args(["-t", &pid.to_string(), "-n", DAEMON]);
                c
            }
            (None, None) => Command::new(DAEMON),
        };
        let child = cmd
            .args(["run", "--config"])
            .arg(config)
            .envs(unit_environment())
            .env("NOTIFY_SOCKET", &notify_path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let daemon = Daemon { child, notify, log };
        let deadline = spawned + Duration::from_secs(60);
        let ready = loop {
            match daemon.notify.recv_timeout(Duration::from_millis(500)) {
                Ok((msg, at)) if msg.lines().any(|l| l == "READY=1") => break at,
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "no READY=1 within 60 s; log:\n{}",
                daemon.log()
            );
        };
        self.daemon = Some(daemon);
        ready - spawned
    }

    /// The peer namespace's holder, for `nsenter` and `ip link … netns`.
    fn peer_pid(&self) -> u32 {
        self.peer.as_ref().expect("peer namespace").pid()
    }

    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("daemon running")
    }

    fn stop_daemon(&mut self) {
        let mut d = self.daemon.take().expect("daemon running");
        kill(Pid::from_raw(d.child.id() as i32), Signal::SIGTERM).unwrap();
        let status = d.child.wait().unwrap();
        assert!(status.success(), "daemon exit {status}; log:\n{}", d.log());
        let log = d.log();
        assert!(!log.contains("ERROR"), "daemon logged errors:\n{log}");
    }

    /// The level of cgroup `x{i}`: they are spread evenly over levels 2 to 8.
    fn x_level(i: usize) -> u32 {
        2 + (i % (DEEPEST as usize - 1)) as u32
    }

    /// Cgroup `x{i}` relative to our subtree: in the spine's cgroup one level up.
    fn x_rel(i: usize) -> String {
        let parent = Lab::spine(Lab::x_level(i) - 1);
        if parent.is_empty() {
            format!("x{i}")
        } else {
            format!("{parent}/x{i}")
        }
    }

    /// Creates cgroups `x{from}`..`x{to}` (the daemon's proxy rule).
    fn populate(&self, from: usize, to: usize) {
        for i in from..to {
            fs::create_dir(self.cg(&Lab::x_rel(i))).unwrap();
        }
    }

    /// Runs the bench binary's client in cgroup `rel` and returns its output line.
    fn client_in(&self, rel: &str, args: &[&str]) -> String {
        let out = Command::new("sh")
            .args([
                "-c",
                r#"echo $$ > "$1/cgroup.procs" && shift && exec "$@""#,
                "sh",
            ])
            .arg(self.cg(rel))
            .arg(std::env::current_exe().unwrap())
            .arg("client")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "client {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

/// The `Environment=` settings of the shipped unit, so that the daemon runs
/// here as it does under systemd (its malloc tuning shows in the RSS rows).
fn unit_environment() -> Vec<(String, String)> {
    include_str!("../dist/systemd/cgtproxy.service")
        .lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.child.kill();
            let _ = d.child.wait();
        }
        self.peer.take();
        remove_tree(&self.mount.join(&self.base));
        remove_tree(&self.mount.join(self.apart()));
        // The mounts die with our mount namespace; only the directory is shared.
        let _ = Command::new("umount").arg(&self.mount).status();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

struct Daemon {
    child: Child,
    /// Datagrams from the notify socket, with their arrival time.
    notify: Receiver<(String, Instant)>,
    log: PathBuf,
}

impl Daemon {
    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

// ---------------------------------------------------------------------------
// nftables events: a NETLINK_NETFILTER socket on group NFNLGRP_NFTABLES.

const NFNLGRP_NFTABLES: u32 = 7;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_DATA_VALUE: u16 = 1;

/// Keys of level-map elements seen added, with when the event arrived.
#[derive(Default)]
struct Seen {
    added: HashMap<u64, Instant>,
    /// Any nftables event at all (for waiting until the daemon is quiet).
    last_event: Option<Instant>,
}

/// What the reader thread saw, and the socket (to leave and join the group).
#[derive(Clone)]
struct Events(Arc<(Mutex<Seen>, Condvar)>, Arc<Socket>);

impl Events {
    fn subscribe() -> Events {
        let mut sock = Socket::new(NETLINK_NETFILTER).expect("netlink socket");
        sock.bind_auto().expect("binding the netlink socket");
        sock.add_membership(NFNLGRP_NFTABLES)
            .expect("joining NFNLGRP_NFTABLES");
        // A daemon start with 50,000 cgroups sends 50,000 element events at once;
        // a large buffer keeps us from missing the ones that follow.
        let _ = setsockopt(&sock, sockopt::RcvBufForce, &(64 << 20));
        let fd = sock.as_raw_fd();
        let ev = Events(Arc::default(), Arc::new(sock));
        let shared = ev.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            loop {
                // ENOBUFS (overrun) only means some events were lost: go on.
                let Ok(n) = recv(fd, &mut buf, MsgFlags::empty()) else {
                    continue;
                };
                let now = Instant::now();
                let (lock, cv) = &*shared.0;
                let mut seen = lock.lock().unwrap();
                seen.last_event = Some(now);
                for key in new_level_keys(&buf[..n]) {
                    seen.added.insert(key, now);
                }
                cv.notify_all();
            }
        });
        ev
    }

    /// Runs `f` outside the group. While any socket is in it, the kernel builds
    /// a notification per element committed, and our thread would parse the
    /// 50,000 of a start beside the daemon on two cores: a cost a host without
    /// an nftables listener does not pay.
    fn without<T>(&self, f: impl FnOnce() -> T) -> T {
        let membership = |join: bool| {
            let r = if join {
                self.1.add_membership(NFNLGRP_NFTABLES)
            } else {
                self.1.drop_membership(NFNLGRP_NFTABLES)
            };
            r.expect("changing the NFNLGRP_NFTABLES membership");
        };
        membership(false);
        let out = f();
        membership(true);
        out
    }

    fn clear(&self) {
        self.0.0.lock().unwrap().added.clear();
    }

    /// Waits until every key in `keys` was seen added; returns the arrival times
    /// (None for keys not seen by `deadline`).
    fn wait_all(&self, keys: &[u64], deadline: Instant) -> Vec<Option<Instant>> {
        let (lock, cv) = &*self.0;
        let mut seen = lock.lock().unwrap();
        loop {
            if keys.iter().all(|k| seen.added.contains_key(k)) {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            seen = cv.wait_timeout(seen, left).unwrap().0;
        }
        keys.iter().map(|k| seen.added.get(k).copied()).collect()
    }

    /// Waits until no nftables event arrived for `quiet` (at most 30 s).
    fn settle(&self, quiet: Duration) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            std::thread::sleep(quiet / 2);
            let last = self.0.0.lock().unwrap().last_event;
            if last.is_none_or(|t| t.elapsed() >= quiet) || Instant::now() > deadline {
                return;
            }
        }
    }
}

/// The 64-bit keys of the elements added to a `level*` map, from one datagram of
/// nftables events (one or more netlink messages).
fn new_level_keys(buf: &[u8]) -> Vec<u64> {
    let mut keys = Vec::new();
    for m in messages(buf) {
        // Payload: struct nfgenmsg (4 bytes), then attributes.
        let Some(body) = m.payload().get(4..) else {
            continue;
        };
        if m.ty != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM {
            continue;
        }
        let is_level = attr(body, NFTA_SET_ELEM_LIST_SET).is_some_and(|s| s.starts_with(b"level"));
        if let (true, Some(list)) = (is_level, attr(body, NFTA_SET_ELEM_LIST_ELEMENTS)) {
            for (k, elem) in attrs(list) {
                let value = (k == NFTA_LIST_ELEM)
                    .then(|| attr(elem, NFTA_SET_ELEM_KEY))
                    .flatten()
                    .and_then(|key| attr(key, NFTA_DATA_VALUE))
                    .and_then(|v| <[u8; 8]>::try_from(v).ok());
                if let Some(v) = value {
                    keys.push(u64::from_ne_bytes(v));
                }
            }
        }
    }
    keys
}

// ---------------------------------------------------------------------------
// Measurements.

/// Creates `n` cgroups one at a time and, for each, times mkdir() returning to its
/// element being committed; `insert` (if any) is what puts it there (the daemon
/// does it by itself). Returns the sorted latencies, how many were never seen, and
/// the cgroups made.
fn update_latencies(
    lab: &Lab,
    ev: &Events,
    names: impl Iterator<Item = String>,
    insert: Option<&dyn Fn(&str)>,
) -> (Vec<Duration>, usize, Vec<PathBuf>) {
    let leaf = lab.leaf_dir();
    let mut lat = Vec::new();
    let mut missed = 0;
    let mut made = Vec::new();
    ev.clear();
    for name in names {
        let dir = leaf.join(&name);
        fs::create_dir(&dir).unwrap();
        let t0 = Instant::now();
        let ino = fs::metadata(&dir).unwrap().ino();
        if let Some(f) = insert {
            f(&name);
        }
        made.push(dir);
        // The event can arrive before our stat(); it is then timed from t0 anyway.
        match ev.wait_all(&[ino], t0 + Duration::from_secs(2))[0] {
            Some(at) => lat.push(at.saturating_duration_since(t0)),
            None => missed += 1,
        }
        // Never seeing a single element means the measurement is broken, not slow.
        assert!(
            !(lat.is_empty() && missed >= 3),
            "no element event for the first {missed} cgroups"
        );
        std::thread::sleep(SPACING);
    }
    lat.sort();
    (lat, missed, made)
}

/// Times the same insertion as shell-based managers do it, with the lab's
/// 10,000 cgroups: one `nft add element` process per new cgroup. Returns the
/// sorted latencies and how many were never seen.
fn nft_cli_latencies(lab: &Lab, ev: &Events, base: &str) -> (Vec<Duration>, usize) {
    // Not into the daemon's table: the daemon repairs foreign changes to it,
    // which would time its repair, not nft. Instead a table of the same shape
    // and size: cgroupsv2 verdict maps holding the same 10,000 cgroups, one per
    // level, each used by a `socket cgroupv2 level L vmap` rule, jumping to a
    // mark chain. nft resolves each key from a path below /sys/fs/cgroup by
    // stat() and commits one transaction. This is a lower bound for such
    // managers: their own event source (inotifywait, a shell loop) is not
    // counted. The `n*` cgroups match no rule of the daemon, which adds nothing
    // for them.
    let mut maps = String::new();
    let mut rules = String::new();
    for level in 2..=DEEPEST {
        let elements: Vec<String> = (0..10_000)
            .filter(|&i| Lab::x_level(i) == level)
            .map(|i| format!(r#""{base}/{}" : goto proxy-mark"#, Lab::x_rel(i)))
            .collect();
        maps.push_str(&format!(
            "map level{level} {{
                type cgroupsv2 : verdict
                elements = {{ {} }}
            }}
            ",
            elements.join(", ")
        ));
        rules.push_str(&format!(
            "socket cgroupv2 level {level} vmap @level{level}\n"
        ));
    }
    let ruleset = format!(
        "table inet shellmgr {{
            chain proxy-mark {{
                meta mark set 3000
            }}
            {maps}
            chain output {{
                type route hook output priority mangle + 1; policy accept;
                {rules}
            }}
        }}"
    );
    let leaf_rel = format!("{base}/{}", Lab::spine(DEEPEST - 1));
    let file = lab.dir.join("shellmgr.nft");
    fs::write(&file, ruleset).unwrap();
    nft(&["-f", file.to_str().unwrap()]);
    let nft_insert = |name: &str| {
        nft(&[&format!(
            r#"add element inet shellmgr level{DEEPEST} {{ "{leaf_rel}/{name}" : goto proxy-mark }}"#
        )]);
    };
    let (lat_nft, missed_nft, made) = update_latencies(
        lab,
        ev,
        (0..NFT_UPDATES).map(|i| format!("n{i}")),
        Some(&nft_insert as &dyn Fn(&str)),
    );
    nft(&["delete table inet shellmgr"]);
    remove_all(ev, &made);
    (lat_nft, missed_nft)
}

/// Removes the cgroups an update run made and waits for the daemon to settle.
fn remove_all(ev: &Events, dirs: &[PathBuf]) {
    for d in dirs {
        fs::remove_dir(d).unwrap();
    }
    ev.settle(Duration::from_millis(200));
}

/// Creates 1,000 cgroups at once; returns (time until all elements were seen, time
/// the mkdir loop itself took, number never seen).
fn storm(lab: &Lab, ev: &Events) -> (Duration, Duration, usize) {
    let leaf = lab.leaf_dir();
    let dirs: Vec<PathBuf> = (0..1000)
        .map(|i| leaf.join(format!("x{}", 3_000_000 + i)))
        .collect();
    ev.clear();
    let t0 = Instant::now();
    for d in &dirs {
        fs::create_dir(d).unwrap();
    }
    let made = t0.elapsed();
    let keys: Vec<u64> = dirs
        .iter()
        .map(|d| fs::metadata(d).unwrap().ino())
        .collect();
    let seen = ev.wait_all(&keys, Instant::now() + Duration::from_secs(30));
    let missed = seen.iter().filter(|s| s.is_none()).count();
    let last = seen
        .iter()
        .flatten()
        .max()
        .map_or(Duration::ZERO, |t| *t - t0);
    for d in &dirs {
        fs::remove_dir(d).unwrap();
    }
    ev.settle(Duration::from_millis(200));
    (last, made, missed)
}

fn status_field(path: &str, key: &str) -> u64 {
    let text = fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Context switches of all threads of `pid` so far.
fn ctx_switches(pid: u32) -> u64 {
    let mut sum = 0;
    for t in fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let p = t.path().join("status");
        let p = p.to_str().unwrap();
        sum += status_field(p, "voluntary_ctxt_switches")
            + status_field(p, "nonvoluntary_ctxt_switches");
    }
    sum
}

fn rss_kib(pid: u32) -> u64 {
    status_field(&format!("/proc/{pid}/status"), "VmRSS")
}

/// Of the resident memory (KiB): anonymous (heap, stacks) and file-backed
/// (the binary's pages, shared libraries).
fn rss_split_kib(pid: u32) -> (u64, u64) {
    let status = format!("/proc/{pid}/status");
    (
        status_field(&status, "RssAnon"),
        status_field(&status, "RssFile"),
    )
}

fn pct(sorted: &[Duration], p: usize) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = (sorted.len() * p).div_ceil(100).saturating_sub(1);
    sorted[idx].as_secs_f64() * 1e6
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// How many times the daemon is started to time its start-up.
const STARTS: usize = 3;

/// Starts the daemon [`STARTS`] times (stopping it in between, and leaving it
/// running) and returns the median time to READY=1 (ms).
fn startup_median(lab: &mut Lab) -> f64 {
    let mut times = Vec::new();
    for i in 0..STARTS {
        if i > 0 {
            lab.stop_daemon();
            // Let the kernel's deferred freeing of the old table finish.
            std::thread::sleep(Duration::from_millis(300));
        }
        times.push(ms(lab.start_daemon()));
    }
    median(&mut times)
}

/// Prints a section's progress to stderr so a slow run shows where it is.
/// `CGTPROXY_BENCH_ONLY=update`: update latency at 10,000 cgroups and the
/// nft CLI comparison, the full run's figures for them in a few seconds.
fn update_only(mut lab: Lab, base: &str, machine: &str, started: Instant) {
    step("creating 10,000 cgroups", started);
    lab.populate(0, 10_000);
    let ev = Events::subscribe();
    ev.without(|| lab.start_daemon());
    ev.settle(Duration::from_millis(200));
    step("update latency at 10,000", started);
    let names = (0..UPDATES).map(|i| format!("x{}", 1_000_000 + i));
    let (lat, missed, made) = update_latencies(&lab, &ev, names, None);
    remove_all(&ev, &made);
    step("nft CLI comparison at 10,000", started);
    let (lat_nft, missed_nft) = nft_cli_latencies(&lab, &ev, base);
    lab.stop_daemon();
    drop(lab);
    step("done", started);
    let speedup = pct(&lat_nft, 50) / pct(&lat, 50);
    println!("cgtproxy update benchmark");
    println!("machine: {machine}");
    println!(
        "update p50 / p99, 10,000 existing (us): {:.0} / {:.0} ({missed} never seen)",
        pct(&lat, 50),
        pct(&lat, 99)
    );
    println!(
        "nft CLI update p50 / p99, 10,000 (us): {:.0} / {:.0} ({missed_nft} never seen)",
        pct(&lat_nft, 50),
        pct(&lat_nft, 99)
    );
    println!("speedup vs nft CLI (p50): {speedup:.1}x");
    let j = json!({
        "machine": machine,
        "update_p50_us": round1(pct(&lat, 50)),
        "update_p99_us": round1(pct(&lat, 99)),
        "update_missed": missed,
        "nft_cli_update_p50_us": round1(pct(&lat_nft, 50)),
        "update_speedup_vs_nft_cli": round1(speedup),
    });
    println!("bench-json: {j}");
}

/// Start-up and idle RSS as the full run measures them, without the datapath
/// rounds in between: at 10,000 and 50,000 cgroups.
fn memory_only(mut lab: Lab, machine: &str, started: Instant) {
    let ev = Events::subscribe();
    let mut j = serde_json::Map::new();
    j.insert("machine".into(), json!(machine));
    println!("cgtproxy start-up and memory benchmark");
    println!("machine: {machine}");
    for (from, to, label, key) in [
        (0, 10_000, "10,000", "10k"),
        (10_000, 50_000, "50,000", "50k"),
    ] {
        step(&format!("creating {label} cgroups"), started);
        lab.populate(from, to);
        step(&format!("start-up at {label}"), started);
        let startup = ev.without(|| startup_median(&mut lab));
        let (rss, (anon, file)) = idle_rss(&lab, &ev);
        lab.stop_daemon();
        println!(
            "start to READY=1, median of {STARTS}, {label} (ms): {startup:.0}; RSS idle: {rss} KiB (anonymous {anon}, file {file})"
        );
        j.insert(format!("startup_ms_{key}"), json!(round1(startup)));
        j.insert(format!("rss_kib_{key}"), json!(rss));
        j.insert(format!("rss_anon_kib_{key}"), json!(anon));
        j.insert(format!("rss_file_kib_{key}"), json!(file));
    }
    step("removing 50,000 cgroups", started);
    drop(lab);
    step("done", started);
    println!("bench-json: {}", serde_json::Value::Object(j));
}

/// The running daemon's RSS once idle (a deferred STATUS= gone out, at most
/// once a second): total, and (anonymous, file-backed), in KiB.
fn idle_rss(lab: &Lab, ev: &Events) -> (u64, (u64, u64)) {
    ev.settle(Duration::from_millis(300));
    std::thread::sleep(Duration::from_millis(1500));
    let pid = lab.daemon().pid();
    (rss_kib(pid), rss_split_kib(pid))
}

fn step(what: &str, started: Instant) {
    eprintln!("[{:6.1} s] {what}", started.elapsed().as_secs_f64());
}

fn bench(base: &str) {
    let started = Instant::now();
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let nft_version = Command::new("nft")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();

    let machine = format!("{nproc} x {cpu}, Linux {kernel}");
    let mut lab = Lab::new(base);
    let quick = std::env::var("CGTPROXY_BENCH_QUICK").is_ok_and(|v| v == "1");
    let only = std::env::var("CGTPROXY_BENCH_ONLY").unwrap_or_default();
    if only == "update" {
        update_only(lab, base, &machine, started);
        return;
    }
    if only == "memory" {
        memory_only(lab, &machine, started);
        return;
    }
    let (fwd_table, fwd_keys) = if quick {
        (String::new(), serde_json::Map::new())
    } else {
        forward::bench(&mut lab, started)
    };
    if only == "forward" {
        drop(lab);
        step("done", started);
        println!("cgtproxy forwarder benchmark");
        println!("machine: {machine}");
        print!("{fwd_table}");
        let mut j = serde_json::Map::new();
        j.insert("machine".into(), json!(machine));
        j.extend(fwd_keys);
        println!("bench-json: {}", serde_json::Value::Object(j));
        return;
    }
    let plan = datapath::Plan::new(quick);
    let sides = datapath::Sides::new(&lab);
    let ev = Events::subscribe();
    let mut next = 1_000_000usize; // names of measured cgroups, never reused
    let mut fresh = |n: usize| {
        let from = next;
        next += n;
        (from..from + n).map(|i| format!("x{i}"))
    };

    // 1,000 existing cgroups.
    step("creating 1,000 cgroups", started);
    lab.populate(0, 1000);
    let startup_1k = ev.without(|| lab.start_daemon());
    let all_1k = lab.hierarchy_size();
    ev.settle(Duration::from_millis(200));
    step("update latency at 1,000", started);
    let (lat_1k, missed_1k, made) = update_latencies(&lab, &ev, fresh(UPDATES), None);
    remove_all(&ev, &made);
    lab.stop_daemon();

    // 10,000: the datapath, table against conntrack only, then the rest.
    step("creating 10,000 cgroups", started);
    lab.populate(1000, 10_000);
    let control = datapath::control(&lab, &sides, &plan, started);
    let rules = datapath::policy_routing(&lab, &sides, &plan, started).checked(&control);
    let floor = datapath::floor(&lab, &sides, &plan, started).checked(&control);
    let dp_10k = datapath::compare(&mut lab, &sides, &plan, "10,000", started).checked(&control);
    let ebpf_10k =
        datapath::compare_ebpf(&mut lab, &sides, &plan, "10,000 (ebpf)", started).checked(&control);
    step("start-up at 10,000", started);
    let startup_10k = ev.without(|| startup_median(&mut lab));
    let all_10k = lab.hierarchy_size();
    let pid = lab.daemon().pid();
    // Idle: RSS, then its wake-ups.
    step("idle daemon with 10,000", started);
    let (rss_10k, split_10k) = idle_rss(&lab, &ev);
    let idle_window = Duration::from_secs(3);
    let c0 = ctx_switches(pid);
    std::thread::sleep(idle_window);
    let idle_wakeups = (ctx_switches(pid) - c0) as f64 / idle_window.as_secs_f64();

    step("update latency at 10,000", started);
    let (lat_10k, missed_10k, made) = update_latencies(&lab, &ev, fresh(UPDATES), None);
    remove_all(&ev, &made);

    step("nft CLI comparison at 10,000", started);
    let (lat_nft, missed_nft) = nft_cli_latencies(&lab, &ev, base);

    step("storm of 1,000 at 10,000", started);
    let (storm_1k, storm_mkdirs, storm_missed) = storm(&lab, &ev);
    let rss_after = rss_kib(lab.daemon().pid());
    lab.stop_daemon();

    // 50,000.
    step("creating 50,000 cgroups", started);
    lab.populate(10_000, 50_000);
    let dp_50k = datapath::compare(&mut lab, &sides, &plan, "50,000", started).checked(&control);
    let ebpf_50k =
        datapath::compare_ebpf(&mut lab, &sides, &plan, "50,000 (ebpf)", started).checked(&control);
    step("start-up at 50,000", started);
    let startup_50k = ev.without(|| startup_median(&mut lab));
    let all_50k = lab.hierarchy_size();
    let (rss_50k, split_50k) = idle_rss(&lab, &ev);

    step("update latency at 50,000", started);
    let (lat_50k, missed_50k, made) = update_latencies(&lab, &ev, fresh(UPDATES), None);
    remove_all(&ev, &made);
    lab.stop_daemon();
    step("removing 50,000 cgroups", started);
    drop(sides);
    drop(lab);
    step("done", started);

    let speedup = pct(&lat_nft, 50) / pct(&lat_10k, 50);

    let mut t = String::new();
    let mut row = |name: &str, value: String, target: &str| {
        t.push_str(&format!("{name:<44} {value:>14}   {target}\n"));
    };
    println!("cgtproxy kernel benchmark");
    println!("machine: {nproc} CPUs, {cpu}, Linux {kernel}, {nft_version}");
    println!();
    row("metric", "value".into(), "target");
    for (label, lat, missed) in [
        ("1,000", &lat_1k, missed_1k),
        ("10,000", &lat_10k, missed_10k),
        ("50,000", &lat_50k, missed_50k),
    ] {
        row(
            &format!("update p50 / p99, {label} existing (us)"),
            format!("{:.0} / {:.0}", pct(lat, 50), pct(lat, 99)),
            "p99 < 1,000, flat",
        );
        if missed > 0 {
            row("  updates never seen", missed.to_string(), "0");
        }
    }
    row(
        "nft CLI update p50 / p99, 10,000 (us)",
        format!("{:.0} / {:.0}", pct(&lat_nft, 50), pct(&lat_nft, 99)),
        "",
    );
    if missed_nft > 0 {
        row("  nft updates never seen", missed_nft.to_string(), "0");
    }
    row(
        "speedup vs nft CLI (p50)",
        format!("{speedup:.1}x"),
        ">= 50",
    );
    row(
        "cgroups in the hierarchy at 1k/10k/50k starts",
        format!("{all_1k} / {all_10k} / {all_50k}"),
        "(all are walked)",
    );
    row(
        "startup to READY=1, 1,000 (ms)",
        format!("{:.1}", ms(startup_1k)),
        "",
    );
    row(
        "startup to READY=1, 10,000 (ms, median)",
        format!("{startup_10k:.1}"),
        "< 300",
    );
    row(
        "startup to READY=1, 50,000 (ms, median)",
        format!("{startup_50k:.1}"),
        "<= 1,000",
    );
    row(
        "storm: 1,000 mkdirs until all in map (ms)",
        format!("{:.1}", ms(storm_1k)),
        "< 100",
    );
    row(
        "  of which the mkdir loop (ms)",
        format!("{:.1}", ms(storm_mkdirs)),
        "",
    );
    row(
        "  after the last mkdir returned (ms)",
        format!("{:.1}", ms(storm_1k.saturating_sub(storm_mkdirs))),
        "",
    );
    if storm_missed > 0 {
        row("  storm elements never seen", storm_missed.to_string(), "0");
    }
    row(
        "RSS idle, 10,000 tracked (KiB)",
        rss_10k.to_string(),
        "<= 8,192",
    );
    row(
        "  of which anonymous / file-backed (KiB)",
        format!("{} / {}", split_10k.0, split_10k.1),
        "",
    );
    row("RSS after the storm (KiB)", rss_after.to_string(), "");
    row(
        "RSS idle, 50,000 tracked (KiB)",
        rss_50k.to_string(),
        "<= 12,288",
    );
    row(
        "  of which anonymous / file-backed (KiB)",
        format!("{} / {}", split_50k.0, split_50k.1),
        "",
    );
    row(
        "idle wakeups (ctx switches/s over 3 s)",
        format!("{idle_wakeups:.2}"),
        "0",
    );
    control.rows("control", &mut row);
    rules.rows("rules", &mut row);
    floor.rows("floor", &mut row);
    dp_10k.rows("10,000", &mut row);
    dp_50k.rows("50,000", &mut row);
    ebpf_10k.rows("10,000", &mut row);
    ebpf_50k.rows("50,000", &mut row);
    print!("{t}");
    print!("{fwd_table}");
    println!(
        "({UPDATES} updates per size spaced {} ms; {NFT_UPDATES} nft processes; start-ups with no nftables listener but the daemon; datapath: CPU time of one client process holding both ends (on CPU {}) over {} rounds, each of {} pairs of batches of {} connections and {} pairs of batches of {} datagrams (one flow's; untracked) at each of depths {:?} (and of one flow arriving, at the first), and {} pairs of {} KiB bulk chunks at depth {DEEPEST} (cubic), a pair one unit on each side, alternating which goes first; CPU per connection and per MiB: lower quartile of a side's units; ratios and extra ns: median of the pairs' own (table-first, baseline-first); softirq time in task time: {}; the daemon's environment, as its unit sets it: {:?})",
        SPACING.as_millis(),
        measuring_cpu(),
        plan.rounds,
        plan.connect_pairs,
        plan.connect_batch,
        plan.datagram_pairs,
        plan.datagram_batch,
        datapath::DEPTHS,
        plan.bulk_pairs,
        datapath::BULK_CHUNK >> 10,
        match datapath::irq_time_accounting() {
            Some(true) => "no (CONFIG_IRQ_TIME_ACCOUNTING=y: softirq cost missing)",
            Some(false) => "yes",
            None => "unknown",
        },
        unit_environment(),
    );
    let mut j = json!({
        "machine": machine,
        "update_p50_us": round1(pct(&lat_10k, 50)),
        "update_p99_us": round1(pct(&lat_10k, 99)),
        "update_p50_us_1k": round1(pct(&lat_1k, 50)),
        "update_p99_us_1k": round1(pct(&lat_1k, 99)),
        "update_p50_us_50k": round1(pct(&lat_50k, 50)),
        "update_p99_us_50k": round1(pct(&lat_50k, 99)),
        "update_missed": missed_1k + missed_10k + missed_50k,
        "nft_cli_update_p50_us": round1(pct(&lat_nft, 50)),
        "update_speedup_vs_nft_cli": round1(speedup),
        "startup_ms_10k": round1(startup_10k),
        "startup_ms_50k": round1(startup_50k),
        "hierarchy_cgroups_10k": all_10k,
        "hierarchy_cgroups_50k": all_50k,
        "storm_ms_1k": round1(ms(storm_1k)),
        "rss_kib_10k": rss_10k,
        "rss_kib_50k": rss_50k,
        "rss_anon_kib_10k": split_10k.0,
        "rss_file_kib_10k": split_10k.1,
        "rss_anon_kib_50k": split_50k.0,
        "rss_file_kib_50k": split_50k.1,
        "idle_wakeups_per_s": round3(idle_wakeups),
    });
    if let Some(o) = j.as_object_mut() {
        o.extend(control.json("control"));
        o.extend(rules.json("rules"));
        o.extend(floor.json("floor"));
        o.extend(dp_10k.json("10k"));
        o.extend(dp_50k.json("50k"));
        o.extend(ebpf_10k.json("10k"));
        o.extend(ebpf_50k.json("50k"));
        o.extend(fwd_keys);
    }
    println!("bench-json: {j}");
}

// ---------------------------------------------------------------------------
// Traffic helpers, run as subprocesses of the bench binary.

/// The process's CPU time so far (ns): the runtime the scheduler charges it,
/// softirq work done on its stack included (see `kernel/datapath.rs`).
fn cpu_ns() -> u64 {
    use nix::time::{ClockId, clock_gettime};
    let t = clock_gettime(ClockId::CLOCK_PROCESS_CPUTIME_ID).expect("process CPU clock");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// The CPU the datapath's client runs on: the last.
fn measuring_cpu() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get() - 1)
}

/// Pins this process to [`measuring_cpu`]: the packets' whole path (the
/// receiving stack runs in the sender's softirq) is then serial, and what
/// the kernel defers from it runs in that CPU's ksoftirqd, whose share the
/// datapath shows (see `datapath::Noise`).
fn pin_to_measuring_cpu() {
    let mut set = nix::sched::CpuSet::new();
    set.set(measuring_cpu()).expect("a CPU index");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .expect("pinning to the measuring CPU");
}

/// `connect-pair …`, `datagram-pair …`, `bulk-pair …`: see
/// `datapath::paired_client`.
fn client(args: &[String]) {
    if !args.first().is_some_and(|m| m.starts_with("fwd-")) {
        pin_to_measuring_cpu();
    }
    match args.first().map(String::as_str) {
        Some(mode @ ("connect-pair" | "datagram-pair" | "bulk-pair")) => {
            datapath::paired_client(mode, &args[1..])
        }
        Some(mode) if mode.starts_with("fwd-") => forward::client(args),
        _ => panic!("client connect-pair … | bulk-pair … | udp[-first] ADDR N | fwd-…"),
    }
}
