//! Transparent sockets: the TPROXY listeners (TCP and UDP, one per family) and
//! the per-flow UDP sockets that answer an app from its original destination;
//! and the original destination of a connection or datagram redirected to the
//! listener.

use std::io::IoSliceMut;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::sys::socket::{
    AddressFamily, Backlog, ControlMessageOwned, MsgFlags, SockFlag, SockType, SockaddrStorage,
    bind, connect, getsockopt, listen, recvmsg, setsockopt, socket, sockopt,
};
use tokio::io::Interest;
use tokio::net::{TcpListener, UdpSocket};

#[derive(Debug, thiserror::Error)]
#[error("{what} {addr}: {source}")]
pub struct ListenError {
    what: &'static str,
    addr: SocketAddr,
    source: std::io::Error,
}

impl ListenError {
    /// The address family is not available on this host (IPv6 disabled).
    pub fn unsupported_family(&self) -> bool {
        self.source.raw_os_error() == Some(libc::EAFNOSUPPORT)
    }
}

/// The loopback address of one family on `port`: where the daemon's `tproxy`
/// statements deliver, and out of the network's reach (a wildcard-bound
/// transparent listener also takes connections to the host's own addresses).
pub fn loopback(v6: bool, port: u16) -> SocketAddr {
    if v6 {
        SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::LOCALHOST, port, 0, 0))
    } else {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
    }
}

/// A non-blocking socket with `IP_TRANSPARENT` (which also covers IPv6 sockets),
/// `SO_REUSEADDR`, and `IPV6_V6ONLY` for IPv6.
fn transparent(addr: SocketAddr, ty: SockType) -> nix::Result<OwnedFd> {
    let fam = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(
        fam,
        ty,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    setsockopt(&fd, sockopt::IpTransparent, &true)?;
    Ok(fd)
}

fn err(what: &'static str, addr: SocketAddr) -> impl FnOnce(nix::Error) -> ListenError {
    move |e| ListenError {
        what,
        addr,
        source: e.into(),
    }
}

fn io_err(what: &'static str, addr: SocketAddr) -> impl FnOnce(std::io::Error) -> ListenError {
    move |source| ListenError { what, addr, source }
}

/// A transparent TCP listener on `addr`: it accepts connections to any
/// destination that TPROXY hands it; each one's local address is the original
/// destination.
pub fn tcp_listener(addr: SocketAddr) -> Result<TcpListener, ListenError> {
    let what = "transparent TCP listener on";
    let fd = transparent(addr, SockType::Stream).map_err(err(what, addr))?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).map_err(err(what, addr))?;
    listen(&fd, Backlog::new(4096).unwrap_or(Backlog::MAXCONN)).map_err(err(what, addr))?;
    TcpListener::from_std(std::net::TcpListener::from(fd)).map_err(io_err(what, addr))
}

/// The original destination of a connection that reached the listener by
/// address rewriting (the eBPF datapath, or a NAT `REDIRECT`) rather than by
/// TPROXY: `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`, `None` when the kernel
/// knows none (a connection made to the listener's port itself).
pub fn original_dst(app: &tokio::net::TcpStream, v6: bool) -> Option<SocketAddr> {
    ask_original_dst(app, v6)
}

/// `SO_ORIGINAL_DST` (IPv4) or `IP6T_SO_ORIGINAL_DST` (IPv6) of `sock`.
fn ask_original_dst(sock: &impl AsFd, v6: bool) -> Option<SocketAddr> {
    if v6 {
        let a = getsockopt(sock, sockopt::Ip6tOriginalDst).ok()?;
        Some(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(a.sin6_addr.s6_addr),
            u16::from_be(a.sin6_port),
            0,
            0,
        )))
    } else {
        let a = getsockopt(sock, sockopt::OriginalDst).ok()?;
        Some(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
            u16::from_be(a.sin_port),
        )))
    }
}

/// Asks the eBPF datapath for the original destination of datagrams that
/// reached a UDP listener by address rewriting: `SO_ORIGINAL_DST` /
/// `IP6T_SO_ORIGINAL_DST` on one UDP socket, connected to each datagram's
/// source in turn (two system calls a datagram), which the datapath's
/// `getsockopt` program answers. The socket carries the forwarder's mark: the
/// datapath never redirects its `connect()`, and tells only a marked socket.
pub struct OriginalDstQuery {
    sock: Option<OwnedFd>,
    v6: bool,
}

impl OriginalDstQuery {
    /// A query socket for datagrams of one family.
    pub fn new(v6: bool) -> OriginalDstQuery {
        let fam = if v6 {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        let sock = socket(fam, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
            .ok()
            .filter(|fd| setsockopt(fd, sockopt::Mark, &crate::config::FORWARD_MARK).is_ok());
        OriginalDstQuery { sock, v6 }
    }

    /// The original destination of a datagram from `app`; `None` when nothing
    /// rewrote it (a datagram sent to the listener's port itself), or when the
    /// query socket could not be made.
    pub fn ask(&self, app: SocketAddr) -> Option<SocketAddr> {
        let sock = self.sock.as_ref()?;
        connect(sock.as_raw_fd(), &SockaddrStorage::from(app)).ok()?;
        ask_original_dst(sock, self.v6)
    }
}

/// Whether `ip` is one of the eBPF datapath's per-flow source addresses
/// (127.128.0.0/10, given to each flow of an unconnected IPv4 socket): such a
/// flow is answered from its destination's address, as a TPROXY one.
pub fn is_flow_address(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => u32::from(v4) & 0xffc0_0000 == 0x7f80_0000,
        IpAddr::V6(_) => false,
    }
}

/// A transparent UDP listener on `addr` that reports each datagram's original
/// destination.
pub fn udp_listener(addr: SocketAddr) -> Result<UdpSocket, ListenError> {
    let what = "transparent UDP listener on";
    let fd = transparent(addr, SockType::Datagram).map_err(err(what, addr))?;
    if addr.is_ipv4() {
        setsockopt(&fd, sockopt::Ipv4OrigDstAddr, &true).map_err(err(what, addr))?;
    } else {
        setsockopt(&fd, sockopt::Ipv6OrigDstAddr, &true).map_err(err(what, addr))?;
    }
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).map_err(err(what, addr))?;
    UdpSocket::from_std(std::net::UdpSocket::from(fd)).map_err(io_err(what, addr))
}

/// A UDP socket bound to the (foreign) original destination `dst` and connected
/// to the app at `app`: what it sends, the app sees coming from `dst`; and the
/// app's later datagrams of this flow arrive on it directly.
pub fn udp_reply(dst: SocketAddr, app: SocketAddr) -> Result<UdpSocket, ListenError> {
    let what = "UDP socket on original destination";
    let fd = transparent(dst, SockType::Datagram).map_err(err(what, dst))?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(dst)).map_err(err(what, dst))?;
    connect(fd.as_raw_fd(), &SockaddrStorage::from(app)).map_err(err(what, dst))?;
    UdpSocket::from_std(std::net::UdpSocket::from(fd)).map_err(io_err(what, dst))
}

/// One datagram from a UDP listener.
pub struct Datagram {
    pub len: usize,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// Addressed to the listener itself: not TPROXY's, its original
    /// destination is the datapath's to tell ([`OriginalDstQuery`]).
    pub redirected: bool,
}

/// Receives one datagram into `buf` with its source and original destination.
/// Datagrams without an original destination (redirected by the eBPF datapath,
/// or sent to the port directly) are returned with `dst` equal to the
/// listener's own address.
pub async fn recv_orig(sock: &UdpSocket, buf: &mut [u8]) -> std::io::Result<Datagram> {
    let local = sock.local_addr()?;
    sock.async_io(Interest::READABLE, || {
        let mut cmsg = nix::cmsg_space!(libc::sockaddr_in6);
        let mut iov = [IoSliceMut::new(buf)];
        let msg = recvmsg::<SockaddrStorage>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_DONTWAIT,
        )
        .map_err(std::io::Error::from)?;
        let mut dst = local;
        for c in msg.cmsgs().map_err(std::io::Error::from)? {
            match c {
                ControlMessageOwned::Ipv4OrigDstAddr(a) => {
                    dst = SocketAddr::V4(SocketAddrV4::new(
                        Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                        u16::from_be(a.sin_port),
                    ));
                }
                ControlMessageOwned::Ipv6OrigDstAddr(a) => {
                    dst = SocketAddr::V6(SocketAddrV6::new(
                        Ipv6Addr::from(a.sin6_addr.s6_addr),
                        u16::from_be(a.sin6_port),
                        a.sin6_flowinfo,
                        a.sin6_scope_id,
                    ));
                }
                _ => {}
            }
        }
        let src = msg
            .address
            .and_then(|a| {
                a.as_sockaddr_in()
                    .map(|v4| SocketAddr::V4((*v4).into()))
                    .or_else(|| a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into())))
            })
            .ok_or_else(|| std::io::Error::other("datagram without a source address"))?;
        Ok(Datagram {
            len: msg.bytes,
            src,
            dst,
            redirected: dst == local,
        })
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_addresses_are_127_128_slash_10() {
        for ip in ["127.128.0.1", "127.191.255.255", "::ffff:127.150.1.2"] {
            assert!(is_flow_address(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "127.0.0.1",
            "127.127.255.255",
            "127.192.0.0",
            "10.128.0.1",
            "::1",
        ] {
            assert!(!is_flow_address(ip.parse().unwrap()), "{ip}");
        }
    }
}
