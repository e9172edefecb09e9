//! Creating rooms and changing membership.

use ruma::{
    OwnedRoomId, OwnedServerName, RoomAliasId, RoomId, RoomOrAliasId, UserId,
    api::client::{
        knock::knock_room::v3 as knock_room,
        membership::{
            ban_user::v3 as ban_user, forget_room::v3 as forget_room,
            invite_user::v3 as invite_user, join_room_by_id::v3 as join_by_id,
            join_room_by_id_or_alias::v3 as join_by_id_or_alias, joined_rooms::v3 as joined_rooms,
            kick_user::v3 as kick_user, leave_room::v3 as leave_room, unban_user::v3 as unban_user,
        },
        room::{Visibility, create_room::v3 as create_room, upgrade_room::v3 as upgrade_room},
    },
    api::federation::query::get_room_information,
};
use serde_json::{Map, Value as JsonValue};

use crate::{
    api::{Caller, Ruma, State},
    error::{Error, ErrorKind, Result},
    service::{
        federation::{edu as fed_edu, invite as fed_invite, membership as fed_membership},
        rooms::{
            create::{self, CreateRoom, Preset},
            membership::{self, Moderation},
        },
    },
};

/// Most resident servers taken from a remote alias's answer.
const MAX_ALIAS_SERVERS: usize = 10;

fn object(raw: &str, what: &str) -> Result<Map<String, JsonValue>> {
    match serde_json::from_str(raw) {
        Ok(JsonValue::Object(map)) => Ok(map),
        _ => Err(Error::bad_json(format!("{what} must be a JSON object"))),
    }
}

/// `POST /_matrix/client/v3/createRoom`
pub async fn create(
    services: State,
    req: Ruma<create_room::Request>,
) -> Result<create_room::Response> {
    let caller = req.caller()?.clone();
    if caller.guest {
        return Err(Error::new(ErrorKind::GuestAccessForbidden, "Guests cannot create rooms"));
    }
    let body = req.body;
    let alias = match &body.room_alias_name {
        Some(name) => Some(
            RoomAliasId::parse(format!("#{name}:{}", services.server_name()))
                .map_err(|e| Error::invalid_param(format!("Invalid room alias name: {e}")))?,
        ),
        None => None,
    };
    if let Some(alias) = &alias {
        let acting = caller.appservice.as_ref().map(|a| a.id());
        services.appservices.check_alias_free(alias, acting)?;
    }
    let preset = body.preset.as_ref().map(|preset| match preset.as_str() {
        "public_chat" => Ok(Preset::PublicChat),
        "trusted_private_chat" => Ok(Preset::TrustedPrivateChat),
        "private_chat" => Ok(Preset::PrivateChat),
        other => Err(Error::bad_json(format!("Unknown preset {other}"))),
    });
    let mut initial_state = Vec::with_capacity(body.initial_state.len());
    for raw in &body.initial_state {
        let event = object(raw.json().get(), "initial_state events")?;
        let kind = event
            .get("type")
            .and_then(|t| t.as_str())
            .ok_or_else(|| Error::bad_json("initial_state events need a type"))?;
        let state_key = event.get("state_key").and_then(|k| k.as_str()).unwrap_or_default();
        let content =
            event.get("content").cloned().unwrap_or_else(|| JsonValue::Object(Map::new()));
        initial_state.push((kind.to_owned(), state_key.to_owned(), content));
    }
    let request = CreateRoom {
        preset: preset.transpose()?,
        public: body.visibility == Visibility::Public,
        version: body.room_version,
        creation_content: body
            .creation_content
            .map(|c| object(c.json().get(), "creation_content"))
            .transpose()?,
        power_level_override: body
            .power_level_content_override
            .map(|c| object(c.json().get(), "power_level_content_override"))
            .transpose()?,
        initial_state,
        name: body.name,
        topic: body.topic,
        invite: body.invite,
        is_direct: body.is_direct,
        alias,
    };
    let room_id = create::create_room(&services, &caller.user_id, request).await?;
    Ok(create_room::Response::new(room_id))
}

/// `POST /_matrix/client/v3/rooms/{roomId}/join`
pub async fn join_by_id(
    services: State,
    req: Ruma<join_by_id::Request>,
) -> Result<join_by_id::Response> {
    let caller = req.caller()?.clone();
    let body = req.body;
    join_room(&services, &caller, &body.room_id, &[], body.reason.as_deref()).await?;
    Ok(join_by_id::Response::new(body.room_id))
}

/// `POST /_matrix/client/v3/join/{roomIdOrAlias}`
pub async fn join_by_id_or_alias(
    services: State,
    req: Ruma<join_by_id_or_alias::Request>,
) -> Result<join_by_id_or_alias::Response> {
    let caller = req.caller()?.clone();
    let body = req.body;
    let (room_id, servers) =
        resolve_with_servers(&services, &body.room_id_or_alias, body.via).await?;
    join_room(&services, &caller, &room_id, &servers, body.reason.as_deref()).await?;
    Ok(join_by_id_or_alias::Response::new(room_id))
}

/// The room a `roomIdOrAlias` of a join or knock names, with the servers to reach it through:
/// `via`, then those a remote alias's server names.
async fn resolve_with_servers(
    services: &State,
    room_id_or_alias: &RoomOrAliasId,
    mut via: Vec<OwnedServerName>,
) -> Result<(OwnedRoomId, Vec<OwnedServerName>)> {
    let room_id = match <&RoomAliasId>::try_from(room_id_or_alias) {
        Ok(alias) if alias.server_name() != services.server_name() => {
            let (room_id, alias_servers) = resolve_remote_alias(services, alias).await?;
            via.extend(alias_servers);
            room_id
        }
        Ok(alias) => {
            services.appservices.query_alias(services, alias).await?;
            resolve_room(services, room_id_or_alias)?
        }
        Err(_) => resolve_room(services, room_id_or_alias)?,
    };
    Ok((room_id, via))
}

/// Joins `caller` to `room_id`: here when this server has the room, else through `servers`
/// (and the room id's own server) over federation.
async fn join_room(
    services: &State,
    caller: &Caller,
    room_id: &RoomId,
    servers: &[OwnedServerName],
    reason: Option<&str>,
) -> Result<()> {
    let federated = services.federation.enabled();
    let elsewhere = federated && held_elsewhere(services, &caller.user_id, room_id)?;
    // Only a federating server's copy of a room can have stopped following it.
    let rejoin = federated && !elsewhere && !resident(services, room_id)?;
    if elsewhere || rejoin {
        if caller.guest {
            return Err(Error::new(
                ErrorKind::GuestAccessForbidden,
                "Guests cannot join rooms of other servers",
            ));
        }
        // The inviting server and those of the invite's stripped state come after `via`.
        let mut servers = fed_invite::outside_servers(services, &caller.user_id, room_id, servers)?;
        if rejoin {
            servers.extend(fed_edu::servers_in_room(services, room_id)?);
        }
        fed_membership::join_remote(
            services,
            &caller.user_id,
            room_id,
            &servers,
            reason,
            super::discovery::ROOM_VERSIONS,
        )
        .await?;
        return Ok(());
    }
    check_guest_join(services, caller, room_id)?;
    membership::join(services, room_id, &caller.user_id, reason, None).await?;
    Ok(())
}

/// Whether this server may join its users to `room_id`, a room it holds, by itself: one of its
/// users is joined there, or no other server's is (a room only this server has). Otherwise its
/// copy stopped following the room when its last member left, and a join goes through a
/// server still in it.
fn resident(services: &State, room_id: &RoomId) -> Result<bool> {
    let ours = services.server_name();
    let mut others = false;
    for (user, membership) in services.rooms.members(room_id)?.iter() {
        if membership == "join" {
            if user.server_name() == ours {
                return Ok(true);
            }
            others = true;
        }
    }
    Ok(!others)
}

/// Whether `room_id` is to be reached through other servers for `user_id`: not held here, or
/// held but only known to them through an invite or knock of another server.
fn held_elsewhere(services: &State, user_id: &UserId, room_id: &RoomId) -> Result<bool> {
    if services.rooms.room(room_id)?.is_none() {
        return Ok(true);
    }
    let outside = services.rooms.outside(user_id, room_id)?;
    Ok(outside.is_some_and(|record| record.membership != "leave"))
}

/// The room and resident servers an alias of another server names, asked of that server
/// (the local directory first, which may hold a copy).
async fn resolve_remote_alias(
    services: &State,
    alias: &RoomAliasId,
) -> Result<(OwnedRoomId, Vec<OwnedServerName>)> {
    if let Some(record) = services.directory.resolve(alias)? {
        return Ok((record.room_id, Vec::new()));
    }
    if !services.federation.enabled() {
        return Err(Error::not_found("Room alias not found"));
    }
    let request = get_room_information::v1::Request::new(alias.to_owned());
    let answer = services.federation.send(alias.server_name(), request).await.map_err(|err| {
        tracing::info!(%alias, %err, "remote alias lookup failed");
        Error::not_found("Room alias not found")
    })?;
    let mut servers = answer.servers;
    servers.truncate(MAX_ALIAS_SERVERS);
    servers.push(alias.server_name().to_owned());
    Ok((answer.room_id, servers))
}

/// `POST /_matrix/client/v3/knock/{roomIdOrAlias}`
pub async fn knock(
    services: State,
    req: Ruma<knock_room::Request>,
) -> Result<knock_room::Response> {
    let caller = req.caller()?.clone();
    let body = req.body;
    let (room_id, servers) =
        resolve_with_servers(&services, &body.room_id_or_alias, body.via).await?;
    let reason = body.reason.as_deref();
    if held_elsewhere(&services, &caller.user_id, &room_id)? && services.federation.enabled() {
        if caller.guest {
            return Err(Error::new(
                ErrorKind::GuestAccessForbidden,
                "Guests cannot knock on rooms of other servers",
            ));
        }
        let versions = super::discovery::ROOM_VERSIONS;
        fed_invite::knock_remote(&services, &caller.user_id, &room_id, &servers, reason, versions)
            .await?;
        return Ok(knock_room::Response::new(room_id));
    }
    membership::knock(&services, &room_id, &caller.user_id, reason).await?;
    Ok(knock_room::Response::new(room_id))
}

/// Guests may join only rooms whose `m.room.guest_access` is `can_join`.
fn check_guest_join(services: &State, caller: &Caller, room_id: &RoomId) -> Result<()> {
    if !caller.guest {
        return Ok(());
    }
    let state = services.rooms.current_state(room_id)?;
    let access = services.rooms.state_content(&state, "m.room.guest_access", "")?;
    if access.and_then(|a| a.get("guest_access").cloned()) != Some(serde_json::json!("can_join")) {
        return Err(Error::new(ErrorKind::GuestAccessForbidden, "This room is closed to guests"));
    }
    Ok(())
}

/// The room a `roomIdOrAlias` parameter names.
pub fn resolve_room(services: &State, room_id_or_alias: &RoomOrAliasId) -> Result<OwnedRoomId> {
    match <&RoomId>::try_from(room_id_or_alias) {
        Ok(room_id) => Ok(room_id.to_owned()),
        Err(alias) => {
            let record = services.directory.resolve(alias)?;
            Ok(record.ok_or_else(|| Error::not_found("Room alias not found"))?.room_id)
        }
    }
}

/// `POST /_matrix/client/v3/rooms/{roomId}/invite`
pub async fn invite(
    services: State,
    req: Ruma<invite_user::Request>,
) -> Result<invite_user::Response> {
    let caller = req.caller()?.clone();
    let invite_user::InvitationRecipient::UserId(recipient) = req.body.recipient else {
        return Err(Error::new(ErrorKind::ThreepidDenied, "Third-party invites are not supported"));
    };
    if recipient.user_id.server_name() == services.server_name() {
        services.appservices.query_user(&services, &recipient.user_id).await?;
    }
    membership::invite(
        &services,
        &req.body.room_id,
        &caller.user_id,
        &recipient.user_id,
        recipient.reason.as_deref(),
        false,
    )
    .await?;
    Ok(invite_user::Response::new())
}

/// `POST /_matrix/client/v3/rooms/{roomId}/leave`
pub async fn leave(
    services: State,
    req: Ruma<leave_room::Request>,
) -> Result<leave_room::Response> {
    let caller = req.caller()?.clone();
    let (room_id, reason) = (&req.body.room_id, req.body.reason.as_deref());
    if held_elsewhere(&services, &caller.user_id, room_id)?
        && services.rooms.outside(&caller.user_id, room_id)?.is_some()
    {
        // An invite or knock of a room held elsewhere: rejected there, and here in any case.
        let versions = super::discovery::ROOM_VERSIONS;
        fed_invite::leave_outside(&services, &caller.user_id, room_id, reason, versions).await?;
        return Ok(leave_room::Response::new());
    }
    membership::leave(&services, room_id, &caller.user_id, reason).await?;
    Ok(leave_room::Response::new())
}

async fn moderate(
    services: &State,
    caller: Option<&Caller>,
    (room_id, user_id, reason): (&RoomId, &UserId, Option<&str>),
    action: Moderation,
) -> Result<()> {
    let caller =
        caller.ok_or_else(|| Error::new(ErrorKind::MissingToken, "Missing access token"))?;
    membership::moderate(services, room_id, &caller.user_id, user_id, action, reason).await?;
    Ok(())
}

/// `POST /_matrix/client/v3/rooms/{roomId}/kick`
pub async fn kick(services: State, req: Ruma<kick_user::Request>) -> Result<kick_user::Response> {
    let b = &req.body;
    let target = (&*b.room_id, &*b.user_id, b.reason.as_deref());
    moderate(&services, req.caller.as_ref(), target, Moderation::Kick).await?;
    Ok(kick_user::Response::new())
}

/// `POST /_matrix/client/v3/rooms/{roomId}/ban`
pub async fn ban(services: State, req: Ruma<ban_user::Request>) -> Result<ban_user::Response> {
    let b = &req.body;
    let target = (&*b.room_id, &*b.user_id, b.reason.as_deref());
    moderate(&services, req.caller.as_ref(), target, Moderation::Ban).await?;
    Ok(ban_user::Response::new())
}

/// `POST /_matrix/client/v3/rooms/{roomId}/unban`
pub async fn unban(
    services: State,
    req: Ruma<unban_user::Request>,
) -> Result<unban_user::Response> {
    let b = &req.body;
    let target = (&*b.room_id, &*b.user_id, b.reason.as_deref());
    moderate(&services, req.caller.as_ref(), target, Moderation::Unban).await?;
    Ok(unban_user::Response::new())
}

/// `POST /_matrix/client/v3/rooms/{roomId}/forget`: only rooms one has left.
pub async fn forget(
    services: State,
    req: Ruma<forget_room::Request>,
) -> Result<forget_room::Response> {
    let caller = req.caller()?.clone();
    let outside = services.rooms.outside(&caller.user_id, &req.body.room_id)?;
    let membership = match outside {
        Some(record) => Some(record.membership),
        None => services.rooms.membership(&req.body.room_id, &caller.user_id)?,
    };
    match membership.as_deref() {
        Some("leave" | "ban") => {}
        Some(_) => {
            return Err(Error::new(ErrorKind::Unknown, "Leave the room before forgetting it"));
        }
        None => return Err(Error::not_found("Unknown room")),
    }
    services.rooms.forget(&req.body.room_id, &caller.user_id)?;
    Ok(forget_room::Response::new())
}

/// `GET /_matrix/client/v3/joined_rooms`
pub async fn joined(
    services: State,
    req: Ruma<joined_rooms::Request>,
) -> Result<joined_rooms::Response> {
    let caller = req.caller()?;
    Ok(joined_rooms::Response::new(services.rooms.rooms_of(&caller.user_id, "join")?))
}

/// `POST /_matrix/client/v3/rooms/{roomId}/upgrade`
pub async fn upgrade(
    services: State,
    req: Ruma<upgrade_room::Request>,
) -> Result<upgrade_room::Response> {
    let caller = req.caller()?.clone();
    let body = req.body;
    let new_room = crate::service::rooms::upgrade::upgrade_room(
        &services,
        &body.room_id,
        &caller.user_id,
        &body.new_version,
        body.additional_creators,
    )
    .await?;
    Ok(upgrade_room::Response::new(new_room))
}
