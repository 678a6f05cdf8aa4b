//! The command line: clap's definitions, apart from what the commands do, so
//! that the man pages and shell completions are generated from the same source
//! as the parser (see `assets`).

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// The version `--version` prints and the man pages carry: the crate's version
/// and, when build.rs could tell, the git revision it was built from.
pub const VERSION: &str = env!("CGTPROXY_VERSION");

/// The name of the packagers' command that writes the man pages and
/// completions (`cgtproxy generate-assets DIR`).
const GENERATE_ASSETS: &str = "generate-assets";

/// The user-facing command line, exactly what the man pages and completions
/// describe.
#[derive(Parser)]
#[command(
    name = "cgtproxy",
    version = VERSION,
    // Every subcommand's man page then names the version too.
    propagate_version = true,
    about = "Per-application transparent proxying by cgroup v2 path"
)]
pub struct Cli {
    /// Log level or filter (error, warn, info, debug, trace); overrides RUST_LOG.
    #[arg(long, global = true)]
    pub log_level: Option<String>,
    /// The subcommand and its arguments.
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// The subcommands.
#[derive(Subcommand)]
pub enum Cmd {
    /// Run the daemon: install the table and routing, follow cgroups, clean up on exit.
    Run {
        /// Configuration file [default: /etc/cgtproxy/config.json, else built-in].
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration; exit 1 with the reasons if it is invalid.
    Check {
        /// Configuration file [default: /etc/cgtproxy/config.json, else built-in].
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print the nft ruleset that `run` would install for the cgroups present now
    /// (with `"datapath": "ebpf"`: what its maps would hold).
    Render {
        /// Configuration file [default: /etc/cgtproxy/config.json, else built-in].
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run the built-in transparent forwarder for targets with an `upstream`.
    Forward {
        /// Configuration file [default: /etc/cgtproxy/config.json, else built-in].
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        opts: crate::forward::Options,
    },
    /// Show the installed state from the kernel and any drift from the config
    /// (exit 3 when the kernel differs from the configuration).
    Status {
        /// Configuration file [default: /etc/cgtproxy/config.json, else built-in].
        #[arg(long)]
        config: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Explain how the traffic of a PID, cgroup path or unit is classified, and
    /// whether the kernel agrees (exit 3 when it does not).
    Explain {
        /// Configuration file [default: /etc/cgtproxy/config.json, else built-in].
        #[arg(long)]
        config: Option<PathBuf>,
        /// A PID, a cgroup path (starting with /) or a unit name (e.g. foo.service).
        what: String,
    },
    /// Probe what the daemon depends on, each with a verdict and a fix
    /// (exit 3 when a probe fails).
    Doctor {
        /// Configuration file [default: /etc/cgtproxy/config.json, else built-in].
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run CMD in a transient user scope inside cgtproxy-TARGET.slice.
    Exec {
        /// Configuration file [default: /etc/cgtproxy/config.json, else built-in].
        #[arg(long)]
        config: Option<PathBuf>,
        /// A configured target name, `direct` or `drop`.
        target: String,
        /// The command and its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        cmd: Vec<OsString>,
    },
}

/// `cgtproxy generate-assets DIR`: for packagers, not users.
#[derive(Parser)]
struct GenerateAssets {
    /// Directory to write man/ (section 1 pages), completions/ (bash, zsh,
    /// fish) and examples/ into; created if absent.
    dir: PathBuf,
}

/// What the command line asks for.
pub enum Invocation {
    /// An ordinary command.
    Cli(Cli),
    /// Write the man pages, completions and example configuration into a directory.
    GenerateAssets(PathBuf),
}

/// Parses the process's arguments; on an error or `--help`, prints and exits
/// as clap does.
pub fn parse() -> Invocation {
    // The packagers' command is added to the parser only here, not to `Cli`:
    // clap_complete ignores `hide`, so inside `Cli` it would show up in every
    // user's shell completions.
    let matches = Cli::command()
        .subcommand(GenerateAssets::command().name(GENERATE_ASSETS).hide(true))
        .get_matches();
    let parsed = match matches.subcommand() {
        Some((GENERATE_ASSETS, m)) => {
            GenerateAssets::from_arg_matches(m).map(|g| Invocation::GenerateAssets(g.dir))
        }
        _ => Cli::from_arg_matches(&matches).map(Invocation::Cli),
    };
    parsed.unwrap_or_else(|e| e.exit())
}
