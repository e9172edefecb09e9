//! Admin analytics: a scripted day of messages with replies, a thread, a direct chat and polls
//! gives exactly the expected counts, medians, p90s and tallies (computed here from the stored
//! timestamps); only admins and auditors may read; bad ranges and filters are refused.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{TestServer, assert_error, enc};

const BASE: &str = "/_plaza/admin/v1/analytics";

static TXN: AtomicU64 = AtomicU64::new(0);

/// Sends an event of `kind` as `token`; returns its id and `origin_server_ts`.
async fn send(
    s: &TestServer,
    token: &str,
    room: &str,
    kind: &str,
    content: Value,
) -> (String, u64) {
    let txn = TXN.fetch_add(1, Ordering::SeqCst);
    let path = format!("/_matrix/client/v3/rooms/{room}/send/{kind}/t{txn}");
    let (status, body) = s.put(&path, Some(token), content).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let event_id = body["event_id"].as_str().unwrap().to_owned();
    let path = format!("/_matrix/client/v3/rooms/{room}/event/{}", enc(&event_id));
    let (status, event) = s.get(&path, Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{event}");
    (event_id, event["origin_server_ts"].as_u64().unwrap())
}

fn text(body: &str) -> Value {
    json!({ "msgtype": "m.text", "body": body })
}

fn reply(body: &str, to: &str) -> Value {
    json!({ "msgtype": "m.text", "body": body, "m.relates_to": { "m.in_reply_to": { "event_id": to } } })
}

fn reference(poll: &str) -> Value {
    json!({ "rel_type": "m.reference", "event_id": poll })
}

async fn pause(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// The nearest-rank `p`th percentile, computed independently of the server.
fn percentile(samples: &[u64], p: usize) -> u64 {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1]
}

fn times(samples: &[u64]) -> Value {
    json!({ "count": samples.len(), "median_ms": percentile(samples, 50), "p90_ms": percentile(samples, 90) })
}

/// The range `from=yesterday&to=tomorrow` in ms, so a run across midnight still covers it.
fn around_now() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let now = now.as_millis() as u64;
    format!("from={}&to={}", now - 86_400_000, now + 86_400_000)
}

struct Day {
    admin: String,
    group: String,
    direct: String,
    alice: String,
    bob: String,
    carol: String,
    /// `(room, responder, delay)` of every answer the script makes.
    answers: Vec<(String, String, u64)>,
    stable_poll: String,
    unstable_poll: String,
}

/// Registers the cast and plays the scripted day.
async fn scripted_day(s: &TestServer) -> Day {
    let (admin, admin_token, _) = s.register("root", "password-r").await;
    s.set_role(&admin, "admin");
    let (alice, a, _) = s.register("alice", "password-a").await;
    let (bob, b, _) = s.register("bob", "password-b").await;
    let (carol, c, _) = s.register("carol", "password-c").await;
    let group = s.create_room(&a, json!({ "preset": "public_chat", "name": "Support" })).await;
    for token in [&b, &c] {
        assert_eq!(s.membership(token, &group, "join", json!({})).await.0, StatusCode::OK);
    }
    let direct = s.create_room(&a, json!({ "invite": [bob], "is_direct": true })).await;
    assert_eq!(s.membership(&b, &direct, "join", json!({})).await.0, StatusCode::OK);

    let mut answers = Vec::new();
    let mut answer = |room: &str, who: &str, asked: u64, answered: u64| {
        answers.push((room.to_owned(), who.to_owned(), answered - asked));
    };
    // The group room: only replies and thread answers count.
    let (m1, t1) = send(s, &a, &group, "m.room.message", text("How do I reset my key?")).await;
    pause(40).await;
    let (m2, t2) = send(s, &b, &group, "m.room.message", reply("Settings, Security", &m1)).await;
    answer(&group, &bob, t1, t2);
    let (m3, t3) = send(s, &c, &group, "m.room.message", text("Is the VPN down?")).await;
    pause(90).await;
    let thread = json!({ "msgtype": "m.text", "body": "Looking",
        "m.relates_to": { "rel_type": "m.thread", "event_id": m3, "is_falling_back": true,
            "m.in_reply_to": { "event_id": m3 } } });
    let (_, t4) = send(s, &a, &group, "m.room.message", thread).await;
    answer(&group, &alice, t3, t4);
    send(s, &b, &group, "m.room.message", reply("(own message)", &m2)).await;
    send(s, &c, &group, "m.room.message", reply("already answered", &m1)).await;
    send(s, &a, &group, "m.room.message", text("Plain, never answered")).await;

    // The direct chat: the other member's next message answers every waiting one.
    let (_, d1) = send(s, &a, &direct, "m.room.message", text("Lunch?")).await;
    pause(20).await;
    let (_, d2) = send(s, &a, &direct, "m.room.message", text("Today?")).await;
    pause(130).await;
    let (_, d3) = send(s, &b, &direct, "m.room.message", text("Sure")).await;
    answer(&direct, &bob, d1, d3);
    answer(&direct, &bob, d2, d3);
    pause(60).await;
    let (_, d4) = send(s, &a, &direct, "m.room.message", text("Noon")).await;
    answer(&direct, &alice, d3, d4);

    // A stable poll: latest response per user, first max_selections answers, spoiled
    // responses, nothing after the end.
    let start = json!({ "m.text": [{ "body": "Lunch?" }], "m.poll": {
        "kind": "m.disclosed", "max_selections": 1,
        "question": { "m.text": [{ "body": "Where to eat?" }] },
        "answers": [
            { "m.id": "pizza", "m.text": [{ "body": "Pizza" }] },
            { "m.id": "sushi", "m.text": [{ "body": "Sushi" }] },
            { "m.id": "salad", "m.text": [{ "body": "Salad" }] },
        ] } });
    let (poll, _) = send(s, &a, &group, "m.poll.start", start).await;
    let response = |ids: &[&str]| json!({ "m.selections": ids, "m.relates_to": reference(&poll) });
    send(s, &b, &group, "m.poll.response", response(&["pizza"])).await;
    pause(5).await;
    send(s, &b, &group, "m.poll.response", response(&["sushi"])).await;
    send(s, &c, &group, "m.poll.response", response(&["pizza", "salad"])).await;
    send(s, &a, &group, "m.poll.response", response(&["sushi", "fondue"])).await;
    let end = json!({ "m.text": [{ "body": "Ended" }], "m.relates_to": reference(&poll) });
    send(s, &c, &group, "m.poll.end", end.clone()).await; // not the asker: no effect
    pause(5).await;
    send(s, &a, &group, "m.poll.end", end).await;
    pause(5).await;
    send(s, &c, &group, "m.poll.response", response(&["salad"])).await;

    // An unstable poll with two selections, still open.
    let start = json!({ "org.matrix.msc1767.text": "Colour?", "org.matrix.msc3381.poll.start": {
        "kind": "org.matrix.msc3381.poll.undisclosed", "max_selections": 2,
        "question": { "org.matrix.msc1767.text": "Colour?" },
        "answers": [
            { "id": "red", "org.matrix.msc1767.text": "Red" },
            { "id": "blue", "org.matrix.msc1767.text": "Blue" },
        ] } });
    let (unstable_poll, _) = send(s, &b, &group, "org.matrix.msc3381.poll.start", start).await;
    for (token, ids) in [(&a, json!(["red", "blue"])), (&c, json!(["blue"]))] {
        let content = json!({ "org.matrix.msc3381.poll.response": { "answers": ids },
            "m.relates_to": reference(&unstable_poll) });
        send(s, token, &group, "org.matrix.msc3381.poll.response", content).await;
    }
    Day {
        admin: admin_token,
        group,
        direct,
        alice,
        bob,
        carol,
        answers,
        stable_poll: poll,
        unstable_poll,
    }
}

#[tokio::test]
async fn scripted_day_gives_exact_counts_times_and_tallies() {
    let s = TestServer::start().await;
    let day = scripted_day(&s).await;
    let range = around_now();
    let get = |path: String| {
        let (s, token) = (&s, day.admin.clone());
        async move {
            let (status, body) = s.get(&format!("{BASE}/{path}"), Some(&token)).await;
            assert_eq!(status, StatusCode::OK, "{path}: {body}");
            body
        }
    };

    // Response times: overall, per room, per answering user.
    let all: Vec<u64> = day.answers.iter().map(|a| a.2).collect();
    let body = get(format!("response_times?group_by=room&{range}")).await;
    assert_eq!(body["overall"], times(&all), "{body}");
    for room in [&day.group, &day.direct] {
        let samples: Vec<u64> = day.answers.iter().filter(|a| &a.0 == room).map(|a| a.2).collect();
        let mut expected = times(&samples);
        expected["room_id"] = json!(room);
        let rows = body["rows"].as_array().unwrap();
        assert!(rows.contains(&expected), "{expected} in {body}");
    }
    let body = get(format!("response_times?group_by=user&{range}")).await;
    let mut by_user: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for (_, who, delay) in &day.answers {
        by_user.entry(who).or_default().push(*delay);
    }
    assert_eq!(body["rows"].as_array().unwrap().len(), by_user.len(), "{body}");
    for (user, samples) in &by_user {
        let mut expected = times(samples);
        expected["user_id"] = json!(user);
        assert!(body["rows"].as_array().unwrap().contains(&expected), "{expected} in {body}");
    }
    let body = get(format!("response_times?group_by=day&room_id={}&{range}", day.direct)).await;
    let direct: Vec<u64> = day.answers.iter().filter(|a| a.0 == day.direct).map(|a| a.2).collect();
    assert_eq!(body["overall"], times(&direct), "{body}");

    // Messages: 9 in the group room (the poll starts included, poll responses and ends not),
    // 4 in the direct chat.
    let body = get(format!("messages?group_by=room&{range}")).await;
    assert_eq!(body["total"], 13, "{body}");
    assert_eq!(body["rows"][0], json!({ "room_id": day.group, "messages": 9 }), "{body}");
    assert_eq!(body["rows"][1], json!({ "room_id": day.direct, "messages": 4 }), "{body}");
    let body = get(format!("messages?group_by=room,user&room_id={}&{range}", day.group)).await;
    let rows = body["rows"].as_array().unwrap();
    let count =
        |user: &str| rows.iter().find(|r| r["user_id"] == user).unwrap()["messages"].clone();
    assert_eq!(
        (count(&day.alice), count(&day.bob), count(&day.carol)),
        (json!(4), json!(3), json!(2))
    );
    let body = get(format!("rooms/top?limit=1&{range}")).await;
    assert_eq!(
        body["rooms"],
        json!([{ "room_id": day.group, "name": "Support", "messages": 9, "senders": 3 }])
    );

    // Polls: bob's latest (sushi), carol's first selection only (pizza), alice's spoiled,
    // carol's after the end ignored.
    let body = get(format!("polls/{}", enc(&day.stable_poll))).await;
    let votes: Vec<(&str, u64)> = body["answers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["id"].as_str().unwrap(), a["votes"].as_u64().unwrap()))
        .collect();
    assert_eq!(votes, [("pizza", 1), ("sushi", 1), ("salad", 0)], "{body}");
    assert_eq!(body["voters"], 2);
    assert_eq!(body["question"], "Where to eat?");
    assert!(body["ended_ts"].is_u64(), "{body}");
    let body = get(format!("polls?room_id={}&{range}", day.group)).await;
    let polls = body["polls"].as_array().unwrap();
    assert_eq!(polls.len(), 2, "{body}");
    assert_eq!(polls[1]["event_id"], day.unstable_poll);
    assert_eq!(polls[1]["answers"][0]["votes"], 1);
    assert_eq!(polls[1]["answers"][1]["votes"], 2);
    assert_eq!(polls[1]["ended_ts"], Value::Null);

    // Accounts and activity: four accounts, all active today.
    let body = get(format!("new_users?{range}")).await;
    assert_eq!(body["total"], 4, "{body}");
    let body = get(format!("active_users?{range}")).await;
    assert_eq!(body["distinct_users"], 4, "{body}");
    let today = body["days"].as_array().unwrap().iter().map(|d| d["daily"].as_u64().unwrap());
    assert_eq!(today.sum::<u64>(), 4, "{body}");
    let last = body["days"].as_array().unwrap().last().unwrap().clone();
    assert_eq!((last["weekly"].clone(), last["monthly"].clone()), (json!(4), json!(4)), "{body}");

    // CSV: a header line, then rows.
    let url = format!("{}{BASE}/response_times?group_by=room&format=csv&{range}", s.base);
    let response = s.http.get(url).bearer_auth(&day.admin).send().await.unwrap();
    assert_eq!(response.headers()["content-type"], "text/csv; charset=utf-8");
    let csv = response.text().await.unwrap();
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("room_id,count,median_ms,p90_ms"));
    assert_eq!(lines.count(), 2, "{csv}");
}

#[tokio::test]
async fn uploads_and_encrypted_rooms_count_metadata_only() {
    let s = TestServer::start().await;
    let (admin, token, _) = s.register("root", "password-r").await;
    s.set_role(&admin, "admin");
    let url = format!("{}/_matrix/media/v3/upload", s.base);
    let response = s.http.post(url).bearer_auth(&token).body(vec![7u8; 1234]).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let room = s
        .create_room(
            &token,
            json!({ "initial_state": [{ "type": "m.room.encryption",
            "state_key": "", "content": { "algorithm": "m.megolm.v1.aes-sha2" } }] }),
        )
        .await;
    let ciphertext = json!({ "algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "AwgA",
        "sender_key": "k", "device_id": "D", "session_id": "s" });
    send(&s, &token, &room, "m.room.encrypted", ciphertext).await;
    let start = json!({ "m.poll": { "question": { "m.text": [{ "body": "Secret?" }] },
        "answers": [{ "m.id": "y", "m.text": [{ "body": "Yes" }] }] } });
    send(&s, &token, &room, "m.poll.start", start).await;

    let range = around_now();
    let (_, body) = s.get(&format!("{BASE}/uploads?{range}"), Some(&token)).await;
    assert_eq!((body["total"].clone(), body["total_bytes"].clone()), (json!(1), json!(1234)));
    let (_, body) = s.get(&format!("{BASE}/messages?group_by=room&{range}"), Some(&token)).await;
    assert_eq!(body["rows"], json!([{ "room_id": room, "messages": 2 }]), "{body}");
    let (_, body) = s.get(&format!("{BASE}/polls?{range}"), Some(&token)).await;
    assert_eq!(body["polls"], json!([]), "{body}");

    // After a restart with the account and upload indexes gone (as before they existed), they
    // are rebuilt from the accounts and media; the other aggregates were stored with the events.
    let s = s
        .restart_after(|path| {
            use plaza::storage::{Db, Table, tables};
            let db = Db::open(path, 8).unwrap();
            let mut batch = db.batch();
            for name in [tables::USERS_BY_CREATION, tables::MEDIA_UPLOADS] {
                let table: Table<Value> = db.table(name);
                for item in table.scan_prefix(Vec::new()) {
                    table.delete_raw(&mut batch, &item.unwrap().0);
                }
            }
            db.write(batch).unwrap();
        })
        .await;
    let (_, body) = s.get(&format!("{BASE}/uploads?{range}"), Some(&token)).await;
    assert_eq!((body["total"].clone(), body["total_bytes"].clone()), (json!(1), json!(1234)));
    let (_, body) = s.get(&format!("{BASE}/new_users?{range}"), Some(&token)).await;
    assert_eq!(body["total"], 1, "{body}");
    let (_, body) = s.get(&format!("{BASE}/messages?{range}"), Some(&token)).await;
    assert_eq!(body["total"], 2, "{body}");
}

#[tokio::test]
async fn only_staff_read_analytics_and_bad_parameters_are_refused() {
    let s = TestServer::start().await;
    let (admin, admin_token, _) = s.register("root", "password-r").await;
    let (auditor, auditor_token, _) = s.register("audrey", "password-a").await;
    let (_, user_token, _) = s.register("ursula", "password-u").await;
    s.set_role(&admin, "admin");
    s.set_role(&auditor, "auditor");
    let routes = [
        "active_users",
        "messages",
        "rooms/top",
        "new_users",
        "uploads",
        "response_times",
        "polls",
        "polls/%24unknown",
    ];
    for route in routes {
        let path = format!("{BASE}/{route}");
        assert_error(&s.get(&path, Some(&user_token)).await, StatusCode::FORBIDDEN, "M_FORBIDDEN");
        assert_error(&s.get(&path, None).await, StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN");
        let expected =
            if route.starts_with("polls/") { StatusCode::NOT_FOUND } else { StatusCode::OK };
        for token in [&admin_token, &auditor_token] {
            let (status, body) = s.get(&path, Some(token)).await;
            assert_eq!(status, expected, "{route}: {body}");
        }
    }
    let bad = [
        "messages?from=2026-03-02&to=2026-03-01",
        "messages?from=2024-01-01&to=2025-12-31",
        "active_users?from=2023-02-29",
        "active_users?to=yesterday",
        "messages?group_by=week",
        "response_times?group_by=",
        "response_times?room_id=not-a-room",
        "messages?user_id=nobody",
        "uploads?format=xml",
        "rooms/top?limit=0",
        "polls?limit=5000",
    ];
    for query in bad {
        let result = s.get(&format!("{BASE}/{query}"), Some(&auditor_token)).await;
        assert_error(&result, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    }
}

/// Feeds events with chosen timestamps straight to the aggregates, as the room service does
/// after authorising them, so the reply times are known to the millisecond.
#[tokio::test]
async fn known_reply_times_give_exact_medians_and_p90s() {
    use plaza::service::rooms::pdu::StoredPdu;
    use ruma::{RoomVersionId, canonical_json::to_canonical_value};

    let s = TestServer::start().await;
    let (admin, token, _) = s.register("root", "password-r").await;
    s.set_role(&admin, "admin");
    let services = s.server().services().clone();
    let room = "!known:localhost";
    let store = |id: String, sender: &str, ts: u64, content: Value| {
        let wire = json!({ "type": "m.room.message", "room_id": room, "sender": sender,
            "origin_server_ts": ts, "content": content });
        let ruma::CanonicalJsonValue::Object(wire) = to_canonical_value(wire).unwrap() else {
            unreachable!()
        };
        let (event_id, room_id) = (ruma::EventId::parse(id).unwrap(), ruma::RoomId::parse(room));
        let event = StoredPdu::received(event_id, room_id.unwrap(), wire);
        let mut batch = services.db.batch();
        services.analytics.record(&mut batch, &services, &event, 0, &RoomVersionId::V11).unwrap();
        services.db.write(batch).unwrap();
    };
    // 2023-11-14, 08:00 UTC: alice asks ten questions an hour apart; bob answers the n-th after
    // n minutes. Carol asks three; alice answers after 2, 4 and 6 minutes.
    let (minute, hour) = (60_000, 3_600_000);
    let start = 19_675 * 86_400_000 + 8 * hour;
    for n in 1..=10 {
        let asked = start + n * hour;
        store(format!("$q{n}"), "@alice:localhost", asked, text("?"));
        store(
            format!("$a{n}"),
            "@bob:localhost",
            asked + n * minute,
            reply("!", &format!("$q{n}")),
        );
    }
    for (n, delay) in [(1, 2), (2, 4), (3, 6)] {
        let asked = start + 12 * hour + n * hour;
        store(format!("$c{n}"), "@carol:localhost", asked, text("?"));
        store(
            format!("$r{n}"),
            "@alice:localhost",
            asked + delay * minute,
            reply("!", &format!("$c{n}")),
        );
    }

    let path = format!("{BASE}/response_times?group_by=user&from=2023-11-14&to=2023-11-14");
    let (status, body) = s.get(&path, Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Thirteen samples: 1..=10 minutes, 2, 4, 6: nearest-rank median is the 7th (5 minutes),
    // p90 the 12th (9 minutes).
    assert_eq!(body["overall"], json!({ "count": 13, "median_ms": 300_000, "p90_ms": 540_000 }));
    assert_eq!(
        body["rows"],
        json!([
            { "user_id": "@bob:localhost", "count": 10, "median_ms": 300_000, "p90_ms": 540_000 },
            { "user_id": "@alice:localhost", "count": 3, "median_ms": 240_000, "p90_ms": 360_000 },
        ])
    );
    let (_, body) = s
        .get(&format!("{BASE}/messages?group_by=day&from=2023-11-14&to=2023-11-15"), Some(&token))
        .await;
    assert_eq!(body["rows"], json!([{ "day": "2023-11-14", "messages": 26 }]), "{body}");
}
