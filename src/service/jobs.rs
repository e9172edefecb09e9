//! Persisted per-user jobs: off-boarding a deactivated account and onboarding a new one. Work
//! that touches many rooms runs here, out of the request that asked for it, one step (one room)
//! at a time. The job is written in the same batch as the change that calls for it (the
//! deactivation, the account creation) and removed in the batch of its last step, so a crash
//! never leaves one half done: at start every stored job resumes where the rooms say it stands.
//!
//! One runner per user runs that user's jobs one after the other (off-boarding first; it
//! cancels a pending onboarding), so the two never race on the same account.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use ruma::{OwnedUserId, UserId};
use serde::{Deserialize, Serialize};
use tokio::{
    sync::{Notify, watch},
    task::JoinSet,
};

use super::{Services, now_ms};
use crate::{
    error::Result,
    storage::{Batch, Db, Table, prefix, split_key, tables},
};

/// Users whose jobs run at the same time; more wait for a free runner.
const MAX_RUNNERS: usize = 4;
/// How long a failed job waits before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(30);
/// Most stored jobs looked at when picking users to run.
const MAX_SCANNED: usize = 10_000;

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// Off-boarding a deactivated account.
    Offboard,
    /// Onboarding a new account.
    Onboard,
}

impl JobKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Offboard => "offboard",
            Self::Onboard => "onboard",
        }
    }
}

/// An off-boarding still to finish.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Offboarding {
    /// Tells this off-boarding from a later one of the same account (after a reactivation),
    /// so a runner removes only its own record.
    #[serde(default)]
    pub id: u64,
    /// Who deactivated the account (the user, or an admin).
    pub actor: OwnedUserId,
    /// Whether the account is erased.
    #[serde(default)]
    pub erase: bool,
    /// Who inherits power in rooms the account would orphan.
    #[serde(default)]
    pub successor: Option<OwnedUserId>,
    /// When it was asked for (ms since the epoch).
    pub started_ms: u64,
}

/// An onboarding still to finish.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Onboarding {
    /// When the account was created (ms since the epoch).
    #[serde(default)]
    pub started_ms: u64,
}

/// A stored job.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Job {
    /// See [`Offboarding`].
    Offboard(Offboarding),
    /// See [`Onboarding`].
    Onboard(Onboarding),
}

impl Job {
    /// A new onboarding of an account created now.
    pub fn onboard() -> Self {
        Self::Onboard(Onboarding { started_ms: now_ms() })
    }

    fn kind(&self) -> JobKind {
        match self {
            Self::Offboard(_) => JobKind::Offboard,
            Self::Onboard(_) => JobKind::Onboard,
        }
    }
}

/// The stored jobs and the runner's wake-ups.
pub struct Jobs {
    table: Table<Job>,
    /// Rung when a job is stored, so the runner picks it up.
    wake: Notify,
    /// Counts finished jobs, so a request can wait for the job it started.
    finished: watch::Sender<u64>,
    /// Users whose jobs run now.
    running: Mutex<std::collections::HashSet<OwnedUserId>>,
}

impl Jobs {
    pub(super) fn new(db: &Db) -> Self {
        Self {
            table: db.table(tables::JOBS),
            wake: Notify::new(),
            finished: watch::Sender::new(0),
            running: Mutex::default(),
        }
    }

    /// Queues storing `job` for `user_id` in `batch`; call [`Jobs::wake`] once it is written.
    pub fn put(&self, batch: &mut Batch, user_id: &UserId, job: &Job) {
        self.table.put(batch, &(user_id.as_str(), job.kind().as_str()), job);
    }

    /// Queues removing `user_id`'s job of `kind` in `batch`.
    pub fn delete(&self, batch: &mut Batch, user_id: &UserId, kind: JobKind) {
        self.table.delete(batch, &(user_id.as_str(), kind.as_str()));
    }

    /// `user_id`'s stored job of `kind`, if any.
    pub fn get(&self, user_id: &UserId, kind: JobKind) -> Result<Option<Job>> {
        Ok(self.table.get(&(user_id.as_str(), kind.as_str()))?)
    }

    /// Tells the runner a job was stored.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Marks a job finished for whoever waits on one.
    fn finished(&self) {
        self.finished.send_modify(|count| *count = count.wrapping_add(1));
    }

    /// Waits until `user_id` has no job of `kind` left, at most `timeout`; returns whether it
    /// finished.
    pub async fn wait(&self, user_id: &UserId, kind: JobKind, timeout: Duration) -> Result<bool> {
        let mut finished = self.finished.subscribe();
        let done = async {
            loop {
                if self.get(user_id, kind)?.is_none() {
                    return Result::<bool>::Ok(true);
                }
                if finished.changed().await.is_err() {
                    return Ok(false);
                }
            }
        };
        tokio::time::timeout(timeout, done).await.unwrap_or(Ok(false))
    }

    /// Users with stored jobs that are not running, at most `limit`.
    fn waiting_users(&self, limit: usize) -> Result<Vec<OwnedUserId>> {
        let mut users: Vec<OwnedUserId> = Vec::new();
        if limit == 0 {
            return Ok(users);
        }
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for item in self.table.scan_prefix(Vec::new()).take(MAX_SCANNED) {
            let (key, _) = item?;
            let Some(user) = split_key(&key)
                .next()
                .and_then(|u| std::str::from_utf8(u).ok())
                .and_then(|u| UserId::parse(u).ok())
            else {
                continue;
            };
            if running.contains(&user) || users.last() == Some(&user) {
                continue;
            }
            if users.len() >= limit {
                break;
            }
            users.push(user);
        }
        Ok(users)
    }

    /// `user_id`'s stored jobs, off-boarding first.
    fn of(&self, user_id: &UserId) -> Result<Vec<Job>> {
        let mut jobs = Vec::new();
        for item in self.table.scan_prefix(prefix(user_id.as_str())) {
            jobs.push(item?.1);
        }
        jobs.sort_by_key(|job| job.kind() != JobKind::Offboard);
        Ok(jobs)
    }

    /// Claims the runner of `user_id`; false when one already runs.
    fn claim(&self, user_id: &UserId) -> bool {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).insert(user_id.to_owned())
    }

    fn release(&self, user_id: &UserId) {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).remove(user_id);
    }
}

/// Whether a job step ran to its end or stopped because the server is stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The job is done and removed.
    Done,
    /// The server is stopping; the job stays stored and resumes at the next start.
    Stopped,
}

/// Waits the configured pause between two steps; returns false when the server is stopping.
pub(super) async fn pause(services: &Services, stopped: &mut watch::Receiver<bool>) -> bool {
    if *stopped.borrow() {
        return false;
    }
    let pause = services.config.jobs.pause_between_steps_ms;
    if pause == 0 {
        tokio::task::yield_now().await;
        return true;
    }
    tokio::select! {
        _ = stopped.wait_for(|stop| *stop) => false,
        () = tokio::time::sleep(Duration::from_millis(pause)) => true,
    }
}

/// Runs every stored job of `user_id` to its end (or until the server stops), unless a runner
/// for the user already runs. For where no server runs (the command line).
pub async fn run_user(
    services: Arc<Services>,
    user_id: OwnedUserId,
    stopped: watch::Receiver<bool>,
) {
    if services.jobs.claim(&user_id) {
        run_claimed_user(services, user_id, stopped).await;
    }
}

/// Runs the jobs of `user_id`, whose runner was claimed, and releases it.
async fn run_claimed_user(
    services: Arc<Services>,
    user_id: OwnedUserId,
    stopped: watch::Receiver<bool>,
) {
    let mut watching = stopped.clone();
    let outcome = run_claimed(&services, &user_id, stopped).await;
    if let Err(err) = outcome {
        tracing::warn!(%user_id, %err, "a job failed; it is tried again later");
        // Not at once: a failure that lasts must not spin.
        tokio::select! {
            _ = watching.wait_for(|stop| *stop) => {}
            () = tokio::time::sleep(RETRY_AFTER) => {}
        }
    }
    services.jobs.release(&user_id);
}

async fn run_claimed(
    services: &Services,
    user_id: &UserId,
    mut stopped: watch::Receiver<bool>,
) -> Result<()> {
    loop {
        let Some(job) = services.jobs.of(user_id)?.into_iter().next() else { return Ok(()) };
        let outcome = match job {
            Job::Offboard(job) => services.offboard(user_id, &job, &mut stopped).await?,
            Job::Onboard(job) => services.onboard_job(user_id, job, &mut stopped).await?,
        };
        services.jobs.finished();
        if outcome == Outcome::Stopped {
            return Ok(());
        }
    }
}

/// Runs stored jobs until the server stops: those left from before the start at once, new ones
/// as they are stored, at most [`MAX_RUNNERS`] users at a time.
pub async fn run(services: Arc<Services>, mut stopped: watch::Receiver<bool>) {
    let mut runners = JoinSet::new();
    let mut users: HashMap<tokio::task::Id, OwnedUserId> = HashMap::new();
    loop {
        let free = MAX_RUNNERS.saturating_sub(runners.len());
        // With every runner busy there is nothing to start: the store is not even read.
        let waiting = if free == 0 { Ok(Vec::new()) } else { services.jobs.waiting_users(free) };
        match waiting {
            Ok(waiting) => {
                for user in waiting {
                    if !services.jobs.claim(&user) {
                        continue;
                    }
                    let runner = run_claimed_user(services.clone(), user.clone(), stopped.clone());
                    users.insert(runners.spawn(runner).id(), user);
                }
            }
            Err(err) => tracing::warn!(%err, "cannot read the stored jobs"),
        }
        tokio::select! {
            _ = stopped.wait_for(|stop| *stop) => break,
            () = services.jobs.wake.notified() => {}
            Some(ended) = runners.join_next_with_id(), if !runners.is_empty() => {
                match ended {
                    Ok((id, ())) => {
                        users.remove(&id);
                    }
                    Err(err) => {
                        // A runner that panicked did not free its user.
                        if let Some(user) = users.remove(&err.id()) {
                            services.jobs.release(&user);
                        }
                    }
                }
            }
        }
    }
    // Each runner stops after its current step.
    while runners.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_users_never_exceed_the_free_runners() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), 8).unwrap();
        let jobs = Jobs::new(&db);
        let mut batch = db.batch();
        for name in ["@a:plaza.test", "@b:plaza.test", "@c:plaza.test"] {
            let user = UserId::parse(name).unwrap();
            jobs.put(&mut batch, &user, &Job::onboard());
            jobs.put(
                &mut batch,
                &user,
                &Job::Offboard(Offboarding {
                    id: 1,
                    actor: user.clone(),
                    erase: false,
                    successor: None,
                    started_ms: 0,
                }),
            );
        }
        db.write(batch).unwrap();
        assert!(jobs.waiting_users(0).unwrap().is_empty());
        assert_eq!(jobs.waiting_users(1).unwrap().len(), 1);
        assert_eq!(jobs.waiting_users(2).unwrap().len(), 2);
        assert_eq!(jobs.waiting_users(5).unwrap().len(), 3);
        assert!(jobs.claim(ruma::user_id!("@a:plaza.test")));
        let waiting = jobs.waiting_users(5).unwrap();
        assert_eq!(waiting.len(), 2);
        assert!(!waiting.iter().any(|u| u == "@a:plaza.test"));
    }
}
