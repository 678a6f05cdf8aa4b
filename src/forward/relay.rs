//! Copying bytes both ways between the app and the upstream tunnel.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
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
        match SplicePipe::new() {
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

/// A splice pipe and how many bytes one splice moves through it.
struct SplicePipe {
    r: OwnedFd,
    w: OwnedFd,
    size: usize,
    /// It holds one of the [`LARGE_PIPES`] slots.
    large: bool,
}

/// Pipes of [`PIPE`] bytes open now. Each splice through one moves what the
/// socket holds, up to a MiB: a bulk transfer then took a third of the CPU
/// per byte that a default 64 KiB pipe costs (fewer calls and wake-ups;
/// 256 KiB pipes saved less than a fifth). The kernel counts pipe pages per
/// user and, past `pipe-user-pages-soft` (64 MiB), gives that user's new
/// pipes two pages each: at most [`MAX_LARGE_PIPES`] large ones (a quarter
/// of that) leave the default pipes of everything else the forwarder's user
/// opens alone.
static LARGE_PIPES: AtomicUsize = AtomicUsize::new(0);
const MAX_LARGE_PIPES: usize = 16;
/// A large pipe's size: the most an unprivileged process may ask for by
/// default (`pipe-max-size`).
const PIPE: usize = 1 << 20;

impl SplicePipe {
    fn new() -> io::Result<SplicePipe> {
        let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let mut pipe = SplicePipe {
            r,
            w,
            size: BUF,
            large: false,
        };
        if take_slot(&LARGE_PIPES, MAX_LARGE_PIPES) {
            match fcntl(&pipe.w, FcntlArg::F_SETPIPE_SZ(PIPE as i32)) {
                Ok(n) => {
                    pipe.size = n as usize;
                    pipe.large = true;
                }
                // Refused (a lower pipe-max-size, the quota): default size.
                Err(_) => {
                    LARGE_PIPES.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        Ok(pipe)
    }
}

/// Takes one of `max` slots counted in `used`, if one is free.
fn take_slot(used: &AtomicUsize, max: usize) -> bool {
    used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
        (n < max).then_some(n + 1)
    })
    .is_ok()
}

impl Drop for SplicePipe {
    fn drop(&mut self) {
        if self.large {
            LARGE_PIPES.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Moves `from` to `to` through the pipe `(r, w)` until `from` ends. The pipe
/// is empty whenever `from` is read, so EAGAIN there always means "no data".
async fn splice_rest(
    from: &TcpStream,
    to: &TcpStream,
    SplicePipe { r, w, size, .. }: &SplicePipe,
    total: &mut u64,
    activity: &Activity,
) -> io::Result<()> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        let n = from
            .async_io(Interest::READABLE, || {
                Ok(splice(from.as_fd(), None, w.as_fd(), None, *size, flags)?)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_pipes_are_capped_and_their_slots_come_back() {
        let used = AtomicUsize::new(0);
        assert!((0..3).all(|_| take_slot(&used, 3)));
        assert!(!take_slot(&used, 3), "a fourth is refused");
        assert_eq!(used.load(Ordering::Relaxed), 3, "a refusal takes nothing");
        used.fetch_sub(1, Ordering::Relaxed);
        assert!(take_slot(&used, 3));
    }

    #[test]
    fn a_splice_pipe_holds_a_mib_and_gives_its_slot_back() {
        // The only test in this binary that makes splice pipes.
        let pipe = SplicePipe::new().unwrap();
        assert!(pipe.large, "the kernel refused a {PIPE}-byte pipe");
        assert!(pipe.size >= PIPE, "{}", pipe.size);
        assert_eq!(LARGE_PIPES.load(Ordering::Relaxed), 1);
        drop(pipe);
        assert_eq!(LARGE_PIPES.load(Ordering::Relaxed), 0);
    }
}
