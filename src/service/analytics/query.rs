//! Reading the analytics: each query reads only the keys of the days asked for (a range scan
//! over day-prefixed keys), and groups them in memory.
//!
//! Percentiles are nearest-rank: of `n` sorted samples, the `p`th percentile is the sample at
//! rank `ceil(p / 100 * n)` (1-based), so every reported value is an observed one; the median is
//! the 50th percentile (the lower middle sample when `n` is even).

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use super::{Analytics, ResponseSample, day::Day, polls::Poll};
use crate::{
    error::{Error, Result},
    service::Services,
    storage::{Key, split_key},
};

/// Longest range of days one query may cover.
pub const MAX_DAYS: i64 = 366;
/// Most rows one query returns.
pub const MAX_ROWS: usize = 10_000;

/// The days a query covers, both ends included.
#[derive(Debug, Clone, Copy)]
pub struct Range {
    /// The first day.
    pub from: Day,
    /// The last day.
    pub to: Day,
}

impl Range {
    /// A range, refused with `M_INVALID_PARAM` if it runs backwards or exceeds [`MAX_DAYS`].
    pub fn new(from: Day, to: Day) -> Result<Self> {
        if from > to {
            return Err(Error::invalid_param("from is after to"));
        }
        if to.0 - from.0 >= MAX_DAYS {
            return Err(Error::invalid_param(format!("A range covers at most {MAX_DAYS} days")));
        }
        Ok(Self { from, to })
    }

    fn days(self) -> impl Iterator<Item = Day> {
        (self.from.0..=self.to.0).map(Day)
    }

    /// `(lower, upper)` bounds of the day-prefixed keys in the range.
    fn key_bounds(self) -> (Vec<u8>, Vec<u8>) {
        (self.from.key().into_bytes(), self.to.plus(1).key().into_bytes())
    }
}

/// What rows are grouped by: any of day, room and user (the user is the sender of messages and
/// the responder for response times).
#[derive(Debug, Clone, Copy, Default)]
pub struct GroupBy {
    /// One row per day.
    pub day: bool,
    /// One row per room.
    pub room: bool,
    /// One row per user.
    pub user: bool,
}

impl GroupBy {
    /// Parses a comma-separated list of `day`, `room` and `user`.
    pub fn parse(text: &str) -> Result<Self> {
        let mut group = Self::default();
        for part in text.split(',') {
            let flag = match part.trim() {
                "day" => &mut group.day,
                "room" => &mut group.room,
                "user" => &mut group.user,
                _ => return Err(Error::invalid_param("group_by lists day, room and user")),
            };
            *flag = true;
        }
        Ok(group)
    }

    fn key(self, day: &str, room_id: &str, user_id: &str) -> Group {
        let pick = |on: bool, value: &str| on.then(|| value.to_owned());
        Group {
            day: pick(self.day, day),
            room_id: pick(self.room, room_id),
            user_id: pick(self.user, user_id),
        }
    }
}

/// Which events a query counts: those of one room, of one user, or all.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this room.
    pub room_id: Option<String>,
    /// Only this user.
    pub user_id: Option<String>,
}

impl Filter {
    fn admits(&self, room_id: &str, user_id: &str) -> bool {
        self.room_id.as_deref().is_none_or(|r| r == room_id)
            && self.user_id.as_deref().is_none_or(|u| u == user_id)
    }
}

/// The group a row stands for; fields not grouped by are absent.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Group {
    /// The day (`YYYY-MM-DD`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub day: Option<String>,
    /// The room.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room_id: Option<String>,
    /// The user.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
}

/// Messages of a group.
#[derive(Debug, Serialize)]
pub struct MessageRow {
    /// The group.
    #[serde(flatten)]
    pub group: Group,
    /// Messages sent.
    pub messages: u64,
}

/// A room among the most active.
#[derive(Debug, Serialize)]
pub struct TopRoom {
    /// The room.
    pub room_id: String,
    /// Messages sent in the range.
    pub messages: u64,
    /// Distinct users who sent them.
    pub senders: u64,
}

/// Response times of a group (nearest-rank percentiles, milliseconds).
#[derive(Debug, Serialize, PartialEq)]
pub struct Times {
    /// Messages answered.
    pub count: u64,
    /// Median time to the answer.
    pub median_ms: u64,
    /// 90th percentile time to the answer.
    pub p90_ms: u64,
}

/// Response times of a group.
#[derive(Debug, Serialize)]
pub struct TimesRow {
    /// The group.
    #[serde(flatten)]
    pub group: Group,
    /// Its times.
    #[serde(flatten)]
    pub times: Times,
}

/// Active users of a day.
#[derive(Debug, Serialize, PartialEq)]
pub struct ActiveRow {
    /// The day.
    pub day: String,
    /// Users active that day.
    pub daily: u64,
    /// Users active in the 7 days ending that day.
    pub weekly: u64,
    /// Users active in the 30 days ending that day.
    pub monthly: u64,
}

/// New accounts of a day.
#[derive(Debug, Serialize)]
pub struct NewUsersRow {
    /// The day.
    pub day: String,
    /// Accounts created.
    pub new_users: u64,
}

/// Uploads of a day.
#[derive(Debug, Serialize)]
pub struct UploadsRow {
    /// The day.
    pub day: String,
    /// Files uploaded.
    pub uploads: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// The `p`th nearest-rank percentile of `sorted` (ascending, not empty).
pub fn nearest_rank(sorted: &[u64], p: u64) -> u64 {
    let rank = (p * sorted.len() as u64).div_ceil(100).max(1) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

impl Times {
    /// The count, median and p90 of `samples`.
    pub fn of(mut samples: Vec<u64>) -> Self {
        if samples.is_empty() {
            return Self { count: 0, median_ms: 0, p90_ms: 0 };
        }
        samples.sort_unstable();
        Self {
            count: samples.len() as u64,
            median_ms: nearest_rank(&samples, 50),
            p90_ms: nearest_rank(&samples, 90),
        }
    }
}

/// The text of each part of a composite key.
fn key_parts(key: &[u8]) -> Vec<&str> {
    split_key(key).map(|part| std::str::from_utf8(part).unwrap_or_default()).collect()
}

impl Analytics {
    /// Messages in `range` matching `filter`, grouped by `group`: rows (days in order, the
    /// busiest first within a day) and the total.
    pub fn messages(
        &self,
        range: Range,
        group: GroupBy,
        filter: &Filter,
    ) -> Result<(Vec<MessageRow>, u64)> {
        let (lower, upper) = range.key_bounds();
        let mut groups: BTreeMap<Group, u64> = BTreeMap::new();
        let mut total = 0;
        for item in self.messages.scan_range(lower, upper, false) {
            let (key, count) = item?;
            let [day, room, user] = key_parts(&key)[..] else { continue };
            if filter.admits(room, user) {
                *groups.entry(group.key(day, room, user)).or_default() += count;
                total += count;
            }
        }
        let mut rows: Vec<MessageRow> =
            groups.into_iter().map(|(group, messages)| MessageRow { group, messages }).collect();
        rows.sort_by(|a, b| a.group.day.cmp(&b.group.day).then(b.messages.cmp(&a.messages)));
        rows.truncate(MAX_ROWS);
        Ok((rows, total))
    }

    /// The `limit` rooms with the most messages in `range`, busiest first.
    pub fn top_rooms(&self, range: Range, limit: usize) -> Result<Vec<TopRoom>> {
        let (lower, upper) = range.key_bounds();
        let mut rooms: HashMap<String, (u64, HashSet<String>)> = HashMap::new();
        for item in self.messages.scan_range(lower, upper, false) {
            let (key, count) = item?;
            let [_, room, user] = key_parts(&key)[..] else { continue };
            let entry = rooms.entry(room.to_owned()).or_default();
            entry.0 += count;
            entry.1.insert(user.to_owned());
        }
        let mut top: Vec<TopRoom> = rooms
            .into_iter()
            .map(|(room_id, (messages, senders))| TopRoom {
                room_id,
                messages,
                senders: senders.len() as u64,
            })
            .collect();
        top.sort_by(|a, b| b.messages.cmp(&a.messages).then_with(|| a.room_id.cmp(&b.room_id)));
        top.truncate(limit);
        Ok(top)
    }

    /// Response times of the messages answered in `range` (by the answering user, for
    /// `filter.user_id` and `group.user`), grouped by `group`, with the times of them all.
    pub fn response_times(
        &self,
        range: Range,
        group: GroupBy,
        filter: &Filter,
    ) -> Result<(Vec<TimesRow>, Times)> {
        let (lower, upper) = range.key_bounds();
        let mut groups: BTreeMap<Group, Vec<u64>> = BTreeMap::new();
        let mut all = Vec::new();
        for item in self.responses.scan_range(lower, upper, false) {
            let (key, ResponseSample { delay_ms, responder, .. }) = item?;
            let [day, room, ..] = key_parts(&key)[..] else { continue };
            if filter.admits(room, &responder) {
                groups.entry(group.key(day, room, &responder)).or_default().push(delay_ms);
                all.push(delay_ms);
            }
        }
        let mut rows: Vec<TimesRow> = groups
            .into_iter()
            .map(|(group, samples)| TimesRow { group, times: Times::of(samples) })
            .collect();
        rows.sort_by(|a, b| a.group.day.cmp(&b.group.day).then(b.times.count.cmp(&a.times.count)));
        rows.truncate(MAX_ROWS);
        Ok((rows, Times::of(all)))
    }

    /// Daily, weekly (7 days) and monthly (30 days) active users of each day of `range`, and
    /// the distinct users active over the whole range.
    pub fn active_users(&self, range: Range) -> Result<(Vec<ActiveRow>, u64)> {
        let start = range.from.plus(-29);
        let lower = start.key().into_bytes();
        let upper = range.to.plus(1).key().into_bytes();
        let mut by_day: BTreeMap<Day, Vec<String>> = BTreeMap::new();
        for item in self.active.scan_range(lower, upper, false) {
            let (key, ()) = item?;
            if let [day, user] = key_parts(&key)[..]
                && let Some(day) = Day::parse(day)
            {
                by_day.entry(day).or_default().push(user.to_owned());
            }
        }
        let none = Vec::new();
        let users_of = |day: Day| by_day.get(&day).unwrap_or(&none);
        let (mut weekly, mut monthly) = (HashMap::<&str, u32>::new(), HashMap::<&str, u32>::new());
        let mut distinct = HashSet::new();
        let mut rows = Vec::new();
        let leave = |window: &mut HashMap<&str, u32>, user: &str| {
            if let Some(n) = window.get_mut(user) {
                *n -= 1;
                if *n == 0 {
                    window.remove(user);
                }
            }
        };
        for day in (start.0..=range.to.0).map(Day) {
            for user in users_of(day) {
                *weekly.entry(user).or_default() += 1;
                *monthly.entry(user).or_default() += 1;
            }
            users_of(day.plus(-7)).iter().for_each(|u| leave(&mut weekly, u));
            users_of(day.plus(-30)).iter().for_each(|u| leave(&mut monthly, u));
            if day >= range.from {
                distinct.extend(users_of(day).iter().map(String::as_str));
                rows.push(ActiveRow {
                    day: day.to_string(),
                    daily: users_of(day).len() as u64,
                    weekly: weekly.len() as u64,
                    monthly: monthly.len() as u64,
                });
            }
        }
        Ok((rows, distinct.len() as u64))
    }

    /// Accounts created on each day of `range`.
    pub fn new_users(&self, services: &Services, range: Range) -> Result<Vec<NewUsersRow>> {
        let mut counts: BTreeMap<Day, u64> = range.days().map(|d| (d, 0)).collect();
        let to_ms = range.to.plus(1).start_ms();
        for created in services.users.created_between(range.from.start_ms(), to_ms) {
            *counts.entry(Day::from_ms(created?)).or_default() += 1;
        }
        Ok(counts
            .into_iter()
            .map(|(day, new_users)| NewUsersRow { day: day.to_string(), new_users })
            .collect())
    }

    /// Files users uploaded on each day of `range`.
    pub fn uploads(&self, services: &Services, range: Range) -> Result<Vec<UploadsRow>> {
        let mut counts: BTreeMap<Day, (u64, u64)> = range.days().map(|d| (d, (0, 0))).collect();
        let to_ms = range.to.plus(1).start_ms();
        for upload in services.media.uploads_between(range.from.start_ms(), to_ms) {
            let (ts, _, bytes) = upload?;
            let entry = counts.entry(Day::from_ms(ts)).or_default();
            entry.0 += 1;
            entry.1 += bytes;
        }
        Ok(counts
            .into_iter()
            .map(|(day, (uploads, bytes))| UploadsRow { day: day.to_string(), uploads, bytes })
            .collect())
    }

    /// Polls started in `range` (of one room, if `room_id`), oldest first, at most `limit`.
    pub fn polls(&self, range: Range, room_id: Option<&str>, limit: usize) -> Result<Vec<Poll>> {
        let (lower, upper) = (range.from.start_ms(), range.to.plus(1).start_ms());
        let mut polls = Vec::new();
        for item in self.polls_by_time.scan_range(lower.to_key_bytes(), upper.to_key_bytes(), false)
        {
            let (key, ()) = item?;
            let event_id = key.get(9..).and_then(|id| std::str::from_utf8(id).ok());
            let Some(poll) = event_id.map(|id| self.polls.get(id)).transpose()?.flatten() else {
                continue;
            };
            if room_id.is_none_or(|r| r == poll.room_id) {
                polls.push(poll);
                if polls.len() >= limit {
                    break;
                }
            }
        }
        Ok(polls)
    }

    /// The poll started by `event_id`, with its tally.
    pub fn poll(&self, event_id: &str) -> Result<Option<Poll>> {
        Ok(self.polls.get(event_id)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let minutes: Vec<u64> = (1..=10).map(|m| m * 60_000).collect();
        assert_eq!(Times::of(minutes), Times { count: 10, median_ms: 300_000, p90_ms: 540_000 });
        assert_eq!(Times::of(vec![7]), Times { count: 1, median_ms: 7, p90_ms: 7 });
        assert_eq!(Times::of(vec![5, 1, 3]), Times { count: 3, median_ms: 3, p90_ms: 5 });
        assert_eq!(Times::of(vec![]).count, 0);
    }
}
