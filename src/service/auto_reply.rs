//! Out-of-office automatic replies. A user sets, in the account data `com.plaza.auto_reply`,
//! `{"enabled", "text", "from_ts", "until_ts"}`; while it is active, a direct message to them
//! (a room of two joined members, or one their `m.direct` lists) or a message that mentions
//! them (`m.mentions.user_ids`) gets one `m.notice` answer per sender per day, sent as them.
//!
//! Answers carry `com.plaza.auto_reply: true`; messages so marked, notices (which by
//! convention come from bots) and one's own messages are never answered, so two users who
//! both have replies on never answer each other in a loop.
//!
//! The event core only tells the [`Listen`] listener of each durable event; the checks and the
//! answer happen on a task of their own ([`run`]), off the writer's path. Answers are
//! best-effort: events still queued when the server stops are not answered.

use std::sync::{Arc, Mutex};

use ruma::{OwnedUserId, RoomId, UserId};
use serde::Deserialize;
use serde_json::{Value as JsonValue, json};
use tokio::sync::{mpsc, watch};

use super::{Services, now_ms, rooms::NewEvent, rooms::pdu::StoredPdu};
use crate::{
    error::Result,
    storage::{Db, Table, tables},
};

/// The account data type holding a user's automatic reply.
pub const ACCOUNT_DATA_TYPE: &str = "com.plaza.auto_reply";
/// The content key marking a message as an automatic reply.
pub const MARKER: &str = "com.plaza.auto_reply";
/// Events waiting to be looked at, at most; past it new ones are not answered.
const QUEUE: usize = 4_096;
/// Mentioned users looked at per message, at most.
const MAX_MENTIONS: usize = 20;
/// Rooms with more joined members than this are never direct rooms, even if `m.direct` says so.
const MAX_DIRECT_MEMBERS: usize = 10;
/// Longest reply text sent, in bytes.
const MAX_TEXT_BYTES: usize = 4_096;
const DAY_MS: u64 = 86_400_000;

/// A user's automatic reply, as stored in their account data.
#[derive(Debug, Deserialize)]
pub struct Setting {
    /// Whether it is on.
    #[serde(default)]
    pub enabled: bool,
    /// What is answered.
    #[serde(default)]
    pub text: String,
    /// Not before this time (ms since the epoch).
    #[serde(default)]
    pub from_ts: Option<u64>,
    /// Not after this time (ms since the epoch).
    #[serde(default)]
    pub until_ts: Option<u64>,
}

impl Setting {
    /// Whether it answers at `now`.
    pub fn active_at(&self, now: u64) -> bool {
        self.enabled
            && !self.text.trim().is_empty()
            && self.from_ts.is_none_or(|from| from <= now)
            && self.until_ts.is_none_or(|until| now <= until)
    }
}

/// The queue of events to look at and the record of who was answered when.
pub struct AutoReplies {
    sender: mpsc::Sender<Arc<StoredPdu>>,
    receiver: Mutex<Option<mpsc::Receiver<Arc<StoredPdu>>>>,
    /// `(user, sender)` -> the day number of the last answer.
    answered: Table<u64>,
}

impl AutoReplies {
    /// Opens the table and the queue.
    pub fn new(db: &Db) -> Self {
        let (sender, receiver) = mpsc::channel(QUEUE);
        Self {
            sender,
            receiver: Mutex::new(Some(receiver)),
            answered: db.table(tables::AUTO_REPLIES),
        }
    }

    /// The users `event` may be answered for, and answers for those whose reply is active.
    async fn handle(&self, services: &Services, event: &StoredPdu) -> Result<()> {
        let Some(sender) = answerable_sender(event) else { return Ok(()) };
        let now = now_ms();
        for user in recipients(services, event, &sender)? {
            let Some(setting) = services.account_data.get(&user, None, ACCOUNT_DATA_TYPE)? else {
                continue;
            };
            let Ok(setting) = serde_json::from_value::<Setting>(setting) else { continue };
            if !setting.active_at(now) {
                continue;
            }
            let key = (user.as_str(), sender.as_str());
            let today = now / DAY_MS;
            if self.answered.get(&key)? == Some(today) {
                continue;
            }
            // Recorded first: after a crash between the two, a sender misses an answer rather
            // than getting two.
            let mut batch = services.db.batch();
            self.answered.put(&mut batch, &key, &today);
            services.db.write(batch)?;
            let text: String = setting
                .text
                .chars()
                .scan(0, |len, c| {
                    *len += c.len_utf8();
                    (*len <= MAX_TEXT_BYTES).then_some(c)
                })
                .collect();
            let content = json!({
                "msgtype": "m.notice",
                "body": text,
                "m.mentions": {},
                "m.relates_to": { "m.in_reply_to": { "event_id": event.event_id } },
                MARKER: true,
            });
            let reply = NewEvent::message("m.room.message", content);
            if let Err(error) =
                services.rooms.append(services, &event.room_id, &user, reply, None).await
            {
                tracing::debug!(%user, %error, "automatic reply not sent");
            }
        }
        Ok(())
    }
}

/// The sender of `event` if it is a message that may be answered: not a notice, not itself
/// an automatic reply.
fn answerable_sender(event: &StoredPdu) -> Option<OwnedUserId> {
    if event.kind() != "m.room.message" || event.state_key().is_some() {
        return None;
    }
    let content = event.wire.get("content")?.as_object()?;
    // Automatic replies and posts of tools (webhooks) are never answered.
    if content.contains_key(MARKER) || content.contains_key(super::webhooks::CONTENT_KEY) {
        return None;
    }
    if content.get("msgtype").and_then(|m| m.as_str()) == Some("m.notice") {
        return None;
    }
    UserId::parse(event.sender()).ok()
}

/// Local users other than `sender`, joined to the room, whom `event` mentions or who are in a
/// direct room with the sender.
fn recipients(services: &Services, event: &StoredPdu, sender: &UserId) -> Result<Vec<OwnedUserId>> {
    let server = services.server_name();
    let room_id: &RoomId = &event.room_id;
    let members = services.rooms.members(room_id)?;
    let joined: Vec<&OwnedUserId> =
        members.iter().filter(|(_, m)| m == "join").map(|(user, _)| user).collect();
    let mut users: Vec<OwnedUserId> = Vec::new();
    let mentions = event
        .wire
        .get("content")
        .and_then(|c| c.as_object())
        .and_then(|c| c.get("m.mentions"))
        .and_then(|m| m.as_object())
        .and_then(|m| m.get("user_ids"))
        .and_then(|ids| ids.as_array());
    for id in mentions.into_iter().flatten().take(MAX_MENTIONS) {
        let Some(user) = id.as_str().and_then(|id| UserId::parse(id).ok()) else { continue };
        if joined.iter().any(|member| **member == user) && !users.contains(&user) {
            users.push(user);
        }
    }
    if joined.len() <= MAX_DIRECT_MEMBERS {
        for member in &joined {
            if users.contains(member) {
                continue;
            }
            let direct = joined.len() == 2
                || (member.server_name() == server
                    && lists_direct(services, member, room_id, sender)?);
            if direct {
                users.push((*member).clone());
            }
        }
    }
    users.retain(|user| user != sender && user.server_name() == server);
    Ok(users)
}

/// Whether `user`'s `m.direct` lists `room_id` as a direct room with `sender`.
fn lists_direct(
    services: &Services,
    user: &UserId,
    room_id: &RoomId,
    sender: &UserId,
) -> Result<bool> {
    let direct = services.account_data.get(user, None, "m.direct")?;
    let rooms = direct.as_ref().and_then(|d| d.get(sender.as_str())).and_then(JsonValue::as_array);
    Ok(rooms.is_some_and(|rooms| rooms.iter().any(|r| r.as_str() == Some(room_id.as_str()))))
}

/// Hands each durable message to the automatic replies' task.
pub struct Listen;

impl super::rooms::listeners::Listener for Listen {
    fn persisted(&self, services: &Services, _short: u64, event: &Arc<StoredPdu>) {
        if event.kind() != "m.room.message" {
            return;
        }
        if services.auto_reply.sender.try_send(event.clone()).is_err() {
            tracing::debug!(event_id = %event.event_id, "automatic replies are behind; not answered");
        }
    }
}

/// The task answering messages for users whose automatic reply is on.
pub async fn run(services: Arc<Services>, mut stopped: watch::Receiver<bool>) {
    let receiver = services.auto_reply.receiver.lock().unwrap_or_else(|e| e.into_inner()).take();
    let Some(mut events) = receiver else { return };
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            _ = stopped.wait_for(|stop| *stop) => return,
        };
        let Some(event) = event else { return };
        if let Err(error) = services.auto_reply.handle(&services, &event).await {
            tracing::warn!(event_id = %event.event_id, %error, "automatic reply failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Setting;

    fn setting(enabled: bool, text: &str, from_ts: Option<u64>, until_ts: Option<u64>) -> Setting {
        Setting { enabled, text: text.to_owned(), from_ts, until_ts }
    }

    #[test]
    fn a_reply_is_active_only_when_on_with_text_and_within_its_period() {
        assert!(setting(true, "away", None, None).active_at(5));
        assert!(!setting(false, "away", None, None).active_at(5));
        assert!(!setting(true, "  ", None, None).active_at(5));
        assert!(setting(true, "away", Some(5), Some(5)).active_at(5));
        assert!(!setting(true, "away", Some(6), None).active_at(5));
        assert!(!setting(true, "away", None, Some(4)).active_at(5));
    }
}
