//! Rooms over federation: transactions in (`/send`), and the events, states and auth chains
//! other servers ask for (`/event`, `/state`, `/state_ids`, `/backfill`, `/event_auth`,
//! `/get_missing_events`). A server is served a room only while one of its users is joined
//! and the room's ACL allows it, and an event only as its history visibility lets that
//! server's users see it (others are served redacted where the graph needs them).

use std::collections::{HashSet, VecDeque};

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, EventId, MilliSecondsSinceUnixEpoch, OwnedEventId,
    RoomId, ServerName, UserId,
    api::federation::{
        authorization::get_event_authorization,
        backfill::get_backfill,
        event::{get_event, get_missing_events, get_room_state, get_room_state_ids},
        transactions::send_transaction_message,
    },
    events::room::history_visibility::HistoryVisibility,
};
use serde_json::value::RawValue as RawJsonValue;

use super::Federated;
use crate::{
    api::State,
    error::{Error, Result},
    service::{
        Services,
        federation::receive,
        rooms::{Status, pdu::StoredPdu},
    },
};

/// Most events one `/backfill` or `/get_missing_events` answer holds.
const MAX_EVENTS: usize = 100;
/// Most events looked at while walking the graph for one answer.
const MAX_WALK: usize = 2_000;

/// `PUT /_matrix/federation/v1/send/{txnId}`
pub async fn send(
    services: State,
    req: Federated<send_transaction_message::v1::Request>,
) -> Result<send_transaction_message::v1::Response> {
    let Federated { origin, body } = req;
    if body.origin != origin {
        return Err(Error::forbidden("The transaction's origin is not the signing server"));
    }
    let pdus = receive::transaction(
        &services,
        &origin,
        body.transaction_id.as_str(),
        body.pdus,
        body.edus,
    )
    .await?;
    Ok(send_transaction_message::v1::Response::new(pdus))
}

/// `M_FORBIDDEN` unless `origin` may read `room_id`: the room is known here, its ACL allows
/// the server, and one of the server's users is joined.
fn check_in_room(services: &Services, origin: &ServerName, room_id: &RoomId) -> Result<()> {
    if services.rooms.room(room_id)?.is_none() {
        return Err(Error::not_found("This room is not known here"));
    }
    if !services.server_allowed_in_room(room_id, origin)? {
        return Err(Error::forbidden("The room's server ACL denies your server"));
    }
    let joined = services
        .rooms
        .members(room_id)?
        .iter()
        .any(|(user, membership)| membership == "join" && user.server_name() == origin);
    if !joined {
        return Err(Error::forbidden("Your server has no member in this room"));
    }
    Ok(())
}

/// Whether a user of `origin` could see `event` under its room's history visibility.
fn visible_to(services: &Services, origin: &ServerName, event: &StoredPdu) -> Result<bool> {
    let state = services.rooms.states.load(event.state_after_or_before())?;
    let wanted: &[&str] = match services.rooms.history_visibility(&state)? {
        HistoryVisibility::WorldReadable | HistoryVisibility::Shared => return Ok(true),
        HistoryVisibility::Invited => &["join", "invite"],
        _ => &["join"],
    };
    for ((kind, key), short) in state.iter() {
        if kind != "m.room.member"
            || !<&UserId>::try_from(key.as_str()).is_ok_and(|u| u.server_name() == origin)
        {
            continue;
        }
        let member = services.rooms.state_pdu(*short)?;
        if member.membership().is_some_and(|m| wanted.contains(&m)) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The wire form of `event` for `origin`: whole when it may see it, else redacted.
fn served(
    services: &Services,
    origin: &ServerName,
    event: &StoredPdu,
) -> Result<Box<RawJsonValue>> {
    let wire = if visible_to(services, origin, event)? {
        event.wire.clone()
    } else {
        let version = services
            .rooms
            .room(&event.room_id)?
            .ok_or_else(|| Error::not_found("This room is not known here"))?
            .version;
        let rules = version.rules().ok_or_else(|| Error::internal("unknown room version"))?;
        ruma::canonical_json::redact(event.wire.clone(), &rules.redaction, None)
            .map_err(Error::internal)?
    };
    raw(&wire)
}

fn raw(wire: &CanonicalJsonObject) -> Result<Box<RawJsonValue>> {
    serde_json::value::to_raw_value(wire).map_err(Error::internal)
}

/// The event `event_id` of `room_id`, placed in its graph (not an outlier, not rejected).
fn placed_event(services: &Services, room_id: &RoomId, event_id: &EventId) -> Result<StoredPdu> {
    match services.rooms.stored(event_id)? {
        Some(event)
            if event.room_id == room_id
                && !matches!(event.status, Status::Outlier | Status::Rejected) =>
        {
            Ok(event)
        }
        _ => Err(Error::not_found("This event is not known here")),
    }
}

/// The events named in `event`'s `field` (prev or auth events).
fn linked(event: &StoredPdu, field: &str) -> Vec<OwnedEventId> {
    let Some(CanonicalJsonValue::Array(items)) = event.wire.get(field) else { return Vec::new() };
    items
        .iter()
        .filter_map(|item| match item {
            CanonicalJsonValue::String(id) => OwnedEventId::try_from(id.as_str()).ok(),
            // Room versions 1 and 2 name `[id, hashes]`.
            CanonicalJsonValue::Array(pair) => match pair.first() {
                Some(CanonicalJsonValue::String(id)) => OwnedEventId::try_from(id.as_str()).ok(),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

fn depth(event: &StoredPdu) -> u64 {
    match event.wire.get("depth") {
        Some(CanonicalJsonValue::Integer(depth)) => u64::try_from(i64::from(*depth)).unwrap_or(0),
        _ => 0,
    }
}

/// `GET /_matrix/federation/v1/event/{eventId}`
pub async fn event(
    services: State,
    req: Federated<get_event::v1::Request>,
) -> Result<get_event::v1::Response> {
    let Federated { origin, body } = req;
    let event = services
        .rooms
        .stored(&body.event_id)?
        .ok_or_else(|| Error::not_found("This event is not known here"))?;
    check_in_room(&services, &origin, &event.room_id)?;
    if !visible_to(&services, &origin, &event)? {
        return Err(Error::forbidden("Your server may not see this event"));
    }
    Ok(get_event::v1::Response::new(
        services.server_name().to_owned(),
        MilliSecondsSinceUnixEpoch::now(),
        raw(&event.wire)?,
    ))
}

/// The ids of the state before `event_id` of `room_id` and of its auth chain, for `origin`.
fn state_ids_for(
    services: &Services,
    origin: &ServerName,
    room_id: &RoomId,
    event_id: &EventId,
) -> Result<(Vec<OwnedEventId>, Vec<OwnedEventId>)> {
    check_in_room(services, origin, room_id)?;
    let event = placed_event(services, room_id, event_id)?;
    if !visible_to(services, origin, &event)? {
        return Err(Error::forbidden("Your server may not see this event"));
    }
    services
        .rooms
        .state_ids_before(event_id)?
        .ok_or_else(|| Error::not_found("The state at this event is not known here"))
}

/// The stored wire forms of `ids` (those known).
fn wires(services: &Services, ids: &[OwnedEventId]) -> Result<Vec<Box<RawJsonValue>>> {
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(event) = services.rooms.stored(id)? {
            out.push(raw(&event.wire)?);
        }
    }
    Ok(out)
}

/// `GET /_matrix/federation/v1/state_ids/{roomId}`
pub async fn state_ids(
    services: State,
    req: Federated<get_room_state_ids::v1::Request>,
) -> Result<get_room_state_ids::v1::Response> {
    let Federated { origin, body } = req;
    let (state, chain) = state_ids_for(&services, &origin, &body.room_id, &body.event_id)?;
    Ok(get_room_state_ids::v1::Response::new(chain, state))
}

/// `GET /_matrix/federation/v1/state/{roomId}`
pub async fn state(
    services: State,
    req: Federated<get_room_state::v1::Request>,
) -> Result<get_room_state::v1::Response> {
    let Federated { origin, body } = req;
    let (state, chain) = state_ids_for(&services, &origin, &body.room_id, &body.event_id)?;
    Ok(get_room_state::v1::Response::new(wires(&services, &chain)?, wires(&services, &state)?))
}

/// `GET /_matrix/federation/v1/event_auth/{roomId}/{eventId}`
pub async fn event_auth(
    services: State,
    req: Federated<get_event_authorization::v1::Request>,
) -> Result<get_event_authorization::v1::Response> {
    let Federated { origin, body } = req;
    check_in_room(&services, &origin, &body.room_id)?;
    let event = match services.rooms.stored(&body.event_id)? {
        Some(event) if event.room_id == body.room_id => event,
        _ => return Err(Error::not_found("This event is not known here")),
    };
    if !visible_to(&services, &origin, &event)? {
        return Err(Error::forbidden("Your server may not see this event"));
    }
    let chain = services.rooms.auth_chain(&linked(&event, "auth_events"))?;
    Ok(get_event_authorization::v1::Response::new(wires(&services, &chain)?))
}

/// Walks back from `from` along prev events, newest first, at most `limit` events: not past
/// `stop`, not below `min_depth`, `from` itself included when `include_from`.
fn walk_back(
    services: &Services,
    room_id: &RoomId,
    from: &[OwnedEventId],
    stop: &HashSet<OwnedEventId>,
    min_depth: u64,
    limit: usize,
    include_from: bool,
) -> Result<Vec<StoredPdu>> {
    let mut seen: HashSet<OwnedEventId> = HashSet::new();
    let mut queue: VecDeque<(OwnedEventId, bool)> = VecDeque::new();
    for id in from {
        if seen.insert(id.clone()) {
            queue.push_back((id.clone(), include_from));
        }
    }
    let mut found = Vec::new();
    let mut walked = 0;
    while let Some((id, take)) = queue.pop_front() {
        walked += 1;
        if found.len() >= limit || walked > MAX_WALK {
            break;
        }
        let Some(event) = services.rooms.stored(&id)? else { continue };
        if event.room_id != room_id || depth(&event) < min_depth {
            continue;
        }
        for prev in linked(&event, "prev_events") {
            if !stop.contains(&prev) && seen.insert(prev.clone()) {
                queue.push_back((prev, true));
            }
        }
        if take {
            found.push(event);
        }
    }
    Ok(found)
}

/// `GET /_matrix/federation/v1/backfill/{roomId}`
pub async fn backfill(
    services: State,
    req: Federated<get_backfill::v1::Request>,
) -> Result<get_backfill::v1::Response> {
    let Federated { origin, body } = req;
    check_in_room(&services, &origin, &body.room_id)?;
    let limit = usize::try_from(body.limit).unwrap_or(MAX_EVENTS).min(MAX_EVENTS);
    let from: Vec<OwnedEventId> = body.v.into_iter().take(MAX_EVENTS).collect();
    let events = walk_back(&services, &body.room_id, &from, &HashSet::new(), 0, limit, true)?;
    let mut pdus = Vec::with_capacity(events.len());
    for event in &events {
        pdus.push(served(&services, &origin, event)?);
    }
    Ok(get_backfill::v1::Response::new(
        services.server_name().to_owned(),
        MilliSecondsSinceUnixEpoch::now(),
        pdus,
    ))
}

/// `POST /_matrix/federation/v1/get_missing_events/{roomId}`
pub async fn missing_events(
    services: State,
    req: Federated<get_missing_events::v1::Request>,
) -> Result<get_missing_events::v1::Response> {
    let Federated { origin, body } = req;
    check_in_room(&services, &origin, &body.room_id)?;
    let limit = usize::try_from(body.limit).unwrap_or(MAX_EVENTS).min(MAX_EVENTS);
    let stop: HashSet<OwnedEventId> = body.earliest_events.into_iter().take(MAX_EVENTS).collect();
    let latest: Vec<OwnedEventId> = body.latest_events.into_iter().take(MAX_EVENTS).collect();
    let min_depth = u64::from(body.min_depth);
    let mut events = walk_back(&services, &body.room_id, &latest, &stop, min_depth, limit, false)?;
    events.retain(|event| !stop.contains(&event.event_id));
    // Oldest first, as the asking server places them.
    events.sort_by_key(depth);
    let mut pdus = Vec::with_capacity(events.len());
    for event in &events {
        pdus.push(served(&services, &origin, event)?);
    }
    Ok(get_missing_events::v1::Response::new(pdus))
}
