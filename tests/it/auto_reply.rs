//! Out-of-office automatic replies: once per sender per day, in direct rooms and on mentions,
//! only within the set period, never to automatic replies, never in a loop.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::TestServer;

/// Sets `user`'s automatic reply.
async fn set_auto_reply(s: &TestServer, user: &str, token: &str, setting: Value) {
    let path = format!("/_matrix/client/v3/user/{user}/account_data/com.plaza.auto_reply");
    let (status, body) = s.put(&path, Some(token), setting).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// A direct room `from` creates with `to`, who joins.
async fn direct_room(s: &TestServer, from: &str, to_id: &str, to: &str) -> String {
    let room = s
        .create_room(
            from,
            json!({ "preset": "trusted_private_chat", "is_direct": true, "invite": [to_id] }),
        )
        .await;
    let (status, body) = s.membership(to, &room, "join", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    room
}

/// `(sender, body, marked as an automatic reply)` of the room's messages, oldest first.
async fn messages(s: &TestServer, token: &str, room: &str) -> Vec<(String, String, bool)> {
    let path = format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=50");
    let (status, body) = s.get(&path, Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut list: Vec<(String, String, bool)> = body["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .map(|e| {
            let content = &e["content"];
            (
                e["sender"].as_str().unwrap().to_owned(),
                content["body"].as_str().unwrap_or_default().to_owned(),
                content["com.plaza.auto_reply"] == true,
            )
        })
        .collect();
    list.reverse();
    list
}

/// Waits until every event sent so far has been looked at: automatic replies are handled in
/// order, so once a fresh sender's message to an always-away user is answered, all earlier
/// messages were handled too.
async fn settle(s: &TestServer, away: &(String, String), n: usize) {
    let (_, pinger, _) = s.register(&format!("pinger{n}"), "correct horse").await;
    let room = direct_room(s, &pinger, &away.0, &away.1).await;
    let (status, _) = s.send_text(&pinger, &room, "ping", "ping").await;
    assert_eq!(status, StatusCode::OK);
    for _ in 0..200 {
        if messages(s, &pinger, &room).await.iter().any(|m| m.2) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the always-away user never answered");
}

async fn away_user(s: &TestServer) -> (String, String) {
    let (id, token, _) = s.register("away", "correct horse").await;
    set_auto_reply(s, &id, &token, json!({ "enabled": true, "text": "always away" })).await;
    (id, token)
}

#[tokio::test]
async fn answers_once_per_sender_per_day_and_never_loops() {
    let s = TestServer::start().await;
    let away = away_user(&s).await;
    let (alice_id, alice, _) = s.register("alice", "correct horse").await;
    let (bob_id, bob, _) = s.register("bob", "correct horse").await;
    let room = direct_room(&s, &bob, &alice_id, &alice).await;
    set_auto_reply(
        &s,
        &alice_id,
        &alice,
        json!({ "enabled": true, "text": "Alice is on holiday" }),
    )
    .await;

    s.send_text(&bob, &room, "1", "hi alice").await;
    s.send_text(&bob, &room, "2", "are you there?").await;
    settle(&s, &away, 1).await;
    // The answer follows the first message; the second may land before or after it.
    let mut list = messages(&s, &bob, &room).await;
    list.sort();
    assert_eq!(
        list,
        [
            (alice_id.clone(), "Alice is on holiday".to_owned(), true),
            (bob_id.clone(), "are you there?".to_owned(), false),
            (bob_id.clone(), "hi alice".to_owned(), false),
        ]
    );

    // Both away: Bob's reply answers Alice's message once, and nobody answers a reply.
    set_auto_reply(&s, &bob_id, &bob, json!({ "enabled": true, "text": "Bob is away too" })).await;
    s.send_text(&alice, &room, "3", "back soon").await;
    settle(&s, &away, 2).await;
    let list = messages(&s, &bob, &room).await;
    assert_eq!(list.len(), 5, "{list:?}");
    assert_eq!(list[3], (alice_id.clone(), "back soon".to_owned(), false));
    assert_eq!(list[4], (bob_id.clone(), "Bob is away too".to_owned(), true));
    let answers = list.iter().filter(|m| m.2).count();
    assert_eq!(answers, 2, "nobody answers an automatic reply: {list:?}");
    s.send_text(&alice, &room, "4", "one more").await;
    settle(&s, &away, 3).await;
    assert_eq!(messages(&s, &bob, &room).await.len(), 6, "one answer per sender per day");
}

#[tokio::test]
async fn answers_mentions_only_within_the_period_and_never_replies() {
    let s = TestServer::start().await;
    let away = away_user(&s).await;
    let (alice_id, alice, _) = s.register("alice", "correct horse").await;
    let (bob_id, bob, _) = s.register("bob", "correct horse").await;
    let (carol_id, carol, _) = s.register("carol", "correct horse").await;
    let (dave_id, dave, _) = s.register("dave", "correct horse").await;
    let room = s.create_room(&alice, json!({ "preset": "public_chat" })).await;
    for token in [&bob, &carol, &dave] {
        assert_eq!(s.membership(token, &room, "join", json!({})).await.0, StatusCode::OK);
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let now = now.as_millis() as u64;
    set_auto_reply(
        &s,
        &alice_id,
        &alice,
        json!({ "enabled": true, "text": "Out", "until_ts": now + 3_600_000 }),
    )
    .await;
    // Carol's period is over; Bob's has not started.
    set_auto_reply(
        &s,
        &carol_id,
        &carol,
        json!({ "enabled": true, "text": "Carol out", "until_ts": now - 1 }),
    )
    .await;
    set_auto_reply(
        &s,
        &bob_id,
        &bob,
        json!({ "enabled": true, "text": "Bob out", "from_ts": now + 3_600_000 }),
    )
    .await;

    let server = &s;
    let send = |txn: &str, content: Value| {
        let path = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}");
        let token = dave.clone();
        async move { server.put(&path, Some(&token), content).await }
    };
    // Not a mention, in a room of five: nobody answers.
    send("1", json!({ "msgtype": "m.text", "body": "hello all" })).await;
    // A crafted automatic reply mentioning Alice: not answered.
    send("2", json!({ "msgtype": "m.text", "body": "auto", "com.plaza.auto_reply": true, "m.mentions": { "user_ids": [alice_id] } })).await;
    // A notice mentioning Alice: not answered.
    send(
        "3",
        json!({ "msgtype": "m.notice", "body": "bot", "m.mentions": { "user_ids": [alice_id] } }),
    )
    .await;
    // Mentions of Bob and Carol, outside their periods: not answered.
    send("4", json!({ "msgtype": "m.text", "body": "bob carol?", "m.mentions": { "user_ids": [bob_id, carol_id] } })).await;
    settle(&s, &away, 1).await;
    let list = messages(&s, &alice, &room).await;
    assert_eq!(list.len(), 4, "no answers yet: {list:?}");
    assert!(list.iter().all(|m| m.0 == dave_id), "no answers yet: {list:?}");

    // A real mention of Alice: answered once, as a reply to it.
    let (_, sent) = send(
        "5",
        json!({ "msgtype": "m.text", "body": "alice?", "m.mentions": { "user_ids": [alice_id] } }),
    )
    .await;
    settle(&s, &away, 2).await;
    let path = format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=1");
    let (_, last) = s.get(&path, Some(&alice)).await;
    let reply = &last["chunk"][0];
    assert_eq!(reply["sender"], alice_id.as_str());
    assert_eq!(reply["content"]["msgtype"], "m.notice");
    assert_eq!(reply["content"]["body"], "Out");
    assert_eq!(reply["content"]["com.plaza.auto_reply"], true);
    assert_eq!(reply["content"]["m.relates_to"]["m.in_reply_to"]["event_id"], sent["event_id"]);
    let answers = messages(&s, &alice, &room).await.into_iter().filter(|m| m.0 != dave_id).count();
    assert_eq!(answers, 1);
}
