//! HTTP CONNECT client side. The tunnel is opened before the app sends anything
//! (many protocols have the server speak first), and bytes that arrive together
//! with the `200` reply are handed back, not lost.

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::upstream::Credentials;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("HTTP upstream: {0}")]
    Io(#[from] std::io::Error),
    #[error("HTTP upstream closed the connection before answering CONNECT")]
    Closed,
    #[error("HTTP upstream sent a reply header longer than {MAX_HEAD} bytes")]
    TooLong,
    #[error("HTTP upstream sent a malformed status line {0:?}")]
    Malformed(String),
    #[error("HTTP upstream requires a user/password (407){}", if *.0 { ": ours was rejected" } else { ", but the target has no upstream-auth-file" })]
    AuthRequired(bool),
    #[error("HTTP upstream refused CONNECT {dst}: {status}")]
    Refused { dst: SocketAddr, status: String },
}

const MAX_HEAD: usize = 16 * 1024;

/// Sends `CONNECT dst` and reads the reply. Returns the bytes received after the
/// reply header (already the destination's).
pub async fn connect<S>(
    s: &mut S,
    dst: SocketAddr,
    auth: Option<&Credentials>,
) -> Result<Vec<u8>, HttpError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut req = format!("CONNECT {dst} HTTP/1.1\r\nHost: {dst}\r\n");
    if let Some(c) = auth {
        let token = base64(format!("{}:{}", c.user, c.password).as_bytes());
        req.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await?;

    let mut buf = Vec::with_capacity(1024);
    // Where the search for the blank line resumes: a reply trickling in byte
    // by byte costs linear time, not quadratic.
    let mut scanned = 0;
    let end = loop {
        if let Some(i) = find(&buf[scanned..], b"\r\n\r\n") {
            break scanned + i + 4;
        }
        scanned = buf.len().saturating_sub(3);
        if buf.len() >= MAX_HEAD {
            return Err(HttpError::TooLong);
        }
        let mut chunk = [0u8; 2048];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(HttpError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let status_line = head.lines().next().unwrap_or("").trim().to_owned();
    let mut parts = status_line.splitn(3, ' ');
    let (version, code) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if !version.starts_with("HTTP/1.") || code.len() != 3 {
        return Err(HttpError::Malformed(status_line));
    }
    match code {
        "200" => Ok(buf.split_off(end)),
        "407" => Err(HttpError::AuthRequired(auth.is_some())),
        _ => Err(HttpError::Refused {
            dst,
            status: status_line,
        }),
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Standard base64 with padding (RFC 4648), for `Proxy-Authorization`.
fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("Aladdin:open sesame", "QWxhZGRpbjpvcGVuIHNlc2FtZQ=="),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[tokio::test]
    async fn keeps_bytes_that_arrive_with_the_reply() {
        let (mut ours, mut theirs) = tokio::io::duplex(1024);
        let server = tokio::spawn(async move {
            let mut req = vec![0u8; 512];
            let n = theirs.read(&mut req).await.unwrap();
            let req = String::from_utf8_lossy(&req[..n]).into_owned();
            theirs
                .write_all(b"HTTP/1.1 200 Connection established\r\nX: y\r\n\r\nSSH-2.0-hi\r\n")
                .await
                .unwrap();
            req
        });
        let dst: SocketAddr = "[fd99::2]:22".parse().unwrap();
        let c = Credentials {
            user: "Aladdin".into(),
            password: "open sesame".into(),
        };
        let rest = connect(&mut ours, dst, Some(&c)).await.unwrap();
        assert_eq!(rest, b"SSH-2.0-hi\r\n");
        let req = server.await.unwrap();
        assert!(
            req.starts_with("CONNECT [fd99::2]:22 HTTP/1.1\r\n"),
            "{req}"
        );
        assert!(req.contains("Proxy-Authorization: Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==\r\n"));
    }

    #[tokio::test]
    async fn refusals_are_errors() {
        for (reply, want) in [
            ("HTTP/1.1 407 Proxy Authentication Required\r\n\r\n", "407"),
            ("HTTP/1.0 403 Forbidden\r\n\r\n", "403 Forbidden"),
            ("garbage\r\n\r\n", "malformed"),
        ] {
            let (mut ours, mut theirs) = tokio::io::duplex(1024);
            tokio::spawn(async move {
                let mut req = vec![0u8; 512];
                let _ = theirs.read(&mut req).await;
                let _ = theirs.write_all(reply.as_bytes()).await;
            });
            let e = connect(&mut ours, "1.2.3.4:80".parse().unwrap(), None)
                .await
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    use super::super::testio::{Scripted, block_on, mutate};
    use proptest::prelude::*;

    const VALID: &[u8] = b"HTTP/1.1 200 Connection established\r\nVia: x\r\n\r\nhello";

    proptest! {
        /// Random and mutated replies, cut anywhere: a clean error, or a
        /// `200` status line whose bytes after the header are handed back.
        #[test]
        fn reply_never_panics(changes in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
                              keep in 0usize..80,
                              random in proptest::collection::vec(any::<u8>(), 0..200),
                              sizes in proptest::collection::vec(0usize..7, 0..4)) {
            let dst: SocketAddr = "192.0.2.1:443".parse().unwrap();
            for reply in [mutate(VALID, &changes, keep), random.clone()] {
                let mut s = Scripted::new(&reply, &sizes);
                match block_on(connect(&mut s, dst, None)) {
                    Ok(rest) => {
                        prop_assert!(reply.starts_with(b"HTTP/1."));
                        // What came after the header, as far as it was read.
                        let end = find(&reply, b"\r\n\r\n").map(|i| i + 4);
                        prop_assert!(end.is_some_and(|e| reply[e..].starts_with(&rest)));
                    }
                    Err(e) => prop_assert!(!e.to_string().is_empty()),
                }
            }
        }

        /// A header that never ends is cut off at the limit, however it
        /// trickles in: memory stays bounded.
        #[test]
        fn endless_header_is_too_long(line in "[a-zA-Z: ]{1,40}", sizes in proptest::collection::vec(1usize..3000, 1..4)) {
            let mut reply = b"HTTP/1.1 200 OK\r\n".to_vec();
            while reply.len() < MAX_HEAD + 4096 {
                reply.extend_from_slice(line.as_bytes());
                reply.extend_from_slice(b"\r\n");
            }
            let mut s = Scripted::new(&reply, &sizes);
            let r = block_on(connect(&mut s, "192.0.2.1:443".parse().unwrap(), None));
            prop_assert!(matches!(r, Err(HttpError::TooLong)), "{:?}", r);
        }
    }
}
