//! Joining, leaving and knocking across servers. As the resident server: the templates of
//! `make_join`, `make_leave` and `make_knock`, and the checks, signing and ingestion of the
//! events `send_join`, `send_leave` and `send_knock` bring, with the room's state for a join.
//! As the joining server: a local user's join of a room this server does not have, through
//! `make_join` and `send_join` on a resident server, the room then placed on the state it
//! vouches for.

use std::collections::BTreeSet;

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, EventId, OwnedEventId, OwnedServerName, OwnedUserId,
    RoomId, RoomVersionId, ServerName, UserId,
    api::federation::membership::{RawStrippedState, create_join_event, prepare_join_event},
    events::room::join_rules::JoinRule,
    room_version_rules::{EventIdFormatVersion, RoomVersionRules},
};
use serde_json::{
    json,
    value::{RawValue as RawJsonValue, to_raw_value},
};

use crate::{
    error::{Error, ErrorKind, Result},
    service::{
        Services,
        federation::invite::remote_error,
        now_ms, random_string,
        rooms::{
            Status,
            from_state::VouchedState,
            ingest::Outcome,
            membership::{member_content, restricted_join_authoriser, vouch_for_join},
            pdu::StoredPdu,
        },
    },
};

/// Most resident servers a join tries before giving up.
const MAX_JOIN_SERVERS: usize = 10;

/// The membership a `make_*`/`send_*` pair is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    /// `make_join`/`send_join`.
    Join,
    /// `make_leave`/`send_leave`.
    Leave,
    /// `make_knock`/`send_knock`.
    Knock,
}

impl Membership {
    /// The `membership` value of the event.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Join => "join",
            Self::Leave => "leave",
            Self::Knock => "knock",
        }
    }
}

pub(super) fn version_rules(version: &RoomVersionId) -> Result<RoomVersionRules> {
    version.rules().ok_or_else(|| {
        Error::new(ErrorKind::UnsupportedRoomVersion, format!("Unsupported room version {version}"))
    })
}

/// The room `room_id` as `origin` may see it: known here and not closed to it by the room's
/// server ACL.
fn check_origin_in_room(services: &Services, origin: &ServerName, room_id: &RoomId) -> Result<()> {
    if services.rooms.room(room_id)?.is_none() {
        return Err(Error::not_found("Unknown room"));
    }
    if !services.server_allowed_in_room(room_id, origin)? {
        return Err(Error::forbidden("The room's server ACL denies your server"));
    }
    Ok(())
}

/// The template of `make_join`, `make_leave` or `make_knock` for `user_id` of `origin`; `ver`
/// are the room versions the user's server supports (join and knock). Refuses what the room
/// would refuse, and names the authorising local user of a restricted join.
pub fn make_membership(
    services: &Services,
    origin: &ServerName,
    room_id: &RoomId,
    user_id: &UserId,
    membership: Membership,
    ver: Option<&[RoomVersionId]>,
) -> Result<(RoomVersionId, CanonicalJsonObject)> {
    if user_id.server_name() != origin {
        return Err(Error::forbidden("The user does not belong to the requesting server"));
    }
    check_origin_in_room(services, origin, room_id)?;
    let rooms = &services.rooms;
    let record = rooms.room(room_id)?.ok_or_else(|| Error::not_found("Unknown room"))?;
    if let Some(ver) = ver
        && !ver.contains(&record.version)
    {
        return Err(Error::new(
            ErrorKind::IncompatibleRoomVersion { room_version: record.version.to_string() },
            format!("The room's version {} is not supported by your server", record.version),
        ));
    }
    let current = rooms.membership(room_id, user_id)?;
    let current = current.as_deref();
    let mut content = json!({ "membership": membership.as_str() });
    match membership {
        Membership::Join => match current {
            Some("ban") => return Err(Error::forbidden("The user is banned from this room")),
            Some("join" | "invite") => {}
            _ => match rooms.join_rule_at(record.current_state)? {
                JoinRule::Public => {}
                JoinRule::Restricted(_) | JoinRule::KnockRestricted(_) => {
                    let Some(via) = restricted_join_authoriser(services, room_id, user_id)? else {
                        return Err(Error::forbidden(
                            "The user is in none of the rooms the join rules allow, or no \
                             member here can let them in",
                        ));
                    };
                    content["join_authorised_via_users_server"] = json!(via);
                }
                _ => return Err(Error::forbidden("The user is not invited to this room")),
            },
        },
        Membership::Leave => {
            if !matches!(current, Some("join" | "invite" | "knock")) {
                return Err(Error::forbidden("The user is not in this room"));
            }
        }
        Membership::Knock => {
            match current {
                Some("ban") => return Err(Error::forbidden("The user is banned from this room")),
                Some("join") => return Err(Error::forbidden("The user is already in the room")),
                _ => {}
            }
            if !version_rules(&record.version)?.authorization.knocking {
                return Err(Error::forbidden("The room's version does not allow knocking"));
            }
            if !matches!(
                rooms.join_rule_at(record.current_state)?,
                JoinRule::Knock | JoinRule::KnockRestricted(_)
            ) {
                return Err(Error::forbidden("The room does not accept knocks"));
            }
        }
    }
    rooms.member_template(room_id, user_id, content)
}

/// The id of the event `wire` in a room of `rules`.
pub(super) fn event_id_of(
    wire: &CanonicalJsonObject,
    rules: &RoomVersionRules,
) -> Result<OwnedEventId> {
    let id = match rules.event_id_format {
        EventIdFormatVersion::V1 => match wire.get("event_id") {
            Some(CanonicalJsonValue::String(id)) => id.clone(),
            _ => return Err(Error::bad_json("The event has no event_id")),
        },
        _ => {
            let hash = ruma::signatures::reference_hash(wire, rules)
                .map_err(|e| Error::bad_json(format!("Cannot hash the event: {e}")))?;
            format!("${hash}")
        }
    };
    OwnedEventId::try_from(id).map_err(|e| Error::bad_json(format!("Invalid event id: {e}")))
}

pub(super) fn str_field<'a>(wire: &'a CanonicalJsonObject, name: &str) -> Option<&'a str> {
    match wire.get(name) {
        Some(CanonicalJsonValue::String(value)) => Some(value),
        _ => None,
    }
}

pub(super) fn content_str<'a>(wire: &'a CanonicalJsonObject, name: &str) -> Option<&'a str> {
    match wire.get("content") {
        Some(CanonicalJsonValue::Object(content)) => str_field(content, name),
        _ => None,
    }
}

/// Takes the membership event of `send_join`, `send_leave` or `send_knock` (`event_id`, from
/// `origin`): checks it is the membership asked for of a user of `origin` about itself, signs a
/// restricted join one of our users authorised, and ingests it, passing it on to the room's
/// other servers. Returns the event as accepted (with our signature when we added one).
pub async fn send_membership(
    services: &Services,
    origin: &ServerName,
    room_id: &RoomId,
    event_id: &EventId,
    pdu: &RawJsonValue,
    membership: Membership,
) -> Result<CanonicalJsonObject> {
    check_origin_in_room(services, origin, room_id)?;
    let rooms = &services.rooms;
    let record = rooms.room(room_id)?.ok_or_else(|| Error::not_found("Unknown room"))?;
    let rules = version_rules(&record.version)?;
    let mut wire: CanonicalJsonObject = serde_json::from_str(pdu.get())
        .map_err(|e| Error::bad_json(format!("Invalid event: {e}")))?;
    if str_field(&wire, "type") != Some("m.room.member") {
        return Err(Error::bad_json("The event is not an m.room.member event"));
    }
    let sender = str_field(&wire, "sender")
        .and_then(|s| UserId::parse(s).ok())
        .ok_or_else(|| Error::bad_json("The event has no valid sender"))?;
    if sender.server_name() != origin {
        return Err(Error::forbidden(
            "The event's sender does not belong to the requesting server",
        ));
    }
    if str_field(&wire, "state_key") != Some(sender.as_str()) {
        return Err(Error::bad_json("The event's state_key is not its sender"));
    }
    if content_str(&wire, "membership") != Some(membership.as_str()) {
        return Err(Error::bad_json(format!(
            "The event's membership is not {}",
            membership.as_str()
        )));
    }
    if let Some(id) = str_field(&wire, "room_id")
        && id != room_id.as_str()
    {
        return Err(Error::bad_json("The event is of another room"));
    }
    if event_id_of(&wire, &rules)? != event_id {
        return Err(Error::bad_json("The event id does not match the event"));
    }
    // A restricted join naming one of our members is signed only once the join rules' allow
    // conditions are checked again here: the joining server may never have asked `make_join`.
    let via = match content_str(&wire, "join_authorised_via_users_server") {
        Some(via) if membership == Membership::Join => UserId::parse(via).ok(),
        _ => None,
    };
    if let Some(via) = via
        && via.server_name() == services.server_name()
    {
        vouch_for_join(services, room_id, &sender, &via)?;
        // Event signatures cover the redacted event; the hashes it carries stay the same.
        ruma::signatures::hash_and_sign_event(
            services.server_name().as_str(),
            services.keys.key_pair(),
            &mut wire,
            &rules.redaction,
        )
        .map_err(|e| Error::bad_json(format!("Cannot sign the event: {e}")))?;
    }
    // Accepted, the event goes on to the room's other servers, in its own batch.
    let relay = services.federation_sender.relay(event_id, origin);
    let outcomes = rooms.ingest(services, room_id, vec![wire.clone()], &services.federation).await;
    drop(relay);
    let outcomes = outcomes?;
    match outcomes.into_iter().next().map(|(_, outcome)| outcome) {
        Some(Outcome::Placed(Status::Accepted) | Outcome::Known(Status::Accepted)) => Ok(wire),
        Some(Outcome::Dropped(reason)) => {
            Err(Error::bad_json(format!("The event was refused: {reason}")))
        }
        Some(Outcome::Placed(status) | Outcome::Known(status)) => {
            Err(Error::forbidden(format!("The event was not accepted ({status:?})")))
        }
        None => Err(Error::internal("no outcome for an ingested event")),
    }
}

pub(super) fn raw(wire: &CanonicalJsonObject) -> Result<Box<RawJsonValue>> {
    to_raw_value(wire).map_err(Error::internal)
}

/// The `send_join` answer for the accepted join `event`: the full state before it, the auth
/// chain of that state, the event and the servers in the room.
pub fn join_answer(
    services: &Services,
    room_id: &RoomId,
    event_id: &EventId,
    event: &CanonicalJsonObject,
) -> Result<create_join_event::v2::RoomState> {
    let rooms = &services.rooms;
    let (state, chain) = rooms
        .state_events_before(event_id)?
        .ok_or_else(|| Error::internal("an accepted join has no state"))?;
    let wires = |events: &[StoredPdu]| -> Result<Vec<Box<RawJsonValue>>> {
        events.iter().map(|event| raw(&event.wire)).collect()
    };
    let mut servers = BTreeSet::new();
    for (member, membership) in rooms.members(room_id)?.iter() {
        if membership == "join" {
            servers.insert(member.server_name().to_owned());
        }
    }
    let mut answer = create_join_event::v2::RoomState::new();
    answer.state = wires(&state)?;
    answer.auth_chain = wires(&chain)?;
    answer.event = Some(raw(event)?);
    answer.servers_in_room = Some(servers.into_iter().map(|s| s.to_string()).collect());
    Ok(answer)
}

/// The stripped state a knock's or invite's answer carries (full PDUs, as the spec asks since
/// 1.16): the events a client shows of a room it is not in.
pub fn stripped_state(services: &Services, room_id: &RoomId) -> Result<Vec<RawStrippedState>> {
    let rooms = &services.rooms;
    let state = rooms.current_state(room_id)?;
    let mut out = Vec::new();
    for kind in [
        "m.room.create",
        "m.room.name",
        "m.room.avatar",
        "m.room.topic",
        "m.room.join_rules",
        "m.room.canonical_alias",
        "m.room.encryption",
    ] {
        if let Some(event) = rooms.state_event(&state, kind, "")? {
            out.push(RawStrippedState::Pdu(raw(&event.wire)?));
        }
    }
    Ok(out)
}

/// Joins local user `user_id` to `room_id`, which this server does not have, through the first
/// of `servers` that lets it in; `supported` are the room versions this server can hold.
pub async fn join_remote(
    services: &Services,
    user_id: &UserId,
    room_id: &RoomId,
    servers: &[OwnedServerName],
    reason: Option<&str>,
    supported: &[RoomVersionId],
) -> Result<OwnedEventId> {
    let join = |server: OwnedServerName| async move {
        join_through(services, &server, user_id, room_id, reason, supported).await
    };
    through_first(services, servers, MAX_JOIN_SERVERS, (room_id, "join"), join).await.map_err(
        |last| {
            last.unwrap_or_else(|| {
                Error::not_found("Unknown room, and no other server to join it through was given")
            })
        },
    )
}

/// Does `attempt` through each of `servers` in turn (this server and repeats left out, at most
/// `most` of them) until one succeeds; else the last failure (none when no server was asked).
/// `what` names the room and the attempt for the log.
pub(super) async fn through_first<T, F, Fut>(
    services: &Services,
    servers: &[OwnedServerName],
    most: usize,
    (room_id, what): (&RoomId, &str),
    mut attempt: F,
) -> std::result::Result<T, Option<Error>>
where
    F: FnMut(OwnedServerName) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut tried = BTreeSet::new();
    let mut last = None;
    for server in servers {
        if server == services.server_name() || !tried.insert(server) {
            continue;
        }
        if tried.len() > most {
            break;
        }
        match attempt(server.clone()).await {
            Ok(done) => return Ok(done),
            Err(err) => {
                tracing::info!(%server, %room_id, %err, "remote {what} failed");
                last = Some(err);
            }
        }
    }
    Err(last)
}

/// One attempt of [`join_remote`], through `server`.
async fn join_through(
    services: &Services,
    server: &ServerName,
    user_id: &UserId,
    room_id: &RoomId,
    reason: Option<&str>,
    supported: &[RoomVersionId],
) -> Result<OwnedEventId> {
    let mut request = prepare_join_event::v1::Request::new(room_id.to_owned(), user_id.to_owned());
    request.ver = supported.to_vec();
    let answer = services.federation.send(server, request).await.map_err(remote_error)?;
    let version = answer.room_version.unwrap_or(RoomVersionId::V1);
    let (wire, event_id) = sign_template(
        services,
        (server, room_id, user_id),
        (&version, supported),
        &answer.event,
        Membership::Join,
        reason,
    )?;
    let rules = version_rules(&version)?;
    let request =
        create_join_event::v2::Request::new(room_id.to_owned(), event_id.clone(), raw(&wire)?);
    let state = services.federation.send(server, request).await.map_err(remote_error)?.room_state;
    // The resident server's copy carries its signature when it authorised a restricted join.
    let pdu = match state.event.as_deref().map(|event| serde_json::from_str(event.get())) {
        Some(Ok(event)) if event_id_of(&event, &rules).is_ok_and(|id| id == event_id) => event,
        _ => wire,
    };
    let parse = |events: Vec<Box<RawJsonValue>>| -> Vec<CanonicalJsonObject> {
        events.iter().filter_map(|event| serde_json::from_str(event.get()).ok()).collect()
    };
    let vouched = VouchedState { state: parse(state.state), auth_chain: parse(state.auth_chain) };
    let (_, outcome) = services
        .rooms
        .ingest_with_state(services, room_id, &version, pdu, vouched, &services.federation)
        .await?;
    match outcome {
        Outcome::Placed(Status::Accepted) | Outcome::Known(Status::Accepted) => Ok(event_id),
        outcome => Err(Error::forbidden(format!("The join was not accepted here: {outcome:?}"))),
    }
}

/// Fills in and signs the `membership` event of local user `user_id` from the template
/// `server` sent for `room_id` of `version` (which must be one of `supported`); returns it
/// with its id.
pub(super) fn sign_template(
    services: &Services,
    (server, room_id, user_id): (&ServerName, &RoomId, &UserId),
    (version, supported): (&RoomVersionId, &[RoomVersionId]),
    template: &RawJsonValue,
    membership: Membership,
    reason: Option<&str>,
) -> Result<(CanonicalJsonObject, OwnedEventId)> {
    if !supported.contains(version) {
        return Err(Error::new(
            ErrorKind::UnsupportedRoomVersion,
            format!("The room's version {version} is not supported here"),
        ));
    }
    let rules = version_rules(version)?;
    let what = membership.as_str();
    let mut wire: CanonicalJsonObject = serde_json::from_str(template.get())
        .map_err(|e| Error::bad_json(format!("{server} sent an invalid {what} template: {e}")))?;
    let sender = OwnedUserId::from(user_id);
    if str_field(&wire, "type") != Some("m.room.member")
        || str_field(&wire, "state_key") != Some(sender.as_str())
        || str_field(&wire, "sender") != Some(sender.as_str())
        || str_field(&wire, "room_id").is_some_and(|id| id != room_id.as_str())
    {
        return Err(Error::bad_json(format!("{server} sent a {what} template for something else")));
    }
    let mut content = member_content(services, user_id, what, reason)?;
    if membership == Membership::Join
        && let Some(via) = content_str(&wire, "join_authorised_via_users_server")
    {
        content["join_authorised_via_users_server"] = json!(via);
    }
    let content = CanonicalJsonValue::try_from(content).map_err(Error::internal)?;
    wire.insert("content".into(), content);
    wire.insert("origin".into(), CanonicalJsonValue::String(services.server_name().to_string()));
    let ts = ruma::Int::new_saturating(now_ms() as i64);
    wire.insert("origin_server_ts".into(), CanonicalJsonValue::Integer(ts));
    for field in ["signatures", "hashes", "unsigned", "event_id"] {
        wire.remove(field);
    }
    if rules.event_id_format == EventIdFormatVersion::V1 {
        let id = format!("${}:{}", random_string(18), services.server_name());
        wire.insert("event_id".into(), CanonicalJsonValue::String(id));
    }
    ruma::signatures::hash_and_sign_event(
        services.server_name().as_str(),
        services.keys.key_pair(),
        &mut wire,
        &rules.redaction,
    )
    .map_err(|e| Error::bad_json(format!("Cannot sign the {what}: {e}")))?;
    let event_id = event_id_of(&wire, &rules)?;
    Ok((wire, event_id))
}
