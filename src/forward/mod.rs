//! `cgtproxy forward`: the built-in transparent forwarder. For every target with
//! an `upstream` it listens transparently on the target's port (TCP and UDP,
//! IPv4 and IPv6) and relays each flow to its original destination through the
//! upstream: TCP by SOCKS5 CONNECT or HTTP CONNECT, UDP by SOCKS5 UDP ASSOCIATE.
//!
//! Lifecycle as the daemon's: `READY=1` once every listener is bound; `SIGHUP`
//! re-reads the configuration and swaps upstreams for new flows while the
//! established ones go on; `SIGTERM`/`SIGINT` stop accepting and let open
//! connections finish for up to [`DRAIN`].

mod http;
mod listen;
mod relay;
mod socks5;
mod target;
mod tcp;
mod udp;
mod upstream;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::config::{self, Config, ConfigError, Target};
use crate::notify;
use listen::ListenError;
use target::TargetState;
use upstream::{Upstream, UpstreamError};

/// Open TCP connections of all targets together; beyond it new ones are reset.
pub const MAX_CONNS: usize = 65536;
/// How long `SIGTERM` waits for open connections to finish.
pub const DRAIN: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("tproxies.{0}: {1}")]
    Upstream(String, UpstreamError),
    #[error("tproxies.{0}: {1}")]
    Listen(String, ListenError),
    #[error("no target has an upstream; nothing to forward")]
    NothingToDo,
    #[error("{0}: {1}")]
    Sys(&'static str, std::io::Error),
}

/// Runs the forwarder until SIGTERM or SIGINT.
pub fn run(config_path: Option<PathBuf>) -> Result<(), ForwardError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| ForwardError::Sys("starting the async runtime", e))?;
    rt.block_on(serve(config_path))
}

/// One target's listeners and shared state. Dropping it stops accepting; the
/// flows it started go on.
struct Service {
    state: Arc<TargetState>,
    /// What the listeners were bound for; a change needs new listeners.
    shape: (u16, bool, bool),
    tasks: Vec<JoinHandle<()>>,
}

impl Service {
    /// Stops the listeners and waits until their sockets are closed.
    async fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

fn shape(t: &Target) -> (u16, bool, bool) {
    (t.port, t.no_udp, t.no_ipv6)
}

/// The targets with an upstream, each with its upstream loaded (auth file read).
fn upstreams(cfg: &Config) -> Result<Vec<(&Target, Upstream)>, ForwardError> {
    let mut out = Vec::new();
    for t in &cfg.targets {
        if let Some(up) = Upstream::of(t).map_err(|e| ForwardError::Upstream(t.name.clone(), e))? {
            out.push((t, up));
        }
    }
    if out.is_empty() {
        return Err(ForwardError::NothingToDo);
    }
    Ok(out)
}

/// Binds a target's listeners and starts their tasks.
fn start(t: &Target, up: Upstream, conns: &Arc<Semaphore>) -> Result<Service, ForwardError> {
    let state = Arc::new(TargetState::new(t.name.clone(), t.port, up));
    let mut tasks = Vec::new();
    let families: &[bool] = if t.no_ipv6 { &[false] } else { &[false, true] };
    let fail = |e| ForwardError::Listen(t.name.clone(), e);
    for &v6 in families {
        let addr = listen::any(v6, t.port);
        let tcp = match listen::tcp_listener(addr) {
            Ok(l) => l,
            Err(e) if v6 && e.unsupported_family() => {
                warn!("{}: IPv6 is not available here; IPv4 only", t.name);
                continue;
            }
            Err(e) => return Err(fail(e)),
        };
        let udp = if t.no_udp {
            None
        } else {
            Some(listen::udp_listener(addr).map_err(fail)?)
        };
        tasks.push(tokio::spawn(tcp::serve(tcp, state.clone(), conns.clone())));
        if let Some(u) = udp {
            tasks.push(tokio::spawn(udp::serve(u, state.clone())));
        }
    }
    info!(
        "{}: listening on port {} → {}",
        t.name,
        t.port,
        state.upstream()
    );
    Ok(Service {
        state,
        shape: shape(t),
        tasks,
    })
}

fn status(services: &BTreeMap<String, Service>) -> String {
    let list: Vec<String> = services
        .values()
        .map(|s| {
            format!(
                "{} :{} → {}",
                s.state.name,
                s.state.port,
                s.state.upstream()
            )
        })
        .collect();
    format!("forwarding {}", list.join(", "))
}

fn load(path: Option<&std::path::Path>) -> Result<Config, ForwardError> {
    Ok(Config::load(path)?)
}

async fn serve(config_path: Option<PathBuf>) -> Result<(), ForwardError> {
    let resolved = config::resolve_path(config_path.as_deref());
    let cfg = load(resolved.as_deref())?;
    match &resolved {
        Some(p) => info!("configuration {}", p.display()),
        None => info!(
            "no configuration at {}; using the built-in default",
            config::DEFAULT_PATH
        ),
    }
    let sig = |kind, name| signal(kind).map_err(|e| ForwardError::Sys(name, e));
    let mut hup = sig(SignalKind::hangup(), "SIGHUP handler")?;
    let mut term = sig(SignalKind::terminate(), "SIGTERM handler")?;
    let mut int = sig(SignalKind::interrupt(), "SIGINT handler")?;

    let conns = Arc::new(Semaphore::new(MAX_CONNS));
    let mut services = BTreeMap::new();
    for (t, up) in upstreams(&cfg)? {
        services.insert(t.name.clone(), start(t, up, &conns)?);
    }
    let st = status(&services);
    info!("ready: {st}");
    notify::ready(&st);

    loop {
        tokio::select! {
            _ = hup.recv() => {
                notify::reloading();
                reload(resolved.as_deref(), &mut services, &conns).await;
                let st = status(&services);
                notify::ready(&st);
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }

    notify::stopping();
    for (_, s) in std::mem::take(&mut services) {
        s.stop().await;
    }
    let open = MAX_CONNS - conns.available_permits();
    if open > 0 {
        info!("stopped accepting; waiting up to {DRAIN:?} for {open} open connection(s)");
        match tokio::time::timeout(DRAIN, conns.acquire_many(MAX_CONNS as u32)).await {
            Ok(_) => info!("all connections finished"),
            Err(_) => warn!(
                "{} connection(s) still open after {DRAIN:?}; closing them",
                MAX_CONNS - conns.available_permits()
            ),
        }
    }
    info!("stopped");
    Ok(())
}

/// Applies a re-read configuration: new upstreams for new flows, listeners
/// started and stopped as targets come and go. An invalid configuration changes
/// nothing.
async fn reload(
    path: Option<&std::path::Path>,
    services: &mut BTreeMap<String, Service>,
    conns: &Arc<Semaphore>,
) {
    let cfg = match load(path) {
        Ok(c) => c,
        Err(e) => {
            error!("reload: {e}; keeping the running configuration");
            return;
        }
    };
    let wanted = match upstreams(&cfg) {
        Ok(w) => w,
        Err(e) => {
            error!("reload: {e}; keeping the running configuration");
            return;
        }
    };
    // Stop what goes away or needs new listeners first, freeing their ports.
    let keep: BTreeMap<&str, (u16, bool, bool)> = wanted
        .iter()
        .map(|(t, _)| (t.name.as_str(), shape(t)))
        .collect();
    let gone: Vec<String> = services
        .iter()
        .filter(|(name, s)| keep.get(name.as_str()) != Some(&s.shape))
        .map(|(name, _)| name.clone())
        .collect();
    for name in gone {
        if let Some(s) = services.remove(&name) {
            info!("{name}: listeners on port {} stopped", s.state.port);
            s.stop().await;
        }
    }
    for (t, up) in wanted {
        if let Some(s) = services.get(&t.name) {
            let text = up.to_string();
            if s.state.set_upstream(up) {
                info!("{}: upstream now {text} for new flows", t.name);
            }
            continue;
        }
        match start(t, up, conns) {
            Ok(s) => {
                services.insert(t.name.clone(), s);
            }
            Err(e) => error!("reload: {e}"),
        }
    }
    info!("reloaded: {}", status(services));
}
