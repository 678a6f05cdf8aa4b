//! Copying bytes both ways between the app and the upstream tunnel.

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Per-direction copy buffer: 16 KiB keeps a thousand open connections around
/// 32 MiB of buffers while moving several Gbit/s.
const BUF: usize = 16 * 1024;

/// Bytes moved by one relay.
#[derive(Debug, Default, Clone, Copy)]
pub struct Moved {
    pub to_upstream: u64,
    pub to_app: u64,
}

/// Relays until both directions have ended. `early` (bytes the upstream sent
/// along with its handshake reply) reaches the app first. A direction that ends
/// is half-closed on the other side (`shutdown(SHUT_WR)`), so protocols that
/// half-close keep working.
pub async fn relay(
    app: &mut TcpStream,
    upstream: &mut TcpStream,
    early: &[u8],
) -> std::io::Result<Moved> {
    if !early.is_empty() {
        app.write_all(early).await?;
    }
    let (to_upstream, to_app) =
        tokio::io::copy_bidirectional_with_sizes(app, upstream, BUF, BUF).await?;
    Ok(Moved {
        to_upstream,
        to_app: to_app + early.len() as u64,
    })
}
