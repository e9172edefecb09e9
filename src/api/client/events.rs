//! Sending and reading room events: messages, state, single events, members, redactions.

use std::collections::BTreeMap;

use ruma::{
    api::client::{
        membership::{get_member_events::v3 as get_members, joined_members::v3 as joined_members},
        message::send_message_event::v3 as send_message,
        redact::redact_event::v3 as redact,
        room::get_room_event::v3 as get_event,
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
    service::rooms::{NewEvent, pdu::client_event},
};

fn content_object(raw: &str) -> Result<JsonValue> {
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
    let content = content_object(body.body.json().get())?;
    let kind = TimelineEventType::from(body.event_type.to_string());
    if kind == TimelineEventType::RoomRedaction {
        return Err(Error::bad_json("Use the redact endpoint to redact events"));
    }
    let event = NewEvent { kind, content, state_key: None, redacts: None };
    let txn = Some((caller.device_id.as_str(), body.txn_id.as_str()));
    let event_id =
        services.rooms.append(&services, &body.room_id, &caller.user_id, event, txn).await?;
    Ok(send_message::Response::new(event_id))
}

/// `PUT /_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}`
pub async fn send_state(
    services: State,
    req: Ruma<send_state::Request>,
) -> Result<send_state::Response> {
    let caller = req.caller()?.clone();
    let body = req.body;
    let content = content_object(body.body.json().get())?;
    let kind = body.event_type.to_string();
    if matches!(kind.as_str(), "m.room.create") {
        return Err(Error::forbidden("The create event cannot be replaced"));
    }
    if kind == "m.room.member" {
        return Err(Error::forbidden("Use the membership endpoints to change membership"));
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
        StateEventFormat::Event => client_event(&event, None),
        _ => event.wire.get("content").map(|c| c.clone().into()).unwrap_or_else(|| json!({})),
    };
    Ok(get_state_for_key::Response::new(to_raw_value(&value).map_err(Error::internal)?))
}

/// `GET /_matrix/client/v3/rooms/{roomId}/state`
pub async fn state(services: State, req: Ruma<get_state::Request>) -> Result<get_state::Response> {
    let caller = req.caller()?.clone();
    let state = services.rooms.readable_state(&req.body.room_id, &caller.user_id)?;
    let events = services.rooms.state_events(&state)?;
    let events = events.iter().map(|e| raw(&client_event(e, None))).collect::<Result<_>>()?;
    Ok(get_state::Response::new(events))
}

/// `GET /_matrix/client/v3/rooms/{roomId}/members`
pub async fn members(
    services: State,
    req: Ruma<get_members::Request>,
) -> Result<get_members::Response> {
    let caller = req.caller()?.clone();
    let body = req.body;
    let state = services.rooms.readable_state(&body.room_id, &caller.user_id)?;
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
        chunk.push(raw(&client_event(&event, None))?);
    }
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
    for (user_id, membership) in services.rooms.members(room_id)? {
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
        joined.insert(user_id, member);
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
    let event = client_event(&stored, Some((&caller.user_id, caller.device_id.as_str())));
    Ok(get_event::Response::new(raw(&event)?))
}

/// `PUT /_matrix/client/v3/rooms/{roomId}/redact/{eventId}/{txnId}`: one's own events, or
/// others' with the room's `redact` power level.
pub async fn redact(services: State, req: Ruma<redact::Request>) -> Result<redact::Response> {
    let caller = req.caller()?.clone();
    let body = req.body;
    let rooms = &services.rooms;
    if let Some(existing) =
        rooms.transaction(&caller.user_id, caller.device_id.as_str(), body.txn_id.as_str())?
    {
        return Ok(redact::Response::new(existing));
    }
    let target = rooms.stored(&body.event_id)?.filter(|e| e.room_id == body.room_id);
    let target = target.ok_or_else(|| Error::not_found("Event not found"))?;
    let own = target.wire.get("sender").and_then(|s| s.as_str()) == Some(caller.user_id.as_str());
    if !own {
        let record = rooms.room(&body.room_id)?.ok_or_else(|| Error::not_found("Unknown room"))?;
        let state = rooms.states.load(record.current_state)?;
        let level = rooms.power_level(&state, &record.version, &caller.user_id)?;
        if level < rooms.required_level(&state, "redact", 50)? {
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
    };
    let txn = Some((caller.device_id.as_str(), body.txn_id.as_str()));
    let event_id = rooms.append(&services, &body.room_id, &caller.user_id, event, txn).await?;
    Ok(redact::Response::new(event_id))
}
