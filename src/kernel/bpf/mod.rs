//! The eBPF datapath's kernel side: loads the programs of `cgtproxy.bpf.c`
//! (built by build.rs), fills their maps and attaches them at the cgroup2 root.
//! Loading and attaching need CAP_BPF and CAP_NET_ADMIN (the program types are
//! networking ones); nothing else.
//!
//! The programs are attached through BPF links held by this process: a clean
//! stop or a crash detaches them all, and sockets then connect directly
//! (nothing sends traffic into a listener that may be gone). Each map is
//! filled before any program is attached, so no socket meets a half-built
//! state at start.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData};
use aya::programs::{CgroupAttachMode, Program};
use aya::{Ebpf, include_bytes_aligned};

use crate::core::bpfmaps::{Bypass, TargetEntry};

/// The compiled programs (see build.rs).
static OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/cgtproxy.bpf.o"));

/// The programs, by function name (the kernel keeps 15 characters of it), in
/// the order they are attached: the listener-side ones first, so a redirected
/// connection always finds them.
const PROGRAMS: [&str; 9] = [
    "cgtproxy_getopt",
    "cgtproxy_peer4",
    "cgtproxy_peer6",
    "cgtproxy_recv4",
    "cgtproxy_recv6",
    "cgtproxy_send4",
    "cgtproxy_send6",
    "cgtproxy_conn4",
    "cgtproxy_conn6",
];

/// Every map's name starts with this (see the C source): how another
/// process tells our programs from others', names or not.
const MAP_PREFIX: &str = "cgtp_";
/// The map of classified cgroups.
const CGROUPS: &str = "cgtp_cgroups";

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("eBPF datapath: {step}: {cause}")]
    Step { step: String, cause: String },
    #[error("eBPF datapath: opening the cgroup2 root {}: {source}", path.display())]
    Root {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// `e` and its causes, each once ("a: b: c"); aya keeps the errno in a cause.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}

fn step<E: std::error::Error>(what: impl Into<String>) -> impl FnOnce(E) -> BpfError {
    let step = what.into();
    move |e| BpfError::Step {
        step,
        cause: chain(&e),
    }
}

/// A target's value in the `targets` map (`struct target` in the C source:
/// port in host order, then the two flags).
pub fn encode_target(t: &TargetEntry) -> [u8; 4] {
    let p = t.port.to_ne_bytes();
    [p[0], p[1], u8::from(t.no_udp), u8::from(t.no_ipv6)]
}

/// The loaded and attached programs with their maps. Dropping it detaches
/// everything.
pub struct Datapath {
    /// Holds the programs and their links.
    ebpf: Ebpf,
    cgroups: HashMap<MapData, u64, u32>,
    /// Bumped after every change to `cgroups`: the programs' per-cgroup
    /// class cache holds what it found under the generation it read.
    generation: Array<MapData, u64>,
    changes: u64,
    targets: HashMap<MapData, u32, [u8; 4]>,
    bypass4: LpmTrie<MapData, [u8; 4], u8>,
    bypass6: LpmTrie<MapData, [u8; 16], u8>,
    /// The cgroup2 root the programs are attached at.
    pub root: PathBuf,
}

fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T, BpfError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or_else(|| BpfError::Step {
        step: format!("map {name}"),
        cause: "not in the object".into(),
    })?;
    T::try_from(map).map_err(step(format!("map {name}")))
}

impl Datapath {
    /// Loads the programs for attaching at `root` (a cgroup2 mount's root
    /// directory) later, with [`Datapath::attach`], once the maps are full.
    pub fn load(root: &Path) -> Result<Datapath, BpfError> {
        let mut ebpf = Ebpf::load(OBJECT).map_err(step("loading the object"))?;
        Ok(Datapath {
            cgroups: take(&mut ebpf, CGROUPS)?,
            generation: take(&mut ebpf, "cgtp_generation")?,
            changes: 0,
            targets: take(&mut ebpf, "cgtp_targets")?,
            bypass4: take(&mut ebpf, "cgtp_bypass4")?,
            bypass6: take(&mut ebpf, "cgtp_bypass6")?,
            ebpf,
            root: root.to_owned(),
        })
    }

    /// Loads each program into the kernel and attaches it at the root. On
    /// error, dropping the datapath detaches what was attached.
    pub fn attach(&mut self) -> Result<(), BpfError> {
        let cgroup = File::open(&self.root).map_err(|source| BpfError::Root {
            path: self.root.clone(),
            source,
        })?;
        for name in PROGRAMS {
            self.attach_one(name, Some(&cgroup))?;
        }
        Ok(())
    }

    /// Loads each program into the kernel (the verifier's judgement) without
    /// attaching any: what `doctor` asks. Dropping the datapath unloads them.
    pub fn verify(&mut self) -> Result<(), BpfError> {
        for name in PROGRAMS {
            self.attach_one(name, None)?;
        }
        Ok(())
    }

    /// Loads program `name` and attaches it at `cgroup`, if given.
    fn attach_one(&mut self, name: &str, cgroup: Option<&File>) -> Result<(), BpfError> {
        let prog = self.ebpf.program_mut(name).ok_or_else(|| BpfError::Step {
            step: format!("program {name}"),
            cause: "not in the object".into(),
        })?;
        let what = format!("loading program {name}");
        let attaching = format!("attaching program {name}");
        // Attached as a BPF link (Linux 5.7+), which takes no flags and always
        // runs beside other programs at the root (systemd's, a container
        // runtime's): "single" is the flagless mode.
        let mode = CgroupAttachMode::Single;
        match prog {
            Program::CgroupSockAddr(p) => {
                load(p.load(), &what)?;
                if let Some(c) = cgroup {
                    p.attach(c, mode).map_err(step(attaching))?;
                }
            }
            Program::CgroupSockopt(p) => {
                load(p.load(), &what)?;
                if let Some(c) = cgroup {
                    p.attach(c, mode).map_err(step(attaching))?;
                }
            }
            _ => {
                return Err(BpfError::Step {
                    step: what,
                    cause: "unexpected program type".into(),
                });
            }
        }
        Ok(())
    }

    /// Applies cgroup map changes: deletions first, then writes; then bumps
    /// the map's generation, even after a partial write (what the programs'
    /// cache holds may be stale then too).
    pub fn update(&mut self, del: &[u64], add: &[(u64, u32)]) -> Result<(), BpfError> {
        let written = self.write_cgroups(del, add);
        self.changes += 1;
        let bumped = self
            .generation
            .set(0, self.changes, 0)
            .map_err(step("bumping the cgroups map's generation"));
        written.and(bumped)
    }

    fn write_cgroups(&mut self, del: &[u64], add: &[(u64, u32)]) -> Result<(), BpfError> {
        for id in del {
            match self.cgroups.remove(id) {
                Ok(()) => {}
                // Already gone: the goal is met.
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(step(format!("deleting cgroup {id}"))(e)),
            }
        }
        for (id, class) in add {
            self.cgroups
                .insert(id, class, 0)
                .map_err(step(format!("writing cgroup {id}")))?;
        }
        Ok(())
    }

    /// Makes the `cgroups` map hold exactly `want`.
    pub fn replace_cgroups(&mut self, want: &BTreeMap<u64, u32>) -> Result<(), BpfError> {
        let stale: Vec<u64> = self
            .cgroups
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !want.contains_key(k))
            .collect();
        let add: Vec<(u64, u32)> = want.iter().map(|(k, v)| (*k, *v)).collect();
        self.update(&stale, &add)
    }

    /// Makes the `targets` map hold exactly `want`.
    pub fn set_targets(&mut self, want: &BTreeMap<u32, TargetEntry>) -> Result<(), BpfError> {
        for (class, t) in want {
            self.targets
                .insert(class, encode_target(t), 0)
                .map_err(step(format!("writing target {class}")))?;
        }
        let stale: Vec<u32> = self
            .targets
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !want.contains_key(k))
            .collect();
        for class in stale {
            self.targets
                .remove(&class)
                .map_err(step(format!("deleting target {class}")))?;
        }
        Ok(())
    }

    /// Makes the bypass tries hold exactly `want`.
    pub fn set_bypass(&mut self, want: &Bypass) -> Result<(), BpfError> {
        sync_trie(&mut self.bypass4, &want.v4, "IPv4")?;
        sync_trie(&mut self.bypass6, &want.v6, "IPv6")
    }
}

/// Makes a bypass trie hold exactly the networks `want` ((address, prefix
/// length) pairs of family `family`).
fn sync_trie<K>(
    trie: &mut LpmTrie<MapData, K, u8>,
    want: &[(K, u32)],
    family: &str,
) -> Result<(), BpfError>
where
    K: aya::Pod + PartialEq,
{
    for (addr, len) in want {
        trie.insert(&Key::new(*len, *addr), 1, 0)
            .map_err(step(format!("writing an {family} bypass network")))?;
    }
    let stale: Vec<Key<K>> = trie
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !want.contains(&(k.data(), k.prefix_len())))
        .collect();
    for k in stale {
        trie.remove(&k)
            .map_err(step(format!("deleting an {family} bypass network")))?;
    }
    Ok(())
}

/// What a running daemon's eBPF datapath holds, as another process reads it
/// (needs CAP_SYS_ADMIN to open programs and maps by id).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Installed {
    /// Our programs loaded in the kernel (each held attached by the daemon's
    /// links). Found by their maps: the loader gives them no name when it
    /// cannot probe for names (without CAP_PERFMON, as under the unit).
    pub programs: usize,
    /// The `cgroups` map: cgroup id → class.
    pub cgroups: BTreeMap<u64, u32>,
}

/// Finds a running daemon's programs and reads its `cgroups` map; `None` when
/// none of our programs is loaded.
pub fn inspect() -> Result<Option<Installed>, BpfError> {
    let mut found = Installed::default();
    let mut names: BTreeMap<u32, String> = BTreeMap::new();
    let mut cgroups_map = None;
    for info in aya::programs::loaded_programs() {
        let info = info.map_err(step("listing the loaded BPF programs"))?;
        let ids = info
            .map_ids()
            .map_err(step("the maps of a loaded program"))?
            .unwrap_or_default();
        let mut ours = false;
        for id in ids {
            let name = match names.get(&id) {
                Some(n) => n.clone(),
                None => {
                    let m = aya::maps::MapInfo::from_id(id).map_err(step(format!("map {id}")))?;
                    let n = m.name_as_str().unwrap_or_default().to_owned();
                    names.insert(id, n.clone());
                    n
                }
            };
            ours |= name.starts_with(MAP_PREFIX);
            if name == CGROUPS {
                cgroups_map = Some(id);
            }
        }
        found.programs += usize::from(ours);
    }
    if found.programs == 0 {
        return Ok(None);
    }
    if let Some(id) = cgroups_map {
        let data = MapData::from_id(id).map_err(step(format!("map {id}")))?;
        let map = aya::maps::Map::from_map_data(data).map_err(step(format!("map {id}")))?;
        let cgroups: HashMap<MapData, u64, u32> =
            HashMap::try_from(map).map_err(step(format!("map {id}")))?;
        found.cgroups = cgroups.iter().filter_map(Result::ok).collect();
    }
    Ok(Some(found))
}

/// How much of a refusing verifier's log an error keeps: its last lines
/// say why; the whole log is thousands of lines of register states.
const VERIFIER_TAIL: usize = 12;

fn load(r: Result<(), aya::programs::ProgramError>, what: &str) -> Result<(), BpfError> {
    match r {
        Err(aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        }) => {
            let log = verifier_log.to_string();
            let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
            let tail = lines[lines.len().saturating_sub(VERIFIER_TAIL)..].join("\n  ");
            Err(BpfError::Step {
                step: what.to_owned(),
                cause: format!(
                    "the kernel refused it ({io_error}); the verifier's last words:\n  {tail}"
                ),
            })
        }
        r => r.map_err(step(what)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_is_its_port_in_host_order_then_the_flags() {
        let t = TargetEntry {
            port: 0x1ed5,
            no_udp: true,
            no_ipv6: false,
        };
        let p = 0x1ed5u16.to_ne_bytes();
        assert_eq!(encode_target(&t), [p[0], p[1], 1, 0]);
    }

    #[test]
    fn the_object_holds_every_program_and_map() {
        let text = String::from_utf8_lossy(OBJECT);
        for name in PROGRAMS.iter().chain(&[
            CGROUPS,
            "cgtp_targets",
            "cgtp_bypass4",
            "cgtp_bypass6",
            "cgtp_by_cookie",
            "cgtp_by_port",
            "cgtp_udp",
            "cgtp_generation",
            "cgtp_class_cache",
            "cgtp_flow_of",
            "cgtp_flows",
        ]) {
            assert!(text.contains(name), "{name} missing from the object");
        }
    }
}
