//! Which ip rules can take a marked packet before ours, and where our rules must
//! sit so that none does. Pure: it judges rule messages already read from the
//! kernel, so every case is unit-tested without root.
//!
//! Why this is needed: a tool that adds a rule without a priority (wg-quick does,
//! for `not fwmark 51820 table 51820`) gets, from the kernel, the priority of the
//! second rule in the list minus one. When ours is that second rule, the newcomer
//! lands just before it, whatever our priority is (measured on Linux 6.18). So the
//! daemon watches rule changes and, when a foreign rule could take our marked
//! packets first, re-installs its rules one step ahead of it; until then the
//! table's guard chain drops marked packets that would leave by any other
//! interface than `lo` (fail closed).

use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage};

/// The local routing table (`RT_TABLE_LOCAL`): a rule looking it up only takes
/// packets to this host's own addresses.
const TABLE_LOCAL: u32 = 255;

/// What one rule selector says about a packet carrying one of our marks, sent by
/// a local socket, whose other properties are unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Match {
    Yes,
    No,
    Maybe,
}

impl Match {
    fn and(self, other: Match) -> Match {
        match (self, other) {
            (Match::No, _) | (_, Match::No) => Match::No,
            (Match::Yes, Match::Yes) => Match::Yes,
            _ => Match::Maybe,
        }
    }

    fn not(self) -> Match {
        match self {
            Match::Yes => Match::No,
            Match::No => Match::Yes,
            Match::Maybe => Match::Maybe,
        }
    }
}

/// The table a rule looks up: the attribute, or the header for small tables.
pub fn rule_table(r: &RuleMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

/// A rule's priority (0 when the kernel reports none: the `local` rule).
pub fn rule_priority(r: &RuleMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Priority(p) => Some(*p),
            _ => None,
        })
        .unwrap_or(0)
}

fn fwmark(r: &RuleMessage) -> Option<(u32, u32)> {
    let mark = r.attributes.iter().find_map(|a| match a {
        RuleAttribute::FwMark(m) => Some(*m),
        _ => None,
    })?;
    let mask = r
        .attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::FwMask(m) => Some(*m),
            _ => None,
        })
        .unwrap_or(u32::MAX);
    Some((mark, mask))
}

/// Whether attribute `a` sets a suppressor. The kernel reports
/// `suppress_prefixlength` on every rule, as -1 when it is not set.
fn suppresses(a: &RuleAttribute) -> bool {
    matches!(
        a,
        RuleAttribute::SuppressPrefixLen(n) | RuleAttribute::SuppressIfGroup(n) if *n != u32::MAX
    )
}

/// Whether `r` is exactly our `fwmark mark lookup table` (at any priority).
pub fn is_ours(r: &RuleMessage, mark: u32, table: u32) -> bool {
    if r.header.action != RuleAction::ToTable
        || r.header.dst_len != 0
        || r.header.src_len != 0
        || r.header.flags.contains(RuleFlags::Invert)
    {
        return false;
    }
    let selectors_other_than_the_mark = r.attributes.iter().any(|a| {
        matches!(
            a,
            RuleAttribute::Destination(_)
                | RuleAttribute::Source(_)
                | RuleAttribute::Iifname(_)
                | RuleAttribute::Oifname(_)
                | RuleAttribute::Goto(_)
                | RuleAttribute::TunId(_)
                | RuleAttribute::L3MDev(true)
                | RuleAttribute::UidRange(_)
                | RuleAttribute::IpProtocol(_)
                | RuleAttribute::SourcePortRange(_)
                | RuleAttribute::DestinationPortRange(_)
        ) || suppresses(a)
    });
    !selectors_other_than_the_mark && fwmark(r) == Some((mark, u32::MAX)) && rule_table(r) == table
}

/// Whether rule `r` can decide the route of a locally sent packet carrying
/// `mark` (three-valued: other selectors are unknown for such a packet).
fn selects(r: &RuleMessage, mark: u32) -> Match {
    let mut m = Match::Yes;
    if r.header.dst_len != 0 || r.header.src_len != 0 {
        m = m.and(Match::Maybe);
    }
    if let Some((value, mask)) = fwmark(r) {
        m = m.and(if mark & mask == value & mask {
            Match::Yes
        } else {
            Match::No
        });
    }
    for a in &r.attributes {
        m = m.and(match a {
            // Locally sent packets are looked up with input interface `lo`.
            RuleAttribute::Iifname(name) if name == "lo" => Match::Yes,
            RuleAttribute::Iifname(_) => Match::No,
            RuleAttribute::Oifname(_)
            | RuleAttribute::TunId(_)
            | RuleAttribute::L3MDev(true)
            | RuleAttribute::UidRange(_)
            | RuleAttribute::IpProtocol(_)
            | RuleAttribute::SourcePortRange(_)
            | RuleAttribute::DestinationPortRange(_) => Match::Maybe,
            _ => Match::Yes,
        });
    }
    if r.header.flags.contains(RuleFlags::Invert) {
        m.not()
    } else {
        m
    }
}

/// Whether foreign rule `r`, evaluated before ours, could take a packet carrying
/// one of `marks` elsewhere (another table, a blackhole) instead of letting it
/// reach our `fwmark … lookup route_table` rule.
pub fn can_take(r: &RuleMessage, marks: &[u32], route_table: u32) -> bool {
    let takes = match r.header.action {
        RuleAction::ToTable => {
            let t = rule_table(r);
            t != TABLE_LOCAL && t != route_table
        }
        RuleAction::Goto => true,
        RuleAction::Nop | RuleAction::Unspec => false,
        // Blackhole, unreachable, prohibit and actions newer than this crate.
        _ => true,
    };
    takes
        && marks
            .iter()
            .any(|&m| selects(r, m) != Match::No && !is_ours(r, m, route_table))
}

/// Where our rules go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// At the configured priority: no foreign rule that could take marked
    /// packets sits at or before it.
    Configured(u32),
    /// One step ahead of foreign rule `of`, the first that could take marked
    /// packets at or before the configured priority.
    Ahead { priority: u32, of: String },
    /// A rule that can take marked packets sits at priority 0, after `local`:
    /// nothing can precede it. Our rules stay where configured, and the guard
    /// chain keeps marked packets from leaving.
    Blocked { at: u32, by: String },
}

impl Placement {
    /// The priority to install our rules at.
    pub fn priority(&self) -> u32 {
        match self {
            Placement::Configured(p)
            | Placement::Ahead { priority: p, .. }
            | Placement::Blocked { at: p, .. } => *p,
        }
    }
}

/// Decides where our rules go, given every rule of both families in the kernel.
pub fn placement(
    configured: u32,
    rules: &[RuleMessage],
    marks: &[u32],
    route_table: u32,
) -> Placement {
    let first = rules
        .iter()
        .filter(|r| rule_priority(r) <= configured && can_take(r, marks, route_table))
        .min_by_key(|r| rule_priority(r));
    match first {
        None => Placement::Configured(configured),
        Some(r) if rule_priority(r) == 0 => Placement::Blocked {
            at: configured,
            by: describe(r),
        },
        Some(r) => Placement::Ahead {
            priority: rule_priority(r) - 1,
            of: describe(r),
        },
    }
}

/// Foreign rules that the kernel evaluates before our first rule of the same
/// family and that can take marked packets: what `status` and `doctor` report.
/// `rules` is a dump, in the kernel's evaluation order.
pub fn preceding(rules: &[RuleMessage], marks: &[u32], route_table: u32) -> Vec<String> {
    let mut out = Vec::new();
    let mut families = Vec::new();
    for r in rules {
        if !families.contains(&r.header.family) {
            families.push(r.header.family);
        }
    }
    for fam in families {
        let list: Vec<&RuleMessage> = rules.iter().filter(|r| r.header.family == fam).collect();
        let Some(ours) = list
            .iter()
            .position(|r| marks.iter().any(|&m| is_ours(r, m, route_table)))
        else {
            continue;
        };
        out.extend(
            list[..ours]
                .iter()
                .filter(|r| can_take(r, marks, route_table))
                .map(|r| describe(r)),
        );
    }
    out
}

/// A rule in `ip rule` syntax, e.g. `99: not from all fwmark 0xca6c lookup 51820`.
pub fn describe(r: &RuleMessage) -> String {
    use netlink_packet_route::AddressFamily;
    let mut s = format!("{}: ", rule_priority(r));
    if r.header.family == AddressFamily::Inet6 {
        s.insert_str(0, "(v6) ");
    }
    if r.header.flags.contains(RuleFlags::Invert) {
        s.push_str("not ");
    }
    let addr = |a: &RuleAttribute| match a {
        RuleAttribute::Source(ip) => Some(("from", *ip, r.header.src_len)),
        RuleAttribute::Destination(ip) => Some(("to", *ip, r.header.dst_len)),
        _ => None,
    };
    let from = r.attributes.iter().filter_map(addr).find(|a| a.0 == "from");
    match from {
        Some((_, ip, len)) => s.push_str(&format!("from {ip}/{len}")),
        None => s.push_str("from all"),
    }
    for a in &r.attributes {
        match a {
            RuleAttribute::Destination(ip) => s.push_str(&format!(" to {ip}/{}", r.header.dst_len)),
            RuleAttribute::FwMark(m) => s.push_str(&format!(" fwmark {m:#x}")),
            RuleAttribute::FwMask(m) if *m != u32::MAX => s.push_str(&format!("/{m:#x}")),
            RuleAttribute::Iifname(n) => s.push_str(&format!(" iif {n}")),
            RuleAttribute::Oifname(n) => s.push_str(&format!(" oif {n}")),
            RuleAttribute::UidRange(u) => s.push_str(&format!(" uidrange {}-{}", u.start, u.end)),
            RuleAttribute::IpProtocol(p) => s.push_str(&format!(" ipproto {p:?}")),
            RuleAttribute::DestinationPortRange(p) => {
                s.push_str(&format!(" dport {}-{}", p.start, p.end))
            }
            RuleAttribute::SourcePortRange(p) => {
                s.push_str(&format!(" sport {}-{}", p.start, p.end))
            }
            _ => {}
        }
    }
    match r.header.action {
        RuleAction::ToTable => match rule_table(r) {
            254 => s.push_str(" lookup main"),
            253 => s.push_str(" lookup default"),
            TABLE_LOCAL => s.push_str(" lookup local"),
            t => s.push_str(&format!(" lookup {t}")),
        },
        RuleAction::Goto => s.push_str(" goto"),
        RuleAction::Nop => s.push_str(" nop"),
        RuleAction::Blackhole => s.push_str(" blackhole"),
        RuleAction::Unreachable => s.push_str(" unreachable"),
        RuleAction::Prohibit => s.push_str(" prohibit"),
        _ => {}
    }
    for a in r.attributes.iter().filter(|a| suppresses(a)) {
        match a {
            RuleAttribute::SuppressPrefixLen(n) => {
                s.push_str(&format!(" suppress_prefixlength {n}"))
            }
            RuleAttribute::SuppressIfGroup(n) => s.push_str(&format!(" suppress_ifgroup {n}")),
            _ => {}
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::AddressFamily;

    fn rule(prio: u32, action: RuleAction, table: u32, attrs: Vec<RuleAttribute>) -> RuleMessage {
        let mut m = RuleMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.action = action;
        m.attributes = attrs;
        m.attributes.push(RuleAttribute::Table(table));
        if prio != 0 {
            m.attributes.push(RuleAttribute::Priority(prio));
        }
        m
    }

    /// Our rule as the kernel dumps it: with the unset suppressor (-1) and the
    /// full mark mask.
    fn ours(prio: u32) -> RuleMessage {
        rule(
            prio,
            RuleAction::ToTable,
            300,
            vec![
                RuleAttribute::FwMark(3000),
                RuleAttribute::FwMask(u32::MAX),
                RuleAttribute::SuppressPrefixLen(u32::MAX),
            ],
        )
    }

    /// `rules` in the kernel's evaluation order: by priority, and in order of
    /// insertion within one priority.
    fn in_kernel_order(mut rules: Vec<RuleMessage>) -> Vec<RuleMessage> {
        rules.sort_by_key(rule_priority);
        rules
    }

    /// The rules of a stock system: local, main and default.
    fn stock() -> Vec<RuleMessage> {
        vec![
            rule(0, RuleAction::ToTable, 255, vec![]),
            rule(32766, RuleAction::ToTable, 254, vec![]),
            rule(32767, RuleAction::ToTable, 253, vec![]),
        ]
    }

    /// wg-quick's two rules, as `ip rule add` without a priority leaves them.
    fn wg_quick(prio: u32) -> Vec<RuleMessage> {
        let mut not_mark = rule(
            prio,
            RuleAction::ToTable,
            51820,
            vec![RuleAttribute::FwMark(51820)],
        );
        not_mark.header.flags = RuleFlags::Invert;
        let suppress = rule(
            prio - 1,
            RuleAction::ToTable,
            254,
            vec![RuleAttribute::SuppressPrefixLen(0)],
        );
        vec![suppress, not_mark]
    }

    /// Tailscale's rules with an exit node (5210–5270, table 52).
    fn tailscale() -> Vec<RuleMessage> {
        let mark = || {
            vec![
                RuleAttribute::FwMark(0x80000),
                RuleAttribute::FwMask(0xff0000),
            ]
        };
        vec![
            rule(5210, RuleAction::ToTable, 254, mark()),
            rule(5230, RuleAction::ToTable, 253, mark()),
            rule(5250, RuleAction::Unreachable, 0, mark()),
            rule(5270, RuleAction::ToTable, 52, vec![]),
        ]
    }

    #[test]
    fn the_stock_rules_and_our_own_never_take_marked_packets() {
        let mut rules = stock();
        rules.push(ours(100));
        let rules = in_kernel_order(rules);
        assert_eq!(
            placement(100, &rules, &[3000], 300),
            Placement::Configured(100)
        );
        assert!(preceding(&rules, &[3000], 300).is_empty());
    }

    #[test]
    fn wg_quick_after_us_moves_our_rules_ahead_of_it() {
        let mut rules = stock();
        rules.extend(wg_quick(99));
        rules.push(ours(100));
        let rules = in_kernel_order(rules);
        assert_eq!(
            placement(100, &rules, &[3000], 300),
            Placement::Ahead {
                priority: 97,
                of: "98: from all lookup main suppress_prefixlength 0".into()
            }
        );
        let found = preceding(&rules, &[3000], 300);
        assert_eq!(
            found,
            [
                "98: from all lookup main suppress_prefixlength 0",
                "99: not from all fwmark 0xca6c lookup 51820"
            ]
        );
    }

    #[test]
    fn wg_quick_started_first_and_tailscale_sit_behind_the_default() {
        let mut rules = stock();
        rules.extend(wg_quick(32765));
        rules.extend(tailscale());
        rules.push(ours(100));
        assert_eq!(
            placement(100, &rules, &[3000], 300),
            Placement::Configured(100)
        );
        // With our rules configured behind Tailscale's, its table 52 would win.
        assert_eq!(
            placement(6000, &rules, &[3000], 300).priority(),
            5269,
            "ahead of `lookup 52`; its mark rules do not match 3000"
        );
    }

    #[test]
    fn a_mark_rule_takes_only_matching_marks() {
        let ts = tailscale();
        assert!(!can_take(&ts[0], &[3000], 300));
        assert!(can_take(&ts[0], &[0x80000], 300));
        assert!(can_take(&ts[0], &[0x80001], 300));
        let mut wg = wg_quick(99).remove(1);
        assert!(
            !can_take(&wg, &[51820], 300),
            "not fwmark 51820 skips 51820"
        );
        assert!(can_take(&wg, &[3000], 300));
        wg.header.flags = RuleFlags::empty();
        assert!(can_take(&wg, &[51820], 300));
    }

    #[test]
    fn rules_for_other_input_interfaces_never_see_local_traffic() {
        let lan = rule(
            10,
            RuleAction::ToTable,
            10,
            vec![RuleAttribute::Iifname("eth0".into())],
        );
        assert!(!can_take(&lan, &[3000], 300));
        let lo = rule(
            10,
            RuleAction::ToTable,
            10,
            vec![RuleAttribute::Iifname("lo".into())],
        );
        assert!(can_take(&lo, &[3000], 300));
        let uid = rule(
            10,
            RuleAction::ToTable,
            10,
            vec![RuleAttribute::UidRange(
                netlink_packet_route::rule::RuleUidRange { start: 0, end: 10 },
            )],
        );
        assert!(
            can_take(&uid, &[3000], 300),
            "some marked packets may match"
        );
        let nop = rule(10, RuleAction::Nop, 0, vec![]);
        assert!(!can_take(&nop, &[3000], 300));
    }

    #[test]
    fn a_catch_all_at_priority_zero_cannot_be_preceded() {
        let mut rules = stock();
        rules.insert(1, rule(0, RuleAction::ToTable, 51820, vec![]));
        rules.push(ours(1));
        assert_eq!(
            placement(1, &rules, &[3000], 300),
            Placement::Blocked {
                at: 1,
                by: "0: from all lookup 51820".into()
            }
        );
    }

    #[test]
    fn preceding_rules_are_judged_per_family() {
        let mut v6 = wg_quick(99);
        for r in &mut v6 {
            r.header.family = AddressFamily::Inet6;
        }
        let mut rules = stock();
        rules.push(ours(100));
        rules.extend(v6);
        let mut ours6 = ours(100);
        ours6.header.family = AddressFamily::Inet6;
        rules.push(ours6);
        let rules = in_kernel_order(rules);
        let found = preceding(&rules, &[3000], 300);
        assert_eq!(found.len(), 2);
        assert!(found.iter().all(|d| d.starts_with("(v6) ")), "{found:?}");
    }
}
