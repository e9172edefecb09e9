//! Events from other servers: the checks the spec asks on receipt of a PDU, in its order, then
//! the graph's own path ([`Rooms::place`]). Format and size first (on the signed event as
//! encoded), then signatures (with keys from a [`KeyLookup`]) and the content hash (an event
//! whose hash does not match is kept redacted); the rest (auth against its own auth events,
//! against the state before it, soft-failure against the current state) is shared with local
//! events. An event whose prev events have not arrived waits as an outlier, recorded as a gap,
//! and is placed once they are.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    future::Future,
    pin::Pin,
};

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, OwnedServerName, RoomId, RoomVersionId,
    room_version_rules::{EventIdFormatVersion, RoomVersionRules},
    signatures::{PublicKeyMap, Verified},
};

use super::{
    MAX_FIELD_BYTES, MAX_PDU_BYTES, Rooms, Status,
    graph::{Candidate, Room},
    pdu::{self, Pdu, StoredPdu},
    resolve::resolvable,
};
use crate::{
    error::{Error, Result},
    service::{Services, stream::Pending},
    storage::{Ticket, prefix, split_key},
};

/// Public keys of other servers, for checking their events' signatures. Federation fills it
/// with keys fetched and cached from those servers; tests with their fake servers' keys.
pub trait KeyLookup: Send + Sync {
    /// The verify keys of `servers` (`server name -> key id -> key`); a server left out fails
    /// the check of its signatures.
    fn public_keys<'a>(
        &'a self,
        servers: &'a BTreeSet<OwnedServerName>,
    ) -> Pin<Box<dyn Future<Output = Result<PublicKeyMap>> + Send + 'a>>;

    /// The verify keys of `servers` that were valid at `valid_at` (ms since the epoch), for
    /// room versions that enforce key validity; all of them when `valid_at` is `None`.
    fn public_keys_at<'a>(
        &'a self,
        servers: &'a BTreeSet<OwnedServerName>,
        valid_at: Option<u64>,
    ) -> Pin<Box<dyn Future<Output = Result<PublicKeyMap>> + Send + 'a>> {
        let _ = valid_at;
        self.public_keys(servers)
    }

    /// The verify keys for many events at once, one map per `(servers, valid_at)` asked, in
    /// order: an implementation reads each server's keys once for the lot.
    fn public_keys_many<'a>(
        &'a self,
        wanted: &'a [(BTreeSet<OwnedServerName>, Option<u64>)],
    ) -> Pin<Box<dyn Future<Output = Result<Vec<PublicKeyMap>>> + Send + 'a>> {
        Box::pin(async move {
            let mut maps = Vec::with_capacity(wanted.len());
            for (servers, valid_at) in wanted {
                maps.push(self.public_keys_at(servers, *valid_at).await?);
            }
            Ok(maps)
        })
    }
}

/// What became of an event given to [`Rooms::ingest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Stored now, with this status.
    Placed(Status),
    /// Already known, with this status.
    Known(Status),
    /// Not stored: malformed, too large, badly signed, or for a room this server cannot hold.
    Dropped(String),
}

/// Most prev events of one event (the spec's limit).
const MAX_PREV_EVENTS: usize = 20;
/// Most auth events of one event (the spec's limit).
const MAX_AUTH_EVENTS: usize = 10;
/// Most events taken in one call (a federation transaction carries at most 50).
pub const MAX_INGEST: usize = 1_000;

/// Least events one thread verifies when a batch is split between threads.
const VERIFY_CHUNK: usize = 32;

/// What [`Rooms::check_received_many`] says of one event.
pub(super) type Received = std::result::Result<Checked, (Option<OwnedEventId>, String)>;

/// An event that passed the checks needing no room state.
pub(super) struct Checked {
    pub(super) stored: StoredPdu,
    pub(super) pdu: Pdu,
}

impl Rooms {
    /// Takes events of `room_id` from other servers through the checks on receipt of a PDU and
    /// into the graph. Events are placed parents first whatever their order here; one that
    /// fails never stops the others. Returns each event's id (when it has one) and outcome,
    /// in the order given.
    pub async fn ingest(
        &self,
        services: &Services,
        room_id: &RoomId,
        pdus: Vec<CanonicalJsonObject>,
        keys: &dyn KeyLookup,
    ) -> Result<Vec<(Option<OwnedEventId>, Outcome)>> {
        if pdus.len() > MAX_INGEST {
            return Err(Error::invalid_param(format!("At most {MAX_INGEST} events at once")));
        }
        // A room this call creates takes its version from the create event among the events,
        // so the events after it in the same call are checked by that version's rules too.
        let known_version = match self.room(room_id)? {
            Some(record) => Some(record.version),
            None => pdus.iter().find_map(create_version),
        };
        let mut outcomes = Vec::with_capacity(pdus.len());
        let mut checked = Vec::new();
        let received =
            self.check_received_many(room_id, known_version.as_ref(), pdus, keys).await?;
        for received in received {
            match received {
                Ok(event) => {
                    outcomes.push((Some(event.stored.event_id.clone()), None));
                    checked.push(event);
                }
                Err((event_id, reason)) => {
                    outcomes.push((event_id, Some(Outcome::Dropped(reason))))
                }
            }
        }
        let lock = self.lock(room_id);
        let _guard = lock.lock().await;
        let mut placed: HashMap<OwnedEventId, Outcome> = HashMap::new();
        // Waiting events placed in this call, bounded: the rest stay in `gaps` until their
        // prev event is received again.
        let mut released = MAX_INGEST;
        let mut unsynced = Vec::new();
        for event in parents_first(checked) {
            let event_id = event.stored.event_id.clone();
            let outcome = self.ingest_one(services, event, &mut released, &mut unsynced)?;
            placed.insert(event_id, outcome);
        }
        // One WAL sync for every event placed (rejected and soft-failed ones too), after the
        // room's lock is released; their positions show to syncs once it is done.
        let ticket = self.db.ticket_now();
        drop(_guard);
        self.db.durable(ticket).await?;
        drop(unsynced);
        Ok(outcomes
            .into_iter()
            .map(|(event_id, outcome)| {
                let outcome = outcome
                    .or_else(|| event_id.as_ref().and_then(|id| placed.get(id).cloned()))
                    .unwrap_or_else(|| Outcome::Dropped("not placed".to_owned()));
                (event_id, outcome)
            })
            .collect())
    }

    /// Format, size, signatures and content hash of received events, in order: each event's
    /// `Err` drops it with its id (when known) and the reason. The keys of every server that
    /// signed are read once for the lot, and the signatures and hashes (the costly part) are
    /// checked on blocking threads, the events split between them.
    pub(super) async fn check_received_many(
        &self,
        room_id: &RoomId,
        known_version: Option<&RoomVersionId>,
        wires: Vec<CanonicalJsonObject>,
        keys: &dyn KeyLookup,
    ) -> Result<Vec<Received>> {
        let mut results: Vec<Option<Received>> = Vec::with_capacity(wires.len());
        let mut prepared = Vec::with_capacity(wires.len());
        let mut wanted = Vec::with_capacity(wires.len());
        for wire in wires {
            match prepare(known_version, wire) {
                Ok(event) => {
                    wanted.push((event.servers, event.valid_at));
                    prepared.push((results.len(), event.wire, event.rules));
                    results.push(None);
                }
                Err(dropped) => results.push(Some(Err(dropped))),
            }
        }
        let public_keys = keys.public_keys_many(&wanted).await?;
        if public_keys.len() != prepared.len() {
            return Err(Error::internal("the key lookup answered for other events"));
        }
        let jobs: Vec<_> = prepared
            .into_iter()
            .zip(public_keys)
            .map(|((index, wire, rules), keys)| (index, wire, rules, keys))
            .collect();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let chunk = jobs.len().div_ceil(threads).max(VERIFY_CHUNK);
        let mut tasks = Vec::with_capacity(threads);
        let mut jobs = jobs.into_iter();
        loop {
            let part: Vec<_> = jobs.by_ref().take(chunk).collect();
            if part.is_empty() {
                break;
            }
            let room_id = room_id.to_owned();
            tasks.push(tokio::task::spawn_blocking(move || {
                part.into_iter()
                    .map(|(index, wire, rules, keys)| {
                        (index, verify(&room_id, wire, &rules, &keys))
                    })
                    .collect::<Vec<_>>()
            }));
        }
        for task in tasks {
            for (index, received) in task.await.map_err(Error::internal)? {
                results[index] = Some(received);
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err((None, "not checked".to_owned()))))
            .collect())
    }

    /// Places one checked event (under the room lock), then up to `released` of the events
    /// that were waiting for it (and for them), counting them off. The positions of those
    /// placed wait in `unsynced` for the caller's WAL sync.
    fn ingest_one<'s>(
        &self,
        services: &'s Services,
        event: Checked,
        released: &mut usize,
        unsynced: &mut Vec<(Pending<'s>, Ticket)>,
    ) -> Result<Outcome> {
        let mut queue = VecDeque::from([event]);
        let mut first = None;
        while let Some(event) = queue.pop_front() {
            let event_id = event.stored.event_id.clone();
            let room_id = event.stored.room_id.clone();
            // One event's failure is its own; only a storage failure stops the others.
            let outcome = match self.place_received(services, event, unsynced) {
                Ok(outcome) => outcome,
                Err(error) if !error.is_internal() => Outcome::Dropped(error.to_string()),
                Err(error) => return Err(error),
            };
            first.get_or_insert_with(|| outcome.clone());
            // A rejected event placed in the graph still has a state before it for its
            // children (they see that state), so they are placed after it like any others.
            // A known event may still have events waiting on it (left over when a call's bound
            // was reached).
            let placed = matches!(
                outcome,
                Outcome::Placed(Status::Accepted | Status::SoftFailed | Status::Rejected)
                    | Outcome::Known(Status::Accepted | Status::SoftFailed | Status::Rejected)
            );
            if placed && *released > 0 {
                let waiting = self.take_waiting(&room_id, &event_id, *released)?;
                *released -= waiting.len();
                queue.extend(waiting);
            }
        }
        Ok(first.unwrap_or(Outcome::Dropped("not placed".to_owned())))
    }

    /// The graph part of receiving an event: outlier while prev events are missing, else
    /// placed on the state resolved from its prev events. A placed event's WAL sync is left
    /// to the caller: its position waits in `unsynced` until then.
    fn place_received<'s>(
        &self,
        services: &'s Services,
        event: Checked,
        unsynced: &mut Vec<(Pending<'s>, Ticket)>,
    ) -> Result<Outcome> {
        let Checked { stored, pdu } = event;
        let known = self.stored(&stored.event_id)?;
        if let Some(known) = &known
            && known.status != Status::Outlier
        {
            return Ok(Outcome::Known(known.status));
        }
        let record = self.room(&stored.room_id)?;
        let is_create = pdu.kind == ruma::events::TimelineEventType::RoomCreate
            && pdu.state_key.as_deref() == Some("");
        let version = match (&record, is_create) {
            (Some(record), false) => record.version.clone(),
            (None, true) => match create_version(&stored.wire) {
                Some(version) => version,
                None => return Ok(Outcome::Dropped("create event without a version".to_owned())),
            },
            (Some(_), true) => return Ok(Outcome::Dropped("the room exists already".to_owned())),
            (None, false) => return Ok(Outcome::Dropped("the room is unknown here".to_owned())),
        };
        let rules = version.rules().ok_or_else(|| Error::internal("room version lost"))?;
        if is_create {
            if !pdu.prev_events.is_empty() {
                return Ok(Outcome::Dropped("a create event has no prev events".to_owned()));
            }
            let room = Room { record: None, version: &version, rules: &rules };
            let candidate =
                Candidate { stored, pdu, state_before: 0, auth: Vec::new(), defer_sync: true };
            let (status, pending) = self.place(services, room, candidate, None)?;
            unsynced.extend(pending);
            return Ok(Outcome::Placed(status));
        }
        let mut roots = Vec::with_capacity(pdu.prev_events.len());
        let mut missing = Vec::new();
        for prev in &pdu.prev_events {
            match self.stored(prev)? {
                // An outlier, or an event rejected before it was placed (fetched alone), has
                // no state for its children to build on.
                Some(prev)
                    if prev.status != Status::Outlier
                        && !(prev.status == Status::Rejected && prev.state_before == 0)
                        && prev.room_id == stored.room_id =>
                {
                    roots.push(Self::state_seen_after(&prev));
                }
                _ => missing.push(prev.clone()),
            }
        }
        if pdu.prev_events.is_empty() {
            return Ok(Outcome::Dropped("only a create event has no prev events".to_owned()));
        }
        let room = Room { record, version: &version, rules: &rules };
        if !missing.is_empty() {
            let outcome = self.store_waiting(&room, stored, &pdu, &missing)?;
            // An outlier delivered again while it still waits was known already.
            return Ok(match outcome {
                Outcome::Placed(Status::Outlier) if known.is_some() => {
                    Outcome::Known(Status::Outlier)
                }
                outcome => outcome,
            });
        }
        let mut batch = self.db.batch();
        let state_before = self.resolve(&mut batch, &rules, &roots)?;
        // Derived nodes only: the event's own synced batch makes them durable.
        self.db.write_unsynced(batch)?;
        let candidate = Candidate { stored, pdu, state_before, auth: Vec::new(), defer_sync: true };
        let (status, pending) = self.place(services, room, candidate, None)?;
        unsynced.extend(pending);
        Ok(Outcome::Placed(status))
    }

    /// Stores an event whose prev events are missing as an outlier and records the gap it
    /// waits on. An event waiting for nothing (an auth event fetched on its own) is rejected
    /// if its own auth events refuse it; one that waits is judged when it is placed, since its
    /// auth events may be among what it waits for. The write does not wait for the log sync:
    /// the caller awaits [`crate::storage::Db::durable`] (or a synced write) before answering.
    pub(super) fn store_waiting(
        &self,
        room: &Room<'_>,
        mut stored: StoredPdu,
        pdu: &Pdu,
        missing: &[OwnedEventId],
    ) -> Result<Outcome> {
        let create = self.create_for(room, pdu)?;
        let judged = if missing.is_empty() {
            self.check_auth_events(room, pdu, true, create.as_ref(), &[])?
        } else {
            Ok(())
        };
        let status = match judged {
            Ok(()) => Status::Outlier,
            Err(reason) => {
                tracing::info!(event_id = %pdu.event_id, %reason, "rejected an outlier");
                Status::Rejected
            }
        };
        stored.status = status;
        let mut batch = self.db.batch();
        let short = match self.event_ids.get(stored.event_id.as_str())? {
            Some(short) => short,
            None => self.short_event.next(&mut batch),
        };
        if status == Status::Outlier {
            if pdu.state_key.is_some() {
                let mut auth_shorts = Vec::new();
                for id in &pdu.auth_events {
                    auth_shorts.extend(self.event_ids.get(id.as_str())?);
                }
                self.index_auth_chain(&mut batch, short, &auth_shorts)?;
            }
            for prev in missing {
                let key = (stored.room_id.as_str(), prev.as_str(), stored.event_id.as_str());
                self.gaps().put(&mut batch, &key, &());
            }
        }
        self.pdus.put(&mut batch, &short, &stored);
        self.event_ids.put(&mut batch, stored.event_id.as_str(), &short);
        // The caller's later wait on `ticket_now` covers this write.
        let _covered = self.db.write_deferred(batch)?;
        self.forget_state_pdu(short);
        Ok(Outcome::Placed(status))
    }

    fn gaps(&self) -> crate::storage::Table<()> {
        self.db.table(crate::storage::tables::GAPS)
    }

    /// The events of `room_id` that wait for `arrived`, now that it is placed, as checked
    /// events to place (their gap rows go once none of their prev events is missing).
    fn take_waiting(
        &self,
        room_id: &RoomId,
        arrived: &OwnedEventId,
        limit: usize,
    ) -> Result<Vec<Checked>> {
        let mut ready = Vec::new();
        let rows = prefix(&(room_id.as_str(), arrived.as_str()));
        let mut batch = self.db.batch();
        for item in self.gaps().scan_prefix(rows.clone()).take(limit) {
            let (key, ()) = item?;
            self.gaps().delete_raw(&mut batch, &key);
            let Some(waiting) = split_key(&key).nth(2) else { continue };
            let Ok(waiting) = std::str::from_utf8(waiting).map(ruma::EventId::parse) else {
                continue;
            };
            let Ok(waiting) = waiting else { continue };
            let Some(stored) = self.stored(&waiting)? else { continue };
            if stored.status != Status::Outlier {
                continue;
            }
            let pdu = Pdu::from_stored(&stored).map_err(Error::internal)?;
            ready.push(Checked { stored, pdu });
        }
        self.db.write(batch)?;
        Ok(ready)
    }

    /// The prev events the graph of `room_id` is missing (its gaps), for fetching them.
    pub fn gaps_of(&self, room_id: &RoomId) -> Result<Vec<OwnedEventId>> {
        let mut missing = BTreeSet::new();
        for item in self.gaps().scan_prefix(prefix(room_id.as_str())) {
            let (key, ()) = item?;
            let id = split_key(&key).nth(1).and_then(|id| std::str::from_utf8(id).ok());
            if let Some(Ok(id)) = id.map(ruma::EventId::parse)
                && self.stored(&id)?.is_none_or(|e| e.status == Status::Outlier)
            {
                missing.insert(id);
            }
        }
        Ok(missing.into_iter().collect())
    }

    /// Stores events known without their place in the graph (auth events fetched on their
    /// own) after the checks on receipt: outliers, or rejected when their auth events refuse
    /// them.
    pub async fn ingest_outliers(
        &self,
        room_id: &RoomId,
        pdus: Vec<CanonicalJsonObject>,
        keys: &dyn KeyLookup,
    ) -> Result<Vec<(Option<OwnedEventId>, Outcome)>> {
        let record = self.room(room_id)?;
        let version = record.as_ref().map(|r| r.version.clone());
        let mut checked = Vec::new();
        let mut outcomes = Vec::new();
        let pdus: Vec<_> = pdus.into_iter().take(MAX_INGEST).collect();
        for received in self.check_received_many(room_id, version.as_ref(), pdus, keys).await? {
            match received {
                Ok(event) => checked.push(event),
                Err((id, reason)) => outcomes.push((id, Outcome::Dropped(reason))),
            }
        }
        let lock = self.lock(room_id);
        let _guard = lock.lock().await;
        for Checked { stored, pdu } in parents_first(checked) {
            let event_id = stored.event_id.clone();
            if let Some(known) = self.stored(&event_id)? {
                outcomes.push((Some(event_id), Outcome::Known(known.status)));
                continue;
            }
            let version = match version.clone().or_else(|| create_version(&stored.wire)) {
                Some(version) => version,
                None => {
                    outcomes.push((Some(event_id), Outcome::Dropped("unknown room".to_owned())));
                    continue;
                }
            };
            let rules = version.rules().ok_or_else(|| Error::internal("room version lost"))?;
            let room = Room { record: record.clone(), version: &version, rules: &rules };
            let outcome = self.store_waiting(&room, stored, &pdu, &[])?;
            outcomes.push((Some(event_id), outcome));
        }
        // One log sync for them all, after the room's lock is released.
        let ticket = self.db.ticket_now();
        drop(_guard);
        self.db.durable(ticket).await?;
        Ok(outcomes)
    }
}

/// A received event ready for its signatures to be checked.
struct Prepared {
    wire: CanonicalJsonObject,
    rules: RoomVersionRules,
    /// The servers whose signatures it needs.
    servers: BTreeSet<OwnedServerName>,
    /// When their keys must have been valid (room versions that enforce key validity).
    valid_at: Option<u64>,
}

/// The checks of a received event that need no keys: its room version, format and size, and
/// the servers that must have signed it.
fn prepare(
    known_version: Option<&RoomVersionId>,
    mut wire: CanonicalJsonObject,
) -> std::result::Result<Prepared, (Option<OwnedEventId>, String)> {
    // Events carry nothing of the receiving side.
    wire.remove("unsigned");
    let version = match known_version {
        Some(version) => version.clone(),
        None => match create_version(&wire) {
            Some(version) => version,
            None => return Err((None, "the room is unknown here".to_owned())),
        },
    };
    let Some(rules) = version.rules().filter(resolvable) else {
        return Err((None, format!("room version {version} is not supported")));
    };
    check_format(&wire, &rules).map_err(|reason| (None, reason))?;
    let servers =
        ruma::signatures::required_server_signatures_to_verify_event(&wire, &rules.signatures)
            .map_err(|e| {
                (event_id_of(&wire, &rules).ok(), format!("cannot check signatures: {e}"))
            })?;
    // From room version 5, a key must have been valid when the event was sent.
    let valid_at = match wire.get("origin_server_ts") {
        Some(CanonicalJsonValue::Integer(ts)) if rules.enforce_key_validity => {
            Some(u64::try_from(i64::from(*ts)).unwrap_or(0))
        }
        _ => None,
    };
    Ok(Prepared { wire, rules, servers, valid_at })
}

/// The signature and content hash checks of a prepared event with its servers' `keys`, then
/// its room and shape. An event whose content hash does not match is kept redacted.
fn verify(
    room_id: &RoomId,
    mut wire: CanonicalJsonObject,
    rules: &RoomVersionRules,
    keys: &PublicKeyMap,
) -> Received {
    let event_id = event_id_of(&wire, rules).map_err(|reason| (None, reason))?;
    let drop = |reason: String| Err((Some(event_id.clone()), reason));
    match ruma::signatures::verify_event(keys, &wire, rules) {
        Ok(Verified::All) => {}
        Ok(Verified::Signatures) => {
            tracing::info!(%event_id, "content hash mismatch: keeping the event redacted");
            match ruma::canonical_json::redact(wire, &rules.redaction, None) {
                Ok(redacted) => wire = redacted,
                Err(e) => return drop(format!("cannot redact: {e}")),
            }
        }
        Err(e) => return drop(format!("bad signature: {e}")),
    }
    let named_room = match wire.get("room_id") {
        Some(CanonicalJsonValue::String(id)) => id.clone(),
        // A room version 12 create event: the room is named after it.
        _ => format!("!{}", &event_id.as_str()[1..]),
    };
    if named_room != room_id.as_str() {
        return drop("the event is of another room".to_owned());
    }
    let stored = StoredPdu::received(event_id.clone(), room_id.to_owned(), wire);
    match Pdu::from_stored(&stored) {
        Ok(pdu) => Ok(Checked { stored, pdu }),
        Err(e) => drop(format!("malformed event: {e}")),
    }
}

/// The room version a create event's content names.
fn create_version(wire: &CanonicalJsonObject) -> Option<RoomVersionId> {
    if wire.get("type").and_then(|t| t.as_str()) != Some("m.room.create") {
        return None;
    }
    let content = match wire.get("content") {
        Some(CanonicalJsonValue::Object(content)) => content,
        _ => return None,
    };
    match content.get("room_version") {
        Some(CanonicalJsonValue::String(version)) => RoomVersionId::try_from(version.as_str()).ok(),
        // Room version 1 rooms' create events could leave it out.
        None => Some(RoomVersionId::V1),
        _ => None,
    }
}

/// The event's id: its `event_id` field in room versions 1 and 2, else its reference hash.
fn event_id_of(
    wire: &CanonicalJsonObject,
    rules: &RoomVersionRules,
) -> std::result::Result<OwnedEventId, String> {
    let id = match rules.event_id_format {
        EventIdFormatVersion::V1 => match wire.get("event_id") {
            Some(CanonicalJsonValue::String(id)) => id.clone(),
            _ => return Err("no event_id".to_owned()),
        },
        _ => {
            let hash = ruma::signatures::reference_hash(wire, rules)
                .map_err(|e| format!("cannot hash the event: {e}"))?;
            format!("${hash}")
        }
    };
    OwnedEventId::try_from(id).map_err(|e| format!("bad event id: {e}"))
}

/// The spec's format and size checks on a received event, measured on its encoding.
pub fn check_format(
    wire: &CanonicalJsonObject,
    rules: &RoomVersionRules,
) -> std::result::Result<(), String> {
    let len = pdu::encoded_len(wire);
    if len > MAX_PDU_BYTES {
        return Err(format!("the event is {len} bytes, more than {MAX_PDU_BYTES}"));
    }
    let string = |field: &str, required: bool| -> std::result::Result<(), String> {
        match wire.get(field) {
            Some(CanonicalJsonValue::String(value)) if value.len() <= MAX_FIELD_BYTES => Ok(()),
            Some(CanonicalJsonValue::String(_)) => {
                Err(format!("{field} is longer than {MAX_FIELD_BYTES} bytes"))
            }
            None if !required => Ok(()),
            None => Err(format!("{field} is missing")),
            Some(_) => Err(format!("{field} is not a string")),
        }
    };
    string("type", true)?;
    string("sender", true)?;
    string("state_key", false)?;
    let is_create = wire.get("type").and_then(|t| t.as_str()) == Some("m.room.create");
    string("room_id", !is_create || rules.event_format.require_room_create_room_id)?;
    if rules.event_id_format == EventIdFormatVersion::V1 {
        string("event_id", true)?;
    }
    let list = |field: &str, max: usize| match wire.get(field) {
        Some(CanonicalJsonValue::Array(items)) if items.len() <= max => Ok(()),
        Some(CanonicalJsonValue::Array(_)) => Err(format!("{field} has more than {max} entries")),
        _ => Err(format!("{field} is missing or not a list")),
    };
    list("prev_events", MAX_PREV_EVENTS)?;
    list("auth_events", MAX_AUTH_EVENTS)?;
    match wire.get("depth") {
        Some(CanonicalJsonValue::Integer(depth)) if i64::from(*depth) >= 0 => {}
        _ => return Err("depth is missing or not a non-negative integer".to_owned()),
    }
    for field in ["content", "hashes", "signatures"] {
        if !matches!(wire.get(field), Some(CanonicalJsonValue::Object(_))) {
            return Err(format!("{field} is missing or not an object"));
        }
    }
    Ok(())
}

/// `events` ordered so every event comes after those of its prev events that are among them;
/// otherwise by depth, then event id, so any arrival order places them alike.
pub(super) fn parents_first(events: Vec<Checked>) -> Vec<Checked> {
    let index: HashMap<OwnedEventId, usize> =
        events.iter().enumerate().map(|(i, e)| (e.stored.event_id.clone(), i)).collect();
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); events.len()];
    let mut waiting_on = vec![0usize; events.len()];
    for (i, event) in events.iter().enumerate() {
        for prev in event.pdu.prev_events.iter().chain(&event.pdu.auth_events) {
            if let Some(&parent) = index.get(prev)
                && parent != i
            {
                children[parent].push(i);
                waiting_on[i] += 1;
            }
        }
    }
    let key = |i: usize| (events[i].pdu.depth, events[i].stored.event_id.clone());
    let mut ready: BTreeSet<_> =
        (0..events.len()).filter(|i| waiting_on[*i] == 0).map(|i| (key(i), i)).collect();
    let mut order = Vec::with_capacity(events.len());
    while let Some((_, i)) = ready.pop_first() {
        order.push(i);
        for &child in &children[i] {
            waiting_on[child] -= 1;
            if waiting_on[child] == 0 {
                ready.insert((key(child), child));
            }
        }
    }
    // A cycle (never valid) leaves events out; they go last, in depth order.
    let mut placed = vec![false; events.len()];
    for i in &order {
        placed[*i] = true;
    }
    let mut rest: Vec<usize> = (0..events.len()).filter(|i| !placed[*i]).collect();
    rest.sort_by_key(|i| key(*i));
    order.extend(rest);
    let mut slots: Vec<Option<Checked>> = events.into_iter().map(Some).collect();
    order.into_iter().filter_map(|i| slots[i].take()).collect()
}

#[cfg(test)]
mod tests {
    use ruma::{CanonicalJsonValue, RoomVersionId};
    use serde_json::json;

    use super::*;

    fn object(value: serde_json::Value) -> CanonicalJsonObject {
        match CanonicalJsonValue::try_from(value).unwrap() {
            CanonicalJsonValue::Object(object) => object,
            _ => unreachable!(),
        }
    }

    fn event(body: &str) -> CanonicalJsonObject {
        object(json!({
            "type": "m.room.message", "room_id": "!r:remote.test", "sender": "@a:remote.test",
            "origin": "remote.test", "origin_server_ts": 1, "depth": 3,
            "prev_events": ["$p"], "auth_events": ["$a"], "content": { "body": body },
            "hashes": { "sha256": "x" }, "signatures": {},
        }))
    }

    #[test]
    fn the_size_limit_counts_the_encoded_event_up_to_65536_bytes() {
        let rules = RoomVersionId::V11.rules().unwrap();
        let base = pdu::encoded_len(&event(""));
        let at_limit = event(&"a".repeat(MAX_PDU_BYTES - base));
        assert_eq!(pdu::encoded_len(&at_limit), MAX_PDU_BYTES);
        assert_eq!(check_format(&at_limit, &rules), Ok(()));
        let over = event(&"a".repeat(MAX_PDU_BYTES - base + 1));
        assert!(check_format(&over, &rules).unwrap_err().contains("65536"));
        // Escapes count as encoded: a quote takes two bytes.
        let quotes = event(&"\"".repeat((MAX_PDU_BYTES - base) / 2 + 1));
        assert!(check_format(&quotes, &rules).is_err());
    }

    #[test]
    fn malformed_events_are_named_by_what_is_wrong() {
        let rules = RoomVersionId::V11.rules().unwrap();
        let mut long_type = event("");
        long_type.insert("type".into(), CanonicalJsonValue::String("t".repeat(256)));
        assert!(check_format(&long_type, &rules).unwrap_err().contains("type"));
        let mut prevs = event("");
        let many: Vec<_> = (0..21).map(|i| CanonicalJsonValue::String(format!("$e{i}"))).collect();
        prevs.insert("prev_events".into(), CanonicalJsonValue::Array(many));
        assert!(check_format(&prevs, &rules).unwrap_err().contains("prev_events"));
        let mut depth = event("");
        depth.insert("depth".into(), CanonicalJsonValue::Integer((-1).into()));
        assert!(check_format(&depth, &rules).unwrap_err().contains("depth"));
        let mut no_sender = event("");
        no_sender.remove("sender");
        assert!(check_format(&no_sender, &rules).unwrap_err().contains("sender"));
    }

    fn checked(id: &str, depth: u64, prevs: &[&str]) -> Checked {
        let mut wire = event("");
        wire.insert("depth".into(), CanonicalJsonValue::Integer(ruma::Int::from(depth as u32)));
        let prevs = prevs.iter().map(|p| CanonicalJsonValue::String((*p).to_owned())).collect();
        wire.insert("prev_events".into(), CanonicalJsonValue::Array(prevs));
        wire.insert("auth_events".into(), CanonicalJsonValue::Array(Vec::new()));
        let event_id = OwnedEventId::try_from(id).unwrap();
        let room_id = ruma::OwnedRoomId::try_from("!r:remote.test").unwrap();
        let stored = StoredPdu::received(event_id, room_id, wire);
        let pdu = Pdu::from_stored(&stored).unwrap();
        Checked { stored, pdu }
    }

    #[test]
    fn events_are_placed_parents_first_whatever_their_order() {
        // a <- b <- d, a <- c <- d; given children first, with a misleading depth on c.
        let given = vec![
            checked("$d", 4, &["$b", "$c"]),
            checked("$c", 1, &["$a"]),
            checked("$b", 2, &["$a"]),
            checked("$a", 1, &[]),
        ];
        let order: Vec<String> =
            parents_first(given).into_iter().map(|e| e.stored.event_id.to_string()).collect();
        assert_eq!(order, ["$a", "$c", "$b", "$d"]);
    }
}
