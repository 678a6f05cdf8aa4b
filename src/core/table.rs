//! The nftables table the planner wants, in nft's own vocabulary: sets, maps,
//! chains and their statements, built from the configuration and the tree's
//! elements. Pure: the kernel backend (`kernel::nft`) and `render` turn the
//! same spec into netlink messages and nft syntax.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Range;
use std::rc::Rc;

use ipnet::IpNet;

use crate::config::{
    Action, CONN_TAG_BASE, Config, DIRECT_CLASS, DROP_CLASS, RESOLVED_STUB, Target,
};
use crate::core::tree::Element;

/// Address family of a rule or set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// Transport protocols we handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => libc::IPPROTO_TCP as u8,
            Proto::Udp => libc::IPPROTO_UDP as u8,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// What a map element or rule decides. Chain names are shared, not copied per
/// element: a table can hold tens of thousands of `goto` elements.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Verdict {
    Accept,
    Drop,
    Return,
    Goto(Rc<str>),
    Jump(Rc<str>),
}

/// One statement of a rule, close to nft's own vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stmt {
    /// `ct direction reply`
    CtReply,
    /// `meta nfproto ipv4|ipv6`
    NfProto(Family),
    /// `meta l4proto P`
    L4Proto(Proto),
    /// `meta l4proto != tcp meta l4proto != udp`
    NotTcpUdp,
    /// `ip daddr @set` / `ip6 daddr @set`
    DaddrIn(Family, String),
    /// `ip daddr A` / `ip6 daddr A`
    Daddr(IpAddr),
    /// `th dport N` (after an l4proto match)
    Dport(u16),
    /// `meta mark N`
    Mark(u32),
    /// `meta mark != 0`
    Marked,
    /// `oif != "lo"` (the loopback interface is index 1 in every namespace)
    OifNotLoopback,
    /// `iif != "lo"`: not looped back by this host, so forwarded to it
    IifNotLoopback,
    /// `meta mark 0`
    Unmarked,
    /// `iif @set`: the input interface is a key of set or map `set`
    IifIn(String),
    /// `fib daddr type T` (T an `RTN_*` address type: local, broadcast…)
    FibDaddrType(u8),
    /// `ct mark N`
    CtMark(u32),
    /// `ct mark and 0xffff0000 == 0x63680000`: one of our connection tags
    /// (see [`conn_tag`]), of any generation.
    CtMarkTagged,
    /// `ct mark set meta mark`
    SaveCtMark,
    /// `ct mark set N`
    SetCtMark(u32),
    /// `meta mark set N`
    SetMark(u32),
    /// `meta mark set socket cgroupv2 level L map @map meta mark vmap @classes`:
    /// the cgroup's class into the mark, then the class's verdict.
    CgroupClass {
        level: u32,
        map: String,
    },
    /// `socket cgroupv2 level L != 0`: the socket's cgroup is at level L or
    /// below (cgroup ids are never 0; a shallower one has no ancestor there).
    CgroupAtLevel(u32),
    /// `iif N` (an interface index)
    Iif(u32),
    /// `meta pkttype host`: addressed to this host's (the bridge's) MAC
    PktTypeHost,
    /// `meta broute set 1` (bridge family): routed on its port, not bridged
    Broute,
    /// `meta mark set iif map @ifaces meta mark vmap @classes`: the input
    /// interface's class into the mark, then the class's verdict.
    IfaceClass,
    /// `tproxy ip to 127.0.0.1:port` / `tproxy ip6 to [::1]:port`: always a
    /// loopback address, so the listener can bind to loopback and stay out of
    /// reach of the network.
    Tproxy(IpAddr, u16),
    /// `dnat ip to a:p` / `dnat ip6 to [a]:p`
    Dnat(IpAddr, u16),
    Counter,
    /// `counter name "NAME"`: into one of [`TableSpec::counters`].
    NamedCounter(String),
    Verdict(Verdict),
}

/// Base-chain hooks we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// `type route hook output priority mangle`
    OutputRoute,
    /// `type filter hook prerouting priority mangle`
    PreroutingFilter,
    /// `type nat hook output priority -100`
    OutputNat,
    /// `type nat hook prerouting priority dstnat` (-100)
    PreroutingNat,
    /// `type filter hook postrouting priority mangle`
    PostroutingFilter,
    /// `type filter hook prerouting priority -200` in the bridge family
    BridgePrerouting,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSpec {
    pub name: String,
    pub hook: Option<Hook>,
    pub rules: Vec<Vec<Stmt>>,
}

/// Content of a set or map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetKind {
    /// Interval set of addresses: merged inclusive ranges.
    Bypass(Family, Vec<(u128, u128)>),
    /// Map of cgroup ids at one level to their class (see [`class`]): the
    /// elements are [`TableSpec::level_elements`] in this range.
    Level(u32, Range<usize>),
    /// The few classes and their verdicts ([`CLASSES`]).
    Classes(Vec<(u32, Verdict)>),
    /// Map of interface indices to their class ([`IFACES`]): forwarded traffic.
    Ifaces(Vec<(u32, u32)>),
}

impl SetKind {
    /// The most elements a set of this kind holds, where that is fixed: the
    /// kernel then picks a fixed-size hash, whose lookup for 4-byte keys
    /// costs less than the resizable one's (and refuses more elements).
    pub fn size(&self) -> Option<u32> {
        match self {
            SetKind::Classes(list) => Some(list.len() as u32),
            SetKind::Bypass(..) | SetKind::Level(..) | SetKind::Ifaces(_) => None,
        }
    }
}

/// Name of the chain that ends the output chain for connections carrying the
/// current tag ([`tag_chains`]).
pub const FRESH: &str = "fresh";

/// Name of the chain that writes the current tag ([`tag_chains`]).
pub const TAG: &str = "tag";

/// Name of the interface → class map.
pub const IFACES: &str = "ifaces";

/// Name of the class → verdict map.
pub const CLASSES: &str = "classes";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetSpec {
    pub name: String,
    pub kind: SetKind,
}

/// The whole desired table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSpec {
    pub name: String,
    /// Named counter objects, one per target (named after it).
    pub counters: Vec<String>,
    pub sets: Vec<SetSpec>,
    /// The level maps' elements (cgroup id, class), by level. One vector for
    /// all: a start builds it for the whole tree and frees it after the
    /// commit, and at 50,000 cgroups seven per-level vectors were heap blocks
    /// just under the allocator's mmap threshold, which a small allocation
    /// made later above them kept resident (0.9 MB of idle RSS, in some
    /// starts). This one is mapped and unmapped whole.
    pub level_elements: Vec<(u64, u32)>,
    pub chains: Vec<ChainSpec>,
    /// Bridge ports whose frames to the bridge are routed on the port instead
    /// (see [`broute_chain`]); none: no bridge table.
    pub broute: Vec<u32>,
    /// Whether the kernel can route a bridge port's frames (`meta broute`);
    /// without, they are dropped.
    pub can_broute: bool,
}

/// The bridge table's one chain (`type filter hook prerouting priority
/// -200`, in table `bridge NAME`): TCP and UDP that a classified container on
/// a bridge sends to the bridge's MAC — traffic to be routed — goes up the
/// stack on its bridge port, where the inet table classifies it by that port
/// like a direct veth. Left on the bridge, it would meet the inet hooks as
/// the bridge's traffic, or with br_netfilter in the bridge's own pass, where
/// `tproxy` cannot deliver it. A kernel that cannot route them (`meta
/// broute`: Linux 6.4 and later, with CONFIG_NFT_BRIDGE_META) gets `drop`
/// instead: such traffic fails closed rather than leaving unproxied.
pub fn broute_chain(ports: &[u32], can_broute: bool) -> ChainSpec {
    let mut rules = vec![vec![Stmt::NotTcpUdp, Stmt::Verdict(Verdict::Return)]];
    rules.extend(ports.iter().map(|&p| {
        let last = if can_broute {
            Stmt::Broute
        } else {
            Stmt::Verdict(Verdict::Drop)
        };
        vec![Stmt::Iif(p), Stmt::PktTypeHost, last]
    }));
    ChainSpec {
        name: "broute".into(),
        hook: Some(Hook::BridgePrerouting),
        rules,
    }
}

/// Name of the class map of one level.
pub fn level_map(level: u32) -> String {
    format!("level{level}")
}

/// The loopback address of a family: where `tproxy` hands a target's packets.
/// A listener bound there receives the looped traffic of local apps and is
/// unreachable from the network, as a wildcard-bound one would not be.
pub fn loopback(f: Family) -> IpAddr {
    match f {
        Family::V4 => IpAddr::V4(Ipv4Addr::LOCALHOST),
        Family::V6 => IpAddr::V6(Ipv6Addr::LOCALHOST),
    }
}

/// Name of a target's marking chain.
pub fn mark_chain(target: &str) -> String {
    format!("{target}-mark")
}

/// The class a cgroup's action is stored as in its level map: a target's mark,
/// or a reserved value for direct and drop. Level maps hold plain values that
/// the classify chain writes into the packet mark, and one small verdict map,
/// [`CLASSES`], keyed by that mark, decides. The kernel re-validates every
/// element of a map holding jump/goto verdicts on each change, which made each
/// update cost O(cgroups); nft cannot list a map lookup chained straight into a
/// vmap, so the mark carries the value between the two.
pub fn class(cfg: &Config, action: Action) -> u32 {
    match action {
        Action::Direct => DIRECT_CLASS,
        Action::Drop => DROP_CLASS,
        Action::Tproxy(i) => cfg.targets[usize::from(i)].mark,
    }
}

/// The class of a cgroup that nothing classifies, in the level maps that hold
/// every cgroup of their level (see `tree`): no mark, so the packet's mark is
/// left as it was, and [`UNMATCHED`] decides as if no map had held it.
pub const UNCLASSIFIED_CLASS: u32 = 0;

/// The class a map element stores: [`class`], or [`UNCLASSIFIED_CLASS`].
pub fn element_class(cfg: &Config, verdict: Option<Action>) -> u32 {
    verdict.map_or(UNCLASSIFIED_CLASS, |a| class(cfg, a))
}

/// The chain for packets no level map classifies: those of unclassified
/// cgroups, and those the kernel sends without a full socket.
pub const UNMATCHED: &str = "unmatched";

/// The chain direct-classified packets go to: it clears the class mark again.
pub const DIRECT_CHAIN: &str = "direct";

/// The chain drop-classified packets go to: it lets bypass destinations pass.
pub const DROP_CHAIN: &str = "dropped";

/// The chain an action's class goes to (from [`CLASSES`]).
fn class_chain(cfg: &Config, action: Action) -> String {
    match action {
        Action::Direct => DIRECT_CHAIN.into(),
        Action::Drop => DROP_CHAIN.into(),
        Action::Tproxy(i) => mark_chain(&cfg.targets[usize::from(i)].name),
    }
}

/// Merges address ranges of one family into sorted, disjoint, non-adjacent ranges.
pub fn merge_ranges(nets: &[IpNet], family: Family) -> Vec<(u128, u128)> {
    let mut ranges: Vec<(u128, u128)> = nets
        .iter()
        .filter_map(|n| match (n, family) {
            (IpNet::V4(n), Family::V4) => Some((
                u32::from(n.network()) as u128,
                u32::from(n.broadcast()) as u128,
            )),
            (IpNet::V6(n), Family::V6) => {
                Some((u128::from(n.network()), u128::from(n.broadcast())))
            }
            _ => None,
        })
        .collect();
    ranges.sort_unstable();
    let mut out: Vec<(u128, u128)> = Vec::new();
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if s <= last.1.saturating_add(1) => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Name of a family's set of bypass destinations.
fn bypass_set(f: Family) -> &'static str {
    match f {
        Family::V4 => "bypass4",
        Family::V6 => "bypass6",
    }
}

/// Bypass destinations are never marked nor dropped. They are checked only
/// for traffic a class would touch (in the drop and target chains), not for
/// every packet before classification: a rule and a set lookup fewer per
/// packet for the untouched and direct majority. The class the packet
/// carries in its mark by then goes again.
fn bypassed() -> [Vec<Stmt>; 2] {
    [Family::V4, Family::V6].map(|f| {
        vec![
            Stmt::NfProto(f),
            Stmt::DaddrIn(f, bypass_set(f).into()),
            Stmt::SetMark(0),
            Stmt::Verdict(Verdict::Return),
        ]
    })
}

/// A query to systemd-resolved's stub: classified although its address is
/// usually a bypass destination, so that a target can hijack it.
fn stub_query(p: Proto) -> Vec<Stmt> {
    vec![
        Stmt::NfProto(Family::V4),
        Stmt::Daddr(IpAddr::V4(RESOLVED_STUB)),
        Stmt::L4Proto(p),
        Stmt::Dport(53),
    ]
}

/// The connection mark (`ct mark`) of a connection the output chain let
/// leave unmarked while the table was at `generation`.
pub fn conn_tag(generation: u16) -> u32 {
    CONN_TAG_BASE | u32::from(generation)
}

/// The output chain: skip replies, packets their socket marked and
/// non-TCP/UDP, then classify.
///
/// A connection is classified by its packets until one leaves unmarked
/// (direct, unclassified, or a bypass destination): its connection mark then
/// holds the tag of the table's generation ([`conn_tag`], in the chains
/// [`FRESH`] and [`TAG`]), and its later packets end at the first rule, as
/// classifying them would only decide the same again. The daemon rewrites both
/// chains for the next generation in every transaction that may change what an
/// existing socket decides (a decisive `tree::Delta`: a verdict changes, a
/// cgroup that decides for itself goes, a level starts being looked up; a
/// new cgroup's element needs none, see [`classify_chain`]): a tagged
/// connection is then classified again at its next packet and tagged anew,
/// so a change reaches open connections as it would if every packet were
/// classified. The tag is written before the classification: a commit
/// between the two leaves a tag that is already stale, never a current one
/// on a stale decision. Connections a target marks get its mark instead (a
/// target's chain saves it), dropped ones lose the tag ([`drop_chain`]); a
/// connection mark another program set is left alone, and its connection
/// classified every packet.
pub fn output_chain() -> ChainSpec {
    let ret = || Stmt::Verdict(Verdict::Return);
    ChainSpec {
        name: "output".into(),
        hook: Some(Hook::OutputRoute),
        rules: vec![
            vec![Stmt::Verdict(Verdict::Jump(FRESH.into()))],
            vec![Stmt::CtReply, ret()],
            // Packets whose socket set a mark (SO_MARK, which needs
            // CAP_NET_ADMIN) belong to their owner's policy routing: VPN
            // clients, other proxies, and the built-in forwarder's upstream
            // connections.
            vec![Stmt::Marked, ret()],
            vec![Stmt::NotTcpUdp, ret()],
            vec![Stmt::Verdict(Verdict::Jump(TAG.into()))],
            vec![Stmt::Verdict(Verdict::Goto(CLASSIFY.into()))],
        ],
    }
}

/// The two chains holding the tag of `generation`, which the output chain
/// jumps to: [`FRESH`] accepts a packet whose connection carries it (ending
/// the output chain as its policy would), [`TAG`] writes it over a zero
/// connection mark or a stale tag of ours (another program's mark stays).
///
/// The tag is a constant in their rules, not an element of a set: a
/// comparison and an immediate cost less than two set lookups, on every
/// packet of every connection. A new generation rewrites these two small
/// chains instead, which costs its (rare) transaction more than moving set
/// elements did; the output chain itself stays (a version that rewrote it
/// measured more than twice an update's time). A packet meets every chain
/// at one generation of the ruleset, so it never sees one chain's tag
/// beside the other's.
pub fn tag_chains(generation: u16) -> [ChainSpec; 2] {
    let tag = conn_tag(generation);
    [
        ChainSpec {
            name: FRESH.into(),
            hook: None,
            rules: vec![vec![Stmt::CtMark(tag), Stmt::Verdict(Verdict::Accept)]],
        },
        ChainSpec {
            name: TAG.into(),
            hook: None,
            rules: vec![
                vec![
                    Stmt::CtMark(0),
                    Stmt::SetCtMark(tag),
                    Stmt::Verdict(Verdict::Return),
                ],
                vec![Stmt::CtMarkTagged, Stmt::SetCtMark(tag)],
            ],
        },
    ]
}

/// The drop class: everything but bypass destinations. With `stub` (some
/// target hijacks systemd-resolved's stub), queries to the stub are not
/// bypassed: dropped too.
pub fn drop_chain(stub: bool) -> ChainSpec {
    // The output chain tagged the connection before it was classified: one
    // dropped here loses the tag, so its next packet is classified (and
    // dropped) again. Bypass destinations keep it (they leave unmarked),
    // unless the stub's queries, dropped first, make the untagging go first.
    let untag = vec![Stmt::CtMarkTagged, Stmt::SetCtMark(0)];
    let mut rules = Vec::new();
    if stub {
        rules.push(untag.clone());
        for p in [Proto::Udp, Proto::Tcp] {
            let mut r = stub_query(p);
            r.push(Stmt::Verdict(Verdict::Drop));
            rules.push(r);
        }
    }
    rules.extend(bypassed());
    if !stub {
        rules.push(untag);
    }
    rules.push(vec![Stmt::Verdict(Verdict::Drop)]);
    ChainSpec {
        name: DROP_CHAIN.into(),
        hook: None,
        rules,
    }
}

/// Name of the chain that keeps marked packets from leaving.
pub const GUARD: &str = "guard";

/// The fail-closed guard: a packet carrying a target's mark must leave through
/// `lo`, looped back to the listener. If anything else routes it — a VPN's or
/// mesh network's ip rule evaluated before ours, our route deleted — it is
/// dropped here instead of reaching its destination directly.
pub fn guard_chain(cfg: &Config) -> ChainSpec {
    ChainSpec {
        name: GUARD.into(),
        hook: Some(Hook::PostroutingFilter),
        rules: cfg
            .targets
            .iter()
            .map(|t| {
                vec![
                    Stmt::Mark(t.mark),
                    Stmt::OifNotLoopback,
                    Stmt::Counter,
                    Stmt::Verdict(Verdict::Drop),
                ]
            })
            .collect(),
    }
}

/// The queries target `t` hijacks: (resolver address, its family, protocol,
/// resolver port), UDP and with `tcp` TCP, for each of its addresses.
fn dns_hijacks(t: &Target) -> Vec<(IpAddr, Family, Proto, u16)> {
    let Some(d) = &t.dns_hijack else {
        return Vec::new();
    };
    let protos: &[Proto] = if d.tcp {
        &[Proto::Udp, Proto::Tcp]
    } else {
        &[Proto::Udp]
    };
    let addrs = [d.ip.map(IpAddr::V4), d.ip6.map(IpAddr::V6)];
    let mut out = Vec::new();
    for addr in addrs.into_iter().flatten() {
        let fam = if addr.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        };
        out.extend(protos.iter().map(|&p| (addr, fam, p, d.port)));
    }
    out
}

/// Name of the base chain that hands marked packets to the listeners.
pub const PREROUTING: &str = "prerouting";

/// The prerouting chain: marked packets to their target's listener, and,
/// when `forwarded` (some interface is classified), unmarked packets of a
/// classified interface to [`forwarded_chain`] first.
///
/// Answers are never handed to a listener. A VPN's rule that copies the
/// connection's mark into every packet (wg-quick's `meta mark set ct mark`
/// for UDP) puts our mark on the listener's own answers; `tproxy` would then
/// give them back to the listener instead of the app. Unmarked packets from
/// other hosts are forwarded traffic: classified, they get a target's mark
/// and meet the same tproxy rules as looped local traffic. Every packet a
/// client sends to a server on this host passes here too: the forwarded
/// chain's first `fib` check is a route lookup, and even the interface map's
/// lookup costs more than the rest of the chain (by hand, per inbound
/// datagram over conntrack only: 414 ns with the jump for every interface,
/// 320 with the map lookup first, 179 without the rule), so the jump is only
/// there while an interface is classified, and only for those interfaces.
pub fn prerouting_chain(cfg: &Config, forwarded: bool) -> ChainSpec {
    let mut rules = vec![vec![Stmt::CtReply, Stmt::Verdict(Verdict::Return)]];
    if forwarded {
        rules.push(vec![
            Stmt::IifNotLoopback,
            Stmt::Unmarked,
            Stmt::IifIn(IFACES.into()),
            Stmt::Verdict(Verdict::Jump(FORWARDED.into())),
        ]);
    }
    // Forwarded DNS queries a target hijacks keep their mark past the tproxy
    // rules, for the prerouting nat chain.
    for t in &cfg.targets {
        for (_, fam, p, _) in dns_hijacks(t) {
            rules.push(vec![
                Stmt::Mark(t.mark),
                Stmt::NfProto(fam),
                Stmt::L4Proto(p),
                Stmt::Dport(53),
                Stmt::Verdict(Verdict::Return),
            ]);
        }
    }
    for t in &cfg.targets {
        let protos: &[Proto] = if t.no_udp {
            &[Proto::Tcp]
        } else {
            &[Proto::Tcp, Proto::Udp]
        };
        // One rule per family: a tproxy statement with an address serves only
        // its own family. A no-ipv6 target's IPv6 traffic is never marked.
        let families: &[Family] = if t.no_ipv6 {
            &[Family::V4]
        } else {
            &[Family::V4, Family::V6]
        };
        for &f in families {
            for &p in protos {
                rules.push(vec![
                    Stmt::Mark(t.mark),
                    Stmt::NfProto(f),
                    Stmt::L4Proto(p),
                    Stmt::Tproxy(loopback(f), t.port),
                    Stmt::Counter,
                    Stmt::Verdict(Verdict::Accept),
                ]);
            }
        }
    }
    ChainSpec {
        name: PREROUTING.into(),
        hook: Some(Hook::PreroutingFilter),
        rules,
    }
}

/// Name of the chain that classifies traffic forwarded to this host.
pub const FORWARDED: &str = "forwarded";

/// `RTN_LOCAL`, `RTN_BROADCAST`, `RTN_MULTICAST`: destinations on this host.
const HOST_ADDRESS_TYPES: [u8; 3] = [2, 3, 5];

/// Traffic forwarded to this host (containers, VMs, LAN clients) is classified
/// by the interface it arrived on, as the output chain classifies local
/// traffic by cgroup: never what is addressed to this host itself (its
/// addresses, broadcasts, multicasts) or non-TCP/UDP; bypass destinations
/// pass in the class's chain, as for local traffic.
pub fn forwarded_chain() -> ChainSpec {
    let mut rules: Vec<Vec<Stmt>> = HOST_ADDRESS_TYPES
        .iter()
        .map(|&t| vec![Stmt::FibDaddrType(t), Stmt::Verdict(Verdict::Return)])
        .collect();
    rules.push(vec![Stmt::NotTcpUdp, Stmt::Verdict(Verdict::Return)]);
    rules.push(vec![Stmt::IfaceClass]);
    ChainSpec {
        name: FORWARDED.into(),
        hook: None,
        rules,
    }
}

/// Name of the chain holding the per-level map lookups.
pub const CLASSIFY: &str = "classify";

/// One class lookup per level, deepest first, so the nearest classified ancestor
/// decides; then [`unmatched_chain`].
///
/// A level's map holds every cgroup of its level (see `tree::Tree`), so a
/// socket whose ancestor there is not found is in a cgroup made so recently
/// that its element is still on its way: the ancestors decide for now, and
/// the rule after the lookup removes the connection's tag ([`output_chain`]),
/// so its next packet is classified again, by then perhaps with the new
/// element. A new cgroup's element therefore needs no new generation: no
/// connection kept a decision taken without it.
pub fn classify_chain(levels: &BTreeSet<u32>) -> ChainSpec {
    let mut rules: Vec<Vec<Stmt>> = Vec::new();
    for &level in levels.iter().rev() {
        rules.push(vec![Stmt::CgroupClass {
            level,
            map: level_map(level),
        }]);
        rules.push(vec![
            Stmt::CgroupAtLevel(level),
            Stmt::CtMarkTagged,
            Stmt::SetCtMark(0),
        ]);
    }
    rules.push(vec![Stmt::Verdict(Verdict::Goto(UNMATCHED.into()))]);
    ChainSpec {
        name: CLASSIFY.into(),
        hook: None,
        rules,
    }
}

/// Packets no class decides. Those of a connection that a target's chain
/// marked keep its target: the kernel sends some without a full socket (a
/// TIME_WAIT ack, a reset), and a socket's cgroup may stop being classified
/// (a reload) with its connections open; else they would leave by the
/// ordinary route, to the destination or into a VPN.
fn unmatched_chain(cfg: &Config) -> ChainSpec {
    ChainSpec {
        name: UNMATCHED.into(),
        hook: None,
        rules: cfg
            .targets
            .iter()
            .map(|t| vec![Stmt::CtMark(t.mark), Stmt::SetMark(t.mark)])
            .collect(),
    }
}

/// The levels that have at least one element.
pub fn levels(elements: &[Element]) -> BTreeSet<u32> {
    elements.iter().map(|((level, _), _)| *level).collect()
}

/// Builds the desired table for `cfg`, with maps for `levels` holding
/// `elements` (sorted by key), the interface map holding `ifaces` (index →
/// class), and the connection tag of `generation` (see [`output_chain`]).
pub fn table(
    cfg: &Config,
    levels: &BTreeSet<u32>,
    elements: &[Element],
    ifaces: &BTreeMap<u32, u32>,
    broute: &[u32],
    can_broute: bool,
    generation: u16,
) -> TableSpec {
    let mut sets = vec![
        SetSpec {
            name: bypass_set(Family::V4).into(),
            kind: SetKind::Bypass(Family::V4, merge_ranges(&cfg.bypass, Family::V4)),
        },
        SetSpec {
            name: bypass_set(Family::V6).into(),
            kind: SetKind::Bypass(Family::V6, merge_ranges(&cfg.bypass, Family::V6)),
        },
    ];
    let actions = [Action::Direct, Action::Drop]
        .into_iter()
        .chain((0..=u16::MAX).take(cfg.targets.len()).map(Action::Tproxy));
    let classes = actions
        .map(|a| (class(cfg, a), Verdict::Goto(class_chain(cfg, a).into())))
        .chain([(UNCLASSIFIED_CLASS, Verdict::Goto(UNMATCHED.into()))])
        .collect();
    sets.push(SetSpec {
        name: CLASSES.into(),
        kind: SetKind::Classes(classes),
    });
    sets.push(SetSpec {
        name: IFACES.into(),
        kind: SetKind::Ifaces(ifaces.iter().map(|(&i, &c)| (i, c)).collect()),
    });
    let level_elements = elements
        .iter()
        .map(|&((_, id), a)| (id, element_class(cfg, a)))
        .collect();
    for &level in levels {
        let start = elements.partition_point(|((l, _), _)| *l < level);
        let end = elements.partition_point(|((l, _), _)| *l <= level);
        sets.push(SetSpec {
            name: level_map(level),
            kind: SetKind::Level(level, start..end),
        });
    }

    // Direct: the class mark goes again, so the packet leaves unmarked and is
    // not re-routed.
    let mut chains = vec![ChainSpec {
        name: DIRECT_CHAIN.into(),
        hook: None,
        rules: vec![vec![Stmt::SetMark(0)]],
    }];
    let mut nat = Vec::new();
    let stub = cfg
        .targets
        .iter()
        .any(|t| t.dns_hijack.as_ref().is_some_and(|d| d.stub));
    for t in &cfg.targets {
        let mut rules = Vec::new();
        if stub {
            // Where some target hijacks the stub, queries to it are not
            // bypassed: this target hijacks them, marked here before the
            // bypass check as its DNS rules below would mark them (a stub
            // hijack needs `ip`), or leaves them to the stub unmarked.
            let hijacked: &[Proto] = match &t.dns_hijack {
                Some(d) if d.stub && d.tcp => &[Proto::Udp, Proto::Tcp],
                Some(d) if d.stub => &[Proto::Udp],
                _ => &[],
            };
            for p in [Proto::Udp, Proto::Tcp] {
                let mut r = stub_query(p);
                if hijacked.contains(&p) {
                    r.push(Stmt::SetMark(t.mark));
                } else {
                    r.push(Stmt::SetMark(0));
                }
                r.push(Stmt::Verdict(Verdict::Return));
                rules.push(r);
            }
        }
        rules.extend(bypassed());
        for (addr, fam, p, port) in dns_hijacks(t) {
            // Marked even for no-udp / no-ipv6 targets: the nat chain finds
            // the query by its mark, clears it and redirects it.
            rules.push(vec![
                Stmt::NfProto(fam),
                Stmt::L4Proto(p),
                Stmt::Dport(53),
                Stmt::SetMark(t.mark),
                Stmt::Verdict(Verdict::Return),
            ]);
            nat.push(vec![
                Stmt::Mark(t.mark),
                Stmt::NfProto(fam),
                Stmt::L4Proto(p),
                Stmt::Dport(53),
                Stmt::SetMark(0),
                Stmt::Dnat(addr, port),
            ]);
        }
        // Traffic a target leaves direct leaves unmarked: its class mark is the
        // target's mark and goes again.
        if t.no_udp {
            rules.push(vec![
                Stmt::L4Proto(Proto::Udp),
                Stmt::SetMark(0),
                Stmt::Verdict(Verdict::Return),
            ]);
        }
        if t.no_ipv6 {
            rules.push(vec![
                Stmt::NfProto(Family::V6),
                Stmt::SetMark(0),
                Stmt::Verdict(Verdict::Return),
            ]);
        }
        // The named counter is what `cgtproxy status` (and `nft list counters`)
        // reports per target: connections and packets sent to its listener.
        // The connection remembers the mark: packets the kernel sends for it
        // without a full socket (TCP's TIME_WAIT acks and resets) carry no
        // cgroup, and the classify chain restores their mark from it.
        rules.push(vec![
            Stmt::SetMark(t.mark),
            Stmt::SaveCtMark,
            Stmt::NamedCounter(t.name.clone()),
        ]);
        chains.push(ChainSpec {
            name: mark_chain(&t.name),
            hook: None,
            rules,
        });
    }
    chains.push(drop_chain(stub));
    chains.push(unmatched_chain(cfg));
    chains.push(classify_chain(levels));
    chains.extend(tag_chains(generation));
    chains.push(output_chain());
    if !cfg.targets.is_empty() {
        chains.push(guard_chain(cfg));
    }
    chains.push(forwarded_chain());
    chains.push(prerouting_chain(cfg, !ifaces.is_empty()));
    if !nat.is_empty() {
        chains.push(ChainSpec {
            name: "dns-forwarded".into(),
            hook: Some(Hook::PreroutingNat),
            rules: nat.clone(),
        });
        chains.push(ChainSpec {
            name: "dns".into(),
            hook: Some(Hook::OutputNat),
            rules: nat,
        });
    }
    TableSpec {
        name: cfg.table.clone(),
        counters: cfg.targets.iter().map(|t| t.name.clone()).collect(),
        sets,
        level_elements,
        chains,
        broute: broute.to_vec(),
        can_broute,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One target and overlapping bypass ranges; rules do not matter here.
    fn cfg() -> Config {
        Config::parse(
            r#"{"version":1,"bypass":["10.0.0.0/8","10.1.0.0/16","11.0.0.0/8","::1"],
            "tproxies":{"proxy":{"port":7893,"mark":3000}}}"#,
            "t",
        )
        .unwrap()
    }

    #[test]
    fn bypass_ranges_are_merged() {
        let c = cfg();
        let v4 = merge_ranges(&c.bypass, Family::V4);
        // 10/8 swallows 10.1/16; 11/8 is adjacent to 10/8 and joins it.
        assert_eq!(v4, vec![(0x0a00_0000, 0x0bff_ffff)]);
        let v6 = merge_ranges(&c.bypass, Family::V6);
        assert_eq!(v6, vec![(1, 1)]);
        let all = merge_ranges(&["0.0.0.0/0".parse().unwrap()], Family::V4);
        assert_eq!(all, vec![(0, u32::MAX as u128)]);
    }

    #[test]
    fn a_connection_left_unmarked_is_classified_again_only_in_a_new_generation() {
        let out = output_chain();
        let ret = Stmt::Verdict(Verdict::Return);
        assert_eq!(
            out.rules,
            [
                // Tagged at the current generation: ends before anything else.
                vec![Stmt::Verdict(Verdict::Jump(FRESH.into()))],
                vec![Stmt::CtReply, ret.clone()],
                vec![Stmt::Marked, ret.clone()],
                vec![Stmt::NotTcpUdp, ret.clone()],
                vec![Stmt::Verdict(Verdict::Jump(TAG.into()))],
                vec![Stmt::Verdict(Verdict::Goto(CLASSIFY.into()))],
            ]
        );
        let t = table(
            &cfg(),
            &BTreeSet::new(),
            &[],
            &BTreeMap::new(),
            &[],
            true,
            7,
        );
        let [fresh, tagging] = tag_chains(7);
        let tag = 0x6368_0007;
        assert_eq!(
            fresh.rules,
            [vec![Stmt::CtMark(tag), Stmt::Verdict(Verdict::Accept)]]
        );
        assert_eq!(
            tagging.rules,
            [
                // No mark, or a stale tag of ours: another program's stays.
                vec![Stmt::CtMark(0), Stmt::SetCtMark(tag), ret],
                vec![Stmt::CtMarkTagged, Stmt::SetCtMark(tag)],
            ]
        );
        assert!(t.chains.contains(&fresh) && t.chains.contains(&tagging));
        assert_eq!(
            conn_tag(u16::MAX),
            0x6368_ffff,
            "the generation stays in the tag's low bits"
        );
    }

    #[test]
    fn levels_are_ordered_deepest_first_then_the_unmatched_chain() {
        let chain = classify_chain(&[2, 5, 3].into());
        assert_eq!(
            chain.rules.last(),
            Some(&vec![Stmt::Verdict(Verdict::Goto(UNMATCHED.into()))]),
        );
        let levels: Vec<u32> = chain
            .rules
            .iter()
            .filter_map(|r| match r[0] {
                Stmt::CgroupClass { level, .. } => Some(level),
                _ => None,
            })
            .collect();
        assert_eq!(levels, [5, 3, 2]);
    }

    #[test]
    fn a_lookup_that_misses_a_socket_below_its_level_untags_the_connection() {
        let chain = classify_chain(&[2, 5].into());
        let untag = |level| {
            vec![
                Stmt::CgroupAtLevel(level),
                Stmt::CtMarkTagged,
                Stmt::SetCtMark(0),
            ]
        };
        let lookup = |level| {
            vec![Stmt::CgroupClass {
                level,
                map: level_map(level),
            }]
        };
        assert_eq!(
            chain.rules[..4],
            [lookup(5), untag(5), lookup(2), untag(2)],
            "each level's untagging right after its lookup, which only a miss passes"
        );
    }

    #[test]
    fn no_udp_and_no_ipv6_leave_that_traffic_unmarked() {
        let c = Config::parse(
            r#"{"version":1,"tproxies":{"p":{"port":1,"mark":9,"no-udp":true,"no-ipv6":true}}}"#,
            "t",
        )
        .unwrap();
        let t = table(&c, &BTreeSet::new(), &[], &BTreeMap::new(), &[], true, 0);
        let mark = t.chains.iter().find(|ch| ch.name == "p-mark").unwrap();
        assert_eq!(mark.rules[..2], bypassed());
        assert_eq!(
            mark.rules[2..],
            vec![
                vec![
                    Stmt::L4Proto(Proto::Udp),
                    Stmt::SetMark(0),
                    Stmt::Verdict(Verdict::Return)
                ],
                vec![
                    Stmt::NfProto(Family::V6),
                    Stmt::SetMark(0),
                    Stmt::Verdict(Verdict::Return)
                ],
                vec![
                    Stmt::SetMark(9),
                    Stmt::SaveCtMark,
                    Stmt::NamedCounter("p".into())
                ],
            ]
        );
        let pre = t.chains.iter().find(|ch| ch.name == PREROUTING).unwrap();
        assert_eq!(
            pre.rules[0],
            vec![Stmt::CtReply, Stmt::Verdict(Verdict::Return)],
            "answers are never handed to a listener"
        );
        assert_eq!(
            pre.rules[1..],
            vec![vec![
                Stmt::Mark(9),
                Stmt::NfProto(Family::V4),
                Stmt::L4Proto(Proto::Tcp),
                Stmt::Tproxy(IpAddr::V4(Ipv4Addr::LOCALHOST), 1),
                Stmt::Counter,
                Stmt::Verdict(Verdict::Accept),
            ]],
            "one TCP rule to loopback: no UDP (no-udp), no IPv6 (no-ipv6)"
        );
    }

    #[test]
    fn only_a_classified_interfaces_packets_meet_the_forwarded_chain() {
        let c = cfg();
        let jump = vec![
            Stmt::IifNotLoopback,
            Stmt::Unmarked,
            Stmt::IifIn(IFACES.into()),
            Stmt::Verdict(Verdict::Jump(FORWARDED.into())),
        ];
        let pre = |ifaces: &BTreeMap<u32, u32>| {
            let t = table(&c, &BTreeSet::new(), &[], ifaces, &[], true, 0);
            let chain = t.chains.into_iter().find(|ch| ch.name == PREROUTING);
            chain.expect("a prerouting chain")
        };
        let none = pre(&BTreeMap::new());
        assert!(
            !none.rules.contains(&jump),
            "no interface classified: a server's inbound packets pass no lookup"
        );
        let one = pre(&BTreeMap::from([(5, 3000)]));
        assert_eq!(one.rules[1], jump, "right after answers leave");
        assert_eq!(
            one.rules[2..],
            none.rules[1..],
            "the tproxy rules are the same either way"
        );
        assert_eq!(one, prerouting_chain(&c, true), "what an update installs");
        assert_eq!(none, prerouting_chain(&c, false));
    }

    /// The chain a class's packets go to, from the classes map.
    fn class_target(t: &TableSpec, class: u32) -> &ChainSpec {
        let Some(SetKind::Classes(classes)) =
            t.sets.iter().find(|s| s.name == CLASSES).map(|s| &s.kind)
        else {
            panic!("no classes map");
        };
        let Some((_, Verdict::Goto(name))) = classes.iter().find(|(c, _)| *c == class) else {
            panic!("class {class:#x} goes nowhere");
        };
        t.chains.iter().find(|ch| *ch.name == **name).unwrap()
    }

    #[test]
    fn unclassified_and_unmatched_packets_keep_their_connections_target() {
        let t = bare_table(&cfg());
        let unmatched = class_target(&t, UNCLASSIFIED_CLASS);
        assert_eq!(&*unmatched.name, UNMATCHED);
        assert_eq!(
            unmatched.rules,
            vec![vec![Stmt::CtMark(3000), Stmt::SetMark(3000)]],
            "packets without a full socket, or of a cgroup no longer classified, keep their connection's target"
        );
        assert_eq!(element_class(&cfg(), None), 0, "leaves the mark unset");
    }

    #[test]
    fn each_level_map_holds_its_own_levels_elements() {
        let c = cfg();
        let elements: Vec<Element> = vec![
            ((2, 11), Some(Action::Tproxy(0))),
            ((2, 12), None),
            ((4, 13), Some(Action::Direct)),
        ];
        // Level 3 has a map (its elements still to come) but none yet.
        let levels = BTreeSet::from([2, 3, 4]);
        let t = table(&c, &levels, &elements, &BTreeMap::new(), &[], true, 0);
        let held = |level: u32| -> Vec<(u64, u32)> {
            let kind = t.sets.iter().find(|s| s.name == level_map(level));
            match kind.map(|s| &s.kind) {
                Some(SetKind::Level(l, range)) if *l == level => {
                    t.level_elements[range.clone()].to_vec()
                }
                other => panic!("level {level}: {other:?}"),
            }
        };
        assert_eq!(held(2), [(11, 3000), (12, 0)]);
        assert_eq!(held(3), []);
        assert_eq!(held(4), [(13, DIRECT_CLASS)]);
    }

    fn bare_table(c: &Config) -> TableSpec {
        table(c, &BTreeSet::new(), &[], &BTreeMap::new(), &[], true, 0)
    }

    #[test]
    fn bypass_is_checked_only_where_a_class_would_mark_or_drop() {
        let c = cfg();
        let t = bare_table(&c);
        let looks_up_bypass = |ch: &ChainSpec| {
            ch.rules
                .iter()
                .flatten()
                .any(|s| matches!(s, Stmt::DaddrIn(..)))
        };
        for name in ["output", FORWARDED, CLASSIFY, DIRECT_CHAIN] {
            let ch = t.chains.iter().find(|ch| ch.name == name).unwrap();
            assert!(!looks_up_bypass(ch), "{name} looks up the bypass sets");
        }
        // Before anything marks or drops: a drop cgroup reaches bypass
        // destinations, a proxied one reaches them directly.
        let dropped = class_target(&t, DROP_CLASS);
        assert_eq!(
            dropped.rules[0],
            [
                Stmt::NfProto(Family::V4),
                Stmt::DaddrIn(Family::V4, "bypass4".into()),
                Stmt::SetMark(0),
                Stmt::Verdict(Verdict::Return),
            ],
            "bypassed packets leave without the class mark"
        );
        assert_eq!(dropped.rules[..2], bypassed());
        assert_eq!(
            dropped.rules[2..],
            [
                vec![Stmt::CtMarkTagged, Stmt::SetCtMark(0)],
                vec![Stmt::Verdict(Verdict::Drop)]
            ],
            "a dropped connection loses its tag: its next packet is dropped too"
        );
        assert_eq!(class_target(&t, 3000).rules[..2], bypassed());
        assert_eq!(
            class_target(&t, DIRECT_CLASS).rules,
            [vec![Stmt::SetMark(0)]]
        );
    }

    #[test]
    fn stub_queries_skip_the_bypass_check_where_a_target_hijacks_them() {
        let c = Config::parse(
            r#"{"version":1,"bypass":["127.0.0.0/8"],"tproxies":{
               "p":{"port":1,"mark":9,"dns-hijack":{"ip":"127.0.0.1","port":1053,"stub":true}},
               "q":{"port":2,"mark":10}}}"#,
            "t",
        )
        .unwrap();
        let t = bare_table(&c);
        let stub = |p: Proto, rest: &[Stmt]| {
            let mut r = stub_query(p);
            r.extend_from_slice(rest);
            r
        };
        let ret = Stmt::Verdict(Verdict::Return);
        // p hijacks UDP queries to the stub (marked for the nat chain), not TCP.
        assert_eq!(
            class_target(&t, 9).rules[..3],
            [
                stub(Proto::Udp, &[Stmt::SetMark(9), ret.clone()]),
                stub(Proto::Tcp, &[Stmt::SetMark(0), ret.clone()]),
                bypassed()[0].clone(),
            ]
        );
        // q leaves them to the stub, unmarked.
        assert_eq!(
            class_target(&t, 10).rules[..3],
            [
                stub(Proto::Udp, &[Stmt::SetMark(0), ret.clone()]),
                stub(Proto::Tcp, &[Stmt::SetMark(0), ret]),
                bypassed()[0].clone(),
            ]
        );
        // A drop cgroup's queries to the stub are dropped, not bypassed (and
        // lose the tag first, as all it drops).
        let drop = Stmt::Verdict(Verdict::Drop);
        assert_eq!(
            class_target(&t, DROP_CLASS).rules[..4],
            [
                vec![Stmt::CtMarkTagged, Stmt::SetCtMark(0)],
                stub(Proto::Udp, std::slice::from_ref(&drop)),
                stub(Proto::Tcp, std::slice::from_ref(&drop)),
                bypassed()[0].clone(),
            ]
        );
        // Without a stub hijack, no chain looks for the stub.
        let plain = bare_table(&cfg());
        assert!(
            !plain
                .chains
                .iter()
                .flat_map(|ch| ch.rules.iter().flatten())
                .any(|s| *s == Stmt::Daddr(IpAddr::V4(RESOLVED_STUB)))
        );
    }
}
