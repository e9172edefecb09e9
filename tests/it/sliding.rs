//! Simplified sliding sync (MSC4186) over HTTP: lists by recency, windows, connections and
//! their positions, required state, filters, subscriptions, extensions and bad input.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{TestServer, assert_error, enc};

const PATH: &str = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync";

/// One sliding-sync request; returns status and body.
async fn slide(
    s: &TestServer,
    token: &str,
    pos: Option<&str>,
    timeout_ms: u64,
    body: Value,
) -> (StatusCode, Value) {
    let mut path = format!("{PATH}?timeout={timeout_ms}");
    if let Some(pos) = pos {
        path.push_str(&format!("&pos={}", enc(pos)));
    }
    s.post(&path, Some(token), body).await
}

async fn slide_ok(s: &TestServer, token: &str, pos: Option<&str>, body: Value) -> Value {
    let (status, body) = slide(s, token, pos, 0, body).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

fn pos(body: &Value) -> String {
    body["pos"].as_str().unwrap().to_owned()
}

/// The room ids of a response, by descending `bump_stamp`.
fn by_recency(body: &Value) -> Vec<String> {
    let mut rooms: Vec<(u64, String)> = body["rooms"]
        .as_object()
        .map(|rooms| {
            rooms.iter().map(|(id, r)| (r["bump_stamp"].as_u64().unwrap(), id.clone())).collect()
        })
        .unwrap_or_default();
    rooms.sort_by(|a, b| b.cmp(a));
    rooms.into_iter().map(|(_, id)| id).collect()
}

fn bodies(room: &Value) -> Vec<String> {
    room["timeline"]
        .as_array()
        .map(|events| {
            events.iter().filter_map(|e| e["content"]["body"].as_str().map(str::to_owned)).collect()
        })
        .unwrap_or_default()
}

fn list(ranges: Value, limit: u64, required_state: Value) -> Value {
    json!({ "ranges": ranges, "timeline_limit": limit, "required_state": required_state })
}

#[tokio::test]
async fn lists_are_windows_over_rooms_by_recency_and_only_changes_are_sent_again() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "password 1").await;
    let (status, versions) = s.get("/_matrix/client/versions", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(versions["unstable_features"]["org.matrix.simplified_msc3575"], json!(true));

    let mut rooms = Vec::new();
    for i in 0..5 {
        rooms.push(s.create_room(&alice, json!({ "name": format!("room {i}") })).await);
    }
    // Room 1 gets a message, so it is the most recent; a state change does not bump.
    s.send_text(&alice, &rooms[1], "t1", "hello one").await;
    let topic = format!("/_matrix/client/v3/rooms/{}/state/m.room.topic/", rooms[3]);
    assert_eq!(s.put(&topic, Some(&alice), json!({ "topic": "no bump" })).await.0, StatusCode::OK);

    let request =
        json!({ "lists": { "all": list(json!([[0, 2]]), 1, json!([["m.room.name", ""]])) } });
    let first = slide_ok(&s, &alice, None, request.clone()).await;
    assert_eq!(first["lists"]["all"]["count"], 5);
    assert_eq!(by_recency(&first), vec![rooms[1].clone(), rooms[4].clone(), rooms[3].clone()]);
    let one = &first["rooms"][&rooms[1]];
    assert_eq!(one["initial"], true);
    assert_eq!(one["name"], "room 1");
    assert_eq!(bodies(one), vec!["hello one"]);
    assert_eq!(one["limited"], true, "older events were left out");
    assert_eq!(one["joined_count"], 1);
    assert_eq!(one["notification_count"], 0);
    assert!(one["prev_batch"].as_str().unwrap().starts_with('s'));
    let state = one["required_state"].as_array().unwrap();
    assert_eq!(state.len(), 1);
    assert_eq!(state[0]["type"], "m.room.name");
    // The topic change left room 3 below room 4.
    assert_eq!(first["rooms"][&rooms[3]]["initial"], true);

    // Nothing changed: no rooms, and the position still names the same view.
    let pos1 = pos(&first);
    let quiet = slide_ok(&s, &alice, Some(&pos1), request.clone()).await;
    assert!(quiet.get("rooms").is_none_or(|r| r.as_object().unwrap().is_empty()), "{quiet}");
    assert_eq!(pos(&quiet), pos1);

    // A message moves room 0 into the window: sent in full, never sent before.
    s.send_text(&alice, &rooms[0], "t2", "zero").await;
    let second = slide_ok(&s, &alice, Some(&pos1), request.clone()).await;
    assert_eq!(by_recency(&second), vec![rooms[0].clone()]);
    assert_eq!(second["rooms"][&rooms[0]]["initial"], true);
    assert_eq!(second["rooms"][&rooms[0]]["num_live"], 1);

    // A message in room 1, sent before: only the new event, no required state again.
    let pos2 = pos(&second);
    s.send_text(&alice, &rooms[1], "t3", "one again").await;
    let third = slide_ok(&s, &alice, Some(&pos2), request.clone()).await;
    let one = &third["rooms"][&rooms[1]];
    assert!(one.get("initial").is_none(), "{one}");
    assert_eq!(bodies(one), vec!["one again"]);
    assert_eq!(one["num_live"], 1);
    assert!(one.get("required_state").is_none(), "unchanged state is not sent again: {one}");
    assert!(
        third["rooms"][&rooms[1]]["bump_stamp"].as_u64()
            > second["rooms"][&rooms[0]]["bump_stamp"].as_u64()
    );

    // A renamed room sends its changed name state and name.
    let pos3 = pos(&third);
    let name = format!("/_matrix/client/v3/rooms/{}/state/m.room.name/", rooms[1]);
    assert_eq!(s.put(&name, Some(&alice), json!({ "name": "renamed" })).await.0, StatusCode::OK);
    let fourth = slide_ok(&s, &alice, Some(&pos3), request.clone()).await;
    let one = &fourth["rooms"][&rooms[1]];
    assert_eq!(one["name"], "renamed");
    assert_eq!(one["required_state"][0]["content"]["name"], "renamed");

    // A retried request with an older position is still answered from it.
    let again = slide_ok(&s, &alice, Some(&pos3), request).await;
    assert_eq!(again["rooms"][&rooms[1]]["name"], "renamed");
}

#[tokio::test]
async fn a_waiting_connection_wakes_on_a_message_and_positions_fail_after_restart() {
    let s = std::sync::Arc::new(TestServer::start().await);
    let (_, alice, _) = s.register("alice", "password 1").await;
    let room = s.create_room(&alice, json!({})).await;
    let request =
        json!({ "conn_id": "main", "lists": { "all": list(json!([[0, 9]]), 5, json!([])) } });
    let first = slide_ok(&s, &alice, None, request.clone()).await;
    let pos1 = pos(&first);

    let sender = {
        let (s, alice, room) = (s.clone(), alice.clone(), room.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            s.send_text(&alice, &room, "late", "wake up").await;
        })
    };
    let started = Instant::now();
    let (status, woken) = slide(&s, &alice, Some(&pos1), 20_000, request.clone()).await;
    assert_eq!(status, StatusCode::OK, "{woken}");
    assert!(started.elapsed() < Duration::from_secs(5), "woken, not timed out");
    assert_eq!(bodies(&woken["rooms"][&room]), vec!["wake up"]);
    sender.await.unwrap();

    // A quiet long-poll returns after its timeout with the same position.
    let pos2 = pos(&woken);
    let started = Instant::now();
    let (status, quiet) = slide(&s, &alice, Some(&pos2), 400, request.clone()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(390));
    assert_eq!(pos(&quiet), pos2);

    // Another connection's position is not this one's.
    let other =
        json!({ "conn_id": "other", "lists": { "all": list(json!([[0, 9]]), 5, json!([])) } });
    assert_error(
        &slide(&s, &alice, Some(&pos2), 0, other).await,
        StatusCode::BAD_REQUEST,
        "M_UNKNOWN_POS",
    );

    // After a restart the position is unknown; a new connection gets what was missed.
    let s = std::sync::Arc::into_inner(s).unwrap().restart().await;
    s.send_text(&alice, &room, "after", "after restart").await;
    assert_error(
        &slide(&s, &alice, Some(&pos2), 0, request.clone()).await,
        StatusCode::BAD_REQUEST,
        "M_UNKNOWN_POS",
    );
    let fresh = slide_ok(&s, &alice, None, request).await;
    assert_eq!(bodies(&fresh["rooms"][&room]), vec!["wake up", "after restart"]);
    assert_eq!(fresh["rooms"][&room]["initial"], true);
}

#[tokio::test]
async fn bad_input_gets_matrix_errors_or_clamps() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "password 1").await;
    let room = s.create_room(&alice, json!({})).await;
    for i in 0..3 {
        s.send_text(&alice, &room, &format!("t{i}"), "x").await;
    }
    let unknown = slide(&s, &alice, Some("nonsense"), 0, json!({})).await;
    assert_error(&unknown, StatusCode::BAD_REQUEST, "M_UNKNOWN_POS");
    let backwards = json!({ "lists": { "a": list(json!([[5, 2]]), 1, json!([])) } });
    assert_error(
        &slide(&s, &alice, None, 0, backwards).await,
        StatusCode::BAD_REQUEST,
        "M_INVALID_PARAM",
    );
    let lists: serde_json::Map<String, Value> =
        (0..65).map(|i| (format!("l{i}"), list(json!([[0, 1]]), 1, json!([])))).collect();
    let many = json!({ "lists": lists });
    assert_error(
        &slide(&s, &alice, None, 0, many).await,
        StatusCode::BAD_REQUEST,
        "M_INVALID_PARAM",
    );
    let ranges: Vec<Value> = (0..17).map(|i| json!([i, i])).collect();
    let wide = json!({ "lists": { "a": list(json!(ranges), 1, json!([])) } });
    assert_error(
        &slide(&s, &alice, None, 0, wide).await,
        StatusCode::BAD_REQUEST,
        "M_INVALID_PARAM",
    );
    let not_json = s
        .http
        .post(format!("{}{PATH}", s.base))
        .bearer_auth(&alice)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status(), StatusCode::BAD_REQUEST);
    let (status, _) = s.post(&format!("{PATH}?timeout=soon"), Some(&alice), json!({})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error(&s.post(PATH, None, json!({})).await, StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN");

    // A huge timeline limit is cut down; unknown extensions and huge ranges are fine.
    let huge = json!({
        "lists": { "a": list(json!([[0, 1_000_000_000u64]]), 1_000_000_000u64, json!([])) },
        "extensions": { "org.example.unknown": { "enabled": true } },
    });
    let body = slide_ok(&s, &alice, None, huge).await;
    assert_eq!(body["lists"]["a"]["count"], 1);
    assert!(bodies(&body["rooms"][&room]).len() == 3, "{body}");
}

#[tokio::test]
async fn required_state_wildcards_filters_and_subscriptions() {
    let s = TestServer::start().await;
    let (alice_id, alice, _) = s.register("alice", "password 1").await;
    let (bob_id, bob, _) = s.register("bob", "password 1").await;
    let plain = s.create_room(&alice, json!({ "name": "plain" })).await;
    let encrypted = s
        .create_room(
            &alice,
            json!({ "initial_state": [{ "type": "m.room.encryption", "state_key": "",
                "content": { "algorithm": "m.megolm.v1.aes-sha2" } }] }),
        )
        .await;
    let space = s.create_room(&alice, json!({ "creation_content": { "type": "m.space" } })).await;
    let child_path = format!("/_matrix/client/v3/rooms/{space}/state/m.space.child/{plain}");
    assert_eq!(
        s.put(&child_path, Some(&alice), json!({ "via": ["localhost"] })).await.0,
        StatusCode::OK
    );
    let dm = s.create_room(&bob, json!({ "invite": [alice_id], "is_direct": true })).await;
    let data = format!("/_matrix/client/v3/user/{}/account_data/m.direct", enc(&alice_id));
    assert_eq!(s.put(&data, Some(&alice), json!({ bob_id.clone(): [dm] })).await.0, StatusCode::OK);
    let (status, _) =
        s.membership(&alice, &encrypted, "invite", json!({ "user_id": bob_id })).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(s.membership(&bob, &encrypted, "join", json!({})).await.0, StatusCode::OK);
    s.send_text(&bob, &encrypted, "b1", "from bob").await;

    let filtered =
        |filters: Value| json!({ "ranges": [[0, 20]], "timeline_limit": 0, "filters": filters });
    let request = json!({ "lists": {
        "dms": filtered(json!({ "is_dm": true })),
        "invites": filtered(json!({ "is_invite": true })),
        "encrypted": filtered(json!({ "is_encrypted": true })),
        "spaces": filtered(json!({ "room_types": ["m.space"] })),
        "no_spaces": filtered(json!({ "not_room_types": ["m.space"] })),
        "untyped": filtered(json!({ "room_types": [null] })),
        "in_space": filtered(json!({ "spaces": [space] })),
    } });
    let body = slide_ok(&s, &alice, None, request).await;
    let count = |name: &str| body["lists"][name]["count"].as_u64().unwrap();
    assert_eq!(count("dms"), 1);
    assert_eq!(count("invites"), 1);
    assert_eq!(count("encrypted"), 1);
    assert_eq!(count("spaces"), 1);
    assert_eq!(count("no_spaces"), 3);
    assert_eq!(count("untyped"), 3);
    assert_eq!(count("in_space"), 1);
    let invite = &body["rooms"][&dm];
    assert_eq!(invite["is_dm"], true);
    let stripped = invite["invite_state"].as_array().unwrap();
    assert!(stripped.iter().any(|e| e["type"] == "m.room.member" && e["state_key"] == alice_id));
    assert!(invite.get("timeline").is_none());

    // Wildcards: `$ME`, `$LAZY` (the timeline's senders) and `*`.
    let subs = json!({ "room_subscriptions": {
        encrypted.clone(): { "timeline_limit": 1, "required_state": [["m.room.member", "$LAZY"], ["m.room.create", ""]] },
        plain.clone(): { "timeline_limit": 0, "required_state": [["*", "*"]] },
        space.clone(): { "timeline_limit": 0, "required_state": [["m.room.member", "$ME"]] },
    } });
    let body = slide_ok(&s, &alice, None, subs).await;
    let keys = |room: &str| -> Vec<(String, String)> {
        let mut keys: Vec<(String, String)> = body["rooms"][room]["required_state"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                (
                    e["type"].as_str().unwrap().to_owned(),
                    e["state_key"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        keys.sort();
        keys
    };
    let lazy = keys(&encrypted);
    assert!(lazy.contains(&("m.room.member".into(), bob_id.clone())), "{lazy:?}");
    assert!(lazy.contains(&("m.room.create".into(), String::new())));
    assert_eq!(keys(&space), vec![("m.room.member".to_owned(), alice_id.clone())]);
    let everything = keys(&plain);
    for kind in ["m.room.create", "m.room.name", "m.room.power_levels", "m.room.join_rules"] {
        assert!(everything.iter().any(|(k, _)| k == kind), "{kind} in {everything:?}");
    }
    assert_eq!(body["rooms"][&encrypted]["joined_count"], 2);
    assert_eq!(bodies(&body["rooms"][&encrypted]), vec!["from bob"]);

    // A larger timeline limit later sends the room again with a longer timeline.
    let pos1 = pos(&body);
    let longer = json!({ "room_subscriptions": {
        encrypted.clone(): { "timeline_limit": 10, "required_state": [["m.room.member", "$LAZY"], ["m.room.create", ""]] },
    } });
    let body = slide_ok(&s, &alice, Some(&pos1), longer).await;
    let room = &body["rooms"][&encrypted];
    assert_eq!(room["expanded_timeline"], true, "{room}");
    assert!(bodies(room).len() == 1 && room["timeline"].as_array().unwrap().len() > 1, "{room}");
}

#[tokio::test]
async fn extensions_carry_to_device_keys_account_data_receipts_and_typing() {
    let s = TestServer::start().await;
    let (alice_id, alice, alice_device) = s.register("alice", "password 1").await;
    let (bob_id, bob, _) = s.register("bob", "password 1").await;
    let room = s.create_room(&alice, json!({ "invite": [bob_id] })).await;
    assert_eq!(s.membership(&bob, &room, "join", json!({})).await.0, StatusCode::OK);
    let keys = json!({ "one_time_keys": { "signed_curve25519:AAAA": { "key": "k" } } });
    assert_eq!(
        s.post("/_matrix/client/v3/keys/upload", Some(&alice), keys).await.0,
        StatusCode::OK
    );

    let extensions = json!({
        "to_device": { "enabled": true },
        "e2ee": { "enabled": true },
        "account_data": { "enabled": true },
        "receipts": { "enabled": true },
        "typing": { "enabled": true },
        "org.example.unknown": { "enabled": true },
    });
    let request = json!({ "lists": { "all": list(json!([[0, 9]]), 1, json!([])) }, "extensions": extensions });
    let first = slide_ok(&s, &alice, None, request.clone()).await;
    let ext = &first["extensions"];
    assert_eq!(ext["e2ee"]["device_one_time_keys_count"]["signed_curve25519"], 1);
    assert!(
        ext["account_data"]["global"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "m.push_rules")
    );
    let since = ext["to_device"]["next_batch"].as_str().unwrap().to_owned();

    // Bob sends a to-device message, reads, types; alice changes account data.
    let to_device =
        json!({ "messages": { alice_id.clone(): { alice_device.clone(): { "hi": 1 } } } });
    let path = "/_matrix/client/v3/sendToDevice/m.test/txn1";
    assert_eq!(s.put(path, Some(&bob), to_device).await.0, StatusCode::OK);
    let (_, sent) = s.send_text(&alice, &room, "t1", "read me").await;
    let event_id = sent["event_id"].as_str().unwrap().to_owned();
    let receipt = format!("/_matrix/client/v3/rooms/{room}/receipt/m.read/{}", enc(&event_id));
    assert_eq!(s.post(&receipt, Some(&bob), json!({})).await.0, StatusCode::OK);
    let typing = format!("/_matrix/client/v3/rooms/{room}/typing/{}", enc(&bob_id));
    let typing_body = json!({ "typing": true, "timeout": 30_000 });
    assert_eq!(s.put(&typing, Some(&bob), typing_body).await.0, StatusCode::OK);
    let data =
        format!("/_matrix/client/v3/user/{}/account_data/org.example.setting", enc(&alice_id));
    assert_eq!(s.put(&data, Some(&alice), json!({ "on": true })).await.0, StatusCode::OK);
    let tag = format!(
        "/_matrix/client/v3/user/{}/rooms/{room}/account_data/org.example.room",
        enc(&alice_id)
    );
    assert_eq!(s.put(&tag, Some(&alice), json!({ "pinned": 1 })).await.0, StatusCode::OK);

    let mut request = request;
    request["extensions"]["to_device"]["since"] = json!(since);
    let next = slide_ok(&s, &alice, Some(&pos(&first)), request.clone()).await;
    let ext = &next["extensions"];
    let messages = ext["to_device"]["events"].as_array().unwrap();
    assert_eq!(messages.len(), 1, "{ext}");
    assert_eq!(messages[0]["sender"], bob_id);
    assert_eq!(messages[0]["content"]["hi"], 1);
    let read = &ext["receipts"]["rooms"][&room]["content"][&event_id]["m.read"];
    assert!(read.get(&bob_id).is_some(), "{ext}");
    assert_eq!(ext["typing"]["rooms"][&room]["content"]["user_ids"], json!([bob_id]));
    let global = ext["account_data"]["global"].as_array().unwrap();
    assert_eq!(global.len(), 1, "only what changed: {global:?}");
    assert_eq!(global[0]["content"]["on"], true);
    assert_eq!(ext["account_data"]["rooms"][&room][0]["type"], "org.example.room");

    // Acknowledged to-device messages are gone; a list naming no rooms scopes receipts away.
    request["extensions"]["to_device"]["since"] = ext["to_device"]["next_batch"].clone();
    request["extensions"]["receipts"]["lists"] = json!([]);
    request["extensions"]["receipts"]["rooms"] = json!([]);
    let (_, sent) = s.send_text(&bob, &room, "b1", "another").await;
    let receipt = format!(
        "/_matrix/client/v3/rooms/{room}/receipt/m.read/{}",
        enc(sent["event_id"].as_str().unwrap())
    );
    assert_eq!(s.post(&receipt, Some(&bob), json!({})).await.0, StatusCode::OK);
    let last = slide_ok(&s, &alice, Some(&pos(&next)), request).await;
    assert!(last["extensions"]["to_device"]["events"].as_array().unwrap().is_empty());
    assert!(last["extensions"]["receipts"]["rooms"].as_object().unwrap().is_empty());
    assert_eq!(bodies(&last["rooms"][&room]), vec!["another"]);
    assert_eq!(last["rooms"][&room]["notification_count"], 1);
}

#[tokio::test]
async fn leaving_shows_the_room_once_with_the_leave_and_invites_enter_lists() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "password 1").await;
    let (bob_id, bob, _) = s.register("bob", "password 1").await;
    let kept = s.create_room(&alice, json!({})).await;
    let left = s.create_room(&alice, json!({})).await;
    let request = json!({ "lists": { "all": list(json!([[0, 9]]), 3, json!([])) } });
    let first = slide_ok(&s, &alice, None, request.clone()).await;
    assert_eq!(first["lists"]["all"]["count"], 2);

    assert_eq!(s.membership(&alice, &left, "leave", json!({})).await.0, StatusCode::OK);
    let invited = s.create_room(&bob, json!({ "invite": ["@alice:localhost"] })).await;
    let second = slide_ok(&s, &alice, Some(&pos(&first)), request.clone()).await;
    let gone = &second["rooms"][&left]["timeline"];
    let last = gone.as_array().unwrap().last().unwrap();
    assert_eq!(last["type"], "m.room.member");
    assert_eq!(last["content"]["membership"], "leave");
    assert!(!second["rooms"][&invited]["invite_state"].as_array().unwrap().is_empty());
    assert!(second["rooms"].get(&kept).is_none());
    assert_eq!(second["lists"]["all"]["count"], 3, "the left room shows once, the invite joins");

    let third = slide_ok(&s, &alice, Some(&pos(&second)), request).await;
    assert_eq!(third["lists"]["all"]["count"], 2);
    let _ = bob_id;
}
