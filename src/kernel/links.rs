//! The host's network interfaces and the namespaces at their other ends, over
//! rtnetlink: `RTM_GETLINK` lists them, `RTM_GETNSID` names the namespace a
//! process lives in. Neither needs `setns` or a capability beyond what
//! reading them takes.

use netlink_sys::constants::NETLINK_ROUTE;

use crate::core::links::Link;
use crate::kernel::consts::*;
use crate::kernel::nlmsg::{self, Channel, c_str};

#[derive(Debug, thiserror::Error)]
pub enum LinksError {
    #[error("opening an rtnetlink socket for links: {0}")]
    Open(std::io::Error),
    #[error("{step}: {source}")]
    Io {
        step: &'static str,
        source: std::io::Error,
    },
    #[error("{step}: the kernel answered errno {errno}")]
    Kernel { step: &'static str, errno: i32 },
}

/// An rtnetlink socket for link dumps and namespace ids.
pub struct Links {
    chan: Channel,
}

/// Parses one `RTM_NEWLINK` payload (ifinfomsg + attributes).
pub fn parse_link(payload: &[u8]) -> Option<Link> {
    let index = u32::from_ne_bytes(payload.get(4..8)?.try_into().ok()?);
    let attrs = payload.get(16..)?;
    let u32_attr = |ty| {
        nlmsg::attr(attrs, ty)
            .and_then(|v| v.get(..4))
            .map(|v| u32::from_ne_bytes([v[0], v[1], v[2], v[3]]))
    };
    let name = String::from_utf8_lossy(c_str(nlmsg::attr(attrs, IFLA_IFNAME)?)).into_owned();
    Some(Link {
        index,
        name,
        peer_netns: u32_attr(IFLA_LINK_NETNSID).map(|v| v as i32),
        master: u32_attr(IFLA_MASTER).filter(|&m| m != 0),
    })
}

fn check(step: &'static str, r: std::io::Result<Option<i32>>) -> Result<(), LinksError> {
    match r {
        Ok(Some(0)) => Ok(()),
        Ok(Some(e)) => Err(LinksError::Kernel { step, errno: -e }),
        Ok(None) => Err(LinksError::Kernel { step, errno: 0 }),
        Err(source) => Err(LinksError::Io { step, source }),
    }
}

impl Links {
    pub fn open() -> Result<Links, LinksError> {
        Ok(Links {
            // A dump datagram is at most 32 KiB.
            chan: Channel::open(NETLINK_ROUTE, 32 * 1024).map_err(LinksError::Open)?,
        })
    }

    /// Every interface of this namespace. Listing a link whose other end is
    /// in another namespace gives that namespace an id here, which
    /// [`Links::netns_of`] then reports.
    pub fn dump(&mut self) -> Result<Vec<Link>, LinksError> {
        let mut out = Vec::new();
        // ifinfomsg: family AF_UNSPEC, all else zero.
        let body = [0u8; 16];
        let r = self.chan.exchange(
            |seq| nlmsg::encode(RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, seq, &body),
            |m| {
                if m.ty == RTM_NEWLINK
                    && let Some(l) = parse_link(m.payload())
                {
                    out.push(l);
                }
            },
        );
        check("listing links (RTM_GETLINK)", r)?;
        Ok(out)
    }

    /// The id, in this namespace, of the network namespace process `pid` lives
    /// in: `None` when the process is gone or its namespace has no id here
    /// (this one, or one no link of ours reaches).
    pub fn netns_of(&mut self, pid: u32) -> Result<Option<i32>, LinksError> {
        // rtgenmsg (family, padded to 4), then NETNSA_PID.
        let mut body = vec![0u8; 4];
        body.extend(nlmsg::encode_attr(NETNSA_PID, &pid.to_ne_bytes()));
        let mut id = None;
        let r = self.chan.exchange(
            // The ack ends the exchange after the reply.
            |seq| nlmsg::encode(RTM_GETNSID, NLM_F_REQUEST | NLM_F_ACK, seq, &body),
            |m| {
                if m.ty == RTM_NEWNSID {
                    id = m
                        .payload()
                        .get(4..)
                        .and_then(|a| nlmsg::attr(a, NETNSA_NSID))
                        .and_then(|v| v.get(..4))
                        .map(|v| i32::from_ne_bytes([v[0], v[1], v[2], v[3]]));
                }
            },
        );
        match r {
            // A process that is gone: ESRCH.
            Ok(Some(e)) if e == -libc::ESRCH => Ok(None),
            Ok(Some(e)) if e != 0 => Err(LinksError::Kernel {
                step: "asking a process's network namespace id (RTM_GETNSID)",
                errno: -e,
            }),
            Ok(_) => Ok(id.filter(|&i| i >= 0)),
            Err(source) => Err(LinksError::Io {
                step: "asking a process's network namespace id (RTM_GETNSID)",
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::kernel::nlmsg::encode_attr as attr;

    #[test]
    fn a_link_message_gives_index_name_peer_and_master() {
        let mut p = vec![0u8; 16];
        p[4..8].copy_from_slice(&7u32.to_ne_bytes());
        p.extend(attr(IFLA_IFNAME, b"ve-wiki\0"));
        p.extend(attr(IFLA_MASTER, &3u32.to_ne_bytes()));
        p.extend(attr(IFLA_LINK_NETNSID, &2i32.to_ne_bytes()));
        assert_eq!(
            parse_link(&p),
            Some(Link {
                index: 7,
                name: "ve-wiki".into(),
                peer_netns: Some(2),
                master: Some(3),
            })
        );
        assert_eq!(parse_link(&p[..10]), None, "truncated");
        assert_eq!(parse_link(&[0u8; 16]), None, "no name");
    }
}
