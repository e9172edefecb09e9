//! One room's sliding-sync answer: everything on its first appearance on a connection (or
//! with a longer timeline than before), otherwise only what changed since it was last sent.

use std::{
    collections::HashSet,
    hash::{Hash, Hasher},
    sync::Arc,
};

use ruma::{OwnedMxcUri, RoomId, UserId};
use serde_json::Value as JsonValue;

use super::{
    connections::SentRoom,
    request::{Hero, Room},
};
use crate::{
    error::Result,
    service::{
        Services,
        push::{Counting, unread_counts},
        rooms::state::StateMap,
        sync::{Invited, Summary, Viewer, room_timeline, serve_events, stripped_state},
    },
};

/// Most state events sent for one room.
const MAX_STATE_EVENTS: usize = 5_000;

/// What is wanted of a room: merged over the lists and the subscription that name it.
#[derive(Clone, Debug, Default)]
pub struct Wanted {
    /// Timeline events wanted.
    pub timeline_limit: usize,
    /// `[type, state_key]` patterns.
    pub required_state: Vec<(String, String)>,
    /// Its stamp, when a list placed it.
    pub stamp: Option<u64>,
}

impl Wanted {
    /// Adds another list's or a subscription's wishes.
    pub fn merge(&mut self, limit: usize, required_state: &[(String, String)]) {
        self.timeline_limit = self.timeline_limit.max(limit);
        for pair in required_state {
            if !self.required_state.contains(pair) {
                self.required_state.push(pair.clone());
            }
        }
    }

    /// A digest of the required state patterns, to tell when they changed.
    pub fn digest(&self) -> u64 {
        let mut sorted: Vec<&(String, String)> = self.required_state.iter().collect();
        sorted.sort();
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        sorted.hash(&mut hasher);
        hasher.finish()
    }
}

/// Who is syncing, and up to where.
pub struct Syncer<'a> {
    /// The user.
    pub user_id: &'a UserId,
    /// Their device.
    pub device_id: &'a ruma::DeviceId,
    /// Their settings.
    pub viewer: &'a Viewer,
    /// The connection's previous answer's position (None on a new connection).
    pub since: Option<u64>,
    /// The position this answer covers.
    pub upto: u64,
}

/// The answer for `room_id`, or None when nothing changed since `sent`; with what to remember.
pub async fn build(
    services: &Services,
    syncer: &Syncer<'_>,
    room_id: &RoomId,
    wanted: &Wanted,
    sent: Option<SentRoom>,
    is_dm: bool,
) -> Result<Option<(Room, SentRoom)>> {
    let rooms = &services.rooms;
    let upto = syncer.upto;
    let user_id = syncer.user_id;
    let digest = wanted.digest();
    let limit = wanted.timeline_limit;
    // Quiet since last sent, with the same wishes: nothing to send.
    if let Some(sent) = sent
        && sent.timeline_limit >= limit
        && sent.required_state == digest
        && services.stream.rooms.quiet_since(room_id, sent.position)
    {
        return Ok(None);
    }
    let remember = SentRoom { position: upto, timeline_limit: limit, required_state: digest };
    // An invite, knock or rejection of a room held elsewhere: what its server told.
    if let Some(outside) = rooms.outside(user_id, room_id)? {
        if outside.position > upto || sent.is_some_and(|s| outside.position <= s.position) {
            return Ok(None);
        }
        let stamp = wanted.stamp.unwrap_or(outside.position);
        let mut room = Room { bump_stamp: Some(stamp), is_dm: Some(is_dm), ..Room::default() };
        room.initial = Some(true);
        if outside.membership == "leave" {
            room.timeline = outside.client_event(room_id).into_iter().collect();
        } else {
            let events = stripped_state(services, Invited::Outside(&outside), user_id)?;
            room.name = events
                .iter()
                .find(|e| e.get("type").and_then(JsonValue::as_str) == Some("m.room.name"))
                .and_then(|e| e.get("content")?.get("name")?.as_str().map(str::to_owned))
                .filter(|name| !name.is_empty());
            room.invite_state = Some(events);
        }
        return Ok(Some((room, remember)));
    }
    let Some(record) = rooms.room(room_id)? else { return Ok(None) };
    let state = rooms.states.load(record.current_state)?;
    let Some(member) = rooms.state_pdu_of(&state, "m.room.member", user_id.as_str())? else {
        return Ok(None);
    };
    let membership = member.membership().unwrap_or("leave");
    let stamp = wanted.stamp.unwrap_or(member.position);
    let mut room = Room { bump_stamp: Some(stamp), is_dm: Some(is_dm), ..Room::default() };
    describe(services, &state, &mut room)?;
    if matches!(membership, "invite" | "knock") {
        if sent.is_some_and(|s| member.position <= s.position) {
            return Ok(None);
        }
        room.initial = Some(true);
        let invited = Invited::Held(&state, &member);
        room.invite_state = Some(stripped_state(services, invited, user_id)?);
        return Ok(Some((room, remember)));
    }
    // A room left is shown up to the leave.
    let upper = if membership == "join" { upto } else { member.position.min(upto) };
    let expanded = sent.is_some_and(|s| s.timeline_limit < limit);
    let fresh = sent.is_none() || expanded;
    let after = match sent {
        Some(sent) if !fresh => sent.position,
        _ => 0,
    };
    let ignored = &syncer.viewer.ignored;
    let window = room_timeline(services, user_id, (None, limit), ignored, &record, (after, upper))?;
    let state_fresh = fresh || sent.is_some_and(|s| s.required_state != digest);
    // Changed state: compared with the state as last sent.
    let since_state = match sent {
        Some(sent) if !state_fresh => Some(rooms.state_at_position(&record, sent.position)?),
        _ => None,
    };
    let at_end =
        if upper == upto { state.clone() } else { rooms.state_at_position(&record, upper)? };
    room.required_state =
        required_state(services, user_id, wanted, &at_end, since_state.as_deref(), &window.events)?;
    let summary = Summary::of(services, room_id, &state, user_id)?;
    room.joined_count = Some(summary.joined);
    room.invited_count = Some(summary.invited);
    if room.name.is_none()
        && let Some(heroes) = &summary.heroes
    {
        room.heroes = Some(heroes_of(services, &state, heroes)?);
    }
    if membership == "join" {
        let counting = Counting { room_id, record: &record, state: &state, member: Some(&member) };
        let (notifications, highlights) =
            unread_counts(services, &syncer.viewer.rules, &counting, user_id, summary.joined, upto)
                .await?;
        room.notification_count = Some(notifications);
        room.highlight_count = Some(highlights);
    }
    let live_after = syncer.since.unwrap_or(u64::MAX);
    room.num_live = Some(window.events.iter().filter(|e| e.position > live_after).count() as u64);
    room.prev_batch = Some(window.prev_batch(upper));
    room.limited = window.limited;
    room.timeline = serve_events(services, user_id, syncer.device_id, &window.events)?;
    if fresh {
        room.initial = Some(true);
        room.expanded_timeline = expanded;
    }
    Ok(Some((room, remember)))
}

/// The room's name and avatar.
fn describe(services: &Services, state: &StateMap, room: &mut Room) -> Result<()> {
    let rooms = &services.rooms;
    room.name = rooms
        .state_content(state, "m.room.name", "")?
        .and_then(|c| c.get("name").and_then(JsonValue::as_str).map(str::to_owned))
        .filter(|name| !name.is_empty());
    if let Some(avatar) = rooms.state_content(state, "m.room.avatar", "")? {
        let url = avatar.get("url").and_then(JsonValue::as_str).filter(|u| !u.is_empty());
        room.avatar = Some(url.map(OwnedMxcUri::from));
    }
    Ok(())
}

/// The heroes with their names and avatars in the room.
fn heroes_of(
    services: &Services,
    state: &StateMap,
    heroes: &[ruma::OwnedUserId],
) -> Result<Vec<Hero>> {
    heroes
        .iter()
        .map(|user| {
            let content = services.rooms.state_content(state, "m.room.member", user.as_str())?;
            let field = |name: &str| {
                content
                    .as_ref()
                    .and_then(|c| c.get(name))
                    .and_then(JsonValue::as_str)
                    .map(str::to_owned)
            };
            Ok(Hero {
                user_id: user.clone(),
                displayname: field("displayname"),
                avatar_url: field("avatar_url"),
            })
        })
        .collect()
}

/// Whether the pattern `(kind, key)` asks for the state entry `(event_kind, event_key)`.
fn pattern_matches(
    (kind, key): (&str, &str),
    (event_kind, event_key): (&str, &str),
    user_id: &UserId,
    lazy: &HashSet<&str>,
) -> bool {
    let kind_ok = kind == "*" || kind == event_kind;
    let key_ok = match key {
        "*" => true,
        "$ME" => event_key == user_id.as_str(),
        "$LAZY" => event_kind == "m.room.member" && lazy.contains(event_key),
        key => key == event_key,
    };
    kind_ok && key_ok
}

/// The required state at the timeline's end: all that matches on a fresh send, otherwise
/// what differs from `since_state`; lazily loaded members are the timeline's senders'.
fn required_state(
    services: &Services,
    user_id: &UserId,
    wanted: &Wanted,
    at_end: &Arc<StateMap>,
    since_state: Option<&StateMap>,
    timeline: &[crate::service::rooms::pdu::StoredPdu],
) -> Result<Vec<JsonValue>> {
    if wanted.required_state.is_empty() {
        return Ok(Vec::new());
    }
    // The timeline's senders, and on a fresh send the user too.
    let me = since_state.is_none().then_some(user_id.as_str());
    let lazy: HashSet<&str> = timeline.iter().map(|e| e.sender()).chain(me).collect();
    let mut picked: Vec<u64> = Vec::new();
    let consider = |kind: &str, key: &str, short: u64, picked: &mut Vec<u64>| {
        let wanted_here = wanted
            .required_state
            .iter()
            .any(|(k, s)| pattern_matches((k, s), (kind, key), user_id, &lazy));
        if !wanted_here {
            return;
        }
        let unchanged = since_state
            .is_some_and(|since| since.get(&(kind.to_owned(), key.to_owned())) == Some(&short));
        // Lazily loaded senders go out with their events even when unchanged: the client may
        // not have been sent them before.
        let lazily = kind == "m.room.member" && lazy.contains(key);
        if !unchanged || lazily {
            picked.push(short);
        }
    };
    // Exact pairs and lazily loaded members are looked up; only `*` walks the state.
    let wildcard = wanted.required_state.iter().any(|(k, s)| k == "*" || s == "*");
    if wildcard {
        for ((kind, key), short) in at_end.iter() {
            consider(kind, key, *short, &mut picked);
        }
    } else {
        for (kind, key) in &wanted.required_state {
            let keys: Vec<&str> = match key.as_str() {
                "$ME" => vec![user_id.as_str()],
                "$LAZY" => lazy.iter().copied().collect(),
                key => vec![key],
            };
            for key in keys {
                if let Some(short) = at_end.get(&(kind.clone(), key.to_owned())) {
                    consider(kind, key, *short, &mut picked);
                }
            }
        }
    }
    picked.sort_unstable();
    picked.dedup();
    let mut events = Vec::with_capacity(picked.len().min(MAX_STATE_EVENTS));
    for short in picked.into_iter().take(MAX_STATE_EVENTS) {
        let Some(event) = services.rooms.stored_by_short_public(short)? else { continue };
        events.push(event);
    }
    services.rooms.client_events(&events)
}
