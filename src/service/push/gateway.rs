//! Delivery to push gateways. Each push waits in a durable queue until its gateway accepts it,
//! so a gateway that is down (or a restart) loses nothing; a failing pusher backs off
//! exponentially, a push older than `[push] max_delivery_age_secs` is dropped, and pushkeys
//! the gateway rejects are removed. Requests go through the outbound address policy and
//! never hold up a send.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use ruma::{
    EventId, OwnedEventId, OwnedRoomId, OwnedUserId, UInt, UserId,
    api::{
        client::push::PusherKind,
        push_gateway::send_event_notification::v1::{
            Device, Notification, NotificationCounts, NotificationPriority, PusherData,
        },
    },
    push::{Action, PushFormat},
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

use super::{notifier::NotificationRecord, pushers::PusherRecord};
use crate::{
    error::{Error, Result},
    service::{Services, now_ms},
    storage::{Batch, Db, Table, tables},
};

/// Queued pushes looked at per round.
const ROUND: usize = 256;
/// Requests in flight at once.
const PARALLEL: usize = 16;
/// The longest wait between attempts for one pusher.
const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// Recent notifications looked at for the badge count.
const BADGE_WINDOW: usize = 100;

/// One push waiting for its gateway.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delivery {
    /// Whose device it is for.
    pub user_id: OwnedUserId,
    /// The pusher's app id.
    pub app_id: String,
    /// The pusher's pushkey.
    pub pushkey: String,
    /// The room of the event.
    pub room_id: OwnedRoomId,
    /// The event that notified.
    pub event_id: OwnedEventId,
    /// The actions of the rule that matched (for tweaks and priority).
    pub actions: Vec<Action>,
    /// When it was queued, in milliseconds.
    pub queued_ms: u64,
}

impl Delivery {
    /// A push of `record` to `pusher` of `user_id`.
    pub fn new(
        user_id: &UserId,
        pusher: &PusherRecord,
        record: &NotificationRecord,
        event_id: &EventId,
    ) -> Self {
        Self {
            user_id: user_id.to_owned(),
            app_id: pusher.pusher.ids.app_id.clone(),
            pushkey: pusher.pusher.ids.pushkey.clone(),
            room_id: record.room_id.clone(),
            event_id: event_id.to_owned(),
            actions: record.actions.clone(),
            queued_ms: record.ts,
        }
    }

    fn pusher_key(&self) -> PusherKey {
        (self.user_id.clone(), self.app_id.clone(), self.pushkey.clone())
    }
}

type PusherKey = (OwnedUserId, String, String);

/// How a pusher that failed is held back: attempts so far and when to try again.
#[derive(Clone, Copy)]
struct Backoff {
    failures: u32,
    retry_at: u64,
}

/// What a gateway made of one push.
enum Outcome {
    Delivered {
        rejected: bool,
    },
    /// Worth retrying later (unreachable, timeout, 5xx, 429).
    Retry(String),
    /// Never worth retrying (the gateway refused the request itself).
    Drop(String),
}

/// The durable push queue and its sender's state.
pub struct Gateway {
    queue: Table<Delivery>,
    sequence: AtomicU64,
    /// Deliveries in the queue (for metrics).
    pending: AtomicU64,
    wake: Notify,
    backoff: Mutex<HashMap<PusherKey, Backoff>>,
}

impl Gateway {
    /// The queue in `db`, continuing its numbering.
    pub fn new(db: &Db) -> Result<Self> {
        let queue: Table<Delivery> = db.table(tables::PUSH_QUEUE);
        let last = match queue.scan_prefix_rev(Vec::new()).next() {
            Some(entry) => {
                entry?.0.get(..8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_be_bytes)
            }
            None => 0,
        };
        let pending = queue.scan_prefix(Vec::new()).count() as u64;
        Ok(Self {
            queue,
            sequence: AtomicU64::new(last),
            pending: AtomicU64::new(pending),
            wake: Notify::new(),
            backoff: Mutex::default(),
        })
    }

    /// Adds `deliveries` to the queue in `batch`; once it is written, [`Gateway::queued_more`]
    /// counts them.
    pub fn queue(&self, batch: &mut Batch, deliveries: Vec<Delivery>) -> u64 {
        let count = deliveries.len() as u64;
        for delivery in deliveries {
            let sequence = self.sequence.fetch_add(1, Ordering::SeqCst) + 1;
            self.queue.put(batch, &sequence, &delivery);
        }
        count
    }

    /// Counts `count` pushes written to the queue.
    pub fn queued_more(&self, count: u64) {
        self.pending.fetch_add(count, Ordering::Relaxed);
    }

    /// How many pushes wait in the queue.
    pub fn queued(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }

    fn dequeued(&self, count: u64) {
        let _ = self
            .pending
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_sub(count)));
    }

    /// Tells the sender that new pushes are queued.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    fn backoff_of(&self, key: &PusherKey) -> Option<Backoff> {
        self.backoff.lock().unwrap_or_else(|e| e.into_inner()).get(key).copied()
    }

    fn record_outcome(&self, key: PusherKey, success: bool) {
        let mut map = self.backoff.lock().unwrap_or_else(|e| e.into_inner());
        if success {
            map.remove(&key);
            return;
        }
        let failures = map.get(&key).map_or(0, |b| b.failures).saturating_add(1);
        let wait = Duration::from_secs(1u64 << failures.min(16)).min(MAX_BACKOFF);
        map.insert(key, Backoff { failures, retry_at: now_ms() + wait.as_millis() as u64 });
    }

    /// One round: sends what is due, and returns how long to wait before the next.
    async fn round(&self, services: &Arc<Services>) -> Result<Option<Duration>> {
        let now = now_ms();
        let max_age = services.config.push.max_delivery_age_secs.saturating_mul(1000);
        let mut due = Vec::new();
        let mut stale = services.db.batch();
        let mut stale_count = 0;
        let mut next_retry: Option<u64> = None;
        let mut held = std::collections::HashSet::new();
        for entry in self.queue.scan_prefix(Vec::new()).take(ROUND) {
            let (key, delivery) = entry?;
            let pusher_key = delivery.pusher_key();
            let gone = !services.pushers.of(&delivery.user_id).iter().any(|p| {
                p.pusher.ids.app_id == delivery.app_id && p.pusher.ids.pushkey == delivery.pushkey
            });
            if gone || now.saturating_sub(delivery.queued_ms) > max_age {
                self.queue.delete_raw(&mut stale, &key);
                stale_count += 1;
                continue;
            }
            if let Some(backoff) = self.backoff_of(&pusher_key).filter(|b| b.retry_at > now) {
                next_retry = Some(next_retry.map_or(backoff.retry_at, |t| t.min(backoff.retry_at)));
                continue;
            }
            // One push per pusher per round keeps a failing gateway from being hammered.
            if held.insert(pusher_key) {
                due.push((key, delivery));
            }
        }
        if !stale.is_empty() {
            services.db.write(stale)?;
            self.dequeued(stale_count);
        }
        if due.is_empty() {
            return Ok(next_retry.map(|t| Duration::from_millis(t.saturating_sub(now))));
        }
        let mut sends = tokio::task::JoinSet::new();
        let mut due = due.into_iter();
        loop {
            while sends.len() < PARALLEL {
                let Some((key, delivery)) = due.next() else { break };
                let services = services.clone();
                sends.spawn(async move {
                    let outcome = send(&services, &delivery).await;
                    (key, delivery, outcome)
                });
            }
            let Some(joined) = sends.join_next().await else { break };
            let Ok((key, delivery, outcome)) = joined else { continue };
            let mut batch = services.db.batch();
            match outcome {
                Outcome::Delivered { rejected } => {
                    self.record_outcome(delivery.pusher_key(), true);
                    self.queue.delete_raw(&mut batch, &key);
                    services.db.write(batch)?;
                    self.dequeued(1);
                    if rejected {
                        tracing::info!(user = %delivery.user_id, app_id = %delivery.app_id, "gateway rejected pushkey; removing pusher");
                        services.pushers.remove(
                            services,
                            &delivery.user_id,
                            &delivery.app_id,
                            &delivery.pushkey,
                        )?;
                    }
                }
                Outcome::Retry(why) => {
                    tracing::debug!(user = %delivery.user_id, %why, "push will be retried");
                    self.record_outcome(delivery.pusher_key(), false);
                }
                Outcome::Drop(why) => {
                    tracing::warn!(user = %delivery.user_id, %why, "gateway refused a push");
                    self.queue.delete_raw(&mut batch, &key);
                    services.db.write(batch)?;
                    self.dequeued(1);
                }
            }
        }
        Ok(Some(Duration::ZERO))
    }
}

/// Sends queued pushes until the server stops.
pub async fn run(services: Arc<Services>, mut stopped: watch::Receiver<bool>) {
    let gateway = &services.gateway;
    loop {
        // Stopping mid-round is safe: a push leaves the queue only once delivered.
        let round = tokio::select! {
            _ = stopped.wait_for(|stop| *stop) => return,
            round = gateway.round(&services) => round,
        };
        let wait = match round {
            Ok(wait) => wait,
            Err(err) => {
                tracing::warn!(%err, "push delivery round failed");
                Some(Duration::from_secs(5))
            }
        };
        if wait == Some(Duration::ZERO) {
            if *stopped.borrow() {
                return;
            }
            continue;
        }
        let sleep = tokio::time::sleep(wait.unwrap_or(Duration::from_secs(3600)));
        tokio::select! {
            _ = stopped.wait_for(|stop| *stop) => return,
            () = gateway.wake.notified() => {}
            () = sleep => {}
        }
    }
}

/// Posts one push to its gateway.
async fn send(services: &Services, delivery: &Delivery) -> Outcome {
    let pushers = services.pushers.of(&delivery.user_id);
    let Some(pusher) = pushers.iter().find(|p| {
        p.pusher.ids.app_id == delivery.app_id && p.pusher.ids.pushkey == delivery.pushkey
    }) else {
        return Outcome::Drop("pusher removed".into());
    };
    let PusherKind::Http(http) = &pusher.pusher.kind else {
        return Outcome::Drop("not an http pusher".into());
    };
    let notification = match payload(services, delivery, pusher) {
        Ok(n) => n,
        Err(err) => return Outcome::Drop(err.to_string()),
    };
    let request = match services.outbound.request(reqwest::Method::POST, &http.url) {
        Ok(r) => r,
        Err(err) => return Outcome::Drop(err.to_string()),
    };
    let response =
        match request.json(&serde_json::json!({ "notification": notification })).send().await {
            Ok(r) => r,
            Err(err) => return Outcome::Retry(err.to_string()),
        };
    let status = response.status();
    if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
        return Outcome::Retry(format!("gateway answered {status}"));
    }
    if !status.is_success() {
        return Outcome::Drop(format!("gateway answered {status}"));
    }
    #[derive(Deserialize, Default)]
    struct Answer {
        #[serde(default)]
        rejected: Vec<String>,
    }
    let answer: Answer = response.json().await.unwrap_or_default();
    Outcome::Delivered { rejected: answer.rejected.contains(&delivery.pushkey) }
}

/// The gateway payload for `delivery`: the spec's full form, or ids and counts only for
/// `event_id_only` pushers.
fn payload(
    services: &Services,
    delivery: &Delivery,
    pusher: &PusherRecord,
) -> Result<Notification> {
    let PusherKind::Http(http) = &pusher.pusher.kind else {
        return Err(Error::internal("not an http pusher"));
    };
    let mut device = Device::new(delivery.app_id.clone(), delivery.pushkey.clone());
    device.pushkey_ts =
        Some(ruma::SecondsSinceUnixEpoch(UInt::try_from(pusher.created_secs).unwrap_or_default()));
    let mut data = PusherData::new();
    data.format = http.format.clone();
    data.data = http.data.clone();
    device.data = data;
    device.tweaks = delivery
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::SetTweak(tweak) => Some(tweak.clone()),
            _ => None,
        })
        .collect();
    let mut notification = Notification::new(vec![device]);
    notification.event_id = Some(delivery.event_id.clone());
    notification.room_id = Some(delivery.room_id.clone());
    let unread = badge(services, &delivery.user_id)?;
    notification.counts =
        NotificationCounts::new(UInt::try_from(unread).unwrap_or_default(), UInt::MIN);
    let event = services.rooms.stored(&delivery.event_id)?;
    let encrypted = event
        .as_ref()
        .is_some_and(|e| e.wire.get("type").and_then(|t| t.as_str()) == Some("m.room.encrypted"));
    let loud = delivery.actions.iter().any(|a| a.is_highlight() || a.sound().is_some());
    notification.prio =
        if loud || encrypted { NotificationPriority::High } else { NotificationPriority::Low };
    if http.format == Some(PushFormat::EventIdOnly) {
        return Ok(notification);
    }
    let Some(event) = event else { return Ok(notification) };
    let rooms = &services.rooms;
    notification.event_type = event.wire.get("type").and_then(|t| t.as_str()).map(Into::into);
    notification.sender = UserId::parse(event.sender()).ok();
    let content = event.wire.get("content").map(|c| serde_json::Value::from(c.clone()));
    notification.content = content.and_then(|c| serde_json::value::to_raw_value(&c).ok());
    notification.user_is_target =
        event.wire.get("state_key").and_then(|k| k.as_str()) == Some(delivery.user_id.as_str());
    if let Ok(state) = rooms.current_state(&delivery.room_id) {
        let name = rooms.state_content(&state, "m.room.name", "")?;
        notification.room_name =
            name.and_then(|n| n.get("name").and_then(|n| n.as_str()).map(str::to_owned));
        let alias = rooms.state_content(&state, "m.room.canonical_alias", "")?;
        notification.room_alias = alias
            .and_then(|a| a.get("alias").and_then(|a| a.as_str()).map(str::to_owned))
            .and_then(|a| a.try_into().ok());
        let member = rooms.state_content(&state, "m.room.member", event.sender())?;
        notification.sender_display_name =
            member.and_then(|m| m.get("displayname").and_then(|n| n.as_str()).map(str::to_owned));
    }
    Ok(notification)
}

/// The badge count: the user's recent notifications they have not read yet.
pub fn badge(services: &Services, user_id: &UserId) -> Result<u64> {
    let mut reads = super::notifications::ReadPositions::default();
    let mut unread = 0;
    let notifier = &services.notifier;
    let walk = super::notifications::walk(notifier.table(), notifier.runs(), user_id, None);
    for entry in walk.take(BADGE_WINDOW) {
        let entry = entry?;
        let read = reads.of(services, &entry.record.room_id, user_id)?;
        unread += u64::from(entry.position > read);
    }
    Ok(unread)
}
