//! `cgtproxy generate-assets DIR`: the man pages and shell completions, generated
//! from the clap definitions in `args`, and the example configuration, for the
//! Debian package (dist/deb/build.sh) and the Nix package (nix/package.nix).
//!
//! The binary writes them itself, rather than a build script: packaging runs
//! the binary it ships, so the pages always describe that binary.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::args::Cli;
use crate::config;

/// The shells whose completion files are written, in completions/ under the
/// file names their generators choose (`cgtproxy.bash`, `_cgtproxy`,
/// `cgtproxy.fish`).
pub const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// The sections of cgtproxy(1) that clap has no notion of, in roff.
const MAN_EXTRA: &str = r#".SH FILES
.TP
\fI/etc/cgtproxy/config.json\fR
The configuration the commands read without \fB\-\-config\fR (under a unit with
ConfigurationDirectory=, \fI$CONFIGURATION_DIRECTORY/config.json\fR). When it is
absent, the built\-in default applies: one TPROXY target \fBproxy\fR on port 7893,
and the slices \fB\%cgtproxy\-proxy.slice\fR, \fB\%cgtproxy\-direct.slice\fR and
\fB\%cgtproxy\-drop.slice\fR; \fIexamples/config.json\fR in the package's
documentation directory is a copy of it. The Debian package's daemon unit runs
without \fB\-\-config\fR, so the default applies until the file exists; the
forwarder's unit, and the units in the source tree for manual installs, name
the file explicitly and fail to start without it.
.TP
\fBcgtproxy.service\fR, \fBcgtproxy\-forward.service\fR
The systemd units of the daemon and of the built\-in forwarder. Installing the
package starts neither: \fBsystemctl enable \-\-now cgtproxy\fR.
.TP
\fI/run/cgtproxy/\fR
Where the running daemon notes why it is degraded, for \fBcgtproxy status\fR.
.SH EXIT STATUS
0 on success; 1 on an error (an invalid configuration, a failed kernel update);
2 on a usage error; 3 when \fBstatus\fR, \fBexplain\fR or \fBdoctor\fR find the
kernel differing from the configuration or a probe failing. \fBexec\fR exits
with the status of its command.
.SH SEE ALSO
\fBnft\fR(8), \fBip\-rule\fR(8), \fBsystemd\-run\fR(1), \fBsystemd.exec\fR(5);
the README (on Debian: \fI/usr/share/doc/cgtproxy/README.md.gz\fR).
"#;

/// A file that could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {what} into {}: {source}", dir.display())]
pub struct AssetsError {
    what: &'static str,
    dir: PathBuf,
    source: std::io::Error,
}

/// Writes `dir/man/*.1` (one page for `cgtproxy` and one per subcommand,
/// `cgtproxy-SUB.1`), `dir/completions/` and `dir/examples/config.json` (the
/// built-in configuration, which the daemon runs when its config file is
/// absent). Creates the directories; overwrites files.
pub fn generate(dir: &Path) -> Result<(), AssetsError> {
    let err = |what, dir: &Path| {
        let dir = dir.to_path_buf();
        move |source| AssetsError { what, dir, source }
    };
    let man = dir.join("man");
    std::fs::create_dir_all(&man).map_err(err("man pages", &man))?;
    clap_mangen::generate_to(Cli::command(), &man).map_err(err("man pages", &man))?;
    // clap knows the options; what a system tool's page also owes its reader
    // (where the configuration lives, what the exit codes mean) is added here.
    let mut top = std::fs::OpenOptions::new()
        .append(true)
        .open(man.join("cgtproxy.1"))
        .map_err(err("man pages", &man))?;
    top.write_all(MAN_EXTRA.as_bytes())
        .map_err(err("man pages", &man))?;

    let completions = dir.join("completions");
    std::fs::create_dir_all(&completions).map_err(err("completions", &completions))?;
    let mut cmd = Cli::command();
    for shell in SHELLS {
        clap_complete::generate_to(shell, &mut cmd, "cgtproxy", &completions)
            .map_err(err("completions", &completions))?;
    }

    let examples = dir.join("examples");
    std::fs::create_dir_all(&examples).map_err(err("the example", &examples))?;
    std::fs::write(
        examples.join("config.json"),
        format!("{}\n", config::BUILTIN),
    )
    .map_err(err("the example", &examples))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system's temporary directory.
    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("cgtproxy-assets-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// The subcommands a user can call, from the same definitions as the parser.
    fn subcommands() -> Vec<String> {
        Cli::command()
            .get_subcommands()
            .map(|c| c.get_name().to_owned())
            .collect()
    }

    #[test]
    fn a_man_page_per_subcommand_and_no_other() {
        let dir = scratch("man");
        generate(&dir).expect("generate");
        let subs = subcommands();
        // Guards against an empty list making the loop below vacuous.
        assert!(
            subs.len() >= 8 && subs.iter().any(|s| s == "run"),
            "{subs:?}"
        );

        let mut want: Vec<String> = subs.iter().map(|s| format!("cgtproxy-{s}.1")).collect();
        want.push("cgtproxy.1".into());
        want.sort();
        let mut have: Vec<String> = std::fs::read_dir(dir.join("man"))
            .expect("man/")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        have.sort();
        assert_eq!(have, want);

        let top = read(&dir.join("man/cgtproxy.1"));
        assert!(
            top.starts_with(".ie \\n(.g .ds Aq"),
            "not roff: {}",
            &top[..80.min(top.len())]
        );
        assert!(top.contains(crate::cli::args::VERSION), "version missing");
        assert!(
            top.contains(".SH FILES") && top.contains(".SH SEE ALSO"),
            "{top}"
        );
        for s in &subs {
            assert!(
                top.contains(&format!("cgtproxy\\-{s}(1)")),
                "cgtproxy.1 does not list {s}"
            );
            let page = read(&dir.join(format!("man/cgtproxy-{s}.1")));
            assert!(
                page.contains(&format!(".TH cgtproxy-{s} 1")),
                "cgtproxy-{s}.1 title"
            );
        }
        // The config option's text reaches the pages of the commands that take it.
        assert!(read(&dir.join("man/cgtproxy-check.1")).contains("/etc/cgtproxy/config.json"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn completions_name_every_subcommand_and_not_the_packagers_one() {
        let dir = scratch("completions");
        generate(&dir).expect("generate");
        for file in ["cgtproxy.bash", "_cgtproxy", "cgtproxy.fish"] {
            let text = read(&dir.join("completions").join(file));
            for s in subcommands() {
                assert!(text.contains(&s), "{file} lacks {s}");
            }
            // fish spells it `-l log-level`.
            assert!(text.contains("log-level"), "{file} lacks --log-level");
            assert!(
                !text.contains("generate-assets"),
                "{file} offers generate-assets"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_example_is_the_builtin_configuration_and_valid() {
        let dir = scratch("example");
        generate(&dir).expect("generate");
        let path = dir.join("examples/config.json");
        let cfg = config::Config::load(Some(&path)).expect("the example loads");
        assert_eq!(cfg.targets.len(), 1);
        assert_eq!(read(&path).trim_end(), config::BUILTIN);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_unwritable_directory_is_an_error_naming_it() {
        let dir = scratch("unwritable");
        std::fs::write(&dir, "a file, not a directory").expect("write");
        let e = generate(&dir).expect_err("a file is no directory");
        assert!(e.to_string().contains(&dir.display().to_string()), "{e}");
        let _ = std::fs::remove_file(&dir);
    }
}
