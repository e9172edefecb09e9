//! Full-text search: English and CJK text, ranking, filters, context, visibility, redactions.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{TestServer, assert_error, enc};

async fn search(s: &TestServer, token: &str, criteria: Value) -> Value {
    search_page(s, token, criteria, None).await
}

async fn search_page(s: &TestServer, token: &str, criteria: Value, next: Option<&str>) -> Value {
    let path = match next {
        Some(next) => format!("/_matrix/client/v3/search?next_batch={}", enc(next)),
        None => "/_matrix/client/v3/search".to_owned(),
    };
    let (status, body) = s
        .post(&path, Some(token), json!({ "search_categories": { "room_events": criteria } }))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["search_categories"]["room_events"].clone()
}

/// Sends a text message; returns its event id.
async fn say(s: &TestServer, token: &str, room: &str, text: &str) -> String {
    static TXN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let txn = TXN.fetch_add(1, std::sync::atomic::Ordering::Relaxed).to_string();
    let (status, body) = s.send_text(token, &enc(room), &txn, text).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["event_id"].as_str().unwrap().to_owned()
}

fn bodies(found: &Value) -> Vec<String> {
    found["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["result"]["content"]["body"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test]
async fn english_and_chinese_queries_rank_and_highlight() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "password one").await;
    let (_, bob, _) = s.register("bob", "password two").await;
    let room = s.create_room(&alice, json!({ "preset": "public_chat", "name": "Finance" })).await;
    assert_eq!(s.membership(&bob, &enc(&room), "join", json!({})).await.0, StatusCode::OK);
    say(&s, &alice, &room, "我们下周讨论季度预算的分配方案").await;
    say(&s, &alice, &room, "The quarterly budget review is on Friday").await;
    say(&s, &bob, &room, "Lunch menu for Friday").await;
    say(&s, &bob, &room, "budget budget budget planning").await;
    say(&s, &alice, &room, "明天的会议取消了").await;

    let found = search(&s, &bob, json!({ "search_term": "季度预算" })).await;
    assert_eq!(bodies(&found), ["我们下周讨论季度预算的分配方案"]);
    assert_eq!(found["highlights"], json!(["季度预算"]));
    let found = search(&s, &bob, json!({ "search_term": "预算" })).await;
    assert_eq!(bodies(&found), ["我们下周讨论季度预算的分配方案"]);
    let found = search(&s, &bob, json!({ "search_term": "预算方案" })).await;
    assert!(bodies(&found).is_empty(), "words must be adjacent: {found}");

    let ranked = search(&s, &bob, json!({ "search_term": "Budget" })).await;
    assert_eq!(
        bodies(&ranked),
        ["budget budget budget planning", "The quarterly budget review is on Friday"]
    );
    assert_eq!(ranked["count"], 2);
    let ranks: Vec<f64> =
        ranked["results"].as_array().unwrap().iter().map(|r| r["rank"].as_f64().unwrap()).collect();
    assert!(ranks[0] > ranks[1], "{ranks:?}");
    let recent = search(&s, &bob, json!({ "search_term": "budget", "order_by": "recent" })).await;
    assert_eq!(
        bodies(&recent),
        ["budget budget budget planning", "The quarterly budget review is on Friday"]
    );
    let recent = search(&s, &bob, json!({ "search_term": "friday", "order_by": "recent" })).await;
    assert_eq!(
        bodies(&recent),
        ["Lunch menu for Friday", "The quarterly budget review is on Friday"]
    );

    // Both words must appear.
    let both = search(&s, &bob, json!({ "search_term": "friday budget" })).await;
    assert_eq!(bodies(&both), ["The quarterly budget review is on Friday"]);
    // Room names are searched through their key.
    let named =
        search(&s, &bob, json!({ "search_term": "finance", "keys": ["content.name"] })).await;
    assert_eq!(named["results"][0]["result"]["type"], "m.room.name");
}

#[tokio::test]
async fn filters_context_state_groups_and_pages() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "password one").await;
    let (_, bob, _) = s.register("bob", "password two").await;
    let room = s.create_room(&alice, json!({ "preset": "public_chat" })).await;
    let other = s.create_room(&alice, json!({ "preset": "public_chat" })).await;
    assert_eq!(s.membership(&bob, &enc(&room), "join", json!({})).await.0, StatusCode::OK);
    say(&s, &alice, &room, "before the report").await;
    say(&s, &alice, &room, "quarterly report draft").await;
    say(&s, &bob, &room, "after the report").await;
    say(&s, &alice, &other, "report in the other room").await;

    let by_bob = search(
        &s,
        &alice,
        json!({ "search_term": "report", "filter": { "senders": ["@bob:localhost"] } }),
    )
    .await;
    assert_eq!(bodies(&by_bob), ["after the report"]);
    let not_other =
        search(&s, &alice, json!({ "search_term": "report", "filter": { "not_rooms": [other] } }))
            .await;
    assert_eq!(not_other["count"], 3);

    let with_context = search(
        &s,
        &alice,
        json!({
            "search_term": "draft",
            "event_context": { "before_limit": 1, "after_limit": 1, "include_profile": true },
            "include_state": true,
            "groupings": { "group_by": [{ "key": "room_id" }] },
        }),
    )
    .await;
    let result = &with_context["results"][0];
    assert_eq!(result["context"]["events_before"][0]["content"]["body"], "before the report");
    assert_eq!(result["context"]["events_after"][0]["content"]["body"], "after the report");
    assert!(result["context"]["profile_info"]["@alice:localhost"].is_object());
    assert!(
        with_context["state"][&room]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "m.room.create")
    );
    let group = &with_context["groups"]["room_id"][&room];
    assert_eq!(group["results"][0], result["result"]["event_id"]);

    let first =
        search(&s, &alice, json!({ "search_term": "report", "filter": { "limit": 2 } })).await;
    assert_eq!(first["results"].as_array().unwrap().len(), 2);
    let next = first["next_batch"].as_str().unwrap();
    let second = search_page(
        &s,
        &alice,
        json!({ "search_term": "report", "filter": { "limit": 2 } }),
        Some(next),
    )
    .await;
    assert_eq!(second["results"].as_array().unwrap().len(), 2);
    assert!(second.get("next_batch").is_none());
    let mut all: Vec<String> = bodies(&first).into_iter().chain(bodies(&second)).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 4);

    let (status, body) = s
        .post(
            "/_matrix/client/v3/search?next_batch=garbage",
            Some(&alice),
            json!({ "search_categories": { "room_events": { "search_term": "x" } } }),
        )
        .await;
    assert_error(&(status, body), StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
}

#[tokio::test]
async fn leaving_and_redacting_hide_messages() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "password one").await;
    let (_, bob, _) = s.register("bob", "password two").await;
    let (_, carol, _) = s.register("carol", "password three").await;
    let room = s.create_room(&alice, json!({ "preset": "public_chat" })).await;
    assert_eq!(s.membership(&bob, &enc(&room), "join", json!({})).await.0, StatusCode::OK);
    say(&s, &alice, &room, "secret plan one").await;
    assert_eq!(s.membership(&bob, &enc(&room), "leave", json!({})).await.0, StatusCode::OK);
    say(&s, &alice, &room, "secret plan two").await;
    assert!(bodies(&search(&s, &bob, json!({ "search_term": "secret" })).await).is_empty());
    assert!(bodies(&search(&s, &carol, json!({ "search_term": "secret" })).await).is_empty());
    assert_eq!(bodies(&search(&s, &alice, json!({ "search_term": "secret" })).await).len(), 2);

    // Results carry their bundled aggregations: an edit shows as the latest content.
    let original = say(&s, &alice, &room, "draft agenda").await;
    let edit = json!({ "msgtype": "m.text", "body": "* final agenda",
        "m.new_content": { "msgtype": "m.text", "body": "final agenda" },
        "m.relates_to": { "rel_type": "m.replace", "event_id": original } });
    let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/edit1", enc(&room));
    assert_eq!(s.put(&path, Some(&alice), edit).await.0, StatusCode::OK);
    let found = search(&s, &alice, json!({ "search_term": "draft" })).await;
    let replaced = &found["results"][0]["result"]["unsigned"]["m.relations"]["m.replace"];
    assert_eq!(replaced["content"]["m.new_content"]["body"], "final agenda", "{found}");

    let doomed = say(&s, &alice, &room, "delete this sentence").await;
    assert_eq!(bodies(&search(&s, &alice, json!({ "search_term": "sentence" })).await).len(), 1);
    let path = format!("/_matrix/client/v3/rooms/{}/redact/{}/t1", enc(&room), enc(&doomed));
    let (status, _) = s.put(&path, Some(&alice), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert!(bodies(&search(&s, &alice, json!({ "search_term": "sentence" })).await).is_empty());

    // The index survives a restart.
    let s = s.restart().await;
    assert_eq!(bodies(&search(&s, &alice, json!({ "search_term": "plan" })).await).len(), 2);
}
