//! Rate limits: the generic one for endpoints the spec marks as rate-limited (login, register,
//! ...), keyed by user id when authenticated and by address otherwise; a per-user one for the
//! send path; and a keyed bucket that can be looked at without spending, for limits that count
//! only some outcomes (failed passwords, accounts actually created).

use std::{
    collections::HashMap,
    hash::Hash,
    num::NonZeroU32,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use governor::{
    DefaultKeyedRateLimiter, Quota, RateLimiter as Governor,
    clock::{Clock, DefaultClock},
};

use ruma::OwnedUserId;

use crate::{
    config::{LimitsConfig, RateConfig},
    error::{Error, ErrorKind, Result},
};

/// A keyed token bucket.
pub struct RateLimiter {
    limiter: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
}

impl RateLimiter {
    /// A limiter allowing `rate_per_second` sustained with bursts of `rate_burst`.
    pub fn new(limits: &LimitsConfig) -> Self {
        let rate = NonZeroU32::new(limits.rate_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(limits.rate_burst).unwrap_or(NonZeroU32::MIN);
        Self {
            limiter: Governor::keyed(Quota::per_second(rate).allow_burst(burst)),
            clock: DefaultClock::default(),
        }
    }

    /// Counts one request for `key`; `M_LIMIT_EXCEEDED` with the wait when over the limit.
    pub fn check(&self, key: &str) -> Result<()> {
        // Bound memory: forget idle clients once the table grows.
        if self.limiter.len() > 100_000 {
            self.limiter.retain_recent();
        }
        self.limiter
            .check_key(&key.to_owned())
            .map_err(|not_until| limit_exceeded(not_until.wait_time_from(self.clock.now())))
    }
}

/// `429 M_LIMIT_EXCEEDED` telling the client how long to wait.
pub fn limit_exceeded(wait: Duration) -> Error {
    let retry_after_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
    Error::new(ErrorKind::LimitExceeded { retry_after_ms }, "Too many requests")
}

/// Keys a limiter remembers before it forgets those that are back to a full bucket.
const MAX_KEYS: usize = 100_000;

/// The interval between two actions at `per_second` (at least a nanosecond, at most a year).
fn emission_interval(rate: RateConfig) -> Duration {
    Duration::try_from_secs_f64(1.0 / rate.per_second)
        .unwrap_or(Duration::from_secs(365 * 86_400))
        .max(Duration::from_nanos(1))
}

/// A per-user token bucket for the send path: the check borrows the user id (no allocation for
/// users already known) and takes no lock shared with other users.
pub struct UserLimiter {
    limiter: DefaultKeyedRateLimiter<OwnedUserId>,
    clock: DefaultClock,
    /// Checks so far: the table's size (a walk over its shards) is looked at only now and
    /// then.
    checks: AtomicU64,
}

/// How many checks pass between two looks at a limiter's size.
const PRUNE_EVERY: u64 = 1024;

impl UserLimiter {
    /// A limiter allowing `rate`.
    pub fn new(rate: RateConfig) -> Self {
        let burst = NonZeroU32::new(rate.burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(emission_interval(rate))
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst);
        Self {
            limiter: Governor::keyed(quota),
            clock: DefaultClock::default(),
            checks: AtomicU64::new(0),
        }
    }

    /// Counts one action of `user_id`; `M_LIMIT_EXCEEDED` with the wait when over the limit.
    pub fn check(&self, user_id: &OwnedUserId) -> Result<()> {
        if self.checks.fetch_add(1, Ordering::Relaxed).is_multiple_of(PRUNE_EVERY)
            && self.limiter.len() > MAX_KEYS
        {
            self.limiter.retain_recent();
        }
        self.limiter
            .check_key(user_id)
            .map_err(|not_until| limit_exceeded(not_until.wait_time_from(self.clock.now())))
    }
}

/// A keyed token bucket (GCRA) that can be consulted without spending, so that only some
/// outcomes count (a failed password, an account actually created).
pub struct Bucket<K> {
    /// Time one action costs.
    interval: Duration,
    /// How far ahead of now a key's theoretical arrival time may run: `burst - 1` intervals.
    slack: Duration,
    /// Per key, when its bucket is full again.
    full_at: Mutex<HashMap<K, Instant>>,
}

impl<K: Hash + Eq + Clone> Bucket<K> {
    /// A bucket allowing `rate`.
    pub fn new(rate: RateConfig) -> Self {
        let interval = emission_interval(rate);
        let slack = interval.saturating_mul(rate.burst.saturating_sub(1));
        Self { interval, slack, full_at: Mutex::new(HashMap::new()) }
    }

    /// How long `key` must wait before its next action; zero when it may act now.
    fn wait(&self, full_at: Option<&Instant>, now: Instant) -> Duration {
        full_at.map_or(Duration::ZERO, |full| full.saturating_duration_since(now + self.slack))
    }

    /// `M_LIMIT_EXCEEDED` when `key` has no action left; spends nothing.
    pub fn check(&self, key: &K) -> Result<()> {
        let now = Instant::now();
        let map = self.full_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match self.wait(map.get(key), now) {
            Duration::ZERO => Ok(()),
            wait => Err(limit_exceeded(wait)),
        }
    }

    /// Spends one action of `key`; `M_LIMIT_EXCEEDED` (spending nothing) when none is left.
    pub fn spend(&self, key: &K) -> Result<()> {
        let now = Instant::now();
        let mut map = self.full_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let wait = self.wait(map.get(key), now);
        if !wait.is_zero() {
            return Err(limit_exceeded(wait));
        }
        if map.len() >= MAX_KEYS && !map.contains_key(key) {
            map.retain(|_, full| *full > now);
            if map.len() >= MAX_KEYS {
                // Only a flood of distinct keys gets here; the per-address limit still holds.
                map.clear();
            }
        }
        let full = map.entry(key.clone()).or_insert(now);
        *full = (*full).max(now) + self.interval;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_waits_and_check_spends_nothing() {
        let bucket = Bucket::new(RateConfig { per_second: 0.5, burst: 3 });
        let key = "a".to_owned();
        for _ in 0..5 {
            bucket.check(&key).unwrap();
        }
        for _ in 0..3 {
            bucket.spend(&key).unwrap();
        }
        let err = bucket.spend(&key).unwrap_err();
        let Error::Matrix(ErrorKind::LimitExceeded { retry_after_ms }, _) = err else {
            panic!("{err:?}")
        };
        assert!((1_000..=2_000).contains(&retry_after_ms), "{retry_after_ms}");
        assert!(bucket.check(&key).is_err());
        bucket.check(&"b".to_owned()).unwrap();
    }
}
