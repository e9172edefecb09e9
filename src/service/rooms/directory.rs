//! Room aliases (`#name:server` -> room) and the public room directory.

use ruma::{OwnedRoomAliasId, OwnedRoomId, OwnedUserId, RoomAliasId, RoomId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::Value as JsonValue;

use crate::{
    error::{Error, ErrorKind, Result},
    service::Services,
    storage::{Db, Table, prefix, split_key, tables},
};

/// Most aliases one room may have.
const MAX_ALIASES_PER_ROOM: usize = 100;

/// What an alias points at and who made it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AliasRecord {
    /// The room.
    pub room_id: OwnedRoomId,
    /// The user who created the alias.
    pub creator: OwnedUserId,
}

/// Aliases and directory listings.
pub struct Directory {
    db: Db,
    aliases: Table<AliasRecord>,
    room_aliases: Table<()>,
    published: Table<()>,
    /// Held across "is the alias free" and "take it" so two requests cannot both take it.
    write_lock: std::sync::Mutex<()>,
}

impl Directory {
    pub(crate) fn new(db: &Db) -> Self {
        Self {
            db: db.clone(),
            aliases: db.table(tables::ALIASES),
            room_aliases: db.table(tables::ROOM_ALIASES),
            published: db.table(tables::PUBLISHED_ROOMS),
            write_lock: std::sync::Mutex::new(()),
        }
    }

    /// The room `alias` points at, if it is one of ours.
    pub fn resolve(&self, alias: &RoomAliasId) -> Result<Option<AliasRecord>> {
        Ok(self.aliases.get(alias.as_str())?)
    }

    /// Creates `alias` for `room_id` on behalf of `creator`. `M_ROOM_IN_USE`-style conflicts
    /// are reported by the caller's choice of error through `taken`.
    pub fn create_alias(
        &self,
        services: &Services,
        alias: &RoomAliasId,
        room_id: &RoomId,
        creator: &UserId,
        taken: fn() -> Error,
    ) -> Result<()> {
        if alias.server_name() != services.server_name() {
            return Err(Error::invalid_param("Aliases can only be created on this server"));
        }
        if alias.as_str().len() > 255 {
            return Err(Error::invalid_param("Alias is too long"));
        }
        if services.rooms.room(room_id)?.is_none() {
            return Err(Error::not_found("Unknown room"));
        }
        let _guard = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.aliases.contains(alias.as_str())? {
            return Err(taken());
        }
        if self.aliases_of(room_id)?.len() >= MAX_ALIASES_PER_ROOM {
            return Err(Error::new(
                ErrorKind::ResourceLimitExceeded,
                "Too many aliases for this room",
            ));
        }
        let mut batch = self.db.batch();
        let record = AliasRecord { room_id: room_id.to_owned(), creator: creator.to_owned() };
        self.aliases.put(&mut batch, alias.as_str(), &record);
        self.room_aliases.put(&mut batch, &(room_id.as_str(), alias.as_str()), &());
        Ok(self.db.write(batch)?)
    }

    /// Removes `alias`: allowed for its creator, server admins, and members who may change the
    /// room's canonical alias.
    pub fn delete_alias(
        &self,
        services: &Services,
        alias: &RoomAliasId,
        user_id: &UserId,
        admin: bool,
    ) -> Result<()> {
        let _guard = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        let record = self.resolve(alias)?.ok_or_else(|| Error::not_found("Alias not found"))?;
        let allowed = admin
            || record.creator == user_id
            || services.rooms.may_send_state(&record.room_id, user_id, "m.room.canonical_alias")?;
        if !allowed {
            return Err(Error::forbidden("You may not delete this alias"));
        }
        let mut batch = self.db.batch();
        self.aliases.delete(&mut batch, alias.as_str());
        self.room_aliases.delete(&mut batch, &(record.room_id.as_str(), alias.as_str()));
        Ok(self.db.write(batch)?)
    }

    /// Points `alias` at `room_id` (room upgrades move aliases to the replacement room).
    pub fn move_alias(&self, alias: &RoomAliasId, room_id: &RoomId) -> Result<()> {
        let _guard = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        let Some(mut record) = self.resolve(alias)? else { return Ok(()) };
        let mut batch = self.db.batch();
        self.room_aliases.delete(&mut batch, &(record.room_id.as_str(), alias.as_str()));
        record.room_id = room_id.to_owned();
        self.aliases.put(&mut batch, alias.as_str(), &record);
        self.room_aliases.put(&mut batch, &(room_id.as_str(), alias.as_str()), &());
        Ok(self.db.write(batch)?)
    }

    /// The local aliases of `room_id`.
    pub fn aliases_of(&self, room_id: &RoomId) -> Result<Vec<OwnedRoomAliasId>> {
        let mut aliases = Vec::new();
        for item in self.room_aliases.scan_prefix(prefix(room_id.as_str())) {
            let (key, ()) = item?;
            if let Some(alias) = split_key(&key).nth(1).and_then(|a| std::str::from_utf8(a).ok()) {
                aliases.extend(RoomAliasId::parse(alias).ok());
            }
        }
        Ok(aliases)
    }

    /// Checks an `m.room.canonical_alias` content: every local alias must exist and point here.
    pub fn check_canonical_alias(
        &self,
        services: &Services,
        room_id: &RoomId,
        content: &JsonValue,
    ) -> Result<()> {
        let alias_field = content.get("alias").filter(|a| !a.is_null());
        let alt =
            content.get("alt_aliases").and_then(|a| a.as_array()).cloned().unwrap_or_default();
        for value in alias_field.into_iter().chain(alt.iter()) {
            let alias = value
                .as_str()
                .and_then(|a| RoomAliasId::parse(a).ok())
                .ok_or_else(|| Error::invalid_param("Invalid alias in m.room.canonical_alias"))?;
            if alias.server_name() != services.server_name() {
                continue;
            }
            let points_here = self.resolve(&alias)?.is_some_and(|r| r.room_id == room_id);
            if !points_here {
                return Err(Error::new(
                    ErrorKind::BadAlias,
                    format!("{alias} does not point to this room"),
                ));
            }
        }
        Ok(())
    }

    /// Lists or unlists `room_id` in the public directory.
    pub fn set_published(&self, room_id: &RoomId, published: bool) -> Result<()> {
        let mut batch = self.db.batch();
        if published {
            self.published.put(&mut batch, room_id.as_str(), &());
        } else {
            self.published.delete(&mut batch, room_id.as_str());
        }
        Ok(self.db.write(batch)?)
    }

    /// Whether `room_id` is listed.
    pub fn is_published(&self, room_id: &RoomId) -> Result<bool> {
        Ok(self.published.contains(room_id.as_str())?)
    }

    /// Every listed room.
    pub fn published_rooms(&self) -> Result<Vec<OwnedRoomId>> {
        let mut rooms = Vec::new();
        for item in self.published.scan_prefix(Vec::new()) {
            let (key, ()) = item?;
            if let Ok(room) = std::str::from_utf8(&key).map(RoomId::parse) {
                rooms.extend(room.ok());
            }
        }
        Ok(rooms)
    }
}
