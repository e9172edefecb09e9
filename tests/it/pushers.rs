//! Pushers, push gateway delivery and `/notifications`, with a real HTTP gateway on loopback.

use std::{net::SocketAddr, time::Duration};

use axum::{Json, Router, extract::State, routing::post};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::common::{TestServer, assert_error};

/// A push gateway on loopback that hands every notification it receives to the test and
/// rejects the pushkeys in `reject`.
pub(crate) struct Gateway {
    addr: SocketAddr,
    received: mpsc::UnboundedReceiver<Value>,
}

impl Gateway {
    pub(crate) async fn start(reject: &'static [&'static str]) -> Self {
        Self::start_on(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(), reject)
    }

    pub(crate) fn start_on(
        listener: tokio::net::TcpListener,
        reject: &'static [&'static str],
    ) -> Self {
        let (tx, received) = mpsc::unbounded_channel();
        let app = Router::new()
            .route(
                "/_matrix/push/v1/notify",
                post(
                    move |State(tx): State<mpsc::UnboundedSender<Value>>,
                          Json(body): Json<Value>| async move {
                        let _ = tx.send(body);
                        Json(json!({ "rejected": reject }))
                    },
                ),
            )
            .with_state(tx);
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, received }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}/_matrix/push/v1/notify", self.addr)
    }

    /// Fails when a push arrives within `wait`.
    async fn assert_quiet(&mut self, wait: Duration, why: &str) {
        let push = tokio::time::timeout(wait, self.received.recv()).await;
        assert!(push.is_err(), "{why}: {push:?}");
    }

    pub(crate) async fn next(&mut self) -> Value {
        tokio::time::timeout(Duration::from_secs(15), self.received.recv())
            .await
            .expect("the gateway receives a push in time")
            .unwrap()
    }
}

/// Waits until `s` has no push waiting: those a gateway received are acknowledged too (a push
/// whose answer a restart cuts off is sent again, as it should be).
async fn drained(s: &TestServer) {
    for _ in 0..500 {
        if s.server().services().gateway.queued() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("pushes still queued");
}

pub(crate) fn pusher(url: &str, pushkey: &str, format: Option<&str>) -> Value {
    let mut data = json!({ "url": url });
    if let Some(format) = format {
        data["format"] = json!(format);
    }
    json!({
        "kind": "http",
        "app_id": "com.example.chat",
        "pushkey": pushkey,
        "app_display_name": "Chat",
        "device_display_name": "Phone",
        "lang": "en",
        "data": data,
    })
}

/// alice, bob and carol in one group room; returns (alice token, bob id, bob token, room).
async fn pair(s: &TestServer) -> (String, String, String, String) {
    let (_, alice, _) = s.register("alice", "correct horse").await;
    let (bob_id, bob, _) = s.register("bob", "battery staple").await;
    let (_, carol, _) = s.register("carol", "tr0ub4dor").await;
    let room = s.create_room(&alice, json!({ "preset": "public_chat", "name": "Team" })).await;
    assert_eq!(s.membership(&bob, &room, "join", json!({})).await.0, StatusCode::OK);
    assert_eq!(s.membership(&carol, &room, "join", json!({})).await.0, StatusCode::OK);
    (alice, bob_id, bob, room)
}

#[tokio::test]
async fn gateway_receives_the_spec_payload_for_an_offline_device() {
    let s = TestServer::start().await;
    let mut gateway = Gateway::start(&[]).await;
    let (alice, bob_id, bob, room) = pair(&s).await;
    let set = s
        .post("/_matrix/client/v3/pushers/set", Some(&bob), pusher(&gateway.url(), "k1", None))
        .await;
    assert_eq!(set.0, StatusCode::OK, "{}", set.1);
    let (_, listed) = s.get("/_matrix/client/v3/pushers", Some(&bob)).await;
    assert_eq!(listed["pushers"][0]["pushkey"], "k1", "{listed}");
    assert_eq!(listed["pushers"][0]["data"]["url"], gateway.url());

    let sent = s.send_text(&alice, &room, "t1", "lunch at noon?").await;
    let event_id = sent.1["event_id"].as_str().unwrap().to_owned();
    let push = gateway.next().await;
    let n = &push["notification"];
    assert_eq!(n["event_id"], event_id, "{push}");
    assert_eq!(n["room_id"], room);
    assert_eq!(n["type"], "m.room.message");
    assert_eq!(n["sender"], "@alice:localhost");
    assert_eq!(n["room_name"], "Team");
    assert_eq!(n["content"]["body"], "lunch at noon?");
    assert_eq!(n["counts"]["unread"], 1);
    assert_eq!(n["prio"], "low", "a plain group message is not urgent");
    let device = &n["devices"][0];
    assert_eq!(device["app_id"], "com.example.chat");
    assert_eq!(device["pushkey"], "k1");
    assert!(device["pushkey_ts"].is_u64());
    assert!(device["data"].get("url").is_none(), "the gateway URL is not echoed: {device}");

    // A mention highlights, with the sound tweak, at high priority; the badge counts both.
    let mention = json!({
        "msgtype": "m.text", "body": "bob: review please",
        "m.mentions": { "user_ids": [bob_id] },
    });
    let path = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/t2");
    assert_eq!(s.put(&path, Some(&alice), mention).await.0, StatusCode::OK);
    let push = gateway.next().await;
    let n = &push["notification"];
    assert!(n.get("prio").is_none_or(|p| p == "high"), "high (the default when omitted): {push}");
    assert_eq!(n["counts"]["unread"], 2);
    let tweaks = n["devices"][0]["tweaks"].as_object().unwrap();
    assert_eq!(tweaks["highlight"], true, "{push}");
    assert_eq!(tweaks["sound"], "default");

    // Reading the room resets the badge.
    let last =
        s.send_text(&alice, &room, "t3", "thanks").await.1["event_id"].as_str().unwrap().to_owned();
    gateway.next().await;
    let receipt =
        format!("/_matrix/client/v3/rooms/{room}/receipt/m.read/{}", crate::common::enc(&last));
    assert_eq!(s.post(&receipt, Some(&bob), json!({})).await.0, StatusCode::OK);
    s.send_text(&alice, &room, "t4", "one more").await;
    assert_eq!(gateway.next().await["notification"]["counts"]["unread"], 1);

    // The sender's own messages never push to the sender.
    let (_, alice_pushers) = s.get("/_matrix/client/v3/pushers", Some(&alice)).await;
    assert_eq!(alice_pushers["pushers"], json!([]));
}

#[tokio::test]
async fn event_id_only_pushers_get_ids_and_counts_only() {
    let s = TestServer::start().await;
    let mut gateway = Gateway::start(&[]).await;
    let (alice, _, bob, room) = pair(&s).await;
    let body = pusher(&gateway.url(), "k2", Some("event_id_only"));
    assert_eq!(s.post("/_matrix/client/v3/pushers/set", Some(&bob), body).await.0, StatusCode::OK);
    let event_id = s.send_text(&alice, &room, "t1", "secret plans").await.1["event_id"].clone();
    let push = gateway.next().await;
    let n = &push["notification"];
    assert_eq!(n["event_id"], event_id, "{push}");
    assert_eq!(n["room_id"], room);
    assert_eq!(n["counts"]["unread"], 1);
    assert_eq!(n["devices"][0]["data"]["format"], "event_id_only");
    for field in ["content", "sender", "type", "room_name", "sender_display_name"] {
        assert!(n.get(field).is_none(), "{field} must not be sent: {push}");
    }
}

#[tokio::test]
async fn rejected_pushkeys_are_removed_and_pushers_can_be_deleted() {
    let s = TestServer::start().await;
    let mut gateway = Gateway::start(&["stale"]).await;
    let (alice, _, bob, room) = pair(&s).await;
    let set = "/_matrix/client/v3/pushers/set";
    assert_eq!(
        s.post(set, Some(&bob), pusher(&gateway.url(), "stale", None)).await.0,
        StatusCode::OK
    );
    s.send_text(&alice, &room, "t1", "hi").await;
    gateway.next().await;
    let mut removed = false;
    for _ in 0..100 {
        let (_, listed) = s.get("/_matrix/client/v3/pushers", Some(&bob)).await;
        if listed["pushers"] == json!([]) {
            removed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(removed, "a pushkey the gateway rejects is removed");

    // `kind: null` deletes; deleting again is fine.
    assert_eq!(s.post(set, Some(&bob), pusher(&gateway.url(), "k3", None)).await.0, StatusCode::OK);
    let delete = json!({ "kind": null, "app_id": "com.example.chat", "pushkey": "k3" });
    assert_eq!(s.post(set, Some(&bob), delete.clone()).await.0, StatusCode::OK);
    assert_eq!(s.post(set, Some(&bob), delete).await.0, StatusCode::OK);
    assert_eq!(s.get("/_matrix/client/v3/pushers", Some(&bob)).await.1["pushers"], json!([]));

    // Without `append`, the same pushkey moves from one account to the other.
    assert_eq!(s.post(set, Some(&bob), pusher(&gateway.url(), "k4", None)).await.0, StatusCode::OK);
    assert_eq!(
        s.post(set, Some(&alice), pusher(&gateway.url(), "k4", None)).await.0,
        StatusCode::OK
    );
    assert_eq!(s.get("/_matrix/client/v3/pushers", Some(&bob)).await.1["pushers"], json!([]));

    // Logging out removes the device's pushers.
    assert_eq!(
        s.post("/_matrix/client/v3/logout", Some(&alice), json!({})).await.0,
        StatusCode::OK
    );
    let (_, again, _) = {
        let (status, body) = s.login("alice", "correct horse").await;
        assert_eq!(status, StatusCode::OK);
        ((), body["access_token"].as_str().unwrap().to_owned(), ())
    };
    assert_eq!(s.get("/_matrix/client/v3/pushers", Some(&again)).await.1["pushers"], json!([]));
}

#[tokio::test]
async fn bad_pushers_get_clear_errors() {
    let s = TestServer::start_with(|c| c.outbound.allow_private_addresses = false).await;
    let (_, bob, _) = s.register("bob", "battery staple").await;
    let set = "/_matrix/client/v3/pushers/set";
    let wrong_path = pusher("https://push.example.com/notify", "k", None);
    assert_error(
        &s.post(set, Some(&bob), wrong_path).await,
        StatusCode::BAD_REQUEST,
        "M_INVALID_PARAM",
    );
    let loopback = pusher("http://127.0.0.1:9/_matrix/push/v1/notify", "k", None);
    assert_error(
        &s.post(set, Some(&bob), loopback).await,
        StatusCode::BAD_REQUEST,
        "M_INVALID_PARAM",
    );
    let mut email = pusher("https://push.example.com/_matrix/push/v1/notify", "a@b.c", None);
    email["kind"] = json!("email");
    assert_error(&s.post(set, Some(&bob), email).await, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    let no_url = json!({ "kind": "http", "app_id": "a", "pushkey": "k", "app_display_name": "A",
        "device_display_name": "D", "lang": "en", "data": {} });
    let result = s.post(set, Some(&bob), no_url).await;
    assert_eq!(result.0, StatusCode::BAD_REQUEST, "{}", result.1);
    let ok = pusher("https://push.example.com/_matrix/push/v1/notify", "k", None);
    assert_eq!(s.post(set, Some(&bob), ok).await.0, StatusCode::OK);
    assert_error(
        &s.get("/_matrix/client/v3/notifications?only=everything", Some(&bob)).await,
        StatusCode::BAD_REQUEST,
        "M_INVALID_PARAM",
    );
    assert_error(
        &s.get("/_matrix/client/v3/notifications?from=nonsense", Some(&bob)).await,
        StatusCode::BAD_REQUEST,
        "M_INVALID_PARAM",
    );
}

#[tokio::test]
async fn a_gateway_that_is_down_gets_the_push_after_a_restart() {
    let s = TestServer::start().await;
    // Reserve a port, then leave it closed while the message is sent.
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = reserved.local_addr().unwrap();
    drop(reserved);
    let url = format!("http://{addr}/_matrix/push/v1/notify");
    let (alice, _, bob, room) = pair(&s).await;
    let set = "/_matrix/client/v3/pushers/set";
    assert_eq!(s.post(set, Some(&bob), pusher(&url, "k5", None)).await.0, StatusCode::OK);
    let event_id =
        s.send_text(&alice, &room, "t1", "while you were out").await.1["event_id"].clone();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = s.restart().await;
    let mut gateway = Gateway::start_on(tokio::net::TcpListener::bind(addr).await.unwrap(), &[]);
    let push = gateway.next().await;
    assert_eq!(push["notification"]["event_id"], event_id, "{push}");
    drop(s);
}

#[tokio::test]
async fn pushes_queued_for_a_down_gateway_arrive_in_order_once_after_a_restart() {
    let s = TestServer::start().await;
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = reserved.local_addr().unwrap();
    drop(reserved);
    let down_url = format!("http://{addr}/_matrix/push/v1/notify");
    let mut live = Gateway::start(&[]).await;
    let (alice, _, bob, room) = pair(&s).await;
    let set = "/_matrix/client/v3/pushers/set";
    assert_eq!(s.post(set, Some(&bob), pusher(&down_url, "k6", None)).await.0, StatusCode::OK);
    assert_eq!(s.post(set, Some(&bob), pusher(&live.url(), "k7", None)).await.0, StatusCode::OK);
    let mut sent = Vec::new();
    for i in 0..3 {
        let event = s.send_text(&alice, &room, &format!("q{i}"), "queued").await.1;
        sent.push(event["event_id"].clone());
    }
    // A gateway that is down holds up no other pusher's queue.
    for event_id in &sent {
        assert_eq!(&live.next().await["notification"]["event_id"], event_id);
    }
    // The live gateway's pushes are acknowledged; the down one's wait.
    for _ in 0..500 {
        if s.server().services().gateway.queued() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(s.server().services().gateway.queued(), 3);
    let s = s.restart().await;
    let mut down = Gateway::start_on(tokio::net::TcpListener::bind(addr).await.unwrap(), &[]);
    for event_id in &sent {
        let push = down.next().await;
        assert_eq!(&push["notification"]["event_id"], event_id, "in order: {push}");
        assert_eq!(push["notification"]["devices"][0]["pushkey"], "k6");
    }
    drained(&s).await;
    down.assert_quiet(Duration::from_millis(1500), "each push arrives once").await;
    live.assert_quiet(Duration::from_millis(200), "delivered pushes are not sent again").await;
    drop(s);
}

#[tokio::test]
async fn pushes_left_in_the_old_queue_are_moved_to_the_outbox_at_start() {
    let s = TestServer::start().await;
    let mut gateway = Gateway::start(&[]).await;
    let (alice, bob_id, bob, room) = pair(&s).await;
    let set = "/_matrix/client/v3/pushers/set";
    assert_eq!(s.post(set, Some(&bob), pusher(&gateway.url(), "k8", None)).await.0, StatusCode::OK);
    let event_id = s.send_text(&alice, &room, "m1", "hello").await.1["event_id"].clone();
    assert_eq!(gateway.next().await["notification"]["event_id"], event_id);
    drained(&s).await;
    // Rows as an earlier version left them: one for the pusher, one for a pusher since gone.
    let s = s
        .restart_after(|path| {
            use plaza::storage::{Db, Table, tables};
            let db = Db::open(path, 8).unwrap();
            let table: Table<Value> = db.table(tables::PUSH_QUEUE);
            let mut batch = db.batch();
            for (sequence, pushkey) in [(1u64, "k8"), (2, "gone")] {
                let row = json!({
                    "user_id": bob_id, "app_id": "com.example.chat", "pushkey": pushkey,
                    "room_id": room, "event_id": event_id, "actions": ["notify"],
                    "queued_ms": plaza::service::now_ms(),
                });
                table.put(&mut batch, &sequence, &row);
            }
            db.write(batch).unwrap();
        })
        .await;
    let push = gateway.next().await;
    assert_eq!(push["notification"]["event_id"], event_id, "{push}");
    assert_eq!(push["notification"]["devices"][0]["pushkey"], "k8");
    drained(&s).await;
    // Moved once: another restart sends nothing more.
    let s = s.restart().await;
    gateway.assert_quiet(Duration::from_millis(1500), "moved once").await;
    drop(s);
}

#[tokio::test]
async fn notifications_list_pages_highlights_and_read_state() {
    let s = TestServer::start().await;
    let (alice, bob_id, bob, room) = pair(&s).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            s.send_text(&alice, &room, &format!("m{i}"), &format!("note {i}")).await.1["event_id"]
                .clone(),
        );
    }
    let mention =
        json!({ "msgtype": "m.text", "body": "bob?", "m.mentions": { "user_ids": [bob_id] } });
    let path = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/mention");
    let mention_id = s.put(&path, Some(&alice), mention).await.1["event_id"].clone();

    for _ in 0..100 {
        let (_, all) = s.get("/_matrix/client/v3/notifications", Some(&bob)).await;
        if all["notifications"].as_array().is_some_and(|n| n.len() == 6) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let listed = s.get("/_matrix/client/v3/notifications?limit=4", Some(&bob)).await.1;
    let page = listed["notifications"].as_array().unwrap();
    assert_eq!(page.len(), 4, "{listed}");
    assert_eq!(page[0]["event"]["event_id"], mention_id, "newest first");
    assert_eq!(page[0]["room_id"], room);
    assert_eq!(page[0]["read"], false);
    assert!(page[0]["actions"].as_array().unwrap().iter().any(|a| a["set_tweak"] == "highlight"));
    assert!(page[0]["ts"].is_u64());
    let next = listed["next_token"].as_str().expect("a next page").to_owned();
    let (_, rest) =
        s.get(&format!("/_matrix/client/v3/notifications?limit=4&from={next}"), Some(&bob)).await;
    let rest = rest["notifications"].as_array().unwrap();
    assert_eq!(rest.len(), 2, "{rest:?}");
    assert_eq!(rest[1]["event"]["event_id"], ids[0]);

    let (_, highlights) =
        s.get("/_matrix/client/v3/notifications?only=highlight", Some(&bob)).await;
    let highlights = highlights["notifications"].as_array().unwrap();
    assert_eq!(highlights.len(), 1);
    assert_eq!(highlights[0]["event"]["event_id"], mention_id);

    let receipt = format!(
        "/_matrix/client/v3/rooms/{room}/receipt/m.read/{}",
        crate::common::enc(ids[2].as_str().unwrap())
    );
    assert_eq!(s.post(&receipt, Some(&bob), json!({})).await.0, StatusCode::OK);
    let (_, after) = s.get("/_matrix/client/v3/notifications", Some(&bob)).await;
    let read: Vec<bool> = after["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["read"].as_bool().unwrap())
        .collect();
    assert_eq!(read, [false, false, false, true, true, true]);

    // alice's own messages never notify alice.
    let (_, own) = s.get("/_matrix/client/v3/notifications", Some(&alice)).await;
    assert_eq!(own["notifications"], json!([]));
}

#[tokio::test]
async fn a_hanging_or_garbled_gateway_never_holds_up_sending() {
    let s = TestServer::start().await;
    let hang = Router::new().route(
        "/_matrix/push/v1/notify",
        post(|| async {
            tokio::time::sleep(Duration::from_secs(120)).await;
            "never"
        }),
    );
    let garbage = Router::new().route("/_matrix/push/v1/notify", post(|| async { "}{ not json" }));
    let mut urls = Vec::new();
    for app in [hang, garbage] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        urls.push(format!("http://{}/_matrix/push/v1/notify", listener.local_addr().unwrap()));
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    }
    let (alice, _, bob, room) = pair(&s).await;
    let set = "/_matrix/client/v3/pushers/set";
    for (i, url) in urls.iter().enumerate() {
        let body = pusher(url, &format!("k{i}"), None);
        assert_eq!(s.post(set, Some(&bob), body).await.0, StatusCode::OK);
    }
    let started = std::time::Instant::now();
    for i in 0..20 {
        let sent = s.send_text(&alice, &room, &format!("t{i}"), "ping").await;
        assert_eq!(sent.0, StatusCode::OK, "{}", sent.1);
    }
    assert!(started.elapsed() < Duration::from_secs(10), "sends are not held up");
    let (status, _) = s.get("/_matrix/client/v3/pushers", Some(&bob)).await;
    assert_eq!(status, StatusCode::OK);
}

/// `user`'s notifications, paging `limit` at a time: `(event id, highlight)` newest first.
async fn all_notifications(s: &TestServer, user: &str, limit: usize) -> Vec<(String, bool)> {
    let mut listed = Vec::new();
    let mut from = String::new();
    loop {
        let path = format!("/_matrix/client/v3/notifications?limit={limit}{from}");
        let (status, page) = s.get(&path, Some(user)).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        for n in page["notifications"].as_array().unwrap() {
            let highlight =
                n["actions"].as_array().unwrap().iter().any(|a| a["set_tweak"] == "highlight");
            listed.push((n["event"]["event_id"].as_str().unwrap().to_owned(), highlight));
        }
        match page["next_token"].as_str() {
            Some(next) => from = format!("&from={next}"),
            None => return listed,
        }
    }
}

#[tokio::test]
async fn the_notifier_finds_names_keywords_and_invites_and_pages_through_bursts() {
    let s = TestServer::start().await;
    let (alice, bob_id, bob, room) = pair(&s).await;
    let member = format!("/_matrix/client/v3/rooms/{room}/state/m.room.member/{bob_id}");
    let named = json!({ "membership": "join", "displayname": "Robert" });
    assert_eq!(s.put(&member, Some(&bob), named).await.0, StatusCode::OK);
    // carol turns off notifications for ordinary messages: only her own rules differ.
    let carol = s.login("carol", "tr0ub4dor").await.1["access_token"].as_str().unwrap().to_owned();
    let message_rule = "/_matrix/client/v3/pushrules/global/underride/.m.rule.message/enabled";
    assert_eq!(
        s.put(message_rule, Some(&carol), json!({ "enabled": false })).await.0,
        StatusCode::OK
    );
    let highlight = json!(["notify", { "set_tweak": "highlight" }]);
    for (id, pattern) in [("budget", "budget"), ("deadline", "deadl*")] {
        let rule = json!({ "pattern": pattern, "actions": highlight });
        let path = format!("/_matrix/client/v3/pushrules/global/content/{id}");
        assert_eq!(s.put(&path, Some(&bob), rule).await.0, StatusCode::OK);
    }
    let bodies = [
        ("plain", "hello all", false),
        ("name", "ROBERT, look at this", true),
        ("user", "ping bob please", true),
        ("keyword", "the Budget is due", true),
        ("wildcard", "deadlines!", true),
        ("part", "robertson and bobby were here", false),
    ];
    let mut expected = Vec::new();
    for (txn, body, highlights) in bodies {
        let id =
            s.send_text(&alice, &room, txn, body).await.1["event_id"].as_str().unwrap().to_owned();
        expected.push((id, highlights));
    }
    // A burst sent at once is judged in few batches: each of its events listed once.
    let txns: Vec<String> = (0..12).map(|i| format!("b{i}")).collect();
    let burst = txns.iter().map(|txn| s.send_text(&alice, &room, txn, "burst"));
    let burst: Vec<String> = futures_util::future::join_all(burst)
        .await
        .into_iter()
        .map(|(_, sent)| sent["event_id"].as_str().unwrap().to_owned())
        .collect();
    let (dave_id, dave, _) = s.register("dave", "hunter22").await;
    let invite = format!("/_matrix/client/v3/rooms/{room}/invite");
    assert_eq!(
        s.post(&invite, Some(&alice), json!({ "user_id": dave_id })).await.0,
        StatusCode::OK
    );

    let mut listed = Vec::new();
    for _ in 0..100 {
        listed = all_notifications(&s, &bob, 5).await;
        if listed.len() >= expected.len() + burst.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut seen: Vec<&str> = listed.iter().map(|(id, _)| id.as_str()).collect();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), listed.len(), "each listed once: {listed:?}");
    assert_eq!(listed.len(), expected.len() + burst.len(), "{listed:?}");
    assert!(burst.iter().all(|id| seen.contains(&id.as_str())));
    // The messages sent one after another come last, newest first, highlighted as their
    // rules say (word boundaries: "robertson" and "bobby" do not name bob).
    let mut singles = listed[burst.len()..].to_vec();
    singles.reverse();
    assert_eq!(singles, expected);

    let mut invited = Vec::new();
    for _ in 0..100 {
        invited = all_notifications(&s, &dave, 5).await;
        if !invited.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(invited.len(), 1, "the invite notifies dave: {invited:?}");
    assert_eq!(all_notifications(&s, &carol, 5).await, [], "carol turned messages off");
}

#[tokio::test]
async fn retention_removes_own_and_shared_runs_alike() {
    let s = TestServer::start().await;
    let (alice, bob_id, bob, room) = pair(&s).await;
    // bob alone is mentioned (a run of his own); everyone is notified of the rest (shared).
    let mention =
        json!({ "msgtype": "m.text", "body": "bob?", "m.mentions": { "user_ids": [bob_id] } });
    let path = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/r0");
    assert_eq!(s.put(&path, Some(&alice), mention).await.0, StatusCode::OK);
    for i in 1..4 {
        s.send_text(&alice, &room, &format!("r{i}"), "for everyone").await;
    }
    let mut listed = Vec::new();
    for _ in 0..100 {
        listed = all_notifications(&s, &bob, 2).await;
        if listed.len() == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(listed.len(), 4, "{listed:?}");
    let services = s.server().services().clone();
    let now = plaza::service::now_ms();
    let week_ago = now - 7 * 86_400_000;
    let kept = plaza::service::push::notifications::prune_before(&services, week_ago).unwrap();
    assert_eq!(kept, 0);
    assert_eq!(all_notifications(&s, &bob, 2).await.len(), 4);
    let removed = plaza::service::push::notifications::prune_before(&services, now + 1).unwrap();
    assert_eq!(removed, 8, "bob's four and carol's four");
    assert!(all_notifications(&s, &bob, 2).await.is_empty());
    assert!(services.notifier.runs().scan_prefix(Vec::new()).next().is_none());
}
