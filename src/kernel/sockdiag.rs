//! Which sockets are bound to a port, and whether they are transparent
//! (`IP_TRANSPARENT`): `tproxy` hands packets only to transparent sockets, so a
//! proxy core listening without it receives nothing. Read with sock_diag
//! (`NETLINK_SOCK_DIAG`), which reports each socket's options since Linux 5.10.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_sys::constants::NETLINK_SOCK_DIAG;

use crate::core::table::Proto;
use crate::kernel::consts::{NLM_F_DUMP, NLM_F_REQUEST, SOCK_DIAG_BY_FAMILY};
use crate::kernel::nlmsg;

/// `INET_DIAG_SOCKOPT`: struct inet_diag_sockopt, two bytes of bit fields.
const INET_DIAG_SOCKOPT: u16 = 22;
/// `struct inet_diag_msg`: family, state, timer, retrans, the 48-byte socket id,
/// expires, rqueue, wqueue, uid, inode.
const DIAG_MSG_LEN: usize = 72;
const TCP_LISTEN: u32 = 10;

/// `transparent` in the first byte of struct inet_diag_sockopt: the sixth bit
/// field (recverr, is_icsk, freebind, hdrincl, mc_loop, transparent, ...), which
/// the C compiler places from the low bit on little-endian targets and from the
/// high bit on big-endian ones.
const TRANSPARENT_BIT: u8 = if cfg!(target_endian = "little") {
    1 << 5
} else {
    1 << 2
};

#[derive(Debug, thiserror::Error)]
pub enum SockDiagError {
    #[error("opening the sock_diag netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("sock_diag dump of {what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("sock_diag dump of {what}: {errno}")]
    Kernel {
        what: &'static str,
        errno: nix::Error,
    },
}

/// One socket bound to the port asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    pub ipv6: bool,
    /// The local address it is bound to (unspecified for a wildcard).
    pub addr: IpAddr,
    /// `None` when the kernel does not report socket options (before 5.10).
    pub transparent: Option<bool>,
}

/// The dump request for one family and protocol (struct inet_diag_req_v2).
fn request(family: u8, proto: Proto, seq: u32) -> Vec<u8> {
    let (protocol, states) = match proto {
        // Listening TCP sockets; bound UDP sockets in any state.
        Proto::Tcp => (proto.number(), 1u32 << TCP_LISTEN),
        Proto::Udp => (proto.number(), u32::MAX),
    };
    let mut body = vec![family, protocol, 0, 0];
    body.extend(states.to_ne_bytes());
    // struct inet_diag_sockid: all zero, as a dump ignores it.
    body.resize(8 + 48, 0);
    nlmsg::encode(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, &body)
}

/// Parses one struct inet_diag_msg and its attributes: (local port, socket).
fn parse(payload: &[u8]) -> Option<(u16, Bound)> {
    let family = *payload.first()?;
    let ipv6 = i32::from(family) == libc::AF_INET6;
    // The id starts at byte 4 with the source (local) port, big-endian, then
    // the destination port and the source address (16 bytes; IPv4 in the
    // first 4).
    let port = u16::from_be_bytes(payload.get(4..6)?.try_into().ok()?);
    let src: [u8; 16] = payload.get(8..24)?.try_into().ok()?;
    let addr = if ipv6 {
        IpAddr::V6(Ipv6Addr::from(src))
    } else {
        IpAddr::V4(Ipv4Addr::new(src[0], src[1], src[2], src[3]))
    };
    let attrs = payload.get(DIAG_MSG_LEN..).unwrap_or(&[]);
    let transparent = nlmsg::attr(attrs, INET_DIAG_SOCKOPT)
        .and_then(|o| o.first())
        .map(|b| b & TRANSPARENT_BIT != 0);
    Some((
        port,
        Bound {
            ipv6,
            addr,
            transparent,
        },
    ))
}

/// The sockets of this network namespace (TCP: listening) with their local ports.
pub fn list(proto: Proto) -> Result<Vec<(u16, Bound)>, SockDiagError> {
    let what = match proto {
        Proto::Tcp => "TCP listeners",
        Proto::Udp => "UDP sockets",
    };
    let mut chan =
        nlmsg::Channel::open(NETLINK_SOCK_DIAG, 32 * 1024).map_err(SockDiagError::Socket)?;
    let mut found = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let code = chan
            .exchange(
                |seq| request(family, proto, seq),
                |m| found.extend(parse(m.payload())),
            )
            .map_err(|source| SockDiagError::Io { what, source })?;
        // An error message cut short ends the dump like an ack.
        if let Some(e) = code.filter(|&e| e != 0) {
            return Err(SockDiagError::Kernel {
                what,
                errno: nix::Error::from_raw(-e),
            });
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diag_msg(family: u8, port: u16, sockopt: Option<u8>) -> Vec<u8> {
        let mut m = vec![family, 10, 0, 0];
        m.extend(port.to_be_bytes());
        m.extend([0, 0]);
        // Source address: ::1, or 127.0.0.1 in the first four bytes.
        if i32::from(family) == libc::AF_INET6 {
            m.extend(std::net::Ipv6Addr::LOCALHOST.octets());
        } else {
            m.extend([127, 0, 0, 1]);
        }
        m.resize(DIAG_MSG_LEN, 0);
        if let Some(o) = sockopt {
            m.extend(6u16.to_ne_bytes());
            m.extend(INET_DIAG_SOCKOPT.to_ne_bytes());
            m.extend([o, 0, 0, 0]);
        }
        m
    }

    #[test]
    fn port_family_and_transparency_are_read() {
        let t = parse(&diag_msg(libc::AF_INET6 as u8, 7893, Some(TRANSPARENT_BIT))).unwrap();
        assert_eq!(
            t,
            (
                7893,
                Bound {
                    ipv6: true,
                    addr: "::1".parse().unwrap(),
                    transparent: Some(true)
                }
            )
        );
        // Every other option set, transparent not.
        let plain = parse(&diag_msg(libc::AF_INET as u8, 53, Some(!TRANSPARENT_BIT))).unwrap();
        assert_eq!(plain.1.transparent, Some(false));
        assert_eq!(plain.1.addr, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert!(!plain.1.ipv6);
        let old_kernel = parse(&diag_msg(libc::AF_INET as u8, 53, None)).unwrap();
        assert_eq!(old_kernel.1.transparent, None);
        assert_eq!(parse(&[2, 0, 0]), None, "truncated");
    }

    #[test]
    fn requests_are_inet_diag_req_v2_dumps() {
        let r = request(libc::AF_INET6 as u8, Proto::Tcp, 9);
        assert_eq!(r.len(), 16 + 56);
        let [m] = nlmsg::messages(&r)[..] else {
            panic!("one message");
        };
        assert_eq!((m.ty, m.flags, m.seq), (20, 0x301, 9));
        let p = m.payload();
        assert_eq!(p[..2], [libc::AF_INET6 as u8, libc::IPPROTO_TCP as u8]);
        assert_eq!(p[4..8], (1u32 << 10).to_ne_bytes(), "LISTEN only");
    }

    proptest::proptest! {
        /// Whatever the kernel (or a bug) puts in a message: parsed or
        /// skipped, never a panic.
        #[test]
        fn any_message_parses_or_is_skipped(m in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..120)) {
            let _ = parse(&m);
        }
    }
}
