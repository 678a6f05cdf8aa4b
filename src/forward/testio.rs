//! Test-only: an upstream stand-in that answers with scripted bytes, cut into
//! reads of chosen sizes (a server that trickles its reply), and then ends.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Replays `reply` in reads of the given sizes (cycled; 0 means 1), then EOF.
/// Whatever the client writes is kept in `written`.
pub struct Scripted {
    reply: VecDeque<u8>,
    sizes: Vec<usize>,
    next: usize,
    pub written: Vec<u8>,
}

impl Scripted {
    pub fn new(reply: &[u8], sizes: &[usize]) -> Scripted {
        Scripted {
            reply: reply.iter().copied().collect(),
            sizes: if sizes.is_empty() {
                vec![usize::MAX]
            } else {
                sizes.to_vec()
            },
            next: 0,
            written: Vec::new(),
        }
    }
}

impl AsyncRead for Scripted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let size = self.sizes[self.next % self.sizes.len()].max(1);
        self.next += 1;
        let n = size.min(buf.remaining()).min(self.reply.len());
        let chunk: Vec<u8> = self.reply.drain(..n).collect();
        buf.put_slice(&chunk);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Scripted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.written.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Runs a future to completion on a fresh single-threaded runtime. Scripted
/// streams never wait, so a future that does not finish is a bug the caller's
/// timeout reports.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a test runtime")
        .block_on(f)
}

/// `valid` with byte changes at chosen positions (index modulo the length),
/// then cut to `keep` bytes if shorter: the mutated replies of a hostile or
/// broken server.
pub fn mutate(valid: &[u8], changes: &[(usize, u8)], keep: usize) -> Vec<u8> {
    let mut v = valid.to_vec();
    if !v.is_empty() {
        for &(i, b) in changes {
            let i = i % v.len();
            v[i] = b;
        }
    }
    v.truncate(keep);
    v
}
