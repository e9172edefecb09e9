//! Rooms over HTTP: creation, membership, state, messages, redactions and their auth rules.

use std::collections::HashSet;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{TestServer, assert_error, enc};

fn event_id(result: &(StatusCode, Value)) -> String {
    assert_eq!(result.0, StatusCode::OK, "{}", result.1);
    result.1["event_id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn create_room_with_preset_name_topic_and_invite() {
    let s = TestServer::start().await;
    let (alice, alice_token, _) = s.register("alice", "correct horse").await;
    let (bob, bob_token, _) = s.register("bob", "correct horse").await;
    let room = s
        .create_room(&alice_token, json!({ "name": "Engineering", "topic": "Build things", "invite": [bob], "is_direct": true,
            "initial_state": [{ "type": "m.room.encryption", "state_key": "", "content": { "algorithm": "m.megolm.v1.aes-sha2" } }] }))
        .await;

    let (status, state) =
        s.get(&format!("/_matrix/client/v3/rooms/{room}/state"), Some(&alice_token)).await;
    assert_eq!(status, StatusCode::OK);
    let kinds: HashSet<&str> =
        state.as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    for kind in [
        "m.room.create",
        "m.room.member",
        "m.room.power_levels",
        "m.room.join_rules",
        "m.room.history_visibility",
        "m.room.name",
        "m.room.topic",
        "m.room.encryption",
    ] {
        assert!(kinds.contains(kind), "{kind} missing from {kinds:?}");
    }
    let create = state.as_array().unwrap().iter().find(|e| e["type"] == "m.room.create").unwrap();
    assert_eq!(create["content"]["room_version"], "12");
    // Room version 12: the room id is derived from the create event's id.
    assert_eq!(&room[1..], &create["event_id"].as_str().unwrap()[1..]);

    let name = s
        .get(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.name"), Some(&alice_token))
        .await;
    assert_eq!(name.1, json!({ "name": "Engineering" }));
    let join_rules = s
        .get(
            &format!("/_matrix/client/v3/rooms/{room}/state/m.room.join_rules/"),
            Some(&alice_token),
        )
        .await;
    assert_eq!(join_rules.1["join_rule"], "invite");
    let full = s
        .get(
            &format!("/_matrix/client/v3/rooms/{room}/state/m.room.topic?format=event"),
            Some(&alice_token),
        )
        .await;
    assert_eq!(full.1["content"]["topic"], "Build things");
    assert_eq!(full.1["sender"], alice.as_str());

    let member = s
        .get(
            &format!("/_matrix/client/v3/rooms/{room}/state/m.room.member/{bob}"),
            Some(&alice_token),
        )
        .await;
    assert_eq!(member.1["membership"], "invite", "{member:?}");
    assert_eq!(member.1["is_direct"], true);
    assert_eq!(s.membership(&bob_token, &room, "join", json!({})).await.0, StatusCode::OK);

    let (_, joined) = s.get("/_matrix/client/v3/joined_rooms", Some(&bob_token)).await;
    assert_eq!(joined["joined_rooms"], json!([room]));
    let (_, members) =
        s.get(&format!("/_matrix/client/v3/rooms/{room}/joined_members"), Some(&bob_token)).await;
    assert_eq!(members["joined"][&alice]["display_name"], "alice");
    assert!(members["joined"].get(&bob).is_some(), "{members}");
    let (_, all) = s
        .get(
            &format!("/_matrix/client/v3/rooms/{room}/members?membership=join"),
            Some(&alice_token),
        )
        .await;
    assert_eq!(all["chunk"].as_array().unwrap().len(), 2);
    let (_, none) = s
        .get(
            &format!("/_matrix/client/v3/rooms/{room}/members?not_membership=join"),
            Some(&alice_token),
        )
        .await;
    assert_eq!(none["chunk"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn membership_flow_and_forbidden_actions_change_nothing() {
    let s = TestServer::start().await;
    let (_, alice_token, _) = s.register("alice", "correct horse").await;
    let (bob, bob_token, _) = s.register("bob", "correct horse").await;
    let room =
        s.create_room(&alice_token, json!({ "preset": "private_chat", "name": "Secret" })).await;

    // Invite-only: bob cannot join uninvited, send, or read state.
    assert_error(
        &s.membership(&bob_token, &room, "join", json!({})).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    assert_error(
        &s.send_text(&bob_token, &room, "t1", "hi").await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    assert_error(
        &s.get(&format!("/_matrix/client/v3/rooms/{room}/state"), Some(&bob_token)).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );

    assert_eq!(
        s.membership(&alice_token, &room, "invite", json!({ "user_id": bob, "reason": "welcome" }))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(s.membership(&bob_token, &room, "join", json!({})).await.0, StatusCode::OK);
    event_id(&s.send_text(&bob_token, &room, "t2", "hello").await);

    // Bob (power 0) may not rename the room or kick alice.
    let rename = s
        .put(
            &format!("/_matrix/client/v3/rooms/{room}/state/m.room.name/"),
            Some(&bob_token),
            json!({ "name": "Mine" }),
        )
        .await;
    assert_error(&rename, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let kick_alice =
        s.membership(&bob_token, &room, "kick", json!({ "user_id": "@alice:localhost" })).await;
    assert_error(&kick_alice, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let name = s
        .get(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.name/"), Some(&alice_token))
        .await;
    assert_eq!(name.1["name"], "Secret", "a refused change changes nothing");

    // Kick, then bob cannot come back uninvited; ban, unban.
    assert_eq!(
        s.membership(&alice_token, &room, "kick", json!({ "user_id": bob, "reason": "bye" }))
            .await
            .0,
        StatusCode::OK
    );
    let member = s
        .get(
            &format!("/_matrix/client/v3/rooms/{room}/state/m.room.member/{bob}"),
            Some(&alice_token),
        )
        .await;
    assert_eq!(member.1, json!({ "membership": "leave", "reason": "bye" }));
    assert_error(
        &s.membership(&bob_token, &room, "join", json!({})).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    // A former member still reads the state as it was when they left.
    let (status, _) =
        s.get(&format!("/_matrix/client/v3/rooms/{room}/state"), Some(&bob_token)).await;
    assert_eq!(status, StatusCode::OK);

    assert_eq!(
        s.membership(&alice_token, &room, "ban", json!({ "user_id": bob })).await.0,
        StatusCode::OK
    );
    assert_error(
        &s.membership(&alice_token, &room, "invite", json!({ "user_id": bob })).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    assert_eq!(
        s.membership(&alice_token, &room, "unban", json!({ "user_id": bob })).await.0,
        StatusCode::OK
    );
    assert_eq!(
        s.membership(&alice_token, &room, "invite", json!({ "user_id": bob })).await.0,
        StatusCode::OK
    );
    assert_eq!(
        s.membership(&bob_token, &room, "leave", json!({ "reason": "not now" })).await.0,
        StatusCode::OK
    );
    assert_eq!(s.membership(&bob_token, &room, "forget", json!({})).await.0, StatusCode::OK);
    let (_, joined) = s.get("/_matrix/client/v3/joined_rooms", Some(&bob_token)).await;
    assert_eq!(joined["joined_rooms"], json!([]));
}

#[tokio::test]
async fn public_rooms_can_be_joined_and_power_levels_govern_redaction() {
    let s = TestServer::start().await;
    let (_, alice_token, _) = s.register("alice", "correct horse").await;
    let (_, bob_token, _) = s.register("bob", "correct horse").await;
    let (_, carol_token, _) = s.register("carol", "correct horse").await;
    let room = s.create_room(&alice_token, json!({ "preset": "public_chat" })).await;
    for token in [&bob_token, &carol_token] {
        assert_eq!(
            s.post(&format!("/_matrix/client/v3/join/{room}"), Some(token), json!({})).await.0,
            StatusCode::OK
        );
    }
    let bobs = event_id(&s.send_text(&bob_token, &room, "b1", "bob's words").await);

    // Carol (power 0) may not redact bob's event; bob may redact his own; alice (100) anyone's.
    let path = |token: &str, event: &str, txn: &str| {
        (format!("/_matrix/client/v3/rooms/{room}/redact/{}/{txn}", enc(event)), token.to_owned())
    };
    let (p, t) = path(&carol_token, &bobs, "r1");
    assert_error(
        &s.put(&p, Some(&t), json!({ "reason": "no" })).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    let (p, t) = path(&bob_token, &bobs, "r2");
    let redaction = event_id(&s.put(&p, Some(&t), json!({ "reason": "typo" })).await);
    let (_, redacted) = s
        .get(&format!("/_matrix/client/v3/rooms/{room}/event/{}", enc(&bobs)), Some(&carol_token))
        .await;
    assert_eq!(redacted["content"], json!({}), "{redacted}");
    assert_eq!(redacted["unsigned"]["redacted_because"]["event_id"], redaction.as_str());

    let carols = event_id(&s.send_text(&carol_token, &room, "c1", "carol's words").await);
    let (p, t) = path(&alice_token, &carols, "r3");
    event_id(&s.put(&p, Some(&t), json!({})).await);
    let (_, redacted) = s
        .get(&format!("/_matrix/client/v3/rooms/{room}/event/{}", enc(&carols)), Some(&bob_token))
        .await;
    assert_eq!(redacted["content"], json!({}));
}

#[tokio::test]
async fn every_room_version_creates_joins_sends_and_redacts() {
    let s = TestServer::start().await;
    let (_, alice_token, _) = s.register("alice", "correct horse").await;
    let (_, bob_token, _) = s.register("bob", "correct horse").await;
    for version in 2..=12 {
        let room = s
            .create_room(
                &alice_token,
                json!({ "preset": "public_chat", "room_version": version.to_string() }),
            )
            .await;
        assert_eq!(
            s.membership(&bob_token, &room, "join", json!({})).await.0,
            StatusCode::OK,
            "v{version}"
        );
        let event =
            event_id(&s.send_text(&bob_token, &room, &format!("m{version}"), "hello").await);
        if version >= 4 {
            assert!(!event.contains(':'), "v{version} event ids are hashes: {event}");
        } else if version <= 2 {
            assert!(event.ends_with(":localhost"), "v{version}: {event}");
        }
        let redact = format!("/_matrix/client/v3/rooms/{room}/redact/{}/r{version}", enc(&event));
        event_id(&s.put(&redact, Some(&alice_token), json!({ "reason": "test" })).await);
        let (status, redacted) = s
            .get(
                &format!("/_matrix/client/v3/rooms/{room}/event/{}", enc(&event)),
                Some(&bob_token),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "v{version}: {redacted}");
        assert_eq!(redacted["content"], json!({}), "v{version}");
        let (_, create) = s
            .get(
                &format!("/_matrix/client/v3/rooms/{room}/state/m.room.create/?format=event"),
                Some(&bob_token),
            )
            .await;
        assert_eq!(create["content"]["room_version"], version.to_string());
        if version == 12 {
            assert_eq!(&room[1..], &create["event_id"].as_str().unwrap()[1..]);
        } else {
            assert!(room.ends_with(":localhost"));
        }
    }
    let unsupported = s
        .post("/_matrix/client/v3/createRoom", Some(&alice_token), json!({ "room_version": "99" }))
        .await;
    assert_error(&unsupported, StatusCode::BAD_REQUEST, "M_UNSUPPORTED_ROOM_VERSION");
}

#[tokio::test]
async fn history_visibility_hides_what_it_must() {
    let s = TestServer::start().await;
    let (_, alice_token, _) = s.register("alice", "correct horse").await;
    let (_, bob_token, _) = s.register("bob", "correct horse").await;
    let room = s
        .create_room(&alice_token, json!({ "preset": "public_chat", "initial_state": [
            { "type": "m.room.history_visibility", "state_key": "", "content": { "history_visibility": "joined" } }] }))
        .await;
    let before = event_id(&s.send_text(&alice_token, &room, "a1", "before bob").await);
    // Not a member: nothing is visible.
    assert_error(
        &s.get(
            &format!("/_matrix/client/v3/rooms/{room}/event/{}", enc(&before)),
            Some(&bob_token),
        )
        .await,
        StatusCode::NOT_FOUND,
        "M_NOT_FOUND",
    );
    s.membership(&bob_token, &room, "join", json!({})).await;
    // Joined later: history from before the join stays hidden under `joined`.
    assert_error(
        &s.get(
            &format!("/_matrix/client/v3/rooms/{room}/event/{}", enc(&before)),
            Some(&bob_token),
        )
        .await,
        StatusCode::NOT_FOUND,
        "M_NOT_FOUND",
    );
    let after = event_id(&s.send_text(&alice_token, &room, "a2", "after bob").await);
    assert_eq!(
        s.get(&format!("/_matrix/client/v3/rooms/{room}/event/{}", enc(&after)), Some(&bob_token))
            .await
            .0,
        StatusCode::OK
    );

    // Under `shared`, current members see everything.
    let shared = s
        .put(
            &format!("/_matrix/client/v3/rooms/{room}/state/m.room.history_visibility/"),
            Some(&alice_token),
            json!({ "history_visibility": "shared" }),
        )
        .await;
    event_id(&shared);
    let later = event_id(&s.send_text(&alice_token, &room, "a3", "shared now").await);
    let (_, carol_token, _) = s.register("carol", "correct horse").await;
    s.membership(&carol_token, &room, "join", json!({})).await;
    assert_eq!(
        s.get(
            &format!("/_matrix/client/v3/rooms/{room}/event/{}", enc(&later)),
            Some(&carol_token)
        )
        .await
        .0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn bad_input_gets_matrix_errors() {
    let s = TestServer::start_with(|c| c.limits.max_request_bytes = 256 * 1024).await;
    let (_, token, _) = s.register("alice", "correct horse").await;
    let room = s.create_room(&token, json!({})).await;
    let big = json!({ "msgtype": "m.text", "body": "x".repeat(70_000) });
    let too_large = s
        .put(&format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/big"), Some(&token), big)
        .await;
    assert_error(&too_large, StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE");
    let not_object = s
        .put(
            &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/arr"),
            Some(&token),
            json!([1]),
        )
        .await;
    assert_error(&not_object, StatusCode::BAD_REQUEST, "M_BAD_JSON");
    let bad_id = s
        .put("/_matrix/client/v3/rooms/not-a-room/send/m.room.message/x", Some(&token), json!({}))
        .await;
    assert_error(&bad_id, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    let unknown = s.send_text(&token, "!nope:localhost", "u", "hi").await;
    assert_error(&unknown, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let unknown_state = s.get("/_matrix/client/v3/rooms/!nope:localhost/state", Some(&token)).await;
    assert_error(&unknown_state, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let bad_power = s
        .put(
            &format!("/_matrix/client/v3/rooms/{room}/state/m.room.power_levels/"),
            Some(&token),
            json!({ "users": { "@alice:localhost": "lots" } }),
        )
        .await;
    assert_eq!(bad_power.0, StatusCode::FORBIDDEN, "{}", bad_power.1);
}

#[tokio::test]
async fn transaction_ids_are_idempotent_across_restart() {
    let s = TestServer::start().await;
    let (_, token, _) = s.register("alice", "correct horse").await;
    let room = s.create_room(&token, json!({})).await;
    let first = event_id(&s.send_text(&token, &room, "same-txn", "once").await);
    let again = event_id(&s.send_text(&token, &room, "same-txn", "once").await);
    assert_eq!(first, again);
    let (_, event) = s
        .get(&format!("/_matrix/client/v3/rooms/{room}/event/{}", enc(&first)), Some(&token))
        .await;
    assert_eq!(event["unsigned"]["transaction_id"], "same-txn");

    let s = s.restart().await;
    let again = s.send_text(&token, &room, "same-txn", "once").await;
    assert_eq!(again.1["event_id"], first.as_str());

    // The same id in another room is another request: a new event there.
    let other = s.create_room(&token, json!({})).await;
    let elsewhere = event_id(&s.send_text(&token, &other, "same-txn", "once").await);
    assert_ne!(elsewhere, first);
    let (status, event) = s
        .get(&format!("/_matrix/client/v3/rooms/{other}/event/{}", enc(&elsewhere)), Some(&token))
        .await;
    assert_eq!(status, StatusCode::OK, "{event}");
    assert_eq!(event["room_id"], other.as_str());
}

#[tokio::test]
async fn concurrent_senders_keep_the_dag_linear() {
    let s = std::sync::Arc::new(TestServer::start().await);
    let (_, token, _) = s.register("alice", "correct horse").await;
    let room = s.create_room(&token, json!({ "preset": "public_chat" })).await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let (s, token, room) = (s.clone(), token.clone(), room.clone());
        tasks.push(tokio::spawn(async move {
            event_id(&s.send_text(&token, &room, &format!("c{i}"), "hi").await)
        }));
    }
    let mut ids = HashSet::new();
    for task in tasks {
        ids.insert(task.await.unwrap());
    }
    assert_eq!(ids.len(), 50, "every event stored once");

    let rooms = &s.server().services().rooms;
    let mut prevs = HashSet::new();
    for id in &ids {
        let event_id: matrix_sdk::ruma::OwnedEventId = id.as_str().try_into().unwrap();
        let stored = rooms.stored(&event_id).unwrap().unwrap();
        let prev = stored.wire.get("prev_events").unwrap().as_array().unwrap();
        assert_eq!(prev.len(), 1, "a linear DAG has one parent per event");
        assert!(
            prevs.insert(prev[0].as_str().unwrap().to_owned()),
            "two events share a parent: the DAG forked"
        );
    }
}

#[tokio::test]
async fn state_at_an_old_event_survives_many_later_changes() {
    let s = TestServer::start().await;
    let (_, token, _) = s.register("alice", "correct horse").await;
    let room = s.create_room(&token, json!({ "topic": "original" })).await;
    let old = event_id(&s.send_text(&token, &room, "old", "marker").await);
    let path = format!("/_matrix/client/v3/rooms/{room}/state/m.room.topic/");
    for i in 0..1500 {
        let (status, body) =
            s.put(&path, Some(&token), json!({ "topic": format!("topic {i}") })).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let rooms = &s.server().services().rooms;
    let old: matrix_sdk::ruma::OwnedEventId = old.as_str().try_into().unwrap();
    let stored = rooms.stored(&old).unwrap().unwrap();
    let state = rooms.states.load(stored.state_before).unwrap();
    let topic = rooms.state_content(&state, "m.room.topic", "").unwrap().unwrap();
    assert_eq!(topic["topic"], "original");
    let current = s.get(&path, Some(&token)).await;
    assert_eq!(current.1["topic"], "topic 1499");
}

#[tokio::test]
async fn a_redacted_room_name_stops_naming_the_room_in_sync() {
    let s = TestServer::start().await;
    let (_, alice_token, _) = s.register("alice", "correct horse").await;
    let (bob, _, _) = s.register("bob", "correct horse").await;
    let room = s.create_room(&alice_token, json!({ "name": "Planning", "invite": [bob] })).await;
    let summary = |body: &Value| body["rooms"]["join"][&room]["summary"].clone();
    let (status, body) = s.get("/_matrix/client/v3/sync", Some(&alice_token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(summary(&body).get("m.heroes").is_none(), "named room: {body}");

    let (_, name) = s
        .get(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.name/"), Some(&alice_token))
        .await;
    assert_eq!(name["name"], "Planning");
    let (_, state) =
        s.get(&format!("/_matrix/client/v3/rooms/{room}/state"), Some(&alice_token)).await;
    let name_event = state.as_array().unwrap().iter().find(|e| e["type"] == "m.room.name").unwrap();
    let path = format!(
        "/_matrix/client/v3/rooms/{room}/redact/{}/r1",
        enc(name_event["event_id"].as_str().unwrap())
    );
    event_id(&s.put(&path, Some(&alice_token), json!({})).await);

    // The name read (and kept in memory) before the redaction is not served after it.
    let (_, body) = s.get("/_matrix/client/v3/sync", Some(&alice_token)).await;
    assert_eq!(summary(&body)["m.heroes"], json!([bob]), "{body}");
}
