//! One target's upstream proxy: where it is, how to log in, and how to open a
//! connection to it that cgtproxy's own rules never capture again.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{setsockopt, sockopt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

use crate::config::{self, Target};

/// The fwmark (`SO_MARK`) on every socket the forwarder opens towards an upstream.
///
/// cgtproxy's output chain classifies packets by the sending socket's cgroup; the
/// forwarder's unit normally runs in a cgroup no rule routes, but a broad user rule
/// (say `^/system\.slice/`) could still catch it and loop its upstream connections
/// back into itself. Marking them lets the daemon's output chain return early for
/// this mark, whatever the rules say; configuration validation keeps it apart from
/// every target's mark.
pub const OWN_MARK: u32 = crate::config::FORWARD_MARK;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("reading upstream-auth-file {path}: {source}")]
    AuthRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("upstream-auth-file {path}: expected `user:password` on one line")]
    AuthFormat { path: PathBuf },
    #[error("upstream-auth-file {path}: user and password must each be 1 to 255 bytes")]
    AuthLength { path: PathBuf },
    #[error("resolving upstream {addr}: {source}")]
    Resolve {
        addr: String,
        source: std::io::Error,
    },
    #[error("upstream {addr} resolves to no address")]
    NoAddress { addr: String },
    #[error("connecting to upstream {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connecting to upstream {addr}: no answer within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("marking the socket to upstream {addr} (SO_MARK needs CAP_NET_ADMIN): {source}")]
    Mark { addr: String, source: nix::Error },
}

/// Which protocol the upstream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Socks5,
    Http,
}

/// A user name and password (RFC 1929 / HTTP Basic).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({:?}, <password>)", self.user)
    }
}

/// One target's upstream, ready to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub kind: Kind,
    /// `host:port` as configured; resolved at each connection.
    pub addr: String,
    pub auth: Option<Credentials>,
    /// How long connecting and the handshake may take before the app's
    /// connection (or UDP flow) is given up.
    pub timeout: Duration,
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.kind {
            Kind::Socks5 => "socks5",
            Kind::Http => "http",
        };
        write!(f, "{scheme}://{}", self.addr)
    }
}

impl Upstream {
    /// The upstream of `target`, reading its auth file; `None` if it has none.
    /// `timeout` bounds each connection's connect and handshake.
    pub fn of(target: &Target, timeout: Duration) -> Result<Option<Upstream>, UpstreamError> {
        let Some(up) = &target.upstream else {
            return Ok(None);
        };
        let (kind, addr) = match up {
            config::Upstream::Socks5(a) => (Kind::Socks5, a.clone()),
            config::Upstream::Http(a) => (Kind::Http, a.clone()),
        };
        let auth = match &target.upstream_auth_file {
            Some(p) => Some(read_auth(p)?),
            None => None,
        };
        Ok(Some(Upstream {
            kind,
            addr,
            auth,
            timeout,
        }))
    }

    /// The upstream's addresses, resolved now.
    pub async fn resolve(&self) -> Result<Vec<SocketAddr>, UpstreamError> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(self.addr.as_str())
            .await
            .map_err(|source| UpstreamError::Resolve {
                addr: self.addr.clone(),
                source,
            })?
            .collect();
        if addrs.is_empty() {
            return Err(UpstreamError::NoAddress {
                addr: self.addr.clone(),
            });
        }
        Ok(addrs)
    }

    /// A marked TCP connection to the upstream: each resolved address in turn.
    pub async fn connect(&self) -> Result<TcpStream, UpstreamError> {
        let fut = async {
            let mut last = None;
            for addr in self.resolve().await? {
                match connect_marked(addr).await {
                    Ok(s) => return Ok(s),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or(UpstreamError::NoAddress {
                addr: self.addr.clone(),
            }))
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .unwrap_or_else(|_| {
                Err(UpstreamError::Timeout {
                    addr: self.addr.clone(),
                    timeout: self.timeout,
                })
            })
    }
}

async fn connect_marked(addr: SocketAddr) -> Result<TcpStream, UpstreamError> {
    let io = |source| UpstreamError::Connect { addr, source };
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(io)?;
    setsockopt(&sock, sockopt::Mark, &OWN_MARK).map_err(|source| UpstreamError::Mark {
        addr: addr.to_string(),
        source,
    })?;
    let stream = sock.connect(addr).await.map_err(io)?;
    stream.set_nodelay(true).map_err(io)?;
    Ok(stream)
}

/// A marked UDP socket on `local` (port 0: any), for relaying to the upstream.
pub fn udp_marked(local: SocketAddr) -> Result<UdpSocket, UpstreamError> {
    let sock = std::net::UdpSocket::bind(local).map_err(|source| UpstreamError::Connect {
        addr: local,
        source,
    })?;
    setsockopt(&sock, sockopt::Mark, &OWN_MARK).map_err(|source| UpstreamError::Mark {
        addr: local.to_string(),
        source,
    })?;
    sock.set_nonblocking(true)
        .and_then(|()| UdpSocket::from_std(sock))
        .map_err(|source| UpstreamError::Connect {
            addr: local,
            source,
        })
}

/// Reads `user:password` from `path`; one trailing newline (LF or CRLF) is dropped.
pub fn read_auth(path: &Path) -> Result<Credentials, UpstreamError> {
    let text = std::fs::read_to_string(path).map_err(|source| UpstreamError::AuthRead {
        path: path.to_owned(),
        source,
    })?;
    parse_auth(&text).map_err(|long| {
        if long {
            UpstreamError::AuthLength {
                path: path.to_owned(),
            }
        } else {
            UpstreamError::AuthFormat {
                path: path.to_owned(),
            }
        }
    })
}

/// `Err(true)`: a part is empty or too long; `Err(false)`: not `user:password`.
fn parse_auth(text: &str) -> Result<Credentials, bool> {
    let line = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(text);
    if line.contains(['\n', '\r']) {
        return Err(false);
    }
    let (user, password) = line.split_once(':').ok_or(false)?;
    let ok = |s: &str| (1..=255).contains(&s.len());
    if !ok(user) || !ok(password) {
        return Err(true);
    }
    Ok(Credentials {
        user: user.to_owned(),
        password: password.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_file_trims_one_newline() {
        for text in ["u:p", "u:p\n", "u:p\r\n"] {
            let c = parse_auth(text).unwrap();
            assert_eq!((c.user.as_str(), c.password.as_str()), ("u", "p"));
        }
        // A colon in the password is kept.
        assert_eq!(parse_auth("u:a:b\n").unwrap().password, "a:b");
        assert_eq!(parse_auth("up\n"), Err(false));
        assert_eq!(parse_auth("u:p\n\n"), Err(false));
        assert_eq!(parse_auth(":p"), Err(true));
        assert_eq!(parse_auth(&format!("u:{}", "x".repeat(256))), Err(true));
    }

    #[test]
    fn debug_hides_the_password() {
        let c = parse_auth("me:secret").unwrap();
        assert!(!format!("{c:?}").contains("secret"));
    }

    proptest::proptest! {
        /// Any auth-file text: credentials or a clean refusal, never a panic;
        /// accepted parts are 1 to 255 bytes.
        #[test]
        fn any_auth_text_parses_or_is_refused(text in "\\PC{0,300}") {
            if let Ok(c) = parse_auth(&text) {
                proptest::prop_assert!((1..=255).contains(&c.user.len()));
                proptest::prop_assert!((1..=255).contains(&c.password.len()));
            }
        }
    }
}
