//! Events as clients expect them: redactions with their `redacts` and whole
//! `redacted_because`, the heroes' member events with lazy loading, the `knock` section of
//! `/sync`, OpenID tokens, and the empty answers of `/thirdparty/protocols` and
//! `/voip/turnServer`.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{TestServer, assert_error, enc};

fn sent_id(result: &(StatusCode, Value)) -> String {
    assert_eq!(result.0, StatusCode::OK, "{}", result.1);
    result.1["event_id"].as_str().unwrap().to_owned()
}

/// Finds the event `id` in a list of client events.
fn find<'a>(events: &'a Value, id: &str) -> &'a Value {
    events
        .as_array()
        .and_then(|events| events.iter().find(|e| e["event_id"] == id))
        .unwrap_or_else(|| panic!("{id} not in {events}"))
}

/// Asserts `event` is the redacted form of `target`, redacted by `redaction` for `reason`.
#[track_caller]
fn assert_redacted(event: &Value, redaction: &str, target: &str, reason: &str) {
    assert_eq!(event["content"], json!({}), "{event}");
    let because = &event["unsigned"]["redacted_because"];
    assert_eq!(because["event_id"], redaction, "{event}");
    assert_eq!(because["type"], "m.room.redaction", "{event}");
    assert_eq!(because["content"]["reason"], reason, "{event}");
    assert_eq!(because["redacts"], target, "{event}");
    assert!(because["sender"].is_string() && because["origin_server_ts"].is_u64(), "{event}");
}

/// Asserts `event` is the redaction of `target`, with `redacts` at the top level in every room
/// version and in `content` since version 11.
#[track_caller]
fn assert_redaction(event: &Value, target: &str, version: &str) {
    assert_eq!(event["type"], "m.room.redaction", "{event}");
    assert_eq!(event["redacts"], target, "v{version}: {event}");
    // Room versions 1 to 10 may carry it in `content` too; 11 and later must.
    if version != "10" {
        assert_eq!(event["content"]["redacts"], target, "v{version}: {event}");
    }
}

#[tokio::test]
async fn redactions_carry_redacts_at_the_top_level_and_apply_everywhere() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "correct horse").await;
    for version in ["10", "11", "12"] {
        let room = s.create_room(&alice, json!({ "room_version": version })).await;
        let (_, before) = s.get("/_matrix/client/v3/sync?timeout=0", Some(&alice)).await;
        let since = before["next_batch"].as_str().unwrap().to_owned();
        let target = sent_id(&s.send_text(&alice, &room, &format!("m{version}"), "oops").await);
        let path = format!("/_matrix/client/v3/rooms/{room}/redact/{}/r{version}", enc(&target));
        let redaction = sent_id(&s.put(&path, Some(&alice), json!({ "reason": "typo" })).await);

        // `/event`: the redaction and the redacted event.
        let event = |id: &str| format!("/_matrix/client/v3/rooms/{room}/event/{}", enc(id));
        let (status, served) = s.get(&event(&redaction), Some(&alice)).await;
        assert_eq!(status, StatusCode::OK, "{served}");
        assert_redaction(&served, &target, version);
        let (_, redacted) = s.get(&event(&target), Some(&alice)).await;
        assert_redacted(&redacted, &redaction, &target, "typo");

        // `/sync`, incremental from before the message.
        let (_, sync) =
            s.get(&format!("/_matrix/client/v3/sync?timeout=0&since={since}"), Some(&alice)).await;
        let timeline = &sync["rooms"]["join"][&room]["timeline"]["events"];
        assert_redaction(find(timeline, &redaction), &target, version);
        assert_redacted(find(timeline, &target), &redaction, &target, "typo");

        // `/messages`, newest first.
        let (_, messages) =
            s.get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b"), Some(&alice)).await;
        assert_redaction(find(&messages["chunk"], &redaction), &target, version);
        assert_redacted(find(&messages["chunk"], &target), &redaction, &target, "typo");

        // `/context` around the redacted event and around the redaction.
        let context = |id: &str| format!("/_matrix/client/v3/rooms/{room}/context/{}", enc(id));
        let (status, around) = s.get(&context(&target), Some(&alice)).await;
        assert_eq!(status, StatusCode::OK, "{around}");
        assert_redacted(&around["event"], &redaction, &target, "typo");
        assert_redaction(find(&around["events_after"], &redaction), &target, version);

        // Redacting the redaction: the redacted event shows it without its reason.
        let path =
            format!("/_matrix/client/v3/rooms/{room}/redact/{}/rr{version}", enc(&redaction));
        sent_id(&s.put(&path, Some(&alice), json!({})).await);
        let (_, redacted) = s.get(&event(&target), Some(&alice)).await;
        let because = &redacted["unsigned"]["redacted_because"];
        assert_eq!(because["event_id"], redaction.as_str(), "{redacted}");
        assert!(because["content"].get("reason").is_none(), "{redacted}");
        assert_eq!(because["redacts"], target.as_str(), "{redacted}");
    }
}

#[tokio::test]
async fn redacted_reactions_and_edits_leave_relations_and_sync_says_which() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "correct horse").await;
    let room = s.create_room(&alice, json!({})).await;
    let original = sent_id(&s.send_text(&alice, &room, "o", "hello").await);
    let send = |kind: &'static str, txn: &'static str, content: Value| {
        let path = format!("/_matrix/client/v3/rooms/{room}/send/{kind}/{txn}");
        let alice = alice.clone();
        let s = &s;
        async move { sent_id(&s.put(&path, Some(&alice), content).await) }
    };
    let reaction = send(
        "m.reaction",
        "react",
        json!({ "m.relates_to": { "rel_type": "m.annotation", "event_id": original, "key": "👍" } }),
    )
    .await;
    let edit = send(
        "m.room.message",
        "edit",
        json!({
            "msgtype": "m.text", "body": "* hello there",
            "m.new_content": { "msgtype": "m.text", "body": "hello there" },
            "m.relates_to": { "rel_type": "m.replace", "event_id": original },
        }),
    )
    .await;
    let relations = format!("/_matrix/client/v1/rooms/{room}/relations/{}", enc(&original));
    let (_, listed) = s.get(&relations, Some(&alice)).await;
    assert_eq!(listed["chunk"].as_array().unwrap().len(), 2, "{listed}");
    let (_, before) = s.get("/_matrix/client/v3/sync?timeout=0", Some(&alice)).await;
    let since = before["next_batch"].as_str().unwrap().to_owned();

    let mut redactions = Vec::new();
    for (target, txn) in [(&reaction, "r1"), (&edit, "r2")] {
        let path = format!("/_matrix/client/v3/rooms/{room}/redact/{}/{txn}", enc(target));
        redactions.push(sent_id(&s.put(&path, Some(&alice), json!({ "reason": "undo" })).await));
    }

    // A client following live sees which events the redactions remove.
    let (_, sync) =
        s.get(&format!("/_matrix/client/v3/sync?timeout=0&since={since}"), Some(&alice)).await;
    let timeline = &sync["rooms"]["join"][&room]["timeline"]["events"];
    assert_redaction(find(timeline, &redactions[0]), &reaction, "12");
    assert_redaction(find(timeline, &redactions[1]), &edit, "12");

    let (_, listed) = s.get(&relations, Some(&alice)).await;
    assert_eq!(listed["chunk"], json!([]), "{listed}");
    let (_, served) = s
        .get(&format!("/_matrix/client/v3/rooms/{room}/event/{}", enc(&original)), Some(&alice))
        .await;
    assert_eq!(served["content"]["body"], "hello", "{served}");
    assert!(served["unsigned"]["m.relations"].get("m.replace").is_none(), "{served}");
    let (_, redacted) = s
        .get(&format!("/_matrix/client/v3/rooms/{room}/event/{}", enc(&reaction)), Some(&alice))
        .await;
    assert_redacted(&redacted, &redactions[0], &reaction, "undo");
}

#[tokio::test]
async fn lazy_loaded_sync_carries_the_heroes_member_events() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "correct horse").await;
    let (bob_id, bob, _) = s.register("bob", "correct horse").await;
    let (carol_id, carol, _) = s.register("carol", "correct horse").await;
    let room = s.create_room(&alice, json!({ "preset": "public_chat" })).await;
    for token in [&bob, &carol] {
        assert_eq!(s.membership(token, &room, "join", json!({})).await.0, StatusCode::OK);
    }
    // Only alice writes; the joins fall out of a one-event timeline.
    sent_id(&s.send_text(&alice, &room, "t1", "anyone?").await);
    let filter =
        json!({ "room": { "state": { "lazy_load_members": true }, "timeline": { "limit": 1 } } });
    let path = format!("/_matrix/client/v3/sync?timeout=0&filter={}", enc(&filter.to_string()));
    let (status, body) = s.get(&path, Some(&alice)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let joined = &body["rooms"]["join"][&room];
    let mut heroes: Vec<&str> = joined["summary"]["m.heroes"]
        .as_array()
        .unwrap_or_else(|| panic!("{joined}"))
        .iter()
        .filter_map(Value::as_str)
        .collect();
    heroes.sort_unstable();
    assert_eq!(heroes, [bob_id.as_str(), carol_id.as_str()], "{joined}");
    let members: Vec<&str> = joined["state"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.member")
        .filter_map(|e| e["state_key"].as_str())
        .collect();
    for hero in [&bob_id, &carol_id] {
        assert!(members.contains(&hero.as_str()), "{hero} missing from {joined}");
    }

    // Told once, the heroes are not repeated while the state stays the same.
    let since = body["next_batch"].as_str().unwrap();
    sent_id(&s.send_text(&alice, &room, "t2", "hello?").await);
    let (_, next) = s.get(&format!("{path}&since={since}"), Some(&alice)).await;
    let joined = &next["rooms"]["join"][&room];
    assert_eq!(joined["timeline"]["events"].as_array().map(Vec::len), Some(1), "{next}");
    let repeated: Vec<&Value> = joined["state"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["state_key"] == bob_id.as_str() || e["state_key"] == carol_id.as_str())
        .collect();
    assert!(repeated.is_empty(), "{next}");

    // A third user joins and becomes a hero: with the state changed since the token, the
    // incremental sync carries the new hero's member event, though the join fell out of the
    // timeline and the new hero wrote nothing.
    let since = next["next_batch"].as_str().unwrap();
    let (dave_id, dave, _) = s.register("dave", "correct horse").await;
    assert_eq!(s.membership(&dave, &room, "join", json!({})).await.0, StatusCode::OK);
    sent_id(&s.send_text(&alice, &room, "t3", "welcome").await);
    let (_, next) = s.get(&format!("{path}&since={since}"), Some(&alice)).await;
    let joined = &next["rooms"]["join"][&room];
    assert_eq!(joined["timeline"]["events"].as_array().map(Vec::len), Some(1), "{next}");
    assert_eq!(joined["timeline"]["limited"], true, "{next}");
    let heroes = joined["summary"]["m.heroes"].as_array().unwrap_or_else(|| panic!("{joined}"));
    assert!(heroes.contains(&json!(dave_id)), "{joined}");
    let member = joined["state"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "m.room.member" && e["state_key"] == dave_id.as_str())
        .unwrap_or_else(|| panic!("{dave_id}'s member event missing from {joined}"));
    assert_eq!(member["content"]["membership"], "join", "{member}");
}

#[tokio::test]
async fn rooms_whose_name_is_empty_get_heroes() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "correct horse").await;
    let (bob_id, bob, _) = s.register("bob", "correct horse").await;
    let room = s.create_room(&alice, json!({ "preset": "public_chat", "name": "Lobby" })).await;
    assert_eq!(s.membership(&bob, &room, "join", json!({})).await.0, StatusCode::OK);
    let (_, body) = s.get("/_matrix/client/v3/sync?timeout=0", Some(&alice)).await;
    let summary = &body["rooms"]["join"][&room]["summary"];
    assert!(summary.get("m.heroes").is_none(), "named, so no heroes: {summary}");

    let path = format!("/_matrix/client/v3/rooms/{room}/state/m.room.name/");
    sent_id(&s.put(&path, Some(&alice), json!({ "name": "" })).await);
    let (_, body) = s.get("/_matrix/client/v3/sync?timeout=0", Some(&alice)).await;
    let summary = &body["rooms"]["join"][&room]["summary"];
    assert_eq!(summary["m.heroes"], json!([bob_id]), "{body}");
}

#[tokio::test]
async fn knocks_show_in_the_knock_section_with_stripped_state() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "correct horse").await;
    let (bob_id, bob, _) = s.register("bob", "correct horse").await;
    let room = s
        .create_room(&alice, json!({ "name": "Door", "initial_state": [{ "type": "m.room.join_rules", "state_key": "", "content": { "join_rule": "knock" } }] }))
        .await;
    let (_, before) = s.get("/_matrix/client/v3/sync?timeout=0", Some(&bob)).await;
    let since = before["next_batch"].as_str().unwrap().to_owned();
    assert!(before["rooms"]["knock"].get(&room).is_none(), "{before}");
    let knock = format!("/_matrix/client/v3/knock/{room}");
    let (status, body) = s.post(&knock, Some(&bob), json!({ "reason": "hi" })).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let check = |body: &Value| {
        let events = body["rooms"]["knock"][&room]["knock_state"]["events"]
            .as_array()
            .unwrap_or_else(|| panic!("no knock section: {body}"))
            .clone();
        let own = events
            .iter()
            .find(|e| e["type"] == "m.room.member" && e["state_key"] == bob_id.as_str())
            .unwrap_or_else(|| panic!("{body}"));
        assert_eq!(own["content"]["membership"], "knock", "{body}");
        assert!(events.iter().any(|e| e["type"] == "m.room.join_rules"), "{body}");
        let name = events.iter().find(|e| e["type"] == "m.room.name").unwrap();
        assert_eq!(name["content"]["name"], "Door");
        assert!(events.iter().all(|e| e.get("event_id").is_none()), "stripped: {body}");
        assert!(
            body["rooms"]["join"].get(&room).is_none()
                && body["rooms"]["invite"].get(&room).is_none()
        );
    };
    let (_, incremental) =
        s.get(&format!("/_matrix/client/v3/sync?timeout=0&since={since}"), Some(&bob)).await;
    check(&incremental);
    let (_, initial) = s.get("/_matrix/client/v3/sync?timeout=0", Some(&bob)).await;
    check(&initial);
    // Once told, the knock is not repeated.
    let next = incremental["next_batch"].as_str().unwrap();
    let (_, quiet) =
        s.get(&format!("/_matrix/client/v3/sync?timeout=0&since={next}"), Some(&bob)).await;
    assert!(quiet["rooms"]["knock"].get(&room).is_none(), "{quiet}");

    // Let in, the room moves to the invite section.
    assert_eq!(
        s.membership(&alice, &room, "invite", json!({ "user_id": bob_id })).await.0,
        StatusCode::OK
    );
    let (_, invited) =
        s.get(&format!("/_matrix/client/v3/sync?timeout=0&since={next}"), Some(&bob)).await;
    assert!(invited["rooms"]["invite"].get(&room).is_some(), "{invited}");
    assert!(invited["rooms"]["knock"].get(&room).is_none(), "{invited}");
}

#[tokio::test]
async fn openid_tokens_prove_who_a_user_is_and_nothing_more() {
    let s = TestServer::start_with(|config| config.openid.token_ttl_secs = 1).await;
    let (alice_id, alice, _) = s.register("alice", "correct horse").await;
    let (bob_id, _, _) = s.register("bob", "correct horse").await;
    let request = |user: &str| format!("/_matrix/client/v3/user/{user}/openid/request_token");
    let (status, issued) = s.post(&request(&alice_id), Some(&alice), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{issued}");
    assert_eq!(issued["token_type"], "Bearer");
    assert_eq!(issued["matrix_server_name"], "localhost");
    assert_eq!(issued["expires_in"], 1);
    let token = issued["access_token"].as_str().unwrap().to_owned();
    assert!(token.len() >= 32, "{issued}");

    let userinfo =
        |token: &str| format!("/_matrix/federation/v1/openid/userinfo?access_token={}", enc(token));
    let (status, info) = s.get(&userinfo(&token), None).await;
    assert_eq!(status, StatusCode::OK, "{info}");
    assert_eq!(info, json!({ "sub": alice_id }));

    // Never an access token; never for someone else; unknown tokens are refused.
    assert_error(
        &s.get("/_matrix/client/v3/account/whoami", Some(&token)).await,
        StatusCode::UNAUTHORIZED,
        "M_UNKNOWN_TOKEN",
    );
    assert_error(
        &s.post(&request(&bob_id), Some(&alice), json!({})).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    assert_error(
        &s.post(&request(&alice_id), None, json!({})).await,
        StatusCode::UNAUTHORIZED,
        "M_MISSING_TOKEN",
    );
    assert_error(
        &s.get(&userinfo(&alice), None).await,
        StatusCode::UNAUTHORIZED,
        "M_UNKNOWN_TOKEN",
    );
    let (status, body) = s.get("/_matrix/federation/v1/openid/userinfo", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["errcode"].is_string(), "{body}");

    // Expired, it is refused.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_error(
        &s.get(&userinfo(&token), None).await,
        StatusCode::UNAUTHORIZED,
        "M_UNKNOWN_TOKEN",
    );
}

#[tokio::test]
async fn openid_tokens_die_with_their_account() {
    let s = TestServer::start().await;
    let (alice_id, alice, _) = s.register("alice", "correct horse").await;
    let path = format!("/_matrix/client/v3/user/{alice_id}/openid/request_token");
    let (_, issued) = s.post(&path, Some(&alice), json!({})).await;
    let token = issued["access_token"].as_str().unwrap();
    assert_eq!(issued["expires_in"], 3600);
    let userinfo = format!("/_matrix/federation/v1/openid/userinfo?access_token={}", enc(token));
    assert_eq!(s.get(&userinfo, None).await.0, StatusCode::OK);

    // A locked account's tokens no longer vouch for it.
    let (admin_id, admin, _) = s.register("admin", "correct horse").await;
    s.set_role(&admin_id, "admin");
    let (bob_id, bob, _) = s.register("bob", "correct horse").await;
    let path = format!("/_matrix/client/v3/user/{bob_id}/openid/request_token");
    let (_, issued) = s.post(&path, Some(&bob), json!({})).await;
    let bob_token = issued["access_token"].as_str().unwrap();
    let bob_info =
        format!("/_matrix/federation/v1/openid/userinfo?access_token={}", enc(bob_token));
    assert_eq!(s.get(&bob_info, None).await.0, StatusCode::OK);
    let account = format!("/_synapse/admin/v2/users/{bob_id}");
    let (status, body) = s.put(&account, Some(&admin), json!({ "locked": true })).await;
    assert_eq!((status, body["locked"].clone()), (StatusCode::OK, json!(true)), "{body}");
    assert_error(&s.get(&bob_info, None).await, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");

    let (status, body) = s
        .post(
            "/_matrix/client/v3/account/deactivate",
            Some(&alice),
            json!({ "auth": { "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "alice" }, "password": "correct horse" } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_error(&s.get(&userinfo, None).await, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");
}

#[tokio::test]
async fn thirdparty_protocols_and_turn_server_answer_empty_without_them() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "correct horse").await;
    for path in ["/_matrix/client/v3/thirdparty/protocols", "/_matrix/client/v3/voip/turnServer"] {
        let (status, body) = s.get(path, Some(&alice)).await;
        assert_eq!((status, body), (StatusCode::OK, json!({})), "{path}");
        assert_error(&s.get(path, None).await, StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN");
    }
    assert_error(
        &s.get("/_matrix/client/v3/thirdparty/protocol/irc", Some(&alice)).await,
        StatusCode::NOT_FOUND,
        "M_NOT_FOUND",
    );

    let s = TestServer::start_with(|config| {
        config.turn.uris = vec!["turn:turn.example.com:3478?transport=udp".to_owned()];
        config.turn.shared_secret = Some("secret".to_owned());
    })
    .await;
    let (alice_id, alice, _) = s.register("alice", "correct horse").await;
    let (status, body) = s.get("/_matrix/client/v3/voip/turnServer", Some(&alice)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["username"].as_str().unwrap().ends_with(&format!(":{alice_id}")), "{body}");
    assert!(body["password"].as_str().is_some_and(|p| !p.is_empty()), "{body}");
    assert_eq!(body["uris"], json!(["turn:turn.example.com:3478?transport=udp"]));
    assert_eq!(body["ttl"], 86_400);
}

#[tokio::test]
async fn events_redacted_before_redactions_were_kept_show_the_whole_redaction() {
    use plaza::{
        service::rooms::{migrate::REDACTION_COPIES_DONE, pdu::StoredPdu},
        storage::{Db, tables},
    };

    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "correct horse").await;
    let room = s.create_room(&alice, json!({})).await;
    let target = sent_id(&s.send_text(&alice, &room, "m", "oops").await);
    let path = format!("/_matrix/client/v3/rooms/{room}/redact/{}/r", enc(&target));
    let redaction = sent_id(&s.put(&path, Some(&alice), json!({ "reason": "typo" })).await);

    let stored_target = |db: &Db| {
        let short = db.table::<u64>(tables::EVENT_IDS).get(target.as_str()).unwrap().unwrap();
        (short, db.table::<StoredPdu>(tables::PDUS).get(&short).unwrap().unwrap())
    };
    // Stored as older versions left it: the redaction's id alone, and no migration run yet.
    let s = s
        .restart_after(|db_path| {
            let db = Db::open(db_path, 8).unwrap();
            let (short, mut stored) = stored_target(&db);
            assert!(stored.redaction.take().is_some());
            let mut batch = db.batch();
            db.table::<StoredPdu>(tables::PDUS).put(&mut batch, &short, &stored);
            db.table::<bool>(tables::GLOBAL).delete(&mut batch, REDACTION_COPIES_DONE);
            db.write(batch).unwrap();
        })
        .await;
    let (_, alice) = s.login("alice", "correct horse").await;
    let alice = alice["access_token"].as_str().unwrap();
    let event = format!("/_matrix/client/v3/rooms/{room}/event/{}", enc(&target));
    let (status, redacted) = s.get(&event, Some(alice)).await;
    assert_eq!(status, StatusCode::OK, "{redacted}");
    assert_redacted(&redacted, &redaction, &target, "typo");

    // The start-up migration stored the copy, so later reads need nothing more.
    s.restart_after(|db_path| {
        let db = Db::open(db_path, 8).unwrap();
        let (_, stored) = stored_target(&db);
        let copy = stored.redaction.expect("the redaction is stored with the event again");
        assert_eq!(copy["event_id"], redaction.as_str());
        assert_eq!(copy["redacts"], target.as_str());
        assert_eq!(
            db.table::<bool>(tables::GLOBAL).get(REDACTION_COPIES_DONE).unwrap(),
            Some(true)
        );
    })
    .await;
}
