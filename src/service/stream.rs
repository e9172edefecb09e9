//! The global stream: positions for every change a user must see, the watermark below which
//! every change is durable (so a sync token never skips a slower concurrent write), and
//! per-user wake-ups for long-polling syncs.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
};

use ruma::{OwnedUserId, UserId};
use tokio::sync::Notify;

use super::Counter;
use crate::storage::{Batch, Db, StorageError};

/// The stream of user-visible changes.
pub struct Stream {
    counter: Counter,
    /// Positions handed out whose batch is not written (or abandoned) yet.
    in_flight: Mutex<BTreeSet<u64>>,
    waiters: Mutex<HashMap<OwnedUserId, Arc<Notify>>>,
}

/// A position being written; dropping it (after the write, or on failure) releases it.
pub struct Pending<'a> {
    stream: &'a Stream,
    /// The position.
    pub position: u64,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.stream.in_flight.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.position);
    }
}

impl Stream {
    pub(super) fn new(db: &Db) -> Result<Self, StorageError> {
        Ok(Self {
            counter: Counter::new(db, "stream")?,
            in_flight: Mutex::default(),
            waiters: Mutex::default(),
        })
    }

    /// A new position recorded in `batch`; hold the guard until the batch is written.
    pub fn next(&self, batch: &mut Batch) -> Pending<'_> {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        let position = self.counter.next(batch);
        in_flight.insert(position);
        Pending { stream: self, position }
    }

    /// The highest position at or below which every change is written: what a sync may read.
    pub fn current(&self) -> u64 {
        let in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        match in_flight.first() {
            Some(first) => first - 1,
            None => self.counter.current(),
        }
    }

    /// The wake-up handle of `user_id`, for a sync about to wait.
    pub fn waiter(&self, user_id: &UserId) -> Arc<Notify> {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        if waiters.len() > 100_000 {
            waiters.retain(|_, notify| Arc::strong_count(notify) > 1);
        }
        waiters.entry(user_id.to_owned()).or_default().clone()
    }

    /// Wakes the syncs of `users` (after a change they should see is written).
    pub fn wake<'a>(&self, users: impl IntoIterator<Item = &'a UserId>) {
        let waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        for user in users {
            if let Some(notify) = waiters.get(user) {
                notify.notify_waiters();
            }
        }
    }
}
