//! Simplified sliding sync (MSC4186), the sync of Element X and other mobile clients: lists
//! that are windows over the user's rooms by recency, room subscriptions, and extensions, on
//! connections that remember what they were sent. It reads the same stream positions, marks
//! and wake-ups as `/sync` v3 and assembles the same typed pieces.

pub mod connections;
pub mod extensions;
pub mod lists;
pub mod recency;
pub mod request;
pub mod room;

use std::collections::{BTreeMap, BTreeSet, HashSet};

use ruma::{DeviceId, OwnedRoomId, RoomId, UserId};

use self::{
    connections::{Connections, Snapshot},
    lists::{Context, Listed},
    request::{Body, ListCount, Response},
    room::{Syncer, Wanted},
};
use crate::{
    error::Result,
    service::{Services, sync::Viewer},
};

/// The sliding-sync state: the recency index and the live connections.
pub struct Sliding {
    /// Rooms by recency, per user.
    pub recency: recency::Recency,
    /// What each connection was sent.
    pub connections: Connections,
}

impl Sliding {
    /// Opens the recency index.
    pub fn new(db: &crate::storage::Db) -> Self {
        Self { recency: recency::Recency::new(db), connections: Connections::default() }
    }
}

/// One answer: the response, the connection's view after it, and whether it carries news
/// (a long-poll waits while it does not).
pub struct Answer {
    /// The response (its `pos` is set once the snapshot is stored).
    pub response: Response,
    /// The connection's view after this answer.
    pub snapshot: Snapshot,
    /// Whether anything is new.
    pub has_changes: bool,
}

/// Builds the answer to `body` for a connection whose previous answer is `previous` (None on
/// a new connection), covering changes up to `upto`.
pub async fn build(
    services: &Services,
    (user_id, device_id): (&UserId, &DeviceId),
    body: &Body,
    previous: Option<&Snapshot>,
    upto: u64,
) -> Result<Answer> {
    let since = previous.map(|p| p.upto);
    let typing = services.ephemeral.typing_serial();
    let viewer = Viewer::of(services, user_id)?;
    let context = Context::read(services, user_id, since, upto)?;
    let memberships = services.rooms.memberships_of(user_id)?;
    let joined: HashSet<&RoomId> =
        memberships.iter().filter(|(_, m)| m == "join").map(|(r, _)| &**r).collect();
    let mut snapshot = previous.cloned().unwrap_or_default();
    snapshot.upto = upto;
    snapshot.typing = typing;

    // Lists: each window over the ordered rooms.
    let mut wanted: BTreeMap<OwnedRoomId, Wanted> = BTreeMap::new();
    let mut windows: BTreeMap<String, Vec<OwnedRoomId>> = BTreeMap::new();
    let mut counts = BTreeMap::new();
    let mut has_changes = false;
    if !body.lists.is_empty() {
        let order = services.sliding.recency.order(services, user_id)?;
        let order = order.lock().unwrap_or_else(|e| e.into_inner());
        for (name, list) in &body.lists {
            let windowed = lists::window(services, user_id, &context, &order, list)?;
            let limit = list.details.limit();
            let mut names = Vec::with_capacity(windowed.rooms.len());
            for (room_id, stamp, listed) in windowed.rooms {
                let entry = wanted.entry(room_id.clone()).or_default();
                entry.merge(limit, &list.details.required_state);
                entry.stamp = Some(stamp);
                if listed != Listed::Left {
                    names.push(room_id);
                }
            }
            has_changes |= previous.is_some_and(|p| p.lists.get(name) != Some(&windowed.count));
            snapshot.lists.insert(name.clone(), windowed.count);
            counts.insert(name.clone(), ListCount { count: windowed.count });
            windows.insert(name.clone(), names);
        }
    }
    // Subscriptions: rooms the user is in, or was (their history up to the leave).
    let mut subscriptions = BTreeSet::new();
    let member_of: HashSet<&RoomId> = if body.room_subscriptions.is_empty() {
        HashSet::new()
    } else {
        memberships.iter().map(|(r, _)| &**r).collect()
    };
    for (room_id, details) in &body.room_subscriptions {
        if !member_of.contains(&**room_id) {
            continue;
        }
        let entry = wanted.entry(room_id.clone()).or_default();
        entry.merge(details.limit(), &details.required_state);
        if entry.stamp.is_none() {
            let order = services.sliding.recency.order(services, user_id)?;
            let stamp = order.lock().unwrap_or_else(|e| e.into_inner()).get(room_id).map(|s| s.0);
            entry.stamp = stamp;
        }
        subscriptions.insert(room_id.clone());
    }

    let syncer = Syncer { user_id, device_id, viewer: &viewer, since, upto };
    let mut rooms = BTreeMap::new();
    let mut fresh = BTreeSet::new();
    for (room_id, wants) in &wanted {
        let sent = snapshot.rooms.get(room_id).copied();
        let is_dm = context.direct.contains(room_id);
        let Some((room, remember)) =
            room::build(services, &syncer, room_id, wants, sent, is_dm).await?
        else {
            continue;
        };
        if room.initial == Some(true) {
            fresh.insert(room_id.clone());
        }
        snapshot.rooms.insert(room_id.clone(), remember);
        rooms.insert(room_id.clone(), room);
    }
    snapshot.trim();
    has_changes |= !rooms.is_empty();

    let span = extensions::Span {
        user_id,
        device_id,
        since,
        since_typing: previous.map(|p| p.typing),
        upto,
        fresh: &fresh,
    };
    let scope =
        extensions::Scope { lists: &windows, subscriptions: &subscriptions, joined: &joined };
    let (extensions, news) = extensions::build(services, &body.extensions, &span, &scope).await?;
    has_changes |= news;
    let response = Response {
        pos: String::new(),
        txn_id: body.txn_id.clone(),
        lists: counts,
        rooms,
        extensions,
    };
    Ok(Answer { response, snapshot, has_changes })
}
