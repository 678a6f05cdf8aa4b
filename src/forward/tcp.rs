//! TCP: accept transparently, open a tunnel through the upstream to the original
//! destination, relay. A tunnel that cannot be opened resets the app's
//! connection at once; nothing ever goes direct.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

use super::Shared;
use super::http::{self, HttpError};
use super::listen;
use super::relay::{idle_timeout, relay};
use super::socks5::{self, Socks5Error};
use super::target::TargetState;
use super::upstream::{Kind, Upstream, UpstreamError};

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Socks5(#[from] Socks5Error),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("upstream handshake took longer than {0:?}")]
    Timeout(Duration),
}

/// First pause after a failed accept; it doubles up to [`ACCEPT_BACKOFF_MAX`].
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause between accepts while they keep failing.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Accepts until the task is aborted. `shared.conns` bounds the open
/// connections of all targets together and per source; each connection holds
/// its pass until it ends. Connections back to our own ports are refused.
pub async fn serve(listener: TcpListener, target: Arc<TargetState>, shared: Arc<Shared>) {
    let idle = idle_timeout();
    let own = listener.local_addr().ok();
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let (app, peer) = match listener.accept().await {
            Ok(x) => {
                backoff = ACCEPT_BACKOFF_MIN;
                x
            }
            Err(e) => {
                // EMFILE/ENFILE leave the connection queued, so accepting again
                // at once fails again: pause, longer each time, and keep the
                // listener alive for when descriptors are free.
                target.warn(|| {
                    format!(
                        "accept on port {}: {e}; retrying in {backoff:?}",
                        target.port
                    )
                });
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let dst = match app.local_addr() {
            // Redirected (the eBPF datapath) rather than handed over by TPROXY:
            // the kernel remembers where the app was going.
            Ok(a) if Some(a) == own => listen::original_dst(&app, a.is_ipv6()).unwrap_or(a),
            Ok(a) => a,
            Err(_) => continue,
        };
        let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
        if shared.guard.is_loop(dst) {
            shared.guard.warn(|| {
                format!(
                    "{}: {peer} → {dst}: refused: the destination is this host's own listener port (a loop)",
                    target.name
                )
            });
            reset(&app);
            continue;
        }
        let pass = match shared.conns.admit(peer.ip()) {
            Ok(p) => p,
            Err(refusal) => {
                shared.conns.warn(&refusal, || {
                    format!("{}: {peer} → {dst}: {refusal}; reset", target.name)
                });
                reset(&app);
                continue;
            }
        };
        let t = target.clone();
        tokio::spawn(async move {
            handle(app, peer, dst, &t, idle).await;
            drop(pass);
        });
    }
}

fn reset(app: &TcpStream) {
    // SO_LINGER 0: close() sends RST, so the app fails at once.
    let _ = app.set_zero_linger();
}

async fn handle(
    mut app: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    t: &TargetState,
    idle: Duration,
) {
    let up = t.upstream();
    match open(&up, dst).await {
        Ok((mut tunnel, early)) => {
            let _ = app.set_nodelay(true);
            match relay(&mut app, &mut tunnel, &early, idle).await {
                Ok(m) => debug!(
                    "{}: {peer} → {dst} via {up}: {} B out, {} B in",
                    t.name, m.to_upstream, m.to_app
                ),
                Err(e) => debug!("{}: {peer} → {dst} via {up}: {e}", t.name),
            }
        }
        Err(e) => {
            t.warn(|| format!("{peer} → {dst} via {up}: {e}"));
            reset(&app);
        }
    }
}

/// A connection through `up` to `dst`, plus any bytes of `dst`'s that arrived
/// with the upstream's reply.
pub async fn open(up: &Upstream, dst: SocketAddr) -> Result<(TcpStream, Vec<u8>), TunnelError> {
    let handshake = async {
        let mut s = up.connect().await?;
        let early = match up.kind {
            Kind::Socks5 => {
                socks5::login(&mut s, up.auth.as_ref()).await?;
                socks5::connect(&mut s, dst).await?;
                Vec::new()
            }
            Kind::Http => http::connect(&mut s, dst, up.auth.as_ref()).await?,
        };
        Ok::<_, TunnelError>((s, early))
    };
    tokio::time::timeout(up.timeout, handshake)
        .await
        .unwrap_or(Err(TunnelError::Timeout(up.timeout)))
}
