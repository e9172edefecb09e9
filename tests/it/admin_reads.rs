//! Admin reads of content (room messages and state, a reported event, a user's or a room's
//! media, polls) each leave an audit record with who, what and why.

use reqwest::{StatusCode, header};
use serde_json::{Value, json};

use crate::common::{TestServer, assert_error, enc};

/// The audit records of `action`.
async fn audited(s: &TestServer, token: &str, action: &str) -> Vec<Value> {
    let (status, body) =
        s.get(&format!("/_plaza/admin/v1/audit?action={action}"), Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["records"].as_array().unwrap().clone()
}

/// Reads `route` as `token`, expecting `200`.
async fn read(s: &TestServer, token: &str, route: &str) -> Value {
    let (status, body) = s.get(route, Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{route}: {body}");
    body
}

#[tokio::test]
async fn admin_reads_of_content_are_audited() {
    let s = TestServer::start().await;
    let (admin, admin_token, _) = s.register("root", "password-r").await;
    let (auditor, auditor_token, _) = s.register("audrey", "password-a").await;
    let (user, token, _) = s.register("ursula", "password-u").await;
    s.set_role(&admin, "admin");
    s.set_role(&auditor, "auditor");
    let room = s.create_room(&token, json!({ "preset": "private_chat" })).await;
    let (status, sent) = s.send_text(&token, &room, "t1", "a private word").await;
    assert_eq!(status, StatusCode::OK, "{sent}");
    let event_id = sent["event_id"].as_str().unwrap();
    let path = format!("/_matrix/client/v3/rooms/{room}/report/{}", enc(event_id));
    assert_eq!(s.post(&path, Some(&token), json!({ "reason": "spam" })).await.0, StatusCode::OK);
    let report_id =
        read(&s, &admin_token, "/_synapse/admin/v1/event_reports").await["event_reports"][0]["id"]
            .as_u64()
            .unwrap();
    let uploaded = s
        .http
        .post(format!("{}/_matrix/media/v3/upload?filename=notes.txt", s.base))
        .bearer_auth(&token)
        .header(header::CONTENT_TYPE, "text/plain")
        .body("notes")
        .send()
        .await
        .unwrap();
    assert_eq!(uploaded.status(), StatusCode::OK);
    let start = json!({ "m.poll": { "question": { "m.text": [{ "body": "Lunch?" }] },
        "answers": [{ "m.id": "y", "m.text": [{ "body": "Yes" }] }] } });
    let path = format!("/_matrix/client/v3/rooms/{room}/send/m.poll.start/p1");
    let (status, poll) = s.put(&path, Some(&token), start).await;
    assert_eq!(status, StatusCode::OK, "{poll}");
    let poll = poll["event_id"].as_str().unwrap();

    // Room messages: each request is one record, with the range read and the reason given.
    let messages = format!("/_synapse/admin/v1/rooms/{room}/messages");
    let page = read(&s, &admin_token, &format!("{messages}?reason=ticket%20%2342&limit=2")).await;
    let next = page["end"].as_str().unwrap();
    read(&s, &admin_token, &format!("{messages}?from={next}&limit=2")).await;
    let records = audited(&s, &admin_token, "admin.read.room_messages").await;
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(records[0]["actor"]["user_id"], admin);
    assert!(records[0]["actor"]["device_id"].is_string(), "{}", records[0]);
    assert_eq!(records[0]["actor"]["ip"], "127.0.0.1");
    assert_eq!(records[0]["target"], room);
    assert_eq!(records[0]["room_id"], room);
    assert_eq!(records[0]["details"]["reason"], "ticket #42");
    assert_eq!(records[0]["details"]["events"], 2);
    assert_eq!(records[0]["details"]["limit"], 2);
    assert_eq!(records[1]["details"]["reason"], Value::Null);
    assert!(!records[0].to_string().contains("a private word"), "no content in the log");

    // The other reads of content, by admins and auditors alike.
    let reads = [
        (&admin_token, format!("/_synapse/admin/v1/event_reports/{report_id}"), "report"),
        (&auditor_token, format!("/_synapse/admin/v1/rooms/{room}/state"), "room_state"),
        (&auditor_token, format!("/_synapse/admin/v1/users/{user}/media"), "user_media"),
        (&admin_token, format!("/_synapse/admin/v1/room/{room}/media"), "room_media"),
        (&auditor_token, "/_plaza/admin/v1/analytics/polls".to_owned(), "polls"),
        (&admin_token, format!("/_plaza/admin/v1/analytics/polls/{}", enc(poll)), "poll"),
    ];
    for (who, route, what) in &reads {
        let separator = if route.contains('?') { '&' } else { '?' };
        read(&s, who, &format!("{route}{separator}reason=audit")).await;
        let records = audited(&s, &admin_token, &format!("admin.read.{what}")).await;
        assert_eq!(records.len(), 1, "{what}: {records:?}");
        let reader = if *who == &admin_token { &admin } else { &auditor };
        assert_eq!(records[0]["actor"]["user_id"], *reader, "{what}");
        assert_eq!(records[0]["details"]["reason"], "audit", "{what}");
    }
    let report = &audited(&s, &admin_token, "admin.read.report").await[0];
    assert_eq!(report["target"], report_id.to_string());
    assert_eq!(report["room_id"], room);
    assert_eq!(report["details"]["event_id"], event_id);
    assert_eq!(audited(&s, &admin_token, "admin.read.user_media").await[0]["target"], user);
    let polls = &audited(&s, &admin_token, "admin.read.polls").await[0];
    assert_eq!(
        (polls["target"].as_str(), polls["details"]["polls"].as_u64()),
        (Some("*"), Some(1))
    );
    let one = &audited(&s, &admin_token, "admin.read.poll").await[0];
    assert_eq!((one["target"].as_str(), one["room_id"].as_str()), (Some(poll), Some(&*room)));
    assert!(!one.to_string().contains("Lunch"), "no content in the log");

    // A reason past 1000 bytes is refused before anything is read; failed reads leave nothing.
    let long = "r".repeat(1001);
    let result = s.get(&format!("{messages}?reason={long}"), Some(&admin_token)).await;
    assert_error(&result, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    let result = s
        .get(&format!("/_synapse/admin/v1/users/{user}/media?reason={long}"), Some(&admin_token))
        .await;
    assert_error(&result, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    let missing = s.get("/_synapse/admin/v1/event_reports/999", Some(&admin_token)).await;
    assert_error(&missing, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    assert_eq!(audited(&s, &admin_token, "admin.read.*").await.len(), 8);

    let (status, verify) = s.get("/_plaza/admin/v1/audit/verify", Some(&admin_token)).await;
    assert_eq!((status, verify["ok"].as_bool()), (StatusCode::OK, Some(true)), "{verify}");
}
