//! Off-boarding: deactivating an account, by its user or an admin. What must stop at once
//! stops in the deactivation's own batch (logins, devices, access and refresh tokens, pushers,
//! device, one-time, fallback and cross-signing keys, key backups, queued to-device messages
//! and to-device transaction ids, account data, the profile, the user directory);
//! the rooms follow in a persisted job (see [`super::jobs`]): every room is left, every invite
//! rejected and every knock withdrawn, each in its own event's batch with its audit record.
//! Where the account was the only member able to change power levels, a successor is given
//! that power first, so no room is orphaned.
//!
//! Erasure: an erased account's events are served redacted to anyone who was not joined to the
//! room when they were sent. Erased accounts are few and kept in memory, so serving others'
//! events costs one atomic load.

use std::{
    collections::HashSet,
    future::Future,
    sync::{
        RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use ruma::{
    OwnedUserId, RoomId, UserId,
    events::{StateEventType, room::power_levels::UserPowerLevel},
    int,
};
use serde_json::{Value as JsonValue, json};
use tokio::sync::watch;

use super::{
    Services,
    audit::Entry,
    jobs::{Job, JobKind, Offboarding, Outcome, pause},
    now_ms,
    rooms::{NewEvent, RoomRecord, membership, pdu::StoredPdu, state::StateMap},
    users::{Role, UserRecord},
};
use crate::{
    error::{Error, ErrorKind, Result},
    storage::{Db, StorageError, Table, tables},
};

/// Most room ids named in the audit record of rooms an off-boarding could not leave.
const MAX_FAILED_LISTED: usize = 100;
/// Most attempts at leaving one room while its failures are transient.
const LEAVE_ATTEMPTS: u32 = 5;
/// The wait after a room's first transient failure; it doubles after each next one.
const LEAVE_RETRY_AFTER: Duration = Duration::from_secs(1);
/// The longest wait between two attempts at one room.
const MAX_LEAVE_RETRY_AFTER: Duration = Duration::from_secs(30);

/// Erased accounts, durably and in memory.
pub struct Erased {
    table: Table<()>,
    users: RwLock<HashSet<String>>,
    any: AtomicBool,
}

impl Erased {
    /// Loads the erased accounts.
    pub(super) fn load(db: &Db) -> Result<Self, StorageError> {
        let table: Table<()> = db.table(tables::ERASED_USERS);
        let mut users = HashSet::new();
        for item in table.scan_prefix(Vec::new()) {
            let (key, ()) = item?;
            if let Ok(user) = std::str::from_utf8(&key) {
                users.insert(user.to_owned());
            }
        }
        let any = AtomicBool::new(!users.is_empty());
        Ok(Self { table, users: RwLock::new(users), any })
    }

    /// Whether the account `user_id` is erased.
    pub fn contains(&self, user_id: &str) -> bool {
        self.any.load(Ordering::Acquire)
            && self.users.read().unwrap_or_else(|e| e.into_inner()).contains(user_id)
    }

    fn queue(&self, batch: &mut crate::storage::Batch, user_id: &UserId, erased: bool) {
        if erased {
            self.table.put(batch, user_id.as_str(), &());
        } else {
            self.table.delete(batch, user_id.as_str());
        }
    }

    fn remember(&self, user_id: &UserId, erased: bool) {
        let mut users = self.users.write().unwrap_or_else(|e| e.into_inner());
        if erased {
            users.insert(user_id.as_str().to_owned());
        } else {
            users.remove(user_id.as_str());
        }
        self.any.store(!users.is_empty(), Ordering::Release);
    }
}

/// A deactivation as asked for.
#[derive(Debug, Clone)]
pub struct Deactivation {
    /// Who asks: the user, or an admin.
    pub actor: OwnedUserId,
    /// Erase the account too.
    pub erase: bool,
    /// Who inherits power in rooms the account would orphan (else the configured default).
    pub successor: Option<OwnedUserId>,
    /// The audit action (`user.deactivate`, `admin.user.deactivate`).
    pub action: &'static str,
}

impl Services {
    /// Deactivates `user_id` as `request` says and queues its off-boarding job, all in one
    /// batch with the audit record. A second deactivation changes nothing (but may erase).
    /// Returns whether the account changed.
    pub fn deactivate_account(&self, user_id: &UserId, request: Deactivation) -> Result<bool> {
        let successor = self.successor_for(user_id, request.successor.as_deref())?;
        let guard = self.sessions.lock_user(user_id);
        let mut record =
            self.users.get(user_id)?.ok_or_else(|| Error::not_found("No such user"))?;
        let mut batch = self.db.batch();
        if record.deactivated {
            if !request.erase || record.erased {
                return Ok(false);
            }
            record.erased = true;
            self.users.put(&mut batch, user_id, &record);
            self.erased.queue(&mut batch, user_id, true);
            let entry = Entry::new(request.action, Some(&request.actor))
                .target(user_id)
                .details(json!({ "erase": true, "already_deactivated": true }));
            self.audit.commit(batch, [entry])?;
            self.erased.remember(user_id, true);
            return Ok(true);
        }
        let entry =
            self.queue_deactivation(&mut batch, user_id, &mut record, &request, successor)?;
        self.audit.commit(batch, [entry])?;
        drop(guard);
        self.deactivated(user_id, &request.actor, record.erased);
        Ok(true)
    }

    /// Queues the deactivation of `user_id`, whose `record` is read under the account's lock
    /// and is not deactivated yet, in `batch`: everything that stops at once, and the
    /// off-boarding job. Returns the audit record to write with it; call
    /// [`Services::deactivated`] once the batch is written.
    pub(super) fn queue_deactivation(
        &self,
        batch: &mut crate::storage::Batch,
        user_id: &UserId,
        record: &mut UserRecord,
        request: &Deactivation,
        successor: Option<OwnedUserId>,
    ) -> Result<Entry> {
        record.deactivated = true;
        record.password_hash = None;
        record.set_role(Role::User);
        record.erased |= request.erase;
        self.users.put(batch, user_id, record);
        self.users.clear_profile(batch, user_id);
        let devices = self.sessions.devices(user_id)?.len();
        self.sessions.delete_all_devices(self, batch, user_id, None)?;
        let dehydrated: Table<JsonValue> = self.db.table(tables::DEHYDRATED_DEVICES);
        dehydrated.delete(batch, user_id.as_str());
        let (one_time_keys, to_device) = self.e2ee.queue_forget_user(batch, user_id)?;
        let (backup_versions, backup_keys) = self.backups.queue_forget_user(batch, user_id)?;
        let account_data = self.account_data.queue_forget_user(batch, user_id)?;
        let pushers = self.pushers.queue_remove_all(batch, user_id);
        if record.erased {
            self.erased.queue(batch, user_id, true);
        }
        let memberships = self.rooms.memberships_of(user_id)?;
        let count = |kind: &str| memberships.iter().filter(|(_, m)| m == kind).count();
        self.jobs.delete(batch, user_id, JobKind::Onboard);
        let job = Offboarding {
            id: rand::random(),
            actor: request.actor.clone(),
            erase: record.erased,
            successor: successor.clone(),
            started_ms: now_ms(),
        };
        self.jobs.put(batch, user_id, &Job::Offboard(job));
        let entry =
            Entry::new(request.action, Some(&request.actor)).target(user_id).details(json!({
                "erase": request.erase,
                "successor": successor,
                "devices": devices,
                "pushers": pushers,
                "one_time_keys": one_time_keys,
                "to_device_messages": to_device,
                "backup_versions": backup_versions,
                "backup_keys": backup_keys,
                "account_data": account_data,
                "rooms": count("join"),
                "invites": count("invite"),
                "knocks": count("knock"),
            }));
        Ok(entry)
    }

    /// Once a deactivation's batch is written: forgets what memory holds of the account and
    /// starts its off-boarding.
    pub(super) fn deactivated(&self, user_id: &UserId, actor: &UserId, erased: bool) {
        self.pushers.forget_user(user_id);
        if erased {
            self.erased.remember(user_id, true);
        }
        self.jobs.wake();
        if let Err(err) = self.e2ee.forget_deleted_devices(self, user_id) {
            tracing::warn!(%user_id, %err, "could not announce the device list change");
        }
        tracing::info!(%user_id, %actor, erase = erased, "account deactivated");
    }

    /// Lifts the erasure of a reactivated account, in `batch`; call [`Services::forget_erased`]
    /// once it is written.
    pub fn queue_unerase(&self, batch: &mut crate::storage::Batch, user_id: &UserId) {
        self.erased.queue(batch, user_id, false);
    }

    /// Drops `user_id` from the erased accounts in memory.
    pub fn forget_erased(&self, user_id: &UserId) {
        self.erased.remember(user_id, false);
    }

    /// The successor of `user_id`: the one asked for (which must be an active local account
    /// other than `user_id`), else the configured default when that is usable.
    pub(super) fn successor_for(
        &self,
        user_id: &UserId,
        asked: Option<&UserId>,
    ) -> Result<Option<OwnedUserId>> {
        let usable = |candidate: &UserId| -> Result<bool> {
            Ok(candidate != user_id
                && candidate.server_name() == self.server_name()
                && self.users.get(candidate)?.is_some_and(|u| !u.deactivated && !u.guest))
        };
        if let Some(asked) = asked {
            if !usable(asked)? {
                return Err(Error::invalid_param(
                    "The successor must be another active account of this server",
                ));
            }
            return Ok(Some(asked.to_owned()));
        }
        match &self.config.offboarding.default_successor {
            Some(default) if usable(default)? => Ok(Some(default.clone())),
            Some(default) => {
                tracing::warn!(%default, "the default successor is not an active account here");
                Ok(None)
            }
            None => Ok(None),
        }
    }

    /// Runs (or resumes) the off-boarding of `user_id`: every room it is in, invited to or
    /// knocking on is left, one room per step; then the job is removed with its audit record.
    pub(super) async fn offboard(
        &self,
        user_id: &UserId,
        job: &Offboarding,
        stopped: &mut watch::Receiver<bool>,
    ) -> Result<Outcome> {
        let pending: Vec<_> = self
            .rooms
            .memberships_of(user_id)?
            .iter()
            .filter(|(_, m)| matches!(m.as_str(), "join" | "invite" | "knock"))
            .cloned()
            .collect();
        let (mut left, mut rejected, mut withdrawn, mut handed_over) = (0u64, 0u64, 0u64, 0u64);
        let mut failed = Vec::new();
        let mut reactivated = false;
        for (room_id, _) in pending {
            if !pause(self, stopped).await {
                return Ok(Outcome::Stopped);
            }
            // An admin may reactivate the account meanwhile: its rooms are then its own again.
            if !self.users.get(user_id)?.is_some_and(|u| u.deactivated) {
                reactivated = true;
                break;
            }
            let step = || self.offboard_room(user_id, job, &room_id);
            match retrying(LEAVE_ATTEMPTS, LEAVE_RETRY_AFTER, stopped, step).await {
                Ok(None) => return Ok(Outcome::Stopped),
                Ok(Some(Some((membership, granted)))) => {
                    match membership.as_str() {
                        "join" => left += 1,
                        "invite" => rejected += 1,
                        _ => withdrawn += 1,
                    }
                    handed_over += u64::from(granted);
                }
                Ok(Some(None)) => {}
                Err(err) => {
                    tracing::warn!(%user_id, %room_id, %err, "off-boarding could not leave a room");
                    failed.push(room_id);
                }
            }
        }
        // A deactivation after a reactivation meanwhile stored its own job: that one stays,
        // and runs next.
        let guard = self.sessions.lock_user(user_id);
        let stored = self.jobs.get(user_id, JobKind::Offboard)?;
        let superseded = !matches!(&stored, Some(Job::Offboard(stored)) if stored.id == job.id);
        let mut batch = self.db.batch();
        if !superseded {
            self.jobs.delete(&mut batch, user_id, JobKind::Offboard);
        }
        let failed_count = failed.len();
        failed.truncate(MAX_FAILED_LISTED);
        let entry =
            Entry::new("offboarding.complete", Some(&job.actor)).target(user_id).details(json!({
                "rooms_left": left,
                "invites_rejected": rejected,
                "knocks_withdrawn": withdrawn,
                "successor_grants": handed_over,
                "failed": failed_count,
                "failed_rooms": failed,
                "reactivated": reactivated,
                "superseded": superseded,
                "started_ms": job.started_ms,
            }));
        self.audit.commit(batch, [entry])?;
        drop(guard);
        tracing::info!(%user_id, left, rejected, withdrawn, "off-boarding complete");
        Ok(Outcome::Done)
    }

    /// Leaves one room (rejects the invite, withdraws the knock), handing power to the
    /// successor first where needed. Returns the membership left and whether power was
    /// handed over, or `None` when there was nothing left to do.
    async fn offboard_room(
        &self,
        user_id: &UserId,
        job: &Offboarding,
        room_id: &RoomId,
    ) -> Result<Option<(String, bool)>> {
        // An invite or knock of a room held elsewhere: rejected there (and here in any case).
        if let Some(outside) = self.rooms.outside(user_id, room_id)?
            && outside.membership != "leave"
        {
            let versions = [outside.version];
            super::federation::invite::leave_outside(self, user_id, room_id, None, &versions)
                .await?;
            return Ok(Some((outside.membership, false)));
        }
        let Some(membership) = self.rooms.membership(room_id, user_id)? else { return Ok(None) };
        if !matches!(membership.as_str(), "join" | "invite" | "knock") {
            return Ok(None);
        }
        let mut granted = false;
        if membership == "join"
            && let Some(successor) = &job.successor
        {
            // A failed hand-over does not keep the account in the room.
            match self.hand_over(user_id, successor, room_id, &job.actor).await {
                Ok(done) => granted = done,
                Err(err) => {
                    tracing::warn!(%user_id, %room_id, %successor, %err, "no hand-over");
                }
            }
        }
        let entry = Entry::new("offboarding.leave", Some(&job.actor))
            .target(user_id)
            .room(room_id)
            .details(json!({ "previous": membership }));
        membership::leave_audited(self, room_id, user_id, None, vec![entry]).await?;
        Ok(Some((membership, granted)))
    }

    /// When `user_id` is the only joined member of `room_id` able to change power levels and
    /// others remain, gives `successor` that power (and an invite when not in the room).
    /// Returns whether it did.
    async fn hand_over(
        &self,
        user_id: &UserId,
        successor: &UserId,
        room_id: &RoomId,
        actor: &UserId,
    ) -> Result<bool> {
        let rooms = &self.rooms;
        let mut handing_over = false;
        // Decided and built under the room lock, so no power-levels change made meanwhile is
        // overwritten.
        let decide = |record: &RoomRecord, state: &StateMap| -> Result<Option<NewEvent>> {
            let levels = rooms.power_levels(state, &record.version)?;
            let required = levels.for_state(StateEventType::RoomPowerLevels);
            let mine = levels.for_user(user_id);
            if mine < required {
                return Ok(None);
            }
            let mut others = false;
            for (member, membership) in rooms.members(room_id)?.iter() {
                if membership != "join" || member == user_id {
                    continue;
                }
                others = true;
                if levels.for_user(member) >= required {
                    return Ok(None);
                }
            }
            if !others || rooms.membership_in(state, successor)? == "ban" {
                return Ok(None);
            }
            handing_over = true;
            // Already able (a creator of room version 12, who ranks above every level and is
            // never listed, or granted by an earlier run that stopped before leaving).
            if levels.for_user(successor) >= required {
                return Ok(None);
            }
            let granted = match mine {
                UserPowerLevel::Int(mine) => mine,
                _ => required.max(int!(100)),
            };
            let mut content = rooms.power_levels_to_change(state, &record.version)?;
            if !content.get("users").is_some_and(JsonValue::is_object) {
                content["users"] = json!({});
            }
            content["users"][successor.as_str()] = json!(granted);
            let entry = Entry::new("offboarding.successor", Some(actor))
                .target(successor)
                .room(room_id)
                .details(json!({ "from": user_id, "level": granted }));
            Ok(Some(NewEvent::state("m.room.power_levels", "", content).audited(entry)))
        };
        rooms.append_from_state(self, room_id, user_id, decide).await?;
        if !handing_over {
            return Ok(false);
        }
        if !matches!(rooms.membership(room_id, successor)?.as_deref(), Some("join" | "invite")) {
            membership::invite(self, room_id, user_id, successor, None, false).await?;
        }
        Ok(true)
    }

    /// Whether `event` is served redacted to `viewer`: its sender is erased and `viewer` was
    /// not joined to the room when it was sent. Reads only `viewer`'s membership in the
    /// event's state-before.
    pub fn erased_hides(&self, viewer: &UserId, event: &StoredPdu) -> Result<bool> {
        if !self.erased.contains(event.sender()) || event.redacted_because.is_some() {
            return Ok(false);
        }
        let rooms = &self.rooms;
        let Some(short) = rooms.states.get(event.state_before, "m.room.member", viewer.as_str())?
        else {
            return Ok(true);
        };
        let member = rooms.state_pdu(short)?;
        Ok(member.membership() != Some("join"))
    }

    /// The copy of `event` that `viewer` is served when its sender is erased and `viewer` was
    /// not joined to the room when it was sent: redacted. `None` when `event` is served as is.
    pub fn erased_view(&self, viewer: &UserId, event: &StoredPdu) -> Result<Option<StoredPdu>> {
        if !self.erased_hides(viewer, event)? {
            return Ok(None);
        }
        let record =
            self.rooms.room(&event.room_id)?.ok_or_else(|| Error::not_found("Unknown room"))?;
        let rules = record
            .version
            .rules()
            .ok_or_else(|| Error::new(ErrorKind::Unknown, "Unsupported room version"))?;
        let mut copy = event.clone();
        ruma::canonical_json::redact_in_place(&mut copy.wire, &rules.redaction, None)
            .map_err(Error::internal)?;
        Ok(Some(copy))
    }
}

/// Whether `err` stays however often the step is tried again: the account may not act in the
/// room, or the room is unknown here.
fn permanent(err: &Error) -> bool {
    matches!(
        err.kind(),
        None | Some(ErrorKind::Forbidden | ErrorKind::NotFound | ErrorKind::UnsupportedRoomVersion)
    )
}

/// Runs `step` until it succeeds, fails for good or has failed `attempts` times, waiting
/// `first_wait` after the first transient failure and twice as long after each next one.
/// `Ok(None)` when the server stops meanwhile.
async fn retrying<T, F, Fut>(
    attempts: u32,
    first_wait: Duration,
    stopped: &mut watch::Receiver<bool>,
    mut step: F,
) -> Result<Option<T>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut wait = first_wait;
    let mut attempt = 1;
    loop {
        match step().await {
            Ok(done) => return Ok(Some(done)),
            Err(err) if attempt >= attempts || permanent(&err) => return Err(err),
            Err(err) => {
                tracing::info!(%err, attempt, "off-boarding step failed; trying again");
                tokio::select! {
                    biased;
                    _ = stopped.wait_for(|stop| *stop) => return Ok(None),
                    () = tokio::time::sleep(wait) => {}
                }
                wait = wait.saturating_mul(2).min(MAX_LEAVE_RETRY_AFTER);
                attempt += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A step that fails with `failures` (in order), then succeeds; counts its calls.
    fn step(
        failures: Vec<Error>,
        calls: &std::sync::atomic::AtomicU32,
    ) -> impl FnMut() -> std::future::Ready<Result<u32>> + '_ {
        let mut failures = failures.into_iter();
        move || {
            let call = calls.fetch_add(1, Ordering::Relaxed) + 1;
            std::future::ready(failures.next().map_or(Ok(call), Err))
        }
    }

    #[tokio::test]
    async fn transient_failures_are_retried_a_bounded_number_of_times() {
        let (stop, mut stopped) = watch::channel(false);
        let calls = std::sync::atomic::AtomicU32::new(0);
        let transient = || vec![Error::internal("busy"), Error::internal("busy")];
        let done = retrying(5, Duration::ZERO, &mut stopped, step(transient(), &calls)).await;
        assert_eq!(done.unwrap(), Some(3));

        let calls = std::sync::atomic::AtomicU32::new(0);
        let always = (0..10).map(|_| Error::internal("down")).collect();
        let done = retrying(4, Duration::ZERO, &mut stopped, step(always, &calls)).await;
        assert!(done.is_err());
        assert_eq!(calls.load(Ordering::Relaxed), 4);

        for permanent in [Error::forbidden("not in the room"), Error::not_found("Unknown room")] {
            let calls = std::sync::atomic::AtomicU32::new(0);
            let done =
                retrying(5, Duration::ZERO, &mut stopped, step(vec![permanent], &calls)).await;
            assert!(done.is_err());
            assert_eq!(calls.load(Ordering::Relaxed), 1);
        }

        stop.send(true).unwrap();
        let calls = std::sync::atomic::AtomicU32::new(0);
        let done = retrying(5, Duration::ZERO, &mut stopped, step(transient(), &calls)).await;
        assert!(done.unwrap().is_none());
    }
}
