//! Events placed on a state another server vouches for: the event a join's `send_join`
//! answer completes, or an event after a gap that fetching prev events could not close. The
//! state and auth chain that come with it are checked like any received event and stored as
//! outliers (those their own auth events refuse are rejected and left out); the state they
//! make becomes the state before the event, which is then placed like any other received
//! event, so the usual checks (auth against its auth events and that state, soft-failure)
//! still decide its fate.

use std::collections::HashSet;

use ruma::{CanonicalJsonObject, OwnedEventId, RoomId, RoomVersionId};

use super::{
    Rooms, Status,
    graph::{Candidate, Room},
    ingest::{Checked, KeyLookup, Outcome, parents_first},
};
use crate::{
    error::{Error, ErrorKind, Result},
    service::Services,
};

/// Most state and auth chain events taken with one event: a room of tens of thousands of
/// members fits, and a hostile server cannot make us hold more.
pub const MAX_STATE_EVENTS: usize = 200_000;

/// The state before an event and its auth chain, as another server sent them.
#[derive(Debug, Default)]
pub struct VouchedState {
    /// The full state before the event.
    pub state: Vec<CanonicalJsonObject>,
    /// The auth chain of the event and of the state.
    pub auth_chain: Vec<CanonicalJsonObject>,
}

impl Rooms {
    /// Places `pdu`, of a room of version `version`, on the state `vouched` gives (the full
    /// state before it), after storing that state and its auth chain as outliers. Creates the room
    /// here when it is new. Returns the event's id (when it has one) and outcome.
    pub async fn ingest_with_state(
        &self,
        services: &Services,
        room_id: &RoomId,
        version: &RoomVersionId,
        pdu: CanonicalJsonObject,
        vouched: VouchedState,
        keys: &dyn KeyLookup,
    ) -> Result<(Option<OwnedEventId>, Outcome)> {
        let VouchedState { state, auth_chain } = vouched;
        if state.len() + auth_chain.len() > MAX_STATE_EVENTS {
            return Err(Error::invalid_param(format!(
                "At most {MAX_STATE_EVENTS} state and auth chain events"
            )));
        }
        let version = match self.room(room_id)? {
            Some(record) => record.version,
            None => version.clone(),
        };
        let rules = version.rules().filter(super::resolve::resolvable).ok_or_else(|| {
            Error::new(
                ErrorKind::UnsupportedRoomVersion,
                format!("Room version {version} is not supported"),
            )
        })?;
        // The event, its state and its auth chain are checked as one lot.
        let state_len = state.len();
        let mut wires = Vec::with_capacity(1 + state_len + auth_chain.len());
        wires.push(pdu);
        wires.extend(state);
        wires.extend(auth_chain);
        let mut received =
            self.check_received_many(room_id, Some(&version), wires, keys).await?.into_iter();
        let event = match received.next() {
            Some(Ok(event)) => event,
            Some(Err((event_id, reason))) => return Ok((event_id, Outcome::Dropped(reason))),
            None => return Err(Error::internal("no check for the event")),
        };
        let mut seen = HashSet::new();
        let mut state_ids = Vec::with_capacity(state_len);
        let mut checked = Vec::with_capacity(received.len());
        for (index, received) in received.enumerate() {
            match received {
                Ok(received) => {
                    let id = received.stored.event_id.clone();
                    if index < state_len && received.pdu.state_key.is_some() {
                        state_ids.push(id.clone());
                    }
                    if seen.insert(id) {
                        checked.push(received);
                    }
                }
                Err((event_id, reason)) => {
                    tracing::info!(?event_id, %reason, "dropped a state or auth chain event");
                }
            }
        }

        let lock = self.lock(room_id);
        let _guard = lock.lock().await;
        let record = self.room(room_id)?;
        let event_id = event.stored.event_id.clone();
        if let Some(known) = self.stored(&event_id)?
            && known.status != Status::Outlier
        {
            return Ok((Some(event_id), Outcome::Known(known.status)));
        }
        // Outliers written without waiting for the log sync: the event's own synced batch
        // makes them durable with it.
        for Checked { stored, pdu } in parents_first(checked) {
            if self.stored(&stored.event_id)?.is_none() {
                let room = Room { record: record.clone(), version: &version, rules: &rules };
                self.store_waiting(&room, stored, &pdu, &[])?;
            }
        }

        // The state: every state event given that was not rejected, the last of a key winning.
        let mut changes = Vec::with_capacity(state_ids.len());
        for id in &state_ids {
            let Some(short) = self.event_ids.get(id.as_str())? else { continue };
            let stored = self.stored_by_short(short)?;
            if stored.status == Status::Rejected {
                continue;
            }
            let Some(state_key) = stored.wire.get("state_key").and_then(|k| k.as_str()) else {
                continue;
            };
            let kind = stored.wire.get("type").and_then(|t| t.as_str()).unwrap_or_default();
            changes.push((self.states.intern(kind, state_key)?, Some(short)));
        }
        let mut batch = self.db.batch();
        let state_before = self.states.apply(&mut batch, 0, &changes)?;
        // Derived nodes only: the event's own synced batch makes them durable.
        self.db.write_unsynced(batch)?;

        let Checked { stored, pdu } = event;
        let room = Room { record, version: &version, rules: &rules };
        let candidate =
            Candidate { stored, pdu, state_before, auth: Vec::new(), defer_sync: false };
        let (status, _) = self.place(services, room, candidate, None)?;
        Ok((Some(event_id), Outcome::Placed(status)))
    }
}
