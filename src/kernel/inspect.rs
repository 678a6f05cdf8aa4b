//! Reads the installed state back from the kernel (for `status` and `explain`):
//! our table's level maps with their elements, and the per-target counters.
//! Plain netlink dumps, parsed here with bounds-checked byte code.

use std::collections::BTreeMap;

use netlink_sys::constants::NETLINK_NETFILTER;

use crate::kernel::consts::{
    NFT_MSG_GETOBJ, NFT_MSG_GETSET, NFT_MSG_GETSETELEM, NFT_MSG_GETTABLE, NLM_F_DUMP,
    NLM_F_REQUEST, SUBSYS_NFTABLES,
};
use crate::kernel::nlmsg::{Channel, attr, attrs, c_str};

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("opening the nftables netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("{step}: {source}")]
    Io {
        step: String,
        source: std::io::Error,
    },
    #[error("{step}: {errno}")]
    Kernel { step: String, errno: nix::Error },
}

/// A table's flags and owner, as the kernel reports them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TableState {
    /// `NFT_TABLE_F_*` bits (owner 2, persist 4).
    pub flags: u32,
    /// The netlink port id of the owning socket, when the table is owned.
    pub owner: Option<u32>,
}

/// Our table as installed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Installed {
    pub state: TableState,
    /// Level → (cgroup id → class, see `table::class`).
    pub maps: BTreeMap<u32, BTreeMap<u64, u32>>,
    /// Named counter (one per target, named after it) → (packets, bytes).
    pub counters: BTreeMap<String, (u64, u64)>,
    /// The interface map: interface index → class.
    pub ifaces: BTreeMap<u32, u32>,
}

fn string(b: &[u8]) -> String {
    String::from_utf8_lossy(c_str(b)).into_owned()
}

fn be64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(..8)?.try_into().ok()?))
}

/// Parses one NFT_MSG_NEWSETELEM payload (after nfgenmsg) of a level map into
/// (cgroup id, class).
fn parse_elems(payload: &[u8], out: &mut BTreeMap<u64, u32>) {
    // Keys are cgroup ids (8 bytes) or interface indices (4), host-endian.
    // NFTA_SET_ELEM_LIST_ELEMENTS = 3 → NFTA_LIST_ELEM = 1 each.
    let Some(list) = attr(payload, 3) else { return };
    for (_, elem) in attrs(list) {
        // NFTA_SET_ELEM_KEY = 1 and NFTA_SET_ELEM_DATA = 2, each → NFTA_DATA_VALUE = 1.
        let value = |ty| attr(elem, ty).and_then(|k| attr(k, 1));
        let id = value(1).and_then(|k| match k.len() {
            8 => k.try_into().ok().map(u64::from_ne_bytes),
            4 => k.try_into().ok().map(u32::from_ne_bytes).map(u64::from),
            _ => None,
        });
        let class = value(2)
            .and_then(|d| d.get(..4))
            .and_then(|d| d.try_into().ok())
            .map(u32::from_ne_bytes);
        if let (Some(id), Some(class)) = (id, class) {
            out.insert(id, class);
        }
    }
}

/// Parses one NFT_MSG_NEWOBJ payload (after nfgenmsg) of a counter object into
/// (name, packets, bytes).
fn parse_counter(payload: &[u8]) -> Option<(String, u64, u64)> {
    // NFTA_OBJ_NAME = 2, NFTA_OBJ_TYPE = 3 (NFT_OBJECT_COUNTER = 1), NFTA_OBJ_DATA = 4
    // → NFTA_COUNTER_BYTES = 1, NFTA_COUNTER_PACKETS = 2.
    if attr(payload, 3)? != 1u32.to_be_bytes() {
        return None;
    }
    let name = attr(payload, 2).map(string)?;
    let data = attr(payload, 4)?;
    let bytes = attr(data, 1).and_then(be64).unwrap_or(0);
    let packets = attr(data, 2).and_then(be64).unwrap_or(0);
    Some((name, packets, bytes))
}

/// A dump request: header, nfgenmsg (inet) and string attributes.
fn request(msg: u16, seq: u32, strings: &[(u16, &str)]) -> Vec<u8> {
    let mut body = vec![libc::NFPROTO_INET as u8, 0, 0, 0];
    for (ty, s) in strings {
        let l = 4 + s.len() + 1;
        body.extend((l as u16).to_ne_bytes());
        body.extend(ty.to_ne_bytes());
        body.extend(s.as_bytes());
        body.push(0);
        body.resize(body.len().div_ceil(4) * 4, 0);
    }
    let mut m = Vec::with_capacity(16 + body.len());
    m.extend(((16 + body.len()) as u32).to_ne_bytes());
    m.extend(((SUBSYS_NFTABLES << 8) | msg).to_ne_bytes());
    m.extend((NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend(seq.to_ne_bytes());
    m.extend(0u32.to_ne_bytes());
    m.extend(body);
    m
}

struct Dumper {
    chan: Channel,
}

impl Dumper {
    fn open() -> Result<Dumper, InspectError> {
        Ok(Dumper {
            chan: Channel::open(NETLINK_NETFILTER, 256 * 1024).map_err(InspectError::Socket)?,
        })
    }

    /// Runs one dump and hands every reply payload (after the netlink header) to `f`.
    /// `Ok(false)` when the kernel answers ENOENT (no such table or set).
    fn dump(
        &mut self,
        msg: u16,
        strings: &[(u16, &str)],
        step: &str,
        mut f: impl FnMut(&[u8]),
    ) -> Result<bool, InspectError> {
        let errno = self
            .chan
            .exchange(|seq| request(msg, seq, strings), |m| f(m.payload()))
            .map_err(|source| InspectError::Io {
                step: step.to_owned(),
                source,
            })?
            .unwrap_or(0);
        match -errno {
            0 => Ok(true),
            libc::ENOENT => Ok(false),
            e => Err(InspectError::Kernel {
                step: step.to_owned(),
                errno: nix::Error::from_raw(e),
            }),
        }
    }
}

fn be32(b: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?))
}

/// Parses one NFT_MSG_NEWTABLE payload (nfgenmsg included): the state of table
/// `name` of family inet, or `None` for another table.
fn parse_table(p: &[u8], name: &str) -> Option<TableState> {
    if p.first() != Some(&(libc::NFPROTO_INET as u8)) {
        return None;
    }
    let a = p.get(4..)?;
    // NFTA_TABLE_NAME = 1, NFTA_TABLE_FLAGS = 2, NFTA_TABLE_OWNER = 7.
    if attr(a, 1).map(string).as_deref() != Some(name) {
        return None;
    }
    Some(TableState {
        flags: attr(a, 2).and_then(be32).unwrap_or(0),
        owner: attr(a, 7).and_then(be32),
    })
}

fn find_table(d: &mut Dumper, table: &str) -> Result<Option<TableState>, InspectError> {
    let mut found = None;
    d.dump(NFT_MSG_GETTABLE, &[], "listing tables", |p| {
        if let Some(t) = parse_table(p, table) {
            found = Some(t);
        }
    })?;
    Ok(found)
}

/// The flags and owner of table `table` (inet); `None` when it does not exist.
pub fn table_state(table: &str) -> Result<Option<TableState>, InspectError> {
    find_table(&mut Dumper::open()?, table)
}

/// Reads table `table` (inet) from the kernel; `None` when it does not exist.
pub fn read(table: &str) -> Result<Option<Installed>, InspectError> {
    let mut d = Dumper::open()?;
    let Some(state) = find_table(&mut d, table)? else {
        return Ok(None);
    };
    let mut maps = Vec::new();
    d.dump(NFT_MSG_GETSET, &[(1, table)], "listing sets", |p| {
        // NFTA_SET_NAME = 2.
        if let Some(name) = attr(&p[4.min(p.len())..], 2).map(string)
            && let Some(level) = name.strip_prefix("level").and_then(|l| l.parse().ok())
        {
            maps.push((level, name));
        }
    })?;
    let mut installed = Installed {
        state,
        ..Installed::default()
    };
    for (level, name) in maps {
        let mut elems = BTreeMap::new();
        d.dump(
            NFT_MSG_GETSETELEM,
            &[(1, table), (2, &name)],
            &format!("listing map {name}"),
            |p| parse_elems(&p[4.min(p.len())..], &mut elems),
        )?;
        installed.maps.insert(level, elems);
    }
    let mut ifaces = BTreeMap::new();
    d.dump(
        NFT_MSG_GETSETELEM,
        &[(1, table), (2, crate::core::table::IFACES)],
        "listing map ifaces",
        |p| parse_elems(&p[4.min(p.len())..], &mut ifaces),
    )?;
    installed.ifaces = ifaces
        .into_iter()
        .filter_map(|(k, v)| u32::try_from(k).ok().map(|k| (k, v)))
        .collect();
    // NFTA_OBJ_TABLE = 1.
    d.dump(NFT_MSG_GETOBJ, &[(1, table)], "listing counters", |p| {
        if let Some((name, packets, bytes)) = parse_counter(&p[4.min(p.len())..]) {
            installed.counters.insert(name, (packets, bytes));
        }
    })?;
    Ok(Some(installed))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::kernel::nlmsg::encode_attr as nla;

    #[test]
    fn elements_with_classes_are_parsed() {
        let elem = |id: u64, class: u32| {
            let mut e = nla(1, &nla(1, &id.to_ne_bytes()));
            e.extend(nla(2, &nla(1, &class.to_ne_bytes())));
            nla(1, &e)
        };
        let mut list = elem(11, 3);
        list.extend(elem(12, 2));
        list.extend(nla(1, &nla(1, &nla(1, &13u64.to_ne_bytes()))));
        let mut out = BTreeMap::new();
        parse_elems(&nla(3, &list), &mut out);
        assert_eq!(out, [(11, 3), (12, 2)].into());
    }

    #[test]
    fn table_flags_and_owner_are_parsed() {
        let mut p = vec![libc::NFPROTO_INET as u8, 0, 0, 0];
        p.extend(nla(1, b"cgtproxy\0"));
        p.extend(nla(2, &6u32.to_be_bytes()));
        p.extend(nla(7, &4242u32.to_be_bytes()));
        assert_eq!(
            parse_table(&p, "cgtproxy"),
            Some(TableState {
                flags: 6,
                owner: Some(4242)
            })
        );
        assert_eq!(parse_table(&p, "other"), None);
        p[0] = libc::NFPROTO_IPV4 as u8;
        assert_eq!(parse_table(&p, "cgtproxy"), None, "not inet");
    }

    #[test]
    fn counter_objects_are_parsed() {
        let data = {
            let mut d = nla(1, &500u64.to_be_bytes());
            d.extend(nla(2, &7u64.to_be_bytes()));
            d
        };
        let mut p = nla(1, b"cgtproxy\0");
        p.extend(nla(2, b"proxy\0"));
        p.extend(nla(3, &1u32.to_be_bytes()));
        p.extend(nla(4, &data));
        assert_eq!(parse_counter(&p), Some(("proxy".into(), 7, 500)));
        let mut quota = nla(2, b"q\0");
        quota.extend(nla(3, &2u32.to_be_bytes()));
        quota.extend(nla(4, &data));
        assert_eq!(parse_counter(&quota), None, "not a counter object");
    }
}
