//! `cgtproxy exec`: start a command in a transient systemd user scope inside
//! `cgtproxy-TARGET.slice`, which the configuration's rules route. It never moves a
//! running process; systemd creates the scope and the command starts in it.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("unknown target {target:?}: use one of {}", .known.join(", "))]
    UnknownTarget { target: String, known: Vec<String> },
    #[error("no command given")]
    NoCommand,
    #[error("cannot run systemd-run: {0}")]
    Spawn(std::io::Error),
}

/// The systemd-run invocation for `target` (`direct`, `drop` or one of `targets`).
pub fn command(targets: &[String], target: &str, cmd: &[OsString]) -> Result<Command, ExecError> {
    let known: Vec<String> = ["direct", "drop"]
        .into_iter()
        .map(str::to_owned)
        .chain(targets.iter().cloned())
        .collect();
    if !known.iter().any(|k| k == target) {
        return Err(ExecError::UnknownTarget {
            target: target.to_owned(),
            known,
        });
    }
    let (prog, args) = cmd.split_first().ok_or(ExecError::NoCommand)?;
    let mut c = Command::new("systemd-run");
    c.args(["--user", "--scope", "--quiet", "--collect"])
        .arg(format!("--slice=cgtproxy-{target}.slice"))
        .arg("--")
        .arg(prog)
        .args(args);
    Ok(c)
}

/// Replaces this process with systemd-run, so the command's exit status is ours.
pub fn exec(targets: &[String], target: &str, cmd: &[OsString]) -> ExecError {
    match command(targets, target, cmd) {
        Ok(mut c) => {
            // Start the slice first: its cgroup then exists, and is classified by
            // the daemon, before the app's scope and first packet. Created together
            // with the scope, the app could race the daemon. Best effort: if it
            // fails, systemd-run creates the slice itself.
            let _ = Command::new("systemctl")
                .args(["--user", "start", "--quiet"])
                .arg(format!("cgtproxy-{target}.slice"))
                .status();
            ExecError::Spawn(c.exec())
        }
        Err(e) => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_checked_and_the_slice_is_named_after_them() {
        let cfg = ["proxy".to_owned()];
        let c = command(&cfg, "proxy", &["curl".into(), "-v".into()]).unwrap();
        let args: Vec<String> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(c.get_program(), "systemd-run");
        assert_eq!(
            args,
            [
                "--user",
                "--scope",
                "--quiet",
                "--collect",
                "--slice=cgtproxy-proxy.slice",
                "--",
                "curl",
                "-v"
            ]
        );
        assert!(command(&cfg, "drop", &["x".into()]).is_ok());
        let e = command(&cfg, "nope", &["x".into()])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            r#"unknown target "nope": use one of direct, drop, proxy"#
        );
        assert!(matches!(
            command(&cfg, "direct", &[]),
            Err(ExecError::NoCommand)
        ));
    }
}
