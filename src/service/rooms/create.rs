//! `createRoom`: the create event, the creator's join, power levels, presets, initial state,
//! name, topic and invites, in the order the spec gives.

use ruma::{OwnedRoomAliasId, OwnedRoomId, OwnedUserId, RoomVersionId, UserId};
use serde_json::{Map, Value as JsonValue, json};

use super::{NewEvent, check_field_sizes, membership};
use crate::{
    error::{Error, ErrorKind, Result},
    service::{Services, relations},
};

/// Presets of `createRoom`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// Invite-only, history shared, guests may join.
    PrivateChat,
    /// Like private, and every invitee gets the creator's power.
    TrustedPrivateChat,
    /// Anyone may join; guests may not.
    PublicChat,
}

/// Everything `createRoom` may ask for, as plain data.
#[derive(Debug, Default)]
pub struct CreateRoom {
    /// Preset (defaults from visibility).
    pub preset: Option<Preset>,
    /// Whether the room is listed in the directory (implies the public preset by default).
    pub public: bool,
    /// Requested version.
    pub version: Option<RoomVersionId>,
    /// Extra create-event content.
    pub creation_content: Option<Map<String, JsonValue>>,
    /// Power level keys overriding the defaults.
    pub power_level_override: Option<Map<String, JsonValue>>,
    /// `(type, state_key, content)` sent after the preset's state.
    pub initial_state: Vec<(String, String, JsonValue)>,
    /// Room name.
    pub name: Option<String>,
    /// Room topic.
    pub topic: Option<String>,
    /// Users to invite.
    pub invite: Vec<OwnedUserId>,
    /// Whether this is a direct chat (flags the invites).
    pub is_direct: bool,
    /// A local alias to create and make canonical.
    pub alias: Option<OwnedRoomAliasId>,
}

/// Creates a room for `sender`; returns its id.
pub async fn create_room(
    services: &Services,
    sender: &UserId,
    req: CreateRoom,
) -> Result<OwnedRoomId> {
    let version =
        req.version.clone().unwrap_or_else(|| services.config.rooms.default_version.clone());
    let rules = version.rules().filter(super::resolve::resolvable).ok_or_else(|| {
        Error::new(
            ErrorKind::UnsupportedRoomVersion,
            format!("Room version {version} is not supported"),
        )
    })?;
    if req.invite.len() > 100 || req.initial_state.len() > 100 {
        return Err(Error::invalid_param("At most 100 invites and 100 initial state events"));
    }
    if let Some(alias) = &req.alias
        && services.directory.resolve(alias)?.is_some()
    {
        return Err(Error::new(ErrorKind::RoomInUse, "Room alias already taken"));
    }
    // Check everything that can be checked before anything is written, so a bad request
    // leaves no half-made room behind.
    for (kind, state_key, content) in &req.initial_state {
        if kind == "m.room.create" || kind == "m.room.member" {
            return Err(Error::bad_json(format!("{kind} cannot be part of initial_state")));
        }
        check_field_sizes(kind, Some(state_key), sender, None)?;
        relations::check_new_room_content(services, content)?;
    }
    for invitee in &req.invite {
        if invitee.server_name() != services.server_name() {
            if services.rooms.registry().countersigning().is_none() {
                return Err(Error::forbidden("Inviting users of other servers needs federation"));
            }
            // Asked of the invitee's server when the invite is sent.
            continue;
        }
        if services.users.get(invitee)?.is_none_or(|u| u.deactivated) {
            return Err(Error::not_found(format!("No such user: {invitee}")));
        }
    }
    let asks_encryption = req.initial_state.iter().any(|(kind, _, _)| kind == "m.room.encryption");
    if asks_encryption && !services.config.encryption.allowed {
        return Err(Error::forbidden("Encryption is disabled on this server"));
    }
    let preset =
        req.preset.unwrap_or(if req.public { Preset::PublicChat } else { Preset::PrivateChat });
    let trusted_invitees = preset == Preset::TrustedPrivateChat;

    // The create event.
    let mut create = req.creation_content.clone().unwrap_or_default();
    create.remove("creator");
    create.remove("room_version");
    if !rules.authorization.use_room_create_sender {
        create.insert("creator".into(), json!(sender));
    }
    if rules.authorization.additional_room_creators && trusted_invitees && !req.invite.is_empty() {
        create.insert("additional_creators".into(), json!(req.invite));
    }
    let creators_privileged = rules.authorization.explicitly_privilege_room_creators;
    let additional_creators: Vec<OwnedUserId> = if creators_privileged {
        create
            .get("additional_creators")
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    let room_id =
        services.rooms.append_create(services, sender, &version, JsonValue::Object(create))?;

    // The creator joins.
    membership::join(services, &room_id, sender, None, None).await?;

    // Power levels: creators are implicitly all-powerful from v12 and must not be listed.
    let mut users = Map::new();
    if !creators_privileged {
        users.insert(sender.to_string(), json!(100));
        if trusted_invitees {
            for invitee in &req.invite {
                users.insert(invitee.to_string(), json!(100));
            }
        }
    }
    let mut power_levels = json!({
        "users": users,
        "users_default": 0,
        "events": {
            "m.room.name": 50,
            "m.room.power_levels": 100,
            "m.room.history_visibility": 100,
            "m.room.canonical_alias": 50,
            "m.room.avatar": 50,
            "m.room.tombstone": 100,
            "m.room.server_acl": 100,
            "m.room.encryption": 100,
        },
        "events_default": 0,
        "state_default": 50,
        "ban": 50,
        "kick": 50,
        "redact": 50,
        "invite": if preset == Preset::PublicChat { 50 } else { 0 },
        "notifications": { "room": 50 },
    });
    if let Some(overrides) = req.power_level_override {
        for (key, value) in overrides {
            power_levels[key] = value;
        }
    }
    if creators_privileged && let Some(users) = power_levels["users"].as_object_mut() {
        users.remove(sender.as_str());
        for creator in &additional_creators {
            users.remove(creator.as_str());
        }
    }
    let append = |event: NewEvent| services.rooms.append(services, &room_id, sender, event, None);
    append(NewEvent::state("m.room.power_levels", "", power_levels)).await?;

    if let Some(alias) = &req.alias {
        let taken = || Error::new(ErrorKind::RoomInUse, "Room alias already taken");
        services.directory.create_alias(services, alias, &room_id, sender, taken)?;
        append(NewEvent::state("m.room.canonical_alias", "", json!({ "alias": alias }))).await?;
    }

    // Preset state.
    let join_rule = if preset == Preset::PublicChat { "public" } else { "invite" };
    append(NewEvent::state("m.room.join_rules", "", json!({ "join_rule": join_rule }))).await?;
    append(NewEvent::state(
        "m.room.history_visibility",
        "",
        json!({ "history_visibility": "shared" }),
    ))
    .await?;
    let guest_access = if preset == Preset::PublicChat { "forbidden" } else { "can_join" };
    append(NewEvent::state("m.room.guest_access", "", json!({ "guest_access": guest_access })))
        .await?;

    let private = preset != Preset::PublicChat || req.is_direct;
    if private && !asks_encryption && services.config.encryption.encrypt_private_rooms_by_default {
        let content = json!({ "algorithm": "m.megolm.v1.aes-sha2" });
        append(NewEvent::state("m.room.encryption", "", content)).await?;
    }
    for (kind, state_key, content) in req.initial_state {
        append(NewEvent::state(kind, state_key, content)).await?;
    }
    if let Some(name) = req.name {
        append(NewEvent::state("m.room.name", "", json!({ "name": name }))).await?;
    }
    if let Some(topic) = req.topic {
        append(NewEvent::state("m.room.topic", "", json!({ "topic": topic }))).await?;
    }
    for invitee in &req.invite {
        let invited = membership::invite(services, &room_id, sender, invitee, None, req.is_direct);
        match invited.await {
            Ok(_) => {}
            // Another server refusing or unreachable does not undo the room: the creator may
            // invite again.
            Err(err) if invitee.server_name() != services.server_name() => {
                tracing::info!(%room_id, %invitee, %err, "invite at room creation failed");
            }
            Err(err) => return Err(err),
        }
    }
    if req.public {
        services.directory.set_published(&room_id, true)?;
    }
    tracing::info!(%room_id, %sender, %version, "room created");
    Ok(room_id)
}
