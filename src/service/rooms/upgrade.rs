//! Room upgrades: a new room of another version carries the old room's state forward, aliases
//! move across, and the old room is tombstoned and quietened.

use ruma::{
    Int, OwnedRoomId, OwnedUserId, RoomId, RoomVersionId, UserId,
    events::room::power_levels::RoomPowerLevels, int,
};
use serde_json::{Value as JsonValue, json};

use super::{NewEvent, membership, permissions::power_levels_event_content};
use crate::{
    error::{Error, ErrorKind, Result},
    service::Services,
};

/// State carried into the replacement room, in this order.
const CARRIED_STATE: &[&str] = &[
    "m.room.join_rules",
    "m.room.history_visibility",
    "m.room.guest_access",
    "m.room.name",
    "m.room.topic",
    "m.room.avatar",
    "m.room.encryption",
    "m.room.server_acl",
];

/// Upgrades `room_id` to `version` on behalf of `user_id`; returns the replacement room.
pub async fn upgrade_room(
    services: &Services,
    room_id: &RoomId,
    user_id: &UserId,
    version: &RoomVersionId,
    additional_creators: Vec<OwnedUserId>,
) -> Result<OwnedRoomId> {
    let rooms = &services.rooms;
    let new_rules = version.rules().filter(super::resolve::resolvable).ok_or_else(|| {
        Error::new(
            ErrorKind::UnsupportedRoomVersion,
            format!("Room version {version} is not supported"),
        )
    })?;
    let old = rooms.room(room_id)?.ok_or_else(|| Error::not_found("Unknown room"))?;
    if !rooms.may_send_state(room_id, user_id, "m.room.tombstone")?
        || !rooms.may_send_state(room_id, user_id, "m.room.power_levels")?
    {
        return Err(Error::forbidden("You may not upgrade this room"));
    }
    let old_state = rooms.states.load(old.current_state)?;
    let content_of = |kind: &str| rooms.state_content(&old_state, kind, "");

    // The create event: the old content minus what the new version sets, plus the predecessor.
    let mut create =
        content_of("m.room.create")?.and_then(|c| c.as_object().cloned()).unwrap_or_default();
    for key in ["creator", "room_version", "predecessor", "additional_creators"] {
        create.remove(key);
    }
    create.insert("predecessor".into(), json!({ "room_id": room_id }));
    if new_rules.authorization.use_room_create_sender {
        create.remove("creator");
    } else {
        create.insert("creator".into(), json!(user_id));
    }
    if new_rules.authorization.additional_room_creators && !additional_creators.is_empty() {
        create.insert("additional_creators".into(), json!(additional_creators));
    }
    let new_room = rooms.append_create(services, user_id, version, JsonValue::Object(create))?;
    membership::join(services, &new_room, user_id, None, None).await?;
    let append = |event: NewEvent| rooms.append(services, &new_room, user_id, event, None);

    // Power levels: the old room's, written out with integer values (which every version
    // accepts), with the upgrader able to send the carried state first.
    let old_levels = rooms.power_levels(&old_state, &old.version)?;
    let needed = power_needed(&old_levels);
    let quiet = 50.max(i64::from(old_levels.users_default) + 1);
    let mut power = power_levels_event_content(old_levels)?;
    let privileged = new_rules.authorization.explicitly_privilege_room_creators;
    let mut temporary = power.clone();
    if let Some(users) = temporary.get_mut("users").and_then(|u| u.as_object_mut()) {
        if privileged {
            users.remove(user_id.as_str());
            for creator in &additional_creators {
                users.remove(creator.as_str());
            }
        } else {
            users.insert(user_id.to_string(), json!(needed));
        }
    } else if !privileged {
        temporary["users"] = json!({ user_id.as_str(): needed });
    }
    append(NewEvent::state("m.room.power_levels", "", temporary)).await?;
    for kind in CARRIED_STATE {
        if let Some(content) = content_of(kind)? {
            append(NewEvent::state(*kind, "", content)).await?;
        }
    }
    if privileged && let Some(users) = power.get_mut("users").and_then(|u| u.as_object_mut()) {
        users.remove(user_id.as_str());
        for creator in &additional_creators {
            users.remove(creator.as_str());
        }
    }
    append(NewEvent::state("m.room.power_levels", "", power.clone())).await?;

    // Bans carry over.
    for (member, membership) in rooms.members(room_id)?.iter() {
        if membership == "ban" {
            append(NewEvent::state(
                "m.room.member",
                member.as_str(),
                json!({ "membership": "ban" }),
            ))
            .await?;
        }
    }

    // Aliases move to the new room, with the canonical alias.
    for alias in services.directory.aliases_of(room_id)? {
        services.directory.move_alias(&alias, &new_room)?;
    }
    if let Some(canonical) = content_of("m.room.canonical_alias")? {
        append(NewEvent::state("m.room.canonical_alias", "", canonical)).await?;
        rooms
            .append(
                services,
                room_id,
                user_id,
                NewEvent::state("m.room.canonical_alias", "", json!({})),
                None,
            )
            .await?;
    }
    if services.directory.is_published(room_id)? {
        services.directory.set_published(room_id, false)?;
        services.directory.set_published(&new_room, true)?;
    }

    // Tombstone the old room and stop ordinary members from talking or inviting there.
    let tombstone = json!({ "body": "This room has been replaced", "replacement_room": new_room });
    rooms
        .append(
            services,
            room_id,
            user_id,
            NewEvent::state("m.room.tombstone", "", tombstone),
            None,
        )
        .await?;
    let mut restricted = rooms.power_levels_to_change(&old_state, &old.version)?;
    restricted["events_default"] = json!(quiet);
    restricted["invite"] = json!(quiet);
    rooms
        .append(
            services,
            room_id,
            user_id,
            NewEvent::state("m.room.power_levels", "", restricted),
            None,
        )
        .await?;
    tracing::info!(old = %room_id, new = %new_room, %version, "room upgraded");
    Ok(new_room)
}

/// The highest level any state event needs under `levels` (at least 100), so the upgrader can
/// send them all.
fn power_needed(levels: &RoomPowerLevels) -> Int {
    levels.events.values().copied().fold(levels.state_default.max(int!(100)), Int::max)
}
