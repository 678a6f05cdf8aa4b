//! The datapath's cost: CPU time per connection and per byte with the daemon's
//! table, against a table that only turns conntrack on (what every stateful
//! firewall costs anyway), and what the client's depth in the cgroup tree
//! costs per level. That last one is measured per packet, with one-byte UDP
//! datagrams: a connection's ~35 µs hide a lookup of tens of nanoseconds in
//! their noise, a datagram's few microseconds do not. The table classifies a
//! connection's packets until one leaves unmarked, and its later packets
//! skip the classification (see `table::output_chain`): datagrams of one flow
//! measure that fast path, and untracked datagrams (from
//! [`UNTRACKED_SPORT`], which both namespaces exempt from conntrack) the
//! classification a flow's first packet goes through, conntrack's own work
//! and the tag's write left out on both sides.
//!
//! Why CPU time, not rates: on this shared two-core machine a connect loop's
//! wall clock measures the other developer's load and any SYN lost to an
//! overflowing accept queue (a 1 s retransmit). A table cannot make a
//! connection cheaper, but a stalled baseline made it look 3 to 20 times
//! faster. CPU time spent on our own packets barely moves when another
//! process takes the CPU away: we are then simply not running.
//!
//! Which CPU time: one client process (see [`paired_client`]) makes every
//! packet of the measurement and receives it: it holds both ends of every
//! connection and datagram flow, the client's in the table's namespace or
//! the baseline's, the server's in the peer namespace, and reads its own
//! CPU clock (`CLOCK_PROCESS_CPUTIME_ID`) around each unit. The output hook
//! runs either in the sending syscall (SYN, data, the closing RST) or in the
//! NET_RX softirq (the handshake's ACK; data sent when an ACK opens the
//! window). veth's transmit queues the packet on the local CPU and raises
//! NET_RX there, which runs as soon as the sender re-enables bottom halves,
//! on its stack: the receiving stack of the other namespace and the replies
//! it sends run on the sender's time too. Without CONFIG_IRQ_TIME_ACCOUNTING
//! (this kernel's setting; [`irq_time_accounting`] reads it and the bench
//! prints it) the scheduler charges softirq time to the task it interrupted,
//! so the process's CPU time holds the whole path. With it, softirq time is
//! taken out of every task's runtime and these figures would miss the
//! rules' cost in softirq. The process is pinned to one CPU (the last); what
//! the kernel defers to ksoftirqd is not in its time, and all ksoftirqd
//! threads' time in a round is shown as a share of ours (under 1 %).
//!
//! Both sides exist at once, in two client namespaces made alike (see
//! [`Sides`]); a control run with the conntrack-only table on both shows
//! that they are alike, and every ratio is refused when it is not. The
//! client measures a unit (a batch of connections or datagrams, a bulk
//! chunk) on one side and then at once on the other, pairs alternating
//! which goes first; a ratio is the median of the pairs' own ratios, so
//! load that comes and goes falls on both alike and slow drift cancels
//! (see [`Ratio`]). A ratio whose halves disagree, or that says the table
//! made the datapath cheaper by more than measurement error can, is
//! printed as `unstable` or `implausible` with its halves, and is null in
//! bench-json.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sched::{CloneFlags, setns};
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrIn, bind, setsockopt, socket, sockopt,
};
use serde_json::{Map, Value, json};

use super::bpfstats::{self, PerOp};
use super::netns::Netns;
use super::{
    DEEPEST, Lab, UNTRACKED_SPORT, cpu_ns, median, reset_on_close, round1, round3, sh, step,
};

/// Depths (absolute cgroup levels) the client runs at. The classified
/// cgroups sit at levels 2 to 8, so the table has seven level maps, and they
/// hold the client's (unclassified) cgroups too: classifying a packet at
/// depth 1, every lookup ends before its map (the level is deeper than the
/// client's cgroup), at depth d the lookups of levels 8 down to d + 1 end so
/// and level d's finds the client's cgroup. The eBPF programs look up each ancestor up to the root
/// (the client's cgroups are not in their map).
pub const DEPTHS: [u32; 3] = [1, 4, 8];

/// Settings of one run: full, or short for iterating (`CGTPROXY_BENCH_QUICK=1`).
pub struct Plan {
    /// Rounds, each measuring both sides.
    pub rounds: usize,
    /// Pairs of connection batches per round and depth, one batch on each
    /// side (even: the pairs alternate which side goes first).
    pub connect_pairs: usize,
    /// Connections per batch.
    pub connect_batch: usize,
    /// Pairs of datagram batches per round, depth and kind (one flow's,
    /// untracked), one batch on each side (even, as above).
    pub datagram_pairs: usize,
    /// Datagrams per batch.
    pub datagram_batch: usize,
    /// Pairs of bulk chunks per round, one chunk on each side (even: the
    /// pairs alternate which side goes first, see [`bulk`]).
    pub bulk_pairs: usize,
}

impl Plan {
    pub fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                rounds: 6,
                connect_pairs: 10,
                connect_batch: 50,
                datagram_pairs: 10,
                datagram_batch: 100,
                bulk_pairs: 20,
            }
        } else {
            Plan {
                rounds: 16,
                connect_pairs: 40,
                connect_batch: 50,
                datagram_pairs: 20,
                datagram_batch: 100,
                bulk_pairs: 50,
            }
        }
    }

    /// A round a quarter as long, to warm up with.
    fn warm_up(&self) -> Plan {
        Plan {
            rounds: 1,
            connect_pairs: self.connect_pairs / 4,
            connect_batch: self.connect_batch,
            datagram_pairs: self.datagram_pairs / 4,
            datagram_batch: self.datagram_batch,
            bulk_pairs: self.bulk_pairs / 4,
        }
    }
}

/// The cost of one side from its units: their lower quartile. Contention
/// only adds CPU time (caches and the core shared with other processes, on
/// this VM by up to a third), so the low end of many short runs is the cost
/// without it; a quartile rather than the minimum is not one lucky run.
fn low(units: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = units.collect();
    v.sort_by(f64::total_cmp);
    percentile(&v, 25)
}

/// The median over the pairs `keep` selects of `op(table, baseline)`, each
/// pair's figures taken together.
fn paired_median(
    table: &[f64],
    base: &[f64],
    keep: &dyn Fn(usize) -> bool,
    op: fn(f64, f64) -> f64,
) -> f64 {
    let mut paired: Vec<f64> = table
        .iter()
        .zip(base)
        .enumerate()
        .filter(|(i, _)| keep(*i))
        .map(|(_, (t, b))| op(*t, *b))
        .collect();
    median(&mut paired)
}

/// A ratio of the baseline's cost over the table's (1.0: free; less:
/// dearer): the mean of two halves, the median of the pairs' own ratios
/// (see [`paired_client`]) where the table went first and where the
/// baseline did; or why it is no figure. A pair measures both sides
/// microseconds to milliseconds apart, so its ratio cancels what changes
/// more slowly (the other developer's load, the host's); the lower
/// quartiles of each side's runs on their own did not (the cheapest runs
/// of the two sides were often not the same ones: in three controls,
/// halves 2–6 % apart where paired ratios' were 0.2–2.6 %). How far the
/// halves are apart is the measurement's own error bar.
pub enum Ratio {
    Value {
        whole: f64,
        halves: [f64; 2],
    },
    /// The halves disagree: the noise is larger than what is measured, or the
    /// order of the runs matters.
    Unstable {
        whole: f64,
        halves: [f64; 2],
    },
    /// The table made the datapath cheaper by more than [`Ratio::PLAUSIBLE`]
    /// allows: a broken measurement, not a gain.
    Implausible {
        whole: f64,
        halves: [f64; 2],
    },
}

impl Ratio {
    /// Above this a ratio is a broken measurement.
    const PLAUSIBLE: f64 = 1.10;
    /// Larger over smaller half beyond which the halves disagree.
    const SPREAD: f64 = 1.05;
    /// How far from 1 the control's ratio may be.
    const CONTROL: f64 = 0.03;

    /// From each pair's cost of the table and of the baseline.
    fn of(table: &[f64], base: &[f64]) -> Ratio {
        let ratio = |keep: &dyn Fn(usize) -> bool| paired_median(table, base, keep, |t, b| b / t);
        let halves = [ratio(&|i| i % 2 == 0), ratio(&|i| i % 2 == 1)];
        let whole = (halves[0] + halves[1]) / 2.0;
        let (lo, hi) = (halves[0].min(halves[1]), halves[0].max(halves[1]));
        if !(lo.is_finite() && lo > 0.0) || hi > lo * Self::SPREAD {
            Ratio::Unstable { whole, halves }
        } else if whole > Self::PLAUSIBLE {
            Ratio::Implausible { whole, halves }
        } else {
            Ratio::Value { whole, halves }
        }
    }

    pub fn value(&self) -> Option<f64> {
        match self {
            Ratio::Value { whole, .. } => Some(*whole),
            Ratio::Unstable { .. } | Ratio::Implausible { .. } => None,
        }
    }

    /// The same ratio, refused as unstable unless the control's (the same
    /// measurement with the same table on both sides) is 1 within
    /// [`Ratio::CONTROL`]: a control further off shows a difference between
    /// the sides or noise that is not the table's. The control's halves may
    /// disagree as much as its own rule allows; its mean must still be near 1.
    fn checked(self, control: &Ratio) -> Ratio {
        let ok = match control {
            Ratio::Value { whole, .. } | Ratio::Unstable { whole, .. } => {
                (whole - 1.0).abs() <= Self::CONTROL
            }
            Ratio::Implausible { .. } => false,
        };
        match self {
            Ratio::Value { whole, halves } if !ok => Ratio::Unstable { whole, halves },
            r => r,
        }
    }
}

impl std::fmt::Display for Ratio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (word, whole, [a, b]) = match self {
            Ratio::Value { whole, halves } => ("", whole, halves),
            Ratio::Unstable { whole, halves } => ("unstable ", whole, halves),
            Ratio::Implausible { whole, halves } => ("implausible ", whole, halves),
        };
        write!(f, "{word}{whole:.3} ({a:.3}, {b:.3})")
    }
}

/// The side a client run measures.
#[derive(Clone, Copy)]
enum Side {
    /// [`Sides::table`]'s namespace: the daemon's table and ip rules.
    Table,
    /// [`Sides::baseline`]'s namespace: the conntrack-only table.
    Baseline,
}

/// Two client namespaces made alike, each with a veth pair of its own to the
/// same peer: the table's, where the daemon runs for the measurement, and the
/// baseline's, with a table that only turns conntrack on (as any stateful
/// firewall does), which isolates the cost of our rules and ip rules from
/// conntrack's (our output chain's `ct direction` needs it; a bare namespace
/// lacks it). Neither is the bench's own namespace: the forwarder comparison
/// and the update runs leave state there (sockets, conntrack entries) that
/// made its connections dearer than a fresh namespace's with the same table.
/// With both sides present at once, every measurement runs on both back to
/// back, milliseconds apart, so the other developer's load falls on both alike.
pub struct Sides {
    table: Netns,
    baseline: Netns,
}

/// Commands (for `sh -c '…'`) making the conntrack-only table.
const CONNTRACK_ONLY: &str = "nft add table inet ctonly &&
    nft add chain inet ctonly out \"{ type filter hook output priority 0; }\" &&
    nft add rule inet ctonly out ct direction reply return";

/// The table side's and the baseline's link to the peer: (client, peer).
const TABLE_LINK: (&str, &str) = ("10.99.2.1", "10.99.2.2");
const BASELINE_LINK: (&str, &str) = ("10.99.1.1", "10.99.1.2");

impl Sides {
    pub fn new(lab: &Lab) -> Sides {
        let sides = Sides {
            table: client_netns(lab, "vt", TABLE_LINK),
            baseline: client_netns(lab, "vb", BASELINE_LINK),
        };
        sh(&format!(
            "nsenter -t {} -n sh -c '{CONNTRACK_ONLY}'",
            sides.baseline.pid()
        ));
        for side in [Side::Table, Side::Baseline] {
            sh(&format!(
                "nsenter -t {} -n sh -c 'nft add table inet untracked &&
                   nft add chain inet untracked out \"{{ type filter hook output priority raw; }}\" &&
                   nft add rule inet untracked out udp sport {UNTRACKED_SPORT} notrack'",
                sides.netns(side)
            ));
        }
        sides
    }

    fn netns(&self, side: Side) -> u32 {
        match side {
            Side::Table => self.table.pid(),
            Side::Baseline => self.baseline.pid(),
        }
    }

    /// Where a client of `side` runs when `kind` is measured: its
    /// namespace's holder and the peer's address on that namespace's link.
    fn link(&self, kind: Kind, side: Side) -> (u32, &'static str) {
        // The eBPF sides differ in their cgroups only (the programs attach to
        // cgroups, not namespaces): both run in the baseline's namespace, where no
        // ip rule has ever been. The table's keeps what the daemon's rules left:
        // the first ip rule of a namespace un-merges its local and main routing
        // tables for good, and every route lookup there then walks the rules.
        let ns_side = match kind {
            Kind::Ebpf => Side::Baseline,
            Kind::Nft | Kind::Floor | Kind::Rules => side,
        };
        let peer = match ns_side {
            Side::Table => TABLE_LINK.1,
            Side::Baseline => BASELINE_LINK.1,
        };
        (self.netns(ns_side), peer)
    }
}

/// A client namespace linked to the peer by veth pair `NAME0`/`NAME1` with
/// addresses `link`.
fn client_netns(lab: &Lab, name: &str, (me, peer): (&str, &str)) -> Netns {
    let ns = Netns::new();
    let (pid, ppid) = (ns.pid(), lab.peer_pid());
    sh(&format!(
        "ip link add {name}0 netns {pid} type veth peer name {name}1 netns {ppid} &&
         nsenter -t {pid} -n sh -c 'ip link set lo up &&
           ip addr add {me}/24 dev {name}0 && ip link set {name}0 up' &&
         nsenter -t {ppid} -n sh -c 'ip addr add {peer}/24 dev {name}1 &&
           ip link set {name}1 up'"
    ));
    ns
}

/// What one side measured in one round.
#[derive(Default)]
struct Sample {
    /// CPU time per connection (µs), client at each of [`DEPTHS`], one
    /// figure per batch (see [`connects`]).
    connect_us: [Vec<f64>; 3],
    /// CPU time per datagram of one flow (ns), client at each of [`DEPTHS`],
    /// one figure per batch (see [`datagrams`]).
    datagram_ns: [Vec<f64>; 3],
    /// CPU time per untracked datagram (ns: each classified as a flow's
    /// first packet), client at each of [`DEPTHS`], one figure per batch.
    first_ns: [Vec<f64>; 3],
    /// CPU time per datagram of one flow arriving unasked (ns): sent from
    /// the peer to a socket in the side's namespace, as a client's to a
    /// server on this host, one figure per batch.
    inbound_ns: Vec<f64>,
    /// CPU time per MiB uploaded (µs), client at the deepest depth, one
    /// figure per chunk (see [`bulk`]).
    bulk_us_per_mib: Vec<f64>,
    /// Each connect's latency (µs), client at the deepest depth.
    latency_us: Vec<f64>,
}

/// What else ran during one round.
struct Noise {
    /// CPU time of everything else on the machine, as a share of all CPUs'
    /// time: the other developer's load.
    foreign: f64,
    /// ksoftirqd's CPU time, as a share of ours.
    ksoftirqd: f64,
}

/// Which datapath a comparison measures, which names its figures.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The daemon's nft table in the table's namespace, against the
    /// conntrack-only table.
    Nft,
    /// The eBPF datapath's programs over the table side's cgroups, against
    /// cgroups outside them; no table on either side.
    Ebpf,
    /// The mechanism's floor ([`floor`]) in the table's namespace, against
    /// the conntrack-only table: a bound, not a target.
    Floor,
    /// The floor's ip rules alone ([`policy_routing`]): a part of the bound.
    Rules,
}

impl Kind {
    /// The two sides' names in the result table.
    fn names(self) -> (&'static str, &'static str) {
        match self {
            Kind::Nft => ("table", "ct-only"),
            Kind::Ebpf => ("ebpf", "none"),
            Kind::Floor => ("floor", "ct-only"),
            Kind::Rules => ("rules", "ct-only"),
        }
    }

    /// The target for both ratios.
    fn target(self) -> &'static str {
        match self {
            Kind::Nft => ">= 0.95",
            Kind::Ebpf => ">= 0.98",
            Kind::Floor | Kind::Rules => "(bound)",
        }
    }

    /// The cgroup (relative to the bench's subtree) of a client at `depth`
    /// on `side`. The eBPF datapath's programs sit on the subtree itself, so
    /// its baseline runs in a sibling subtree at the same absolute levels.
    fn cgroup(self, lab: &Lab, side: Side, depth: u32) -> String {
        match (self, side) {
            (Kind::Ebpf, Side::Baseline) => format!("../{}/{}", lab.apart(), Lab::spine(depth)),
            _ => Lab::spine(depth),
        }
    }
}

/// Bytes each side sends in one bulk measurement, a chunk.
pub const BULK_CHUNK: usize = 256 << 10;
/// Chunks each connection sends before any is measured: past slow start.
const BULK_WARM_UP: usize = 8;
/// Connections each side makes before any is measured.
const CONNECT_WARM_UP: usize = 200;

/// Runs a paired client (`client MODE …`, see [`paired_client`]) with
/// `args` after the peer namespace, then both sides' namespace, cgroup at
/// `depth` and peer address; returns its JSON.
fn paired(lab: &Lab, sides: &Sides, kind: Kind, depth: u32, mode: &str, args: &[String]) -> Value {
    let mut all = vec![mode.to_owned(), format!("/proc/{}/ns/net", lab.peer_pid())];
    all.extend(args.iter().cloned());
    for side in [Side::Table, Side::Baseline] {
        let (netns, peer) = sides.link(kind, side);
        all.push(format!("/proc/{netns}/ns/net"));
        all.push(lab.cg(&kind.cgroup(lab, side, depth)).display().to_string());
        all.push(peer.to_owned());
    }
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let out = lab.client_in(&kind.cgroup(lab, Side::Table, depth), &all);
    serde_json::from_str(&out).expect("client output is JSON")
}

/// The numbers under `key` of a paired client's output.
fn numbers(v: &Value, key: &str) -> Vec<f64> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key} in the client's output"))
        .iter()
        .filter_map(Value::as_f64)
        .collect()
}

/// The bulk cost of both sides at the deepest depth, in `pairs` pairs of
/// chunks: each side's CPU µs per MiB, one figure per chunk. One client
/// process holds a connection of each side and both ends of each, and
/// sends a chunk on one side, then on the other, alternating which goes
/// first; the pairs' ratios give the ratio (see [`Comparison::of`]).
///
/// Why this shape: a sender and a receiver process on one CPU wake each
/// other in patterns that vary from run to run: paired runs of identical
/// sides were 5–9 % apart (interquartile range). One thread that writes a
/// chunk and reads it back (both sockets non-blocking, each packet's path
/// runs in its own syscalls) does the same work in the same order every
/// time: ±0.5 %. Its chunks are measured a few hundred microseconds apart,
/// so load that comes and goes falls on both sides alike. The connections
/// use cubic, not the host's default congestion control: with BBR, which
/// paces every connection by timers at a rate it estimates (no fq qdisc
/// here), one connection in five cost ~3 times as much per byte as its
/// twin for its whole life, on either side.
fn bulk(lab: &Lab, sides: &Sides, kind: Kind, pairs: usize) -> [Vec<f64>; 2] {
    let v = paired(lab, sides, kind, DEEPEST, "bulk-pair", &[pairs.to_string()]);
    let per_mib = |key| -> Vec<f64> {
        numbers(&v, key)
            .into_iter()
            .map(|ns| ns / 1e3 * f64::from(1 << 20) / BULK_CHUNK as f64)
            .collect()
    };
    [per_mib("table_ns"), per_mib("baseline_ns")]
}

/// Both sides' connections at `depth`: `pairs` pairs of batches of
/// `batch` connections, each side's CPU µs per connection (one figure per
/// batch) and each connect's latency (µs). Made as [`bulk`] is, by one
/// process holding both ends: it connects, accepts and resets. A connect
/// loop in one process with the accept loop in another left the halves of
/// identical sides 1–3 % apart over 16 rounds of 2,000 connections; the
/// paired batches, 0.1–1.5 % (by hand, 200 pairs of 50).
fn connects(
    lab: &Lab,
    sides: &Sides,
    kind: Kind,
    depth: u32,
    (pairs, batch): (usize, usize),
) -> [(Vec<f64>, Vec<f64>); 2] {
    let args = [pairs.to_string(), batch.to_string()];
    let v = paired(lab, sides, kind, depth, "connect-pair", &args);
    let us = |key| numbers(&v, key).into_iter().map(|ns| ns / 1e3).collect();
    [
        (us("table_ns"), us("table_latency_ns")),
        (us("baseline_ns"), us("baseline_latency_ns")),
    ]
}

/// Both sides' datagrams at `depth`: `pairs` pairs of batches of `batch`
/// one-byte datagrams, each side's CPU ns per datagram (one figure per
/// batch). One flow's, or `untracked`: from [`UNTRACKED_SPORT`], which both
/// namespaces exempt from conntrack, so that each is classified as a
/// flow's first packet is. Made as [`connects`] are: the process sends
/// each and receives it at the peer's end.
/// The datagrams of one flow measured: what a side's socket sends to the
/// peer (each a later packet of its flow), the same untracked (each
/// classified as a first packet is), or what the peer sends to that socket.
#[derive(Clone, Copy)]
enum Flow {
    Out,
    Untracked,
    In,
}

impl Flow {
    /// The paired client's name for it.
    fn arg(self) -> &'static str {
        match self {
            Flow::Out => "flow",
            Flow::Untracked => "untracked",
            Flow::In => "inbound",
        }
    }
}

fn datagrams(
    lab: &Lab,
    sides: &Sides,
    kind: Kind,
    depth: u32,
    flow: Flow,
    (pairs, batch): (usize, usize),
) -> [Vec<f64>; 2] {
    let args = [pairs.to_string(), batch.to_string(), flow.arg().to_owned()];
    let v = paired(lab, sides, kind, depth, "datagram-pair", &args);
    [numbers(&v, "table_ns"), numbers(&v, "baseline_ns")]
}

/// One side of a paired client: the namespace and cgroup its client
/// sockets are made in, and its listener and datagram sink in the peer
/// namespace.
struct PairSide {
    netns: File,
    cgroup: PathBuf,
    listener: TcpListener,
    sink: UdpSocket,
}

impl PairSide {
    /// From `NETNS CGROUP PEER`: a listener on an unused port of the peer's
    /// address `PEER`, made in the peer's namespace `peer_ns` and in the
    /// side's cgroup (the connections it accepts are in that cgroup too: the
    /// eBPF programs see both ends of the table side's and neither of the
    /// baseline's).
    fn new(peer_ns: &File, args: &[String]) -> PairSide {
        let open = |path: &str| File::open(path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
        let peer: Ipv4Addr = args[2].parse().expect("a peer address");
        let cgroup = PathBuf::from(&args[1]);
        join(&cgroup);
        setns(peer_ns, CloneFlags::CLONE_NEWNET).expect("entering the peer namespace");
        let listener = TcpListener::bind((peer, 0)).expect("listening in the peer namespace");
        let sink = UdpSocket::bind((peer, 0)).expect("a datagram sink in the peer namespace");
        // A datagram lost would stop the run, not hang it.
        sink.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("the sink's timeout");
        PairSide {
            netns: open(&args[0]),
            cgroup,
            listener,
            sink,
        }
    }

    /// Makes the sockets made next this side's (a socket belongs to the
    /// namespace and the cgroup its maker is in when it is made).
    fn enter(&self) {
        setns(&self.netns, CloneFlags::CLONE_NEWNET).expect("entering the side's namespace");
        join(&self.cgroup);
    }

    /// A datagram socket sending to the sink from `port` (0: any). The
    /// eBPF sides share a namespace, so both bind the untracked port.
    fn sender(&self, port: u16) -> UdpSocket {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("a datagram socket");
        setsockopt(&fd, sockopt::ReuseAddr, &true).expect("SO_REUSEADDR");
        bind(fd.as_raw_fd(), &SockaddrIn::new(0, 0, 0, 0, port)).expect("binding it");
        let s = UdpSocket::from(fd);
        let to = self.sink.local_addr().expect("the sink's address");
        s.connect(to).expect("connecting the datagram socket");
        s
    }

    /// A connection to the listener: (client's end, server's end).
    fn connect(&self) -> (TcpStream, TcpStream) {
        let to = self.listener.local_addr().expect("the listener's address");
        let client = TcpStream::connect(to).expect("connecting to our listener");
        let (server, _) = self.listener.accept().expect("accepting our connection");
        (client, server)
    }
}

/// Moves this process into `cgroup`.
fn join(cgroup: &Path) {
    fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
        .unwrap_or_else(|e| panic!("joining {}: {e}", cgroup.display()));
}

/// The paired clients, run by [`paired`], print JSON with each side's CPU
/// ns per unit (`table_ns`, `baseline_ns`), units measured in pairs, one
/// on each side, the first pair table first, then alternating:
///
/// `client bulk-pair PEER_NETNS PAIRS SIDE SIDE`: units are [`BULK_CHUNK`]
/// bytes sent on a connection and read back at its other end;
///
/// `client connect-pair PEER_NETNS PAIRS BATCH SIDE SIDE`: units are a
/// connection made, accepted and reset, measured in batches of `BATCH`
/// (CPU ns per connection of the batch); also each connect's latency;
///
/// `client datagram-pair PEER_NETNS PAIRS BATCH flow|untracked|inbound SIDE SIDE`:
/// units are a one-byte datagram sent and received at the peer's sink, in
/// batches as connections are, from one socket per side (`untracked`: from
/// [`UNTRACKED_SPORT`]); `inbound`: sent from the peer to that socket, which
/// never sends, so the flow starts at the peer, as a client's to a server
/// on this host (a connected socket: found without a route lookup, as a
/// TCP server's connections are).
///
/// A SIDE is `NETNS CGROUP PEER` (see [`PairSide::new`]), the table's first.
pub fn paired_client(mode: &str, args: &[String]) {
    let peer_ns = File::open(&args[0]).expect("opening the peer namespace");
    let pairs: usize = args[1].parse().expect("PAIRS");
    assert!(args.len() >= 8, "two sides of NETNS CGROUP PEER");
    let (options, rest) = args[2..].split_at(args.len() - 8);
    let sides = [
        PairSide::new(&peer_ns, &rest[..3]),
        PairSide::new(&peer_ns, &rest[3..]),
    ];
    let batch = || -> usize { options[0].parse().expect("BATCH") };
    let mut latency = [Vec::new(), Vec::new()];
    let cpu = match mode {
        "connect-pair" => {
            let batch = batch();
            let mut batch_of = |k: usize, n: usize, keep: bool| {
                sides[k].enter();
                let t0 = cpu_ns();
                for _ in 0..n {
                    let t = Instant::now();
                    let (client, server) = sides[k].connect();
                    if keep {
                        latency[k].push(t.elapsed().as_nanos() as u64);
                    }
                    reset_on_close(&client).expect("SO_LINGER");
                    // The client's end first, as a client's reset does.
                    drop(client);
                    drop(server);
                }
                (cpu_ns() - t0) / n as u64
            };
            for k in 0..2 {
                batch_of(k, CONNECT_WARM_UP, false);
            }
            in_pairs(pairs, |k| batch_of(k, batch, true))
        }
        "datagram-pair" => {
            let batch = batch();
            let flow = options[1].as_str();
            let port = match flow {
                "untracked" => UNTRACKED_SPORT,
                _ => 0,
            };
            let senders: Vec<UdpSocket> = sides
                .iter()
                .map(|side| {
                    side.enter();
                    side.sender(port)
                })
                .collect();
            // Inbound: a socket at the peer and one on the side, connected
            // to each other (an unconnected send would run the eBPF side's
            // sendmsg program for every datagram, which a remote client's
            // never does); the side's never sends.
            let inbound: Vec<(UdpSocket, UdpSocket)> = match flow {
                "inbound" => sides
                    .iter()
                    .zip(&senders)
                    .map(|(side, out)| {
                        let ip = |s: &UdpSocket| s.local_addr().expect("an address").ip();
                        side.enter();
                        let ours = UdpSocket::bind((ip(out), 0)).expect("a socket on the side");
                        ours.set_read_timeout(Some(Duration::from_secs(5)))
                            .expect("its timeout");
                        setns(&peer_ns, CloneFlags::CLONE_NEWNET).expect("entering the peer");
                        let peer = UdpSocket::bind((ip(&side.sink), 0)).expect("one at the peer");
                        let addr = |s: &UdpSocket| s.local_addr().expect("an address");
                        peer.connect(addr(&ours)).expect("connecting the peer's");
                        ours.connect(addr(&peer)).expect("connecting the side's");
                        (peer, ours)
                    })
                    .collect(),
                _ => Vec::new(),
            };
            let mut got = [0u8; 16];
            let mut send = |k: usize| {
                let t0 = cpu_ns();
                for _ in 0..batch {
                    if let Some((peer, ours)) = inbound.get(k) {
                        peer.send(&[0]).expect("sending a datagram in");
                        ours.recv(&mut got).expect("receiving it");
                    } else {
                        senders[k].send(&[0]).expect("sending a datagram");
                        sides[k].sink.recv(&mut got).expect("receiving a datagram");
                    }
                }
                (cpu_ns() - t0) / batch as u64
            };
            for k in 0..2 {
                send(k);
            }
            in_pairs(pairs, send)
        }
        _ => {
            let mut conns: Vec<BulkConnection> = sides
                .iter()
                .map(|side| {
                    side.enter();
                    BulkConnection::new(side.connect())
                })
                .collect();
            let data = vec![0x5au8; BULK_CHUNK];
            let mut sink = vec![0u8; BULK_CHUNK];
            for _ in 0..BULK_WARM_UP {
                for c in &mut conns {
                    c.push(&data, &mut sink);
                }
            }
            in_pairs(pairs, |k| {
                let t0 = cpu_ns();
                conns[k].push(&data, &mut sink);
                cpu_ns() - t0
            })
        }
    };
    let [table, baseline] = cpu;
    let [table_latency, baseline_latency] = latency;
    println!(
        "{}",
        json!({
            "table_ns": table,
            "baseline_ns": baseline,
            "table_latency_ns": table_latency,
            "baseline_latency_ns": baseline_latency,
        })
    );
}

/// Each side's results of `unit` (given the side: 0 the table's, 1 the
/// baseline's) over `pairs` pairs, the table's first in even pairs.
fn in_pairs(pairs: usize, mut unit: impl FnMut(usize) -> u64) -> [Vec<u64>; 2] {
    let mut out = [Vec::with_capacity(pairs), Vec::with_capacity(pairs)];
    for p in 0..pairs {
        for k in [p % 2, (p + 1) % 2] {
            out[k].push(unit(k));
        }
    }
    out
}

/// A connection whose both ends this process holds, for [`bulk`].
struct BulkConnection {
    tx: TcpStream,
    rx: TcpStream,
}

impl BulkConnection {
    fn new((tx, rx): (TcpStream, TcpStream)) -> BulkConnection {
        setsockopt(&tx, sockopt::TcpCongestion, &OsString::from("cubic")).expect("choosing cubic");
        for s in [&tx, &rx] {
            s.set_nonblocking(true).expect("non-blocking");
        }
        BulkConnection { tx, rx }
    }

    /// Writes `data` and reads it back into `sink`, waiting in `poll` only
    /// when neither moves (data still on its way).
    fn push(&mut self, data: &[u8], sink: &mut [u8]) {
        let (mut sent, mut got) = (0, 0);
        while got < data.len() {
            let mut moved = false;
            if sent < data.len() {
                match self.tx.write(&data[sent..]) {
                    Ok(n) => (sent, moved) = (sent + n, true),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => panic!("bulk send: {e}"),
                }
            }
            loop {
                match self.rx.read(sink) {
                    Ok(0) => panic!("bulk connection closed"),
                    Ok(n) => (got, moved) = (got + n, true),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("bulk receive: {e}"),
                }
            }
            if !moved {
                let mut fds = [PollFd::new(self.rx.as_fd(), PollFlags::POLLIN)];
                let ready = poll(&mut fds, PollTimeout::from(5000u16)).expect("poll");
                assert!(ready > 0, "bulk transfer stalled for 5 s");
            }
        }
    }
}

/// One round: each measurement on both sides (see [`paired_client`]).
/// Returns the table's sample, the baseline's, and the round's noise.
fn round(lab: &Lab, sides: &Sides, plan: &Plan, kind: Kind) -> (Sample, Sample, Noise) {
    let busy0 = busy_us();
    let soft0 = ksoftirqd_us();
    let t0 = Instant::now();
    let mut ours = 0.0;
    let mut samples = [Sample::default(), Sample::default()];
    let both = [Side::Table, Side::Baseline];
    for (i, &depth) in DEPTHS.iter().enumerate() {
        let made = connects(
            lab,
            sides,
            kind,
            depth,
            (plan.connect_pairs, plan.connect_batch),
        );
        for (side, (cpu_us, latency_us)) in both.into_iter().zip(made) {
            ours += cpu_us.iter().sum::<f64>() * plan.connect_batch as f64;
            let s = &mut samples[side as usize];
            s.connect_us[i] = cpu_us;
            if i == DEPTHS.len() - 1 {
                s.latency_us = latency_us;
            }
        }
        // Arriving datagrams meet no socket cgroup: measured at one depth.
        let flows: &[Flow] = if i == 0 {
            &[Flow::Out, Flow::Untracked, Flow::In]
        } else {
            &[Flow::Out, Flow::Untracked]
        };
        for &flow in flows {
            let batches = (plan.datagram_pairs, plan.datagram_batch);
            let sent = datagrams(lab, sides, kind, depth, flow, batches);
            for (side, cpu_ns) in both.into_iter().zip(sent) {
                ours += cpu_ns.iter().sum::<f64>() * plan.datagram_batch as f64 / 1e3;
                let s = &mut samples[side as usize];
                match flow {
                    Flow::Out => s.datagram_ns[i] = cpu_ns,
                    Flow::Untracked => s.first_ns[i] = cpu_ns,
                    Flow::In => s.inbound_ns = cpu_ns,
                }
            }
        }
    }
    let [table, base] = bulk(lab, sides, kind, plan.bulk_pairs);
    ours += [&table, &base]
        .iter()
        .flat_map(|v| v.iter())
        .map(|us_per_mib| us_per_mib * BULK_CHUNK as f64 / f64::from(1 << 20))
        .sum::<f64>();
    samples[Side::Table as usize].bulk_us_per_mib = table;
    samples[Side::Baseline as usize].bulk_us_per_mib = base;
    let wall_us = t0.elapsed().as_secs_f64() * 1e6;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let noise = Noise {
        foreign: (busy_us().saturating_sub(busy0) as f64 - ours).max(0.0) / (wall_us * cpus),
        ksoftirqd: ksoftirqd_us().saturating_sub(soft0) as f64 / ours,
    };
    let [table, base] = samples;
    (table, base, noise)
}

/// The comparison at one size.
pub struct Comparison {
    kind: Kind,
    connect: Ratio,
    bulk: Ratio,
    /// CPU µs per connection and per MiB (see [`low`]), table and baseline.
    connect_us: (f64, f64),
    bulk_us_per_mib: (f64, f64),
    /// Connect latency p50 and p99 (µs), table and baseline.
    latency: ((f64, f64), (f64, f64)),
    /// Extra cost per first packet per level the client sits deeper (ns; the
    /// slope over [`DEPTHS`]): from all rounds, and from the table-first and
    /// the baseline-first ones. Negative for the nft table, where a deeper
    /// client skips levels; one lookup for the eBPF programs.
    per_level_ns: (f64, [f64; 2]),
    /// Extra CPU per connection over the baseline at each depth (ns).
    extra_ns: [f64; 3],
    /// Extra CPU per datagram of one flow over the baseline at each depth (ns).
    extra_datagram_ns: [f64; 3],
    /// Extra CPU per untracked datagram (a first packet) at each depth (ns).
    extra_first_ns: [f64; 3],
    /// Extra CPU per datagram of one flow arriving unasked (ns).
    extra_inbound_ns: f64,
    /// Largest foreign load and ksoftirqd share seen in any round.
    foreign_max: f64,
    ksoftirqd_max: f64,
    /// The eBPF datapath's programs' own time.
    programs: Option<Programs>,
}

/// Measures both sides in rounds whose order alternates (table first, then
/// baseline first, …), with the daemon running in the table's namespace;
/// `label` names the size.
pub fn compare(
    lab: &mut Lab,
    sides: &Sides,
    plan: &Plan,
    label: &str,
    started: Instant,
) -> Comparison {
    lab.start_daemon_in(sides.table.pid());
    // Let the kernel's deferred work after the big commit finish first.
    sleep(Duration::from_millis(300));
    let c = rounds(lab, sides, plan, Kind::Nft, label, started);
    lab.stop_daemon();
    c
}

/// The eBPF datapath against none: its programs run for every client of the
/// table side (their cgroups are below the root it attaches at) and for none
/// of the baseline's; both sides run in the baseline's namespace (see
/// [`run`]), with no table for this comparison.
pub fn compare_ebpf(
    lab: &mut Lab,
    sides: &Sides,
    plan: &Plan,
    label: &str,
    started: Instant,
) -> Comparison {
    let base = sides.baseline.pid();
    sh(&format!(
        "nsenter -t {base} -n nft delete table inet ctonly"
    ));
    lab.start_ebpf_daemon();
    let mut c = rounds(lab, sides, plan, Kind::Ebpf, label, started);
    step(
        &format!("datapath at {label}: the programs' own time"),
        started,
    );
    c.programs = Some(program_time(lab, sides, plan));
    lab.stop_daemon();
    sh(&format!("nsenter -t {base} -n sh -c '{CONNTRACK_ONLY}'"));
    c
}

/// The programs' own time per connection and per datagram, at the deepest
/// depth on the eBPF side (see [`bpfstats`]).
fn program_time(lab: &Lab, sides: &Sides, plan: &Plan) -> Programs {
    let _counting = bpfstats::start();
    let before = bpfstats::snapshot();
    let batches = (plan.connect_pairs, plan.connect_batch);
    connects(lab, sides, Kind::Ebpf, DEEPEST, batches);
    // Only the table side's connections meet the programs (see `connects`).
    let made = CONNECT_WARM_UP + plan.connect_pairs * plan.connect_batch;
    let connection = PerOp::between(&before, &bpfstats::snapshot(), made as u64);
    let before = bpfstats::snapshot();
    let batches = (plan.datagram_pairs, plan.datagram_batch);
    datagrams(lab, sides, Kind::Ebpf, DEEPEST, Flow::Out, batches);
    // A warm-up batch, then the pairs'.
    let sent = (1 + plan.datagram_pairs) * plan.datagram_batch;
    Programs {
        connection,
        datagram: PerOp::between(&before, &bpfstats::snapshot(), sent as u64),
    }
}

/// The eBPF programs' own time (kernel BPF statistics).
pub struct Programs {
    connection: PerOp,
    datagram: PerOp,
}

/// The control: [`compare`] with the conntrack-only table on both sides
/// (no daemon). Its ratios are 1 but for the noise of the machine and any
/// difference between the two namespaces.
pub fn control(lab: &Lab, sides: &Sides, plan: &Plan, started: Instant) -> Comparison {
    let setup = (CONNTRACK_ONLY, "nft delete table inet ctonly".to_owned());
    with_table_side(lab, sides, plan, (Kind::Nft, "control"), setup, started)
}

/// [`rounds`] of `kind`, named `label`, with the table side set up by the
/// first of `setup` (commands for `sh -c '…'`) and taken down by the second.
fn with_table_side(
    lab: &Lab,
    sides: &Sides,
    plan: &Plan,
    (kind, label): (Kind, &str),
    (up, down): (&str, String),
    started: Instant,
) -> Comparison {
    let table = sides.table.pid();
    sh(&format!("nsenter -t {table} -n sh -c '{up}'"));
    let c = rounds(lab, sides, plan, kind, label, started);
    sh(&format!("nsenter -t {table} -n sh -c '{down}'"));
    c
}

/// Commands (for `sh -c '…'`) making the chains of the mechanism's floor
/// on the table side: what the mechanism (README, How it works) costs
/// before anything is classified, as the bench's config would have it
/// (mark 3000, route table 300, port 7893, rule priority 100). The
/// route-type output chain (it re-routes a packet whose mark a rule
/// changed; here only replies are skipped), the guard in postrouting and
/// the prerouting chain with a `tproxy` rule; with [`POLICY_ROUTING`].
const FLOOR_CHAINS: &str = "nft add table inet floor &&
    nft add chain inet floor output \"{ type route hook output priority mangle; }\" &&
    nft add rule inet floor output ct direction reply return &&
    nft add chain inet floor guard \"{ type filter hook postrouting priority mangle; }\" &&
    nft add rule inet floor guard meta mark 3000 oif != lo drop &&
    nft add chain inet floor prerouting \"{ type filter hook prerouting priority mangle; }\" &&
    nft add rule inet floor prerouting ct direction reply return &&
    nft add rule inet floor prerouting meta mark 3000 meta nfproto ipv4 meta l4proto tcp tproxy ip to 127.0.0.1:7893 accept";

/// Commands making the ip rule and local route that loop marked packets
/// (v4 and v6), as the daemon's; and removing them. The first ip rule
/// un-merges the kernel's local and main routing tables in its namespace
/// for good (every route lookup then walks the rules), so the control runs
/// before these ever have.
const POLICY_ROUTING: &str = "ip rule add fwmark 3000 lookup 300 pref 100 &&
    ip route add local default dev lo table 300 &&
    ip -6 rule add fwmark 3000 lookup 300 pref 100 &&
    ip -6 route add local default dev lo table 300";
const NO_POLICY_ROUTING: &str = "ip rule del pref 100 && ip -6 rule del pref 100 &&
    ip route flush table 300 && ip -6 route flush table 300";

/// The mechanism's floor ([`FLOOR_CHAINS`] and [`POLICY_ROUTING`]) against
/// the conntrack-only table: the share of the table's cost that no ruleset
/// within the design can save. The floor's ratio is the best any
/// classification could reach.
pub fn floor(lab: &Lab, sides: &Sides, plan: &Plan, started: Instant) -> Comparison {
    let up = format!("{FLOOR_CHAINS} && {POLICY_ROUTING}");
    let down = format!("nft delete table inet floor && {NO_POLICY_ROUTING}");
    let kind = (Kind::Floor, "the mechanism's floor");
    with_table_side(lab, sides, plan, kind, (&up, down), started)
}

/// [`POLICY_ROUTING`] alone, with the conntrack-only table, against that
/// table: how much of the floor the ip rule is.
pub fn policy_routing(lab: &Lab, sides: &Sides, plan: &Plan, started: Instant) -> Comparison {
    let up = format!("{CONNTRACK_ONLY} && {POLICY_ROUTING}");
    let down = format!("nft delete table inet ctonly && {NO_POLICY_ROUTING}");
    let kind = (Kind::Rules, "policy routing alone");
    with_table_side(lab, sides, plan, kind, (&up, down), started)
}

/// Rounds of every measurement on both sides.
fn rounds(
    lab: &Lab,
    sides: &Sides,
    plan: &Plan,
    kind: Kind,
    label: &str,
    started: Instant,
) -> Comparison {
    // Warm up: the caches, conntrack's tables.
    step(&format!("datapath at {label}: warm-up"), started);
    round(lab, sides, &plan.warm_up(), kind);
    let mut rounds = Vec::new();
    for r in 0..plan.rounds {
        step(
            &format!("datapath at {label}: round {} of {}", r + 1, plan.rounds),
            started,
        );
        rounds.push(round(lab, sides, plan, kind));
    }
    Comparison::of(kind, &rounds)
}

impl Comparison {
    /// Refuses this comparison's ratios where `control`'s are off (see
    /// [`Ratio::checked`]).
    pub fn checked(self, control: &Comparison) -> Comparison {
        Comparison {
            connect: self.connect.checked(&control.connect),
            bulk: self.bulk.checked(&control.bulk),
            ..self
        }
    }

    fn of(kind: Kind, rounds: &[(Sample, Sample, Noise)]) -> Comparison {
        let deep = DEPTHS.len() - 1;
        let all = |_: usize| true;
        // Every round's units measured in pairs (bulk chunks, connection
        // and datagram batches), in order: pair `i` is `i` on both sides,
        // and it went table first when `i` is even (rounds have even pairs).
        let units = |f: &dyn Fn(&Sample) -> &Vec<f64>, table: bool| -> Vec<f64> {
            rounds
                .iter()
                .flat_map(|r| f(if table { &r.0 } else { &r.1 }).iter().copied())
                .collect()
        };
        let chunks = |table| units(&|s| &s.bulk_us_per_mib, table);
        let batches = |d: usize, table| units(&|s| &s.connect_us[d], table);
        let flows = |d: usize, table| units(&|s| &s.datagram_ns[d], table);
        let firsts = |d: usize, table| units(&|s| &s.first_ns[d], table);
        // What the table adds at each depth: the median of the pairs' own
        // differences (see `Ratio::of`).
        let extra = |of: &dyn Fn(usize, bool) -> Vec<f64>, keep: &dyn Fn(usize) -> bool| {
            [0, 1, 2].map(|d| paired_median(&of(d, true), &of(d, false), keep, |t, b| t - b))
        };
        let per_level =
            |keep: &dyn Fn(usize) -> bool| slope(&DEPTHS.map(f64::from), &extra(&firsts, keep));
        let pcts = |table: bool| {
            let mut all: Vec<f64> = rounds
                .iter()
                .flat_map(|r| if table { &r.0 } else { &r.1 }.latency_us.iter().copied())
                .collect();
            all.sort_by(f64::total_cmp);
            (percentile(&all, 50), percentile(&all, 99))
        };
        let max = |f: &dyn Fn(&Noise) -> f64| rounds.iter().map(|r| f(&r.2)).fold(0.0, f64::max);
        Comparison {
            kind,
            connect: Ratio::of(&batches(deep, true), &batches(deep, false)),
            bulk: Ratio::of(&chunks(true), &chunks(false)),
            connect_us: (
                low(batches(deep, true).into_iter()),
                low(batches(deep, false).into_iter()),
            ),
            bulk_us_per_mib: (
                low(chunks(true).into_iter()),
                low(chunks(false).into_iter()),
            ),
            latency: (pcts(true), pcts(false)),
            per_level_ns: (
                per_level(&all),
                [per_level(&|i| i % 2 == 0), per_level(&|i| i % 2 == 1)],
            ),
            extra_ns: extra(&batches, &all).map(|us| us * 1e3),
            extra_datagram_ns: extra(&flows, &all),
            extra_first_ns: extra(&firsts, &all),
            extra_inbound_ns: paired_median(
                &units(&|s| &s.inbound_ns, true),
                &units(&|s| &s.inbound_ns, false),
                &all,
                |t, b| t - b,
            ),
            foreign_max: max(&|n| n.foreign),
            ksoftirqd_max: max(&|n| n.ksoftirqd),
            programs: None,
        }
    }

    /// The rows of the result table for size `label`, through `row`.
    pub fn rows(&self, label: &str, row: &mut dyn FnMut(&str, String, &str)) {
        let (ours, base) = self.kind.names();
        let target = self.kind.target();
        row(
            &format!("connect CPU us: {ours} / {base}, {label}"),
            format!("{:.2} / {:.2}", self.connect_us.0, self.connect_us.1),
            "",
        );
        row(
            &format!("  connect ratio {base}/{ours}, {label}"),
            self.connect.to_string(),
            target,
        );
        row(
            &format!("bulk CPU us/MiB: {ours} / {base}, {label}"),
            format!(
                "{:.0} / {:.0}",
                self.bulk_us_per_mib.0, self.bulk_us_per_mib.1
            ),
            "",
        );
        row(
            &format!("  bulk ratio {base}/{ours}, {label}"),
            self.bulk.to_string(),
            target,
        );
        let ((t50, t99), (b50, b99)) = self.latency;
        row(
            &format!("connect p50/p99 us: {ours}; {base}, {label}"),
            format!("{t50:.0}/{t99:.0}; {b50:.0}/{b99:.0}"),
            "",
        );
        row(
            &format!("  extra ns/connection at depth 1/4/8, {label}"),
            format!(
                "{:.0} / {:.0} / {:.0}",
                self.extra_ns[0], self.extra_ns[1], self.extra_ns[2]
            ),
            "",
        );
        row(
            &format!("  extra ns/datagram of a flow at depth 1/4/8, {label}"),
            format!(
                "{:.0} / {:.0} / {:.0}",
                self.extra_datagram_ns[0], self.extra_datagram_ns[1], self.extra_datagram_ns[2]
            ),
            "",
        );
        row(
            &format!("  extra ns/first packet (untracked) at depth 1/4/8, {label}"),
            format!(
                "{:.0} / {:.0} / {:.0}",
                self.extra_first_ns[0], self.extra_first_ns[1], self.extra_first_ns[2]
            ),
            "",
        );
        row(
            &format!("  extra ns/datagram arriving unasked (to a server), {label}"),
            format!("{:.0}", self.extra_inbound_ns),
            "",
        );
        let (level, [a, b]) = self.per_level_ns;
        row(
            &format!("  per level the client sits deeper, ns/first packet, {label}"),
            format!("{level:.0} ({a:.0}, {b:.0})"),
            "",
        );
        if let Some(p) = &self.programs {
            row(
                &format!("  programs' own time per connection, {label}"),
                p.connection.to_string(),
                "",
            );
            row(
                &format!("  programs' own time per datagram, {label}"),
                p.datagram.to_string(),
                "",
            );
        }
        row(
            &format!("  noise: foreign load, ksoftirqd max, {label}"),
            format!(
                "{:.0} %, {:.1} %",
                self.foreign_max * 100.0,
                self.ksoftirqd_max * 100.0
            ),
            "",
        );
    }

    /// bench-json keys for size `tag` (`10k`, `50k`).
    pub fn json(&self, tag: &str) -> Map<String, Value> {
        let ((t50, t99), (b50, b99)) = self.latency;
        let mut m = Map::new();
        // The eBPF datapath's keys: `ebpf_` first, `none` for the baseline.
        let kind = self.kind;
        let mut put = |k: &str, v: Value| {
            let k = k.replace("SIZE", tag);
            let k = match kind {
                Kind::Nft | Kind::Floor | Kind::Rules => k,
                Kind::Ebpf => format!("ebpf_{}", k.replace("conntrack", "none")),
            };
            m.insert(k, v);
        };
        put(
            "connect_ratio_SIZE_vs_conntrack",
            json!(self.connect.value().map(round3)),
        );
        put(
            "throughput_ratio_SIZE_vs_conntrack",
            json!(self.bulk.value().map(round3)),
        );
        put("connect_cpu_us_SIZE", json!(round3(self.connect_us.0)));
        put(
            "connect_cpu_us_SIZE_conntrack",
            json!(round3(self.connect_us.1)),
        );
        put(
            "bulk_cpu_us_per_mib_SIZE",
            json!(round1(self.bulk_us_per_mib.0)),
        );
        put(
            "bulk_cpu_us_per_mib_SIZE_conntrack",
            json!(round1(self.bulk_us_per_mib.1)),
        );
        put("connect_p50_us_SIZE", json!(round1(t50)));
        put("connect_p99_us_SIZE", json!(round1(t99)));
        put("connect_p50_us_SIZE_conntrack", json!(round1(b50)));
        put("connect_p99_us_SIZE_conntrack", json!(round1(b99)));
        put(
            "per_level_deeper_ns_per_packet_SIZE",
            json!(round1(self.per_level_ns.0)),
        );
        put(
            "table_ns_per_packet_no_lookup_SIZE",
            json!(round1(self.extra_first_ns[0])),
        );
        put(
            "table_ns_per_inbound_datagram_SIZE",
            json!(round1(self.extra_inbound_ns)),
        );
        put(
            "table_ns_per_later_packet_SIZE",
            json!(round1(self.extra_datagram_ns[DEPTHS.len() - 1])),
        );
        put(
            "datapath_foreign_load_max_SIZE",
            json!(round3(self.foreign_max)),
        );
        put(
            "datapath_ksoftirqd_share_max_SIZE",
            json!(round3(self.ksoftirqd_max)),
        );
        if let Some(p) = &self.programs {
            // Only the eBPF datapath has them: `ebpf_` is put first.
            put(
                "program_ns_per_connection_SIZE",
                json!(round1(p.connection.total_ns)),
            );
            put(
                "program_ns_per_datagram_SIZE",
                json!(round1(p.datagram.total_ns)),
            );
        }
        m
    }
}

/// Least-squares slope of `y` over `x`.
fn slope(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let cov: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let var: f64 = x.iter().map(|a| (a - mx) * (a - mx)).sum();
    cov / var
}

fn percentile(sorted: &[f64], p: usize) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[(sorted.len() * p).div_ceil(100).saturating_sub(1)]
}

/// All CPUs' busy time so far (µs), from /proc/stat (user to steal; ticks of 10 ms).
fn busy_us() -> u64 {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: u64 = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|v| v.parse::<u64>().ok())
                .enumerate()
                // user nice system [idle iowait] irq softirq steal
                .filter(|(i, _)| !matches!(i, 3 | 4) && *i < 8)
                .map(|(_, v)| v)
                .sum()
        })
        .unwrap_or(0);
    ticks * 10_000
}

/// The ksoftirqd threads: each one's name (`ksoftirqd/N`) and schedstat
/// file.
fn ksoftirqds() -> Vec<(String, PathBuf)> {
    let Ok(procs) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| {
            let comm = fs::read_to_string(e.path().join("comm")).ok()?;
            let comm = comm.trim();
            comm.starts_with("ksoftirqd/")
                .then(|| (comm.to_owned(), e.path().join("schedstat")))
        })
        .collect()
}

/// A thread's CPU time so far (ns): its schedstat's first field.
fn schedstat_ns(path: &Path) -> Option<u64> {
    fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// All ksoftirqd threads' CPU time so far (µs).
fn ksoftirqd_us() -> u64 {
    ksoftirqds()
        .iter()
        .filter_map(|(_, stats)| schedstat_ns(stats))
        .sum::<u64>()
        / 1000
}

/// Whether the kernel takes softirq time out of tasks' runtime, from its
/// configuration (None where the kernel does not publish it).
pub fn irq_time_accounting() -> Option<bool> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let boot = format!("/boot/config-{}", release.trim());
    let text = match fs::read_to_string(&boot) {
        Ok(t) => t,
        Err(_) => {
            let out = Command::new("zcat").arg("/proc/config.gz").output().ok()?;
            out.status.success().then_some(())?;
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    Some(text.lines().any(|l| l == "CONFIG_IRQ_TIME_ACCOUNTING=y"))
}
