//! Rooms: the event core (the graph of events, its state and membership indexes) and the
//! reads everything else makes of it.
//!
//! Every event takes one path under its room's lock: built here ([`Rooms::append`], `local`)
//! or received from another server ([`Rooms::ingest`], `ingest`), it is checked and written by
//! [`Rooms::place`] (`graph`): the event, its place in the graph, the state after it (`state`:
//! compact, shared between states) and the room's current state (`resolve`: state resolution
//! where branches meet), the membership indexes and what registered features contribute
//! (`listeners`), all in one batch. The lock is released before that batch's WAL sync, so the
//! next event of the room is built while the sync runs; the sender's answer and every sync
//! wait for it.

mod audited;
pub mod auth_chain;
pub mod create;
pub mod directory;
pub mod from_state;
pub mod graph;
pub mod ingest;
pub mod listeners;
mod local;
pub mod membership;
pub mod migrate;
pub mod outside;
pub mod pdu;
pub mod permissions;
pub mod reports;
pub mod resolve;
pub mod state;
pub mod summary;
pub mod template;
pub mod upgrade;

pub use self::graph::Status;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use ruma::{
    DeviceId, EventId, OwnedEventId, OwnedRoomId, RoomId, RoomVersionId, UserId,
    events::TimelineEventType,
};
use serde::{Deserialize, Serialize};
use serde_json::Value as JsonValue;

use self::{
    pdu::{Pdu, StoredPdu},
    state::{StateMap, States},
};
use super::{Counter, Services, now_ms, stream::Pending};
use crate::{
    error::{Error, ErrorKind, Result},
    storage::{Batch, Db, Key, Table, Ticket, prefix, split_key, tables},
};

/// Largest event accepted, in bytes of canonical JSON (the spec's limit).
pub const MAX_PDU_BYTES: usize = 65_536;
/// Longest `type`, `state_key`, `sender` and `room_id` of an event, in bytes (the spec's limit).
pub const MAX_FIELD_BYTES: usize = 255;

/// What is stored for a room.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoomRecord {
    /// Short id used in keys.
    pub short_id: u64,
    /// Room version.
    pub version: RoomVersionId,
    /// The events new events follow.
    pub extremities: Vec<OwnedEventId>,
    /// Depth of the deepest event.
    pub depth: u64,
    /// Snapshot of the current state.
    pub current_state: u64,
}

/// An event to append, before it is hashed, signed and authorised.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// Event type.
    pub kind: TimelineEventType,
    /// Content.
    pub content: JsonValue,
    /// State key, for state events.
    pub state_key: Option<String>,
    /// The redacted event, for redactions.
    pub redacts: Option<OwnedEventId>,
    /// Audit records to write in the event's batch (an admin acting through the event).
    pub audit: Vec<super::audit::Entry>,
}

impl NewEvent {
    /// A state event.
    pub fn state(
        kind: impl Into<String>,
        state_key: impl Into<String>,
        content: JsonValue,
    ) -> Self {
        Self {
            kind: kind.into().into(),
            content,
            state_key: Some(state_key.into()),
            redacts: None,
            audit: Vec::new(),
        }
    }

    /// A timeline (non-state) event.
    pub fn message(kind: impl Into<String>, content: JsonValue) -> Self {
        Self {
            kind: kind.into().into(),
            content,
            state_key: None,
            redacts: None,
            audit: Vec::new(),
        }
    }

    /// Adds an audit record written in the event's batch.
    pub fn audited(mut self, entry: super::audit::Entry) -> Self {
        self.audit.push(entry);
        self
    }
}

/// A client transaction: who made the request, its id and the endpoint it came through.
/// Transaction ids are scoped to one device and one endpoint path, so the same id on `/send`
/// and on `/redact` (or for another event type or target) names two different requests.
#[derive(Debug, Clone, Copy)]
pub struct Txn<'a> {
    /// The account whose token was used: the sender, or for server notices the requesting
    /// admin (the notices account sends them).
    pub user: &'a UserId,
    /// The device of that token.
    pub device: &'a str,
    /// The client's transaction id.
    pub id: &'a str,
    /// The endpoint path it was used on.
    pub endpoint: TxnEndpoint<'a>,
}

/// The endpoint path, beyond the room, a transaction id was used on.
#[derive(Debug, Clone, Copy)]
pub enum TxnEndpoint<'a> {
    /// `PUT /rooms/{roomId}/send/{eventType}/{txnId}`, with the event type.
    Send(&'a str),
    /// `PUT /rooms/{roomId}/redact/{eventId}/{txnId}`, with the redacted event.
    Redact(&'a EventId),
    /// `PUT /_synapse/admin/v1/send_server_notice/{txnId}`.
    Notice,
}

impl Txn<'_> {
    /// The stored key: `user 0xFF device 0xFF endpoint 0xFF room id 0xFF parameter 0xFF
    /// transaction id`. Every part is UTF-8, which never holds the 0xFF separator, so keys of
    /// different requests never meet; and since the endpoint never starts with `!`, keys
    /// written by versions that scoped ids by room only (`... 0xFF room id 0x1F transaction
    /// id`) are never read as these.
    fn key(&self, room_id: &RoomId) -> Vec<u8> {
        let (endpoint, param) = match self.endpoint {
            TxnEndpoint::Send(kind) => ("send", kind),
            TxnEndpoint::Redact(event_id) => ("redact", event_id.as_str()),
            TxnEndpoint::Notice => ("notice", ""),
        };
        let path = (endpoint, (room_id.as_str(), (param, self.id)));
        (self.user.as_str(), self.device, path).to_key_bytes()
    }
}

/// Rooms and their events.
pub struct Rooms {
    db: Db,
    rooms: Table<RoomRecord>,
    pdus: Table<StoredPdu>,
    event_ids: Table<u64>,
    timeline: Table<u64>,
    user_rooms: Table<String>,
    room_members: Table<String>,
    transactions: Table<OwnedEventId>,
    joins_and_leaves: Table<(OwnedRoomId, ruma::OwnedUserId, bool)>,
    outside: outside::OutsideTable,
    /// State snapshots.
    pub states: States,
    short_event: Counter,
    short_room: Counter,
    last_create_ts: std::sync::atomic::AtomicU64,
    locks: Mutex<HashMap<OwnedRoomId, Arc<tokio::sync::Mutex<()>>>>,
    /// Each room's member list, read on every send; dropped when a membership changes.
    members_cache: ListCache<OwnedRoomId, (ruma::OwnedUserId, String)>,
    /// Each user's rooms, for every sync; dropped when one of their memberships changes.
    memberships_cache: ListCache<ruma::OwnedUserId, (OwnedRoomId, String)>,
    /// The newest events, for the syncs they wake.
    recent: Mutex<RecentEvents>,
    /// Parsed state events by short id, for the auth checks of every send and the state
    /// lookups of every sync.
    state_cache: Mutex<StateCache>,
    /// Events being written, readable by the checks and resolution that run before their
    /// batch lands (the room's new state names them).
    in_flight: Mutex<InFlight>,
    /// Auth chains of state events, by short id.
    chain_cache: Mutex<HashMap<u64, Arc<Vec<u64>>>>,
    /// The features taking part in writing events, registered once at start.
    registry: std::sync::OnceLock<listeners::Registry>,
}

/// Parsed state events, and a count of redactions so that an event read before one is never
/// cached after it.
#[derive(Default)]
struct StateCache {
    pdus: HashMap<u64, Arc<Pdu>>,
    generation: u64,
}

/// Events being written: parsed by short id, and short ids by event id.
#[derive(Default)]
struct InFlight {
    pdus: HashMap<u64, Arc<Pdu>>,
    shorts: HashMap<OwnedEventId, u64>,
}

/// Lists read from an index (a room's members, a user's rooms) kept in memory, with a count
/// of changes so that a list read before a change is never cached after it.
struct ListCache<K, V> {
    inner: Mutex<Lists<K, V>>,
    capacity: usize,
}

/// The lists of a [`ListCache`] and its count of changes.
struct Lists<K, V> {
    lists: HashMap<K, Arc<Vec<V>>>,
    generation: u64,
}

impl<K: Eq + std::hash::Hash, V> ListCache<K, V> {
    fn new(capacity: usize) -> Self {
        let inner = Mutex::new(Lists { lists: HashMap::new(), generation: 0 });
        Self { inner, capacity }
    }

    /// The list of `key`, from memory or else from `read` (then kept).
    fn get_or_read<Q>(&self, key: &Q, read: impl FnOnce() -> Result<Vec<V>>) -> Result<Arc<Vec<V>>>
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + std::hash::Hash + ToOwned<Owned = K> + ?Sized,
    {
        let generation = {
            let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(list) = inner.lists.get(key) {
                return Ok(list.clone());
            }
            inner.generation
        };
        let list = Arc::new(read()?);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.generation == generation {
            if inner.lists.len() >= self.capacity {
                inner.lists.clear();
            }
            inner.lists.insert(key.to_owned(), list.clone());
        }
        Ok(list)
    }

    /// Changes the kept list of `key` in place (copied first only while a reader holds it),
    /// so a large list is not read again after each change; a list not kept stays unread.
    fn update<Q>(&self, key: &Q, change: impl FnOnce(&mut Vec<V>))
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + std::hash::Hash + ?Sized,
        V: Clone,
    {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.generation += 1;
        if let Some(list) = inner.lists.get_mut(key) {
            change(Arc::make_mut(list));
        }
    }

    /// Drops the list of `key` after a change to it.
    fn forget<Q>(&self, key: &Q)
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + std::hash::Hash + ?Sized,
    {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.generation += 1;
        inner.lists.remove(key);
    }
}

/// A room's members with their membership, shared between readers.
pub type Members = Arc<Vec<(ruma::OwnedUserId, String)>>;

/// A user's rooms with their membership there, shared between readers.
pub type Memberships = Arc<Vec<(OwnedRoomId, String)>>;

/// Users whose room lists are kept in memory.
const MEMBERSHIPS_CACHE: usize = 100_000;

/// The newest events as written, read by the syncs they wake without parsing them again, and
/// each room's newest timeline entries, so those syncs find them without a database scan.
#[derive(Default)]
struct RecentEvents {
    /// Events by short id (redacted ones are dropped and read from the database).
    events: HashMap<u64, Arc<StoredPdu>>,
    /// `(room short id, event short id)` in the order written, oldest first.
    order: std::collections::VecDeque<(u64, u64)>,
    /// Per room short id, `(position, event short id)` in timeline order: every event of the
    /// room from the first one kept on, since appends to a room are serialised.
    timelines: HashMap<u64, std::collections::VecDeque<(u64, u64)>>,
}

impl RecentEvents {
    /// Adds the newest event of room `room`, forgetting the oldest kept beyond `capacity`.
    fn remember(&mut self, room: u64, short: u64, event: Arc<StoredPdu>, capacity: usize) {
        if self.order.len() >= capacity
            && let Some((oldest_room, oldest)) = self.order.pop_front()
        {
            self.events.remove(&oldest);
            if let Some(timeline) = self.timelines.get_mut(&oldest_room) {
                timeline.pop_front();
                if timeline.is_empty() {
                    self.timelines.remove(&oldest_room);
                }
            }
        }
        self.order.push_back((room, short));
        self.timelines.entry(room).or_default().push_back((event.position, short));
        self.events.insert(short, event);
    }

    /// The short ids of room `room`'s events with `after < position <= upto`, oldest first,
    /// if none of them was forgotten (kept ones start at or before `after`).
    fn range(&self, room: u64, after: u64, upto: u64) -> Option<Vec<u64>> {
        let timeline = self.timelines.get(&room)?;
        if timeline.front()?.0 > after {
            return None;
        }
        let start = timeline.partition_point(|(position, _)| *position <= after);
        Some(
            timeline
                .range(start..)
                .take_while(|(position, _)| *position <= upto)
                .map(|(_, short)| *short)
                .collect(),
        )
    }
}

/// Newest events kept in memory.
const RECENT_EVENTS: usize = 2_048;

/// Rooms whose member lists are kept in memory.
const MEMBERS_CACHE: usize = 10_000;

/// Parsed state events kept in memory.
const STATE_CACHE: usize = 20_000;

/// An appended event whose WAL sync is still to come: its stream position stays hidden from
/// syncs until the sync is done.
type Unsynced<'a> = Option<(Pending<'a>, Ticket)>;

/// Where an event goes: an existing room, or a new room of a version (its create event).
enum Target<'a> {
    Existing(&'a RoomId, RoomRecord),
    New(&'a RoomVersionId),
}

impl Rooms {
    pub(super) fn new(db: &Db) -> Result<Self> {
        Ok(Self {
            db: db.clone(),
            rooms: db.table(tables::ROOMS),
            pdus: db.table(tables::PDUS),
            event_ids: db.table(tables::EVENT_IDS),
            timeline: db.table(tables::TIMELINE),
            user_rooms: db.table(tables::USER_ROOMS),
            room_members: db.table(tables::ROOM_MEMBERS),
            transactions: db.table(tables::TRANSACTIONS),
            joins_and_leaves: db.table(tables::MEMBERSHIP_CHANGES),
            outside: db.table(tables::OUTSIDE_MEMBERSHIPS),
            states: States::new(db)?,
            short_event: Counter::new(db, "short_event")?,
            short_room: Counter::new(db, "short_room")?,
            last_create_ts: std::sync::atomic::AtomicU64::new(0),
            locks: Mutex::default(),
            members_cache: ListCache::new(MEMBERS_CACHE),
            memberships_cache: ListCache::new(MEMBERSHIPS_CACHE),
            recent: Mutex::default(),
            state_cache: Mutex::default(),
            chain_cache: Mutex::default(),
            in_flight: Mutex::default(),
            registry: std::sync::OnceLock::new(),
        })
    }

    /// Sets the features taking part in writing events; once, at start.
    pub fn register(&self, registry: listeners::Registry) {
        if self.registry.set(registry).is_err() {
            tracing::warn!("event listeners were registered twice; the first set stays");
        }
    }

    /// The registered features (none before [`Rooms::register`]).
    fn registry(&self) -> &listeners::Registry {
        static NONE: std::sync::OnceLock<listeners::Registry> = std::sync::OnceLock::new();
        self.registry.get().unwrap_or_else(|| NONE.get_or_init(listeners::Registry::default))
    }

    /// The lock serialising appends to `room_id`.
    fn lock(&self, room_id: &RoomId) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        if locks.len() > 10_000 {
            locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        }
        locks.entry(room_id.to_owned()).or_default().clone()
    }

    /// A timestamp for a create event, later than every earlier one.
    fn next_create_ts(&self) -> u64 {
        use std::sync::atomic::Ordering::SeqCst;
        let now = now_ms();
        let update = |last: u64| Some(now.max(last + 1));
        let previous = self.last_create_ts.fetch_update(SeqCst, SeqCst, update).unwrap_or(now);
        now.max(previous + 1)
    }

    /// The room record, if this server knows the room.
    pub fn room(&self, room_id: &RoomId) -> Result<Option<RoomRecord>> {
        Ok(self.rooms.get(room_id.as_str())?)
    }

    /// Every room this server knows, in room id order.
    pub fn all_room_ids(&self) -> Result<Vec<OwnedRoomId>> {
        let mut ids = Vec::new();
        for item in self.rooms.scan_prefix(Vec::new()) {
            let (key, _) = item?;
            if let Ok(room_id) = std::str::from_utf8(&key).map(RoomId::parse) {
                ids.extend(room_id.ok());
            }
        }
        Ok(ids)
    }

    /// The stored event `event_id`.
    pub fn stored(&self, event_id: &EventId) -> Result<Option<StoredPdu>> {
        match self.event_ids.get(event_id.as_str())? {
            Some(short) => Ok(self.pdus.get(&short)?),
            None => Ok(None),
        }
    }

    fn stored_by_short(&self, short: u64) -> Result<StoredPdu> {
        self.stored_by_short_public(short)?
            .ok_or_else(|| Error::internal(format!("missing event {short}")))
    }

    /// The stored event with short id `short`, if any.
    pub fn stored_by_short_public(&self, short: u64) -> Result<Option<StoredPdu>> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(event) = recent.events.get(&short) {
            return Ok(Some(StoredPdu::clone(event)));
        }
        drop(recent);
        Ok(self.pdus.get(&short)?)
    }

    /// Keeps a just-written event of room `room` (short id) in memory for the syncs it wakes;
    /// called under the room's lock, before its position is released.
    fn remember_recent(&self, room: u64, short: u64, event: Arc<StoredPdu>) {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.remember(room, short, event, RECENT_EVENTS);
    }

    /// The short ids of room `room`'s events with `after < position <= upto`, oldest first,
    /// when memory holds all of them.
    fn recent_range(&self, room: u64, after: u64, upto: u64) -> Option<Vec<u64>> {
        self.recent.lock().unwrap_or_else(|e| e.into_inner()).range(room, after, upto)
    }

    /// The parsed state event `short`, from memory when it was read before.
    pub fn state_pdu(&self, short: u64) -> Result<Arc<Pdu>> {
        let generation = {
            let cache = self.state_cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(pdu) = cache.pdus.get(&short) {
                return Ok(pdu.clone());
            }
            cache.generation
        };
        if let Some(pdu) = self.in_flight.lock().unwrap_or_else(|e| e.into_inner()).pdus.get(&short)
        {
            return Ok(pdu.clone());
        }
        let stored = self.stored_by_short(short)?;
        let pdu = Arc::new(Pdu::from_stored(&stored).map_err(Error::internal)?);
        let mut cache = self.state_cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.generation == generation {
            if cache.pdus.len() >= STATE_CACHE {
                cache.pdus.clear();
            }
            cache.pdus.insert(short, pdu.clone());
        }
        Ok(pdu)
    }

    /// Drops the parsed form of `short` once its redaction is written.
    fn forget_state_pdu(&self, short: u64) {
        let mut cache = self.state_cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.pdus.remove(&short);
        cache.generation += 1;
        drop(cache);
        self.recent.lock().unwrap_or_else(|e| e.into_inner()).events.remove(&short);
    }

    /// The current state of a room.
    pub fn current_state(&self, room_id: &RoomId) -> Result<Arc<StateMap>> {
        let record = self.room(room_id)?.ok_or_else(|| Error::not_found("Unknown room"))?;
        self.states.load(record.current_state)
    }

    /// The state event `(kind, state_key)` in `state`, if set.
    pub fn state_event(
        &self,
        state: &StateMap,
        kind: &str,
        state_key: &str,
    ) -> Result<Option<StoredPdu>> {
        match state.get(&(kind.to_owned(), state_key.to_owned())) {
            Some(short) => Ok(Some(self.stored_by_short(*short)?)),
            None => Ok(None),
        }
    }

    /// The parsed state event `(kind, state_key)` in `state`, if set; read from memory after
    /// the first time.
    pub fn state_pdu_of(
        &self,
        state: &StateMap,
        kind: &str,
        state_key: &str,
    ) -> Result<Option<Arc<Pdu>>> {
        state.get(&(kind.to_owned(), state_key.to_owned())).map(|s| self.state_pdu(*s)).transpose()
    }

    /// The content of the state event `(kind, state_key)` in `state`, if set.
    pub fn state_content(
        &self,
        state: &StateMap,
        kind: &str,
        state_key: &str,
    ) -> Result<Option<JsonValue>> {
        match self.state_pdu_of(state, kind, state_key)? {
            Some(pdu) => {
                Ok(Some(serde_json::from_str(pdu.content.get()).map_err(Error::internal)?))
            }
            None => Ok(None),
        }
    }

    /// Every event of a state map, loaded.
    pub fn state_events(&self, state: &StateMap) -> Result<Vec<StoredPdu>> {
        state.values().map(|short| self.stored_by_short(*short)).collect()
    }

    /// The membership of `user_id` in `state` (`"leave"` when none).
    pub fn membership_in(&self, state: &StateMap, user_id: &UserId) -> Result<String> {
        let member = self.state_pdu_of(state, "m.room.member", user_id.as_str())?;
        Ok(member.as_ref().and_then(|m| m.membership()).unwrap_or("leave").to_owned())
    }

    /// The current membership of `user_id` in `room_id`, from the index.
    pub fn membership(&self, room_id: &RoomId, user_id: &UserId) -> Result<Option<String>> {
        Ok(self.room_members.get(&(room_id.as_str(), user_id.as_str()))?)
    }

    /// Rooms `user_id` has the given membership in.
    pub fn rooms_of(&self, user_id: &UserId, membership: &str) -> Result<Vec<OwnedRoomId>> {
        let memberships = self.memberships_of(user_id)?;
        Ok(memberships.iter().filter(|(_, m)| m == membership).map(|(r, _)| r.clone()).collect())
    }

    /// Every room `user_id` has a (not forgotten) membership in, with that membership.
    pub fn memberships_of(&self, user_id: &UserId) -> Result<Memberships> {
        self.memberships_cache.get_or_read(user_id, || {
            let mut rooms = Vec::new();
            for item in self.user_rooms.scan_prefix(prefix(user_id.as_str())) {
                let (key, membership) = item?;
                let room = split_key(&key)
                    .nth(1)
                    .and_then(|r| RoomId::parse(std::str::from_utf8(r).ok()?).ok());
                rooms.extend(room.map(|room| (room, membership)));
            }
            Ok(rooms)
        })
    }

    /// Drops the cached room list of `user_id` after one of their memberships changed.
    fn forget_memberships(&self, user_id: &UserId) {
        self.memberships_cache.forget(user_id);
    }

    /// `user_id` and everyone joined to a room `user_id` is joined to.
    pub fn room_mates(
        &self,
        user_id: &UserId,
    ) -> Result<std::collections::BTreeSet<ruma::OwnedUserId>> {
        let mut mates = std::collections::BTreeSet::from([user_id.to_owned()]);
        for room in self.rooms_of(user_id, "join")? {
            mates.extend(
                self.members(&room)?.iter().filter(|(_, m)| m == "join").map(|(u, _)| u.clone()),
            );
        }
        Ok(mates)
    }

    /// The `candidates` that are `user_id` or share a joined room with them.
    pub fn sharing_with<T: std::borrow::Borrow<UserId>>(
        &self,
        user_id: &UserId,
        candidates: impl IntoIterator<Item = T>,
    ) -> Result<Vec<T>> {
        let mine: std::collections::HashSet<OwnedRoomId> =
            self.rooms_of(user_id, "join")?.into_iter().collect();
        let mut sharing = Vec::new();
        for other in candidates {
            let id = other.borrow();
            if id == user_id || self.rooms_of(id, "join")?.iter().any(|r| mine.contains(r)) {
                sharing.push(other);
            }
        }
        Ok(sharing)
    }

    /// `(room, user, joined)` for memberships that became or stopped being `join` in
    /// `(after, upto]`.
    pub fn joins_and_leaves(
        &self,
        after: u64,
        upto: u64,
    ) -> Result<Vec<(OwnedRoomId, ruma::OwnedUserId, bool)>> {
        let lower = after.saturating_add(1).to_key_bytes();
        let upper = upto.saturating_add(1).to_key_bytes();
        self.joins_and_leaves.scan_range(lower, upper, false).map(|item| Ok(item?.1)).collect()
    }

    /// Members of `room_id` with their membership.
    pub fn members(&self, room_id: &RoomId) -> Result<Members> {
        self.members_cache.get_or_read(room_id, || {
            let mut members = Vec::new();
            for item in self.room_members.scan_prefix(prefix(room_id.as_str())) {
                let (key, membership) = item?;
                if let Some(user) = split_key(&key)
                    .nth(1)
                    .and_then(|u| UserId::parse(std::str::from_utf8(u).ok()?).ok())
                {
                    members.push((user, membership));
                }
            }
            Ok(members)
        })
    }

    /// Brings the kept member list of `room_id` up to date with `changes` (user, membership).
    fn update_members(&self, room_id: &RoomId, changes: &[(ruma::OwnedUserId, String)]) {
        self.members_cache.update(room_id, |members| {
            for (user, membership) in changes {
                match members.iter_mut().find(|(member, _)| member == user) {
                    Some(entry) => entry.1.clone_from(membership),
                    None => members.push((user.clone(), membership.clone())),
                }
            }
        });
    }

    /// Whether `user_id` left and forgot `room_id` (its history is then closed to them).
    pub fn forgotten(&self, room_id: &RoomId, user_id: &UserId) -> Result<bool> {
        Ok(!self.user_rooms.contains(&(user_id.as_str(), room_id.as_str()))?)
    }

    /// Drops `room_id` from the rooms listed for `user_id` (forget).
    pub fn forget(&self, room_id: &RoomId, user_id: &UserId) -> Result<()> {
        let mut batch = self.db.batch();
        self.user_rooms.delete(&mut batch, &(user_id.as_str(), room_id.as_str()));
        self.outside.delete(&mut batch, &(user_id.as_str(), room_id.as_str()));
        self.db.write(batch)?;
        self.forget_memberships(user_id);
        Ok(())
    }

    /// The event already sent to `room_id` in the transaction `txn`, if any.
    pub fn transaction(&self, room_id: &RoomId, txn: Txn<'_>) -> Result<Option<OwnedEventId>> {
        Ok(self.transactions.get(txn.key(room_id).as_slice())?)
    }

    /// Queues the removal of the transaction ids `device_id` of `user_id` used for room sends
    /// and server notices (the device is being deleted; its ids mean nothing without it).
    pub fn forget_device_txns(&self, batch: &mut Batch, user_id: &UserId, device_id: &DeviceId) {
        self.transactions.delete_prefix(batch, prefix(&(user_id.as_str(), device_id.as_str())));
    }

    /// Applies the server's encryption policy to an `m.room.encryption` state event: refused
    /// when encryption is not allowed, and once a room is encrypted its algorithm never changes
    /// (the server never downgrades a room).
    pub fn check_encryption_change(
        &self,
        services: &Services,
        room_id: &RoomId,
        content: &JsonValue,
    ) -> Result<()> {
        if !services.config.encryption.allowed {
            return Err(Error::forbidden("Encryption is disabled on this server"));
        }
        if content.get("algorithm").and_then(|a| a.as_str()).is_none() {
            return Err(Error::bad_json("m.room.encryption needs an algorithm"));
        }
        let state = self.current_state(room_id)?;
        if let Some(current) = self.state_content(&state, "m.room.encryption", "")?
            && current.get("algorithm") != content.get("algorithm")
        {
            return Err(Error::forbidden("A room's encryption cannot be changed or removed"));
        }
        Ok(())
    }

    /// Every stored event from short id `from` on, in short id order (for rebuilding indexes).
    pub fn events_from(&self, from: u64) -> impl Iterator<Item = Result<(u64, StoredPdu)>> + '_ {
        self.pdus.scan_from(from.to_key_bytes()).map(|item| {
            let (key, event) = item?;
            let short =
                <[u8; 8]>::try_from(&key[..]).map(u64::from_be_bytes).map_err(Error::internal)?;
            Ok((short, event))
        })
    }

    /// The room's events in timeline order (`forward`) or newest first, as stored.
    pub fn timeline(
        &self,
        record: &RoomRecord,
        forward: bool,
    ) -> impl Iterator<Item = Result<StoredPdu>> + '_ {
        let prefix = prefix(&record.short_id);
        let entries: Box<dyn Iterator<Item = _>> = if forward {
            Box::new(self.timeline.scan_prefix(prefix))
        } else {
            Box::new(self.timeline.scan_prefix_rev(prefix))
        };
        entries.map(move |item| self.stored_by_short(item?.1))
    }

    /// The room's events with `after < position <= upto`, oldest first or newest first.
    pub fn timeline_range(
        &self,
        record: &RoomRecord,
        after: u64,
        upto: u64,
        forward: bool,
    ) -> impl Iterator<Item = Result<StoredPdu>> + '_ {
        let remembered = self.recent_range(record.short_id, after, upto);
        let scanned = remembered.is_none().then(|| {
            let lower = (record.short_id, after.saturating_add(1)).to_key_bytes();
            let upper = (record.short_id, upto.saturating_add(1)).to_key_bytes();
            self.timeline.scan_range(lower, upper, !forward).map(|item| Ok(item?.1))
        });
        let mut remembered = remembered.unwrap_or_default();
        if !forward {
            remembered.reverse();
        }
        remembered
            .into_iter()
            .map(Ok)
            .chain(scanned.into_iter().flatten())
            .map(move |short: Result<u64>| self.stored_by_short(short?))
    }

    /// The room state as of stream position `position` (after every event up to it).
    pub fn state_at_position(&self, record: &RoomRecord, position: u64) -> Result<Arc<StateMap>> {
        match self.state_id_at_position(record, position)? {
            Some(id) => self.states.load(id),
            None => Ok(Arc::default()),
        }
    }

    /// The snapshot id of the room state as of `position` (None before the room began).
    pub fn state_id_at_position(&self, record: &RoomRecord, position: u64) -> Result<Option<u64>> {
        self.timeline_range(record, 0, position, false)
            .next()
            .map(|event| Ok(event?.room_state_after()))
            .transpose()
    }
}

/// Refuses an event whose `type`, `state_key`, `sender` or `room_id` is longer than the spec's
/// 255 bytes, with `M_TOO_LARGE` (`room_id` is `None` for a room not made yet).
pub fn check_field_sizes(
    kind: &str,
    state_key: Option<&str>,
    sender: &UserId,
    room_id: Option<&RoomId>,
) -> Result<()> {
    let lengths = [
        ("type", kind.len()),
        ("state_key", state_key.map_or(0, str::len)),
        ("sender", sender.as_str().len()),
        ("room_id", room_id.map_or(0, |r| r.as_str().len())),
    ];
    match lengths.into_iter().find(|(_, len)| *len > MAX_FIELD_BYTES) {
        Some((field, _)) => Err(Error::new(
            ErrorKind::TooLarge,
            format!("An event's {field} is at most {MAX_FIELD_BYTES} bytes"),
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(position: u64) -> Arc<StoredPdu> {
        Arc::new(StoredPdu {
            event_id: ruma::event_id!("$e:plaza.test").to_owned(),
            room_id: ruma::room_id!("!r:plaza.test").to_owned(),
            position,
            state_before: 0,
            state_after: 0,
            wire: ruma::CanonicalJsonObject::new(),
            redacted_because: None,
            redaction: None,
            transaction: None,
            room_state: None,
            status: Default::default(),
            replaces: None,
        })
    }

    #[test]
    fn recent_timelines_answer_only_ranges_they_hold_whole() {
        let mut recent = RecentEvents::default();
        // Room 1 gets positions 10, 12, 14, 16; room 2 gets 11, 13, 15; three are kept.
        for (short, position) in (10..17).enumerate() {
            let room = 1 + position % 2;
            recent.remember(room, short as u64, event(position), 3);
        }
        // Kept: positions 14 (room 1), 15 (room 2), 16 (room 1).
        assert_eq!(recent.range(1, 14, 100), Some(vec![6]));
        assert_eq!(recent.range(1, 13, 100), None, "position 12 was forgotten");
        assert_eq!(recent.range(1, 14, 15), Some(vec![]), "16 is past upto");
        assert_eq!(recent.range(2, 15, 100), Some(vec![]));
        assert_eq!(recent.range(2, 14, 100), None, "room 2 keeps only 15");
        assert_eq!(recent.range(3, 0, 100), None, "nothing kept of room 3");
        assert!(recent.events.contains_key(&6) && !recent.events.contains_key(&3));
        // Forgetting a room's last kept event drops the room.
        for short in 7..10 {
            recent.remember(1, short, event(10 + short), 3);
        }
        assert!(!recent.timelines.contains_key(&2));
        assert_eq!(recent.range(1, 17, 19), Some(vec![8, 9]));
        assert_eq!(recent.range(1, 16, 19), None, "position 16 was forgotten");
    }
}
