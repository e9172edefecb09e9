//! Room administration: the room list with its details, blocking rooms, and deleting a room
//! (every local member removed, the room unlisted and optionally blocked). Each decision is
//! written with its audit record in one batch.

use std::{collections::HashMap, sync::Mutex};

use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{Value as JsonValue, json};

use super::{Services, audit::Entry, now_ms, rooms::membership};
use crate::{
    error::{Error, Result},
    storage::{Db, Table, tables},
};

/// Most rooms a listing looks at.
pub const MAX_LISTED: usize = 100_000;

/// Why a room is blocked.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlockRecord {
    /// The admin who blocked it.
    pub by: String,
    /// When (ms since the epoch).
    pub ts: u64,
}

/// The outcome of deleting a room, kept for the status endpoint.
#[derive(Debug, Clone, Serialize)]
pub struct DeleteStatus {
    /// Identifies this deletion.
    pub delete_id: String,
    /// `complete` or `failed`.
    pub status: String,
    /// Local users removed from the room.
    pub kicked_users: Vec<OwnedUserId>,
    /// Local users who could not be removed.
    pub failed_to_kick_users: Vec<OwnedUserId>,
    /// Why it failed, when it did.
    pub error: Option<String>,
}

/// Blocked rooms and deletion results.
pub struct AdminRooms {
    blocked: Table<BlockRecord>,
    statuses: Mutex<HashMap<OwnedRoomId, Vec<DeleteStatus>>>,
}

impl AdminRooms {
    pub(super) fn new(db: &Db) -> Self {
        Self { blocked: db.table(tables::BLOCKED_ROOMS), statuses: Mutex::default() }
    }

    /// Whether `room_id` is blocked (nobody local may join it).
    pub fn blocked(&self, room_id: &RoomId) -> Result<Option<BlockRecord>> {
        Ok(self.blocked.get(room_id.as_str())?)
    }

    /// The deletions run on `room_id` since start.
    pub fn delete_statuses(&self, room_id: &RoomId) -> Vec<DeleteStatus> {
        let statuses = self.statuses.lock().unwrap_or_else(|e| e.into_inner());
        statuses.get(room_id).cloned().unwrap_or_default()
    }
}

impl Services {
    /// Blocks or unblocks `room_id` for `actor`; unchanged states are not written again.
    pub fn admin_set_room_blocked(
        &self,
        actor: &UserId,
        room_id: &RoomId,
        block: bool,
    ) -> Result<()> {
        if self.admin_rooms.blocked(room_id)?.is_some() == block {
            return Ok(());
        }
        let mut batch = self.db.batch();
        if block {
            let record = BlockRecord { by: actor.to_string(), ts: now_ms() };
            self.admin_rooms.blocked.put(&mut batch, room_id.as_str(), &record);
        } else {
            self.admin_rooms.blocked.delete(&mut batch, room_id.as_str());
        }
        let action = if block { "admin.room.block" } else { "admin.room.unblock" };
        self.audit.commit(batch, [Entry::new(action, Some(actor)).target(room_id).room(room_id)])
    }

    /// Deletes `room_id` for `actor`: records the decision (and the block) in one batch,
    /// unlists the room, then makes every local member leave. Running it again finishes
    /// whatever a previous run could not.
    pub async fn admin_delete_room(
        &self,
        actor: &UserId,
        room_id: &RoomId,
        block: bool,
        purge: bool,
    ) -> Result<DeleteStatus> {
        if self.rooms.room(room_id)?.is_none() {
            if block {
                self.admin_set_room_blocked(actor, room_id, true)?;
            }
            return Err(Error::not_found("Unknown room"));
        }
        let mut batch = self.db.batch();
        if block && self.admin_rooms.blocked(room_id)?.is_none() {
            let record = BlockRecord { by: actor.to_string(), ts: now_ms() };
            self.admin_rooms.blocked.put(&mut batch, room_id.as_str(), &record);
        }
        let entry = Entry::new("admin.room.delete", Some(actor))
            .target(room_id)
            .room(room_id)
            .details(json!({ "block": block, "purge": purge }));
        self.audit.commit(batch, [entry])?;
        self.directory.set_published(room_id, false)?;

        let mut status = DeleteStatus {
            delete_id: super::random_string(16),
            status: "complete".to_owned(),
            kicked_users: Vec::new(),
            failed_to_kick_users: Vec::new(),
            error: None,
        };
        for (user_id, current) in self.rooms.members(room_id)?.iter() {
            let present = matches!(current.as_str(), "join" | "invite" | "knock");
            if !present || user_id.server_name() != self.server_name() {
                continue;
            }
            match membership::leave(self, room_id, user_id, Some("This room was shut down")).await {
                Ok(_) => status.kicked_users.push(user_id.clone()),
                Err(err) => {
                    tracing::warn!(%room_id, %user_id, %err, "could not remove member");
                    status.failed_to_kick_users.push(user_id.clone());
                }
            }
        }
        if !status.failed_to_kick_users.is_empty() {
            status.status = "failed".to_owned();
            status.error = Some("some members could not be removed; delete again".to_owned());
        }
        let mut statuses = self.admin_rooms.statuses.lock().unwrap_or_else(|e| e.into_inner());
        if statuses.len() > 10_000 {
            statuses.clear();
        }
        statuses.entry(room_id.to_owned()).or_default().push(status.clone());
        Ok(status)
    }

    /// What the admin API shows of a room (state metadata only, never messages).
    pub fn room_details(&self, room_id: &RoomId) -> Result<Option<JsonValue>> {
        let Some(record) = self.rooms.room(room_id)? else { return Ok(None) };
        let state = self.rooms.states.load(record.current_state)?;
        let field = |kind: &str, key: &str| -> Result<JsonValue> {
            Ok(self
                .rooms
                .state_content(&state, kind, "")?
                .and_then(|c| c.get(key).cloned())
                .unwrap_or(JsonValue::Null))
        };
        let members = self.rooms.members(room_id)?;
        let joined: Vec<&OwnedUserId> =
            members.iter().filter(|(_, m)| m == "join").map(|(u, _)| u).collect();
        let local = joined.iter().filter(|u| u.server_name() == self.server_name()).count();
        let create = self.rooms.state_event(&state, "m.room.create", "")?;
        let creator = create.as_ref().and_then(|c| c.wire.get("sender")).and_then(|s| s.as_str());
        Ok(Some(json!({
            "room_id": room_id,
            "name": field("m.room.name", "name")?,
            "topic": field("m.room.topic", "topic")?,
            "avatar": field("m.room.avatar", "url")?,
            "canonical_alias": field("m.room.canonical_alias", "alias")?,
            "joined_members": joined.len(),
            "joined_local_members": local,
            "joined_local_devices": 0,
            "version": record.version,
            "creator": creator,
            "encryption": field("m.room.encryption", "algorithm")?,
            "federatable": field("m.room.create", "m.federate")?.as_bool().unwrap_or(true),
            "public": self.directory.is_published(room_id)?,
            "join_rules": field("m.room.join_rules", "join_rule")?,
            "guest_access": field("m.room.guest_access", "guest_access")?,
            "history_visibility": field("m.room.history_visibility", "history_visibility")?,
            "state_events": state.len(),
            "room_type": field("m.room.create", "type")?,
            "forgotten": false,
            "blocked": self.admin_rooms.blocked(room_id)?.is_some(),
        })))
    }

    /// Every room's details (up to [`MAX_LISTED`]).
    pub fn all_room_details(&self) -> Result<Vec<JsonValue>> {
        let mut rooms = Vec::new();
        for room_id in self.rooms.all_room_ids()?.into_iter().take(MAX_LISTED) {
            rooms.extend(self.room_details(&room_id)?);
        }
        Ok(rooms)
    }
}
