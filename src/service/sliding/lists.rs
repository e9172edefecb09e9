//! Lists: the user's rooms in recency order (from the recency index, plus rooms left since the
//! connection's last answer so the client learns of the leave), filtered, counted, and cut
//! to the list's ranges.

use std::collections::HashSet;

use ruma::{OwnedRoomId, RoomId, UserId};

use super::{
    recency::Membership,
    request::{Filters, List, MAX_WINDOW},
};
use crate::{error::Result, service::Services};

/// A room as lists see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listed {
    /// A current membership.
    Current(Membership),
    /// Left (or was kicked or banned) since the connection's last answer.
    Left,
}

/// What every list of one request shares: the user's direct chats and the children of the
/// spaces filters name.
pub struct Context {
    /// Rooms in the user's `m.direct`.
    pub direct: HashSet<OwnedRoomId>,
    /// Rooms left since the connection's last answer, newest first, with that position.
    pub left: Vec<(u64, OwnedRoomId)>,
}

impl Context {
    /// Reads the user's direct chats and the rooms left in `(since, upto]` (none on a new
    /// connection).
    pub fn read(
        services: &Services,
        user_id: &UserId,
        since: Option<u64>,
        upto: u64,
    ) -> Result<Self> {
        let direct = direct_rooms(services, user_id)?;
        let mut left = Vec::new();
        if let Some(since) = since {
            for (room_id, membership) in services.rooms.memberships_of(user_id)?.iter() {
                if Membership::listed(membership).is_some()
                    || services.stream.rooms.quiet_since(&**room_id, since)
                {
                    continue;
                }
                if let Some(outside) = services.rooms.outside(user_id, room_id)? {
                    if outside.position > since && outside.position <= upto {
                        left.push((outside.position, room_id.clone()));
                    }
                    continue;
                }
                let Some(record) = services.rooms.room(room_id)? else { continue };
                let state = services.rooms.states.load(record.current_state)?;
                let Some(member) =
                    services.rooms.state_pdu_of(&state, "m.room.member", user_id.as_str())?
                else {
                    continue;
                };
                if member.position > since && member.position <= upto {
                    left.push((member.position, room_id.clone()));
                }
            }
            left.sort_unstable_by(|a, b| b.cmp(a));
        }
        Ok(Self { direct, left })
    }
}

/// The rooms in `m.direct` of `user_id`.
pub fn direct_rooms(services: &Services, user_id: &UserId) -> Result<HashSet<OwnedRoomId>> {
    let Some(direct) = services.account_data.get(user_id, None, "m.direct")? else {
        return Ok(HashSet::new());
    };
    let rooms = direct.as_object().into_iter().flat_map(|users| users.values());
    Ok(rooms
        .filter_map(|rooms| rooms.as_array())
        .flatten()
        .filter_map(|room| room.as_str().and_then(|r| RoomId::parse(r).ok()))
        .collect())
}

/// The children (`m.space.child` with `via`) of `spaces` the user may see.
fn space_children(
    services: &Services,
    user_id: &UserId,
    spaces: &[OwnedRoomId],
) -> Result<HashSet<OwnedRoomId>> {
    let mut children = HashSet::new();
    for space in spaces {
        if services.rooms.membership(space, user_id)?.as_deref() != Some("join") {
            continue;
        }
        let Some(record) = services.rooms.room(space)? else { continue };
        let state = services.rooms.states.load(record.current_state)?;
        for (kind, key) in state.keys() {
            if kind != "m.space.child" {
                continue;
            }
            let content = services.rooms.state_content(&state, kind, key)?;
            let linked = content
                .and_then(|c| c.get("via").and_then(|v| v.as_array()).map(|v| !v.is_empty()));
            if linked == Some(true)
                && let Ok(child) = RoomId::parse(key.as_str())
            {
                children.insert(child);
            }
        }
    }
    Ok(children)
}

/// One list's answer: how many rooms pass its filters and those in its ranges, in order.
pub struct Windowed {
    /// Rooms passing the filters.
    pub count: u64,
    /// Rooms in range with their stamp and how they are listed.
    pub rooms: Vec<(OwnedRoomId, u64, Listed)>,
}

/// Applies `list` to the user's rooms, newest first.
pub fn window(
    services: &Services,
    user_id: &UserId,
    context: &Context,
    order: &super::recency::UserOrder,
    list: &List,
) -> Result<Windowed> {
    let spaces = match &list.filters {
        Some(filters) if !filters.spaces.is_empty() => {
            Some(space_children(services, user_id, &filters.spaces)?)
        }
        _ => None,
    };
    let in_range = |index: u64| {
        let mut covered = 0;
        list.ranges.iter().any(|(start, end)| {
            let end = (*end).min(start.saturating_add(MAX_WINDOW - 1));
            let hit = covered < MAX_WINDOW && index >= *start && index <= end;
            covered += end - start + 1;
            hit
        })
    };
    let mut count = 0u64;
    let mut rooms = Vec::new();
    let mut left = context.left.iter().peekable();
    let mut current = order.iter().peekable();
    loop {
        // Merge the current rooms and the left ones by stamp, newest first.
        let take_left = match (left.peek(), current.peek()) {
            (Some((l, _)), Some((_, c, _))) => l >= c,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        let (room_id, stamp, listed) = if take_left {
            let Some((position, room)) = left.next() else { break };
            (&**room, *position, Listed::Left)
        } else {
            let Some((room, stamp, membership)) = current.next() else { break };
            (room, stamp, Listed::Current(membership))
        };
        if let Some(filters) = &list.filters
            && !passes(services, context, spaces.as_ref(), filters, room_id, listed)?
        {
            continue;
        }
        if in_range(count) {
            rooms.push((room_id.to_owned(), stamp, listed));
        }
        count += 1;
    }
    Ok(Windowed { count, rooms })
}

/// Whether a room passes a list's filters.
fn passes(
    services: &Services,
    context: &Context,
    spaces: Option<&HashSet<OwnedRoomId>>,
    filters: &Filters,
    room_id: &RoomId,
    listed: Listed,
) -> Result<bool> {
    if let Some(is_invite) = filters.is_invite
        && is_invite != (listed == Listed::Current(Membership::Invite))
    {
        return Ok(false);
    }
    if let Some(is_dm) = filters.is_dm
        && is_dm != context.direct.contains(room_id)
    {
        return Ok(false);
    }
    if spaces.is_some_and(|children| !children.contains(room_id)) {
        return Ok(false);
    }
    let wants_facts = filters.is_encrypted.is_some()
        || !filters.room_types.is_empty()
        || !filters.not_room_types.is_empty();
    if !wants_facts {
        return Ok(true);
    }
    let facts = services.sliding.recency.facts(services, room_id)?;
    if filters.is_encrypted.is_some_and(|wanted| wanted != facts.encrypted) {
        return Ok(false);
    }
    if !filters.room_types.is_empty() && !filters.room_types.contains(&facts.room_type) {
        return Ok(false);
    }
    Ok(!filters.not_room_types.contains(&facts.room_type))
}
