//! Pieces the kernel tests and the benchmark share (`#[path]`-included by both):
//! a network namespace of its own, and removing a cgroup subtree.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A network namespace held by a sleeping process ("the internet", a tunnel's
/// far end); the process, and with it the namespace, goes on drop.
pub struct Netns {
    holder: Child,
}

impl Netns {
    /// A new namespace, once it exists (unshare has switched to it).
    pub fn new() -> Netns {
        let holder = Command::new("unshare")
            .args(["--net", "--", "sleep", "3600"])
            .stdout(Stdio::null())
            .spawn()
            .expect("running unshare");
        let ns = Netns { holder };
        let mine = std::fs::read_link("/proc/self/ns/net").expect("our network namespace");
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_link(format!("/proc/{}/ns/net", ns.pid()))
            .ok()
            .as_ref()
            == Some(&mine)
        {
            assert!(Instant::now() < deadline, "namespace not created");
            std::thread::sleep(Duration::from_millis(10));
        }
        ns
    }

    /// The holder's PID, for `nsenter -t PID -n` and `ip link … netns PID`.
    pub fn pid(&self) -> u32 {
        self.holder.id()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// Removes a cgroup subtree deepest first, killing what still runs in it.
pub fn remove_tree(dir: &Path) {
    let mut dirs = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
        dirs.push(d);
    }
    for d in dirs.iter().rev() {
        for attempt in 0..100 {
            if std::fs::remove_dir(d).is_ok() || !d.exists() {
                break;
            }
            if attempt == 0 {
                let _ = std::fs::write(d.join("cgroup.kill"), "1");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
