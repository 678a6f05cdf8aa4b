//! The only module that calls libnftnl directly. The `nftnl` crate covers tables,
//! chains, rules and batches; what it lacks is here: the `tproxy`, `socket cgroupv2`,
//! `ct direction`, named-set `lookup`/`map`/`vmap`, `nat` and named-counter
//! expressions, maps, interval sets, set elements carrying verdicts, and counter
//! objects.

use std::ffi::{CStr, CString, c_char, c_void};
use std::ptr::NonNull;
use std::rc::Rc;

use nftnl::expr::Expression;
use nftnl::{MsgType, NlMsg, Rule};
use nftnl_sys as sys;

/// The verdict register.
pub const REG_VERDICT: u32 = 0;
/// First 128-bit data register; every expression here loads into or reads from it.
pub const REG_1: u32 = 1;
/// Second 128-bit data register (NAT port).
pub const REG_2: u32 = 2;

/// `NFT_SOCKET_CGROUPV2` (not in libc).
const NFT_SOCKET_CGROUPV2: u32 = 3;
/// nft's `cgroupsv2` datatype, so that `nft list` prints the map's key type.
pub const TYPE_CGROUPV2: u32 = 46;
/// nft's `ipv4_addr` and `ipv6_addr` datatypes.
pub const TYPE_IPADDR: u32 = 7;
/// nft's `mark` datatype (32-bit, host order): the class a cgroup maps to.
pub const TYPE_MARK: u32 = 19;
pub const TYPE_IP6ADDR: u32 = 8;
/// nft's `iface_index` type.
pub const TYPE_IFINDEX: u32 = 20;

/// A verdict, as an immediate statement or as a map element's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
    Return,
    /// Shared: thousands of elements may jump to the same chain.
    Goto(Rc<CStr>),
    Jump(Rc<CStr>),
}

impl Verdict {
    fn code(&self) -> i32 {
        match self {
            Verdict::Accept => libc::NF_ACCEPT,
            Verdict::Drop => libc::NF_DROP,
            Verdict::Return => libc::NFT_RETURN,
            Verdict::Goto(_) => libc::NFT_GOTO,
            Verdict::Jump(_) => libc::NFT_JUMP,
        }
    }

    fn chain(&self) -> Option<&CStr> {
        match self {
            Verdict::Goto(c) | Verdict::Jump(c) => Some(c),
            _ => None,
        }
    }
}

/// `meta` keys we load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaKey {
    L4Proto,
    NfProto,
    Mark,
    /// The output interface's index.
    Oif,
    /// The input interface's index.
    Iif,
    /// The packet type (host, broadcast, multicast, other host).
    PktType,
}

/// Where a payload load starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadBase {
    Network,
    Transport,
}

/// One nftables expression. Loads go to [`REG_1`] unless stated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    Meta(MetaKey),
    /// `meta mark set` from [`REG_1`].
    SetMark,
    CtDirection,
    /// `ct mark` into [`REG_1`].
    CtMark,
    /// `ct mark set` from [`REG_1`].
    SetCtMark,
    Payload {
        base: PayloadBase,
        offset: u32,
        len: u32,
    },
    /// [`REG_1`] = ([`REG_1`] & `mask`) ^ `xor`, over `mask.len()` bytes.
    Bitwise {
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    /// Compares [`REG_1`] with `data`: equal when `eq`, else not equal.
    Cmp {
        eq: bool,
        data: Vec<u8>,
    },
    /// Loads constant `data` into `reg`.
    Load {
        reg: u32,
        data: Vec<u8>,
    },
    Verdict(Verdict),
    /// `socket cgroupv2 level L`: the cgroup id of the socket's ancestor at level L.
    SocketCgroup {
        level: u32,
    },
    /// Looks `sreg` up in a set: membership (`dreg` None), the data it maps to
    /// into register `dreg`, or with `dreg` [`REG_VERDICT`] the verdict.
    Lookup {
        set: CString,
        sreg: u32,
        dreg: Option<u32>,
    },
    /// `tproxy <family> to addr:port`, address in [`REG_1`], port in [`REG_2`];
    /// it serves only packets of `family` (`NFPROTO_IPV4` or `NFPROTO_IPV6`).
    Tproxy {
        family: u32,
    },
    /// `dnat <family> to addr:port`, address in [`REG_1`], port in [`REG_2`].
    Dnat {
        family: u32,
    },
    Counter,
    /// `counter name "NAME"`: counts into the table's named counter object.
    CounterRef(CString),
    /// `meta broute set` from [`REG_1`] (bridge family, prerouting): the
    /// frame goes up the stack on its port instead of being bridged.
    SetBroute,
    /// `fib daddr type`: the destination's address type (`RTN_*`, a host-order
    /// u32) into [`REG_1`].
    FibDaddrType,
}

/// `NFT_META_BRI_BROUTE` (`meta broute`, in Linux since 2023; not in libc).
const NFT_META_BRI_BROUTE: u32 = 35;

/// `NFT_FIB_RESULT_ADDRTYPE` and `NFTA_FIB_F_DADDR` (not in libc).
const NFT_FIB_RESULT_ADDRTYPE: u32 = 3;
const NFTA_FIB_F_DADDR: u32 = 1 << 1;

/// `NFT_OBJECT_COUNTER` (not in libc).
const NFT_OBJECT_COUNTER: u32 = 1;

/// Allocates an expression by name; libnftnl only fails here on out-of-memory.
fn alloc_expr(name: &CStr) -> NonNull<sys::nftnl_expr> {
    // SAFETY: `name` is a valid NUL-terminated string that libnftnl copies.
    let ptr = unsafe { sys::nftnl_expr_alloc(name.as_ptr()) };
    NonNull::new(ptr).unwrap_or_else(|| std::process::abort())
}

fn set_u32(e: NonNull<sys::nftnl_expr>, attr: u32, v: u32) {
    // SAFETY: `e` is a live expression owned by the caller; libnftnl validates `attr`
    // and stores a u32 by value.
    unsafe { sys::nftnl_expr_set_u32(e.as_ptr(), attr as u16, v) }
}

fn set_data(e: NonNull<sys::nftnl_expr>, attr: u32, data: &[u8]) {
    // SAFETY: `data` is valid for `data.len()` bytes and libnftnl copies it.
    unsafe {
        sys::nftnl_expr_set(
            e.as_ptr(),
            attr as u16,
            data.as_ptr().cast::<c_void>(),
            data.len() as u32,
        );
    }
}

fn set_str(e: NonNull<sys::nftnl_expr>, attr: u32, s: &CStr) {
    // SAFETY: `s` is NUL-terminated; libnftnl copies it.
    unsafe {
        sys::nftnl_expr_set_str(e.as_ptr(), attr as u16, s.as_ptr());
    }
}

impl Expression for Expr {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        match self {
            Expr::Meta(key) => {
                let e = alloc_expr(c"meta");
                let k = match key {
                    MetaKey::L4Proto => libc::NFT_META_L4PROTO,
                    MetaKey::NfProto => libc::NFT_META_NFPROTO,
                    MetaKey::Mark => libc::NFT_META_MARK,
                    MetaKey::Oif => libc::NFT_META_OIF,
                    MetaKey::Iif => libc::NFT_META_IIF,
                    MetaKey::PktType => libc::NFT_META_PKTTYPE,
                };
                set_u32(e, sys::NFTNL_EXPR_META_KEY, k as u32);
                set_u32(e, sys::NFTNL_EXPR_META_DREG, REG_1);
                e
            }
            Expr::SetMark => {
                let e = alloc_expr(c"meta");
                set_u32(e, sys::NFTNL_EXPR_META_KEY, libc::NFT_META_MARK as u32);
                set_u32(e, sys::NFTNL_EXPR_META_SREG, REG_1);
                e
            }
            Expr::CtDirection => {
                let e = alloc_expr(c"ct");
                set_u32(e, sys::NFTNL_EXPR_CT_KEY, libc::NFT_CT_DIRECTION as u32);
                set_u32(e, sys::NFTNL_EXPR_CT_DREG, REG_1);
                e
            }
            Expr::CtMark => {
                let e = alloc_expr(c"ct");
                set_u32(e, sys::NFTNL_EXPR_CT_KEY, libc::NFT_CT_MARK as u32);
                set_u32(e, sys::NFTNL_EXPR_CT_DREG, REG_1);
                e
            }
            Expr::SetCtMark => {
                let e = alloc_expr(c"ct");
                set_u32(e, sys::NFTNL_EXPR_CT_KEY, libc::NFT_CT_MARK as u32);
                set_u32(e, sys::NFTNL_EXPR_CT_SREG, REG_1);
                e
            }
            Expr::Payload { base, offset, len } => {
                let e = alloc_expr(c"payload");
                let b = match base {
                    PayloadBase::Network => libc::NFT_PAYLOAD_NETWORK_HEADER,
                    PayloadBase::Transport => libc::NFT_PAYLOAD_TRANSPORT_HEADER,
                };
                set_u32(e, sys::NFTNL_EXPR_PAYLOAD_BASE, b as u32);
                set_u32(e, sys::NFTNL_EXPR_PAYLOAD_OFFSET, *offset);
                set_u32(e, sys::NFTNL_EXPR_PAYLOAD_LEN, *len);
                set_u32(e, sys::NFTNL_EXPR_PAYLOAD_DREG, REG_1);
                e
            }
            Expr::Cmp { eq, data } => {
                let e = alloc_expr(c"cmp");
                let op = if *eq {
                    libc::NFT_CMP_EQ
                } else {
                    libc::NFT_CMP_NEQ
                };
                set_u32(e, sys::NFTNL_EXPR_CMP_SREG, REG_1);
                set_u32(e, sys::NFTNL_EXPR_CMP_OP, op as u32);
                set_data(e, sys::NFTNL_EXPR_CMP_DATA, data);
                e
            }
            Expr::Bitwise { mask, xor } => {
                let e = alloc_expr(c"bitwise");
                set_u32(e, sys::NFTNL_EXPR_BITWISE_SREG, REG_1);
                set_u32(e, sys::NFTNL_EXPR_BITWISE_DREG, REG_1);
                set_u32(e, sys::NFTNL_EXPR_BITWISE_LEN, mask.len() as u32);
                set_data(e, sys::NFTNL_EXPR_BITWISE_MASK, mask);
                set_data(e, sys::NFTNL_EXPR_BITWISE_XOR, xor);
                e
            }
            Expr::Load { reg, data } => {
                let e = alloc_expr(c"immediate");
                set_u32(e, sys::NFTNL_EXPR_IMM_DREG, *reg);
                set_data(e, sys::NFTNL_EXPR_IMM_DATA, data);
                e
            }
            Expr::Verdict(v) => {
                let e = alloc_expr(c"immediate");
                set_u32(e, sys::NFTNL_EXPR_IMM_DREG, REG_VERDICT);
                set_u32(e, sys::NFTNL_EXPR_IMM_VERDICT, v.code() as u32);
                if let Some(chain) = v.chain() {
                    set_str(e, sys::NFTNL_EXPR_IMM_CHAIN, chain);
                }
                e
            }
            Expr::SocketCgroup { level } => {
                let e = alloc_expr(c"socket");
                set_u32(e, sys::NFTNL_EXPR_SOCKET_KEY, NFT_SOCKET_CGROUPV2);
                set_u32(e, sys::NFTNL_EXPR_SOCKET_DREG, REG_1);
                set_u32(e, sys::NFTNL_EXPR_SOCKET_LEVEL, *level);
                e
            }
            Expr::Lookup { set, sreg, dreg } => {
                let e = alloc_expr(c"lookup");
                set_u32(e, sys::NFTNL_EXPR_LOOKUP_SREG, *sreg);
                set_str(e, sys::NFTNL_EXPR_LOOKUP_SET, set);
                if let Some(d) = dreg {
                    set_u32(e, sys::NFTNL_EXPR_LOOKUP_DREG, *d);
                }
                e
            }
            Expr::Tproxy { family } => {
                let e = alloc_expr(c"tproxy");
                set_u32(e, sys::NFTNL_EXPR_TPROXY_FAMILY, *family);
                set_u32(e, sys::NFTNL_EXPR_TPROXY_REG_ADDR, REG_1);
                set_u32(e, sys::NFTNL_EXPR_TPROXY_REG_PORT, REG_2);
                e
            }
            Expr::Dnat { family } => {
                let e = alloc_expr(c"nat");
                set_u32(e, sys::NFTNL_EXPR_NAT_TYPE, libc::NFT_NAT_DNAT as u32);
                set_u32(e, sys::NFTNL_EXPR_NAT_FAMILY, *family);
                set_u32(e, sys::NFTNL_EXPR_NAT_REG_ADDR_MIN, REG_1);
                set_u32(e, sys::NFTNL_EXPR_NAT_REG_PROTO_MIN, REG_2);
                e
            }
            Expr::SetBroute => {
                let e = alloc_expr(c"meta");
                set_u32(e, sys::NFTNL_EXPR_META_KEY, NFT_META_BRI_BROUTE);
                set_u32(e, sys::NFTNL_EXPR_META_SREG, REG_1);
                e
            }
            Expr::FibDaddrType => {
                let e = alloc_expr(c"fib");
                set_u32(e, sys::NFTNL_EXPR_FIB_DREG, REG_1);
                set_u32(e, sys::NFTNL_EXPR_FIB_RESULT, NFT_FIB_RESULT_ADDRTYPE);
                set_u32(e, sys::NFTNL_EXPR_FIB_FLAGS, NFTA_FIB_F_DADDR);
                e
            }
            Expr::Counter => alloc_expr(c"counter"),
            Expr::CounterRef(name) => {
                let e = alloc_expr(c"objref");
                set_u32(e, sys::NFTNL_EXPR_OBJREF_IMM_TYPE, NFT_OBJECT_COUNTER);
                set_str(e, sys::NFTNL_EXPR_OBJREF_IMM_NAME, name);
                e
            }
        }
    }
}

/// `NFT_TABLE_F_OWNER` (Linux 5.12): only the creating netlink socket may change
/// or delete the table, and `nft flush ruleset` from anyone else leaves it.
pub const TABLE_F_OWNER: u32 = 2;
/// `NFT_TABLE_F_PERSIST` (Linux 6.9, with owner): the table outlives its owner's
/// socket, unowned, and the next process to add it with both flags adopts it.
pub const TABLE_F_PERSIST: u32 = 4;

/// A table with flags. The `nftnl` crate's table always carries flags 0,
/// which the kernel refuses as an update of a table flagged owner.
#[derive(Debug, Clone)]
pub struct TableMsg {
    pub name: CString,
    pub flags: u32,
    /// `NFPROTO_INET`, or `NFPROTO_BRIDGE` for the broute table.
    pub family: u8,
}

/// Owns a libnftnl table for the duration of one message build.
struct RawTable(NonNull<sys::nftnl_table>);

impl Drop for RawTable {
    fn drop(&mut self) {
        // SAFETY: we own the table.
        unsafe { sys::nftnl_table_free(self.0.as_ptr()) }
    }
}

// SAFETY: `write` only writes one message built by libnftnl: three small attributes.
unsafe impl NlMsg for TableMsg {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        // SAFETY: plain allocation; NULL only on out-of-memory.
        let ptr = unsafe { sys::nftnl_table_alloc() };
        let table = RawTable(NonNull::new(ptr).unwrap_or_else(|| std::process::abort()));
        let t = match msg_type {
            MsgType::Add => libc::NFT_MSG_NEWTABLE,
            MsgType::Del => libc::NFT_MSG_DELTABLE,
        };
        // SAFETY: the table is live; the name is NUL-terminated and copied; `buf`
        // has room for a message (trait contract).
        unsafe {
            let o = table.0.as_ptr();
            sys::nftnl_table_set_u32(o, sys::NFTNL_TABLE_FAMILY as u16, u32::from(self.family));
            sys::nftnl_table_set_str(o, sys::NFTNL_TABLE_NAME as u16, self.name.as_ptr());
            if msg_type == MsgType::Add {
                sys::nftnl_table_set_u32(o, sys::NFTNL_TABLE_FLAGS as u16, self.flags);
            }
            let nlh = sys::nftnl_nlmsg_build_hdr(
                buf.cast::<c_char>(),
                t as u16,
                u16::from(self.family),
                libc::NLM_F_ACK as u16,
                seq,
            );
            sys::nftnl_table_nlmsg_build_payload(nlh, o);
        }
    }
}

/// A named counter object in an `inet` table, starting at zero.
#[derive(Debug, Clone)]
pub struct CounterObj {
    pub table: CString,
    pub name: CString,
}

/// Owns a libnftnl object for the duration of one message build.
struct RawObj(NonNull<sys::nftnl_obj>);

impl Drop for RawObj {
    fn drop(&mut self) {
        // SAFETY: we own the object.
        unsafe { sys::nftnl_obj_free(self.0.as_ptr()) }
    }
}

// SAFETY: `write` only writes one message built by libnftnl: four small attributes.
unsafe impl NlMsg for CounterObj {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        // SAFETY: plain allocation; NULL only on out-of-memory.
        let ptr = unsafe { sys::nftnl_obj_alloc() };
        let obj = RawObj(NonNull::new(ptr).unwrap_or_else(|| std::process::abort()));
        let (t, f) = match msg_type {
            MsgType::Add => (libc::NFT_MSG_NEWOBJ, libc::NLM_F_CREATE | libc::NLM_F_ACK),
            MsgType::Del => (libc::NFT_MSG_DELOBJ, libc::NLM_F_ACK),
        };
        // SAFETY: the object is live; the strings are NUL-terminated and copied;
        // `buf` has room for a message (trait contract).
        unsafe {
            let o = obj.0.as_ptr();
            sys::nftnl_obj_set_u32(o, sys::NFTNL_OBJ_FAMILY as u16, libc::NFPROTO_INET as u32);
            sys::nftnl_obj_set_str(o, sys::NFTNL_OBJ_TABLE as u16, self.table.as_ptr());
            sys::nftnl_obj_set_str(o, sys::NFTNL_OBJ_NAME as u16, self.name.as_ptr());
            sys::nftnl_obj_set_u32(o, sys::NFTNL_OBJ_TYPE as u16, NFT_OBJECT_COUNTER);
            let nlh = header(buf, t, f, seq);
            sys::nftnl_obj_nlmsg_build_payload(nlh, o);
        }
    }
}

/// A named set or verdict map in an `inet` table.
#[derive(Debug, Clone)]
pub struct SetDef {
    pub table: CString,
    pub name: CString,
    /// Unique within one transaction; lets rules in the same batch refer to it.
    pub id: u32,
    pub key_type: u32,
    pub key_len: u32,
    /// For a map: the data type and length ([`Data::Verdict`] or a value).
    pub data: Option<Data>,
    pub interval: bool,
    /// Key (and value) are in host byte order: recorded in the set's user data
    /// as nft does, so that `nft list` prints cgroup ids and marks correctly.
    pub host_order: bool,
    /// The most elements it holds (`NFTA_SET_DESC_SIZE`), for a set whose
    /// count is fixed: the kernel then picks a fixed-size hash, whose lookup
    /// for 4-byte keys costs less than the resizable one's. The kernel
    /// refuses more elements than this.
    pub size: Option<u32>,
}

/// nft's user-data TLVs (type u8, length u8, value) saying that the key, and
/// with `data` the value, are host-endian (`NFTNL_UDATA_SET_KEYBYTEORDER` = 0,
/// `NFTNL_UDATA_SET_DATABYTEORDER` = 1, nft's `BYTEORDER_HOST_ENDIAN` = 1).
fn host_order_udata(data: bool) -> Vec<u8> {
    let mut u = vec![0, 4];
    u.extend(1u32.to_ne_bytes());
    if data {
        u.extend([1, 4]);
        u.extend(1u32.to_ne_bytes());
    }
    u
}

/// What a map maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Data {
    Verdict,
    /// nft datatype number and length in bytes.
    Value {
        data_type: u32,
        len: u32,
    },
}

/// Owns a libnftnl set object for the duration of one message build.
struct RawSet(NonNull<sys::nftnl_set>);

impl RawSet {
    fn new(table: &CStr, name: &CStr) -> RawSet {
        // SAFETY: plain allocation; NULL only on out-of-memory.
        let ptr = unsafe { sys::nftnl_set_alloc() };
        let set = RawSet(NonNull::new(ptr).unwrap_or_else(|| std::process::abort()));
        // SAFETY: the set is live; the strings are NUL-terminated and copied.
        unsafe {
            sys::nftnl_set_set_u32(
                set.0.as_ptr(),
                sys::NFTNL_SET_FAMILY as u16,
                libc::NFPROTO_INET as u32,
            );
            sys::nftnl_set_set_str(set.0.as_ptr(), sys::NFTNL_SET_TABLE as u16, table.as_ptr());
            sys::nftnl_set_set_str(set.0.as_ptr(), sys::NFTNL_SET_NAME as u16, name.as_ptr());
        }
        set
    }

    fn set_u32(&self, attr: u32, v: u32) {
        // SAFETY: the set is live; u32 attributes are stored by value.
        unsafe { sys::nftnl_set_set_u32(self.0.as_ptr(), attr as u16, v) }
    }
}

impl Drop for RawSet {
    fn drop(&mut self) {
        // SAFETY: we own the set and every element added to it.
        unsafe { sys::nftnl_set_free(self.0.as_ptr()) }
    }
}

/// Writes a netlink header of `msg_type` for the inet family into `buf`.
///
/// # Safety
/// `buf` must have room for a whole message, as [`NlMsg::write`] guarantees.
unsafe fn header(buf: *mut c_void, msg_type: i32, flags: i32, seq: u32) -> *mut libc::nlmsghdr {
    // SAFETY: forwarded from the caller.
    unsafe {
        sys::nftnl_nlmsg_build_hdr(
            buf.cast::<c_char>(),
            msg_type as u16,
            libc::NFPROTO_INET as u16,
            flags as u16,
            seq,
        )
    }
}

// SAFETY: `write` only writes one message built by libnftnl, which never exceeds
// `nft_nlmsg_maxsize()`: a set definition is a handful of small attributes.
unsafe impl NlMsg for SetDef {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        let set = RawSet::new(&self.table, &self.name);
        set.set_u32(sys::NFTNL_SET_ID, self.id);
        let mut flags = 0;
        if self.data.is_some() {
            flags |= libc::NFT_SET_MAP;
        }
        if self.interval {
            flags |= libc::NFT_SET_INTERVAL;
        }
        set.set_u32(sys::NFTNL_SET_FLAGS, flags as u32);
        set.set_u32(sys::NFTNL_SET_KEY_TYPE, self.key_type);
        set.set_u32(sys::NFTNL_SET_KEY_LEN, self.key_len);
        if let Some(size) = self.size {
            set.set_u32(sys::NFTNL_SET_DESC_SIZE, size);
        }
        if self.host_order {
            let udata = host_order_udata(matches!(self.data, Some(Data::Value { .. })));
            // SAFETY: the set is live; libnftnl copies `udata.len()` bytes.
            unsafe {
                sys::nftnl_set_set_data(
                    set.0.as_ptr(),
                    sys::NFTNL_SET_USERDATA as u16,
                    udata.as_ptr().cast::<c_void>(),
                    udata.len() as u32,
                );
            }
        }
        match self.data {
            Some(Data::Verdict) => set.set_u32(sys::NFTNL_SET_DATA_TYPE, libc::NFT_DATA_VERDICT),
            Some(Data::Value { data_type, len }) => {
                set.set_u32(sys::NFTNL_SET_DATA_TYPE, data_type);
                set.set_u32(sys::NFTNL_SET_DATA_LEN, len);
            }
            None => {}
        }
        let (t, f) = match msg_type {
            MsgType::Add => (libc::NFT_MSG_NEWSET, libc::NLM_F_CREATE | libc::NLM_F_ACK),
            MsgType::Del => (libc::NFT_MSG_DELSET, libc::NLM_F_ACK),
        };
        // SAFETY: `buf` has room for a message (trait contract); `set` is live.
        unsafe {
            let nlh = header(buf, t, f, seq);
            sys::nftnl_set_nlmsg_build_payload(nlh, set.0.as_ptr());
        }
    }
}

/// A set key of up to 16 bytes, stored inline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    bytes: [u8; 16],
    len: u8,
}

impl Key {
    /// `data` must be at most 16 bytes (an IPv6 address); longer data is cut.
    pub fn new(data: &[u8]) -> Key {
        let len = data.len().min(16);
        let mut bytes = [0; 16];
        bytes[..len].copy_from_slice(&data[..len]);
        Key {
            bytes,
            len: len as u8,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// One set element: a key, optionally the end of an interval, optionally a verdict
/// or a value it maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Elem {
    pub key: Key,
    pub interval_end: bool,
    pub verdict: Option<Verdict>,
    pub value: Option<Key>,
}

/// Most elements per message: keeps each message well under `nft_nlmsg_maxsize()`
/// (a verdict element with a chain name is under 100 bytes).
pub const ELEMS_PER_MSG: usize = 256;

/// A batch of elements for one set, added or deleted in one message.
#[derive(Debug, Clone)]
pub struct Elems<'a> {
    pub table: &'a CStr,
    pub set: &'a CStr,
    /// At most [`ELEMS_PER_MSG`].
    pub elems: &'a [Elem],
}

// SAFETY: at most ELEMS_PER_MSG elements of bounded size (keys ≤ 16 bytes, chain
// names ≤ 70 bytes) fit well within `nft_nlmsg_maxsize()`.
unsafe impl NlMsg for Elems<'_> {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        assert!(self.elems.len() <= ELEMS_PER_MSG, "element chunk too large");
        let set = RawSet::new(self.table, self.set);
        for el in self.elems {
            // SAFETY: allocation, NULL only on out-of-memory.
            let raw = unsafe { sys::nftnl_set_elem_alloc() };
            let raw = NonNull::new(raw).unwrap_or_else(|| std::process::abort());
            // SAFETY: `raw` is live; key bytes and chain strings are copied by
            // libnftnl; ownership of `raw` passes to `set`, freed with it.
            unsafe {
                sys::nftnl_set_elem_set(
                    raw.as_ptr(),
                    sys::NFTNL_SET_ELEM_KEY as u16,
                    el.key.as_bytes().as_ptr().cast::<c_void>(),
                    el.key.as_bytes().len() as u32,
                );
                if el.interval_end {
                    sys::nftnl_set_elem_set_u32(
                        raw.as_ptr(),
                        sys::NFTNL_SET_ELEM_FLAGS as u16,
                        libc::NFT_SET_ELEM_INTERVAL_END as u32,
                    );
                }
                if let Some(v) = &el.value {
                    sys::nftnl_set_elem_set(
                        raw.as_ptr(),
                        sys::NFTNL_SET_ELEM_DATA as u16,
                        v.as_bytes().as_ptr().cast::<c_void>(),
                        v.as_bytes().len() as u32,
                    );
                }
                if let Some(v) = &el.verdict {
                    sys::nftnl_set_elem_set_u32(
                        raw.as_ptr(),
                        sys::NFTNL_SET_ELEM_VERDICT as u16,
                        v.code() as u32,
                    );
                    if let Some(chain) = v.chain() {
                        sys::nftnl_set_elem_set_str(
                            raw.as_ptr(),
                            sys::NFTNL_SET_ELEM_CHAIN as u16,
                            chain.as_ptr(),
                        );
                    }
                }
                sys::nftnl_set_elem_add(set.0.as_ptr(), raw.as_ptr());
            }
        }
        let (t, f) = match msg_type {
            MsgType::Add => (
                libc::NFT_MSG_NEWSETELEM,
                libc::NLM_F_CREATE | libc::NLM_F_EXCL | libc::NLM_F_ACK,
            ),
            MsgType::Del => (libc::NFT_MSG_DELSETELEM, libc::NLM_F_ACK),
        };
        // SAFETY: `buf` has room (trait contract); `set` and its elements are live.
        unsafe {
            let nlh = header(buf, t, f, seq);
            sys::nftnl_set_elems_nlmsg_build_payload(nlh, set.0.as_ptr());
        }
    }
}

#[cfg(test)]
mod tests {
    //! Byte-level checks of what libnftnl emits for our expressions and elements,
    //! against the kernel's attribute layout (include/uapi/linux/netfilter/nf_tables.h).
    use super::*;
    use nftnl::{Batch, Chain, ProtoFamily, Table};

    // Attribute numbers from include/uapi/linux/netfilter/nf_tables.h.
    const NFTA_LIST_ELEM: u16 = 1;
    const NFTA_EXPR_NAME: u16 = 1;
    const NFTA_EXPR_DATA: u16 = 2;
    const NFTA_RULE_EXPRESSIONS: u16 = 4;
    const NFTA_SET_TABLE: u16 = 1;
    const NFTA_SET_NAME: u16 = 2;
    const NFTA_SET_FLAGS: u16 = 3;
    const NFTA_SET_KEY_TYPE: u16 = 4;
    const NFTA_SET_KEY_LEN: u16 = 5;
    const NFTA_SET_DATA_TYPE: u16 = 6;
    const NFTA_SET_ID: u16 = 10;
    const NFTA_SET_ELEM_LIST_SET: u16 = 2;
    const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
    const NFTA_SET_ELEM_KEY: u16 = 1;
    const NFTA_SET_ELEM_DATA: u16 = 2;
    const NFTA_SET_ELEM_FLAGS: u16 = 3;

    use crate::kernel::nlmsg::attrs;

    /// The payload of attribute `ty`, which must be there.
    fn attr(b: &[u8], ty: u16) -> &[u8] {
        crate::kernel::nlmsg::attr(b, ty).unwrap_or_else(|| panic!("attribute {ty} missing"))
    }

    /// Serialises a batch into its messages (header + payload after nfgenmsg).
    fn messages(batch: Batch) -> Vec<(u16, u16, Vec<u8>)> {
        let fin = batch.finalize();
        let bytes: Vec<u8> = fin.iter().flatten().copied().collect();
        let mut out = Vec::new();
        let mut b = &bytes[..];
        while b.len() >= 16 {
            let len = u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize;
            let ty = u16::from_ne_bytes([b[4], b[5]]);
            let flags = u16::from_ne_bytes([b[6], b[7]]);
            out.push((ty & 0xff, flags, b[20..len].to_vec()));
            b = &b[len.div_ceil(4) * 4..];
        }
        out
    }

    #[test]
    fn a_table_carries_owner_and_persist_flags_and_a_delete_none() {
        let mut batch = Batch::new();
        let t = TableMsg {
            name: c"cgtproxy".into(),
            flags: TABLE_F_OWNER | TABLE_F_PERSIST,
            family: libc::NFPROTO_INET as u8,
        };
        batch.add(&t, MsgType::Add);
        batch.add(&t, MsgType::Del);
        let msgs = messages(batch);
        let new = msgs
            .iter()
            .find(|(ty, _, _)| *ty == libc::NFT_MSG_NEWTABLE as u16)
            .unwrap();
        // NFTA_TABLE_NAME = 1, NFTA_TABLE_FLAGS = 2 (big-endian).
        assert_eq!(attr(&new.2, 1), b"cgtproxy\0");
        assert_eq!(attr(&new.2, 2), 6u32.to_be_bytes());
        let del = msgs
            .iter()
            .find(|(ty, _, _)| *ty == libc::NFT_MSG_DELTABLE as u16)
            .unwrap();
        assert_eq!(attr(&del.2, 1), b"cgtproxy\0");
        assert!(attrs(&del.2).iter().all(|(ty, _)| *ty != 2), "no flags");
    }

    #[test]
    fn meta_oif_loads_the_output_interface_index() {
        let (name, data) = expr_bytes(&Expr::Meta(MetaKey::Oif));
        assert_eq!(name, "meta");
        // NFTA_META_DREG = 1, NFTA_META_KEY = 2.
        assert_eq!(attr(&data, 2), (libc::NFT_META_OIF as u32).to_be_bytes());
    }

    #[test]
    fn meta_iif_and_fib_daddr_type_load_what_forwarded_traffic_is_judged_by() {
        let (name, data) = expr_bytes(&Expr::Meta(MetaKey::Iif));
        assert_eq!(name, "meta");
        assert_eq!(attr(&data, 2), (libc::NFT_META_IIF as u32).to_be_bytes());
        let (name, data) = expr_bytes(&Expr::FibDaddrType);
        assert_eq!(name, "fib");
        // NFTA_FIB_DREG = 1, NFTA_FIB_RESULT = 2, NFTA_FIB_FLAGS = 3.
        assert_eq!(attr(&data, 1), REG_1.to_be_bytes());
        assert_eq!(attr(&data, 2), 3u32.to_be_bytes());
        assert_eq!(attr(&data, 3), 2u32.to_be_bytes());
        let (name, data) = expr_bytes(&Expr::SetBroute);
        assert_eq!(name, "meta");
        // NFTA_META_KEY = 2, NFTA_META_SREG = 3.
        assert_eq!(attr(&data, 2), 35u32.to_be_bytes());
        assert_eq!(attr(&data, 3), REG_1.to_be_bytes());
        let (_, data) = expr_bytes(&Expr::Verdict(Verdict::Jump(Rc::from(c"forwarded"))));
        let verdict = attr(attr(&data, 2), 2);
        assert_eq!(attr(verdict, 1), (libc::NFT_JUMP as u32).to_be_bytes());
        assert_eq!(attr(verdict, 2), b"forwarded\0");
    }

    /// The NFTA_EXPR_DATA payload of the only expression of a one-expression rule.
    fn expr_bytes(expr: &Expr) -> (String, Vec<u8>) {
        let table = Table::new(c"t", ProtoFamily::Inet);
        let chain = Chain::new(c"c", &table);
        let mut rule = Rule::new(&chain);
        rule.add_expr(expr);
        let mut batch = Batch::new();
        batch.add(&rule, MsgType::Add);
        let msgs = messages(batch);
        let (_, _, payload) = msgs
            .iter()
            .find(|(ty, _, _)| *ty == libc::NFT_MSG_NEWRULE as u16)
            .unwrap();
        let exprs = attr(payload, NFTA_RULE_EXPRESSIONS);
        let elem = attr(exprs, NFTA_LIST_ELEM);
        let name = attr(elem, NFTA_EXPR_NAME);
        let name = String::from_utf8(name.strip_suffix(&[0]).unwrap().to_vec()).unwrap();
        (name, attr(elem, NFTA_EXPR_DATA).to_vec())
    }

    fn be32_attr(ty: u16, v: u32) -> Vec<u8> {
        let mut out = 8u16.to_ne_bytes().to_vec();
        out.extend(ty.to_ne_bytes());
        out.extend(v.to_be_bytes());
        out
    }

    #[test]
    fn tproxy_takes_address_from_reg1_and_port_from_reg2() {
        for family in [libc::NFPROTO_IPV4, libc::NFPROTO_IPV6] {
            let (name, data) = expr_bytes(&Expr::Tproxy {
                family: family as u32,
            });
            assert_eq!(name, "tproxy");
            // NFTA_TPROXY_FAMILY = 1, NFTA_TPROXY_REG_ADDR = 2, NFTA_TPROXY_REG_PORT = 3.
            let mut want = be32_attr(1, family as u32);
            want.extend(be32_attr(2, 1));
            want.extend(be32_attr(3, 2));
            assert_eq!(data, want);
        }
    }

    #[test]
    fn socket_cgroupv2_level() {
        let (name, data) = expr_bytes(&Expr::SocketCgroup { level: 4 });
        assert_eq!(name, "socket");
        // NFTA_SOCKET_KEY = 1 (CGROUPV2 = 3), NFTA_SOCKET_DREG = 2, NFTA_SOCKET_LEVEL = 3.
        let mut want = be32_attr(1, 3);
        want.extend(be32_attr(2, 1));
        want.extend(be32_attr(3, 4));
        assert_eq!(data, want);
    }

    #[test]
    fn vmap_lookup_writes_the_verdict_register() {
        let (name, data) = expr_bytes(&Expr::Lookup {
            set: c"level3".into(),
            sreg: REG_1,
            dreg: Some(REG_VERDICT),
        });
        assert_eq!(name, "lookup");
        // NFTA_LOOKUP_SET = 1, SREG = 2, DREG = 3 (0 = verdict).
        assert_eq!(attr(&data, 1), b"level3\0");
        assert_eq!(attr(&data, 2), 1u32.to_be_bytes());
        assert_eq!(attr(&data, 3), 0u32.to_be_bytes());
    }

    #[test]
    fn data_map_lookup_writes_a_data_register() {
        let (_, data) = expr_bytes(&Expr::Lookup {
            set: c"level3".into(),
            sreg: REG_1,
            dreg: Some(REG_2),
        });
        assert_eq!(attr(&data, 2), 1u32.to_be_bytes());
        assert_eq!(attr(&data, 3), 2u32.to_be_bytes());
    }

    #[test]
    fn data_map_definition_has_type_and_length() {
        let def = SetDef {
            table: c"cgtproxy".into(),
            name: c"level2".into(),
            id: 1,
            key_type: TYPE_CGROUPV2,
            key_len: 8,
            data: Some(Data::Value {
                data_type: TYPE_MARK,
                len: 4,
            }),
            interval: false,
            host_order: true,
            size: None,
        };
        let mut batch = Batch::new();
        batch.add(&def, MsgType::Add);
        let msgs = messages(batch);
        let (_, _, p) = msgs
            .iter()
            .find(|(ty, _, _)| *ty == libc::NFT_MSG_NEWSET as u16)
            .unwrap();
        assert_eq!(attr(p, NFTA_SET_DATA_TYPE), TYPE_MARK.to_be_bytes());
        assert_eq!(attr(p, 7), 4u32.to_be_bytes(), "NFTA_SET_DATA_LEN");
        assert!(
            crate::kernel::nlmsg::attr(p, 9).is_none(),
            "no NFTA_SET_DESC: a level map grows"
        );
        // NFTA_SET_USERDATA = 13: key and data byte order, host-endian.
        let mut udata = vec![0, 4];
        udata.extend(1u32.to_ne_bytes());
        udata.extend([1, 4]);
        udata.extend(1u32.to_ne_bytes());
        assert_eq!(attr(p, 13), udata);
    }

    #[test]
    fn named_counter_reference_and_object() {
        let (name, data) = expr_bytes(&Expr::CounterRef(c"proxy".into()));
        assert_eq!(name, "objref");
        // NFTA_OBJREF_IMM_TYPE = 1 (NFT_OBJECT_COUNTER = 1), NFTA_OBJREF_IMM_NAME = 2,
        // an NLA_STRING the kernel takes without a terminating NUL.
        assert_eq!(attr(&data, 1), 1u32.to_be_bytes());
        assert_eq!(attr(&data, 2), b"proxy");

        let mut batch = Batch::new();
        let obj = CounterObj {
            table: c"cgtproxy".into(),
            name: c"proxy".into(),
        };
        batch.add(&obj, MsgType::Add);
        batch.add(&obj, MsgType::Del);
        let msgs = messages(batch);
        let (_, flags, p) = msgs
            .iter()
            .find(|(ty, _, _)| *ty == libc::NFT_MSG_NEWOBJ as u16)
            .unwrap();
        assert_ne!(*flags & libc::NLM_F_CREATE as u16, 0);
        // NFTA_OBJ_TABLE = 1, NFTA_OBJ_NAME = 2, NFTA_OBJ_TYPE = 3; NFTA_OBJ_DATA
        // (4) without values, so the counter starts at zero.
        assert_eq!(attr(p, 1), b"cgtproxy\0");
        assert_eq!(attr(p, 2), b"proxy\0");
        assert_eq!(attr(p, 3), 1u32.to_be_bytes());
        assert!(attrs(p).iter().all(|(t, d)| *t != 4 || d.is_empty()));
        assert!(
            msgs.iter()
                .any(|(ty, _, _)| *ty == libc::NFT_MSG_DELOBJ as u16)
        );
    }

    #[test]
    fn goto_verdict_names_its_chain() {
        let (name, data) = expr_bytes(&Expr::Verdict(Verdict::Goto(Rc::from(c"p-mark"))));
        assert_eq!(name, "immediate");
        // NFTA_IMMEDIATE_DREG = 1 (verdict), NFTA_IMMEDIATE_DATA = 2 → NFTA_DATA_VERDICT
        // = 2 → NFTA_VERDICT_CODE = 1, NFTA_VERDICT_CHAIN = 2.
        assert_eq!(attr(&data, 1), 0u32.to_be_bytes());
        let verdict = attr(attr(&data, 2), 2);
        assert_eq!(attr(verdict, 1), (libc::NFT_GOTO as u32).to_be_bytes());
        assert_eq!(attr(verdict, 2), b"p-mark\0");
    }

    #[test]
    fn dnat_reads_address_and_port_registers() {
        let (name, data) = expr_bytes(&Expr::Dnat {
            family: libc::NFPROTO_IPV6 as u32,
        });
        assert_eq!(name, "nat");
        // NFTA_NAT_TYPE = 1, FAMILY = 2, REG_ADDR_MIN = 3, REG_PROTO_MIN = 5.
        assert_eq!(attr(&data, 1), (libc::NFT_NAT_DNAT as u32).to_be_bytes());
        assert_eq!(attr(&data, 2), (libc::NFPROTO_IPV6 as u32).to_be_bytes());
        assert_eq!(attr(&data, 3), 1u32.to_be_bytes());
        assert_eq!(attr(&data, 5), 2u32.to_be_bytes());
    }

    #[test]
    fn ct_direction_and_meta_mark_set() {
        let (name, data) = expr_bytes(&Expr::CtDirection);
        assert_eq!(name, "ct");
        // NFTA_CT_DREG = 1, NFTA_CT_KEY = 2.
        assert_eq!(
            attr(&data, 2),
            (libc::NFT_CT_DIRECTION as u32).to_be_bytes()
        );
        assert_eq!(attr(&data, 1), 1u32.to_be_bytes());
        let (name, data) = expr_bytes(&Expr::SetMark);
        assert_eq!(name, "meta");
        // NFTA_META_KEY = 2, NFTA_META_SREG = 3.
        assert_eq!(attr(&data, 2), (libc::NFT_META_MARK as u32).to_be_bytes());
        assert_eq!(attr(&data, 3), 1u32.to_be_bytes());
    }

    #[test]
    fn ct_mark_load_and_set() {
        // NFTA_CT_DREG = 1, NFTA_CT_KEY = 2, NFTA_CT_SREG = 4.
        let (name, data) = expr_bytes(&Expr::CtMark);
        assert_eq!(name, "ct");
        assert_eq!(attr(&data, 2), (libc::NFT_CT_MARK as u32).to_be_bytes());
        assert_eq!(attr(&data, 1), 1u32.to_be_bytes());
        let (name, data) = expr_bytes(&Expr::SetCtMark);
        assert_eq!(name, "ct");
        assert_eq!(attr(&data, 2), (libc::NFT_CT_MARK as u32).to_be_bytes());
        assert_eq!(attr(&data, 4), 1u32.to_be_bytes());
        assert!(attrs(&data).iter().all(|(t, _)| *t != 1), "no destination");
    }

    #[test]
    fn bitwise_masks_register_one_in_place() {
        let (name, data) = expr_bytes(&Expr::Bitwise {
            mask: 0xffff_0000u32.to_ne_bytes().to_vec(),
            xor: vec![0; 4],
        });
        assert_eq!(name, "bitwise");
        // NFTA_BITWISE_SREG = 1, DREG = 2, LEN = 3, MASK = 4, XOR = 5; MASK
        // and XOR nest NFTA_DATA_VALUE (1).
        assert_eq!(attr(&data, 1), 1u32.to_be_bytes());
        assert_eq!(attr(&data, 2), 1u32.to_be_bytes());
        assert_eq!(attr(&data, 3), 4u32.to_be_bytes());
        assert_eq!(attr(attr(&data, 4), 1), 0xffff_0000u32.to_ne_bytes());
        assert_eq!(attr(attr(&data, 5), 1), [0; 4]);
    }

    #[test]
    fn verdict_map_definition() {
        let def = SetDef {
            table: c"cgtproxy".into(),
            name: c"level2".into(),
            id: 7,
            key_type: TYPE_CGROUPV2,
            key_len: 8,
            data: Some(Data::Verdict),
            interval: false,
            host_order: false,
            size: Some(5),
        };
        let mut batch = Batch::new();
        batch.add(&def, MsgType::Add);
        let msgs = messages(batch);
        let (_, flags, p) = msgs
            .iter()
            .find(|(ty, _, _)| *ty == libc::NFT_MSG_NEWSET as u16)
            .unwrap();
        assert_eq!(
            *flags as i32 & libc::NLM_F_EXCL,
            0,
            "re-adding must not fail"
        );
        assert_eq!(attr(p, NFTA_SET_TABLE), b"cgtproxy\0");
        assert_eq!(attr(p, NFTA_SET_NAME), b"level2\0");
        assert_eq!(
            attr(p, NFTA_SET_FLAGS),
            (libc::NFT_SET_MAP as u32).to_be_bytes()
        );
        assert_eq!(attr(p, NFTA_SET_KEY_TYPE), 46u32.to_be_bytes());
        assert_eq!(attr(p, NFTA_SET_KEY_LEN), 8u32.to_be_bytes());
        assert_eq!(
            attr(p, NFTA_SET_DATA_TYPE),
            libc::NFT_DATA_VERDICT.to_be_bytes()
        );
        assert_eq!(attr(p, NFTA_SET_ID), 7u32.to_be_bytes());
        // NFTA_SET_DESC = 9, nesting NFTA_SET_DESC_SIZE = 1.
        assert_eq!(attr(attr(p, 9), 1), 5u32.to_be_bytes());
    }

    #[test]
    fn elements_carry_key_flags_and_verdict() {
        let elems = [
            Elem {
                key: Key::new(&0x1122_3344_5566_7788u64.to_ne_bytes()),
                interval_end: false,
                verdict: Some(Verdict::Goto(Rc::from(c"proxy-mark"))),
                value: None,
            },
            Elem {
                key: Key::new(&[10, 0, 0, 0]),
                interval_end: true,
                verdict: None,
                value: None,
            },
            Elem {
                key: Key::new(&7u64.to_ne_bytes()),
                interval_end: false,
                verdict: None,
                value: Some(Key::new(&3u32.to_ne_bytes())),
            },
        ];
        let msg = Elems {
            table: c"cgtproxy",
            set: c"level5",
            elems: &elems,
        };
        let mut batch = Batch::new();
        batch.add(&msg, MsgType::Add);
        let msgs = messages(batch);
        let (_, flags, p) = msgs
            .iter()
            .find(|(ty, _, _)| *ty == libc::NFT_MSG_NEWSETELEM as u16)
            .unwrap();
        assert_ne!(
            *flags as i32 & libc::NLM_F_EXCL,
            0,
            "a duplicate must be caught"
        );
        assert_eq!(attr(p, NFTA_SET_ELEM_LIST_SET), b"level5\0");
        let list = attrs(attr(p, NFTA_SET_ELEM_LIST_ELEMENTS));
        assert_eq!(list.len(), 3);
        // First: NFTA_SET_ELEM_KEY → NFTA_DATA_VALUE holds the id in host order,
        // as `socket cgroupv2` loads it; NFTA_SET_ELEM_DATA → verdict goto chain.
        let first = list[0].1;
        let key = attr(attr(first, NFTA_SET_ELEM_KEY), 1);
        assert_eq!(key, 0x1122_3344_5566_7788u64.to_ne_bytes());
        let verdict = attr(attr(first, NFTA_SET_ELEM_DATA), 2);
        assert_eq!(attr(verdict, 1), (libc::NFT_GOTO as u32).to_be_bytes());
        assert_eq!(attr(verdict, 2), b"proxy-mark\0");
        // Second: interval end flag.
        let second = list[1].1;
        assert_eq!(
            attr(second, NFTA_SET_ELEM_FLAGS),
            (libc::NFT_SET_ELEM_INTERVAL_END as u32).to_be_bytes()
        );
        assert_eq!(attr(attr(second, NFTA_SET_ELEM_KEY), 1), [10, 0, 0, 0]);
        // Third: a data map element, NFTA_SET_ELEM_DATA → NFTA_DATA_VALUE.
        let third = list[2].1;
        assert_eq!(attr(attr(third, NFTA_SET_ELEM_DATA), 1), 3u32.to_ne_bytes());
    }
}
