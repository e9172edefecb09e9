//! Event graph scenarios (Plaza only, in-process): joins to a room of 50,000 members, timed over
//! HTTP with the bytes each writes, and the state resolution where two branches of 500 state
//! events each, received from two other servers, meet.
//!
//! The big room is built on the database before the server starts, with the services alone:
//! its 50,000 joins are taken as already judged for push notifications, as in a room that grew
//! over months, so the notifier starts on the joins measured.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use plaza::service::{
    Services,
    rooms::{
        NewEvent, Status,
        create::{CreateRoom, Preset, create_room},
        ingest::{KeyLookup, Outcome},
        pdu::encoded_len,
    },
};
use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, OwnedRoomId, OwnedServerName,
    OwnedUserId, RoomId, RoomVersionId, UserId,
    room_version_rules::RoomVersionRules,
    serde::Base64,
    signatures::{Ed25519KeyPair, PublicKeyMap, PublicKeySet},
};
use serde_json::{Value, json};

use crate::{Error, Target, User, percentile};

/// Members of the big room before the measured joins.
const MEMBERS: usize = 50_000;
/// Joins measured.
const JOINS: usize = 200;
/// Appends in flight while the big room is built (they share WAL syncs).
const BUILDERS: usize = 16;
/// State events on each branch of the fork.
const BRANCH: usize = 500;

/// The graph rows of the table, from a server of its own on a temp dir.
pub async fn rows(http: reqwest::Client) -> Result<Vec<[String; 3]>, Error> {
    let dir = tempfile::tempdir()?;
    let config = crate::config(dir.path())?;
    // The server runs in this process: its warnings and errors go to standard error.
    tracing_subscriber::fmt()
        .with_env_filter(config.log.env_filter())
        .with_writer(std::io::stderr)
        .init();
    eprintln!("graph: building a room of {MEMBERS} members");
    let started = Instant::now();
    let (room_id, joiners) = build_big_room(config.clone()).await?;
    let built = started.elapsed();

    let server = plaza::Server::start(config).await?;
    let services = server.services().clone();
    // The search index catches up on the room's events at start; let it finish first.
    services.search.flush().await;

    let target =
        Target { base: format!("http://{}", server.addrs()[0]), secret: String::new(), http };
    let measured = async {
        eprintln!("graph: resolving a fork");
        let fork = resolve_fork(&services).await?;
        eprintln!("graph: timing {JOINS} joins");
        let joins = timed_joins(&target, &services, &room_id, &joiners).await?;
        Ok::<_, Error>((fork, joins))
    }
    .await;
    // Stopped before its directory goes, whatever the outcome. The notifier finishes the
    // events it is judging first.
    eprintln!("graph: stopping the server");
    drop(services);
    let stopping = Instant::now();
    server.stop().await;
    let stopped = stopping.elapsed();
    let (fork, joins) = measured?;

    let mut rows = vec![[
        format!("join to a room of {MEMBERS} members ({JOINS} joins over HTTP)"),
        "p50 < 2 ms".into(),
        format!(
            "{joins}; room built in {:.0} s; the server's stop then waited {:.0} s for push \
             judging of the joins",
            built.as_secs_f64(),
            stopped.as_secs_f64()
        ),
    ]];
    rows.push([
        format!("resolve a fork of two branches of {BRANCH} state events each (merge ingest)"),
        "< 50 ms".into(),
        fork,
    ]);
    Ok(rows)
}

/// Builds, on the services alone, a public room with [`MEMBERS`] members, and [`JOINS`] users
/// with access tokens who are not in it yet; returns the room and those users.
async fn build_big_room(config: plaza::Config) -> Result<(OwnedRoomId, Vec<User>), Error> {
    let services = Arc::new(plaza::server::open_services(config)?);
    let server = services.server_name().to_owned();
    let user_id = |name: String| UserId::parse(format!("@{name}:{server}"));
    let owner = user_id("graph_owner".into())?;
    let members: Vec<OwnedUserId> =
        (0..MEMBERS).map(|i| user_id(format!("member{i}"))).collect::<Result<_, _>>()?;
    let mut joiners = Vec::with_capacity(JOINS);
    for chunk in std::iter::once(&owner).chain(&members).collect::<Vec<_>>().chunks(5_000) {
        let mut batch = services.db.batch();
        for user in chunk {
            services.users.create(&mut batch, user, None, false, false, None);
        }
        services.db.write(batch)?;
    }
    let mut batch = services.db.batch();
    for i in 0..JOINS {
        let user = user_id(format!("joiner{i}"))?;
        services.users.create(&mut batch, &user, None, false, false, None);
        let tokens = services.sessions.issue(&mut batch, &user, None, None, false)?;
        joiners.push(User { id: user.to_string(), token: tokens.access_token });
    }
    services.db.write(batch)?;

    let request = CreateRoom { preset: Some(Preset::PublicChat), ..Default::default() };
    let room_id = create_room(&services, &owner, request).await?;
    let members = Arc::new(members);
    let mut builders = Vec::with_capacity(BUILDERS);
    for first in 0..BUILDERS {
        let (services, room_id, members) = (services.clone(), room_id.clone(), members.clone());
        builders.push(tokio::spawn(async move {
            for member in members.iter().skip(first).step_by(BUILDERS) {
                let join = NewEvent::state(
                    "m.room.member",
                    member.as_str(),
                    json!({ "membership": "join" }),
                );
                services.rooms.append(&services, &room_id, member, join, None).await?;
            }
            Ok::<(), Error>(())
        }));
    }
    for builder in builders {
        builder.await??;
    }
    // Taken as judged for push notifications: every event so far (the notifier reads this
    // cursor when it has recorded nothing of its own).
    let last_event = services.db.counter("short_event")?;
    let global = services.db.table::<u64>(plaza::storage::tables::GLOBAL);
    let mut batch = services.db.batch();
    global.put(&mut batch, "push_cursor", &last_event);
    services.db.write(batch)?;
    Arc::into_inner(services).ok_or("the services are still in use")?;
    Ok((room_id, joiners))
}

/// Joins `joiners` to `room_id` one after the other over HTTP; returns the row's result: the
/// latencies, and the bytes written per join beside the size of a join event.
async fn timed_joins(
    target: &Target,
    services: &Services,
    room_id: &RoomId,
    joiners: &[User],
) -> Result<String, Error> {
    let room: String = form_urlencoded::byte_serialize(room_id.as_str().as_bytes()).collect();
    let path = format!("/_matrix/client/v3/rooms/{room}/join");
    let written = services.db.bytes_written();
    let mut times: Vec<Duration> = Vec::with_capacity(joiners.len());
    for joiner in joiners {
        let started = Instant::now();
        target.call(reqwest::Method::POST, joiner, &path, Some(json!({}))).await?;
        times.push(started.elapsed());
    }
    let written = services.db.bytes_written() - written;
    times.sort();

    let state = services.rooms.current_state(room_id)?;
    let mut event_bytes = 0;
    for joiner in joiners {
        let member = services.rooms.state_event(&state, "m.room.member", &joiner.id)?;
        let member = member.ok_or_else(|| format!("{} did not join", joiner.id))?;
        event_bytes += encoded_len(&member.wire);
    }
    let count = joiners.len().max(1);
    Ok(format!(
        "p50 {:.1} ms, p99 {:.1} ms; {:.1} KB written per join (join event {} bytes)",
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        percentile(&times, 0.99).as_secs_f64() * 1e3,
        written as f64 / count as f64 / 1e3,
        event_bytes / count,
    ))
}

/// A server elsewhere that signs the events of its users.
struct Remote {
    name: OwnedServerName,
    key: Ed25519KeyPair,
}

impl Remote {
    fn new(name: &str) -> Result<Self, Error> {
        let document = Ed25519KeyPair::generate();
        let key = Ed25519KeyPair::from_der(&document, "bench".into())?;
        Ok(Self { name: name.try_into()?, key })
    }

    /// The key other servers check its signatures with.
    fn public_keys(&self) -> PublicKeySet {
        let id = format!("ed25519:{}", self.key.version());
        BTreeMap::from([(id, Base64::new(self.key.public_key().to_vec()))])
    }
}

/// The public keys of the remote servers.
struct Keys(PublicKeyMap);

impl KeyLookup for Keys {
    fn public_keys<'a>(
        &'a self,
        servers: &'a BTreeSet<OwnedServerName>,
    ) -> Pin<Box<dyn Future<Output = plaza::Result<PublicKeyMap>> + Send + 'a>> {
        let keys = servers
            .iter()
            .filter_map(|server| Some((server.to_string(), self.0.get(server.as_str())?.clone())))
            .collect();
        Box::pin(async move { Ok(keys) })
    }
}

/// Events of one room of version 11, built and signed as their senders' servers would.
struct Room {
    id: String,
    rules: RoomVersionRules,
    ts: u64,
}

/// An event to build: sender, type, state key, content, prev events, auth events, depth.
struct Draft<'a> {
    sender: &'a str,
    kind: &'a str,
    state_key: Option<&'a str>,
    content: Value,
    prev: Vec<&'a OwnedEventId>,
    auth: Vec<&'a OwnedEventId>,
    depth: u64,
}

impl<'a> Draft<'a> {
    /// A state event.
    fn state(
        sender: &'a str,
        kind: &'a str,
        state_key: &'a str,
        content: Value,
        prev: Vec<&'a OwnedEventId>,
        auth: Vec<&'a OwnedEventId>,
        depth: u64,
    ) -> Self {
        Self { sender, kind, state_key: Some(state_key), content, prev, auth, depth }
    }
}

impl Room {
    /// The signed event and its id.
    fn event(
        &mut self,
        by: &Remote,
        draft: Draft<'_>,
    ) -> Result<(OwnedEventId, CanonicalJsonObject), Error> {
        self.ts += 1;
        let mut event = json!({
            "room_id": self.id,
            "sender": draft.sender,
            "origin": by.name,
            "origin_server_ts": self.ts,
            "type": draft.kind,
            "content": draft.content,
            "prev_events": draft.prev,
            "auth_events": draft.auth,
            "depth": draft.depth,
        });
        if let Some(state_key) = draft.state_key {
            event["state_key"] = json!(state_key);
        }
        let CanonicalJsonValue::Object(mut event) = CanonicalJsonValue::try_from(event)? else {
            return Err("an event is an object".into());
        };
        ruma::signatures::hash_and_sign_event(
            by.name.as_str(),
            &by.key,
            &mut event,
            &self.rules.redaction,
        )?;
        let id = format!("${}", ruma::signatures::reference_hash(&event, &self.rules)?);
        Ok((id.try_into()?, event))
    }
}

/// Builds a room on two other servers, ingests two branches of [`BRANCH`] state events off
/// one parent (the same state keys, one branch per server), then times the ingest of the event
/// that names both tips; returns the row's result.
async fn resolve_fork(services: &Arc<Services>) -> Result<String, Error> {
    let (a, b) = (Remote::new("a.bench")?, Remote::new("b.bench")?);
    let keys = Keys(BTreeMap::from([
        (a.name.to_string(), a.public_keys()),
        (b.name.to_string(), b.public_keys()),
    ]));
    let (alice, bob) = ("@alice:a.bench", "@bob:b.bench");
    let room_id: OwnedRoomId = "!fork:a.bench".try_into()?;
    let rules = RoomVersionId::V11.rules().ok_or("room version 11 has rules")?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    let mut room = Room { id: room_id.to_string(), rules, ts: now.as_millis() as u64 };

    let create = room.event(
        &a,
        Draft::state(
            alice,
            "m.room.create",
            "",
            json!({ "room_version": "11" }),
            vec![],
            vec![],
            1,
        ),
    )?;
    let joined = json!({ "membership": "join" });
    let alice_join = room.event(
        &a,
        Draft::state(
            alice,
            "m.room.member",
            alice,
            joined.clone(),
            vec![&create.0],
            vec![&create.0],
            2,
        ),
    )?;
    let levels = json!({ "users": { alice: 100, bob: 100 }, "state_default": 50 });
    let auth = vec![&create.0, &alice_join.0];
    let power = room.event(
        &a,
        Draft::state(alice, "m.room.power_levels", "", levels, vec![&alice_join.0], auth, 3),
    )?;
    let auth = vec![&create.0, &power.0, &alice_join.0];
    let rule = json!({ "join_rule": "public" });
    let join_rule = room
        .event(&a, Draft::state(alice, "m.room.join_rules", "", rule, vec![&power.0], auth, 4))?;
    let auth = vec![&create.0, &power.0, &join_rule.0];
    let bob_join = room
        .event(&b, Draft::state(bob, "m.room.member", bob, joined, vec![&join_rule.0], auth, 5))?;
    let start = [&create, &alice_join, &power, &join_rule, &bob_join];
    let start = start.iter().map(|(_, event)| event.clone()).collect();
    expect_placed(services.rooms.ingest(services, &room_id, start, &keys).await?)?;

    let mut tips = Vec::new();
    let mut branch_took = Vec::new();
    for (server, sender, member) in [(&a, alice, &alice_join.0), (&b, bob, &bob_join.0)] {
        let mut events = Vec::with_capacity(BRANCH);
        let mut tip = bob_join.0.clone();
        for i in 0..BRANCH {
            let content = json!({ "server": server.name, "i": i });
            let auth = vec![&create.0, &power.0, member];
            let key = format!("k{i}");
            let draft = Draft::state(
                sender,
                "org.plaza.bench.fork",
                &key,
                content,
                vec![&tip],
                auth,
                6 + i as u64,
            );
            let (id, event) = room.event(server, draft)?;
            events.push(event);
            tip = id;
        }
        let started = Instant::now();
        expect_placed(services.rooms.ingest(services, &room_id, events, &keys).await?)?;
        branch_took.push(started.elapsed());
        tips.push(tip);
    }

    let merge = Draft {
        sender: alice,
        kind: "m.room.message",
        state_key: None,
        content: json!({ "msgtype": "m.text", "body": "merge" }),
        prev: tips.iter().collect(),
        auth: vec![&create.0, &power.0, &alice_join.0],
        depth: 6 + BRANCH as u64,
    };
    let (_, merge) = room.event(&a, merge)?;
    let started = Instant::now();
    expect_placed(services.rooms.ingest(services, &room_id, vec![merge], &keys).await?)?;
    let took = started.elapsed();
    let [first, second] = branch_took[..] else { return Err("two branches".into()) };
    Ok(format!(
        "{:.1} ms (ingesting the branches took {:.1} s and {:.1} s: each event of the second \
         resolves the room's state against the first branch)",
        took.as_secs_f64() * 1e3,
        first.as_secs_f64(),
        second.as_secs_f64(),
    ))
}

/// Fails unless every event was placed as accepted.
fn expect_placed(outcomes: Vec<(Option<OwnedEventId>, Outcome)>) -> Result<(), Error> {
    match outcomes.into_iter().find(|(_, outcome)| *outcome != Outcome::Placed(Status::Accepted)) {
        Some((event_id, outcome)) => Err(format!("{event_id:?}: {outcome:?}").into()),
        None => Ok(()),
    }
}
