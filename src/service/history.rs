//! Reading room history: pages of the timeline (`/messages`) and an event with its neighbours
//! (`/context`), only what history visibility and the filter let the reader see.

use std::collections::HashSet;

use ruma::{EventId, RoomId, UserId, api::client::filter::RoomEventFilter};

use super::{
    Services, filters,
    rooms::{RoomRecord, pdu::StoredPdu},
};
use crate::error::{Error, Result};

/// Largest page.
pub const MAX_PAGE: usize = 1000;
/// Most events looked at (hidden or filtered ones included) for one page.
const MAX_SCAN: usize = 20_000;

/// A page of history.
pub struct Page {
    /// The events, in the direction of reading.
    pub chunk: Vec<StoredPdu>,
    /// Where the next page starts, unless the range is exhausted.
    pub end: Option<u64>,
    /// With lazy loading, the member events of the page's senders.
    pub members: Vec<StoredPdu>,
}

/// An event and the events around it.
pub struct Context {
    /// The event itself.
    pub event: StoredPdu,
    /// Events before it, newest first.
    pub before: Vec<StoredPdu>,
    /// Events after it, oldest first.
    pub after: Vec<StoredPdu>,
    /// The state at the last event returned (members cut to senders with lazy loading).
    pub state: Vec<StoredPdu>,
    /// Token before the first event returned.
    pub start: u64,
    /// Token after the last event returned.
    pub end: u64,
}

fn readable_room(services: &Services, room_id: &RoomId, user_id: &UserId) -> Result<RoomRecord> {
    services.rooms.readable_state(room_id, user_id)?;
    services.rooms.room(room_id)?.ok_or_else(|| Error::forbidden("Unknown room"))
}

/// The events of `room_id` in `(after, upto]`, read forwards or backwards, at most `limit`.
pub fn page(
    services: &Services,
    user_id: &UserId,
    room_id: &RoomId,
    (after, upto): (u64, u64),
    forward: bool,
    limit: usize,
    filter: &RoomEventFilter,
) -> Result<Page> {
    let rooms = &services.rooms;
    let record = readable_room(services, room_id, user_id)?;
    let limit = limit.clamp(1, MAX_PAGE);
    let mut chunk = Vec::with_capacity(limit);
    let mut last_scanned = None;
    let mut exhausted = true;
    for (scanned, event) in rooms.timeline_range(&record, after, upto, forward).enumerate() {
        let event = event?;
        if chunk.len() == limit || scanned == MAX_SCAN {
            exhausted = false;
            break;
        }
        last_scanned = Some(event.position);
        if filters::matches(filter, &event) && rooms.can_see(user_id, &event)? {
            chunk.push(event);
        }
    }
    let end = match (exhausted, last_scanned) {
        (false, Some(position)) => {
            Some(if forward { position } else { position.saturating_sub(1) })
        }
        _ => None,
    };
    let members = lazy_members(services, filter, &chunk)?;
    Ok(Page { chunk, end, members })
}

/// With lazy loading, the member events of `chunk`'s senders (as of each sender's first event).
fn lazy_members(
    services: &Services,
    filter: &RoomEventFilter,
    chunk: &[StoredPdu],
) -> Result<Vec<StoredPdu>> {
    if filter.lazy_load_options.is_disabled() {
        return Ok(Vec::new());
    }
    let mut seen = HashSet::new();
    let mut members = Vec::new();
    for event in chunk {
        if !seen.insert(event.sender()) {
            continue;
        }
        let state = event.room_state_after();
        if let Some(member) = services.rooms.states.get(state, "m.room.member", event.sender())? {
            members.extend(services.rooms.stored_by_short_public(member)?);
        }
    }
    Ok(members)
}

/// `event_id` with up to `limit` visible events around it, split before and after.
pub fn context(
    services: &Services,
    user_id: &UserId,
    room_id: &RoomId,
    event_id: &EventId,
    limit: usize,
    filter: &RoomEventFilter,
) -> Result<Context> {
    let rooms = &services.rooms;
    let not_found = || Error::not_found("Event not found");
    let event = rooms.stored(event_id)?.filter(|e| e.room_id == room_id).ok_or_else(not_found)?;
    if !rooms.can_see(user_id, &event)? {
        return Err(not_found());
    }
    let record = rooms.room(room_id)?.ok_or_else(not_found)?;
    let limit = limit.min(MAX_PAGE);
    let visible = |e: &StoredPdu| -> Result<bool> {
        Ok(filters::matches(filter, e) && rooms.can_see(user_id, e)?)
    };
    let collect = |range: (u64, u64), forward: bool, wanted: usize| -> Result<Vec<StoredPdu>> {
        let mut found = Vec::new();
        for e in rooms.timeline_range(&record, range.0, range.1, forward).take(MAX_SCAN) {
            let e = e?;
            if found.len() == wanted {
                break;
            }
            if visible(&e)? {
                found.push(e);
            }
        }
        Ok(found)
    };
    let before = collect((0, event.position.saturating_sub(1)), false, limit / 2)?;
    let after = collect((event.position, services.stream.current()), true, limit - limit / 2)?;
    let start = before.last().map_or(event.position, |e| e.position).saturating_sub(1);
    let end = after.last().map_or(event.position, |e| e.position);
    let state_map = rooms.states.load(after.last().unwrap_or(&event).room_state_after())?;
    let lazy = !filter.lazy_load_options.is_disabled();
    let senders: HashSet<&str> =
        before.iter().chain(&after).chain([&event]).map(StoredPdu::sender).collect();
    let mut state = Vec::new();
    for stored in rooms.state_events(&state_map)? {
        let hidden_member = lazy
            && stored.kind() == "m.room.member"
            && !stored.state_key().is_some_and(|k| senders.contains(k));
        if !hidden_member {
            state.push(stored);
        }
    }
    Ok(Context { event, before, after, state, start, end })
}
