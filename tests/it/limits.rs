//! Abuse limits: failed logins per account from several addresses (and their coalesced audit
//! records), registrations per address, events sent per user with admins exempt.

use std::net::{IpAddr, Ipv4Addr};

use plaza::config::RateConfig;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{TestServer, assert_error};

/// A client whose connections leave from `127.0.0.<last>`.
fn client_from(last: u8) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
        .build()
        .unwrap()
}

async fn post_from(
    client: &reqwest::Client,
    s: &TestServer,
    path: &str,
    body: Value,
) -> (StatusCode, Value) {
    let response = client.post(format!("{}{path}", s.base)).json(&body).send().await.unwrap();
    (response.status(), response.json().await.unwrap_or(Value::Null))
}

fn login_body(user: &str, password: &str) -> Value {
    json!({
        "type": "m.login.password",
        "identifier": { "type": "m.id.user", "user": user },
        "password": password,
    })
}

#[track_caller]
fn assert_limited(result: &(StatusCode, Value)) {
    assert_error(result, StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED");
    assert!(result.1["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0), "{}", result.1);
}

#[tokio::test]
async fn failed_logins_are_limited_per_account_whatever_the_address() {
    let s = TestServer::start_with(|c| {
        c.limits.login_failures.per_second = 0.01;
        c.limits.login_failures.burst = 3;
    })
    .await;
    let (alice, token, _) = s.register("alice", "password-a").await;
    s.register("bob", "password-b").await;
    s.set_role(&alice, "admin");

    let clients: Vec<reqwest::Client> = (2..=5).map(client_from).collect();
    let mut forbidden = 0;
    let mut limited = 0;
    for round in 0..10 {
        let client = &clients[round % clients.len()];
        let result =
            post_from(client, &s, "/_matrix/client/v3/login", login_body("bob", "wrong")).await;
        match result.0 {
            StatusCode::FORBIDDEN => forbidden += 1,
            _ => {
                assert_limited(&result);
                limited += 1;
            }
        }
    }
    assert_eq!((forbidden, limited), (3, 7));
    // The right password waits too: the account is what is protected, not the address.
    let right =
        post_from(&clients[0], &s, "/_matrix/client/v3/login", login_body("bob", "password-b"));
    assert_limited(&right.await);
    // The full user id is the same account.
    let full = post_from(
        &clients[1],
        &s,
        "/_matrix/client/v3/login",
        login_body("@bob:localhost", "wrong"),
    );
    assert_limited(&full.await);
    // Other accounts are untouched.
    let other =
        post_from(&clients[2], &s, "/_matrix/client/v3/login", login_body("alice", "password-a"));
    assert_eq!(other.await.0, StatusCode::OK);

    // Twelve failures, one audit record (the rest are summarised when the window closes).
    let (status, body) =
        s.get("/_plaza/admin/v1/audit?action=user.login_failed", Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let records = body["records"].as_array().unwrap();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["target"], "bob");
    assert_eq!(records[0]["details"]["reason"], "bad_credentials");
}

#[tokio::test]
async fn repeated_failed_logins_are_summarised_when_the_window_closes() {
    let s = TestServer::start_with(|c| c.limits.login_failures.audit_window_secs = 1).await;
    let (alice, token, _) = s.register("alice", "password-a").await;
    s.set_role(&alice, "admin");
    for _ in 0..6 {
        assert_eq!(s.login("carol", "wrong").await.0, StatusCode::FORBIDDEN);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let records = loop {
        let (_, body) =
            s.get("/_plaza/admin/v1/audit?action=user.login_failed", Some(&token)).await;
        let records = body["records"].as_array().unwrap().clone();
        if records.len() == 2 || std::time::Instant::now() > deadline {
            break records;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(records[0]["details"]["reason"], "bad_credentials");
    assert_eq!(records[1]["target"], "carol");
    assert_eq!(records[1]["details"]["repeated"], 5, "{records:?}");
}

#[tokio::test]
async fn registration_is_limited_per_address() {
    let s = TestServer::start_with(|c| {
        c.limits.registration = RateConfig { per_second: 0.01, burst: 2 };
    })
    .await;
    let register = |client: reqwest::Client, name: &'static str| {
        let s = &s;
        async move {
            let body = json!({ "username": name, "password": "password-x", "auth": { "type": "m.login.dummy" } });
            post_from(&client, s, "/_matrix/client/v3/register", body).await
        }
    };
    assert_eq!(register(client_from(2), "user1").await.0, StatusCode::OK);
    assert_eq!(register(client_from(2), "user2").await.0, StatusCode::OK);
    assert_limited(&register(client_from(2), "user3").await);
    // Nothing was created for the refused request.
    let (status, _) = s.get("/_matrix/client/v3/register/available?username=user3", None).await;
    assert_eq!(status, StatusCode::OK);
    // Another address has its own allowance.
    assert_eq!(register(client_from(3), "user3").await.0, StatusCode::OK);
}

#[tokio::test]
async fn sending_is_limited_per_user_and_admins_are_exempt() {
    let s = TestServer::start_with(|c| {
        c.limits.messages = RateConfig { per_second: 0.01, burst: 3 };
    })
    .await;
    let (_, alice_token, _) = s.register("alice", "password-a").await;
    let (boss, boss_token, _) = s.register("boss", "password-b").await;
    s.set_role(&boss, "admin");
    let room = s.create_room(&alice_token, json!({ "preset": "public_chat" })).await;
    assert_eq!(s.membership(&boss_token, &room, "join", json!({})).await.0, StatusCode::OK);

    let mut sent = Vec::new();
    for i in 0..3 {
        let (status, body) = s.send_text(&alice_token, &room, &format!("t{i}"), "hi").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        sent.push(body["event_id"].clone());
    }
    assert_limited(&s.send_text(&alice_token, &room, "t3", "one too many").await);
    // A retried send (a transaction already stored) gets its event back, uncharged.
    for (i, event_id) in sent.iter().enumerate() {
        let (status, body) = s.send_text(&alice_token, &room, &format!("t{i}"), "hi").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(&body["event_id"], event_id);
    }
    let topic = format!("/_matrix/client/v3/rooms/{room}/state/m.room.topic/x");
    assert_limited(&s.put(&topic, Some(&alice_token), json!({ "topic": "x" })).await);
    // The refused message was not stored.
    let (_, messages) = s
        .get(
            &format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=50"),
            Some(&alice_token),
        )
        .await;
    let texts = messages["chunk"].as_array().unwrap();
    assert!(texts.iter().all(|e| e["content"]["body"] != "one too many"), "{messages}");

    for i in 0..10 {
        assert_eq!(s.send_text(&boss_token, &room, &format!("b{i}"), "hi").await.0, StatusCode::OK);
    }
}
