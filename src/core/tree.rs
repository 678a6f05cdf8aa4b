//! The classification tree: which cgroups the kernel maps hold, with what, and
//! the smallest change that takes the installed elements to the desired ones.
//! Pure: every decision is unit-tested without root.
//!
//! A level's map is looked up only where some cgroup at that level decides
//! differently from its ancestors (a *deciding* cgroup). Each such level's map
//! then holds every known cgroup at that level, each with what decides its
//! traffic, unclassified ones included: the classify chain's walk, deepest
//! first, stops at the first level it looks up instead of missing its way up
//! through the shallower maps (one lookup instead of up to one per level, for
//! the common case of an unclassified app below classified siblings). A cgroup
//! not yet in its map (just created) falls through to its ancestors' elements,
//! which say the same as its own will unless it decides itself.
//!
//! The eBPF datapath's programs remember each cgroup's walk, so its map holds
//! the deciding cgroups only (a tree built for `"datapath": "ebpf"`).

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::rc::Rc;

use crate::config::{Action, Config, Datapath};
use crate::core::cgroup::{Cgroup, parent_of};

/// A map element's key: (absolute hierarchy level, cgroup id).
pub type Key = (u32, u64);

/// Map elements: which cgroup, at which level, gets which verdict: the action
/// of its nearest classified ancestor-or-self, or `None` when nothing
/// classifies it (its traffic is untouched; the walk stops there all the same).
pub type Elements = BTreeMap<Key, Option<Action>>;

/// One element: its key and its verdict (see [`Elements`]).
pub type Element = (Key, Option<Action>);

/// Element changes: deletions are applied before additions.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Delta {
    pub del: Vec<Element>,
    pub add: Vec<Element>,
    /// Whether the change may alter what an open connection decided and
    /// keeps (see `table::output_chain`): an element's verdict changes, a
    /// cgroup that decides for itself goes (its sockets found its element
    /// and now find its ancestors'), or a level starts being looked up
    /// (sockets with a cgroup there decided without it). Open connections
    /// must then be classified again. A new cgroup's element at a level
    /// looked up already is not: until it was in, its sockets' connections
    /// were not allowed to keep a decision (`table::classify_chain`). Nor
    /// are elements that only say what the walk decided without them (a
    /// level stopping, a cgroup that decides as its ancestors going).
    pub decisive: bool,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.del.is_empty() && self.add.is_empty()
    }

    /// Appends `other`, cancelling an addition that `other` deletes again.
    pub fn extend(&mut self, other: Delta) {
        self.decisive |= other.decisive;
        for d in other.del {
            if let Some(pos) = self.add.iter().position(|a| *a == d) {
                self.add.remove(pos);
            } else {
                self.del.push(d);
            }
        }
        self.add.extend(other.add);
    }

    /// Applies the change to a record of elements, as the kernel does.
    #[cfg(test)]
    fn apply(&self, to: &mut Elements) {
        for (k, _) in &self.del {
            to.remove(k);
        }
        for (k, a) in &self.add {
            to.insert(*k, *a);
        }
    }

    /// Undoes the change on a record of elements that it was applied to.
    pub fn revert(&self, on: &mut Elements) {
        for (k, _) in &self.add {
            on.remove(k);
        }
        for (k, a) in &self.del {
            on.insert(*k, *a);
        }
    }

    /// How many elements a map of `before` elements holds once the change is
    /// applied (deletions are of elements it holds, additions of ones it lacks).
    pub fn applied_count(&self, before: usize) -> usize {
        (before + self.add.len()).saturating_sub(self.del.len())
    }
}

/// The element changes that turn `old` into `new`, decisive if any (a
/// reload or a rescan may change any verdict).
pub fn diff(old: &Elements, new: &Elements) -> Delta {
    let mut d = Delta::default();
    for (k, a) in old {
        if new.get(k) != Some(a) {
            d.del.push((*k, *a));
        }
    }
    for (k, a) in new {
        if old.get(k) != Some(a) {
            d.add.push((*k, *a));
        }
    }
    d.decisive = !d.is_empty();
    d
}

/// A known cgroup: its id, and packed into one word its level, the first
/// matching rule's action (`own`), the nearest classified ancestor-or-self's
/// action (`effective`), and whether it is *deciding*: classified, and
/// deciding differently from its nearest classified ancestor (children of a
/// routed slice are not, and are covered from their first packet by the
/// slice's element). 16 bytes where the plain fields took 24: 0.4 MB at
/// 50,000 cgroups.
#[derive(Debug, Clone, Copy)]
struct Node {
    id: u64,
    /// Bits 0–18 own, 19–37 effective, 38 deciding, 39–63 level.
    packed: u64,
}

/// Bits of an action's code: 0 none, 1 direct, 2 drop, 3 + i target i (a
/// `u16`, so at most 65,538).
const ACTION_BITS: u32 = 19;
const ACTION_MASK: u64 = (1 << ACTION_BITS) - 1;
const DECIDING_BIT: u32 = 2 * ACTION_BITS;
const LEVEL_SHIFT: u32 = DECIDING_BIT + 1;
/// Levels up to 2^25 − 1. Deeper cannot be watched: the walk opens
/// directories by their full path, which PATH_MAX bounds at 2,048 levels.
const MAX_LEVEL: u32 = (1 << (64 - LEVEL_SHIFT)) - 1;

fn action_code(a: Option<Action>) -> u64 {
    match a {
        None => 0,
        Some(Action::Direct) => 1,
        Some(Action::Drop) => 2,
        Some(Action::Tproxy(i)) => 3 + u64::from(i),
    }
}

fn code_action(c: u64) -> Option<Action> {
    match c & ACTION_MASK {
        0 => None,
        1 => Some(Action::Direct),
        2 => Some(Action::Drop),
        c => u16::try_from(c - 3).ok().map(Action::Tproxy),
    }
}

impl Node {
    /// A node not settled yet: no effective action, not deciding.
    fn new(id: u64, level: u32, own: Option<Action>) -> Node {
        let level = u64::from(level.min(MAX_LEVEL));
        Node {
            id,
            packed: action_code(own) | (level << LEVEL_SHIFT),
        }
    }

    fn level(&self) -> u32 {
        // 25 bits: always fits.
        (self.packed >> LEVEL_SHIFT) as u32
    }

    fn own(&self) -> Option<Action> {
        code_action(self.packed)
    }

    fn effective(&self) -> Option<Action> {
        code_action(self.packed >> ACTION_BITS)
    }

    fn deciding(&self) -> bool {
        self.packed >> DECIDING_BIT & 1 == 1
    }

    /// Settles the node under the effective action it inherits: its own
    /// effective action and whether it is deciding.
    fn settle(&mut self, inherited: Option<Action>) {
        let own = self.own();
        let deciding = own.is_some() && own != inherited;
        let keep = self.packed & (ACTION_MASK | u64::from(MAX_LEVEL) << LEVEL_SHIFT);
        self.packed = keep
            | action_code(own.or(inherited)) << ACTION_BITS
            | u64::from(deciding) << DECIDING_BIT;
    }

    fn element(&self) -> Element {
        ((self.level(), self.id), self.effective())
    }
}

/// The known cgroups and their classification, kept in path order so that a
/// parent always precedes its descendants.
#[derive(Debug, Clone, Default)]
pub struct Tree {
    nodes: BTreeMap<Rc<str>, Node>,
    /// Per level, how many of its nodes are deciding (never zero): the levels
    /// whose maps hold elements.
    deciding: BTreeMap<u32, usize>,
    /// Elements for the deciding nodes only (the eBPF datapath's map).
    sparse: bool,
}

impl Tree {
    /// Classifies a whole set of cgroups.
    pub fn build(cfg: &Config, cgroups: &[Cgroup]) -> Tree {
        let mut sorted: Vec<(Rc<str>, Node)> = cgroups
            .iter()
            .rev()
            .map(|cg| {
                let node = Node::new(cg.id, cg.level, cfg.classify(&cg.path));
                (Rc::clone(&cg.path), node)
            })
            .collect();
        // Stable, on the reversed list: of a path listed twice the last counts.
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        sorted.dedup_by(|later, kept| later.0 == kept.0);
        for i in 0..sorted.len() {
            // Ancestors sort before their descendants, so theirs are settled.
            let (done, rest) = sorted.split_at_mut(i);
            let (path, n) = &mut rest[0];
            let inherited = inherited_from(path, |p| {
                done.binary_search_by(|(k, _)| (**k).cmp(p))
                    .ok()
                    .map(|j| &done[j].1)
            });
            n.settle(inherited);
        }
        let mut deciding = BTreeMap::new();
        for (_, n) in sorted.iter().filter(|(_, n)| n.deciding()) {
            *deciding.entry(n.level()).or_insert(0) += 1;
        }
        // One bulk build from sorted nodes: inserting one by one would leave
        // every B-tree node half full (at 50,000 cgroups 3.1 MB instead of 1.6),
        // and packing it afterwards would leave the discarded nodes as holes in
        // the heap.
        Tree {
            nodes: sorted.into_iter().collect(),
            deciding,
            sparse: sparse(cfg),
        }
    }

    /// Number of known cgroups.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether no cgroup is known.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// All known cgroups.
    pub fn cgroups(&self) -> Vec<Cgroup> {
        self.nodes
            .iter()
            .map(|(p, n)| Cgroup {
                path: Rc::clone(p),
                id: n.id,
                level: n.level(),
            })
            .collect()
    }

    #[cfg(test)]
    fn id(&self, path: &str) -> Option<u64> {
        self.nodes.get(path).map(|n| n.id)
    }

    /// The elements the kernel maps should hold.
    pub fn elements(&self) -> Elements {
        self.element_list().into_iter().collect()
    }

    /// The elements, sorted by key, in one allocation: what a whole table is
    /// built from. A map's thousands of small nodes, alive while the table's
    /// transaction is built, left the heap fragmented and a megabyte larger
    /// for good after some start-ups at 50,000 cgroups; a large vector is
    /// mapped on its own and unmapped when dropped.
    pub fn element_list(&self) -> Vec<Element> {
        let mut list: Vec<Element> = self
            .nodes
            .values()
            .filter_map(|n| self.element_of(n))
            .collect();
        list.sort_unstable_by_key(|e| e.0);
        list
    }

    /// The element of `n`, if it has one.
    fn element_of(&self, n: &Node) -> Option<Element> {
        let has = if self.sparse {
            n.deciding()
        } else {
            self.deciding.contains_key(&n.level())
        };
        has.then(|| n.element())
    }

    /// Counts a node that became (or stopped being) deciding.
    fn count_deciding(&mut self, level: u32, now: bool) {
        if now {
            *self.deciding.entry(level).or_insert(0) += 1;
        } else if let Some(c) = self.deciding.get_mut(&level) {
            *c -= 1;
            if *c == 0 {
                self.deciding.remove(&level);
            }
        }
    }

    /// The elements of the nodes at `levels` outside `skip` (sorted paths),
    /// for levels whose maps just started or stopped holding elements.
    fn level_elements(&self, levels: &BTreeSet<u32>, skip: &[Rc<str>]) -> Vec<Element> {
        if levels.is_empty() || self.sparse {
            return Vec::new();
        }
        self.nodes
            .iter()
            .filter(|(p, n)| levels.contains(&n.level()) && skip.binary_search(p).is_err())
            .map(|(_, n)| n.element())
            .collect()
    }

    /// What the planner decided for cgroup `path`: its traffic's action and the
    /// ancestor-or-self whose rule decides it (`explain` reports this, so it can
    /// never tell another story than the table). `None` when it is untouched.
    pub fn decision(&self, path: &str) -> Option<(Action, &str)> {
        let mut p = Some(path);
        while let Some(at) = p {
            if let Some((key, n)) = self.nodes.get_key_value(at)
                && let Some(a) = n.own()
            {
                return Some((a, key));
            }
            p = parent_of(at);
        }
        None
    }

    /// Every cgroup whose traffic is decided (classified itself or below a
    /// classified ancestor), with its action, in path order.
    pub fn decided(&self) -> impl Iterator<Item = (&str, Action)> {
        self.nodes
            .iter()
            .filter_map(|(p, n)| n.effective().map(|a| (&**p, a)))
    }

    /// Number of cgroups whose traffic each action decides (direct, drop, per target).
    pub fn counts(&self, targets: usize) -> (usize, usize, Vec<usize>) {
        let (mut direct, mut drop, mut per) = (0, 0, vec![0; targets]);
        for n in self.nodes.values() {
            match n.effective() {
                Some(Action::Direct) => direct += 1,
                Some(Action::Drop) => drop += 1,
                Some(Action::Tproxy(i)) => {
                    if let Some(c) = per.get_mut(usize::from(i)) {
                        *c += 1;
                    }
                }
                None => {}
            }
        }
        (direct, drop, per)
    }

    /// The levels whose maps hold elements: those with a deciding cgroup.
    pub fn levels(&self) -> BTreeSet<u32> {
        self.deciding.keys().copied().collect()
    }

    /// Adds a cgroup (or notices that a reused path is a new cgroup).
    pub fn insert(&mut self, cfg: &Config, cg: &Cgroup) -> Delta {
        self.sparse = sparse(cfg);
        let mut delta = Delta::default();
        match self.nodes.get(&*cg.path) {
            Some(n) if n.id == cg.id => return delta,
            Some(_) => delta.extend(self.remove(&cg.path)),
            None => {}
        }
        self.nodes.insert(
            Rc::clone(&cg.path),
            Node::new(cg.id, cg.level, cfg.classify(&cg.path)),
        );
        delta.extend(self.refresh(&cg.path));
        delta
    }

    /// Removes a cgroup and anything still recorded below it.
    pub fn remove(&mut self, path: &str) -> Delta {
        let mut delta = Delta::default();
        let before = self.levels();
        for p in self.subtree(path) {
            let Some(n) = self.nodes.remove(&*p) else {
                continue;
            };
            // Presence as it was: the counts fall as the subtree goes.
            if n.deciding() || !self.sparse && before.contains(&n.level()) {
                delta.del.push(n.element());
            }
            if n.deciding() {
                self.count_deciding(n.level(), false);
                delta.decisive = true;
            }
        }
        let gone = before
            .into_iter()
            .filter(|l| !self.deciding.contains_key(l))
            .collect();
        delta.del.extend(self.level_elements(&gone, &[]));
        delta
    }

    /// `path` and the recorded paths below it, parents first.
    fn subtree(&self, path: &str) -> Vec<Rc<str>> {
        let below = format!("{path}/");
        self.nodes
            .range::<str, _>((Bound::Included(path), Bound::Unbounded))
            .take_while(|(p, _)| p.starts_with(path))
            .filter(|(p, _)| &***p == path || p.starts_with(&below))
            .map(|(p, _)| Rc::clone(p))
            .collect()
    }

    /// The effective action of the nearest recorded ancestor.
    fn inherited(&self, path: &str) -> Option<Action> {
        inherited_from(path, |p| self.nodes.get(p))
    }

    /// Recomputes the effective action of `path`, just inserted (so it had no
    /// element yet), and its descendants, and the element changes that
    /// follow: theirs, and those of every node at a level whose map starts
    /// or stops holding elements.
    fn refresh(&mut self, path: &str) -> Delta {
        let sub = self.subtree(path);
        let before = self.levels();
        let old: Vec<Option<Element>> = sub
            .iter()
            .map(|p| {
                let n = self.nodes.get(&**p)?;
                if **p == *path {
                    None
                } else {
                    self.element_of(n)
                }
            })
            .collect();
        let mut delta = Delta::default();
        for p in &sub {
            let inherited = self.inherited(p);
            let Some(n) = self.nodes.get_mut(&**p) else {
                continue;
            };
            let was = n.deciding();
            n.settle(inherited);
            let (now, level) = (n.deciding(), n.level());
            if was != now {
                self.count_deciding(level, now);
            }
        }
        for (p, old) in sub.iter().zip(old) {
            let new = self.nodes.get(&**p).and_then(|n| self.element_of(n));
            if old != new {
                // An element that stays with another verdict: a descendant
                // found before the new cgroup, which now decides for it.
                delta.decisive |= old.is_some() && new.is_some();
                delta.del.extend(old);
                delta.add.extend(new);
            }
        }
        let after = self.levels();
        let started: BTreeSet<u32> = after.difference(&before).copied().collect();
        let stopped = before.difference(&after).copied().collect();
        // A level looked up from now on: sockets with a cgroup there went as
        // their ancestors decide without a look at it, and kept that.
        delta.decisive |= !started.is_empty();
        delta.add.extend(self.level_elements(&started, &sub));
        delta.del.extend(self.level_elements(&stopped, &sub));
        delta
    }
}

/// Whether a tree for `cfg` holds elements for the deciding cgroups only.
fn sparse(cfg: &Config) -> bool {
    cfg.datapath == Datapath::Ebpf
}

/// The effective action of `path`'s nearest ancestor that `find` knows.
fn inherited_from<'a>(path: &str, find: impl Fn(&str) -> Option<&'a Node>) -> Option<Action> {
    let mut p = parent_of(path);
    while let Some(parent) = p {
        if let Some(n) = find(parent) {
            return n.effective();
        }
        p = parent_of(parent);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::cgroup::is_within;

    fn cfg() -> Config {
        Config::parse(
            r#"{"version":1,"route-table":300,"bypass":["10.0.0.0/8","10.1.0.0/16","11.0.0.0/8","::1"],
            "tproxies":{"proxy":{"port":7893,"mark":3000}},
            "rules":[
              {"match":"^/system\\.slice/mihomo\\.service$","direct":true},
              {"match":"/inner-direct\\.scope$","direct":true},
              {"match":"/drop\\.slice(/|$)","drop":true},
              {"match":"/proxy\\.slice(/|$)","tproxy":"proxy"}]}"#,
            "t",
        )
        .unwrap()
    }

    fn cg(path: &str, id: u64) -> Cgroup {
        Cgroup {
            path: path.into(),
            id,
            level: path.matches('/').count() as u32,
        }
    }

    #[test]
    fn a_level_map_holds_every_cgroup_of_its_level_with_what_decides_it() {
        let c = cfg();
        let t = Tree::build(
            &c,
            &[
                cg("/user.slice", 1),
                cg("/user.slice/proxy.slice", 2),
                cg("/user.slice/proxy.slice/a.scope", 3),
                cg("/user.slice/proxy.slice/inner-direct.scope", 4),
                cg("/system.slice", 5),
                cg("/system.slice/mihomo.service", 6),
                cg("/system.slice/other.service", 7),
            ],
        );
        // Levels 2 and 3 have deciding cgroups; level 1 has none, so its
        // cgroups need no element and the chain no lookup there.
        assert_eq!(
            t.elements().into_iter().collect::<Vec<_>>(),
            vec![
                ((2, 2), Some(Action::Tproxy(0))),
                ((2, 6), Some(Action::Direct)),
                ((2, 7), None),
                ((3, 3), Some(Action::Tproxy(0))),
                ((3, 4), Some(Action::Direct)),
            ]
        );
        let (direct, drop, per) = t.counts(1);
        assert_eq!((direct, drop, per), (2, 0, vec![2]));
    }

    #[test]
    fn incremental_inserts_and_removals_match_a_full_build() {
        let c = cfg();
        let mut t = Tree::default();
        let mut installed = Elements::new();
        let seq = [
            cg("/a", 1),
            cg("/a/b", 5),
            cg("/a/proxy.slice", 2),
            cg("/a/proxy.slice/x", 3),
            cg("/a/proxy.slice/x/drop.slice", 4),
        ];
        for s in &seq {
            t.insert(&c, s).apply(&mut installed);
        }
        assert_eq!(installed, Tree::build(&c, &seq).elements());
        // /a/b joined level 2's map when /a/proxy.slice made the level decide.
        assert_eq!(installed.get(&(2, 5)), Some(&None));
        assert_eq!(installed.len(), 3);
        // Duplicate notifications change nothing.
        assert!(t.insert(&c, &seq[2]).is_empty());
        // A removed and re-created cgroup (new id) replaces its element.
        let d = t.insert(&c, &cg("/a/proxy.slice/x/drop.slice", 40));
        assert_eq!(d.del, vec![((4, 4), Some(Action::Drop))]);
        assert_eq!(d.add, vec![((4, 40), Some(Action::Drop))]);
        d.apply(&mut installed);
        t.remove("/a/proxy.slice/x/drop.slice")
            .apply(&mut installed);
        t.remove("/a/proxy.slice/x").apply(&mut installed);
        assert_eq!(installed.len(), 2);
        // The level's last deciding cgroup takes the others' elements along.
        let d = t.remove("/a/proxy.slice");
        assert_eq!(
            d.del,
            vec![((2, 2), Some(Action::Tproxy(0))), ((2, 5), None)]
        );
        d.apply(&mut installed);
        assert!(installed.is_empty());
        // Removing a parent removes whatever is still recorded below it.
        assert!(t.remove("/a").is_empty());
        assert!(t.is_empty());
    }

    #[test]
    fn a_build_decides_as_inserts_one_by_one_do() {
        let c = cfg();
        // Out of order, a gap (/p/proxy.slice/q is not recorded), a sibling
        // that sorts between a parent and its children ("-" < "/"), and a
        // path listed twice (the later id counts).
        let list = [
            cg("/p/proxy.slice/q/drop.slice/z", 7),
            cg("/p/proxy.slice/q/drop.slice", 6),
            cg("/p-x", 3),
            cg("/p/proxy.slice", 2),
            cg("/p", 1),
            cg("/p-x/proxy.slice", 4),
            cg("/p/proxy.slice/q/drop.slice/z/inner-direct.scope", 8),
            cg("/p-x/proxy.slice", 5),
        ];
        let built = Tree::build(&c, &list);
        let mut one = Tree::default();
        for x in &list {
            one.insert(&c, x);
        }
        assert_eq!(built.elements(), one.elements());
        assert_eq!(
            built.decided().collect::<Vec<_>>(),
            one.decided().collect::<Vec<_>>()
        );
        assert_eq!(built.id("/p-x/proxy.slice"), Some(5));
        assert_eq!(
            built.elements().into_iter().collect::<Vec<_>>(),
            vec![
                ((2, 2), Some(Action::Tproxy(0))),
                ((2, 5), Some(Action::Tproxy(0))),
                ((4, 6), Some(Action::Drop)),
                ((6, 8), Some(Action::Direct)),
            ]
        );
    }

    #[test]
    fn a_node_keeps_every_level_and_action_in_its_16_bytes() {
        assert_eq!(std::mem::size_of::<Node>(), 16);
        let actions = [
            None,
            Some(Action::Direct),
            Some(Action::Drop),
            Some(Action::Tproxy(0)),
            Some(Action::Tproxy(u16::MAX)),
        ];
        for level in [0, 1, 8, 2048, MAX_LEVEL] {
            for own in actions {
                for inherited in actions {
                    let mut n = Node::new(u64::MAX, level, own);
                    assert_eq!((n.level(), n.own(), n.effective()), (level, own, None));
                    assert!(!n.deciding());
                    n.settle(inherited);
                    n.settle(inherited);
                    assert_eq!(n.id, u64::MAX);
                    assert_eq!((n.level(), n.own()), (level, own));
                    assert_eq!(n.effective(), own.or(inherited));
                    assert_eq!(n.deciding(), own.is_some() && own != inherited);
                }
            }
        }
    }

    #[test]
    fn a_parent_discovered_after_its_child_is_reconciled() {
        let c = cfg();
        let mut t = Tree::default();
        let mut inst = Elements::new();
        t.insert(&c, &cg("/p/proxy.slice/q/proxy.slice", 9))
            .apply(&mut inst);
        assert_eq!(inst.len(), 1);
        t.insert(&c, &cg("/p/proxy.slice", 2)).apply(&mut inst);
        // The child now inherits from a classified parent with the same verdict.
        assert_eq!(
            inst.into_iter().collect::<Vec<_>>(),
            vec![((2, 2), Some(Action::Tproxy(0)))]
        );
    }

    /// What the classify chain decides for a socket in `path`: the maps of
    /// the levels `inst` has elements at, deepest first, each looked up with
    /// the ancestor-or-self at that level; the first element found decides.
    fn walk(t: &Tree, inst: &Elements, path: &str) -> Option<Action> {
        walk_ids(inst, &ancestry(path, |p| t.id(p)))
    }

    /// What the classify chain decides for a socket whose cgroup and
    /// ancestors have the ids `chain` ((level, id), the known ones): by ids,
    /// so that it serves sockets of removed cgroups too.
    fn walk_ids(inst: &Elements, chain: &[(u32, u64)]) -> Option<Action> {
        walk_tagged(inst, u32::MAX, chain).0
    }

    /// The walk of the classify chain for a socket at level `depth` with the
    /// known ancestry `chain`, and whether the connection keeps its tag:
    /// not when a level looked at misses the socket's ancestor there (one
    /// with no element yet, see `table::classify_chain`).
    fn walk_tagged(inst: &Elements, depth: u32, chain: &[(u32, u64)]) -> (Option<Action>, bool) {
        let levels: BTreeSet<u32> = inst.keys().map(|k| k.0).collect();
        let mut keeps = true;
        for l in levels.iter().rev().filter(|l| **l <= depth) {
            let found = chain
                .iter()
                .find(|(at, _)| at == l)
                .and_then(|(_, id)| inst.get(&(*l, *id)));
            match found {
                Some(decided) => return (*decided, keeps),
                None => keeps = false,
            }
        }
        (None, keeps)
    }

    /// The (level, id) of `path` and of its ancestors that `id` knows.
    fn ancestry(path: &str, id: impl Fn(&str) -> Option<u64>) -> Vec<(u32, u64)> {
        let mut out = Vec::new();
        let mut p = Some(path);
        while let Some(x) = p {
            if let Some(id) = id(x) {
                out.push((x.matches('/').count() as u32, id));
            }
            p = parent_of(x);
        }
        out
    }

    /// A small deterministic generator (xorshift), for the randomised tests.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    fn forget(known: &mut BTreeMap<String, u64>, path: &str) {
        known.retain(|p, _| !is_within(p, path));
    }

    #[test]
    fn random_changes_keep_the_elements_of_a_full_build_and_the_walk_decides_as_the_tree() {
        random_changes(&cfg());
        let ebpf = Config::parse(
            r#"{"version":1,"datapath":"ebpf","tproxies":{"proxy":{"port":7893,"mark":3000}},
            "rules":[
              {"match":"/inner-direct\\.scope$","direct":true},
              {"match":"/drop\\.slice(/|$)","drop":true},
              {"match":"/proxy\\.slice(/|$)","tproxy":"proxy"}]}"#,
            "t",
        )
        .unwrap();
        random_changes(&ebpf);
    }

    fn random_changes(c: &Config) {
        let names = ["proxy.slice", "drop.slice", "inner-direct.scope", "a", "b"];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut t = Tree::default();
        let mut known: BTreeMap<String, u64> = BTreeMap::new();
        let mut installed = Elements::new();
        let mut quiet = 0;
        // Sockets whose connections carry the current tag, and what they
        // were classified to do.
        let mut tagged: BTreeMap<(String, u64), Option<Action>> = BTreeMap::new();
        for step in 0..3000u64 {
            let (before, known_before) = (installed.clone(), known.clone());
            let (delta, fresh) = if known.is_empty() || rng.below(3) > 0 {
                let depth = 1 + rng.below(6);
                let path: String = (0..depth)
                    .map(|_| format!("/{}", names[rng.below(names.len())]))
                    .collect();
                let id = 100 + step;
                let delta = t.insert(c, &cg(&path, id));
                // A path known already is a new cgroup there: the old one,
                // and so what was below it, is gone.
                if known.contains_key(&path) {
                    forget(&mut known, &path);
                }
                known.insert(path.clone(), id);
                (delta, Some(path))
            } else {
                let path = known.keys().nth(rng.below(known.len())).unwrap().clone();
                let delta = t.remove(&path);
                forget(&mut known, &path);
                (delta, None)
            };
            // A socket's cgroup and ancestry never change; an ancestor may be
            // found after its child (by then in `known`), and one made anew
            // at the path of a gone one is not its ancestor (`known_before`
            // has the old one).
            let chain =
                |p: &str| ancestry(p, |x| known_before.get(x).or_else(|| known.get(x)).copied());
            let depth = |p: &str| p.matches('/').count() as u32;
            // Every socket that exists sends a packet before the change is
            // committed (the new cgroup's before its element is in): one not
            // tagged yet is classified, and tagged when its walk keeps the
            // tag. (The eBPF datapath keeps no tags.)
            if !sparse(c) {
                let all = known_before
                    .iter()
                    .chain(fresh.as_ref().map(|p| (p, &known[p])));
                for (p, id) in all {
                    if let (decided, true) = walk_tagged(&before, depth(p), &chain(p)) {
                        tagged.entry((p.clone(), *id)).or_insert(decided);
                    }
                }
            }
            delta.apply(&mut installed);
            // Not decisive: the tagged connections keep going as they were
            // classified, which must be what their sockets decide now.
            if delta.decisive {
                tagged.clear();
            } else if !sparse(c) {
                quiet += 1;
                for ((p, _), decided) in &tagged {
                    assert_eq!(
                        walk_ids(&installed, &chain(p)),
                        *decided,
                        "step {step}: {p} decides otherwise, the delta not decisive"
                    );
                }
            }
            // Sockets of a gone cgroup are checked at its removal only: a
            // model that knows ancestors by path no longer knows theirs.
            tagged.retain(|(p, id), _| known.get(p) == Some(id));
            let list: Vec<Cgroup> = known.iter().map(|(p, id)| cg(p, *id)).collect();
            assert_eq!(installed, Tree::build(c, &list).elements(), "step {step}");
            let sorted: Vec<Element> = installed.iter().map(|(k, v)| (*k, *v)).collect();
            assert_eq!(t.element_list(), sorted, "step {step}");
            // The eBPF map: classified cgroups that decide, nothing else.
            if sparse(c) {
                assert!(installed.values().all(Option::is_some), "step {step}");
            }
            for p in known.keys() {
                let decided = t.decision(p).map(|d| d.0);
                assert_eq!(walk(&t, &installed, p), decided, "step {step}: {p}");
                // Just created, not in its map yet: the ancestors decide the
                // same unless it decides itself.
                let n = t.nodes[p.as_str()];
                if !n.deciding() {
                    let mut racing = installed.clone();
                    racing.remove(&(n.level(), n.id));
                    assert_eq!(walk(&t, &racing, p), decided, "step {step}: {p} racing");
                }
            }
        }
        if !sparse(c) {
            assert!(quiet > 300, "only {quiet} steps were not decisive");
        }
    }

    #[test]
    fn similar_prefixes_are_not_descendants() {
        let c = cfg();
        let mut t = Tree::build(&c, &[cg("/x", 1), cg("/x-proxy.slice", 2), cg("/x/y", 3)]);
        let d = t.remove("/x");
        assert!(d.is_empty());
        assert_eq!(t.len(), 1);
        assert_eq!(t.id("/x-proxy.slice"), Some(2));
    }

    #[test]
    fn diff_replaces_changed_verdicts() {
        let old: Elements = [((1, 1), Some(Action::Direct)), ((1, 2), Some(Action::Drop))].into();
        let new: Elements = [((1, 1), Some(Action::Drop)), ((2, 3), Some(Action::Direct))].into();
        let d = diff(&old, &new);
        assert_eq!(
            d.del,
            vec![((1, 1), Some(Action::Direct)), ((1, 2), Some(Action::Drop))]
        );
        assert_eq!(
            d.add,
            vec![((1, 1), Some(Action::Drop)), ((2, 3), Some(Action::Direct))]
        );
        let mut x = old.clone();
        d.apply(&mut x);
        assert_eq!(x, new);
        assert!(diff(&new, &new).is_empty());
    }

    #[test]
    fn a_reverted_delta_gives_back_what_it_was_applied_to() {
        let before: Elements =
            [((1, 1), Some(Action::Direct)), ((1, 2), Some(Action::Drop))].into();
        let mut t = Tree::default();
        let c = cfg();
        // The same key changes its verdict, one goes, one comes.
        let mut d = diff(
            &before,
            &[((1, 1), Some(Action::Drop)), ((2, 3), Some(Action::Direct))].into(),
        );
        d.extend(t.insert(&c, &cg("/drop.slice", 9)));
        let mut x = before.clone();
        d.apply(&mut x);
        assert_eq!(x.len(), d.applied_count(before.len()));
        d.revert(&mut x);
        assert_eq!(x, before);
    }

    #[test]
    fn delta_extend_cancels_add_then_delete() {
        let mut a = Delta {
            del: vec![],
            add: vec![((3, 9), Some(Action::Direct))],
            decisive: false,
        };
        a.extend(Delta {
            del: vec![((3, 9), Some(Action::Direct))],
            add: vec![],
            decisive: true,
        });
        assert!(a.is_empty());
        assert!(a.decisive, "what was decisive stays so");
    }

    #[test]
    fn a_decision_names_the_ancestor_that_decides() {
        let c = Config::parse(
            r#"{"version":1,"tproxies":{"proxy":{"port":1,"mark":3000}},
            "rules":[{"match":"/inner-direct\\.scope$","direct":true},
                     {"match":"/proxy\\.slice$","tproxy":"proxy"}]}"#,
            "t",
        )
        .unwrap();
        let t = Tree::build(
            &c,
            &[
                cg("/user.slice", 1),
                cg("/user.slice/proxy.slice", 2),
                cg("/user.slice/proxy.slice/a.scope", 3),
                cg("/user.slice/proxy.slice/inner-direct.scope", 4),
            ],
        );
        assert_eq!(
            t.decision("/user.slice/proxy.slice/a.scope"),
            Some((Action::Tproxy(0), "/user.slice/proxy.slice"))
        );
        assert_eq!(
            t.decision("/user.slice/proxy.slice/inner-direct.scope"),
            Some((Action::Direct, "/user.slice/proxy.slice/inner-direct.scope"))
        );
        assert_eq!(t.decision("/user.slice"), None);
    }
}
