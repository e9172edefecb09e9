//! Transactions other servers send us (`PUT /_matrix/federation/v1/send/{txnId}`): every PDU
//! through the graph's checks on receipt, grouped by room, each answered on its own; EDUs
//! handed to [`super::edu::receive`]; the room's `m.room.server_acl` obeyed; a retried
//! transaction answered from the stored result. Events of users of other servers than the
//! sending one are taken when their own servers signed them (a resident server passing on a
//! join it took through `send_join`). Events whose prev events are missing are
//! completed in the background, in order per origin: first with `/get_missing_events`, then,
//! when the gap is too large, by placing the event on the state the origin gives
//! (`/state_ids` and `/event`).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
};

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, OwnedRoomId, OwnedServerName, RoomId,
    RoomVersionId, ServerName, UInt, UserId,
    api::federation::{
        event::{get_event, get_missing_events, get_room_state_ids},
        transactions::edu::Edu,
    },
    room_version_rules::{EventIdFormatVersion, RoomVersionRules},
    serde::Raw,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value as JsonValue, value::RawValue as RawJsonValue};

use super::edu;
use crate::{
    error::{Error, Result},
    service::{
        Services,
        rooms::{Status, from_state::VouchedState, ingest::Outcome},
    },
    storage::{Db, Table, tables},
};

/// Most PDUs in one transaction (the spec's limit).
pub const MAX_PDUS: usize = 50;
/// Most EDUs in one transaction (the spec's limit).
pub const MAX_EDUS: usize = 100;
/// Most `/get_missing_events` rounds for one transaction's gaps.
const MAX_GAP_ROUNDS: usize = 10;
/// Most events fetched with `/get_missing_events` for one transaction's gaps.
const MAX_GAP_EVENTS: usize = 100;
/// Most events still waiting that are placed on the origin's state afterwards.
const MAX_PLACED_ON_STATE: usize = 5;
/// Most state and auth chain events fetched one by one to place one event.
const MAX_FETCHED_STATE: usize = 5_000;
/// Origins whose locks are kept before idle ones are forgotten.
const MAX_LOCKS: usize = 10_000;

/// What PDU results are per event id: `None` when it was taken, else why not.
type Results = BTreeMap<OwnedEventId, std::result::Result<(), String>>;

/// The latest transaction of an origin and the answer given.
#[derive(Serialize, Deserialize)]
struct SeenTxn {
    txn_id: String,
    pdus: BTreeMap<OwnedEventId, Option<String>>,
}

/// One lock per origin server.
#[derive(Default)]
struct Locks(Mutex<HashMap<OwnedServerName, Arc<tokio::sync::Mutex<()>>>>);

impl Locks {
    fn of(&self, origin: &ServerName) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if locks.len() >= MAX_LOCKS {
            locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        }
        locks.entry(origin.to_owned()).or_default().clone()
    }
}

/// The receiving side of transactions.
pub struct Receiver {
    seen: Table<SeenTxn>,
    /// Held while an origin's transaction is processed: its transactions go one at a time.
    transactions: Locks,
    /// Held while an origin's gaps are filled: in the order its transactions came.
    gaps: Locks,
}

impl Receiver {
    /// The receiver over `db`.
    pub fn new(db: &Db) -> Self {
        Self {
            seen: db.table(tables::FEDERATION_TXNS),
            transactions: Locks::default(),
            gaps: Locks::default(),
        }
    }
}

/// The id of `wire` by `rules`: its `event_id` field in room versions 1 and 2, else its
/// reference hash.
fn event_id_of(wire: &CanonicalJsonObject, rules: &RoomVersionRules) -> Option<OwnedEventId> {
    match rules.event_id_format {
        EventIdFormatVersion::V1 => match wire.get("event_id") {
            Some(CanonicalJsonValue::String(id)) => OwnedEventId::try_from(id.as_str()).ok(),
            _ => None,
        },
        _ => {
            let hash = ruma::signatures::reference_hash(wire, rules).ok()?;
            OwnedEventId::try_from(format!("${hash}")).ok()
        }
    }
}

fn string_field<'a>(wire: &'a CanonicalJsonObject, field: &str) -> Option<&'a str> {
    match wire.get(field) {
        Some(CanonicalJsonValue::String(value)) => Some(value),
        _ => None,
    }
}

/// Takes the transaction `txn_id` from `origin` and answers for each PDU.
pub async fn transaction(
    services: &Arc<Services>,
    origin: &ServerName,
    txn_id: &str,
    pdus: Vec<Box<RawJsonValue>>,
    edus: Vec<Raw<Edu>>,
) -> Result<Results> {
    if pdus.len() > MAX_PDUS || edus.len() > MAX_EDUS {
        return Err(Error::bad_json(format!(
            "A transaction holds at most {MAX_PDUS} PDUs and {MAX_EDUS} EDUs"
        )));
    }
    let receiver = &services.federation_receiver;
    let lock = receiver.transactions.of(origin);
    let _guard = lock.lock().await;
    if let Some(seen) = receiver.seen.get(origin.as_str())?
        && seen.txn_id == txn_id
    {
        return Ok(seen
            .pdus
            .into_iter()
            .map(|(id, error)| (id, error.map_or(Ok(()), Err)))
            .collect());
    }
    let results = receive_pdus(services, origin, pdus).await?;
    for raw in edus {
        if let Some(edu) = allowed_edu(services, origin, raw.json().get()) {
            edu::receive(services, origin, edu).await;
        }
    }
    let seen = SeenTxn {
        txn_id: txn_id.to_owned(),
        pdus: results.iter().map(|(id, r)| (id.clone(), r.clone().err())).collect(),
    };
    let mut batch = services.db.batch();
    receiver.seen.put(&mut batch, origin.as_str(), &seen);
    services.db.write(batch)?;
    Ok(results)
}

/// Whether `origin` may take part in the room `room_id` names (an unparsable id: no).
fn acl_allows(services: &Services, room_id: &str, origin: &ServerName) -> bool {
    <&RoomId>::try_from(room_id)
        .is_ok_and(|room| services.server_allowed_in_room(room, origin).unwrap_or(false))
}

/// The EDU in `json`, with what it says of rooms whose ACL denies `origin` left out; `None`
/// when it does not parse or nothing is left.
fn allowed_edu(services: &Services, origin: &ServerName, json: &str) -> Option<Edu> {
    let mut value: JsonValue = serde_json::from_str(json).ok()?;
    match value["edu_type"].as_str() {
        Some("m.typing") => {
            let room = value["content"]["room_id"].as_str()?;
            if !acl_allows(services, room, origin) {
                return None;
            }
        }
        Some("m.receipt") => {
            let rooms = value["content"].as_object_mut()?;
            rooms.retain(|room, _| acl_allows(services, room, origin));
            if rooms.is_empty() {
                return None;
            }
        }
        _ => {}
    }
    match serde_json::from_value(value) {
        Ok(edu) => Some(edu),
        Err(err) => {
            tracing::debug!(%origin, %err, "malformed EDU dropped");
            None
        }
    }
}

/// Checks and places the PDUs of one transaction, room by room.
async fn receive_pdus(
    services: &Arc<Services>,
    origin: &ServerName,
    pdus: Vec<Box<RawJsonValue>>,
) -> Result<Results> {
    let mut results = Results::new();
    let mut by_room: BTreeMap<OwnedRoomId, (Vec<OwnedEventId>, Vec<CanonicalJsonObject>)> =
        BTreeMap::new();
    let mut rooms_seen: BTreeMap<OwnedRoomId, (bool, RoomVersionId, bool)> = BTreeMap::new();
    for raw in pdus {
        let Ok(wire) = serde_json::from_str::<CanonicalJsonObject>(raw.get()) else {
            tracing::debug!(%origin, "a PDU that is not a JSON object was dropped");
            continue;
        };
        let Some(room_id) = string_field(&wire, "room_id").and_then(|r| RoomId::parse(r).ok())
        else {
            tracing::debug!(%origin, "a PDU without a room id was dropped");
            continue;
        };
        // What the transaction's PDUs need of their room, read once per room.
        let (known, version, allowed) = match rooms_seen.get(&room_id) {
            Some(seen) => seen.clone(),
            None => {
                let record = services.rooms.room(&room_id)?;
                let known = record.is_some();
                let version = record.map_or(RoomVersionId::V11, |r| r.version);
                let allowed = known && services.server_allowed_in_room(&room_id, origin)?;
                let seen = (known, version, allowed);
                rooms_seen.insert(room_id.clone(), seen.clone());
                seen
            }
        };
        let Some(rules) = version.rules() else { continue };
        let Some(event_id) = event_id_of(&wire, &rules) else {
            tracing::debug!(%origin, "a PDU without an id was dropped");
            continue;
        };
        if !known {
            // An invite withdrawn, or a knock refused, in a room held elsewhere.
            let result = match super::invite::retracted(services, origin, &room_id, &wire).await {
                Ok(true) => Ok(()),
                Ok(false) => Err(format!("Room {room_id} is not known here")),
                Err(err) => Err(err.to_string()),
            };
            results.insert(event_id, result);
            continue;
        }
        if !allowed {
            results.insert(event_id, Err("The room's server ACL denies the server".to_owned()));
            continue;
        }
        // A resident server passes on events of other servers (joins, leaves and knocks it
        // took through `send_*`): the checks on receipt want the sender's server's signature,
        // so only the sending server's own events are taken on its word.
        let Some(sender_server) =
            string_field(&wire, "sender").and_then(|s| <&UserId>::try_from(s).ok())
        else {
            results.insert(event_id, Err("The event has no valid sender".to_owned()));
            continue;
        };
        let sender_server = sender_server.server_name();
        if sender_server != origin && !services.server_allowed_in_room(&room_id, sender_server)? {
            results.insert(
                event_id,
                Err("The room's server ACL denies the sender's server".to_owned()),
            );
            continue;
        }
        let (ids, wires) = by_room.entry(room_id).or_default();
        ids.push(event_id);
        wires.push(wire);
    }
    for (room_id, (ids, wires)) in by_room {
        let ingested = services.rooms.ingest(services, &room_id, wires, &services.federation).await;
        let outcomes = match ingested {
            Ok(outcomes) => outcomes,
            Err(err) if !err.is_internal() => {
                for id in ids {
                    results.insert(id, Err(err.to_string()));
                }
                continue;
            }
            Err(err) => return Err(err),
        };
        let mut waiting = Vec::new();
        for (event_id, outcome) in outcomes {
            let Some(event_id) = event_id else { continue };
            let result = match outcome {
                Outcome::Placed(Status::Rejected) | Outcome::Known(Status::Rejected) => {
                    Err("The event was rejected by the room's authorization rules".to_owned())
                }
                Outcome::Placed(Status::Outlier) => {
                    waiting.push(event_id.clone());
                    Ok(())
                }
                Outcome::Placed(_) | Outcome::Known(_) => Ok(()),
                Outcome::Dropped(reason) => Err(reason),
            };
            results.insert(event_id, result);
        }
        if !waiting.is_empty() {
            let lock = services.federation_receiver.gaps.of(origin);
            let services = services.clone();
            let origin = origin.to_owned();
            tokio::spawn(async move {
                let _guard = lock.lock().await;
                if let Err(err) = fill_gaps(&services, &origin, &room_id, &waiting).await {
                    tracing::info!(%origin, %room_id, %err, "a gap could not be filled");
                }
            });
        }
    }
    Ok(results)
}

/// The events of `ids` still waiting for their prev events.
fn still_waiting(services: &Services, ids: &[OwnedEventId]) -> Result<Vec<OwnedEventId>> {
    let mut waiting = Vec::new();
    for id in ids {
        if services.rooms.status_of(id)? == Some(Status::Outlier) {
            waiting.push(id.clone());
        }
    }
    Ok(waiting)
}

/// The depth of a stored event.
fn depth_of(services: &Services, event_id: &OwnedEventId) -> Result<u64> {
    Ok(services
        .rooms
        .stored(event_id)?
        .and_then(|e| match e.wire.get("depth") {
            Some(CanonicalJsonValue::Integer(depth)) => u64::try_from(i64::from(*depth)).ok(),
            _ => None,
        })
        .unwrap_or(0))
}

/// Completes the graph under the `waiting` events of `room_id` that `origin` sent.
async fn fill_gaps(
    services: &Arc<Services>,
    origin: &ServerName,
    room_id: &RoomId,
    waiting: &[OwnedEventId],
) -> Result<()> {
    let mut fetched = 0;
    for _ in 0..MAX_GAP_ROUNDS {
        let latest = still_waiting(services, waiting)?;
        let limit = MAX_GAP_EVENTS.saturating_sub(fetched);
        if latest.is_empty() || limit == 0 {
            break;
        }
        let earliest = services.rooms.extremities(room_id)?;
        let mut min_depth = u64::MAX;
        for id in &earliest {
            min_depth = min_depth.min(depth_of(services, id)?);
        }
        let mut request =
            get_missing_events::v1::Request::new(room_id.to_owned(), earliest, latest);
        request.limit = UInt::new_saturating(limit as u64);
        request.min_depth = UInt::new_saturating(if min_depth == u64::MAX { 0 } else { min_depth });
        let events = match services.federation.send(origin, request).await {
            Ok(response) => response.events,
            Err(err) => {
                tracing::debug!(%origin, %room_id, %err, "missing events not fetched");
                break;
            }
        };
        tracing::debug!(%origin, %room_id, count = events.len(), "missing events fetched");
        if events.is_empty() {
            break;
        }
        fetched += events.len();
        let wires = events
            .iter()
            .take(limit)
            .filter_map(|raw| serde_json::from_str::<CanonicalJsonObject>(raw.get()).ok())
            .collect();
        let outcomes =
            services.rooms.ingest(services, room_id, wires, &services.federation).await?;
        tracing::debug!(%origin, %room_id, ?outcomes, "missing events placed");
    }
    let left = still_waiting(services, waiting)?;
    for event_id in left.iter().take(MAX_PLACED_ON_STATE) {
        place_on_state(services, origin, room_id, event_id).await?;
    }
    Ok(())
}

/// Places the waiting event `event_id` on the state before it that `origin` gives, fetching
/// the state and auth chain events not known here.
async fn place_on_state(
    services: &Arc<Services>,
    origin: &ServerName,
    room_id: &RoomId,
    event_id: &OwnedEventId,
) -> Result<()> {
    let Some(record) = services.rooms.room(room_id)? else { return Ok(()) };
    let Some(stored) = services.rooms.stored(event_id)? else { return Ok(()) };
    let request = get_room_state_ids::v1::Request::new(event_id.clone(), room_id.to_owned());
    let ids = services.federation.send(origin, request).await?;
    if ids.pdu_ids.len() + ids.auth_chain_ids.len() > MAX_FETCHED_STATE {
        return Err(Error::invalid_param("The state is too large to fetch"));
    }
    let mut seen = HashSet::new();
    let mut fetch_all = async |list: &[OwnedEventId]| -> Result<Vec<CanonicalJsonObject>> {
        let mut wires = Vec::with_capacity(list.len());
        for id in list {
            if !seen.insert(id.clone()) {
                continue;
            }
            if let Some(known) = services.rooms.stored(id)? {
                wires.push(known.wire);
                continue;
            }
            let response =
                services.federation.send(origin, get_event::v1::Request::new(id.clone())).await?;
            if let Ok(wire) = serde_json::from_str::<CanonicalJsonObject>(response.pdu.get()) {
                wires.push(wire);
            }
        }
        Ok(wires)
    };
    let state = fetch_all(&ids.pdu_ids).await?;
    let auth_chain = fetch_all(&ids.auth_chain_ids).await?;
    let vouched = VouchedState { state, auth_chain };
    let (_, outcome) = services
        .rooms
        .ingest_with_state(
            services,
            room_id,
            &record.version,
            stored.wire,
            vouched,
            &services.federation,
        )
        .await?;
    tracing::debug!(%origin, %event_id, ?outcome, "event placed on the origin's state");
    Ok(())
}
