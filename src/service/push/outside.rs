//! Pushes for invites that other servers send of local users to rooms held elsewhere. Such an
//! invite is kept as an outside membership, not as an event of a room held here, so the
//! notifier never sees it: it is judged here with the invitee's rules as the notifier judges a
//! local invite, and its pushes join the gateway queues in the write that keeps the invite.

use ruma::{CanonicalJsonObject, EventId, RoomId, UInt, UserId, push::PushConditionRoomCtx};
use serde_json::Value as JsonValue;

use super::{
    gateway::Delivery,
    notifier::{Member, NotificationRecord, flattened_wire, judge_invitee},
};
use crate::{
    error::Result,
    service::{Services, now_ms},
};

/// An invite of a local user to a room held elsewhere, as another server sent it.
pub struct OutsideInvite<'a> {
    /// The room.
    pub room_id: &'a RoomId,
    /// The invite's id.
    pub event_id: &'a EventId,
    /// The invite event as signed.
    pub event: &'a CanonicalJsonObject,
    /// The room's stripped state as clients are shown it.
    pub stripped: &'a [JsonValue],
}

/// The pushes `invite` calls for: one per pusher of `invitee` when their rules say it
/// notifies (by default `.m.rule.invite_for_me`), none otherwise.
pub async fn deliveries(
    services: &Services,
    invitee: &UserId,
    invite: &OutsideInvite<'_>,
) -> Result<Vec<Delivery>> {
    let pushers = services.pushers.of(invitee);
    if pushers.is_empty() {
        return Ok(Vec::new());
    }
    let profile = services.users.profile(invitee)?;
    let display_name = profile
        .get("displayname")
        .and_then(JsonValue::as_str)
        .map_or_else(|| invitee.localpart().to_owned(), str::to_owned);
    // The room's power levels are not known here: rules that ask for them (`@room`) do not
    // apply, and none of the defaults for invites does.
    let context = PushConditionRoomCtx::new(
        invite.room_id.to_owned(),
        UInt::from(joined_count(invite.stripped)),
        invitee.to_owned(),
        display_name,
    );
    let rules = services.notifier.ruleset(services, invitee)?;
    let member = Member::new(services, invitee.to_owned(), context, rules);
    let flat = flattened_wire(invite.event_id, invite.room_id, invite.event)?;
    let Some((_, actions)) = judge_invitee(&member, &flat).await else { return Ok(Vec::new()) };
    let record = NotificationRecord {
        room_id: invite.room_id.to_owned(),
        short: 0,
        legacy_event_id: None,
        ts: now_ms(),
        actions: actions.to_vec(),
    };
    Ok(member
        .pushers
        .iter()
        .map(|pusher| Delivery::new(invitee, pusher, &record, invite.event_id))
        .collect())
}

/// The room's member count for push rules, as far as `stripped` tells: stripped state carries
/// no counts and seldom any membership but the inviter's, so it is the joined members it
/// shows, and at least one (the inviter, who must be joined to invite).
fn joined_count(stripped: &[JsonValue]) -> u32 {
    let joined = stripped
        .iter()
        .filter(|event| {
            event["type"] == "m.room.member" && event["content"]["membership"] == "join"
        })
        .count();
    u32::try_from(joined).unwrap_or(u32::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn the_member_count_is_the_joined_members_shown_and_at_least_one() {
        let member = |user: &str, membership: &str| {
            json!({ "type": "m.room.member", "state_key": user, "sender": user,
                    "content": { "membership": membership } })
        };
        let name = json!({ "type": "m.room.name", "state_key": "", "content": { "name": "x" } });
        assert_eq!(super::joined_count(std::slice::from_ref(&name)), 1);
        let shown =
            [name, member("@a:x", "join"), member("@b:x", "join"), member("@c:y", "invite")];
        assert_eq!(super::joined_count(&shown), 2);
    }
}
