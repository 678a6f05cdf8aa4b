//! Readiness and status for systemd (`Type=notify-reload`). Every call is a no-op
//! without `NOTIFY_SOCKET`; a failure to notify is logged, never fatal.

use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("sd_notify failed: {e}");
    }
}

/// Everything is installed: `READY=1` with a status line.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A status line only.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// A reload begins: `RELOADING=1` with the monotonic timestamp systemd requires.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(e) => tracing::warn!("cannot read CLOCK_MONOTONIC for RELOADING=1: {e}"),
    }
}

/// Shutdown begins.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}
