//! The nftables backend: turns planner output into one netlink transaction and
//! commits it, reporting every kernel error with what the message was doing.

mod ffi;

use std::collections::HashMap;
use std::ffi::CString;
use std::io::IoSlice;
use std::net::IpAddr;
use std::os::fd::AsRawFd;

use netlink_sys::{Socket, constants::NETLINK_NETFILTER};
use nftnl::{Batch, Chain, ChainType, MsgType, Policy, ProtoFamily, Rule, Table};
use nix::sys::socket::{MsgFlags, NetlinkAddr, recv, sendmsg, setsockopt, sockopt};
use nix::sys::time::TimeVal;

use crate::config::{CONN_TAG_BASE, CONN_TAG_MASK};
use crate::core::table::{
    self, ChainSpec, Family, Hook, SetKind, SetSpec, Stmt, TableSpec, Verdict,
};
use ffi::{ELEMS_PER_MSG, Elem, Elems, Expr, Key, MetaKey, PayloadBase, REG_1, REG_2, SetDef};
pub use ffi::{TABLE_F_OWNER, TABLE_F_PERSIST};

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("opening the nftables netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("sending the nftables transaction ({bytes} bytes): {source}")]
    Send { bytes: usize, source: nix::Error },
    #[error("reading the nftables reply: {0}")]
    Recv(nix::Error),
    #[error("the kernel did not answer the nftables transaction within 10 s")]
    Timeout,
    #[error("nftables refused {what}: {errno}{}", .detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Kernel {
        what: String,
        errno: nix::Error,
        detail: Option<String>,
    },
    #[error("name contains a NUL byte: {0:?}")]
    Name(String),
}

fn cstring(s: &str) -> Result<CString, NftError> {
    CString::new(s).map_err(|_| NftError::Name(s.to_owned()))
}

fn ffi_verdict(v: &Verdict) -> Result<ffi::Verdict, NftError> {
    Ok(match v {
        Verdict::Accept => ffi::Verdict::Accept,
        Verdict::Drop => ffi::Verdict::Drop,
        Verdict::Return => ffi::Verdict::Return,
        Verdict::Goto(c) => ffi::Verdict::Goto(cstring(c)?.into()),
        Verdict::Jump(c) => ffi::Verdict::Jump(cstring(c)?.into()),
    })
}

fn nfproto(f: Family) -> u8 {
    match f {
        Family::V4 => libc::NFPROTO_IPV4 as u8,
        Family::V6 => libc::NFPROTO_IPV6 as u8,
    }
}

/// The family of `addr`, and the loads that put it into [`REG_1`] and `port`
/// into [`REG_2`], where `tproxy` and `nat` read them.
fn address_and_port(addr: &IpAddr, port: u16) -> (u32, [Expr; 2]) {
    let (data, family) = match addr {
        IpAddr::V4(a) => (a.octets().to_vec(), libc::NFPROTO_IPV4),
        IpAddr::V6(a) => (a.octets().to_vec(), libc::NFPROTO_IPV6),
    };
    let port = Expr::Load {
        reg: REG_2,
        data: port.to_be_bytes().to_vec(),
    };
    (family as u32, [Expr::Load { reg: REG_1, data }, port])
}

/// The expressions that implement one statement.
/// `meta mark set KEY map @MAP meta mark vmap @classes`: the class that `map`
/// gives `key` into the mark, then that class's verdict.
fn class_verdict(key: Expr, map: &str) -> Result<Vec<Expr>, NftError> {
    Ok(vec![
        key,
        Expr::Lookup {
            set: cstring(map)?,
            sreg: REG_1,
            dreg: Some(REG_1),
        },
        Expr::SetMark,
        Expr::Meta(MetaKey::Mark),
        Expr::Lookup {
            set: cstring(table::CLASSES)?,
            sreg: REG_1,
            dreg: Some(ffi::REG_VERDICT),
        },
    ])
}

fn exprs(s: &Stmt) -> Result<Vec<Expr>, NftError> {
    let cmp = |data: Vec<u8>| Expr::Cmp { eq: true, data };
    Ok(match s {
        // IP_CT_DIR_REPLY = 1.
        Stmt::CtReply => vec![Expr::CtDirection, cmp(vec![1])],
        Stmt::NfProto(f) => vec![Expr::Meta(MetaKey::NfProto), cmp(vec![nfproto(*f)])],
        Stmt::L4Proto(p) => vec![Expr::Meta(MetaKey::L4Proto), cmp(vec![p.number()])],
        Stmt::NotTcpUdp => vec![
            Expr::Meta(MetaKey::L4Proto),
            Expr::Cmp {
                eq: false,
                data: vec![libc::IPPROTO_TCP as u8],
            },
            Expr::Cmp {
                eq: false,
                data: vec![libc::IPPROTO_UDP as u8],
            },
        ],
        Stmt::DaddrIn(f, set) => {
            let (offset, len) = match f {
                Family::V4 => (16, 4),
                Family::V6 => (24, 16),
            };
            vec![
                Expr::Payload {
                    base: PayloadBase::Network,
                    offset,
                    len,
                },
                Expr::Lookup {
                    set: cstring(set)?,
                    sreg: REG_1,
                    dreg: None,
                },
            ]
        }
        Stmt::Daddr(addr) => {
            let (offset, data) = match addr {
                IpAddr::V4(a) => (16, a.octets().to_vec()),
                IpAddr::V6(a) => (24, a.octets().to_vec()),
            };
            vec![
                Expr::Payload {
                    base: PayloadBase::Network,
                    offset,
                    len: data.len() as u32,
                },
                cmp(data),
            ]
        }
        Stmt::Dport(p) => vec![
            Expr::Payload {
                base: PayloadBase::Transport,
                offset: 2,
                len: 2,
            },
            cmp(p.to_be_bytes().to_vec()),
        ],
        Stmt::Mark(m) => vec![Expr::Meta(MetaKey::Mark), cmp(m.to_ne_bytes().to_vec())],
        Stmt::Marked => vec![
            Expr::Meta(MetaKey::Mark),
            Expr::Cmp {
                eq: false,
                data: 0u32.to_ne_bytes().to_vec(),
            },
        ],
        // The loopback device is index 1 in every network namespace.
        Stmt::OifNotLoopback => vec![
            Expr::Meta(MetaKey::Oif),
            Expr::Cmp {
                eq: false,
                data: 1u32.to_ne_bytes().to_vec(),
            },
        ],
        Stmt::IifNotLoopback => vec![
            Expr::Meta(MetaKey::Iif),
            Expr::Cmp {
                eq: false,
                data: 1u32.to_ne_bytes().to_vec(),
            },
        ],
        Stmt::Unmarked => vec![Expr::Meta(MetaKey::Mark), cmp(0u32.to_ne_bytes().to_vec())],
        // A named map's keys are a set: a lookup without a destination.
        Stmt::IifIn(set) => vec![
            Expr::Meta(MetaKey::Iif),
            Expr::Lookup {
                set: cstring(set)?,
                sreg: REG_1,
                dreg: None,
            },
        ],
        Stmt::FibDaddrType(t) => vec![
            Expr::FibDaddrType,
            cmp(u32::from(*t).to_ne_bytes().to_vec()),
        ],
        Stmt::Iif(i) => vec![Expr::Meta(MetaKey::Iif), cmp(i.to_ne_bytes().to_vec())],
        // PACKET_HOST = 0.
        Stmt::PktTypeHost => vec![Expr::Meta(MetaKey::PktType), cmp(vec![0])],
        Stmt::Broute => vec![
            Expr::Load {
                reg: REG_1,
                data: vec![1],
            },
            Expr::SetBroute,
        ],
        Stmt::IfaceClass => class_verdict(Expr::Meta(MetaKey::Iif), table::IFACES)?,
        Stmt::CtMark(m) => vec![Expr::CtMark, cmp(m.to_ne_bytes().to_vec())],
        Stmt::CtMarkTagged => vec![
            Expr::CtMark,
            Expr::Bitwise {
                mask: CONN_TAG_MASK.to_ne_bytes().to_vec(),
                xor: vec![0; 4],
            },
            cmp(CONN_TAG_BASE.to_ne_bytes().to_vec()),
        ],
        Stmt::SaveCtMark => vec![Expr::Meta(MetaKey::Mark), Expr::SetCtMark],
        Stmt::SetCtMark(m) => vec![
            Expr::Load {
                reg: REG_1,
                data: m.to_ne_bytes().to_vec(),
            },
            Expr::SetCtMark,
        ],
        Stmt::SetMark(m) => vec![
            Expr::Load {
                reg: REG_1,
                data: m.to_ne_bytes().to_vec(),
            },
            Expr::SetMark,
        ],
        Stmt::CgroupAtLevel(level) => vec![
            Expr::SocketCgroup { level: *level },
            Expr::Cmp {
                eq: false,
                data: 0u64.to_ne_bytes().to_vec(),
            },
        ],
        Stmt::CgroupClass { level, map } => {
            class_verdict(Expr::SocketCgroup { level: *level }, map)?
        }
        Stmt::Tproxy(addr, port) => {
            let (family, [addr, port]) = address_and_port(addr, *port);
            vec![addr, port, Expr::Tproxy { family }]
        }
        Stmt::Dnat(addr, port) => {
            let (family, [addr, port]) = address_and_port(addr, *port);
            vec![addr, port, Expr::Dnat { family }]
        }
        Stmt::Counter => vec![Expr::Counter],
        Stmt::NamedCounter(n) => vec![Expr::CounterRef(cstring(n)?)],
        Stmt::Verdict(v) => vec![Expr::Verdict(ffi_verdict(v)?)],
    })
}

/// The map of `level`, without elements: what adding or deleting it takes.
fn empty_level_map(level: u32) -> SetSpec {
    SetSpec {
        name: table::level_map(level),
        kind: SetKind::Level(level, 0..0),
    }
}

/// Interval-set elements for merged inclusive ranges: a start element, and an end
/// element one past the range unless it runs to the top of the address space.
fn interval_elems(f: Family, ranges: &[(u128, u128)]) -> Vec<Elem> {
    let key = |v: u128| match f {
        Family::V4 => Key::new(&(v as u32).to_be_bytes()),
        Family::V6 => Key::new(&v.to_be_bytes()),
    };
    let max = match f {
        Family::V4 => u32::MAX as u128,
        Family::V6 => u128::MAX,
    };
    let mut out = Vec::new();
    for &(s, e) in ranges {
        out.push(Elem {
            key: key(s),
            interval_end: false,
            verdict: None,
            value: None,
        });
        if e < max {
            out.push(Elem {
                key: key(e + 1),
                interval_end: true,
                verdict: None,
                value: None,
            });
        }
    }
    out
}

/// One atomic nftables transaction under construction.
pub struct Txn {
    batch: Batch,
    /// What each message does, in order, for error messages.
    labels: Vec<String>,
    next_set_id: u32,
    /// Element verdicts converted once per transaction, not once per element.
    verdicts: HashMap<Verdict, ffi::Verdict>,
}

impl Default for Txn {
    fn default() -> Self {
        Self::new()
    }
}

impl Txn {
    /// A transaction for a few messages (element updates): small batch pages,
    /// because allocating and faulting in a large page costs more than the
    /// update itself.
    pub fn new() -> Txn {
        Txn::with_page_size(16 * 1024)
    }

    /// A transaction for a whole table: large pages, so a 50,000-cgroup table
    /// fits in a few of them.
    pub fn large() -> Txn {
        Txn::with_page_size(1 << 20)
    }

    fn with_page_size(page: u32) -> Txn {
        Txn {
            batch: Batch::with_page_size(page),
            labels: Vec::new(),
            next_set_id: 1,
            verdicts: HashMap::new(),
        }
    }

    fn add<T: nftnl::NlMsg>(&mut self, msg: &T, ty: MsgType, label: String) {
        self.batch.add(msg, ty);
        self.labels.push(label);
    }

    /// Deletes table `name`, which must exist.
    pub fn delete_table(&mut self, name: &str) -> Result<(), NftError> {
        let table = ffi::TableMsg {
            name: cstring(name)?,
            flags: 0,
            family: libc::NFPROTO_INET as u8,
        };
        self.add(&table, MsgType::Del, format!("delete table inet {name}"));
        Ok(())
    }

    /// Replaces the bridge table `name` with one that routes `ports` (see
    /// [`table::broute_chain`]), or removes it when `ports` is empty; whether
    /// or not it exists: it is added first (which adopts one a crash left)
    /// and deleted.
    pub fn replace_bridge(
        &mut self,
        name: &str,
        ports: &[u32],
        can_broute: bool,
        flags: u32,
    ) -> Result<(), NftError> {
        let msg = |flags| -> Result<ffi::TableMsg, NftError> {
            Ok(ffi::TableMsg {
                name: cstring(name)?,
                flags,
                family: libc::NFPROTO_BRIDGE as u8,
            })
        };
        self.add(&msg(flags)?, MsgType::Add, format!("table bridge {name}"));
        self.add(
            &msg(0)?,
            MsgType::Del,
            format!("delete table bridge {name}"),
        );
        if ports.is_empty() {
            return Ok(());
        }
        self.add(&msg(flags)?, MsgType::Add, format!("table bridge {name}"));
        let table = Table::new(cstring(name)?, ProtoFamily::Bridge);
        let chain = table::broute_chain(ports, can_broute);
        self.add_chain(&table, &chain)?;
        self.add_rules(&table, &chain)
    }

    /// Replaces any table of the same name with `spec`, atomically: `exists`
    /// says whether one is there to delete first, `flags` are the new table's
    /// (`ffi::TABLE_F_*`).
    pub fn replace_table(
        &mut self,
        spec: &TableSpec,
        exists: bool,
        flags: u32,
    ) -> Result<(), NftError> {
        if exists {
            self.delete_table(&spec.name)?;
        }
        let msg = ffi::TableMsg {
            name: cstring(&spec.name)?,
            flags,
            family: libc::NFPROTO_INET as u8,
        };
        self.add(&msg, MsgType::Add, format!("table inet {}", spec.name));
        // Chains name their table; this object is never sent.
        let table = Table::new(cstring(&spec.name)?, ProtoFamily::Inet);
        // Counters before the rules that name them.
        for c in &spec.counters {
            let obj = ffi::CounterObj {
                table: cstring(&spec.name)?,
                name: cstring(c)?,
            };
            self.add(&obj, MsgType::Add, format!("counter {c}"));
        }
        for s in &spec.sets {
            self.add_set(&spec.name, s)?;
        }
        // Chains exist before map elements jump to them and before rules run.
        for c in &spec.chains {
            self.add_chain(&table, c)?;
        }
        for s in &spec.sets {
            self.add_set_elems(&spec.name, s, &spec.level_elements)?;
        }
        for c in &spec.chains {
            self.add_rules(&table, c)?;
        }
        Ok(())
    }

    fn add_set(&mut self, table: &str, s: &SetSpec) -> Result<(), NftError> {
        let def = self.set_def(table, s)?;
        self.add(&def, MsgType::Add, format!("set {}", s.name));
        Ok(())
    }

    /// The definition of set `s`, with the transaction's next set id.
    fn set_def(&mut self, table: &str, s: &SetSpec) -> Result<SetDef, NftError> {
        let class = ffi::Data::Value {
            data_type: ffi::TYPE_MARK,
            len: 4,
        };
        let (key_type, key_len, data, interval) = match &s.kind {
            SetKind::Bypass(Family::V4, _) => (ffi::TYPE_IPADDR, 4, None, true),
            SetKind::Bypass(Family::V6, _) => (ffi::TYPE_IP6ADDR, 16, None, true),
            SetKind::Level(..) => (ffi::TYPE_CGROUPV2, 8, Some(class), false),
            SetKind::Classes(..) => (ffi::TYPE_MARK, 4, Some(ffi::Data::Verdict), false),
            SetKind::Ifaces(..) => (ffi::TYPE_IFINDEX, 4, Some(class), false),
        };
        let def = SetDef {
            table: cstring(table)?,
            name: cstring(&s.name)?,
            id: self.next_set_id,
            key_type,
            key_len,
            data,
            interval,
            // cgroup ids and classes are host-endian; addresses are not.
            host_order: !matches!(s.kind, SetKind::Bypass(..)),
            size: s.kind.size(),
        };
        self.next_set_id += 1;
        Ok(def)
    }

    /// Adds set `s`'s elements; a level map's are its range of `levels`.
    fn add_set_elems(
        &mut self,
        table: &str,
        s: &SetSpec,
        levels: &[(u64, u32)],
    ) -> Result<(), NftError> {
        match &s.kind {
            SetKind::Bypass(f, ranges) => {
                let elems = interval_elems(*f, ranges);
                for chunk in elems.chunks(ELEMS_PER_MSG) {
                    self.elems(table, &s.name, chunk, MsgType::Add)?;
                }
                Ok(())
            }
            SetKind::Level(_, range) => {
                let list = levels.get(range.clone()).unwrap_or_default();
                self.class_elems(table, &s.name, list, true)
            }
            SetKind::Ifaces(list) => self.class_elems(table, &s.name, list, true),
            SetKind::Classes(list) => {
                let mut elems = Vec::with_capacity(list.len());
                for (class, v) in list {
                    elems.push(Elem {
                        key: Key::new(&class.to_ne_bytes()),
                        interval_end: false,
                        verdict: Some(self.verdict(v)?),
                        value: None,
                    });
                }
                self.elems(table, &s.name, &elems, MsgType::Add)
            }
        }
    }

    fn verdict(&mut self, v: &Verdict) -> Result<ffi::Verdict, NftError> {
        if let Some(f) = self.verdicts.get(v) {
            return Ok(f.clone());
        }
        let f = ffi_verdict(v)?;
        self.verdicts.insert(v.clone(), f.clone());
        Ok(f)
    }

    /// Class-map elements (a cgroup id or interface index → class), one
    /// message per [`ELEMS_PER_MSG`], built chunk by chunk so a large table
    /// never exists twice in memory.
    fn class_elems<K: HostKey>(
        &mut self,
        table: &str,
        set: &str,
        list: &[(K, u32)],
        add: bool,
    ) -> Result<(), NftError> {
        let ty = if add { MsgType::Add } else { MsgType::Del };
        let mut chunk = Vec::with_capacity(ELEMS_PER_MSG.min(list.len()));
        for part in list.chunks(ELEMS_PER_MSG) {
            chunk.clear();
            chunk.extend(part.iter().map(|(id, class)| Elem {
                key: id.key(),
                interval_end: false,
                verdict: None,
                value: add.then(|| Key::new(&class.to_ne_bytes())),
            }));
            self.elems(table, set, &chunk, ty)?;
        }
        Ok(())
    }

    /// One element message (at most [`ELEMS_PER_MSG`] elements).
    fn elems(
        &mut self,
        table: &str,
        set: &str,
        elems: &[Elem],
        ty: MsgType,
    ) -> Result<(), NftError> {
        let (t, s) = (cstring(table)?, cstring(set)?);
        let verb = match ty {
            MsgType::Add => "adding",
            MsgType::Del => "deleting",
        };
        let msg = Elems {
            table: &t,
            set: &s,
            elems,
        };
        self.add(
            &msg,
            ty,
            format!("{verb} {} elements of {set}", elems.len()),
        );
        Ok(())
    }

    fn add_chain(&mut self, table: &Table, c: &ChainSpec) -> Result<(), NftError> {
        let mut chain = Chain::new(cstring(&c.name)?, table);
        let base = match c.hook {
            Some(Hook::OutputRoute) => {
                Some((nftnl::Hook::Out, libc::NF_IP_PRI_MANGLE, ChainType::Route))
            }
            Some(Hook::PreroutingFilter) => Some((
                nftnl::Hook::PreRouting,
                libc::NF_IP_PRI_MANGLE,
                ChainType::Filter,
            )),
            Some(Hook::PreroutingNat) => Some((
                nftnl::Hook::PreRouting,
                libc::NF_IP_PRI_NAT_DST,
                ChainType::Nat,
            )),
            Some(Hook::OutputNat) => {
                Some((nftnl::Hook::Out, libc::NF_IP_PRI_NAT_DST, ChainType::Nat))
            }
            Some(Hook::PostroutingFilter) => Some((
                nftnl::Hook::PostRouting,
                libc::NF_IP_PRI_MANGLE,
                ChainType::Filter,
            )),
            // NF_BR_PRI_FILTER_BRIDGED: before br_netfilter's own pass (0).
            Some(Hook::BridgePrerouting) => {
                Some((nftnl::Hook::PreRouting, -200, ChainType::Filter))
            }
            None => None,
        };
        if let Some((hook, priority, ty)) = base {
            chain.set_hook(hook, priority);
            chain.set_type(ty);
        }
        if c.hook.is_some() {
            chain.set_policy(Policy::Accept);
        }
        self.add(&chain, MsgType::Add, format!("chain {}", c.name));
        Ok(())
    }

    fn add_rules(&mut self, table: &Table, c: &ChainSpec) -> Result<(), NftError> {
        let chain = Chain::new(cstring(&c.name)?, table);
        for (i, stmts) in c.rules.iter().enumerate() {
            let mut rule = Rule::new(&chain);
            for s in stmts {
                for e in exprs(s)? {
                    rule.add_expr(&e);
                }
            }
            self.add(
                &rule,
                MsgType::Add,
                format!("rule {} of chain {}", i + 1, c.name),
            );
        }
        Ok(())
    }

    /// Adds empty verdict maps for new levels.
    pub fn add_level_maps(&mut self, table: &str, levels: &[u32]) -> Result<(), NftError> {
        for &level in levels {
            self.add_set(table, &empty_level_map(level))?;
        }
        Ok(())
    }

    /// Deletes the maps of levels no longer looked up, elements and all;
    /// the rules that used them must be gone earlier in the transaction.
    pub fn delete_level_maps(&mut self, table: &str, levels: &[u32]) -> Result<(), NftError> {
        for &level in levels {
            let spec = empty_level_map(level);
            let def = self.set_def(table, &spec)?;
            self.add(&def, MsgType::Del, format!("delete map {}", spec.name));
        }
        Ok(())
    }

    /// Replaces the rules of an existing chain (flush, then add), atomically.
    pub fn rewrite_chain(&mut self, table: &str, c: &ChainSpec) -> Result<(), NftError> {
        let t = Table::new(cstring(table)?, ProtoFamily::Inet);
        let chain = Chain::new(cstring(&c.name)?, &t);
        let flush = Rule::new(&chain);
        self.add(&flush, MsgType::Del, format!("flush chain {}", c.name));
        self.add_rules(&t, c)
    }

    /// Adds (`add`) or deletes level-map elements (cgroup id → class).
    pub fn map_elements(
        &mut self,
        table: &str,
        level: u32,
        elems: &[(u64, u32)],
        add: bool,
    ) -> Result<(), NftError> {
        self.class_elems(table, &table::level_map(level), elems, add)
    }

    /// Deletes `del` and adds `add` (interface index → class) in the
    /// interface map.
    pub fn iface_elements(
        &mut self,
        table: &str,
        del: &[u32],
        add: &[(u32, u32)],
    ) -> Result<(), NftError> {
        if !del.is_empty() {
            let gone: Vec<(u32, u32)> = del.iter().map(|&i| (i, 0)).collect();
            self.class_elems(table, table::IFACES, &gone, false)?;
        }
        if !add.is_empty() {
            self.class_elems(table, table::IFACES, add, true)?;
        }
        Ok(())
    }
}

/// A map key kept in host byte order (cgroup ids, interface indices).
trait HostKey {
    fn key(&self) -> Key;
}

impl HostKey for u64 {
    fn key(&self) -> Key {
        Key::new(&self.to_ne_bytes())
    }
}

impl HostKey for u32 {
    fn key(&self) -> Key {
        Key::new(&self.to_ne_bytes())
    }
}

/// A netlink socket to nf_tables.
pub struct Nft {
    sock: Socket,
    /// Our netlink port id: notifications of our own changes carry it.
    port: u32,
    buf: Vec<u8>,
    /// The send buffer size last set: raised only when a batch needs more, so a
    /// one-element update costs no extra system calls.
    sndbuf: usize,
}

impl Nft {
    pub fn open() -> Result<Nft, NftError> {
        let mut sock = Socket::new(NETLINK_NETFILTER).map_err(NftError::Socket)?;
        let port = sock.bind_auto().map_err(NftError::Socket)?.port_number();
        // Error replies then carry the kernel's reason and not a copy of our message.
        sock.set_ext_ack(true).map_err(NftError::Socket)?;
        sock.set_cap_ack(true).map_err(NftError::Socket)?;
        setsockopt(&sock, sockopt::ReceiveTimeout, &TimeVal::new(10, 0))
            .map_err(|e| NftError::Socket(e.into()))?;
        // Room for the acks of a whole-table batch.
        let _ = setsockopt(&sock, sockopt::RcvBufForce, &(4 << 20));
        Ok(Nft {
            sock,
            port,
            buf: vec![0; 64 * 1024],
            sndbuf: 0,
        })
    }

    /// The socket's netlink port id.
    pub fn port(&self) -> u32 {
        self.port
    }

    /// The strongest table flags this kernel takes: owner and persist (6.9+),
    /// owner (5.12+), or none. Probed with a table added and deleted in one
    /// transaction; the kernel refuses unknown flags with `EOPNOTSUPP`.
    pub fn table_flags(&mut self, probe_name: &str) -> Result<u32, NftError> {
        for flags in [
            ffi::TABLE_F_OWNER | ffi::TABLE_F_PERSIST,
            ffi::TABLE_F_OWNER,
        ] {
            let t = ffi::TableMsg {
                name: cstring(probe_name)?,
                flags,
                family: libc::NFPROTO_INET as u8,
            };
            let mut txn = Txn::new();
            txn.add(&t, MsgType::Add, format!("probe table inet {probe_name}"));
            txn.add(&t, MsgType::Del, format!("delete probe table {probe_name}"));
            match self.commit(txn) {
                Ok(()) => return Ok(flags),
                Err(NftError::Kernel {
                    errno: nix::Error::EOPNOTSUPP,
                    ..
                }) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(0)
    }

    /// Whether this kernel can route a bridge port's frames (`meta broute`):
    /// a bridge table with such a rule, added and deleted in one
    /// transaction. Refused with `EOPNOTSUPP` without it.
    pub fn can_broute(&mut self, probe_name: &str, flags: u32) -> Result<bool, NftError> {
        let mut txn = Txn::new();
        txn.replace_bridge(probe_name, &[1], true, flags)?;
        txn.replace_bridge(probe_name, &[], true, flags)?;
        match self.commit(txn) {
            Ok(()) => Ok(true),
            Err(NftError::Kernel {
                errno: nix::Error::EOPNOTSUPP,
                ..
            }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Commits a transaction: all of it, or nothing.
    pub fn commit(&mut self, txn: Txn) -> Result<(), NftError> {
        if txn.labels.is_empty() {
            return Ok(());
        }
        let Txn { batch, labels, .. } = txn;
        let fin = batch.finalize();
        let pages: Vec<&[u8]> = fin.iter().collect();
        let bytes: usize = pages.iter().map(|p| p.len()).sum();
        // A batch is processed only if it arrives in one sendmsg, which the socket
        // buffer must hold; raising it needs CAP_NET_ADMIN, which we have.
        let want = (bytes + 64 * 1024).max(256 * 1024);
        if want > self.sndbuf {
            if setsockopt(&self.sock, sockopt::SndBufForce, &want).is_err() {
                let _ = setsockopt(&self.sock, sockopt::SndBuf, &want);
            }
            self.sndbuf = want;
        }
        let iov: Vec<IoSlice<'_>> = pages.iter().map(|p| IoSlice::new(p)).collect();
        let kernel = NetlinkAddr::new(0, 0);
        sendmsg(
            self.sock.as_raw_fd(),
            &iov,
            &[],
            MsgFlags::empty(),
            Some(&kernel),
        )
        .map_err(|source| NftError::Send { bytes, source })?;

        let seqs = fin.sequence_numbers();
        // Message i's sequence number: batch begin/end take one each when acked.
        let first = if seqs.len() == labels.len() + 2 {
            seqs.start + 1
        } else {
            seqs.start
        };
        let mut pending: std::collections::BTreeSet<u32> = seqs.clone().collect();
        let mut first_error: Option<NftError> = None;
        while !pending.is_empty() {
            let n = match recv(self.sock.as_raw_fd(), &mut self.buf, MsgFlags::empty()) {
                Ok(n) => n,
                Err(nix::Error::EAGAIN) => return Err(first_error.unwrap_or(NftError::Timeout)),
                Err(e) => return Err(NftError::Recv(e)),
            };
            for (seq, errno, detail) in parse_acks(&self.buf[..n]) {
                pending.remove(&seq);
                if errno != 0 && first_error.is_none() {
                    let what = seq
                        .checked_sub(first)
                        .and_then(|i| labels.get(i as usize))
                        .cloned()
                        .unwrap_or_else(|| "the batch".into());
                    first_error = Some(NftError::Kernel {
                        what,
                        errno: nix::Error::from_raw(-errno),
                        detail,
                    });
                }
            }
            // Errors may come without acks for the rest (an aborted batch).
            if first_error.is_some() && !pending.is_empty() && !self.more_waiting() {
                break;
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn more_waiting(&self) -> bool {
        let mut probe = [0u8; 16];
        matches!(
            recv(
                self.sock.as_raw_fd(),
                &mut probe,
                MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT
            ),
            Ok(n) if n > 0
        )
    }
}

/// NLMSG_ERROR replies in a datagram: (sequence, errno ≤ 0, extended-ack message).
fn parse_acks(b: &[u8]) -> Vec<(u32, i32, Option<String>)> {
    use crate::kernel::consts::{NLM_F_ACK_TLVS, NLMSG_ERROR, NLMSGERR_ATTR_MSG};
    let mut out = Vec::new();
    for m in crate::kernel::nlmsg::messages(b) {
        let msg = m.bytes;
        // nlmsgerr: error (i32) + the original header (16 bytes, seq at offset 8).
        if m.ty == NLMSG_ERROR && msg.len() >= 16 + 4 + 16 {
            let errno = i32::from_ne_bytes([msg[16], msg[17], msg[18], msg[19]]);
            let seq = u32::from_ne_bytes([msg[28], msg[29], msg[30], msg[31]]);
            let detail = (m.flags & NLM_F_ACK_TLVS != 0)
                .then(|| crate::kernel::nlmsg::attr(&msg[36..], NLMSGERR_ATTR_MSG))
                .flatten()
                .map(|s| String::from_utf8_lossy(crate::kernel::nlmsg::c_str(s)).into_owned());
            out.push((seq, errno, detail));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_ends_are_one_past_and_omitted_at_the_top() {
        let e = interval_elems(
            Family::V4,
            &[(0x0a00_0000, 0x0aff_ffff), (0xffff_fff0, 0xffff_ffff)],
        );
        let keys: Vec<(Vec<u8>, bool)> = e
            .into_iter()
            .map(|e| (e.key.as_bytes().to_vec(), e.interval_end))
            .collect();
        assert_eq!(
            keys,
            vec![
                (vec![10, 0, 0, 0], false),
                (vec![11, 0, 0, 0], true),
                (vec![255, 255, 255, 240], false),
            ]
        );
        let e = interval_elems(Family::V6, &[(1, 1)]);
        assert_eq!(e[1].key.as_bytes(), 2u128.to_be_bytes());
    }

    #[test]
    fn acks_and_extended_errors_are_parsed() {
        fn ack(seq: u32, errno: i32, msg: Option<&str>) -> Vec<u8> {
            let mut tlv = Vec::new();
            if let Some(m) = msg {
                let mut s = m.as_bytes().to_vec();
                s.push(0);
                let l = 4 + s.len();
                tlv.extend((l as u16).to_ne_bytes());
                tlv.extend(1u16.to_ne_bytes());
                tlv.extend(&s);
                tlv.resize(tlv.len().div_ceil(4) * 4, 0);
            }
            let len = 16 + 4 + 16 + tlv.len();
            let mut b = Vec::new();
            b.extend((len as u32).to_ne_bytes());
            b.extend(2u16.to_ne_bytes());
            b.extend((if msg.is_some() { 0x200u16 } else { 0 }).to_ne_bytes());
            b.extend([0u8; 8]);
            b.extend(errno.to_ne_bytes());
            b.extend([0u8; 8]);
            b.extend(seq.to_ne_bytes());
            b.extend([0u8; 4]);
            b.extend(tlv);
            b
        }
        let mut d = ack(5, 0, None);
        d.extend(ack(6, -2, Some("No such set")));
        assert_eq!(
            parse_acks(&d),
            vec![(5, 0, None), (6, -2, Some("No such set".into()))]
        );
    }

    #[test]
    fn statements_become_expressions() {
        let e = exprs(&Stmt::Dport(53)).unwrap();
        assert_eq!(
            e[1],
            Expr::Cmp {
                eq: true,
                data: vec![0, 53]
            }
        );
        let e = exprs(&Stmt::SetMark(0x0102_0304)).unwrap();
        assert_eq!(
            e[0],
            Expr::Load {
                reg: REG_1,
                data: 0x0102_0304u32.to_ne_bytes().to_vec()
            }
        );
        let e = exprs(&Stmt::Tproxy("::1".parse().unwrap(), 7893)).unwrap();
        assert_eq!(
            e,
            vec![
                Expr::Load {
                    reg: REG_1,
                    data: std::net::Ipv6Addr::LOCALHOST.octets().to_vec()
                },
                Expr::Load {
                    reg: REG_2,
                    data: 7893u16.to_be_bytes().to_vec()
                },
                Expr::Tproxy {
                    family: libc::NFPROTO_IPV6 as u32
                }
            ]
        );
    }
}
