//! Push rules over HTTP.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::common::{TestServer, assert_error};

#[tokio::test]
async fn push_rules_start_from_defaults_and_change() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "correct horse").await;
    let (status, rules) = s.get("/_matrix/client/v3/pushrules/", Some(&alice)).await;
    assert_eq!(status, StatusCode::OK, "{rules}");
    let overrides = rules["global"]["override"].as_array().unwrap();
    assert!(overrides.iter().any(|r| r["rule_id"] == ".m.rule.is_user_mention"), "{overrides:?}");
    let (_, initial) = s.get("/_matrix/client/v3/sync", Some(&alice)).await;
    let account_data = initial["account_data"]["events"].as_array().unwrap();
    assert!(
        account_data.iter().any(|e| e["type"] == "m.push_rules"),
        "clients read the rules from sync"
    );

    // A keyword rule placed before another, then disabled, given new actions, and removed.
    let base = "/_matrix/client/v3/pushrules/global/content";
    let put = s
        .put(
            &format!("{base}/deploy"),
            Some(&alice),
            json!({ "pattern": "deploy", "actions": ["notify"] }),
        )
        .await;
    assert_eq!(put.0, StatusCode::OK, "{}", put.1);
    let before = s
        .put(
            &format!("{base}/release?before=deploy"),
            Some(&alice),
            json!({ "pattern": "release", "actions": ["notify"] }),
        )
        .await;
    assert_eq!(before.0, StatusCode::OK, "{}", before.1);
    let (_, content) = s.get("/_matrix/client/v3/pushrules/global/", Some(&alice)).await;
    let ids: Vec<&str> = content["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["rule_id"].as_str().unwrap())
        .collect();
    let (release, deploy) = (
        ids.iter().position(|i| *i == "release").unwrap(),
        ids.iter().position(|i| *i == "deploy").unwrap(),
    );
    assert!(release < deploy, "{ids:?}");
    assert_eq!(
        s.put(&format!("{base}/deploy/enabled"), Some(&alice), json!({ "enabled": false })).await.0,
        StatusCode::OK
    );
    assert_eq!(s.get(&format!("{base}/deploy/enabled"), Some(&alice)).await.1["enabled"], false);
    let actions = json!({ "actions": ["notify", { "set_tweak": "highlight" }] });
    assert_eq!(
        s.put(&format!("{base}/deploy/actions"), Some(&alice), actions).await.0,
        StatusCode::OK
    );
    assert_eq!(
        s.get(&format!("{base}/deploy/actions"), Some(&alice)).await.1["actions"][1]["set_tweak"],
        "highlight"
    );
    assert_eq!(
        s.call(Method::DELETE, &format!("{base}/deploy"), Some(&alice), None).await.0,
        StatusCode::OK
    );
    assert_error(
        &s.get(&format!("{base}/deploy"), Some(&alice)).await,
        StatusCode::NOT_FOUND,
        "M_NOT_FOUND",
    );

    // Server-default rules cannot be replaced or removed, but can be switched off.
    let default = "/_matrix/client/v3/pushrules/global/override/.m.rule.suppress_notices";
    assert_eq!(
        s.call(Method::DELETE, default, Some(&alice), None).await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        s.put(&format!("{default}/enabled"), Some(&alice), json!({ "enabled": false })).await.0,
        StatusCode::OK
    );
    assert_eq!(s.get(&format!("{default}/enabled"), Some(&alice)).await.1["enabled"], false);
}

#[tokio::test]
async fn unread_counts_follow_push_rules_and_receipts() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "correct horse").await;
    let (bob_id, bob, _) = s.register("bob", "correct horse").await;
    let room = s.create_room(&alice, json!({ "name": "Team", "invite": [bob_id] })).await;
    s.membership(&bob, &room, "join", json!({})).await;
    s.send_text(&alice, &room, "m1", "good morning").await;
    s.send_text(&alice, &room, "m2", "standup in five").await;
    let mention = json!({ "msgtype": "m.text", "body": "bob: can you review?", "m.mentions": { "user_ids": [bob_id] } });
    let (_, sent) = s
        .put(
            &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/m3"),
            Some(&alice),
            mention,
        )
        .await;
    let last = sent["event_id"].as_str().unwrap().to_owned();

    let (_, synced) = s.get("/_matrix/client/v3/sync", Some(&bob)).await;
    let counts = &synced["rooms"]["join"][&room]["unread_notifications"];
    assert_eq!(counts["notification_count"], 3, "{counts}");
    assert_eq!(counts["highlight_count"], 1, "{counts}");
    let (_, alice_view) = s.get("/_matrix/client/v3/sync", Some(&alice)).await;
    assert_eq!(
        alice_view["rooms"]["join"][&room]["unread_notifications"]["notification_count"], 0,
        "own messages"
    );

    let token = synced["next_batch"].as_str().unwrap();
    let receipt =
        format!("/_matrix/client/v3/rooms/{room}/receipt/m.read/{}", crate::common::enc(&last));
    assert_eq!(s.post(&receipt, Some(&bob), json!({})).await.0, StatusCode::OK);
    let (_, after) = s.get(&format!("/_matrix/client/v3/sync?since={token}"), Some(&bob)).await;
    let counts = &after["rooms"]["join"][&room]["unread_notifications"];
    assert_eq!(counts["notification_count"], 0, "{after}");
    assert_eq!(counts["highlight_count"], 0);
}

#[tokio::test]
async fn room_mentions_need_the_notification_power_level() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "correct horse").await;
    let (bob_id, bob, _) = s.register("bob", "correct horse").await;
    let (carol_id, carol, _) = s.register("carol", "correct horse").await;
    let room =
        s.create_room(&alice, json!({ "name": "All hands", "invite": [bob_id, carol_id] })).await;
    s.membership(&bob, &room, "join", json!({})).await;
    s.membership(&carol, &room, "join", json!({})).await;
    let everyone =
        json!({ "msgtype": "m.text", "body": "@room heads up", "m.mentions": { "room": true } });
    // Bob (power 0) may not notify the whole room; alice (the creator) may.
    s.put(
        &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/b1"),
        Some(&bob),
        everyone.clone(),
    )
    .await;
    let (_, carol_sync) = s.get("/_matrix/client/v3/sync", Some(&carol)).await;
    assert_eq!(carol_sync["rooms"]["join"][&room]["unread_notifications"]["highlight_count"], 0);
    s.put(
        &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/a1"),
        Some(&alice),
        everyone,
    )
    .await;
    let (_, carol_sync) = s.get("/_matrix/client/v3/sync", Some(&carol)).await;
    assert_eq!(
        carol_sync["rooms"]["join"][&room]["unread_notifications"]["highlight_count"], 1,
        "{}",
        carol_sync["rooms"]["join"][&room]["unread_notifications"]
    );
    // The legacy rule: "@room" in the body of an event without `m.mentions`, same power check.
    s.send_text(&bob, &room, "b2", "@room lunch?").await;
    s.send_text(&alice, &room, "a2", "@room all hands at noon").await;
    let (_, carol_sync) = s.get("/_matrix/client/v3/sync", Some(&carol)).await;
    assert_eq!(
        carol_sync["rooms"]["join"][&room]["unread_notifications"]["highlight_count"], 2,
        "{}",
        carol_sync["rooms"]["join"][&room]["unread_notifications"]
    );
}
