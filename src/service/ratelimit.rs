//! Per-client rate limits for endpoints the spec marks as rate-limited (login, register, ...),
//! keyed by user id when authenticated and by address otherwise.

use std::num::NonZeroU32;

use governor::{
    DefaultKeyedRateLimiter, Quota, RateLimiter as Governor,
    clock::{Clock, DefaultClock},
};

use crate::{
    config::LimitsConfig,
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
        self.limiter.check_key(&key.to_owned()).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            Error::new(
                ErrorKind::LimitExceeded { retry_after_ms: wait.as_millis().max(1) as u64 },
                "Too many requests",
            )
        })
    }
}
