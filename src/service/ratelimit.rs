//! Rate limits: the generic one for endpoints the spec marks as rate-limited (login, register,
//! ...), keyed by user id when authenticated and by address otherwise; a per-user one for the
//! send path; and a keyed bucket that can be looked at without spending, for limits that count
//! only some outcomes (failed passwords, accounts actually created).

use std::{
    collections::HashMap,
    hash::Hash,
    net::{IpAddr, Ipv6Addr},
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
    /// Checks so far, to look at the table's size only now and then.
    checks: AtomicU64,
}

impl RateLimiter {
    /// A limiter allowing `rate_per_second` sustained with bursts of `rate_burst`.
    pub fn new(limits: &LimitsConfig) -> Self {
        let rate = NonZeroU32::new(limits.rate_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(limits.rate_burst).unwrap_or(NonZeroU32::MIN);
        Self {
            limiter: Governor::keyed(Quota::per_second(rate).allow_burst(burst)),
            clock: DefaultClock::default(),
            checks: AtomicU64::new(0),
        }
    }

    /// Counts one request for `key`; `M_LIMIT_EXCEEDED` with the wait when over the limit.
    pub fn check(&self, key: &str) -> Result<()> {
        // Bound memory: now and then, forget clients whose bucket is full again (never one
        // whose bucket is still being spent).
        if self.checks.fetch_add(1, Ordering::Relaxed).is_multiple_of(PRUNE_EVERY)
            && self.limiter.len() > MAX_KEYS
        {
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

/// How often a full [`Bucket`] looks for keys whose bucket is full again, at most.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// The key a client address is limited by: the address itself for IPv4, its /64 for IPv6
/// (one subscriber commonly holds a whole /64, so single addresses cost nothing to change).
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
        IpAddr::V4(_) => ip,
    }
}

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
    keys: Mutex<Keys<K>>,
}

/// The buckets of a [`Bucket`]'s keys.
struct Keys<K> {
    /// Per key, when its bucket is full again.
    full_at: HashMap<K, Instant>,
    /// The one bucket new keys share while the table is full (a flood of distinct keys):
    /// they fail closed, and no key being limited is forgotten.
    overflow: Option<Instant>,
    /// When keys whose bucket is full again were last swept out.
    swept: Option<Instant>,
}

impl<K: Hash + Eq + Clone> Keys<K> {
    /// Where `key` is counted: its own bucket, or the shared overflow bucket when it is new
    /// and the table is full even after forgetting the keys whose bucket is full again.
    fn slot(&mut self, key: &K, now: Instant) -> Slot {
        if self.full_at.len() < MAX_KEYS || self.full_at.contains_key(key) {
            return Slot::Own;
        }
        if self.swept.is_none_or(|swept| now.duration_since(swept) >= SWEEP_EVERY) {
            self.swept = Some(now);
            self.full_at.retain(|_, full| *full > now);
            if self.full_at.len() < MAX_KEYS {
                return Slot::Own;
            }
        }
        Slot::Overflow
    }

    fn full_at(&mut self, key: &K, slot: Slot) -> Option<&mut Instant> {
        match slot {
            Slot::Own => self.full_at.get_mut(key),
            Slot::Overflow => self.overflow.as_mut(),
        }
    }
}

/// Which bucket a key is counted in.
#[derive(Clone, Copy)]
enum Slot {
    Own,
    Overflow,
}

impl<K: Hash + Eq + Clone> Bucket<K> {
    /// A bucket allowing `rate`.
    pub fn new(rate: RateConfig) -> Self {
        let interval = emission_interval(rate);
        let slack = interval.saturating_mul(rate.burst.saturating_sub(1));
        let keys = Keys { full_at: HashMap::new(), overflow: None, swept: None };
        Self { interval, slack, keys: Mutex::new(keys) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Keys<K>> {
        self.keys.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How long `key` must wait before its next action; zero when it may act now.
    fn wait(&self, full_at: Option<&Instant>, now: Instant) -> Duration {
        full_at.map_or(Duration::ZERO, |full| full.saturating_duration_since(now + self.slack))
    }

    /// `M_LIMIT_EXCEEDED` when `key` has no action left; spends nothing.
    pub fn check(&self, key: &K) -> Result<()> {
        let now = Instant::now();
        let mut keys = self.lock();
        let slot = keys.slot(key, now);
        match self.wait(keys.full_at(key, slot).as_deref(), now) {
            Duration::ZERO => Ok(()),
            wait => Err(limit_exceeded(wait)),
        }
    }

    /// Spends one action of `key`; `M_LIMIT_EXCEEDED` (spending nothing) when none is left.
    pub fn spend(&self, key: &K) -> Result<()> {
        let now = Instant::now();
        let mut keys = self.lock();
        let slot = keys.slot(key, now);
        let wait = self.wait(keys.full_at(key, slot).as_deref(), now);
        if !wait.is_zero() {
            return Err(limit_exceeded(wait));
        }
        let full = match slot {
            Slot::Own => keys.full_at.entry(key.clone()).or_insert(now),
            Slot::Overflow => keys.overflow.get_or_insert(now),
        };
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

    #[test]
    fn a_full_table_keeps_its_keys_and_new_ones_share_one_bucket() {
        let bucket = Bucket::new(RateConfig { per_second: 0.001, burst: 1 });
        for n in 0..MAX_KEYS {
            bucket.spend(&n).unwrap();
        }
        // The key under attack is still limited; new keys share the overflow bucket.
        assert!(bucket.spend(&0).is_err());
        bucket.spend(&MAX_KEYS).unwrap();
        assert!(bucket.check(&(MAX_KEYS + 1)).is_err());
        assert!(bucket.spend(&(MAX_KEYS + 2)).is_err());
        assert_eq!(bucket.lock().full_at.len(), MAX_KEYS);
    }

    #[test]
    fn ipv6_addresses_are_limited_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        assert_eq!(address_key(a), "2001:db8:1:2::".parse::<IpAddr>().unwrap());
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(address_key(v4), v4);
        assert_eq!(address_key("::ffff:192.0.2.7".parse().unwrap()), v4);
    }
}
