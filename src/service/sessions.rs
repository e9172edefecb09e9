//! Devices and the tokens that act for them. Tokens are stored only as SHA-256 digests, so a
//! copy of the database does not hand out sessions, and lookups by digest do not leak a token's
//! bytes through timing.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use ruma::{DeviceId, OwnedDeviceId, OwnedUserId, UserId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{Services, now_ms, random_string};
use crate::{
    error::{Error, ErrorKind, Result},
    storage::{Batch, Db, Table, prefix, split_key, tables},
};

/// How often a device's last-seen time is written back.
const LAST_SEEN_WRITE_INTERVAL_MS: u64 = 60_000;
/// Most devices one account may have.
pub const MAX_DEVICES_PER_USER: usize = 1000;

/// A device of a user.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// Human-readable name chosen by the client or user.
    pub display_name: Option<String>,
    /// When the device was created (ms since the epoch).
    pub created_ms: u64,
    /// Digest of the device's current access token.
    pub access_token_hash: Option<String>,
    /// Digest of the device's current refresh token.
    pub refresh_token_hash: Option<String>,
    /// Digest of the refresh token replaced by the last refresh; it keeps working until the
    /// new access token is first used, so a client whose refresh response was lost can retry.
    #[serde(default)]
    pub previous_refresh_token_hash: Option<String>,
}

/// When and from where a device was last used (kept apart from the device record so recording
/// it never races with changes to the device).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastSeen {
    /// When (ms since the epoch).
    pub ts: u64,
    /// The client address.
    pub ip: Option<String>,
    /// The client's user agent.
    pub user_agent: Option<String>,
}

/// Who a token acts for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The account.
    pub user_id: OwnedUserId,
    /// The device.
    pub device_id: OwnedDeviceId,
    /// When an access token stops working (refreshable sessions only).
    pub expires_ms: Option<u64>,
    /// Digest of the token itself, compared in constant time after lookup.
    pub token_hash: String,
}

/// Tokens handed to a client for a new or refreshed session.
#[derive(Debug)]
pub struct IssuedTokens {
    /// The device the tokens belong to.
    pub device_id: OwnedDeviceId,
    /// The access token.
    pub access_token: String,
    /// The refresh token, when one was asked for.
    pub refresh_token: Option<String>,
    /// Lifetime of the access token, when it expires.
    pub expires_in: Option<Duration>,
}

/// Devices and tokens.
pub struct Sessions {
    devices: Table<DeviceRecord>,
    access_tokens: Table<TokenRecord>,
    refresh_tokens: Table<TokenRecord>,
    last_seen: Table<LastSeen>,
    access_token_ttl_ms: u64,
    last_seen_written: Mutex<HashMap<String, u64>>,
    user_locks: Vec<Mutex<()>>,
    db: Db,
}

/// The hex SHA-256 digest of a token.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn new_device_id() -> OwnedDeviceId {
    random_string(10).to_uppercase().into()
}

impl Sessions {
    pub(super) fn new(db: &Db, access_token_ttl_secs: u64) -> Self {
        Self {
            devices: db.table(tables::DEVICES),
            access_tokens: db.table(tables::ACCESS_TOKENS),
            refresh_tokens: db.table(tables::REFRESH_TOKENS),
            last_seen: db.table(tables::LAST_SEEN),
            access_token_ttl_ms: access_token_ttl_secs * 1000,
            last_seen_written: Mutex::default(),
            user_locks: (0..64).map(|_| Mutex::new(())).collect(),
            db: db.clone(),
        }
    }

    /// Serialises changes to `user_id`'s devices and tokens: hold it from reading a device
    /// record until the batch that changes it is written.
    pub fn lock_user(&self, user_id: &UserId) -> std::sync::MutexGuard<'_, ()> {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(user_id.as_str());
        let lock = &self.user_locks[(hash % self.user_locks.len() as u64) as usize];
        lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Finds who `token` acts for. Expired tokens answer `M_UNKNOWN_TOKEN` with `soft_logout`;
    /// a token whose device no longer names it (deleted, logged out, replaced) is unknown.
    pub fn authenticate(&self, token: &str) -> Result<TokenRecord> {
        let record = self.authenticate_allowing_expired(token)?;
        if record.expires_ms.is_some_and(|expires| expires <= now_ms()) {
            return Err(Error::new(
                ErrorKind::UnknownToken { soft_logout: true },
                "Access token has expired",
            ));
        }
        Ok(record)
    }

    /// Finds who `token` acts for, expired or not (logging out takes an expired token); a
    /// token whose device no longer names it is unknown.
    pub fn authenticate_allowing_expired(&self, token: &str) -> Result<TokenRecord> {
        let hash = token_hash(token);
        let unknown =
            || Error::new(ErrorKind::UnknownToken { soft_logout: false }, "Unknown access token");
        let record = self.access_tokens.get(&hash)?.ok_or_else(unknown)?;
        if !bool::from(record.token_hash.as_bytes().ct_eq(hash.as_bytes())) {
            return Err(unknown());
        }
        let key = (record.user_id.as_str(), record.device_id.as_str());
        let Some(device) = self.devices.get(&key)? else { return Err(unknown()) };
        if device.access_token_hash.as_deref() != Some(hash.as_str()) {
            return Err(unknown());
        }
        if device.previous_refresh_token_hash.is_some() {
            self.retire_previous_refresh(&record)?;
        }
        Ok(record)
    }

    /// Queues a new session for `user_id`: the device (created, or reused when `device_id`
    /// names an existing one, whose old tokens are revoked) and fresh tokens.
    pub fn issue(
        &self,
        batch: &mut Batch,
        user_id: &UserId,
        device_id: Option<&DeviceId>,
        display_name: Option<String>,
        refreshable: bool,
    ) -> Result<IssuedTokens> {
        let device_id = device_id.map(ToOwned::to_owned).unwrap_or_else(new_device_id);
        if device_id.as_str().is_empty() || device_id.as_str().len() > 255 {
            return Err(Error::invalid_param("Device ids are 1 to 255 characters"));
        }
        let mut record = match self.device(user_id, &device_id)? {
            Some(mut existing) => {
                self.revoke_tokens(batch, &existing);
                existing.previous_refresh_token_hash = None;
                if display_name.is_some() {
                    existing.display_name = display_name;
                }
                existing
            }
            None => {
                if self.devices.scan_prefix(prefix(user_id.as_str())).count()
                    >= MAX_DEVICES_PER_USER
                {
                    return Err(Error::new(
                        ErrorKind::ResourceLimitExceeded,
                        "Too many devices; remove some first",
                    ));
                }
                DeviceRecord {
                    display_name,
                    created_ms: now_ms(),
                    access_token_hash: None,
                    refresh_token_hash: None,
                    previous_refresh_token_hash: None,
                }
            }
        };
        let issued = self.put_tokens(batch, user_id, &device_id, &mut record, refreshable);
        self.devices.put(batch, &(user_id.as_str(), device_id.as_str()), &record);
        Ok(issued)
    }

    fn put_tokens(
        &self,
        batch: &mut Batch,
        user_id: &UserId,
        device_id: &DeviceId,
        record: &mut DeviceRecord,
        refreshable: bool,
    ) -> IssuedTokens {
        let access_token = format!("plz_{}", random_string(40));
        let access_hash = token_hash(&access_token);
        let expires_ms = refreshable.then(|| now_ms() + self.access_token_ttl_ms);
        let token_record = |token_hash: String, expires_ms| TokenRecord {
            user_id: user_id.to_owned(),
            device_id: device_id.to_owned(),
            expires_ms,
            token_hash,
        };
        self.access_tokens.put(batch, &access_hash, &token_record(access_hash.clone(), expires_ms));
        record.access_token_hash = Some(access_hash);

        let refresh_token = refreshable.then(|| format!("plzr_{}", random_string(40)));
        record.refresh_token_hash = refresh_token.as_deref().map(token_hash);
        if let Some(hash) = &record.refresh_token_hash {
            self.refresh_tokens.put(batch, hash, &token_record(hash.clone(), None));
        }
        IssuedTokens {
            device_id: device_id.to_owned(),
            access_token,
            refresh_token,
            expires_in: refreshable.then(|| Duration::from_millis(self.access_token_ttl_ms)),
        }
    }

    /// The new access token of a refreshed session was used: the old refresh token goes.
    fn retire_previous_refresh(&self, token: &TokenRecord) -> Result<()> {
        let _guard = self.lock_user(&token.user_id);
        let key = (token.user_id.as_str(), token.device_id.as_str());
        let Some(mut device) = self.devices.get(&key)? else { return Ok(()) };
        if device.access_token_hash.as_deref() != Some(token.token_hash.as_str()) {
            return Ok(()); // a retried refresh replaced this token meanwhile
        }
        let Some(previous) = device.previous_refresh_token_hash.take() else { return Ok(()) };
        let mut batch = self.db.batch();
        self.refresh_tokens.delete(&mut batch, &previous);
        self.devices.put(&mut batch, &key, &device);
        Ok(self.db.write(batch)?)
    }

    fn revoke_tokens(&self, batch: &mut Batch, record: &DeviceRecord) {
        if let Some(hash) = &record.previous_refresh_token_hash {
            self.refresh_tokens.delete(batch, hash);
        }
        if let Some(hash) = &record.access_token_hash {
            self.access_tokens.delete(batch, hash);
        }
        if let Some(hash) = &record.refresh_token_hash {
            self.refresh_tokens.delete(batch, hash);
        }
    }

    /// Exchanges a refresh token for new tokens; the old pair stops working.
    pub fn refresh(&self, refresh_token: &str) -> Result<IssuedTokens> {
        let hash = token_hash(refresh_token);
        let unknown =
            || Error::new(ErrorKind::UnknownToken { soft_logout: false }, "Unknown refresh token");
        let token = self.refresh_tokens.get(&hash)?.ok_or_else(unknown)?;
        let _guard = self.lock_user(&token.user_id);
        let mut record = self.device(&token.user_id, &token.device_id)?.ok_or_else(unknown)?;
        let is_current = record.refresh_token_hash.as_deref() == Some(hash.as_str());
        let is_previous = record.previous_refresh_token_hash.as_deref() == Some(hash.as_str());
        if !is_current && !is_previous {
            return Err(unknown());
        }
        let mut batch = self.db.batch();
        if let Some(access) = record.access_token_hash.take() {
            self.access_tokens.delete(&mut batch, &access);
        }
        if is_current {
            // The presented token stays usable until the new pair is used; an older one goes.
            if let Some(older) = record.previous_refresh_token_hash.take() {
                self.refresh_tokens.delete(&mut batch, &older);
            }
            record.previous_refresh_token_hash = record.refresh_token_hash.take();
        } else if let Some(unused) = record.refresh_token_hash.take() {
            // A retry with the previous token: the pair it replaced was never used.
            self.refresh_tokens.delete(&mut batch, &unused);
        }
        let issued =
            self.put_tokens(&mut batch, &token.user_id, &token.device_id, &mut record, true);
        self.devices.put(&mut batch, &(token.user_id.as_str(), token.device_id.as_str()), &record);
        self.db.write(batch)?;
        Ok(issued)
    }

    /// Queues a device with no tokens (a dehydrated device, held by the server for a client
    /// that is offline).
    pub fn put_tokenless_device(
        &self,
        batch: &mut Batch,
        user_id: &UserId,
        device_id: &DeviceId,
        display_name: Option<String>,
    ) {
        let record = DeviceRecord {
            display_name,
            created_ms: now_ms(),
            access_token_hash: None,
            refresh_token_hash: None,
            previous_refresh_token_hash: None,
        };
        self.devices.put(batch, &(user_id.as_str(), device_id.as_str()), &record);
    }

    /// The device `device_id` of `user_id`.
    pub fn device(&self, user_id: &UserId, device_id: &DeviceId) -> Result<Option<DeviceRecord>> {
        Ok(self.devices.get(&(user_id.as_str(), device_id.as_str()))?)
    }

    /// All devices of `user_id`.
    pub fn devices(&self, user_id: &UserId) -> Result<Vec<(OwnedDeviceId, DeviceRecord)>> {
        self.devices
            .scan_prefix(prefix(user_id.as_str()))
            .map(|item| {
                let (key, record) = item?;
                let device_id = split_key(&key).nth(1).unwrap_or_default();
                Ok((String::from_utf8_lossy(device_id).as_ref().into(), record))
            })
            .collect()
    }

    /// Renames a device.
    pub fn rename(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        name: Option<String>,
    ) -> Result<()> {
        if name.as_ref().is_some_and(|n| n.len() > 255) {
            return Err(Error::invalid_param("Device names are at most 255 bytes"));
        }
        let _guard = self.lock_user(user_id);
        let mut record =
            self.device(user_id, device_id)?.ok_or_else(|| Error::not_found("No such device"))?;
        record.display_name = name;
        let mut batch = self.db.batch();
        self.devices.put(&mut batch, &(user_id.as_str(), device_id.as_str()), &record);
        Ok(self.db.write(batch)?)
    }

    /// Queues the deletion of devices, their tokens and the transaction ids they used (room
    /// sends, server notices and to-device sends, kept by the rooms and E2EE services: a
    /// device's ids mean nothing once it is gone, and keeping them would grow without end).
    /// Unknown ids are ignored.
    pub fn delete_devices<'a>(
        &self,
        services: &Services,
        batch: &mut Batch,
        user_id: &UserId,
        device_ids: impl IntoIterator<Item = &'a DeviceId>,
    ) -> Result<()> {
        for device_id in device_ids {
            if let Some(record) = self.device(user_id, device_id)? {
                self.revoke_tokens(batch, &record);
                self.devices.delete(batch, &(user_id.as_str(), device_id.as_str()));
                self.last_seen.delete(batch, &(user_id.as_str(), device_id.as_str()));
                services.rooms.forget_device_txns(batch, user_id, device_id);
                services.e2ee.forget_device_txns(batch, user_id, device_id);
            }
        }
        Ok(())
    }

    /// Queues the deletion of every device of `user_id` except `keep`.
    pub fn delete_all_devices(
        &self,
        services: &Services,
        batch: &mut Batch,
        user_id: &UserId,
        keep: Option<&DeviceId>,
    ) -> Result<()> {
        let devices = self.devices(user_id)?;
        let ids = devices.iter().map(|(id, _)| &**id).filter(|id| Some(*id) != keep);
        self.delete_devices(services, batch, user_id, ids)
    }

    /// Records that a device made a request, writing it down at most once a minute.
    pub fn touch(&self, token: &TokenRecord, ip: Option<String>, user_agent: Option<String>) {
        let now = now_ms();
        {
            let mut written = self.last_seen_written.lock().unwrap_or_else(|e| e.into_inner());
            let last = written.entry(token.token_hash.clone()).or_insert(0);
            if now.saturating_sub(*last) < LAST_SEEN_WRITE_INTERVAL_MS {
                return;
            }
            *last = now;
            if written.len() > 100_000 {
                written.retain(|_, seen| now.saturating_sub(*seen) < LAST_SEEN_WRITE_INTERVAL_MS);
            }
        }
        let key = (token.user_id.as_str(), token.device_id.as_str());
        let mut batch = self.db.batch();
        self.last_seen.put(&mut batch, &key, &LastSeen { ts: now, ip, user_agent });
        if let Err(err) = self.db.write(batch) {
            tracing::warn!(%err, "could not record last-seen time");
        }
    }

    /// When and from where a device was last used.
    pub fn last_seen(&self, user_id: &UserId, device_id: &DeviceId) -> Result<Option<LastSeen>> {
        Ok(self.last_seen.get(&(user_id.as_str(), device_id.as_str()))?)
    }
}
