//! Server-side key backup (`/room_keys`): versions with their algorithm and auth data, and the
//! encrypted room keys stored under the current version. The server never reads the keys; it
//! only decides which copy of a session key is better to keep.

use ruma::UserId;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as JsonValue, json};

use super::Counter;
use crate::{
    error::{Error, ErrorKind, Result},
    storage::{Db, Table, prefix, split_key, tables},
};

/// Largest stored key or auth data, in bytes of JSON.
const MAX_ITEM_BYTES: usize = 64 * 1024;
/// Most sessions stored in one request.
const MAX_SESSIONS_PER_REQUEST: usize = 10_000;

/// A backup version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Version {
    /// The algorithm and auth data the client gave.
    pub algorithm: JsonValue,
    /// Changes whenever the stored keys change.
    pub etag: u64,
    /// Deleted versions keep their number but hold nothing.
    pub deleted: bool,
}

/// Key backup storage.
pub struct Backups {
    db: Db,
    versions: Table<Version>,
    keys: Table<JsonValue>,
    next_version: Counter,
    lock: std::sync::Mutex<()>,
}

fn check_size(value: &JsonValue) -> Result<()> {
    if serde_json::to_vec(value).map_or(usize::MAX, |v| v.len()) > MAX_ITEM_BYTES {
        return Err(Error::new(ErrorKind::TooLarge, "Backup data is too large"));
    }
    Ok(())
}

fn parse_version(version: &str) -> Result<u64> {
    version.parse().map_err(|_| Error::not_found("Unknown backup version"))
}

/// Whether `new` should replace `old` (the spec's order: verified, then lower first message
/// index, then fewer forwards).
fn better(new: &JsonValue, old: &JsonValue) -> bool {
    let verified = |k: &JsonValue| k["is_verified"].as_bool().unwrap_or(false);
    let index = |k: &JsonValue| k["first_message_index"].as_u64().unwrap_or(u64::MAX);
    let forwards = |k: &JsonValue| k["forwarded_count"].as_u64().unwrap_or(u64::MAX);
    (!verified(new), index(new), forwards(new)) < (!verified(old), index(old), forwards(old))
}

impl Backups {
    pub(super) fn new(db: &Db) -> Result<Self> {
        Ok(Self {
            db: db.clone(),
            versions: db.table(tables::BACKUP_VERSIONS),
            keys: db.table(tables::BACKUP_KEYS),
            next_version: Counter::new(db, "backup_version")?,
            lock: std::sync::Mutex::new(()),
        })
    }

    /// Queues removing every backup version of `user_id` and its keys in `batch` (the
    /// account is deactivated); returns how many versions and keys go.
    pub fn queue_forget_user(
        &self,
        batch: &mut crate::storage::Batch,
        user_id: &UserId,
    ) -> Result<(u64, u64)> {
        let _guard = self.guard();
        let (mut versions, mut keys) = (0, 0);
        for item in self.versions.scan_prefix(prefix(user_id.as_str())) {
            self.versions.delete_raw(batch, &item?.0);
            versions += 1;
        }
        for item in self.keys.scan_prefix(prefix(user_id.as_str())) {
            self.keys.delete_raw(batch, &item?.0);
            keys += 1;
        }
        Ok((versions, keys))
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The newest live version of `user_id`, with its number.
    fn latest(&self, user_id: &UserId) -> Result<Option<(u64, Version)>> {
        for item in self.versions.scan_prefix_rev(prefix(user_id.as_str())) {
            let (key, version) = item?;
            if version.deleted {
                continue;
            }
            // The version number is 8 raw bytes after `user 0xFF` (it may itself hold 0xFF).
            let start = user_id.as_str().len() + 1;
            let number =
                key.get(start..start + 8).and_then(|n| n.try_into().ok()).map(u64::from_be_bytes);
            return Ok(number.map(|n| (n, version)));
        }
        Ok(None)
    }

    /// Creates a version; returns its number.
    pub fn create(&self, user_id: &UserId, algorithm: JsonValue) -> Result<String> {
        check_size(&algorithm)?;
        if !algorithm.is_object() {
            return Err(Error::bad_json("The backup algorithm must be an object"));
        }
        let _guard = self.guard();
        let mut batch = self.db.batch();
        let number = self.next_version.next(&mut batch);
        self.versions.put(
            &mut batch,
            &(user_id.as_str(), number),
            &Version { algorithm, etag: 0, deleted: false },
        );
        self.db.write(batch)?;
        Ok(number.to_string())
    }

    /// A version's description (the latest when `version` is None).
    pub fn info(&self, user_id: &UserId, version: Option<&str>) -> Result<JsonValue> {
        let not_found = || Error::not_found("No backup found");
        let (number, record) = match version {
            None => self.latest(user_id)?.ok_or_else(not_found)?,
            Some(version) => self.live(user_id, version)?,
        };
        let mut info = record.algorithm.clone();
        info["version"] = json!(number.to_string());
        info["etag"] = json!(record.etag.to_string());
        info["count"] = json!(self.count(user_id, number)?);
        Ok(info)
    }

    fn count(&self, user_id: &UserId, number: u64) -> Result<u64> {
        Ok(self.keys.scan_prefix(prefix(&(user_id.as_str(), number))).count() as u64)
    }

    /// A version that exists and is not deleted, with its number.
    fn live(&self, user_id: &UserId, version: &str) -> Result<(u64, Version)> {
        let number = parse_version(version)?;
        let record = self.versions.get(&(user_id.as_str(), number))?.filter(|r| !r.deleted);
        Ok((number, record.ok_or_else(|| Error::not_found("No backup found"))?))
    }

    /// Changes a version's auth data (the algorithm must stay the same).
    pub fn update(&self, user_id: &UserId, version: &str, algorithm: JsonValue) -> Result<()> {
        check_size(&algorithm)?;
        if !algorithm.is_object() {
            return Err(Error::bad_json("The backup algorithm must be an object"));
        }
        let _guard = self.guard();
        let (number, mut record) = self.live(user_id, version)?;
        let key = (user_id.as_str(), number);
        if record.algorithm["algorithm"] != algorithm["algorithm"] {
            return Err(Error::invalid_param("The algorithm of a backup version cannot change"));
        }
        record.algorithm = algorithm;
        let mut batch = self.db.batch();
        self.versions.put(&mut batch, &key, &record);
        Ok(self.db.write(batch)?)
    }

    /// Deletes a version and its keys.
    pub fn delete(&self, user_id: &UserId, version: &str) -> Result<()> {
        let _guard = self.guard();
        let (number, mut record) = self.live(user_id, version)?;
        let key = (user_id.as_str(), number);
        record.deleted = true;
        let mut batch = self.db.batch();
        for item in self.keys.scan_prefix(prefix(&key)) {
            self.keys.delete_raw(&mut batch, &item?.0);
        }
        self.versions.put(&mut batch, &key, &record);
        Ok(self.db.write(batch)?)
    }

    /// Refuses writes to anything but the current version.
    fn current(&self, user_id: &UserId, version: &str) -> Result<(u64, Version)> {
        let latest = self.latest(user_id)?;
        match latest {
            Some((number, record)) if version == number.to_string() => Ok((number, record)),
            Some((number, _)) => Err(Error::new(
                ErrorKind::WrongRoomKeysVersion { current_version: Some(number.to_string()) },
                "That is not the current backup version",
            )),
            None => Err(Error::not_found("No backup found")),
        }
    }

    /// Stores room keys `(room, session, key)` in the current version, keeping the better copy
    /// of each session; returns `(count, etag)`.
    pub fn put_keys(
        &self,
        user_id: &UserId,
        version: &str,
        keys: Vec<(String, String, JsonValue)>,
    ) -> Result<(u64, String)> {
        if keys.len() > MAX_SESSIONS_PER_REQUEST {
            return Err(Error::invalid_param("Too many sessions in one request"));
        }
        let _guard = self.guard();
        let (number, mut record) = self.current(user_id, version)?;
        let mut batch = self.db.batch();
        let mut changed = false;
        for (room, session, key) in keys {
            check_size(&key)?;
            let slot = (user_id.as_str(), number, (room.as_str(), session.as_str()));
            if self.keys.get(&slot)?.is_none_or(|old| better(&key, &old)) {
                self.keys.put(&mut batch, &slot, &key);
                changed = true;
            }
        }
        if changed {
            record.etag += 1;
            self.versions.put(&mut batch, &(user_id.as_str(), number), &record);
            self.db.write(batch)?;
        }
        Ok((self.count(user_id, number)?, record.etag.to_string()))
    }

    /// Stored keys of a version: all, one room's, or one session's.
    pub fn get_keys(
        &self,
        user_id: &UserId,
        version: &str,
        room: Option<&str>,
        session: Option<&str>,
    ) -> Result<JsonValue> {
        let (number, _) = self.live(user_id, version)?;
        let scan = match room {
            Some(room) => prefix(&(user_id.as_str(), number, room)),
            None => prefix(&(user_id.as_str(), number)),
        };
        let mut rooms: Map<String, JsonValue> = Map::new();
        for item in self.keys.scan_prefix(scan) {
            let (key, data) = item?;
            // `user 0xFF version(8 bytes) 0xFF room 0xFF session`: skip the fixed-width part
            // before splitting, since the version bytes may contain 0xFF.
            let rest = key.get(user_id.as_str().len() + 10..).unwrap_or_default();
            let mut parts = split_key(rest).map(|p| String::from_utf8_lossy(p).into_owned());
            let (Some(room_id), Some(session_id)) = (parts.next(), parts.next()) else { continue };
            if session.is_some_and(|s| s != session_id) {
                continue;
            }
            let sessions = rooms.entry(room_id).or_insert_with(|| json!({ "sessions": {} }));
            sessions["sessions"][session_id] = data;
        }
        Ok(JsonValue::Object(rooms))
    }

    /// Deletes stored keys of the current version: all, one room's, or one session's.
    pub fn delete_keys(
        &self,
        user_id: &UserId,
        version: &str,
        room: Option<&str>,
        session: Option<&str>,
    ) -> Result<(u64, String)> {
        let _guard = self.guard();
        let (number, mut record) = self.live(user_id, version)?;
        let key = (user_id.as_str(), number);
        let mut batch = self.db.batch();
        let scan = match (room, session) {
            (Some(room), Some(session)) => prefix(&(user_id.as_str(), number, (room, session))),
            (Some(room), None) => prefix(&(user_id.as_str(), number, room)),
            _ => prefix(&key),
        };
        let exact = room.zip(session).map(|(r, s)| (user_id.as_str(), number, (r, s)));
        if let Some(exact) = &exact {
            self.keys.delete(&mut batch, exact);
        }
        for item in self.keys.scan_prefix(scan) {
            self.keys.delete_raw(&mut batch, &item?.0);
        }
        record.etag += 1;
        self.versions.put(&mut batch, &key, &record);
        self.db.write(batch)?;
        Ok((self.count(user_id, number)?, record.etag.to_string()))
    }
}
