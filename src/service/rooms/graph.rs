//! The event graph: where every event, built here or received from another server, is checked
//! against the room and written. [`Rooms::place`] runs under the room's lock: it authorises
//! the event against its own auth events and the state before it, soft-fails a remote event the
//! room's current state no longer allows, and writes in one batch the event, its place in the
//! graph (forward extremities), the state after it and the room's new current state (resolved
//! where branches meet), the membership indexes that follow from that state, and what
//! registered features contribute. Listeners hear of the event once the batch is durable.

use std::{cell::RefCell, collections::HashMap, sync::Arc};

use ruma::{
    CanonicalJsonValue, EventId, OwnedEventId, OwnedUserId, RoomId, RoomVersionId, UserId,
    events::StateEventType, room_version_rules::RoomVersionRules, state_res,
};
use serde::{Deserialize, Serialize};
use serde_json::Value as JsonValue;

use super::{
    NewEvent, RoomRecord, Rooms, Txn, Unsynced,
    listeners::Written,
    pdu::{Pdu, StoredPdu},
    state::StateMap,
};
use crate::{
    error::{Error, Result},
    service::{Services, audit::Entry},
};

/// Where an event stands in its room's graph.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// In the timeline clients see and, for a state event, in the state after it.
    #[default]
    Accepted,
    /// Allowed by the state before it but not by the room's current state when it arrived:
    /// kept in the graph (with its state), never shown to clients, never part of the current
    /// state, never a prev event of ours.
    SoftFailed,
    /// Not allowed by its auth events or the state before it: kept to answer for it, never in
    /// any state or timeline, never a prev event of ours.
    Rejected,
    /// Known without the state before it (an auth event fetched on its own, or an event whose
    /// prev events have not arrived): in no timeline and no state until its place is known.
    Outlier,
}

impl Status {
    /// Whether this is [`Status::Accepted`] (the stored default, so accepted events store
    /// nothing for it).
    pub fn is_accepted(&self) -> bool {
        *self == Status::Accepted
    }
}

/// The local parts of an event built here: what the client sent and its transaction.
pub(super) struct Local<'a> {
    /// The event as the client asked for it.
    pub event: &'a NewEvent,
    /// Audit records to write with it.
    pub audit: Vec<Entry>,
    /// The client transaction with its stored key.
    pub txn: Option<(Txn<'a>, &'a [u8])>,
    /// Whether the WAL sync is left to the caller.
    pub defer_sync: bool,
}

/// A checked event ready for its room: signed, named, parsed, with the state before it.
pub(super) struct Candidate {
    /// The event as it will be stored (position and states are filled in when written).
    pub stored: StoredPdu,
    /// Its parsed view.
    pub pdu: Pdu,
    /// The state before it (0 for a create event).
    pub state_before: u64,
    /// Its auth events with their short ids, when already read (events built here); read
    /// from the database otherwise.
    pub auth: Vec<(u64, Arc<Pdu>)>,
    /// For a received event: the WAL sync is left to the caller, who awaits
    /// [`crate::storage::Db::durable`] for everything it placed before answering (events of one
    /// transaction share one sync). Local events say so in their [`Local`].
    pub defer_sync: bool,
}

/// The room an event goes to: its record (absent for a create event) and rules.
pub(super) struct Room<'a> {
    pub record: Option<RoomRecord>,
    pub version: &'a RoomVersionId,
    pub rules: &'a RoomVersionRules,
}

/// Collects the first storage failure met inside a lookup that can only answer `None`, so an
/// unreadable database surfaces as an internal error instead of a refusal.
#[derive(Default)]
pub(super) struct Failure(RefCell<Option<Error>>);

impl Failure {
    /// The value of `result`, keeping its error if it failed.
    pub fn keep<T>(&self, result: Result<Option<T>>) -> Option<T> {
        result.unwrap_or_else(|error| {
            self.0.borrow_mut().get_or_insert(error);
            None
        })
    }

    /// The kept failure, if any.
    pub fn check(self) -> Result<()> {
        match self.0.into_inner() {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

/// Keeps an event readable while it is written (see [`Rooms::announce`]).
struct InFlightGuard<'a> {
    rooms: &'a Rooms,
    short: u64,
    event_id: OwnedEventId,
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        let mut in_flight = self.rooms.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        in_flight.pdus.remove(&self.short);
        in_flight.shorts.remove(&self.event_id);
    }
}

fn forbidden(reason: impl std::fmt::Display) -> Error {
    Error::forbidden(format!("Event not authorised: {reason}"))
}

impl Rooms {
    /// The parsed event `event_id`, if known.
    pub(super) fn pdu_by_id(&self, event_id: &EventId) -> Result<Option<Arc<Pdu>>> {
        match self.event_ids.get(event_id.as_str())? {
            Some(short) => self.state_pdu(short).map(Some),
            None => {
                let in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
                let short = in_flight.shorts.get(event_id);
                Ok(short.and_then(|short| in_flight.pdus.get(short)).cloned())
            }
        }
    }

    /// The short id of the event `event_id`, if known, including an event being written.
    pub(super) fn short_by_id(&self, event_id: &EventId) -> Result<Option<u64>> {
        match self.event_ids.get(event_id.as_str())? {
            Some(short) => Ok(Some(short)),
            None => {
                let in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
                Ok(in_flight.shorts.get(event_id).copied())
            }
        }
    }

    /// Makes the event `short` readable until the returned guard drops.
    fn announce(&self, short: u64, pdu: &Pdu) -> InFlightGuard<'_> {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        in_flight.pdus.insert(short, Arc::new(pdu.clone()));
        in_flight.shorts.insert(pdu.event_id.clone(), short);
        InFlightGuard { rooms: self, short, event_id: pdu.event_id.clone() }
    }

    /// The create event of the room `record` describes (none for a room not made yet).
    pub(super) fn create_of(&self, record: Option<&RoomRecord>) -> Result<Option<Arc<Pdu>>> {
        let Some(record) = record else { return Ok(None) };
        let short = self.states.get(record.current_state, "m.room.create", "")?;
        short.map(|short| self.state_pdu(short)).transpose()
    }

    /// The create event a received `pdu` is checked with: the room's, or, for a room new here
    /// whose version names its create event by the room id, that event once stored.
    pub(super) fn create_for(&self, room: &Room<'_>, pdu: &Pdu) -> Result<Option<Arc<Pdu>>> {
        if let Some(create) = self.create_of(room.record.as_ref())? {
            return Ok(Some(create));
        }
        if !room.rules.authorization.room_create_event_id_as_room_id {
            return Ok(None);
        }
        match EventId::parse(format!("${}", &pdu.room_id.as_str()[1..])) {
            Ok(create_id) => self.pdu_by_id(&create_id),
            Err(_) => Ok(None),
        }
    }

    /// Checks `pdu` against the rules that need no room state and against its own auth
    /// events (`against_auth_events`: for events from elsewhere; ours take them from the state
    /// before them). `Err` is a storage failure; `Ok(Err(reason))` a refusal.
    pub(super) fn check_auth_events(
        &self,
        room: &Room<'_>,
        pdu: &Pdu,
        against_auth_events: bool,
        create: Option<&Arc<Pdu>>,
        read: &[(u64, Arc<Pdu>)],
    ) -> Result<std::result::Result<(), String>> {
        let failure = Failure::default();
        let mut auth: HashMap<(String, String), Arc<Pdu>> = HashMap::new();
        for (index, id) in pdu.auth_events.iter().enumerate() {
            let event = match read.get(index) {
                Some((_, event)) if event.event_id == *id => Some(event.clone()),
                _ => failure.keep(self.pdu_by_id(id)),
            };
            let Some(event) = event else {
                failure.check()?;
                return Ok(Err(format!("auth event {id} is unknown")));
            };
            if event.room_id != pdu.room_id {
                return Ok(Err(format!("auth event {id} is of another room")));
            }
            if event.rejected {
                return Ok(Err(format!("auth event {id} was rejected")));
            }
            let key = (event.kind.to_string(), event.state_key.clone().unwrap_or_default());
            auth.insert(key, event);
        }
        let independent =
            state_res::check_state_independent_auth_rules(&room.rules.authorization, pdu, |id| {
                match auth.values().find(|event| event.event_id == *id) {
                    Some(event) => Some(event.clone()),
                    // The create event of room version 12, named by the room id.
                    None => failure.keep(self.pdu_by_id(id)),
                }
            });
        failure.check()?;
        if let Err(reason) = independent {
            return Ok(Err(reason.to_string()));
        }
        if !against_auth_events {
            return Ok(Ok(()));
        }
        if let Some(create) = create {
            auth.entry(("m.room.create".to_owned(), String::new())).or_insert(create.clone());
        }
        let dependent = state_res::check_state_dependent_auth_rules(
            &room.rules.authorization,
            pdu,
            |kind: &StateEventType, key: &str| {
                auth.get(&(kind.to_string(), key.to_owned())).cloned()
            },
        );
        Ok(dependent.map_err(|reason| reason.to_string()))
    }

    /// Checks `pdu` against the state `root`. `Err` is a storage failure; `Ok(Err(reason))` a
    /// refusal.
    pub(super) fn check_against_state(
        &self,
        rules: &RoomVersionRules,
        pdu: &Pdu,
        root: u64,
    ) -> Result<std::result::Result<(), String>> {
        let failure = Failure::default();
        let allowed = state_res::check_state_dependent_auth_rules(
            &rules.authorization,
            pdu,
            |kind: &StateEventType, key: &str| {
                let short = failure.keep(self.states.get(root, &kind.to_string(), key))?;
                failure.keep(self.state_pdu(short).map(Some))
            },
        );
        failure.check()?;
        Ok(allowed.map_err(|reason| reason.to_string()))
    }

    /// The depth of the stored event `short` (read in memory for recent events).
    pub(super) fn depth_of(&self, short: u64) -> Result<u64> {
        let depth = |stored: &StoredPdu| match stored.wire.get("depth") {
            Some(CanonicalJsonValue::Integer(depth)) => {
                u64::try_from(i64::from(*depth)).unwrap_or(0)
            }
            _ => 0,
        };
        if let Some(event) =
            self.recent.lock().unwrap_or_else(|e| e.into_inner()).events.get(&short)
        {
            return Ok(depth(event));
        }
        Ok(depth(&self.stored_by_short(short)?))
    }

    /// The state after the stored event `event` as its children see it: a rejected event
    /// changes nothing, so it is the state before it.
    pub(super) fn state_seen_after(event: &StoredPdu) -> u64 {
        match event.status {
            super::Status::Rejected => event.state_before,
            _ => event.state_after_or_before(),
        }
    }

    /// Authorises `candidate` and writes it with everything that follows from it, in one
    /// batch; returns where it stands. A local event that is not authorised is an error
    /// (`M_FORBIDDEN`); a remote one is stored as rejected or soft-failed. Runs under the
    /// room's lock.
    pub(super) fn place<'s>(
        &self,
        services: &'s Services,
        room: Room<'_>,
        candidate: Candidate,
        local: Option<Local<'_>>,
    ) -> Result<(super::Status, Unsynced<'s>)> {
        let Candidate { mut stored, pdu, state_before, auth, defer_sync } = candidate;
        let rules = room.rules;
        // Received events are checked against their auth events, with the create event.
        let create = match local {
            Some(_) => None,
            None => self.create_for(&room, &pdu)?,
        };
        let mut status = super::Status::Accepted;
        let mut refusal =
            self.check_auth_events(&room, &pdu, local.is_none(), create.as_ref(), &auth)?;
        if refusal.is_ok() {
            refusal = self.check_against_state(rules, &pdu, state_before)?;
        }
        if let Err(reason) = refusal {
            if local.is_some() {
                return Err(forbidden(reason));
            }
            tracing::info!(event_id = %pdu.event_id, %reason, "rejected an event");
            status = super::Status::Rejected;
        }
        // A room new here has no current state to soft-fail against.
        if status.is_accepted()
            && local.is_none()
            && let Some(current) = room.record.as_ref().map(|r| r.current_state)
            && current != state_before
            && let Err(reason) = self.check_against_state(rules, &pdu, current)?
        {
            tracing::info!(event_id = %pdu.event_id, %reason, "soft-failed an event");
            status = super::Status::SoftFailed;
        }
        stored.status = status;
        stored.state_before = state_before;
        let candidate = Candidate { stored, pdu, state_before, auth, defer_sync };
        self.write(services, room, candidate, local)
    }

    /// Writes a checked event, its status and state before set (see [`Rooms::place`]).
    fn write<'s>(
        &self,
        services: &'s Services,
        room: Room<'_>,
        candidate: Candidate,
        local: Option<Local<'_>>,
    ) -> Result<(super::Status, Unsynced<'s>)> {
        let Candidate { mut stored, pdu, auth, defer_sync: defer_received, .. } = candidate;
        let mut auth_shorts: Vec<u64> = auth.iter().map(|(short, _)| *short).collect();
        let Room { record, version, rules } = room;
        let status = stored.status;
        let room_id = stored.room_id.clone();
        let event_id = stored.event_id.clone();
        let mut batch = self.db.batch();
        // An outlier now placed keeps its short id (an event built here is new).
        let known = match local {
            Some(_) => None,
            None => self.event_ids.get(event_id.as_str())?,
        };
        let short = match known {
            Some(short) => short,
            None => self.short_event.next(&mut batch),
        };
        let _in_flight = self.announce(short, &pdu);
        let record_known = record.is_some();
        let mut record = match record {
            Some(record) if record.short_id != 0 => record,
            _ => RoomRecord {
                short_id: self.short_room.next(&mut batch),
                version: version.clone(),
                extremities: Vec::new(),
                depth: 0,
                current_state: 0,
            },
        };
        // The state after it, and its auth chain for the index.
        if let Some(state_key) = &pdu.state_key {
            if status != super::Status::Rejected {
                if auth_shorts.len() != pdu.auth_events.len() {
                    auth_shorts.clear();
                    for id in &pdu.auth_events {
                        auth_shorts.extend(self.event_ids.get(id.as_str())?);
                    }
                }
                let key = self.states.intern(&pdu.kind.to_string(), state_key)?;
                stored.replaces = self
                    .states
                    .get_short(stored.state_before, key)?
                    .filter(|replaced| *replaced != short);
                stored.state_after =
                    self.states.apply(&mut batch, stored.state_before, &[(key, Some(short))])?;
                self.index_auth_chain(&mut batch, short, &auth_shorts)?;
            } else {
                stored.state_after = stored.state_before;
            }
        }

        let accepted = status.is_accepted();
        let old_current = record.current_state;
        let mut pending = None;
        let mut redacted = None;
        let mut redacted_shorts = Vec::new();
        let received_content: JsonValue = match &local {
            None if accepted => {
                stored.wire.get("content").map(|c| c.clone().into()).unwrap_or_default()
            }
            _ => JsonValue::Null,
        };
        let content = local.as_ref().map_or(&received_content, |local| &local.event.content);
        if accepted {
            let next = services.stream.next(&mut batch);
            stored.position = next.position;
            services.stream.rooms.mark(&*room_id, next.position);
            pending = Some(next);
            // The graph: this event replaces its prev events as a forward extremity.
            let mut extremities = vec![event_id.clone()];
            extremities.extend(
                record.extremities.iter().filter(|e| !pdu.prev_events.contains(e)).cloned(),
            );
            record.extremities = extremities;
            record.depth = record.depth.max(pdu.depth);
            record.current_state = if record.extremities.len() == 1 {
                stored.state_after_or_before()
            } else {
                let mut roots = vec![stored.state_after_or_before()];
                for extremity in &record.extremities[1..] {
                    let other = self.stored(extremity)?.ok_or_else(|| {
                        Error::internal(format!("missing forward extremity {extremity}"))
                    })?;
                    roots.push(Self::state_seen_after(&other));
                }
                self.resolve(&mut batch, rules, &roots)?
            };
            if let Some(target) = &pdu.redacts
                && let Some(target_short) = self.event_ids.get(target.as_str())?
            {
                let target = self.stored_by_short(target_short)?;
                let applies = target.room_id == room_id
                    && (local.is_some() || self.may_redact(&stored, &target, version)?);
                if applies {
                    redacted_shorts = self.apply_redaction(
                        &mut batch,
                        &room_id,
                        (target_short, target.clone()),
                        &stored,
                        rules,
                    )?;
                    redacted = Some(target);
                }
            }
            self.timeline.put(&mut batch, &(record.short_id, stored.position), &short);
        }
        if accepted {
            // A room new here placed on a vouched state: clients see that state before it.
            let before = if record_known { old_current } else { stored.state_before };
            let room = (before, record.current_state);
            if room != (stored.state_before, stored.state_after_or_before()) {
                stored.room_state = Some(room);
            }
        }
        let member_changes =
            self.index_memberships(services, &mut batch, &room_id, old_current, &record, &stored)?;
        self.pdus.put(&mut batch, &short, &stored);
        self.event_ids.put(&mut batch, event_id.as_str(), &short);
        // A refused create event makes no room: its id stays free.
        if record_known || accepted {
            self.rooms.put(&mut batch, room_id.as_str(), &record);
        }

        let written = Written {
            room_id: &room_id,
            room_short: record.short_id,
            version,
            event: &stored,
            content,
            state_before: stored.state_before,
            redacted: redacted.as_ref(),
            local: local.is_some(),
        };
        if accepted {
            self.registry().contribute(services, &written, &mut batch)?;
        }
        let mut audit = Vec::new();
        let mut defer_sync = defer_received;
        if let Some(local) = local {
            if let Some((_, key)) = local.txn {
                self.transactions.put(&mut batch, key, &event_id);
            }
            audit = local.audit;
            defer_sync = local.defer_sync;
        }
        let committed = if defer_sync {
            services.audit.commit_deferred(batch, audit).map(Some)
        } else {
            services.audit.commit(batch, audit).map(|()| None)
        };
        let ticket = committed.inspect_err(|_| self.registry().abandoned(services, &written))?;

        for short in redacted_shorts.into_iter().chain(known) {
            self.forget_state_pdu(short);
        }
        for (user, _) in &member_changes {
            self.forget_memberships(user);
        }
        if !member_changes.is_empty() {
            self.update_members(&room_id, &member_changes);
        }
        let Some(pending) = pending else { return Ok((status, None)) };
        let stored = Arc::new(stored);
        self.remember_recent(record.short_id, short, stored.clone());
        self.registry().persisted(services, short, &stored);
        services.metrics.event_persisted();
        let position = pending.position;
        let members = self.members(&room_id)?;
        services.stream.wake_members_at(position, &members, &["join", "invite", "knock", "ban"]);
        services.stream.wake_at(position, member_changes.iter().map(|(u, _)| &**u));
        // Syncs are woken once the position is released: at once, or after the deferred sync.
        let unsynced = match ticket {
            Some(ticket) => Some((pending, ticket)),
            None => {
                drop(pending);
                None
            }
        };
        Ok((status, unsynced))
    }

    /// Whether the received redaction `redaction` takes effect on `target`: from the target's
    /// own server, or from a sender whose power allows redacting others' events (local
    /// redactions are checked before they are built).
    fn may_redact(
        &self,
        redaction: &StoredPdu,
        target: &StoredPdu,
        version: &RoomVersionId,
    ) -> Result<bool> {
        let server = |sender: &str| sender.split_once(':').map(|(_, server)| server.to_owned());
        if server(redaction.sender()) == server(target.sender()) {
            return Ok(true);
        }
        let Ok(sender) = UserId::parse(redaction.sender()) else { return Ok(false) };
        // Power levels read only the create and power levels events: those two entries suffice.
        let mut state = StateMap::new();
        for kind in ["m.room.create", "m.room.power_levels"] {
            if let Some(short) = self.states.get(redaction.state_before, kind, "")? {
                state.insert((kind.to_owned(), String::new()), short);
            }
        }
        Ok(self.power_levels(&state, version)?.user_can_redact_event_of_other(&sender))
    }

    /// Queues the membership index entries that follow from the room's current state moving
    /// from `old` to `record.current_state`; returns the users whose membership changed, with
    /// their membership now.
    fn index_memberships(
        &self,
        services: &Services,
        batch: &mut crate::storage::Batch,
        room_id: &RoomId,
        old: u64,
        record: &RoomRecord,
        event: &StoredPdu,
    ) -> Result<Vec<(OwnedUserId, String)>> {
        let mut changed = Vec::new();
        if old == record.current_state {
            return Ok(changed);
        }
        for (key, _, now) in self.states.diff(old, record.current_state)? {
            let name = self.states.keys.name(key)?;
            if name.0 != "m.room.member" {
                continue;
            }
            let Ok(user) = UserId::parse(name.1.as_str()) else { continue };
            let membership = match now {
                Some(short) => self.state_pdu(short)?.membership().unwrap_or("leave").to_owned(),
                None => "leave".to_owned(),
            };
            let was_joined = self.membership(room_id, &user)?.as_deref() == Some("join");
            let joined = membership == "join";
            if was_joined != joined && event.position != 0 {
                services.stream.joins_and_leaves.mark(&(), event.position);
                self.joins_and_leaves.put(
                    batch,
                    &event.position,
                    &(room_id.to_owned(), user.clone(), joined),
                );
            }
            self.user_rooms.put(batch, &(user.as_str(), room_id.as_str()), &membership);
            if user.server_name() == services.server_name() {
                self.clear_outside(batch, &user, room_id)?;
            }
            self.room_members.put(batch, &(room_id.as_str(), user.as_str()), &membership);
            changed.push((user, membership));
        }
        Ok(changed)
    }

    /// The status of the event `event_id`, if known.
    pub fn status_of(&self, event_id: &EventId) -> Result<Option<super::Status>> {
        Ok(self.stored(event_id)?.map(|stored| stored.status))
    }

    /// The room's forward extremities, newest first.
    pub fn extremities(&self, room_id: &RoomId) -> Result<Vec<OwnedEventId>> {
        Ok(self.room(room_id)?.map(|r| r.extremities).unwrap_or_default())
    }

    /// The ids of the state before `event_id` (`/state_ids`): `(state, auth chain)`.
    pub fn state_ids_before(
        &self,
        event_id: &EventId,
    ) -> Result<Option<(Vec<OwnedEventId>, Vec<OwnedEventId>)>> {
        let Some((state, chain)) = self.state_shorts_before(event_id)? else { return Ok(None) };
        let ids = |shorts: &mut dyn Iterator<Item = u64>| -> Result<Vec<OwnedEventId>> {
            shorts.map(|short| Ok(self.state_pdu(short)?.event_id.clone())).collect()
        };
        Ok(Some((ids(&mut state.into_iter())?, ids(&mut chain.into_iter())?)))
    }

    /// The stored events of the state before `event_id` and of its auth chain (`send_join`),
    /// read by short id: `(state, auth chain)`.
    pub fn state_events_before(
        &self,
        event_id: &EventId,
    ) -> Result<Option<(Vec<StoredPdu>, Vec<StoredPdu>)>> {
        let Some((state, chain)) = self.state_shorts_before(event_id)? else { return Ok(None) };
        let events = |shorts: Vec<u64>| -> Result<Vec<StoredPdu>> {
            shorts.into_iter().map(|short| self.stored_by_short(short)).collect()
        };
        Ok(Some((events(state)?, events(chain)?)))
    }

    /// The short ids of the state before the placed event `event_id` and of its auth chain.
    fn state_shorts_before(&self, event_id: &EventId) -> Result<Option<(Vec<u64>, Vec<u64>)>> {
        let Some(stored) = self.stored(event_id)? else { return Ok(None) };
        if stored.status == super::Status::Outlier {
            return Ok(None);
        }
        let state: Vec<u64> = self.states.load_short(stored.state_before)?.into_values().collect();
        let chain = self.auth_chain_of_events(&state)?;
        Ok(Some((state, chain)))
    }
}
