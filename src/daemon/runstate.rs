//! The daemon's one piece of runtime state that other commands read: why it is
//! degraded, if it is. `cgtproxy status` runs in another process, so the daemon
//! keeps a file in its runtime directory (`RuntimeDirectory=cgtproxy`:
//! `/run/cgtproxy`, or `$RUNTIME_DIRECTORY`), present only while degraded.

use std::path::PathBuf;

fn path() -> PathBuf {
    let dir = std::env::var_os("RUNTIME_DIRECTORY")
        .and_then(|dirs| {
            // systemd may pass several directories separated by ':'; ours is the first.
            dirs.to_string_lossy()
                .split(':')
                .next()
                .filter(|d| !d.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from("/run/cgtproxy"));
    dir.join("degraded")
}

/// Records why the daemon is degraded. Best effort: a failure is logged, and
/// the log and `STATUS=` still say it.
pub fn set_degraded(reason: &str) {
    let p = path();
    let written = p
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&p, format!("{reason}\n")));
    if let Err(e) = written {
        tracing::debug!("cannot record the degraded state in {}: {e}", p.display());
    }
}

/// The daemon is whole again (or stopped).
pub fn clear() {
    let _ = std::fs::remove_file(path());
}

/// Why the daemon is degraded, if it says so.
pub fn degraded() -> Option<String> {
    std::fs::read_to_string(path())
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}
