//! The audit log: what is recorded (with actor, device, address and user agent), filters,
//! pagination, streamed exports, and tamper detection by the API and the CLI.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{TestServer, assert_error, binary};

async fn audit(s: &TestServer, token: &str, query: &str) -> Vec<Value> {
    let (status, body) = s.get(&format!("/_plaza/admin/v1/audit?{query}"), Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["records"].as_array().unwrap().clone()
}

async fn login_with_agent(s: &TestServer, user: &str, password: &str) -> StatusCode {
    s.http
        .post(format!("{}/_matrix/client/v3/login", s.base))
        .header("user-agent", "AuditTest/1.0")
        .json(&json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": user }, "password": password }))
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test]
async fn logins_failures_room_creation_and_kicks_are_recorded_with_actor_and_ip() {
    let s = TestServer::start().await;
    let (alice, alice_token, _) = s.register("alice", "password-a").await;
    let (bob, bob_token, _) = s.register("bob", "password-b").await;
    s.set_role(&alice, "admin");

    assert_eq!(login_with_agent(&s, "bob", "password-b").await, StatusCode::OK);
    assert_eq!(login_with_agent(&s, "bob", "wrong-password").await, StatusCode::FORBIDDEN);
    let room = s.create_room(&alice_token, json!({ "preset": "public_chat" })).await;
    assert_eq!(s.membership(&bob_token, &room, "join", json!({})).await.0, StatusCode::OK);
    let kicked =
        s.membership(&alice_token, &room, "kick", json!({ "user_id": bob, "reason": "spam" }));
    assert_eq!(kicked.await.0, StatusCode::OK);

    let login = audit(&s, &alice_token, "action=user.login").await;
    let last = login.last().unwrap();
    assert_eq!(last["actor"]["user_id"], bob);
    assert_eq!(last["actor"]["ip"], "127.0.0.1");
    assert_eq!(last["actor"]["user_agent"], "AuditTest/1.0");
    assert!(last["actor"]["device_id"].is_string(), "{last}");

    let failed = audit(&s, &alice_token, "action=user.login_failed").await;
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["target"], "bob");
    assert_eq!(failed[0]["actor"]["ip"], "127.0.0.1");
    assert_eq!(failed[0]["actor"]["user_agent"], "AuditTest/1.0");
    assert_eq!(failed[0]["details"]["reason"], "bad_credentials");

    let kicks = audit(&s, &alice_token, &format!("action=room.kick&room_id={room}")).await;
    assert_eq!(kicks.len(), 1, "{kicks:?}");
    assert_eq!(kicks[0]["actor"]["user_id"], alice);
    assert_eq!(kicks[0]["actor"]["ip"], "127.0.0.1");
    assert!(kicks[0]["actor"]["device_id"].is_string());
    assert_eq!(kicks[0]["target"], bob);
    assert_eq!(kicks[0]["details"]["reason"], "spam");

    let created = audit(&s, &alice_token, "action=room.create").await;
    assert_eq!(created.len(), 1);
    assert_eq!(created[0]["target"], room);
    // Room creation sets power levels, which is recorded too; so are both registrations.
    assert_eq!(audit(&s, &alice_token, &format!("action=room.*&room_id={room}")).await.len(), 3);
    assert_eq!(audit(&s, &alice_token, "action=user.register").await.len(), 2);

    // Every record names its predecessor's hash.
    let all = audit(&s, &alice_token, "limit=1000").await;
    for pair in all.windows(2) {
        assert_eq!(pair[1]["prev_hash"], pair[0]["hash"]);
        assert_eq!(pair[1]["seq"].as_u64().unwrap(), pair[0]["seq"].as_u64().unwrap() + 1);
    }
    let (status, report) = s.get("/_plaza/admin/v1/audit/verify", Some(&alice_token)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["checked"], all.len());
}

#[tokio::test]
async fn filters_pagination_and_bad_parameters() {
    let s = TestServer::start().await;
    let (alice, token, _) = s.register("alice", "password-a").await;
    s.set_role(&alice, "admin");
    // Five accounts: repeated failures for one account share a record.
    for i in 0..5 {
        assert_eq!(s.login(&format!("nobody{i}"), "wrong-password").await.0, StatusCode::FORBIDDEN);
    }
    let (status, page) =
        s.get("/_plaza/admin/v1/audit?action=user.login_failed&limit=2", Some(&token)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["records"].as_array().unwrap().len(), 2);
    let mut seen = 2;
    let mut next = page["next_token"].as_str().map(str::to_owned);
    while let Some(from) = next {
        let query = format!("/_plaza/admin/v1/audit?action=user.login_failed&limit=2&from={from}");
        let (_, page) = s.get(&query, Some(&token)).await;
        seen += page["records"].as_array().unwrap().len();
        next = page["next_token"].as_str().map(str::to_owned);
    }
    assert_eq!(seen, 5);

    let all = audit(&s, &token, "").await;
    let ts = all[2]["ts"].as_u64().unwrap();
    let window = audit(&s, &token, &format!("from_ts={ts}&to_ts={ts}")).await;
    assert!(window.iter().all(|r| r["ts"] == ts) && !window.is_empty());
    assert!(
        audit(&s, &token, &format!("actor={alice}"))
            .await
            .iter()
            .all(|r| r["actor"]["user_id"] == alice)
    );

    for bad in [
        "from_ts=10&to_ts=5",
        "limit=0",
        "limit=100000",
        "format=xml",
        "from=abc",
        "from_ts=yesterday",
    ] {
        let result = s.get(&format!("/_plaza/admin/v1/audit?{bad}"), Some(&token)).await;
        assert_error(&result, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    }
}

#[tokio::test]
async fn exports_stream_ndjson_and_csv() {
    let s = TestServer::start().await;
    let (alice, token, _) = s.register("alice", "password-a").await;
    s.set_role(&alice, "admin");
    s.login("alice", "wrong, \"quoted\" password").await;
    let all = audit(&s, &token, "").await;

    let fetch = |format: &str| {
        s.http
            .get(format!("{}/_plaza/admin/v1/audit?format={format}", s.base))
            .bearer_auth(&token)
            .send()
    };
    let response = fetch("ndjson").await.unwrap();
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    let text = response.text().await.unwrap();
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines, all);

    let response = fetch("csv").await.unwrap();
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/csv"));
    let text = response.text().await.unwrap();
    let rows: Vec<&str> = text.lines().collect();
    assert!(rows[0].starts_with("seq,ts,actor_user_id"));
    assert_eq!(rows.len(), all.len() + 1);
    assert!(rows[1].starts_with(&format!("1,{},", all[0]["ts"])));
}

#[tokio::test]
async fn a_tampered_record_is_reported_by_verify_and_the_cli() {
    let s = TestServer::start().await;
    let (alice, token, _) = s.register("alice", "password-a").await;
    s.set_role(&alice, "admin");
    s.login("alice", "wrong-password").await;
    s.login("alice", "password-a").await;
    let all = audit(&s, &token, "").await;
    let target = all.iter().find(|r| r["action"] == "user.login_failed").unwrap();
    let seq = target["seq"].as_u64().unwrap();

    let cli_verify = |dir: &std::path::Path| {
        std::process::Command::new(binary())
            .args(["audit", "verify", "--data-dir"])
            .arg(dir)
            .env_remove("PLAZA_CONFIG")
            .output()
            .unwrap()
    };
    let s = s
        .restart_after(|dir| {
            let clean = cli_verify(dir);
            assert!(clean.status.success(), "{}", String::from_utf8_lossy(&clean.stderr));

            let db = plaza::storage::Db::open(dir, 8).unwrap();
            let table: plaza::storage::Table<Value> = db.table(plaza::storage::tables::AUDIT_LOG);
            let mut record = table.get(&seq).unwrap().unwrap();
            record["actor"]["ip"] = json!("10.9.9.9");
            let mut batch = db.batch();
            table.put(&mut batch, &seq, &record);
            db.write(batch).unwrap();
            drop(table);
            drop(db);

            let broken = cli_verify(dir);
            assert!(!broken.status.success());
            let stderr = String::from_utf8_lossy(&broken.stderr);
            assert!(stderr.contains(&format!("broken at record {seq}")), "{stderr}");
        })
        .await;
    let (status, report) = s.get("/_plaza/admin/v1/audit/verify", Some(&token)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["first_broken"]["seq"], seq, "{report}");
}
