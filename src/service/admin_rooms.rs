//! Room administration: the room list with its details, blocking rooms, deleting a room
//! (every local member removed, the room unlisted and optionally blocked), reading a room's
//! history, force-joining users and granting room admin through a local member with power.
//! Each decision is written with its audit record in one batch.

use std::{collections::HashMap, sync::Mutex};

use ruma::{
    Int, OwnedRoomId, OwnedUserId, RoomId, UserId,
    api::client::filter::RoomEventFilter,
    events::{
        StateEventType,
        room::{join_rules::JoinRule, power_levels::UserPowerLevel},
    },
    int,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value as JsonValue, json};

use super::{
    Services,
    audit::Entry,
    filters, now_ms,
    rooms::{NewEvent, membership, pdu::StoredPdu},
};
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

/// Most events looked at for one admin page of history.
const MAX_SCAN: usize = 20_000;

impl Services {
    /// The local joined member of `room_id` with the most power who may invite, `preferred`
    /// first when it qualifies.
    pub fn local_inviter(
        &self,
        room_id: &RoomId,
        preferred: Option<&UserId>,
    ) -> Result<Option<OwnedUserId>> {
        let Some(record) = self.rooms.room(room_id)? else { return Ok(None) };
        let state = self.rooms.states.load(record.current_state)?;
        let levels = self.rooms.power_levels(&state, &record.version)?;
        let mut best: Option<(UserPowerLevel, OwnedUserId)> = None;
        for (member, membership) in self.rooms.members(room_id)?.iter().cloned() {
            if membership != "join" || member.server_name() != self.server_name() {
                continue;
            }
            if !levels.user_can_invite(&member) {
                continue;
            }
            if preferred == Some(&*member) {
                return Ok(Some(member));
            }
            let level = levels.for_user(&member);
            if best.as_ref().is_none_or(|(top, _)| level > *top) {
                best = Some((level, member));
            }
        }
        Ok(best.map(|(_, member)| member))
    }

    /// Joins the local user `user_id` to `room_id` for `actor`: directly when the room is
    /// public, otherwise invited first by a local member who may invite (`actor` preferred).
    /// Joining someone already joined changes nothing.
    pub async fn admin_join(
        &self,
        actor: &UserId,
        room_id: &RoomId,
        user_id: &UserId,
    ) -> Result<()> {
        if user_id.server_name() != self.server_name() {
            return Err(Error::invalid_param("Only local users can be joined to rooms"));
        }
        if self.users.get(user_id)?.is_none_or(|u| u.deactivated) {
            return Err(Error::not_found("No such user"));
        }
        let state = self.rooms.current_state(room_id)?;
        let current = self.rooms.membership_in(&state, user_id)?;
        if current == "join" {
            return Ok(());
        }
        if self.admin_rooms.blocked(room_id)?.is_some() {
            return Err(Error::forbidden("This room has been blocked on this server"));
        }
        let public = self.rooms.join_rule(&state)? == JoinRule::Public;
        let entry = |action: &str| Entry::new(action, Some(actor)).target(user_id).room(room_id);
        if !public && current != "invite" {
            let inviter = self.local_inviter(room_id, Some(actor))?.ok_or_else(|| {
                Error::forbidden("The room is not public and no local member may invite")
            })?;
            let audit = vec![entry("admin.room.invite").details(json!({ "via": inviter }))];
            membership::invite_audited(self, room_id, &inviter, user_id, None, false, audit)
                .await?;
        }
        membership::join_audited(
            self,
            room_id,
            user_id,
            None,
            None,
            vec![entry("admin.room.join")],
        )
        .await?;
        Ok(())
    }

    /// Gives `user_id` the highest power a local member of `room_id` can grant, through the
    /// local joined member with the most power who may change power levels; invites the user
    /// when they are not in the room and it is not public.
    pub async fn admin_make_room_admin(
        &self,
        actor: &UserId,
        room_id: &RoomId,
        user_id: &UserId,
    ) -> Result<()> {
        if user_id.server_name() != self.server_name() {
            return Err(Error::invalid_param("Only local users can be made room admins"));
        }
        if self.users.get(user_id)?.is_none_or(|u| u.deactivated) {
            return Err(Error::not_found("No such user"));
        }
        let record = self.rooms.room(room_id)?.ok_or_else(|| Error::not_found("Unknown room"))?;
        let state = self.rooms.states.load(record.current_state)?;
        let levels = self.rooms.power_levels(&state, &record.version)?;
        let mut granter: Option<(UserPowerLevel, OwnedUserId)> = None;
        for (member, membership) in self.rooms.members(room_id)?.iter().cloned() {
            if membership != "join" || member.server_name() != self.server_name() {
                continue;
            }
            if !levels.user_can_send_state(&member, StateEventType::RoomPowerLevels) {
                continue;
            }
            let level = levels.for_user(&member);
            if granter.as_ref().is_none_or(|(top, _)| level > *top) {
                granter = Some((level, member));
            }
        }
        let (level, granter) = granter.ok_or_else(|| {
            Error::forbidden("No local member of the room may change its power levels")
        })?;
        // A creator's unlimited power (room version 12) cannot be listed; grant the most any
        // listed user has, at least 100.
        let grant = match level {
            UserPowerLevel::Int(level) => level,
            _ => levels.users.values().copied().fold(int!(100), Int::max),
        };
        if levels.for_user(user_id) < grant {
            let mut power = self.rooms.power_levels_to_change(&state, &record.version)?;
            if !power.get("users").is_some_and(JsonValue::is_object) {
                power["users"] = json!({});
            }
            power["users"][user_id.as_str()] = json!(grant);
            let entry = Entry::new("admin.room.make_room_admin", Some(actor))
                .target(user_id)
                .room(room_id)
                .details(json!({ "via": granter, "level": grant }));
            let event = NewEvent::state("m.room.power_levels", "", power).audited(entry);
            self.rooms.append(self, room_id, &granter, event, None).await?;
        }
        let membership = self.rooms.membership(room_id, user_id)?;
        let public = self.rooms.join_rule(&state)? == JoinRule::Public;
        if !public && !matches!(membership.as_deref(), Some("join" | "invite")) {
            let entry = Entry::new("admin.room.invite", Some(actor))
                .target(user_id)
                .room(room_id)
                .details(json!({ "via": granter }));
            membership::invite_audited(self, room_id, &granter, user_id, None, false, vec![entry])
                .await?;
        }
        Ok(())
    }

    /// A page of `room_id`'s events in `(after, upto]` for an admin: every event (history
    /// visibility does not apply), filtered, at most `limit`. Returns the events and where the
    /// next page starts, unless the range is exhausted.
    pub fn admin_history(
        &self,
        room_id: &RoomId,
        (after, upto): (u64, u64),
        forward: bool,
        limit: usize,
        filter: &RoomEventFilter,
    ) -> Result<(Vec<StoredPdu>, Option<u64>)> {
        let record = self.rooms.room(room_id)?.ok_or_else(|| Error::not_found("Unknown room"))?;
        let limit = limit.clamp(1, super::history::MAX_PAGE);
        let mut chunk = Vec::with_capacity(limit);
        let mut last_scanned = None;
        let mut exhausted = true;
        for (scanned, event) in self.rooms.timeline_range(&record, after, upto, forward).enumerate()
        {
            let event = event?;
            if chunk.len() == limit || scanned == MAX_SCAN {
                exhausted = false;
                break;
            }
            last_scanned = Some(event.position);
            if filters::matches(filter, &event) {
                chunk.push(event);
            }
        }
        let end = match (exhausted, last_scanned) {
            (false, Some(position)) => {
                Some(if forward { position } else { position.saturating_sub(1) })
            }
            _ => None,
        };
        Ok((chunk, end))
    }

    /// Every `mxc://` URI the events of `room_id` refer to (the newest
    /// [`MAX_MEDIA_SCAN`] events), local and remote apart.
    pub fn room_media(&self, room_id: &RoomId) -> Result<(Vec<String>, Vec<String>)> {
        let record = self.rooms.room(room_id)?.ok_or_else(|| Error::not_found("Unknown room"))?;
        let mut found = std::collections::BTreeSet::new();
        for event in self.rooms.timeline(&record, false).take(MAX_MEDIA_SCAN) {
            let event = event?;
            if let Some(content) = event.wire.get("content") {
                collect_mxc(&JsonValue::from(content.clone()), 0, &mut found);
            }
        }
        let local_prefix = format!("mxc://{}/", self.server_name());
        Ok(found.into_iter().partition(|uri| uri.starts_with(&local_prefix)))
    }

    /// Quarantines every known media item (local uploads and cached remote media) among the
    /// `mxc://` URIs `uris`, for `actor`; returns how many.
    pub fn quarantine_media(&self, actor: &UserId, uris: &[String]) -> Result<usize> {
        let mut count = 0;
        for uri in uris {
            let Some((origin, media_id)) = uri.trim_start_matches("mxc://").split_once('/') else {
                continue;
            };
            let Ok(origin) = ruma::ServerName::parse(origin) else { continue };
            if !super::media::valid_media_id(media_id) {
                continue;
            }
            if self.media.set_quarantined(&self.audit, actor, &origin, media_id, true)? {
                count += 1;
            }
        }
        Ok(count)
    }
}

/// Most events looked at for a room's media.
pub const MAX_MEDIA_SCAN: usize = 100_000;

/// Adds every `mxc://` string in `value` (nested at most 8 deep) to `found`.
fn collect_mxc(value: &JsonValue, depth: usize, found: &mut std::collections::BTreeSet<String>) {
    if depth > 8 || found.len() >= MAX_MEDIA_SCAN {
        return;
    }
    match value {
        JsonValue::String(text) if text.starts_with("mxc://") && text.len() <= 512 => {
            found.insert(text.clone());
        }
        JsonValue::Array(items) => items.iter().for_each(|v| collect_mxc(v, depth + 1, found)),
        JsonValue::Object(map) => map.values().for_each(|v| collect_mxc(v, depth + 1, found)),
        _ => {}
    }
}
