//! Fake remote servers for the event graph's tests: each has a signing key and builds signed
//! events of a room version (ids, references, auth events as the spec asks), which the test
//! server takes through its one ingestion path, as if they came over federation.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use plaza::service::{
    Services,
    rooms::{
        Status,
        ingest::{KeyLookup, Outcome},
    },
};
use reqwest::StatusCode;
use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, OwnedRoomId, OwnedServerName,
    RoomVersionId, UserId,
    room_version_rules::{EventIdFormatVersion, EventsReferenceFormatVersion, RoomVersionRules},
    serde::Base64,
    signatures::{Ed25519KeyPair, PublicKeyMap},
};
use serde_json::{Value, json};

use crate::common::{TestServer, enc};

/// A server of the federation that exists only as a name and a signing key.
pub struct FakeServer {
    pub name: OwnedServerName,
    pub key: Ed25519KeyPair,
}

impl FakeServer {
    pub fn new(name: &str) -> Self {
        let doc = Ed25519KeyPair::generate();
        let key = Ed25519KeyPair::from_der(&doc, "1".into()).unwrap();
        Self { name: name.try_into().unwrap(), key }
    }

    /// The user id `@local:name`.
    pub fn user(&self, local: &str) -> String {
        format!("@{local}:{}", self.name)
    }
}

/// The verify keys of fake servers, as federation would have fetched them.
pub struct Keys(PublicKeyMap);

impl Keys {
    pub fn of(servers: &[&FakeServer]) -> Self {
        let mut map = PublicKeyMap::new();
        for server in servers {
            let key = Base64::new(server.key.public_key().to_vec());
            map.insert(server.name.to_string(), BTreeMap::from([("ed25519:1".to_owned(), key)]));
        }
        Self(map)
    }
}

impl KeyLookup for Keys {
    fn public_keys<'a>(
        &'a self,
        servers: &'a BTreeSet<OwnedServerName>,
    ) -> Pin<Box<dyn Future<Output = plaza::Result<PublicKeyMap>> + Send + 'a>> {
        Box::pin(async move {
            Ok(self
                .0
                .iter()
                .filter(|(name, _)| servers.iter().any(|s| s.as_str() == name.as_str()))
                .map(|(name, keys)| (name.clone(), keys.clone()))
                .collect())
        })
    }
}

/// `(event type, state key)` -> event id.
pub type StateIds = BTreeMap<(String, String), OwnedEventId>;

/// One event of a [`Dag`]: its signed form, depth and the state after it as its builder saw it.
pub struct Node {
    pub pdu: CanonicalJsonObject,
    pub depth: i64,
    pub state: StateIds,
}

/// A room's graph as the remote servers build it: signed events with their prev and auth
/// events. The state a new event sees is its first prev event's, completed by the others'
/// (a builder's view; what the receiving server resolves is for the tests to check).
pub struct Dag {
    pub version: RoomVersionId,
    pub rules: RoomVersionRules,
    pub room_id: Option<OwnedRoomId>,
    pub creator: Option<String>,
    pub nodes: HashMap<OwnedEventId, Node>,
    clock: i64,
    count: u64,
}

/// An event to build: sender, type, state key, content and prev events.
pub struct Ev<'a> {
    pub sender: &'a str,
    pub kind: &'a str,
    pub state_key: Option<&'a str>,
    pub content: Value,
    pub prev: Vec<OwnedEventId>,
}

impl Dag {
    pub fn new(version: RoomVersionId) -> Self {
        let rules = version.rules().unwrap();
        // Each graph has times of its own, so that two rooms of version 12 made by one user
        // (whose create events carry nothing else that differs) get two ids.
        static GRAPHS: AtomicU64 = AtomicU64::new(0);
        let n = GRAPHS.fetch_add(1, Ordering::Relaxed) as i64;
        Self {
            version,
            rules,
            room_id: None,
            creator: None,
            nodes: HashMap::new(),
            clock: 1_700_000_000_000 + n * 100_000_000,
            count: 0,
        }
    }

    pub fn room_id(&self) -> OwnedRoomId {
        self.room_id.clone().unwrap()
    }

    /// The signed event `id`, as it goes over the wire.
    pub fn pdu(&self, id: &OwnedEventId) -> CanonicalJsonObject {
        self.nodes[id].pdu.clone()
    }

    /// The signed event `id` as JSON.
    pub fn json(&self, id: &OwnedEventId) -> Value {
        serde_json::to_value(&self.nodes[id].pdu).unwrap()
    }

    /// The state after `id` as the builder saw it.
    pub fn state(&self, id: &OwnedEventId) -> &StateIds {
        &self.nodes[id].state
    }

    /// Builds, hashes and signs an event of `server`; returns its id.
    pub fn add(&mut self, server: &FakeServer, ev: Ev<'_>) -> OwnedEventId {
        let is_create = ev.kind == "m.room.create";
        let mut before = StateIds::new();
        let mut depth = 0;
        for prev in &ev.prev {
            let node = &self.nodes[prev];
            depth = depth.max(node.depth);
            for (key, id) in &node.state {
                before.entry(key.clone()).or_insert_with(|| id.clone());
            }
        }
        let sender = UserId::parse(ev.sender).unwrap();
        let raw = serde_json::value::to_raw_value(&ev.content).unwrap();
        let auth_types = ruma::state_res::auth_types_for_event(
            &ev.kind.into(),
            &sender,
            ev.state_key,
            &raw,
            &self.rules.authorization,
        )
        .unwrap();
        let auth: Vec<OwnedEventId> = auth_types
            .iter()
            .filter_map(|(kind, key)| before.get(&(kind.to_string(), key.clone())).cloned())
            .collect();
        self.clock += 1_000;
        self.count += 1;
        let mut pdu = CanonicalJsonObject::new();
        let set = |pdu: &mut CanonicalJsonObject, field: &str, value: Value| {
            pdu.insert(field.to_owned(), CanonicalJsonValue::try_from(value).unwrap());
        };
        set(&mut pdu, "type", json!(ev.kind));
        set(&mut pdu, "sender", json!(ev.sender));
        set(&mut pdu, "origin", json!(server.name));
        set(&mut pdu, "origin_server_ts", json!(self.clock));
        set(&mut pdu, "depth", json!(depth + 1));
        set(&mut pdu, "prev_events", self.refs(&ev.prev));
        set(&mut pdu, "auth_events", self.refs(&auth));
        set(&mut pdu, "content", ev.content);
        if let Some(key) = ev.state_key {
            set(&mut pdu, "state_key", json!(key));
        }
        let v12_create = is_create && self.rules.authorization.room_create_event_id_as_room_id;
        if !v12_create {
            let room_id = match &self.room_id {
                Some(room_id) => room_id.to_string(),
                None => format!("!room{}:{}", self.clock, server.name),
            };
            set(&mut pdu, "room_id", json!(room_id));
        }
        let v1_id = (self.rules.event_id_format == EventIdFormatVersion::V1)
            .then(|| format!("$ev{}:{}", self.count, server.name));
        if let Some(id) = &v1_id {
            set(&mut pdu, "event_id", json!(id));
        }
        ruma::signatures::hash_and_sign_event(
            server.name.as_str(),
            &server.key,
            &mut pdu,
            &self.rules.redaction,
        )
        .unwrap();
        let hash = ruma::signatures::reference_hash(&pdu, &self.rules).unwrap();
        let id: OwnedEventId = v1_id.unwrap_or_else(|| format!("${hash}")).try_into().unwrap();
        if is_create {
            self.creator = Some(ev.sender.to_owned());
            self.room_id = Some(match pdu.get("room_id") {
                Some(CanonicalJsonValue::String(room_id)) => room_id.as_str().try_into().unwrap(),
                _ => format!("!{hash}").try_into().unwrap(),
            });
        }
        let mut state = before;
        if let Some(key) = ev.state_key {
            state.insert((ev.kind.to_owned(), key.to_owned()), id.clone());
        }
        self.nodes.insert(id.clone(), Node { pdu, depth: depth + 1, state });
        id
    }

    /// Adds an event the test server built (a local member's), read from its store, so later
    /// remote events can follow it.
    pub fn learn(&mut self, services: &Services, id: &str) -> OwnedEventId {
        let id = OwnedEventId::try_from(id).unwrap();
        let stored = services.rooms.stored(&id).unwrap().unwrap();
        let pdu = stored.wire;
        let prev: Vec<OwnedEventId> = match pdu.get("prev_events") {
            Some(CanonicalJsonValue::Array(refs)) => refs
                .iter()
                .map(|r| match r {
                    CanonicalJsonValue::String(id) => id.as_str().try_into().unwrap(),
                    CanonicalJsonValue::Array(pair) => match &pair[0] {
                        CanonicalJsonValue::String(id) => id.as_str().try_into().unwrap(),
                        other => panic!("bad reference {other:?}"),
                    },
                    other => panic!("bad reference {other:?}"),
                })
                .collect(),
            _ => Vec::new(),
        };
        let mut state = StateIds::new();
        let mut depth = 0;
        for prev in &prev {
            let node = &self.nodes[prev];
            depth = depth.max(node.depth);
            for (key, value) in &node.state {
                state.entry(key.clone()).or_insert_with(|| value.clone());
            }
        }
        if let Some(CanonicalJsonValue::String(key)) = pdu.get("state_key") {
            let kind = pdu.get("type").and_then(|t| t.as_str()).unwrap().to_owned();
            state.insert((kind, key.clone()), id.clone());
        }
        self.nodes.insert(id.clone(), Node { pdu, depth: depth + 1, state });
        id
    }

    fn refs(&self, ids: &[OwnedEventId]) -> Value {
        if self.rules.events_reference_format != EventsReferenceFormatVersion::V1 {
            return json!(ids);
        }
        let refs: Vec<Value> = ids
            .iter()
            .map(|id| {
                let hash = ruma::signatures::reference_hash(&self.nodes[id].pdu, &self.rules);
                json!([id, { "sha256": hash.unwrap() }])
            })
            .collect();
        json!(refs)
    }

    /// A state event.
    pub fn state_event(
        &mut self,
        server: &FakeServer,
        sender: &str,
        kind: &str,
        key: &str,
        content: Value,
        prev: &[&OwnedEventId],
    ) -> OwnedEventId {
        let prev = prev.iter().map(|p| (*p).clone()).collect();
        self.add(server, Ev { sender, kind, state_key: Some(key), content, prev })
    }

    /// An `m.room.message` with `body`.
    pub fn message(
        &mut self,
        server: &FakeServer,
        sender: &str,
        body: &str,
        prev: &[&OwnedEventId],
    ) -> OwnedEventId {
        let prev = prev.iter().map(|p| (*p).clone()).collect();
        let content = json!({ "msgtype": "m.text", "body": body });
        self.add(server, Ev { sender, kind: "m.room.message", state_key: None, content, prev })
    }

    /// `user`'s membership event with `membership`, sent by `sender`.
    pub fn member(
        &mut self,
        server: &FakeServer,
        sender: &str,
        user: &str,
        membership: &str,
        prev: &[&OwnedEventId],
    ) -> OwnedEventId {
        let content = json!({ "membership": membership });
        self.state_event(server, sender, "m.room.member", user, content, prev)
    }

    /// `m.room.power_levels` content giving `users` their levels (the creator of a room of
    /// version 12 or later is left out: creators are above every level).
    pub fn power_levels(&self, users: &[(&str, i64)]) -> Value {
        let mut map = serde_json::Map::new();
        for (user, level) in users {
            let creator = self.creator.as_deref() == Some(*user);
            if !(creator && self.rules.authorization.explicitly_privilege_room_creators) {
                map.insert((*user).to_owned(), json!(level));
            }
        }
        json!({
            "users": map, "users_default": 0, "events_default": 0, "state_default": 50,
            "ban": 50, "kick": 50, "redact": 50, "invite": 0,
        })
    }

    /// A public room made by `creator` of `server`: create, creator's join, power levels
    /// (`levels`, the creator at 100), public join rules; returns the ids in order.
    pub fn public_room(
        &mut self,
        server: &FakeServer,
        creator: &str,
        levels: &[(&str, i64)],
    ) -> Vec<OwnedEventId> {
        let mut content = json!({ "room_version": self.version });
        if !self.rules.authorization.use_room_create_sender {
            content["creator"] = json!(creator);
        }
        let create = self.add(
            server,
            Ev {
                sender: creator,
                kind: "m.room.create",
                state_key: Some(""),
                content,
                prev: vec![],
            },
        );
        let join = self.member(server, creator, creator, "join", &[&create]);
        let mut users = vec![(creator, 100)];
        users.extend_from_slice(levels);
        let levels = self.power_levels(&users);
        let power = self.state_event(server, creator, "m.room.power_levels", "", levels, &[&join]);
        let rules = json!({ "join_rule": "public" });
        let join_rules =
            self.state_event(server, creator, "m.room.join_rules", "", rules, &[&power]);
        vec![create, join, power, join_rules]
    }
}

/// Ingests `ids` of `dag` in one call; returns their outcomes in that order.
pub async fn ingest(s: &TestServer, dag: &Dag, keys: &Keys, ids: &[&OwnedEventId]) -> Vec<Outcome> {
    let pdus = ids.iter().map(|id| dag.pdu(id)).collect();
    ingest_pdus(s, dag, keys, pdus, ids).await
}

/// Ingests raw `pdus` (expected to have the ids `ids`); returns their outcomes.
pub async fn ingest_pdus(
    s: &TestServer,
    dag: &Dag,
    keys: &Keys,
    pdus: Vec<CanonicalJsonObject>,
    ids: &[&OwnedEventId],
) -> Vec<Outcome> {
    let services = services(s);
    let answer = services.rooms.ingest(&services, &dag.room_id(), pdus, keys).await.unwrap();
    assert_eq!(answer.len(), ids.len());
    answer
        .into_iter()
        .zip(ids)
        .map(|((id, outcome), expected)| {
            if let Some(id) = id {
                assert_eq!(&id, *expected, "the server names the event as its builder did");
            }
            outcome
        })
        .collect()
}

/// Ingests `ids` and asserts each was placed as accepted.
pub async fn ingest_accepted(s: &TestServer, dag: &Dag, keys: &Keys, ids: &[&OwnedEventId]) {
    let outcomes = ingest(s, dag, keys, ids).await;
    for (id, outcome) in ids.iter().zip(&outcomes) {
        assert_eq!(outcome, &Outcome::Placed(Status::Accepted), "{id}");
    }
}

/// Restarts the server and waits until its search index has caught up with the events, the
/// last start-up work holding the database.
pub async fn restart(s: TestServer) -> TestServer {
    let s = s.restart().await;
    services(&s).search.flush().await;
    s
}

pub fn services(s: &TestServer) -> Arc<Services> {
    s.server().services().clone()
}

pub fn status(s: &TestServer, id: &OwnedEventId) -> Option<Status> {
    services(s).rooms.status_of(id).unwrap()
}

/// The room's current state on the test server, by event id.
pub fn current_state(s: &TestServer, room_id: &OwnedRoomId) -> StateIds {
    let services = services(s);
    let state = services.rooms.current_state(room_id).unwrap();
    state
        .iter()
        .map(|(key, short)| {
            let event = services.rooms.stored_by_short_public(*short).unwrap().unwrap();
            (key.clone(), event.event_id)
        })
        .collect()
}

/// The event at `(kind, key)` in the room's current state.
pub fn state_at(
    s: &TestServer,
    room_id: &OwnedRoomId,
    kind: &str,
    key: &str,
) -> Option<OwnedEventId> {
    current_state(s, room_id).get(&(kind.to_owned(), key.to_owned())).cloned()
}

pub fn extremities(s: &TestServer, room_id: &OwnedRoomId) -> BTreeSet<OwnedEventId> {
    services(s).rooms.extremities(room_id).unwrap().into_iter().collect()
}

pub fn gaps(s: &TestServer, room_id: &OwnedRoomId) -> Vec<OwnedEventId> {
    services(s).rooms.gaps_of(room_id).unwrap()
}

/// The prev events of the stored event `id`.
pub fn prev_events_of(s: &TestServer, id: &str) -> BTreeSet<String> {
    let id = OwnedEventId::try_from(id).unwrap();
    let stored = services(s).rooms.stored(&id).unwrap().unwrap();
    let value: Value = stored.wire.get("prev_events").unwrap().clone().into();
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().or_else(|| r[0].as_str()).unwrap().to_owned())
        .collect()
}

pub async fn sync(s: &TestServer, token: &str, query: &str) -> Value {
    let (status, body) = s.get(&format!("/_matrix/client/v3/sync?{query}"), Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

/// The event ids of `room`'s timeline in a sync answer.
pub fn timeline_ids(sync: &Value, room: &OwnedRoomId) -> Vec<String> {
    sync["rooms"]["join"][room.as_str()]["timeline"]["events"]
        .as_array()
        .map(|events| events.iter().map(|e| e["event_id"].as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

/// The ids of `room`'s timeline in `/messages` read backwards from `from` (newest first).
pub async fn messages_back(
    s: &TestServer,
    token: &str,
    room: &OwnedRoomId,
    from: &str,
) -> Vec<String> {
    let path = format!(
        "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=1000&from={from}",
        enc(room.as_str())
    );
    let (status, body) = s.get(&path, Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect()
}

/// `GET /rooms/{room}/event/{id}`'s status.
/// A public room of room version 11 made by `creator` on `server` and received here, with the
/// local user `dan` joined: the graph, its setup events, the room, dan's token and dan's join.
pub async fn local_member_room(
    s: &TestServer,
    keys: &Keys,
    server: &FakeServer,
    creator: &str,
) -> (Dag, Vec<OwnedEventId>, OwnedRoomId, String, OwnedEventId) {
    let mut dag = Dag::new(RoomVersionId::V11);
    let setup = dag.public_room(server, creator, &[]);
    ingest_accepted(s, &dag, keys, &setup.iter().collect::<Vec<_>>()).await;
    let room = dag.room_id();
    let (_, dan, _) = s.register("dan", "correct horse").await;
    let dan_join = join(s, &dan, &room).await;
    let dan_join = dag.learn(&services(s), &dan_join);
    (dag, setup, room, dan, dan_join)
}

/// As [`local_member_room`], with the remote user `carol` of `remote` joined before dan: the
/// graph, its setup events, carol's join, the room, dan's token and dan's join.
pub async fn carol_and_dan_room(
    s: &TestServer,
    keys: &Keys,
    (server, creator): (&FakeServer, &str),
    (remote, carol): (&FakeServer, &str),
) -> (Dag, Vec<OwnedEventId>, OwnedEventId, OwnedRoomId, String, OwnedEventId) {
    let mut dag = Dag::new(RoomVersionId::V11);
    let setup = dag.public_room(server, creator, &[]);
    let carol_join = dag.member(remote, carol, carol, "join", &[&setup[3]]);
    let mut first: Vec<&OwnedEventId> = setup.iter().collect();
    first.push(&carol_join);
    ingest_accepted(s, &dag, keys, &first).await;
    let room = dag.room_id();
    let (_, dan, _) = s.register("dan", "correct horse").await;
    let dan_join = join(s, &dan, &room).await;
    let dan_join = dag.learn(&services(s), &dan_join);
    (dag, setup, carol_join, room, dan, dan_join)
}

/// Two fake servers, `remote1.test` and `remote2.test`, and the keys of both.
pub fn two_servers() -> (FakeServer, FakeServer, Keys) {
    let (r1, r2) = (FakeServer::new("remote1.test"), FakeServer::new("remote2.test"));
    let keys = Keys::of(&[&r1, &r2]);
    (r1, r2, keys)
}

/// Asserts that none of `ids` is in `history` and that `/event` answers 404 for each.
pub async fn assert_hidden(
    s: &TestServer,
    token: &str,
    room: &OwnedRoomId,
    history: &[String],
    ids: &[&OwnedEventId],
) {
    for id in ids {
        assert!(!history.contains(&id.to_string()), "{id}");
        assert_eq!(get_event(s, token, room, id.as_str()).await, StatusCode::NOT_FOUND, "{id}");
    }
}

pub async fn get_event(s: &TestServer, token: &str, room: &OwnedRoomId, id: &str) -> StatusCode {
    let path = format!("/_matrix/client/v3/rooms/{}/event/{}", enc(room.as_str()), enc(id));
    s.get(&path, Some(token)).await.0
}

/// A local user joins `room` over HTTP; returns the join event's id.
pub async fn join(s: &TestServer, token: &str, room: &OwnedRoomId) -> String {
    let path = format!("/_matrix/client/v3/join/{}", enc(room.as_str()));
    let (status, body) = s.post(&path, Some(token), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The join is the newest forward extremity: it follows all the others.
    let record = services(s).rooms.room(room).unwrap().unwrap();
    assert_eq!(record.extremities.len(), 1);
    record.extremities[0].to_string()
}

/// A local member sends a text; returns the event id.
pub async fn send(
    s: &TestServer,
    token: &str,
    room: &OwnedRoomId,
    txn: &str,
    body: &str,
) -> String {
    let (status, answer) = s.send_text(token, room.as_str(), txn, body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer["event_id"].as_str().unwrap().to_owned()
}

/// A small deterministic generator (xorshift64*), for delivery orders.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

/// `user`'s membership in `room` as the membership index has it.
pub fn membership(s: &TestServer, room: &OwnedRoomId, user: &str) -> Option<String> {
    let user = <&UserId>::try_from(user).unwrap();
    services(s).rooms.membership(room, user).unwrap()
}

/// A sync query whose timelines hold up to 100 events.
pub const LONG_TIMELINE: &str =
    "filter=%7B%22room%22%3A%7B%22timeline%22%3A%7B%22limit%22%3A100%7D%7D%7D";
