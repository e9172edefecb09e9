//! The global stream: positions for every change a user must see, the watermark below which
//! every change is durable (so a sync token never skips a slower concurrent write), and
//! per-user wake-ups for long-polling syncs; and where each room and user last changed, so
//! an incremental sync passes over what is quiet without reading it.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    hash::Hash,
    sync::{Arc, Mutex},
};

use ruma::{OwnedRoomId, OwnedUserId, UserId};
use tokio::sync::Notify;

use super::{Counter, rooms::Members};
use crate::storage::{Batch, Db, StorageError};

/// The stream of user-visible changes.
pub struct Stream {
    counter: Counter,
    /// Positions handed out whose batch is not written (or abandoned) yet.
    in_flight: Mutex<BTreeSet<u64>>,
    /// Wake-ups for changes above the watermark, sent once it passes them.
    deferred: Mutex<BTreeMap<u64, Vec<Woken>>>,
    waiters: Mutex<HashMap<OwnedUserId, Arc<Notify>>>,
    /// Where each room's timeline or receipts last changed.
    pub rooms: Marks<OwnedRoomId>,
    /// Where each user's account data last changed.
    pub account_data: Marks<OwnedUserId>,
    /// Where anyone's device keys last changed.
    pub key_changes: Marks<()>,
    /// Where anyone last joined or left a room.
    pub joins_and_leaves: Marks<()>,
}

/// Most rooms or users whose last change is remembered one by one; past it, all are forgotten
/// and taken to have changed at the highest position forgotten.
const MARKS: usize = 100_000;

/// The last position at which each of a kind of thing changed. A mark is set when the position
/// is handed out, before its batch is written, so a sync that can read the change also sees
/// the mark; things not marked since the start count as changed at the start.
pub struct Marks<K> {
    marks: Mutex<(HashMap<K, u64>, u64)>,
}

impl<K: Eq + Hash> Marks<K> {
    fn new(floor: u64) -> Self {
        Self { marks: Mutex::new((HashMap::new(), floor)) }
    }

    /// Records a change of `key` at `position` (the key is copied only when first marked).
    pub fn mark<Q>(&self, key: &Q, position: u64)
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + Hash + ToOwned<Owned = K> + ?Sized,
    {
        let mut guard = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        let (marks, floor) = &mut *guard;
        if let Some(mark) = marks.get_mut(key) {
            *mark = (*mark).max(position);
            return;
        }
        if marks.len() >= MARKS {
            *floor = marks.values().copied().fold(*floor, u64::max);
            marks.clear();
        }
        marks.insert(key.to_owned(), position);
    }

    /// Whether `key` is unchanged after `position`.
    pub fn quiet_since<Q>(&self, key: &Q, position: u64) -> bool
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        let guard = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        guard.0.get(key).copied().unwrap_or(guard.1) <= position
    }
}

/// Whom a deferred wake-up is for.
enum Woken {
    /// These users.
    Users(Vec<OwnedUserId>),
    /// A room's members (the shared list), those in `memberships` only.
    Members(Members, &'static [&'static str]),
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
        self.stream.flush_deferred();
    }
}

impl Stream {
    pub(super) fn new(db: &Db) -> Result<Self, StorageError> {
        let counter = Counter::new(db, "stream")?;
        let start = counter.current();
        Ok(Self {
            counter,
            in_flight: Mutex::default(),
            deferred: Mutex::default(),
            waiters: Mutex::default(),
            rooms: Marks::new(start),
            account_data: Marks::new(start),
            key_changes: Marks::new(start),
            joins_and_leaves: Marks::new(start),
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

    /// Wakes the syncs of `users` for a change written at `position`: now if the watermark has
    /// reached it, otherwise as soon as it does (a sync woken earlier would not see it yet).
    pub fn wake_at<'a>(&self, position: u64, users: impl IntoIterator<Item = &'a UserId>) {
        let mut deferred = self.deferred.lock().unwrap_or_else(|e| e.into_inner());
        if position <= self.current() {
            drop(deferred);
            self.wake(users);
        } else {
            let users = users.into_iter().map(ToOwned::to_owned).collect();
            deferred.entry(position).or_default().push(Woken::Users(users));
        }
    }

    /// Like [`Stream::wake_at`] for the `members` of a room whose membership is one of
    /// `memberships`; the shared member list is kept, not copied, until the wake-up is sent.
    pub fn wake_members_at(
        &self,
        position: u64,
        members: &Members,
        memberships: &'static [&'static str],
    ) {
        let mut deferred = self.deferred.lock().unwrap_or_else(|e| e.into_inner());
        if position <= self.current() {
            drop(deferred);
            self.wake(members_in(members, memberships));
        } else {
            let woken = Woken::Members(members.clone(), memberships);
            deferred.entry(position).or_default().push(woken);
        }
    }

    fn flush_deferred(&self) {
        let ready = {
            let mut deferred = self.deferred.lock().unwrap_or_else(|e| e.into_inner());
            if deferred.is_empty() {
                return;
            }
            let current = self.current();
            let later = deferred.split_off(&current.saturating_add(1));
            std::mem::replace(&mut *deferred, later)
        };
        for woken in ready.values().flatten() {
            match woken {
                Woken::Users(users) => self.wake(users.iter().map(|u| &**u)),
                Woken::Members(members, memberships) => self.wake(members_in(members, memberships)),
            }
        }
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

/// The users among `members` whose membership is one of `memberships`.
fn members_in<'a>(
    members: &'a Members,
    memberships: &'static [&'static str],
) -> impl Iterator<Item = &'a UserId> {
    members.iter().filter(|(_, m)| memberships.contains(&m.as_str())).map(|(u, _)| &**u)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_tell_what_changed_and_stay_conservative_past_their_cap() {
        let marks: Marks<u64> = Marks::new(10);
        assert!(marks.quiet_since(&1, 10), "nothing marked since the start at 10");
        assert!(!marks.quiet_since(&1, 9), "before the start, anything may have changed");
        marks.mark(&1, 20);
        marks.mark(&1, 15);
        assert!(!marks.quiet_since(&1, 19) && marks.quiet_since(&1, 20), "the highest mark holds");
        assert!(marks.quiet_since(&2, 10));
        // Past the cap every mark is forgotten, and the highest becomes everyone's start.
        for key in 100..100 + MARKS as u64 {
            marks.mark(&key, 30);
        }
        marks.mark(&7, 40);
        assert!(!marks.quiet_since(&1, 29), "forgotten marks count as changed at 30");
        assert!(!marks.quiet_since(&2, 29) && marks.quiet_since(&2, 30));
        assert!(!marks.quiet_since(&7, 39) && marks.quiet_since(&7, 40));
    }
}
