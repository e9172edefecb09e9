//! Reading the relations index page by page: `/relations` (optionally recursive) and
//! `/threads`, only what history visibility lets the reader see.
//!
//! Tokens are stream positions written `s<position>` (a bare number is accepted too): reading
//! backwards from `t` gives positions up to `t`, forwards from `t` positions after `t`.

use ruma::{EventId, RoomId, UserId};

use super::Relation;
use crate::{
    error::{Error, Result},
    service::{Services, rooms::pdu::StoredPdu},
};

/// Page size when the client does not say.
const DEFAULT_LIMIT: usize = 50;
/// Largest page.
pub const MAX_LIMIT: usize = 100;
/// Most index entries looked at for one page (hidden or filtered ones included).
const MAX_SCAN: usize = 2_000;
/// How deep `recurse` follows relations of relations.
pub const RECURSION_DEPTH: u64 = 3;

/// What a `/relations` request asks for.
pub struct RelationsQuery<'a> {
    /// Only relations of this type.
    pub rel_type: Option<&'a str>,
    /// Only relating events of this type.
    pub event_type: Option<&'a str>,
    /// Where to start.
    pub from: Option<&'a str>,
    /// Where to stop.
    pub to: Option<&'a str>,
    /// Oldest first (`dir=f`) rather than newest first.
    pub forward: bool,
    /// Page size.
    pub limit: Option<usize>,
    /// Include events relating to the relating events, down to [`RECURSION_DEPTH`].
    pub recurse: bool,
}

/// A page of relating events or thread roots.
pub struct Page {
    /// The events, in reading order.
    pub chunk: Vec<StoredPdu>,
    /// The token for the next page, unless this was the last.
    pub next_batch: Option<String>,
}

/// Parses a pagination token.
pub fn parse_token(token: &str) -> Result<u64> {
    token
        .strip_prefix('s')
        .unwrap_or(token)
        .split('_')
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| Error::invalid_param("Invalid pagination token"))
}

/// The events relating to `event_id` in `room_id` that `user_id` may see.
pub fn relations(
    services: &Services,
    user_id: &UserId,
    room_id: &RoomId,
    event_id: &EventId,
    query: &RelationsQuery<'_>,
) -> Result<Page> {
    let rooms = &services.rooms;
    let not_found = || Error::not_found("Event not found");
    let parent = rooms.stored(event_id)?.filter(|e| e.room_id == room_id).ok_or_else(not_found)?;
    if !rooms.can_see(user_id, &parent)? {
        return Err(not_found());
    }
    let from = query.from.map(parse_token).transpose()?;
    let to = query.to.map(parse_token).transpose()?;
    // Positions wanted: `start <= position <= end`.
    let (start, end) = if query.forward {
        (from.map_or(0, |f| f.saturating_add(1)), to.unwrap_or(u64::MAX))
    } else {
        (to.map_or(0, |t| t.saturating_add(1)), from.unwrap_or(u64::MAX))
    };
    let depth = if query.recurse { RECURSION_DEPTH } else { 1 };
    // Direct relations use the index of the wanted type; recursion follows every type.
    let scan_type = if query.recurse { None } else { query.rel_type };
    let mut found: Vec<Relation> = Vec::new();
    let mut frontier = vec![parent.event_id.clone()];
    for _ in 0..depth {
        let mut next = Vec::new();
        for id in &frontier {
            let budget = MAX_SCAN.saturating_sub(found.len());
            let children = services.relations.children(id, scan_type, budget)?;
            next.extend(children.iter().map(|r| r.event_id.clone()));
            found.extend(children);
        }
        if next.is_empty() || found.len() >= MAX_SCAN {
            break;
        }
        frontier = next;
    }
    found.retain(|r| {
        (start..=end).contains(&r.position)
            && query.rel_type.is_none_or(|t| t == r.rel_type)
            && query.event_type.is_none_or(|t| t == r.event_type)
    });
    found.sort_by_key(|r| r.position);
    found.dedup_by_key(|r| r.position);
    if !query.forward {
        found.reverse();
    }
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let mut chunk = Vec::new();
    let mut next_batch = None;
    for relation in found {
        if chunk.len() == limit {
            let last: &StoredPdu = chunk.last().unwrap_or(&parent);
            let token = if query.forward { last.position } else { last.position.saturating_sub(1) };
            next_batch = Some(format!("s{token}"));
            break;
        }
        if let Some(event) = rooms.stored(&relation.event_id)?
            && rooms.can_see(user_id, &event)?
        {
            chunk.push(event);
        }
    }
    Ok(Page { chunk, next_batch })
}

/// The thread roots of `room_id`, newest activity first, that `user_id` may see (only those
/// they took part in with `participated`).
pub fn threads(
    services: &Services,
    user_id: &UserId,
    room_id: &RoomId,
    participated: bool,
    from: Option<&str>,
    limit: Option<usize>,
) -> Result<Page> {
    let rooms = &services.rooms;
    rooms.readable_state(room_id, user_id)?;
    let record = rooms.room(room_id)?.ok_or_else(|| Error::forbidden("Unknown room"))?;
    let upto = from.map(parse_token).transpose()?.unwrap_or(u64::MAX - 1);
    let limit = limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let mut chunk = Vec::new();
    let mut next_batch = None;
    for item in services.relations.threads_before(record.short_id, upto).take(MAX_SCAN) {
        let (position, root) = item?;
        if chunk.len() == limit {
            next_batch = Some(format!("s{position}"));
            break;
        }
        let Some(root) = rooms.stored(&root)? else { continue };
        if !rooms.can_see(user_id, &root)? {
            continue;
        }
        if participated && !services.relations.participated(&root, user_id)? {
            continue;
        }
        chunk.push(root);
    }
    Ok(Page { chunk, next_batch })
}
