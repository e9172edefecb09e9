//! What a room looks like from outside: name, topic, members, join rule. One description serves
//! the public directory, space hierarchies and room summaries.

use ruma::{RoomId, UserId};
use serde_json::{Map, Value as JsonValue, json};

use super::state::StateMap;
use crate::{error::Result, service::Services};

/// The summary of `room_id` as JSON in the shape the directory, hierarchy and summary
/// endpoints share.
pub fn summary(services: &Services, room_id: &RoomId) -> Result<JsonValue> {
    let rooms = &services.rooms;
    let record = rooms.room(room_id)?.ok_or_else(|| crate::Error::not_found("Unknown room"))?;
    let state = rooms.states.load(record.current_state)?;
    let field = |kind: &str, name: &str| -> Result<Option<JsonValue>> {
        Ok(rooms
            .state_content(&state, kind, "")?
            .and_then(|c| c.get(name).cloned())
            .filter(|v| !v.is_null()))
    };
    let joined = rooms.members(room_id)?.into_iter().filter(|(_, m)| m == "join").count();
    let join_rules = rooms.state_content(&state, "m.room.join_rules", "")?.unwrap_or_default();
    let mut summary = Map::new();
    summary.insert("room_id".into(), json!(room_id));
    summary.insert("num_joined_members".into(), json!(joined));
    summary.insert("room_version".into(), json!(record.version));
    summary.insert(
        "world_readable".into(),
        json!(
            field("m.room.history_visibility", "history_visibility")?
                == Some(json!("world_readable"))
        ),
    );
    summary.insert(
        "guest_can_join".into(),
        json!(field("m.room.guest_access", "guest_access")? == Some(json!("can_join"))),
    );
    summary.insert(
        "join_rule".into(),
        join_rules.get("join_rule").cloned().unwrap_or_else(|| json!("invite")),
    );
    if let Some(allow) = join_rules.get("allow").and_then(|a| a.as_array()) {
        let allowed: Vec<&JsonValue> =
            allow.iter().filter_map(|entry| entry.get("room_id")).collect();
        summary.insert("allowed_room_ids".into(), json!(allowed));
    }
    for (kind, name, key) in [
        ("m.room.name", "name", "name"),
        ("m.room.topic", "topic", "topic"),
        ("m.room.avatar", "url", "avatar_url"),
        ("m.room.canonical_alias", "alias", "canonical_alias"),
        ("m.room.create", "type", "room_type"),
        ("m.room.encryption", "algorithm", "encryption"),
    ] {
        if let Some(value) = field(kind, name)? {
            summary.insert(key.into(), value);
        }
    }
    Ok(JsonValue::Object(summary))
}

/// Whether `user_id` may learn about the room without being in it: joined or invited, or the
/// room is world-readable, public, knockable, or restricted to a room the user is in.
pub fn may_preview(
    services: &Services,
    room_id: &RoomId,
    state: &StateMap,
    user_id: &UserId,
) -> Result<bool> {
    let rooms = &services.rooms;
    if matches!(rooms.membership(room_id, user_id)?.as_deref(), Some("join" | "invite")) {
        return Ok(true);
    }
    let visibility = rooms.state_content(state, "m.room.history_visibility", "")?;
    if visibility.and_then(|v| v.get("history_visibility").cloned())
        == Some(json!("world_readable"))
    {
        return Ok(true);
    }
    let join_rules = rooms.state_content(state, "m.room.join_rules", "")?.unwrap_or_default();
    match join_rules.get("join_rule").and_then(|r| r.as_str()) {
        Some("public" | "knock") => Ok(true),
        Some("restricted" | "knock_restricted") => {
            let allow =
                join_rules.get("allow").and_then(|a| a.as_array()).cloned().unwrap_or_default();
            for entry in allow {
                let Some(allowed) = entry
                    .get("room_id")
                    .and_then(|r| r.as_str())
                    .and_then(|r| RoomId::parse(r).ok())
                else {
                    continue;
                };
                if rooms.membership(&allowed, user_id)?.as_deref() == Some("join") {
                    return Ok(true);
                }
            }
            Ok(false)
        }
        _ => Ok(false),
    }
}
