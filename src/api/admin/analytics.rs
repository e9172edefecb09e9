//! Analytics over HTTP, for admins and auditors: every route reads a range of days (`from` and
//! `to`, `YYYY-MM-DD` or a millisecond timestamp, both included; by default the last 30 days)
//! and answers JSON, or CSV with a header line for `format=csv`.

use axum::{
    Json,
    extract::{Path, State as AxumState},
    response::{IntoResponse, Response},
};
use http::{Uri, header};
use ruma::{RoomId, UserId};
use serde::Deserialize;
use serde_json::{Value as JsonValue, json};

use super::{Staff, query};
use crate::{
    api::State,
    error::{Error, Result},
    service::{
        Services,
        admin::{AdminRead, check_read_reason},
        analytics::{
            day::Day,
            polls::Poll,
            query::{Filter, GroupBy, Range},
        },
        now_ms,
    },
};

/// Days covered when `from` is not given.
const DEFAULT_DAYS: i64 = 30;

#[derive(Deserialize)]
struct Params {
    from: Option<String>,
    to: Option<String>,
    group_by: Option<String>,
    room_id: Option<String>,
    user_id: Option<String>,
    limit: Option<usize>,
    format: Option<String>,
    reason: Option<String>,
}

#[derive(Clone, Copy, PartialEq)]
enum Format {
    Json,
    Csv,
}

fn parse_day(name: &str, text: &str) -> Result<Day> {
    let day = if text.bytes().all(|b| b.is_ascii_digit()) {
        // Up to the end of year 9999, as for dates.
        text.parse().ok().filter(|ms: &u64| *ms < 253_402_300_800_000).map(Day::from_ms)
    } else {
        Day::parse(text)
    };
    day.ok_or_else(|| {
        Error::invalid_param(format!("{name} is a date (YYYY-MM-DD) or a timestamp in ms"))
    })
}

impl Params {
    fn range(&self) -> Result<Range> {
        let to = match &self.to {
            Some(to) => parse_day("to", to)?,
            None => Day::from_ms(now_ms()),
        };
        let from = match &self.from {
            Some(from) => parse_day("from", from)?,
            None => to.plus(1 - DEFAULT_DAYS),
        };
        Range::new(from, to)
    }

    fn format(&self) -> Result<Format> {
        match self.format.as_deref() {
            None | Some("json") => Ok(Format::Json),
            Some("csv") => Ok(Format::Csv),
            Some(_) => Err(Error::invalid_param("format is json or csv")),
        }
    }

    fn group_by(&self) -> Result<GroupBy> {
        GroupBy::parse(self.group_by.as_deref().unwrap_or("day"))
    }

    fn filter(&self) -> Result<Filter> {
        if let Some(room_id) = &self.room_id {
            RoomId::parse(room_id).map_err(|_| Error::invalid_param("Invalid room_id"))?;
        }
        if let Some(user_id) = &self.user_id {
            UserId::parse(user_id).map_err(|_| Error::invalid_param("Invalid user_id"))?;
        }
        Ok(Filter { room_id: self.room_id.clone(), user_id: self.user_id.clone() })
    }

    fn limit(&self, default: usize, max: usize) -> Result<usize> {
        match self.limit.unwrap_or(default) {
            limit @ 1.. if limit <= max => Ok(limit),
            _ => Err(Error::invalid_param(format!("limit is 1 to {max}"))),
        }
    }

    fn range_json(&self, range: Range) -> JsonValue {
        json!({ "from": range.from.to_string(), "to": range.to.to_string() })
    }
}

/// Runs a query off the async threads.
async fn blocking<T: Send + 'static>(
    services: State,
    run: impl FnOnce(&Services) -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(move || run(&services)).await.map_err(Error::internal)?
}

fn csv_field(value: &JsonValue) -> String {
    let text = match value {
        JsonValue::Null => return String::new(),
        JsonValue::String(text) => text.clone(),
        other => other.to_string(),
    };
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text
    }
}

/// `body` as JSON, or `rows` as CSV with `columns`.
fn respond(format: Format, body: JsonValue, rows: &[JsonValue], columns: &[&str]) -> Response {
    if format == Format::Json {
        return Json(body).into_response();
    }
    let mut csv = columns.join(",");
    csv.push('\n');
    for row in rows {
        let fields: Vec<String> =
            columns.iter().map(|c| csv_field(row.get(*c).unwrap_or(&JsonValue::Null))).collect();
        csv.push_str(&fields.join(","));
        csv.push('\n');
    }
    ([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], csv).into_response()
}

/// The columns naming a group, in order.
fn group_columns(group: GroupBy) -> Vec<&'static str> {
    [(group.day, "day"), (group.room, "room_id"), (group.user, "user_id")]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect()
}

fn rows_of(body: &JsonValue, field: &str) -> Vec<JsonValue> {
    body.get(field).and_then(|r| r.as_array()).cloned().unwrap_or_default()
}

/// `GET /_plaza/admin/v1/analytics/active_users`: daily, weekly and monthly active users.
pub async fn active_users(
    AxumState(services): AxumState<State>,
    _: Staff,
    uri: Uri,
) -> Result<Response> {
    let params: Params = query(&uri)?;
    let (range, format) = (params.range()?, params.format()?);
    let (days, distinct) = blocking(services, move |s| s.analytics.active_users(range)).await?;
    let mut body = params.range_json(range);
    body["distinct_users"] = json!(distinct);
    body["days"] = json!(days);
    Ok(respond(
        format,
        body.clone(),
        &rows_of(&body, "days"),
        &["day", "daily", "weekly", "monthly"],
    ))
}

/// `GET /_plaza/admin/v1/analytics/messages`: messages grouped by `group_by` (`day`, `room`,
/// `user`, or several joined by commas), optionally of one `room_id` or `user_id`.
pub async fn messages(
    AxumState(services): AxumState<State>,
    _: Staff,
    uri: Uri,
) -> Result<Response> {
    let params: Params = query(&uri)?;
    let (range, format, group, filter) =
        (params.range()?, params.format()?, params.group_by()?, params.filter()?);
    let (rows, total) =
        blocking(services, move |s| s.analytics.messages(range, group, &filter)).await?;
    let mut body = params.range_json(range);
    body["total"] = json!(total);
    body["rows"] = json!(rows);
    let mut columns = group_columns(group);
    columns.push("messages");
    Ok(respond(format, body.clone(), &rows_of(&body, "rows"), &columns))
}

/// `GET /_plaza/admin/v1/analytics/rooms/top`: the `limit` rooms with the most messages.
pub async fn top_rooms(
    AxumState(services): AxumState<State>,
    _: Staff,
    uri: Uri,
) -> Result<Response> {
    let params: Params = query(&uri)?;
    let (range, format, limit) = (params.range()?, params.format()?, params.limit(10, 1000)?);
    let rooms = blocking(services, move |s| {
        let mut rooms = Vec::new();
        for room in s.analytics.top_rooms(range, limit)? {
            let name = RoomId::parse(&room.room_id)
                .ok()
                .and_then(|id| s.rooms.current_state(&id).ok())
                .and_then(|state| s.rooms.state_content(&state, "m.room.name", "").ok()?)
                .and_then(|content| content.get("name").cloned());
            let mut row = json!(room);
            row["name"] = name.unwrap_or(JsonValue::Null);
            rooms.push(row);
        }
        Ok(rooms)
    })
    .await?;
    let mut body = params.range_json(range);
    body["rooms"] = json!(rooms);
    Ok(respond(format, body, &rooms, &["room_id", "name", "messages", "senders"]))
}

/// `GET /_plaza/admin/v1/analytics/new_users`: accounts created per day.
pub async fn new_users(
    AxumState(services): AxumState<State>,
    _: Staff,
    uri: Uri,
) -> Result<Response> {
    let params: Params = query(&uri)?;
    let (range, format) = (params.range()?, params.format()?);
    let days = blocking(services, move |s| s.analytics.new_users(s, range)).await?;
    let mut body = params.range_json(range);
    body["total"] = json!(days.iter().map(|d| d.new_users).sum::<u64>());
    body["days"] = json!(days);
    Ok(respond(format, body.clone(), &rows_of(&body, "days"), &["day", "new_users"]))
}

/// `GET /_plaza/admin/v1/analytics/uploads`: files users uploaded per day, and their bytes.
pub async fn uploads(
    AxumState(services): AxumState<State>,
    _: Staff,
    uri: Uri,
) -> Result<Response> {
    let params: Params = query(&uri)?;
    let (range, format) = (params.range()?, params.format()?);
    let days = blocking(services, move |s| s.analytics.uploads(s, range)).await?;
    let mut body = params.range_json(range);
    body["total"] = json!(days.iter().map(|d| d.uploads).sum::<u64>());
    body["total_bytes"] = json!(days.iter().map(|d| d.bytes).sum::<u64>());
    body["days"] = json!(days);
    Ok(respond(format, body.clone(), &rows_of(&body, "days"), &["day", "uploads", "bytes"]))
}

/// `GET /_plaza/admin/v1/analytics/response_times`: median and p90 time to an answer, grouped
/// by `group_by` (the user is the one who answered), with the figures over everything.
pub async fn response_times(
    AxumState(services): AxumState<State>,
    _: Staff,
    uri: Uri,
) -> Result<Response> {
    let params: Params = query(&uri)?;
    let (range, format, group, filter) =
        (params.range()?, params.format()?, params.group_by()?, params.filter()?);
    let (rows, overall) =
        blocking(services, move |s| s.analytics.response_times(range, group, &filter)).await?;
    let mut body = params.range_json(range);
    body["overall"] = json!(overall);
    body["rows"] = json!(rows);
    let mut columns = group_columns(group);
    columns.extend(["count", "median_ms", "p90_ms"]);
    Ok(respond(format, body.clone(), &rows_of(&body, "rows"), &columns))
}

const POLL_COLUMNS: [&str; 9] = [
    "event_id",
    "room_id",
    "question",
    "answer_id",
    "answer_text",
    "votes",
    "voters",
    "ts",
    "ended_ts",
];

/// One CSV row per answer of each poll.
fn poll_rows(polls: &[Poll]) -> Vec<JsonValue> {
    polls
        .iter()
        .flat_map(|poll| {
            poll.answers.iter().map(move |answer| {
                json!({
                    "event_id": poll.event_id, "room_id": poll.room_id, "question": poll.question,
                    "answer_id": answer.id, "answer_text": answer.text, "votes": answer.votes,
                    "voters": poll.voters, "ts": poll.ts, "ended_ts": poll.ended_ts,
                })
            })
        })
        .collect()
}

/// `GET /_plaza/admin/v1/analytics/polls`: polls started in the range (of one `room_id`, if
/// given), oldest first, with their tallies. Questions and answers are content: each read is
/// audited as `admin.read.polls` with the optional `reason`.
pub async fn polls(
    AxumState(services): AxumState<State>,
    Staff(caller): Staff,
    uri: Uri,
) -> Result<Response> {
    let params: Params = query(&uri)?;
    let (range, format, filter) = (params.range()?, params.format()?, params.filter()?);
    let limit = params.limit(100, 1000)?;
    check_read_reason(params.reason.as_deref())?;
    let room_id = filter.room_id.clone();
    let polls = blocking(services.clone(), move |s| {
        s.analytics.polls(range, filter.room_id.as_deref(), limit)
    })
    .await?;
    let room = room_id.as_deref().and_then(|r| RoomId::parse(r).ok());
    services.record_admin_read(
        &caller.user_id,
        AdminRead {
            what: "polls",
            target: room_id.as_deref().unwrap_or("*"),
            room_id: room.as_deref(),
            reason: params.reason.as_deref(),
            details: json!({ "from": params.from, "to": params.to, "polls": polls.len() }),
        },
    )?;
    let mut body = params.range_json(range);
    body["polls"] = json!(polls);
    Ok(respond(format, body, &poll_rows(&polls), &POLL_COLUMNS))
}

/// `GET /_plaza/admin/v1/analytics/polls/{eventId}`: one poll and its tally; audited as
/// `admin.read.poll` with the optional `reason`.
pub async fn poll(
    AxumState(services): AxumState<State>,
    Staff(caller): Staff,
    Path(event_id): Path<String>,
    uri: Uri,
) -> Result<Response> {
    let params: Params = query(&uri)?;
    let format = params.format()?;
    check_read_reason(params.reason.as_deref())?;
    let target = event_id.clone();
    let poll = blocking(services.clone(), move |s| s.analytics.poll(&event_id))
        .await?
        .ok_or_else(|| Error::not_found("Unknown poll"))?;
    let room = RoomId::parse(poll.room_id.as_str()).ok();
    services.record_admin_read(
        &caller.user_id,
        AdminRead {
            what: "poll",
            target: &target,
            room_id: room.as_deref(),
            reason: params.reason.as_deref(),
            details: json!({}),
        },
    )?;
    let rows = poll_rows(std::slice::from_ref(&poll));
    Ok(respond(format, json!(poll), &rows, &POLL_COLUMNS))
}
