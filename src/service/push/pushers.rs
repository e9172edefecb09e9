//! Pushers: the push gateways each user's devices asked to be notified through. They are few
//! and read on every notification, so all of them are also kept in memory.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use ruma::{
    OwnedUserId, UserId,
    api::client::push::{Pusher, PusherKind},
};
use serde::{Deserialize, Serialize};

use crate::{
    error::{Error, ErrorKind, Result},
    service::Services,
    storage::{Db, Table, tables},
};

/// The path every push gateway serves notifications on.
pub const NOTIFY_PATH: &str = "/_matrix/push/v1/notify";

/// A stored pusher and who made it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PusherRecord {
    /// The pusher as the client described it.
    pub pusher: Pusher,
    /// The device that set it (its pushers go when it logs out).
    #[serde(default)]
    pub device_id: Option<String>,
    /// When it was set, in seconds (`pushkey_ts`).
    pub created_secs: u64,
}

/// Every pusher, durably and in memory.
pub struct Pushers {
    table: Table<PusherRecord>,
    by_user: RwLock<HashMap<OwnedUserId, Vec<Arc<PusherRecord>>>>,
    /// Changes with every change of any pusher, so copies held elsewhere are known stale.
    generation: std::sync::atomic::AtomicU64,
}

impl Pushers {
    /// Loads every pusher from `db`.
    pub fn new(db: &Db) -> Result<Self> {
        let table: Table<PusherRecord> = db.table(tables::PUSHERS);
        let mut by_user: HashMap<OwnedUserId, Vec<Arc<PusherRecord>>> = HashMap::new();
        for entry in table.scan_prefix(Vec::new()) {
            let (key, record) = entry?;
            let user = crate::storage::split_key(&key).next().unwrap_or_default();
            let Ok(user) = std::str::from_utf8(user).map(UserId::parse) else { continue };
            if let Ok(user) = user {
                by_user.entry(user).or_default().push(Arc::new(record));
            }
        }
        Ok(Self { table, by_user: RwLock::new(by_user), generation: Default::default() })
    }

    /// `user_id`'s pushers.
    pub fn of(&self, user_id: &UserId) -> Vec<Arc<PusherRecord>> {
        self.by_user
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(user_id)
            .cloned()
            .unwrap_or_default()
    }

    /// The generation of the pushers: read it before copying pushers, and the copy is current
    /// while it stays the same.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Marks every copy of the pushers stale; called with the map locked for writing.
    fn changed(&self) {
        self.generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Whether `user_id` has any pusher.
    pub fn has_any(&self, user_id: &UserId) -> bool {
        self.by_user.read().unwrap_or_else(|e| e.into_inner()).contains_key(user_id)
    }

    /// Adds or replaces `user_id`'s pusher `(app_id, pushkey)`. Unless `append`, the same pushkey
    /// is removed from every other user, as a device belongs to one account at a time.
    pub fn set(
        &self,
        services: &Services,
        user_id: &UserId,
        device_id: Option<&str>,
        pusher: Pusher,
        append: bool,
    ) -> Result<()> {
        validate(services, &pusher)?;
        let (app_id, pushkey) = (pusher.ids.app_id.clone(), pusher.ids.pushkey.clone());
        let mut map = self.by_user.write().unwrap_or_else(|e| e.into_inner());
        let mine = map
            .get(user_id)
            .map_or(0, |list| list.iter().filter(|p| !same(p, &app_id, &pushkey)).count());
        if mine >= services.config.push.max_pushers_per_user {
            return Err(Error::new(ErrorKind::ResourceLimitExceeded, "Too many pushers"));
        }
        let mut batch = services.db.batch();
        let mut removed = Vec::new();
        if !append {
            for (other, list) in map.iter() {
                if other != user_id && list.iter().any(|p| same(p, &app_id, &pushkey)) {
                    self.table
                        .delete(&mut batch, &(other.as_str(), app_id.as_str(), pushkey.as_str()));
                    removed.push(other.clone());
                }
            }
        }
        let record = PusherRecord {
            pusher,
            device_id: device_id.map(str::to_owned),
            created_secs: super::super::now_ms() / 1000,
        };
        self.table.put(&mut batch, &(user_id.as_str(), app_id.as_str(), pushkey.as_str()), &record);
        services.db.write(batch)?;
        for other in removed {
            remove_from(&mut map, &other, &app_id, &pushkey);
        }
        let list = map.entry(user_id.to_owned()).or_default();
        list.retain(|p| !same(p, &app_id, &pushkey));
        list.push(Arc::new(record));
        self.changed();
        Ok(())
    }

    /// Removes `user_id`'s pusher `(app_id, pushkey)`; removing one that is gone is fine.
    pub fn remove(
        &self,
        services: &Services,
        user_id: &UserId,
        app_id: &str,
        pushkey: &str,
    ) -> Result<()> {
        let mut batch = services.db.batch();
        self.table.delete(&mut batch, &(user_id.as_str(), app_id, pushkey));
        services.db.write(batch)?;
        let mut map = self.by_user.write().unwrap_or_else(|e| e.into_inner());
        remove_from(&mut map, user_id, app_id, pushkey);
        self.changed();
        Ok(())
    }

    /// Queues, in `batch`, the removal of every pusher of `user_id` (a deactivation); call
    /// [`Pushers::forget_user`] once the batch is written. Returns how many there were.
    pub fn queue_remove_all(&self, batch: &mut crate::storage::Batch, user_id: &UserId) -> usize {
        let pushers = self.of(user_id);
        for p in &pushers {
            let ids = &p.pusher.ids;
            self.table
                .delete(batch, &(user_id.as_str(), ids.app_id.as_str(), ids.pushkey.as_str()));
        }
        pushers.len()
    }

    /// Drops `user_id`'s pushers from memory after [`Pushers::queue_remove_all`] was written.
    pub fn forget_user(&self, user_id: &UserId) {
        let mut map = self.by_user.write().unwrap_or_else(|e| e.into_inner());
        if map.remove(user_id).is_some() {
            self.changed();
        }
    }

    /// Removes the pushers set by devices of `user_id` that no longer exist (logged out or
    /// deleted; all of them once the account is deactivated).
    pub fn forget_deleted_devices(&self, services: &Services, user_id: &UserId) -> Result<()> {
        let mut doomed = Vec::new();
        for p in self.of(user_id) {
            let Some(device) = p.device_id.as_deref() else { continue };
            if services.sessions.device(user_id, device.into())?.is_none() {
                doomed.push(p);
            }
        }
        if doomed.is_empty() {
            return Ok(());
        }
        let mut batch = services.db.batch();
        for p in &doomed {
            let ids = &p.pusher.ids;
            let key = (user_id.as_str(), ids.app_id.as_str(), ids.pushkey.as_str());
            self.table.delete(&mut batch, &key);
        }
        services.db.write(batch)?;
        let mut map = self.by_user.write().unwrap_or_else(|e| e.into_inner());
        for p in doomed {
            remove_from(&mut map, user_id, &p.pusher.ids.app_id, &p.pusher.ids.pushkey);
        }
        self.changed();
        Ok(())
    }
}
fn same(record: &PusherRecord, app_id: &str, pushkey: &str) -> bool {
    record.pusher.ids.app_id == app_id && record.pusher.ids.pushkey == pushkey
}

fn remove_from(
    map: &mut HashMap<OwnedUserId, Vec<Arc<PusherRecord>>>,
    user_id: &UserId,
    app_id: &str,
    pushkey: &str,
) {
    if let Some(list) = map.get_mut(user_id) {
        list.retain(|p| !same(p, app_id, pushkey));
        if list.is_empty() {
            map.remove(user_id);
        }
    }
}

/// Checks what the spec asks of a pusher: an `http` pusher needs a gateway URL ending in the
/// notify path, which the outbound address policy would let us reach.
fn validate(services: &Services, pusher: &Pusher) -> Result<()> {
    const MAX_FIELD: usize = 512;
    let ids = &pusher.ids;
    if ids.app_id.is_empty()
        || ids.app_id.len() > 64
        || ids.pushkey.is_empty()
        || ids.pushkey.len() > MAX_FIELD
    {
        return Err(Error::invalid_param("app_id must be 1-64 bytes and pushkey 1-512 bytes"));
    }
    match &pusher.kind {
        PusherKind::Http(data) => {
            let url = reqwest::Url::parse(&data.url)
                .map_err(|_| Error::invalid_param("data.url is not a valid URL"))?;
            if url.path() != NOTIFY_PATH {
                return Err(Error::invalid_param(format!("data.url must end in {NOTIFY_PATH}")));
            }
            services
                .outbound
                .policy()
                .check_url(&url)
                .map_err(|e| Error::invalid_param(format!("data.url is not allowed: {e}")))
        }
        _ => Err(Error::invalid_param("Only http pushers are supported")),
    }
}
