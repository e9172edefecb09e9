//! `/sync` (v3): everything a user's device must learn between two stream positions, built
//! from prefix scans of each room's timeline and the per-user change logs; rooms and logs the
//! stream's marks show unchanged since the token are passed over unread.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
};

use ruma::{
    RoomId, UserId,
    api::client::filter::{FilterDefinition, RoomEventFilter},
};
use serde::Serialize;
use serde_json::{Map, Value as JsonValue, json, value::RawValue};

mod pieces;

pub use pieces::{
    AccountDataEvent, DeviceLists, Invited, KeyCounts, MAX_HEROES, Summary, ToDeviceBatch, Viewer,
    Window, ignored_users, left_outside, serve_events, stripped_state, timeline as room_timeline,
};

use super::{
    Services, filters,
    rooms::{RoomRecord, pdu::StoredPdu, state::StateMap},
};
use crate::error::{Error, Result};

/// Timeline events per room when the filter does not say.
const DEFAULT_TIMELINE_LIMIT: usize = 10;
/// Most timeline events per room in one response.
const MAX_TIMELINE_LIMIT: usize = 500;

/// One sync request, parsed.
pub struct SyncRequest<'a> {
    /// The user.
    pub user_id: &'a UserId,
    /// The device (for transaction ids, to-device messages and key counts).
    pub device_id: &'a ruma::DeviceId,
    /// The position of the `since` token, if any.
    pub since: Option<u64>,
    /// The typing serial of the `since` token, if any.
    pub since_typing: Option<u64>,
    /// How far the `since` token's to-device messages were delivered, if it says.
    pub since_to_device: Option<u64>,
    /// Send the full state of every room.
    pub full_state: bool,
    /// The filter in force.
    pub filter: &'a FilterDefinition,
}

/// A sync response and whether it carries anything (long-polls wait while it does not).
pub struct SyncResponse {
    /// The response body, already serialized: each room is turned into text as soon as it is
    /// built, so a sync over many rooms never holds all their JSON trees at once.
    pub body: Box<RawValue>,
    /// Whether anything changed.
    pub has_changes: bool,
}

/// Builds the sync response for changes in `(since, upto]`.
pub async fn sync(services: &Services, req: &SyncRequest<'_>, upto: u64) -> Result<SyncResponse> {
    let typing = services.ephemeral.typing_serial();
    let rooms = &services.rooms;
    let since = req.since.unwrap_or(0);
    let initial = req.since.is_none();
    let room_filter = &req.filter.room;
    let room_allowed = |room_id: &RoomId| {
        !room_filter.not_rooms.iter().any(|r| r == room_id)
            && room_filter.rooms.as_ref().is_none_or(|rooms| rooms.iter().any(|r| r == room_id))
    };
    let mut has_changes = false;
    // Only what changed after `since` is read: quiet rooms are passed over unread.
    let incremental = !initial && !req.full_state;
    let marks = &services.stream;

    let viewer = Viewer::of(services, req.user_id)?;
    // Account data changed in the window, by room ("" for global), read once.
    let mut account_changes: HashMap<String, Vec<String>> = HashMap::new();
    if !marks.account_data.quiet_since(req.user_id, since) {
        for (room, kind) in services.account_data.changed(req.user_id, since, upto)? {
            account_changes.entry(room).or_default().push(kind);
        }
    }
    let (mut join, mut invite, mut leave, mut knock) =
        (Rooms::new(), Rooms::new(), Rooms::new(), Rooms::new());
    let memberships = rooms.memberships_of(req.user_id)?;
    for (room_id, listed) in memberships.iter() {
        if !room_allowed(room_id) {
            continue;
        }
        // Every change a room can show (events, memberships included, and receipts) marks it;
        // typing and room account data are looked up apart.
        if incremental
            && marks.rooms.quiet_since(room_id, since)
            && !account_changes.contains_key(room_id.as_str())
            && !services.ephemeral.typing_changed(room_id, req.since_typing)
        {
            continue;
        }
        // An invite, knock or rejection of a room held elsewhere.
        if listed != "join"
            && let Some(outside) = rooms.outside(req.user_id, room_id)?
        {
            // A change written after `upto` waits for the next sync.
            if outside.position > upto || (!initial && outside.position <= since) {
                continue;
            }
            let events = || stripped_state(services, Invited::Outside(&outside), req.user_id);
            match outside.membership.as_str() {
                "invite" if !viewer.ignored.contains(outside.sender.as_str()) => {
                    let room = json!({ "invite_state": { "events": events()? } });
                    invite.insert(room_id.to_string(), to_raw_value(&room)?);
                }
                "knock" => {
                    let room = json!({ "knock_state": { "events": events()? } });
                    knock.insert(room_id.to_string(), to_raw_value(&room)?);
                }
                "leave" if !initial || room_filter.include_leave => {
                    let room = left_outside(&outside, room_id);
                    leave.insert(room_id.to_string(), to_raw_value(&room)?);
                }
                _ => {}
            }
            continue;
        }
        let Some(record) = rooms.room(room_id)? else { continue };
        let state = rooms.states.load(record.current_state)?;
        let Some(member) = rooms.state_pdu_of(&state, "m.room.member", req.user_id.as_str())?
        else {
            continue;
        };
        // Membership as of `upto`: a change written after it waits for the next sync, and the
        // room's events up to `upto` are still delivered under the membership before it.
        let racing = member.position > upto;
        let membership = if racing {
            rooms.membership_in(&*rooms.states.load(member.state_before)?, req.user_id)?
        } else {
            rooms.membership_in(&state, req.user_id)?
        };
        match membership.as_str() {
            "join" => {
                let changes = account_changes.get(room_id.as_str()).map_or(&[][..], Vec::as_slice);
                let window = (since, upto, initial);
                let room_now = RoomNow { room_id, record: &record, state: &state, member: &member };
                if let Some(room) =
                    joined_room(services, req, &viewer, room_now, changes, window).await?
                {
                    join.insert(room_id.to_string(), to_raw_value(&room)?);
                }
            }
            "invite" if !racing => {
                let stale = !initial && member.position <= since;
                if stale || viewer.ignored.contains(member.sender.as_str()) {
                    continue;
                }
                let events = stripped_state(services, Invited::Held(&state, &member), req.user_id)?;
                let room = json!({ "invite_state": { "events": events } });
                invite.insert(room_id.to_string(), to_raw_value(&room)?);
            }
            // A knock waiting for an answer: the room as a knocker may see it.
            "knock" if !racing => {
                if !initial && member.position <= since {
                    continue;
                }
                let events = stripped_state(services, Invited::Held(&state, &member), req.user_id)?;
                let room = json!({ "knock_state": { "events": events } });
                knock.insert(room_id.to_string(), to_raw_value(&room)?);
            }
            "leave" | "ban" if !racing && (!initial || room_filter.include_leave) => {
                let own = rooms.state_event(&state, "m.room.member", req.user_id.as_str())?;
                let Some(member) = own else { continue };
                let window = (since, upto, initial);
                if let Some(room) = left_room(services, req, &viewer, &record, &member, window)? {
                    leave.insert(room_id.to_string(), to_raw_value(&room)?);
                }
            }
            _ => {}
        }
    }
    has_changes |= !(join.is_empty() && invite.is_empty() && leave.is_empty() && knock.is_empty());

    let mut global_account_data = Vec::new();
    for kind in account_changes.get("").into_iter().flatten() {
        global_account_data.extend(AccountDataEvent::read(services, req.user_id, None, kind)?);
    }
    if initial {
        AccountDataEvent::with_push_rules(services, req.user_id, &mut global_account_data)?;
    }
    has_changes |= !global_account_data.is_empty();

    let presence = if services.config.presence.enabled {
        services.presence.events_for(
            services,
            req.user_id,
            if initial { None } else { req.since_typing },
        )?
    } else {
        Vec::new()
    };
    has_changes |= !presence.is_empty();
    // End-to-end encryption: to-device messages (those up to `since` were received), key
    // changes of people sharing a room, and this device's key counts.
    let acknowledged = req.since_to_device.or(req.since);
    let device = (req.user_id, req.device_id);
    let to_device = ToDeviceBatch::take(services, device, acknowledged, upto)?;
    let device_lists = if initial {
        DeviceLists::default()
    } else {
        DeviceLists::between(services, req.user_id, since, upto)?
    };
    has_changes |= !to_device.events.is_empty() || !device_lists.is_empty();
    let counts = KeyCounts::of(services, req.user_id, req.device_id)?;
    let rest = json!({
        "next_batch": format!("s{upto}_{typing}_{}", to_device.delivered),
        "account_data": { "events": global_account_data },
        "presence": { "events": presence },
        "to_device": { "events": to_device.events },
        "device_lists": { "changed": device_lists.changed, "left": device_lists.left },
        "device_one_time_keys_count": counts.device_one_time_keys_count,
        "device_unused_fallback_key_types": counts.device_unused_fallback_key_types,
    });
    let body = Body { rest, rooms: RoomSections { join, invite, leave, knock } };
    Ok(SyncResponse { body: to_raw_value(&body)?, has_changes })
}

/// Room id to the room's serialized section.
type Rooms = BTreeMap<String, Box<RawValue>>;

/// The `rooms` part of a sync response.
#[derive(Serialize)]
struct RoomSections {
    join: Rooms,
    invite: Rooms,
    leave: Rooms,
    knock: Rooms,
}

/// A sync response: its rooms apart, everything else as one object.
#[derive(Serialize)]
struct Body {
    rooms: RoomSections,
    #[serde(flatten)]
    rest: JsonValue,
}

fn to_raw_value<T: Serialize>(value: &T) -> Result<Box<RawValue>> {
    serde_json::value::to_raw_value(value).map_err(Error::internal)
}

fn timeline_limit(filter: &RoomEventFilter) -> usize {
    filter
        .limit
        .map_or(DEFAULT_TIMELINE_LIMIT, |l| u64::from(l) as usize)
        .clamp(1, MAX_TIMELINE_LIMIT)
}

/// The newest visible, wanted timeline events of a room in `(after, upto]` under the filter.
fn timeline(
    services: &Services,
    req: &SyncRequest<'_>,
    ignored: &HashSet<String>,
    record: &RoomRecord,
    after: u64,
    upto: u64,
) -> Result<Window> {
    let filter = &req.filter.room.timeline;
    let wanted = (Some(filter), timeline_limit(filter));
    pieces::timeline(services, req.user_id, wanted, ignored, record, (after, upto))
}

/// State events to send with a timeline: all of `at_start` (initial, full or newly joined) or
/// what changed since `since_state` (gappy), minus what the timeline carries itself, with
/// lazily loaded members cut down to the timeline's senders and `heroes`.
fn state_section(
    services: &Services,
    req: &SyncRequest<'_>,
    at_start: &StateMap,
    since_state: Since<'_>,
    timeline: &[StoredPdu],
) -> Result<Vec<JsonValue>> {
    let in_timeline: HashSet<&str> = timeline.iter().map(|e| e.event_id.as_str()).collect();
    let lazy = !req.filter.room.state.lazy_load_options.is_disabled();
    let senders = lazy_senders(req, timeline);
    let mut events = Vec::new();
    // The state did not change since the token: only lazily loaded senders are sent.
    if let Since::Same = since_state {
        if lazy {
            for sender in senders {
                let Some(short) = at_start.get(&("m.room.member".to_owned(), sender.to_owned()))
                else {
                    continue;
                };
                let Some(event) = services.rooms.stored_by_short_public(*short)? else { continue };
                if !in_timeline.contains(event.event_id.as_str())
                    && filters::matches(&req.filter.room.state, &event)
                {
                    events.push(event);
                }
            }
        }
        return services.rooms.client_events(&events);
    }
    for ((kind, key), short) in at_start {
        let is_member = kind == "m.room.member";
        if lazy && is_member && !senders.contains(key.as_str()) {
            continue;
        }
        // Senders' member events go out with lazy loading even when unchanged, so the client
        // can always show who wrote what.
        let unchanged = matches!(since_state, Since::Was(since) if since.get(&(kind.clone(), key.clone())) == Some(short));
        if unchanged && !(lazy && is_member) {
            continue;
        }
        let Some(event) = services.rooms.stored_by_short_public(*short)? else { continue };
        if in_timeline.contains(event.event_id.as_str())
            || !filters::matches(&req.filter.room.state, &event)
        {
            continue;
        }
        events.push(event);
    }
    services.rooms.client_events(&events)
}

/// The users whose member events lazy loading sends: the timeline's senders and the syncer.
fn lazy_senders<'a>(req: &'a SyncRequest<'_>, timeline: &'a [StoredPdu]) -> HashSet<&'a str> {
    timeline.iter().map(StoredPdu::sender).chain([req.user_id.as_str()]).collect()
}

/// The member events at the timeline's start of `heroes` that the lazily loaded state section
/// does not already carry (as senders', or in the timeline itself).
fn hero_members(
    services: &Services,
    req: &SyncRequest<'_>,
    at_start: &StateMap,
    timeline: &[StoredPdu],
    heroes: &[&str],
) -> Result<Vec<JsonValue>> {
    let senders = lazy_senders(req, timeline);
    let mut events = Vec::new();
    for hero in heroes.iter().filter(|hero| !senders.contains(**hero)) {
        let Some(short) = at_start.get(&("m.room.member".to_owned(), (*hero).to_owned())) else {
            continue;
        };
        let Some(event) = services.rooms.stored_by_short_public(*short)? else { continue };
        if !timeline.iter().any(|e| e.event_id == event.event_id)
            && filters::matches(&req.filter.room.state, &event)
        {
            events.push(event);
        }
    }
    services.rooms.client_events(&events)
}

/// The room state at the sync token, as the state section compares with it.
#[derive(Clone, Copy)]
enum Since<'a> {
    /// No token (initial, full-state or newly joined): the whole state goes out.
    Fresh,
    /// The same state as at the timeline's start: nothing changed in between.
    Same,
    /// A different state.
    Was(&'a StateMap),
}

/// A room as the sync loop already loaded it: record, current state and the syncer's member
/// event.
struct RoomNow<'a> {
    room_id: &'a RoomId,
    record: &'a RoomRecord,
    state: &'a StateMap,
    member: &'a crate::service::rooms::pdu::Pdu,
}

async fn joined_room(
    services: &Services,
    req: &SyncRequest<'_>,
    viewer: &Viewer,
    room: RoomNow<'_>,
    account_changes: &[String],
    (since, upto, initial): (u64, u64, bool),
) -> Result<Option<JsonValue>> {
    let rooms = &services.rooms;
    let RoomNow { room_id, record, state: current, member } = room;
    let newly_joined = !initial && member.position > since;
    let Window { events, limited, any, state_before } =
        timeline(services, req, &viewer.ignored, record, since, upto)?;
    let mut account_data = Vec::new();
    for kind in account_changes {
        account_data.extend(AccountDataEvent::read(services, req.user_id, Some(room_id), kind)?);
    }
    let fresh = initial || newly_joined || req.full_state;
    let mut ephemeral = Vec::new();
    let receipts_after = if fresh { None } else { Some(since) };
    ephemeral.extend(services.ephemeral.receipts(room_id, req.user_id, receipts_after, upto)?);
    let typing_after = if fresh { None } else { req.since_typing };
    ephemeral.extend(services.ephemeral.typing(room_id, typing_after));
    if !fresh && !any && account_data.is_empty() && ephemeral.is_empty() {
        return Ok(None);
    }

    let at_start_id = match events.first() {
        Some(first) => Some(first.room_state_before()),
        None => rooms.state_id_at_position(record, upto)?,
    };
    // Incremental syncs send what changed since the token that the timeline does not carry
    // (a gap, or events the filter or the ignore list kept out).
    let since_id = match (fresh, state_before) {
        (true, _) => None,
        (false, Some(id)) => Some(Some(id)),
        (false, None) => Some(rooms.state_id_at_position(record, since)?),
    };
    let load = |id: Option<u64>| id.map_or_else(|| Ok(Arc::default()), |id| rooms.states.load(id));
    let at_start = load(at_start_id)?;
    let was = match since_id {
        Some(id) if id != at_start_id => Some(load(id)?),
        _ => None,
    };
    let since_state = match (since_id, &was) {
        (None, _) => Since::Fresh,
        (Some(_), Some(was)) => Since::Was(was),
        (Some(_), None) => Since::Same,
    };
    let lazy = !req.filter.room.state.lazy_load_options.is_disabled();
    let mut state = state_section(services, req, &at_start, since_state, &events)?;
    // Lazily loaded member events alone are no news (and the heroes' add only more of them).
    let state_news = state.iter().any(|e| !(lazy && e["type"] == "m.room.member"));
    if !fresh && events.is_empty() && !state_news && account_data.is_empty() && ephemeral.is_empty()
    {
        return Ok(None);
    }
    let summary = summary(services, room_id, current, req.user_id)?;
    // With lazy loading the heroes' member events must come along, so clients can name the
    // room: sent when the state changed or the timeline carries state (the heroes may have
    // changed); an unchanged state was sent before.
    let heroes_may_change =
        !matches!(since_state, Since::Same) || events.iter().any(|e| e.state_key().is_some());
    if lazy
        && heroes_may_change
        && let Some(heroes) = summary.get("m.heroes").and_then(JsonValue::as_array)
    {
        let heroes: Vec<&str> = heroes.iter().filter_map(JsonValue::as_str).collect();
        state.extend(hero_members(services, req, &at_start, &events, &heroes)?);
    }
    let prev_batch = events.first().map_or(upto, |e| e.position.saturating_sub(1));
    let timeline = serve_events(services, req.user_id, req.device_id, &events)?;

    let joined = summary["m.joined_member_count"].as_u64().unwrap_or_default();
    let by_thread = req.filter.room.timeline.unread_thread_notifications;
    let counting = super::push::Counting { room_id, record, state: current, member: Some(member) };
    let mut thread_counts = Map::new();
    let (notifications, highlights) = if by_thread {
        let counts = super::push::unread_thread_counts(
            services,
            &viewer.rules,
            &counting,
            req.user_id,
            joined,
            upto,
        )
        .await?;
        for (root, (n, h)) in counts.threads {
            thread_counts.insert(root, json!({ "notification_count": n, "highlight_count": h }));
        }
        counts.main
    } else {
        super::push::unread_counts(services, &viewer.rules, &counting, req.user_id, joined, upto)
            .await?
    };
    let mut room = json!({
        "timeline": { "events": timeline, "limited": limited, "prev_batch": format!("s{prev_batch}") },
        "state": { "events": state },
        "account_data": { "events": account_data },
        "ephemeral": { "events": ephemeral },
        "summary": summary,
        "unread_notifications": { "notification_count": notifications, "highlight_count": highlights },
    });
    if by_thread {
        room["unread_thread_notifications"] = JsonValue::Object(thread_counts);
    }
    Ok(Some(room))
}

fn left_room(
    services: &Services,
    req: &SyncRequest<'_>,
    viewer: &Viewer,
    record: &RoomRecord,
    left: &StoredPdu,
    (since, upto, initial): (u64, u64, bool),
) -> Result<Option<JsonValue>> {
    if (!initial && left.position <= since) || left.position > upto {
        return Ok(None);
    }
    let Window { events, limited, .. } =
        timeline(services, req, &viewer.ignored, record, since, left.position)?;
    let prev_batch = events.first().map_or(left.position, |e| e.position.saturating_sub(1));
    let timeline = serve_events(services, req.user_id, req.device_id, &events)?;
    Ok(Some(json!({
        "timeline": { "events": timeline, "limited": limited, "prev_batch": format!("s{prev_batch}") },
        "state": { "events": [] },
        "account_data": { "events": [] },
    })))
}

/// Heroes and member counts, so clients can name rooms without a name.
fn summary(
    services: &Services,
    room_id: &RoomId,
    state: &StateMap,
    user_id: &UserId,
) -> Result<JsonValue> {
    let summary = Summary::of(services, room_id, state, user_id)?;
    let mut json = BTreeMap::from([
        ("m.joined_member_count", json!(summary.joined)),
        ("m.invited_member_count", json!(summary.invited)),
    ]);
    if let Some(heroes) = summary.heroes {
        json.insert("m.heroes", json!(heroes));
    }
    Ok(json!(json))
}
