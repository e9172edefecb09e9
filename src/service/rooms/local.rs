//! Events built here for local senders: the wire form (prev events from the forward
//! extremities, auth events from the current state), signed and named, then placed through
//! the same path as events from elsewhere ([`Rooms::place`]).

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, OwnedRoomId, RoomId, RoomVersionId,
    UserId,
    events::TimelineEventType,
    room_version_rules::{EventIdFormatVersion, EventsReferenceFormatVersion, RoomVersionRules},
    state_res,
};
use serde_json::{Value as JsonValue, value::to_raw_value};

use super::{
    MAX_PDU_BYTES, NewEvent, RoomRecord, Rooms, Target, Txn, Unsynced, check_field_sizes,
    graph::{Candidate, Local, Room},
    pdu::{self, Pdu, StoredPdu},
    state::StateMap,
};
use crate::{
    error::{Error, ErrorKind, Result},
    service::{Services, now_ms, random_string},
    storage::Batch,
};

/// Most prev events a new event names (the spec's limit).
const MAX_PREV_EVENTS: usize = 20;

/// An event built here, not yet placed.
struct Built {
    candidate: Candidate,
    event_id: OwnedEventId,
    record: Option<RoomRecord>,
    version: RoomVersionId,
    rules: RoomVersionRules,
    audit: Vec<crate::service::audit::Entry>,
}

/// `ours` with the signatures `signed` added, when `signed` is the same event (another
/// server's signature added, nothing else changed but `unsigned`).
fn same_event_signed(
    mut ours: CanonicalJsonObject,
    mut signed: CanonicalJsonObject,
) -> Result<CanonicalJsonObject> {
    let theirs = match signed.remove("signatures") {
        Some(CanonicalJsonValue::Object(signatures)) => signatures,
        _ => return Err(Error::bad_json("The other server sent the event back unsigned")),
    };
    signed.remove("unsigned");
    let mut bare = ours.clone();
    bare.remove("signatures");
    bare.remove("unsigned");
    if bare != signed {
        return Err(Error::bad_json("The other server sent back a different event"));
    }
    if let Some(CanonicalJsonValue::Object(signatures)) = ours.get_mut("signatures") {
        for (server, by_key) in theirs {
            signatures.entry(server).or_insert(by_key);
        }
    }
    Ok(ours)
}

impl Rooms {
    /// Appends an event from `sender` to an existing room. `txn` makes client sends
    /// idempotent: a repeat returns the first event.
    pub async fn append(
        &self,
        services: &Services,
        room_id: &RoomId,
        sender: &UserId,
        event: NewEvent,
        txn: Option<Txn<'_>>,
    ) -> Result<OwnedEventId> {
        let txn = txn.map(|txn| (txn, txn.key(room_id)));
        let lock = self.lock(room_id);
        let guard = lock.lock().await;
        if let Some((_, key)) = &txn
            && let Some(existing) = self.transactions.get(key.as_slice())?
        {
            // The first request may still be waiting for its sync.
            let ticket = self.db.ticket_now();
            drop(guard);
            self.db.durable(ticket).await?;
            return Ok(existing);
        }
        let record = self.room(room_id)?.ok_or_else(|| Error::not_found("Unknown room"))?;
        let target = Target::Existing(room_id, record);
        let txn = txn.as_ref().map(|(txn, key)| (*txn, key.as_slice()));
        let (event_id, unsynced) =
            self.build_and_store(services, target, sender, event, txn, true)?;
        drop(guard);
        if let Some((pending, ticket)) = unsynced {
            self.db.durable(ticket).await?;
            drop(pending);
        }
        Ok(event_id)
    }

    /// Appends the event `build` makes from the room and its current state, both read under
    /// the room lock so no other event lands between the read and the write. Nothing is
    /// appended when `build` returns `None`.
    pub async fn append_from_state(
        &self,
        services: &Services,
        room_id: &RoomId,
        sender: &UserId,
        build: impl FnOnce(&RoomRecord, &StateMap) -> Result<Option<NewEvent>>,
    ) -> Result<Option<OwnedEventId>> {
        let lock = self.lock(room_id);
        let guard = lock.lock().await;
        let record = self.room(room_id)?.ok_or_else(|| Error::not_found("Unknown room"))?;
        let state = self.states.load(record.current_state)?;
        let Some(event) = build(&record, &state)? else { return Ok(None) };
        let target = Target::Existing(room_id, record);
        let (event_id, unsynced) =
            self.build_and_store(services, target, sender, event, None, true)?;
        drop(guard);
        if let Some((pending, ticket)) = unsynced {
            self.db.durable(ticket).await?;
            drop(pending);
        }
        Ok(Some(event_id))
    }

    /// Creates a room of `version` from its create event (whose `room_version` this sets);
    /// returns the room id. Later events go
    /// through [`Rooms::append`].
    pub fn append_create(
        &self,
        services: &Services,
        sender: &UserId,
        version: &RoomVersionId,
        mut content: JsonValue,
    ) -> Result<OwnedRoomId> {
        content["room_version"] = serde_json::json!(version);
        let event = NewEvent::state("m.room.create", "", content);
        let (event_id, _) =
            self.build_and_store(services, Target::New(version), sender, event, None, false)?;
        let stored = self.stored(&event_id)?.ok_or_else(|| Error::internal("create event lost"))?;
        Ok(stored.room_id)
    }

    /// Builds, authorises and writes an event; `txn` is the client transaction with its stored
    /// key. With `defer_sync` the WAL sync is left to the caller, who awaits the returned
    /// ticket (after releasing the room lock) and then drops the pending position; otherwise
    /// the write is durable on return.
    pub(super) fn build_and_store<'s>(
        &self,
        services: &'s Services,
        target: Target<'_>,
        sender: &UserId,
        event: NewEvent,
        txn: Option<(Txn<'_>, &[u8])>,
        defer_sync: bool,
    ) -> Result<(OwnedEventId, Unsynced<'s>)> {
        let Built { candidate, event_id, record, version, rules, audit } =
            self.build_local(services, target, sender, &event, txn)?;
        let local = Local { event: &event, audit, txn, defer_sync };
        let room = Room { record, version: &version, rules: &rules };
        let (_, unsynced) = self.place(services, room, candidate, Some(local))?;
        Ok((event_id, unsynced))
    }

    /// Appends an event from `sender` that another server must sign first (an invite of one
    /// of its users): built and checked under the room lock, handed to `countersign` with the
    /// room version once the lock is released, then written as the same event with the
    /// signatures it came back with. Events landing meanwhile make a fork the write resolves.
    pub async fn append_countersigned<F, Fut>(
        &self,
        services: &Services,
        room_id: &RoomId,
        sender: &UserId,
        event: NewEvent,
        countersign: F,
    ) -> Result<OwnedEventId>
    where
        F: FnOnce(CanonicalJsonObject, RoomVersionId) -> Fut,
        Fut: std::future::Future<Output = Result<CanonicalJsonObject>>,
    {
        let lock = self.lock(room_id);
        let guard = lock.lock().await;
        let record = self.room(room_id)?.ok_or_else(|| Error::not_found("Unknown room"))?;
        let target = Target::Existing(room_id, record);
        let Built { mut candidate, event_id, version, rules, audit, .. } =
            self.build_local(services, target, sender, &event, None)?;
        {
            // Refused here: never sent to be signed.
            let room = Room { record: None, version: &version, rules: &rules };
            let pdu = &candidate.pdu;
            let mut refusal = self.check_auth_events(&room, pdu, false, None, &candidate.auth)?;
            if refusal.is_ok() {
                refusal = self.check_against_state(&rules, pdu, candidate.state_before)?;
            }
            refusal.map_err(|reason| Error::forbidden(format!("Not allowed: {reason}")))?;
        }
        drop(guard);
        let ours = candidate.stored.wire.clone();
        let signed = countersign(ours.clone(), version.clone()).await?;
        candidate.stored.wire = same_event_signed(ours, signed)?;
        let guard = lock.lock().await;
        let record = self.room(room_id)?.ok_or_else(|| Error::not_found("Unknown room"))?;
        let local = Local { event: &event, audit, txn: None, defer_sync: true };
        let room = Room { record: Some(record), version: &version, rules: &rules };
        let (_, unsynced) = self.place(services, room, candidate, Some(local))?;
        drop(guard);
        if let Some((pending, ticket)) = unsynced {
            self.db.durable(ticket).await?;
            drop(pending);
        }
        Ok(event_id)
    }

    /// Builds and signs an event of `sender` for `target`, with the state before it and its
    /// auth events, ready to be placed.
    fn build_local(
        &self,
        services: &Services,
        target: Target<'_>,
        sender: &UserId,
        event: &NewEvent,
        txn: Option<(Txn<'_>, &[u8])>,
    ) -> Result<Built> {
        let (room, version) = match target {
            Target::Existing(room_id, record) => {
                let version = record.version.clone();
                (Some((room_id, record)), version)
            }
            Target::New(version) => (None, version.clone()),
        };
        let kind = event.kind.to_string();
        let (state_key, room_id) = (event.state_key.as_deref(), room.as_ref().map(|(id, _)| *id));
        check_field_sizes(&kind, state_key, sender, room_id)?;
        let rules = version.rules().ok_or_else(|| {
            Error::new(ErrorKind::UnsupportedRoomVersion, "Unsupported room version")
        })?;
        let record = room.as_ref().map(|(_, record)| record.clone());
        let current = record.as_ref().map_or(0, |r| r.current_state);
        let is_create = event.kind == TimelineEventType::RoomCreate;

        let content = to_raw_value(&event.content).map_err(|e| Error::bad_json(e.to_string()))?;
        let auth_types = state_res::auth_types_for_event(
            &event.kind,
            sender,
            event.state_key.as_deref(),
            &content,
            &rules.authorization,
        )
        .map_err(Error::bad_json)?;
        let mut auth = Vec::with_capacity(auth_types.len());
        for (auth_kind, auth_key) in &auth_types {
            if let Some(short) = self.states.get(current, &auth_kind.to_string(), auth_key)? {
                auth.push((short, self.state_pdu(short)?));
            }
        }
        let auth_events: Vec<OwnedEventId> =
            auth.iter().map(|(_, pdu)| pdu.event_id.clone()).collect();
        let prev_events: Vec<OwnedEventId> = record
            .as_ref()
            .map(|r| r.extremities.iter().take(MAX_PREV_EVENTS).cloned().collect())
            .unwrap_or_default();
        let mut depth = 0;
        for prev in &prev_events {
            if let Some(short) = self.event_ids.get(prev.as_str())? {
                depth = depth.max(self.depth_of(short)?);
            }
        }
        let depth = depth + 1;

        let mut wire = CanonicalJsonObject::new();
        let to_canonical = |value: JsonValue| -> Result<CanonicalJsonValue> {
            CanonicalJsonValue::try_from(value)
                .map_err(|e| Error::bad_json(format!("Invalid JSON for an event: {e}")))
        };
        wire.insert("auth_events".into(), to_canonical(self.event_refs(&auth_events, &rules)?)?);
        wire.insert("prev_events".into(), to_canonical(self.event_refs(&prev_events, &rules)?)?);
        wire.insert("content".into(), to_canonical(event.content.clone())?);
        wire.insert(
            "depth".into(),
            CanonicalJsonValue::Integer(ruma::Int::new_saturating(depth as i64)),
        );
        wire.insert(
            "origin".into(),
            CanonicalJsonValue::String(services.server_name().to_string()),
        );
        // Create events of room version 12 carry nothing random, so two identical requests
        // must differ in time or they would name the same room.
        let ts = if is_create { self.next_create_ts() } else { now_ms() };
        wire.insert(
            "origin_server_ts".into(),
            CanonicalJsonValue::Integer(ruma::Int::new_saturating(ts as i64)),
        );
        wire.insert("sender".into(), CanonicalJsonValue::String(sender.to_string()));
        wire.insert("type".into(), CanonicalJsonValue::String(kind));
        if let Some(state_key) = &event.state_key {
            wire.insert("state_key".into(), CanonicalJsonValue::String(state_key.clone()));
        }
        if let Some(redacts) = &event.redacts
            && !rules.redaction.content_field_redacts
        {
            wire.insert("redacts".into(), CanonicalJsonValue::String(redacts.to_string()));
        }
        let explicit_room_id = !(is_create && rules.authorization.room_create_event_id_as_room_id);
        if explicit_room_id {
            let room_id = match &room {
                Some((room_id, _)) => room_id.to_string(),
                None => format!("!{}:{}", random_string(18), services.server_name()),
            };
            wire.insert("room_id".into(), CanonicalJsonValue::String(room_id));
        }
        let v1_event_id = (rules.event_id_format == EventIdFormatVersion::V1)
            .then(|| format!("${}:{}", random_string(18), services.server_name()));
        if let Some(id) = &v1_event_id {
            wire.insert("event_id".into(), CanonicalJsonValue::String(id.clone()));
        }

        let too_large = || Error::new(ErrorKind::TooLarge, "Event is larger than 65536 bytes");
        ruma::signatures::hash_and_sign_event(
            services.server_name().as_str(),
            services.keys.key_pair(),
            &mut wire,
            &rules.redaction,
        )
        .map_err(|e| match e {
            ruma::signatures::JsonError::PduTooLarge => too_large(),
            e => Error::bad_json(format!("Cannot sign event: {e}")),
        })?;
        // The limit applies to the final signed event, as encoded.
        if pdu::encoded_len(&wire) > MAX_PDU_BYTES {
            return Err(too_large());
        }
        let event_id: OwnedEventId = match v1_event_id {
            Some(id) => id.try_into().map_err(Error::internal)?,
            None => {
                let hash =
                    ruma::signatures::reference_hash(&wire, &rules).map_err(Error::internal)?;
                format!("${hash}").try_into().map_err(Error::internal)?
            }
        };
        let room_id: OwnedRoomId = match (&room, wire.get("room_id")) {
            (Some((room_id, _)), _) => (*room_id).to_owned(),
            (None, Some(CanonicalJsonValue::String(id))) => {
                id.clone().try_into().map_err(Error::internal)?
            }
            (None, _) => {
                format!("!{}", &event_id.as_str()[1..]).try_into().map_err(Error::internal)?
            }
        };

        if room.is_none() && self.rooms.contains(room_id.as_str())? {
            return Err(Error::new(
                ErrorKind::Unknown,
                "A room with this id already exists; try again",
            ));
        }
        let stored = StoredPdu {
            event_id: event_id.clone(),
            room_id: room_id.clone(),
            position: 0,
            state_before: current,
            state_after: 0,
            wire,
            redacted_because: None,
            redaction: None,
            // Shown to the sending device only; a notice's requester is not its sender.
            transaction: txn
                .filter(|(txn, _)| txn.user == sender)
                .map(|(txn, _)| (txn.device.to_owned(), txn.id.to_owned())),
            room_state: None,
            status: super::Status::Accepted,
            replaces: None,
        };
        let pdu = Pdu::from_stored(&stored)
            .map_err(|e| Error::bad_json(format!("Invalid event: {e}")))?;
        let mut audit = self.audit_entries(&room_id, sender, event, pdu.redacts.as_deref())?;
        audit.extend(event.audit.iter().cloned());
        let candidate = Candidate { stored, pdu, state_before: current, auth, defer_sync: false };
        Ok(Built { candidate, event_id, record, version, rules, audit })
    }

    /// References to `ids` in the room version's format: bare ids, or `[id, hashes]` pairs.
    pub(super) fn event_refs(
        &self,
        ids: &[OwnedEventId],
        rules: &RoomVersionRules,
    ) -> Result<JsonValue> {
        if rules.events_reference_format != EventsReferenceFormatVersion::V1 {
            return Ok(serde_json::json!(ids));
        }
        let mut refs = Vec::with_capacity(ids.len());
        for id in ids {
            let stored =
                self.stored(id)?.ok_or_else(|| Error::internal("missing referenced event"))?;
            let hash =
                ruma::signatures::reference_hash(&stored.wire, rules).map_err(Error::internal)?;
            refs.push(serde_json::json!([id, { "sha256": hash }]));
        }
        Ok(JsonValue::Array(refs))
    }

    /// Queues the redaction of `target` (its short id and the event, of room `room_id`) by
    /// `redaction`, which is kept with it for `unsigned.redacted_because`; returns the short
    /// ids of the events changed (when `target` is itself a redaction, the event it redacted
    /// shows it redacted too).
    pub(super) fn apply_redaction(
        &self,
        batch: &mut Batch,
        room_id: &RoomId,
        (short, mut stored): (u64, StoredPdu),
        redaction: &StoredPdu,
        rules: &RoomVersionRules,
    ) -> Result<Vec<u64>> {
        let target = stored.event_id.clone();
        // Read before redacting: room versions before 11 drop the top-level `redacts`.
        let redacted_by_target = pdu::redacted_by(&stored.wire);
        ruma::canonical_json::redact_in_place(&mut stored.wire, &rules.redaction, None)
            .map_err(Error::internal)?;
        stored.redacted_because = Some(redaction.event_id.clone());
        stored.redaction = Some(pdu::redaction_event(redaction));
        self.pdus.put(batch, &short, &stored);
        let mut changed = vec![short];
        if let Some(earlier) = redacted_by_target
            && let Some(earlier_short) = self.event_ids.get(earlier.as_str())?
        {
            let mut earlier = self.stored_by_short(earlier_short)?;
            if earlier.room_id == room_id && earlier.redacted_because.as_ref() == Some(&target) {
                let mut shown = pdu::redaction_event(&stored);
                // Its `redacts` is what it still names, whatever the room version kept.
                shown["redacts"] = serde_json::json!(earlier.event_id);
                earlier.redaction = Some(shown);
                self.pdus.put(batch, &earlier_short, &earlier);
                changed.push(earlier_short);
            }
        }
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(value: serde_json::Value) -> CanonicalJsonObject {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn a_countersigned_event_must_be_the_same_event() {
        let ours = object(serde_json::json!({
            "type": "m.room.member", "state_key": "@b:b.example", "content": { "membership": "invite" },
            "signatures": { "a.example": { "ed25519:1": "ours" } },
        }));
        let mut signed = ours.clone();
        signed.insert(
            "signatures".into(),
            CanonicalJsonValue::try_from(serde_json::json!({
                "a.example": { "ed25519:1": "changed" },
                "b.example": { "ed25519:2": "theirs" },
            }))
            .unwrap(),
        );
        signed.insert("unsigned".into(), CanonicalJsonValue::Object(CanonicalJsonObject::new()));
        let merged = same_event_signed(ours.clone(), signed.clone()).unwrap();
        // Our own signature stays ours; theirs is added.
        let signatures = serde_json::to_value(&merged["signatures"]).unwrap();
        assert_eq!(signatures["a.example"]["ed25519:1"], "ours");
        assert_eq!(signatures["b.example"]["ed25519:2"], "theirs");
        assert!(!merged.contains_key("unsigned"));

        let mut altered = signed.clone();
        altered.insert("state_key".into(), CanonicalJsonValue::String("@c:b.example".into()));
        assert!(same_event_signed(ours.clone(), altered).is_err());
        let mut unsigned = signed;
        unsigned.remove("signatures");
        assert!(same_event_signed(ours, unsigned).is_err());
    }
}
