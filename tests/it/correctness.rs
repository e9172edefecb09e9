//! Correctness at the edges of the client API: transaction ids scoped per device and endpoint
//! (room sends, to-device sends, server notices), the spec's size limits on event fields,
//! relations kept within a room, logging out with an expired token or a locked account, and
//! malformed inline `/sync` filters.

use reqwest::StatusCode;
use serde_json::json;

use crate::common::{TestServer, assert_error, enc};

/// Sends a text message; returns its event id.
async fn say(s: &TestServer, token: &str, room: &str, txn: &str, text: &str) -> String {
    let (status, body) = s.send_text(token, room, txn, text).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["event_id"].as_str().unwrap().to_owned()
}

/// Logs `user` in on the device `device`; returns the access token.
async fn login_device(s: &TestServer, user: &str, password: &str, device: &str) -> String {
    let (status, login) = s
        .post(
            "/_matrix/client/v3/login",
            None,
            json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": user },
                "password": password, "device_id": device }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{login}");
    login["access_token"].as_str().unwrap().to_owned()
}

/// Whether `event_id` is redacted, as `/event` shows it.
async fn redacted(s: &TestServer, token: &str, room: &str, event_id: &str) -> bool {
    let path = format!("/_matrix/client/v3/rooms/{room}/event/{}", enc(event_id));
    let (status, event) = s.get(&path, Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{event}");
    event["content"].as_object().unwrap().is_empty()
}

#[tokio::test]
async fn transaction_ids_are_scoped_per_device_and_endpoint() {
    let s = TestServer::start().await;
    let (alice, token, _) = s.register("alice", "password-a").await;
    let room = s.create_room(&token, json!({})).await;
    let message = say(&s, &token, &room, "t1", "hello").await;

    // A redaction reusing the message's transaction id is another request: it redacts.
    let path = format!("/_matrix/client/v3/rooms/{room}/redact/{}/t1", enc(&message));
    let (status, body) = s.put(&path, Some(&token), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let redaction = body["event_id"].as_str().unwrap().to_owned();
    assert_ne!(redaction, message);
    assert!(redacted(&s, &token, &room, &message).await);
    // Repeating the redaction answers the same redaction.
    let (status, again) = s.put(&path, Some(&token), json!({})).await;
    assert_eq!((status, again["event_id"].as_str()), (StatusCode::OK, Some(&*redaction)));

    // Another event type on `/send` is another endpoint path; the same one is idempotent.
    let reaction = format!("/_matrix/client/v3/rooms/{room}/send/m.reaction/t1");
    let second = say(&s, &token, &room, "t2", "second").await;
    let content = json!({ "m.relates_to": {
        "rel_type": "m.annotation", "event_id": second, "key": "👍" } });
    let (status, body) = s.put(&reaction, Some(&token), content.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let reaction_id = body["event_id"].as_str().unwrap().to_owned();
    assert_ne!(reaction_id, message);
    let (status, again) = s.put(&reaction, Some(&token), content).await;
    assert_eq!((status, again["event_id"].as_str()), (StatusCode::OK, Some(&*reaction_id)));
    assert_eq!(say(&s, &token, &room, "t1", "hello again").await, message);

    // Another device of the same account may use the same id.
    let (status, login) = s.login(&alice, "password-a").await;
    assert_eq!(status, StatusCode::OK, "{login}");
    let other = login["access_token"].as_str().unwrap();
    let phone = say(&s, other, &room, "t1", "from the phone").await;
    assert_ne!(phone, message);

    // A logged-out device's ids go with it; a new device with the same id starts afresh.
    let device = login["device_id"].as_str().unwrap();
    let (status, _) = s.post("/_matrix/client/v3/logout", Some(other), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, login) = s
        .post(
            "/_matrix/client/v3/login",
            None,
            json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": alice },
                "password": "password-a", "device_id": device }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{login}");
    let again = login["access_token"].as_str().unwrap();
    let fresh = say(&s, again, &room, "t1", "after logging in again").await;
    assert_ne!(fresh, phone);
}

#[tokio::test]
async fn event_fields_over_255_bytes_are_too_large() {
    let s = TestServer::start().await;
    let (alice, token, _) = s.register("alice", "password-a").await;
    s.set_role(&alice, "admin");
    let room = s.create_room(&token, json!({})).await;
    let long = "x".repeat(256);

    let path = format!("/_matrix/client/v3/rooms/{room}/send/{long}/t1");
    let result = s.put(&path, Some(&token), json!({ "body": "hi" })).await;
    assert_error(&result, StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE");
    let path = format!("/_matrix/client/v3/rooms/{room}/state/{long}/key");
    let result = s.put(&path, Some(&token), json!({})).await;
    assert_error(&result, StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE");
    let path = format!("/_matrix/client/v3/rooms/{room}/state/m.room.custom/{long}");
    let result = s.put(&path, Some(&token), json!({})).await;
    assert_error(&result, StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE");
    let initial =
        json!({ "initial_state": [{ "type": "m.custom", "state_key": long, "content": {} }] });
    let (_, joined) = s.get("/_matrix/client/v3/joined_rooms", Some(&token)).await;
    let result = s.post("/_matrix/client/v3/createRoom", Some(&token), initial).await;
    assert_error(&result, StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE");
    let initial = json!({ "initial_state": [{ "type": long, "state_key": "", "content": {} }] });
    let result = s.post("/_matrix/client/v3/createRoom", Some(&token), initial).await;
    assert_error(&result, StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE");
    // Refused before anything was written: no half-made room to be joined to.
    let (_, after) = s.get("/_matrix/client/v3/joined_rooms", Some(&token)).await;
    assert_eq!(after, joined);
    // A room id over 255 bytes is not a room id.
    let room_id = format!("!{}:localhost", "r".repeat(260));
    let path = format!("/_matrix/client/v3/rooms/{room_id}/send/m.room.message/t2");
    let result = s.put(&path, Some(&token), json!({ "body": "hi" })).await;
    assert_error(&result, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    let result = s.get(&format!("/_synapse/admin/v1/rooms/{room_id}/state"), Some(&token)).await;
    assert_error(&result, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");

    // 255 bytes exactly are fine.
    let limit = "y".repeat(255);
    let path = format!("/_matrix/client/v3/rooms/{room}/send/{limit}/t3");
    let (status, body) = s.put(&path, Some(&token), json!({ "body": "hi" })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let path = format!("/_matrix/client/v3/rooms/{room}/state/{limit}/{limit}");
    let (status, body) = s.put(&path, Some(&token), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn relations_to_another_room_are_refused() {
    let s = TestServer::start().await;
    let (_, token, _) = s.register("alice", "password-a").await;
    let here = s.create_room(&token, json!({})).await;
    let there = s.create_room(&token, json!({})).await;
    let elsewhere = say(&s, &token, &there, "t0", "in the other room").await;
    let local = say(&s, &token, &here, "t1", "in this room").await;

    let relations = [
        ("m.room.message", json!({ "rel_type": "m.replace", "event_id": elsewhere })),
        ("m.reaction", json!({ "rel_type": "m.annotation", "event_id": elsewhere, "key": "👍" })),
        ("m.room.message", json!({ "rel_type": "m.thread", "event_id": elsewhere })),
        ("m.room.message", json!({ "rel_type": "m.reference", "event_id": elsewhere })),
        ("m.room.message", json!({ "m.in_reply_to": { "event_id": elsewhere } })),
        (
            "m.room.message",
            json!({ "rel_type": "m.thread", "event_id": local,
                "m.in_reply_to": { "event_id": elsewhere } }),
        ),
    ];
    for (i, (kind, relates_to)) in relations.iter().enumerate() {
        let path = format!("/_matrix/client/v3/rooms/{here}/send/{kind}/r{i}");
        let content = json!({ "msgtype": "m.text", "body": "x", "m.relates_to": relates_to });
        let result = s.put(&path, Some(&token), content).await;
        assert_error(&result, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    }
    // State events too.
    let path = format!("/_matrix/client/v3/rooms/{here}/state/m.custom/k");
    let content = json!({ "m.relates_to": { "rel_type": "m.reference", "event_id": elsewhere } });
    let result = s.put(&path, Some(&token), content).await;
    assert_error(&result, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");

    // Initial state of a new room cannot relate to anything known, and is refused before
    // the room is made.
    let (_, joined) = s.get("/_matrix/client/v3/joined_rooms", Some(&token)).await;
    for relates_to in [
        json!({ "rel_type": "m.reference", "event_id": elsewhere }),
        json!({ "m.in_reply_to": { "event_id": elsewhere } }),
    ] {
        let initial = json!({ "initial_state": [
            { "type": "m.custom", "state_key": "", "content": { "m.relates_to": relates_to } }] });
        let result = s.post("/_matrix/client/v3/createRoom", Some(&token), initial).await;
        assert_error(&result, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    }
    let (_, after) = s.get("/_matrix/client/v3/joined_rooms", Some(&token)).await;
    assert_eq!(after, joined);

    // Within the room, and to events the server does not know, relations are fine.
    for (i, target) in [local.as_str(), "$unknown-event"].iter().enumerate() {
        let path = format!("/_matrix/client/v3/rooms/{here}/send/m.room.message/ok{i}");
        let content = json!({ "msgtype": "m.text", "body": "x",
            "m.relates_to": { "rel_type": "m.thread", "event_id": target,
                "m.in_reply_to": { "event_id": target } } });
        let (status, body) = s.put(&path, Some(&token), content).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
}

#[tokio::test]
async fn logout_works_with_an_expired_token() {
    let s = TestServer::start_with(|config| config.registration.access_token_ttl_secs = 1).await;
    let (alice, _, _) = s.register("alice", "password-a").await;
    let mut tokens = Vec::new();
    for _ in 0..2 {
        let (status, login) = s
            .post(
                "/_matrix/client/v3/login",
                None,
                json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": alice },
                    "password": "password-a", "refresh_token": true }),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{login}");
        tokens.push(login["access_token"].as_str().unwrap().to_owned());
    }
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let whoami = s.get("/_matrix/client/v3/account/whoami", Some(&tokens[0])).await;
    assert_error(&whoami, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");
    assert_eq!(whoami.1["soft_logout"], true);

    for (token, path) in
        tokens.iter().zip(["/_matrix/client/v3/logout", "/_matrix/client/v3/logout/all"])
    {
        let (status, body) = s.post(path, Some(token), json!({})).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        // The token is gone for good: no longer a soft logout.
        let again = s.post(path, Some(token), json!({})).await;
        assert_error(&again, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");
        assert_eq!(again.1["soft_logout"], false, "{}", again.1);
    }
    let (_, devices) = s.login(&alice, "password-a").await;
    let token = devices["access_token"].as_str().unwrap();
    let (_, list) = s.get("/_matrix/client/v3/devices", Some(token)).await;
    assert_eq!(list["devices"].as_array().unwrap().len(), 1, "{list}");
}

#[tokio::test]
async fn logout_works_for_a_locked_account() {
    let s = TestServer::start().await;
    let (admin, admin_token, _) = s.register("root", "password-r").await;
    s.set_role(&admin, "admin");
    let (alice, token, _) = s.register("alice", "password-a").await;
    let (_, login) = s.login(&alice, "password-a").await;
    let second = login["access_token"].as_str().unwrap().to_owned();
    let (status, body) = s
        .put(
            &format!("/_synapse/admin/v2/users/{alice}"),
            Some(&admin_token),
            json!({ "locked": true }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let whoami = s.get("/_matrix/client/v3/account/whoami", Some(&token)).await;
    assert_error(&whoami, StatusCode::UNAUTHORIZED, "M_USER_LOCKED");

    let (status, body) = s.post("/_matrix/client/v3/logout", Some(&token), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let again = s.post("/_matrix/client/v3/logout", Some(&token), json!({})).await;
    assert_error(&again, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");
    let (status, body) = s.post("/_matrix/client/v3/logout/all", Some(&second), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let again = s.post("/_matrix/client/v3/logout/all", Some(&second), json!({})).await;
    assert_error(&again, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");
    // That ended the second session too.
    let unknown = s.get("/_matrix/client/v3/account/whoami", Some(&second)).await;
    assert_error(&unknown, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");
}

#[tokio::test]
async fn malformed_inline_sync_filters_are_bad_requests() {
    let s = TestServer::start().await;
    let (_, token, _) = s.register("alice", "password-a").await;
    for filter in [r#"{"room":"#, r#"{"room": 5}"#, r#"  {"room": {"timeline": {"limit": "x"}}}"#] {
        let query: String = form_urlencoded::byte_serialize(filter.as_bytes()).collect();
        let result = s.get(&format!("/_matrix/client/v3/sync?filter={query}"), Some(&token)).await;
        assert_error(&result, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    }
    // A well-formed inline filter works; an unknown filter id is still not found.
    let query: String =
        form_urlencoded::byte_serialize(br#"{"room":{"timeline":{"limit":1}}}"#).collect();
    let (status, body) =
        s.get(&format!("/_matrix/client/v3/sync?filter={query}"), Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let result = s.get("/_matrix/client/v3/sync?filter=12345", Some(&token)).await;
    assert_error(&result, StatusCode::NOT_FOUND, "M_NOT_FOUND");
}

#[tokio::test]
async fn to_device_transaction_ids_are_scoped_per_event_type() {
    let s = TestServer::start().await;
    let (alice, alice_token, alice_device) = s.register("alice", "password-a").await;
    let (bob, _, _) = s.register("bob", "password-b").await;
    let bob_token = login_device(&s, &bob, "password-b", "BOBPHONE").await;
    let (_, first) = s.get("/_matrix/client/v3/sync", Some(&alice_token)).await;
    let since = first["next_batch"].as_str().unwrap().to_owned();
    let send = |kind: &'static str, token: String| {
        let path = format!("/_matrix/client/v3/sendToDevice/{kind}/t1");
        let body = json!({ "messages": { alice.as_str(): {
            alice_device.as_str(): { "kind": kind } } } });
        let s = &s;
        async move {
            let (status, body) = s.put(&path, Some(&token), body).await;
            assert_eq!(status, StatusCode::OK, "{body}");
        }
    };
    // The same id under two event types is two requests; a repeat of one is not.
    send("m.test.a", bob_token.clone()).await;
    send("m.test.b", bob_token.clone()).await;
    send("m.test.a", bob_token.clone()).await;
    // A logged-out device's ids go with it: the same device id, logged in again, starts afresh.
    let (status, _) = s.post("/_matrix/client/v3/logout", Some(&bob_token), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let again = login_device(&s, &bob, "password-b", "BOBPHONE").await;
    send("m.test.a", again).await;

    let (_, got) =
        s.get(&format!("/_matrix/client/v3/sync?since={since}"), Some(&alice_token)).await;
    let kinds: Vec<&str> = got["to_device"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["m.test.a", "m.test.b", "m.test.a"], "{got}");
}

#[tokio::test]
async fn server_notice_transaction_ids_are_scoped_per_admin_device() {
    let s = TestServer::start().await;
    let (admin, _, _) = s.register("root", "password-r").await;
    s.set_role(&admin, "admin");
    s.register("alice", "password-a").await;
    let laptop = login_device(&s, &admin, "password-r", "LAPTOP").await;
    let phone = login_device(&s, &admin, "password-r", "PHONE").await;
    let notice =
        json!({ "user_id": "@alice:localhost", "content": { "msgtype": "m.text", "body": "hi" } });
    let send = |token: String| {
        let notice = notice.clone();
        let s = &s;
        async move {
            let path = "/_synapse/admin/v1/send_server_notice/n1";
            let (status, sent) = s.put(path, Some(&token), notice).await;
            assert_eq!(status, StatusCode::OK, "{sent}");
            sent["event_id"].as_str().unwrap().to_owned()
        }
    };
    let first = send(laptop.clone()).await;
    assert_eq!(send(laptop.clone()).await, first, "a repeat answers the first notice");
    let from_phone = send(phone).await;
    assert_ne!(from_phone, first, "another device's id is another request");

    // Logging the device out forgets its ids.
    let (status, _) = s.post("/_matrix/client/v3/logout", Some(&laptop), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let laptop = login_device(&s, &admin, "password-r", "LAPTOP").await;
    let fresh = send(laptop).await;
    assert!(fresh != first && fresh != from_phone, "{fresh}");
}
