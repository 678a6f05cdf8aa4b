//! The `cgtproxy` command line: parses arguments and hands each subcommand to
//! the library.

use cgtproxy::cli::args::{self, Cmd, Invocation};
use cgtproxy::cli::{assets, doctor, exec, explain, status};
use cgtproxy::core::{render, table, tree};
use cgtproxy::watch::hierarchy;
use cgtproxy::{config, daemon, forward};

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

fn init_logging(level: Option<&str>) {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // Levels and `target=level` directives, as RUST_LOG takes them; not the
    // span/field filters of EnvFilter, whose regex engine would be a tenth of
    // the binary (and all of it resident).
    let spec = level
        .map(str::to_owned)
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".into());
    let filter = spec.parse::<Targets>().unwrap_or_else(|e| {
        eprintln!("ignoring log filter {spec:?} ({e}); logging at info");
        Targets::new().with_default(tracing::Level::INFO)
    });
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    // journald stamps lines itself.
    let registry = tracing_subscriber::registry().with(filter);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        registry.with(fmt.without_time()).init();
    } else {
        registry.with(fmt).init();
    }
}

fn load(config: Option<PathBuf>) -> anyhow::Result<config::Config> {
    let path = config::resolve_path(config.as_deref());
    if path.is_none() {
        eprintln!(
            "note: {} is absent; using the built-in default configuration",
            config::DEFAULT_PATH
        );
    }
    Ok(config::Config::load(path.as_deref())?)
}

fn render(config: Option<PathBuf>) -> anyhow::Result<()> {
    let cfg = load(config)?;
    let cgroups = match hierarchy::Hierarchy::discover(&cfg.cgroup_root) {
        Ok(h) => hierarchy::walk(&h),
        Err(e) => {
            eprintln!("note: {e}; rendering without cgroups");
            Vec::new()
        }
    };
    let tree = tree::Tree::build(&cfg, &cgroups);
    let paths = cgroups
        .into_iter()
        .map(|c| (c.id, c.path.to_string()))
        .collect();
    if cfg.datapath == config::Datapath::Ebpf {
        print!("{}", render::render_ebpf(&cfg, &tree.elements(), &paths));
        return Ok(());
    }
    let elements = tree.element_list();
    print!(
        "{}",
        render::render(
            &table::table(
                &cfg,
                &table::levels(&elements),
                &elements,
                &Default::default(),
                &[],
                true,
                0,
            ),
            &paths
        )
    );
    Ok(())
}

/// Prints a report; exit status 0 when all is as configured, else 3.
fn report(r: anyhow::Result<(String, bool)>) -> anyhow::Result<ExitCode> {
    let (text, ok) = r?;
    print!("{text}");
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(status::EXIT_DRIFT)
    })
}

fn main() -> ExitCode {
    let cli = match args::parse() {
        Invocation::Cli(cli) => cli,
        Invocation::GenerateAssets(dir) => {
            return match assets::generate(&dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("cgtproxy: {e}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    init_logging(cli.log_level.as_deref());
    let result = match cli.cmd {
        Cmd::Run { config } => daemon::run(config)
            .map(|()| ExitCode::SUCCESS)
            .map_err(anyhow::Error::from),
        Cmd::Check { config } => load(config).map(|c| {
            println!(
                "configuration valid: {} target(s), {} rule(s)",
                c.targets.len(),
                c.rules.len()
            );
            ExitCode::SUCCESS
        }),
        Cmd::Render { config } => render(config).map(|()| ExitCode::SUCCESS),
        Cmd::Forward { config, opts } => forward::run(config, opts)
            .map(|()| ExitCode::SUCCESS)
            .map_err(anyhow::Error::from),
        Cmd::Status { config, json } => {
            report(load(config).and_then(|c| Ok(status::status(&c, json)?)))
        }
        Cmd::Doctor { config } => report(load(config).map(|c| doctor::doctor(&c))),
        Cmd::Explain { config, what } => {
            report(load(config).and_then(|c| Ok(explain::explain(&c, &what)?)))
        }
        Cmd::Exec {
            config,
            target,
            cmd,
        } => {
            // `direct` and `drop` need no configuration: an unreadable one must not
            // stop a user from starting an app outside the proxy.
            let targets = if target == "direct" || target == "drop" {
                Ok(Vec::new())
            } else {
                load(config).map(|c| c.targets.into_iter().map(|t| t.name).collect())
            };
            targets.and_then(|t| Err(exec::exec(&t, &target, &cmd).into()))
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // Every message already ends with its cause; `{e:#}` would print the
            // cause's chain a second time.
            eprintln!("cgtproxy: {e}");
            ExitCode::FAILURE
        }
    }
}
