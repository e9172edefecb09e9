//! Application service scenario (Plaza only): a stand-in service on loopback receives the
//! transactions. Latency: one user sends 100 events/s into a room the service watches, and
//! each event's time from send to the service's receipt is measured. Throughput: many users
//! send as fast as they can, and the events the service receives per second are counted.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Json, Router, extract::State, routing::put};
use serde_json::{Value, json};

use crate::{Error, Target, User, percentile};

/// The service's tokens, as written into the registration of the benchmark's server.
pub const AS_TOKEN: &str = "bench-as-token";
const HS_TOKEN: &str = "bench-hs-token";
/// Events sent at the paced rate.
const PACED_EVENTS: u64 = 1000;
/// Senders of the throughput run.
const SENDERS: usize = 32;
const THROUGHPUT_SECS: u64 = 10;

/// When each event (by the number in its body) reached the service.
#[derive(Default)]
pub struct Received {
    at: Mutex<HashMap<u64, Instant>>,
    transactions: Mutex<u64>,
}

async fn transaction(
    State(received): State<Arc<Received>>,
    Json(body): Json<Value>,
) -> Json<Value> {
    let now = Instant::now();
    let mut at = received.at.lock().unwrap_or_else(|e| e.into_inner());
    for event in body["events"].as_array().into_iter().flatten() {
        let seq = event["content"]["body"].as_str().and_then(|b| b.strip_prefix('s'));
        if let Some(seq) = seq.and_then(|s| s.parse().ok()) {
            at.entry(seq).or_insert(now);
        }
    }
    *received.transactions.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    Json(json!({}))
}

/// Starts the stand-in service on a free port and writes the registration pointing at it
/// into `dir` (where the benchmark's server reads it).
pub async fn prepare(dir: &std::path::Path) -> Result<Arc<Received>, Error> {
    let received = Arc::new(Received::default());
    let app = Router::new()
        .route("/_matrix/app/v1/transactions/{txn}", put(transaction))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let registration = format!(
        "id: bench\nurl: http://127.0.0.1:{port}\nas_token: {AS_TOKEN}\nhs_token: {HS_TOKEN}\n\
         sender_localpart: benchbot\nrate_limited: false\nnamespaces:\n  users:\n    \
         - exclusive: true\n      regex: '@bench_.*'\n"
    );
    std::fs::write(crate::registration_file(dir), registration)?;
    Ok(received)
}

/// The rows: delivery latency at 100 events/s, and events delivered per second.
pub async fn rows(target: &Target, received: &Arc<Received>) -> Result<Vec<[String; 3]>, Error> {
    let id = std::process::id();
    let service = User { id: String::new(), token: AS_TOKEN.into() };
    let first = target.register(&format!("asload0_{id}")).await?;
    let server_name = first.id.split_once(':').map_or("localhost", |(_, s)| s).to_owned();
    let localpart = format!("bench_puppet{id}");
    let puppet = format!("@{localpart}:{server_name}");
    let register = json!({ "type": "m.login.application_service", "username": localpart });
    let path = "/_matrix/client/v3/register";
    target.call(reqwest::Method::POST, &service, path, Some(register)).await?;
    let mut rooms = Vec::new();
    let mut users = Vec::new();
    let mut first = Some(first);
    for i in 0..SENDERS {
        let user = match first.take() {
            Some(user) => user,
            None => target.register(&format!("asload{i}_{id}")).await?,
        };
        let room = target.create_room(&user, json!({ "preset": "public_chat" })).await?;
        let path = format!(
            "/_matrix/client/v3/join/{room}?user_id={}",
            form_urlencoded::byte_serialize(puppet.as_bytes()).collect::<String>()
        );
        target.call(reqwest::Method::POST, &service, &path, Some(json!({}))).await?;
        rooms.push(room);
        users.push(user);
    }

    // Latency at a paced 100 events/s.
    let mut sent_at = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for seq in 0..PACED_EVENTS {
        tick.tick().await;
        sent_at.insert(seq, Instant::now());
        target.send(&users[0], &rooms[0], &format!("p{id}-{seq}"), &format!("s{seq}")).await?;
    }
    wait_for(received, PACED_EVENTS).await;
    let mut latencies: Vec<Duration> = {
        let at = received.at.lock().unwrap_or_else(|e| e.into_inner());
        sent_at.iter().filter_map(|(seq, sent)| Some(at.get(seq)?.duration_since(*sent))).collect()
    };
    latencies.sort();
    let paced = format!(
        "p50 {:.1} ms, p95 {:.1} ms ({} of {PACED_EVENTS} received)",
        percentile(&latencies, 0.5).as_secs_f64() * 1000.0,
        percentile(&latencies, 0.95).as_secs_f64() * 1000.0,
        latencies.len()
    );

    // Throughput: every sender as fast as it can.
    let transactions_before = *received.transactions.lock().unwrap_or_else(|e| e.into_inner());
    let base = 1_000_000u64;
    let deadline = Instant::now() + Duration::from_secs(THROUGHPUT_SECS);
    let started = Instant::now();
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(base));
    let mut tasks = Vec::new();
    for (user, room) in users.iter().cloned().zip(rooms.iter().cloned()) {
        let (target, counter) = (target.clone(), counter.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let seq = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                target.send(&user, &room, &format!("t{id}-{seq}"), &format!("s{seq}")).await?;
            }
            Ok::<(), Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let sent = counter.load(std::sync::atomic::Ordering::Relaxed) - base;
    let send_secs = started.elapsed().as_secs_f64();
    wait_for(received, PACED_EVENTS + sent).await;
    let last = {
        let at = received.at.lock().unwrap_or_else(|e| e.into_inner());
        at.iter().filter(|(seq, _)| **seq >= base).map(|(_, t)| *t).max()
    };
    let delivered_secs = last.map_or(send_secs, |t| t.duration_since(started).as_secs_f64());
    let transactions =
        *received.transactions.lock().unwrap_or_else(|e| e.into_inner()) - transactions_before;
    let throughput = format!(
        "{:.0} events/s delivered ({sent} events, {transactions} transactions; sent at {:.0}/s)",
        sent as f64 / delivered_secs,
        sent as f64 / send_secs
    );
    Ok(vec![
        ["appservice: send to receipt at 100 events/s".into(), "p50 < 10 ms".into(), paced],
        ["appservice: delivery to one service".into(), "2,000 events/s".into(), throughput],
    ])
}

/// Waits (at most a minute) until the service received `count` numbered events.
async fn wait_for(received: &Received, count: u64) {
    for _ in 0..6000 {
        if received.at.lock().unwrap_or_else(|e| e.into_inner()).len() as u64 >= count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
