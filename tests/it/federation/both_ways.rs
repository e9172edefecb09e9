//! A room of A that a user of B joined through `/join`, used from both sides: threads rooted on
//! either server with their summaries and `/threads` lists alike on both, typing and receipts
//! (a threaded one included) crossing each way, and a real leave (the leave reaches A, B hears
//! nothing more of the room) followed by a rejoin through `make_join`/`send_join`.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use ruma::{EventId, RoomId, UserId};
use serde_json::{Value, json};

use super::{
    harness::*,
    sending::{bodies, eventually, send, text, until_bodies},
};
use crate::common::enc;

/// Two servers; alice on A created a public room, bob on B joined it through `/join`.
async fn joined_room() -> (std::sync::Arc<Pki>, FedServer, FedServer, String, String, String, String)
{
    let (pki, a, b) = pair().await;
    let (_, alice, _) = a.server.register("alice", "password-alice").await;
    let (bob_id, bob, _) = b.server.register("bob", "password-bob").await;
    let room = a
        .server
        .create_room(&alice, json!({ "preset": "public_chat", "room_version": "11" }))
        .await;
    join(&b, &bob, &room, &a).await;
    (pki, a, b, alice, bob, bob_id, room)
}

/// `token` (of `s`) joins `room` through `via`.
async fn join(s: &FedServer, token: &str, room: &str, via: &FedServer) {
    let path = format!("/_matrix/client/v3/join/{}?via={}", enc(room), via.name);
    let (status, body) = s.server.post(&path, Some(token), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

fn in_thread(body: &str, root: &str) -> Value {
    json!({
        "msgtype": "m.text", "body": body,
        "m.relates_to": { "rel_type": "m.thread", "event_id": root },
    })
}

/// The thread summary of `root` as `token` reads it on `s`.
async fn summary(s: &FedServer, token: &str, room: &str, root: &str) -> Value {
    let path = format!("/_matrix/client/v3/rooms/{}/event/{}", enc(room), enc(root));
    let (status, body) = s.server.get(&path, Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["unsigned"]["m.relations"]["m.thread"].clone()
}

/// The roots `/threads` lists for `token` on `s`, newest activity first.
async fn thread_roots(s: &FedServer, token: &str, room: &str) -> Vec<String> {
    let path = format!("/_matrix/client/v1/rooms/{}/threads", enc(room));
    let (status, body) = s.server.get(&path, Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn threads_rooted_on_either_server_read_the_same_on_both() {
    let (_pki, a, b, alice, bob, _bob_id, room) = joined_room().await;
    let a_root = send(&a, &alice, &room, "r1", text("root on A")).await;
    until_bodies(&b, &bob, &room, &["root on A"]).await;
    let b_root = send(&b, &bob, &room, "r2", text("root on B")).await;
    until_bodies(&a, &alice, &room, &["root on A", "root on B"]).await;

    // B replies in A's thread, A replies in B's thread (twice).
    let b_reply = send(&b, &bob, &room, "t1", in_thread("bob in A's", &a_root)).await;
    until_bodies(&a, &alice, &room, &["root on A", "root on B", "bob in A's"]).await;
    let a_reply1 = send(&a, &alice, &room, "t2", in_thread("alice in B's", &b_root)).await;
    let a_reply2 = send(&a, &alice, &room, "t3", in_thread("alice again", &b_root)).await;
    let all = ["root on A", "root on B", "bob in A's", "alice in B's", "alice again"];
    until_bodies(&a, &alice, &room, &all).await;
    until_bodies(&b, &bob, &room, &all).await;

    for (s, token, own_thread) in [(&a, &alice, &b_root), (&b, &bob, &a_root)] {
        let on_a = summary(s, token, &room, &a_root).await;
        assert_eq!(on_a["count"], 1, "{on_a}");
        assert_eq!(on_a["latest_event"]["event_id"], b_reply.as_str(), "{on_a}");
        let on_b = summary(s, token, &room, &b_root).await;
        assert_eq!(on_b["count"], 2, "{on_b}");
        assert_eq!(on_b["latest_event"]["event_id"], a_reply2.as_str(), "{on_b}");
        assert_eq!(on_b["latest_event"]["content"]["body"], "alice again", "{on_b}");
        // Each reader participated in the other's thread only.
        let theirs = if own_thread == &b_root { &on_b } else { &on_a };
        assert_eq!(theirs["current_user_participated"], true, "{theirs}");
        // The latest thread activity is in B's root.
        assert_eq!(thread_roots(s, token, &room).await, [b_root.clone(), a_root.clone()]);
        let path = format!("/_matrix/client/v1/rooms/{room}/relations/{}/m.thread", enc(&b_root));
        let (status, body) = s.server.get(&path, Some(token)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let ids: Vec<&str> = body["chunk"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["event_id"].as_str())
            .collect();
        assert_eq!(ids, [a_reply2.as_str(), a_reply1.as_str()], "{body}");
    }
}

/// Syncs `token` on `s` until an ephemeral event of `room` satisfies `seen`.
async fn until_ephemeral(
    s: &FedServer,
    token: &str,
    room: &str,
    what: &str,
    seen: impl Fn(&Value) -> bool,
) {
    for _ in 0..300 {
        let (status, sync) = s.server.get("/_matrix/client/v3/sync?timeout=0", Some(token)).await;
        assert_eq!(status, StatusCode::OK, "{sync}");
        let events = sync["rooms"]["join"][room]["ephemeral"]["events"].as_array().cloned();
        if events.into_iter().flatten().any(|e| seen(&e)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never seen: {what}");
}

async fn typing(s: &FedServer, token: &str, user: &str, room: &str) {
    let path = format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(room), enc(user));
    let body = json!({ "typing": true, "timeout": 20000 });
    let (status, body) = s.server.call(Method::PUT, &path, Some(token), Some(body)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

async fn receipt(s: &FedServer, token: &str, room: &str, event: &str, body: Value) {
    let path = format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(room), enc(event));
    let (status, body) = s.server.post(&path, Some(token), body).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

fn is_typing(user: &str) -> impl Fn(&Value) -> bool {
    move |e| {
        e["type"] == "m.typing"
            && e["content"]["user_ids"].as_array().is_some_and(|u| u.iter().any(|u| u == user))
    }
}

/// A read receipt of `user` for `event`, in `thread` (`None`: unthreaded, no `thread_id`).
fn is_receipt<'a>(
    user: &'a str,
    event: &'a str,
    thread: Option<&'a str>,
) -> impl Fn(&Value) -> bool + 'a {
    move |e| {
        let read = &e["content"][event]["m.read"][user];
        e["type"] == "m.receipt"
            && read["ts"].is_u64()
            && read.get("thread_id").and_then(Value::as_str) == thread
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn typing_and_receipts_cross_both_ways_threaded_ones_too() {
    let (_pki, a, b, alice, bob, bob_id, room) = joined_room().await;
    let alice_id = format!("@alice:{}", a.name);
    let root = send(&a, &alice, &room, "m1", text("root")).await;
    let reply = send(&a, &alice, &room, "m2", in_thread("in thread", &root)).await;
    until_bodies(&b, &bob, &room, &["root", "in thread"]).await;
    let bobs = send(&b, &bob, &room, "m3", text("from bob")).await;
    until_bodies(&b, &bob, &room, &["root", "in thread", "from bob"]).await;
    until_bodies(&a, &alice, &room, &["root", "in thread", "from bob"]).await;

    // A to B: alice types, reads bob's message, and reads the thread's reply in the thread.
    typing(&a, &alice, &alice_id, &room).await;
    until_ephemeral(&b, &bob, &room, "alice typing on B", is_typing(&alice_id)).await;
    receipt(&a, &alice, &room, &bobs, json!({})).await;
    until_ephemeral(&b, &bob, &room, "alice's receipt on B", is_receipt(&alice_id, &bobs, None))
        .await;
    receipt(&a, &alice, &room, &reply, json!({ "thread_id": root })).await;
    let threaded = is_receipt(&alice_id, &reply, Some(&root));
    until_ephemeral(&b, &bob, &room, "alice's threaded receipt on B", threaded).await;

    // B to A: the same from bob.
    typing(&b, &bob, &bob_id, &room).await;
    until_ephemeral(&a, &alice, &room, "bob typing on A", is_typing(&bob_id)).await;
    receipt(&b, &bob, &room, &root, json!({ "thread_id": "main" })).await;
    let main = is_receipt(&bob_id, &root, Some("main"));
    until_ephemeral(&a, &alice, &room, "bob's main-timeline receipt on A", main).await;
    receipt(&b, &bob, &room, &reply, json!({ "thread_id": root })).await;
    let threaded = is_receipt(&bob_id, &reply, Some(&root));
    until_ephemeral(&a, &alice, &room, "bob's threaded receipt on A", threaded).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_remote_user_leaves_hears_nothing_more_and_rejoins() {
    let (_pki, a, b, alice, bob, bob_id, room) = joined_room().await;
    let room_id = RoomId::parse(&room).unwrap();
    let bob_ref = UserId::parse(&bob_id).unwrap();
    send(&a, &alice, &room, "m1", text("before")).await;
    until_bodies(&b, &bob, &room, &["before"]).await;

    let path = format!("/_matrix/client/v3/rooms/{}/leave", enc(&room));
    let (status, body) = b.server.post(&path, Some(&bob), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    eventually("A sees bob leave", || {
        a.services().rooms.membership(&room_id, &bob_ref).unwrap().as_deref() == Some("leave")
    })
    .await;
    let (status, members) = a
        .server
        .get(&format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&room)), Some(&alice))
        .await;
    assert_eq!(status, StatusCode::OK, "{members}");
    assert!(members["joined"].get(&bob_id).is_none(), "{members}");

    // A's events after the leave are not sent to B: B never holds them.
    let hidden = send(&a, &alice, &room, "m2", text("after the leave")).await;
    let hidden_id = EventId::parse(&hidden).unwrap();
    eventually("A's queue to B is empty", || {
        a.services().federation_sender.depth(b.name.as_str()) == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(b.services().rooms.stored(&hidden_id).unwrap().is_none(), "B received {hidden}");
    let filter = enc(r#"{"room":{"include_leave":true}}"#);
    let path = format!("/_matrix/client/v3/sync?timeout=0&filter={filter}");
    let (status, sync) = b.server.get(&path, Some(&bob)).await;
    assert_eq!(status, StatusCode::OK, "{sync}");
    assert!(sync["rooms"]["leave"].get(&room).is_some(), "{sync}");
    assert!(!sync.to_string().contains("after the leave"), "{sync}");

    // Bob rejoins: the messages since show, and new ones flow both ways.
    join(&b, &bob, &room, &a).await;
    assert_eq!(a.services().rooms.membership(&room_id, &bob_ref).unwrap().as_deref(), Some("join"));
    send(&a, &alice, &room, "m3", text("welcome back")).await;
    let ends_with = |seen: &[String], last: &[&str]| {
        seen.len() >= last.len() && seen[seen.len() - last.len()..] == *last
    };
    let mut seen = Vec::new();
    for _ in 0..300 {
        seen = bodies(&b, &bob, &room).await;
        if ends_with(&seen, &["welcome back"]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ends_with(&seen, &["welcome back"]), "{seen:?}");
    send(&b, &bob, &room, "m4", text("thanks")).await;
    until_bodies(&a, &alice, &room, &["before", "after the leave", "welcome back", "thanks"]).await;
    let seen = bodies(&b, &bob, &room).await;
    assert!(ends_with(&seen, &["welcome back", "thanks"]), "{seen:?}");
    assert_eq!(seen.first().map(String::as_str), Some("before"), "{seen:?}");
}

/// The event `event_id` of `room` as `token` reads it on `s`, once `s` has it.
async fn event_once_there(s: &FedServer, token: &str, room: &str, event_id: &str) -> Value {
    let path = format!("/_matrix/client/v3/rooms/{}/event/{}", enc(room), enc(event_id));
    for _ in 0..300 {
        let (status, body) = s.server.get(&path, Some(token)).await;
        if status == StatusCode::OK {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{event_id} never reached {}", s.name);
}

#[tokio::test(flavor = "multi_thread")]
async fn state_events_received_over_federation_carry_what_they_replaced() {
    let (_pki, a, b, alice, bob, bob_id, room) = joined_room().await;
    // Bob's join, as B holds it, is what his rename on B replaces.
    let path = format!(
        "/_matrix/client/v3/rooms/{}/state/m.room.member/{}?format=event",
        enc(&room),
        enc(&bob_id)
    );
    let (status, join) = b.server.get(&path, Some(&bob)).await;
    assert_eq!(status, StatusCode::OK, "{join}");
    let path =
        format!("/_matrix/client/v3/rooms/{}/state/m.room.member/{}", enc(&room), enc(&bob_id));
    let (status, body) = b
        .server
        .put(&path, Some(&bob), json!({ "membership": "join", "displayname": "Bob Renamed" }))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let rename = body["event_id"].as_str().unwrap();

    // A received the rename and serves what it replaced, from its own copy of the join.
    let served = event_once_there(&a, &alice, &room, rename).await;
    assert_eq!(served["unsigned"]["prev_content"], join["content"], "{served}");
    assert_eq!(served["unsigned"]["prev_content"]["membership"], "join");
    assert_eq!(served["unsigned"]["prev_sender"], bob_id.as_str());
    assert_eq!(served["unsigned"]["replaces_state"], join["event_id"]);

    // A topic set twice on A reaches B, the second naming the first.
    let path = format!("/_matrix/client/v3/rooms/{}/state/m.room.topic/", enc(&room));
    let (status, first) = a.server.put(&path, Some(&alice), json!({ "topic": "one" })).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let (status, second) = a.server.put(&path, Some(&alice), json!({ "topic": "two" })).await;
    assert_eq!(status, StatusCode::OK, "{second}");
    let served = event_once_there(&b, &bob, &room, second["event_id"].as_str().unwrap()).await;
    assert_eq!(served["unsigned"]["prev_content"], json!({ "topic": "one" }), "{served}");
    assert_eq!(served["unsigned"]["replaces_state"], first["event_id"]);
    assert_eq!(served["unsigned"]["prev_sender"], served["sender"]);
}
