//! State resolution: the state where branches of the graph meet, by ruma's implementation of
//! the version 2 algorithm with the rules of the room's version (including room version 12's
//! conflicted state subgraph). Room version 1 resolves with the first algorithm, which Plaza
//! does not implement: it takes no events of such rooms from other servers, and its own never
//! fork (see `docs/event-graph.md`).

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::Arc,
};

use ruma::{
    EventId, OwnedEventId,
    events::StateEventType,
    room_version_rules::{RoomVersionRules, StateResolutionVersion},
    state_res::{self, StateMap, utils::event_id_set::EventIdSet},
};

use super::{Rooms, graph::Failure, pdu::Pdu, state::Change};
use crate::{
    error::{Error, ErrorKind, Result},
    storage::Batch,
};

/// Whether Plaza can resolve the state of rooms of these rules.
pub fn resolvable(rules: &RoomVersionRules) -> bool {
    matches!(rules.state_res, StateResolutionVersion::V2(_))
}

impl Rooms {
    /// Queues the state that resolves the states `roots` (of the branches that meet) and
    /// returns its id. Equal states need no resolution; only differing entries are written.
    pub(super) fn resolve(
        &self,
        batch: &mut Batch,
        rules: &RoomVersionRules,
        roots: &[u64],
    ) -> Result<u64> {
        let mut distinct: Vec<u64> = roots.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        if let [only] = distinct[..] {
            return Ok(only);
        }
        let StateResolutionVersion::V2(v2_rules) = &rules.state_res else {
            return Err(Error::new(
                ErrorKind::UnsupportedRoomVersion,
                "This server cannot resolve the state of room version 1",
            ));
        };
        let base = roots[0];
        let shorts: Vec<_> =
            distinct.iter().map(|root| self.states.load_short(*root)).collect::<Result<_>>()?;
        let mut maps: Vec<StateMap<OwnedEventId>> = Vec::with_capacity(shorts.len());
        let mut chains = Vec::with_capacity(shorts.len());
        for state in &shorts {
            let mut map = HashMap::with_capacity(state.len());
            for (key, event) in state {
                let name = self.states.keys.name(*key)?;
                let event_id = self.state_pdu(*event)?.event_id.clone();
                map.insert((StateEventType::from(name.0.as_str()), name.1.clone()), event_id);
            }
            maps.push(map);
            let events: Vec<u64> = state.values().copied().collect();
            let chain: EventIdSet<OwnedEventId> = self
                .auth_chain_of_events(&events)?
                .into_iter()
                .map(|short| Ok(self.state_pdu(short)?.event_id.clone()))
                .collect::<Result<_>>()?;
            chains.push(chain);
        }
        let failure = Failure::default();
        let fetch = |id: &EventId| -> Option<Arc<Pdu>> { failure.keep(self.pdu_by_id(id)) };
        let subgraph = |conflicted: &StateMap<Vec<OwnedEventId>>| {
            failure.keep(self.conflicted_subgraph(conflicted).map(Some))
        };
        let resolved = state_res::resolve(
            &rules.authorization,
            v2_rules,
            maps.iter(),
            chains,
            fetch,
            subgraph,
        );
        failure.check()?;
        // The events' own fault (none of ours): refused as such, not an internal error.
        let resolved = resolved.map_err(|e| {
            tracing::info!(%e, "state resolution failed");
            Error::new(ErrorKind::Unknown, format!("State resolution failed: {e}"))
        })?;

        // Written as the changes against the first branch's state.
        let first = &shorts[distinct.iter().position(|r| *r == base).unwrap_or(0)];
        let mut changes: Vec<Change> = Vec::new();
        let mut kept = HashSet::with_capacity(resolved.len());
        for ((kind, state_key), event_id) in &resolved {
            let key = self.states.intern(&kind.to_string(), state_key)?;
            // The event being written (a state event meeting other branches) is among them.
            let event = self
                .short_by_id(event_id)?
                .ok_or_else(|| Error::internal(format!("resolved to unknown {event_id}")))?;
            kept.insert(key);
            if first.get(&key) != Some(&event) {
                changes.push((key, Some(event)));
            }
        }
        changes.extend(first.keys().filter(|key| !kept.contains(*key)).map(|key| (*key, None)));
        self.states.apply(batch, base, &changes)
    }

    /// The conflicted state subgraph (room version 12): the events on an auth path from one
    /// conflicted event to another, both ends included.
    pub fn conflicted_subgraph(
        &self,
        conflicted: &StateMap<Vec<OwnedEventId>>,
    ) -> Result<EventIdSet<OwnedEventId>> {
        let mut ends = BTreeSet::new();
        for id in conflicted.values().flatten() {
            ends.extend(self.short_by_id(id)?);
        }
        // Every ancestor of some conflicted event is a candidate; it is on a path when it is a
        // conflicted event or one of its auth events is on a path. One walk over the
        // candidates' auth events decides them all (each is decided once).
        let mut candidates = ends.clone();
        for end in &ends {
            candidates.extend(self.auth_chain_of(*end)?.iter().copied());
        }
        let mut on_path: HashMap<u64, bool> = HashMap::with_capacity(candidates.len());
        for &start in &candidates {
            // An event is pushed with its auth events once read, so they are read only once.
            let mut stack: Vec<(u64, Option<Vec<u64>>)> = vec![(start, None)];
            while let Some((event, auth)) = stack.pop() {
                if on_path.contains_key(&event) {
                    continue;
                }
                if ends.contains(&event) {
                    on_path.insert(event, true);
                    continue;
                }
                match auth {
                    Some(auth) => {
                        let reaches = auth.iter().any(|a| on_path.get(a).copied().unwrap_or(false));
                        on_path.insert(event, reaches);
                    }
                    None => {
                        let mut auth = Vec::new();
                        for id in &self.state_pdu(event)?.auth_events {
                            auth.extend(self.short_by_id(id)?);
                        }
                        let unread: Vec<u64> =
                            auth.iter().copied().filter(|a| !on_path.contains_key(a)).collect();
                        stack.push((event, Some(auth)));
                        stack.extend(unread.into_iter().map(|a| (a, None)));
                    }
                }
            }
        }
        let mut subgraph = EventIdSet::new();
        for (event, reaches) in on_path {
            if reaches && candidates.contains(&event) {
                subgraph.insert(self.state_pdu(event)?.event_id.clone());
            }
        }
        Ok(subgraph)
    }
}
