//! Policy routing over rtnetlink: `ip rule fwmark M lookup T` per TPROXY target and
//! `local default dev lo table T`, IPv4 and IPv6. Marked packets thereby loop back
//! through `lo` into prerouting, where `tproxy` hands them to the listener.

use netlink_packet_core::{
    Emitable, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE, NLM_F_REQUEST, Parseable,
};
use netlink_packet_route::AddressFamily;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_sys::constants::NETLINK_ROUTE;

use crate::core::precedence::{is_ours, rule_priority};
use crate::core::table::Family;
use crate::kernel::nlmsg;

use crate::kernel::consts::{
    RTM_DELROUTE, RTM_DELRULE, RTM_GETROUTE, RTM_GETRULE, RTM_NEWROUTE, RTM_NEWRULE,
};

/// A rule or route as read from rtnetlink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RtMsg {
    Rule(RuleMessage),
    Route(RouteMessage),
}

impl RtMsg {
    /// Parses one message of type `ty`; other types and malformed ones are `None`.
    pub fn parse(ty: u16, payload: &[u8]) -> Option<RtMsg> {
        match ty {
            RTM_NEWRULE | RTM_DELRULE => RuleMessage::parse(payload).ok().map(RtMsg::Rule),
            RTM_NEWROUTE | RTM_DELROUTE => RouteMessage::parse(payload).ok().map(RtMsg::Route),
            _ => None,
        }
    }
}

/// The request bytes for message `body` of type `ty`.
pub fn encode(ty: u16, flags: u16, seq: u32, body: &impl Emitable) -> Vec<u8> {
    let mut b = vec![0; body.buffer_len()];
    body.emit(&mut b);
    nlmsg::encode(ty, flags, seq, &b)
}

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("opening the rtnetlink socket: {0}")]
    Socket(std::io::Error),
    #[error("rtnetlink {step}: {source}")]
    Io {
        step: String,
        source: std::io::Error,
    },
    #[error("{step}: {errno}")]
    Kernel { step: String, errno: nix::Error },
    #[error("rtnetlink {step}: cannot parse the reply: {msg}")]
    Decode { step: String, msg: String },
    #[error("no loopback interface \"lo\" in this network namespace")]
    NoLoopback,
}

/// Both families, in the order rules and routes are installed.
pub const FAMILIES: [Family; 2] = [Family::V4, Family::V6];

fn af(f: Family) -> AddressFamily {
    match f {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    }
}

/// The `ip` command for family `f`, for messages.
pub fn ip_command(f: Family) -> &'static str {
    match f {
        Family::V4 => "ip",
        Family::V6 => "ip -6",
    }
}

/// The routing entries of one configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub table: u32,
    pub marks: Vec<u32>,
    /// The priority of the fwmark rules (see [`crate::core::precedence::placement`]).
    pub priority: u32,
}

/// Whether `rules` (a dump) hold our `fwmark mark lookup table` of family `fam`.
pub fn has_rule(rules: &[RuleMessage], fam: Family, mark: u32, table: u32) -> bool {
    rules
        .iter()
        .any(|r| r.header.family == af(fam) && is_ours(r, mark, table))
}

/// An rtnetlink socket.
pub struct Routes {
    chan: nlmsg::Channel,
}

/// `fwmark mark lookup table`, at `priority` (0: any, for deletion).
fn rule_msg(fam: Family, mark: u32, table: u32, priority: u32) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header.family = af(fam);
    m.header.action = RuleAction::ToTable;
    m.header.table = u8::try_from(table).unwrap_or(0);
    m.attributes = vec![RuleAttribute::FwMark(mark), RuleAttribute::Table(table)];
    if priority != 0 {
        m.attributes.push(RuleAttribute::Priority(priority));
    }
    m
}

fn route_msg(fam: Family, table: u32, lo: u32) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header = RouteHeader {
        address_family: af(fam),
        table: u8::try_from(table).unwrap_or(0),
        protocol: RouteProtocol::Boot,
        scope: RouteScope::Host,
        kind: RouteType::Local,
        ..RouteHeader::default()
    };
    let dst = match fam {
        Family::V4 => RouteAddress::Inet(std::net::Ipv4Addr::UNSPECIFIED),
        Family::V6 => RouteAddress::Inet6(std::net::Ipv6Addr::UNSPECIFIED),
    };
    m.attributes = vec![
        RouteAttribute::Destination(dst),
        RouteAttribute::Table(table),
        RouteAttribute::Oif(lo),
    ];
    m
}

/// The table a route lives in: the attribute, or the header for small tables.
pub fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

impl Routes {
    pub fn open() -> Result<Routes, RouteError> {
        Ok(Routes {
            chan: nlmsg::Channel::open(NETLINK_ROUTE, 64 * 1024).map_err(RouteError::Socket)?,
        })
    }

    /// Sends one request and collects the replies until its ack (or the end of a
    /// dump). Returns the rules and routes received and the kernel's errno, if any.
    fn request(
        &mut self,
        ty: u16,
        body: &impl Emitable,
        flags: u16,
        step: &str,
    ) -> Result<(Vec<RtMsg>, Option<i32>), RouteError> {
        let mut got = Vec::new();
        let code = self
            .chan
            .exchange(
                |seq| encode(ty, NLM_F_REQUEST | flags, seq, body),
                |m| got.extend(RtMsg::parse(m.ty, m.payload())),
            )
            .map_err(|source| RouteError::Io {
                step: step.to_owned(),
                source,
            })?
            .ok_or_else(|| RouteError::Decode {
                step: step.to_owned(),
                msg: "truncated error message".into(),
            })?;
        Ok((got, (code != 0).then_some(code)))
    }

    fn check(step: String, errno: Option<i32>, ok: &[i32]) -> Result<(), RouteError> {
        match errno {
            None | Some(0) => Ok(()),
            Some(e) if ok.contains(&-e) => Ok(()),
            Some(e) => Err(RouteError::Kernel {
                step,
                errno: nix::Error::from_raw(-e),
            }),
        }
    }

    /// The ip rules of family `fam`, in the kernel's evaluation order.
    pub fn rules(&mut self, fam: Family) -> Result<Vec<RuleMessage>, RouteError> {
        let mut q = RuleMessage::default();
        q.header.family = af(fam);
        let (rules, errno) = self.request(RTM_GETRULE, &q, NLM_F_DUMP, "listing ip rules")?;
        Self::check("listing ip rules".into(), errno, &[])?;
        Ok(rules
            .into_iter()
            .filter_map(|m| match m {
                RtMsg::Rule(r) => Some(r),
                RtMsg::Route(_) => None,
            })
            .collect())
    }

    /// The ip rules of both families, each in the kernel's evaluation order.
    pub fn all_rules(&mut self) -> Result<Vec<RuleMessage>, RouteError> {
        let mut all = self.rules(Family::V4)?;
        all.extend(self.rules(Family::V6)?);
        Ok(all)
    }

    /// Whether the rule `fwmark mark lookup table` of family `fam` is installed.
    pub fn rule_exists(&mut self, fam: Family, mark: u32, table: u32) -> Result<bool, RouteError> {
        Ok(has_rule(&self.rules(fam)?, fam, mark, table))
    }

    /// Whether `local default dev lo` is in table `table` for family `fam`.
    pub fn route_exists(&mut self, fam: Family, table: u32) -> Result<bool, RouteError> {
        let mut q = RouteMessage::default();
        q.header.address_family = af(fam);
        let (routes, errno) = self.request(RTM_GETROUTE, &q, NLM_F_DUMP, "listing routes")?;
        Self::check("listing routes".into(), errno, &[])?;
        Ok(routes.iter().any(|m| match m {
            RtMsg::Route(r) => {
                route_table(r) == table
                    && r.header.kind == RouteType::Local
                    && r.header.destination_prefix_length == 0
            }
            RtMsg::Rule(_) => false,
        }))
    }

    /// Installs the rules and routes of `plan`; an identical rule left by a killed
    /// instance is adopted, and the route is replaced.
    pub fn install(&mut self, plan: &Plan) -> Result<(), RouteError> {
        if plan.marks.is_empty() {
            return Ok(());
        }
        let lo = nix::net::if_::if_nametoindex("lo").map_err(|_| RouteError::NoLoopback)?;
        for fam in FAMILIES {
            let step = format!(
                "{} route replace local default dev lo table {}",
                ip_command(fam),
                plan.table
            );
            let (_, errno) = self.request(
                RTM_NEWROUTE,
                &route_msg(fam, plan.table, lo),
                NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
                &step,
            )?;
            Self::check(step, errno, &[])?;
            let existing = self.rules(fam)?;
            for &mark in &plan.marks {
                let mine = |r: &&RuleMessage| is_ours(r, mark, plan.table);
                if !existing
                    .iter()
                    .filter(mine)
                    .any(|r| rule_priority(r) == plan.priority)
                {
                    let step = format!(
                        "{} rule add fwmark {mark:#x} lookup {} priority {}",
                        ip_command(fam),
                        plan.table,
                        plan.priority
                    );
                    let (_, errno) = self.request(
                        RTM_NEWRULE,
                        &rule_msg(fam, mark, plan.table, plan.priority),
                        NLM_F_ACK | NLM_F_CREATE,
                        &step,
                    )?;
                    Self::check(step, errno, &[libc::EEXIST])?;
                }
                // Only once the new rule stands: the old ones at other priorities
                // (a moved placement, an earlier instance) go.
                for old in existing.iter().filter(mine) {
                    let p = rule_priority(old);
                    if p == plan.priority {
                        continue;
                    }
                    let step = format!(
                        "{} rule del fwmark {mark:#x} lookup {} priority {p}",
                        ip_command(fam),
                        plan.table
                    );
                    let (_, errno) = self.request(
                        RTM_DELRULE,
                        &rule_msg(fam, mark, plan.table, p),
                        NLM_F_ACK,
                        &step,
                    )?;
                    Self::check(step, errno, &[libc::ENOENT])?;
                }
            }
        }
        Ok(())
    }

    /// Removes the fwmark rules of `plan`; rules already gone are not an error.
    pub fn remove_rules(&mut self, plan: &Plan) -> Result<(), RouteError> {
        for fam in FAMILIES {
            for &mark in &plan.marks {
                // Several identical rules may exist (older instances): remove all.
                while self.rule_exists(fam, mark, plan.table)? {
                    let step = format!(
                        "{} rule del fwmark {mark:#x} lookup {}",
                        ip_command(fam),
                        plan.table
                    );
                    let (_, errno) = self.request(
                        RTM_DELRULE,
                        &rule_msg(fam, mark, plan.table, 0),
                        NLM_F_ACK,
                        &step,
                    )?;
                    Self::check(step, errno, &[libc::ENOENT])?;
                }
            }
        }
        Ok(())
    }

    /// Removes what `install` added; entries already gone are not an error.
    pub fn remove(&mut self, plan: &Plan) -> Result<(), RouteError> {
        if plan.marks.is_empty() {
            return Ok(());
        }
        let rules = self.remove_rules(plan);
        let lo = nix::net::if_::if_nametoindex("lo").map_err(|_| RouteError::NoLoopback)?;
        for fam in FAMILIES {
            let step = format!(
                "{} route del local default dev lo table {}",
                ip_command(fam),
                plan.table
            );
            let (_, errno) = self.request(
                RTM_DELROUTE,
                &route_msg(fam, plan.table, lo),
                NLM_F_ACK,
                &step,
            )?;
            Self::check(step, errno, &[libc::ESRCH, libc::ENOENT])?;
        }
        rules
    }

    /// After a reload: removes the entries of `old` that `new` no longer uses.
    pub fn retire(&mut self, old: &Plan, new: &Plan) -> Result<(), RouteError> {
        if old.table != new.table || new.marks.is_empty() {
            return self.remove(old);
        }
        let gone = Plan {
            table: old.table,
            marks: old
                .marks
                .iter()
                .filter(|m| !new.marks.contains(m))
                .copied()
                .collect(),
            priority: old.priority,
        };
        self.remove_rules(&gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_plain_fwmark_rule_counts_as_ours() {
        let ours = rule_msg(Family::V4, 3000, 300, 100);
        assert!(is_ours(&ours, 3000, 300));
        assert_eq!(rule_priority(&ours), 100);
        assert!(!is_ours(&ours, 3001, 300));
        assert!(!is_ours(&ours, 3000, 301));
        let mut other = rule_msg(Family::V4, 3000, 300, 100);
        other.attributes.push(RuleAttribute::Iifname("eth0".into()));
        assert!(!is_ours(&other, 3000, 300));
        let mut small = rule_msg(Family::V4, 7, 100, 0);
        small
            .attributes
            .retain(|a| !matches!(a, RuleAttribute::Table(_)));
        assert!(is_ours(&small, 7, 100), "table in the header only");
    }

    #[test]
    fn large_tables_go_in_the_attribute() {
        let r = route_msg(Family::V6, 300, 1);
        assert_eq!(r.header.table, 0);
        assert!(r.attributes.contains(&RouteAttribute::Table(300)));
        assert_eq!(r.header.kind, RouteType::Local);
        let r = route_msg(Family::V4, 100, 1);
        assert_eq!(r.header.table, 100);
    }
}
