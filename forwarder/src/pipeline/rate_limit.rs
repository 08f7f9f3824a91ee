//! Per-client rate limiting (GCRA, via `governor`), keyed by identity.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::api::ApiError;
use crate::auth::Identity;
use forwarder_config::RateLimitConfig;

pub struct RateLimit {
    limiter: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
}

impl RateLimit {
    pub fn new(cfg: &RateLimitConfig) -> Self {
        // Validation guarantees both are positive; fall back to 1 regardless.
        let rps = NonZeroU32::new(cfg.requests_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(cfg.burst).unwrap_or(NonZeroU32::MIN);
        Self {
            limiter: DefaultKeyedRateLimiter::keyed(Quota::per_second(rps).allow_burst(burst)),
            clock: DefaultClock::default(),
        }
    }

    pub fn check(&self, who: &Identity) -> Result<(), ApiError> {
        self.limiter.check_key(&who.0).map_err(|not_until| {
            let wait: Duration = not_until.wait_time_from(self.clock.now());
            ApiError::RateLimited {
                retry_after: Some(wait),
            }
        })
    }
}
