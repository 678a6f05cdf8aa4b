//! TCP: accept transparently, open a tunnel through the upstream to the original
//! destination, relay. A tunnel that cannot be opened resets the app's
//! connection at once; nothing ever goes direct.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::debug;

use super::http::{self, HttpError};
use super::relay::{idle_timeout, relay};
use super::socks5::{self, Socks5Error};
use super::target::TargetState;
use super::upstream::{CONNECT_TIMEOUT, Kind, Upstream, UpstreamError};

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Socks5(#[from] Socks5Error),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("upstream handshake took longer than {CONNECT_TIMEOUT:?}")]
    Timeout,
}

/// Accepts until the task is aborted. `conns` bounds the open connections of all
/// targets together; each connection holds one permit until it ends.
pub async fn serve(listener: TcpListener, target: Arc<TargetState>, conns: Arc<Semaphore>) {
    let idle = idle_timeout();
    loop {
        let (app, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                target.warn(|| format!("accept on port {}: {e}", target.port));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            target.warn(|| format!("{peer}: too many open connections; reset"));
            reset(&app);
            continue;
        };
        let t = target.clone();
        tokio::spawn(async move {
            handle(app, peer, &t, idle).await;
            drop(permit);
        });
    }
}

fn reset(app: &TcpStream) {
    // SO_LINGER 0: close() sends RST, so the app fails at once.
    let _ = app.set_zero_linger();
}

async fn handle(mut app: TcpStream, peer: SocketAddr, t: &TargetState, idle: Duration) {
    let dst = match app.local_addr() {
        Ok(a) => SocketAddr::new(a.ip().to_canonical(), a.port()),
        Err(_) => return,
    };
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
    tokio::time::timeout(CONNECT_TIMEOUT, handshake)
        .await
        .unwrap_or(Err(TunnelError::Timeout))
}
