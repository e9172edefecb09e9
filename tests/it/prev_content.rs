//! `unsigned.prev_content`, `prev_sender` and `replaces_state` on state events: the event a
//! state event replaced, as every serving path gives it, read as it is now (a later redaction
//! of it shows) and kept across a restart.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{TestServer, enc};

/// The event `event_id` of `room` as `token` reads it through `/event`.
async fn event(s: &TestServer, token: &str, room: &str, event_id: &str) -> Value {
    let path = format!("/_matrix/client/v3/rooms/{}/event/{}", enc(room), enc(event_id));
    let (status, body) = s.get(&path, Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

/// Sets the state `(kind, key)` of `room` to `content`; returns the event id.
async fn put_state(
    s: &TestServer,
    token: &str,
    room: &str,
    kind: &str,
    key: &str,
    content: Value,
) -> String {
    let path = format!("/_matrix/client/v3/rooms/{}/state/{kind}/{}", enc(room), enc(key));
    let (status, body) = s.put(&path, Some(token), content).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["event_id"].as_str().unwrap().to_owned()
}

/// The event `event_id` in `events` (a list of client events).
fn find<'a>(events: &'a Value, event_id: &str) -> &'a Value {
    events
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event_id"] == event_id)
        .unwrap_or_else(|| panic!("{event_id} not in {events}"))
}

/// Asserts that `event` says it replaced `replaced` (sent by `sender`, with `content`).
fn assert_replaced(event: &Value, replaced: &str, sender: &str, content: &Value) {
    let unsigned = &event["unsigned"];
    assert_eq!(unsigned["prev_content"], *content, "{event}");
    assert_eq!(unsigned["prev_sender"], sender, "{event}");
    assert_eq!(unsigned["replaces_state"], replaced, "{event}");
}

/// Asserts that `event` replaced nothing.
fn assert_first(event: &Value) {
    let unsigned = event["unsigned"].as_object().unwrap();
    for field in ["prev_content", "prev_sender", "replaces_state"] {
        assert!(!unsigned.contains_key(field), "{field} in {event}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_display_name_change_carries_the_join_it_replaced_everywhere() {
    let s = TestServer::start().await;
    let (alice_id, alice, _) = s.register("alice", "password-alice").await;
    let room = s.create_room(&alice, json!({ "preset": "private_chat" })).await;
    let path = format!(
        "/_matrix/client/v3/rooms/{}/state/m.room.member/{}?format=event",
        enc(&room),
        enc(&alice_id)
    );
    let (status, join) = s.get(&path, Some(&alice)).await;
    assert_eq!(status, StatusCode::OK, "{join}");
    let join_id = join["event_id"].as_str().unwrap().to_owned();
    let join_content = join["content"].clone();
    assert_eq!(join_content["membership"], "join");
    assert_ne!(join_content["displayname"], "Alice Renamed");

    let renamed = json!({ "membership": "join", "displayname": "Alice Renamed" });
    let rename_id = put_state(&s, &alice, &room, "m.room.member", &alice_id, renamed).await;

    // /event
    let served = event(&s, &alice, &room, &rename_id).await;
    assert_replaced(&served, &join_id, &alice_id, &join_content);
    // /messages
    let path = format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50", enc(&room));
    let (status, page) = s.get(&path, Some(&alice)).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_replaced(find(&page["chunk"], &rename_id), &join_id, &alice_id, &join_content);
    // The create event replaced nothing.
    let create = page["chunk"].as_array().unwrap().iter().find(|e| e["type"] == "m.room.create");
    assert_first(create.unwrap());
    // /sync timeline
    let filter = enc(&json!({ "room": { "timeline": { "limit": 50 } } }).to_string());
    let (status, sync) =
        s.get(&format!("/_matrix/client/v3/sync?filter={filter}"), Some(&alice)).await;
    assert_eq!(status, StatusCode::OK, "{sync}");
    let timeline = &sync["rooms"]["join"][&room]["timeline"]["events"];
    assert_replaced(find(timeline, &rename_id), &join_id, &alice_id, &join_content);
    assert_first(find(timeline, &join_id));
    // /state and /context
    let (status, state) =
        s.get(&format!("/_matrix/client/v3/rooms/{}/state", enc(&room)), Some(&alice)).await;
    assert_eq!(status, StatusCode::OK, "{state}");
    assert_replaced(find(&state, &rename_id), &join_id, &alice_id, &join_content);
    let path = format!("/_matrix/client/v3/rooms/{}/context/{}", enc(&room), enc(&rename_id));
    let (status, context) = s.get(&path, Some(&alice)).await;
    assert_eq!(status, StatusCode::OK, "{context}");
    assert_replaced(&context["event"], &join_id, &alice_id, &join_content);
    // Sliding sync: timeline and required state.
    let path = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync?timeout=0";
    let request = json!({ "lists": { "all": {
        "ranges": [[0, 10]], "timeline_limit": 50, "required_state": [["m.room.member", "$ME"]],
    } } });
    let (status, slid) = s.post(path, Some(&alice), request).await;
    assert_eq!(status, StatusCode::OK, "{slid}");
    let slid = &slid["rooms"][&room];
    assert_replaced(find(&slid["timeline"], &rename_id), &join_id, &alice_id, &join_content);
    assert_replaced(find(&slid["required_state"], &rename_id), &join_id, &alice_id, &join_content);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_topic_shows_the_one_before_it_redacted_once_that_is_redacted_and_after_a_restart() {
    let s = TestServer::start().await;
    let (alice_id, alice, _) = s.register("alice", "password-alice").await;
    let room =
        s.create_room(&alice, json!({ "preset": "private_chat", "room_version": "11" })).await;
    let first = put_state(&s, &alice, &room, "m.room.topic", "", json!({ "topic": "first" })).await;
    let second =
        put_state(&s, &alice, &room, "m.room.topic", "", json!({ "topic": "second" })).await;
    let third = put_state(&s, &alice, &room, "m.room.topic", "", json!({ "topic": "third" })).await;

    assert_first(&event(&s, &alice, &room, &first).await);
    let served = event(&s, &alice, &room, &second).await;
    assert_replaced(&served, &first, &alice_id, &json!({ "topic": "first" }));
    let served = event(&s, &alice, &room, &third).await;
    assert_replaced(&served, &second, &alice_id, &json!({ "topic": "second" }));

    // Search serves it the same (once indexed).
    let search = json!({ "search_categories": { "room_events": {
        "search_term": "third", "keys": ["content.topic"],
    } } });
    let mut found = Value::Null;
    for _ in 0..100 {
        let (status, body) =
            s.post("/_matrix/client/v3/search", Some(&alice), search.clone()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        found = body["search_categories"]["room_events"]["results"][0]["result"].clone();
        if !found.is_null() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_replaced(&found, &second, &alice_id, &json!({ "topic": "second" }));

    // Redacting the middle topic: the last one's prev_content is the redacted content.
    let path = format!("/_matrix/client/v3/rooms/{}/redact/{}/r1", enc(&room), enc(&second));
    let (status, body) = s.put(&path, Some(&alice), json!({ "reason": "oops" })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let served = event(&s, &alice, &room, &third).await;
    assert_replaced(&served, &second, &alice_id, &json!({}));
    let path = format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50", enc(&room));
    let (_, page) = s.get(&path, Some(&alice)).await;
    assert_replaced(find(&page["chunk"], &third), &second, &alice_id, &json!({}));

    let s = s.restart().await;
    let served = event(&s, &alice, &room, &third).await;
    assert_replaced(&served, &second, &alice_id, &json!({}));
    let served = event(&s, &alice, &room, &second).await;
    assert_replaced(&served, &first, &alice_id, &json!({ "topic": "first" }));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_erased_senders_replaced_event_is_redacted_for_those_who_were_not_there() {
    let s = TestServer::start().await;
    let (admin_id, admin, _) = s.register("root", "root password").await;
    s.set_role(&admin_id, "admin");
    let (hank_id, hank, _) = s.register("hank", "hank password").await;
    let (_, bob, _) = s.register("bob", "bob password").await;
    let (_, ivy, _) = s.register("ivy", "ivy password").await;
    let room = s.create_room(&bob, json!({ "preset": "public_chat" })).await;
    assert_eq!(s.membership(&hank, &room, "join", json!({})).await.0, StatusCode::OK);
    let secret = json!({ "membership": "join", "displayname": "Hank Secret" });
    let first = put_state(&s, &hank, &room, "m.room.member", &hank_id, secret.clone()).await;
    let renamed = json!({ "membership": "join", "displayname": "Hank Two" });
    let rename = put_state(&s, &hank, &room, "m.room.member", &hank_id, renamed).await;

    let path = format!("/_synapse/admin/v1/deactivate/{}", enc(&hank_id));
    let (status, body) = s.post(&path, Some(&admin), json!({ "erase": true })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(s.membership(&ivy, &room, "join", json!({})).await.0, StatusCode::OK);

    // Bob was there: he is shown the old display name.
    let served = event(&s, &bob, &room, &rename).await;
    assert_replaced(&served, &first, &hank_id, &secret);
    // Ivy was not: the rename and the join it replaced reach her redacted.
    let messages = format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50", enc(&room));
    let (status, page) = s.get(&messages, Some(&ivy)).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let served = find(&page["chunk"], &rename);
    assert_replaced(served, &first, &hank_id, &json!({ "membership": "join" }));
    assert!(!page.to_string().contains("Hank Secret"), "{page}");
}
