//! Outboxes: a persistent, ordered queue per target (an application service, a federation
//! destination, a push gateway) with batching, one request in flight per target, exponential
//! backoff that resets on success, and catch-up after downtime.
//!
//! Every outbox shares one column family; a key is `kind byte, target, 0xFF, sequence`, so a
//! target's items are one prefix scan in the order they were queued. Items leave the queue only
//! once their target accepted them, so a restart or a target that is down for days loses
//! nothing. What "deliver this batch" means is the user's: a [`Deliver`] implementation.

use std::{
    collections::HashMap,
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::sync::{Notify, mpsc, watch};

use super::{Counter, now_ms};
use crate::{
    error::Result,
    storage::{Batch, Db, SEP, StorageError, Table, tables},
};

/// The kind byte of application service queues.
pub const KIND_APPSERVICE: u8 = 1;
/// The kind byte reserved for federation destinations.
pub const KIND_FEDERATION: u8 = 2;
/// The kind byte reserved for push gateways.
pub const KIND_PUSH: u8 = 3;

/// The first wait after a failure, unless the outbox is given another; each further failure
/// doubles it.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// The longest wait between two attempts, unless the outbox is given another.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How often a healthy target's last success is written down at most: its status is written
/// when it changes (a failure, a recovery), not after every batch.
const SUCCESS_WRITE_INTERVAL_MS: u64 = 10 * 60 * 1000;
/// The wait after the queue itself could not be read.
const STORAGE_RETRY: Duration = Duration::from_secs(5);

/// One queued item with its place in the queue.
#[derive(Debug, Clone)]
pub struct Item<V> {
    /// Increasing over every item of the outbox.
    pub sequence: u64,
    /// What was queued.
    pub value: V,
}

/// Delivers a batch of items to one target.
pub trait Deliver<V>: Send + Sync + 'static {
    /// Sends `items` (oldest first) to `target` as the transaction `txn_id`. It may send only
    /// the first of them (a batch too large in bytes) by cutting `items` to those it sent; the
    /// rest go in the next batch. A retried batch keeps its items and its id. `Ok` removes the
    /// items from the queue; a [`Failure`] retries them later with backoff, or drops them
    /// once the target refused them often enough.
    fn deliver<'a>(
        &'a self,
        target: &'a str,
        txn_id: &'a str,
        items: &'a mut Vec<Item<V>>,
    ) -> impl Future<Output = std::result::Result<(), Failure>> + Send + 'a;
}

/// Why a batch was not delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The target cannot take it now (down, busy, or an error here): retried with backoff
    /// for as long as it takes.
    Retry(String),
    /// The target refused the batch itself: retried with backoff (a refusal may pass) until
    /// refused `tries` times in a row, then dropped, so the items behind it are not held up
    /// forever. After a drop, refusals count as [`Failure::Retry`] until a batch goes through:
    /// one bad batch is dropped, a target refusing everything loses nothing more.
    Refused {
        /// Why, for the admin.
        reason: String,
        /// Attempts in all before the batch is dropped.
        tries: u32,
    },
}

impl Failure {
    /// Why, for the admin.
    pub fn reason(&self) -> &str {
        match self {
            Self::Retry(reason) | Self::Refused { reason, .. } => reason,
        }
    }
}

impl From<String> for Failure {
    fn from(reason: String) -> Self {
        Self::Retry(reason)
    }
}

/// How one target is doing, for the admin API.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TargetStatus {
    /// The target.
    pub target: String,
    /// Items waiting.
    pub queued: u64,
    /// When a batch was last accepted (ms since the epoch).
    pub last_success_ms: Option<u64>,
    /// Why the latest failed attempt failed.
    pub last_error: Option<String>,
    /// When it failed (ms since the epoch).
    pub last_error_ms: Option<u64>,
    /// Failures since the last success.
    pub failures: u32,
    /// When the current run of failures began (ms since the epoch).
    pub failing_since_ms: Option<u64>,
    /// The wait before the next attempt while failing, in milliseconds.
    pub retry_interval_ms: u64,
    /// Items dropped because the target kept refusing the batch they were in.
    pub dropped: u64,
}

/// A batch read from a queue: the raw keys and the items.
type Read<V> = (Vec<Box<[u8]>>, Vec<Item<V>>);

/// The in-memory side of one target: its wake-up, its depth and its status.
#[derive(Default)]
struct Target {
    wake: Notify,
    /// Cuts a failing target's backoff short.
    retry: Notify,
    queued: AtomicU64,
    status: Mutex<TargetStatus>,
}

/// A persistent queue per target of items `V`.
pub struct Outbox<V> {
    kind: u8,
    db: Db,
    table: Table<V>,
    sequence: Counter,
    targets: Mutex<HashMap<String, Arc<Target>>>,
    new_targets: mpsc::UnboundedSender<String>,
    new_targets_rx: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
    max_batch: usize,
    max_queued: u64,
    /// Whether an item still fits a batch holding the items given (besides `max_batch`).
    fits: fn(&[Item<V>], &V) -> bool,
    /// The wait after a first failure, and the longest.
    backoff: (Duration, Duration),
    /// Where the targets' statuses are kept across restarts, when they are.
    remembered: Option<Table<TargetStatus>>,
}

impl<V: Serialize + DeserializeOwned + Send + Sync + 'static> Outbox<V> {
    /// The outbox of `kind` (one of the `KIND_*` bytes) in `db`, numbering with the counter
    /// `counter`, sending at most `max_batch` items a request and holding at most `max_queued`
    /// per target. Targets with items left from before are picked up when [`Outbox::run`]
    /// starts.
    pub fn new(
        db: &Db,
        kind: u8,
        counter: &'static str,
        max_batch: usize,
        max_queued: u64,
    ) -> Result<Self, StorageError> {
        let (new_targets, rx) = mpsc::unbounded_channel();
        let outbox = Self {
            kind,
            db: db.clone(),
            table: db.table(tables::OUTBOX),
            sequence: Counter::new(db, counter)?,
            targets: Mutex::default(),
            new_targets,
            new_targets_rx: Mutex::new(Some(rx)),
            max_batch: max_batch.max(1),
            max_queued,
            fits: |_, _| true,
            backoff: (FIRST_BACKOFF, MAX_BACKOFF),
            remembered: None,
        };
        let mut counts: HashMap<String, u64> = HashMap::new();
        let raw: Table<Box<serde_json::value::RawValue>> = db.table(tables::OUTBOX);
        for entry in raw.scan_prefix(vec![kind]) {
            let (key, _) = entry?;
            if let Some(target) = target_of(&key) {
                *counts.entry(target.to_owned()).or_default() += 1;
            }
        }
        for (target, count) in counts {
            outbox.target(&target).queued.store(count, Ordering::Relaxed);
        }
        Ok(outbox)
    }

    /// Bounds batches further: an item goes in a batch (of at most `max_batch`) while `fits`
    /// says it fits beside the items already in it; the batch ends before the first that
    /// does not, so the queue's order is kept.
    pub fn bounded_by(mut self, fits: fn(&[Item<V>], &V) -> bool) -> Self {
        self.fits = fits;
        self
    }

    /// Waits `first` after a target's first failure, doubling with each further one up to
    /// `max`.
    pub fn with_backoff(mut self, first: Duration, max: Duration) -> Self {
        self.backoff = (first, max.max(first));
        self
    }

    /// Keeps each target's status (failures, backoff, last success, dropped items) across
    /// restarts, written when it changes; the targets known from before are listed again and
    /// a failing one waits out what is left of its backoff.
    pub fn remembering_targets(mut self) -> Result<Self, StorageError> {
        let table: Table<TargetStatus> = self.db.table(tables::OUTBOX_TARGETS);
        for entry in table.scan_prefix(vec![self.kind]) {
            let (key, mut status) = entry?;
            let Some(name) = key.get(1..).and_then(|name| std::str::from_utf8(name).ok()) else {
                continue;
            };
            status.target = name.to_owned();
            status.queued = 0;
            *self.target(name).status.lock().unwrap_or_else(|e| e.into_inner()) = status;
        }
        self.remembered = Some(table);
        Ok(self)
    }

    /// Adds `status` of `target` to `batch`, when statuses are kept.
    fn put_status(&self, batch: &mut Batch, target: &str, status: &TargetStatus) {
        let Some(table) = &self.remembered else { return };
        let mut key = Vec::with_capacity(target.len() + 1);
        key.push(self.kind);
        key.extend_from_slice(target.as_bytes());
        table.put(batch, &key[..], status);
    }

    /// Writes down `status` of `target`, when statuses are kept.
    fn remember(&self, target: &str, status: &TargetStatus) {
        if self.remembered.is_none() {
            return;
        }
        let mut batch = self.db.batch();
        self.put_status(&mut batch, target, status);
        if let Err(err) = self.db.write_unsynced(batch) {
            tracing::warn!(%err, target, "an outbox target's status could not be written");
        }
    }

    /// The state of `target`, created (and its worker asked for) on first use.
    fn target(&self, target: &str) -> Arc<Target> {
        let mut targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(state) = targets.get(target) {
            return state.clone();
        }
        let state = Arc::new(Target::default());
        state.status.lock().unwrap_or_else(|e| e.into_inner()).target = target.to_owned();
        targets.insert(target.to_owned(), state.clone());
        // The receiver lives as long as the server runs; a send after it stopped is moot.
        let _ = self.new_targets.send(target.to_owned());
        state
    }

    fn prefix(&self, target: &str) -> Vec<u8> {
        let mut key = Vec::with_capacity(target.len() + 2);
        key.push(self.kind);
        key.extend_from_slice(target.as_bytes());
        key.push(SEP);
        key
    }

    /// Adds `values` to `target`'s queue in `batch`, in order, and returns how many were
    /// queued: fewer when the queue is full (the rest are dropped, and said so in the
    /// target's status). Call [`Outbox::queued_more`] once the batch is written.
    pub fn push(&self, batch: &mut Batch, target: &str, values: &[V]) -> u64 {
        let state = self.target(target);
        let room = self.max_queued.saturating_sub(state.queued.load(Ordering::Relaxed));
        let take = (values.len() as u64).min(room);
        if take < values.len() as u64 {
            let mut status = state.status.lock().unwrap_or_else(|e| e.into_inner());
            status.last_error = Some(format!("queue full: {} items dropped", values.len()));
            status.last_error_ms = Some(now_ms());
            tracing::warn!(target, dropped = values.len() as u64 - take, "outbox queue is full");
        }
        let prefix = self.prefix(target);
        for value in values.iter().take(take as usize) {
            let mut key = prefix.clone();
            key.extend_from_slice(&self.sequence.next(batch).to_be_bytes());
            self.table.put(batch, &key[..], value);
        }
        take
    }

    /// Counts `count` items written to `target`'s queue and wakes its worker.
    pub fn queued_more(&self, target: &str, count: u64) {
        if count == 0 {
            return;
        }
        let state = self.target(target);
        state.queued.fetch_add(count, Ordering::Relaxed);
        state.wake.notify_one();
    }

    /// Queues `values` for `target` in a write of their own. The write does not wait for the
    /// log sync: the next synced write (the event's own group commit, when called after it
    /// was written deferred) makes it durable with everything before it.
    pub fn enqueue(&self, target: &str, values: &[V]) -> Result<()> {
        let mut batch = self.db.batch();
        let count = self.push(&mut batch, target, values);
        self.db.write_unsynced(batch)?;
        self.queued_more(target, count);
        Ok(())
    }

    /// Items waiting for `target`.
    pub fn depth(&self, target: &str) -> u64 {
        let targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        targets.get(target).map_or(0, |t| t.queued.load(Ordering::Relaxed))
    }

    /// The status of `target` (empty when nothing was ever queued for it).
    pub fn status(&self, target: &str) -> TargetStatus {
        let targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        match targets.get(target) {
            Some(state) => {
                let mut status = state.status.lock().unwrap_or_else(|e| e.into_inner()).clone();
                status.queued = state.queued.load(Ordering::Relaxed);
                status
            }
            None => TargetStatus { target: target.to_owned(), ..TargetStatus::default() },
        }
    }

    /// The status of every target known: used since start, with items left from before, or
    /// (when statuses are kept, see [`Outbox::remembering_targets`]) ever used; ordered by
    /// target.
    pub fn statuses(&self) -> Vec<TargetStatus> {
        let names: Vec<String> = {
            let targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
            targets.keys().cloned().collect()
        };
        let mut statuses: Vec<TargetStatus> = names.iter().map(|t| self.status(t)).collect();
        statuses.sort_unstable_by(|a, b| a.target.cmp(&b.target));
        statuses
    }

    /// Ends `target`'s backoff now when it is failing: it is reachable again (it contacted
    /// us, or an admin asked). Cheap when the target is not failing.
    pub fn retry_now(&self, target: &str) {
        let targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(state) = targets.get(target) {
            let failing = state.status.lock().unwrap_or_else(|e| e.into_inner()).failures > 0;
            if failing {
                state.retry.notify_one();
            }
        }
    }

    /// Clears `target`'s failures and backoff (for good, when statuses are kept) and retries
    /// it now: an admin says it is worth trying again.
    pub fn reset(&self, target: &str) {
        let state = {
            let targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
            let Some(state) = targets.get(target) else { return };
            state.clone()
        };
        let cleared = {
            let mut status = state.status.lock().unwrap_or_else(|e| e.into_inner());
            let failing = status.failures > 0;
            status.failures = 0;
            status.failing_since_ms = None;
            status.retry_interval_ms = 0;
            failing.then(|| status.clone())
        };
        if let Some(status) = cleared {
            self.remember(target, &status);
            state.retry.notify_one();
        }
    }

    /// The oldest items of `target`, at most one batch, with their keys.
    fn read(&self, target: &str) -> Result<Read<V>> {
        let mut keys = Vec::new();
        let mut items = Vec::new();
        for entry in self.table.scan_prefix(self.prefix(target)).take(self.max_batch) {
            let (key, value) = entry?;
            if !items.is_empty() && !(self.fits)(&items, &value) {
                break;
            }
            let sequence = key
                .len()
                .checked_sub(8)
                .and_then(|at| key[at..].try_into().ok())
                .map_or(0, u64::from_be_bytes);
            keys.push(key);
            items.push(Item { sequence, value });
        }
        Ok((keys, items))
    }

    /// Delivers every target's queue with `deliver` until `stopped`: one worker per target,
    /// each with at most one request in flight.
    pub async fn run<D: Deliver<V>>(
        self: Arc<Self>,
        deliver: Arc<D>,
        mut stopped: watch::Receiver<bool>,
    ) {
        let receiver = self.new_targets_rx.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(mut receiver) = receiver else {
            tracing::warn!("an outbox was started twice");
            return;
        };
        let mut workers = tokio::task::JoinSet::new();
        let for_workers = stopped.clone();
        loop {
            tokio::select! {
                _ = stopped.wait_for(|stop| *stop) => break,
                target = receiver.recv() => {
                    let Some(target) = target else { break };
                    let state = self.target(&target);
                    let worker =
                        self.clone().work(target, state, deliver.clone(), for_workers.clone());
                    workers.spawn(worker);
                }
            }
        }
        workers.abort_all();
        while workers.join_next().await.is_some() {}
    }

    /// Sends `target`'s queue in order, one batch at a time.
    async fn work<D: Deliver<V>>(
        self: Arc<Self>,
        target: String,
        state: Arc<Target>,
        deliver: Arc<D>,
        mut stopped: watch::Receiver<bool>,
    ) {
        let mut keys: Vec<Box<[u8]>> = Vec::new();
        let mut items: Vec<Item<V>> = Vec::new();
        let mut txn_id = String::new();
        // Left from before a restart: the failures so far, when the next attempt is due, and
        // when a success was last written down.
        let (mut failures, mut not_before, mut success_written) = {
            let status = state.status.lock().unwrap_or_else(|e| e.into_inner());
            let due = status.last_error_ms.unwrap_or(0).saturating_add(status.retry_interval_ms);
            (status.failures, (status.failures > 0).then_some(due), status.last_success_ms)
        };
        // Times the current batch was refused.
        let mut refusals: u32 = 0;
        // A batch was dropped and nothing went through since: the next refusals are retried
        // like any failure, so a target refusing everything (a proxy answering in its place)
        // costs at most one batch, never the whole queue.
        let mut dropped_last = false;
        loop {
            if items.is_empty() {
                match self.read(&target) {
                    Ok((k, i)) => {
                        (keys, items) = (k, i);
                        refusals = 0;
                        let first = items.first().map_or(0, |i| i.sequence);
                        let last = items.last().map_or(0, |i| i.sequence);
                        txn_id = format!("{first}-{last}");
                    }
                    Err(err) => {
                        tracing::warn!(%err, target, "outbox queue could not be read");
                        if pause(&mut stopped, STORAGE_RETRY).await {
                            return;
                        }
                        continue;
                    }
                }
                if items.is_empty() {
                    tokio::select! {
                        _ = stopped.wait_for(|stop| *stop) => return,
                        () = state.wake.notified() => continue,
                    }
                }
            }
            // A target failing before a restart waits out what is left of its backoff.
            if let Some(due) = not_before.take() {
                let wait = Duration::from_millis(due.saturating_sub(now_ms())).min(self.backoff.1);
                tokio::select! {
                    _ = stopped.wait_for(|stop| *stop) => return,
                    () = tokio::time::sleep(wait) => {}
                    () = state.retry.notified() => failures = 0,
                }
            }
            // The id stays the batch's through retries, also when only its first items went.
            let outcome = tokio::select! {
                _ = stopped.wait_for(|stop| *stop) => return,
                outcome = deliver.deliver(&target, &txn_id, &mut items) => outcome,
            };
            keys.truncate(items.len());
            let refused_for_good = match &outcome {
                Err(Failure::Refused { tries, .. }) if !dropped_last => {
                    refusals = refusals.saturating_add(1);
                    refusals >= *tries
                }
                _ => false,
            };
            match outcome {
                Ok(()) => {
                    let now = now_ms();
                    let changed = {
                        let mut status = state.status.lock().unwrap_or_else(|e| e.into_inner());
                        let recovered = status.failures > 0 || status.retry_interval_ms > 0;
                        status.last_success_ms = Some(now);
                        status.failures = 0;
                        status.failing_since_ms = None;
                        status.retry_interval_ms = 0;
                        let stale = success_written
                            .is_none_or(|at| now.saturating_sub(at) >= SUCCESS_WRITE_INTERVAL_MS);
                        (recovered || stale).then(|| status.clone())
                    };
                    // What changed is written with the removal of the delivered items.
                    self.remove(&target, &state, &keys, changed.as_ref());
                    if changed.is_some() {
                        success_written = Some(now);
                    }
                    failures = 0;
                    dropped_last = false;
                    keys.clear();
                    items.clear();
                }
                Err(failure) if refused_for_good => {
                    let count = items.len() as u64;
                    tracing::warn!(
                        target,
                        reason = failure.reason(),
                        count,
                        refusals,
                        "the target keeps refusing a batch; its items are dropped"
                    );
                    let status = {
                        let mut status = state.status.lock().unwrap_or_else(|e| e.into_inner());
                        status.last_error = Some(format!(
                            "{}; {count} items dropped after {refusals} refusals",
                            failure.reason()
                        ));
                        status.last_error_ms = Some(now_ms());
                        status.dropped = status.dropped.saturating_add(count);
                        status.failures = 0;
                        status.failing_since_ms = None;
                        status.retry_interval_ms = 0;
                        status.clone()
                    };
                    // The dropped count is written with the deletion it counts.
                    self.remove(&target, &state, &keys, Some(&status));
                    failures = 0;
                    dropped_last = true;
                    keys.clear();
                    items.clear();
                }
                Err(failure) => {
                    failures = failures.saturating_add(1);
                    let wait = backoff(failures, self.backoff);
                    let why = match failure {
                        Failure::Retry(reason) | Failure::Refused { reason, .. } => reason,
                    };
                    tracing::debug!(target, %why, ?wait, "outbox delivery failed; retrying later");
                    let status = {
                        let mut status = state.status.lock().unwrap_or_else(|e| e.into_inner());
                        let now = now_ms();
                        status.last_error = Some(why);
                        status.last_error_ms = Some(now);
                        status.failures = failures;
                        status.failing_since_ms.get_or_insert(now);
                        status.retry_interval_ms = wait.as_millis() as u64;
                        status.clone()
                    };
                    self.remember(&target, &status);
                    tokio::select! {
                        _ = stopped.wait_for(|stop| *stop) => return,
                        () = tokio::time::sleep(wait) => {}
                        () = state.retry.notified() => failures = 0,
                    }
                }
            }
        }
    }
}

impl<V: Serialize + DeserializeOwned + Send + Sync + 'static> Outbox<V> {
    /// Removes the items under `keys` (delivered or dropped) from `target`'s queue.
    fn remove(
        &self,
        target: &str,
        state: &Target,
        keys: &[Box<[u8]>],
        status: Option<&TargetStatus>,
    ) {
        let mut batch = self.db.batch();
        for key in keys {
            self.table.delete_raw(&mut batch, key);
        }
        if let Some(status) = status {
            self.put_status(&mut batch, target, status);
        }
        if let Err(err) = self.db.write(batch) {
            // Delivered again later under the same transaction id.
            tracing::warn!(%err, target, "delivered items could not be removed");
        }
        let count = keys.len() as u64;
        let _ = state
            .queued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_sub(count)));
    }
}

/// The wait after `failures` failures in a row, from `first` up to `max`.
fn backoff(failures: u32, (first, max): (Duration, Duration)) -> Duration {
    first.saturating_mul(1u32 << failures.saturating_sub(1).min(16)).min(max)
}

/// Sleeps `wait`; true when the server stopped meanwhile.
async fn pause(stopped: &mut watch::Receiver<bool>, wait: Duration) -> bool {
    tokio::select! {
        _ = stopped.wait_for(|stop| *stop) => true,
        () = tokio::time::sleep(wait) => false,
    }
}

/// The target part of a key (`kind, target, 0xFF, sequence`).
fn target_of(key: &[u8]) -> Option<&str> {
    let end = key.len().checked_sub(9)?;
    if key.get(end) != Some(&SEP) {
        return None;
    }
    std::str::from_utf8(key.get(1..end)?).ok()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;

    /// Records what it was given; fails while `down` is set.
    #[derive(Default)]
    struct Recorder {
        down: AtomicBool,
        seen: Mutex<Vec<(String, String, Vec<u64>)>>,
        refused: Mutex<Vec<Vec<u64>>>,
        calls: Notify,
    }

    impl Deliver<u64> for Recorder {
        async fn deliver(
            &self,
            target: &str,
            txn_id: &str,
            items: &mut Vec<Item<u64>>,
        ) -> std::result::Result<(), Failure> {
            let down = self.down.load(Ordering::SeqCst);
            let values: Vec<u64> = items.iter().map(|i| i.value).collect();
            self.calls.notify_one();
            if down {
                return Err(Failure::Retry("down".into()));
            }
            // A batch holding a value of 10_000 or more is refused, twice before it is dropped.
            if values.iter().any(|v| *v >= 10_000) {
                self.refused.lock().unwrap().push(values);
                return Err(Failure::Refused { reason: "refused".into(), tries: 2 });
            }
            self.seen.lock().unwrap().push((target.into(), txn_id.into(), values));
            Ok(())
        }
    }

    async fn until(mut done: impl FnMut() -> bool) {
        for _ in 0..500 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition not reached");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn queues_survive_reopen_and_deliver_in_order_after_failures() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Db::open(dir.path(), 8).unwrap();
            let outbox: Outbox<u64> = Outbox::new(&db, KIND_APPSERVICE, "t", 3, 100).unwrap();
            for n in 1..=5 {
                outbox.enqueue("a", &[n]).unwrap();
            }
            outbox.enqueue("b", &[100]).unwrap();
            let mut batch = db.batch();
            let pushed = outbox.push(&mut batch, "a", &(6..=200).collect::<Vec<_>>());
            assert_eq!(pushed, 95, "the queue holds 100 at most");
            db.write(batch).unwrap();
            outbox.queued_more("a", pushed);
            assert_eq!(outbox.depth("a"), 100);
            assert!(outbox.status("a").last_error.unwrap().starts_with("queue full"));
        }
        let db = Db::open(dir.path(), 8).unwrap();
        let outbox = Arc::new(Outbox::<u64>::new(&db, KIND_APPSERVICE, "t", 40, 1000).unwrap());
        let other = Outbox::<u64>::new(&db, KIND_FEDERATION, "u", 40, 1000).unwrap();
        assert_eq!((outbox.depth("a"), outbox.depth("b"), other.depth("a")), (100, 1, 0));
        let recorder = Arc::new(Recorder::default());
        recorder.down.store(true, Ordering::SeqCst);
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(outbox.clone().run(recorder.clone(), stopped));
        recorder.calls.notified().await;
        recorder.calls.notified().await;
        until(|| outbox.status("a").failures >= 1).await;
        assert_eq!(outbox.status("a").last_error.as_deref(), Some("down"));
        recorder.down.store(false, Ordering::SeqCst);
        until(|| outbox.depth("a") == 0 && outbox.depth("b") == 0).await;
        outbox.enqueue("a", &[1000]).unwrap();
        until(|| outbox.depth("a") == 0).await;
        let seen = recorder.seen.lock().unwrap().clone();
        let of_a: Vec<u64> =
            seen.iter().filter(|(t, ..)| t == "a").flat_map(|(_, _, v)| v.clone()).collect();
        let mut expected: Vec<u64> = (1..=100).collect();
        expected.push(1000);
        assert_eq!(of_a, expected, "every item once, in order");
        assert!(seen.iter().filter(|(t, ..)| t == "a").all(|(_, _, v)| v.len() <= 40));
        let ids: std::collections::HashSet<_> = seen.iter().map(|(_, id, _)| id.clone()).collect();
        assert_eq!(ids.len(), seen.len(), "transaction ids are unique");
        let status = outbox.status("a");
        assert_eq!(status.failures, 0);
        assert!(status.last_success_ms.is_some());
        stop.send(true).unwrap();
        task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_target_refusing_everything_loses_one_batch_only() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), 8).unwrap();
        let outbox = Arc::new(Outbox::<u64>::new(&db, KIND_FEDERATION, "t", 1, 100).unwrap());
        outbox.enqueue("a", &[10_000, 10_001, 1]).unwrap();
        let recorder = Arc::new(Recorder::default());
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(outbox.clone().run(recorder.clone(), stopped));
        // The first batch goes after its two refusals; the next is refused more often than
        // that and still waits, with what follows it.
        let refusals_of = |value: u64| {
            recorder.refused.lock().unwrap().iter().filter(|v| v.as_slice() == [value]).count()
        };
        until(|| refusals_of(10_001) >= 3).await;
        assert_eq!(refusals_of(10_000), 2);
        assert_eq!((outbox.depth("a"), outbox.status("a").dropped), (2, 1));
        assert!(recorder.seen.lock().unwrap().is_empty());
        stop.send(true).unwrap();
        task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_batch_refused_often_enough_is_dropped_and_the_rest_flows() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), 8).unwrap();
        let outbox = Arc::new(Outbox::<u64>::new(&db, KIND_FEDERATION, "t", 1, 100).unwrap());
        outbox.enqueue("a", &[1, 10_000, 2]).unwrap();
        let recorder = Arc::new(Recorder::default());
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(outbox.clone().run(recorder.clone(), stopped));
        until(|| outbox.depth("a") == 0).await;
        let seen: Vec<Vec<u64>> =
            recorder.seen.lock().unwrap().iter().map(|(_, _, v)| v.clone()).collect();
        assert_eq!(seen, [vec![1], vec![2]], "what follows the refused batch still goes");
        assert_eq!(*recorder.refused.lock().unwrap(), [vec![10_000], vec![10_000]]);
        let status = outbox.status("a");
        assert_eq!((status.dropped, status.failures, status.retry_interval_ms), (1, 0, 0));
        let error = status.last_error.unwrap();
        assert_eq!(error, "refused; 1 items dropped after 2 refusals");
        stop.send(true).unwrap();
        task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn retry_now_ends_a_long_backoff_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), 8).unwrap();
        let minute = Duration::from_secs(60);
        let outbox = Outbox::<u64>::new(&db, KIND_FEDERATION, "t", 10, 100).unwrap();
        let outbox = Arc::new(outbox.with_backoff(minute, minute));
        // Not failing: nothing to cut short, and no wake-up is kept for later.
        outbox.retry_now("a");
        outbox.enqueue("a", &[1]).unwrap();
        let recorder = Arc::new(Recorder::default());
        recorder.down.store(true, Ordering::SeqCst);
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(outbox.clone().run(recorder.clone(), stopped));
        until(|| outbox.status("a").failures == 1).await;
        assert_eq!(outbox.status("a").retry_interval_ms, 60_000);
        recorder.down.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(outbox.depth("a"), 1, "the backoff holds");
        let asked = std::time::Instant::now();
        outbox.retry_now("a");
        until(|| outbox.depth("a") == 0).await;
        assert!(asked.elapsed() < Duration::from_secs(2), "{:?}", asked.elapsed());
        let status = outbox.status("a");
        assert_eq!((status.failures, status.retry_interval_ms), (0, 0));
        stop.send(true).unwrap();
        task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn remembered_statuses_survive_reopen_until_reset() {
        let dir = tempfile::tempdir().unwrap();
        let minute = Duration::from_secs(60);
        let open = |db: &Db| {
            let outbox = Outbox::<u64>::new(db, KIND_FEDERATION, "t", 10, 100).unwrap();
            Arc::new(outbox.with_backoff(minute, minute).remembering_targets().unwrap())
        };
        {
            let db = Db::open(dir.path(), 8).unwrap();
            let outbox = open(&db);
            outbox.enqueue("a", &[1]).unwrap();
            let recorder = Arc::new(Recorder::default());
            recorder.down.store(true, Ordering::SeqCst);
            let (stop, stopped) = watch::channel(false);
            let task = tokio::spawn(outbox.clone().run(recorder, stopped));
            until(|| outbox.status("a").failures == 1).await;
            stop.send(true).unwrap();
            task.await.unwrap();
            // Another kind's outbox keeps its own.
            let other = Outbox::<u64>::new(&db, KIND_APPSERVICE, "u", 10, 100).unwrap();
            assert!(other.remembering_targets().unwrap().statuses().is_empty());
        }
        let db = Db::open(dir.path(), 8).unwrap();
        let outbox = open(&db);
        let status = outbox.status("a");
        assert_eq!((status.failures, status.retry_interval_ms, status.queued), (1, 60_000, 1));
        assert_eq!(status.last_error.as_deref(), Some("down"));
        assert!(status.failing_since_ms.is_some());
        // Still failing after the restart: what is left of the minute is waited out.
        let recorder = Arc::new(Recorder::default());
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(outbox.clone().run(recorder.clone(), stopped));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(outbox.depth("a"), 1, "the backoff holds across the restart");
        outbox.reset("a");
        let status = outbox.status("a");
        assert_eq!((status.failures, status.retry_interval_ms), (0, 0));
        until(|| outbox.depth("a") == 0).await;
        stop.send(true).unwrap();
        task.await.unwrap();
        drop(outbox);
        drop(db);
        let db = Db::open(dir.path(), 8).unwrap();
        let status = open(&db).status("a");
        assert_eq!((status.failures, status.retry_interval_ms, status.queued), (0, 0, 0));
        assert!(status.last_success_ms.is_some() && status.failing_since_ms.is_none());
    }

    #[test]
    fn a_bounded_batch_ends_before_the_first_item_that_does_not_fit() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), 8).unwrap();
        // At most two odd values in a batch of at most five.
        let outbox: Outbox<u64> =
            Outbox::new(&db, KIND_APPSERVICE, "t", 5, 100).unwrap().bounded_by(|items, next| {
                next % 2 == 0 || items.iter().filter(|i| i.value % 2 == 1).count() < 2
            });
        outbox.enqueue("a", &[1, 2, 3, 4, 5, 6, 8, 10, 12]).unwrap();
        let values = |outbox: &Outbox<u64>| -> Vec<u64> {
            outbox.read("a").unwrap().1.into_iter().map(|i| i.value).collect()
        };
        assert_eq!(values(&outbox), [1, 2, 3, 4]);
        let (keys, _) = outbox.read("a").unwrap();
        let mut batch = db.batch();
        for key in &keys {
            outbox.table.delete_raw(&mut batch, key);
        }
        db.write(batch).unwrap();
        assert_eq!(values(&outbox), [5, 6, 8, 10, 12], "then the next five");
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let default = (FIRST_BACKOFF, MAX_BACKOFF);
        assert_eq!(backoff(1, default), Duration::from_millis(500));
        assert_eq!(backoff(2, default), Duration::from_secs(1));
        assert_eq!(backoff(4, default), Duration::from_secs(4));
        assert_eq!(backoff(40, default), MAX_BACKOFF);
        let slow = (Duration::from_secs(60), Duration::from_secs(100));
        assert_eq!((backoff(1, slow), backoff(2, slow)), (slow.0, slow.1));
        assert_eq!(target_of(b"\x01abc\xff12345678"), Some("abc"));
        assert_eq!(target_of(b"\x01abc"), None);
    }
}
