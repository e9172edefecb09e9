//! `/notifications`: the events that notified a user, newest first, and their retention.

use std::{sync::Arc, time::Duration};

use ruma::{OwnedRoomId, RoomId, UserId};
use serde_json::Value as JsonValue;
use tokio::sync::watch;

use super::notifier::NotificationRecord;
use crate::{
    error::{Error, Result},
    service::{Services, now_ms},
    storage::prefix,
};

/// The most notifications one page may hold.
pub const MAX_LIMIT: usize = 100;
/// Records skipped (filtered out or gone) while filling one page.
const MAX_SKIPPED: usize = 1000;
/// Records removed per write while pruning.
const PRUNE_BATCH: usize = 10_000;

/// The stream position a notifications key (`user id 0xFF position`) ends with.
pub fn key_position(key: &[u8]) -> u64 {
    key.get(key.len().saturating_sub(8)..)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

/// A user's read receipt positions, looked up once per room while going through their
/// notifications.
#[derive(Default)]
pub struct ReadPositions(std::collections::HashMap<OwnedRoomId, u64>);

impl ReadPositions {
    /// How far `user_id` has read `room_id` (0 without a receipt).
    pub fn of(&mut self, services: &Services, room_id: &RoomId, user_id: &UserId) -> Result<u64> {
        if let Some(read) = self.0.get(room_id) {
            return Ok(*read);
        }
        let read = services.ephemeral.read_position(services, room_id, user_id)?.unwrap_or(0);
        self.0.insert(room_id.to_owned(), read);
        Ok(read)
    }
}

/// One listed notification.
pub struct Listed {
    /// The stored record.
    pub record: NotificationRecord,
    /// The event, as the client sees it.
    pub event: JsonValue,
    /// Whether the user's read receipt is at or after it.
    pub read: bool,
}

/// A page of `user_id`'s notifications before the token `from` (newest first), only
/// highlights when `only_highlight`; returns the page and the token of the next one.
pub fn list(
    services: &Services,
    user_id: &UserId,
    from: Option<&str>,
    limit: usize,
    only_highlight: bool,
) -> Result<(Vec<Listed>, Option<String>)> {
    let before = match from {
        Some(token) => {
            token.parse::<u64>().map_err(|_| Error::invalid_param("Invalid from token"))?
        }
        None => u64::MAX,
    };
    let limit = limit.clamp(1, MAX_LIMIT);
    let lower = prefix(user_id.as_str());
    let mut upper = lower.clone();
    upper.extend_from_slice(&before.to_be_bytes());
    let mut page = Vec::new();
    let mut next = None;
    let mut skipped = 0;
    let mut reads = ReadPositions::default();
    let mut last_listed = before;
    for entry in services.notifier.table().scan_range(lower, upper, true) {
        let (key, record) = entry?;
        let position = key_position(&key);
        if page.len() == limit {
            next = Some(last_listed.to_string());
            break;
        }
        let event = match record.event(services)? {
            Some(event) if !only_highlight || record.highlight() => event,
            _ => {
                skipped += 1;
                if skipped > MAX_SKIPPED {
                    next = Some(position.to_string());
                    break;
                }
                continue;
            }
        };
        let read_upto = reads.of(services, &record.room_id, user_id)?;
        let json = crate::service::relations::serve(services, user_id, None, &event)?;
        page.push(Listed { record, event: json, read: position <= read_upto });
        last_listed = position;
    }
    Ok((page, next))
}

/// Removes notifications older than `[push] notification_retention_days`.
pub fn prune(services: &Services) -> Result<usize> {
    let days = services.config.push.notification_retention_days;
    if days == 0 {
        return Ok(0);
    }
    let cutoff = now_ms().saturating_sub(days.saturating_mul(86_400_000));
    let table = services.notifier.table();
    let mut removed = 0;
    let mut batch = services.db.batch();
    let mut queued = 0;
    for entry in table.scan_prefix(Vec::new()) {
        let (key, record) = entry?;
        if record.ts < cutoff {
            table.delete_raw(&mut batch, &key);
            queued += 1;
            if queued == PRUNE_BATCH {
                services.db.write(std::mem::replace(&mut batch, services.db.batch()))?;
                removed += queued;
                queued = 0;
            }
        }
    }
    services.db.write(batch)?;
    Ok(removed + queued)
}

/// Prunes old notifications at start and then daily until the server stops.
pub async fn prune_daily(services: Arc<Services>, mut stopped: watch::Receiver<bool>) {
    loop {
        let pass = services.clone();
        match tokio::task::spawn_blocking(move || prune(&pass)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(removed)) => tracing::info!(removed, "pruned notifications past retention"),
            Ok(Err(err)) => tracing::warn!(%err, "notification retention failed"),
            Err(err) => tracing::warn!(%err, "notification retention task failed"),
        }
        tokio::select! {
            _ = stopped.wait_for(|stop| *stop) => return,
            () = tokio::time::sleep(Duration::from_secs(86_400)) => {}
        }
    }
}
