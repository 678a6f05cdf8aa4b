//! Copying bytes both ways between the app and the upstream tunnel.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::fcntl::{OFlag, SpliceFFlags, splice};
use nix::sys::socket::{Shutdown, shutdown};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until};

/// A connection without a byte either way for this long is closed: it frees
/// what a vanished peer would hold forever. Long enough for interactive
/// sessions; apps that idle longer send keepalives (ssh `ServerAliveInterval`).
pub const IDLE: Duration = Duration::from_secs(600);
/// Test-only: the idle timeout in milliseconds instead of [`IDLE`].
pub const TEST_IDLE_ENV: &str = "CGTPROXY_TEST_TCP_IDLE_MS";

/// The TCP idle timeout: [`IDLE`], or the test knob's value.
pub fn idle_timeout() -> Duration {
    std::env::var(TEST_IDLE_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(IDLE, Duration::from_millis)
}

/// Per-direction copy buffer. It is allocated only while data flows, so an
/// idle connection holds none (a thousand open idle connections cost about
/// 4 MiB, not 64 MiB).
const BUF: usize = 64 * 1024;
/// After this many bytes one way, a connection is a bulk transfer: that
/// direction moves through a pipe by splice(2), without copying through user
/// space (a third less CPU per byte), at the price of a pipe (two descriptors)
/// that short connections are spared.
const SPLICE_AFTER: u64 = 256 * 1024;

/// Bytes moved by one relay.
#[derive(Debug, Default, Clone, Copy)]
pub struct Moved {
    pub to_upstream: u64,
    pub to_app: u64,
}

/// Relays until both directions have ended, or nothing moved for `idle`
/// (`TimedOut`). `early` (bytes the upstream sent along with its handshake
/// reply) reaches the app first. A direction that ends is half-closed on the
/// other side (`shutdown(SHUT_WR)`), so protocols that half-close keep working.
pub async fn relay(
    app: &mut TcpStream,
    upstream: &mut TcpStream,
    early: &[u8],
    idle: Duration,
) -> std::io::Result<Moved> {
    if !early.is_empty() {
        app.write_all(early).await?;
    }
    let activity = Activity::new();
    let both = async {
        tokio::try_join!(
            one_way(app, upstream, &activity),
            one_way(upstream, app, &activity)
        )
    };
    let (to_upstream, to_app) = tokio::select! {
        r = both => r?,
        () = activity.idle_for(idle) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("idle for {idle:?}: closed"),
            ));
        }
    };
    Ok(Moved {
        to_upstream,
        to_app: to_app + early.len() as u64,
    })
}

fn half_close(s: &TcpStream) {
    // ENOTCONN: the peer is gone already; the other direction will say so.
    let _ = shutdown(s.as_raw_fd(), Shutdown::Write);
}

/// When a connection last moved data. A timestamp both directions update,
/// rather than a timer reset on every read: the idle timer wakes once per
/// timeout, not once per packet.
struct Activity {
    start: Instant,
    /// Milliseconds since `start` at the last data.
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Returns once nothing moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            if last.elapsed() >= idle {
                return;
            }
            sleep_until(last + idle).await;
        }
    }
}

/// Relays `from` to `to` until `from` ends, then half-closes `to`.
async fn one_way(from: &TcpStream, to: &TcpStream, activity: &Activity) -> io::Result<u64> {
    let mut total = 0;
    if !copy(from, to, &mut total, SPLICE_AFTER, activity).await? {
        match pipe() {
            Ok(p) => splice_rest(from, to, &p, &mut total, activity).await?,
            // Out of descriptors: go on copying.
            Err(_) => {
                copy(from, to, &mut total, u64::MAX, activity).await?;
            }
        }
    }
    half_close(to);
    Ok(total)
}

/// Copies through a buffer until `from` ends (true) or `total` reaches `limit`
/// (false).
async fn copy(
    from: &TcpStream,
    to: &TcpStream,
    total: &mut u64,
    limit: u64,
    activity: &Activity,
) -> io::Result<bool> {
    loop {
        from.readable().await?;
        let mut buf = Vec::with_capacity(BUF);
        loop {
            buf.clear();
            match from.try_read_buf(&mut buf) {
                Ok(0) => return Ok(true),
                Ok(n) => {
                    activity.touch();
                    write_all(to, &buf[..n]).await?;
                    *total += n as u64;
                    if *total >= limit {
                        return Ok(false);
                    }
                }
                // Drained: give the buffer back while waiting.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
    }
}

async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?)
}

/// Moves `from` to `to` through the pipe `(r, w)` until `from` ends. The pipe
/// is empty whenever `from` is read, so EAGAIN there always means "no data".
async fn splice_rest(
    from: &TcpStream,
    to: &TcpStream,
    (r, w): &(OwnedFd, OwnedFd),
    total: &mut u64,
    activity: &Activity,
) -> io::Result<()> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        let n = from
            .async_io(Interest::READABLE, || {
                Ok(splice(from.as_fd(), None, w.as_fd(), None, BUF, flags)?)
            })
            .await?;
        if n == 0 {
            return Ok(());
        }
        activity.touch();
        let mut left = n;
        while left > 0 {
            left -= to
                .async_io(Interest::WRITABLE, || {
                    Ok(splice(r.as_fd(), None, to.as_fd(), None, left, flags)?)
                })
                .await?;
        }
        *total += n as u64;
    }
}
