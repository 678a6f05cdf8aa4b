//! Readiness and status for systemd (`Type=notify-reload`). Every call is a no-op
//! without `NOTIFY_SOCKET`; a failure to notify is logged, never fatal, and
//! never blocks the daemon for long: a status line the manager has no room
//! for is dropped (the next one replaces it anyway), and a state change
//! waits at most [`STATE_TIMEOUT`].

use std::fmt::Write;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use sd_notify::NotifyState;

/// Longest wait for room in the manager's queue for READY, RELOADING and
/// STOPPING.
const STATE_TIMEOUT: Duration = Duration::from_secs(1);

/// The manager's socket: a path, or with a leading `@` an abstract name.
fn address(socket: &std::ffi::OsStr) -> std::io::Result<SocketAddr> {
    use std::os::unix::ffi::OsStrExt;
    match socket.as_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)
        }
        None => SocketAddr::from_pathname(socket),
    }
}

/// Sends `states` in one datagram to `socket`; `wait` says whether to wait
/// (briefly) for room in the manager's queue.
fn send_to(socket: &std::ffi::OsStr, states: &[NotifyState], wait: bool) -> std::io::Result<()> {
    let mut msg = String::new();
    for s in states {
        let _ = writeln!(msg, "{s}");
    }
    let sock = UnixDatagram::unbound()?;
    sock.connect_addr(&address(socket)?)?;
    if wait {
        sock.set_write_timeout(Some(STATE_TIMEOUT))?;
    } else {
        sock.set_nonblocking(true)?;
    }
    sock.send(msg.as_bytes()).map(drop)
}

fn send(states: &[NotifyState], wait: bool) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    match send_to(&socket, states, wait) {
        Ok(_) => {}
        Err(e) if !wait && e.kind() == std::io::ErrorKind::WouldBlock => {
            tracing::debug!("the service manager's queue is full: status line dropped");
        }
        Err(e) => tracing::warn!("sd_notify failed: {e}"),
    }
}

/// Everything is installed: `READY=1` with a status line.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)], true);
}

/// A status line only.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)], false);
}

/// A reload begins: `RELOADING=1` with the monotonic timestamp systemd requires.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now], true),
        Err(e) => tracing::warn!("cannot read CLOCK_MONOTONIC for RELOADING=1: {e}"),
    }
}

/// Shutdown begins.
pub fn stopping() {
    send(&[NotifyState::Stopping], true);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_manager_that_does_not_read_never_stalls_the_daemon() {
        let dir = std::env::temp_dir().join(format!("cgtproxy-notify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let manager = UnixDatagram::bind(&path).unwrap();
        let t0 = Instant::now();
        let mut dropped = 0;
        for i in 0..1000 {
            let line = format!("{i} cgroups");
            if send_to(path.as_os_str(), &[NotifyState::Status(&line)], false).is_err() {
                dropped += 1;
            }
        }
        assert!(dropped > 0, "the queue never filled");
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "status lines blocked"
        );
        let t0 = Instant::now();
        let full = send_to(path.as_os_str(), &[NotifyState::Stopping], true);
        assert!(full.is_err(), "a full queue takes no state change");
        assert!(
            t0.elapsed() < STATE_TIMEOUT * 3,
            "waited {:?}",
            t0.elapsed()
        );
        let mut buf = [0u8; 64];
        let n = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STATUS=0 cgroups\n");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
