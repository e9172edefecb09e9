//! Simplified sliding sync (MSC4186) scenarios: the first answer for an account in 1,500
//! rooms with a 20-room window, how fast a message wakes 100 waiting connections, and the
//! server memory an idle connection holds.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{Error, Target, User, percentile, record_latency};

const PATH: &str = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync";
const ROOMS: usize = 1500;
const LISTENERS: usize = 100;
const ROUNDS: usize = 30;
/// Idle connections opened to measure memory: devices × connections per device.
const DEVICES: usize = 125;
const PER_DEVICE: usize = 16;

/// What Element X asks of each room in its room list.
fn room_list(conn_id: &str) -> Value {
    json!({
        "conn_id": conn_id,
        "lists": { "all_rooms": {
            "ranges": [[0, 19]],
            "timeline_limit": 1,
            "required_state": [
                ["m.room.name", ""], ["m.room.encryption", ""], ["m.room.member", "$LAZY"],
                ["m.room.member", "$ME"], ["m.room.topic", ""], ["m.room.avatar", ""],
                ["m.room.canonical_alias", ""], ["m.room.power_levels", ""],
                ["m.room.join_rules", ""], ["m.room.create", ""], ["m.room.history_visibility", ""],
            ],
        } },
        "extensions": { "receipts": { "enabled": true }, "typing": { "enabled": true },
            "account_data": { "enabled": true } },
    })
}

async fn slide(
    target: &Target,
    user: &User,
    query: &str,
    body: Value,
) -> Result<(Value, usize), Error> {
    target.call(reqwest::Method::POST, user, &format!("{PATH}?{query}"), Some(body)).await
}

/// The sliding-sync rows of the table.
pub async fn rows(target: &Target) -> Result<Vec<[String; 3]>, Error> {
    let id = std::process::id();
    let many = target.register(&format!("slider_{id}")).await?;
    for i in 0..ROOMS {
        target.create_room(&many, json!({ "name": format!("room {i}") })).await?;
    }
    let mut rows = Vec::new();

    // 1. The first answer of new connections (the first of all also builds the recency index).
    let mut times = Vec::new();
    let mut size = 0;
    for run in 0..5 {
        let started = Instant::now();
        let (body, bytes) =
            slide(target, &many, "timeout=0", room_list(&format!("first{run}"))).await?;
        times.push(started.elapsed());
        size = bytes;
        let count = body["lists"]["all_rooms"]["count"].as_u64().unwrap_or_default();
        let rooms = body["rooms"].as_object().map_or(0, |r| r.len());
        if count != ROOMS as u64 || rooms != 20 {
            return Err(
                format!("expected {ROOMS} rooms and a window of 20: {count}, {rooms}").into()
            );
        }
    }
    let first = times[0];
    times.sort();
    rows.push([
        "sliding sync: first answer, 1,500 rooms, 20-room window".into(),
        "< 100 ms".into(),
        format!(
            "{:.1} ms median of 5 new connections ({:.1} ms the very first), {:.1} KB",
            percentile(&times, 0.5).as_secs_f64() * 1e3,
            first.as_secs_f64() * 1e3,
            size as f64 / 1e3
        ),
    ]);

    // 2. A message wakes 100 waiting connections: send 200 → each answer.
    rows.push(wake_latency(target).await?);

    // 3. Memory per idle connection.
    let before = crate::rss_mb();
    let mut opened = 0usize;
    for d in 0..DEVICES {
        let device = login(target, &many.id).await?;
        for c in 0..PER_DEVICE {
            slide(target, &device, "timeout=0", room_list(&format!("idle{d}_{c}"))).await?;
            opened += 1;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let result = match (before, crate::rss_mb()) {
        (Some(before), Some(after)) => {
            let per = (after - before).max(0.0) * 1024.0 / opened as f64;
            format!("{per:.1} KB ({opened} connections, RSS {before:.0} → {after:.0} MB)")
        }
        _ => "n/a (another server's memory)".into(),
    };
    rows.push(["sliding sync: server memory per idle connection".into(), "< 20 KB".into(), result]);
    Ok(rows)
}

/// A new device of `user_id` (password login).
async fn login(target: &Target, user_id: &str) -> Result<User, Error> {
    let body = json!({ "type": "m.login.password", "password": "bench password 1",
        "identifier": { "type": "m.id.user", "user": user_id } });
    let response = target
        .http
        .post(format!("{}/_matrix/client/v3/login", target.base))
        .json(&body)
        .send()
        .await?;
    let logged_in: Value = response.json().await?;
    let token = logged_in["access_token"].as_str().ok_or_else(|| format!("login: {logged_in}"))?;
    Ok(User { id: user_id.to_owned(), token: token.to_owned() })
}

/// 100 members each hold a waiting connection; the owner sends; time from the send's 200 to
/// each connection's answer carrying it.
async fn wake_latency(target: &Target) -> Result<[String; 3], Error> {
    let id = std::process::id();
    let owner = target.register(&format!("waker_{id}")).await?;
    let room = target.create_room(&owner, json!({ "preset": "public_chat" })).await?;
    let mut members = Vec::new();
    for i in 0..LISTENERS {
        let user = target.register(&format!("waiter{i}_{id}")).await?;
        target.join(&user, &room).await?;
        members.push(user);
    }
    let (sent_at_tx, _) = tokio::sync::broadcast::channel::<(String, Instant)>(1024);
    let latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut listeners = Vec::new();
    let body = json!({ "conn_id": "wake", "lists": { "all": { "ranges": [[0, 9]], "timeline_limit": 5 } } });
    for user in members {
        let (target, room, latencies, body) =
            (target.clone(), room.clone(), latencies.clone(), body.clone());
        let mut sent_at = sent_at_tx.subscribe();
        let (first, _) = slide(&target, &user, "timeout=0", body.clone()).await?;
        let mut pos = first["pos"].as_str().unwrap_or_default().to_owned();
        listeners.push(tokio::spawn(async move {
            let mut seen = 0;
            let mut pending = std::collections::HashMap::new();
            while seen < ROUNDS {
                let query = format!("timeout=10000&pos={pos}");
                let (answer, _) = slide(&target, &user, &query, body.clone()).await?;
                let returned = Instant::now();
                pos = answer["pos"].as_str().unwrap_or_default().to_owned();
                while let Ok((event, at)) = sent_at.try_recv() {
                    pending.insert(event, at);
                }
                for event in answer["rooms"][&room]["timeline"].as_array().into_iter().flatten() {
                    if event["content"]["body"] != "wake" {
                        continue;
                    }
                    seen += 1;
                    let id = event["event_id"].as_str().unwrap_or_default();
                    record_latency(&mut pending, &mut sent_at, id, returned, &latencies).await;
                }
            }
            Ok::<(), Error>(())
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..ROUNDS {
        let event = target.send(&owner, &room, &format!("w{i}"), "wake").await?;
        let _ = sent_at_tx.send((event, Instant::now()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for listener in listeners {
        listener.await??;
    }
    let mut latencies = latencies.lock().unwrap().clone();
    latencies.sort();
    Ok([
        "sliding sync: 100 waiting connections, send 200 → answer".into(),
        "p99 < 25 ms".into(),
        format!(
            "p50 {:.1} ms, p99 {:.1} ms ({} samples)",
            percentile(&latencies, 0.5).as_secs_f64() * 1e3,
            percentile(&latencies, 0.99).as_secs_f64() * 1e3,
            latencies.len()
        ),
    ])
}
