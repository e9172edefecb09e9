//! Room state, stored compactly: a state is a persistent hash trie from short state keys
//! (numbers standing for `(event type, state key)`) to short event ids. A new state copies only
//! the path to what changed and shares every other node with the state it came from, so writing
//! one state event costs a few small nodes, whatever the size of the room, and reading one entry
//! walks a few nodes without loading the rest. A state is named by its root node's id; 0 is the
//! empty state before a room's create event.

mod node;
pub mod short_keys;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use self::{
    node::{Node, Slot},
    short_keys::ShortKeys,
};
use crate::{
    error::{Error, Result},
    storage::{Batch, Db, Table, tables},
};

/// Decoded nodes kept in memory.
const NODE_CACHE: usize = 65_536;
/// Full states kept decoded in memory.
const FULL_CACHE: usize = 1_024;

/// `(event type, state key)`.
pub type StateKey = (String, String);
/// The full state: `(event type, state key)` -> short event id.
pub type StateMap = HashMap<StateKey, u64>;
/// The full state by short state key: short state key -> short event id.
pub type ShortStateMap = HashMap<u64, u64>;

/// An entry that differs between two states: `(short state key, in the first, in the second)`.
pub type Difference = (u64, Option<u64>, Option<u64>);

/// A change to a state: the short state key and the short event now there (`None` removes it).
pub type Change = (u64, Option<u64>);

/// State storage: the trie's nodes, the short state keys, and decoded caches.
pub struct States {
    nodes: Table<()>,
    /// Short ids of `(event type, state key)`.
    pub keys: ShortKeys,
    next_node: super::super::Counter,
    node_cache: Mutex<Generations>,
    full_cache: Mutex<HashMap<u64, Arc<StateMap>>>,
}

impl States {
    pub(super) fn new(db: &Db) -> Result<Self> {
        Ok(Self {
            nodes: db.table(tables::STATE_NODES),
            keys: ShortKeys::new(db)?,
            // Continues the numbering of the snapshots states were once stored as, so the
            // states migrated from them keep their ids.
            next_node: super::super::Counter::new(db, "state_snapshot")?,
            node_cache: Mutex::default(),
            full_cache: Mutex::default(),
        })
    }

    /// The node `id`, from memory or the database.
    fn node(&self, id: u64) -> Result<Arc<Node>> {
        if let Some(node) = self.node_cache.lock().unwrap_or_else(|e| e.into_inner()).get(id) {
            return Ok(node);
        }
        let bytes = self
            .nodes
            .get_raw(&id)?
            .ok_or_else(|| Error::internal(format!("missing state node {id}")))?;
        let node = Arc::new(
            Node::decode(&bytes)
                .map_err(|e| Error::internal(format!("corrupt state node {id}: {e}")))?,
        );
        self.cache_node(id, node.clone());
        Ok(node)
    }

    fn cache_node(&self, id: u64, node: Arc<Node>) {
        self.node_cache.lock().unwrap_or_else(|e| e.into_inner()).insert(id, node);
    }

    /// The short event at `key` in state `root`.
    pub fn get_short(&self, root: u64, key: u64) -> Result<Option<u64>> {
        let hash = node::hash(key);
        let mut next = root;
        let mut level = 0;
        while next != 0 {
            match &*self.node(next)? {
                Node::Leaf(entries) => {
                    return Ok(entries
                        .binary_search_by_key(&key, |(k, _)| *k)
                        .ok()
                        .map(|i| entries[i].1));
                }
                Node::Branch(slots) => {
                    next = slots.child(node::nibble(hash, level)).unwrap_or(0);
                    level += 1;
                }
            }
        }
        Ok(None)
    }

    /// The short event at `(kind, key)` in state `root`.
    pub fn get(&self, root: u64, kind: &str, key: &str) -> Result<Option<u64>> {
        match self.keys.short(kind, key)? {
            Some(short) => self.get_short(root, short),
            None => Ok(None),
        }
    }

    /// Every entry of state `root`, by short state key.
    pub fn load_short(&self, root: u64) -> Result<ShortStateMap> {
        let mut out = ShortStateMap::new();
        let mut pending = vec![root];
        while let Some(id) = pending.pop() {
            if id == 0 {
                continue;
            }
            match &*self.node(id)? {
                Node::Leaf(entries) => out.extend(entries.iter().copied()),
                Node::Branch(slots) => pending.extend(slots.children()),
            }
        }
        Ok(out)
    }

    /// The full state `root` (0 is the empty state before a room's create event).
    pub fn load(&self, root: u64) -> Result<Arc<StateMap>> {
        if root == 0 {
            return Ok(Arc::default());
        }
        if let Some(state) = self.full_cache.lock().unwrap_or_else(|e| e.into_inner()).get(&root) {
            return Ok(state.clone());
        }
        let short = self.load_short(root)?;
        let mut state = StateMap::with_capacity(short.len());
        for (key, event) in short {
            let name = self.keys.name(key)?;
            state.insert((name.0.clone(), name.1.clone()), event);
        }
        let state = Arc::new(state);
        let mut cache = self.full_cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= FULL_CACHE {
            cache.clear();
        }
        cache.insert(root, state.clone());
        Ok(state)
    }

    /// The entries that differ between states `a` and `b`: `(key, in a, in b)`. Subtrees the
    /// two share are skipped without reading them.
    pub fn diff(&self, a: u64, b: u64) -> Result<Vec<Difference>> {
        let mut out = Vec::new();
        self.diff_into(a, b, &mut out)?;
        Ok(out)
    }

    fn diff_into(&self, a: u64, b: u64, out: &mut Vec<Difference>) -> Result<()> {
        if a == b {
            return Ok(());
        }
        let (node_a, node_b) = (self.opt_node(a)?, self.opt_node(b)?);
        match (node_a.as_deref(), node_b.as_deref()) {
            (Some(Node::Branch(x)), Some(Node::Branch(y))) => {
                for nibble in 0..16 {
                    let (ca, cb) = (x.child(nibble).unwrap_or(0), y.child(nibble).unwrap_or(0));
                    self.diff_into(ca, cb, out)?;
                }
            }
            _ => {
                let (x, y) = (self.load_short(a)?, self.load_short(b)?);
                for (key, event) in &x {
                    if y.get(key) != Some(event) {
                        out.push((*key, Some(*event), y.get(key).copied()));
                    }
                }
                for (key, event) in &y {
                    if !x.contains_key(key) {
                        out.push((*key, None, Some(*event)));
                    }
                }
            }
        }
        Ok(())
    }

    fn opt_node(&self, id: u64) -> Result<Option<Arc<Node>>> {
        if id == 0 { Ok(None) } else { self.node(id).map(Some) }
    }

    /// Queues the state that is `parent` with `changes` applied; returns its id (`parent` when
    /// nothing changes). Only the nodes on the paths to the changes are written.
    pub fn apply(&self, batch: &mut Batch, parent: u64, changes: &[Change]) -> Result<u64> {
        self.apply_as(batch, parent, changes, None)
    }

    /// As [`States::apply`], naming the new root `root_id` when given (for migrated states).
    fn apply_as(
        &self,
        batch: &mut Batch,
        parent: u64,
        changes: &[Change],
        root_id: Option<u64>,
    ) -> Result<u64> {
        let mut changes: Vec<(u64, u64, Option<u64>)> =
            changes.iter().map(|(key, event)| (node::hash(*key), *key, *event)).collect();
        changes.sort_by_key(|(hash, _, _)| *hash);
        // The last change of a key wins.
        changes.reverse();
        changes.dedup_by_key(|(_, key, _)| *key);
        changes.reverse();
        let mut writer = Writer { states: self, batch, root_id };
        writer.rewrite(parent, 0, &changes)
    }

    /// The short state key of `(kind, key)`, allocated if new.
    pub fn intern(&self, kind: &str, key: &str) -> Result<u64> {
        self.keys.intern(kind, key)
    }

    /// Rewrites snapshots stored in the older delta format as tries under the same ids, so
    /// every event and room keeps naming its state; runs once per database.
    pub fn migrate_snapshots(&self, db: &Db) -> Result<()> {
        #[derive(serde::Serialize, serde::Deserialize)]
        struct OldSnapshot {
            parent: Option<u64>,
            changes: Vec<(String, String, u64)>,
        }
        let global = db.table::<bool>(tables::GLOBAL);
        if global.get(SNAPSHOTS_MIGRATED)?.unwrap_or(false) {
            return Ok(());
        }
        let old = db.table::<OldSnapshot>(tables::STATE_SNAPSHOTS);
        let (mut batch, mut migrated) = (db.batch(), 0u64);
        for item in old.scan_prefix(Vec::new()) {
            let (key, snapshot) = item?;
            let id =
                <[u8; 8]>::try_from(&key[..]).map(u64::from_be_bytes).map_err(Error::internal)?;
            let mut changes = Vec::with_capacity(snapshot.changes.len());
            for (kind, state_key, event) in &snapshot.changes {
                changes.push((self.intern(kind, state_key)?, Some(*event)));
            }
            // Parents come before their children in id order, so they are tries already.
            let parent = snapshot.parent.unwrap_or(0);
            self.apply_as(&mut batch, parent, &changes, Some(id))?;
            old.delete(&mut batch, &id);
            migrated += 1;
            if migrated % 1_024 == 0 {
                db.write(std::mem::replace(&mut batch, db.batch()))?;
            }
        }
        global.put(&mut batch, SNAPSHOTS_MIGRATED, &true);
        db.write(batch)?;
        if migrated > 0 {
            tracing::info!(migrated, "rewrote stored room states in the compact form");
        }
        Ok(())
    }
}

/// Decoded nodes in two generations: a full young generation becomes the old one and the old
/// one is dropped. A node stays at least until [`NODE_CACHE`] newer ones were added, so the
/// nodes of a state being written (read back before their batch lands) are always found.
#[derive(Default)]
struct Generations {
    young: HashMap<u64, Arc<Node>>,
    old: HashMap<u64, Arc<Node>>,
}

impl Generations {
    fn get(&self, id: u64) -> Option<Arc<Node>> {
        self.young.get(&id).or_else(|| self.old.get(&id)).cloned()
    }

    fn insert(&mut self, id: u64, node: Arc<Node>) {
        if self.young.len() >= NODE_CACHE {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(id, node);
    }
}

/// The global-table key marking that snapshots in the older delta format were rewritten.
pub const SNAPSHOTS_MIGRATED: &str = "migrated_state_tries";

/// Writes the nodes of one new state into a batch.
struct Writer<'a> {
    states: &'a States,
    batch: &'a mut Batch,
    /// The id to give the new root, if fixed.
    root_id: Option<u64>,
}

impl Writer<'_> {
    /// The node replacing `id` (at `level`) once `changes` (sorted by hash) apply; 0 when
    /// nothing is left.
    fn rewrite(&mut self, id: u64, level: u32, changes: &[(u64, u64, Option<u64>)]) -> Result<u64> {
        if changes.is_empty() && self.root_id.is_none() {
            return Ok(id);
        }
        let node = if id == 0 { None } else { Some(self.states.node(id)?) };
        let new = match node.as_deref() {
            Some(Node::Branch(slots)) => {
                let mut slots = slots.clone();
                let mut rest = changes;
                while let Some((hash, _, _)) = rest.first() {
                    let nibble = node::nibble(*hash, level);
                    let split = rest.partition_point(|(h, _, _)| node::nibble(*h, level) == nibble);
                    let (mine, others) = rest.split_at(split);
                    let root_id = self.root_id.take();
                    let child = self.rewrite(slots.child(nibble).unwrap_or(0), level + 1, mine)?;
                    self.root_id = root_id;
                    slots.set(nibble, child);
                    rest = others;
                }
                if slots.is_empty() { None } else { Some(Node::Branch(slots)) }
            }
            leaf => {
                let mut entries: Vec<(u64, u64)> = match leaf {
                    Some(Node::Leaf(entries)) => entries.clone(),
                    _ => Vec::new(),
                };
                for (_, key, event) in changes {
                    match (entries.binary_search_by_key(key, |(k, _)| *k), event) {
                        (Ok(i), Some(event)) => entries[i].1 = *event,
                        (Ok(i), None) => {
                            entries.remove(i);
                        }
                        (Err(i), Some(event)) => entries.insert(i, (*key, *event)),
                        (Err(_), None) => {}
                    }
                }
                if entries.is_empty() {
                    None
                } else if entries.len() > node::LEAF_MAX && level < node::MAX_LEVEL {
                    return self.split(entries, level);
                } else {
                    Some(Node::Leaf(entries))
                }
            }
        };
        match new {
            Some(node) => Ok(self.write(node)),
            // A migrated state must exist under its id even when empty.
            None if self.root_id.is_some() => Ok(self.write(Node::Leaf(Vec::new()))),
            None => Ok(0),
        }
    }

    /// A branch at `level` holding `entries`, split by the next nibble of their hashes.
    fn split(&mut self, mut entries: Vec<(u64, u64)>, level: u32) -> Result<u64> {
        entries.sort_by_key(|(key, _)| node::hash(*key));
        let mut slots = Slot::default();
        let root_id = self.root_id.take();
        let mut rest = &entries[..];
        while let Some((key, _)) = rest.first() {
            let nibble = node::nibble(node::hash(*key), level);
            let split =
                rest.partition_point(|(k, _)| node::nibble(node::hash(*k), level) == nibble);
            let (mine, others) = rest.split_at(split);
            let mut mine = mine.to_vec();
            mine.sort_by_key(|(key, _)| *key);
            let child = if mine.len() > node::LEAF_MAX && level + 1 < node::MAX_LEVEL {
                self.split(mine, level + 1)?
            } else {
                self.write(Node::Leaf(mine))
            };
            slots.set(nibble, child);
            rest = others;
        }
        self.root_id = root_id;
        Ok(self.write(Node::Branch(slots)))
    }

    /// Queues `node` under a fresh id (or the fixed root id) and remembers it.
    fn write(&mut self, node: Node) -> u64 {
        let id = self.root_id.take().unwrap_or_else(|| self.states.next_node.next(self.batch));
        self.states.nodes.put_encoded(self.batch, &id.to_be_bytes(), &node.encode());
        self.states.cache_node(id, Arc::new(node));
        id
    }
}

#[cfg(test)]
mod tests;
