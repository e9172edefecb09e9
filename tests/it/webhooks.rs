//! Incoming webhooks: a plain unauthenticated POST lands in a matrix-sdk client's sync; hooks
//! are listed, renamed and revoked by members with state power only; floods are limited; the
//! audit log records creation and revocation.

use matrix_sdk::config::SyncSettings;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::{
    common::{TestServer, assert_error},
    sdk::sdk_client,
};

fn hooks_path(room: &str) -> String {
    format!("/_plaza/client/v1/rooms/{room}/webhooks")
}

async fn create_hook(s: &TestServer, token: &str, room: &str, name: &str) -> Value {
    let (status, hook) = s.post(&hooks_path(room), Some(token), json!({ "name": name })).await;
    assert_eq!(status, StatusCode::OK, "{hook}");
    hook
}

/// POSTs `body` to the hook as a tool would: no token, raw bytes.
async fn post_raw(
    s: &TestServer,
    secret: &str,
    body: impl Into<reqwest::Body>,
) -> (StatusCode, Value) {
    let response = s
        .http
        .post(format!("{}/_plaza/hooks/{secret}", s.base))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

async fn post_hook(s: &TestServer, secret: &str, body: Value) -> (StatusCode, Value) {
    post_raw(s, secret, body.to_string()).await
}

#[tokio::test]
async fn a_webhook_post_reaches_a_matrix_sdk_client() {
    let s = TestServer::start().await;
    let alice = sdk_client(&s.base, "alice").await;
    let token = alice.access_token().unwrap();
    let room = s.create_room(&token, json!({ "name": "builds" })).await;
    let settings = || SyncSettings::default().timeout(std::time::Duration::from_millis(0));
    alice.sync_once(settings()).await.unwrap();

    let hook = create_hook(&s, &token, &room, "CI").await;
    let secret = hook["secret"].as_str().unwrap();
    assert!(secret.len() >= 40, "{hook}");
    assert!(hook["url"].as_str().unwrap().ends_with(&format!("/_plaza/hooks/{secret}")));
    let bot = hook["user_id"].as_str().unwrap().to_owned();
    assert!(bot.starts_with("@_webhook_"), "{bot}");
    let (_, members) =
        s.get(&format!("/_matrix/client/v3/rooms/{room}/joined_members"), Some(&token)).await;
    assert_eq!(members["joined"][&bot]["display_name"], "CI", "{members}");

    let (status, posted) = post_hook(
        &s,
        secret,
        json!({ "text": "Build 42 passed", "html": "<b>Build 42</b> passed", "msgtype": "m.notice" }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{posted}");
    assert!(posted["event_id"].as_str().unwrap().starts_with('$'));

    let update = alice.sync_once(settings()).await.unwrap();
    let room_id = matrix_sdk::ruma::RoomId::parse(&room).unwrap();
    let events = &update.rooms.joined[&room_id].timeline.events;
    let message = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e.raw().json().get()).ok())
        .find(|e| e["type"] == "m.room.message")
        .expect("the hook's message is in the sync");
    assert_eq!(message["sender"], bot.as_str());
    assert_eq!(message["event_id"], posted["event_id"]);
    assert_eq!(message["content"]["body"], "Build 42 passed");
    assert_eq!(message["content"]["msgtype"], "m.notice");
    assert_eq!(message["content"]["format"], "org.matrix.custom.html");
    assert_eq!(message["content"]["formatted_body"], "<b>Build 42</b> passed");

    // `username` and `avatar_url` become the bot's name and picture in the room.
    let (status, _) = post_hook(
        &s,
        secret,
        json!({ "text": "Ticket 7 opened", "username": "Helpdesk", "avatar_url": "mxc://localhost/abc" }),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (_, members) =
        s.get(&format!("/_matrix/client/v3/rooms/{room}/joined_members"), Some(&token)).await;
    assert_eq!(members["joined"][&bot]["display_name"], "Helpdesk", "{members}");
    assert_eq!(members["joined"][&bot]["avatar_url"], "mxc://localhost/abc", "{members}");
}

#[tokio::test]
async fn hooks_are_managed_by_members_with_power_and_audited() {
    let s = TestServer::start().await;
    let (alice_id, alice, _) = s.register("alice", "correct horse").await;
    let (_, bob, _) = s.register("bob", "correct horse").await;
    let (_, carol, _) = s.register("carol", "correct horse").await;
    s.set_role(&alice_id, "admin");
    let room = s.create_room(&alice, json!({ "preset": "public_chat" })).await;
    let (status, _) = s.membership(&bob, &room, "join", json!({})).await;
    assert_eq!(status, StatusCode::OK);

    // Bob is a member without the power to send state; Carol is not a member.
    let refused = s.post(&hooks_path(&room), Some(&bob), json!({ "name": "mine" })).await;
    assert_error(&refused, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let refused = s.post(&hooks_path(&room), Some(&carol), json!({ "name": "mine" })).await;
    assert_error(&refused, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let refused = s.get(&hooks_path(&room), Some(&bob)).await;
    assert_error(&refused, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let anonymous = s.post(&hooks_path(&room), None, json!({ "name": "x" })).await;
    assert_error(&anonymous, StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN");
    let nameless = s.post(&hooks_path(&room), Some(&alice), json!({})).await;
    assert_error(&nameless, StatusCode::BAD_REQUEST, "M_BAD_JSON");

    let ci = create_hook(&s, &alice, &room, "CI").await;
    let tickets = create_hook(&s, &alice, &room, "Tickets").await;
    let (status, list) = s.get(&hooks_path(&room), Some(&alice)).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let names: Vec<&str> =
        list["webhooks"].as_array().unwrap().iter().map(|h| h["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["CI", "Tickets"]);
    assert!(list.to_string().find(ci["secret"].as_str().unwrap()).is_none(), "never listed");

    let ci_id = ci["hook_id"].as_str().unwrap();
    let path = format!("{}/{ci_id}", hooks_path(&room));
    let (status, renamed) = s.put(&path, Some(&alice), json!({ "name": "Builds" })).await;
    assert_eq!(status, StatusCode::OK, "{renamed}");
    assert_eq!(renamed["name"], "Builds");
    let (_, members) =
        s.get(&format!("/_matrix/client/v3/rooms/{room}/joined_members"), Some(&alice)).await;
    assert_eq!(members["joined"][ci["user_id"].as_str().unwrap()]["display_name"], "Builds");
    let refused = s.put(&path, Some(&bob), json!({ "name": "Mine" })).await;
    assert_error(&refused, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let refused = s.call(Method::DELETE, &path, Some(&bob), None).await;
    assert_error(&refused, StatusCode::FORBIDDEN, "M_FORBIDDEN");

    // Revoked: the URL stops at once, the bot leaves.
    let secret = ci["secret"].as_str().unwrap();
    assert_eq!(post_hook(&s, secret, json!({ "text": "before" })).await.0, StatusCode::OK);
    let (status, _) = s.call(Method::DELETE, &path, Some(&alice), None).await;
    assert_eq!(status, StatusCode::OK);
    let gone = post_hook(&s, secret, json!({ "text": "after" })).await;
    assert_error(&gone, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let again = s.call(Method::DELETE, &path, Some(&alice), None).await;
    assert_error(&again, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let (_, members) =
        s.get(&format!("/_matrix/client/v3/rooms/{room}/joined_members"), Some(&alice)).await;
    assert!(members["joined"].get(ci["user_id"].as_str().unwrap()).is_none(), "{members}");
    let bot_path = format!("/_synapse/admin/v2/users/{}", ci["user_id"].as_str().unwrap());
    let (status, bot) = s.get(&bot_path, Some(&alice)).await;
    assert_eq!(status, StatusCode::OK, "{bot}");
    assert_eq!(bot["deactivated"], true, "{bot}");
    let (_, list) = s.get(&hooks_path(&room), Some(&alice)).await;
    assert_eq!(list["webhooks"].as_array().unwrap().len(), 1);

    // Creation and revocation are in the audit log.
    let (status, audit) = s.get("/_plaza/admin/v1/audit?action=webhook.create", Some(&alice)).await;
    assert_eq!(status, StatusCode::OK, "{audit}");
    assert_eq!(audit["records"].as_array().unwrap().len(), 2, "{audit}");
    let (_, audit) = s.get("/_plaza/admin/v1/audit?action=webhook.revoke", Some(&alice)).await;
    let records = audit["records"].as_array().unwrap();
    assert_eq!(records.len(), 1, "{audit}");
    assert_eq!(records[0]["actor"]["user_id"], alice_id.as_str());
    assert_eq!(records[0]["target"], ci["user_id"]);
    assert_eq!(records[0]["room_id"], room.as_str());

    // Hooks survive a restart.
    let s = s.restart().await;
    let tickets_secret = tickets["secret"].as_str().unwrap();
    let (status, _) = post_hook(&s, tickets_secret, json!({ "text": "after restart" })).await;
    assert_eq!(status, StatusCode::OK);

    // Alice leaves: she can no longer manage the hooks.
    let (status, _) = s.membership(&alice, &room, "leave", json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let tickets_path = format!("{}/{}", hooks_path(&room), tickets["hook_id"].as_str().unwrap());
    let refused = s.call(Method::DELETE, &tickets_path, Some(&alice), None).await;
    assert_error(&refused, StatusCode::FORBIDDEN, "M_FORBIDDEN");
}

#[tokio::test]
async fn webhook_posts_are_checked_and_rate_limited() {
    let s = TestServer::start_with(|c| {
        c.automation.webhook_rate = plaza::config::RateConfig { per_second: 0.01, burst: 2 };
        c.automation.webhook_max_body_bytes = 2_048;
    })
    .await;
    let (_, alice, _) = s.register("alice", "correct horse").await;
    let room = s.create_room(&alice, json!({})).await;
    let hook = create_hook(&s, &alice, &room, "CI").await;
    let secret = hook["secret"].as_str().unwrap();

    let unknown = post_hook(&s, "not-a-secret", json!({ "text": "x" })).await;
    assert_error(&unknown, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let huge = post_raw(&s, secret, json!({ "text": "x".repeat(4_000) }).to_string()).await;
    assert_error(&huge, StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE");
    let not_json = post_raw(&s, secret, "build passed").await;
    assert_error(&not_json, StatusCode::BAD_REQUEST, "M_NOT_JSON");
    let no_text = post_hook(&s, secret, json!({ "html": "<b>x</b>" })).await;
    assert_error(&no_text, StatusCode::BAD_REQUEST, "M_BAD_JSON");
    // The burst of two is spent by the two posts that reached the hook: the next is limited.
    let limited = post_hook(&s, secret, json!({ "text": "flood" })).await;
    assert_error(&limited, StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED");
    assert!(limited.1["retry_after_ms"].as_u64().unwrap() > 1_000, "{}", limited.1);

    // Another hook has its own budget; a bad msgtype is refused.
    let other = create_hook(&s, &alice, &room, "Tickets").await;
    let other = other["secret"].as_str().unwrap();
    let bad = post_hook(&s, other, json!({ "text": "x", "msgtype": "m.image" })).await;
    assert_error(&bad, StatusCode::BAD_REQUEST, "M_BAD_JSON");
    let (status, _) = post_hook(&s, other, json!({ "text": "ticket 1" })).await;
    assert_eq!(status, StatusCode::OK);
}
