//! End-to-end encryption support: device keys, one-time and fallback keys, cross-signing keys,
//! device-list changes and to-device messages. The server never sees plaintext; it stores and
//! hands out what clients publish, exactly once where the spec says once.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Mutex,
};

use ruma::{DeviceId, OwnedDeviceId, OwnedUserId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as JsonValue, json};

use super::{Services, federation::updates};
use crate::{
    error::{Error, ErrorKind, Result},
    storage::{Batch, Db, Key, Table, prefix, split_key, tables},
};

/// Most unclaimed one-time keys kept per device.
const MAX_ONE_TIME_KEYS: usize = 1000;
/// Most to-device messages handed to a device in one sync; the rest follow in the next one.
const MAX_TO_DEVICE: usize = 100;
/// Largest key object accepted, in bytes of JSON.
const MAX_KEY_BYTES: usize = 16 * 1024;

/// A published fallback key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FallbackKey {
    /// `algorithm:key id`.
    pub key_id: String,
    /// The signed key object.
    pub key: JsonValue,
    /// Whether it has been handed out since it was uploaded.
    pub used: bool,
}

/// A to-device message waiting for its device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ToDevice {
    /// The sender.
    pub sender: OwnedUserId,
    /// The event type.
    #[serde(rename = "type")]
    pub kind: String,
    /// The content.
    pub content: JsonValue,
}

/// Where a local user's device list stands for other servers: each change they are told of
/// carries the next stream id and names the one before, so they can tell when they missed one.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeviceListStream {
    /// The stream id of the last change told (0: none yet).
    pub stream_id: u64,
    /// The devices other servers were told of and not told are gone.
    pub devices: BTreeSet<OwnedDeviceId>,
}

/// One device's change as other servers are told of it.
#[derive(Debug, Clone)]
pub struct DeviceUpdate {
    /// The device added, changed or deleted.
    pub device_id: OwnedDeviceId,
    /// Its stream id.
    pub stream_id: u64,
    /// The stream id before it, when there was one.
    pub prev_id: Option<u64>,
}

/// E2EE key storage.
pub struct E2ee {
    db: Db,
    device_keys: Table<JsonValue>,
    one_time_keys: Table<JsonValue>,
    fallback_keys: Table<FallbackKey>,
    cross_signing: Table<JsonValue>,
    key_changes: Table<OwnedUserId>,
    to_device: Table<ToDevice>,
    to_device_txns: Table<()>,
    device_lists: Table<DeviceListStream>,
    /// Serialises the device-list stream ids handed out.
    device_list_lock: Mutex<()>,
    /// Serialises claims so each one-time key goes to exactly one claimer.
    claim_lock: Mutex<()>,
}

fn check_size(value: &JsonValue) -> Result<()> {
    if serde_json::to_vec(value).map_or(usize::MAX, |v| v.len()) > MAX_KEY_BYTES {
        return Err(Error::new(ErrorKind::TooLarge, "Key object is too large"));
    }
    Ok(())
}

impl E2ee {
    pub(super) fn new(db: &Db) -> Self {
        Self {
            db: db.clone(),
            device_keys: db.table(tables::DEVICE_KEYS),
            one_time_keys: db.table(tables::ONE_TIME_KEYS),
            fallback_keys: db.table(tables::FALLBACK_KEYS),
            cross_signing: db.table(tables::CROSS_SIGNING_KEYS),
            key_changes: db.table(tables::KEY_CHANGES),
            to_device: db.table(tables::TO_DEVICE),
            to_device_txns: db.table(tables::TO_DEVICE_TXNS),
            device_lists: db.table(tables::DEVICE_LIST_STREAMS),
            device_list_lock: Mutex::new(()),
            claim_lock: Mutex::new(()),
        }
    }

    /// Stores what a device publishes about itself; returns its one-time key counts.
    pub fn upload(
        &self,
        services: &Services,
        user_id: &UserId,
        device_id: &DeviceId,
        device_keys: Option<JsonValue>,
        one_time_keys: BTreeMap<String, JsonValue>,
        fallback_keys: BTreeMap<String, JsonValue>,
    ) -> Result<BTreeMap<String, u64>> {
        let mut batch = self.db.batch();
        let mut changed = false;
        if let Some(keys) = device_keys {
            check_size(&keys)?;
            if keys.get("user_id").and_then(|u| u.as_str()) != Some(user_id.as_str())
                || keys.get("device_id").and_then(|d| d.as_str()) != Some(device_id.as_str())
            {
                return Err(Error::invalid_param("Device keys are for another user or device"));
            }
            let current = self.device_keys.get(&(user_id.as_str(), device_id.as_str()))?;
            if current.as_ref() != Some(&keys) {
                self.device_keys.put(&mut batch, &(user_id.as_str(), device_id.as_str()), &keys);
                changed = true;
            }
        }
        let existing = self.counts(user_id, device_id)?.values().sum::<u64>() as usize;
        if existing + one_time_keys.len() > MAX_ONE_TIME_KEYS {
            return Err(Error::new(ErrorKind::ResourceLimitExceeded, "Too many one-time keys"));
        }
        for (key_id, key) in &one_time_keys {
            check_size(key)?;
            if !key_id.contains(':') {
                return Err(Error::invalid_param(format!("Invalid one-time key id {key_id}")));
            }
            self.one_time_keys.put(
                &mut batch,
                &(user_id.as_str(), device_id.as_str(), key_id.as_str()),
                key,
            );
        }
        for (key_id, key) in fallback_keys {
            check_size(&key)?;
            let Some((algorithm, _)) = key_id.split_once(':') else {
                return Err(Error::invalid_param(format!("Invalid fallback key id {key_id}")));
            };
            let record = FallbackKey { key_id: key_id.clone(), key, used: false };
            self.fallback_keys.put(
                &mut batch,
                &(user_id.as_str(), device_id.as_str(), algorithm),
                &record,
            );
        }
        if changed {
            self.commit_change(services, batch, user_id, &[device_id.to_owned()])?;
        } else {
            self.db.write(batch)?;
        }
        self.counts(user_id, device_id)
    }

    /// Records that `user_id`'s keys changed (a device or cross-signing key came or went), for
    /// room-mates' `device_lists.changed`.
    pub fn note_change(&self, services: &Services, user_id: &UserId) -> Result<()> {
        self.commit_change(services, self.db.batch(), user_id, &[])
    }

    /// Records that `devices` of `user_id` were added, renamed, deleted or given new keys:
    /// room-mates see the user in `device_lists.changed`, and for a local user the other
    /// servers sharing a room are told of each device.
    pub fn devices_changed(
        &self,
        services: &Services,
        user_id: &UserId,
        devices: &[OwnedDeviceId],
    ) -> Result<()> {
        self.commit_change(services, self.db.batch(), user_id, devices)
    }

    /// Records that local user `user_id`'s cross-signing keys changed (new keys or new
    /// signatures on them): room-mates and the other servers sharing a room are told.
    pub fn cross_signing_changed(&self, services: &Services, user_id: &UserId) -> Result<()> {
        self.note_change(services, user_id)?;
        if user_id.server_name() == services.server_name() {
            updates::announce_cross_signing(services, user_id);
        }
        Ok(())
    }

    /// Writes `batch` with a key change of `user_id` (and, for a local user, the next
    /// device-list stream ids of `devices`), then wakes room-mates and tells other servers.
    fn commit_change(
        &self,
        services: &Services,
        mut batch: Batch,
        user_id: &UserId,
        devices: &[OwnedDeviceId],
    ) -> Result<()> {
        let announce = !devices.is_empty() && user_id.server_name() == services.server_name();
        let guard =
            announce.then(|| self.device_list_lock.lock().unwrap_or_else(|e| e.into_inner()));
        let device_updates = if announce {
            self.queue_stream_ids(services, &mut batch, user_id, devices)?
        } else {
            Vec::new()
        };
        let pending = services.stream.next(&mut batch);
        services.stream.key_changes.mark(&(), pending.position);
        self.key_changes.put(&mut batch, &pending.position, &user_id.to_owned());
        self.db.write(batch)?;
        let position = pending.position;
        drop(pending);
        // Queued under the lock, so each server gets a user's updates in stream id order; read
        // from the devices as written, and durable before the change is acknowledged.
        if !device_updates.is_empty() {
            updates::announce_devices(services, user_id, &device_updates);
        }
        drop(guard);
        self.wake_room_mates(services, user_id, position)
    }

    /// Queues in `batch` the next stream id of each of `devices` of local user `user_id`, each
    /// naming the one before; hold `device_list_lock` until the batch is written.
    fn queue_stream_ids(
        &self,
        services: &Services,
        batch: &mut Batch,
        user_id: &UserId,
        devices: &[OwnedDeviceId],
    ) -> Result<Vec<DeviceUpdate>> {
        let mut stream = self.device_lists.get(user_id.as_str())?.unwrap_or_default();
        let mut device_updates = Vec::with_capacity(devices.len());
        for device_id in devices {
            let prev_id = (stream.stream_id > 0).then_some(stream.stream_id);
            stream.stream_id += 1;
            if services.sessions.device(user_id, device_id)?.is_some() {
                stream.devices.insert(device_id.clone());
            } else {
                stream.devices.remove(device_id);
            }
            device_updates.push(DeviceUpdate {
                device_id: device_id.clone(),
                stream_id: stream.stream_id,
                prev_id,
            });
        }
        self.device_lists.put(batch, user_id.as_str(), &stream);
        Ok(device_updates)
    }

    /// The device-list stream id of local user `user_id` other servers were last told of
    /// (0 when none); read it before the devices it stands for.
    pub fn device_list_stream_id(&self, user_id: &UserId) -> Result<u64> {
        Ok(self.device_lists.get(user_id.as_str())?.map_or(0, |stream| stream.stream_id))
    }

    fn wake_room_mates(&self, services: &Services, user_id: &UserId, position: u64) -> Result<()> {
        let mates = services.rooms.room_mates(user_id)?;
        services.stream.wake_at(position, mates.iter().map(|u| &**u));
        Ok(())
    }

    /// Unclaimed one-time keys of a device, by algorithm.
    pub fn counts(&self, user_id: &UserId, device_id: &DeviceId) -> Result<BTreeMap<String, u64>> {
        let mut counts = BTreeMap::new();
        for item in self.one_time_keys.scan_prefix(prefix(&(user_id.as_str(), device_id.as_str())))
        {
            let (key, _) = item?;
            let key_id = split_key(&key)
                .nth(2)
                .and_then(|k| std::str::from_utf8(k).ok())
                .unwrap_or_default();
            if let Some((algorithm, _)) = key_id.split_once(':') {
                *counts.entry(algorithm.to_owned()).or_insert(0) += 1;
            }
        }
        Ok(counts)
    }

    /// Fallback key algorithms of a device not handed out yet.
    pub fn unused_fallback_types(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
    ) -> Result<Vec<String>> {
        let mut types = Vec::new();
        for item in self.fallback_keys.scan_prefix(prefix(&(user_id.as_str(), device_id.as_str())))
        {
            let (_, record) = item?;
            if !record.used {
                types.extend(record.key_id.split_once(':').map(|(a, _)| a.to_owned()));
            }
        }
        Ok(types)
    }

    /// The published keys of a device.
    pub fn device_keys(&self, user_id: &UserId, device_id: &DeviceId) -> Result<Option<JsonValue>> {
        Ok(self.device_keys.get(&(user_id.as_str(), device_id.as_str()))?)
    }

    /// After devices of `user_id` were deleted: drops their keys, one-time and fallback keys
    /// and queued to-device messages, and tells room-mates (and other servers) the device
    /// list changed.
    pub fn forget_deleted_devices(&self, services: &Services, user_id: &UserId) -> Result<()> {
        services.pushers.forget_deleted_devices(services, user_id)?;
        let mut batch = self.db.batch();
        let mut gone: BTreeSet<OwnedDeviceId> = BTreeSet::new();
        for item in self.device_keys.scan_prefix(prefix(user_id.as_str())) {
            let (key, _) = item?;
            let Some(device) = split_key(&key).nth(1).and_then(|d| std::str::from_utf8(d).ok())
            else {
                continue;
            };
            if services.sessions.device(user_id, device.into())?.is_none() {
                gone.insert(device.into());
            }
        }
        for device in &gone {
            let device = (user_id.as_str(), device.as_str());
            self.device_keys.delete(&mut batch, &device);
            for item in self.one_time_keys.scan_prefix(prefix(&device)) {
                self.one_time_keys.delete_raw(&mut batch, &item?.0);
            }
            for item in self.fallback_keys.scan_prefix(prefix(&device)) {
                self.fallback_keys.delete_raw(&mut batch, &item?.0);
            }
            for item in self.to_device.scan_prefix(prefix(&device)) {
                self.to_device.delete_raw(&mut batch, &item?.0);
            }
        }
        // Devices other servers were told of that had no keys go too.
        for device in self.device_lists.get(user_id.as_str())?.unwrap_or_default().devices {
            if services.sessions.device(user_id, &device)?.is_none() {
                gone.insert(device);
            }
        }
        let gone: Vec<OwnedDeviceId> = gone.into_iter().collect();
        self.commit_change(services, batch, user_id, &gone)
    }

    /// Queues, in `batch`, the removal of every device key, one-time key, fallback key and
    /// queued to-device message of `user_id` (a deactivation); returns how many one-time keys
    /// and to-device messages went.
    pub fn queue_forget_user(&self, batch: &mut Batch, user_id: &UserId) -> Result<(u64, u64)> {
        let user = prefix(user_id.as_str());
        // Tables whose rows are not counted go with one range delete each.
        self.device_keys.delete_prefix(batch, user.clone());
        self.fallback_keys.delete_prefix(batch, user.clone());
        self.cross_signing.delete_prefix(batch, user.clone());
        self.to_device_txns.delete_prefix(batch, user.clone());
        let mut one_time_keys = 0;
        for item in self.one_time_keys.scan_prefix(user.clone()) {
            self.one_time_keys.delete_raw(batch, &item?.0);
            one_time_keys += 1;
        }
        let mut to_device = 0;
        for item in self.to_device.scan_prefix(user) {
            self.to_device.delete_raw(batch, &item?.0);
            to_device += 1;
        }
        Ok((one_time_keys, to_device))
    }

    /// Queues the removal of the to-device transaction ids `device_id` of `user_id` used (the
    /// device is being deleted; its ids mean nothing without it).
    pub fn forget_device_txns(&self, batch: &mut Batch, user_id: &UserId, device_id: &DeviceId) {
        self.to_device_txns.delete_prefix(batch, prefix(&(user_id.as_str(), device_id.as_str())));
    }

    /// Hands out one one-time key of `algorithm` for a device (falling back to its fallback
    /// key), each one-time key exactly once.
    pub fn claim(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        algorithm: &str,
    ) -> Result<Option<(String, JsonValue)>> {
        let _guard = self.claim_lock.lock().unwrap_or_else(|e| e.into_inner());
        let key_prefix = {
            let mut p = prefix(&(user_id.as_str(), device_id.as_str()));
            p.extend_from_slice(algorithm.as_bytes());
            p.push(b':');
            p
        };
        if let Some(item) = self.one_time_keys.scan_prefix(key_prefix).next() {
            let (raw_key, key) = item?;
            let key_id = split_key(&raw_key)
                .nth(2)
                .and_then(|k| std::str::from_utf8(k).ok())
                .unwrap_or_default()
                .to_owned();
            let mut batch = self.db.batch();
            self.one_time_keys.delete_raw(&mut batch, &raw_key);
            self.db.write(batch)?;
            return Ok(Some((key_id, key)));
        }
        let fallback_key = (user_id.as_str(), device_id.as_str(), algorithm);
        if let Some(mut fallback) = self.fallback_keys.get(&fallback_key)? {
            if !fallback.used {
                fallback.used = true;
                let mut batch = self.db.batch();
                self.fallback_keys.put(&mut batch, &fallback_key, &fallback);
                self.db.write(batch)?;
            }
            return Ok(Some((fallback.key_id, fallback.key)));
        }
        Ok(None)
    }

    /// Stores a cross-signing key (`master`, `self_signing`, `user_signing`).
    pub fn put_cross_signing(&self, user_id: &UserId, kind: &str, key: &JsonValue) -> Result<()> {
        check_size(key)?;
        if key.get("user_id").and_then(|u| u.as_str()) != Some(user_id.as_str()) {
            return Err(Error::invalid_param("Cross-signing key is for another user"));
        }
        let mut batch = self.db.batch();
        self.cross_signing.put(&mut batch, &(user_id.as_str(), kind), key);
        Ok(self.db.write(batch)?)
    }

    /// A cross-signing key of `user_id`.
    pub fn cross_signing(&self, user_id: &UserId, kind: &str) -> Result<Option<JsonValue>> {
        Ok(self.cross_signing.get(&(user_id.as_str(), kind))?)
    }

    /// The stored key object a signature upload names: a device of `user_id`, or one of its
    /// cross-signing keys by public key.
    pub fn signable(&self, user_id: &UserId, key_id: &str) -> Result<Option<JsonValue>> {
        if let Some(key) = self.device_keys.get(&(user_id.as_str(), key_id))? {
            return Ok(Some(key));
        }
        for kind in ["master", "self_signing", "user_signing"] {
            if let Some(key) = self.cross_signing(user_id, kind)?
                && key["keys"]
                    .as_object()
                    .is_some_and(|keys| keys.values().any(|v| v.as_str() == Some(key_id)))
            {
                return Ok(Some(key));
            }
        }
        Ok(None)
    }

    /// Adds `signatures` (by `signer`) to a device key or cross-signing key of `user_id`.
    pub fn add_signatures(
        &self,
        user_id: &UserId,
        key_id: &str,
        signer: &UserId,
        signatures: &JsonValue,
    ) -> Result<()> {
        let add = |target: &mut JsonValue| {
            if !target["signatures"].is_object() {
                target["signatures"] = json!({});
            }
            let slot = &mut target["signatures"][signer.as_str()];
            if !slot.is_object() {
                *slot = json!({});
            }
            if let (Some(slot), Some(new)) = (slot.as_object_mut(), signatures.as_object()) {
                slot.extend(new.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
        };
        let mut batch = self.db.batch();
        if let Some(mut key) = self.device_keys.get(&(user_id.as_str(), key_id))? {
            add(&mut key);
            self.device_keys.put(&mut batch, &(user_id.as_str(), key_id), &key);
        } else {
            let mut found = false;
            for kind in ["master", "self_signing", "user_signing"] {
                if let Some(mut key) = self.cross_signing(user_id, kind)? {
                    let public = key
                        .get("keys")
                        .and_then(|k| k.as_object())
                        .is_some_and(|keys| keys.values().any(|v| v.as_str() == Some(key_id)));
                    if public {
                        add(&mut key);
                        self.cross_signing.put(&mut batch, &(user_id.as_str(), kind), &key);
                        found = true;
                    }
                }
            }
            if !found {
                return Err(Error::not_found(format!("No key {key_id} for {user_id}")));
            }
        }
        Ok(self.db.write(batch)?)
    }

    /// Users whose keys changed in `(after, upto]`.
    pub fn changed_users(&self, after: u64, upto: u64) -> Result<BTreeSet<OwnedUserId>> {
        let lower = after.saturating_add(1).to_key_bytes();
        let upper = upto.saturating_add(1).to_key_bytes();
        self.key_changes.scan_range(lower, upper, false).map(|item| Ok(item?.1)).collect()
    }

    /// Queues to-device messages of type `kind` and wakes the receiving users. Transaction
    /// ids are scoped to the sending device and the endpoint path (`/sendToDevice/{kind}/`), so
    /// a repeated id of the same device and type does nothing, and the same id with another
    /// type is another request.
    pub fn send_to_device(
        &self,
        services: &Services,
        (sender, sender_device, txn_id): (&UserId, &DeviceId, &str),
        kind: &str,
        messages: Vec<(OwnedUserId, Vec<ruma::OwnedDeviceId>, JsonValue)>,
    ) -> Result<()> {
        let txn = (sender.as_str(), sender_device.as_str(), (kind, txn_id));
        let _guard = self.claim_lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.to_device_txns.contains(&txn)? {
            return Ok(());
        }
        let mut batch = self.db.batch();
        self.to_device_txns.put(&mut batch, &txn, &());
        let mut pendings = Vec::new();
        let mut woken = BTreeSet::new();
        for (user, devices, content) in messages {
            check_size(&content)?;
            for device in devices {
                let pending = services.stream.next(&mut batch);
                let message = ToDevice {
                    sender: sender.to_owned(),
                    kind: kind.to_owned(),
                    content: content.clone(),
                };
                self.to_device.put(
                    &mut batch,
                    &(user.as_str(), device.as_str(), pending.position),
                    &message,
                );
                pendings.push(pending);
            }
            woken.insert(user);
        }
        self.db.write(batch)?;
        let position = pendings.iter().map(|p| p.position).max().unwrap_or_default();
        drop(pendings);
        services.stream.wake_at(position, woken.iter().map(|u| &**u));
        Ok(())
    }

    /// To-device messages for a device up to `upto` (at most a page of them), after deleting
    /// those up to `acknowledged` (the client's token proves it received them). Returns the
    /// messages and the position delivered up to, which the next token must carry.
    pub fn take_to_device(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        acknowledged: Option<u64>,
        upto: u64,
    ) -> Result<(Vec<JsonValue>, u64)> {
        let device = (user_id.as_str(), device_id.as_str());
        if let Some(acknowledged) = acknowledged {
            let lower = prefix(&device);
            let upper = (user_id.as_str(), device_id.as_str(), acknowledged.saturating_add(1))
                .to_key_bytes();
            let mut batch = self.db.batch();
            for item in self.to_device.scan_range(lower, upper, false) {
                self.to_device.delete_raw(&mut batch, &item?.0);
            }
            if !batch.is_empty() {
                self.db.write(batch)?;
            }
        }
        let lower = prefix(&device);
        let upper = (user_id.as_str(), device_id.as_str(), upto.saturating_add(1)).to_key_bytes();
        let mut messages = Vec::new();
        let mut delivered_upto = upto;
        for item in self.to_device.scan_range(lower, upper, false) {
            let (key, message) = item?;
            if messages.len() == MAX_TO_DEVICE {
                // Stop before this one; the next sync continues from here.
                let tail = key.len().saturating_sub(8);
                let position =
                    key.get(tail..).and_then(|p| p.try_into().ok()).map(u64::from_be_bytes);
                delivered_upto = position.unwrap_or(upto).saturating_sub(1);
                break;
            }
            let mut event = Map::new();
            event.insert("sender".into(), json!(message.sender));
            event.insert("type".into(), json!(message.kind));
            event.insert("content".into(), message.content);
            messages.push(JsonValue::Object(event));
        }
        Ok((messages, delivered_upto))
    }
}
