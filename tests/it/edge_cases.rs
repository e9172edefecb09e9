//! Races and edge cases: replaced sessions, password guessing, hidden state changes,
//! state-typed redactions, half-made rooms, server-managed account data.

use reqwest::StatusCode;
use serde_json::json;

use crate::common::{TestServer, assert_error, enc};

#[tokio::test]
async fn a_replaced_session_token_stops_working() {
    let s = TestServer::start().await;
    s.register("alice", "correct horse").await;
    let login = |device: &'static str| {
        let s = &s;
        async move {
            let body = json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "alice" },
                               "password": "correct horse", "device_id": device });
            let (status, body) = s.post("/_matrix/client/v3/login", None, body).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            body["access_token"].as_str().unwrap().to_owned()
        }
    };
    let (first, second) = tokio::join!(login("SHARED"), login("SHARED"));
    let mut valid = 0;
    for token in [&first, &second] {
        if s.get("/_matrix/client/v3/account/whoami", Some(token)).await.0 == StatusCode::OK {
            valid += 1;
        }
    }
    assert_eq!(valid, 1, "one device holds one token");
}

#[tokio::test]
async fn password_guessing_through_uia_is_cut_off() {
    let s = TestServer::start().await;
    let (user_id, token, device) = s.register("alice", "correct horse").await;
    let path = format!("/_matrix/client/v3/devices/{device}");
    let (_, challenge) =
        s.call(reqwest::Method::DELETE, &path, Some(&token), Some(json!({}))).await;
    let session = challenge["session"].as_str().unwrap().to_owned();
    let guess = |password: &str| {
        json!({ "auth": { "type": "m.login.password", "session": session, "password": password,
        "identifier": { "type": "m.id.user", "user": user_id } } })
    };
    let mut last = None;
    for i in 0..5 {
        last = Some(
            s.call(
                reqwest::Method::DELETE,
                &path,
                Some(&token),
                Some(guess(&format!("guess {i}"))),
            )
            .await,
        );
    }
    assert_error(&last.unwrap(), StatusCode::FORBIDDEN, "M_FORBIDDEN");
    // The session is gone: even the right password no longer completes it.
    let (status, _) =
        s.call(reqwest::Method::DELETE, &path, Some(&token), Some(guess("correct horse"))).await;
    assert_ne!(status, StatusCode::OK);
}

#[tokio::test]
async fn state_changes_by_ignored_users_still_reach_sync() {
    let s = TestServer::start().await;
    let (alice_id, alice, _) = s.register("alice", "correct horse").await;
    let (bob_id, bob, _) = s.register("bob", "correct horse").await;
    let room = s.create_room(&alice, json!({ "name": "Old", "invite": [bob_id] })).await;
    s.membership(&bob, &room, "join", json!({})).await;
    let ignore = format!("/_matrix/client/v3/user/{bob_id}/account_data/m.ignored_user_list");
    s.put(&ignore, Some(&bob), json!({ "ignored_users": { alice_id.as_str(): {} } })).await;
    let (_, first) = s.get("/_matrix/client/v3/sync", Some(&bob)).await;
    let token = first["next_batch"].as_str().unwrap();
    s.put(
        &format!("/_matrix/client/v3/rooms/{room}/state/m.room.name/"),
        Some(&alice),
        json!({ "name": "New" }),
    )
    .await;
    let (_, next) = s.get(&format!("/_matrix/client/v3/sync?since={token}"), Some(&bob)).await;
    let state = next["rooms"]["join"][&room]["state"]["events"]
        .as_array()
        .expect("the room is in the sync");
    assert!(
        state.iter().any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "New"),
        "{next}"
    );
}

#[tokio::test]
async fn redactions_cannot_be_smuggled_in_as_state() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "correct horse").await;
    let (bob_id, bob, _) = s.register("bob", "correct horse").await;
    let room = s
        .create_room(
            &alice,
            json!({ "invite": [bob_id], "power_level_content_override": { "state_default": 0 } }),
        )
        .await;
    s.membership(&bob, &room, "join", json!({})).await;
    let (_, sent) = s.send_text(&alice, &room, "a", "keep me").await;
    let event = sent["event_id"].as_str().unwrap();
    let smuggled = s
        .put(
            &format!("/_matrix/client/v3/rooms/{room}/state/m.room.redaction/x"),
            Some(&bob),
            json!({ "redacts": event }),
        )
        .await;
    assert_error(&smuggled, StatusCode::BAD_REQUEST, "M_BAD_JSON");
    let (_, kept) =
        s.get(&format!("/_matrix/client/v3/rooms/{room}/event/{}", enc(event)), Some(&bob)).await;
    assert_eq!(kept["content"]["body"], "keep me");

    // Room nicknames are member state events of one's own.
    let nick = s
        .put(
            &format!("/_matrix/client/v3/rooms/{room}/state/m.room.member/{bob_id}"),
            Some(&bob),
            json!({ "membership": "join", "displayname": "Bobby" }),
        )
        .await;
    assert_eq!(nick.0, StatusCode::OK, "{}", nick.1);
}

#[tokio::test]
async fn bad_create_room_requests_leave_nothing_behind() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "correct horse").await;
    let missing = s
        .post(
            "/_matrix/client/v3/createRoom",
            Some(&alice),
            json!({ "invite": ["@nobody:localhost"] }),
        )
        .await;
    assert_error(&missing, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let bad_state = s
        .post("/_matrix/client/v3/createRoom", Some(&alice), json!({ "initial_state": [{ "type": "m.room.member", "state_key": "@x:localhost", "content": {} }] }))
        .await;
    assert_error(&bad_state, StatusCode::BAD_REQUEST, "M_BAD_JSON");
    let (_, joined) = s.get("/_matrix/client/v3/joined_rooms", Some(&alice)).await;
    assert_eq!(joined["joined_rooms"], json!([]));

    // Identical v12 requests at once still make two rooms.
    let body = json!({ "name": "Twin" });
    let (a, b) = tokio::join!(s.create_room(&alice, body.clone()), s.create_room(&alice, body));
    assert_ne!(a, b);
}

#[tokio::test]
async fn server_managed_account_data_is_refused_with_405() {
    let s = TestServer::start().await;
    let (user_id, token, _) = s.register("alice", "correct horse").await;
    let path = format!("/_matrix/client/v3/user/{user_id}/account_data/m.fully_read");
    assert_error(
        &s.put(&path, Some(&token), json!({ "event_id": "$x" })).await,
        StatusCode::METHOD_NOT_ALLOWED,
        "M_BAD_JSON",
    );
}

#[tokio::test]
async fn guests_only_join_rooms_open_to_guests() {
    let s = TestServer::start_with(|c| c.registration.allow_guests = true).await;
    let (_, alice, _) = s.register("alice", "correct horse").await;
    let (status, guest) = s.post("/_matrix/client/v3/register?kind=guest", None, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{guest}");
    let guest_token = guest["access_token"].as_str().unwrap();
    let create = s.post("/_matrix/client/v3/createRoom", Some(guest_token), json!({})).await;
    assert_error(&create, StatusCode::FORBIDDEN, "M_GUEST_ACCESS_FORBIDDEN");
    let public = s.create_room(&alice, json!({ "preset": "public_chat" })).await;
    assert_error(
        &s.membership(guest_token, &public, "join", json!({})).await,
        StatusCode::FORBIDDEN,
        "M_GUEST_ACCESS_FORBIDDEN",
    );
    let open = s
        .create_room(&alice, json!({ "preset": "public_chat", "initial_state": [{ "type": "m.room.guest_access", "state_key": "", "content": { "guest_access": "can_join" } }] }))
        .await;
    assert_eq!(s.membership(guest_token, &open, "join", json!({})).await.0, StatusCode::OK);
}

#[tokio::test]
async fn forgotten_rooms_close_their_history() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "correct horse").await;
    let (bob_id, bob, _) = s.register("bob", "correct horse").await;
    let room = s.create_room(&alice, json!({ "invite": [bob_id] })).await;
    s.membership(&bob, &room, "join", json!({})).await;
    let (_, sent) = s.send_text(&alice, &room, "a", "while bob was here").await;
    let event = format!(
        "/_matrix/client/v3/rooms/{room}/event/{}",
        enc(sent["event_id"].as_str().unwrap())
    );
    s.membership(&bob, &room, "leave", json!({})).await;
    assert_eq!(
        s.get(&event, Some(&bob)).await.0,
        StatusCode::OK,
        "left, not forgotten: history stays"
    );
    s.membership(&bob, &room, "forget", json!({})).await;
    assert_error(&s.get(&event, Some(&bob)).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let messages =
        s.get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b"), Some(&bob)).await;
    assert_error(&messages, StatusCode::FORBIDDEN, "M_FORBIDDEN");
}

#[tokio::test]
async fn profile_changes_reach_every_joined_room() {
    let s = TestServer::start().await;
    let (alice_id, alice, _) = s.register("alice", "correct horse").await;
    let (bob_id, bob, _) = s.register("bob", "correct horse").await;
    let room = s.create_room(&alice, json!({ "invite": [bob_id] })).await;
    s.membership(&bob, &room, "join", json!({})).await;
    let path = format!("/_matrix/client/v3/profile/{alice_id}/displayname");
    assert_eq!(
        s.put(&path, Some(&alice), json!({ "displayname": "Alice Liddell" })).await.0,
        StatusCode::OK
    );
    let (_, member) = s
        .get(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.member/{alice_id}"), Some(&bob))
        .await;
    assert_eq!(member["displayname"], "Alice Liddell");
    assert_eq!(member["membership"], "join");
}

#[tokio::test]
async fn trusted_proxies_forward_the_client_address() {
    let s = TestServer::start_with(|c| {
        c.limits.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
        c.limits.rate_per_second = 1;
        c.limits.rate_burst = 2;
    })
    .await;
    let login = |client: &'static str| {
        let s = &s;
        async move {
            let body = json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "x" }, "password": "wrong password" });
            let response = s
                .http
                .post(format!("{}/_matrix/client/v3/login", s.base))
                .header("X-Forwarded-For", format!("198.51.100.9, {client}"))
                .json(&body)
                .send()
                .await
                .unwrap();
            response.status()
        }
    };
    for _ in 0..3 {
        login("203.0.113.1").await;
    }
    assert_eq!(login("203.0.113.1").await, StatusCode::TOO_MANY_REQUESTS, "one client is limited");
    assert_eq!(
        login("203.0.113.2").await,
        StatusCode::FORBIDDEN,
        "another client behind the proxy is not"
    );
}
