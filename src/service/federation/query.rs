//! Lookups of other servers' users and aliases for local clients: profiles (cached briefly),
//! room aliases, and end-to-end keys (device lists cached until the owner's server says they
//! changed). Each answer is bounded in time and size; an unreachable server is reported, not
//! waited on. Cached device lists and their stale marks are stored, so a restart neither
//! forgets that a list changed nor serves a list dropped as stale.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use ruma::{
    OneTimeKeyAlgorithm, OwnedDeviceId, OwnedRoomId, OwnedServerName, OwnedUserId, RoomAliasId,
    ServerName, UserId,
    api::federation::{
        keys::{claim_keys, get_keys},
        query::{get_profile_information, get_room_information},
    },
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as JsonValue, json};

use super::SendError;
use crate::{
    error::{Error, Result},
    service::{Services, now_ms, users::Profile},
    storage::{Db, StorageError, Table, tables},
};

/// How long a remote profile is reused.
const PROFILE_TTL: Duration = Duration::from_secs(60);
/// How long a remote user's device keys are reused when no update says they changed.
const DEVICES_TTL: Duration = Duration::from_secs(600);
/// Most entries of each cache.
const MAX_CACHED: usize = 10_000;
/// How long one server gets to answer a query.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// A remote user's keys as last fetched from their server.
#[derive(Clone, Serialize, Deserialize)]
struct CachedDevices {
    /// When they were fetched (ms since the epoch).
    fetched_ms: u64,
    /// Device id to signed device keys.
    devices: Map<String, JsonValue>,
    master: Option<JsonValue>,
    self_signing: Option<JsonValue>,
}

impl CachedDevices {
    fn fresh(&self, now: u64) -> bool {
        now.saturating_sub(self.fetched_ms) < DEVICES_TTL.as_millis() as u64
    }
}

/// The caches of remote answers.
pub struct RemoteQueries {
    profiles: Mutex<HashMap<OwnedUserId, (Instant, Profile)>>,
    db: Db,
    /// Device lists by user, stored; a row dropped is a list marked stale.
    devices: Table<CachedDevices>,
    /// Rows of `devices`, about.
    devices_cached: AtomicUsize,
    /// Counts stale marks, so a fetch that raced one is answered but not cached.
    stale_marks: AtomicU64,
    /// Held while a stale mark is written and while a fetch is cached, so neither overtakes
    /// the other.
    marking: Mutex<()>,
    /// Other servers' media fetched for local clients.
    pub media: super::media::RemoteMedia,
    /// Other servers' descriptions of rooms in spaces.
    pub spaces: super::hierarchy::RemoteSpaces,
}

/// Keys of remote users as a client `/keys/query` answers them.
#[derive(Default)]
pub struct RemoteKeys {
    /// User id to device id to keys.
    pub device_keys: Map<String, JsonValue>,
    /// User id to master key.
    pub master_keys: Map<String, JsonValue>,
    /// User id to self-signing key.
    pub self_signing_keys: Map<String, JsonValue>,
    /// Server name to why it did not answer.
    pub failures: Map<String, JsonValue>,
}

/// The `failures` entry for a server that did not answer.
pub fn failure(err: &SendError) -> JsonValue {
    match err {
        SendError::Remote { status, message, .. } => {
            json!({ "status": status, "message": message })
        }
        _ => json!({ "status": 503, "message": err.to_string() }),
    }
}

fn timed_out(destination: &ServerName) -> SendError {
    SendError::Unreachable {
        destination: destination.to_owned(),
        reason: "no answer in time".to_owned(),
    }
}

/// Inserts into a bounded cache, dropping expired entries (or everything) when full.
fn bounded_insert<K: std::hash::Hash + Eq, V>(
    map: &mut HashMap<K, V>,
    key: K,
    value: V,
    expired: impl Fn(&V) -> bool,
) {
    if map.len() >= MAX_CACHED {
        map.retain(|_, v| !expired(v));
        if map.len() >= MAX_CACHED {
            map.clear();
        }
    }
    map.insert(key, value);
}

impl RemoteQueries {
    /// The caches, with the device lists stored in `db` (those past their time dropped).
    pub fn new(db: &Db) -> Result<Self, StorageError> {
        let devices: Table<CachedDevices> = db.table(tables::REMOTE_DEVICE_LISTS);
        let cached = prune_devices(db, &devices)?;
        Ok(Self {
            profiles: Mutex::default(),
            db: db.clone(),
            devices,
            devices_cached: AtomicUsize::new(cached),
            stale_marks: AtomicU64::new(0),
            marking: Mutex::new(()),
            media: super::media::RemoteMedia::default(),
            spaces: super::hierarchy::RemoteSpaces::default(),
        })
    }

    /// The profile of a user of another server, from the cache or their server: 404 when the
    /// server says there is no such user.
    pub async fn profile(&self, services: &Services, user_id: &UserId) -> Result<Profile> {
        if let Some((at, profile)) = self.profiles.lock().map_err(Error::internal)?.get(user_id)
            && at.elapsed() < PROFILE_TTL
        {
            return Ok(profile.clone());
        }
        let request = get_profile_information::v1::Request::new(user_id.to_owned());
        let server = user_id.server_name();
        let answer = tokio::time::timeout(QUERY_TIMEOUT, services.federation.send(server, request))
            .await
            .map_err(|_| timed_out(server))?;
        let profile: Profile = match answer {
            Ok(response) => response.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            Err(SendError::Remote { status: 404, .. } | SendError::Disabled) => {
                return Err(Error::not_found("Profile not found"));
            }
            Err(err) => return Err(err.into()),
        };
        let mut cache = self.profiles.lock().map_err(Error::internal)?;
        bounded_insert(&mut cache, user_id.to_owned(), (Instant::now(), profile.clone()), |v| {
            v.0.elapsed() >= PROFILE_TTL
        });
        Ok(profile)
    }

    /// The room and resident servers of an alias of another server, or `None` when it says
    /// the alias is unknown.
    pub async fn room_alias(
        &self,
        services: &Services,
        alias: &RoomAliasId,
    ) -> Result<Option<(OwnedRoomId, Vec<OwnedServerName>)>> {
        let server = alias.server_name();
        let request = get_room_information::v1::Request::new(alias.to_owned());
        let answer = tokio::time::timeout(QUERY_TIMEOUT, services.federation.send(server, request))
            .await
            .map_err(|_| timed_out(server))?;
        match answer {
            Ok(response) => Ok(Some((response.room_id, response.servers))),
            Err(SendError::Remote { status: 404, .. } | SendError::Disabled) => Ok(None),
            Err(err) => Err(err.into()),
        }
    }

    /// Forgets the cached keys of `user_id`: their server said they changed.
    pub fn mark_stale(&self, user_id: &UserId) {
        self.mark_all_stale(std::iter::once(user_id));
    }

    /// Forgets the cached keys of every user in `users`, in one write (none when none of them
    /// is cached, the usual case for membership changes).
    pub fn mark_all_stale<'a>(&self, users: impl IntoIterator<Item = &'a UserId>) {
        let _marking = self.marking.lock().unwrap_or_else(|e| e.into_inner());
        self.stale_marks.fetch_add(1, Ordering::SeqCst);
        let mut batch = self.db.batch();
        for user_id in users {
            if self.devices.contains(user_id.as_str()).unwrap_or(true) {
                self.devices.delete(&mut batch, user_id.as_str());
            }
        }
        if batch.is_empty() {
            return;
        }
        if let Err(err) = self.db.write(batch) {
            tracing::error!(%err, "stale device lists could not be dropped");
        }
    }

    fn cached_devices(&self, user_id: &UserId) -> Option<CachedDevices> {
        match self.devices.get(user_id.as_str()) {
            Ok(cached) => cached.filter(|c| c.fresh(now_ms())),
            Err(err) => {
                tracing::warn!(%err, %user_id, "a cached device list could not be read");
                None
            }
        }
    }

    /// Stores fetched device lists, unless a stale mark came since `marks` was read.
    fn cache_devices(&self, fetched: &BTreeMap<OwnedUserId, CachedDevices>, marks: u64) {
        if fetched.is_empty() || self.stale_marks.load(Ordering::SeqCst) != marks {
            return;
        }
        let db = &self.db;
        if self.devices_cached.load(Ordering::Relaxed) + fetched.len() > MAX_CACHED {
            match prune_devices(db, &self.devices) {
                Ok(left) => self.devices_cached.store(left, Ordering::Relaxed),
                Err(err) => tracing::warn!(%err, "cached device lists could not be pruned"),
            }
            if self.devices_cached.load(Ordering::Relaxed) + fetched.len() > MAX_CACHED {
                return;
            }
        }
        let mut batch = db.batch();
        for (user_id, cached) in fetched {
            self.devices.put(&mut batch, user_id.as_str(), cached);
        }
        // Re-checked with marking held: a mark that came meanwhile wins.
        let _marking = self.marking.lock().unwrap_or_else(|e| e.into_inner());
        if self.stale_marks.load(Ordering::SeqCst) != marks {
            return;
        }
        match db.write_unsynced(batch) {
            Ok(()) => {
                self.devices_cached.fetch_add(fetched.len(), Ordering::Relaxed);
            }
            Err(err) => tracing::warn!(%err, "fetched device lists could not be cached"),
        }
    }

    /// Device and cross-signing keys of remote users (`users`: user id to wanted devices,
    /// empty for all), asking each server once, concurrently; cached device lists are used
    /// while fresh.
    pub async fn keys(
        &self,
        services: &Services,
        users: &BTreeMap<OwnedUserId, Vec<OwnedDeviceId>>,
    ) -> RemoteKeys {
        let mut out = RemoteKeys::default();
        let mut by_server: BTreeMap<OwnedServerName, BTreeMap<OwnedUserId, Vec<OwnedDeviceId>>> =
            BTreeMap::new();
        for (user_id, devices) in users {
            match self.cached_devices(user_id) {
                Some(cached) => out.add(user_id, devices, cached),
                None => {
                    // The whole list is fetched so it can be cached.
                    by_server
                        .entry(user_id.server_name().to_owned())
                        .or_default()
                        .insert(user_id.clone(), Vec::new());
                }
            }
        }
        let marks = self.stale_marks.load(Ordering::SeqCst);
        let queries = by_server.into_iter().map(|(server, wanted)| async move {
            let request = get_keys::v1::Request::new(wanted);
            let answer =
                tokio::time::timeout(QUERY_TIMEOUT, services.federation.send(&server, request))
                    .await
                    .unwrap_or_else(|_| Err(timed_out(&server)));
            (server, answer)
        });
        for (server, answer) in futures_util::future::join_all(queries).await {
            let response = match answer {
                Ok(response) => response,
                Err(err) => {
                    out.failures.insert(server.to_string(), failure(&err));
                    continue;
                }
            };
            let mut fetched: BTreeMap<OwnedUserId, CachedDevices> = BTreeMap::new();
            let now = now_ms();
            fn entry<'a>(
                fetched: &'a mut BTreeMap<OwnedUserId, CachedDevices>,
                user: &UserId,
                now: u64,
            ) -> &'a mut CachedDevices {
                fetched.entry(user.to_owned()).or_insert_with(|| CachedDevices {
                    fetched_ms: now,
                    devices: Map::new(),
                    master: None,
                    self_signing: None,
                })
            }
            for (user_id, devices) in response.device_keys {
                // A server vouches only for its own users.
                if user_id.server_name() != server || !users.contains_key(&user_id) {
                    continue;
                }
                let cached = entry(&mut fetched, &user_id, now);
                for (device_id, keys) in devices {
                    if let Ok(keys) = keys.deserialize_as_unchecked::<JsonValue>() {
                        cached.devices.insert(device_id.to_string(), keys);
                    }
                }
            }
            for (user_id, key) in response.master_keys {
                if user_id.server_name() == server && users.contains_key(&user_id) {
                    entry(&mut fetched, &user_id, now).master = key.deserialize_as_unchecked().ok();
                }
            }
            for (user_id, key) in response.self_signing_keys {
                if user_id.server_name() == server && users.contains_key(&user_id) {
                    entry(&mut fetched, &user_id, now).self_signing =
                        key.deserialize_as_unchecked().ok();
                }
            }
            self.cache_devices(&fetched, marks);
            for (user_id, cached) in fetched {
                let wanted = users.get(&user_id).map_or(&[][..], Vec::as_slice);
                out.add(&user_id, wanted, cached);
            }
        }
        out
    }

    /// Claims one-time keys of remote devices, one request per server, concurrently: the
    /// claimed keys by user, and the failures by server.
    pub async fn claim(
        &self,
        services: &Services,
        claims: BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, OneTimeKeyAlgorithm>>,
    ) -> (Map<String, JsonValue>, Map<String, JsonValue>) {
        let mut by_server: BTreeMap<OwnedServerName, claim_keys::v1::OneTimeKeyClaims> =
            BTreeMap::new();
        for (user_id, devices) in claims {
            by_server.entry(user_id.server_name().to_owned()).or_default().insert(user_id, devices);
        }
        let queries = by_server.into_iter().map(|(server, claims)| async move {
            let request = claim_keys::v1::Request::new(claims);
            let answer =
                tokio::time::timeout(QUERY_TIMEOUT, services.federation.send(&server, request))
                    .await
                    .unwrap_or_else(|_| Err(timed_out(&server)));
            (server, answer)
        });
        let (mut claimed, mut failures) = (Map::new(), Map::new());
        for (server, answer) in futures_util::future::join_all(queries).await {
            match answer {
                Ok(response) => {
                    for (user_id, devices) in response.one_time_keys {
                        if user_id.server_name() != server {
                            continue;
                        }
                        let devices = serde_json::to_value(devices).unwrap_or_default();
                        claimed.insert(user_id.to_string(), devices);
                    }
                }
                Err(err) => {
                    failures.insert(server.to_string(), failure(&err));
                }
            }
        }
        (claimed, failures)
    }
}

/// Drops the stored device lists past their time; returns how many are left.
fn prune_devices(db: &Db, devices: &Table<CachedDevices>) -> Result<usize, StorageError> {
    let now = now_ms();
    let mut batch = db.batch();
    let mut left = 0;
    for entry in devices.scan_prefix(Vec::new()) {
        let (key, cached) = entry?;
        if cached.fresh(now) {
            left += 1;
        } else {
            devices.delete_raw(&mut batch, &key);
        }
    }
    db.write_unsynced(batch)?;
    Ok(left)
}

impl RemoteKeys {
    /// Adds a user's keys, only the `wanted` devices when any are named.
    fn add(&mut self, user_id: &UserId, wanted: &[OwnedDeviceId], cached: CachedDevices) {
        let devices: Map<String, JsonValue> = if wanted.is_empty() {
            cached.devices
        } else {
            cached
                .devices
                .into_iter()
                .filter(|(id, _)| wanted.iter().any(|w| w.as_str() == id))
                .collect()
        };
        self.device_keys.insert(user_id.to_string(), JsonValue::Object(devices));
        if let Some(key) = cached.master {
            self.master_keys.insert(user_id.to_string(), key);
        }
        if let Some(key) = cached.self_signing {
            self.self_signing_keys.insert(user_id.to_string(), key);
        }
    }
}
