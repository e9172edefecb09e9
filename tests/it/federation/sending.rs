//! Rooms shared between two Plaza servers over TLS: events both ways through the transaction
//! queues, a server down then back (nothing lost, order kept), transactions replayed and bad
//! input, gap filling, the serving endpoints under history visibility, the admin API of
//! destinations, a server the room's ACL denies, and a transaction answered promptly when
//! servers whose keys it needs never answer.
//!
//! A remote user joins with a test-side join: the join event is built and signed as its
//! server would, placed there on the room's state as the host holds it, and reaches the host
//! through the joining server's own transaction queue.

use std::time::Duration;

use plaza::service::rooms::{Status, from_state::VouchedState, ingest::Outcome};
use reqwest::{Method, StatusCode};
use ruma::{CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, RoomId, RoomVersionId};
use serde_json::{Value, json};

use super::harness::*;
use crate::common::{assert_error, enc};

/// Waits (up to 15 s) until `check` holds.
pub(super) async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..300 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never happened: {what}");
}

fn version_of(s: &FedServer, room: &RoomId) -> RoomVersionId {
    s.services().rooms.room(room).unwrap().unwrap().version
}

fn depth(wire: &CanonicalJsonObject) -> i64 {
    match wire.get("depth") {
        Some(CanonicalJsonValue::Integer(depth)) => i64::from(*depth),
        _ => 0,
    }
}

/// An event of `sender` (a user of `signer`) in `room` as `on` holds the room, signed by
/// `signer`: after `prev` (default: `on`'s extremities), with auth events from `on`'s state.
#[allow(clippy::too_many_arguments)]
fn build_pdu(
    on: &FedServer,
    signer: &FedServer,
    room: &RoomId,
    sender: &str,
    kind: &str,
    state_key: Option<&str>,
    content: Value,
    prev: Option<Vec<OwnedEventId>>,
) -> (OwnedEventId, CanonicalJsonObject) {
    let rooms = &on.services().rooms;
    let version = version_of(on, room);
    let rules = version.rules().unwrap();
    let state = rooms.current_state(room).unwrap();
    let prev = prev.unwrap_or_else(|| rooms.extremities(room).unwrap());
    let depth = prev
        .iter()
        .filter_map(|id| rooms.stored(id).unwrap().or(signer.services().rooms.stored(id).unwrap()))
        .map(|e| depth(&e.wire))
        .max()
        .unwrap_or(0)
        + 1;
    let mut keys = vec![("m.room.power_levels", ""), ("m.room.member", sender)];
    if version != RoomVersionId::V12 {
        keys.push(("m.room.create", ""));
    }
    if kind == "m.room.member" {
        keys.push(("m.room.join_rules", ""));
        keys.push(("m.room.member", state_key.unwrap()));
    }
    let mut auth: Vec<String> = keys
        .iter()
        .filter_map(|(k, s)| rooms.state_event(&state, k, s).unwrap())
        .map(|e| e.event_id.to_string())
        .collect();
    auth.sort();
    auth.dedup();
    let mut event = json!({
        "room_id": room, "sender": sender, "type": kind, "content": content,
        "prev_events": prev, "auth_events": auth, "depth": depth,
        "origin_server_ts": plaza::service::now_ms(),
    });
    if let Some(key) = state_key {
        event["state_key"] = json!(key);
    }
    let mut wire: CanonicalJsonObject = serde_json::from_value(event).unwrap();
    let id = signer.sign_pdu(&mut wire, &rules);
    (id, wire)
}

/// Joins `user` (of `b`) to `room` hosted on `a`: the join is placed on `b` on `a`'s state
/// and reaches `a` through `b`'s transaction queue.
pub(super) async fn join_remote(a: &FedServer, b: &FedServer, room: &RoomId, user: &str) {
    let (_, join) = build_pdu(
        a,
        b,
        room,
        user,
        "m.room.member",
        Some(user),
        json!({ "membership": "join" }),
        None,
    );
    let rooms = &a.services().rooms;
    let state = rooms.state_events(&rooms.current_state(room).unwrap()).unwrap();
    let ids: Vec<OwnedEventId> = state.iter().map(|e| e.event_id.clone()).collect();
    let auth_chain = rooms
        .auth_chain(&ids)
        .unwrap()
        .iter()
        .map(|id| rooms.stored(id).unwrap().unwrap().wire)
        .collect();
    let vouched = VouchedState { state: state.into_iter().map(|e| e.wire).collect(), auth_chain };
    let sb = b.services();
    let version = version_of(a, room);
    let (_, outcome) = sb
        .rooms
        .ingest_with_state(sb, room, &version, join, vouched, &sb.federation)
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Placed(Status::Accepted));
    let user_id = ruma::UserId::parse(user).unwrap();
    eventually("the host learns of the join", || {
        rooms.membership(room, &user_id).unwrap().as_deref() == Some("join")
    })
    .await;
}

/// The bodies of the messages `token` reads in `room`, oldest first.
pub(super) async fn bodies(s: &FedServer, token: &str, room: &str) -> Vec<String> {
    let path = format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=100");
    let (status, body) = s.server.get(&path, Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut out: Vec<String> = body["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .map(|e| e["content"]["body"].as_str().unwrap_or_default().to_owned())
        .collect();
    out.reverse();
    out
}

/// Waits until `token` reads exactly `expected` in `room`.
pub(super) async fn until_bodies(s: &FedServer, token: &str, room: &str, expected: &[&str]) {
    let mut seen = Vec::new();
    for _ in 0..300 {
        seen = bodies(s, token, room).await;
        if seen == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("expected {expected:?}, read {seen:?}");
}

/// Stops `b` and starts it again; while it is down, `alice` sends `messages` (transaction id,
/// body) in `room` on `a` until A's queue to B has failed `failures` times.
pub(super) async fn sent_while_down(
    a: &FedServer,
    b: FedServer,
    alice: &str,
    room: &str,
    messages: &[(String, String)],
    failures: u32,
) -> FedServer {
    let handle = tokio::runtime::Handle::current();
    let b_name = b.name.clone();
    b.restart(
        |_| {
            tokio::task::block_in_place(|| {
                handle.block_on(async {
                    for (txn, body) in messages {
                        send(a, alice, room, txn, text(body)).await;
                    }
                    eventually("A sees B failing", || {
                        a.services()
                            .federation_sender
                            .destination(b_name.as_str())
                            .is_some_and(|s| s.failures >= failures)
                    })
                    .await;
                })
            });
        },
        |_| {},
    )
    .await
}

/// Messages `m{from}` to `m{to}`, each with its name as transaction id and body.
pub(super) fn numbered(from: usize, to: usize) -> Vec<(String, String)> {
    (from..=to).map(|n| (format!("m{n}"), format!("m{n}"))).collect()
}

pub(super) async fn send(
    s: &FedServer,
    token: &str,
    room: &str,
    txn: &str,
    content: Value,
) -> String {
    let path = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}");
    let (status, body) = s.server.put(&path, Some(token), content).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["event_id"].as_str().unwrap().to_owned()
}

pub(super) fn text(body: &str) -> Value {
    json!({ "msgtype": "m.text", "body": body })
}

/// Two servers, alice on A hosting a public room, and bob on B (not joined yet).
pub(super) async fn shared_room(
    visibility: &str,
) -> (std::sync::Arc<Pki>, FedServer, FedServer, String, String, String, String) {
    shared_room_with(visibility, |_| {}).await
}

/// [`shared_room`] with `adjust` applied to A's configuration.
pub(super) async fn shared_room_with(
    visibility: &str,
    adjust: impl FnOnce(&mut plaza::Config),
) -> (std::sync::Arc<Pki>, FedServer, FedServer, String, String, String, String) {
    let pki = Pki::new();
    let a = FedServer::start(&pki, 1, adjust).await;
    let b = FedServer::start(&pki, 2, |_| {}).await;
    let (_, alice) = {
        let (id, token, _) = a.server.register("alice", "password-alice").await;
        (id, token)
    };
    let (bob_id, bob) = {
        let (id, token, _) = b.server.register("bob", "password-bob").await;
        (id, token)
    };
    let room = a
        .server
        .create_room(
            &alice,
            json!({
                "preset": "public_chat",
                "room_version": "11",
                "initial_state": [{
                    "type": "m.room.history_visibility", "state_key": "",
                    "content": { "history_visibility": visibility }
                }]
            }),
        )
        .await;
    (pki, a, b, alice, bob, bob_id, room)
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_and_threads_reach_the_other_server_in_order() {
    let (_pki, a, b, alice, bob, bob_id, room) = shared_room("shared").await;
    let room_id = RoomId::parse(&room).unwrap();
    join_remote(&a, &b, &room_id, &bob_id).await;

    let root = send(&a, &alice, &room, "a1", text("a1")).await;
    send(&a, &alice, &room, "a2", text("a2")).await;
    send(&a, &alice, &room, "a3", text("a3")).await;
    until_bodies(&b, &bob, &room, &["a1", "a2", "a3"]).await;

    send(&b, &bob, &room, "b1", text("b1")).await;
    let reply = json!({
        "msgtype": "m.text", "body": "t1",
        "m.relates_to": { "rel_type": "m.thread", "event_id": root },
    });
    let reply_id = send(&b, &bob, &room, "t1", reply).await;
    until_bodies(&a, &alice, &room, &["a1", "a2", "a3", "b1", "t1"]).await;
    until_bodies(&b, &bob, &room, &["a1", "a2", "a3", "b1", "t1"]).await;

    // The thread is a thread on the host too.
    let path = format!("/_matrix/client/v1/rooms/{room}/relations/{}/m.thread", enc(&root));
    let (status, body) = a.server.get(&path, Some(&alice)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["chunk"][0]["event_id"], reply_id.as_str(), "{body}");

    // Bob's client sees the host's messages by /sync, in order.
    let filter = enc(r#"{"room":{"timeline":{"limit":50}}}"#);
    let (status, sync) =
        b.server.get(&format!("/_matrix/client/v3/sync?filter={filter}"), Some(&bob)).await;
    assert_eq!(status, StatusCode::OK, "{sync}");
    let timeline: Vec<&str> = sync["rooms"]["join"][&room]["timeline"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .map(|e| e["content"]["body"].as_str().unwrap())
        .collect();
    assert_eq!(timeline, ["a1", "a2", "a3", "b1", "t1"]);

    // Nothing waits any more, and the queues show in /metrics.
    eventually("queues drain", || {
        a.services().federation_sender.depth(b.name.as_str()) == 0
            && b.services().federation_sender.depth(a.name.as_str()) == 0
    })
    .await;
    let metrics = a.services().metrics.render(a.services());
    assert!(
        metrics.contains(&format!("plaza_federation_queue_depth{{destination=\"{}\"}} 0", b.name)),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_down_for_a_while_catches_up_in_order() {
    let (_pki, a, b, alice, bob, bob_id, room) = shared_room("shared").await;
    let room_id = RoomId::parse(&room).unwrap();
    join_remote(&a, &b, &room_id, &bob_id).await;
    let first = send(&a, &alice, &room, "m0", text("m0")).await;
    until_bodies(&b, &bob, &room, &["m0"]).await;

    // While B is down, A's users keep talking and A's queue to B fails.
    let b = sent_while_down(&a, b, &alice, &room, &numbered(1, 60), 2).await;
    let status = a.services().federation_sender.destination(b.name.as_str()).unwrap();
    assert!(status.retry_interval_ms >= 1_000, "{status:?}");
    assert_eq!(status.queued, 60);

    // B contacting A ends A's backoff: everything arrives, once, in order.
    let path = format!("/_matrix/federation/v1/event/{}", enc(&first));
    let (status, body) = a
        .signed(
            Method::GET,
            &path,
            b.name.as_str(),
            Some(a.name.as_str()),
            b.key(),
            &b.key_id(),
            None,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let expected: Vec<String> = (0..=60).map(|n| format!("m{n}")).collect();
    let expected: Vec<&str> = expected.iter().map(String::as_str).collect();
    until_bodies(&b, &bob, &room, &expected).await;
    until_bodies(&a, &alice, &room, &expected).await;
    eventually("A's queue to B is empty and healthy", || {
        let status = a.services().federation_sender.destination(b.name.as_str()).unwrap();
        (status.failures, status.queued, status.retry_interval_ms) == (0, 0, 0)
    })
    .await;
}

/// Sends a transaction to `to` as `from` would.
async fn put_txn(
    to: &FedServer,
    from: &FedServer,
    txn: &str,
    pdus: &[Value],
) -> (StatusCode, Value) {
    let body = json!({
        "origin": from.name, "origin_server_ts": plaza::service::now_ms(), "pdus": pdus,
    });
    let path = format!("/_matrix/federation/v1/send/{txn}");
    to.signed(
        Method::PUT,
        &path,
        from.name.as_str(),
        Some(to.name.as_str()),
        from.key(),
        &from.key_id(),
        Some(&body),
        Some(&body),
    )
    .await
}

fn value(wire: &CanonicalJsonObject) -> Value {
    serde_json::to_value(wire).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn transactions_answer_per_pdu_and_replays_change_nothing() {
    let (_pki, a, b, alice, _bob, bob_id, room) = shared_room("shared").await;
    let room_id = RoomId::parse(&room).unwrap();
    join_remote(&a, &b, &room_id, &bob_id).await;

    let msg = |body: &str| text(body);
    let (good, good_pdu) =
        build_pdu(&a, &b, &room_id, &bob_id, "m.room.message", None, msg("good"), None);
    // Signed, then changed: the signature no longer holds.
    let (_, mut forged_pdu) =
        build_pdu(&a, &b, &room_id, &bob_id, "m.room.message", None, msg("forged"), None);
    forged_pdu.insert("origin_server_ts".into(), CanonicalJsonValue::Integer(1u32.into()));
    let rules = version_of(&a, &room_id).rules().unwrap();
    let forged = format!("${}", ruma::signatures::reference_hash(&forged_pdu, &rules).unwrap());
    // A user of A sent by B, signed by B only: A's signature is missing.
    let alice_id = format!("@alice:{}", a.name);
    let (spoofed, spoofed_pdu) =
        build_pdu(&a, &b, &room_id, &alice_id, "m.room.message", None, msg("spoofed"), None);
    // Bob may not change the power levels.
    let (unauthorised, unauthorised_pdu) = build_pdu(
        &a,
        &b,
        &room_id,
        &bob_id,
        "m.room.power_levels",
        Some(""),
        json!({ "users": { bob_id.clone(): 100 } }),
        None,
    );
    // A validly signed event of a room A does not know.
    let nowhere = format!("!nowhere:{}", b.name);
    let mut stray_pdu = good_pdu.clone();
    stray_pdu.insert("room_id".into(), CanonicalJsonValue::String(nowhere.clone()));
    stray_pdu.remove("signatures");
    stray_pdu.remove("hashes");
    let stray = b.sign_pdu(&mut stray_pdu, &rules);
    let pdus = [
        value(&good_pdu),
        value(&forged_pdu),
        value(&spoofed_pdu),
        value(&unauthorised_pdu),
        value(&stray_pdu),
        json!("not an event"),
    ];
    let (status, answer) = put_txn(&a, &b, "t1", &pdus).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let results = answer["pdus"].as_object().unwrap();
    assert_eq!(results[good.as_str()], json!({}), "{answer}");
    for bad in [forged.as_str(), spoofed.as_str(), unauthorised.as_str()] {
        assert!(results[bad]["error"].is_string(), "{bad}: {answer}");
    }
    let why = results[spoofed.as_str()]["error"].as_str().unwrap();
    assert!(why.contains("signature") && why.contains(a.name.as_str()), "{answer}");
    let why = results[stray.as_str()]["error"].as_str().unwrap();
    assert!(why.contains(&nowhere) && why.contains("not known"), "{answer}");
    assert_eq!(results.len(), 5, "{answer}");
    assert_eq!(a.services().rooms.status_of(&unauthorised).unwrap(), Some(Status::Rejected));
    until_bodies(&a, &alice, &room, &["good"]).await;

    // The same transaction again: the same answer, nothing twice.
    let (status, again) = put_txn(&a, &b, "t1", &pdus).await;
    assert_eq!((status, &again), (StatusCode::OK, &answer));
    assert_eq!(bodies(&a, &alice, &room).await, ["good"]);
    // The room stays usable.
    send(&a, &alice, &room, "after", text("after")).await;
    until_bodies(&a, &alice, &room, &["good", "after"]).await;

    // Too many PDUs, and a transaction claiming another origin.
    let many: Vec<Value> = (0..51).map(|_| value(&good_pdu)).collect();
    assert_error(&put_txn(&a, &b, "t2", &many).await, StatusCode::BAD_REQUEST, "M_BAD_JSON");
    let body = json!({ "origin": a.name, "origin_server_ts": 1, "pdus": [] });
    let result = a
        .signed(
            Method::PUT,
            "/_matrix/federation/v1/send/t3",
            b.name.as_str(),
            Some(a.name.as_str()),
            b.key(),
            &b.key_id(),
            Some(&body),
            Some(&body),
        )
        .await;
    assert_error(&result, StatusCode::FORBIDDEN, "M_FORBIDDEN");
}

#[tokio::test(flavor = "multi_thread")]
async fn gaps_are_filled_from_the_sending_server() {
    let (_pki, a, b, alice, _bob, bob_id, room) = shared_room("shared").await;
    let room_id = RoomId::parse(&room).unwrap();
    join_remote(&a, &b, &room_id, &bob_id).await;

    // Three events of bob in a chain; B holds the first two (known only to it) and sends
    // only the third.
    let sb = b.services();
    let mut prev = None;
    let mut last = None;
    for body in ["g1", "g2", "g3"] {
        let (id, pdu) =
            build_pdu(&a, &b, &room_id, &bob_id, "m.room.message", None, text(body), prev);
        let outcomes =
            sb.rooms.ingest_outliers(&room_id, vec![pdu.clone()], &sb.federation).await.unwrap();
        assert_eq!(outcomes[0].1, Outcome::Placed(Status::Outlier));
        prev = Some(vec![id.clone()]);
        last = Some((id, pdu));
    }
    let (e3, p3) = last.unwrap();
    let (status, answer) = put_txn(&a, &b, "gap", &[value(&p3)]).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["pdus"][e3.as_str()], json!({}), "{answer}");
    until_bodies(&a, &alice, &room, &["g1", "g2", "g3"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn serving_honours_membership_and_history_visibility() {
    let (pki, a, b, alice, bob, bob_id, room) = shared_room("joined").await;
    let room_id = RoomId::parse(&room).unwrap();
    let before = send(&a, &alice, &room, "x1", text("before")).await;
    join_remote(&a, &b, &room_id, &bob_id).await;
    let after = send(&a, &alice, &room, "x2", text("after")).await;
    until_bodies(&b, &bob, &room, &["after"]).await;

    let get = |path: String| {
        let (a, b) = (&a, &b);
        async move {
            a.signed(
                Method::GET,
                &path,
                b.name.as_str(),
                Some(a.name.as_str()),
                b.key(),
                &b.key_id(),
                None,
                None,
            )
            .await
        }
    };
    let (status, body) = get(format!("/_matrix/federation/v1/event/{}", enc(&after))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["pdus"][0]["content"]["body"], "after");
    assert_eq!(body["origin"], a.name.as_str());
    let result = get(format!("/_matrix/federation/v1/event/{}", enc(&before))).await;
    assert_error(&result, StatusCode::FORBIDDEN, "M_FORBIDDEN");

    // Backfill walks back from the newest event: the early message comes redacted.
    let path =
        format!("/_matrix/federation/v1/backfill/{}?v={}&limit=1000", enc(&room), enc(&after));
    let (status, body) = get(path).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let pdus = body["pdus"].as_array().unwrap();
    assert_eq!(pdus[0]["content"]["body"], "after", "{body}");
    let early = pdus.iter().find(|p| p["content"]["body"] == "before");
    assert!(early.is_none(), "{body}");
    let redacted = pdus.iter().filter(|p| p["type"] == "m.room.message").count();
    assert_eq!(redacted, 2, "both messages, the early one without content: {body}");

    // The state before the newest event holds bob's join, with its auth chain.
    let path = format!("/_matrix/federation/v1/state_ids/{}?event_id={}", enc(&room), enc(&after));
    let (status, ids) = get(path).await;
    assert_eq!(status, StatusCode::OK, "{ids}");
    let state =
        a.services().rooms.state_ids_before(&OwnedEventId::try_from(after.as_str()).unwrap());
    let (state, chain) = state.unwrap().unwrap();
    assert_eq!(ids["pdu_ids"].as_array().unwrap().len(), state.len());
    assert_eq!(ids["auth_chain_ids"].as_array().unwrap().len(), chain.len());
    let path = format!("/_matrix/federation/v1/state/{}?event_id={}", enc(&room), enc(&after));
    let (status, full) = get(path).await;
    assert_eq!(status, StatusCode::OK, "{full}");
    assert!(full["pdus"].as_array().unwrap().iter().any(|p| p["state_key"] == bob_id.as_str()));
    let path = format!("/_matrix/federation/v1/event_auth/{}/{}", enc(&room), enc(&after));
    let (status, auth) = get(path).await;
    assert_eq!(status, StatusCode::OK, "{auth}");
    assert!(auth["auth_chain"].as_array().unwrap().iter().any(|p| p["type"] == "m.room.create"));

    // Missing events between the join and the newest message: just that message.
    let join = a.services().rooms.state_event(
        &a.services().rooms.current_state(&room_id).unwrap(),
        "m.room.member",
        &bob_id,
    );
    let join = join.unwrap().unwrap().event_id;
    let body = json!({ "earliest_events": [join], "latest_events": [after], "limit": 10 });
    let path = format!("/_matrix/federation/v1/get_missing_events/{}", enc(&room));
    let (status, missing) = a
        .signed(
            Method::POST,
            &path,
            b.name.as_str(),
            Some(a.name.as_str()),
            b.key(),
            &b.key_id(),
            Some(&body),
            Some(&body),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{missing}");
    assert_eq!(missing["events"].as_array().unwrap().len(), 0, "{missing}");

    // A third server with no member is refused.
    let c = FedServer::start(&pki, 3, |_| {}).await;
    let path = format!("/_matrix/federation/v1/event/{}", enc(&after));
    let result = a
        .signed(
            Method::GET,
            &path,
            c.name.as_str(),
            Some(a.name.as_str()),
            c.key(),
            &c.key_id(),
            None,
            None,
        )
        .await;
    assert_error(&result, StatusCode::FORBIDDEN, "M_FORBIDDEN");
}

/// A waits a minute after B first fails, so only a reset ends the wait in a test's time.
fn slow_retries(config: &mut plaza::Config) {
    config.federation.destination_retry_first_ms = 60_000;
}

/// The admin's list of A's destinations (exactly one, B): that entry.
async fn only_destination(a: &FedServer, admin: &str, b: &FedServer) -> Value {
    let (status, list) =
        a.server.get("/_synapse/admin/v1/federation/destinations", Some(admin)).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list["total"], 1, "{list}");
    let entry = list["destinations"][0].clone();
    assert_eq!(entry["destination"], b.name.as_str(), "{list}");
    entry
}

#[tokio::test(flavor = "multi_thread")]
async fn admins_list_destinations_and_reset_them() {
    let (_pki, a, b, alice, bob, bob_id, room) = shared_room_with("shared", slow_retries).await;
    let room_id = RoomId::parse(&room).unwrap();
    join_remote(&a, &b, &room_id, &bob_id).await;
    send(&a, &alice, &room, "d1", text("d1")).await;
    eventually("delivered", || a.services().federation_sender.depth(b.name.as_str()) == 0).await;

    let (admin_id, admin, _) = a.server.register("admin", "password-admin").await;
    a.server.set_role(&admin_id, "admin");
    let entry = only_destination(&a, &admin, &b).await;
    assert_eq!(
        (entry["retry_last_ts"].clone(), entry["retry_interval"].clone()),
        (json!(0), json!(0))
    );
    assert_eq!(entry["failure_ts"], Value::Null);

    // B goes down and A's transaction to it fails; A restarts meanwhile and still knows.
    let handle = tokio::runtime::Handle::current();
    let (b_name, admin_token) = (b.name.clone(), admin.clone());
    let mut slot = Some(a);
    let b = b
        .restart(
            |_| {
                tokio::task::block_in_place(|| {
                    handle.block_on(async {
                        let a = slot.take().unwrap();
                        send(&a, &alice, &room, "d2", text("d2")).await;
                        eventually("A sees B failing", || {
                            a.services()
                                .federation_sender
                                .destination(b_name.as_str())
                                .is_some_and(|s| s.failures == 1)
                        })
                        .await;
                        let (status, entry) = a
                            .server
                            .get(
                                &format!("/_synapse/admin/v1/federation/destinations/{b_name}"),
                                Some(&admin_token),
                            )
                            .await;
                        assert_eq!(status, StatusCode::OK, "{entry}");
                        assert_eq!(entry["retry_interval"], 60_000, "{entry}");
                        assert_eq!(entry["queued"], 1, "{entry}");
                        assert!(entry["retry_last_ts"].as_u64().unwrap() > 0, "{entry}");
                        assert!(entry["failure_ts"].as_u64().unwrap() > 0, "{entry}");
                        assert!(entry["last_error"].as_str().unwrap().contains("cannot reach"));
                        let a = a.restart(|_| {}, slow_retries).await;
                        let (status, after) = a
                            .server
                            .get(
                                &format!("/_synapse/admin/v1/federation/destinations/{b_name}"),
                                Some(&admin_token),
                            )
                            .await;
                        assert_eq!(status, StatusCode::OK, "{after}");
                        for field in ["retry_interval", "retry_last_ts", "failure_ts", "queued"] {
                            assert_eq!(after[field], entry[field], "{field}: {after}");
                        }
                        slot = Some(a);
                    })
                });
            },
            |_| {},
        )
        .await;
    let a = slot.unwrap();

    // B is back, but A would wait a minute: the admin resets it and it goes now.
    let path = format!("/_synapse/admin/v1/federation/destinations/{}", b.name);
    assert_eq!(only_destination(&a, &admin, &b).await["retry_interval"], 60_000);
    let (status, body) =
        a.server.post(&format!("{path}/reset_connection"), Some(&admin), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let entry = only_destination(&a, &admin, &b).await;
    assert_eq!(
        (&entry["retry_last_ts"], &entry["retry_interval"], &entry["failure_ts"]),
        (&json!(0), &json!(0), &Value::Null),
        "{entry}"
    );
    until_bodies(&b, &bob, &room, &["d1", "d2"]).await;
    eventually("A's queue to B is empty", || {
        a.services().federation_sender.depth(b.name.as_str()) == 0
    })
    .await;

    // A destination with nothing queued is still listed after a restart, healthy.
    let a = a.restart(|_| {}, slow_retries).await;
    let entry = only_destination(&a, &admin, &b).await;
    assert_eq!(
        (&entry["retry_last_ts"], &entry["retry_interval"], &entry["failure_ts"], &entry["queued"]),
        (&json!(0), &json!(0), &Value::Null, &json!(0)),
        "{entry}"
    );
    assert!(entry["last_success_ts"].as_u64().unwrap() > 0, "{entry}");

    let (status, one) = a.server.get(&path, Some(&admin)).await;
    assert_eq!((status, &one["destination"]), (StatusCode::OK, &json!(b.name.as_str())));
    let unknown = a
        .server
        .get("/_synapse/admin/v1/federation/destinations/nowhere.example", Some(&admin))
        .await;
    assert_error(&unknown, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let (status, page) = a
        .server
        .get("/_synapse/admin/v1/federation/destinations?from=1&limit=10", Some(&admin))
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!((page["destinations"].clone(), page["total"].clone()), (json!([]), json!(1)));
    let refused = a.server.get("/_synapse/admin/v1/federation/destinations", Some(&alice)).await;
    assert_error(&refused, StatusCode::FORBIDDEN, "M_FORBIDDEN");
}

/// Typing and public read receipts of one server's users reach the other server's clients.
#[tokio::test(flavor = "multi_thread")]
async fn typing_and_receipts_reach_the_other_server() {
    let (_pki, a, b, alice, bob, bob_id, room) = shared_room("shared").await;
    let room_id = RoomId::parse(&room).unwrap();
    join_remote(&a, &b, &room_id, &bob_id).await;
    let said = send(&a, &alice, &room, "r1", text("read me")).await;
    until_bodies(&b, &bob, &room, &["read me"]).await;

    // Bob types on B; Alice's client on A sees it.
    let path = format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(&room), enc(&bob_id));
    let (status, body) = b
        .server
        .call(Method::PUT, &path, Some(&bob), Some(json!({ "typing": true, "timeout": 20000 })))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut seen_typing = false;
    let mut seen_receipt = false;
    let mut receipt_sent = false;
    for _ in 0..300 {
        let (_, sync) = a.server.get("/_matrix/client/v3/sync?timeout=0", Some(&alice)).await;
        for event in
            sync["rooms"]["join"][&room]["ephemeral"]["events"].as_array().into_iter().flatten()
        {
            if event["type"] == "m.typing"
                && event["content"]["user_ids"]
                    .as_array()
                    .is_some_and(|u| u.iter().any(|u| u == bob_id.as_str()))
            {
                seen_typing = true;
            }
            if event["type"] == "m.receipt"
                && event["content"][said.as_str()]["m.read"][bob_id.as_str()]["ts"].is_u64()
            {
                seen_receipt = true;
            }
        }
        if seen_typing && !receipt_sent {
            // Then a read receipt from Bob for Alice's message.
            let path =
                format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(&room), enc(&said));
            let (status, body) =
                b.server.call(Method::POST, &path, Some(&bob), Some(json!({}))).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            receipt_sent = true;
        }
        if seen_typing && seen_receipt {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen_typing, "Bob's typing never reached A");
    assert!(seen_receipt, "Bob's read receipt never reached A");
}

#[tokio::test(flavor = "multi_thread")]
async fn events_queued_for_a_server_down_survive_a_restart_of_the_sender() {
    let (_pki, a, b, alice, bob, bob_id, room) = shared_room("shared").await;
    let room_id = RoomId::parse(&room).unwrap();
    join_remote(&a, &b, &room_id, &bob_id).await;
    send(&a, &alice, &room, "m0", text("m0")).await;
    until_bodies(&b, &bob, &room, &["m0"]).await;

    // While B is down, A's users send and A restarts right after: the queue entries written
    // with the events are there after the restart.
    let handle = tokio::runtime::Handle::current();
    let b_name = b.name.clone();
    let mut slot = Some(a);
    let b = b
        .restart(
            |_| {
                tokio::task::block_in_place(|| {
                    handle.block_on(async {
                        let a = slot.take().unwrap();
                        for n in 1..=5 {
                            send(&a, &alice, &room, &format!("m{n}"), text(&format!("m{n}"))).await;
                        }
                        let a = a.restart(|_| {}, |_| {}).await;
                        assert_eq!(a.services().federation_sender.depth(b_name.as_str()), 5);
                        slot = Some(a);
                    })
                });
            },
            |_| {},
        )
        .await;
    let a = slot.unwrap();
    a.services().federation_sender.reset(b.name.as_str());
    until_bodies(&b, &bob, &room, &["m0", "m1", "m2", "m3", "m4", "m5"]).await;
    eventually("A's queue to B is empty", || {
        a.services().federation_sender.depth(b.name.as_str()) == 0
    })
    .await;
}

/// Sends a transaction of `pdus` and `edus` to `to` as `from` would.
async fn put_txn_with_edus(
    to: &FedServer,
    from: &FedServer,
    txn: &str,
    pdus: &[Value],
    edus: &[Value],
) -> (StatusCode, Value) {
    let body = json!({
        "origin": from.name, "origin_server_ts": plaza::service::now_ms(),
        "pdus": pdus, "edus": edus,
    });
    let path = format!("/_matrix/federation/v1/send/{txn}");
    let (origin, key_id) = (from.name.as_str(), from.key_id());
    let destination = Some(to.name.as_str());
    to.signed(
        Method::PUT,
        &path,
        origin,
        destination,
        from.key(),
        &key_id,
        Some(&body),
        Some(&body),
    )
    .await
}

/// Whether `token`'s sync on `s` shows `user` typing in `room`.
async fn shows_typing(s: &FedServer, token: &str, room: &str, user: &str) -> bool {
    let (status, sync) = s.server.get("/_matrix/client/v3/sync?timeout=0", Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{sync}");
    sync["rooms"]["join"][room]["ephemeral"]["events"].as_array().into_iter().flatten().any(|e| {
        e["type"] == "m.typing"
            && e["content"]["user_ids"].as_array().is_some_and(|u| u.iter().any(|u| u == user))
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_the_room_acl_denies_is_refused_until_allowed_again() {
    let (_pki, a, b, alice, _bob, bob_id, room) = shared_room("shared").await;
    let room_id = RoomId::parse(&room).unwrap();
    join_remote(&a, &b, &room_id, &bob_id).await;
    let first = send(&a, &alice, &room, "before", text("before")).await;
    // The ACL compares the server name without its port: B is `127.0.0.2:<port>`.
    assert_eq!(b.name.host(), "127.0.0.2");
    let set_acl = |deny: Value| {
        let path = format!("/_matrix/client/v3/rooms/{}/state/m.room.server_acl/", enc(&room));
        let body = json!({ "allow": ["*"], "deny": deny, "allow_ip_literals": true });
        let server = &a.server;
        let alice = alice.clone();
        async move {
            let (status, body) = server.put(&path, Some(&alice), body).await;
            assert_eq!(status, StatusCode::OK, "{body}");
        }
    };
    let typing = json!({
        "edu_type": "m.typing",
        "content": { "room_id": room, "user_id": bob_id, "typing": true },
    });
    let make_join = format!(
        "/_matrix/federation/v1/make_join/{}/{}?ver=11",
        enc(&room),
        enc(&format!("@carl:{}", b.name))
    );
    let backfill =
        format!("/_matrix/federation/v1/backfill/{}?v={}&limit=10", enc(&room), enc(&first));
    let fed_get = |path: String| {
        let (a, b) = (&a, &b);
        async move {
            let key_id = b.key_id();
            a.signed(Method::GET, &path, b.name.as_str(), None, b.key(), &key_id, None, None).await
        }
    };

    set_acl(json!(["127.0.0.2"])).await;
    let (denied, denied_pdu) =
        build_pdu(&a, &b, &room_id, &bob_id, "m.room.message", None, text("denied"), None);
    let (status, answer) =
        put_txn_with_edus(&a, &b, "acl1", &[value(&denied_pdu)], std::slice::from_ref(&typing))
            .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let why = answer["pdus"][denied.as_str()]["error"].as_str().unwrap_or_default();
    assert!(why.contains("server ACL"), "{answer}");
    assert_eq!(a.services().rooms.stored(&denied).unwrap().map(|e| e.event_id), None);
    assert!(!shows_typing(&a, &alice, &room, &bob_id).await);
    assert_error(&fed_get(make_join.clone()).await, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    assert_error(&fed_get(backfill.clone()).await, StatusCode::FORBIDDEN, "M_FORBIDDEN");

    // Allowed again: the same requests go through.
    set_acl(json!([])).await;
    let (allowed, allowed_pdu) =
        build_pdu(&a, &b, &room_id, &bob_id, "m.room.message", None, text("allowed"), None);
    let (status, answer) =
        put_txn_with_edus(&a, &b, "acl2", &[value(&allowed_pdu)], &[typing]).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["pdus"][allowed.as_str()], json!({}), "{answer}");
    until_bodies(&a, &alice, &room, &["before", "allowed"]).await;
    assert!(shows_typing(&a, &alice, &room, &bob_id).await);
    let (status, body) = fed_get(make_join).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = fed_get(backfill).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["pdus"].as_array().is_some_and(|pdus| !pdus.is_empty()), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gap_too_large_to_fetch_is_bridged_with_the_sending_servers_state() {
    let (pki, a, b, alice, bob, bob_id, room) = shared_room("shared").await;
    let c = FedServer::start(&pki, 3, |_| {}).await;
    let room_id = RoomId::parse(&room).unwrap();
    join_remote(&a, &b, &room_id, &bob_id).await;
    send(&a, &alice, &room, "before", text("before")).await;
    until_bodies(&b, &bob, &room, &["before"]).await;

    // B alone learns of carol of C joining and sending more events than A fetches with
    // `/get_missing_events` (nobody passes them on to A).
    let carol = format!("@carol:{}", c.name);
    let sb = b.services();
    let (carol_join, join) = build_pdu(
        &b,
        &c,
        &room_id,
        &carol,
        "m.room.member",
        Some(&carol),
        json!({ "membership": "join" }),
        None,
    );
    let ingest_on_b = async |wire: CanonicalJsonObject| {
        let outcomes = sb.rooms.ingest(sb, &room_id, vec![wire], &sb.federation).await.unwrap();
        assert_eq!(outcomes[0].1, Outcome::Placed(Status::Accepted), "{outcomes:?}");
    };
    ingest_on_b(join).await;
    // Each event follows the one before: built from B's extremities once the last is placed.
    for n in 0..110 {
        let body = text(&format!("g{n}"));
        let (_, pdu) = build_pdu(&b, &c, &room_id, &carol, "m.room.message", None, body, None);
        ingest_on_b(pdu).await;
    }
    let carol_ref = ruma::UserId::parse(&carol).unwrap();
    assert_eq!(a.services().rooms.membership(&room_id, &carol_ref).unwrap(), None);

    // Bob's next event reaches A on top of the gap: A places it on the state B gives.
    let after = send(&b, &bob, &room, "after", text("after")).await;
    until_bodies(&a, &alice, &room, &["before", "after"]).await;
    let after = OwnedEventId::try_from(after).unwrap();
    assert_eq!(a.services().rooms.status_of(&after).unwrap(), Some(Status::Accepted));
    // The state change inside the gap is part of A's state now.
    assert_eq!(
        a.services().rooms.membership(&room_id, &carol_ref).unwrap().as_deref(),
        Some("join")
    );
    let state = a.services().rooms.current_state(&room_id).unwrap();
    let member = a.services().rooms.state_event(&state, "m.room.member", &carol).unwrap();
    assert_eq!(member.map(|e| e.event_id), Some(carol_join));
    // The gap's messages were never placed in A's timeline: no gap filling did it.
    assert_eq!(bodies(&a, &alice, &room).await, ["before", "after"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_is_answered_promptly_when_a_signing_server_never_answers() {
    let (_pki, a, b, alice, _bob, bob_id, room) = shared_room("prompt").await;
    let room_id = RoomId::parse(&room).unwrap();
    join_remote(&a, &b, &room_id, &bob_id).await;

    let (good, good_pdu) =
        build_pdu(&a, &b, &room_id, &bob_id, "m.room.message", None, text("good"), None);
    let mut pdus = vec![value(&good_pdu)];
    let mut muted = Vec::new();
    // Servers that take connections and never answer on them, each with a user whose event
    // B passes on: their keys must be asked for.
    for n in 0..3 {
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mute = format!("@mute:127.0.0.1:{}", silent.local_addr().unwrap().port());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = silent.accept().await {
                held.push(socket);
            }
        });
        let (id, pdu) =
            build_pdu(&a, &b, &room_id, &mute, "m.room.message", None, text(&format!("{n}")), None);
        muted.push(id);
        pdus.push(value(&pdu));
    }

    let started = std::time::Instant::now();
    let (status, answer) = put_txn(&a, &b, "prompt", &pdus).await;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::OK, "{answer}");
    // The silent servers are asked together, for a bounded time: one after the other, each
    // would hold the answer up for the whole connection timeout.
    assert!(took < Duration::from_secs(20), "answered after {took:?}");
    assert_eq!(answer["pdus"][good.as_str()], json!({}), "{answer}");
    for id in &muted {
        assert!(answer["pdus"][id.as_str()]["error"].is_string(), "{answer}");
    }
    until_bodies(&a, &alice, &room, &["good"]).await;
}
