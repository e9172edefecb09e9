//! Analytics scenario: 100,000 messages across group rooms and two-member rooms (where every
//! message answers the other member's), then each analytics query timed one by one.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::{Error, Target, User, percentile};

const MESSAGES: usize = 100_000;
/// Senders, paired into two-member rooms; all of them share the group rooms.
pub const SENDERS: usize = 20;
const GROUP_ROOMS: usize = 10;
const ROUNDS: usize = 20;

const QUERIES: [&str; 8] = [
    "active_users",
    "messages?group_by=day",
    "messages?group_by=room,user",
    "rooms/top",
    "new_users",
    "uploads",
    "response_times?group_by=room",
    "response_times?group_by=user",
];

/// The analytics rows of the table; `admin` reads, `users` send.
pub async fn rows(
    target: &Target,
    admin: &User,
    users: &[User],
) -> Result<Vec<[String; 3]>, Error> {
    let mut groups = Vec::new();
    for _ in 0..GROUP_ROOMS {
        let room = target.create_room(&users[0], json!({ "preset": "public_chat" })).await?;
        for user in &users[1..SENDERS] {
            target.join(user, &room).await?;
        }
        groups.push(room);
    }
    let mut pairs = Vec::new();
    for pair in users[..SENDERS].chunks(2) {
        let room = target.create_room(&pair[0], json!({ "preset": "public_chat" })).await?;
        target.join(&pair[1], &room).await?;
        pairs.push(room);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (s, user) in users[..SENDERS].iter().enumerate() {
        let (target, user) = (target.clone(), user.clone());
        let (groups, direct) = (groups.clone(), pairs[s / 2].clone());
        tasks.push(tokio::spawn(async move {
            for m in (s..MESSAGES).step_by(SENDERS) {
                let round = m / SENDERS;
                let room = if round.is_multiple_of(2) {
                    &direct
                } else {
                    &groups[(round / 2 + s) % GROUP_ROOMS]
                };
                target.send(&user, room, &format!("a{m}"), "analytics load").await?;
            }
            Ok::<(), Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let sending = started.elapsed();

    let mut times: Vec<Duration> = Vec::with_capacity(ROUNDS * QUERIES.len());
    let mut slowest = (Duration::ZERO, "");
    for _ in 0..ROUNDS {
        for query in QUERIES {
            let path = format!("/_plaza/admin/v1/analytics/{query}");
            let started = Instant::now();
            target.call(reqwest::Method::GET, admin, &path, None).await?;
            let took = started.elapsed();
            slowest = slowest.max((took, query));
            times.push(took);
        }
    }
    times.sort();
    Ok(vec![[
        format!(
            "analytics over {MESSAGES} messages ({} queries of {} kinds)",
            times.len(),
            QUERIES.len()
        ),
        "< 100 ms each".into(),
        format!(
            "p50 {:.1} ms, p99 {:.1} ms, slowest {:.1} ms ({}); sending took {:.0} s",
            percentile(&times, 0.5).as_secs_f64() * 1e3,
            percentile(&times, 0.99).as_secs_f64() * 1e3,
            slowest.0.as_secs_f64() * 1e3,
            slowest.1,
            sending.as_secs_f64()
        ),
    ]])
}
