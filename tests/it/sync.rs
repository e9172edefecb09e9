//! `/sync`, filters and `/messages` over HTTP, and with the matrix-sdk sync loop.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{TestServer, assert_error, enc};

async fn sync(s: &TestServer, token: &str, query: &str) -> Value {
    let (status, body) = s.get(&format!("/_matrix/client/v3/sync?{query}"), Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

/// Sends a text 300 ms from now, for a long-poll to wake on.
fn send_later(
    s: &std::sync::Arc<TestServer>,
    token: &str,
    room: &str,
    txn: &'static str,
    body: &'static str,
) -> tokio::task::JoinHandle<()> {
    let (s, token, room) = (s.clone(), token.to_owned(), room.to_owned());
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.send_text(&token, &room, txn, body).await;
    })
}

fn timeline_bodies(sync: &Value, room: &str) -> Vec<String> {
    sync["rooms"]["join"][room]["timeline"]["events"]
        .as_array()
        .map(|events| {
            events.iter().filter_map(|e| e["content"]["body"].as_str().map(str::to_owned)).collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn initial_and_incremental_sync_with_invites_joins_and_leaves() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "correct horse").await;
    let (bob_id, bob, _) = s.register("bob", "correct horse").await;
    let room = s.create_room(&alice, json!({ "name": "Team", "invite": [bob_id] })).await;

    let first = sync(&s, &bob, "").await;
    let invite = &first["rooms"]["invite"][&room]["invite_state"]["events"];
    let kinds: Vec<&str> =
        invite.as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert!(kinds.contains(&"m.room.name") && kinds.contains(&"m.room.member"), "{kinds:?}");
    let token = first["next_batch"].as_str().unwrap().to_owned();

    s.membership(&bob, &room, "join", json!({})).await;
    s.send_text(&alice, &room, "m1", "hello bob").await;
    let next = sync(&s, &bob, &format!("since={token}")).await;
    let joined = &next["rooms"]["join"][&room];
    assert_eq!(timeline_bodies(&next, &room), vec!["hello bob"]);
    // Newly joined: the full state comes with it.
    let state_kinds: Vec<&str> = joined["state"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert!(
        state_kinds.contains(&"m.room.create") && state_kinds.contains(&"m.room.name"),
        "{state_kinds:?}"
    );
    assert_eq!(joined["summary"]["m.joined_member_count"], 2);
    let token = next["next_batch"].as_str().unwrap().to_owned();

    // Nothing new: a zero-timeout sync returns at once with nothing in the room.
    let quiet = sync(&s, &bob, &format!("since={token}&timeout=0")).await;
    assert!(quiet["rooms"]["join"].as_object().unwrap().is_empty(), "{quiet}");

    // Members as of an older token.
    let (_, carol, _) = s.register("carol", "correct horse").await;
    s.membership(&alice, &room, "invite", json!({ "user_id": "@carol:localhost" })).await;
    s.membership(&carol, &room, "join", json!({})).await;
    let members = |at: String| {
        let (s, bob) = (&s, &bob);
        let room = room.clone();
        async move {
            let (_, body) = s
                .get(
                    &format!("/_matrix/client/v3/rooms/{room}/members?membership=join{at}"),
                    Some(bob),
                )
                .await;
            body["chunk"].as_array().unwrap().len()
        }
    };
    assert_eq!(members(String::new()).await, 3);
    assert_eq!(members(format!("&at={token}")).await, 2, "carol joined after the token");

    s.membership(&bob, &room, "leave", json!({})).await;
    let left = sync(&s, &bob, &format!("since={token}")).await;
    assert!(left["rooms"]["leave"].get(&room).is_some(), "{left}");
    assert!(left["rooms"]["join"].get(&room).is_none());

    let bad = s.get("/_matrix/client/v3/sync?since=garbage", Some(&bob)).await;
    assert_error(&bad, StatusCode::BAD_REQUEST, "M_UNKNOWN_POS");
    let future = s.get("/_matrix/client/v3/sync?since=s999999999", Some(&bob)).await;
    assert_error(&future, StatusCode::BAD_REQUEST, "M_UNKNOWN_POS");
}

#[tokio::test]
async fn long_poll_wakes_when_a_message_arrives() {
    let s = std::sync::Arc::new(TestServer::start().await);
    let (_, alice, _) = s.register("alice", "correct horse").await;
    let (bob_id, bob, _) = s.register("bob", "correct horse").await;
    let room = s.create_room(&alice, json!({ "invite": [bob_id] })).await;
    s.membership(&bob, &room, "join", json!({})).await;
    let token = sync(&s, &bob, "").await["next_batch"].as_str().unwrap().to_owned();

    let sender = send_later(&s, &alice, &room, "late", "wake up");
    let started = Instant::now();
    let woke = sync(&s, &bob, &format!("since={token}&timeout=20000")).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the long-poll returned on the event, not the timeout"
    );
    assert!(started.elapsed() >= Duration::from_millis(250), "it waited for the event");
    assert_eq!(timeline_bodies(&woke, &room), vec!["wake up"]);
    sender.await.unwrap();

    // A timeout with nothing new returns the same rooms empty after the wait.
    let token = woke["next_batch"].as_str().unwrap();
    let started = Instant::now();
    let idle = sync(&s, &bob, &format!("since={token}&timeout=300")).await;
    assert!(started.elapsed() >= Duration::from_millis(280));
    assert!(idle["rooms"]["join"].as_object().unwrap().is_empty());
}

#[tokio::test]
async fn gappy_sync_and_back_pagination_return_exactly_the_gap() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "correct horse").await;
    let (bob_id, bob, _) = s.register("bob", "correct horse").await;
    let room = s.create_room(&alice, json!({ "name": "Before", "invite": [bob_id] })).await;
    s.membership(&bob, &room, "join", json!({})).await;
    let token = sync(&s, &bob, "").await["next_batch"].as_str().unwrap().to_owned();

    // Bob is away: a name change inside a burst of 100 messages.
    for i in 0..100 {
        if i == 20 {
            s.put(
                &format!("/_matrix/client/v3/rooms/{room}/state/m.room.name/"),
                Some(&alice),
                json!({ "name": "After" }),
            )
            .await;
        }
        s.send_text(&alice, &room, &format!("g{i}"), &format!("msg {i}")).await;
    }
    let filter = enc(r#"{"room":{"timeline":{"limit":10}}}"#);
    let gappy = sync(&s, &bob, &format!("since={token}&filter={filter}")).await;
    let joined = &gappy["rooms"]["join"][&room];
    assert_eq!(joined["timeline"]["limited"], true);
    let bodies = timeline_bodies(&gappy, &room);
    assert_eq!(bodies, (90..100).map(|i| format!("msg {i}")).collect::<Vec<_>>());
    let state = joined["state"]["events"].as_array().unwrap();
    let name = state
        .iter()
        .find(|e| e["type"] == "m.room.name")
        .expect("the name change in the gap is in state");
    assert_eq!(name["content"]["name"], "After");
    assert!(!state.iter().any(|e| e["type"] == "m.room.create"), "unchanged state is not resent");

    // Paging back from prev_batch to the old token yields exactly the 91 missing events.
    let prev = joined["timeline"]["prev_batch"].as_str().unwrap();
    let (status, page) = s
        .get(
            &format!(
                "/_matrix/client/v3/rooms/{room}/messages?dir=b&from={prev}&to={token}&limit=1000"
            ),
            Some(&bob),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let chunk = page["chunk"].as_array().unwrap();
    assert_eq!(chunk.len(), 91);
    assert_eq!(chunk[0]["content"]["body"], "msg 89");
    assert_eq!(chunk[70]["content"]["name"], "After");
    assert_eq!(chunk[90]["content"]["body"], "msg 0");
    assert!(page.get("end").is_none(), "reached the `to` token");
}

#[tokio::test]
async fn messages_pages_both_ways() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "correct horse").await;
    let room = s.create_room(&alice, json!({})).await;
    for i in 0..250 {
        s.send_text(&alice, &room, &format!("p{i}"), &format!("m{i}")).await;
    }
    let filter = enc(r#"{"types":["m.room.message"]}"#);
    let mut from = String::new();
    let mut seen = Vec::new();
    loop {
        let from_param = if from.is_empty() { String::new() } else { format!("&from={from}") };
        let (status, page) = s
            .get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=100&filter={filter}{from_param}"), Some(&alice))
            .await;
        assert_eq!(status, StatusCode::OK, "{page}");
        seen.extend(
            page["chunk"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["content"]["body"].as_str().unwrap().to_owned()),
        );
        match page["end"].as_str() {
            Some(end) => from = end.to_owned(),
            None => break,
        }
    }
    assert_eq!(seen, (0..250).rev().map(|i| format!("m{i}")).collect::<Vec<_>>());

    let (_, forward) = s
        .get(
            &format!("/_matrix/client/v3/rooms/{room}/messages?dir=f&limit=5&filter={filter}"),
            Some(&alice),
        )
        .await;
    let bodies: Vec<&str> = forward["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["content"]["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, ["m0", "m1", "m2", "m3", "m4"]);
    let end = forward["end"].as_str().unwrap();
    let (_, next) = s
        .get(
            &format!(
                "/_matrix/client/v3/rooms/{room}/messages?dir=f&limit=2&filter={filter}&from={end}"
            ),
            Some(&alice),
        )
        .await;
    assert_eq!(next["chunk"][0]["content"]["body"], "m5");

    let (_, bob, _) = s.register("bob", "correct horse").await;
    let denied =
        s.get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b"), Some(&bob)).await;
    assert_error(&denied, StatusCode::FORBIDDEN, "M_FORBIDDEN");
}

#[tokio::test]
async fn filters_lazy_members_ignored_users_and_restart() {
    let s = TestServer::start().await;
    let (alice_id, alice, _) = s.register("alice", "correct horse").await;
    let (bob_id, bob, _) = s.register("bob", "correct horse").await;
    let (carol_id, carol, _) = s.register("carol", "correct horse").await;
    // Named, so no heroes: their member events would come along.
    let room = s.create_room(&alice, json!({ "preset": "public_chat", "name": "Lazy" })).await;
    for token in [&bob, &carol] {
        s.membership(token, &room, "join", json!({})).await;
    }
    s.send_text(&carol, &room, "c", "from carol").await;

    let (status, created) = s
        .post(&format!("/_matrix/client/v3/user/{bob_id}/filter"), Some(&bob), json!({ "room": { "state": { "lazy_load_members": true }, "timeline": { "limit": 1 } } }))
        .await;
    assert_eq!(status, StatusCode::OK, "{created}");
    let filter_id = created["filter_id"].as_str().unwrap();
    let (_, stored) =
        s.get(&format!("/_matrix/client/v3/user/{bob_id}/filter/{filter_id}"), Some(&bob)).await;
    assert_eq!(stored["room"]["state"]["lazy_load_members"], true);
    assert_error(
        &s.get(&format!("/_matrix/client/v3/user/{bob_id}/filter/999"), Some(&bob)).await,
        StatusCode::NOT_FOUND,
        "M_NOT_FOUND",
    );

    let lazy = sync(&s, &bob, &format!("filter={filter_id}")).await;
    let members: Vec<&str> = lazy["rooms"]["join"][&room]["state"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.member")
        .map(|e| e["state_key"].as_str().unwrap())
        .collect();
    assert!(
        members.contains(&carol_id.as_str()) && members.contains(&bob_id.as_str()),
        "{members:?}"
    );
    assert!(
        !members.contains(&alice_id.as_str()),
        "alice sent nothing in the timeline: {members:?}"
    );

    // Ignoring alice hides her messages.
    let ignore = format!("/_matrix/client/v3/user/{bob_id}/account_data/m.ignored_user_list");
    assert_eq!(
        s.put(&ignore, Some(&bob), json!({ "ignored_users": { alice_id.as_str(): {} } })).await.0,
        StatusCode::OK
    );
    let token = lazy["next_batch"].as_str().unwrap().to_owned();
    s.send_text(&alice, &room, "a", "ignored words").await;
    s.send_text(&carol, &room, "c2", "carol again").await;
    let next = sync(&s, &bob, &format!("since={token}")).await;
    assert_eq!(timeline_bodies(&next, &room), vec!["carol again"]);
    assert_eq!(next["account_data"]["events"][0]["type"], "m.ignored_user_list");
    let token = next["next_batch"].as_str().unwrap().to_owned();

    // Restart: resuming from the old token loses and duplicates nothing.
    s.send_text(&carol, &room, "c3", "before restart").await;
    let s = s.restart().await;
    s.send_text(&carol, &room, "c4", "after restart").await;
    let resumed = sync(&s, &bob, &format!("since={token}")).await;
    assert_eq!(timeline_bodies(&resumed, &room), vec!["before restart", "after restart"]);
}

/// The rooms an incremental sync names, sorted.
fn joined_rooms(sync: &Value) -> Vec<String> {
    let mut rooms: Vec<String> =
        sync["rooms"]["join"].as_object().unwrap().keys().cloned().collect();
    rooms.sort();
    rooms
}

fn ephemeral_types(sync: &Value, room: &str) -> Vec<String> {
    sync["rooms"]["join"][room]["ephemeral"]["events"]
        .as_array()
        .map(|events| events.iter().map(|e| e["type"].as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn incremental_syncs_name_exactly_the_rooms_that_changed_across_restarts() {
    let s = std::sync::Arc::new(TestServer::start().await);
    let (_, alice, _) = s.register("alice", "correct horse").await;
    let (bob_id, bob, _) = s.register("bob", "correct horse").await;
    let mut rooms = Vec::new();
    for _ in 0..3 {
        let room = s.create_room(&alice, json!({ "invite": [bob_id] })).await;
        s.membership(&bob, &room, "join", json!({})).await;
        rooms.push(room);
    }
    let (a, b, c) = (&rooms[0], &rooms[1], &rooms[2]);
    let (_, old) = s.send_text(&alice, a, "old", "before the token").await;
    let old = old["event_id"].as_str().unwrap().to_owned();
    let next = |body: &Value| body["next_batch"].as_str().unwrap().to_owned();
    let since = next(&sync(&s, &bob, "").await);

    // Room account data only: that room alone, with its tag.
    let tag = format!("/_matrix/client/v3/user/{}/rooms/{b}/tags/u.work", enc(&bob_id));
    assert_eq!(s.put(&tag, Some(&bob), json!({ "order": 0.5 })).await.0, StatusCode::OK);
    let body = sync(&s, &bob, &format!("since={since}&timeout=0")).await;
    assert_eq!(joined_rooms(&body), vec![b.clone()], "{body}");
    assert_eq!(body["rooms"]["join"][b]["account_data"]["events"][0]["type"], "m.tag");
    let since = next(&body);

    // Typing only.
    let typing = format!("/_matrix/client/v3/rooms/{c}/typing/{}", enc("@alice:localhost"));
    let started = json!({ "typing": true, "timeout": 30000 });
    assert_eq!(s.put(&typing, Some(&alice), started).await.0, StatusCode::OK);
    let body = sync(&s, &bob, &format!("since={since}&timeout=0")).await;
    assert_eq!(joined_rooms(&body), vec![c.clone()], "{body}");
    assert_eq!(ephemeral_types(&body, c), vec!["m.typing"]);
    let since = next(&body);

    // A receipt on an event from before the token: the room comes with it, and no timeline.
    let receipt = format!("/_matrix/client/v3/rooms/{a}/receipt/m.read/{}", enc(&old));
    assert_eq!(s.post(&receipt, Some(&alice), json!({})).await.0, StatusCode::OK);
    let body = sync(&s, &bob, &format!("since={since}&timeout=0")).await;
    assert_eq!(joined_rooms(&body), vec![a.clone()], "{body}");
    assert_eq!(ephemeral_types(&body, a), vec!["m.receipt"]);
    assert!(timeline_bodies(&body, a).is_empty());
    let since = next(&body);

    // Caught up: the long-poll waits, then wakes for a message in one room.
    let sender = send_later(&s, &alice, c, "live", "still there?");
    let waited = Instant::now();
    let body = sync(&s, &bob, &format!("since={since}&timeout=20000")).await;
    let waited = waited.elapsed();
    assert!(waited >= Duration::from_millis(250) && waited < Duration::from_secs(5), "{waited:?}");
    assert_eq!(joined_rooms(&body), vec![c.clone()], "{body}");
    assert_eq!(timeline_bodies(&body, c), vec!["still there?"]);
    sender.await.unwrap();
    let since = next(&body);

    // After a restart the old token still works, and only the room with news is named.
    let s = std::sync::Arc::into_inner(s).unwrap().restart().await;
    s.send_text(&alice, b, "after", "after the restart").await;
    let body = sync(&s, &bob, &format!("since={since}&timeout=0")).await;
    assert_eq!(joined_rooms(&body), vec![b.clone()], "{body}");
    assert_eq!(timeline_bodies(&body, b), vec!["after the restart"]);
    let since = next(&body);
    let quiet = sync(&s, &bob, &format!("since={since}&timeout=0")).await;
    assert!(joined_rooms(&quiet).is_empty(), "{quiet}");
}
