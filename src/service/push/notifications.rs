//! `/notifications`: the events that notified a user, newest first, and their retention.

use std::{sync::Arc, time::Duration};

use ruma::{OwnedRoomId, RoomId, UserId, push::Action};
use serde::{Deserialize, Serialize};
use serde_json::Value as JsonValue;
use tokio::sync::watch;

use super::notifier::NotificationRecord;
use crate::{
    error::{Error, Result},
    service::{Services, now_ms},
    storage::{Table, prefix},
};

/// The most notifications one page may hold.
pub const MAX_LIMIT: usize = 100;
/// Records skipped (filtered out or gone) while filling one page.
const MAX_SKIPPED: usize = 1000;
/// Runs removed per write while pruning.
const PRUNE_BATCH: usize = 10_000;

/// The stream position a notifications key (`user id 0xFF position`) ends with.
pub fn key_position(key: &[u8]) -> u64 {
    key.get(key.len().saturating_sub(8)..)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

/// The events that notified one user in one judged batch, stored under the stream position of
/// the newest. Recording a run per batch instead of a record per event keeps a busy room's
/// notifications to one small write per member, and members notified alike share one encoding.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NotificationRun {
    /// The rooms the entries are in.
    #[serde(rename = "r")]
    pub rooms: Vec<OwnedRoomId>,
    /// The distinct action lists of the entries.
    #[serde(rename = "a")]
    pub actions: Vec<Vec<Action>>,
    /// When the batch was judged, in milliseconds.
    #[serde(rename = "t")]
    pub ts: u64,
    /// `(stream position, short id, room index, actions index)` per event, oldest first.
    #[serde(rename = "e")]
    pub entries: Vec<(u64, u64, u32, u32)>,
}

impl NotificationRun {
    /// The notification of entry `index`.
    fn record(&self, index: usize) -> Option<(u64, NotificationRecord)> {
        let &(position, short, room, actions) = self.entries.get(index)?;
        let record = NotificationRecord {
            room_id: self.rooms.get(room as usize)?.clone(),
            short,
            legacy_event_id: None,
            ts: self.ts,
            actions: self.actions.get(actions as usize)?.clone(),
        };
        Some((position, record))
    }
}

/// A value of the notifications table: a run of the user's own, a shared run, or a single
/// record written by earlier versions.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Stored {
    /// A run of notifications.
    Run(NotificationRun),
    /// A run shared with other members: list `k` of the batch whose newest event is at the
    /// key's position, in the shared runs table.
    Shared {
        /// The list number within the batch.
        k: u32,
    },
    /// One notification, keyed by its own position (earlier versions).
    One(NotificationRecord),
}

/// A user's stored value with the shared run it names read in.
enum Resolved {
    Run(NotificationRun),
    One(NotificationRecord),
    /// A shared run pruned meanwhile.
    Gone,
}

impl Resolved {
    /// `stored`, at key position `key`, with a shared run read from `runs`.
    fn of(stored: Stored, key: u64, runs: &Table<NotificationRun>) -> Result<Self> {
        Ok(match stored {
            Stored::Run(run) => Self::Run(run),
            Stored::One(record) => Self::One(record),
            Stored::Shared { k } => runs.get(&(key, u64::from(k)))?.map_or(Self::Gone, Self::Run),
        })
    }

    /// How many notifications it holds.
    fn len(&self) -> usize {
        match self {
            Self::Run(run) => run.entries.len(),
            Self::One(_) => 1,
            Self::Gone => 0,
        }
    }

    /// Notification `index` (oldest first) with its position; `key` is the position it is
    /// stored under.
    fn record(&self, key: u64, index: usize) -> Option<(u64, NotificationRecord)> {
        match self {
            Self::Run(run) => run.record(index),
            Self::One(record) => (index == 0).then(|| (key, record.clone())),
            Self::Gone => None,
        }
    }
}

/// Where a walk through a user's notifications resumes: the stored key position of a run and
/// how many of its notifications (oldest first) are still to come. Written `run_remaining`; a
/// bare position (tokens of earlier versions) resumes before that key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    run: u64,
    remaining: usize,
}

impl std::str::FromStr for Token {
    type Err = Error;

    fn from_str(token: &str) -> Result<Self> {
        let invalid = || Error::invalid_param("Invalid from token");
        let (run, remaining) = token.split_once('_').unwrap_or((token, "0"));
        Ok(Self {
            run: run.parse().map_err(|_| invalid())?,
            remaining: remaining.parse().map_err(|_| invalid())?,
        })
    }
}

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}_{}", self.run, self.remaining)
    }
}

/// One of a user's notifications, met while walking them newest first.
pub struct Entry {
    /// Where the walk resumes after this entry.
    pub after: Token,
    /// The stream position of the event.
    pub position: u64,
    /// The notification.
    pub record: NotificationRecord,
}

/// `user_id`'s notifications newest first, from the start or from `from`; shared runs are
/// read from `runs`.
pub fn walk<'a>(
    table: &'a Table<Stored>,
    runs: &'a Table<NotificationRun>,
    user_id: &UserId,
    from: Option<Token>,
) -> impl Iterator<Item = Result<Entry>> + 'a {
    let lower = prefix(user_id.as_str());
    let stored: Box<dyn Iterator<Item = _>> = match from {
        None => Box::new(table.scan_prefix_rev(lower)),
        Some(token) => {
            let mut upper = lower.clone();
            upper.extend_from_slice(&token.run.saturating_add(1).to_be_bytes());
            Box::new(table.scan_range(lower, upper, true))
        }
    };
    stored.flat_map(move |run| {
        let (key, stored) = match run {
            Ok(run) => run,
            Err(err) => return vec![Err(err.into())],
        };
        let key = key_position(&key);
        let stored = match Resolved::of(stored, key, runs) {
            Ok(resolved) => resolved,
            Err(err) => return vec![Err(err)],
        };
        let count = match from {
            Some(token) if token.run == key => token.remaining.min(stored.len()),
            _ => stored.len(),
        };
        (0..count)
            .rev()
            .filter_map(|index| {
                let (position, record) = stored.record(key, index)?;
                Some(Ok(Entry { after: Token { run: key, remaining: index }, position, record }))
            })
            .collect()
    })
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
    let from = from.map(str::parse::<Token>).transpose()?;
    let limit = limit.clamp(1, MAX_LIMIT);
    let mut page = Vec::new();
    let mut events = Vec::new();
    let mut next = None;
    let mut skipped = 0;
    let mut reads = ReadPositions::default();
    let mut last_listed = None;
    let notifier = &services.notifier;
    for entry in walk(notifier.table(), notifier.runs(), user_id, from) {
        let Entry { after, position, record } = entry?;
        if page.len() == limit {
            next = last_listed.map(|token: Token| token.to_string());
            break;
        }
        let event = match record.event(services)? {
            Some(event) if !only_highlight || record.highlight() => event,
            _ => {
                skipped += 1;
                if skipped > MAX_SKIPPED {
                    next = Some(after.to_string());
                    break;
                }
                continue;
            }
        };
        let read_upto = reads.of(services, &record.room_id, user_id)?;
        let json = crate::service::relations::serve(services, user_id, None, &event)?;
        page.push(Listed { record, event: json, read: position <= read_upto });
        events.push(event);
        last_listed = Some(after);
    }
    let served = page.iter_mut().map(|listed| &mut listed.event);
    crate::service::relations::add_replaced(services, user_id, served.zip(&events))?;
    Ok((page, next))
}

/// Removes notifications older than `[push] notification_retention_days`.
pub fn prune(services: &Services) -> Result<usize> {
    let days = services.config.push.notification_retention_days;
    if days == 0 {
        return Ok(0);
    }
    prune_before(services, now_ms().saturating_sub(days.saturating_mul(86_400_000)))
}

/// Removes notifications judged before `cutoff` (milliseconds); returns how many.
pub fn prune_before(services: &Services, cutoff: u64) -> Result<usize> {
    let mut removed = 0;
    let mut deleter = Deleter { services, batch: services.db.batch(), queued: 0 };
    let notifier = &services.notifier;
    let (table, runs) = (notifier.table(), notifier.runs());
    for entry in table.scan_prefix(Vec::new()) {
        let (key, stored) = entry?;
        let (ts, count) = match &stored {
            Stored::Run(run) => (run.ts, run.entries.len()),
            Stored::One(record) => (record.ts, 1),
            // Pruned with the shared run it names, or once that is gone.
            Stored::Shared { k } => runs
                .get(&(key_position(&key), u64::from(*k)))?
                .map_or((0, 0), |run| (run.ts, run.entries.len())),
        };
        if ts < cutoff {
            removed += count;
            deleter.delete(table, &key)?;
        }
    }
    for entry in runs.scan_prefix(Vec::new()) {
        let (key, run) = entry?;
        if run.ts < cutoff {
            deleter.delete(runs, &key)?;
        }
    }
    services.db.write(deleter.batch)?;
    Ok(removed)
}

/// Deletes keys in writes of [`PRUNE_BATCH`].
struct Deleter<'a> {
    services: &'a Services,
    batch: crate::storage::Batch,
    queued: usize,
}

impl Deleter<'_> {
    fn delete<V: Serialize + serde::de::DeserializeOwned>(
        &mut self,
        table: &Table<V>,
        key: &[u8],
    ) -> Result<()> {
        table.delete_raw(&mut self.batch, key);
        self.queued += 1;
        if self.queued == PRUNE_BATCH {
            let full = std::mem::replace(&mut self.batch, self.services.db.batch());
            self.services.db.write(full)?;
            self.queued = 0;
        }
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use ruma::{push::Action, user_id};

    use super::{NotificationRun, Stored, Token, walk};
    use crate::{
        service::push::notifier::NotificationRecord,
        storage::{Db, tables},
    };

    #[test]
    fn walking_pages_through_runs_and_earlier_records_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), 8).unwrap();
        let table = db.table::<Stored>(tables::NOTIFICATIONS);
        let runs = db.table::<NotificationRun>(tables::NOTIFICATION_RUNS);
        let bob = user_id!("@bob:x");
        let room = ruma::owned_room_id!("!r:x");
        let mut batch = db.batch();
        let one = NotificationRecord {
            room_id: room.clone(),
            short: 1,
            legacy_event_id: None,
            ts: 1,
            actions: vec![Action::Notify],
        };
        table.put(&mut batch, &(bob.as_str(), 10u64), &Stored::One(one));
        let run = |entries: Vec<(u64, u64, u32, u32)>| {
            Stored::Run(NotificationRun {
                rooms: vec![room.clone()],
                actions: vec![vec![Action::Notify]],
                ts: 2,
                entries,
            })
        };
        table.put(&mut batch, &(bob.as_str(), 13u64), &run(vec![(11, 2, 0, 0), (13, 3, 0, 0)]));
        table.put(&mut batch, &(bob.as_str(), 16u64), &run(vec![(14, 4, 0, 0), (16, 5, 0, 0)]));
        // A shared run (list 1 of the batch whose newest event is at 19), and one pruned.
        table.put(&mut batch, &(bob.as_str(), 19u64), &Stored::Shared { k: 1 });
        let Stored::Run(shared) = run(vec![(17, 6, 0, 0), (19, 7, 0, 0)]) else { unreachable!() };
        runs.put(&mut batch, &(19u64, 1u64), &shared);
        table.put(&mut batch, &(bob.as_str(), 18u64), &Stored::Shared { k: 0 });
        let other = user_id!("@bobby:x");
        table.put(&mut batch, &(other.as_str(), 20u64), &run(vec![(20, 6, 0, 0)]));
        db.write(batch).unwrap();

        let all: Vec<_> = walk(&table, &runs, bob, None)
            .map(|e| e.unwrap())
            .map(|e| (e.position, e.after))
            .collect();
        let positions: Vec<u64> = all.iter().map(|(p, _)| *p).collect();
        assert_eq!(positions, [19, 17, 16, 14, 13, 11, 10]);
        // Resuming after each entry lists exactly the ones after it, through any token.
        for (i, (_, after)) in all.iter().enumerate() {
            let token: Token = after.to_string().parse().unwrap();
            let rest: Vec<u64> =
                walk(&table, &runs, bob, Some(token)).map(|e| e.unwrap().position).collect();
            assert_eq!(rest, positions[i + 1..], "after {after}");
        }
        // A bare position, as earlier versions gave out, resumes before that key.
        let legacy: Token = "16".parse().unwrap();
        let rest: Vec<u64> =
            walk(&table, &runs, bob, Some(legacy)).map(|e| e.unwrap().position).collect();
        assert_eq!(rest, [13, 11, 10]);
        assert!("x_1".parse::<Token>().is_err() && "1_x".parse::<Token>().is_err());
    }
}
