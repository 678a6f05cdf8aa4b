//! A lab for kernel tests: private mount + network namespaces, a cgroup2 mount at a
//! non-standard path, a veth peer namespace playing "the internet", a transparent
//! listener standing in for a proxy core, and the daemon under test.
//!
//! Each test re-executes the test binary under `unshare -m -n`, so its nftables
//! table, routes and mounts die with it; its cgroups live in the host's one
//! hierarchy, under a subtree of its own that `Drop` removes even on failure.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod netns;
pub use netns::{Netns, remove_tree};

const INNER: &str = "CGTPROXY_KERNEL_TEST_INNER";

/// Runs the calling test (named `name`) inside fresh namespaces. Outside them it
/// re-executes itself; inside, it runs `body`.
pub fn in_namespaces(name: &str, body: impl FnOnce()) {
    if std::env::var_os(INNER).is_some() {
        body();
        return;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "kernel tests need root (they create namespaces, cgroups and nftables tables)"
    );
    let exe = std::env::current_exe().expect("test binary path");
    let status = Command::new("unshare")
        .args(["--mount", "--net", "--propagation", "private", "--"])
        .arg(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(INNER, "1")
        .status()
        .expect("running unshare");
    assert!(status.success(), "{name} failed inside its namespaces");
}

/// The host's cgroup2 mount (hybrid systems have it at /sys/fs/cgroup/unified).
fn host_cgroup2() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mount = pre.split_whitespace().nth(4)?;
            (post.split_whitespace().next() == Some("cgroup2")).then(|| PathBuf::from(mount))
        })
        .expect("a cgroup2 mount")
}

/// Like [`in_namespaces`], in a cgroup namespace as well, rooted at a cgroup
/// of the test's own: a cgroup2 mount inside shows that cgroup as its root, so
/// what the daemon attaches "at the root" (the eBPF datapath's programs)
/// covers the test's processes only, never the host's.
pub fn in_cgroup_namespace(name: &str, body: impl FnOnce()) {
    if std::env::var_os(INNER).is_some() {
        body();
        return;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "kernel tests need root (they create namespaces, cgroups and BPF programs)"
    );
    let root = host_cgroup2().join(format!("cgtproxy-ns-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&root).expect("the test's root cgroup");
    let exe = std::env::current_exe().expect("test binary path");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > '{}' && exec unshare --cgroup --mount --net --propagation private -- \"$0\" \"$@\"",
            root.join("cgroup.procs").display()
        ))
        .arg(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(INNER, "1")
        .status()
        .expect("running unshare");
    remove_tree(&root);
    assert!(status.success(), "{name} failed inside its namespaces");
}

fn sh(cmd: &str) -> String {
    let out = Command::new("sh")
        .args(["-c", cmd])
        .output()
        .expect("running sh");
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Like `sh` but returns the output whether or not it succeeded.
pub fn sh_any(cmd: &str) -> String {
    let out = Command::new("sh").args(["-c", cmd]).output().expect("sh");
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    s
}

/// The path of helper script `name` (tests/helpers).
pub fn helper(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/helpers")
        .join(name)
}

fn wait_ready(child: &mut Child, what: &str) {
    let out = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(out)
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(line.trim(), "ready", "{what} did not start");
}

pub const PEER4: &str = "10.99.0.2";
pub const PEER6: &str = "fd99::2";
/// More addresses of the peer, in every test config's bypass list: reachable
/// destinations that no verdict may touch.
pub const BYPASSED4: &str = "10.99.0.98";
pub const BYPASSED6: &str = "fd99::98";
pub const PEER_PORT: u16 = 8080;
pub const PROXY_PORT: u16 = 7893;
pub const MARK: u32 = 3000;

/// The one TPROXY target most tests use: the listener's port and [`MARK`].
pub fn proxy_target() -> String {
    format!(r#"{{"proxy":{{"port":{PROXY_PORT},"mark":{MARK}}}}}"#)
}

/// Whether `answer` came from the test listener with original destination `dst`.
pub fn proxied(answer: &str, dst: &str) -> bool {
    answer.starts_with(&format!("proxy {dst} {PEER_PORT}"))
}

pub struct Lab {
    pub dir: PathBuf,
    pub mount: PathBuf,
    /// Cgroup path of this test's subtree, e.g. `/cgtproxy-test-123-routing`.
    pub base: String,
    peer: Netns,
    services: Vec<Child>,
    pub daemon: Option<Daemon>,
    /// Extra environment for the daemon.
    pub daemon_env: Vec<(String, String)>,
    /// Extra arguments for `cgtproxy forward` (limits, timeouts).
    pub forward_args: Vec<String>,
    /// A command `cgtproxy run` is started through (e.g. `setpriv` limiting
    /// its capabilities to what its unit grants).
    pub daemon_wrapper: Vec<String>,
}

pub struct Daemon {
    pub child: Child,
    notify: UnixDatagram,
    notify_path: PathBuf,
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Daemon {
    /// Waits for a datagram containing `what` (e.g. `READY=1`) on the notify socket.
    pub fn wait_notify(&self, what: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {what} from the daemon within {timeout:?}; log:\n{}",
                self.log()
            );
            self.notify.set_read_timeout(Some(left)).unwrap();
            if let Ok(n) = self.notify.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if msg.contains(what) {
                    return msg;
                }
            }
        }
    }

    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    /// Sends SIGTERM and returns the exit code.
    pub fn stop(mut self) -> i32 {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let status = self.child.wait().unwrap();
        let _ = std::fs::remove_file(&self.notify_path);
        status.code().unwrap_or(-1)
    }

    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Lab {
    pub fn new(name: &str) -> Lab {
        let pid = std::process::id();
        let dir = std::env::temp_dir().join(format!("cgtproxy-{name}-{pid}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mount = dir.join("cgroup2 mount");
        std::fs::create_dir_all(&mount).unwrap();
        sh(&format!("mount -t cgroup2 none '{}'", mount.display()));
        let base = format!("/cgtproxy-test-{pid}-{name}");
        std::fs::create_dir_all(mount.join(base.trim_start_matches('/'))).unwrap();

        sh("ip link set lo up");
        // The peer namespace: "the internet".
        let peer = Netns::new();
        let ppid = peer.pid();
        sh(&format!(
            "ip link add veth0 type veth peer name veth1 netns {ppid} &&
             ip addr add 10.99.0.1/24 dev veth0 &&
             ip addr add fd99::1/64 dev veth0 nodad &&
             ip link set veth0 up &&
             nsenter -t {ppid} -n sh -c 'ip link set lo up && ip addr add {PEER4}/24 dev veth1 &&
               ip addr add {PEER6}/64 dev veth1 nodad && ip addr add {BYPASSED4}/24 dev veth1 &&
               ip addr add {BYPASSED6}/64 dev veth1 nodad && ip link set veth1 up'"
        ));
        let mut lab = Lab {
            dir,
            mount,
            base,
            peer,
            services: Vec::new(),
            daemon: None,
            daemon_env: Vec::new(),
            forward_args: Vec::new(),
            daemon_wrapper: Vec::new(),
        };
        let server = Command::new("nsenter")
            .args(["-t", &ppid.to_string(), "-n", "python3"])
            .arg(helper("server.py"))
            .args([&PEER_PORT.to_string(), "peer"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        lab.services.push(server);
        let idx = lab.services.len() - 1;
        wait_ready(&mut lab.services[idx], "peer server");
        lab
    }

    /// Filesystem path of a cgroup below this test's subtree (`rel` like `proxy/a`).
    pub fn cg_dir(&self, rel: &str) -> PathBuf {
        self.mount.join(self.base.trim_start_matches('/')).join(rel)
    }

    /// Creates a cgroup below the test's subtree.
    pub fn mkcg(&self, rel: &str) -> PathBuf {
        let d = self.cg_dir(rel);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Runs `cmd` (a shell command) as a process inside cgroup `rel`.
    pub fn spawn_in(&self, rel: &str, cmd: &str, stdout: Stdio) -> Child {
        let procs = self.cg_dir(rel).join("cgroup.procs");
        Command::new("sh")
            .arg("-c")
            .arg(format!("echo $$ > '{}' && exec {cmd}", procs.display()))
            .stdout(stdout)
            .spawn()
            .unwrap()
    }

    /// Runs a Python `script` in cgroup `rel`; its output, trimmed.
    pub fn python_in(&self, rel: &str, script: &str) -> String {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let file = self.dir.join(format!("script-{n}.py"));
        std::fs::write(&file, script).unwrap();
        let cmd = format!("python3 '{}'", file.display());
        let out = self
            .spawn_in(rel, &cmd, Stdio::piped())
            .wait_with_output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Starts the transparent listener in cgroup `rel` (which the rules must leave
    /// direct), answering with `label`.
    pub fn start_listener(&mut self, rel: &str, port: u16, label: &str) {
        self.start_listener_with(rel, &format!("{port} {label}"));
    }

    /// Starts the listener in REDIRECT style (TCP, `SO_ORIGINAL_DST`) in cgroup
    /// `rel`, answering with `label`.
    pub fn start_redirect_listener(&mut self, rel: &str, port: u16, label: &str) {
        self.start_listener_with(rel, &format!("{port} {label} --redirect"));
    }

    /// Starts listener.py with `args` in cgroup `rel` and waits until it is ready.
    fn start_listener_with(&mut self, rel: &str, args: &str) {
        self.mkcg(rel);
        let cmd = format!("python3 '{}' {args}", helper("listener.py").display());
        let mut child = self.spawn_in(rel, &cmd, Stdio::piped());
        wait_ready(&mut child, &format!("listener.py {args}"));
        self.services.push(child);
    }

    /// Starts `cmd` in cgroup `rel` as a long-running service, and waits until
    /// something listens on TCP `port`.
    pub fn start_service_in(&mut self, rel: &str, cmd: &str, port: u16) {
        self.mkcg(rel);
        let child = self.spawn_in(rel, cmd, Stdio::null());
        self.services.push(child);
        let listening = self.eventually(Duration::from_secs(10), || {
            sh_any(&format!("ss -Hltn 'sport = :{port}'")).contains(&format!(":{port}"))
        });
        assert!(listening, "`{cmd}` did not listen on {port}");
    }

    /// Starts a plain server on this host (e.g. a DNS stand-in on 127.0.0.1).
    pub fn start_local_server(&mut self, port: u16, label: &str, addrs: &[&str]) {
        let mut child = Command::new("python3")
            .arg(helper("server.py"))
            .arg(port.to_string())
            .arg(label)
            .args(addrs)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        wait_ready(&mut child, "local server");
        self.services.push(child);
    }

    /// One TCP or UDP exchange from cgroup `rel`; returns the answer or `ERR …`.
    pub fn talk(&self, rel: &str, proto: &str, host: &str, port: u16) -> String {
        let cmd = format!(
            "python3 '{}' {proto} {host} {port}",
            helper("client.py").display()
        );
        let child = self.spawn_in(rel, &cmd, Stdio::piped());
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Writes a config file: `rules` and `tproxies` are JSON fragments.
    pub fn write_config(&self, file: &str, tproxies: &str, rules: &str) -> PathBuf {
        self.write_config_with(file, tproxies, rules, "[]")
    }

    /// [`Lab::write_config`] with `interfaces` rules (a JSON array) too.
    pub fn write_config_with(
        &self,
        file: &str,
        tproxies: &str,
        rules: &str,
        interfaces: &str,
    ) -> PathBuf {
        let p = self.dir.join(file);
        let text = format!(
            r#"{{"version":1,"cgroup-root":"{}","route-table":300,
            "bypass":["127.0.0.0/8","::1/128","10.99.0.99","{BYPASSED4}","{BYPASSED6}"],
            "tproxies":{tproxies},"rules":{rules},"interfaces":{interfaces}}}"#,
            self.mount.display()
        );
        std::fs::write(&p, text).unwrap();
        p
    }

    /// A regex matching this test's cgroup `rel` and everything below it.
    pub fn re(&self, rel: &str) -> String {
        format!("^{}/{}(/|$)", regex_escape(&self.base), regex_escape(rel))
    }

    /// Starts the daemon and waits for READY=1.
    pub fn start_daemon(&mut self, config: &Path) -> &Daemon {
        let d = self.start_cgtproxy("run", config, None);
        self.daemon = Some(d);
        self.daemon.as_ref().unwrap()
    }

    /// Starts the daemon without waiting for it.
    pub fn spawn_daemon(&mut self, config: &Path) -> Daemon {
        self.spawn_cgtproxy("run", config, None)
    }

    /// PID of the process holding the peer ("internet") network namespace.
    pub fn peer_pid(&self) -> u32 {
        self.peer.pid()
    }

    /// Runs a shell command in the peer namespace; returns its output.
    pub fn in_peer(&self, cmd: &str) -> String {
        sh_any(&format!(
            "nsenter -t {} -n sh -c '{}'",
            self.peer.pid(),
            cmd.replace('\'', "'\\''")
        ))
    }

    /// Starts `cmd` (a shell command) as a service in the peer namespace and
    /// waits until something there listens on TCP `port`.
    pub fn start_peer_service(&mut self, cmd: &str, port: u16) {
        let child = Command::new("nsenter")
            .args(["-t", &self.peer.pid().to_string(), "-n", "sh", "-c"])
            .arg(format!("exec {cmd}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.services.push(child);
        let listening = self.eventually(Duration::from_secs(10), || {
            self.in_peer(&format!("ss -Hltn 'sport = :{port}'"))
                .contains(&format!(":{port}"))
        });
        assert!(listening, "`{cmd}` did not listen on {port} in the peer");
    }

    /// Starts `cgtproxy SUBCOMMAND --config CONFIG` (in cgroup `cgroup` if given)
    /// and waits for READY=1.
    pub fn start_cgtproxy(&self, subcommand: &str, config: &Path, cgroup: Option<&str>) -> Daemon {
        let d = self.spawn_cgtproxy(subcommand, config, cgroup);
        d.wait_notify("READY=1", Duration::from_secs(30));
        d
    }

    /// Spawns `cgtproxy SUBCOMMAND --config CONFIG` (in cgroup `cgroup` if given)
    /// with a notify socket and captured stderr.
    pub fn spawn_cgtproxy(&self, subcommand: &str, config: &Path, cgroup: Option<&str>) -> Daemon {
        let notify_path = self.dir.join(format!(
            "notify-{subcommand}-{}",
            Instant::now().elapsed().as_nanos()
        ));
        let _ = std::fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        let mut cmd = match cgroup {
            None if subcommand == "run" && !self.daemon_wrapper.is_empty() => {
                let mut c = Command::new(&self.daemon_wrapper[0]);
                c.args(&self.daemon_wrapper[1..])
                    .arg(env!("CARGO_BIN_EXE_cgtproxy"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_cgtproxy")),
            Some(rel) => {
                let procs = self.mkcg(rel).join("cgroup.procs");
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!(
                        "echo $$ > '{}' && exec \"$0\" \"$@\"",
                        procs.display()
                    ))
                    .arg(env!("CARGO_BIN_EXE_cgtproxy"));
                c
            }
        };
        let extra: &[String] = if subcommand == "forward" {
            &self.forward_args
        } else {
            &[]
        };
        let mut child = cmd
            .args([subcommand, "--config"])
            .arg(config)
            .args(extra)
            .env("NOTIFY_SOCKET", &notify_path)
            .envs(self.daemon_env.iter().map(|(k, v)| (k, v)))
            .env(
                "RUST_LOG",
                std::env::var("CGTPROXY_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = stderr.clone();
        let mut pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let s = String::from_utf8_lossy(&buf[..n]).into_owned();
                eprint!("{s}");
                sink.lock().unwrap().push_str(&s);
            }
        });
        Daemon {
            child,
            notify,
            notify_path,
            stderr,
        }
    }

    pub fn take_daemon(&mut self) -> Daemon {
        self.daemon.take().expect("daemon running")
    }

    /// Polls `f` until it returns true or `timeout` passes.
    pub fn eventually(&self, timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if f() {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub fn regex_escape(s: &str) -> String {
    let mut o = String::new();
    for c in s.chars() {
        if "\\.+*?()|[]{}^$-".contains(c) {
            o.push('\\');
        }
        o.push(c);
    }
    o
}

/// Runs `nft ARGS`. nft resolves every cgroupsv2 map key to a path by walking
/// /sys/fs/cgroup, which is slow with thousands of cgroups: hide that tree.
pub fn nft(args: &str) -> String {
    sh_any(&format!(
        "unshare -m sh -c 'mount -t tmpfs none /sys/fs/cgroup && nft {args}'"
    ))
}

/// The kernel's map elements per class (`direct`, `drop` or a target's name),
/// read with `cgtproxy status --json`.
pub fn elements_by_class(config: &Path) -> std::collections::BTreeMap<String, usize> {
    let out = Command::new(env!("CARGO_BIN_EXE_cgtproxy"))
        .args(["status", "--json", "--config"])
        .arg(config)
        .output()
        .expect("cgtproxy status");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["elements_by_class"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0) as usize))
                .collect()
        })
        .unwrap_or_default()
}

/// Counts, inside namespace `pid`, the TCP/UDP packets to the peer's port: what
/// arrived there directly. A named counter, so `nft` prints one number.
pub fn install_counter(pid: u32) {
    let script = format!(
        "table inet count {{
           counter arrived {{ }}
           chain c {{
             type filter hook prerouting priority -300; policy accept;
             meta l4proto {{ tcp, udp }} th dport {PEER_PORT} counter name \"arrived\"
           }}
         }}"
    );
    let out = sh_any(&format!(
        "printf '%s' '{script}' | nsenter -t {pid} -n nft -f - && echo done"
    ));
    assert!(out.contains("done"), "counter in namespace {pid}: {out}");
}

/// Whether namespace `pid` has TCP connections on the peer's port that still
/// expect a packet (any state but TIME_WAIT): until they end, a client's
/// last ACK or FIN may still arrive and be counted.
pub fn peer_connections_open(pid: u32) -> bool {
    let out = sh_any(&format!(
        "nsenter -t {pid} -n ss -Htn state established state syn-recv state fin-wait-1 state fin-wait-2 state close-wait state last-ack state closing '( sport = :{PEER_PORT} )' && echo listed"
    ));
    assert!(out.contains("listed"), "ss in namespace {pid}: {out}");
    out.lines()
        .any(|l| l.trim() != "listed" && !l.trim().is_empty())
}

/// The packets [`install_counter`] counted in namespace `pid`.
pub fn counted(pid: u32) -> u64 {
    let out = sh_any(&format!(
        "nsenter -t {pid} -n nft list counter inet count arrived"
    ));
    out.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter in namespace {pid}: {out}"))
}

/// Runs `cgtproxy ARGS CONFIG` (the last argument is the config path, after
/// `--config` in `args`); returns stdout and stderr together, and the exit code.
pub fn cgtproxy(args: &[&str], cfg: &Path) -> (String, i32) {
    let out = Command::new(env!("CARGO_BIN_EXE_cgtproxy"))
        .args(args)
        .arg(cfg)
        .output()
        .unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (text, out.status.code().unwrap_or(-1))
}

/// The nftables ruleset, ip rules and routes of this namespace.
pub fn kernel_state() -> String {
    sh_any(
        "nft list ruleset; ip rule; ip -6 rule; ip route show table all type local dev lo | grep -v 'table local'; ip -6 route show table all type local dev lo | grep -v 'table local'",
    )
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(d) = self.daemon.take() {
            d.kill();
        }
        for s in &mut self.services {
            let _ = s.kill();
            let _ = s.wait();
        }
        remove_tree(&self.mount.join(self.base.trim_start_matches('/')));
        let _ = Command::new("umount").arg(&self.mount).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// dante's SOCKS5 port in the peer (SOCKS5 with UDP ASSOCIATE).
pub const DANTE: u16 = 1081;
/// The addresses dante connects out from: a destination that sees them was
/// reached through dante.
pub const DANTE4: &str = "10.99.0.3";
pub const DANTE6: &str = "fd99::3";

/// Starts dante in the peer on [`DANTE`], with its outgoing addresses.
pub fn dante(lab: &mut Lab) {
    lab.in_peer(&format!(
        "ip addr add {DANTE4}/24 dev veth1 && ip addr add {DANTE6}/64 dev veth1 nodad"
    ));
    let conf = lab.dir.join("danted.conf");
    std::fs::write(
        &conf,
        format!(
            "logoutput: stderr
internal: {PEER4} port = {DANTE}
internal: {PEER6} port = {DANTE}
external: {DANTE4}
external: {DANTE6}
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 }}
client pass {{ from: ::/0 to: ::/0 }}
socks pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 }}
socks pass {{ from: 0.0.0.0/0 to: ::/0 }}
socks pass {{ from: ::/0 to: ::/0 }}
socks pass {{ from: ::/0 to: 0.0.0.0/0 }}
"
        ),
    )
    .unwrap();
    let pid = lab.dir.join("danted.pid");
    lab.start_peer_service(
        &format!("danted -f '{}' -p '{}'", conf.display(), pid.display()),
        DANTE,
    );
}
