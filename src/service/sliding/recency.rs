//! Rooms by recency: each room's `bump_stamp` (the position of its newest event of the kinds
//! MSC4186 counts: messages, encrypted messages, stickers, calls, polls, beacons, creation),
//! persisted in the event's own batch, and per user an ordered index of their joined, invited
//! and knocked rooms, built once and kept up to date as events are written, so a sliding
//! window over thousands of rooms is read in order instead of sorted per request. Also the
//! few facts list filters ask of every room (encrypted, room type), remembered.

use std::{
    cmp::Reverse,
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex, MutexGuard},
};

use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};

use crate::{
    error::Result,
    service::{
        Services,
        rooms::listeners::{Contributor, Written},
    },
    storage::{Batch, Db, Table, tables},
};

/// The event types that move a room up the list.
pub const BUMP_TYPES: &[&str] = &[
    "m.room.create",
    "m.room.message",
    "m.room.encrypted",
    "m.sticker",
    "m.call.invite",
    "m.poll.start",
    "org.matrix.msc3381.poll.start",
    "m.beacon_info",
    "org.matrix.msc3672.beacon_info",
];

/// Most events looked at, newest first, for the stamp of a room written before stamps were
/// kept.
const BUMP_SCAN: usize = 500;
/// Most rooms whose stamps and facts are kept in memory; past it they are read again.
const MAX_ROOMS: usize = 200_000;
/// Most users whose ordered index is kept; past it they are built again on demand.
const MAX_USERS: usize = 5_000;

/// A user's membership as the room list shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Membership {
    /// Joined.
    Join,
    /// Invited.
    Invite,
    /// Knocked, waiting for an answer.
    Knock,
}

impl Membership {
    /// The membership a room list shows for `membership`, if any.
    pub fn listed(membership: &str) -> Option<Self> {
        match membership {
            "join" => Some(Self::Join),
            "invite" => Some(Self::Invite),
            "knock" => Some(Self::Knock),
            _ => None,
        }
    }
}

/// One user's listed rooms, newest first.
#[derive(Default)]
pub struct UserOrder {
    stamps: HashMap<OwnedRoomId, (u64, Membership)>,
    order: BTreeSet<(Reverse<u64>, OwnedRoomId)>,
}

impl UserOrder {
    fn set(&mut self, room_id: &RoomId, stamp: u64, membership: Membership) {
        if let Some((old, _)) = self.stamps.get(room_id) {
            self.order.remove(&(Reverse(*old), room_id.to_owned()));
        }
        self.stamps.insert(room_id.to_owned(), (stamp, membership));
        self.order.insert((Reverse(stamp), room_id.to_owned()));
    }

    fn remove(&mut self, room_id: &RoomId) {
        if let Some((old, _)) = self.stamps.remove(room_id) {
            self.order.remove(&(Reverse(old), room_id.to_owned()));
        }
    }

    /// The rooms, newest first, with their stamp and the user's membership.
    pub fn iter(&self) -> impl Iterator<Item = (&RoomId, u64, Membership)> {
        self.order.iter().filter_map(|(_, room)| {
            self.stamps.get(room).map(|(stamp, membership)| (&**room, *stamp, *membership))
        })
    }

    /// The stamp and membership of `room_id`, if listed.
    pub fn get(&self, room_id: &RoomId) -> Option<(u64, Membership)> {
        self.stamps.get(room_id).copied()
    }

    /// How many rooms are listed.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether no room is listed.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// What list filters ask of a room.
#[derive(Clone, Debug, Default)]
pub struct RoomFacts {
    /// Whether `m.room.encryption` is set (it cannot be unset).
    pub encrypted: bool,
    /// The `type` of its create event (`m.space` for spaces).
    pub room_type: Option<String>,
}

/// Stamps, facts and per-user orders.
pub struct Recency {
    table: Table<u64>,
    stamps: Mutex<HashMap<OwnedRoomId, u64>>,
    facts: Mutex<HashMap<OwnedRoomId, RoomFacts>>,
    orders: Mutex<HashMap<OwnedUserId, Arc<Mutex<UserOrder>>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Recency {
    /// Opens the stamps table.
    pub fn new(db: &Db) -> Self {
        Self {
            table: db.table(tables::ROOM_BUMPS),
            stamps: Mutex::default(),
            facts: Mutex::default(),
            orders: Mutex::default(),
        }
    }

    /// The room's `bump_stamp`.
    pub fn stamp(&self, services: &Services, room_id: &RoomId) -> Result<u64> {
        if let Some(stamp) = lock(&self.stamps).get(room_id) {
            return Ok(*stamp);
        }
        let stamp = match self.table.get(room_id.as_str())? {
            Some(stamp) => stamp,
            None => scan_stamp(services, room_id)?,
        };
        let mut stamps = lock(&self.stamps);
        if stamps.len() >= MAX_ROOMS {
            stamps.clear();
        }
        // A stamp noted meanwhile by a write is newer than the one read.
        Ok(*stamps.entry(room_id.to_owned()).or_insert(stamp))
    }

    /// What list filters ask of `room_id`.
    pub fn facts(&self, services: &Services, room_id: &RoomId) -> Result<RoomFacts> {
        if let Some(facts) = lock(&self.facts).get(room_id) {
            return Ok(facts.clone());
        }
        let rooms = &services.rooms;
        // A room not held here (an invite from afar) has no facts to tell.
        let Some(record) = rooms.room(room_id)? else { return Ok(RoomFacts::default()) };
        let state = rooms.states.load(record.current_state)?;
        let encrypted = rooms.state_event(&state, "m.room.encryption", "")?.is_some();
        let room_type = rooms
            .state_content(&state, "m.room.create", "")?
            .and_then(|c| c.get("type").and_then(|t| t.as_str()).map(str::to_owned));
        let facts = RoomFacts { encrypted, room_type };
        let mut all = lock(&self.facts);
        if all.len() >= MAX_ROOMS {
            all.clear();
        }
        Ok(all.entry(room_id.to_owned()).or_insert(facts).clone())
    }

    /// The ordered room list of `user_id`, built on first use.
    pub fn order(&self, services: &Services, user_id: &UserId) -> Result<Arc<Mutex<UserOrder>>> {
        // Built under the map's lock, so no write's update slips between reading and keeping.
        let mut orders = lock(&self.orders);
        let memberships = services.rooms.memberships_of(user_id)?;
        if let Some(order) = orders.get(user_id) {
            // A membership written while the order was first built may have been missed: the
            // order is built again when its size disagrees with the memberships.
            // Memberships of rooms held elsewhere change without an event written here: the
            // order is checked against each listed membership.
            let guard = lock(order);
            let mut listed = 0;
            let agrees = memberships.iter().all(|(room, m)| match Membership::listed(m) {
                Some(membership) => {
                    listed += 1;
                    guard.get(room).is_some_and(|(_, held)| held == membership)
                }
                None => true,
            });
            if agrees && guard.len() == listed {
                drop(guard);
                return Ok(order.clone());
            }
        }
        let mut order = UserOrder::default();
        for (room_id, membership) in memberships.iter() {
            let Some(listed) = Membership::listed(membership) else { continue };
            let stamp = match listed {
                Membership::Join => self.stamp(services, room_id)?,
                _ => own_member_position(services, room_id, user_id)?,
            };
            order.set(room_id, stamp, listed);
        }
        if orders.len() >= MAX_USERS {
            orders.retain(|_, order| Arc::strong_count(order) > 1);
        }
        let order = Arc::new(Mutex::new(order));
        orders.insert(user_id.to_owned(), order.clone());
        Ok(order)
    }

    /// A bump event of `room_id` at `position`: the room moves up in its members' lists.
    fn note_bump(&self, services: &Services, room_id: &RoomId, position: u64) -> Result<()> {
        {
            let mut stamps = lock(&self.stamps);
            let stamp = stamps.entry(room_id.to_owned()).or_insert(position);
            *stamp = (*stamp).max(position);
        }
        let orders = lock(&self.orders);
        if orders.is_empty() {
            return Ok(());
        }
        let bump = |order: &Mutex<UserOrder>| {
            let mut order = lock(order);
            // An order that holds the room as joined is one of its members'.
            if let Some((stamp, Membership::Join)) = order.get(room_id)
                && stamp < position
            {
                order.set(room_id, position, Membership::Join);
            }
        };
        // Whichever is smaller: the users with an order loaded, or the room's members.
        let members = services.rooms.members(room_id)?;
        if orders.len() <= members.len() {
            orders.values().for_each(|order| bump(order));
        } else {
            members
                .iter()
                .filter(|(_, membership)| membership == "join")
                .filter_map(|(user, _)| orders.get(user))
                .for_each(|order| bump(order));
        }
        Ok(())
    }

    /// `user_id`'s membership of `room_id` became `membership` at `position`.
    fn note_membership(
        &self,
        services: &Services,
        room_id: &RoomId,
        user_id: &UserId,
        membership: &str,
        position: u64,
    ) -> Result<()> {
        let orders = lock(&self.orders);
        let Some(order) = orders.get(user_id) else { return Ok(()) };
        let mut order = lock(order);
        match Membership::listed(membership) {
            Some(Membership::Join) => {
                let stamp = self.stamp(services, room_id)?;
                order.set(room_id, stamp, Membership::Join);
            }
            Some(listed) => order.set(room_id, position, listed),
            None => order.remove(room_id),
        }
        Ok(())
    }

    fn note_encrypted(&self, room_id: &RoomId) {
        let mut facts = lock(&self.facts);
        if let Some(facts) = facts.get_mut(room_id) {
            facts.encrypted = true;
        }
    }
}

/// The position of `user_id`'s own member event in `room_id` (0 if none), or of their
/// membership of a room held elsewhere.
fn own_member_position(services: &Services, room_id: &RoomId, user_id: &UserId) -> Result<u64> {
    if let Some(outside) = services.rooms.outside(user_id, room_id)? {
        return Ok(outside.position);
    }
    let Some(record) = services.rooms.room(room_id)? else { return Ok(0) };
    let state = services.rooms.states.load(record.current_state)?;
    Ok(services
        .rooms
        .state_pdu_of(&state, "m.room.member", user_id.as_str())?
        .map_or(0, |member| member.position))
}

/// The stamp of a room written before stamps were kept: its newest bump event among the last
/// [`BUMP_SCAN`], else its newest event.
fn scan_stamp(services: &Services, room_id: &RoomId) -> Result<u64> {
    let Some(record) = services.rooms.room(room_id)? else { return Ok(0) };
    let mut newest = None;
    for event in services.rooms.timeline(&record, false).take(BUMP_SCAN) {
        let event = event?;
        newest.get_or_insert(event.position);
        if BUMP_TYPES.contains(&event.kind()) {
            return Ok(event.position);
        }
    }
    Ok(newest.unwrap_or(0))
}

/// Keeps stamps and orders as events are written: the stamp in the event's batch, the
/// in-memory orders before any sync can read the event.
pub struct Bumps;

impl Contributor for Bumps {
    fn contribute(
        &self,
        services: &Services,
        written: &Written<'_>,
        batch: &mut Batch,
    ) -> Result<()> {
        let recency = &services.sliding.recency;
        let event = written.event;
        let kind = event.kind();
        if BUMP_TYPES.contains(&kind) {
            recency.table.put(batch, written.room_id.as_str(), &event.position);
            recency.note_bump(services, written.room_id, event.position)?;
        }
        match (kind, event.state_key()) {
            ("m.room.member", Some(user)) => {
                let membership = written.content.get("membership").and_then(|m| m.as_str());
                if let (Ok(user), Some(membership)) = (UserId::parse(user), membership) {
                    recency.note_membership(
                        services,
                        written.room_id,
                        &user,
                        membership,
                        event.position,
                    )?;
                }
            }
            ("m.room.encryption", Some("")) => recency.note_encrypted(written.room_id),
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use ruma::room_id;

    use super::*;

    #[test]
    fn a_user_order_keeps_rooms_newest_first_as_stamps_move() {
        let mut order = UserOrder::default();
        order.set(room_id!("!a:x"), 10, Membership::Join);
        order.set(room_id!("!b:x"), 20, Membership::Join);
        order.set(room_id!("!c:x"), 15, Membership::Invite);
        let rooms = |order: &UserOrder| -> Vec<String> {
            order.iter().map(|(room, _, _)| room.to_string()).collect()
        };
        assert_eq!(rooms(&order), ["!b:x", "!c:x", "!a:x"]);
        order.set(room_id!("!a:x"), 30, Membership::Join);
        assert_eq!(rooms(&order), ["!a:x", "!b:x", "!c:x"]);
        assert_eq!(order.get(room_id!("!c:x")), Some((15, Membership::Invite)));
        order.remove(room_id!("!b:x"));
        assert_eq!(rooms(&order), ["!a:x", "!c:x"]);
        assert_eq!(order.len(), 2);
    }
}
