//! Loop refusal. A flow whose original destination is this host itself on one
//! of the targets' ports would be relayed through the upstream back to a
//! listener of ours (or a proxy core's), which relays it again: measured, one
//! such connection became ten thousand in four seconds and ran the forwarder
//! out of descriptors. Such flows are refused before anything is sent.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use nix::ifaddrs::getifaddrs;

use super::target::Limiter;

/// How long a listing of this host's addresses is trusted. Flows to our ports
/// come in floods when they come (a loop, or someone trying): one listing a
/// second, not one per datagram. An address added since is recognised at
/// most this late.
const ADDRESSES_TTL: Duration = Duration::from_secs(1);

/// The targets' ports (of every target, with an upstream or served by a proxy
/// core), replaced on reload, and this host's addresses, listed at most once
/// per [`ADDRESSES_TTL`].
#[derive(Default)]
pub struct LoopGuard {
    ports: RwLock<BTreeSet<u16>>,
    addresses: Mutex<Option<(Instant, Vec<IpAddr>)>>,
    /// Refused loops are logged apart from other warnings.
    log: Limiter,
}

impl LoopGuard {
    /// Replaces the set of the targets' ports.
    pub fn set_ports(&self, ports: impl IntoIterator<Item = u16>) {
        let mut g = self.ports.write().unwrap_or_else(|p| p.into_inner());
        *g = ports.into_iter().collect();
    }

    /// Logs a refused loop (`msg` says whose), a few a second.
    pub fn warn(&self, msg: impl FnOnce() -> String) {
        self.log.warn(msg);
    }

    /// Whether a flow to `dst` would come back to this host's own listeners.
    pub fn is_loop(&self, dst: SocketAddr) -> bool {
        let port_is_ours = self
            .ports
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&dst.port());
        // Only flows to the targets' ports pay for the address lookup.
        port_is_ours && self.is_local(dst.ip())
    }

    /// Whether `ip` is an address of this host: loopback, unspecified (which
    /// reaches the host itself) or configured on an interface.
    fn is_local(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        if ip.is_loopback() || ip.is_unspecified() {
            return true;
        }
        let mut cached = self.addresses.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = cached
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < ADDRESSES_TTL);
        if !fresh {
            match host_addresses() {
                Ok(list) => *cached = Some((Instant::now(), list)),
                // Cannot tell: refusing a flow to one of our ports is the
                // smaller harm than a loop that eats every descriptor.
                Err(_) => return true,
            }
        }
        cached.as_ref().is_some_and(|(_, list)| list.contains(&ip))
    }
}

/// The addresses configured on this host's interfaces.
fn host_addresses() -> nix::Result<Vec<IpAddr>> {
    Ok(getifaddrs()?
        .filter_map(|a| a.address)
        .filter_map(|a| {
            a.as_sockaddr_in()
                .map(|s| IpAddr::V4(s.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_addresses_on_target_ports_are_loops() {
        let g = LoopGuard::default();
        g.set_ports([7893, 7894]);
        for dst in [
            "127.0.0.1:7893",
            "127.1.2.3:7894",
            "[::1]:7893",
            "[::ffff:127.0.0.1]:7893",
            "0.0.0.0:7893",
        ] {
            assert!(g.is_loop(dst.parse().unwrap()), "{dst}");
        }
        // Another port, or another host (TEST-NET-3, on no interface).
        for dst in ["127.0.0.1:80", "203.0.113.9:7893", "[2001:db8::1]:7893"] {
            assert!(!g.is_loop(dst.parse().unwrap()), "{dst}");
        }
        g.set_ports([80]);
        assert!(!g.is_loop("127.0.0.1:7893".parse().unwrap()));
    }
}
