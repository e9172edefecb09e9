//! Short state keys: a number for each `(event type, state key)` pair, so states store and
//! compare eight-byte numbers instead of strings.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use super::StateKey;
use crate::{
    error::{Error, Result},
    service::Counter,
    storage::{Db, Table, tables},
};

/// Pairs kept in memory each way.
const CACHE: usize = 200_000;

/// Short keys in memory by event type and state key, with their count.
#[derive(Default)]
struct Names {
    by_type: HashMap<String, HashMap<String, u64>>,
    count: usize,
}

/// The two-way map between `(event type, state key)` and short state keys.
pub struct ShortKeys {
    db: Db,
    by_name: Table<u64>,
    by_short: Table<StateKey>,
    counter: Counter,
    /// Serialises allocation, so two writers never give one pair two numbers.
    allocating: Mutex<()>,
    /// By event type, then state key, so lookups borrow their strings.
    names: Mutex<Names>,
    shorts: Mutex<HashMap<u64, Arc<StateKey>>>,
}

impl ShortKeys {
    pub(super) fn new(db: &Db) -> Result<Self> {
        Ok(Self {
            db: db.clone(),
            by_name: db.table(tables::SHORT_STATE_KEYS),
            by_short: db.table(tables::STATE_KEYS),
            counter: Counter::new(db, "short_state_key")?,
            allocating: Mutex::default(),
            names: Mutex::default(),
            shorts: Mutex::default(),
        })
    }

    /// The short key of `(kind, key)`, if it has one.
    pub fn short(&self, kind: &str, key: &str) -> Result<Option<u64>> {
        let names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(short) = names.by_type.get(kind).and_then(|keys| keys.get(key)) {
            return Ok(Some(*short));
        }
        drop(names);
        let short = self.by_name.get(&(kind, key))?;
        if let Some(short) = short {
            self.remember(kind, key, short);
        }
        Ok(short)
    }

    /// The short key of `(kind, key)`, allocated now if it has none. The pair is written at
    /// once (without waiting for a WAL sync): any later synced write that uses the number
    /// makes it durable too, and an unused number is harmless.
    pub fn intern(&self, kind: &str, key: &str) -> Result<u64> {
        if let Some(short) = self.short(kind, key)? {
            return Ok(short);
        }
        let _allocating = self.allocating.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(short) = self.by_name.get(&(kind, key))? {
            self.remember(kind, key, short);
            return Ok(short);
        }
        let mut batch = self.db.batch();
        let short = self.counter.next(&mut batch);
        self.by_name.put(&mut batch, &(kind, key), &short);
        self.by_short.put(&mut batch, &short, &(kind.to_owned(), key.to_owned()));
        self.db.write_unsynced(batch)?;
        self.remember(kind, key, short);
        Ok(short)
    }

    /// The `(event type, state key)` of a short key.
    pub fn name(&self, short: u64) -> Result<Arc<StateKey>> {
        if let Some(name) = self.shorts.lock().unwrap_or_else(|e| e.into_inner()).get(&short) {
            return Ok(name.clone());
        }
        let name = self
            .by_short
            .get(&short)?
            .ok_or_else(|| Error::internal(format!("unknown short state key {short}")))?;
        let name = Arc::new(name);
        let mut shorts = self.shorts.lock().unwrap_or_else(|e| e.into_inner());
        if shorts.len() >= CACHE {
            shorts.clear();
        }
        shorts.insert(short, name.clone());
        Ok(name)
    }

    fn remember(&self, kind: &str, key: &str, short: u64) {
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        if names.count >= CACHE {
            *names = Names::default();
        }
        names.count += 1;
        names.by_type.entry(kind.to_owned()).or_default().insert(key.to_owned(), short);
    }
}
