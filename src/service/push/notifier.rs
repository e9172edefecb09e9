//! The notifier: judges each persisted event against the push rules of every local member it
//! could notify, records the notifications (`/notifications`) and queues pushes for members
//! with pushers. It runs beside the send path, fed with each event as it is persisted, so a
//! send never waits on rule evaluation or on a gateway. Its cursor is stored with its output;
//! after a crash it re-reads from there, and what it had already recorded is skipped.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use ruma::{
    OwnedEventId, OwnedRoomId, OwnedUserId, UserId,
    push::{Action, FlattenedJson, PushConditionRoomCtx, Ruleset},
    serde::Raw,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use super::gateway::Delivery;
use crate::{
    error::{Error, Result},
    service::{
        Services,
        rooms::{pdu::StoredPdu, state::StateMap},
    },
    storage::{Batch, Db, Table, tables},
};

/// Events re-read after a restart, before the stored cursor, to cover writes that committed
/// out of order around it.
const REPLAY_MARGIN: u64 = 1000;
/// Events judged together and written in one batch.
const BATCH: usize = 256;
/// Rooms whose members and contexts are kept between batches.
const ROOM_CACHE: usize = 1024;
/// Rulesets kept between batches.
const RULES_CACHE: usize = 10_000;
/// The key of the cursor in the global table.
const CURSOR_KEY: &str = "push_cursor";

/// One event that notified one user.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NotificationRecord {
    /// The room of the event.
    pub room_id: OwnedRoomId,
    /// The event.
    pub event_id: OwnedEventId,
    /// When it was judged, in milliseconds.
    pub ts: u64,
    /// The actions of the rule that matched.
    pub actions: Vec<Action>,
}

impl NotificationRecord {
    /// Whether the actions ask for a highlight.
    pub fn highlight(&self) -> bool {
        self.actions.iter().any(Action::is_highlight)
    }
}

/// Who a room's events may notify, at one state snapshot.
struct Audience {
    snapshot: u64,
    /// Each local joined member with the context their rules are judged in.
    members: Vec<(OwnedUserId, PushConditionRoomCtx)>,
}

/// The notifier's queue and caches.
pub struct Notifier {
    jobs: mpsc::UnboundedSender<u64>,
    receiver: Mutex<Option<mpsc::UnboundedReceiver<u64>>>,
    notifications: Table<NotificationRecord>,
    global: Table<u64>,
    rules: Mutex<HashMap<OwnedUserId, Arc<Ruleset>>>,
    audiences: Mutex<HashMap<OwnedRoomId, Arc<Audience>>>,
}

impl Notifier {
    /// The notifier over `db`; [`run`] starts its work.
    pub fn new(db: &Db) -> Self {
        let (jobs, receiver) = mpsc::unbounded_channel();
        Self {
            jobs,
            receiver: Mutex::new(Some(receiver)),
            notifications: db.table(tables::NOTIFICATIONS),
            global: db.table(tables::GLOBAL),
            rules: Mutex::default(),
            audiences: Mutex::default(),
        }
    }

    /// Announces a persisted event (by short id).
    pub fn enqueue(&self, short: u64) {
        let _ = self.jobs.send(short);
    }

    /// Forgets the cached rules of `user_id` after they changed.
    pub fn forget_rules(&self, user_id: &UserId) {
        self.rules.lock().unwrap_or_else(|e| e.into_inner()).remove(user_id);
    }

    /// The notifications table (read by `/notifications` and the gateway's badge counts).
    pub fn table(&self) -> &Table<NotificationRecord> {
        &self.notifications
    }

    fn ruleset(&self, services: &Services, user_id: &UserId) -> Result<Arc<Ruleset>> {
        if let Some(rules) = self.rules.lock().unwrap_or_else(|e| e.into_inner()).get(user_id) {
            return Ok(rules.clone());
        }
        let rules = Arc::new(super::ruleset(services, user_id)?);
        let mut cache = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= RULES_CACHE {
            cache.clear();
        }
        cache.insert(user_id.to_owned(), rules.clone());
        Ok(rules)
    }

    /// The local members `event` may notify, with their contexts, cached per state snapshot.
    fn audience(&self, services: &Services, event: &StoredPdu) -> Result<Arc<Audience>> {
        let snapshot = event.state_before;
        let cached = self
            .audiences
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&event.room_id)
            .filter(|a| a.snapshot == snapshot)
            .cloned();
        if let Some(audience) = cached {
            return Ok(audience);
        }
        let rooms = &services.rooms;
        let record =
            rooms.room(&event.room_id)?.ok_or_else(|| Error::internal("event of unknown room"))?;
        let state: Arc<StateMap> = rooms.states.load(snapshot)?;
        let mut joined = Vec::new();
        for ((kind, state_key), short) in state.iter() {
            if kind != "m.room.member" {
                continue;
            }
            let Some(member) = rooms.stored_by_short_public(*short)? else { continue };
            let content = member.wire.get("content").and_then(|c| c.as_object());
            if content.and_then(|c| c.get("membership")).and_then(|m| m.as_str()) == Some("join") {
                joined.push((state_key.clone(), member));
            }
        }
        let count = joined.len() as u64;
        let power = super::power_levels_context(services, &record, &state)?;
        let mut members = Vec::new();
        for (user, member) in joined {
            let Ok(user_id) = UserId::parse(user) else { continue };
            if user_id.server_name() != services.server_name() {
                continue;
            }
            let mut context = super::member_context(&event.room_id, &user_id, Some(&member), count);
            context.power_levels = power.clone();
            members.push((user_id, context));
        }
        let audience = Arc::new(Audience { snapshot, members });
        let mut cache = self.audiences.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= ROOM_CACHE {
            cache.clear();
        }
        cache.insert(event.room_id.clone(), audience.clone());
        Ok(audience)
    }

    /// Judges `event` for everyone it may notify, queueing records and pushes in `batch`.
    /// When `replay`, users already notified of it are skipped.
    async fn judge_event(
        &self,
        services: &Services,
        event: &StoredPdu,
        replay: bool,
        batch: &mut Batch,
        deliveries: &mut Vec<Delivery>,
    ) -> Result<()> {
        if event.redacted_because.is_some() {
            return Ok(());
        }
        let sender = event.sender();
        let audience = self.audience(services, event)?;
        let json = crate::service::rooms::pdu::client_event(event, None);
        let raw: Raw<ruma::events::AnySyncTimelineEvent> =
            Raw::from_json(serde_json::value::to_raw_value(&json).map_err(Error::internal)?);
        let flat = FlattenedJson::from_raw(&raw);
        let invited = invitee(event, services);
        let invite_context;
        let mut candidates: Vec<(&UserId, &PushConditionRoomCtx)> =
            audience.members.iter().map(|(u, c)| (&**u, c)).collect();
        if let Some(user) = &invited {
            let count = audience.members.len() as u64;
            invite_context = super::member_context(&event.room_id, user, None, count);
            candidates.push((user, &invite_context));
        }
        let now = crate::service::now_ms();
        for (user_id, context) in candidates {
            if user_id.as_str() == sender {
                continue;
            }
            let rules = self.ruleset(services, user_id)?;
            let mut actions: &[Action] = &[];
            for rule in rules.iter() {
                if rule.applies(&flat, context).await {
                    actions = rule.actions();
                    break;
                }
            }
            if !actions.iter().any(|a| matches!(a, Action::Notify)) {
                continue;
            }
            let key = (user_id.as_str(), event.position);
            if replay && self.notifications.contains(&key)? {
                continue;
            }
            let record = NotificationRecord {
                room_id: event.room_id.clone(),
                event_id: event.event_id.clone(),
                ts: now,
                actions: actions.to_vec(),
            };
            self.notifications.put(batch, &key, &record);
            for pusher in services.pushers.of(user_id) {
                deliveries.push(Delivery::new(user_id, &pusher, &record));
            }
        }
        Ok(())
    }

    /// Judges the events `shorts` and writes what they produced with the new cursor.
    async fn judge_all(&self, services: &Services, shorts: &[u64], replay: bool) -> Result<()> {
        let mut batch = services.db.batch();
        let mut deliveries = Vec::new();
        let mut cursor = self.global.get(CURSOR_KEY)?.unwrap_or(0);
        for &short in shorts {
            cursor = cursor.max(short);
            let Some(event) = services.rooms.stored_by_short_public(short)? else { continue };
            if let Err(err) =
                self.judge_event(services, &event, replay, &mut batch, &mut deliveries).await
            {
                tracing::warn!(%err, event_id = %event.event_id, "could not judge push rules");
            }
        }
        self.global.put(&mut batch, CURSOR_KEY, &cursor);
        services.gateway.queue(&mut batch, deliveries);
        services.db.write(batch)?;
        services.gateway.wake();
        Ok(())
    }

    /// Judges events persisted after the stored cursor (minus a margin).
    async fn catch_up(&self, services: &Services) -> Result<()> {
        let cursor = self.global.get(CURSOR_KEY)?.unwrap_or(0);
        let mut shorts = Vec::with_capacity(BATCH);
        let mut total = 0usize;
        for entry in services.rooms.events_from(cursor.saturating_sub(REPLAY_MARGIN) + 1) {
            shorts.push(entry?.0);
            if shorts.len() == BATCH {
                self.judge_all(services, &shorts, true).await?;
                total += shorts.len();
                shorts.clear();
            }
        }
        if !shorts.is_empty() {
            total += shorts.len();
            self.judge_all(services, &shorts, true).await?;
        }
        if total > 0 {
            tracing::debug!(events = total, "notifier caught up");
        }
        Ok(())
    }
}

/// The local user a membership event invites, if any.
fn invitee(event: &StoredPdu, services: &Services) -> Option<OwnedUserId> {
    if event.wire.get("type").and_then(|t| t.as_str()) != Some("m.room.member") {
        return None;
    }
    let content = event.wire.get("content")?.as_object()?;
    if content.get("membership")?.as_str()? != "invite" {
        return None;
    }
    let user = UserId::parse(event.wire.get("state_key")?.as_str()?).ok()?;
    (user.server_name() == services.server_name()).then_some(user)
}

/// Runs the notifier until the server stops: first the catch-up, then each announced event.
pub async fn run(services: Arc<Services>, mut stopped: watch::Receiver<bool>) {
    let notifier = &services.notifier;
    let Some(mut jobs) = notifier.receiver.lock().unwrap_or_else(|e| e.into_inner()).take() else {
        return;
    };
    if let Err(err) = notifier.catch_up(&services).await {
        tracing::error!(%err, "notifier could not catch up");
    }
    let mut shorts = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            _ = stopped.wait_for(|stop| *stop) => return,
            received = jobs.recv_many(&mut shorts, BATCH) => if received == 0 { return },
        }
        if let Err(err) = notifier.judge_all(&services, &shorts, false).await {
            tracing::error!(%err, "notifier could not record notifications");
        }
        shorts.clear();
    }
}
