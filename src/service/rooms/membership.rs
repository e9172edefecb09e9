//! Membership changes: join, invite, leave, kick, ban, unban. Each is an `m.room.member` event
//! that the room's auth rules accept or refuse; reasons travel in the content.

use std::sync::Arc;

use ruma::{OwnedEventId, RoomId, RoomVersionId, UserId, events::room::join_rules::JoinRule};
use serde_json::{Value as JsonValue, json};

use super::{NewEvent, state::StateMap};
use crate::{
    error::{Error, Result},
    service::{Services, audit::Entry},
};

/// Longest reason accepted.
const MAX_REASON: usize = 1024;

/// The content of a membership event about `user_id`: the membership, the reason, and for a
/// local user joining, invited or knocking, the profile.
pub fn member_content(
    services: &Services,
    user_id: &UserId,
    membership: &str,
    reason: Option<&str>,
) -> Result<JsonValue> {
    let mut content = json!({ "membership": membership });
    if let Some(reason) = reason {
        if reason.len() > MAX_REASON {
            return Err(Error::invalid_param("Reason is too long"));
        }
        content["reason"] = json!(reason);
    }
    if matches!(membership, "join" | "invite" | "knock")
        && user_id.server_name() == services.server_name()
    {
        let profile = services.users.profile(user_id)?;
        for field in ["displayname", "avatar_url"] {
            if let Some(value) = profile.get(field) {
                content[field] = value.clone();
            }
        }
    }
    Ok(content)
}

async fn send_member(
    services: &Services,
    room_id: &RoomId,
    sender: &UserId,
    target: &UserId,
    content: JsonValue,
) -> Result<OwnedEventId> {
    send_member_audited(services, room_id, sender, target, content, Vec::new()).await
}

async fn send_member_audited(
    services: &Services,
    room_id: &RoomId,
    sender: &UserId,
    target: &UserId,
    content: JsonValue,
    audit: Vec<Entry>,
) -> Result<OwnedEventId> {
    let mut event = NewEvent::state("m.room.member", target.as_str(), content);
    event.audit = audit;
    services.rooms.append(services, room_id, sender, event, None).await
}

fn require_known_room(services: &Services, room_id: &RoomId) -> Result<()> {
    if services.rooms.room(room_id)?.is_none() {
        return Err(Error::not_found(
            "Unknown room (joining rooms on other servers needs federation)",
        ));
    }
    Ok(())
}

/// `user_id` joins `room_id` (allowed by join rules, an invite, or an earlier join).
pub async fn join(
    services: &Services,
    room_id: &RoomId,
    user_id: &UserId,
    reason: Option<&str>,
    third_party_signed: Option<JsonValue>,
) -> Result<OwnedEventId> {
    join_audited(services, room_id, user_id, reason, third_party_signed, Vec::new()).await
}

/// [`join`], with audit records written in the join event's batch (an admin's doing).
pub async fn join_audited(
    services: &Services,
    room_id: &RoomId,
    user_id: &UserId,
    reason: Option<&str>,
    third_party_signed: Option<JsonValue>,
    audit: Vec<Entry>,
) -> Result<OwnedEventId> {
    require_known_room(services, room_id)?;
    if services.admin_rooms.blocked(room_id)?.is_some() {
        return Err(Error::forbidden("This room has been blocked on this server"));
    }
    if third_party_signed.is_some() {
        return Err(Error::invalid_param("Third-party invites are not supported"));
    }
    let mut content = member_content(services, user_id, "join", reason)?;
    if let Some(via) = restricted_join_authoriser(services, room_id, user_id)? {
        content["join_authorised_via_users_server"] = json!(via);
    }
    send_member_audited(services, room_id, user_id, user_id, content, audit).await
}

/// A restricted room whose rules ask that a join of a user be vouched for.
struct Restricted {
    join_rule: JoinRule,
    state: Arc<StateMap>,
    version: RoomVersionId,
}

/// The restricted room `room_id` when `user_id`'s join of it needs a local member to vouch for
/// it: the join rule is restricted and the user is neither joined nor invited.
fn needs_vouching(
    services: &Services,
    room_id: &RoomId,
    user_id: &UserId,
) -> Result<Option<Restricted>> {
    let rooms = &services.rooms;
    let record = rooms.room(room_id)?.ok_or_else(|| Error::not_found("Unknown room"))?;
    // Most rooms are not restricted: their whole state is never loaded for a join.
    let join_rule = rooms.join_rule_at(record.current_state)?;
    if !matches!(join_rule, JoinRule::Restricted(_) | JoinRule::KnockRestricted(_)) {
        return Ok(None);
    }
    let state = rooms.states.load(record.current_state)?;
    if matches!(rooms.membership_in(&state, user_id)?.as_str(), "join" | "invite") {
        return Ok(None);
    }
    Ok(Some(Restricted { join_rule, state, version: record.version }))
}

/// For `restricted` rooms the joining user must be vouched for by a local member who can
/// invite, once the user belongs to one of the allowed rooms.
pub fn restricted_join_authoriser(
    services: &Services,
    room_id: &RoomId,
    user_id: &UserId,
) -> Result<Option<ruma::OwnedUserId>> {
    let rooms = &services.rooms;
    let Some(restricted) = needs_vouching(services, room_id, user_id)? else { return Ok(None) };
    if !rooms.in_allowed_room(&restricted.join_rule, user_id)? {
        return Ok(None);
    }
    let levels = rooms.power_levels(&restricted.state, &restricted.version)?;
    for (member, membership) in rooms.members(room_id)?.iter() {
        if membership != "join" || member.server_name() != services.server_name() {
            continue;
        }
        if levels.user_can_invite(member) {
            return Ok(Some(member.clone()));
        }
    }
    Ok(None)
}

/// Checks that this server may vouch for `user_id`'s join of `room_id` as local member `via`,
/// as a `send_join` naming `via` asks before we sign it. A join that needs no vouching (the
/// room is not restricted, or the user is already invited or joined) passes: the field then
/// plays no part in authorisation, but the event still needs our signature to be accepted.
/// Otherwise the user must be in one of the allowed rooms and `via` joined here with the power
/// to invite: a joining server cannot skip `make_join`'s checks by naming one of our members.
pub fn vouch_for_join(
    services: &Services,
    room_id: &RoomId,
    user_id: &UserId,
    via: &UserId,
) -> Result<()> {
    let rooms = &services.rooms;
    let Some(restricted) = needs_vouching(services, room_id, user_id)? else { return Ok(()) };
    if !rooms.in_allowed_room(&restricted.join_rule, user_id)? {
        return Err(Error::forbidden(
            "The user is in none of the rooms the join rules allow, as far as this server knows",
        ));
    }
    if via.server_name() != services.server_name()
        || rooms.membership_in(&restricted.state, via)? != "join"
        || !rooms.power_levels(&restricted.state, &restricted.version)?.user_can_invite(via)
    {
        return Err(Error::forbidden(
            "The authorising user is not a member of this server who may invite to the room",
        ));
    }
    Ok(())
}

/// `user_id` asks to be let in (rooms whose join rule is `knock` or `knock_restricted`).
pub async fn knock(
    services: &Services,
    room_id: &RoomId,
    user_id: &UserId,
    reason: Option<&str>,
) -> Result<OwnedEventId> {
    require_known_room(services, room_id)?;
    let content = member_content(services, user_id, "knock", reason)?;
    send_member(services, room_id, user_id, user_id, content).await
}

/// `sender` invites `target`.
pub async fn invite(
    services: &Services,
    room_id: &RoomId,
    sender: &UserId,
    target: &UserId,
    reason: Option<&str>,
    is_direct: bool,
) -> Result<OwnedEventId> {
    invite_audited(services, room_id, sender, target, reason, is_direct, Vec::new()).await
}

/// [`invite`], with audit records written in the invite event's batch (an admin's doing).
pub async fn invite_audited(
    services: &Services,
    room_id: &RoomId,
    sender: &UserId,
    target: &UserId,
    reason: Option<&str>,
    is_direct: bool,
    audit: Vec<Entry>,
) -> Result<OwnedEventId> {
    require_known_room(services, room_id)?;
    let remote = target.server_name() != services.server_name();
    if !remote && services.users.get(target)?.is_none_or(|u| u.deactivated) {
        return Err(Error::not_found("No such user"));
    }
    let mut content = member_content(services, target, "invite", reason)?;
    if is_direct {
        content["is_direct"] = json!(true);
    }
    if remote {
        // The invitee's server signs the invite before it is stored.
        let Some(countersigner) = services.rooms.registry().countersigning() else {
            return Err(Error::forbidden("Inviting users of other servers needs federation"));
        };
        let mut event = NewEvent::state("m.room.member", target.as_str(), content);
        event.audit = audit;
        let countersign =
            |wire, version| countersigner.countersign(services, room_id, version, wire);
        return services
            .rooms
            .append_countersigned(services, room_id, sender, event, countersign)
            .await;
    }
    send_member_audited(services, room_id, sender, target, content, audit).await
}

/// `user_id` leaves (or rejects an invite, or withdraws a knock).
pub async fn leave(
    services: &Services,
    room_id: &RoomId,
    user_id: &UserId,
    reason: Option<&str>,
) -> Result<OwnedEventId> {
    leave_audited(services, room_id, user_id, reason, Vec::new()).await
}

/// [`leave`], with audit records written in the leave event's batch (an off-boarding).
pub async fn leave_audited(
    services: &Services,
    room_id: &RoomId,
    user_id: &UserId,
    reason: Option<&str>,
    audit: Vec<Entry>,
) -> Result<OwnedEventId> {
    require_known_room(services, room_id)?;
    match services.rooms.membership(room_id, user_id)?.as_deref() {
        Some("join" | "invite" | "knock") => {}
        _ => return Err(Error::forbidden("You are not in this room")),
    }
    let content = member_content(services, user_id, "leave", reason)?;
    send_member_audited(services, room_id, user_id, user_id, content, audit).await
}

/// What a moderator does to another member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moderation {
    /// Remove a joined, invited or knocking member.
    Kick,
    /// Ban (from any membership).
    Ban,
    /// Lift a ban.
    Unban,
}

/// `sender` kicks, bans or unbans `target`; the room's power levels decide.
pub async fn moderate(
    services: &Services,
    room_id: &RoomId,
    sender: &UserId,
    target: &UserId,
    action: Moderation,
    reason: Option<&str>,
) -> Result<OwnedEventId> {
    require_known_room(services, room_id)?;
    let current = services.rooms.membership(room_id, target)?;
    let membership = match (action, current.as_deref()) {
        (Moderation::Kick, Some("join" | "invite" | "knock")) => "leave",
        (Moderation::Kick, _) => return Err(Error::forbidden("The user is not in this room")),
        (Moderation::Ban, _) => "ban",
        (Moderation::Unban, Some("ban")) => "leave",
        (Moderation::Unban, _) => return Err(Error::forbidden("The user is not banned")),
    };
    let content = member_content(services, target, membership, reason)?;
    send_member(services, room_id, sender, target, content).await
}
