//! Thread and notification scenarios: listing a room's 1,000 threads, and what judging push
//! rules for every member costs sends in a 100-member room.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::{Error, Target, User, percentile, send_rate};

const THREADS: usize = 1000;
const LISTINGS: usize = 100;
const MEMBERS: usize = 100;
const SENDERS: usize = 20;
const ROUNDS: usize = 7;

/// Registers `count` users named after `prefix`.
pub async fn users(target: &Target, prefix: &str, count: usize) -> Result<Vec<User>, Error> {
    let mut users = Vec::with_capacity(count);
    for i in 0..count {
        users.push(target.register(&format!("{prefix}{i}_{}", std::process::id())).await?);
    }
    Ok(users)
}

/// The thread and push rows of the table.
pub async fn rows(target: &Target, users: &[User]) -> Result<Vec<[String; 3]>, Error> {
    let mut rows = Vec::new();
    rows.push(threads(target, &users[..SENDERS]).await?);
    rows.extend(push_overhead(target, users).await?);
    Ok(rows)
}

/// A room with 1,000 threads (a root and a reply each); `/threads` pages timed.
async fn threads(target: &Target, users: &[User]) -> Result<[String; 3], Error> {
    let room = target.create_room(&users[0], json!({ "preset": "public_chat" })).await?;
    for user in &users[1..] {
        target.join(user, &room).await?;
    }
    let mut tasks = Vec::new();
    for (s, user) in users.iter().enumerate() {
        let (target, user, room) = (target.clone(), user.clone(), room.clone());
        tasks.push(tokio::spawn(async move {
            for t in (s..THREADS).step_by(SENDERS) {
                let root = target.send(&user, &room, &format!("root{t}"), "topic").await?;
                let path = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/reply{t}");
                let reply = json!({ "msgtype": "m.text", "body": "reply",
                    "m.relates_to": { "rel_type": "m.thread", "event_id": root } });
                target.call(reqwest::Method::PUT, &user, &path, Some(reply)).await?;
            }
            Ok::<(), Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let path = format!("/_matrix/client/v1/rooms/{room}/threads?limit=50");
    let mut times = Vec::with_capacity(LISTINGS);
    for _ in 0..LISTINGS {
        let started = Instant::now();
        let (page, _) = target.call(reqwest::Method::GET, &users[0], &path, None).await?;
        times.push(started.elapsed());
        if page["chunk"].as_array().map_or(0, Vec::len) != 50 {
            return Err(format!("a /threads page came back short: {page}").into());
        }
    }
    times.sort();
    // Paging through every thread, 50 at a time.
    let started = Instant::now();
    let (mut seen, mut from) = (0, None::<String>);
    loop {
        let page_path = match &from {
            Some(token) => format!("{path}&from={token}"),
            None => path.clone(),
        };
        let (page, _) = target.call(reqwest::Method::GET, &users[0], &page_path, None).await?;
        seen += page["chunk"].as_array().map_or(0, Vec::len);
        match page["next_batch"].as_str() {
            Some(token) => from = Some(token.to_owned()),
            None => break,
        }
    }
    let all = started.elapsed();
    if seen != THREADS {
        return Err(format!("paged {seen} threads, expected {THREADS}").into());
    }
    Ok([
        "/threads, room with 1,000 threads (page of 50)".into(),
        "< 50 ms".into(),
        format!(
            "p50 {:.1} ms, p99 {:.1} ms; all 1,000 in {:.0} ms",
            percentile(&times, 0.5).as_secs_f64() * 1e3,
            percentile(&times, 0.99).as_secs_f64() * 1e3,
            all.as_secs_f64() * 1e3
        ),
    ])
}

/// 20 senders in a room of only themselves, then the same 20 in a room with 80 more members
/// whose push rules are judged for every event: the throughput lost is what judging costs.
async fn push_overhead(target: &Target, users: &[User]) -> Result<Vec<[String; 3]>, Error> {
    let senders = &users[..SENDERS];
    let mut rooms = Vec::new();
    for members in [&users[..SENDERS], &users[..MEMBERS]] {
        let room = target.create_room(&members[0], json!({ "preset": "public_chat" })).await?;
        for user in &members[1..] {
            target.join(user, &room).await?;
        }
        rooms.push(room);
    }
    // Paired rounds, each pair measuring both rooms back to back (in turns, first one then the
    // other, so neither always inherits the other's leftover work); the median pair decides,
    // so a busy moment on the machine does not.
    let mut pairs = Vec::with_capacity(ROUNDS);
    for round in 0..ROUNDS {
        let mut rates = [0f64; 2];
        for i in [round % 2, 1 - round % 2] {
            let senders = senders.iter().map(|u| (u.clone(), rooms[i].clone())).collect();
            rates[i] = send_rate(target, senders, Duration::from_secs(3)).await?;
        }
        pairs.push(rates);
    }
    pairs.sort_by(|a, b| (a[1] / a[0]).total_cmp(&(b[1] / b[0])));
    let overheads: Vec<f64> = pairs.iter().map(|r| (1.0 - r[1] / r[0]) * 100.0).collect();
    let rates = pairs[pairs.len() / 2];
    // The notifier must keep up: the last member sees the last event in /notifications soon.
    let watcher = &users[MEMBERS - 1];
    let last_room = target.create_room(&users[0], json!({ "preset": "public_chat" })).await?;
    target.join(watcher, &last_room).await?;
    target.join(&users[1], &last_room).await?;
    let started = Instant::now();
    let marker = target.send(&users[0], &last_room, "marker", "marker").await?;
    let lag = loop {
        let (listed, _) = target
            .call(reqwest::Method::GET, watcher, "/_matrix/client/v3/notifications?limit=1", None)
            .await?;
        if listed["notifications"][0]["event"]["event_id"] == marker.as_str() {
            break started.elapsed();
        }
        if started.elapsed() > Duration::from_secs(60) {
            return Err("notifications fell more than a minute behind".into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let overhead = (1.0 - rates[1] / rates[0]) * 100.0;
    let (least, most) = (overheads[overheads.len() - 1], overheads[0]);
    Ok(vec![
        [
            "send, 20 senders, room of 20 vs room of 100 (rules judged for each member)".into(),
            "push rules cost < 10 %".into(),
            format!(
                "{:.0} vs {:.0} events/s: {overhead:.1} % slower (median of {ROUNDS} pairs; \
                 {least:.1} to {most:.1} %)",
                rates[0], rates[1]
            ),
        ],
        [
            "notification recorded after send (idle server)".into(),
            "(reported)".into(),
            format!("{:.1} ms", lag.as_secs_f64() * 1e3),
        ],
    ])
}
