//! Account data: per-user JSON documents, global or per room, each change recorded at a stream
//! position so sync can send what changed since a token.

use ruma::{RoomId, UserId};
use serde_json::Value as JsonValue;

use super::Services;
use crate::{
    error::{Error, ErrorKind, Result},
    storage::{Db, Key, Table, tables},
};

/// Largest account data document accepted, in bytes.
pub const MAX_ACCOUNT_DATA_BYTES: usize = 64 * 1024;

/// Account data storage.
pub struct AccountData {
    data: Table<JsonValue>,
    changes: Table<(String, String)>,
}

impl AccountData {
    pub(super) fn new(db: &Db) -> Self {
        Self {
            data: db.table(tables::ACCOUNT_DATA),
            changes: db.table(tables::ACCOUNT_DATA_CHANGES),
        }
    }

    /// Queues removing all of `user_id`'s account data, global and per room, and its change
    /// log in `batch` (the account is deactivated); returns how many documents go.
    pub fn queue_forget_user(
        &self,
        batch: &mut crate::storage::Batch,
        user_id: &UserId,
    ) -> Result<u64> {
        let mut documents = 0;
        for item in self.data.scan_prefix(crate::storage::prefix(user_id.as_str())) {
            self.data.delete_raw(batch, &item?.0);
            documents += 1;
        }
        for item in self.changes.scan_prefix(crate::storage::prefix(user_id.as_str())) {
            self.changes.delete_raw(batch, &item?.0);
        }
        Ok(documents)
    }

    /// The content of `event_type` for `user_id` (in `room_id`, or global).
    pub fn get(
        &self,
        user_id: &UserId,
        room_id: Option<&RoomId>,
        event_type: &str,
    ) -> Result<Option<JsonValue>> {
        let room = room_id.map_or("", RoomId::as_str);
        Ok(self.data.get(&(user_id.as_str(), room, event_type))?)
    }

    /// Every document of `user_id` in `room_id` (or the global ones), as `(type, content)`.
    pub fn all_in(
        &self,
        user_id: &UserId,
        room_id: Option<&RoomId>,
    ) -> Result<Vec<(String, JsonValue)>> {
        let room = room_id.map_or("", RoomId::as_str);
        let start = crate::storage::prefix(&(user_id.as_str(), room));
        let mut documents = Vec::new();
        for item in self.data.scan_prefix(start.clone()) {
            let (key, content) = item?;
            let kind = key.get(start.len()..).and_then(|k| std::str::from_utf8(k).ok());
            documents.extend(kind.map(|kind| (kind.to_owned(), content)));
        }
        Ok(documents)
    }

    /// The `(room id or "", event type)` pairs of `user_id` changed in `(after, upto]`,
    /// each once.
    pub fn changed(
        &self,
        user_id: &UserId,
        after: u64,
        upto: u64,
    ) -> Result<Vec<(String, String)>> {
        let lower = (user_id.as_str(), after.saturating_add(1)).to_key_bytes();
        let upper = (user_id.as_str(), upto.saturating_add(1)).to_key_bytes();
        let mut seen = std::collections::HashSet::new();
        let mut changed = Vec::new();
        for item in self.changes.scan_range(lower, upper, false) {
            let (_, entry) = item?;
            if seen.insert(entry.clone()) {
                changed.push(entry);
            }
        }
        Ok(changed)
    }

    /// Stores `content` as `event_type` for `user_id`, durably, at a new stream position.
    pub fn set(
        &self,
        services: &Services,
        user_id: &UserId,
        room_id: Option<&RoomId>,
        event_type: &str,
        content: JsonValue,
    ) -> Result<u64> {
        if !content.is_object() {
            return Err(Error::bad_json("Account data content must be a JSON object"));
        }
        if event_type.is_empty() || event_type.len() > 255 {
            return Err(Error::bad_json("Event types are 1 to 255 bytes"));
        }
        if matches!(event_type, "m.fully_read" | "m.push_rules") {
            return Err(Error::new(
                ErrorKind::ServerManaged,
                format!("{event_type} cannot be set through the account data API"),
            ));
        }
        self.store(services, user_id, room_id, event_type, content)
    }

    /// Stores account data the server manages itself (`m.fully_read`, ...), without the checks
    /// that guard the client API.
    pub fn store(
        &self,
        services: &Services,
        user_id: &UserId,
        room_id: Option<&RoomId>,
        event_type: &str,
        content: JsonValue,
    ) -> Result<u64> {
        if serde_json::to_vec(&content).map_or(0, |v| v.len()) > MAX_ACCOUNT_DATA_BYTES {
            return Err(Error::new(ErrorKind::TooLarge, "Account data is too large"));
        }
        let room = room_id.map_or("", RoomId::as_str);
        let mut batch = services.db.batch();
        let pending = services.stream.next(&mut batch);
        let position = pending.position;
        services.stream.account_data.mark(user_id, position);
        self.data.put(&mut batch, &(user_id.as_str(), room, event_type), &content);
        self.changes.put(
            &mut batch,
            &(user_id.as_str(), position),
            &(room.to_owned(), event_type.to_owned()),
        );
        services.db.write(batch)?;
        drop(pending);
        services.stream.wake_at(position, [user_id]);
        Ok(position)
    }
}
