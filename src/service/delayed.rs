//! Delayed events (MSC4140): events a user schedules to be sent later, and can restart,
//! cancel or send early. Reminders and scheduled posts are built on them.
//!
//! Every change is one RocksDB batch, so the schedule survives restarts. One timer task
//! ([`run`]) sleeps until the next event is due and is woken whenever the schedule changes. An
//! event is sent with its user's permissions at the time it fires: when the room refuses it
//! then, it is finalised with the error, which the user's list shows.

use std::{sync::Arc, time::Duration};

use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{Value as JsonValue, json};
use tokio::sync::{Mutex, Notify, watch};

use super::{
    Services, now_ms, random_string,
    rooms::{NewEvent, Txn, TxnEndpoint},
};
use crate::{
    error::{Error, ErrorKind, Result},
    storage::{Db, Key, Table, prefix, tables},
};

/// Finalised delayed events kept per user for the list; older ones are forgotten.
const MAX_FINALISED_PER_USER: usize = 50;
/// Due events sent in one pass of the timer before it looks at the schedule again.
const FIRE_BATCH: usize = 64;
/// Longest event type and state key, in bytes.
const MAX_FIELD_BYTES: usize = 255;
/// The device the sends of delayed events are recorded under, so a send repeated after a
/// crash finds the first one, and the sender sees the delay id in the event.
const DELAYED_DEVICE: &str = super::rooms::pdu::DELAYED_SEND_DEVICE;

/// How a finalised delayed event ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// It was sent.
    Send,
    /// Its user cancelled it.
    Cancel,
    /// Sending it failed; it will not be tried again.
    Error,
}

/// A delayed event as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DelayedRecord {
    /// Its id, which also lets anyone who knows it manage it.
    pub delay_id: String,
    /// Whose it is.
    pub user_id: OwnedUserId,
    /// The room it goes to.
    pub room_id: OwnedRoomId,
    /// The event type.
    pub kind: String,
    /// The state key, for a state event.
    pub state_key: Option<String>,
    /// The delay asked for, in milliseconds.
    pub delay: u64,
    /// When it was scheduled or last restarted (ms since the epoch).
    pub running_since: u64,
    /// The event content.
    pub content: JsonValue,
    /// How it ended, once finalised.
    #[serde(default)]
    pub outcome: Option<Outcome>,
    /// When it was finalised (ms since the epoch).
    #[serde(default)]
    pub finalised_ts: Option<u64>,
    /// The event it became, once sent.
    #[serde(default)]
    pub event_id: Option<OwnedEventId>,
    /// Why it could not be sent (a Matrix error body).
    #[serde(default)]
    pub error: Option<JsonValue>,
    /// The key of the transaction that scheduled it, forgotten with it.
    #[serde(default)]
    pub txn_key: Option<Vec<u8>>,
}

impl DelayedRecord {
    /// When it is due (ms since the epoch).
    pub fn send_ts(&self) -> u64 {
        self.running_since.saturating_add(self.delay)
    }

    /// Whether it is still waiting to be sent.
    pub fn is_scheduled(&self) -> bool {
        self.outcome.is_none()
    }

    /// The shape the MSC gives a delayed event in answers.
    pub fn to_json(&self) -> JsonValue {
        let mut value = json!({
            "delay_id": self.delay_id,
            "room_id": self.room_id,
            "type": self.kind,
            "delay": self.delay,
            "running_since": self.running_since,
            "content": self.content,
        });
        if let Some(state_key) = &self.state_key {
            value["state_key"] = json!(state_key);
        }
        if let Some(event_id) = &self.event_id {
            value["event_id"] = json!(event_id);
        }
        if let Some(error) = &self.error {
            value["error"] = error.clone();
        }
        if let Some(ts) = self.finalised_ts {
            value["origin_server_ts"] = json!(ts);
        }
        value
    }
}

/// What a management request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Start the delay again from now.
    Restart,
    /// Never send it.
    Cancel,
    /// Send it now.
    Send,
}

impl Action {
    /// Parses the action's name as the MSC spells it.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "restart" => Ok(Self::Restart),
            "cancel" => Ok(Self::Cancel),
            "send" => Ok(Self::Send),
            _ => Err(Error::invalid_param("action must be restart, cancel or send")),
        }
    }
}

/// A request to schedule an event.
pub struct Schedule<'a> {
    /// Who schedules it.
    pub user_id: &'a UserId,
    /// From which device (scopes the transaction id).
    pub device_id: &'a str,
    /// The client's transaction id (sends have one, state sends none).
    pub txn_id: Option<&'a str>,
    /// The room.
    pub room_id: &'a RoomId,
    /// The event type.
    pub kind: String,
    /// The state key, for a state event.
    pub state_key: Option<String>,
    /// The content.
    pub content: JsonValue,
    /// The delay, in milliseconds.
    pub delay: u64,
}

/// Which delayed events a list asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFilter {
    /// Both.
    All,
    /// Only those still waiting.
    Scheduled,
    /// Only those sent, cancelled or failed.
    Finalised,
}

/// The delayed events of every user and the timer's wake-up.
pub struct DelayedEvents {
    db: Db,
    records: Table<DelayedRecord>,
    by_user: Table<u64>,
    due: Table<u64>,
    txns: Table<String>,
    /// Serialises changes: a restart, a cancel and the timer never act on one event at once.
    changes: Mutex<()>,
    /// Woken whenever the schedule changes, so the timer looks at the next due time again.
    wake: Notify,
}

impl DelayedEvents {
    /// Opens the tables.
    pub fn new(db: &Db) -> Self {
        Self {
            db: db.clone(),
            records: db.table(tables::DELAYED_EVENTS),
            by_user: db.table(tables::DELAYED_BY_USER),
            due: db.table(tables::DELAYED_DUE),
            txns: db.table(tables::DELAYED_TXNS),
            changes: Mutex::new(()),
            wake: Notify::new(),
        }
    }

    /// Schedules an event and answers its delay id; a repeated transaction answers the first
    /// id again.
    pub async fn schedule(&self, services: &Services, request: Schedule<'_>) -> Result<String> {
        let limits = &services.config.automation;
        if request.delay == 0 {
            return Err(Error::invalid_param(
                "The delay must be a positive number of milliseconds",
            ));
        }
        if request.delay > limits.max_delay_ms {
            return Err(Error::new(
                ErrorKind::MaxDelayExceeded { max_delay: limits.max_delay_ms },
                "The requested delay exceeds the allowed maximum",
            ));
        }
        if request.kind.is_empty()
            || request.kind.len() > MAX_FIELD_BYTES
            || request.state_key.as_ref().is_some_and(|k| k.len() > MAX_FIELD_BYTES)
        {
            return Err(Error::bad_json("Event types and state keys are at most 255 bytes"));
        }
        if matches!(request.kind.as_str(), "m.room.create" | "m.room.redaction") {
            return Err(Error::bad_json(format!("{} cannot be delayed", request.kind)));
        }
        if !request.content.is_object() {
            return Err(Error::bad_json("Event content must be a JSON object"));
        }
        let size = serde_json::to_vec(&request.content).map_err(Error::internal)?.len();
        if size > super::rooms::MAX_PDU_BYTES {
            return Err(Error::new(ErrorKind::TooLarge, "Event content is too large"));
        }
        if services.rooms.room(request.room_id)?.is_none() {
            return Err(Error::not_found("Unknown room"));
        }
        let txn_key = request.txn_id.map(|txn_id| {
            let user = request.user_id.as_str();
            (user, request.device_id, (request.room_id.as_str(), txn_id)).to_key_bytes()
        });
        let _guard = self.changes.lock().await;
        if let Some(key) = &txn_key
            && let Some(existing) = self.txns.get(key.as_slice())?
        {
            return Ok(existing);
        }
        let mine = self.of_user(request.user_id)?;
        let scheduled: Vec<&DelayedRecord> = mine.iter().filter(|r| r.is_scheduled()).collect();
        if scheduled.len() >= limits.max_delayed_events_per_user {
            let next = scheduled.iter().map(|r| r.send_ts()).min().unwrap_or(0);
            let wait = next.saturating_sub(now_ms()).max(1);
            return Err(Error::new(
                ErrorKind::LimitExceeded { retry_after_ms: wait },
                "The maximum number of delayed events has been reached",
            ));
        }
        let record = DelayedRecord {
            delay_id: random_string(32),
            user_id: request.user_id.to_owned(),
            room_id: request.room_id.to_owned(),
            kind: request.kind,
            state_key: request.state_key,
            delay: request.delay,
            running_since: now_ms(),
            content: request.content,
            outcome: None,
            finalised_ts: None,
            event_id: None,
            error: None,
            txn_key,
        };
        let mut batch = self.db.batch();
        self.records.put(&mut batch, record.delay_id.as_str(), &record);
        self.by_user.put(&mut batch, &(record.user_id.as_str(), record.delay_id.as_str()), &0);
        self.due.put(&mut batch, &(record.send_ts(), record.delay_id.as_str()), &0);
        if let Some(key) = &record.txn_key {
            self.txns.put(&mut batch, key.as_slice(), &record.delay_id);
        }
        self.db.write(batch)?;
        self.wake.notify_one();
        Ok(record.delay_id)
    }

    /// Restarts, cancels or sends the delayed event `delay_id`. With `owner`, only that user's
    /// event is found (the authenticated endpoint); without, the id alone is the credential.
    pub async fn update(
        &self,
        services: &Services,
        delay_id: &str,
        action: Action,
        owner: Option<&UserId>,
    ) -> Result<()> {
        let _guard = self.changes.lock().await;
        let record = self
            .records
            .get(delay_id)?
            .filter(|r| owner.is_none_or(|owner| r.user_id == owner))
            .ok_or_else(|| Error::not_found("No delayed event with this id"))?;
        if let Some(outcome) = record.outcome {
            // A retried request succeeds again; one that contradicts the outcome conflicts.
            return match (action, outcome) {
                (Action::Send, Outcome::Send)
                | (Action::Cancel, Outcome::Cancel | Outcome::Error) => Ok(()),
                _ => Err(Error::new(ErrorKind::Conflict, "The delayed event is already finalised")),
            };
        }
        match action {
            Action::Restart => {
                let mut restarted = record.clone();
                restarted.running_since = now_ms();
                let mut batch = self.db.batch();
                self.due.delete(&mut batch, &(record.send_ts(), delay_id));
                self.due.put(&mut batch, &(restarted.send_ts(), delay_id), &0);
                self.records.put(&mut batch, delay_id, &restarted);
                self.db.write(batch)?;
                self.wake.notify_one();
                Ok(())
            }
            Action::Cancel => self.finalise(record, Outcome::Cancel, None, None),
            // A refusal is answered as the send endpoint would; the event stays scheduled.
            Action::Send => {
                let event_id = send(services, &record).await?;
                self.finalise(record, Outcome::Send, Some(event_id), None)
            }
        }
    }

    /// The delayed events of `user_id` matching the filters, by when they are (or were) due.
    pub fn list(
        &self,
        user_id: &UserId,
        status: StatusFilter,
        delay_ids: &[String],
    ) -> Result<Vec<DelayedRecord>> {
        let mut records: Vec<DelayedRecord> = self
            .of_user(user_id)?
            .into_iter()
            .filter(|r| match status {
                StatusFilter::All => true,
                StatusFilter::Scheduled => r.is_scheduled(),
                StatusFilter::Finalised => !r.is_scheduled(),
            })
            .filter(|r| delay_ids.is_empty() || delay_ids.contains(&r.delay_id))
            .collect();
        records.sort_by_key(DelayedRecord::send_ts);
        Ok(records)
    }

    /// Every delayed event of `user_id` (bounded: scheduled ones by the per-user limit,
    /// finalised ones by [`MAX_FINALISED_PER_USER`]).
    fn of_user(&self, user_id: &UserId) -> Result<Vec<DelayedRecord>> {
        let mut records = Vec::new();
        for item in self.by_user.scan_prefix(prefix(user_id.as_str())) {
            let (key, _) = item?;
            let Some(delay_id) = key.rsplit(|b| *b == crate::storage::SEP).next() else {
                continue;
            };
            let delay_id = String::from_utf8_lossy(delay_id);
            if let Some(record) = self.records.get(delay_id.as_ref())? {
                records.push(record);
            }
        }
        Ok(records)
    }

    /// Marks `record` finalised in one batch, forgetting the user's oldest finalised events
    /// past the limit.
    fn finalise(
        &self,
        mut record: DelayedRecord,
        outcome: Outcome,
        event_id: Option<OwnedEventId>,
        error: Option<JsonValue>,
    ) -> Result<()> {
        let mut batch = self.db.batch();
        self.due.delete(&mut batch, &(record.send_ts(), record.delay_id.as_str()));
        record.outcome = Some(outcome);
        record.finalised_ts = Some(now_ms());
        record.event_id = event_id;
        record.error = error;
        self.records.put(&mut batch, record.delay_id.as_str(), &record);
        let mut finalised: Vec<DelayedRecord> =
            self.of_user(&record.user_id)?.into_iter().filter(|r| !r.is_scheduled()).collect();
        if finalised.len() >= MAX_FINALISED_PER_USER {
            finalised.sort_by_key(|r| r.finalised_ts.unwrap_or(0));
            let excess = finalised.len() + 1 - MAX_FINALISED_PER_USER;
            for old in finalised.iter().take(excess) {
                self.records.delete(&mut batch, old.delay_id.as_str());
                self.by_user.delete(&mut batch, &(old.user_id.as_str(), old.delay_id.as_str()));
                if let Some(key) = &old.txn_key {
                    self.txns.delete(&mut batch, key.as_slice());
                }
            }
        }
        self.db.write(batch)?;
        self.wake.notify_one();
        Ok(())
    }

    /// Sends every event due by now (up to a batch) and answers when the next one is due.
    async fn fire_due(&self, services: &Services) -> Result<Option<u64>> {
        let _guard = self.changes.lock().await;
        let now = now_ms();
        let mut due = Vec::new();
        for item in self.due.scan_from(Vec::new()) {
            let (key, _) = item?;
            let (ts, delay_id) = split_due_key(&key)?;
            if ts > now || due.len() == FIRE_BATCH {
                return self.fire(services, due).await.map(|()| Some(ts));
            }
            due.push((ts, delay_id));
        }
        self.fire(services, due).await.map(|()| None)
    }

    async fn fire(&self, services: &Services, due: Vec<(u64, String)>) -> Result<()> {
        for (ts, delay_id) in due {
            let Some(record) = self.records.get(delay_id.as_str())?.filter(|r| r.is_scheduled())
            else {
                // A leftover index entry: drop it.
                let mut batch = self.db.batch();
                self.due.delete(&mut batch, &(ts, delay_id.as_str()));
                self.db.write(batch)?;
                continue;
            };
            match send(services, &record).await {
                Ok(event_id) => self.finalise(record, Outcome::Send, Some(event_id), None)?,
                Err(error) if error.is_internal() => return Err(error),
                Err(error) => {
                    tracing::debug!(delay_id, %error, "delayed event refused when due");
                    let body = error_body(&error);
                    self.finalise(record, Outcome::Error, None, Some(body))?;
                }
            }
        }
        Ok(())
    }
}

/// `(send ms, delay id)` from a key of the due index.
fn split_due_key(key: &[u8]) -> Result<(u64, String)> {
    let corrupt = || Error::internal("malformed delayed event due key");
    let ts = key.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
    let ts = ts.ok_or_else(corrupt)?;
    let delay_id = key.get(9..).ok_or_else(corrupt)?;
    Ok((ts, String::from_utf8_lossy(delay_id).into_owned()))
}

/// The Matrix error body of `error`, as the list shows it.
fn error_body(error: &Error) -> JsonValue {
    match error {
        Error::Matrix(kind, message) => json!({ "errcode": kind.errcode(), "error": message }),
        Error::Uiaa(_) => json!({ "errcode": "M_UNKNOWN", "error": "Not sent" }),
    }
}

/// Sends `record` as its user, with the user's permissions and rate limit now.
async fn send(services: &Services, record: &DelayedRecord) -> Result<OwnedEventId> {
    let user = services.users.get(&record.user_id)?;
    let user = user.filter(|u| !u.deactivated && !u.locked);
    let user = user.ok_or_else(|| Error::forbidden("The account can no longer send events"))?;
    services.abuse.message(&record.user_id, !user.admin)?;
    let rooms = &services.rooms;
    let content = record.content.clone();
    match &record.state_key {
        Some(state_key) => {
            if record.kind == "m.room.encryption" {
                rooms.check_encryption_change(services, &record.room_id, &content)?;
            }
            if record.kind == "m.room.canonical_alias" {
                services.directory.check_canonical_alias(services, &record.room_id, &content)?;
            }
            let event = NewEvent::state(record.kind.as_str(), state_key.as_str(), content);
            rooms.append(services, &record.room_id, &record.user_id, event, None).await
        }
        None => {
            let txn = Txn {
                user: &record.user_id,
                device: DELAYED_DEVICE,
                id: &record.delay_id,
                endpoint: TxnEndpoint::Send(&record.kind),
            };
            let event = NewEvent::message(record.kind.as_str(), content);
            rooms.append(services, &record.room_id, &record.user_id, event, Some(txn)).await
        }
    }
}

/// The timer: sends delayed events when due, sleeping until the next one or a change.
pub async fn run(services: Arc<Services>, mut stopped: watch::Receiver<bool>) {
    let delayed = &services.delayed;
    loop {
        // A change made while looking leaves a permit, so the wait below ends at once.
        let wait = match delayed.fire_due(&services).await {
            Ok(Some(next)) => Duration::from_millis(next.saturating_sub(now_ms())),
            Ok(None) => Duration::from_secs(3_600),
            Err(error) => {
                tracing::error!(%error, "delayed events could not be sent; trying again soon");
                Duration::from_secs(5)
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = delayed.wake.notified() => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::split_due_key;
    use crate::storage::Key;

    #[test]
    fn due_keys_split_back_into_time_and_id() {
        // A time whose bytes hold the separator still splits at its fixed width.
        let ts = 0x00FF_FF00_0000_00FF_u64;
        let key = (ts, "abc").to_key_bytes();
        assert_eq!(split_due_key(&key).unwrap(), (ts, "abc".to_owned()));
        assert!(split_due_key(&key[..5]).is_err());
        assert!((1_u64, "b").to_key_bytes() < (2_u64, "a").to_key_bytes(), "due first");
    }
}
