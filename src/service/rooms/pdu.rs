//! Persistent data units: the signed events rooms are made of, as stored, as state resolution
//! sees them, and as clients receive them.

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, EventId, MilliSecondsSinceUnixEpoch, OwnedEventId,
    OwnedRoomId, OwnedUserId, RoomId, UserId, events::TimelineEventType,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value as JsonValue, json, value::RawValue as RawJsonValue};

/// An event as stored: its wire form (exactly what was signed) plus where it sits.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredPdu {
    /// The event id (derived from the reference hash since room version 3).
    pub event_id: OwnedEventId,
    /// The room (derived from the create event in room version 12).
    pub room_id: OwnedRoomId,
    /// The global stream position it was accepted at.
    pub position: u64,
    /// The snapshot of the room state before this event.
    pub state_before: u64,
    /// The snapshot after it (differs from `state_before` for state events only).
    #[serde(default)]
    pub state_after: u64,
    /// The signed PDU (redacted in place once a redaction applies).
    pub wire: CanonicalJsonObject,
    /// The event that redacted this one, if any.
    #[serde(default)]
    pub redacted_because: Option<OwnedEventId>,
    /// That redaction as clients see it (without `unsigned`), kept with the redacted event so
    /// serving `unsigned.redacted_because` reads nothing more (events redacted before it was
    /// kept are given it by a start-up migration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redaction: Option<JsonValue>,
    /// The transaction id the sending device used, shown to that device only.
    #[serde(default)]
    pub transaction: Option<(String, String)>,
    /// The room's state before and after it was placed, when those differ from the event's
    /// own (it joined a branch other than the room's newest): what clients were shown then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room_state: Option<(u64, u64)>,
    /// Where it stands in the graph (accepted unless stored otherwise).
    #[serde(default, skip_serializing_if = "super::Status::is_accepted")]
    pub status: super::Status,
    /// For an accepted state event, the short id of the event it replaced at its
    /// `(type, state_key)` in its own state before: served as `unsigned.prev_content`,
    /// `prev_sender` and `replaces_state`, read when served so a later redaction shows.
    /// Events stored before it was kept have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<u64>,
}

impl StoredPdu {
    /// An event received from elsewhere, before its place in the graph is known: an outlier
    /// with no state and no stream position yet.
    pub fn received(
        event_id: OwnedEventId,
        room_id: OwnedRoomId,
        wire: CanonicalJsonObject,
    ) -> Self {
        Self {
            event_id,
            room_id,
            position: 0,
            state_before: 0,
            state_after: 0,
            wire,
            redacted_because: None,
            redaction: None,
            transaction: None,
            room_state: None,
            status: super::Status::Outlier,
            replaces: None,
        }
    }

    /// The state after this event (the state before it for non-state events).
    pub fn state_after_or_before(&self) -> u64 {
        if self.state_after != 0 { self.state_after } else { self.state_before }
    }

    /// The room's state just before this event was placed: what clients saw then.
    pub fn room_state_before(&self) -> u64 {
        self.room_state.map_or(self.state_before, |(before, _)| before)
    }

    /// The room's state once this event was placed.
    pub fn room_state_after(&self) -> u64 {
        self.room_state.map_or_else(|| self.state_after_or_before(), |(_, after)| after)
    }

    /// The event type.
    pub fn kind(&self) -> &str {
        self.wire.get("type").and_then(|t| t.as_str()).unwrap_or_default()
    }

    /// The sender.
    pub fn sender(&self) -> &str {
        self.wire.get("sender").and_then(|t| t.as_str()).unwrap_or_default()
    }

    /// The state key, for state events.
    pub fn state_key(&self) -> Option<&str> {
        self.wire.get("state_key").and_then(|t| t.as_str())
    }
}

/// The length of `wire` encoded as canonical JSON: what the spec's size limits measure.
pub fn encoded_len(wire: &CanonicalJsonObject) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    match serde_json::to_writer(&mut count, wire) {
        Ok(()) => count.0,
        Err(_) => usize::MAX,
    }
}

/// A reference to another event: a bare id (v3+) or `[id, hashes]` (v1, v2).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum EventRef {
    Id(OwnedEventId),
    Pair(OwnedEventId, serde::de::IgnoredAny),
}

impl EventRef {
    fn into_id(self) -> OwnedEventId {
        match self {
            Self::Id(id) | Self::Pair(id, _) => id,
        }
    }
}

#[derive(Deserialize)]
struct WireFields {
    sender: OwnedUserId,
    origin_server_ts: MilliSecondsSinceUnixEpoch,
    #[serde(rename = "type")]
    kind: TimelineEventType,
    content: Box<RawJsonValue>,
    state_key: Option<String>,
    #[serde(default)]
    prev_events: Vec<EventRef>,
    #[serde(default)]
    auth_events: Vec<EventRef>,
    redacts: Option<OwnedEventId>,
    #[serde(default)]
    depth: u64,
}

/// The parsed view of an event that auth rules and handlers work with.
#[derive(Debug, Clone)]
pub struct Pdu {
    /// The event id.
    pub event_id: OwnedEventId,
    /// The room.
    pub room_id: OwnedRoomId,
    /// Whether the wire form names the room (not for room version 12 create events).
    pub has_room_id: bool,
    /// Who sent it.
    pub sender: OwnedUserId,
    /// When the origin server says it was sent.
    pub origin_server_ts: MilliSecondsSinceUnixEpoch,
    /// The event type.
    pub kind: TimelineEventType,
    /// The content, as sent.
    pub content: Box<RawJsonValue>,
    /// The state key, for state events.
    pub state_key: Option<String>,
    /// Events this one follows in the DAG.
    pub prev_events: Vec<OwnedEventId>,
    /// Events that authorise this one.
    pub auth_events: Vec<OwnedEventId>,
    /// The redacted event (from the top level, or from `content` since room version 11).
    pub redacts: Option<OwnedEventId>,
    /// Depth in the DAG.
    pub depth: u64,
    /// The global stream position it was accepted at.
    pub position: u64,
    /// The snapshot of the room state before it.
    pub state_before: u64,
    /// Whether it was rejected (it then authorises nothing).
    pub rejected: bool,
}

impl Pdu {
    /// Parses the view of a stored event.
    pub fn from_stored(stored: &StoredPdu) -> serde_json::Result<Self> {
        let wire: WireFields = serde_json::from_value(serde_json::to_value(&stored.wire)?)?;
        let redacts = wire.redacts.or_else(|| {
            #[derive(Deserialize)]
            struct Redacts {
                redacts: Option<OwnedEventId>,
            }
            serde_json::from_str::<Redacts>(wire.content.get()).ok().and_then(|c| c.redacts)
        });
        Ok(Self {
            event_id: stored.event_id.clone(),
            room_id: stored.room_id.clone(),
            has_room_id: stored.wire.contains_key("room_id"),
            sender: wire.sender,
            origin_server_ts: wire.origin_server_ts,
            kind: wire.kind,
            content: wire.content,
            state_key: wire.state_key,
            prev_events: wire.prev_events.into_iter().map(EventRef::into_id).collect(),
            auth_events: wire.auth_events.into_iter().map(EventRef::into_id).collect(),
            // Only a (non-state) redaction event redacts anything.
            redacts: if stored.wire.get("type").and_then(|t| t.as_str()) == Some("m.room.redaction")
                && !stored.wire.contains_key("state_key")
            {
                redacts
            } else {
                None
            },
            depth: wire.depth,
            position: stored.position,
            state_before: stored.state_before,
            rejected: stored.status == super::Status::Rejected,
        })
    }

    /// The `membership` of a member event's content.
    pub fn membership(&self) -> Option<&str> {
        #[derive(Deserialize)]
        struct Member<'a> {
            #[serde(borrow)]
            membership: Option<&'a str>,
        }
        serde_json::from_str::<Member<'_>>(self.content.get()).ok()?.membership
    }
}

/// The device under which sends of delayed events (MSC4140) are recorded, with the delay id as
/// the transaction id; real device ids are never empty.
pub const DELAYED_SEND_DEVICE: &str = "";

/// The client-server format of a stored event, for the member `viewer` (who sees their own
/// transaction ids).
pub fn client_event(stored: &StoredPdu, viewer: Option<(&UserId, &str)>) -> JsonValue {
    let wire = &stored.wire;
    let mut event = json!({
        "event_id": stored.event_id,
        "room_id": stored.room_id,
        "sender": wire.get("sender"),
        "origin_server_ts": wire.get("origin_server_ts"),
        "type": wire.get("type"),
        "content": wire.get("content"),
    });
    if let Some(state_key) = wire.get("state_key") {
        event["state_key"] = json!(state_key);
    }
    if let Some(redacts) = redacts_of(wire) {
        event["redacts"] = json!(redacts);
    }
    let mut unsigned = serde_json::Map::new();
    let now = crate::service::now_ms();
    if let Some(ts) = origin_server_ts(wire) {
        unsigned.insert("age".into(), json!(now.saturating_sub(ts)));
    }
    if let Some(because) = &stored.redacted_because {
        let redaction = match &stored.redaction {
            Some(redaction) => {
                let mut redaction = redaction.clone();
                if let Some(ts) = redaction["origin_server_ts"].as_u64() {
                    redaction["unsigned"] = json!({ "age": now.saturating_sub(ts) });
                }
                redaction
            }
            // The redaction itself is missing from the database.
            None => json!({ "event_id": because }),
        };
        unsigned.insert("redacted_because".into(), redaction);
    }
    if let (Some((user, device)), Some((sender_device, txn))) = (viewer, &stored.transaction)
        && wire.get("sender").and_then(|s| s.as_str()) == Some(user.as_str())
        && device == sender_device
    {
        unsigned.insert("transaction_id".into(), json!(txn));
    }
    // The sender of a delayed event sees its delay id, whichever device they look from.
    if let (Some((user, _)), Some((DELAYED_SEND_DEVICE, delay_id))) =
        (viewer, stored.transaction.as_ref().map(|(d, t)| (d.as_str(), t)))
        && wire.get("sender").and_then(|s| s.as_str()) == Some(user.as_str())
    {
        unsigned.insert("org.matrix.msc4140.delay_id".into(), json!(delay_id));
    }
    event["unsigned"] = JsonValue::Object(unsigned);
    event
}

/// The most replaced events one answer reads for `unsigned.prev_content`: past it (only the
/// full state of a very large room gets there), the rest go without.
const MAX_REPLACED_READS: usize = 10_000;

impl super::Rooms {
    /// `events` in the client format (no viewer), with what each state event replaced.
    pub fn client_events(&self, events: &[StoredPdu]) -> crate::Result<Vec<JsonValue>> {
        let mut served: Vec<JsonValue> = events.iter().map(|e| client_event(e, None)).collect();
        self.add_replaced(served.iter_mut().zip(events), |_| Ok(None))?;
        Ok(served)
    }

    /// Adds to each client event `unsigned.prev_content`, `prev_sender` and `replaces_state`
    /// from the state event its stored form replaced (see [`StoredPdu::replaces`]), reading
    /// the replaced events in one batch. The replaced event is read as it is now, so a later
    /// redaction of it shows in `prev_content`; `view` gives the copy of a replaced event the
    /// reader is shown instead, if any (redacted for a reader its erased sender hides it from).
    pub fn add_replaced<'a>(
        &self,
        served: impl IntoIterator<Item = (&'a mut JsonValue, &'a StoredPdu)>,
        view: impl Fn(&StoredPdu) -> crate::Result<Option<StoredPdu>>,
    ) -> crate::Result<()> {
        let served: Vec<(&mut JsonValue, u64)> = served
            .into_iter()
            .filter_map(|(json, stored)| Some((json, stored.replaces?)))
            .take(MAX_REPLACED_READS)
            .collect();
        if served.is_empty() {
            return Ok(());
        }
        let mut shorts: Vec<u64> = served.iter().map(|(_, short)| *short).collect();
        shorts.sort_unstable();
        shorts.dedup();
        let keys: Vec<&u64> = shorts.iter().collect();
        let mut replaced = self.pdus.get_many(&keys)?;
        for event in replaced.iter_mut().flatten() {
            if let Some(shown) = view(event)? {
                *event = shown;
            }
        }
        for (json, short) in served {
            let Ok(index) = shorts.binary_search(&short) else { continue };
            let Some(replaced) = &replaced[index] else { continue };
            let Some(unsigned) = json.get_mut("unsigned").and_then(JsonValue::as_object_mut) else {
                continue;
            };
            let wire = &replaced.wire;
            if let Some(content) = wire.get("content") {
                unsigned.insert("prev_content".into(), content.clone().into());
            }
            if let Some(sender) = wire.get("sender") {
                unsigned.insert("prev_sender".into(), sender.clone().into());
            }
            unsigned.insert("replaces_state".into(), json!(replaced.event_id));
        }
        Ok(())
    }
}

/// The client-server form of the redaction `stored`, as kept with the event it redacts (its
/// `unsigned` is made when served).
pub fn redaction_event(stored: &StoredPdu) -> JsonValue {
    let mut event = client_event(stored, None);
    if let JsonValue::Object(fields) = &mut event {
        fields.remove("unsigned");
    }
    event
}

/// The event the redaction `wire` names, read from its JSON; `None` for other event types.
pub fn redacted_by(wire: &CanonicalJsonObject) -> Option<OwnedEventId> {
    if wire.get("type").and_then(|t| t.as_str()) != Some("m.room.redaction") {
        return None;
    }
    match redacts_of(wire)? {
        CanonicalJsonValue::String(id) => EventId::parse(id).ok(),
        _ => None,
    }
}

/// The event a redaction names: the top-level `redacts` (room versions 1 to 10) or, since
/// room version 11, `content.redacts`, which clients are also given at the top level.
pub fn redacts_of(wire: &CanonicalJsonObject) -> Option<&CanonicalJsonValue> {
    if let Some(redacts) = wire.get("redacts") {
        return Some(redacts);
    }
    if wire.get("type").and_then(|t| t.as_str()) != Some("m.room.redaction")
        || wire.contains_key("state_key")
    {
        return None;
    }
    match wire.get("content") {
        Some(CanonicalJsonValue::Object(content)) => {
            content.get("redacts").filter(|r| matches!(r, CanonicalJsonValue::String(_)))
        }
        _ => None,
    }
}

/// The event's `origin_server_ts`, in ms since the epoch.
fn origin_server_ts(wire: &CanonicalJsonObject) -> Option<u64> {
    match wire.get("origin_server_ts") {
        Some(CanonicalJsonValue::Integer(ts)) => u64::try_from(i64::from(*ts)).ok(),
        _ => None,
    }
}

impl ruma::state_res::Event for Pdu {
    type Id = OwnedEventId;

    fn event_id(&self) -> &Self::Id {
        &self.event_id
    }

    fn room_id(&self) -> Option<&RoomId> {
        self.has_room_id.then_some(&*self.room_id)
    }

    fn sender(&self) -> &UserId {
        &self.sender
    }

    fn origin_server_ts(&self) -> MilliSecondsSinceUnixEpoch {
        self.origin_server_ts
    }

    fn event_type(&self) -> &TimelineEventType {
        &self.kind
    }

    fn content(&self) -> &RawJsonValue {
        &self.content
    }

    fn state_key(&self) -> Option<&str> {
        self.state_key.as_deref()
    }

    fn prev_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.prev_events.iter())
    }

    fn auth_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.auth_events.iter())
    }

    fn redacts(&self) -> Option<&Self::Id> {
        self.redacts.as_ref()
    }

    fn rejected(&self) -> bool {
        self.rejected
    }
}
