//! Search scenario: 100,000 messages in English and Chinese, then queries timed one by one.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::{Error, Target, User, percentile};

const MESSAGES: usize = 100_000;
pub const SENDERS: usize = 20;
const QUERIES: usize = 200;

const WORDS: &[&str] = &[
    "budget",
    "launch",
    "review",
    "meeting",
    "customer",
    "invoice",
    "roadmap",
    "design",
    "release",
    "hiring",
    "security",
    "report",
    "travel",
    "office",
    "deadline",
    "feedback",
    "季度预算",
    "会议纪要",
    "客户反馈",
    "产品发布",
    "安全审计",
    "招聘计划",
    "出差申请",
    "设计评审",
];

/// A message made of a few vocabulary words and a unique number.
fn message(i: usize) -> String {
    let pick = |k: usize| WORDS[(i * 7 + k * 13 + i / 97) % WORDS.len()];
    format!("{} {} {} item {i} {}", pick(0), pick(1), pick(2), pick(3))
}

/// The search rows of the table.
pub async fn rows(target: &Target, users: &[User]) -> Result<Vec<[String; 3]>, Error> {
    let owner = &users[0];
    let room = target.create_room(owner, json!({ "preset": "public_chat" })).await?;
    for user in &users[1..SENDERS] {
        target.join(user, &room).await?;
    }
    let mut tasks = Vec::new();
    for (s, user) in users[..SENDERS].iter().enumerate() {
        let (target, user, room) = (target.clone(), user.clone(), room.clone());
        tasks.push(tokio::spawn(async move {
            for m in (s..MESSAGES).step_by(SENDERS) {
                target.send(&user, &room, &format!("q{m}"), &message(m)).await?;
            }
            Ok::<(), Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }

    let query = |term: &str| json!({ "search_categories": { "room_events": { "search_term": term, "filter": { "limit": 10 } } } });
    // The first search waits for the index to take in everything just sent.
    let started = Instant::now();
    target
        .call(reqwest::Method::POST, owner, "/_matrix/client/v3/search", Some(query("budget")))
        .await?;
    let catch_up = started.elapsed();

    let mut times: Vec<Duration> = Vec::with_capacity(QUERIES);
    for q in 0..QUERIES {
        let term = if q % 10 == 9 {
            format!("item {}", q * 391)
        } else {
            WORDS[q % WORDS.len()].to_owned()
        };
        let started = Instant::now();
        let (found, _) = target
            .call(reqwest::Method::POST, owner, "/_matrix/client/v3/search", Some(query(&term)))
            .await?;
        times.push(started.elapsed());
        if found["search_categories"]["room_events"]["results"].as_array().is_none_or(Vec::is_empty)
        {
            return Err(format!("no results for {term}").into());
        }
    }
    times.sort();
    Ok(vec![[
        format!("search over {MESSAGES} messages (English and Chinese), {QUERIES} queries"),
        "< 100 ms p99".into(),
        format!(
            "p50 {:.1} ms, p99 {:.1} ms (index caught up {:.0} ms after the last send)",
            percentile(&times, 0.5).as_secs_f64() * 1e3,
            percentile(&times, 0.99).as_secs_f64() * 1e3,
            catch_up.as_secs_f64() * 1e3
        ),
    ]])
}
