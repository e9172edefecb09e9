//! Invites and knocks across servers. As the invitee's server: the checks and countersigning
//! of `PUT /_matrix/federation/v2/invite`, the invite kept as an outside membership (the
//! room is held elsewhere) for the invitee's syncs; the rejection of such an invite and the
//! knock on a room held elsewhere, through `make_leave`/`send_leave` and
//! `make_knock`/`send_knock` on a server in the room; an invite withdrawn or a knock refused
//! there, when the room's server sends the leave. As the inviter's server: the
//! [`Countersign`] the event core calls before storing an invite of another server's user.

use std::{collections::BTreeSet, future::Future, pin::Pin};

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, OwnedServerName, OwnedUserId, RoomId,
    RoomVersionId, ServerName, UserId,
    api::federation::membership::{
        RawStrippedState, create_invite, create_knock_event, create_leave_event,
        prepare_knock_event, prepare_leave_event,
    },
};
use serde_json::{Value as JsonValue, json, value::RawValue as RawJsonValue};

use super::{
    SendError,
    keys::verify_signed_by,
    membership::{
        Membership, content_str, event_id_of, raw, sign_template, str_field, stripped_state,
        through_first, version_rules,
    },
};
use crate::{
    error::{Error, ErrorKind, Result},
    service::{
        Services,
        push::{self, gateway::Delivery, outside::OutsideInvite},
        rooms::{
            ingest::KeyLookup,
            listeners::Countersigner,
            outside::{MAX_SERVERS, MAX_STRIPPED_EVENTS, OutsideMembership},
        },
        sync::ignored_users,
    },
};

/// Most servers asked in turn to reject an invite or take a knock.
const MAX_TRIES: usize = 5;

/// Another server's failure as the client should see it: its refusal kept, an unreachable
/// server said so (502), never an internal error.
pub fn remote_error(err: SendError) -> Error {
    match &err {
        SendError::Remote { status: 403, .. } => Error::forbidden(err.to_string()),
        SendError::Remote { status: 404, .. } => Error::not_found(err.to_string()),
        SendError::Remote { errcode, .. }
            if errcode == "M_INCOMPATIBLE_ROOM_VERSION"
                || errcode == "M_UNSUPPORTED_ROOM_VERSION" =>
        {
            Error::new(ErrorKind::UnsupportedRoomVersion, err.to_string())
        }
        SendError::Remote { .. } => Error::new(ErrorKind::Unknown, err.to_string()),
        SendError::Unreachable { .. } | SendError::BadResponse { .. } => {
            Error::new(ErrorKind::ConnectionFailed, err.to_string())
        }
        SendError::Forbidden(_) | SendError::Disabled => Error::forbidden(err.to_string()),
    }
}

/// Has the invitee's server sign invites of its users (registered with the event core).
pub struct Countersign;

impl Countersigner for Countersign {
    fn countersign<'a>(
        &'a self,
        services: &'a Services,
        room_id: &'a RoomId,
        version: RoomVersionId,
        event: CanonicalJsonObject,
    ) -> Pin<Box<dyn Future<Output = Result<CanonicalJsonObject>> + Send + 'a>> {
        Box::pin(countersign(services, room_id, version, event))
    }
}

/// `PUT /_matrix/federation/v2/invite` to the invitee's server with the room's stripped
/// state; returns the event as it came back, once its signature is checked.
async fn countersign(
    services: &Services,
    room_id: &RoomId,
    version: RoomVersionId,
    event: CanonicalJsonObject,
) -> Result<CanonicalJsonObject> {
    let rules = version_rules(&version)?;
    let invitee = str_field(&event, "state_key")
        .and_then(|key| UserId::parse(key).ok())
        .ok_or_else(|| Error::internal("an invite without an invitee"))?;
    let server = invitee.server_name().to_owned();
    let event_id = event_id_of(&event, &rules)?;
    let mut invite_room_state = stripped_state(services, room_id)?;
    // The inviter's membership too, so the invitee's server can name them (as its pushes do).
    if let Some(sender) = str_field(&event, "sender") {
        let state = services.rooms.current_state(room_id)?;
        if let Some(member) = services.rooms.state_event(&state, "m.room.member", sender)? {
            invite_room_state.push(RawStrippedState::Pdu(raw(&member.wire)?));
        }
    }
    let request = create_invite::v2::Request::new(
        room_id.to_owned(),
        event_id.clone(),
        version,
        raw(&event)?,
        invite_room_state,
    );
    let answer = services.federation.send(&server, request).await.map_err(remote_error)?;
    let mut signed: CanonicalJsonObject = serde_json::from_str(answer.event.get())
        .map_err(|e| Error::new(ErrorKind::ConnectionFailed, format!("{server} sent: {e}")))?;
    signed.remove("unsigned");
    if event_id_of(&signed, &rules)? != event_id {
        return Err(Error::new(
            ErrorKind::ConnectionFailed,
            format!("{server} sent back another event"),
        ));
    }
    // Event signatures cover the redacted event.
    let redacted = ruma::canonical_json::redact(signed.clone(), &rules.redaction, None)
        .map_err(|e| Error::bad_json(format!("{server} sent an invalid event: {e}")))?;
    let keys = services.federation.server_keys(&server, &[], None).await?;
    verify_signed_by(&redacted, &server, &keys).map_err(|why| {
        Error::new(ErrorKind::ConnectionFailed, format!("{server} did not sign the invite: {why}"))
    })?;
    Ok(signed)
}

/// A received invite, as asked of this server by `origin`.
pub struct ReceivedInvite<'a> {
    /// The room.
    pub room_id: &'a RoomId,
    /// The event id `origin` named.
    pub event_id: &'a ruma::EventId,
    /// The room's version.
    pub room_version: &'a RoomVersionId,
    /// The invite event.
    pub event: &'a RawJsonValue,
    /// What `origin` tells of the room.
    pub invite_room_state: &'a [RawStrippedState],
}

/// Checks the invite `origin` sent of one of our users (`supported` are the room versions this
/// server can join), signs it, and keeps it for the invitee. Returns the signed event.
pub async fn receive_invite(
    services: &Services,
    origin: &ServerName,
    invite: ReceivedInvite<'_>,
    supported: &[RoomVersionId],
) -> Result<CanonicalJsonObject> {
    let ReceivedInvite { room_id, event_id, room_version, event, invite_room_state } = invite;
    if !supported.contains(room_version) {
        return Err(Error::new(
            ErrorKind::IncompatibleRoomVersion { room_version: room_version.to_string() },
            format!("Room version {room_version} is not supported here"),
        ));
    }
    let rules = version_rules(room_version)?;
    let mut wire: CanonicalJsonObject = serde_json::from_str(event.get())
        .map_err(|e| Error::bad_json(format!("Invalid event: {e}")))?;
    wire.remove("unsigned");
    if str_field(&wire, "type") != Some("m.room.member")
        || content_str(&wire, "membership") != Some("invite")
    {
        return Err(Error::bad_json("The event is not an invite"));
    }
    let invitee = str_field(&wire, "state_key")
        .and_then(|key| UserId::parse(key).ok())
        .ok_or_else(|| Error::bad_json("The invite has no valid state_key"))?;
    let sender = str_field(&wire, "sender")
        .and_then(|sender| UserId::parse(sender).ok())
        .ok_or_else(|| Error::bad_json("The invite has no valid sender"))?;
    if sender.server_name() != origin {
        return Err(Error::forbidden("The invite's sender does not belong to your server"));
    }
    if invitee.server_name() != services.server_name() {
        return Err(Error::invalid_param("The invitee is not a user of this server"));
    }
    if services.users.get(&invitee)?.is_none_or(|user| user.deactivated) {
        return Err(Error::not_found("No such user"));
    }
    if str_field(&wire, "room_id").is_some_and(|id| id != room_id.as_str()) {
        return Err(Error::bad_json("The invite is of another room"));
    }
    if event_id_of(&wire, &rules)? != event_id {
        return Err(Error::bad_json("The event id does not match the event"));
    }
    let servers = BTreeSet::from([origin.to_owned()]);
    let keys = services.federation.public_keys(&servers).await?;
    match ruma::signatures::verify_event(&keys, &wire, &rules) {
        Ok(ruma::signatures::Verified::All) => {}
        Ok(ruma::signatures::Verified::Signatures) => {
            return Err(Error::forbidden("The invite's content does not match its hash"));
        }
        Err(e) => {
            return Err(Error::forbidden(format!("The invite's signature does not verify: {e}")));
        }
    }
    if !services.server_allowed_in_room(room_id, origin)? {
        return Err(Error::forbidden("The room's server ACL denies your server"));
    }
    if ignored_users(services, &invitee)?.contains(sender.as_str()) {
        return Err(Error::forbidden("The invitee does not accept invites from the sender"));
    }
    if services.admin_rooms.blocked(room_id)?.is_some() {
        return Err(Error::forbidden("This room has been blocked on this server"));
    }
    ruma::signatures::hash_and_sign_event(
        services.server_name().as_str(),
        services.keys.key_pair(),
        &mut wire,
        &rules.redaction,
    )
    .map_err(|e| Error::bad_json(format!("Cannot sign the invite: {e}")))?;

    if super::edu::server_joined(services, services.server_name(), room_id)? {
        // The room is held and followed here: the invite takes the room's own path (it
        // also comes in the inviting server's transaction).
        let keys: &dyn KeyLookup = &services.federation;
        let ingested = services.rooms.ingest(services, room_id, vec![wire.clone()], keys).await;
        if let Err(err) = ingested {
            tracing::info!(%room_id, %err, "invite of a held room not placed yet");
        }
        return Ok(wire);
    }
    let stripped = client_stripped(invite_room_state);
    let pushes = invite_pushes(services, &invitee, (room_id, event_id), &wire, &stripped).await?;
    let mut servers = vec![origin.to_owned()];
    servers.extend(stripped_servers(&stripped));
    servers.extend(room_id.server_name().map(ToOwned::to_owned));
    let record = OutsideMembership {
        membership: "invite".to_owned(),
        position: 0,
        version: room_version.clone(),
        sender,
        servers,
        event: Some(JsonValue::from(CanonicalJsonValue::Object(wire.clone()))),
        event_id: Some(event_id.to_owned()),
        stripped,
    };
    // The pushes are queued in the write that keeps the invite: once acknowledged, neither
    // is lost.
    let queue = |batch: &mut _| Ok(services.gateway.queue(batch, pushes));
    let (_, queued) =
        services.rooms.set_outside_with(services, &invitee, room_id, record, queue)?;
    services.gateway.queued_more(queued);
    tracing::info!(%room_id, %invitee, %origin, "invite from another server");
    Ok(wire)
}

/// The pushes an invite of `invitee` to a room held elsewhere calls for; none when the same
/// invite is already kept (the inviting server sent it again).
async fn invite_pushes(
    services: &Services,
    invitee: &UserId,
    (room_id, event_id): (&RoomId, &ruma::EventId),
    wire: &CanonicalJsonObject,
    stripped: &[JsonValue],
) -> Result<Vec<Delivery>> {
    let kept = services.rooms.outside(invitee, room_id)?;
    if kept.is_some_and(|kept| {
        kept.membership == "invite" && kept.event_id.as_deref() == Some(event_id)
    }) {
        return Ok(Vec::new());
    }
    let invite = OutsideInvite { room_id, event_id, event: wire, stripped };
    push::outside::deliveries(services, invitee, &invite).await
}

/// Stripped state as clients are shown it (`type`, `state_key`, `sender`, `content`), from
/// what another server sent (full events or stripped ones); malformed entries are left out.
pub fn client_stripped(state: &[RawStrippedState]) -> Vec<JsonValue> {
    let mut out = Vec::new();
    for entry in state.iter().take(MAX_STRIPPED_EVENTS) {
        #[allow(deprecated)]
        let raw = match entry {
            RawStrippedState::Pdu(raw) => raw.get(),
            RawStrippedState::Stripped(raw) => raw.json().get(),
            _ => continue,
        };
        let Ok(JsonValue::Object(event)) = serde_json::from_str::<JsonValue>(raw) else {
            continue;
        };
        let (Some(kind), Some(state_key), Some(sender), Some(content)) = (
            event.get("type").and_then(JsonValue::as_str),
            event.get("state_key").and_then(JsonValue::as_str),
            event.get("sender").and_then(JsonValue::as_str),
            event.get("content").filter(|c| c.is_object()),
        ) else {
            continue;
        };
        out.push(json!({
            "type": kind,
            "state_key": state_key,
            "sender": sender,
            "content": content,
        }));
    }
    out
}

/// The servers of the senders of `stripped` (servers that were in the room).
fn stripped_servers(stripped: &[JsonValue]) -> Vec<OwnedServerName> {
    stripped
        .iter()
        .filter_map(|event| event.get("sender")?.as_str())
        .filter_map(|sender| UserId::parse(sender).ok())
        .map(|sender| sender.server_name().to_owned())
        .take(MAX_SERVERS)
        .collect()
}

/// The servers to ask about `room_id` for `user_id`'s outside membership, with `given` ones
/// first; this server left out.
pub fn outside_servers(
    services: &Services,
    user_id: &UserId,
    room_id: &RoomId,
    given: &[OwnedServerName],
) -> Result<Vec<OwnedServerName>> {
    let mut servers = given.to_vec();
    if let Some(record) = services.rooms.outside(user_id, room_id)? {
        servers.extend(record.servers);
    }
    servers.extend(room_id.server_name().map(ToOwned::to_owned));
    let mut seen = BTreeSet::new();
    servers.retain(|server| server != services.server_name() && seen.insert(server.clone()));
    Ok(servers)
}

/// Rejects `user_id`'s invite to (or withdraws their knock on) `room_id`, a room held
/// elsewhere: a leave through the servers in the room when one answers; locally in any case,
/// so the client is rid of it. The room then shows as left once.
pub async fn leave_outside(
    services: &Services,
    user_id: &UserId,
    room_id: &RoomId,
    reason: Option<&str>,
    supported: &[RoomVersionId],
) -> Result<()> {
    let Some(mut record) = services.rooms.outside(user_id, room_id)? else {
        return Err(Error::forbidden("You are not in this room"));
    };
    if record.membership == "leave" {
        return Err(Error::forbidden("You are not in this room"));
    }
    let servers = outside_servers(services, user_id, room_id, &[])?;
    let leave = |server: OwnedServerName| async move {
        leave_through(services, &server, user_id, room_id, reason, supported).await
    };
    let event = through_first(services, &servers, MAX_TRIES, (room_id, "leave"), leave).await.ok();
    if event.is_none() {
        tracing::info!(%room_id, %user_id, "no server took the leave: rejected here only");
    }
    record.membership = "leave".to_owned();
    record.sender = user_id.to_owned();
    record.event_id = event.as_ref().map(|(_, event_id)| event_id.clone());
    record.event = event.map(|(wire, _)| JsonValue::from(CanonicalJsonValue::Object(wire)));
    services.rooms.set_outside(services, user_id, room_id, record)?;
    Ok(())
}

/// One attempt of [`leave_outside`], through `server`: the leave event as sent.
async fn leave_through(
    services: &Services,
    server: &ServerName,
    user_id: &UserId,
    room_id: &RoomId,
    reason: Option<&str>,
    supported: &[RoomVersionId],
) -> Result<(CanonicalJsonObject, OwnedEventId)> {
    let request = prepare_leave_event::v1::Request::new(room_id.to_owned(), user_id.to_owned());
    let answer = services.federation.send(server, request).await.map_err(remote_error)?;
    let version = answer.room_version.unwrap_or(RoomVersionId::V1);
    let (wire, event_id) = sign_template(
        services,
        (server, room_id, user_id),
        (&version, supported),
        &answer.event,
        Membership::Leave,
        reason,
    )?;
    let request =
        create_leave_event::v2::Request::new(room_id.to_owned(), event_id.clone(), raw(&wire)?);
    services.federation.send(server, request).await.map_err(remote_error)?;
    Ok((wire, event_id))
}

/// Knocks for local user `user_id` on `room_id`, held elsewhere, through the first of
/// `servers` that takes it; the knock is kept with the room's stripped state for the user's
/// syncs. Returns the knock's id.
pub async fn knock_remote(
    services: &Services,
    user_id: &UserId,
    room_id: &RoomId,
    servers: &[OwnedServerName],
    reason: Option<&str>,
    supported: &[RoomVersionId],
) -> Result<OwnedEventId> {
    let servers = outside_servers(services, user_id, room_id, servers)?;
    let knock = |server: OwnedServerName| async move {
        knock_through(services, &server, user_id, room_id, reason, supported).await
    };
    through_first(services, &servers, MAX_TRIES, (room_id, "knock"), knock).await.map_err(|last| {
        last.unwrap_or_else(|| {
            Error::not_found("Unknown room, and no other server to knock through was given")
        })
    })
}

/// One attempt of [`knock_remote`], through `server`.
async fn knock_through(
    services: &Services,
    server: &ServerName,
    user_id: &UserId,
    room_id: &RoomId,
    reason: Option<&str>,
    supported: &[RoomVersionId],
) -> Result<OwnedEventId> {
    let mut request = prepare_knock_event::v1::Request::new(room_id.to_owned(), user_id.to_owned());
    request.ver = supported.to_vec();
    let answer = services.federation.send(server, request).await.map_err(remote_error)?;
    let version = answer.room_version;
    let (wire, event_id) = sign_template(
        services,
        (server, room_id, user_id),
        (&version, supported),
        &answer.event,
        Membership::Knock,
        reason,
    )?;
    let request =
        create_knock_event::v1::Request::new(room_id.to_owned(), event_id.clone(), raw(&wire)?);
    let answer = services.federation.send(server, request).await.map_err(remote_error)?;
    let stripped = client_stripped(&answer.knock_room_state);
    let mut servers = vec![server.to_owned()];
    servers.extend(stripped_servers(&stripped));
    let record = OutsideMembership {
        membership: "knock".to_owned(),
        position: 0,
        version,
        sender: OwnedUserId::from(user_id),
        servers,
        event: Some(JsonValue::from(CanonicalJsonValue::Object(wire))),
        event_id: Some(event_id.clone()),
        stripped,
    };
    services.rooms.set_outside(services, user_id, room_id, record)?;
    Ok(event_id)
}

/// Takes a leave or ban of a local user that `origin` sent in a transaction for `room_id`, a
/// room held elsewhere where the user is invited or knocking (the invite withdrawn, the knock
/// refused): the invite or knock then ends as left. Returns whether the event was taken.
pub async fn retracted(
    services: &Services,
    origin: &ServerName,
    room_id: &RoomId,
    wire: &CanonicalJsonObject,
) -> Result<bool> {
    let Some(user_id) = str_field(wire, "state_key").and_then(|key| UserId::parse(key).ok()) else {
        return Ok(false);
    };
    let sender = str_field(wire, "sender").and_then(|sender| UserId::parse(sender).ok());
    let from_origin = sender.as_ref().is_some_and(|sender| sender.server_name() == origin);
    if str_field(wire, "type") != Some("m.room.member")
        || !matches!(content_str(wire, "membership"), Some("leave" | "ban"))
        || user_id.server_name() != services.server_name()
        || !from_origin
    {
        return Ok(false);
    }
    let Some(mut record) = services.rooms.outside(&user_id, room_id)? else { return Ok(false) };
    // Only a server the invite came from or the knock went through speaks for the room here.
    if record.membership == "leave" || !record.servers.iter().any(|server| server == origin) {
        return Ok(false);
    }
    let rules = version_rules(&record.version)?;
    let mut wire = wire.clone();
    wire.remove("unsigned");
    let keys = services.federation.public_keys(&BTreeSet::from([origin.to_owned()])).await?;
    if ruma::signatures::verify_event(&keys, &wire, &rules).is_err() {
        return Ok(false);
    }
    record.membership = "leave".to_owned();
    record.event_id = Some(event_id_of(&wire, &rules)?);
    record.sender = sender.map_or(record.sender, |sender| sender);
    record.event = Some(JsonValue::from(CanonicalJsonValue::Object(wire)));
    services.rooms.set_outside(services, &user_id, room_id, record)?;
    tracing::info!(%room_id, %user_id, %origin, "invite or knock ended by the room's server");
    Ok(true)
}
