//! Abuse limits: failed passwords per account, registrations per address and events sent per
//! user, each a token bucket from `[limits]`. Failed logins are also written to the audit log
//! at most once per account and window, with a count of the repeats, so a password-guessing
//! flood cannot turn into a flood of audit writes.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use ruma::OwnedUserId;
use serde_json::json;

use crate::{
    config::{LimitsConfig, RateConfig},
    error::Result,
    service::{
        audit::{Audit, Entry},
        ratelimit::{Bucket, UserLimiter, address_key},
    },
};

/// Accounts whose failure window is remembered at most; past it, failures for new accounts
/// are counted together under one summary record.
const MAX_TRACKED_ACCOUNTS: usize = 100_000;

/// The longest account name kept (names come from the client).
const MAX_ACCOUNT_CHARS: usize = 255;

/// One account's failed logins in the current audit window.
struct FailureWindow {
    /// When the window's first (recorded) failure happened.
    started: Instant,
    /// Failures since then that were not recorded on their own.
    repeated: u64,
    /// The latest of their reasons.
    reason: &'static str,
    /// The name the window's first failure gave (the audit record's target).
    target: String,
}

/// Failed logins waiting to be summarised in the audit log.
#[derive(Default)]
struct FailureLog {
    accounts: HashMap<String, FailureWindow>,
    /// Failures for accounts beyond [`MAX_TRACKED_ACCOUNTS`].
    untracked: u64,
}

/// A client-given name cut to a bounded length.
fn bounded(name: &str) -> String {
    name.chars().take(MAX_ACCOUNT_CHARS).collect()
}

/// The abuse limits of `[limits]`.
pub struct Abuse {
    login_failures: Bucket<String>,
    registration: Bucket<IpAddr>,
    messages: UserLimiter,
    audit_window: Duration,
    failures: Mutex<FailureLog>,
}

impl Abuse {
    /// The limits `config` describes.
    pub fn new(config: &LimitsConfig) -> Self {
        let failures = &config.login_failures;
        Self {
            login_failures: Bucket::new(RateConfig {
                per_second: failures.per_second,
                burst: failures.burst,
            }),
            registration: Bucket::new(config.registration),
            messages: UserLimiter::new(config.messages),
            audit_window: Duration::from_secs(failures.audit_window_secs),
            failures: Mutex::new(FailureLog::default()),
        }
    }

    /// `M_LIMIT_EXCEEDED` when `account` (the user id, or the name given when it is not
    /// one) has used up its failed attempts; checked before the password, so a throttled
    /// guess costs no hashing. A throttled attempt counts in the audit summary under `name`.
    pub fn check_login(&self, audit: &Audit, account: &str, name: &str) -> Result<()> {
        let key = bounded(account);
        let checked = self.login_failures.check(&key);
        if checked.is_err() {
            // Folded into the window's summary: its write cannot fail here.
            let _ = self.record_failure(audit, key, name, "throttled");
        }
        checked
    }

    /// Counts a failed password for `account` and writes the audit record (target `name`),
    /// at most one per account and window.
    pub fn login_failed(
        &self,
        audit: &Audit,
        account: &str,
        name: &str,
        reason: &'static str,
    ) -> Result<()> {
        let key = bounded(account);
        let _ = self.login_failures.spend(&key);
        self.record_failure(audit, key, name, reason)
    }

    /// Writes `user.login_failed` for `account` unless one was written in this window, in
    /// which case the failure is counted for the window's summary.
    fn record_failure(
        &self,
        audit: &Audit,
        account: String,
        name: &str,
        reason: &'static str,
    ) -> Result<()> {
        let now = Instant::now();
        let target = bounded(name);
        let repeated_before = {
            let mut log = self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let tracked = log.accounts.len();
            match log.accounts.get_mut(&account) {
                Some(window) if now.duration_since(window.started) < self.audit_window => {
                    window.repeated += 1;
                    window.reason = reason;
                    return Ok(());
                }
                Some(window) => {
                    let repeated = std::mem::take(&mut window.repeated);
                    window.started = now;
                    window.target.clone_from(&target);
                    repeated
                }
                None if tracked >= MAX_TRACKED_ACCOUNTS => {
                    log.untracked += 1;
                    return Ok(());
                }
                None => {
                    let window =
                        FailureWindow { started: now, repeated: 0, reason, target: target.clone() };
                    log.accounts.insert(account, window);
                    0
                }
            }
        };
        let mut details = json!({ "reason": reason });
        if repeated_before > 0 {
            details["repeated_before"] = json!(repeated_before);
        }
        audit.record([Entry::new("user.login_failed", None).target(target).details(details)])
    }

    /// Writes one summary record per account whose window has closed (every window when
    /// `all`, at shutdown) with unrecorded failures, and forgets closed windows. Run
    /// periodically.
    pub fn flush_login_failures(&self, audit: &Audit, all: bool) -> Result<()> {
        let now = Instant::now();
        let window_secs = self.audit_window.as_secs();
        let mut entries = Vec::new();
        {
            let mut log = self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            log.accounts.retain(|_, window| {
                if !all && now.duration_since(window.started) < self.audit_window {
                    return true;
                }
                if window.repeated > 0 {
                    entries.push(
                        Entry::new("user.login_failed", None).target(&window.target).details(
                            json!({
                                "reason": window.reason,
                                "repeated": window.repeated,
                                "window_secs": window_secs,
                            }),
                        ),
                    );
                }
                false
            });
            if log.untracked > 0 {
                entries.push(Entry::new("user.login_failed", None).target("*").details(json!({
                    "reason": "many_accounts",
                    "repeated": std::mem::take(&mut log.untracked),
                    "window_secs": window_secs,
                })));
            }
        }
        if entries.is_empty() { Ok(()) } else { audit.record(entries) }
    }

    /// How often [`Self::flush_login_failures`] should run.
    pub fn audit_window(&self) -> Duration {
        self.audit_window
    }

    /// `M_LIMIT_EXCEEDED` when `ip` may not create another account now; spends nothing.
    pub fn check_registration(&self, ip: Option<IpAddr>) -> Result<()> {
        ip.map_or(Ok(()), |ip| self.registration.check(&address_key(ip)))
    }

    /// Spends one registration of `ip`; called under the registration lock once the account
    /// is written (after [`Self::check_registration`] under the same lock), so concurrent
    /// registrations cannot overshoot and a failed one costs nothing.
    pub fn spend_registration(&self, ip: Option<IpAddr>) -> Result<()> {
        ip.map_or(Ok(()), |ip| self.registration.spend(&address_key(ip)))
    }

    /// Counts one event sent by `user_id`, unless `rate_limited` is false (admins, and
    /// application service users whose registration says `rate_limited: false`).
    pub fn message(&self, user_id: &OwnedUserId, rate_limited: bool) -> Result<()> {
        if rate_limited { self.messages.check(user_id) } else { Ok(()) }
    }
}
