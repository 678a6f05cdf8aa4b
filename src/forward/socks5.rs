//! SOCKS5 client side (RFC 1928), user/password login (RFC 1929), and the UDP
//! request header.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::upstream::Credentials;

#[derive(Debug, thiserror::Error)]
pub enum Socks5Error {
    #[error("SOCKS5 upstream: {0}")]
    Io(#[from] std::io::Error),
    #[error("SOCKS5 upstream answered version {0}, not 5")]
    Version(u8),
    #[error("SOCKS5 upstream accepts none of our login methods (we offered {0})")]
    NoMethod(&'static str),
    #[error("SOCKS5 upstream asks for a user/password, but the target has no upstream-auth-file")]
    NeedsAuth,
    #[error("SOCKS5 upstream rejected the user/password (status {0})")]
    AuthRejected(u8),
    #[error("SOCKS5 upstream refused {cmd} {dst}: {}", reply_text(*.code))]
    Refused {
        cmd: &'static str,
        dst: SocketAddr,
        code: u8,
    },
    #[error("SOCKS5 upstream sent an unknown address type {0}")]
    AddrType(u8),
}

const VERSION: u8 = 5;
const NO_AUTH: u8 = 0x00;
const USER_PASS: u8 = 0x02;
const NO_ACCEPTABLE: u8 = 0xff;
const CMD_CONNECT: u8 = 0x01;
const CMD_UDP_ASSOCIATE: u8 = 0x03;
const ATYP_V4: u8 = 0x01;
const ATYP_DOMAIN: u8 = 0x03;
const ATYP_V6: u8 = 0x04;

fn reply_text(code: u8) -> &'static str {
    match code {
        1 => "general failure",
        2 => "not allowed by ruleset",
        3 => "network unreachable",
        4 => "host unreachable",
        5 => "connection refused",
        6 => "TTL expired",
        7 => "command not supported",
        8 => "address type not supported",
        _ => "unknown reply code",
    }
}

/// Method negotiation and, if the server picks it, user/password login. Waits for
/// the method reply before sending credentials (some servers drop bytes that
/// arrive early).
pub async fn login<S>(s: &mut S, auth: Option<&Credentials>) -> Result<(), Socks5Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (greeting, offered): (&[u8], _) = match auth {
        Some(_) => (&[VERSION, 2, NO_AUTH, USER_PASS], "none, user/password"),
        None => (&[VERSION, 1, NO_AUTH], "none"),
    };
    s.write_all(greeting).await?;
    let mut reply = [0u8; 2];
    s.read_exact(&mut reply).await?;
    if reply[0] != VERSION {
        return Err(Socks5Error::Version(reply[0]));
    }
    match (reply[1], auth) {
        (NO_AUTH, _) => Ok(()),
        (USER_PASS, Some(c)) => {
            // Lengths were checked (1..=255) when the auth file was read.
            let mut msg = Vec::with_capacity(3 + c.user.len() + c.password.len());
            msg.push(1);
            msg.push(c.user.len() as u8);
            msg.extend_from_slice(c.user.as_bytes());
            msg.push(c.password.len() as u8);
            msg.extend_from_slice(c.password.as_bytes());
            s.write_all(&msg).await?;
            let mut st = [0u8; 2];
            s.read_exact(&mut st).await?;
            if st[1] != 0 {
                return Err(Socks5Error::AuthRejected(st[1]));
            }
            Ok(())
        }
        (USER_PASS, None) => Err(Socks5Error::NeedsAuth),
        (NO_ACCEPTABLE, _) | (_, _) => Err(Socks5Error::NoMethod(offered)),
    }
}

/// Sends a request and returns the server's bound address.
async fn request<S>(
    s: &mut S,
    cmd: u8,
    name: &'static str,
    addr: SocketAddr,
) -> Result<SocketAddr, Socks5Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut msg = vec![VERSION, cmd, 0];
    put_addr(&mut msg, addr);
    s.write_all(&msg).await?;
    let mut head = [0u8; 3];
    s.read_exact(&mut head).await?;
    if head[0] != VERSION {
        return Err(Socks5Error::Version(head[0]));
    }
    let bound = read_addr(s).await?;
    if head[1] != 0 {
        return Err(Socks5Error::Refused {
            cmd: name,
            dst: addr,
            code: head[1],
        });
    }
    Ok(bound)
}

/// CONNECT to `dst` on an upstream connection that has logged in.
pub async fn connect<S>(s: &mut S, dst: SocketAddr) -> Result<(), Socks5Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    request(s, CMD_CONNECT, "CONNECT", dst).await.map(drop)
}

/// UDP ASSOCIATE for datagrams sent from `from` (our relay socket's address, or
/// unspecified); returns where to send them.
pub async fn udp_associate<S>(s: &mut S, from: SocketAddr) -> Result<SocketAddr, Socks5Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    request(s, CMD_UDP_ASSOCIATE, "UDP ASSOCIATE", from).await
}

fn put_addr(buf: &mut Vec<u8>, addr: SocketAddr) {
    match addr.ip() {
        IpAddr::V4(ip) => {
            buf.push(ATYP_V4);
            buf.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            buf.push(ATYP_V6);
            buf.extend_from_slice(&ip.octets());
        }
    }
    buf.extend_from_slice(&addr.port().to_be_bytes());
}

async fn read_addr<S: AsyncRead + Unpin>(s: &mut S) -> Result<SocketAddr, Socks5Error> {
    let ip = match s.read_u8().await? {
        ATYP_V4 => {
            let mut b = [0u8; 4];
            s.read_exact(&mut b).await?;
            IpAddr::V4(Ipv4Addr::from(b))
        }
        ATYP_V6 => {
            let mut b = [0u8; 16];
            s.read_exact(&mut b).await?;
            IpAddr::V6(Ipv6Addr::from(b))
        }
        ATYP_DOMAIN => {
            // A name as the bound address is legal but useless to us: skip it.
            let n = s.read_u8().await?;
            let mut b = vec![0u8; n as usize];
            s.read_exact(&mut b).await?;
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        }
        t => return Err(Socks5Error::AddrType(t)),
    };
    let port = s.read_u16().await?;
    Ok(SocketAddr::new(ip, port))
}

/// Prepends the UDP request header (RSV, FRAG 0, address) for `dst` to `data`.
pub fn udp_wrap(dst: SocketAddr, data: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&[0, 0, 0]);
    put_addr(out, dst);
    out.extend_from_slice(data);
}

/// Splits a datagram from the relay into its source address and payload;
/// `None` for fragments, names and malformed datagrams (dropped).
pub fn udp_unwrap(d: &[u8]) -> Option<(SocketAddr, &[u8])> {
    if d.len() < 4 || d[2] != 0 {
        return None;
    }
    let (ip, rest) = match d[3] {
        ATYP_V4 if d.len() >= 10 => {
            let b: [u8; 4] = d[4..8].try_into().ok()?;
            (IpAddr::V4(Ipv4Addr::from(b)), &d[8..])
        }
        ATYP_V6 if d.len() >= 22 => {
            let b: [u8; 16] = d[4..20].try_into().ok()?;
            (IpAddr::V6(Ipv6Addr::from(b)), &d[20..])
        }
        _ => return None,
    };
    let port = u16::from_be_bytes([rest[0], rest[1]]);
    Some((SocketAddr::new(ip, port), &rest[2..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_header_round_trips() {
        let mut out = Vec::new();
        for dst in ["10.0.0.1:53", "[fd99::2]:8080"] {
            let dst: SocketAddr = dst.parse().unwrap();
            udp_wrap(dst, b"hello", &mut out);
            assert_eq!(udp_unwrap(&out), Some((dst, &b"hello"[..])));
        }
        assert_eq!(
            udp_unwrap(&[0, 0, 1, 1, 1, 2, 3, 4, 0, 53]),
            None,
            "fragment"
        );
        assert_eq!(udp_unwrap(&[0, 0, 0, 1, 1, 2]), None, "short");
    }

    #[tokio::test]
    async fn login_waits_for_the_method_reply() {
        let (mut ours, mut theirs) = tokio::io::duplex(256);
        let server = tokio::spawn(async move {
            let mut g = [0u8; 4];
            theirs.read_exact(&mut g).await.unwrap();
            assert_eq!(g, [5, 2, 0, 2]);
            // Nothing more may arrive before our reply.
            let mut more = [0u8; 1];
            let early =
                tokio::time::timeout(std::time::Duration::from_millis(50), theirs.read(&mut more))
                    .await;
            assert!(early.is_err(), "credentials sent before the method reply");
            theirs.write_all(&[5, 2]).await.unwrap();
            let mut a = [0u8; 5];
            theirs.read_exact(&mut a).await.unwrap();
            assert_eq!(&a, b"\x01\x01u\x01p");
            theirs.write_all(&[1, 1]).await.unwrap();
        });
        let c = Credentials {
            user: "u".into(),
            password: "p".into(),
        };
        let r = login(&mut ours, Some(&c)).await;
        assert!(matches!(r, Err(Socks5Error::AuthRejected(1))), "{r:?}");
        server.await.unwrap();
    }

    use super::super::testio::{Scripted, block_on, mutate};
    use proptest::prelude::*;

    fn creds() -> Credentials {
        Credentials {
            user: "u".into(),
            password: "p".into(),
        }
    }

    /// Valid replies to a CONNECT: bound address v4, v6 and a name.
    fn valid_replies() -> Vec<Vec<u8>> {
        vec![
            vec![5, 0, 0, 1, 10, 0, 0, 1, 0x1f, 0x90],
            [&[5u8, 0, 0, 4][..], &[0xfd; 16], &[0, 80]].concat(),
            [&[5u8, 0, 0, 3, 4][..], b"host", &[0, 80]].concat(),
        ]
    }

    proptest! {
        /// Any bytes from the server, in any cut: login ends, and succeeds only
        /// on a version-5 answer naming a method we offered.
        #[test]
        fn login_never_panics(reply in proptest::collection::vec(any::<u8>(), 0..16),
                              sizes in proptest::collection::vec(0usize..4, 0..4),
                              with_auth in any::<bool>()) {
            let c = creds();
            let auth = with_auth.then_some(&c);
            let mut s = Scripted::new(&reply, &sizes);
            let r = block_on(login(&mut s, auth));
            if r.is_ok() {
                prop_assert_eq!(reply[0], VERSION);
                prop_assert!(reply[1] == NO_AUTH || (with_auth && reply[1] == USER_PASS));
            }
        }

        /// Random and mutated CONNECT replies: a clean error or a well-formed
        /// success, never a panic, never a read past the end.
        #[test]
        fn connect_reply_never_panics(pick in 0usize..3,
                                      changes in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
                                      keep in 0usize..32,
                                      random in proptest::collection::vec(any::<u8>(), 0..40),
                                      sizes in proptest::collection::vec(0usize..5, 0..4)) {
            let dst: SocketAddr = "192.0.2.1:443".parse().unwrap();
            for reply in [mutate(&valid_replies()[pick], &changes, keep), random.clone()] {
                let mut s = Scripted::new(&reply, &sizes);
                match block_on(connect(&mut s, dst)) {
                    Ok(()) => {
                        prop_assert_eq!(&reply[..2], &[VERSION, 0]);
                        prop_assert!([ATYP_V4, ATYP_DOMAIN, ATYP_V6].contains(&reply[3]));
                    }
                    Err(e) => prop_assert!(!e.to_string().is_empty()),
                }
            }
        }

        /// The bound address of a UDP ASSOCIATE reply, from random bytes.
        #[test]
        fn udp_associate_reply_never_panics(reply in proptest::collection::vec(any::<u8>(), 0..40)) {
            let mut s = Scripted::new(&reply, &[]);
            let _ = block_on(udp_associate(&mut s, "0.0.0.0:0".parse().unwrap()));
        }

        /// Datagrams from the relay: any bytes are dropped or split without a
        /// panic, and what is split off is the datagram's own tail.
        #[test]
        fn udp_unwrap_never_panics(d in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Some((_, payload)) = udp_unwrap(&d) {
                prop_assert!(d.ends_with(payload));
                prop_assert!(d.len() - payload.len() == 10 || d.len() - payload.len() == 22);
            }
        }

        /// Whatever we wrap, we unwrap unchanged.
        #[test]
        fn udp_header_round_trips_for_any_payload(v6 in any::<bool>(), ip in any::<u128>(), port in any::<u16>(),
                                                  data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let ip = if v6 { IpAddr::V6(Ipv6Addr::from(ip)) } else { IpAddr::V4(Ipv4Addr::from(ip as u32)) };
            let dst = SocketAddr::new(ip, port);
            let mut out = Vec::new();
            udp_wrap(dst, &data, &mut out);
            prop_assert_eq!(udp_unwrap(&out), Some((dst, &data[..])));
        }
    }
}
