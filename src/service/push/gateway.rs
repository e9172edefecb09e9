//! Delivery to push gateways. Pushes wait on the shared [`Outbox`], one queue per gateway URL
//! and pushkey, until their gateway accepts them, so a gateway that is down (or a restart)
//! loses nothing; a failing target backs off exponentially with one request in flight, a push
//! older than `[push] max_delivery_age_secs` is dropped, and pushkeys the gateway rejects are
//! removed. Requests go through the outbound address policy and never hold up a send.

use std::sync::Arc;

use ruma::{
    EventId, OwnedEventId, OwnedRoomId, OwnedUserId, UInt, UserId,
    api::{
        client::push::PusherKind,
        push_gateway::send_event_notification::v1::{
            Device, Notification, NotificationCounts, NotificationPriority, PusherData,
        },
    },
    push::{Action, HttpPusherData, PushFormat},
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{
    notifier::NotificationRecord,
    pushers::{PusherRecord, Pushers},
};
use crate::{
    error::{Error, Result},
    service::{
        Services, now_ms,
        outbox::{Deliver, Failure, Item, KIND_PUSH, Outbox},
        rooms::outside::OutsideMembership,
    },
    storage::{Batch, Db, Table, tables},
};

/// Pushes held per target (gateway URL and pushkey); more are dropped.
const MAX_QUEUED: u64 = 10_000;
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
    /// The gateway URL when it was queued (its queue's name).
    #[serde(default)]
    pub url: String,
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
            url: url_of(pusher).unwrap_or_default().to_owned(),
        }
    }

    /// The queue this push waits in: one per gateway URL and pushkey.
    fn target(&self) -> String {
        format!("{} {}", self.url, self.pushkey)
    }

    /// The pusher it is for, unless it was removed meanwhile.
    fn pusher(&self, pushers: &Pushers) -> Option<Arc<PusherRecord>> {
        pushers
            .of(&self.user_id)
            .into_iter()
            .find(|p| p.pusher.ids.app_id == self.app_id && p.pusher.ids.pushkey == self.pushkey)
    }
}

/// The gateway URL of an `http` pusher.
fn url_of(pusher: &PusherRecord) -> Option<&str> {
    match &pusher.pusher.kind {
        PusherKind::Http(http) => Some(http.url.as_str()),
        _ => None,
    }
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

/// Pushes written in one batch, by target, to count once the batch is durable.
#[derive(Default)]
pub struct Queued(Vec<(String, u64)>);

/// The push queues: an outbox of [`Delivery`] per gateway URL and pushkey.
pub struct Gateway {
    outbox: Arc<Outbox<Delivery>>,
}

impl Gateway {
    /// The queues in `db`. Pushes left in the table of earlier versions are moved to their
    /// queues (those of pushers removed meanwhile are dropped).
    pub fn new(db: &Db, pushers: &Pushers) -> Result<Self> {
        // One push a request: a batch partly accepted would otherwise be sent again whole.
        let outbox = Outbox::new(db, KIND_PUSH, "push_outbox", 1, MAX_QUEUED)?;
        let gateway = Self { outbox: Arc::new(outbox) };
        let legacy: Table<Delivery> = db.table(tables::PUSH_QUEUE);
        let mut batch = db.batch();
        let mut moved = Vec::new();
        for entry in legacy.scan_prefix(Vec::new()) {
            let (key, mut delivery) = entry?;
            legacy.delete_raw(&mut batch, &key);
            if let Some(url) = delivery.pusher(pushers).as_deref().and_then(url_of) {
                delivery.url = url.to_owned();
                moved.push(delivery);
            }
        }
        if !batch.is_empty() {
            let queued = gateway.queue(&mut batch, moved);
            db.write(batch)?;
            gateway.queued_more(queued);
        }
        Ok(gateway)
    }

    /// Adds `deliveries` to their queues in `batch`; once it is written,
    /// [`Gateway::queued_more`] counts them and wakes their senders.
    pub fn queue(&self, batch: &mut Batch, deliveries: Vec<Delivery>) -> Queued {
        let mut queued = Queued::default();
        for delivery in deliveries {
            let target = delivery.target();
            let count = self.outbox.push(batch, &target, std::slice::from_ref(&delivery));
            match queued.0.iter_mut().find(|(t, _)| *t == target) {
                Some((_, n)) => *n += count,
                None => queued.0.push((target, count)),
            }
        }
        queued
    }

    /// Counts pushes written to the queues and wakes their senders.
    pub fn queued_more(&self, queued: Queued) {
        for (target, count) in queued.0 {
            self.outbox.queued_more(&target, count);
        }
    }

    /// How many pushes wait in the queues.
    pub fn queued(&self) -> u64 {
        self.outbox.statuses().iter().map(|s| s.queued).sum()
    }
}

/// Delivers the push queues.
struct Pushes {
    services: Arc<Services>,
}

impl Deliver<Delivery> for Pushes {
    async fn deliver(
        &self,
        _target: &str,
        _txn_id: &str,
        items: &mut Vec<Item<Delivery>>,
    ) -> std::result::Result<(), Failure> {
        let services = &self.services;
        let max_age = services.config.push.max_delivery_age_secs.saturating_mul(1000);
        for item in items.iter() {
            let delivery = &item.value;
            // A push for a removed pusher, or one past its age, leaves the queue unsent.
            let Some(pusher) = delivery.pusher(&services.pushers) else { continue };
            if now_ms().saturating_sub(delivery.queued_ms) > max_age {
                continue;
            }
            match send(services, delivery, &pusher).await {
                Outcome::Delivered { rejected: false } => {}
                Outcome::Delivered { rejected: true } => {
                    tracing::info!(user = %delivery.user_id, app_id = %delivery.app_id, "gateway rejected pushkey; removing pusher");
                    let removed = services.pushers.remove(
                        services,
                        &delivery.user_id,
                        &delivery.app_id,
                        &delivery.pushkey,
                    );
                    if let Err(err) = removed {
                        tracing::warn!(%err, "rejected pusher could not be removed");
                    }
                }
                Outcome::Retry(why) => return Err(Failure::Retry(why)),
                Outcome::Drop(why) => {
                    tracing::warn!(user = %delivery.user_id, %why, "gateway refused a push");
                }
            }
        }
        Ok(())
    }
}

/// Sends queued pushes until the server stops.
pub async fn run(services: Arc<Services>, stopped: watch::Receiver<bool>) {
    let outbox = services.gateway.outbox.clone();
    outbox.run(Arc::new(Pushes { services }), stopped).await;
}

/// Posts one push to its gateway.
async fn send(services: &Services, delivery: &Delivery, pusher: &PusherRecord) -> Outcome {
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
/// `event_id_only` pushers. An invite to a room held elsewhere is read from the invite kept.
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
    if event.is_none()
        && let Some(invite) = outside_invite(services, delivery)?
    {
        return Ok(outside_payload(notification, http, &delivery.user_id, invite));
    }
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

/// The invite `delivery` is for, when it is one of a room held elsewhere still kept.
fn outside_invite(services: &Services, delivery: &Delivery) -> Result<Option<OutsideMembership>> {
    let kept = services.rooms.outside(&delivery.user_id, &delivery.room_id)?;
    Ok(kept.filter(|kept| {
        kept.membership == "invite" && kept.event_id.as_ref() == Some(&delivery.event_id)
    }))
}

/// `notification` completed for an invite to a room held elsewhere: the event from the invite
/// kept, the room name and the inviter's display name from the room's stripped state. An
/// invite is always worth waking the device for.
fn outside_payload(
    mut notification: Notification,
    http: &HttpPusherData,
    user_id: &UserId,
    invite: OutsideMembership,
) -> Notification {
    notification.prio = NotificationPriority::High;
    if http.format == Some(PushFormat::EventIdOnly) {
        return notification;
    }
    let Some(event) = &invite.event else { return notification };
    let field = |name: &str| event.get(name).and_then(|v| v.as_str());
    notification.event_type = field("type").map(Into::into);
    notification.sender = Some(invite.sender.clone());
    notification.content =
        event.get("content").and_then(|c| serde_json::value::to_raw_value(c).ok());
    notification.user_is_target = field("state_key") == Some(user_id.as_str());
    let stripped = |kind: &str, key: &str| {
        invite.stripped.iter().find(|e| e["type"] == kind && e["state_key"] == key)
    };
    let text = |event: Option<&serde_json::Value>, name: &str| {
        event.and_then(|e| e["content"][name].as_str()).map(str::to_owned)
    };
    notification.room_name = text(stripped("m.room.name", ""), "name");
    notification.room_alias = text(stripped("m.room.canonical_alias", ""), "alias")
        .and_then(|alias| alias.try_into().ok());
    notification.sender_display_name =
        text(stripped("m.room.member", invite.sender.as_str()), "displayname");
    notification
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
