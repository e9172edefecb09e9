//! Memberships of local users in rooms this server does not hold: an invite another server
//! sent, a knock sent through another server, and an invite rejected or a knock withdrawn
//! (kept until the next syncs have shown the room as left, or the user forgets it). They are
//! listed with the user's other rooms (the same membership index), so `/sync` and sliding sync
//! find them where they find every room; what a client is shown of the room is the stripped
//! state the other server gave. The entry goes in the batch that places the user's membership
//! once the room is held here (a join through federation).

use ruma::{OwnedEventId, OwnedServerName, OwnedUserId, RoomId, RoomVersionId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::Value as JsonValue;

use super::Rooms;
use crate::{
    error::{Error, Result},
    service::Services,
    storage::{Batch, Table},
};

/// Most stripped state events kept for one room.
pub const MAX_STRIPPED_EVENTS: usize = 50;
/// Most bytes of stripped state kept for one room (as JSON).
pub const MAX_STRIPPED_BYTES: usize = 65_536;
/// Most servers kept to join or leave through.
pub const MAX_SERVERS: usize = 10;

/// A local user's membership of a room held elsewhere.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutsideMembership {
    /// `invite`, `knock`, or `leave` (an invite rejected or a knock withdrawn).
    pub membership: String,
    /// The stream position of its last change (set when written).
    pub position: u64,
    /// The room's version.
    pub version: RoomVersionId,
    /// Who sent the membership event: the inviter, or the user for a knock or leave.
    pub sender: OwnedUserId,
    /// Servers in the room to join or leave through, the one that sent the invite (or took the
    /// knock) first.
    pub servers: Vec<OwnedServerName>,
    /// The membership event as signed, when there is one.
    pub event: Option<JsonValue>,
    /// That event's id.
    #[serde(default)]
    pub event_id: Option<OwnedEventId>,
    /// What the other server told of the room, in the stripped form clients are shown.
    pub stripped: Vec<JsonValue>,
}

impl OutsideMembership {
    /// The membership event in its stripped form, when there is one.
    pub fn stripped_event(&self) -> Option<JsonValue> {
        let event = self.event.as_ref()?;
        Some(serde_json::json!({
            "type": event.get("type")?,
            "state_key": event.get("state_key")?,
            "sender": event.get("sender")?,
            "content": event.get("content")?,
        }))
    }

    /// The membership event as clients are shown it in a timeline, when there is one.
    pub fn client_event(&self, room_id: &RoomId) -> Option<JsonValue> {
        let mut shown = self.stripped_event()?;
        shown["origin_server_ts"] = self.event.as_ref()?.get("origin_server_ts")?.clone();
        shown["event_id"] = serde_json::json!(self.event_id.as_ref()?);
        shown["room_id"] = serde_json::json!(room_id);
        shown["unsigned"] = serde_json::json!({});
        Some(shown)
    }
}

/// The table of outside memberships.
pub(super) type OutsideTable = Table<OutsideMembership>;

impl Rooms {
    /// The membership of `user_id` in `room_id` when the room is held elsewhere.
    pub fn outside(&self, user_id: &UserId, room_id: &RoomId) -> Result<Option<OutsideMembership>> {
        Ok(self.outside.get(&(user_id.as_str(), room_id.as_str()))?)
    }

    /// Records `record` as the membership of local user `user_id` in `room_id`, a room not
    /// held here (or held but left by every local user), at a new stream position; the user's
    /// syncs are woken. Returns that position.
    pub fn set_outside(
        &self,
        services: &Services,
        user_id: &UserId,
        room_id: &RoomId,
        record: OutsideMembership,
    ) -> Result<u64> {
        Ok(self.set_outside_with(services, user_id, room_id, record, |_| Ok(()))?.0)
    }

    /// Like [`Rooms::set_outside`], with what the caller's `contribute` adds to the same write
    /// batch (a feature's records that must be as durable as the membership); returns the
    /// position and what `contribute` returned.
    pub fn set_outside_with<T>(
        &self,
        services: &Services,
        user_id: &UserId,
        room_id: &RoomId,
        mut record: OutsideMembership,
        contribute: impl FnOnce(&mut Batch) -> Result<T>,
    ) -> Result<(u64, T)> {
        if !matches!(record.membership.as_str(), "invite" | "knock" | "leave") {
            return Err(Error::internal("an outside membership is an invite, knock or leave"));
        }
        if user_id.server_name() != services.server_name() {
            return Err(Error::internal("outside memberships are of local users"));
        }
        bound(&mut record);
        let mut batch = self.db.batch();
        let pending = services.stream.next(&mut batch);
        record.position = pending.position;
        let key = (user_id.as_str(), room_id.as_str());
        self.user_rooms.put(&mut batch, &key, &record.membership);
        self.outside.put(&mut batch, &key, &record);
        services.stream.rooms.mark(room_id, pending.position);
        let contributed = contribute(&mut batch)?;
        self.db.write(batch)?;
        self.forget_memberships(user_id);
        let position = pending.position;
        drop(pending);
        services.stream.wake_at(position, [user_id]);
        Ok((position, contributed))
    }

    /// Queues the removal of the outside membership of `user_id` in `room_id`, if any: the
    /// room's own membership of the user is being written.
    pub(super) fn clear_outside(
        &self,
        batch: &mut Batch,
        user_id: &UserId,
        room_id: &RoomId,
    ) -> Result<()> {
        let key = (user_id.as_str(), room_id.as_str());
        if self.outside.contains(&key)? {
            self.outside.delete(batch, &key);
        }
        Ok(())
    }
}

/// Cuts the stripped state and the servers down to their bounds.
fn bound(record: &mut OutsideMembership) {
    record.stripped.truncate(MAX_STRIPPED_EVENTS);
    let mut bytes = 0;
    record.stripped.retain(|event| {
        bytes += serde_json::to_string(event).map_or(MAX_STRIPPED_BYTES, |s| s.len());
        bytes <= MAX_STRIPPED_BYTES
    });
    let mut seen = std::collections::BTreeSet::new();
    record.servers.retain(|server| seen.insert(server.clone()));
    record.servers.truncate(MAX_SERVERS);
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn stripped_state_and_servers_are_cut_to_their_bounds() {
        let server = |n: usize| OwnedServerName::try_from(format!("s{n}.example")).unwrap();
        let mut record = OutsideMembership {
            membership: "invite".to_owned(),
            position: 0,
            version: RoomVersionId::V10,
            sender: OwnedUserId::try_from("@a:s0.example").unwrap(),
            servers: (0..30).map(|n| server(n % 20)).collect(),
            event: None,
            event_id: None,
            stripped: vec![
                json!({ "type": "m.room.topic", "content": { "topic": "x".repeat(10_000) } });
                80
            ],
        };
        bound(&mut record);
        // Six topics of ~10 KB fit in 64 KiB; the servers lose their repeats, then past ten.
        assert_eq!(record.stripped.len(), 6);
        assert_eq!(record.servers, (0..MAX_SERVERS).map(server).collect::<Vec<_>>());
    }
}
