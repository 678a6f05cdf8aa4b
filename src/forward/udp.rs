//! UDP: one SOCKS5 UDP association per flow (app address, original destination),
//! answered from a transparent socket bound to the destination (TPROXY, and
//! the eBPF datapath's per-flow addresses), or from the listener itself when
//! the eBPF datapath redirected a socket's datagrams by its port (its programs
//! name the destination as the answer's source). Flows end after
//! an idle timeout; flows are bounded in all and per source, so a flood of new
//! flows costs dropped datagrams, never memory or descriptors. Datagrams back
//! to this host's own listener ports are dropped (a loop). An upstream without
//! UDP drops it.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tracing::{debug, warn};

use super::Shared;
use super::limit::{Gate, Pass};
use super::listen::{self, ListenError};
use super::socks5::{self, Socks5Error};
use super::target::TargetState;
use super::upstream::{self, Kind, Upstream, UpstreamError};

/// Datagrams queued per flow while its association is being set up.
const QUEUE: usize = 64;
/// A flow without traffic either way for this long ends.
pub const IDLE: Duration = Duration::from_secs(60);
/// DNS flows (destination port 53) are one query and one answer.
pub const DNS_IDLE: Duration = Duration::from_secs(10);
/// Largest datagram relayed.
const MAX_DATAGRAM: usize = 65535;

#[derive(Debug, thiserror::Error)]
pub enum UdpError {
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Socks5(#[from] Socks5Error),
    #[error("UDP ASSOCIATE: {0}")]
    Io(#[from] std::io::Error),
    #[error("UDP ASSOCIATE took longer than {0:?}")]
    Timeout(Duration),
    #[error("the upstream's UDP relay {0} is of another address family than our socket")]
    Family(SocketAddr),
}

type Key = (SocketAddr, SocketAddr);
type Table = Arc<Mutex<HashMap<Key, mpsc::Sender<Vec<u8>>>>>;

fn lock(t: &Table) -> std::sync::MutexGuard<'_, HashMap<Key, mpsc::Sender<Vec<u8>>>> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

/// Receives from a transparent UDP listener until the task is aborted.
pub async fn serve(sock: UdpSocket, target: Arc<TargetState>, shared: Arc<Shared>) {
    let table: Table = Arc::default();
    let sock = Arc::new(sock);
    let query = listen::OriginalDstQuery::new(sock.local_addr().is_ok_and(|a| a.is_ipv6()));
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let d = match listen::recv_orig(&sock, &mut buf).await {
            Ok(d) => d,
            Err(e) => {
                debug!("{}: UDP receive: {e}", target.name);
                continue;
            }
        };
        // TPROXY tells the original destination; a datagram the eBPF datapath
        // redirected arrives addressed to the listener, which asks for it (on
        // every datagram: the app's port may be a new socket's). Its answers
        // come from the listener, but for a flow address's (see
        // `listen::is_flow_address`).
        let (dst, listener) = match d.redirected.then(|| query.ask(d.src)) {
            Some(Some(orig)) => {
                let from_listener = !listen::is_flow_address(d.src.ip());
                (orig, from_listener.then(|| sock.clone()))
            }
            _ => (d.dst, None),
        };
        let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
        // Also what was sent to the listener's port directly, not by TPROXY.
        if shared.guard.is_loop(dst) {
            shared.guard.warn(|| {
                format!(
                    "{}: UDP {} → {dst}: refused: the destination is this host's own listener port (a loop)",
                    target.name, d.src
                )
            });
            continue;
        }
        let up = target.upstream();
        if up.kind != Kind::Socks5 {
            if target.first_udp_drop() {
                warn!(
                    "{}: upstream {up} carries no UDP: dropping this target's UDP \
                     (first: {} → {}); it is never sent direct",
                    target.name, d.src, d.dst
                );
            }
            continue;
        }
        let data = buf[..d.len].to_vec();
        let ends = Ends {
            app: d.src,
            dst,
            listener,
        };
        dispatch(&table, &target, &shared.flows, up, ends, data);
    }
}

/// A flow's two ends and how it answers.
struct Ends {
    app: SocketAddr,
    dst: SocketAddr,
    /// Answer from this listener (the eBPF datapath: the app's socket talks
    /// to the listener, and the datapath's `recvmsg` programs name the
    /// original destination as the source); without one, from a transparent
    /// socket bound to the destination (TPROXY).
    listener: Option<Arc<UdpSocket>>,
}

/// Where a flow sends the app its answers.
enum Reply {
    Socket(UdpSocket),
    Listener(Arc<UdpSocket>, SocketAddr),
}

impl Reply {
    async fn send(&self, data: &[u8]) {
        let _ = match self {
            Reply::Socket(s) => s.send(data).await,
            Reply::Listener(l, app) => l.send_to(data, app).await,
        };
    }

    /// The transparent socket, which also receives the app's later datagrams
    /// of the flow; the listener's are not the flow's to read.
    fn socket(&self) -> Option<&UdpSocket> {
        match self {
            Reply::Socket(s) => Some(s),
            Reply::Listener(..) => None,
        }
    }
}

fn dispatch(
    table: &Table,
    target: &Arc<TargetState>,
    flows: &Arc<Gate>,
    up: Arc<Upstream>,
    ends: Ends,
    data: Vec<u8>,
) {
    let (src, dst) = (ends.app, ends.dst);
    let mut map = lock(table);
    let (entry, data) = match map.entry((src, dst)) {
        Entry::Occupied(e) => match e.get().try_send(data) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => return,
            // The flow just ended: a new one takes its place, if admitted.
            Err(mpsc::error::TrySendError::Closed(data)) => (Entry::Occupied(e), data),
        },
        Entry::Vacant(e) => (Entry::Vacant(e), data),
    };
    match flows.admit(src.ip()) {
        Ok(pass) => {
            entry.insert_entry(spawn_flow(table, target, pass, up, ends, data));
        }
        Err(refusal) => {
            if let Entry::Occupied(e) = entry {
                e.remove();
            }
            drop(map);
            flows.warn(&refusal, || {
                format!("{}: UDP {src} → {dst}: {refusal}; dropped", target.name)
            });
        }
    }
}

fn spawn_flow(
    table: &Table,
    target: &Arc<TargetState>,
    pass: Pass,
    up: Arc<Upstream>,
    ends: Ends,
    first: Vec<u8>,
) -> mpsc::Sender<Vec<u8>> {
    let (tx, rx) = mpsc::channel(QUEUE);
    let _ = tx.try_send(first);
    let (table, t) = (table.clone(), target.clone());
    let (src, dst) = (ends.app, ends.dst);
    tokio::spawn(async move {
        if let Err(e) = flow(&up, ends, rx).await {
            t.warn(|| format!("UDP {src} → {dst} via {up}: {e}"));
        }
        drop(pass);
        // Remove our entry unless a newer flow has replaced it (ours is closed:
        // its receiver was dropped with `flow`).
        let mut map = lock(&table);
        if map.get(&(src, dst)).is_some_and(|tx| tx.is_closed()) {
            map.remove(&(src, dst));
        }
    });
    tx
}

/// Opens the association: a control connection and a marked UDP socket
/// connected to the relay. Asks with the relay socket's real address, which
/// servers that follow RFC 1928 strictly (dante) hold us to.
async fn associate(up: &Upstream) -> Result<(TcpStream, UdpSocket), UdpError> {
    let mut ctrl = up.connect().await?;
    socks5::login(&mut ctrl, up.auth.as_ref()).await?;
    let local = ctrl.local_addr()?;
    let relay = upstream::udp_marked(SocketAddr::new(local.ip(), 0))?;
    let mut bound = socks5::udp_associate(&mut ctrl, relay.local_addr()?).await?;
    if bound.ip().is_unspecified() {
        bound.set_ip(ctrl.peer_addr()?.ip());
    }
    let bound = SocketAddr::new(bound.ip().to_canonical(), bound.port());
    if bound.is_ipv4() != local.is_ipv4() {
        return Err(UdpError::Family(bound));
    }
    relay.connect(bound).await?;
    Ok((ctrl, relay))
}

async fn flow(up: &Upstream, ends: Ends, mut rx: mpsc::Receiver<Vec<u8>>) -> Result<(), UdpError> {
    let (src, dst) = (ends.app, ends.dst);
    let reply = match ends.listener {
        None => Reply::Socket(listen::udp_reply(dst, src)?),
        Some(l) => Reply::Listener(l, src),
    };
    let (mut ctrl, relay) = tokio::time::timeout(up.timeout, associate(up))
        .await
        .unwrap_or(Err(UdpError::Timeout(up.timeout)))?;
    debug!("UDP {src} → {dst}: associated via {up}");
    let idle = if dst.port() == 53 { DNS_IDLE } else { IDLE };
    let mut deadline = Instant::now() + idle;
    let mut out = Vec::with_capacity(2048);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut ctrl_buf = [0u8; 64];
    loop {
        tokio::select! {
            m = rx.recv() => match m {
                Some(d) => {
                    socks5::udp_wrap(dst, &d, &mut out);
                    let _ = relay.send(&out).await;
                    deadline = Instant::now() + idle;
                }
                None => return Ok(()),
            },
            r = readable(reply.socket()) => {
                r?;
                let Some(sock) = reply.socket() else { continue };
                match sock.try_recv(&mut buf) {
                    Ok(n) => {
                        socks5::udp_wrap(dst, &buf[..n], &mut out);
                        let _ = relay.send(&out).await;
                        deadline = Instant::now() + idle;
                    }
                    // WouldBlock, or an ICMP error for an earlier answer: go on.
                    Err(_) => continue,
                }
            }
            r = relay.readable() => {
                r?;
                match relay.try_recv(&mut buf) {
                    Ok(n) => {
                        if let Some((from, payload)) = socks5::udp_unwrap(&buf[..n]) {
                            let from = SocketAddr::new(from.ip().to_canonical(), from.port());
                            if from == dst {
                                reply.send(payload).await;
                                deadline = Instant::now() + idle;
                            }
                        }
                    }
                    Err(_) => continue,
                }
            }
            r = ctrl.read(&mut ctrl_buf) => match r {
                // The association lives as long as its control connection.
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => {}
            },
            _ = sleep_until(deadline) => return Ok(()),
        }
    }
}

/// Waits until `sock` is readable; forever without one.
async fn readable(sock: Option<&UdpSocket>) -> std::io::Result<()> {
    match sock {
        Some(s) => s.readable().await,
        None => std::future::pending().await,
    }
}
