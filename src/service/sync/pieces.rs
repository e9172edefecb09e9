//! The pieces of a sync answer that `/sync` v3 and sliding sync both assemble: a room's
//! timeline window, its summary (member counts and heroes), the stripped state shown to
//! invitees, the syncing user's settings, and the device-list changes of end-to-end
//! encryption. Each is a typed value; each endpoint only lays them out in its own shape.

use std::collections::{BTreeSet, HashSet};

use ruma::{OwnedUserId, RoomId, UserId, api::client::filter::RoomEventFilter};
use serde::Serialize;
use serde_json::{Value as JsonValue, json};

use crate::{
    error::Result,
    service::{
        Services, filters,
        rooms::{
            RoomRecord,
            outside::OutsideMembership,
            pdu::{Pdu, StoredPdu},
            state::StateMap,
        },
    },
};

/// Most events looked at per room (hidden or filtered ones included) in one sync.
pub const MAX_SCANNED: usize = 5_000;

/// State event types shown to invitees before they join.
pub const INVITE_STATE: &[&str] = &[
    "m.room.create",
    "m.room.join_rules",
    "m.room.name",
    "m.room.avatar",
    "m.room.canonical_alias",
    "m.room.encryption",
    "m.room.topic",
];

/// Most heroes named for a room without a name.
pub const MAX_HEROES: usize = 5;

/// What the syncing user's own settings make of events: their push rules and whom they ignore.
pub struct Viewer {
    /// Their push rules.
    pub rules: std::sync::Arc<crate::service::push::notifier::Rules>,
    /// Users whose events they do not want.
    pub ignored: HashSet<String>,
}

impl Viewer {
    /// The settings of `user_id`.
    pub fn of(services: &Services, user_id: &UserId) -> Result<Self> {
        Ok(Self {
            rules: services.notifier.ruleset(services, user_id)?,
            ignored: ignored_users(services, user_id)?,
        })
    }
}

/// Users whose events `user_id` does not want (`m.ignored_user_list`).
pub fn ignored_users(services: &Services, user_id: &UserId) -> Result<HashSet<String>> {
    let list = services.account_data.get(user_id, None, "m.ignored_user_list")?;
    Ok(list
        .as_ref()
        .and_then(|l| l.get("ignored_users"))
        .and_then(|u| u.as_object())
        .map(|users| users.keys().cloned().collect())
        .unwrap_or_default())
}

/// A room's timeline window for one sync.
pub struct Window {
    /// The visible, wanted events, oldest first.
    pub events: Vec<StoredPdu>,
    /// Whether earlier events in the range were left out.
    pub limited: bool,
    /// Whether the range held any event at all (shown or not).
    pub any: bool,
    /// The state before the range, when the scan reached its first event.
    pub state_before: Option<u64>,
}

impl Window {
    /// The token `/messages` pages back from, before the window's first event (or at `upto`
    /// when it is empty).
    pub fn prev_batch(&self, upto: u64) -> String {
        let position = self.events.first().map_or(upto, |e| e.position.saturating_sub(1));
        format!("s{position}")
    }
}

/// The newest `limit` events of a room in `(after, upto]` that `user_id` may see and wants
/// (`filter`, ignored senders), looking at no more than [`MAX_SCANNED`] events (past that the
/// window is reported as limited).
pub fn timeline(
    services: &Services,
    user_id: &UserId,
    (filter, limit): (Option<&RoomEventFilter>, usize),
    ignored: &HashSet<String>,
    record: &RoomRecord,
    (after, upto): (u64, u64),
) -> Result<Window> {
    let mut events = Vec::with_capacity(limit.min(64));
    let mut limited = false;
    let mut any = false;
    let mut state_before = None;
    for (scanned, event) in services.rooms.timeline_range(record, after, upto, false).enumerate() {
        let event = event?;
        any = true;
        if scanned == MAX_SCANNED {
            limited = true;
            break;
        }
        state_before = Some(event.room_state_before());
        if !services.rooms.can_see(user_id, &event)? {
            continue;
        }
        if filter.is_some_and(|f| !filters::matches(f, &event)) || ignored.contains(event.sender())
        {
            continue;
        }
        if events.len() == limit {
            limited = true;
            break;
        }
        events.push(event);
    }
    events.reverse();
    if limited {
        state_before = None;
    }
    Ok(Window { events, limited, any, state_before })
}

/// `events` as `user_id`'s device sees them: client format with bundled aggregations and its
/// own transaction ids.
pub fn serve_events(
    services: &Services,
    user_id: &UserId,
    device_id: &ruma::DeviceId,
    events: &[StoredPdu],
) -> Result<Vec<JsonValue>> {
    crate::service::relations::serve_all(services, user_id, Some(device_id.as_str()), events)
}

/// Member counts and, for a room without a name, the members to name it after.
pub struct Summary {
    /// Joined members.
    pub joined: u64,
    /// Invited members.
    pub invited: u64,
    /// Up to [`MAX_HEROES`] joined or invited members other than the syncing user, when the
    /// room has neither a name nor a canonical alias.
    pub heroes: Option<Vec<OwnedUserId>>,
}

impl Summary {
    /// The room's summary as `user_id` sees it.
    pub fn of(
        services: &Services,
        room_id: &RoomId,
        state: &StateMap,
        user_id: &UserId,
    ) -> Result<Self> {
        let members = services.rooms.members(room_id)?;
        let count = |membership: &str| members.iter().filter(|(_, m)| m == membership).count();
        // A name or alias that is empty names nothing: heroes then apply as if it were unset.
        let set = |kind: &str, field: &str| -> Result<bool> {
            Ok(services.rooms.state_content(state, kind, "")?.is_some_and(|content| {
                content.get(field).and_then(JsonValue::as_str).is_some_and(|v| !v.is_empty())
            }))
        };
        let named = set("m.room.name", "name")? || set("m.room.canonical_alias", "alias")?;
        let heroes = (!named).then(|| {
            members
                .iter()
                .filter(|(u, m)| u != user_id && (m == "join" || m == "invite"))
                .map(|(u, _)| u.clone())
                .take(MAX_HEROES)
                .collect()
        });
        Ok(Self { joined: count("join") as u64, invited: count("invite") as u64, heroes })
    }
}

/// Where an invitee or a knocker sees a room from.
#[derive(Clone, Copy)]
pub enum Invited<'a> {
    /// A room held here: its current state and the user's member event.
    Held(&'a StateMap, &'a Pdu),
    /// A room held elsewhere: what its server told (the invite or knock kept for the user).
    Outside(&'a OutsideMembership),
}

/// The stripped state shown to an invitee or a knocker: the room's description, the member
/// event of whoever sent the user's membership (the inviter) and the user's own.
pub fn stripped_state(
    services: &Services,
    invited: Invited<'_>,
    user_id: &UserId,
) -> Result<Vec<JsonValue>> {
    let (state, member) = match invited {
        Invited::Held(state, member) => (state, member),
        Invited::Outside(record) => {
            let own = |event: &&JsonValue| {
                event.get("type").and_then(JsonValue::as_str) == Some("m.room.member")
                    && event.get("state_key").and_then(JsonValue::as_str) == Some(user_id.as_str())
            };
            let mut events: Vec<JsonValue> =
                record.stripped.iter().filter(|e| !own(e)).cloned().collect();
            events.extend(record.stripped_event());
            return Ok(events);
        }
    };
    let rooms = &services.rooms;
    let mut events: Vec<JsonValue> = Vec::new();
    for kind in INVITE_STATE {
        if let Some(event) = rooms.state_event(state, kind, "")? {
            events.push(stripped(&event));
        }
    }
    if member.sender != user_id
        && let Some(sender) = rooms.state_event(state, "m.room.member", member.sender.as_str())?
    {
        events.push(stripped(&sender));
    }
    events.extend(
        rooms.state_event(state, "m.room.member", user_id.as_str())?.as_ref().map(stripped),
    );
    Ok(events)
}

/// A room held elsewhere that `user_id` left (an invite rejected, a knock withdrawn), as the
/// `leave` section shows it: the leave event, when the other server took it.
pub fn left_outside(record: &OutsideMembership, room_id: &RoomId) -> JsonValue {
    let events: Vec<JsonValue> = record.client_event(room_id).into_iter().collect();
    json!({
        "timeline": { "events": events, "limited": false, "prev_batch": format!("s{}", record.position) },
        "state": { "events": [] },
        "account_data": { "events": [] },
    })
}

/// The stripped form of a state event shown to invitees.
fn stripped(event: &StoredPdu) -> JsonValue {
    json!({
        "type": event.kind(),
        "state_key": event.state_key().unwrap_or_default(),
        "sender": event.sender(),
        "content": event.wire.get("content"),
    })
}

/// Whose device keys a user must fetch again (`changed`) or may forget (`left`).
#[derive(Default)]
pub struct DeviceLists {
    /// Users sharing a room whose keys changed, or who newly share one.
    pub changed: Vec<OwnedUserId>,
    /// Users who share no room any more.
    pub left: Vec<OwnedUserId>,
}

impl DeviceLists {
    /// Whether there is nothing to tell.
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.left.is_empty()
    }

    /// The device-list changes for `user_id` in `(since, upto]`: key changes of people
    /// sharing a room, people who newly share one (their devices are news), and people no
    /// longer sharing any.
    pub fn between(services: &Services, user_id: &UserId, since: u64, upto: u64) -> Result<Self> {
        let marks = &services.stream;
        let rooms = &services.rooms;
        // Nothing to tell when no keys changed and nobody joined or left anywhere.
        if marks.key_changes.quiet_since(&(), since)
            && marks.joins_and_leaves.quiet_since(&(), since)
        {
            return Ok(Self::default());
        }
        let mut changed = rooms.sharing_with(user_id, services.e2ee.changed_users(since, upto)?)?;
        let memberships = rooms.memberships_of(user_id)?;
        let mine: HashSet<&RoomId> = memberships.iter().map(|(r, _)| &**r).collect();
        let mut candidates = BTreeSet::new();
        for (room, user, joined) in rooms.joins_and_leaves(since, upto)? {
            if !mine.contains(&*room) {
                continue;
            }
            let members = || -> Result<Vec<OwnedUserId>> {
                let members = rooms.members(&room)?;
                Ok(members.iter().filter(|(_, m)| m == "join").map(|(u, _)| u.clone()).collect())
            };
            match (joined, user == user_id) {
                (true, false) => changed.push(user),
                (true, true) => changed.extend(members()?),
                (false, false) => {
                    candidates.insert(user);
                }
                (false, true) => candidates.extend(members()?),
            }
        }
        candidates.remove(user_id);
        let still = rooms.sharing_with(user_id, candidates.iter().map(|u| &**u))?;
        let still: HashSet<&UserId> = still.into_iter().collect();
        let left = candidates.iter().filter(|u| !still.contains(&***u)).cloned().collect();
        changed.sort();
        changed.dedup();
        Ok(Self { changed, left })
    }
}

/// An account data event (global or of a room) as sync sends it.
#[derive(Debug, Serialize)]
pub struct AccountDataEvent {
    /// The event type.
    #[serde(rename = "type")]
    pub kind: String,
    /// The document.
    pub content: JsonValue,
}

impl AccountDataEvent {
    /// The current document `kind` of `user_id` (in `room_id`, or global), if set.
    pub fn read(
        services: &Services,
        user_id: &UserId,
        room_id: Option<&RoomId>,
        kind: &str,
    ) -> Result<Option<Self>> {
        let content = services.account_data.get(user_id, room_id, kind)?;
        Ok(content.map(|content| Self { kind: kind.to_owned(), content }))
    }

    /// Adds the push rules to a first answer's global account data when the user never
    /// changed them: clients read their rules from it, and until changed they are the
    /// defaults.
    pub fn with_push_rules(
        services: &Services,
        user_id: &UserId,
        events: &mut Vec<Self>,
    ) -> Result<()> {
        let rules = crate::service::push::PUSH_RULES;
        if !events.iter().any(|e| e.kind == rules) {
            let content = crate::service::push::account_data(services, user_id)?;
            events.push(Self { kind: rules.to_owned(), content });
        }
        Ok(())
    }
}

/// The to-device messages of one answer.
pub struct ToDeviceBatch {
    /// The messages, oldest first.
    pub events: Vec<JsonValue>,
    /// The position they were delivered up to, which the next request acknowledges.
    pub delivered: u64,
}

impl ToDeviceBatch {
    /// Deletes the messages up to `acknowledged` and takes the next page up to `upto`.
    pub fn take(
        services: &Services,
        (user_id, device_id): (&UserId, &ruma::DeviceId),
        acknowledged: Option<u64>,
        upto: u64,
    ) -> Result<Self> {
        let (events, delivered) =
            services.e2ee.take_to_device(user_id, device_id, acknowledged, upto)?;
        Ok(Self { events, delivered })
    }
}

/// A device's one-time key counts and unused fallback key types.
#[derive(Debug, Serialize)]
pub struct KeyCounts {
    /// One-time keys left, by algorithm.
    pub device_one_time_keys_count: std::collections::BTreeMap<String, u64>,
    /// Algorithms with an unused fallback key.
    pub device_unused_fallback_key_types: Vec<String>,
}

impl KeyCounts {
    /// The counts of `device_id`.
    pub fn of(services: &Services, user_id: &UserId, device_id: &ruma::DeviceId) -> Result<Self> {
        Ok(Self {
            device_one_time_keys_count: services.e2ee.counts(user_id, device_id)?,
            device_unused_fallback_key_types: services
                .e2ee
                .unused_fallback_types(user_id, device_id)?,
        })
    }
}
