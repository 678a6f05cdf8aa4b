//! `cgtproxy run`: the event loop. It polls the inotify descriptor, a signalfd and a
//! timerfd (retries, deferred status) and nothing else, so an idle daemon never
//! wakes up.

pub mod notify;
pub mod runstate;

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use tracing::{debug, error, info, warn};

use crate::config::{Config, ConfigError, Datapath};
use crate::core::bpfmaps;
use crate::core::cgroup::is_within;
use crate::core::links::{self, LinkPlan, Why};
use crate::core::precedence::{self, Placement};
use crate::core::schedule::{HEAL_WINDOW, Schedule};
use crate::core::table;
use crate::core::tree::{self, Delta, Tree};
use crate::kernel::bpf::{self, BpfError};
use crate::kernel::events::{Damage, Events, EventsError};
use crate::kernel::inspect::{self, InspectError};
use crate::kernel::links::{Links, LinksError};
use crate::kernel::nft::{Nft, NftError, TABLE_F_OWNER, TABLE_F_PERSIST, Txn};
use crate::kernel::route::{self, RouteError, Routes};
use crate::watch::containers::Containers;
use crate::watch::hierarchy::{CgroupError, Hierarchy};
use crate::watch::inotify::{Change, WatchError, Watcher};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error("installing the nftables table: {0}")]
    Nft(#[from] NftError),
    #[error("installing policy routing: {0}")]
    Route(#[from] RouteError),
    #[error(transparent)]
    Events(#[from] EventsError),
    #[error(transparent)]
    Links(#[from] LinksError),
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error(
        "the datapath changes from {from} to {to}: that needs a restart (`systemctl restart cgtproxy`), not a reload"
    )]
    DatapathChange { from: Datapath, to: Datapath },
    #[error("reading table inet {table} back: {source}")]
    Inspect { table: String, source: InspectError },
    #[error("{step}: {source}")]
    Sys {
        step: &'static str,
        source: nix::Error,
    },
    #[error("cleanup failed: {0}")]
    Cleanup(String),
    #[error(
        "table inet {table} belongs to another process (flag owner): is another cgtproxy running? (`nft list tables` names it)"
    )]
    Owned { table: String },
}

fn sys(step: &'static str) -> impl FnOnce(nix::Error) -> DaemonError {
    move |source| DaemonError::Sys { step, source }
}

/// Whether table `name` exists now; an error if another process owns it.
fn table_exists(nft: &Nft, name: &str) -> Result<bool, DaemonError> {
    let state = inspect::table_state(name).map_err(|source| DaemonError::Inspect {
        table: name.to_owned(),
        source,
    })?;
    match state {
        Some(t) if t.owner.is_some_and(|o| o != nft.port()) => Err(DaemonError::Owned {
            table: name.to_owned(),
        }),
        s => Ok(s.is_some()),
    }
}

/// Replaces the whole table with the desired one in one transaction, with the
/// wanted interfaces in the interface map and bridge ports routed (a bridge
/// table, replaced or removed when `bridge_present` says one may be there);
/// `also` names a previous table (renamed by a reload) to delete in the same
/// breath. A table of the same name left by an earlier instance (a crash
/// leaves it, flagged persist) is replaced, which adopts it. Returns the
/// number of elements installed, and the levels.
fn install_table(
    nft: &mut Nft,
    caps: Caps,
    want: Want<'_>,
    bridge_present: bool,
    also: Option<&str>,
) -> Result<(usize, BTreeSet<u32>), DaemonError> {
    let Want {
        cfg,
        tree,
        links,
        generation,
    } = want;
    let Caps {
        table_flags: flags,
        can_broute,
    } = caps;
    let elements = tree.element_list();
    let levels = table::levels(&elements);
    let spec = table::table(
        cfg,
        &levels,
        &elements,
        &links.elements,
        &links.broute,
        can_broute,
        generation,
    );
    let mut txn = Txn::large();
    if let Some(old) = also.filter(|o| *o != spec.name) {
        if table_exists(nft, old)? {
            txn.delete_table(old)?;
        }
        if bridge_present {
            txn.replace_bridge(old, &[], can_broute, flags)?;
        }
    }
    txn.replace_table(&spec, table_exists(nft, &spec.name)?, flags)?;
    if bridge_present || !spec.broute.is_empty() {
        txn.replace_bridge(&spec.name, &spec.broute, can_broute, flags)?;
    }
    nft.commit(txn)?;
    Ok((elements.len(), levels))
}

/// What the kernel can do, probed at start.
#[derive(Debug, Clone, Copy)]
struct Caps {
    /// The table flags it takes (`owner`, `persist`).
    table_flags: u32,
    /// Whether it can route bridge ports (`meta broute`).
    can_broute: bool,
}

/// What the table should hold: for this configuration, tree and interfaces,
/// with the connection tag of `generation` (see `table::output_chain`).
#[derive(Clone, Copy)]
struct Want<'a> {
    cfg: &'a Config,
    tree: &'a Tree,
    links: &'a LinkPlan,
    generation: u16,
}

struct Daemon {
    config_path: Option<PathBuf>,
    cfg: Config,
    watcher: Watcher,
    tree: Tree,
    nft: Nft,
    routes: Routes,
    /// How many map elements the kernel holds now. Which ones is not kept: while
    /// not `dirty` they are the tree's, since a failed update sets `dirty` and the
    /// rebuild that follows installs the tree whole (at 50,000 cgroups a copy
    /// would cost a megabyte).
    installed: usize,
    /// Levels with a map and a rule in the classify chain: those the tree
    /// looks up, as last committed.
    levels: BTreeSet<u32>,
    /// The output chain's generation: connections it tagged at another one
    /// are classified again (see `table::output_chain`). Every transaction
    /// that may change what an existing socket decides takes the next.
    generation: u16,
    route_plan: route::Plan,
    caps: Caps,
    /// Why the daemon is degraded (part of the tree unwatched), if it is.
    degraded: Option<String>,
    /// A foreign ip rule at priority 0 that takes marked packets before ours.
    blocked_by: Option<String>,
    /// Set after a failed update: the next retry rebuilds the whole table.
    dirty: bool,
    /// Retries, repairs, walks of the tree and deferred status lines.
    sched: Schedule,
    culprit: Option<String>,
    events: Events,
    timer: TimerFd,
    /// The deadline the timer is set for, until it fires.
    armed: Option<Instant>,
    links: Links,
    containers: Containers,
    /// The interfaces that classify forwarded traffic, and why.
    link_plan: LinkPlan,
    /// The interface map the kernel holds now (index → class).
    ifaces: BTreeMap<u32, u32>,
    /// The bridge ports the kernel routes now (see `table::broute_chain`).
    broute: Vec<u32>,
    /// The eBPF datapath, when the configuration chose it: then there is no
    /// table, no routing and no interface map.
    bpf: Option<bpf::Datapath>,
}

/// The interfaces that classify forwarded traffic (see `Containers::plan`), with
/// a warning for each bridge port that this kernel cannot route.
fn planned(
    containers: &mut Containers,
    links: &mut Links,
    hier: &Hierarchy,
    cfg: &Config,
    tree: &Tree,
    can_broute: bool,
) -> Result<LinkPlan, LinksError> {
    let mut plan = containers.plan(links, hier, cfg, tree, Instant::now())?;
    if !can_broute {
        links::note_no_broute(cfg, &mut plan);
    }
    Ok(plan)
}

/// Adds to `txn` what turns the installed interface map and routed bridge
/// ports into `plan`'s; false when nothing differs. One transaction: a port
/// is never routed without its class, whatever the order inside it. The
/// prerouting chain looks at forwarded traffic only while some interface is
/// classified (see `table::prerouting_chain`): it is rewritten when the first
/// comes or the last goes.
fn link_changes(
    txn: &mut Txn,
    cfg: &Config,
    (ifaces, broute): (&BTreeMap<u32, u32>, &[u32]),
    plan: &LinkPlan,
    caps: Caps,
) -> Result<bool, NftError> {
    let table = &cfg.table;
    let (del, add) = links::diff(ifaces, &plan.elements);
    let broute_changed = plan.broute != broute;
    if del.is_empty() && add.is_empty() && !broute_changed {
        return Ok(false);
    }
    txn.iface_elements(table, &del, &add)?;
    let forwarded = !plan.elements.is_empty();
    if ifaces.is_empty() == forwarded {
        txn.rewrite_chain(table, &table::prerouting_chain(cfg, forwarded))?;
    }
    if broute_changed {
        txn.replace_bridge(table, &plan.broute, caps.can_broute, caps.table_flags)?;
    }
    Ok(true)
}

/// Logs what `new` says that `old` did not: warnings, and interfaces with a
/// new verdict.
fn announce(cfg: &Config, old: &LinkPlan, new: &LinkPlan) {
    for w in new.warnings.iter().filter(|w| !old.warnings.contains(w)) {
        warn!("{w}");
    }
    for e in new.entries.iter().filter(|e| !old.entries.contains(e)) {
        info!(
            "forwarded traffic from interface {} ({}): {}",
            e.name,
            why(cfg, e),
            links::describe(cfg, e.action)
        );
    }
}

/// How an interface got its verdict, for the log.
fn why(cfg: &Config, e: &links::Entry) -> String {
    match &e.why {
        Why::Rule(i) => format!("interfaces[{i}] /{}/", cfg.interfaces[*i].regex),
        Why::Port(i) => format!(
            "a port of a bridge interfaces[{i}] /{}/ matches",
            cfg.interfaces[*i].regex
        ),
        Why::Container(path) => format!("container {path}"),
    }
}

/// Environment variable of the test-only knob that creates the table without flags.
pub const TEST_NO_TABLE_FLAGS_ENV: &str = "CGTPROXY_TEST_NO_TABLE_FLAGS";

/// The routing entries for `cfg`, at the priority `placement` chose.
fn route_plan(cfg: &Config, placement: &Placement) -> route::Plan {
    let marks = match cfg.datapath {
        Datapath::Nft => cfg.targets.iter().map(|t| t.mark).collect(),
        // Nothing is marked: no ip rules, no route.
        Datapath::Ebpf => Vec::new(),
    };
    route::Plan {
        table: cfg.route_table,
        marks,
        priority: placement.priority(),
    }
}

/// Where `cfg`'s ip rules must go among the rules installed now. If they cannot
/// be read, the configured priority (the next rule event tries again).
fn placement(routes: &mut Routes, cfg: &Config) -> Placement {
    let marks: Vec<u32> = cfg.targets.iter().map(|t| t.mark).collect();
    match routes.all_rules() {
        Ok(rules) => precedence::placement(cfg.rule_priority, &rules, &marks, cfg.route_table),
        Err(e) => {
            error!(
                "{e}; keeping our ip rules at priority {}",
                cfg.rule_priority
            );
            Placement::Configured(cfg.rule_priority)
        }
    }
}

/// The kernel's inotify watch limit, for messages.
fn watch_limit() -> String {
    std::fs::read_to_string("/proc/sys/fs/inotify/max_user_watches")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

impl Daemon {
    fn status(&self) -> String {
        let (direct, drop, per) = self.tree.counts(self.cfg.targets.len());
        let targets: Vec<String> = self
            .cfg
            .targets
            .iter()
            .zip(per)
            .map(|(t, n)| format!("{} {n}", t.name))
            .collect();
        let mut problems = Vec::new();
        if let Some(d) = &self.degraded {
            problems.push(format!("degraded: {d}; "));
        }
        if let Some(b) = &self.blocked_by {
            problems.push(format!("blocked: ip rule {b} takes marked packets first; "));
        }
        let forwarded = match self.link_plan.entries.len() {
            0 => String::new(),
            n => format!("; {n} interfaces for forwarded traffic"),
        };
        format!(
            "{}{} cgroups: direct {direct}, drop {drop}{}{}; {} map elements{forwarded}",
            problems.concat(),
            self.tree.len(),
            if targets.is_empty() { "" } else { ", " },
            targets.join(", "),
            self.installed
        )
    }

    /// Keeps our ip rules ahead of any foreign rule that could take marked
    /// packets first (see [`precedence`]), moving them when such a rule comes or
    /// goes. The new rules go in before the old ones go out.
    fn place(&mut self) {
        let p = placement(&mut self.routes, &self.cfg);
        match &p {
            Placement::Blocked { by, .. } => {
                if self.blocked_by.as_ref() != Some(by) {
                    error!(
                        "ip rule {by} takes packets marked for our targets before our rules, at priority 0 where nothing can precede it: their traffic is dropped, not sent past the proxy, until that rule goes"
                    );
                    self.blocked_by = Some(by.clone());
                    self.publish_status();
                }
            }
            _ => {
                if self.blocked_by.take().is_some() {
                    info!("no ip rule at priority 0 takes marked packets any more");
                    self.publish_status();
                }
            }
        }
        if p.priority() == self.route_plan.priority || self.route_plan.marks.is_empty() {
            return;
        }
        match &p {
            Placement::Ahead { priority, of } => warn!(
                "ip rule {of} could take marked packets before ours: moving our rules from priority {} to {priority}",
                self.route_plan.priority
            ),
            _ => info!(
                "no foreign ip rule precedes priority {} any more: moving our rules back there",
                self.cfg.rule_priority
            ),
        }
        let mut plan = self.route_plan.clone();
        plan.priority = p.priority();
        match self.routes.install(&plan) {
            Ok(()) => self.route_plan = plan,
            Err(e) => {
                // The repair reinstalls routing as it stands, then places again.
                error!("moving our ip rules: {e}; repairing");
                self.sched.heal.damaged(Instant::now());
                self.arm_timer();
            }
        }
    }

    /// Enters (or stays in) the degraded state: what is installed stays, and
    /// the tree is walked again after a growing delay.
    fn degrade(&mut self, reason: String) {
        if self.degraded.is_none() {
            error!(
                "degraded: {reason}; the installed rules stay in place; walking the tree again in {:?}",
                self.sched.rescan.delay()
            );
        }
        if self.degraded.as_ref() != Some(&reason) {
            runstate::set_degraded(&reason);
            self.degraded = Some(reason);
            self.publish_status();
        }
        self.sched.rescan.arm(Instant::now());
        self.arm_timer();
    }

    /// After a walk: degraded while part of the tree is unwatched, whole again
    /// once all of it is.
    fn check_watched(&mut self) {
        match self.watcher.unwatched() {
            Some((first, n)) => {
                let reason = format!(
                    "{n} cgroup directories are not watched (the first: {first}): the inotify watch limit (fs.inotify.max_user_watches = {}) is reached, so cgroups created below them are not classified on their own; raise it, e.g. `sysctl fs.inotify.max_user_watches=524288`",
                    watch_limit()
                );
                self.degrade(reason);
            }
            None => {
                if self.degraded.take().is_some() {
                    info!("the whole cgroup tree is watched again; no longer degraded");
                    runstate::clear();
                    self.publish_status();
                }
                self.sched.rescan.reset();
            }
        }
    }

    /// Walks the whole tree again and converges on it.
    fn rescan(&mut self) {
        match self.watcher.scan() {
            Ok(all) => {
                let before = self.tree.elements();
                self.tree = Tree::build(&self.cfg, &all);
                let delta = tree::diff(&before, &self.tree.elements());
                self.converge(delta);
                self.check_watched();
            }
            Err(e) => self.degrade(e.to_string()),
        }
    }

    /// The interface map and the routed bridge ports the kernel holds now.
    fn installed_links(&self) -> (&BTreeMap<u32, u32>, &[u32]) {
        (&self.ifaces, &self.broute)
    }

    /// Lists links and containers again and brings the interface map in line.
    /// On failure the map stays as it is (fail closed) and a retry follows.
    fn refresh_links(&mut self) {
        while self.refresh_links_once() {}
    }

    /// [`Daemon::refresh_links`] once; true when a new cgroup turned out to
    /// have a process after all and is to be looked at again at once.
    fn refresh_links_once(&mut self) -> bool {
        if self.bpf.is_some() {
            return false;
        }
        let plan = match planned(
            &mut self.containers,
            &mut self.links,
            self.watcher.hierarchy(),
            &self.cfg,
            &self.tree,
            self.caps.can_broute,
        ) {
            Ok(p) => p,
            Err(e) => {
                error!("{e}; the interfaces keep their verdicts; looking again soon");
                self.sched.probes.look_again(Instant::now());
                self.arm_timer();
                return false;
            }
        };
        announce(&self.cfg, &self.link_plan, &plan);
        for path in self.containers.take_done() {
            self.watcher.unwatch_populated(&path);
        }
        // New cgroups still followed up after their first look get the
        // populated watch (most hosts have no container link, and then none
        // is needed); an empty one is read once more, for a process that
        // came in between.
        let mut arrived = false;
        for (path, empty) in self.containers.to_watch() {
            self.watcher.watch_populated(&path);
            if empty && self.watcher.hierarchy().populated(&path) != Some(false) {
                self.containers.populated(&path, Instant::now());
                arrived = true;
            }
        }
        self.link_plan = plan;
        let mut txn = Txn::new();
        let done = match link_changes(
            &mut txn,
            &self.cfg,
            self.installed_links(),
            &self.link_plan,
            self.caps,
        ) {
            Ok(false) => return arrived,
            Ok(true) => self.nft.commit(txn),
            Err(e) => Err(e),
        };
        match done {
            Ok(()) => {
                self.ifaces = self.link_plan.elements.clone();
                self.broute = self.link_plan.broute.clone();
                self.publish_status();
            }
            Err(e) => self.rebuild_later("the interfaces of ", e),
        }
        arrived
    }

    /// Rebuilds the whole table from the current configuration and tree.
    fn replace_all(&mut self) -> Result<(), DaemonError> {
        if let Some(b) = self.bpf.as_mut() {
            let elements = self.tree.elements();
            b.set_targets(&bpfmaps::targets(&self.cfg))?;
            b.set_bypass(&bpfmaps::bypass(&self.cfg))?;
            b.replace_cgroups(&bpfmaps::cgroups(&self.cfg, &elements))?;
            self.installed = elements.len();
            return Ok(());
        }
        let generation = self.next_generation();
        let want = Want {
            cfg: &self.cfg,
            tree: &self.tree,
            links: &self.link_plan,
            generation,
        };
        let (installed, levels) = install_table(
            &mut self.nft,
            self.caps,
            want,
            !self.broute.is_empty(),
            None,
        )?;
        self.generation = generation;
        self.ifaces = self.link_plan.elements.clone();
        self.broute = self.link_plan.broute.clone();
        self.installed = installed;
        self.levels = levels;
        Ok(())
    }

    /// The generation the next transaction that changes decisions installs:
    /// one no connection was tagged with since this daemon started (until
    /// 65,536 transactions later). Recorded in `generation` once committed.
    fn next_generation(&self) -> u16 {
        self.generation.wrapping_add(1)
    }

    /// Applies element changes in one transaction, adding the maps of
    /// levels that start being looked up and deleting those of levels that
    /// stop; after a decisive change, open connections are classified again
    /// at their next packet.
    fn apply(&mut self, delta: &Delta) -> Result<(), DaemonError> {
        if delta.is_empty() {
            return Ok(());
        }
        if let Some(b) = self.bpf.as_mut() {
            let (del, add) = bpfmaps::changes(&self.cfg, delta);
            b.update(&del, &add)?;
            self.installed = delta.applied_count(self.installed);
            return Ok(());
        }
        let name = self.cfg.table.clone();
        // The chain looks up exactly the levels whose maps hold elements: a
        // lookup in an empty map would miss every socket below it, and
        // keep their connections from keeping a decision
        // (`table::classify_chain`).
        let levels = self.tree.levels();
        let started: Vec<u32> = levels.difference(&self.levels).copied().collect();
        let stopped: Vec<u32> = self.levels.difference(&levels).copied().collect();
        let mut txn = Txn::new();
        if !started.is_empty() || !stopped.is_empty() {
            txn.add_level_maps(&name, &started)?;
            txn.rewrite_chain(&name, &table::classify_chain(&levels))?;
        }
        // A change that leaves every decision a connection kept as it was
        // (a new cgroup at a level looked up, one that decides as its
        // ancestors going: see `tree::Delta::decisive`) keeps the generation.
        let generation = if delta.decisive {
            let next = self.next_generation();
            for c in table::tag_chains(next) {
                txn.rewrite_chain(&name, &c)?;
            }
            next
        } else {
            self.generation
        };
        let group = |list: &[tree::Element]| {
            let mut by: BTreeMap<u32, Vec<(u64, u32)>> = BTreeMap::new();
            for ((l, id), a) in list {
                by.entry(*l)
                    .or_default()
                    .push((*id, table::element_class(&self.cfg, *a)));
            }
            by
        };
        for (level, ids) in group(&delta.del) {
            if !stopped.contains(&level) {
                txn.map_elements(&name, level, &ids, false)?;
            }
        }
        for (level, elems) in group(&delta.add) {
            txn.map_elements(&name, level, &elems, true)?;
        }
        txn.delete_level_maps(&name, &stopped)?;
        self.nft.commit(txn)?;
        self.generation = generation;
        self.installed = delta.applied_count(self.installed);
        self.levels = levels;
        Ok(())
    }

    /// Brings the kernel in line with the tree; on failure, schedules a full rebuild.
    fn converge(&mut self, delta: Delta) {
        let result = if self.dirty {
            self.replace_all()
        } else {
            self.apply(&delta)
        };
        match result {
            Ok(()) => {
                if self.dirty {
                    info!("table rebuilt after an earlier failure");
                }
                self.dirty = false;
                self.sched.retry.reset();
                self.publish_status();
            }
            Err(e) => self.rebuild_later("", e),
        }
    }

    /// An update of (`what` of) the table failed: the whole table is rebuilt
    /// after the retry delay.
    fn rebuild_later(&mut self, what: &str, e: impl std::fmt::Display) {
        error!(
            "updating {what}table inet {}: {e}; rebuilding it in {:?}",
            self.cfg.table,
            self.sched.retry.delay()
        );
        self.dirty = true;
        self.arm_retry();
    }

    fn arm_retry(&mut self) {
        self.sched.retry.arm(Instant::now());
        self.arm_timer();
    }

    /// Sends STATUS= now, or defers it (see [`crate::core::schedule::StatusLine`]).
    fn publish_status(&mut self) {
        if self.sched.status.send_now(Instant::now()) {
            notify::status(&self.status());
        } else {
            self.arm_timer();
        }
    }

    /// Arms the timer for the earliest pending deadline.
    fn arm_timer(&mut self) {
        let Some(at) = self
            .sched
            .next()
            .into_iter()
            .chain(self.containers.next_look())
            .min()
        else {
            return;
        };
        // Setting a timer costs a hardware timer reprogramming (an exit to
        // the hypervisor in a VM): tens of µs for nothing when it is set.
        if self.armed == Some(at) {
            return;
        }
        let left = at
            .saturating_duration_since(Instant::now())
            .max(Duration::from_micros(1));
        let when = Expiration::OneShot(TimeSpec::from_duration(left));
        match self.timer.set(when, TimerSetTimeFlags::empty()) {
            Ok(()) => self.armed = Some(at),
            Err(e) => error!("cannot arm the timer: {e}"),
        }
    }

    /// Runs whatever deadline has passed.
    fn on_timer(&mut self) {
        self.armed = None;
        let now = Instant::now();
        if self.sched.retry.take_due(now) && self.dirty {
            self.converge(Delta::default());
        }
        if self.sched.heal.take_due(now) {
            self.heal();
        }
        if self.sched.rescan.take_due(now) {
            self.rescan();
        }
        if self.sched.status.take_due(now) {
            notify::status(&self.status());
        }
        // `|`: a due probe is taken even when a follow-up is due too.
        if self.sched.probes.take_due(now) | self.containers.look_due(now) {
            self.refresh_links();
        }
        self.arm_timer();
    }

    /// Notices foreign changes to our table or routing and schedules a repair.
    fn on_events(&mut self) {
        let damage: Damage = self
            .events
            .read(&self.cfg.table, self.nft.port(), &self.route_plan);
        if damage.rules_changed {
            self.place();
        }
        if damage.links_changed || damage.lost {
            self.refresh_links();
        }
        if !damage.any() {
            return;
        }
        if damage.culprit.is_some() {
            self.culprit = damage.culprit;
        }
        if damage.lost {
            warn!("kernel notifications were lost; rebuilding the table to be sure");
        }
        self.sched.heal.damaged(Instant::now());
        self.arm_timer();
    }

    /// Restores the table and routing in one go after foreign damage.
    fn heal(&mut self) {
        let by = self
            .culprit
            .take()
            .map(|c| format!(" (changed by {c})"))
            .unwrap_or_default();
        let table = self.replace_all();
        let routes = self.routes.install(&self.route_plan);
        match (table, routes) {
            (Ok(()), Ok(())) => {
                warn!(
                    "restored table inet {} and policy routing after a foreign change{by}",
                    self.cfg.table
                );
                // The rules around ours may have changed with the damage.
                self.place();
            }
            (t, r) => {
                for e in [
                    t.err().map(|e| e.to_string()),
                    r.err().map(|e| e.to_string()),
                ]
                .into_iter()
                .flatten()
                {
                    error!("repairing after a foreign change{by}: {e}");
                }
                self.dirty = true;
                self.arm_retry();
            }
        }
        if let Some((n, wait)) = self.sched.heal.recurring() {
            warn!(
                "our rules were undone {n} times in {HEAL_WINDOW:?}: something keeps removing them; waiting {wait:?} before the next repair"
            );
        }
    }

    fn on_changes(&mut self, changes: Vec<Change>) {
        let mut delta = Delta::default();
        let mut populated = false;
        // New decided cgroups whose first process is to be reported.
        let mut probe: Vec<Rc<str>> = Vec::new();
        for c in changes {
            match c {
                Change::Added(list) => {
                    for cg in &list {
                        debug!(path = %cg.path, id = cg.id, level = cg.level, "cgroup added");
                        delta.extend(self.tree.insert(&self.cfg, cg));
                        if self.bpf.is_none() && self.tree.decision(&cg.path).is_some() {
                            probe.push(cg.path.clone());
                        }
                    }
                }
                Change::Removed(path) => {
                    debug!(path = %path, "cgroup removed");
                    self.containers.removed(&path);
                    if self
                        .link_plan
                        .entries
                        .iter()
                        .any(|e| matches!(&e.why, Why::Container(p) if is_within(p, &path)))
                    {
                        self.sched.probes.look_again(Instant::now());
                    }
                    delta.extend(self.tree.remove(&path));
                }
                Change::Populated(path) => {
                    self.containers.populated(&path, Instant::now());
                    populated = true;
                }
                Change::Rescan(all) => {
                    warn!(
                        "inotify lost events (queue overflow or rename); rescanned {} cgroups",
                        all.len()
                    );
                    // What the kernel holds: the tree before this batch's changes.
                    let mut before = self.tree.elements();
                    delta.revert(&mut before);
                    self.tree = Tree::build(&self.cfg, &all);
                    delta = tree::diff(&before, &self.tree.elements());
                }
            }
        }
        self.converge(delta);
        // Containers are looked for after the commit, so the elements do not
        // wait for it. A new cgroup's first look is due at once: here, not
        // on a timer that would wake the daemon again for it, unless more
        // cgroups are on their way (a storm): then one look serves them all.
        // (Not one this batch removed again.)
        probe.retain(|p| self.tree.decision(p).is_some());
        let now = Instant::now();
        for path in &probe {
            self.containers.added(path, now);
        }
        if populated || (!probe.is_empty() && !self.watcher.more_waiting()) {
            self.refresh_links();
        }
        self.arm_timer();
    }

    fn reload(&mut self) {
        notify::reloading();
        info!("reloading configuration");
        match self.try_reload() {
            Ok(()) => info!("configuration reloaded; {}", self.status()),
            Err(e) => error!("reload failed, keeping the previous configuration: {e}"),
        }
        notify::ready(&self.status());
    }

    /// Applies a new configuration all or nothing: everything new (a watcher for
    /// a new hierarchy, the table, the ip rules) is built and installed before
    /// anything old is let go; on any failure the old state stands.
    fn try_reload(&mut self) -> Result<(), DaemonError> {
        let path = crate::config::resolve_path(self.config_path.as_deref());
        let new = Config::load(path.as_deref())?;
        if new.datapath != self.cfg.datapath {
            return Err(DaemonError::DatapathChange {
                from: self.cfg.datapath,
                to: new.datapath,
            });
        }
        let mut new_watcher = None;
        if new.cgroup_root != self.cfg.cgroup_root {
            let hier = Hierarchy::discover(&new.cgroup_root)?;
            if &hier != self.watcher.hierarchy() {
                new_watcher = Some(Watcher::new(hier)?);
            }
        }
        let cgroups = match new_watcher.as_mut() {
            Some(w) => w.scan()?,
            None => self.tree.cgroups(),
        };
        let tree = Tree::build(&new, &cgroups);
        // The new rules may decide other cgroups: look at the whole tree.
        let mut containers = Containers::default();
        let hier = new_watcher
            .as_ref()
            .map_or(self.watcher.hierarchy(), |w| w.hierarchy());
        let link_plan = match self.bpf {
            Some(_) => LinkPlan::default(),
            None => planned(
                &mut containers,
                &mut self.links,
                hier,
                &new,
                &tree,
                self.caps.can_broute,
            )?,
        };
        if new.same_structure(&self.cfg) && !self.dirty {
            let delta = tree::diff(&self.tree.elements(), &tree.elements());
            let old = std::mem::replace(&mut self.cfg, new);
            let applied = self.apply(&delta).and_then(|()| {
                let mut txn = Txn::new();
                if self.bpf.is_none()
                    && link_changes(
                        &mut txn,
                        &self.cfg,
                        self.installed_links(),
                        &link_plan,
                        self.caps,
                    )?
                {
                    self.nft.commit(txn)?;
                }
                Ok(())
            });
            if let Err(e) = applied {
                self.cfg = old;
                // The level maps may have changed: the next retry rebuilds all.
                self.dirty = true;
                self.arm_retry();
                return Err(e);
            }
        } else if self.bpf.is_some() {
            // Targets or bypass changed: the maps are rewritten from the new state.
            let old = std::mem::replace(&mut self.cfg, new);
            let old_tree = std::mem::replace(&mut self.tree, tree.clone());
            if let Err(e) = self.replace_all() {
                self.cfg = old;
                self.tree = old_tree;
                self.dirty = true;
                self.arm_retry();
                return Err(e);
            }
            self.dirty = false;
        } else {
            let new_routes = route_plan(&new, &placement(&mut self.routes, &new));
            // Rules this reload adds (not the moved ones): what a failure undoes.
            let added = route::Plan {
                marks: new_routes
                    .marks
                    .iter()
                    .filter(|m| {
                        !(self.route_plan.table == new_routes.table
                            && self.route_plan.marks.contains(m))
                    })
                    .copied()
                    .collect(),
                ..new_routes.clone()
            };
            let generation = self.next_generation();
            let installed = self
                .routes
                .install(&new_routes)
                .map_err(DaemonError::from)
                .and_then(|()| {
                    let want = Want {
                        cfg: &new,
                        tree: &tree,
                        links: &link_plan,
                        generation,
                    };
                    install_table(
                        &mut self.nft,
                        self.caps,
                        want,
                        !self.broute.is_empty(),
                        Some(&self.cfg.table),
                    )
                });
            let (installed, levels) = match installed {
                Ok(done) => done,
                Err(e) => {
                    if let Err(re) = self.routes.remove_rules(&added) {
                        warn!("undoing new ip rules: {re}");
                    }
                    return Err(e);
                }
            };
            self.generation = generation;
            self.installed = installed;
            self.levels = levels;
            // The new state stands; what the old one needed and the new does not
            // is only clutter now, so a failure to remove it is not a failed reload.
            if let Err(e) = self.routes.retire(&self.route_plan, &new_routes) {
                warn!("removing ip rules the new configuration no longer uses: {e}");
            }
            self.route_plan = new_routes;
            self.cfg = new;
            self.dirty = false;
        }
        self.tree = tree;
        self.ifaces = link_plan.elements.clone();
        self.broute = link_plan.broute.clone();
        self.link_plan = link_plan;
        self.containers = containers;
        if let Some(w) = new_watcher {
            info!(
                "watching cgroup2 hierarchy at {}",
                w.hierarchy().mount.display()
            );
            self.watcher = w;
            self.sched.rescan.reset();
            self.check_watched();
        }
        Ok(())
    }

    /// Removes everything we installed.
    fn cleanup(&mut self) -> Result<(), DaemonError> {
        runstate::clear();
        // Dropping the datapath detaches its programs.
        self.bpf = None;
        let mut errors = Vec::new();
        let table = &self.cfg.table;
        let deleted = table_exists(&self.nft, table).and_then(|exists| {
            if !exists {
                return Ok(());
            }
            let mut txn = Txn::new();
            txn.delete_table(table)?;
            Ok(self.nft.commit(txn)?)
        });
        if let Err(e) = deleted {
            errors.push(format!("deleting table inet {table}: {e}"));
        }
        if !self.broute.is_empty() {
            let mut txn = Txn::new();
            let deleted = txn
                .replace_bridge(table, &[], self.caps.can_broute, self.caps.table_flags)
                .and_then(|()| self.nft.commit(txn));
            if let Err(e) = deleted {
                errors.push(format!("deleting table bridge {table}: {e}"));
            }
        }
        if let Err(e) = self.routes.remove(&self.route_plan) {
            errors.push(e.to_string());
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(DaemonError::Cleanup(errors.join("; ")))
        }
    }
}

/// What [`start_nft`] works with.
struct NftStart<'a> {
    nft: &'a mut Nft,
    routes: &'a mut Routes,
    links: &'a mut Links,
    containers: &'a mut Containers,
}

/// The nft datapath's start: probes the kernel's table flags and bridge
/// support, removes a bridge table a crash left, places the ip rules and plans
/// the interfaces.
fn start_nft(
    cfg: &Config,
    ctx: NftStart<'_>,
    hier: &Hierarchy,
    tree: &Tree,
) -> Result<(Caps, Placement, LinkPlan), DaemonError> {
    // Test-only knob: the behaviour of kernels without table flags (a foreign
    // flush removes the table; the daemon restores it), on one that has them.
    let table_flags = if std::env::var_os(TEST_NO_TABLE_FLAGS_ENV).is_some() {
        0
    } else {
        ctx.nft.table_flags(&format!("{}-flags-probe", cfg.table))?
    };
    info!(
        "table inet {} flags: {}",
        cfg.table,
        if table_flags & TABLE_F_PERSIST != 0 {
            "owner, persist"
        } else if table_flags & TABLE_F_OWNER != 0 {
            "owner (Linux < 6.9 has no persist: a crash removes it)"
        } else {
            "none (Linux < 5.12: a foreign flush removes it until we restore it)"
        }
    );
    let placed = placement(ctx.routes, cfg);
    if let Placement::Ahead { priority, of } = &placed {
        warn!(
            "ip rule {of} could take marked packets before priority {}: our rules go to priority {priority}",
            cfg.rule_priority
        );
    }
    // A bridge table a crash left (flagged persist) routes ports no map
    // classifies any more: remove it. Kernels without bridge support refuse,
    // and have none to remove.
    let mut txn = Txn::new();
    if txn
        .replace_bridge(&cfg.table, &[], false, table_flags)
        .and_then(|()| ctx.nft.commit(txn))
        .is_err()
    {
        debug!("no bridge table to remove");
    }
    let can_broute = ctx
        .nft
        .can_broute(&format!("{}-broute-probe", cfg.table), table_flags)
        .unwrap_or(false);
    if !can_broute {
        info!(
            "this kernel cannot route bridge ports (nft `meta broute`: Linux 6.4 and later with CONFIG_NFT_BRIDGE_META): proxied or dropped containers on a bridge have their TCP and UDP dropped"
        );
    }
    let link_plan = planned(ctx.containers, ctx.links, hier, cfg, tree, can_broute)?;
    announce(cfg, &LinkPlan::default(), &link_plan);
    let caps = Caps {
        table_flags,
        can_broute,
    };
    Ok((caps, placed, link_plan))
}

/// The generation before the first table's: from the clock, so that a
/// restarted daemon does not take connections an earlier one tagged for
/// decided (one chance in 65,536 that it does).
fn first_generation() -> u16 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (now.as_micros() % 65_536) as u16
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(config_path: Option<PathBuf>) -> Result<(), DaemonError> {
    let resolved = crate::config::resolve_path(config_path.as_deref());
    let cfg = Config::load(resolved.as_deref())?;
    match &resolved {
        Some(p) => info!("configuration {}", p.display()),
        None => info!(
            "no configuration at {}; running the built-in default (see `cgtproxy render`)",
            crate::config::DEFAULT_PATH
        ),
    }

    // Signals become readable events; blocking them first means none is lost.
    let mut mask = SigSet::empty();
    for s in [Signal::SIGHUP, Signal::SIGTERM, Signal::SIGINT] {
        mask.add(s);
    }
    mask.thread_block().map_err(sys("blocking signals"))?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(sys("signalfd"))?;
    let timer = TimerFd::new(
        ClockId::CLOCK_MONOTONIC,
        TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
    )
    .map_err(sys("timerfd"))?;

    let hier = Hierarchy::discover(&cfg.cgroup_root)?;
    info!("watching cgroup2 hierarchy at {}", hier.mount.display());
    let mut watcher = Watcher::new(hier)?;
    // The scan's list is as large as the tree: do not keep it for the daemon's life.
    let tree = Tree::build(&cfg, &watcher.scan()?);

    let mut nft = Nft::open()?;
    let mut routes = Routes::open()?;
    let mut links = Links::open()?;
    let mut containers = Containers::default();
    let (caps, placed, link_plan, bpf) = match cfg.datapath {
        Datapath::Nft => {
            let ctx = NftStart {
                nft: &mut nft,
                routes: &mut routes,
                links: &mut links,
                containers: &mut containers,
            };
            let (caps, placed, link_plan) = start_nft(&cfg, ctx, watcher.hierarchy(), &tree)?;
            (caps, placed, link_plan, None)
        }
        Datapath::Ebpf => {
            let caps = Caps {
                table_flags: 0,
                can_broute: false,
            };
            let placed = Placement::Configured(cfg.rule_priority);
            let d = bpf::Datapath::load(&watcher.hierarchy().mount)?;
            (caps, placed, LinkPlan::default(), Some(d))
        }
    };
    let mut d = Daemon {
        config_path,
        route_plan: route_plan(&cfg, &placed),
        cfg,
        watcher,
        tree,
        nft,
        routes,
        caps,
        degraded: None,
        blocked_by: None,
        installed: 0,
        levels: BTreeSet::new(),
        generation: first_generation(),
        dirty: false,
        sched: Schedule::default(),
        culprit: None,
        events: Events::open()?,
        timer,
        armed: None,
        links,
        containers,
        link_plan,
        ifaces: BTreeMap::new(),
        broute: Vec::new(),
        bpf,
    };
    // An owned table (Linux 5.12+) takes changes from our socket only, so
    // nothing can happen to it unseen before we listen: then listen after the
    // first commit, which would otherwise make the kernel build one
    // notification per element for us to discard (at 50,000 cgroups a tenth
    // of start-up). Unowned, listen first.
    let owned = d.caps.table_flags & TABLE_F_OWNER != 0;
    if !owned {
        d.events.join_nft()?;
    }
    d.replace_all()?;
    if owned {
        d.events.join_nft()?;
    }
    if let Some(b) = d.bpf.as_mut() {
        // The maps are full: only now does any socket meet the programs.
        b.attach()?;
        info!(
            "datapath ebpf: socket programs attached at the cgroup2 root {}",
            b.root.display()
        );
    }
    if let Err(e) = d.routes.install(&d.route_plan) {
        // Nothing half-applied: take the table down again.
        if let Err(c) = d.cleanup() {
            error!("{c}");
        }
        return Err(e.into());
    }
    if let Placement::Blocked { by, .. } = placed {
        error!(
            "ip rule {by} takes packets marked for our targets before our rules, at priority 0 where nothing can precede it: their traffic is dropped, not sent past the proxy, until that rule goes"
        );
        d.blocked_by = Some(by);
    }
    d.check_watched();
    let status = d.status();
    info!("ready: {status}");
    notify::ready(&status);

    loop {
        let (ino, sig, tim, ev) = {
            let mut fds = [
                PollFd::new(d.watcher.fd(), PollFlags::POLLIN),
                PollFd::new(signals.as_fd(), PollFlags::POLLIN),
                PollFd::new(d.timer.as_fd(), PollFlags::POLLIN),
                PollFd::new(d.events.nft_fd(), PollFlags::POLLIN),
                PollFd::new(d.events.route_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::Error::EINTR) => continue,
                Err(e) => {
                    return Err(DaemonError::Sys {
                        step: "poll",
                        source: e,
                    });
                }
            }
            let ready = |f: &PollFd| f.revents().is_some_and(|r| r.contains(PollFlags::POLLIN));
            (
                ready(&fds[0]),
                ready(&fds[1]),
                ready(&fds[2]),
                ready(&fds[3]) || ready(&fds[4]),
            )
        };
        if sig {
            while let Ok(Some(info)) = signals.read_signal() {
                match Signal::try_from(info.ssi_signo as i32) {
                    Ok(Signal::SIGHUP) => d.reload(),
                    Ok(s) => {
                        match d.cfg.datapath {
                            Datapath::Nft => {
                                info!("{s}: removing table inet {} and routing", d.cfg.table)
                            }
                            Datapath::Ebpf => info!("{s}: detaching the eBPF programs"),
                        }
                        notify::stopping();
                        return d.cleanup();
                    }
                    Err(_) => {}
                }
            }
        }
        if ino {
            // New cgroups are committed first; what their listing finds below
            // them (created in the meantime) follows in a second transaction.
            let read = d.watcher.read().and_then(|changes| {
                d.on_changes(changes);
                d.watcher.expand()
            });
            // A watcher error never takes the rules down: apps keep their
            // verdicts (fail closed) while the tree is walked again.
            match read {
                Ok(more) if more.is_empty() => {}
                Ok(more) => d.on_changes(more),
                Err(e) => d.degrade(e.to_string()),
            }
            if d.watcher.unwatched().is_some() {
                d.check_watched();
            }
        }
        if ev {
            d.on_events();
        }
        if tim {
            let _ = d.timer.wait();
            d.on_timer();
        }
    }
}
