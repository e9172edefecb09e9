//! Server keys: this server's signed key document (`/_matrix/key/v2/server`), other servers'
//! keys fetched from them (or from a trusted notary), checked and cached in the database with
//! their validity, and the notary answers (`/_matrix/key/v2/query`) this server gives.
//!
//! A cached document is used until its `valid_until_ts`, capped at seven days after it was
//! fetched; keys a later document no longer lists stay known with the validity they had, so
//! old events can still be checked.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, hash_map::Entry},
    future::Future,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use base64::Engine as _;
use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, MilliSecondsSinceUnixEpoch, OwnedServerName,
    OwnedServerSigningKeyId, ServerName,
    api::federation::discovery::{
        OldVerifyKey, ServerSigningKeys, VerifyKey, get_remote_server_keys,
        get_remote_server_keys_batch, get_server_keys,
    },
    serde::{Base64, Raw},
    signatures::{self, PublicKeyMap, PublicKeySet},
};
use serde::{Deserialize, Serialize};

use super::Federation;
use crate::{
    config::MAX_KEY_VALIDITY_SECS,
    error::{Error, ErrorKind, Result},
    service::{now_ms, rooms::ingest::KeyLookup},
};

/// The longest a fetched document is trusted, whatever it says.
const MAX_CACHE_MS: u64 = MAX_KEY_VALIDITY_SECS * 1000;
/// The least time between two fetches of one server's keys.
const REFETCH_INTERVAL: Duration = Duration::from_secs(1);

/// How long a lot of events (a received transaction) waits for the keys of servers not known
/// yet, all asked together: the events of servers still unknown then fail their signature
/// check instead of holding up the answer to the others.
const LOT_FETCH_TIME: Duration = Duration::from_secs(15);

/// The most key fetches one lot runs at once (a transaction's events may name many servers).
const LOT_FETCHES_AT_ONCE: usize = 8;

/// A caller's hold on a server's fetch lock: dropped, it forgets the lock once nobody else
/// holds it, whether the caller finished or was given up on.
struct FetchLock<'a> {
    federation: &'a Federation,
    server: &'a ServerName,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for FetchLock<'_> {
    fn drop(&mut self) {
        let mut locks = self.federation.fetching.lock().unwrap_or_else(|e| e.into_inner());
        // The map's reference and this one.
        if Arc::strong_count(&self.lock) <= 2 {
            locks.remove(self.server);
        }
    }
}
/// Most servers whose last fetch time is remembered.
const MAX_ATTEMPTS: usize = 10_000;
/// Most servers in one notary query.
pub const MAX_QUERY_SERVERS: usize = 100;
/// Most servers whose keys one batch query may fetch; the others are answered from the cache.
const MAX_QUERY_FETCHES: usize = 10;
/// Largest key document kept, in bytes.
const MAX_DOCUMENT_BYTES: usize = 64 * 1024;

/// What is known of one server's keys.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CachedKeys {
    /// `key id -> (unpadded base64 key, valid until ms)` of keys listed as current.
    pub verify_keys: BTreeMap<String, (String, u64)>,
    /// `key id -> (unpadded base64 key, expired ms)` of keys listed as old.
    pub old_verify_keys: BTreeMap<String, (String, u64)>,
    /// The newest document as the server signed it (JSON), for notary answers.
    pub document: String,
    /// Its `valid_until_ts`, capped.
    pub valid_until_ts: u64,
    /// When it was fetched.
    pub fetched_ts: u64,
}

impl CachedKeys {
    /// The keys usable for something signed at `valid_at` (every key when `None`).
    pub fn usable(&self, valid_at: Option<u64>) -> PublicKeySet {
        let engine = base64::engine::general_purpose::STANDARD_NO_PAD;
        let current = self.verify_keys.iter().filter(|(_, (_, until))| valid_at <= Some(*until));
        let old =
            self.old_verify_keys.iter().filter(|(_, (_, expired))| valid_at <= Some(*expired));
        current
            .chain(old)
            .filter_map(|(id, (key, _))| {
                let bytes = engine.decode(key.trim_end_matches('=')).ok()?;
                Some((id.clone(), Base64::new(bytes)))
            })
            .collect()
    }

    /// Whether the newest document is still within its validity.
    pub fn fresh(&self, now: u64) -> bool {
        self.valid_until_ts >= now
    }

    /// Takes in a checked document: its keys join (or update) the known ones.
    fn merge(&mut self, keys: &ServerSigningKeys, document: String, now: u64) {
        let until = keys.valid_until_ts.get().into();
        let until: u64 = u64::min(until, now + MAX_CACHE_MS);
        for (id, key) in &keys.verify_keys {
            self.verify_keys.insert(id.to_string(), (key.key.encode(), until));
        }
        for (id, key) in &keys.old_verify_keys {
            let expired: u64 = key.expired_ts.get().into();
            self.old_verify_keys.insert(id.to_string(), (key.key.encode(), expired));
        }
        self.document = document;
        self.valid_until_ts = until;
        self.fetched_ts = now;
    }
}

impl Federation {
    /// This server's key document, signed, valid for the configured time.
    pub fn own_keys(&self) -> Result<Raw<ServerSigningKeys>> {
        let until = now_ms().saturating_add(self.key_validity_ms);
        let mut keys = ServerSigningKeys::new(self.server_name.clone(), ms(until));
        let key_id = format!("ed25519:{}", self.key_pair.version());
        let key_id = OwnedServerSigningKeyId::try_from(key_id).map_err(Error::internal)?;
        keys.verify_keys
            .insert(key_id, VerifyKey::new(Base64::new(self.key_pair.public_key().to_vec())));
        for old in &self.old_keys {
            let Ok(id) = OwnedServerSigningKeyId::try_from(old.key_id.as_str()) else { continue };
            let key = OldVerifyKey::new(ms(old.expired_ts), Base64::new(old.public_key.clone()));
            keys.old_verify_keys.insert(id, key);
        }
        let mut object = to_canonical(&keys)?;
        object.remove("signatures");
        signatures::sign_json(self.server_name.as_str(), &*self.key_pair, &mut object)
            .map_err(Error::internal)?;
        raw_of(&object)
    }

    /// The keys of `server` usable at `valid_at` (every known key when `None`): from the
    /// cache when it has them, else fetched from the server, else from the trusted notaries.
    /// `key_ids` names keys that must be among them (a fetch is tried when one is missing).
    pub async fn server_keys(
        &self,
        server: &ServerName,
        key_ids: &[&str],
        valid_at: Option<u64>,
    ) -> Result<PublicKeySet> {
        if server == self.server_name {
            return self.own_key_set(valid_at);
        }
        let now = now_ms();
        let cached = self.remote_keys.get(server.as_str())?;
        let enough = |entry: &CachedKeys| {
            let usable = entry.usable(valid_at);
            let has_ids = key_ids.iter().all(|id| usable.contains_key(*id));
            // Something signed now needs a document still valid now.
            let in_time = valid_at.is_some_and(|t| t < now) || entry.fresh(now);
            (has_ids && in_time && !usable.is_empty()).then_some(usable)
        };
        if let Some(usable) = cached.as_ref().and_then(enough) {
            return Ok(usable);
        }
        // One fetch per server at a time: callers arriving meanwhile wait for its result. The
        // lock is forgotten when the last caller is done, also one given up on mid-fetch.
        let lock = FetchLock { federation: self, server, lock: self.fetch_lock(server) };
        let guard = lock.lock.lock().await;
        let mut known = self.remote_keys.get(server.as_str())?;
        if known.as_ref().and_then(enough).is_none() && self.may_fetch(server) {
            match self.fetch_keys(server).await {
                Ok(entry) => known = Some(entry),
                Err(err) => tracing::info!(%server, %err, "cannot fetch the server's keys"),
            }
        }
        drop(guard);
        drop(lock);
        // What is known, for a caller that checks what it got.
        Ok(known.map(|entry| entry.usable(valid_at)).unwrap_or_default())
    }

    /// The lock serialising fetches of `server`'s keys.
    fn fetch_lock(&self, server: &ServerName) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.fetching.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(server.to_owned()).or_default().clone()
    }

    /// What is cached of `server`'s keys.
    pub fn cached_keys(&self, server: &ServerName) -> Result<Option<CachedKeys>> {
        Ok(self.remote_keys.get(server.as_str())?)
    }

    fn own_key_set(&self, valid_at: Option<u64>) -> Result<PublicKeySet> {
        let mut set = PublicKeySet::new();
        set.insert(
            format!("ed25519:{}", self.key_pair.version()),
            Base64::new(self.key_pair.public_key().to_vec()),
        );
        for old in &self.old_keys {
            if valid_at.is_none_or(|t| t <= old.expired_ts) {
                set.insert(old.key_id.clone(), Base64::new(old.public_key.clone()));
            }
        }
        Ok(set)
    }

    /// Whether a fetch of `server`'s keys may start now; records it when so.
    fn may_fetch(&self, server: &ServerName) -> bool {
        let now = Instant::now();
        let mut attempts = self.attempts.lock().unwrap_or_else(|e| e.into_inner());
        if attempts.get(server).is_some_and(|last| now.duration_since(*last) < REFETCH_INTERVAL) {
            return false;
        }
        if attempts.len() >= MAX_ATTEMPTS {
            attempts.retain(|_, last| now.duration_since(*last) < REFETCH_INTERVAL);
        }
        attempts.insert(server.to_owned(), now);
        true
    }

    /// Fetches `server`'s keys from it, or else from the trusted notaries, and caches them.
    pub async fn fetch_keys(&self, server: &ServerName) -> Result<CachedKeys> {
        let direct = match self.send(server, get_server_keys::v2::Request::new()).await {
            Ok(response) => self.take_document(server, &response.server_key, None),
            Err(err) => Err(Error::new(ErrorKind::Unknown, err.to_string())),
        };
        let direct_err = match direct {
            Ok(entry) => return Ok(entry),
            Err(err) => err,
        };
        for notary in &self.trusted {
            match self.fetch_from_notary(&notary.server_name, server).await {
                Ok(entry) => return Ok(entry),
                Err(err) => {
                    tracing::info!(notary = %notary.server_name, %server, %err, "notary failed")
                }
            }
        }
        Err(direct_err)
    }

    /// Asks `notary` for `server`'s keys; the answer must carry the notary's signature.
    async fn fetch_from_notary(
        &self,
        notary: &ServerName,
        server: &ServerName,
    ) -> Result<CachedKeys> {
        let notary_keys = self.notary_keys(notary).await?;
        let minimum = ms(now_ms());
        let request = get_remote_server_keys::v2::Request::new(server.to_owned(), minimum);
        let response = self.send(notary, request).await?;
        let mut last = Err(Error::not_found("the notary has no keys for the server"));
        for document in response.server_keys.iter().take(MAX_QUERY_SERVERS) {
            last = self.take_document(server, document, Some((notary, &notary_keys)));
            if last.is_ok() {
                break;
            }
        }
        last
    }

    /// A notary's keys: as configured, or else its own (fetched directly).
    async fn notary_keys(&self, notary: &ServerName) -> Result<PublicKeySet> {
        let engine = base64::engine::general_purpose::STANDARD_NO_PAD;
        let configured = self.trusted.iter().find(|t| t.server_name == notary);
        let keys: PublicKeySet = configured
            .into_iter()
            .flat_map(|t| &t.verify_keys)
            .filter_map(|(id, key)| {
                let bytes = engine.decode(key.trim_end_matches('=')).ok()?;
                Some((id.clone(), Base64::new(bytes)))
            })
            .collect();
        if !keys.is_empty() {
            return Ok(keys);
        }
        let cached = self.remote_keys.get(notary.as_str())?;
        match cached.filter(|c| c.fresh(now_ms())) {
            Some(entry) => Ok(entry.usable(None)),
            None => Ok(self.fetch_direct(notary).await?.usable(None)),
        }
    }

    async fn fetch_direct(&self, server: &ServerName) -> Result<CachedKeys> {
        let response = self.send(server, get_server_keys::v2::Request::new()).await?;
        self.take_document(server, &response.server_key, None)
    }

    /// Checks a key document of `server` (its own signature with its listed keys, and
    /// `notary`'s when it came through one) and caches it.
    fn take_document(
        &self,
        server: &ServerName,
        document: &Raw<ServerSigningKeys>,
        notary: Option<(&ServerName, &PublicKeySet)>,
    ) -> Result<CachedKeys> {
        let bad = |why: &str| Error::new(ErrorKind::Unknown, format!("bad key document: {why}"));
        if document.json().get().len() > MAX_DOCUMENT_BYTES {
            return Err(bad("too large"));
        }
        let keys: ServerSigningKeys = document.deserialize().map_err(|e| bad(&e.to_string()))?;
        if keys.server_name != server {
            return Err(bad("it is another server's"));
        }
        let object: CanonicalJsonObject =
            serde_json::from_str(document.json().get()).map_err(|e| bad(&e.to_string()))?;
        let own: PublicKeySet =
            keys.verify_keys.iter().map(|(id, key)| (id.to_string(), key.key.clone())).collect();
        verify_signed_by(&object, server, &own).map_err(|e| bad(&e))?;
        if let Some((notary, notary_keys)) = notary {
            verify_signed_by(&object, notary, notary_keys).map_err(|e| bad(&e))?;
        }
        let now = now_ms();
        let mut entry = self.remote_keys.get(server.as_str())?.unwrap_or_default();
        // A notary's copy older than what is known does not replace it.
        if notary.is_some() && entry.fetched_ts > 0 {
            let until: u64 = keys.valid_until_ts.get().into();
            if until < entry.valid_until_ts {
                return Ok(entry);
            }
        }
        // Kept as the server signed it: a notary answer adds only its own signature.
        let mut own_only = object;
        keep_signatures_of(&mut own_only, server);
        let text = serde_json::to_string(&own_only).map_err(Error::internal)?;
        entry.merge(&keys, text, now);
        let mut batch = self.db.batch();
        self.remote_keys.put(&mut batch, server.as_str(), &entry);
        self.db.write(batch)?;
        Ok(entry)
    }

    /// The notary answer for `server`'s keys, valid at least until `minimum_valid_until`
    /// when that can be had: cached or fetched, signed by this server too.
    pub async fn notary_document(
        &self,
        server: &ServerName,
        minimum_valid_until: u64,
    ) -> Result<Option<Raw<ServerSigningKeys>>> {
        Ok(self.notary_answer(server, minimum_valid_until, true).await?.0)
    }

    /// [`Self::notary_document`], fetching only when `fetch` allows; says whether it fetched.
    async fn notary_answer(
        &self,
        server: &ServerName,
        minimum_valid_until: u64,
        fetch: bool,
    ) -> Result<(Option<Raw<ServerSigningKeys>>, bool)> {
        if server == self.server_name {
            return Ok((Some(self.own_keys()?), false));
        }
        self.check_allowed(server)?;
        let mut entry = self.remote_keys.get(server.as_str())?;
        let wanted = minimum_valid_until.max(now_ms());
        let stale = entry.as_ref().is_none_or(|e| e.valid_until_ts < wanted);
        let fetched = stale && fetch && self.may_fetch(server);
        if fetched && let Ok(fresh) = self.fetch_keys(server).await {
            entry = Some(fresh);
        }
        let Some(entry) = entry.filter(|e| !e.document.is_empty()) else {
            return Ok((None, fetched));
        };
        let mut object: CanonicalJsonObject =
            serde_json::from_str(&entry.document).map_err(Error::internal)?;
        signatures::sign_json(self.server_name.as_str(), &*self.key_pair, &mut object)
            .map_err(Error::internal)?;
        Ok((Some(raw_of(&object)?), fetched))
    }

    /// The notary answers for a batch query (`server -> key ids -> criteria`).
    pub async fn notary_batch(
        &self,
        query: &BTreeMap<
            OwnedServerName,
            BTreeMap<OwnedServerSigningKeyId, get_remote_server_keys_batch::v2::QueryCriteria>,
        >,
    ) -> Result<Vec<Raw<ServerSigningKeys>>> {
        if query.len() > MAX_QUERY_SERVERS {
            return Err(Error::invalid_param(format!("At most {MAX_QUERY_SERVERS} servers")));
        }
        let mut documents = Vec::with_capacity(query.len());
        let mut fetches = 0;
        for (server, criteria) in query {
            let minimum = criteria
                .values()
                .filter_map(|c| c.minimum_valid_until_ts)
                .map(|ts| u64::from(ts.get()))
                .max()
                .unwrap_or(0);
            // A server another may not be asked about (the lists) is left out; past a few
            // fetches, the rest are answered from the cache only.
            let fetch = fetches < MAX_QUERY_FETCHES;
            if let Ok((document, fetched)) = self.notary_answer(server, minimum, fetch).await {
                fetches += usize::from(fetched);
                documents.extend(document);
            }
        }
        Ok(documents)
    }
}

impl KeyLookup for Federation {
    fn public_keys<'a>(
        &'a self,
        servers: &'a BTreeSet<OwnedServerName>,
    ) -> Pin<Box<dyn Future<Output = Result<PublicKeyMap>> + Send + 'a>> {
        self.public_keys_at(servers, None)
    }

    fn public_keys_at<'a>(
        &'a self,
        servers: &'a BTreeSet<OwnedServerName>,
        valid_at: Option<u64>,
    ) -> Pin<Box<dyn Future<Output = Result<PublicKeyMap>> + Send + 'a>> {
        Box::pin(async move {
            let mut map = PublicKeyMap::new();
            for server in servers {
                // A server whose keys cannot be had is left out: its signatures fail.
                let keys = self.server_keys(server, &[], valid_at).await?;
                if !keys.is_empty() {
                    map.insert(server.to_string(), keys);
                }
            }
            Ok(map)
        })
    }

    fn public_keys_many<'a>(
        &'a self,
        wanted: &'a [(BTreeSet<OwnedServerName>, Option<u64>)],
    ) -> Pin<Box<dyn Future<Output = Result<Vec<PublicKeyMap>>> + Send + 'a>> {
        Box::pin(async move {
            let now = now_ms();
            // As `server_keys` judges: known keys usable then, from a document still valid now
            // for something signed now.
            let usable_cached = |entry: &Option<CachedKeys>, valid_at: Option<u64>| {
                let known = entry.as_ref()?;
                let usable = known.usable(valid_at);
                let in_time = valid_at.is_some_and(|t| t < now) || known.fresh(now);
                (!usable.is_empty() && in_time).then_some(usable)
            };
            // Each server's cache entry, read once.
            let mut entries: HashMap<&ServerName, Option<CachedKeys>> = HashMap::new();
            let mut missing: HashMap<&ServerName, Option<u64>> = HashMap::new();
            for (servers, valid_at) in wanted {
                for server in servers.iter().filter(|server| **server != self.server_name) {
                    let entry = match entries.entry(server) {
                        Entry::Occupied(entry) => entry.into_mut(),
                        Entry::Vacant(entry) => {
                            entry.insert(self.remote_keys.get(server.as_str())?)
                        }
                    };
                    if usable_cached(entry, *valid_at).is_none() {
                        missing.entry(server).or_insert(*valid_at);
                    }
                }
            }
            // The servers whose keys are missing are asked together (a few at a time), and for
            // a bounded time: a lot held up by unreachable servers is still answered promptly,
            // without them.
            let deadline = tokio::time::Instant::now() + LOT_FETCH_TIME;
            let missing_list: Vec<(&ServerName, Option<u64>)> =
                missing.iter().map(|(&server, &valid_at)| (server, valid_at)).collect();
            for group in missing_list.chunks(LOT_FETCHES_AT_ONCE) {
                let fetches = group.iter().map(|&(server, valid_at)| {
                    tokio::time::timeout_at(deadline, self.server_keys(server, &[], valid_at))
                });
                for (&(server, _), fetched) in
                    group.iter().zip(futures_util::future::join_all(fetches).await)
                {
                    if let Ok(Err(err)) = fetched {
                        return Err(err);
                    }
                    entries.insert(server, self.remote_keys.get(server.as_str())?);
                }
            }
            let mut maps = Vec::with_capacity(wanted.len());
            for (servers, valid_at) in wanted {
                let mut map = PublicKeyMap::new();
                for server in servers {
                    let keys = if *server == self.server_name {
                        self.own_key_set(*valid_at)?
                    } else if missing.contains_key(&**server) {
                        // Fetched just now (or given up on): what is known, as `server_keys`
                        // answers after a fetch.
                        let entry = entries.get(&**server).and_then(Option::as_ref);
                        entry.map(|known| known.usable(*valid_at)).unwrap_or_default()
                    } else {
                        let entry = entries.get(&**server).unwrap_or(&None);
                        usable_cached(entry, *valid_at).unwrap_or_default()
                    };
                    if !keys.is_empty() {
                        map.insert(server.to_string(), keys);
                    }
                }
                maps.push(map);
            }
            Ok(maps)
        })
    }
}

/// Checks that `object` carries a valid signature of `entity` by one of `keys`.
pub fn verify_signed_by(
    object: &CanonicalJsonObject,
    entity: &ServerName,
    keys: &PublicKeySet,
) -> std::result::Result<(), String> {
    let mut only = object.clone();
    keep_signatures_of(&mut only, entity);
    // Signatures by keys not given are dropped; at least one must remain.
    if let Some(CanonicalJsonValue::Object(signatures)) = only.get_mut("signatures")
        && let Some(CanonicalJsonValue::Object(by_entity)) = signatures.get_mut(entity.as_str())
    {
        by_entity.retain(|id, _| keys.contains_key(id));
        if by_entity.is_empty() {
            return Err(format!("no signature of {entity} by a key it lists"));
        }
    } else {
        return Err(format!("no signature of {entity}"));
    }
    let map = PublicKeyMap::from([(entity.to_string(), keys.clone())]);
    signatures::verify_json(&map, &only).map_err(|e| format!("signature of {entity}: {e}"))
}

/// Drops every signature but `entity`'s.
fn keep_signatures_of(object: &mut CanonicalJsonObject, entity: &ServerName) {
    if let Some(CanonicalJsonValue::Object(signatures)) = object.get_mut("signatures") {
        signatures.retain(|name, _| name == entity.as_str());
    }
}

fn ms(value: u64) -> MilliSecondsSinceUnixEpoch {
    MilliSecondsSinceUnixEpoch(ruma::UInt::new_saturating(value))
}

fn to_canonical<T: Serialize>(value: &T) -> Result<CanonicalJsonObject> {
    let serde_json::Value::Object(map) = serde_json::to_value(value).map_err(Error::internal)?
    else {
        return Err(Error::internal("a key document is an object"));
    };
    ruma::canonical_json::try_from_json_map(map).map_err(Error::internal)
}

fn raw_of<T>(object: &CanonicalJsonObject) -> Result<Raw<T>> {
    let text = serde_json::to_string(object).map_err(Error::internal)?;
    let raw = serde_json::value::RawValue::from_string(text).map_err(Error::internal)?;
    Ok(Raw::from_json(raw))
}
