//! The event core's own guarantees seen over HTTP: storage failures are internal errors, never
//! refusals, and a room's compact state reads back whole after a restart.

use reqwest::StatusCode;
use serde_json::json;

use crate::common::TestServer;

#[tokio::test]
async fn an_unreadable_state_is_an_internal_error_not_a_refusal() {
    let s = TestServer::start().await;
    let (_, token, _) = s.register("alice", "correct horse").await;
    let room = s.create_room(&token, json!({ "preset": "private_chat" })).await;
    assert_eq!(s.send_text(&token, &room, "t0", "before").await.0, StatusCode::OK);
    let room_id = ruma::RoomId::parse(room.as_str()).unwrap();
    let root = s.server().services().rooms.room(&room_id).unwrap().unwrap().current_state;
    // The room's current state node is damaged on disk while the server is stopped.
    let s = s
        .restart_after(|db| {
            let db = plaza::storage::Db::open(db, 8).unwrap();
            let nodes = db.table::<()>(plaza::storage::tables::STATE_NODES);
            let mut batch = db.batch();
            nodes.put_encoded(&mut batch, &root.to_be_bytes(), &[0xFF, 0x01]);
            db.write(batch).unwrap();
        })
        .await;
    let path = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/t1");
    let (status, body) =
        s.put(&path, Some(&token), json!({ "msgtype": "m.text", "body": "x" })).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(body["errcode"], "M_UNKNOWN");
    let (status, body) =
        s.get(&format!("/_matrix/client/v3/rooms/{room}/state"), Some(&token)).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(body["errcode"], "M_UNKNOWN");
}

#[tokio::test]
async fn room_state_reads_back_whole_after_a_restart() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "correct horse").await;
    let room = s.create_room(&alice, json!({ "preset": "public_chat", "name": "Plans" })).await;
    let mut tokens = Vec::new();
    for i in 0..40 {
        let (_, token, _) = s.register(&format!("member{i}"), "correct horse").await;
        let (status, _) = s.membership(&token, &room, "join", json!({})).await;
        assert_eq!(status, StatusCode::OK);
        tokens.push(token);
    }
    // Some leave, the topic changes twice: entries are replaced and memberships change.
    for token in &tokens[..10] {
        assert_eq!(s.membership(token, &room, "leave", json!({})).await.0, StatusCode::OK);
    }
    for topic in ["first", "second"] {
        let path = format!("/_matrix/client/v3/rooms/{room}/state/m.room.topic/");
        assert_eq!(s.put(&path, Some(&alice), json!({ "topic": topic })).await.0, StatusCode::OK);
    }
    let before = read(&s, &alice, &room).await;
    assert_eq!(before.1, 31, "alice and the 30 who stayed");
    assert!(before.0.iter().filter(|e| e.contains("m.room.member")).count() == 41);
    let s = s.restart().await;
    assert_eq!(read(&s, &alice, &room).await, before);
    let (_, topic) =
        s.get(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.topic/"), Some(&alice)).await;
    assert_eq!(topic["topic"], "second");
}

/// The room's state (type, key and event of each entry, sorted) and its joined member count.
async fn read(s: &TestServer, token: &str, room: &str) -> (Vec<String>, usize) {
    let (_, state) = s.get(&format!("/_matrix/client/v3/rooms/{room}/state"), Some(token)).await;
    let path = format!("/_matrix/client/v3/rooms/{room}/joined_members");
    let (_, members) = s.get(&path, Some(token)).await;
    let mut state: Vec<String> = state
        .as_array()
        .unwrap()
        .iter()
        .map(|e| format!("{} {} {}", e["type"], e["state_key"], e["event_id"]))
        .collect();
    state.sort();
    (state, members["joined"].as_object().unwrap().len())
}
