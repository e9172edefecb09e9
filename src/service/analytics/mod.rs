//! Server analytics for admins: active users, messages per day, room and user, response times
//! and poll tallies.
//!
//! Everything is aggregated as events arrive, never by scanning history on request:
//! [`Analytics::record`] runs inside the write batch of each appended event (under the room's
//! lock), so the aggregates are exactly as durable as the event. Every read-modify-write key
//! includes the room id, so the room lock is all the serialisation they need. Queries read
//! only the keys of the days asked for (see [`query`]).
//!
//! What counts as a *message*: `m.room.message`, `m.sticker`, `m.room.encrypted` and poll starts,
//! except edits, reactions and references (poll responses and ends, also when encrypted).
//! Encrypted rooms (with `m.room.encryption` state) contribute metadata only: counts and times;
//! their polls are not tallied.
//!
//! A message is *answered* when a different member sends a message that replies to it (rich
//! reply), that is in its thread (it being the root), or, in a room of exactly two joined
//! members, that is the next message of the other member (which then answers every unanswered
//! message of theirs). Only the latest [`MAX_UNANSWERED`] unanswered messages of a room wait for
//! an answer. The response time is recorded under the day of the answer and the answering user.

pub mod day;
pub mod polls;
pub mod query;

use std::{
    collections::{HashMap, HashSet},
    sync::Mutex,
};

use ruma::{RoomVersionId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::Value as JsonValue;

use self::{
    day::Day,
    polls::{Poll, Vote},
};
use super::{
    Services, now_ms,
    rooms::{pdu::StoredPdu, state::StateMap},
};
use crate::{
    error::Result,
    storage::{Batch, Db, Table, prefix, tables},
};

/// Unanswered messages kept per room, newest last; older ones stop waiting for an answer.
pub const MAX_UNANSWERED: usize = 50;
/// Users remembered as already active today before the memory is cleared.
const MAX_TOUCHED: usize = 100_000;
/// Rooms whose waiting messages are kept in memory.
const MAX_WAITING_ROOMS: usize = 10_000;

/// Event types counted as messages.
const MESSAGE_TYPES: [&str; 5] = [
    "m.room.message",
    "m.sticker",
    "m.room.encrypted",
    polls::START_TYPES[0],
    polls::START_TYPES[1],
];

/// A message still waiting for a different member's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Unanswered {
    /// The message.
    pub event_id: String,
    /// Who sent it.
    pub sender: String,
    /// Its `origin_server_ts`.
    pub ts: u64,
}

/// One answered message: how long the answer took, whose message it was, who answered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResponseSample {
    /// Milliseconds from the message to its answer.
    pub delay_ms: u64,
    /// The sender of the answered message.
    pub sender: String,
    /// The member who answered.
    pub responder: String,
}

/// The analytics aggregates.
pub struct Analytics {
    db: Db,
    active: Table<()>,
    messages: Table<u64>,
    /// `(room, event)` → the message waiting for an answer.
    unanswered: Table<Unanswered>,
    /// The earlier layout of the same table: room → its whole list; converted when read.
    unanswered_lists: Table<Vec<Unanswered>>,
    /// Each room's waiting messages, oldest first, as stored; written under the room's lock.
    waiting: Mutex<HashMap<String, Vec<Unanswered>>>,
    responses: Table<ResponseSample>,
    polls: Table<Poll>,
    polls_by_time: Table<()>,
    votes: Table<Vote>,
    touched: Mutex<(Day, HashSet<String>)>,
}

/// The parts of an event analytics looks at.
struct Facts<'a> {
    event_id: &'a str,
    room_id: &'a str,
    sender: &'a str,
    kind: &'a str,
    ts: u64,
    content: JsonValue,
}

impl Facts<'_> {
    fn rel_type(&self) -> Option<&str> {
        self.content.get("m.relates_to")?.get("rel_type")?.as_str()
    }

    fn is_message(&self) -> bool {
        MESSAGE_TYPES.contains(&self.kind)
            && !matches!(self.rel_type(), Some("m.replace" | "m.annotation" | "m.reference"))
    }

    /// The events this message answers if they are unanswered: the rich-reply parent (unless
    /// it is only a thread's fallback) and the thread root.
    fn answer_targets(&self) -> Vec<&str> {
        let Some(relates) = self.content.get("m.relates_to") else { return Vec::new() };
        let mut targets = Vec::new();
        let falling_back = relates.get("is_falling_back").and_then(|f| f.as_bool()) == Some(true);
        if !falling_back
            && let Some(parent) = relates
                .get("m.in_reply_to")
                .and_then(|r| r.get("event_id"))
                .and_then(|e| e.as_str())
        {
            targets.push(parent);
        }
        if self.rel_type() == Some("m.thread")
            && let Some(root) = relates.get("event_id").and_then(|e| e.as_str())
        {
            targets.push(root);
        }
        targets
    }
}

impl Analytics {
    pub(super) fn new(db: &Db) -> Self {
        Self {
            db: db.clone(),
            active: db.table(tables::ANALYTICS_ACTIVE_USERS),
            messages: db.table(tables::ANALYTICS_MESSAGES),
            unanswered: db.table(tables::ANALYTICS_UNANSWERED),
            unanswered_lists: db.table(tables::ANALYTICS_UNANSWERED),
            waiting: Mutex::default(),
            responses: db.table(tables::ANALYTICS_RESPONSE_TIMES),
            polls: db.table(tables::ANALYTICS_POLLS),
            polls_by_time: db.table(tables::ANALYTICS_POLLS_BY_TIME),
            votes: db.table(tables::ANALYTICS_POLL_VOTES),
            touched: Mutex::new((Day(0), HashSet::new())),
        }
    }

    /// Records that `user_id` used the server now (an authenticated request); written at most
    /// once a day per user while the server runs.
    pub fn touch(&self, user_id: &UserId) {
        let today = Day::from_ms(now_ms());
        {
            let mut touched = self.touched.lock().unwrap_or_else(|e| e.into_inner());
            if touched.0 != today || touched.1.len() >= MAX_TOUCHED {
                *touched = (today, HashSet::new());
            }
            if touched.1.contains(user_id.as_str()) || !touched.1.insert(user_id.to_string()) {
                return;
            }
        }
        // A figure, not acknowledged data: it need not wait for a WAL sync of its own.
        let mut batch = self.db.batch();
        self.active.put(&mut batch, &(today.key(), user_id.as_str()), &());
        if let Err(err) = self.db.write_unsynced(batch) {
            tracing::warn!(%err, "could not record an active user");
        }
    }

    /// Queues the aggregates `event` changes into `batch`, the batch that stores the event.
    /// Runs under the room's lock; `state` is the id of the room state before the event.
    pub fn record(
        &self,
        batch: &mut Batch,
        services: &Services,
        event: &StoredPdu,
        state: u64,
        version: &RoomVersionId,
    ) -> Result<()> {
        let ts = event.wire.get("origin_server_ts").and_then(|t| t.as_integer());
        let mut facts = Facts {
            event_id: event.event_id.as_str(),
            room_id: event.room_id.as_str(),
            sender: event.sender(),
            kind: event.kind(),
            ts: ts.map_or(0, |t| u64::try_from(i64::from(t)).unwrap_or(0)),
            content: JsonValue::Null,
        };
        // Only messages and polls are read further; other events' content is never copied.
        let kind = facts.kind;
        let poll_types = [polls::START_TYPES, polls::RESPONSE_TYPES, polls::END_TYPES];
        if MESSAGE_TYPES.contains(&kind) || poll_types.iter().any(|types| types.contains(&kind)) {
            facts.content = event.wire.get("content").map(|c| c.clone().into()).unwrap_or_default();
        }
        let day = Day::from_ms(facts.ts).key();
        self.active.put(batch, &(day.as_str(), facts.sender), &());
        let encrypted = services.rooms.states.get(state, "m.room.encryption", "")?.is_some();
        if facts.is_message() {
            let key = (day.as_str(), facts.room_id, facts.sender);
            let count = self.messages.get(&key)?.unwrap_or(0);
            self.messages.put(batch, &key, &(count + 1));
            self.record_answers(batch, services, &facts, &day)?;
        }
        if encrypted {
            return Ok(());
        }
        if polls::START_TYPES.contains(&facts.kind) {
            let (id, room, sender) = (facts.event_id, facts.room_id, facts.sender);
            if let Some(poll) =
                polls::parse_start(facts.kind, &facts.content, id, room, sender, facts.ts)
            {
                self.polls.put(batch, id, &poll);
                self.polls_by_time.put(batch, &(facts.ts, id), &());
            }
        } else if polls::RESPONSE_TYPES.contains(&facts.kind) {
            self.record_response(batch, &facts)?;
        } else if polls::END_TYPES.contains(&facts.kind) {
            let state = services.rooms.states.load(state)?;
            self.record_end(batch, services, &facts, &state, version)?;
        }
        Ok(())
    }

    /// Records the response times `facts` answers and leaves it waiting for its own answer.
    fn record_answers(
        &self,
        batch: &mut Batch,
        services: &Services,
        facts: &Facts<'_>,
        day: &str,
    ) -> Result<()> {
        let mut waiting = self.waiting_in(batch, facts.room_id)?;
        let targets = facts.answer_targets();
        let from_others = waiting.iter().any(|w| w.sender != facts.sender);
        let direct = from_others && self.is_direct(services, facts.room_id)?;
        let (answered, still): (Vec<_>, Vec<_>) = if direct || !targets.is_empty() {
            waiting.into_iter().partition(|w| {
                w.sender != facts.sender && (direct || targets.contains(&w.event_id.as_str()))
            })
        } else {
            (Vec::new(), waiting) // nothing is answered
        };
        for message in answered {
            self.unanswered.delete(batch, &(facts.room_id, message.event_id.as_str()));
            let sample = ResponseSample {
                delay_ms: facts.ts.saturating_sub(message.ts),
                sender: message.sender,
                responder: facts.sender.to_owned(),
            };
            self.responses.put(batch, &(day, facts.room_id, message.event_id.as_str()), &sample);
        }
        waiting = still;
        let message = Unanswered {
            event_id: facts.event_id.to_owned(),
            sender: facts.sender.to_owned(),
            ts: facts.ts,
        };
        self.unanswered.put(batch, &(facts.room_id, facts.event_id), &message);
        waiting.push(message);
        let excess = waiting.len().saturating_sub(MAX_UNANSWERED);
        for old in waiting.drain(..excess) {
            self.unanswered.delete(batch, &(facts.room_id, old.event_id.as_str()));
        }
        let mut cache = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_WAITING_ROOMS {
            cache.clear();
        }
        cache.insert(facts.room_id.to_owned(), waiting);
        Ok(())
    }

    /// The messages of `room_id` waiting for an answer, oldest first: from memory, else from
    /// storage (a list in the earlier layout is rewritten as one entry per message in `batch`).
    fn waiting_in(&self, batch: &mut Batch, room_id: &str) -> Result<Vec<Unanswered>> {
        if let Some(waiting) =
            self.waiting.lock().unwrap_or_else(|e| e.into_inner()).remove(room_id)
        {
            return Ok(waiting);
        }
        let mut waiting = self
            .unanswered
            .scan_prefix(prefix(room_id))
            .map(|item| Ok(item?.1))
            .collect::<Result<Vec<_>>>()?;
        if let Some(list) = self.unanswered_lists.get(room_id)? {
            self.unanswered_lists.delete(batch, room_id);
            for message in &list {
                self.unanswered.put(batch, &(room_id, message.event_id.as_str()), message);
            }
            waiting.extend(list);
        }
        waiting.sort_by_key(|message| message.ts);
        Ok(waiting)
    }

    /// Drops what memory holds for `room_id` after its event's batch failed to be written.
    pub fn forget(&self, room_id: &str) {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner()).remove(room_id);
    }

    /// Whether the room has exactly two joined members.
    fn is_direct(&self, services: &Services, room_id: &str) -> Result<bool> {
        let room_id = ruma::RoomId::parse(room_id).map_err(crate::error::Error::internal)?;
        let members = services.rooms.members(&room_id)?;
        Ok(members.iter().filter(|(_, membership)| membership == "join").take(3).count() == 2)
    }

    /// Counts a poll response as its sender's latest vote if it is.
    fn record_response(&self, batch: &mut Batch, facts: &Facts<'_>) -> Result<()> {
        let Some(poll_id) = polls::referenced_poll(&facts.content) else { return Ok(()) };
        let Some(mut poll) = self.polls.get(poll_id)? else { return Ok(()) };
        let Some(selections) = polls::response_selections(facts.kind, &facts.content) else {
            return Ok(());
        };
        if poll.room_id != facts.room_id || !poll.open_at(facts.ts) {
            return Ok(());
        }
        let key = (poll_id, facts.sender);
        let previous = self.votes.get(&key)?;
        if previous.as_ref().is_some_and(|p| p.ts >= facts.ts) {
            return Ok(()); // an earlier response arriving late
        }
        let vote = Vote { ts: facts.ts, selections: poll.validate(&selections) };
        if let Some(previous) = &previous {
            poll.apply(previous, false);
        }
        poll.apply(&vote, true);
        self.votes.put(batch, &key, &vote);
        self.polls.put(batch, poll_id, &poll);
        Ok(())
    }

    /// Closes a poll when its sender, or a member who may redact, ends it.
    fn record_end(
        &self,
        batch: &mut Batch,
        services: &Services,
        facts: &Facts<'_>,
        state: &StateMap,
        version: &RoomVersionId,
    ) -> Result<()> {
        let Some(poll_id) = polls::referenced_poll(&facts.content) else { return Ok(()) };
        let Some(mut poll) = self.polls.get(poll_id)? else { return Ok(()) };
        if poll.room_id != facts.room_id || poll.ended_ts.is_some() {
            return Ok(());
        }
        if poll.sender != facts.sender {
            let sender = UserId::parse(facts.sender).map_err(crate::error::Error::internal)?;
            let levels = services.rooms.power_levels(state, version)?;
            if !levels.user_can_redact_event_of_other(&sender) {
                return Ok(());
            }
        }
        poll.ended_ts = Some(facts.ts);
        let votes: Vec<Vote> = self
            .votes
            .scan_prefix(prefix(poll_id))
            .map(|item| item.map(|(_, vote)| vote))
            .collect::<std::result::Result<_, _>>()?;
        poll.retally(&votes);
        self.polls.put(batch, poll_id, &poll);
        Ok(())
    }
}

/// Counts each event's activity, response times and poll votes in the event's own batch, so
/// the aggregates never disagree with the events.
pub struct Recorder;

impl crate::service::rooms::listeners::Contributor for Recorder {
    fn contribute(
        &self,
        services: &Services,
        written: &crate::service::rooms::listeners::Written<'_>,
        batch: &mut Batch,
    ) -> Result<()> {
        let (event, version) = (written.event, written.version);
        services.analytics.record(batch, services, event, written.state_before, version)
    }

    fn abandoned(
        &self,
        services: &Services,
        written: &crate::service::rooms::listeners::Written<'_>,
    ) {
        services.analytics.forget(written.room_id.as_str());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(event_id: &str, ts: u64) -> Unanswered {
        Unanswered { event_id: event_id.into(), sender: "@a:x".into(), ts }
    }

    #[test]
    fn waiting_lists_of_the_earlier_layout_become_one_entry_per_message() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), 8).unwrap();
        let analytics = Analytics::new(&db);
        let mut batch = db.batch();
        let old = vec![message("$b", 2), message("$c", 3)];
        analytics.unanswered_lists.put(&mut batch, "!r:x", &old);
        analytics.unanswered.put(&mut batch, &("!r:x", "$a"), &message("$a", 1));
        db.write(batch).unwrap();

        let mut batch = db.batch();
        let waiting = analytics.waiting_in(&mut batch, "!r:x").unwrap();
        let ids: Vec<&str> = waiting.iter().map(|m| m.event_id.as_str()).collect();
        assert_eq!(ids, ["$a", "$b", "$c"]);
        db.write(batch).unwrap();

        assert!(analytics.unanswered_lists.get("!r:x").unwrap().is_none());
        let mut stored: Vec<String> = analytics
            .unanswered
            .scan_prefix(prefix("!r:x"))
            .map(|item| item.unwrap().1.event_id)
            .collect();
        stored.sort();
        assert_eq!(stored, ["$a", "$b", "$c"]);
    }
}
