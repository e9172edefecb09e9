//! Relations over HTTP: threads, edits, reactions, references, `/relations` and `/threads`.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{TestServer, assert_error, enc};

/// Sends an event of `kind` with `content`; returns its id.
async fn send(
    s: &TestServer,
    token: &str,
    room: &str,
    kind: &str,
    txn: &str,
    content: Value,
) -> String {
    let path = format!("/_matrix/client/v3/rooms/{room}/send/{kind}/{txn}");
    let (status, body) = s.put(&path, Some(token), content).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["event_id"].as_str().unwrap().to_owned()
}

fn thread_reply(root: &str, text: &str) -> Value {
    json!({
        "msgtype": "m.text",
        "body": text,
        "m.relates_to": { "rel_type": "m.thread", "event_id": root, "is_falling_back": true, "m.in_reply_to": { "event_id": root } },
    })
}

async fn event(s: &TestServer, token: &str, room: &str, id: &str) -> Value {
    let (status, body) =
        s.get(&format!("/_matrix/client/v3/rooms/{room}/event/{}", enc(id)), Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

async fn redact(s: &TestServer, token: &str, room: &str, id: &str, txn: &str) {
    let path = format!("/_matrix/client/v3/rooms/{room}/redact/{}/{txn}", enc(id));
    let (status, body) = s.put(&path, Some(token), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// Two users in one public room: (server, alice token, bob id, bob token, room).
async fn room_of_two() -> (TestServer, String, String, String, String) {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "correct horse").await;
    let (bob_id, bob, _) = s.register("bob", "correct horse").await;
    let room = s.create_room(&alice, json!({ "preset": "public_chat" })).await;
    assert_eq!(s.membership(&bob, &room, "join", json!({})).await.0, StatusCode::OK);
    (s, alice, bob_id, bob, room)
}

#[tokio::test]
async fn threads_are_summarised_listed_and_survive_redactions() {
    let (s, alice, _, bob, room) = room_of_two().await;
    let root = send(
        &s,
        &alice,
        &room,
        "m.room.message",
        "r1",
        json!({ "msgtype": "m.text", "body": "plan" }),
    )
    .await;
    let other = send(
        &s,
        &alice,
        &room,
        "m.room.message",
        "r2",
        json!({ "msgtype": "m.text", "body": "lunch?" }),
    )
    .await;
    let first = send(&s, &bob, &room, "m.room.message", "t1", thread_reply(&root, "agreed")).await;
    let second =
        send(&s, &alice, &room, "m.room.message", "t2", thread_reply(&root, "then go")).await;

    // The root carries the thread summary wherever it is served.
    let served = event(&s, &bob, &room, &root).await;
    let thread = &served["unsigned"]["m.relations"]["m.thread"];
    assert_eq!(thread["count"], 2, "{served}");
    assert_eq!(thread["latest_event"]["event_id"], second.as_str(), "{served}");
    assert_eq!(thread["current_user_participated"], true, "{served}");
    let (_, messages) = s
        .get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=20"), Some(&bob))
        .await;
    let in_messages = messages["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event_id"] == root.as_str())
        .unwrap();
    assert_eq!(in_messages["unsigned"]["m.relations"]["m.thread"]["count"], 2, "{messages}");
    let (_, sync) = s.get("/_matrix/client/v3/sync", Some(&alice)).await;
    let timeline = sync["rooms"]["join"][&room]["timeline"]["events"].as_array().unwrap();
    let in_sync = timeline.iter().find(|e| e["event_id"] == root.as_str()).unwrap();
    assert_eq!(
        in_sync["unsigned"]["m.relations"]["m.thread"]["latest_event"]["event_id"],
        second.as_str()
    );
    let (_, context) = s
        .get(&format!("/_matrix/client/v3/rooms/{room}/context/{}?limit=4", enc(&root)), Some(&bob))
        .await;
    assert_eq!(context["event"]["unsigned"]["m.relations"]["m.thread"]["count"], 2, "{context}");

    // A third user who never wrote in the thread has not participated; `/threads` lists it for
    // everyone but not under `participated` for them.
    let (_, carol, _) = s.register("carol", "correct horse").await;
    assert_eq!(s.membership(&carol, &room, "join", json!({})).await.0, StatusCode::OK);
    let served = event(&s, &carol, &room, &root).await;
    assert_eq!(served["unsigned"]["m.relations"]["m.thread"]["current_user_participated"], false);
    let threads = format!("/_matrix/client/v1/rooms/{room}/threads");
    let (status, all) = s.get(&threads, Some(&carol)).await;
    assert_eq!(status, StatusCode::OK, "{all}");
    assert_eq!(all["chunk"].as_array().unwrap().len(), 1, "{all}");
    assert_eq!(all["chunk"][0]["event_id"], root.as_str());
    assert_eq!(all["chunk"][0]["unsigned"]["m.relations"]["m.thread"]["count"], 2);
    let (_, mine) = s.get(&format!("{threads}?include=participated"), Some(&carol)).await;
    assert!(mine["chunk"].as_array().unwrap().is_empty(), "{mine}");
    let (_, bobs) = s.get(&format!("{threads}?include=participated"), Some(&bob)).await;
    assert_eq!(bobs["chunk"].as_array().unwrap().len(), 1, "{bobs}");

    // A second thread with newer activity comes first; an older thread's reply moves it up.
    send(&s, &carol, &room, "m.room.message", "t3", thread_reply(&other, "yes")).await;
    let (_, listed) = s.get(&threads, Some(&bob)).await;
    let order: Vec<&str> = listed["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(order, vec![other.as_str(), root.as_str()]);
    let third = send(&s, &bob, &room, "m.room.message", "t4", thread_reply(&root, "ok")).await;
    let (_, page) = s.get(&format!("{threads}?limit=1"), Some(&bob)).await;
    assert_eq!(page["chunk"][0]["event_id"], root.as_str(), "{page}");
    let next = page["next_batch"].as_str().expect("a second page");
    let (_, page) = s.get(&format!("{threads}?limit=1&from={next}"), Some(&bob)).await;
    assert_eq!(page["chunk"][0]["event_id"], other.as_str(), "{page}");
    assert!(page.get("next_batch").is_none(), "{page}");

    // Redacting the latest reply falls back to the one before; redacting the root keeps the
    // thread (its replies still exist).
    redact(&s, &bob, &room, &third, "x1").await;
    let thread = event(&s, &bob, &room, &root).await["unsigned"]["m.relations"]["m.thread"].clone();
    assert_eq!(thread["count"], 2, "{thread}");
    assert_eq!(thread["latest_event"]["event_id"], second.as_str());
    redact(&s, &alice, &room, &root, "x2").await;
    let (_, listed) = s.get(&threads, Some(&bob)).await;
    let root_listed = listed["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event_id"] == root.as_str())
        .unwrap();
    assert_eq!(root_listed["unsigned"]["m.relations"]["m.thread"]["count"], 2, "{listed}");
    // Replies to replies, or to unknown events, are simply unrelated.
    let nested =
        send(&s, &bob, &room, "m.room.message", "t5", thread_reply(&first, "nested")).await;
    let unknown =
        send(&s, &bob, &room, "m.room.message", "t6", thread_reply("$nope:example.org", "lost"))
            .await;
    assert!(event(&s, &bob, &room, &first).await["unsigned"].get("m.relations").is_none());
    for id in [nested, unknown] {
        assert!(event(&s, &bob, &room, &id).await["unsigned"].get("m.relations").is_none());
    }
}

#[tokio::test]
async fn edits_aggregate_to_the_latest_by_the_original_sender() {
    let (s, alice, _, bob, room) = room_of_two().await;
    let original = send(
        &s,
        &alice,
        &room,
        "m.room.message",
        "o",
        json!({ "msgtype": "m.text", "body": "helo" }),
    )
    .await;
    let edit = |text: &str| {
        json!({
            "msgtype": "m.text",
            "body": format!("* {text}"),
            "m.new_content": { "msgtype": "m.text", "body": text },
            "m.relates_to": { "rel_type": "m.replace", "event_id": original },
        })
    };
    let first = send(&s, &alice, &room, "m.room.message", "e1", edit("hello")).await;
    let second = send(&s, &alice, &room, "m.room.message", "e2", edit("hello all")).await;
    // An edit by someone else is indexed but never shown as the replacement.
    let foreign = send(&s, &bob, &room, "m.room.message", "e3", edit("hijacked")).await;

    let served = event(&s, &bob, &room, &original).await;
    let replace = &served["unsigned"]["m.relations"]["m.replace"];
    assert_eq!(replace["event_id"], second.as_str(), "{served}");
    assert_eq!(replace["content"]["m.new_content"]["body"], "hello all");
    assert_eq!(served["content"]["body"], "helo", "the original stays retrievable");

    // Every edit is listed under the original's relations, newest first, in pages.
    let base = format!("/_matrix/client/v1/rooms/{room}/relations/{}/m.replace", enc(&original));
    let (status, page) = s.get(&format!("{base}?limit=2"), Some(&bob)).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let ids: Vec<&str> =
        page["chunk"].as_array().unwrap().iter().map(|e| e["event_id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![foreign.as_str(), second.as_str()]);
    let next = page["next_batch"].as_str().unwrap();
    let (_, rest) = s.get(&format!("{base}?limit=2&from={next}"), Some(&bob)).await;
    assert_eq!(rest["chunk"].as_array().unwrap().len(), 1, "{rest}");
    assert_eq!(rest["chunk"][0]["event_id"], first.as_str());
    let (_, forward) = s.get(&format!("{base}?dir=f&limit=1"), Some(&bob)).await;
    assert_eq!(forward["chunk"][0]["event_id"], first.as_str(), "{forward}");
    let (_, typed) = s.get(&format!("{base}/m.reaction"), Some(&bob)).await;
    assert!(typed["chunk"].as_array().unwrap().is_empty(), "{typed}");

    // Redacting the latest edit falls back to the one before it.
    redact(&s, &alice, &room, &second, "x").await;
    let served = event(&s, &bob, &room, &original).await;
    assert_eq!(
        served["unsigned"]["m.relations"]["m.replace"]["event_id"],
        first.as_str(),
        "{served}"
    );

    // Unknown events and bad tokens are Matrix errors.
    let missing =
        format!("/_matrix/client/v1/rooms/{room}/relations/{}", enc("$missing:localhost"));
    assert_error(&s.get(&missing, Some(&bob)).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let bad = format!("/_matrix/client/v1/rooms/{room}/relations/{}?from=zz", enc(&original));
    assert_error(&s.get(&bad, Some(&bob)).await, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    // An outsider sees nothing of the room's relations.
    let (_, eve, _) = s.register("eve", "correct horse").await;
    let all = format!("/_matrix/client/v1/rooms/{room}/relations/{}", enc(&original));
    assert_error(&s.get(&all, Some(&eve)).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");
}

#[tokio::test]
async fn reactions_are_deduplicated_and_references_bundled() {
    let (s, alice, _, bob, room) = room_of_two().await;
    let target = send(
        &s,
        &alice,
        &room,
        "m.room.message",
        "m",
        json!({ "msgtype": "m.text", "body": "ship it?" }),
    )
    .await;
    let react =
        json!({ "m.relates_to": { "rel_type": "m.annotation", "event_id": target, "key": "👍" } });
    let first = send(&s, &bob, &room, "m.reaction", "a1", react.clone()).await;
    let path = format!("/_matrix/client/v3/rooms/{room}/send/m.reaction/a2");
    assert_error(
        &s.put(&path, Some(&bob), react.clone()).await,
        StatusCode::BAD_REQUEST,
        "M_DUPLICATE_ANNOTATION",
    );
    // Another key, or another sender, is a different reaction.
    let other_key =
        json!({ "m.relates_to": { "rel_type": "m.annotation", "event_id": target, "key": "🎉" } });
    send(&s, &bob, &room, "m.reaction", "a3", other_key).await;
    send(&s, &alice, &room, "m.reaction", "a4", react.clone()).await;
    // Once the first is redacted, the same reaction may be sent again.
    redact(&s, &bob, &room, &first, "x").await;
    send(&s, &bob, &room, "m.reaction", "a5", react).await;
    let base = format!("/_matrix/client/v1/rooms/{room}/relations/{}", enc(&target));
    let (_, reactions) = s.get(&format!("{base}/m.annotation/m.reaction"), Some(&alice)).await;
    assert_eq!(reactions["chunk"].as_array().unwrap().len(), 3, "{reactions}");

    // A reference shows in the target's bundle, and a reaction to it is found by recursion.
    let reference = send(
        &s,
        &alice,
        &room,
        "m.room.message",
        "ref",
        json!({ "msgtype": "m.text", "body": "see above", "m.relates_to": { "rel_type": "m.reference", "event_id": target } }),
    )
    .await;
    let on_reference = json!({ "m.relates_to": { "rel_type": "m.annotation", "event_id": reference, "key": "👀" } });
    let nested = send(&s, &bob, &room, "m.reaction", "a6", on_reference).await;
    let served = event(&s, &alice, &room, &target).await;
    assert_eq!(
        served["unsigned"]["m.relations"]["m.reference"]["chunk"][0]["event_id"],
        reference.as_str(),
        "{served}"
    );
    let (_, flat) = s.get(&base, Some(&alice)).await;
    assert!(!flat["chunk"].as_array().unwrap().iter().any(|e| e["event_id"] == nested.as_str()));
    let (_, deep) = s.get(&format!("{base}?recurse=true"), Some(&alice)).await;
    assert_eq!(deep["chunk"][0]["event_id"], nested.as_str(), "{deep}");
    assert_eq!(deep["recursion_depth"], 3);
}

#[tokio::test]
async fn thread_receipts_must_be_for_an_event_of_that_thread() {
    let (s, alice, _, bob, room) = room_of_two().await;
    let root = send(
        &s,
        &alice,
        &room,
        "m.room.message",
        "r",
        json!({ "msgtype": "m.text", "body": "root" }),
    )
    .await;
    let reply =
        send(&s, &alice, &room, "m.room.message", "t", thread_reply(&root, "in thread")).await;
    let outside = send(
        &s,
        &alice,
        &room,
        "m.room.message",
        "o",
        json!({ "msgtype": "m.text", "body": "main" }),
    )
    .await;
    let receipt = |id: &str| format!("/_matrix/client/v3/rooms/{room}/receipt/m.read/{}", enc(id));
    let in_thread = json!({ "thread_id": root });
    assert_eq!(s.post(&receipt(&reply), Some(&bob), in_thread.clone()).await.0, StatusCode::OK);
    assert_eq!(s.post(&receipt(&root), Some(&bob), in_thread.clone()).await.0, StatusCode::OK);
    let wrong = s.post(&receipt(&outside), Some(&bob), in_thread).await;
    assert_error(&wrong, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    assert_eq!(
        s.post(&receipt(&outside), Some(&bob), json!({ "thread_id": "main" })).await.0,
        StatusCode::OK
    );
}
