//! Containers benchmark: how long a container's traffic is untouched. From
//! the moment both its process (in its cgroup, in its own network namespace)
//! and its link to this host exist, to its interface's element in the
//! daemon's `ifaces` map, as an outsider sees it: the link's RTM_NEWLINK and
//! the element's NFT_MSG_NEWSETELEM notifications, read by this process.
//! Two orders, as managers make containers: the link last (systemd-nspawn,
//! podman: the process first), and the cgroup last (Docker: the namespace and
//! its veth exist before the process is put in its scope).
//!
//! Root only; `cargo bench --bench containers`. It re-executes itself under
//! `unshare --mount --net`; its cgroups live below `/cgtproxy-bench-ct-PID`,
//! removed at the end. `CGTPROXY_BENCH_CONTAINERS=N` sets the count per order
//! (default 100), `CGTPROXY_BENCH_LOG` the daemon's log filter (default
//! `warn`). Prints figures and a last line `bench-json: {...}`; asserts
//! nothing about time.

// Only its `remove_tree` is used here.
#[allow(dead_code)]
#[path = "../tests/support/netns.rs"]
mod netns;

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cgtproxy::kernel::nlmsg::{Channel, attr, encode, encode_attr as nla, messages};
use netlink_sys::{Socket, constants};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{MsgFlags, recv, setsockopt, sockopt};

use netns::remove_tree;

const INNER: &str = "CGTPROXY_BENCH_CT_INNER";
const RTM_NEWLINK: u16 = 16;
const IFLA_IFNAME: u16 = 3;
const NFNLGRP_NFTABLES: u32 = 7;
const NFT_NEWSETELEM: u16 = (10 << 8) | 12;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if std::env::var_os(INNER).is_some() {
        bench();
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the containers benchmark needs root (namespaces, cgroups, nftables)");
        std::process::exit(1);
    }
    let status = Command::new("unshare")
        .args(["--mount", "--net", "--propagation", "private", "--"])
        .arg(std::env::current_exe().expect("bench binary path"))
        .env(INNER, "1")
        .status()
        .expect("running unshare");
    std::process::exit(status.code().unwrap_or(1));
}

fn sh(cmd: &str) {
    let out = Command::new("sh").args(["-c", cmd]).output().expect("sh");
    assert!(
        out.status.success(),
        "`{cmd}`: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// nftables notifications: when an element is added to the `ifaces` map.
struct Watch {
    nft: Socket,
    buf: Vec<u8>,
}

impl Watch {
    fn new() -> Watch {
        let mut nft = Socket::new(constants::NETLINK_NETFILTER).expect("netlink socket");
        nft.bind_auto().expect("bind");
        nft.add_membership(NFNLGRP_NFTABLES).expect("membership");
        let _ = setsockopt(&nft, sockopt::RcvBufForce, &(8 << 20));
        Watch {
            nft,
            buf: vec![0; 1 << 20],
        }
    }

    /// Waits for an element added to the `ifaces` map; returns when it arrived.
    fn until(&mut self, deadline: Instant) -> Option<Instant> {
        while Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = u16::try_from(left.as_millis().min(1000)).unwrap_or(1000);
            let mut fds = [PollFd::new(self.nft.as_fd(), PollFlags::POLLIN)];
            if poll(&mut fds, PollTimeout::from(ms)).unwrap_or(0) == 0 {
                continue;
            }
            let Ok(n) = recv(self.nft.as_raw_fd(), &mut self.buf, MsgFlags::MSG_DONTWAIT) else {
                continue;
            };
            let now = Instant::now();
            let added = messages(&self.buf[..n]).iter().any(|m| {
                m.ty == NFT_NEWSETELEM
                    && m.payload()
                        .get(4..)
                        .and_then(|b| attr(b, NFTA_SET_ELEM_LIST_SET))
                        .is_some_and(|s| s.starts_with(b"ifaces\0"))
            });
            if added {
                return Some(now);
            }
        }
        None
    }

    /// Reads and forgets whatever is queued.
    fn drain(&mut self) {
        while recv(self.nft.as_raw_fd(), &mut self.buf, MsgFlags::MSG_DONTWAIT).is_ok() {}
    }
}

/// A process in its own network namespace (in cgroup `procs`' cgroup, if given).
fn holder(procs: Option<&Path>) -> Child {
    let cmd = match procs {
        Some(p) => format!(
            "echo $$ > '{}' && exec unshare --net sleep 3600",
            p.display()
        ),
        None => "exec unshare --net sleep 3600".to_owned(),
    };
    let child = Command::new("sh")
        .args(["-c", &cmd])
        .stdout(Stdio::null())
        .spawn()
        .expect("spawning a container process");
    let mine = fs::read_link("/proc/self/ns/net").expect("own netns");
    let deadline = Instant::now() + Duration::from_secs(5);
    while fs::read_link(format!("/proc/{}/ns/net", child.id()))
        .ok()
        .as_ref()
        == Some(&mine)
    {
        assert!(Instant::now() < deadline, "no namespace of its own");
        std::thread::sleep(Duration::from_millis(1));
    }
    child
}

/// Creates veth `name` whose peer `eth0` is in the namespace of process
/// `pid`, over rtnetlink; returns when the kernel acknowledged it: the link
/// exists from then on, on this process's clock.
fn veth(rt: &mut Channel, name: &str, pid: u32) -> Instant {
    const IFLA_LINKINFO: u16 = 18;
    const IFLA_INFO_KIND: u16 = 1;
    const IFLA_INFO_DATA: u16 = 2;
    const VETH_INFO_PEER: u16 = 1;
    const IFLA_NET_NS_PID: u16 = 19;
    let cstr = |s: &str| [s.as_bytes(), b"\0"].concat();
    let mut peer = vec![0u8; 16];
    peer.extend(nla(IFLA_IFNAME, &cstr("eth0")));
    peer.extend(nla(IFLA_NET_NS_PID, &pid.to_ne_bytes()));
    let mut info = nla(IFLA_INFO_KIND, &cstr("veth"));
    info.extend(nla(IFLA_INFO_DATA, &nla(VETH_INFO_PEER, &peer)));
    let mut body = vec![0u8; 16];
    body.extend(nla(IFLA_IFNAME, &cstr(name)));
    body.extend(nla(IFLA_LINKINFO, &info));
    // NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL | NLM_F_CREATE.
    let flags = 1 | 4 | 0x200 | 0x400;
    let errno = rt
        .exchange(|seq| encode(RTM_NEWLINK, flags, seq, &body), |_| {})
        .expect("RTM_NEWLINK");
    let t = Instant::now();
    assert_eq!(errno, Some(0), "creating veth {name}");
    t
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

fn report(order: &str, mut v: Vec<Duration>, missed: usize) -> String {
    v.sort();
    let us = |d: Duration| d.as_micros();
    println!(
        "{order}: {} containers, classified after p50 {} µs, p99 {} µs, max {} µs; never: {missed}",
        v.len(),
        us(percentile(&v, 0.5)),
        us(percentile(&v, 0.99)),
        us(v.last().copied().unwrap_or_default()),
    );
    format!(
        r#""{order}_p50_us":{},"{order}_p99_us":{},"{order}_missed":{missed}"#,
        us(percentile(&v, 0.5)),
        us(percentile(&v, 0.99))
    )
}

fn bench() {
    let n: usize = std::env::var("CGTPROXY_BENCH_CONTAINERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let dir = std::env::temp_dir().join(format!("cgtproxy-bench-ct-{}", std::process::id()));
    fs::create_dir_all(&dir).expect("temp dir");
    let mount = dir.join("cgroup2");
    fs::create_dir_all(&mount).expect("mount point");
    sh(&format!("mount -t cgroup2 none '{}'", mount.display()));
    sh("ip link set lo up");
    let base = format!("cgtproxy-bench-ct-{}", std::process::id());
    let root = mount.join(&base);
    fs::create_dir_all(&root).expect("cgroup subtree");
    let result = std::panic::catch_unwind(|| run(n, &dir, &mount, &base, &root));
    remove_tree(&root);
    let _ = Command::new("umount").arg(&mount).status();
    let _ = fs::remove_dir_all(&dir);
    if result.is_err() {
        std::process::exit(1);
    }
}

fn run(n: usize, dir: &Path, mount: &Path, base: &str, root: &Path) {
    let cfg = dir.join("c.json");
    fs::write(
        &cfg,
        format!(
            r#"{{"version":1,"cgroup-root":"{}","tproxies":{{"proxy":{{"port":7893,"mark":3000}}}},
            "rules":[{{"match":"^/{base}/c-[0-9]+\\.scope$","tproxy":"proxy"}}]}}"#,
            mount.display()
        ),
    )
    .expect("config");
    let notify_path = dir.join("notify");
    let notify = UnixDatagram::bind(&notify_path).expect("notify socket");
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_cgtproxy"))
        .args(["run", "--config"])
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &notify_path)
        .env(
            "RUST_LOG",
            std::env::var("CGTPROXY_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the daemon");
    let mut buf = [0u8; 4096];
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    loop {
        let k = notify.recv(&mut buf).expect("READY=1 within 30 s");
        if String::from_utf8_lossy(&buf[..k])
            .lines()
            .any(|l| l == "READY=1")
        {
            break;
        }
    }
    // Keep the daemon's notifications from filling the socket's queue.
    std::thread::spawn(move || while notify.recv(&mut buf).is_ok() {});
    let stderr = daemon.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("daemon: {l}");
        }
    });

    let mut watch = Watch::new();
    let mut rt = Channel::open(constants::NETLINK_ROUTE, 64 * 1024).expect("rtnetlink");
    let mut json = Vec::new();
    for order in ["link_last", "cgroup_last"] {
        let mut times = Vec::new();
        let mut missed = 0;
        let mut held = Vec::new();
        for i in 0..n {
            let name = format!("c-{i}.scope");
            let cg: PathBuf = root.join(&name);
            let ifname = format!("vc{i}");
            watch.drain();
            let deadline = || Instant::now() + Duration::from_secs(10);
            let (child, took) = if order == "link_last" {
                fs::create_dir(&cg).expect("cgroup");
                let child = holder(Some(&cg.join("cgroup.procs")));
                let t0 = veth(&mut rt, &ifname, child.id());
                let elem = watch.until(deadline());
                (child, elem.map(|e| e.saturating_duration_since(t0)))
            } else {
                let child = holder(None);
                veth(&mut rt, &ifname, child.id());
                // Let the daemon see the link first and find nobody behind it,
                // so that the cgroup is what it finds the container by.
                std::thread::sleep(Duration::from_millis(20));
                watch.drain();
                fs::create_dir(&cg).expect("cgroup");
                fs::write(cg.join("cgroup.procs"), child.id().to_string())
                    .expect("moving the process");
                let t0 = Instant::now();
                let elem = watch.until(deadline());
                (child, elem.map(|e| e.saturating_duration_since(t0)))
            };
            match took {
                Some(d) => times.push(d),
                None => missed += 1,
            }
            held.push(child);
        }
        json.push(report(order, times, missed));
        for mut c in held {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Their links go with their namespaces; the cgroups are emptied.
        for i in 0..n {
            let _ = fs::remove_dir(root.join(format!("c-{i}.scope")));
        }
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = daemon.wait();
    println!("bench-json: {{{}}}", json.join(","));
}
