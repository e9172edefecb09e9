//! Receipts, read markers, typing, tags, `/context` and the user directory over HTTP.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{TestServer, assert_error, enc};

async fn sync(s: &TestServer, token: &str, query: &str) -> Value {
    let (status, body) = s.get(&format!("/_matrix/client/v3/sync?{query}"), Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

fn ephemeral<'a>(sync: &'a Value, room: &str, kind: &str) -> Option<&'a Value> {
    sync["rooms"]["join"][room]["ephemeral"]["events"]
        .as_array()?
        .iter()
        .find(|e| e["type"] == kind)
}

#[tokio::test]
async fn receipts_typing_and_read_markers_reach_sync() {
    let s = TestServer::start().await;
    let (alice_id, alice, _) = s.register("alice", "correct horse").await;
    let (bob_id, bob, _) = s.register("bob", "correct horse").await;
    let room = s.create_room(&alice, json!({ "invite": [bob_id] })).await;
    s.membership(&bob, &room, "join", json!({})).await;
    let (_, sent) = s.send_text(&alice, &room, "m", "read me").await;
    let event = sent["event_id"].as_str().unwrap();
    let token = sync(&s, &bob, "").await["next_batch"].as_str().unwrap().to_owned();

    // Alice reads (public) and bob sees it; bob's private receipt stays his own.
    let receipt = format!("/_matrix/client/v3/rooms/{room}/receipt/m.read/{}", enc(event));
    assert_eq!(
        s.post(&receipt, Some(&alice), json!({ "thread_id": "main" })).await.0,
        StatusCode::OK
    );
    let private = format!("/_matrix/client/v3/rooms/{room}/receipt/m.read.private/{}", enc(event));
    assert_eq!(s.post(&private, Some(&bob), json!({})).await.0, StatusCode::OK);
    let typing = format!("/_matrix/client/v3/rooms/{room}/typing/{alice_id}");
    assert_eq!(
        s.put(&typing, Some(&alice), json!({ "typing": true, "timeout": 30000 })).await.0,
        StatusCode::OK
    );

    let next = sync(&s, &bob, &format!("since={token}")).await;
    let receipts = ephemeral(&next, &room, "m.receipt").expect("receipt in sync");
    assert_eq!(receipts["content"][event]["m.read"][&alice_id]["thread_id"], "main");
    assert!(receipts["content"][event]["m.read.private"][&bob_id]["ts"].is_u64());
    let typers = ephemeral(&next, &room, "m.typing").expect("typing in sync");
    assert_eq!(typers["content"]["user_ids"], json!([alice_id]));
    let alice_view = sync(&s, &alice, &format!("since={token}")).await;
    let alice_receipts = ephemeral(&alice_view, &room, "m.receipt").unwrap();
    assert!(
        alice_receipts["content"][event].get("m.read.private").is_none(),
        "private receipts stay private"
    );

    // Stopping typing is a change too; an unchanged typing list is not resent.
    let token = next["next_batch"].as_str().unwrap().to_owned();
    assert_eq!(s.put(&typing, Some(&alice), json!({ "typing": false })).await.0, StatusCode::OK);
    let stopped = sync(&s, &bob, &format!("since={token}&timeout=0")).await;
    assert_eq!(ephemeral(&stopped, &room, "m.typing").unwrap()["content"]["user_ids"], json!([]));
    let token = stopped["next_batch"].as_str().unwrap().to_owned();
    let quiet = sync(&s, &bob, &format!("since={token}&timeout=0")).await;
    assert!(quiet["rooms"]["join"].get(&room).is_none(), "{quiet}");

    // A typing notification lapses on its own and wakes the room.
    assert_eq!(
        s.put(&typing, Some(&alice), json!({ "typing": true, "timeout": 200 })).await.0,
        StatusCode::OK
    );
    let started = sync(&s, &bob, &format!("since={token}&timeout=0")).await;
    let token = started["next_batch"].as_str().unwrap().to_owned();
    let lapsed = sync(&s, &bob, &format!("since={token}&timeout=5000")).await;
    assert_eq!(ephemeral(&lapsed, &room, "m.typing").unwrap()["content"]["user_ids"], json!([]));

    // Read markers: fully read lands in room account data.
    let markers = format!("/_matrix/client/v3/rooms/{room}/read_markers");
    assert_eq!(
        s.post(&markers, Some(&bob), json!({ "m.fully_read": event, "m.read": event })).await.0,
        StatusCode::OK
    );
    let (_, fully_read) = s
        .get(
            &format!("/_matrix/client/v3/user/{bob_id}/rooms/{room}/account_data/m.fully_read"),
            Some(&bob),
        )
        .await;
    assert_eq!(fully_read["event_id"], event);

    // Outsiders cannot send receipts or typing.
    let (carol_id, carol, _) = s.register("carol", "correct horse").await;
    assert_error(
        &s.post(&receipt, Some(&carol), json!({})).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    let carol_typing = format!("/_matrix/client/v3/rooms/{room}/typing/{carol_id}");
    assert_error(
        &s.put(&carol_typing, Some(&carol), json!({ "typing": true, "timeout": 1000 })).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    assert_error(
        &s.put(&typing, Some(&carol), json!({ "typing": true, "timeout": 1000 })).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
}

#[tokio::test]
async fn tags_round_trip_and_appear_in_sync() {
    let s = TestServer::start().await;
    let (alice_id, alice, _) = s.register("alice", "correct horse").await;
    let room = s.create_room(&alice, json!({})).await;
    let base = format!("/_matrix/client/v3/user/{alice_id}/rooms/{room}/tags");
    assert_eq!(
        s.put(&format!("{base}/m.favourite"), Some(&alice), json!({ "order": 0.5 })).await.0,
        StatusCode::OK
    );
    assert_eq!(
        s.put(&format!("{base}/u.projects"), Some(&alice), json!({})).await.0,
        StatusCode::OK
    );
    let (_, tags) = s.get(&base, Some(&alice)).await;
    assert_eq!(tags["tags"]["m.favourite"]["order"], 0.5);
    assert!(tags["tags"].get("u.projects").is_some());
    assert_eq!(
        s.call(reqwest::Method::DELETE, &format!("{base}/u.projects"), Some(&alice), None).await.0,
        StatusCode::OK
    );
    let (_, tags) = s.get(&base, Some(&alice)).await;
    assert!(tags["tags"].get("u.projects").is_none());
    let synced = sync(&s, &alice, "").await;
    let data = synced["rooms"]["join"][&room]["account_data"]["events"].as_array().unwrap();
    assert!(
        data.iter()
            .any(|e| e["type"] == "m.tag" && e["content"]["tags"]["m.favourite"].is_object()),
        "{data:?}"
    );
    let (_, bob, _) = s.register("bob", "correct horse").await;
    assert_error(&s.get(&base, Some(&bob)).await, StatusCode::FORBIDDEN, "M_FORBIDDEN");
}

#[tokio::test]
async fn context_returns_the_event_with_its_neighbours() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "correct horse").await;
    let room = s.create_room(&alice, json!({ "name": "Ctx" })).await;
    let mut ids = Vec::new();
    for i in 0..9 {
        let (_, sent) = s.send_text(&alice, &room, &format!("x{i}"), &format!("n{i}")).await;
        ids.push(sent["event_id"].as_str().unwrap().to_owned());
    }
    let (status, ctx) = s
        .get(
            &format!("/_matrix/client/v3/rooms/{room}/context/{}?limit=4", enc(&ids[4])),
            Some(&alice),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{ctx}");
    assert_eq!(ctx["event"]["content"]["body"], "n4");
    let before: Vec<&str> = ctx["events_before"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["content"]["body"].as_str().unwrap())
        .collect();
    let after: Vec<&str> = ctx["events_after"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["content"]["body"].as_str().unwrap())
        .collect();
    assert_eq!(before, ["n3", "n2"]);
    assert_eq!(after, ["n5", "n6"]);
    assert!(ctx["state"].as_array().unwrap().iter().any(|e| e["type"] == "m.room.name"));
    let end = ctx["end"].as_str().unwrap();
    let (_, more) = s
        .get(
            &format!("/_matrix/client/v3/rooms/{room}/messages?dir=f&from={end}&limit=1"),
            Some(&alice),
        )
        .await;
    assert_eq!(more["chunk"][0]["content"]["body"], "n7");
    let (_, bob, _) = s.register("bob", "correct horse").await;
    let hidden = s
        .get(&format!("/_matrix/client/v3/rooms/{room}/context/{}", enc(&ids[4])), Some(&bob))
        .await;
    assert_error(&hidden, StatusCode::NOT_FOUND, "M_NOT_FOUND");
}

#[tokio::test]
async fn user_directory_scopes() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "correct horse").await;
    let (bob_id, _bob, _) = s.register("bob", "correct horse").await;
    let (_, _carol, _) = s.register("carol", "correct horse").await;
    let search = |term: &str| json!({ "search_term": term, "limit": 10 });
    let (_, found) =
        s.post("/_matrix/client/v3/user_directory/search", Some(&alice), search("bo")).await;
    assert_eq!(found["results"], json!([]), "bob shares no room with alice yet");
    s.create_room(&alice, json!({ "invite": [bob_id] })).await;
    let room = s.create_room(&alice, json!({})).await;
    let _ = room;
    let (_, found) =
        s.post("/_matrix/client/v3/user_directory/search", Some(&alice), search("ali")).await;
    assert_eq!(found["results"][0]["user_id"], "@alice:localhost");
    assert_eq!(found["results"][0]["display_name"], "alice");

    let all = TestServer::start_with(|c| c.user_directory.search_all_users = true).await;
    let (_, dave, _) = all.register("dave", "correct horse").await;
    for name in ["erin", "eric", "edna"] {
        all.register(name, "correct horse").await;
    }
    let (status, found) = all
        .post(
            "/_matrix/client/v3/user_directory/search",
            Some(&dave),
            json!({ "search_term": "er", "limit": 1 }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{found}");
    assert_eq!(found["results"].as_array().unwrap().len(), 1);
    assert_eq!(found["limited"], true);
}

#[tokio::test]
async fn presence_is_shared_with_room_mates_only() {
    let s = TestServer::start().await;
    let (alice_id, alice, _) = s.register("alice", "correct horse").await;
    let (bob_id, bob, _) = s.register("bob", "correct horse").await;
    let (_, carol, _) = s.register("carol", "correct horse").await;
    let room = s.create_room(&alice, json!({ "invite": [bob_id] })).await;
    s.membership(&bob, &room, "join", json!({})).await;
    let token =
        sync(&s, &bob, "set_presence=offline").await["next_batch"].as_str().unwrap().to_owned();

    let path = format!("/_matrix/client/v3/presence/{alice_id}/status");
    let set = s
        .put(&path, Some(&alice), json!({ "presence": "online", "status_msg": "In a meeting" }))
        .await;
    assert_eq!(set.0, StatusCode::OK, "{}", set.1);
    let (status, seen) = s.get(&path, Some(&bob)).await;
    assert_eq!(status, StatusCode::OK, "{seen}");
    assert_eq!(seen["presence"], "online");
    assert_eq!(seen["status_msg"], "In a meeting");
    assert_eq!(seen["currently_active"], true);
    assert_error(&s.get(&path, Some(&carol)).await, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    assert_error(
        &s.put(&path, Some(&bob), json!({ "presence": "offline" })).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );

    let next = sync(&s, &bob, &format!("since={token}&set_presence=offline")).await;
    let events = next["presence"]["events"].as_array().unwrap();
    let alice_presence = events
        .iter()
        .find(|e| e["sender"] == alice_id.as_str())
        .expect("alice's presence in bob's sync");
    assert_eq!(alice_presence["content"]["status_msg"], "In a meeting");

    let off = TestServer::start_with(|c| c.presence.enabled = false).await;
    let (dave_id, dave, _) = off.register("dave", "correct horse").await;
    let dave_path = format!("/_matrix/client/v3/presence/{dave_id}/status");
    assert_eq!(
        off.put(&dave_path, Some(&dave), json!({ "presence": "online" })).await.0,
        StatusCode::OK
    );
    assert_error(&off.get(&dave_path, Some(&dave)).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");
}
