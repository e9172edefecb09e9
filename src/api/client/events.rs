//! Sending and reading room events: messages, state, single events, members, redactions.

use std::collections::BTreeMap;

use ruma::{
    MilliSecondsSinceUnixEpoch, UInt,
    api::Direction,
    api::client::{
        membership::{get_member_events::v3 as get_members, joined_members::v3 as joined_members},
        message::send_message_event::v3 as send_message,
        redact::redact_event::v3 as redact,
        room::{
            get_event_by_timestamp::v1 as timestamp_to_event, get_room_event::v3 as get_event,
            report_content::v3 as report_content, report_room::v3 as report_room,
        },
        state::{
            get_state_event_for_key::v3::{self as get_state_for_key, StateEventFormat},
            get_state_events::v3 as get_state,
            send_state_event::v3 as send_state,
        },
    },
    events::TimelineEventType,
    serde::Raw,
};
use serde_json::{Value as JsonValue, json, value::to_raw_value};

use crate::{
    api::{Ruma, State},
    error::{Error, Result},
    service::rooms::{NewEvent, Txn, TxnEndpoint, pdu::StoredPdu, reports::Report},
};

/// The event content of a send: a JSON object, else `M_BAD_JSON`.
pub(crate) fn content_object(raw: &str) -> Result<JsonValue> {
    match serde_json::from_str(raw) {
        Ok(value @ JsonValue::Object(_)) => Ok(value),
        _ => Err(Error::bad_json("Event content must be a JSON object")),
    }
}

fn raw<T>(value: &JsonValue) -> Result<Raw<T>> {
    Ok(Raw::from_json(to_raw_value(value).map_err(Error::internal)?))
}

/// `PUT /_matrix/client/v3/rooms/{roomId}/send/{eventType}/{txnId}`
pub async fn send(
    services: State,
    req: Ruma<send_message::Request>,
) -> Result<send_message::Response> {
    let caller = req.caller()?.clone();
    let body = req.body;
    let event_type = body.event_type.to_string();
    let txn = Txn {
        user: &caller.user_id,
        device: caller.device_id.as_str(),
        id: body.txn_id.as_str(),
        endpoint: TxnEndpoint::Send(&event_type),
    };
    // Over the limit, a retry of a send already stored still answers with its event; the
    // store is read only then, so a first send pays no extra read.
    if let Err(limited) = services.abuse.message(&caller.user_id, caller.rate_limited()) {
        return match services.rooms.transaction(&body.room_id, txn)? {
            Some(event_id) => Ok(send_message::Response::new(event_id)),
            None => Err(limited),
        };
    }
    let content = content_object(body.body.json().get())?;
    // Moves the type over (a custom type's string is not copied again).
    let kind = TimelineEventType::from(body.event_type);
    if kind == TimelineEventType::RoomRedaction {
        return Err(Error::bad_json("Use the redact endpoint to redact events"));
    }
    let event = NewEvent { kind, content, state_key: None, redacts: None, audit: Vec::new() };
    let event_id =
        services.rooms.append(&services, &body.room_id, &caller.user_id, event, Some(txn)).await?;
    Ok(send_message::Response::new(event_id))
}

/// `PUT /_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}`
pub async fn send_state(
    services: State,
    req: Ruma<send_state::Request>,
) -> Result<send_state::Response> {
    let caller = req.caller()?.clone();
    services.abuse.message(&caller.user_id, caller.rate_limited())?;
    let body = req.body;
    let content = content_object(body.body.json().get())?;
    let kind = body.event_type.to_string();
    if matches!(kind.as_str(), "m.room.create") {
        return Err(Error::forbidden("The create event cannot be replaced"));
    }
    if kind == "m.room.redaction" {
        return Err(Error::bad_json("Redactions are not state events; use the redact endpoint"));
    }
    if kind == "m.room.encryption" {
        services.rooms.check_encryption_change(&services, &body.room_id, &content)?;
    }
    if kind == "m.room.canonical_alias" {
        services.directory.check_canonical_alias(&services, &body.room_id, &content)?;
    }
    let event = NewEvent::state(kind, body.state_key, content);
    let event_id =
        services.rooms.append(&services, &body.room_id, &caller.user_id, event, None).await?;
    Ok(send_state::Response::new(event_id))
}

/// `GET /_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}`
pub async fn state_for_key(
    services: State,
    req: Ruma<get_state_for_key::Request>,
) -> Result<get_state_for_key::Response> {
    let caller = req.caller()?.clone();
    let body = req.body;
    let state = services.rooms.readable_state(&body.room_id, &caller.user_id)?;
    let event = services
        .rooms
        .state_event(&state, &body.event_type.to_string(), &body.state_key)?
        .ok_or_else(|| Error::not_found("State event not found"))?;
    let value = match body.format {
        StateEventFormat::Event => {
            services.rooms.client_events(std::slice::from_ref(&event))?.pop().unwrap_or_default()
        }
        _ => event.wire.get("content").map(|c| c.clone().into()).unwrap_or_else(|| json!({})),
    };
    Ok(get_state_for_key::Response::new(to_raw_value(&value).map_err(Error::internal)?))
}

/// `GET /_matrix/client/v3/rooms/{roomId}/state`
pub async fn state(services: State, req: Ruma<get_state::Request>) -> Result<get_state::Response> {
    let caller = req.caller()?.clone();
    let state = services.rooms.readable_state(&req.body.room_id, &caller.user_id)?;
    let events = services.rooms.state_events(&state)?;
    let events = services.rooms.client_events(&events)?.iter().map(raw).collect::<Result<_>>()?;
    Ok(get_state::Response::new(events))
}

/// `GET /_matrix/client/v3/rooms/{roomId}/members`
pub async fn members(
    services: State,
    req: Ruma<get_members::Request>,
) -> Result<get_members::Response> {
    let caller = req.caller()?.clone();
    let body = req.body;
    let mut state = services.rooms.readable_state(&body.room_id, &caller.user_id)?;
    if let Some(at) = &body.at {
        // The members as of a sync token, never past what the caller may read now.
        let position = crate::api::client::sync::parse_token(&services, at)?;
        let record =
            services.rooms.room(&body.room_id)?.ok_or_else(|| Error::not_found("Unknown room"))?;
        let readable_until =
            match services.rooms.membership(&body.room_id, &caller.user_id)?.as_deref() {
                Some("join") => u64::MAX,
                _ => services
                    .rooms
                    .state_event(&state, "m.room.member", caller.user_id.as_str())?
                    .map_or(u64::MAX, |e| e.position),
            };
        state = services.rooms.state_at_position(&record, position.min(readable_until))?;
    }
    let mut chunk = Vec::new();
    for ((kind, _), short) in state.iter() {
        if kind != "m.room.member" {
            continue;
        }
        let Some(event) = services.rooms.stored_by_short_public(*short)? else { continue };
        let membership = event
            .wire
            .get("content")
            .and_then(|c| c.as_object())
            .and_then(|c| c.get("membership"))
            .and_then(|m| m.as_str())
            .unwrap_or_default()
            .to_owned();
        if body.membership.as_ref().is_some_and(|m| m.as_str() != membership) {
            continue;
        }
        if body.not_membership.as_ref().is_some_and(|m| m.as_str() == membership) {
            continue;
        }
        chunk.push(event);
    }
    let chunk = services.rooms.client_events(&chunk)?.iter().map(raw).collect::<Result<_>>()?;
    Ok(get_members::Response::new(chunk))
}

/// `GET /_matrix/client/v3/rooms/{roomId}/joined_members`
pub async fn joined(
    services: State,
    req: Ruma<joined_members::Request>,
) -> Result<joined_members::Response> {
    let caller = req.caller()?.clone();
    let room_id = &req.body.room_id;
    if services.rooms.membership(room_id, &caller.user_id)?.as_deref() != Some("join") {
        return Err(Error::forbidden("You are not a member of this room"));
    }
    let state = services.rooms.current_state(room_id)?;
    let mut joined = BTreeMap::new();
    for (user_id, membership) in services.rooms.members(room_id)?.iter() {
        if membership != "join" {
            continue;
        }
        let content = services
            .rooms
            .state_content(&state, "m.room.member", user_id.as_str())?
            .unwrap_or_default();
        let mut member = joined_members::RoomMember::new();
        member.display_name =
            content.get("displayname").and_then(|v| v.as_str()).map(str::to_owned);
        member.avatar_url = content.get("avatar_url").and_then(|v| v.as_str()).map(Into::into);
        joined.insert(user_id.clone(), member);
    }
    Ok(joined_members::Response::new(joined))
}

/// `GET /_matrix/client/v3/rooms/{roomId}/event/{eventId}`: only if history visibility
/// lets the caller see it; otherwise it does not exist for them.
pub async fn event(services: State, req: Ruma<get_event::Request>) -> Result<get_event::Response> {
    let caller = req.caller()?.clone();
    let body = req.body;
    let not_found = || Error::not_found("Event not found");
    let stored = services.rooms.stored(&body.event_id)?.ok_or_else(not_found)?;
    if stored.room_id != body.room_id || !services.rooms.can_see(&caller.user_id, &stored)? {
        return Err(not_found());
    }
    let device = Some(caller.device_id.as_str());
    let served = crate::service::relations::serve_all(
        &services,
        &caller.user_id,
        device,
        std::slice::from_ref(&stored),
    )?;
    let event = served.first().ok_or_else(not_found)?;
    Ok(get_event::Response::new(raw(event)?))
}

/// `PUT /_matrix/client/v3/rooms/{roomId}/redact/{eventId}/{txnId}`: one's own events, or
/// others' with the room's `redact` power level.
pub async fn redact(services: State, req: Ruma<redact::Request>) -> Result<redact::Response> {
    let caller = req.caller()?.clone();
    let body = req.body;
    let rooms = &services.rooms;
    let txn = Txn {
        user: &caller.user_id,
        device: caller.device_id.as_str(),
        id: body.txn_id.as_str(),
        endpoint: TxnEndpoint::Redact(&body.event_id),
    };
    if let Some(existing) = rooms.transaction(&body.room_id, txn)? {
        return Ok(redact::Response::new(existing));
    }
    let target = rooms.stored(&body.event_id)?.filter(|e| e.room_id == body.room_id);
    let target = target.ok_or_else(|| Error::not_found("Event not found"))?;
    let own = target.wire.get("sender").and_then(|s| s.as_str()) == Some(caller.user_id.as_str());
    if !own {
        let record = rooms.room(&body.room_id)?.ok_or_else(|| Error::not_found("Unknown room"))?;
        let state = rooms.states.load(record.current_state)?;
        let levels = rooms.power_levels(&state, &record.version)?;
        if !levels.user_can_redact_event_of_other(&caller.user_id) {
            return Err(Error::forbidden("Redacting others' events needs the redact power level"));
        }
    }
    let mut content = json!({ "redacts": body.event_id });
    if let Some(reason) = &body.reason {
        content["reason"] = json!(reason);
    }
    let event = NewEvent {
        kind: TimelineEventType::RoomRedaction,
        content,
        state_key: None,
        redacts: Some(body.event_id.clone()),
        audit: Vec::new(),
    };
    let event_id =
        rooms.append(&services, &body.room_id, &caller.user_id, event, Some(txn)).await?;
    Ok(redact::Response::new(event_id))
}

/// Most events looked at by one timestamp lookup.
const MAX_TIMESTAMP_SCAN: usize = 50_000;

/// `GET /_matrix/client/v1/rooms/{roomId}/timestamp_to_event`: the closest visible event at or
/// after (`dir=f`) or at or before (`dir=b`) the timestamp.
pub async fn timestamp_to_event(
    services: State,
    req: Ruma<timestamp_to_event::Request>,
) -> Result<timestamp_to_event::Response> {
    let caller = req.caller()?.clone();
    let body = req.body;
    let rooms = &services.rooms;
    rooms.readable_state(&body.room_id, &caller.user_id)?;
    let record = rooms.room(&body.room_id)?.ok_or_else(|| Error::not_found("Unknown room"))?;
    let forward = body.dir == Direction::Forward;
    let target = u64::from(body.ts.0);
    let ts_of = |e: &StoredPdu| -> u64 {
        e.wire
            .get("origin_server_ts")
            .and_then(|t| t.as_integer())
            .map_or(0, |t| u64::try_from(i64::from(t)).unwrap_or(0))
    };
    // Scan from the end nearest the answer: oldest first going forward, newest first going back.
    for event in rooms.timeline(&record, forward).take(MAX_TIMESTAMP_SCAN) {
        let event = event?;
        let ts = ts_of(&event);
        let hit = if forward { ts >= target } else { ts <= target };
        if hit && rooms.can_see(&caller.user_id, &event)? {
            let ts = MilliSecondsSinceUnixEpoch(UInt::try_from(ts).unwrap_or_default());
            return Ok(timestamp_to_event::Response::new(event.event_id, ts));
        }
    }
    Err(Error::not_found("No event found in that direction"))
}

/// `POST /_matrix/client/v3/rooms/{roomId}/report/{eventId}`: only events the reporter can see.
pub async fn report_event(
    services: State,
    req: Ruma<report_content::Request>,
) -> Result<report_content::Response> {
    let caller = req.caller()?.clone();
    let body = req.body;
    let not_found = || Error::not_found("Event not found");
    let stored = services
        .rooms
        .stored(&body.event_id)?
        .filter(|e| e.room_id == body.room_id)
        .ok_or_else(not_found)?;
    if !services.rooms.can_see(&caller.user_id, &stored)? {
        return Err(not_found());
    }
    services.reports.add(Report {
        room_id: body.room_id,
        event_id: Some(body.event_id),
        reporter: caller.user_id,
        reason: body.reason,
        received_ms: 0,
    })?;
    Ok(report_content::Response::new())
}

/// `POST /_matrix/client/v3/rooms/{roomId}/report`
pub async fn report_room(
    services: State,
    req: Ruma<report_room::Request>,
) -> Result<report_room::Response> {
    let caller = req.caller()?.clone();
    let body = req.body;
    if services.rooms.room(&body.room_id)?.is_none() {
        return Err(Error::not_found("Unknown room"));
    }
    services.reports.add(Report {
        room_id: body.room_id,
        event_id: None,
        reporter: caller.user_id,
        reason: Some(body.reason),
        received_ms: 0,
    })?;
    Ok(report_room::Response::new())
}
