//! Delayed events (MSC4140) over HTTP: scheduling, firing after a restart, the management
//! actions and their errors.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common::{TestServer, assert_error};

const UNSTABLE: &str = "/_matrix/client/unstable/org.matrix.msc4140/delayed_events";

/// Bodies of the room's `m.room.message` events, newest first.
pub async fn message_bodies(s: &TestServer, token: &str, room: &str) -> Vec<String> {
    let path = format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=50");
    let (status, body) = s.get(&path, Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect()
}

async fn schedule(
    s: &TestServer,
    token: &str,
    room: &str,
    txn: &str,
    delay: u64,
    text: &str,
) -> String {
    let path = format!(
        "/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}?org.matrix.msc4140.delay={delay}"
    );
    let (status, body) =
        s.put(&path, Some(token), json!({ "msgtype": "m.text", "body": text })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.get("event_id").is_none(), "{body}");
    body["delay_id"].as_str().unwrap().to_owned()
}

async fn listed(s: &TestServer, token: &str, query: &str) -> Vec<Value> {
    let (status, body) = s.get(&format!("{UNSTABLE}{query}"), Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["delayed_events"].as_array().unwrap().clone()
}

/// Waits (bounded) until `check` holds for the list of `token`'s delayed events.
async fn until_listed(s: &TestServer, token: &str, check: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    for _ in 0..100 {
        let list = listed(s, token, "").await;
        if check(&list) {
            return list;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the delayed events never reached the expected state: {:?}", listed(s, token, "").await);
}

#[tokio::test]
async fn delayed_message_fires_after_a_restart() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "correct horse").await;
    let room = s.create_room(&alice, json!({})).await;
    let (_, versions) = s.get("/_matrix/client/versions", None).await;
    assert_eq!(versions["unstable_features"]["org.matrix.msc4140"], true, "{versions}");

    let delay_id = schedule(&s, &alice, &room, "t1", 1_500, "stand-up in five").await;
    // A retried request answers the same delay id and schedules nothing more.
    assert_eq!(schedule(&s, &alice, &room, "t1", 1_500, "stand-up in five").await, delay_id);
    let list = listed(&s, &alice, "?status=scheduled").await;
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["delay_id"], delay_id.as_str());
    assert_eq!(list[0]["room_id"], room.as_str());
    assert_eq!(list[0]["type"], "m.room.message");
    assert_eq!(list[0]["delay"], 1_500);
    assert_eq!(list[0]["content"]["body"], "stand-up in five");
    assert!(list[0].get("origin_server_ts").is_none());
    let due = list[0]["running_since"].as_u64().unwrap() + 1_500;
    assert!(message_bodies(&s, &alice, &room).await.is_empty(), "not sent early");

    let s = s.restart().await;
    let list =
        until_listed(&s, &alice, |l| l.first().is_some_and(|e| e["event_id"].is_string())).await;
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(message_bodies(&s, &alice, &room).await, ["stand-up in five"]);
    let event_id = list[0]["event_id"].as_str().unwrap();
    let path = format!("/_matrix/client/v3/rooms/{room}/event/{}", crate::common::enc(event_id));
    let (_, event) = s.get(&path, Some(&alice)).await;
    let sent = event["origin_server_ts"].as_u64().unwrap();
    assert!(sent >= due, "sent at {sent}, due at {due}");
    assert!(listed(&s, &alice, "?status=scheduled").await.is_empty());
    assert_eq!(listed(&s, &alice, "?status=finalised").await.len(), 1);
}

#[tokio::test]
async fn restart_cancel_and_send_actions() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "correct horse").await;
    let (_, bob, _) = s.register("bob", "correct horse").await;
    let room = s.create_room(&alice, json!({ "preset": "public_chat" })).await;

    // Restart through the action in the body pushes the due time back.
    let first = schedule(&s, &alice, &room, "a", 60_000, "first").await;
    let before = listed(&s, &alice, "").await[0]["running_since"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (status, body) =
        s.post(&format!("{UNSTABLE}/{first}"), Some(&alice), json!({ "action": "restart" })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let after = listed(&s, &alice, "").await[0]["running_since"].as_u64().unwrap();
    assert!(after > before, "{after} > {before}");
    // Another user cannot manage it through the authenticated endpoint.
    let other =
        s.post(&format!("{UNSTABLE}/{first}"), Some(&bob), json!({ "action": "cancel" })).await;
    assert_error(&other, StatusCode::NOT_FOUND, "M_NOT_FOUND");

    // Cancel through the path endpoint (the delay id is the credential): never sent.
    let (status, _) = s.post(&format!("{UNSTABLE}/{first}/cancel"), None, json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = s.post(&format!("{UNSTABLE}/{first}/cancel"), None, json!({})).await;
    assert_eq!(status, StatusCode::OK, "a retried cancel succeeds");
    let conflict = s.post(&format!("{UNSTABLE}/{first}/send"), None, json!({})).await;
    assert_error(&conflict, StatusCode::CONFLICT, "M_UNKNOWN");
    let conflict = s.post(&format!("{UNSTABLE}/{first}/restart"), None, json!({})).await;
    assert_error(&conflict, StatusCode::CONFLICT, "M_UNKNOWN");
    let cancelled = listed(&s, &alice, "?status=finalised").await;
    assert_eq!(cancelled.len(), 1);
    assert!(cancelled[0]["origin_server_ts"].is_u64() && cancelled[0].get("event_id").is_none());

    // Send now: the message appears at once and the list names its event.
    let second = schedule(&s, &alice, &room, "b", 60_000, "second").await;
    let (status, body) =
        s.post(&format!("{UNSTABLE}/{second}"), Some(&alice), json!({ "action": "send" })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(message_bodies(&s, &alice, &room).await, ["second"]);
    let (status, _) = s.post(&format!("{UNSTABLE}/{second}/send"), None, json!({})).await;
    assert_eq!(status, StatusCode::OK, "a retried send succeeds and sends nothing more");
    assert_eq!(message_bodies(&s, &alice, &room).await, ["second"]);
    let conflict = s.post(&format!("{UNSTABLE}/{second}/cancel"), None, json!({})).await;
    assert_error(&conflict, StatusCode::CONFLICT, "M_UNKNOWN");
    let sent = listed(&s, &alice, &format!("?delay_id={second}")).await;
    assert_eq!(sent.len(), 1);
    assert!(sent[0]["event_id"].as_str().unwrap().starts_with('$'));
    // Its sender sees the delay id in the sent event; others do not.
    async fn delay_id_seen(s: &TestServer, token: &str, room: &str) -> Value {
        let (_, sync) = s.get("/_matrix/client/v3/sync", Some(token)).await;
        let timeline = sync["rooms"]["join"][room]["timeline"]["events"].as_array().unwrap();
        let sent = timeline.iter().find(|e| e["content"]["body"] == "second").unwrap();
        sent["unsigned"]["org.matrix.msc4140.delay_id"].clone()
    }
    assert_eq!(delay_id_seen(&s, &alice, &room).await, second.as_str());
    assert_eq!(s.membership(&bob, &room, "join", json!({})).await.0, StatusCode::OK);
    assert_eq!(delay_id_seen(&s, &bob, &room).await, Value::Null);
    let (status, one) = s.get(&format!("{UNSTABLE}/{second}"), Some(&alice)).await;
    assert_eq!(status, StatusCode::OK, "{one}");
    assert_eq!(one, sent[0]);
    let hidden = s.get(&format!("{UNSTABLE}/{second}"), Some(&bob)).await;
    assert_error(&hidden, StatusCode::NOT_FOUND, "M_NOT_FOUND");

    // Unknown ids and actions.
    let missing = s.post(&format!("{UNSTABLE}/nope/send"), None, json!({})).await;
    assert_error(&missing, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let missing =
        s.post(&format!("{UNSTABLE}/nope"), Some(&alice), json!({ "action": "send" })).await;
    assert_error(&missing, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let bad =
        s.post(&format!("{UNSTABLE}/{second}"), Some(&alice), json!({ "action": "explode" })).await;
    assert_error(&bad, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    let bad = s.post(&format!("{UNSTABLE}/{second}/explode"), None, json!({})).await;
    assert_error(&bad, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let bad = s.get(&format!("{UNSTABLE}?status=later"), Some(&alice)).await;
    assert_error(&bad, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    let unauthenticated = s.get(UNSTABLE, None).await;
    assert_error(&unauthenticated, StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN");
}

#[tokio::test]
async fn bad_delays_and_limits_are_refused() {
    let s = TestServer::start_with(|c| {
        c.automation.max_delay_ms = 60_000;
        c.automation.max_delayed_events_per_user = 2;
    })
    .await;
    let (_, alice, _) = s.register("alice", "correct horse").await;
    let room = s.create_room(&alice, json!({})).await;
    let send = |txn: &str, delay: &str| {
        format!(
            "/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}?org.matrix.msc4140.delay={delay}"
        )
    };
    let text = json!({ "msgtype": "m.text", "body": "x" });

    let too_long = s.put(&send("1", "60001"), Some(&alice), text.clone()).await;
    assert_error(&too_long, StatusCode::BAD_REQUEST, "M_MAX_DELAY_EXCEEDED");
    assert_eq!(too_long.1["max_delay"], 60_000);
    let zero = s.put(&send("2", "0"), Some(&alice), text.clone()).await;
    assert_error(&zero, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    let not_a_number = s.put(&send("3", "soon"), Some(&alice), text.clone()).await;
    assert_error(&not_a_number, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    let not_an_object = s.put(&send("4", "1000"), Some(&alice), json!([1])).await;
    assert_error(&not_an_object, StatusCode::BAD_REQUEST, "M_BAD_JSON");
    let path = "/_matrix/client/v3/rooms/!nowhere:localhost/send/m.room.message/5?org.matrix.msc4140.delay=1000";
    let unknown_room = s.put(path, Some(&alice), text.clone()).await;
    assert_error(&unknown_room, StatusCode::NOT_FOUND, "M_NOT_FOUND");

    // The per-user limit: the third pending event waits for the first to be due.
    schedule(&s, &alice, &room, "a", 30_000, "a").await;
    schedule(&s, &alice, &room, "b", 40_000, "b").await;
    let full = s.put(&send("c", "1000"), Some(&alice), text.clone()).await;
    assert_error(&full, StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED");
    let wait = full.1["retry_after_ms"].as_u64().unwrap();
    assert!((25_000..=30_000).contains(&wait), "{wait}");
    // A plain send on the same path is not affected.
    let (status, _) = s.send_text(&alice, &room, "plain", "now").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_refused_delayed_event_is_dropped_with_its_reason() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "correct horse").await;
    let (_, bob, _) = s.register("bob", "correct horse").await;
    let room = s.create_room(&alice, json!({ "preset": "public_chat" })).await;
    let (status, _) = s.membership(&bob, &room, "join", json!({})).await;
    assert_eq!(status, StatusCode::OK);

    // Bob may not change the topic; the state event is accepted now and refused when due.
    let path =
        format!("/_matrix/client/v3/rooms/{room}/state/m.room.topic/?org.matrix.msc4140.delay=100");
    let (status, body) =
        s.call(Method::PUT, &path, Some(&bob), Some(json!({ "topic": "mine" }))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let delay_id = body["delay_id"].as_str().unwrap().to_owned();
    let list = until_listed(&s, &bob, |l| l.first().is_some_and(|e| e["error"].is_object())).await;
    assert_eq!(list[0]["delay_id"], delay_id.as_str());
    assert_eq!(list[0]["state_key"], "");
    assert_eq!(list[0]["error"]["errcode"], "M_FORBIDDEN", "{list:?}");
    assert!(list[0].get("event_id").is_none());
    let (_, topic) =
        s.get(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.topic/"), Some(&alice)).await;
    assert_ne!(topic["topic"], "mine");
    // Cancelling it now is a retry of what already happened.
    let (status, _) = s.post(&format!("{UNSTABLE}/{delay_id}/cancel"), None, json!({})).await;
    assert_eq!(status, StatusCode::OK);
}
