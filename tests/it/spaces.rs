//! Knocking, reports, upgrades, spaces, summaries and timestamp lookups over HTTP.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{TestServer, assert_error, enc};

#[tokio::test]
async fn knock_then_invite_lets_a_member_in() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "correct horse").await;
    let (bob_id, bob, _) = s.register("bob", "correct horse").await;
    let room = s
        .create_room(&alice, json!({ "initial_state": [{ "type": "m.room.join_rules", "state_key": "", "content": { "join_rule": "knock" } }] }))
        .await;
    assert_error(
        &s.membership(&bob, &room, "join", json!({})).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    let (status, body) = s
        .post(
            &format!("/_matrix/client/v3/knock/{room}"),
            Some(&bob),
            json!({ "reason": "let me in" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let member = s
        .get(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.member/{bob_id}"), Some(&alice))
        .await;
    assert_eq!(member.1["membership"], "knock");
    assert_eq!(member.1["reason"], "let me in");
    assert_eq!(
        s.membership(&alice, &room, "invite", json!({ "user_id": bob_id })).await.0,
        StatusCode::OK
    );
    assert_eq!(s.membership(&bob, &room, "join", json!({})).await.0, StatusCode::OK);

    // Knocking on an invite-only room is refused by the auth rules.
    let closed = s.create_room(&alice, json!({})).await;
    let (_, carol, _) = s.register("carol", "correct horse").await;
    assert_error(
        &s.post(&format!("/_matrix/client/v3/knock/{closed}"), Some(&carol), json!({})).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
}

#[tokio::test]
async fn reports_are_stored_for_admins() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "correct horse").await;
    let (_, bob, _) = s.register("bob", "correct horse").await;
    let room = s.create_room(&alice, json!({ "preset": "public_chat" })).await;
    s.membership(&bob, &room, "join", json!({})).await;
    let (_, sent) = s.send_text(&alice, &room, "t", "offensive").await;
    let event = sent["event_id"].as_str().unwrap();
    let path = format!("/_matrix/client/v3/rooms/{room}/report/{}", enc(event));
    assert_eq!(s.post(&path, Some(&bob), json!({ "reason": "rude" })).await.0, StatusCode::OK);
    assert_eq!(
        s.post(
            &format!("/_matrix/client/v3/rooms/{room}/report"),
            Some(&bob),
            json!({ "reason": "spam room" })
        )
        .await
        .0,
        StatusCode::OK
    );
    let (_, carol, _) = s.register("carol", "correct horse").await;
    let private = s.create_room(&alice, json!({})).await;
    let (_, hidden) = s.send_text(&alice, &private, "p", "secret").await;
    let hidden_path = format!(
        "/_matrix/client/v3/rooms/{private}/report/{}",
        enc(hidden["event_id"].as_str().unwrap())
    );
    assert_error(
        &s.post(&hidden_path, Some(&carol), json!({})).await,
        StatusCode::NOT_FOUND,
        "M_NOT_FOUND",
    );

    let reports = s.server().services().reports.list(0, 10).unwrap();
    assert_eq!(reports.len(), 2);
    assert_eq!(reports[0].1.event_id.as_ref().unwrap().as_str(), event);
    assert_eq!(reports[0].1.reason.as_deref(), Some("rude"));
    assert_eq!(reports[1].1.event_id, None);
    assert!(reports[1].1.received_ms > 0);
}

#[tokio::test]
async fn upgrade_carries_state_moves_aliases_and_tombstones() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "correct horse").await;
    let (bob_id, bob, _) = s.register("bob", "correct horse").await;
    let old = s
        .create_room(&alice, json!({ "preset": "public_chat", "room_version": "10", "name": "Ops", "topic": "Pager duty", "room_alias_name": "ops" }))
        .await;
    s.membership(&bob, &old, "join", json!({})).await;
    let denied = s
        .post(
            &format!("/_matrix/client/v3/rooms/{old}/upgrade"),
            Some(&bob),
            json!({ "new_version": "12" }),
        )
        .await;
    assert_error(&denied, StatusCode::FORBIDDEN, "M_FORBIDDEN");

    let (status, body) = s
        .post(
            &format!("/_matrix/client/v3/rooms/{old}/upgrade"),
            Some(&alice),
            json!({ "new_version": "12" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let new = body["replacement_room"].as_str().unwrap();
    let s = &s;
    let alice = &alice;
    let state = |room: &str, kind: &str| {
        let path = format!("/_matrix/client/v3/rooms/{room}/state/{kind}/");
        async move { s.get(&path, Some(alice)).await.1 }
    };
    assert_eq!(state(new, "m.room.name").await["name"], "Ops");
    assert_eq!(state(new, "m.room.topic").await["topic"], "Pager duty");
    assert_eq!(state(new, "m.room.join_rules").await["join_rule"], "public");
    assert_eq!(state(new, "m.room.create").await["predecessor"]["room_id"], old.as_str());
    assert_eq!(state(new, "m.room.create").await["room_version"], "12");
    assert_eq!(state(old.as_str(), "m.room.tombstone").await["replacement_room"], new);
    assert_eq!(state(new, "m.room.canonical_alias").await["alias"], "#ops:localhost");
    let (_, alias) =
        s.get(&format!("/_matrix/client/v3/directory/room/{}", enc("#ops:localhost")), None).await;
    assert_eq!(alias["room_id"], new);

    // The old room is quiet for ordinary members; they can follow to the new one.
    assert_error(
        &s.send_text(&bob, &old, "late", "hello?").await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    assert_eq!(s.membership(&bob, new, "join", json!({})).await.0, StatusCode::OK);
    let power = state(new, "m.room.power_levels").await;
    assert!(
        power["users"].get("@alice:localhost").is_none(),
        "v12 creators are not listed: {power}"
    );
    let _ = bob_id;
}

#[tokio::test]
async fn space_hierarchy_and_room_summary() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "correct horse").await;
    let (_, bob, _) = s.register("bob", "correct horse").await;
    let space = s
        .create_room(&alice, json!({ "preset": "public_chat", "name": "Acme", "creation_content": { "type": "m.space" } }))
        .await;
    let general =
        s.create_room(&alice, json!({ "preset": "public_chat", "name": "General" })).await;
    let staff = s
        .create_room(&alice, json!({ "name": "Staff only", "initial_state": [{ "type": "m.room.join_rules", "state_key": "",
            "content": { "join_rule": "restricted", "allow": [{ "type": "m.room_membership", "room_id": space }] } }] }))
        .await;
    let hidden = s.create_room(&alice, json!({ "name": "Board" })).await;
    for (child, suggested) in [(&general, true), (&staff, false), (&hidden, false)] {
        let path = format!("/_matrix/client/v3/rooms/{space}/state/m.space.child/{child}");
        let (status, body) = s
            .put(&path, Some(&alice), json!({ "via": ["localhost"], "suggested": suggested }))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    // Bob is not in the space yet: he sees public rooms, not the restricted or invite-only ones.
    let (status, tree) =
        s.get(&format!("/_matrix/client/v1/rooms/{space}/hierarchy"), Some(&bob)).await;
    assert_eq!(status, StatusCode::OK, "{tree}");
    let ids = |tree: &Value| {
        tree["rooms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["room_id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&tree), vec![space.clone(), general.clone()]);
    assert_eq!(tree["rooms"][0]["room_type"], "m.space");
    assert_eq!(tree["rooms"][0]["children_state"].as_array().unwrap().len(), 3);

    // Once in the space, the restricted room shows and he can join it through his membership.
    s.membership(&bob, &space, "join", json!({})).await;
    let (_, tree) = s.get(&format!("/_matrix/client/v1/rooms/{space}/hierarchy"), Some(&bob)).await;
    let found = ids(&tree);
    assert_eq!(found.len(), 3);
    assert!(found.contains(&staff) && !found.contains(&hidden), "{found:?}");
    let (status, body) = s.membership(&bob, &staff, "join", json!({})).await;
    assert_eq!(status, StatusCode::OK, "restricted join through the space: {body}");

    let (_, suggested) = s
        .get(&format!("/_matrix/client/v1/rooms/{space}/hierarchy?suggested_only=true"), Some(&bob))
        .await;
    assert_eq!(ids(&suggested), vec![space.clone(), general.clone()]);
    let (_, page) =
        s.get(&format!("/_matrix/client/v1/rooms/{space}/hierarchy?limit=1"), Some(&bob)).await;
    assert_eq!(ids(&page), vec![found[0].clone()]);
    let next = page["next_batch"].as_str().unwrap();
    let (_, page2) = s
        .get(&format!("/_matrix/client/v1/rooms/{space}/hierarchy?limit=1&from={next}"), Some(&bob))
        .await;
    assert_eq!(ids(&page2), vec![found[1].clone()]);

    let (status, summary) =
        s.get(&format!("/_matrix/client/v1/room_summary/{general}"), Some(&bob)).await;
    assert_eq!(status, StatusCode::OK, "{summary}");
    assert_eq!(summary["name"], "General");
    assert_eq!(summary["num_joined_members"], 1);
    let (status, _) = s.get(&format!("/_matrix/client/v1/room_summary/{hidden}"), Some(&bob)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn timestamp_to_event_finds_the_nearest_visible_event() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "correct horse").await;
    let room = s.create_room(&alice, json!({})).await;
    let (_, first) = s.send_text(&alice, &room, "1", "first").await;
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    let middle_ts =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    let (_, second) = s.send_text(&alice, &room, "2", "second").await;
    let path = |dir: &str| {
        format!("/_matrix/client/v1/rooms/{room}/timestamp_to_event?ts={middle_ts}&dir={dir}")
    };
    let (status, forward) = s.get(&path("f"), Some(&alice)).await;
    assert_eq!(status, StatusCode::OK, "{forward}");
    assert_eq!(forward["event_id"], second["event_id"]);
    let (_, backward) = s.get(&path("b"), Some(&alice)).await;
    assert_eq!(backward["event_id"], first["event_id"]);
    let future =
        format!("/_matrix/client/v1/rooms/{room}/timestamp_to_event?ts=99999999999999&dir=f");
    assert_error(&s.get(&future, Some(&alice)).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");
}

#[tokio::test]
async fn an_additional_creator_of_a_v12_room_may_upgrade_it() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "correct horse").await;
    let (bob_id, bob, _) = s.register("bob", "correct horse").await;
    let (_, carol, _) = s.register("carol", "correct horse").await;
    let room = s
        .create_room(
            &alice,
            json!({ "preset": "public_chat", "room_version": "12",
            "creation_content": { "additional_creators": [bob_id] } }),
        )
        .await;
    s.membership(&bob, &room, "join", json!({})).await;
    s.membership(&carol, &room, "join", json!({})).await;
    let path = format!("/_matrix/client/v3/rooms/{room}/upgrade");
    // Carol is an ordinary member; bob is listed nowhere in the power levels.
    let denied = s.post(&path, Some(&carol), json!({ "new_version": "12" })).await;
    assert_error(&denied, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let (status, body) = s.post(&path, Some(&bob), json!({ "new_version": "12" })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}
