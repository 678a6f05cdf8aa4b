//! `cgtproxy forward`: the built-in transparent forwarder. For every target with
//! an `upstream` it listens transparently on the target's port (TCP and UDP,
//! IPv4 and IPv6) and relays each flow to its original destination through the
//! upstream: TCP by SOCKS5 CONNECT or HTTP CONNECT, UDP by SOCKS5 UDP ASSOCIATE.
//!
//! Lifecycle as the daemon's: `READY=1` once every listener is bound; `SIGHUP`
//! re-reads the configuration and swaps upstreams for new flows while the
//! established ones go on; `SIGTERM`/`SIGINT` stop accepting and let open
//! connections finish for up to [`DRAIN`].
//!
//! Its listeners are bound to loopback (the daemon's `tproxy` statements name
//! 127.0.0.1 and ::1): the network cannot reach them. Flows back to this host's
//! own listener ports are refused ([`guard`]), and connections and UDP flows are
//! bounded in all and per source ([`limit`]).

mod guard;
mod http;
mod limit;
mod listen;
mod relay;
mod socks5;
mod target;
mod tcp;
#[cfg(test)]
mod testio;
mod udp;
mod upstream;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::config::{self, Config, ConfigError, Target};
use crate::daemon::notify;
use guard::LoopGuard;
use limit::Gate;
use listen::ListenError;
use target::TargetState;
use upstream::{Upstream, UpstreamError};

/// How long `SIGTERM` waits for open connections to finish.
pub const DRAIN: Duration = Duration::from_secs(10);
/// Descriptors a TCP connection may hold: the app's and the upstream's
/// sockets, and a splice pipe per direction once it moves bulk data.
const FDS_PER_CONNECTION: u64 = 6;
/// Descriptors a UDP flow holds: the reply socket, the association's control
/// connection and its relay socket.
const FDS_PER_UDP_FLOW: u64 = 3;
/// Descriptors besides: listeners, the runtime, stdio, the notify socket.
const FDS_SPARE: u64 = 256;

/// The forwarder's limits (`cgtproxy forward` flags). The defaults fit the
/// shipped unit's `LimitNOFILE=65536`: 8192 × 6 + 4096 × 3 + spare.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Open TCP connections of all targets together; beyond it new ones are reset.
    #[arg(long, default_value_t = 8192, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: u64,
    /// Open TCP connections from one source address.
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections_per_source: u64,
    /// Open UDP flows (app address and destination) of all targets together;
    /// datagrams of new flows beyond it are dropped.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_udp_flows: u64,
    /// Open UDP flows from one source address.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_udp_flows_per_source: u64,
    /// Seconds an upstream may take to connect and answer the handshake before
    /// the app's connection (or UDP flow) is given up.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub handshake_timeout: u64,
}

impl Options {
    /// Descriptors the limits can take at most.
    fn fds_needed(&self) -> u64 {
        // Saturating: the flags take any u64.
        self.max_connections
            .saturating_mul(FDS_PER_CONNECTION)
            .saturating_add(self.max_udp_flows.saturating_mul(FDS_PER_UDP_FLOW))
            .saturating_add(FDS_SPARE)
    }
}

/// What every target's tasks share: the limits and the loop guard.
pub struct Shared {
    /// Open TCP connections, in all and per source.
    pub conns: Arc<Gate>,
    /// Open UDP flows, in all and per source.
    pub flows: Arc<Gate>,
    /// Refuses flows back to this host's own listener ports.
    pub guard: LoopGuard,
    /// How long an upstream may take to connect and answer.
    pub handshake_timeout: Duration,
}

impl Shared {
    fn new(o: &Options) -> Shared {
        let n = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        Shared {
            conns: Gate::new(
                limit::CONNECTIONS,
                n(o.max_connections),
                n(o.max_connections_per_source),
            ),
            flows: Gate::new(
                limit::UDP_FLOWS,
                n(o.max_udp_flows),
                n(o.max_udp_flows_per_source),
            ),
            guard: LoopGuard::default(),
            handshake_timeout: Duration::from_secs(o.handshake_timeout),
        }
    }
}

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
pub fn run(config_path: Option<PathBuf>, opts: Options) -> Result<(), ForwardError> {
    raise_nofile(opts.fds_needed());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| ForwardError::Sys("starting the async runtime", e))?;
    rt.block_on(serve(config_path, opts))
}

/// Raises the soft open-file limit towards what the limits need (as far as
/// the hard limit allows), and says so when that is not enough: accept would
/// then fail with EMFILE before the limits apply.
fn raise_nofile(needed: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let want = needed.min(hard);
    if soft < want && setrlimit(Resource::RLIMIT_NOFILE, want, hard).is_err() {
        return;
    }
    if want < needed {
        warn!(
            "the open-file limit ({hard}) is below the {needed} the connection and UDP-flow \
             limits may need; raise LimitNOFILE= or lower --max-connections/--max-udp-flows"
        );
    }
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
fn upstreams(cfg: &Config, timeout: Duration) -> Result<Vec<(&Target, Upstream)>, ForwardError> {
    let mut out = Vec::new();
    for t in &cfg.targets {
        if let Some(up) =
            Upstream::of(t, timeout).map_err(|e| ForwardError::Upstream(t.name.clone(), e))?
        {
            out.push((t, up));
        }
    }
    if out.is_empty() {
        return Err(ForwardError::NothingToDo);
    }
    Ok(out)
}

/// Binds a target's listeners (on loopback) and starts their tasks.
fn start(t: &Target, up: Upstream, shared: &Arc<Shared>) -> Result<Service, ForwardError> {
    let state = Arc::new(TargetState::new(t.name.clone(), t.port, up));
    let mut tasks = Vec::new();
    let families: &[bool] = if t.no_ipv6 { &[false] } else { &[false, true] };
    let fail = |e| ForwardError::Listen(t.name.clone(), e);
    for &v6 in families {
        let addr = listen::loopback(v6, t.port);
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
        tasks.push(tokio::spawn(tcp::serve(tcp, state.clone(), shared.clone())));
        if let Some(u) = udp {
            tasks.push(tokio::spawn(udp::serve(u, state.clone(), shared.clone())));
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

async fn serve(config_path: Option<PathBuf>, opts: Options) -> Result<(), ForwardError> {
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

    let shared = Arc::new(Shared::new(&opts));
    shared.guard.set_ports(cfg.targets.iter().map(|t| t.port));
    let mut services = BTreeMap::new();
    for (t, up) in upstreams(&cfg, shared.handshake_timeout)? {
        services.insert(t.name.clone(), start(t, up, &shared)?);
    }
    let st = status(&services);
    info!("ready: {st}");
    notify::ready(&st);

    loop {
        tokio::select! {
            _ = hup.recv() => {
                notify::reloading();
                reload(resolved.as_deref(), &mut services, &shared).await;
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
    let open = shared.conns.open();
    if open > 0 {
        info!("stopped accepting; waiting up to {DRAIN:?} for {open} open connection(s)");
        if shared.conns.wait_idle(DRAIN).await {
            info!("all connections finished");
        } else {
            warn!(
                "{} connection(s) still open after {DRAIN:?}; closing them",
                shared.conns.open()
            );
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
    shared: &Arc<Shared>,
) {
    let cfg = match load(path) {
        Ok(c) => c,
        Err(e) => {
            error!("reload: {e}; keeping the running configuration");
            return;
        }
    };
    let wanted = match upstreams(&cfg, shared.handshake_timeout) {
        Ok(w) => w,
        Err(e) => {
            error!("reload: {e}; keeping the running configuration");
            return;
        }
    };
    shared.guard.set_ports(cfg.targets.iter().map(|t| t.port));
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
        match start(t, up, shared) {
            Ok(s) => {
                services.insert(t.name.clone(), s);
            }
            Err(e) => error!("reload: {e}"),
        }
    }
    info!("reloaded: {}", status(services));
}
