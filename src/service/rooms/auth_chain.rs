//! The auth-chain index: each state event's whole auth chain (its auth events, theirs, and so
//! on), stored as sorted short ids when the event is written. Auth events are always state
//! events, so any event's chain is the union of its auth events' entries, and answers such as
//! `/event_auth`, `/state_ids` or the auth difference of state resolution read a few entries
//! instead of walking the room.

use std::{
    collections::{BTreeSet, HashSet},
    sync::Arc,
};

use ruma::OwnedEventId;

use super::Rooms;
use crate::{
    error::Result,
    storage::{Batch, Table, tables},
};

/// Auth chains kept in memory.
const CHAIN_CACHE: usize = 50_000;

impl Rooms {
    fn chains(&self) -> Table<Vec<u64>> {
        self.db.table(tables::AUTH_CHAINS)
    }

    /// Queues the index entry of the state event `short` whose auth events are
    /// `auth_shorts`.
    pub(super) fn index_auth_chain(
        &self,
        batch: &mut Batch,
        short: u64,
        auth_shorts: &[u64],
    ) -> Result<()> {
        let chain = Arc::new(self.chain_through(auth_shorts)?);
        self.chains().put(batch, &short, &chain);
        self.remember_chain(short, chain);
        Ok(())
    }

    /// The events `auth_shorts` and their auth chains, sorted.
    fn chain_through(&self, auth_shorts: &[u64]) -> Result<Vec<u64>> {
        let mut chain = BTreeSet::new();
        for auth in auth_shorts {
            chain.insert(*auth);
            chain.extend(self.auth_chain_of(*auth)?.iter().copied());
        }
        Ok(chain.into_iter().collect())
    }

    fn remember_chain(&self, short: u64, chain: Arc<Vec<u64>>) {
        let mut cache = self.chain_cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CHAIN_CACHE {
            cache.clear();
        }
        cache.insert(short, chain);
    }

    /// The auth chain of the event `short` (itself not included), sorted. Events written
    /// before the index existed, and non-state events, have theirs worked out from their auth
    /// events (and, for the former, remembered in the index).
    pub fn auth_chain_of(&self, short: u64) -> Result<Arc<Vec<u64>>> {
        if let Some(chain) = self.chain_cache.lock().unwrap_or_else(|e| e.into_inner()).get(&short)
        {
            return Ok(chain.clone());
        }
        if let Some(chain) = self.chains().get(&short)? {
            let chain = Arc::new(chain);
            self.remember_chain(short, chain.clone());
            return Ok(chain);
        }
        // Not indexed: walk the auth events (iteratively; chains can be long), indexing every
        // state event met so the walk is never repeated.
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        let mut pending = vec![short];
        while let Some(next) = pending.pop() {
            if !seen.insert(next) {
                continue;
            }
            order.push(next);
            for auth in &self.state_pdu(next)?.auth_events {
                // An unknown auth event (a rejected event may name one) adds nothing.
                let Some(auth) = self.event_ids.get(auth.as_str())? else { continue };
                if !self.chain_cache.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&auth)
                    && !self.chains().contains(&auth)?
                {
                    pending.push(auth);
                }
            }
        }
        // Parents before children: an event's auth events are always older, with lower ids.
        order.sort_unstable();
        let mut batch = self.db.batch();
        let mut last = Arc::default();
        for event in order {
            let pdu = self.state_pdu(event)?;
            let mut auth_shorts = Vec::with_capacity(pdu.auth_events.len());
            for auth in &pdu.auth_events {
                auth_shorts.extend(self.event_ids.get(auth.as_str())?);
            }
            let chain = Arc::new(self.chain_through(&auth_shorts)?);
            if pdu.state_key.is_some() {
                self.chains().put(&mut batch, &event, &chain);
            }
            self.remember_chain(event, chain.clone());
            last = chain;
        }
        // Derived data: the next synced write makes it durable, and it can be worked out again.
        self.db.write_unsynced(batch)?;
        Ok(last)
    }

    /// The union of the auth chains of `events` (short ids), sorted.
    pub fn auth_chain_of_events(&self, events: &[u64]) -> Result<Vec<u64>> {
        let mut chain = BTreeSet::new();
        for event in events {
            chain.extend(self.auth_chain_of(*event)?.iter().copied());
        }
        Ok(chain.into_iter().collect())
    }

    /// The whole auth chain of the events `event_ids` (`/event_auth` answers with it), as
    /// event ids; unknown events are skipped.
    pub fn auth_chain(&self, event_ids: &[OwnedEventId]) -> Result<Vec<OwnedEventId>> {
        let mut shorts = Vec::with_capacity(event_ids.len());
        for id in event_ids {
            shorts.extend(self.event_ids.get(id.as_str())?);
        }
        self.auth_chain_of_events(&shorts)?
            .into_iter()
            .map(|short| Ok(self.state_pdu(short)?.event_id.clone()))
            .collect()
    }

    /// The auth difference of state sets (each given as its events' ids; unknown ones are
    /// skipped): the events in the full auth chain of some set but not of all of them.
    pub fn auth_chain_difference(&self, sets: &[Vec<OwnedEventId>]) -> Result<Vec<OwnedEventId>> {
        let mut union = BTreeSet::new();
        let mut common: Option<BTreeSet<u64>> = None;
        for set in sets {
            let mut shorts = Vec::with_capacity(set.len());
            for id in set {
                shorts.extend(self.event_ids.get(id.as_str())?);
            }
            let chain: BTreeSet<u64> = self.auth_chain_of_events(&shorts)?.into_iter().collect();
            union.extend(chain.iter().copied());
            common = Some(match common {
                Some(common) => common.intersection(&chain).copied().collect(),
                None => chain,
            });
        }
        let common = common.unwrap_or_default();
        union
            .difference(&common)
            .map(|short| Ok(self.state_pdu(*short)?.event_id.clone()))
            .collect()
    }
}
