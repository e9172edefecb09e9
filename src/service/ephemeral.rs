//! Receipts (kept) and typing notifications (fleeting). Receipts are stored and recorded at
//! stream positions like any change; typing lives in memory under its own serial, which starts
//! from the clock so tokens stay meaningful across restarts.

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as JsonValue, json};

use super::{Services, federation::edu, now_ms};
use crate::{
    error::Result,
    storage::{Db, Key, Table, prefix, tables},
};

/// Longest typing notification honoured.
pub const MAX_TYPING: Duration = Duration::from_secs(120);

/// One receipt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Receipt {
    /// Who.
    pub user_id: OwnedUserId,
    /// `m.read` or `m.read.private`.
    pub receipt_type: String,
    /// The thread (`main` or a thread root), if the client gave one.
    pub thread_id: Option<String>,
    /// Up to which event.
    pub event_id: ruma::OwnedEventId,
    /// When (ms since the epoch).
    pub ts: u64,
}

#[derive(Default)]
struct RoomTyping {
    serial: u64,
    users: HashMap<OwnedUserId, Instant>,
}

/// Receipts and typing.
pub struct Ephemeral {
    db: Db,
    receipts: Table<Receipt>,
    receipt_changes: Table<Receipt>,
    typing: Mutex<HashMap<OwnedRoomId, RoomTyping>>,
    typing_serial: AtomicU64,
}

impl Ephemeral {
    pub(super) fn new(db: &Db) -> Self {
        Self {
            db: db.clone(),
            receipts: db.table(tables::RECEIPTS),
            receipt_changes: db.table(tables::RECEIPT_CHANGES),
            typing: Mutex::default(),
            typing_serial: AtomicU64::new(now_ms()),
        }
    }

    /// Stores a receipt at a new stream position and wakes whoever should see it.
    pub fn set_receipt(
        &self,
        services: &Services,
        room_id: &RoomId,
        receipt: Receipt,
    ) -> Result<()> {
        let thread = receipt.thread_id.as_deref().unwrap_or_default();
        let mut batch = self.db.batch();
        let pending = services.stream.next(&mut batch);
        services.stream.rooms.mark(room_id, pending.position);
        let key =
            (room_id.as_str(), (receipt.user_id.as_str(), receipt.receipt_type.as_str(), thread));
        self.receipts.put(&mut batch, &key, &receipt);
        self.receipt_changes.put(&mut batch, &(room_id.as_str(), pending.position), &receipt);
        self.db.write(batch)?;
        let position = pending.position;
        drop(pending);
        if receipt.receipt_type == "m.read.private" {
            services.stream.wake_at(position, [&*receipt.user_id]);
        } else {
            let members = services.rooms.members(room_id)?;
            services.stream.wake_members_at(position, &members, &["join"]);
        }
        if receipt.receipt_type != "m.read.private" && services.appservices.wants_ephemeral() {
            let mut entry = json!({ "ts": receipt.ts });
            if let Some(thread) = &receipt.thread_id {
                entry["thread_id"] = json!(thread);
            }
            let content = json!({ receipt.event_id.as_str(): {
                receipt.receipt_type.as_str(): { receipt.user_id.as_str(): entry }
            }});
            let edu = json!({ "type": "m.receipt", "content": content });
            services.appservices.ephemeral(services, room_id, edu);
        }
        // Other servers in the room hear of our users' public receipts.
        if receipt.user_id.server_name() == services.server_name()
            && let Some(edu) = edu::receipt(room_id, &receipt)
        {
            edu::share_with_room(services, room_id, edu);
        }
        Ok(())
    }

    /// The `m.receipt` content for `viewer` in `room_id`: receipts changed in `(after, upto]`,
    /// or every current receipt when `after` is None. Others' private receipts are left out.
    pub fn receipts(
        &self,
        room_id: &RoomId,
        viewer: &UserId,
        after: Option<u64>,
        upto: u64,
    ) -> Result<Option<JsonValue>> {
        let receipts: Vec<Receipt> = match after {
            Some(after) => {
                let lower = (room_id.as_str(), after.saturating_add(1)).to_key_bytes();
                let upper = (room_id.as_str(), upto.saturating_add(1)).to_key_bytes();
                self.receipt_changes
                    .scan_range(lower, upper, false)
                    .map(|r| r.map(|(_, v)| v))
                    .collect::<Result<_, _>>()?
            }
            None => self
                .receipts
                .scan_prefix(prefix(room_id.as_str()))
                .map(|r| r.map(|(_, v)| v))
                .collect::<Result<_, _>>()?,
        };
        let mut content = Map::new();
        for receipt in receipts {
            if receipt.receipt_type == "m.read.private" && receipt.user_id != viewer {
                continue;
            }
            let mut entry = json!({ "ts": receipt.ts });
            if let Some(thread) = &receipt.thread_id {
                entry["thread_id"] = json!(thread);
            }
            let by_event = content.entry(receipt.event_id.to_string()).or_insert_with(|| json!({}));
            by_event[receipt.receipt_type.as_str()][receipt.user_id.as_str()] = entry;
        }
        Ok((!content.is_empty()).then(|| json!({ "type": "m.receipt", "content": content })))
    }

    /// The stream position of the newest event `user_id` has read in `room_id` (public or
    /// private receipt, unthreaded or main timeline).
    pub fn read_position(
        &self,
        services: &Services,
        room_id: &RoomId,
        user_id: &UserId,
    ) -> Result<Option<u64>> {
        self.read_position_in(services, room_id, user_id, &["", "main"])
    }

    /// The stream position of the newest event `user_id` has read in `room_id` by a public or
    /// private receipt for one of `threads` (`""` for unthreaded receipts, `main`, or a thread
    /// root).
    pub fn read_position_in(
        &self,
        services: &Services,
        room_id: &RoomId,
        user_id: &UserId,
        threads: &[&str],
    ) -> Result<Option<u64>> {
        let mut newest = None;
        for kind in ["m.read", "m.read.private"] {
            for thread in threads.iter().copied() {
                let key = (room_id.as_str(), (user_id.as_str(), kind, thread));
                if let Some(receipt) = self.receipts.get(&key)?
                    && let Some(event) = services.rooms.stored(&receipt.event_id)?
                {
                    newest = newest.max(Some(event.position));
                }
            }
        }
        Ok(newest)
    }

    /// The current ephemeral serial (typing and presence; the second part of sync tokens).
    pub fn typing_serial(&self) -> u64 {
        self.typing_serial.load(Ordering::SeqCst)
    }

    /// A new ephemeral serial, for a typing or presence change.
    pub fn bump_serial(&self) -> u64 {
        self.typing_serial.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Starts (`Some(timeout)`) or stops typing; wakes the room's members when the list changes.
    pub fn set_typing(
        &self,
        services: &Services,
        room_id: &RoomId,
        user_id: &UserId,
        timeout: Option<Duration>,
    ) -> Result<()> {
        let changed = {
            let mut typing = self.typing.lock().unwrap_or_else(|e| e.into_inner());
            let room = typing.entry(room_id.to_owned()).or_default();
            let was_typing = room.users.contains_key(user_id);
            match timeout {
                Some(timeout) => {
                    room.users.insert(user_id.to_owned(), Instant::now() + timeout.min(MAX_TYPING));
                }
                None => {
                    room.users.remove(user_id);
                }
            }
            let changed = was_typing != timeout.is_some();
            if changed {
                room.serial = self.bump_serial();
            }
            if room.users.is_empty() && !changed {
                typing.remove(room_id);
            }
            changed
        };
        if changed {
            let members = services.rooms.members(room_id)?;
            services.stream.wake(members.iter().filter(|(_, m)| m == "join").map(|(u, _)| &**u));
            if services.appservices.wants_ephemeral()
                && let Some(edu) = self.typing(room_id, Some(0))
            {
                services.appservices.ephemeral(services, room_id, edu);
            }
        }
        // Other servers in the room hear of our users typing (each renewal too: it is their
        // keep-alive) and stopping.
        if user_id.server_name() == services.server_name() && (changed || timeout.is_some()) {
            edu::share_with_room(
                services,
                room_id,
                edu::typing(room_id, user_id, timeout.is_some()),
            );
        }
        Ok(())
    }

    /// Drops expired typers of `room_id` (called when a timeout may have passed).
    pub fn expire_typing(&self, services: &Services, room_id: &RoomId) -> Result<()> {
        let expired = {
            let mut typing = self.typing.lock().unwrap_or_else(|e| e.into_inner());
            let Some(room) = typing.get_mut(room_id) else { return Ok(()) };
            let now = Instant::now();
            let before = room.users.len();
            room.users.retain(|_, until| *until > now);
            let expired = room.users.len() != before;
            if expired {
                room.serial = self.bump_serial();
            }
            expired
        };
        if expired {
            let members = services.rooms.members(room_id)?;
            services.stream.wake(members.iter().filter(|(_, m)| m == "join").map(|(u, _)| &**u));
        }
        Ok(())
    }

    /// Whether typing in `room_id` changed after serial `after` (None: unknown, so yes).
    pub fn typing_changed(&self, room_id: &RoomId, after: Option<u64>) -> bool {
        let Some(after) = after else { return true };
        let typing = self.typing.lock().unwrap_or_else(|e| e.into_inner());
        typing.get(room_id).is_some_and(|room| room.serial > after)
    }

    /// The `m.typing` event of `room_id` if it changed after serial `after` (or, with None, if
    /// anyone is typing).
    pub fn typing(&self, room_id: &RoomId, after: Option<u64>) -> Option<JsonValue> {
        let typing = self.typing.lock().unwrap_or_else(|e| e.into_inner());
        let room = typing.get(room_id)?;
        let now = Instant::now();
        let users: Vec<&str> =
            room.users.iter().filter(|(_, until)| **until > now).map(|(u, _)| u.as_str()).collect();
        let changed = match after {
            Some(after) => room.serial > after,
            None => !users.is_empty(),
        };
        changed.then(|| json!({ "type": "m.typing", "content": { "user_ids": users } }))
    }
}
