//! Kernel change notifications: nftables events (NFNLGRP_NFTABLES) and rtnetlink
//! rule/route events, so that a foreign `nft flush ruleset`, `nft delete table` or
//! `ip rule del` is noticed and repaired instead of silently disabling the proxy.

use std::os::fd::{AsFd, BorrowedFd};

use netlink_sys::{Socket, constants};
use nix::sys::socket::{setsockopt, sockopt};

use crate::core::precedence::{is_ours, rule_priority};
use crate::kernel::consts::*;
use crate::kernel::nlmsg::{self, c_str};
use crate::kernel::route::{Plan, RtMsg, route_table};

#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("subscribing to {what} events: {source}")]
    Subscribe {
        what: &'static str,
        source: std::io::Error,
    },
}

/// What a batch of notifications says about our state.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Damage {
    /// Someone else changed or removed parts of our table.
    pub table: bool,
    /// One of our ip rules or routes was removed.
    pub routing: bool,
    /// An ip rule was added or removed (anyone's): where ours must sit may
    /// have changed (see `precedence`).
    pub rules_changed: bool,
    /// A link appeared, changed or went: forwarded traffic's interfaces may
    /// need new verdicts.
    pub links_changed: bool,
    /// Notifications were lost: our state is unknown.
    pub lost: bool,
    /// The process that committed a foreign nftables change, if the kernel said.
    pub culprit: Option<String>,
}

impl Damage {
    pub fn any(&self) -> bool {
        self.table || self.routing || self.lost
    }
}

/// Subscriptions to nftables and routing notifications.
pub struct Events {
    nft: Socket,
    route: Socket,
    buf: Vec<u8>,
}

fn subscribe(protocol: isize, groups: &[u32], what: &'static str) -> Result<Socket, EventsError> {
    let err = |source| EventsError::Subscribe { what, source };
    let mut s = Socket::new(protocol).map_err(err)?;
    s.bind_auto().map_err(err)?;
    for &g in groups {
        s.add_membership(g).map_err(err)?;
    }
    s.set_non_blocking(true).map_err(err)?;
    // Our own large transactions notify once per element: room for them.
    if setsockopt(&s, sockopt::RcvBufForce, &(8 << 20)).is_err() {
        let _ = setsockopt(&s, sockopt::RcvBuf, &(8 << 20));
    }
    Ok(s)
}

/// The first attribute of type `ty` after the 4-byte nfgenmsg header.
fn nft_attr(payload: &[u8], ty: u16) -> Option<&[u8]> {
    nlmsg::attr(payload.get(4..)?, ty)
}

/// Judges nftables notifications: which touch `table` (inet family) and were not
/// caused by our own socket `own_port`.
pub fn judge_nft(datagram: &[u8], table: &str, own_port: u32, damage: &mut Damage) {
    let mut foreign_here = false;
    for m in nlmsg::messages(datagram) {
        let (ty, pid, payload) = (m.ty, m.pid, m.payload());
        if ty >> 8 != SUBSYS_NFTABLES {
            continue;
        }
        let msg = ty & 0xff;
        if msg == NFT_MSG_NEWGEN {
            if foreign_here || damage.table {
                let name =
                    nft_attr(payload, 3).map(|n| String::from_utf8_lossy(c_str(n)).into_owned());
                let proc_pid = nft_attr(payload, 2)
                    .and_then(|p| p.get(..4))
                    .map(|p| u32::from_be_bytes([p[0], p[1], p[2], p[3]]));
                if let (Some(n), Some(p)) = (name, proc_pid) {
                    damage.culprit.get_or_insert(format!("{n}[{p}]"));
                }
            }
            foreign_here = false;
            continue;
        }
        // Additions by others (a rule appended to our chain, an element) change
        // our behaviour as much as deletions do.
        let relevant = matches!(
            msg,
            NFT_MSG_DELTABLE
                | NFT_MSG_DELCHAIN
                | NFT_MSG_NEWRULE
                | NFT_MSG_DELRULE
                | NFT_MSG_DELSET
                | NFT_MSG_NEWSETELEM
                | NFT_MSG_DELSETELEM
                | NFT_MSG_DELOBJ
        );
        // Our tables: inet, and bridge for routed bridge ports.
        let ours = matches!(
            payload.first().map(|&f| i32::from(f)),
            Some(libc::NFPROTO_INET | libc::NFPROTO_BRIDGE)
        );
        if !relevant || pid == own_port || !ours {
            continue;
        }
        // Attribute 1 is the table name in every one of these messages.
        if nft_attr(payload, 1).map(c_str) == Some(table.as_bytes()) {
            damage.table = true;
            foreign_here = true;
        }
    }
}

/// Judges rtnetlink notifications: a removed rule of `plan` (ours, at its
/// priority: the daemon itself removes ours at an old one when it moves them),
/// or a removed route in its table.
pub fn judge_route(datagram: &[u8], plan: &Plan, damage: &mut Damage) {
    for m in nlmsg::messages(datagram) {
        if m.ty == RTM_NEWRULE || m.ty == RTM_DELRULE {
            damage.rules_changed = true;
        }
        if m.ty == RTM_NEWLINK || m.ty == RTM_DELLINK {
            damage.links_changed = true;
        }
        match (m.ty, RtMsg::parse(m.ty, m.payload())) {
            (RTM_DELRULE, Some(RtMsg::Rule(r)))
                if rule_priority(&r) == plan.priority
                    && plan.marks.iter().any(|&mark| is_ours(&r, mark, plan.table)) =>
            {
                damage.routing = true;
            }
            (RTM_DELROUTE, Some(RtMsg::Route(r))) if route_table(&r) == plan.table => {
                damage.routing = true;
            }
            _ => {}
        }
    }
}

impl Events {
    /// Subscribes to routing notifications; nftables ones follow with
    /// [`Events::join_nft`].
    pub fn open() -> Result<Events, EventsError> {
        Ok(Events {
            nft: subscribe(constants::NETLINK_NETFILTER, &[], "nftables")?,
            route: subscribe(
                constants::NETLINK_ROUTE,
                &[
                    RTNLGRP_IPV4_RULE,
                    RTNLGRP_IPV6_RULE,
                    RTNLGRP_IPV4_ROUTE,
                    RTNLGRP_IPV6_ROUTE,
                    RTNLGRP_LINK,
                ],
                "routing",
            )?,
            // One notification per datagram, each far smaller than this; a
            // larger buffer would only be resident memory.
            buf: vec![0; 64 * 1024],
        })
    }

    /// Subscribes to nftables notifications. While any socket is, the kernel
    /// builds one per set element committed: join after a large commit of our
    /// own if no one else can have changed our table meanwhile.
    pub fn join_nft(&mut self) -> Result<(), EventsError> {
        self.nft
            .add_membership(NFNLGRP_NFTABLES)
            .map_err(|source| EventsError::Subscribe {
                what: "nftables",
                source,
            })
    }

    pub fn nft_fd(&self) -> BorrowedFd<'_> {
        self.nft.as_fd()
    }

    pub fn route_fd(&self) -> BorrowedFd<'_> {
        self.route.as_fd()
    }

    /// Reads every pending notification on both sockets (never blocks).
    pub fn read(&mut self, table: &str, own_port: u32, routing: &Plan) -> Damage {
        let mut damage = Damage::default();
        loop {
            match self.nft.recv(&mut &mut self.buf[..], libc::MSG_DONTWAIT) {
                Ok(0) => break,
                Ok(n) => judge_nft(&self.buf[..n], table, own_port, &mut damage),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => damage.lost = true,
                Err(_) => break,
            }
        }
        loop {
            match self.route.recv(&mut &mut self.buf[..], libc::MSG_DONTWAIT) {
                Ok(0) => break,
                Ok(n) => judge_route(&self.buf[..n], routing, &mut damage),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => damage.lost = true,
                Err(_) => break,
            }
        }
        damage
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nlmsg(ty: u16, pid: u32, attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = vec![libc::NFPROTO_INET as u8, 0, 0, 0];
        for (t, v) in attrs {
            let l = 4 + v.len();
            body.extend((l as u16).to_ne_bytes());
            body.extend(t.to_ne_bytes());
            body.extend(*v);
            body.resize(body.len().div_ceil(4) * 4, 0);
        }
        let mut m = Vec::new();
        m.extend(((16 + body.len()) as u32).to_ne_bytes());
        m.extend(((SUBSYS_NFTABLES << 8) | ty).to_ne_bytes());
        m.extend(0u16.to_ne_bytes());
        m.extend(1u32.to_ne_bytes());
        m.extend(pid.to_ne_bytes());
        m.extend(body);
        m
    }

    #[test]
    fn a_foreign_table_deletion_is_damage_and_names_the_culprit() {
        let mut d = nlmsg(NFT_MSG_DELTABLE, 999, &[(1, b"cgtproxy\0")]);
        d.extend(nlmsg(
            NFT_MSG_NEWGEN,
            999,
            &[
                (1, &7u32.to_be_bytes()),
                (2, &4242u32.to_be_bytes()),
                (3, b"nft\0"),
            ],
        ));
        let mut dmg = Damage::default();
        judge_nft(&d, "cgtproxy", 555, &mut dmg);
        assert!(dmg.table);
        assert_eq!(dmg.culprit.as_deref(), Some("nft[4242]"));
    }

    #[test]
    fn our_own_changes_and_other_tables_are_not_damage() {
        let mut d = nlmsg(NFT_MSG_DELTABLE, 555, &[(1, b"cgtproxy\0")]);
        d.extend(nlmsg(NFT_MSG_NEWSETELEM, 555, &[(1, b"cgtproxy\0")]));
        d.extend(nlmsg(NFT_MSG_DELTABLE, 999, &[(1, b"filter\0")]));
        d.extend(nlmsg(NFT_MSG_DELTABLE, 999, &[(1, b"cgtproxyx\0")]));
        let mut dmg = Damage::default();
        judge_nft(&d, "cgtproxy", 555, &mut dmg);
        assert!(!dmg.any(), "{dmg:?}");
    }

    #[test]
    fn removed_rules_and_routes_of_ours_are_damage() {
        use crate::kernel::route::encode;
        use netlink_packet_route::route::{RouteAttribute, RouteMessage};
        use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
        let plan = |marks: Vec<u32>| Plan {
            table: 300,
            marks,
            priority: 100,
        };
        let mut r = RuleMessage::default();
        r.header.action = RuleAction::ToTable;
        r.attributes = vec![
            RuleAttribute::FwMark(3000),
            RuleAttribute::Table(300),
            RuleAttribute::Priority(100),
        ];
        let mut dmg = Damage::default();
        judge_route(&encode(RTM_DELRULE, 0, 0, &r), &plan(vec![3000]), &mut dmg);
        assert!(dmg.routing);
        let mut dmg = Damage::default();
        judge_route(&encode(RTM_DELRULE, 0, 0, &r), &plan(vec![3001]), &mut dmg);
        judge_route(&encode(RTM_NEWRULE, 0, 0, &r), &plan(vec![3000]), &mut dmg);
        assert!(!dmg.any());
        assert!(dmg.rules_changed, "any rule change re-checks our placement");
        // Ours at another priority: the daemon itself removes it when it moves.
        let mut moved = plan(vec![3000]);
        moved.priority = 98;
        judge_route(&encode(RTM_DELRULE, 0, 0, &r), &moved, &mut dmg);
        assert!(!dmg.any(), "our old rule, removed by the move");
        let mut route = RouteMessage::default();
        route.attributes = vec![RouteAttribute::Table(301)];
        judge_route(&encode(RTM_DELROUTE, 0, 0, &route), &plan(vec![]), &mut dmg);
        assert!(!dmg.any(), "another table's route");
        route.attributes = vec![RouteAttribute::Table(300)];
        let mut two = encode(RTM_DELRULE, 0, 0, &RuleMessage::default());
        two.extend(encode(RTM_DELROUTE, 0, 0, &route));
        judge_route(&two, &plan(vec![3000]), &mut dmg);
        assert!(dmg.routing, "our route, second in the datagram");
    }
}
