//! Room state as snapshots: each snapshot stores only what changed against its parent, with a
//! full snapshot every so often so loading one walks a short chain. State at any event is the
//! snapshot recorded with it.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use serde::{Deserialize, Serialize};

use crate::{
    error::Result,
    storage::{Batch, Db, Table, tables},
};

/// How many deltas may pile up before a snapshot is stored whole.
const MAX_CHAIN: u32 = 64;
/// Snapshots kept decoded in memory.
const CACHE_SIZE: usize = 4096;

/// `(event type, state key)`.
pub type StateKey = (String, String);
/// The full state: `(event type, state key)` -> short event id.
pub type StateMap = HashMap<StateKey, u64>;

/// A stored snapshot: a parent and the entries that differ from it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Snapshot {
    /// The snapshot this one extends (None for a full snapshot).
    pub parent: Option<u64>,
    /// How many deltas separate this snapshot from a full one.
    pub chain: u32,
    /// Entries added or replaced relative to the parent.
    pub changes: Vec<(String, String, u64)>,
}

/// Snapshot storage with a decoded cache.
pub struct States {
    snapshots: Table<Snapshot>,
    cache: Mutex<HashMap<u64, Arc<StateMap>>>,
    next_id: super::super::Counter,
}

impl States {
    pub(super) fn new(db: &Db) -> Result<Self> {
        Ok(Self {
            snapshots: db.table(tables::STATE_SNAPSHOTS),
            cache: Mutex::default(),
            next_id: super::super::Counter::new(db, "state_snapshot")?,
        })
    }

    /// The full state of snapshot `id` (0 is the empty state before a room's create event).
    pub fn load(&self, id: u64) -> Result<Arc<StateMap>> {
        if id == 0 {
            return Ok(Arc::default());
        }
        if let Some(state) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(&id) {
            return Ok(state.clone());
        }
        let mut chain = Vec::new();
        let mut next = Some(id);
        let mut base: Option<Arc<StateMap>> = None;
        while let Some(current) = next {
            let cached = (current != id)
                .then(|| {
                    self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(&current).cloned()
                })
                .flatten();
            if let Some(cached) = cached {
                base = Some(cached);
                break;
            }
            let snapshot = self.snapshots.get(&current)?.ok_or_else(|| {
                crate::Error::internal(format!("missing state snapshot {current}"))
            })?;
            next = snapshot.parent;
            chain.push(snapshot);
        }
        let mut state = base.map(|b| (*b).clone()).unwrap_or_default();
        for snapshot in chain.into_iter().rev() {
            for (kind, key, event) in snapshot.changes {
                state.insert((kind, key), event);
            }
        }
        let state = Arc::new(state);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_SIZE {
            cache.clear();
        }
        cache.insert(id, state.clone());
        Ok(state)
    }

    /// The entry `(kind, key)` of snapshot `id`, read from a cached full state when there is
    /// one, else by walking the deltas back only until it is found.
    pub fn get(&self, id: u64, kind: &str, key: &str) -> Result<Option<u64>> {
        let mut next = (id != 0).then_some(id);
        while let Some(current) = next {
            if let Some(state) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(&current)
            {
                return Ok(state.get(&(kind.to_owned(), key.to_owned())).copied());
            }
            let snapshot = self.snapshots.get(&current)?.ok_or_else(|| {
                crate::Error::internal(format!("missing state snapshot {current}"))
            })?;
            // Later changes in one snapshot win, as when loading.
            if let Some((_, _, event)) =
                snapshot.changes.iter().rev().find(|(k, s, _)| k == kind && s == key)
            {
                return Ok(Some(*event));
            }
            next = snapshot.parent;
        }
        Ok(None)
    }

    /// Queues a snapshot that is `parent` with `(kind, key)` set to `event`; returns its id
    /// and the resulting full state.
    pub fn extend(
        &self,
        batch: &mut Batch,
        parent: u64,
        parent_state: &StateMap,
        kind: &str,
        key: &str,
        event: u64,
    ) -> Result<(u64, StateMap)> {
        let parent_chain =
            if parent == 0 { None } else { self.snapshots.get(&parent)?.map(|s| s.chain) };
        let id = self.next_id.next(batch);
        let mut state = parent_state.clone();
        state.insert((kind.to_owned(), key.to_owned()), event);
        let snapshot = match parent_chain {
            Some(chain) if chain < MAX_CHAIN => Snapshot {
                parent: Some(parent),
                chain: chain + 1,
                changes: vec![(kind.to_owned(), key.to_owned(), event)],
            },
            _ => Snapshot {
                parent: None,
                chain: 0,
                changes: state.iter().map(|((k, s), e)| (k.clone(), s.clone(), *e)).collect(),
            },
        };
        self.snapshots.put(batch, &id, &snapshot);
        Ok((id, state))
    }

    /// Remembers a freshly written snapshot so the next load is free.
    pub fn remember(&self, id: u64, state: Arc<StateMap>) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_SIZE {
            cache.clear();
        }
        cache.insert(id, state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_entry_is_read_from_the_deltas_as_the_full_state_has_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), 8).unwrap();
        let states = States::new(&db).unwrap();
        let member = "m.room.member";
        let mut ids = Vec::new();
        let (mut parent, mut state) = (0, StateMap::new());
        for (key, event) in [("@a:x", 10), ("@b:x", 11), ("@a:x", 12)] {
            let mut batch = db.batch();
            let (id, next) = states.extend(&mut batch, parent, &state, member, key, event).unwrap();
            db.write(batch).unwrap();
            (parent, state) = (id, next);
            ids.push(id);
        }
        // A fresh reader has nothing cached: it walks the deltas.
        let fresh = States::new(&db).unwrap();
        for reader in [&fresh, &states] {
            assert_eq!(reader.get(ids[2], member, "@a:x").unwrap(), Some(12));
            assert_eq!(reader.get(ids[1], member, "@a:x").unwrap(), Some(10));
            assert_eq!(reader.get(ids[2], member, "@b:x").unwrap(), Some(11));
            assert_eq!(reader.get(ids[0], member, "@b:x").unwrap(), None);
            assert_eq!(reader.get(0, member, "@a:x").unwrap(), None);
        }
        for id in ids {
            let full = fresh.load(id).unwrap();
            for key in ["@a:x", "@b:x", "@c:x"] {
                let expected = full.get(&(member.to_owned(), key.to_owned())).copied();
                assert_eq!(States::new(&db).unwrap().get(id, member, key).unwrap(), expected);
            }
        }
    }
}
