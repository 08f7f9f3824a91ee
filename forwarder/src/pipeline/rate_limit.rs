//! Per-client rate limiting in this process (GCRA, via `governor`), keyed
//! by identity, with one limiter per tier.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::api::ApiError;
use crate::auth::Identity;
use forwarder_config::RateLimitConfig;

/// Which tier's limits apply: the token's tier if the config lists it,
/// else the client's configured tier (`client_tiers` by full identity, or
/// by bare name for an API-key client), else the default (`None`).
pub fn tier<'a>(
    cfg: &'a RateLimitConfig,
    who: &Identity,
    claimed: Option<&str>,
) -> Option<&'a str> {
    claimed
        .and_then(|t| cfg.tiers.get_key_value(t).map(|(k, _)| k.as_str()))
        .or_else(|| cfg.client_tiers.get(&who.0).map(String::as_str))
        .or_else(|| {
            who.key_name()
                .and_then(|n| cfg.client_tiers.get(n))
                .map(String::as_str)
        })
}

fn limiter(rps: u32, burst: u32) -> DefaultKeyedRateLimiter<String> {
    // Validation guarantees both are positive; fall back to 1 regardless.
    let rps = NonZeroU32::new(rps).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    DefaultKeyedRateLimiter::keyed(Quota::per_second(rps).allow_burst(burst))
}

pub struct RateLimit {
    default: DefaultKeyedRateLimiter<String>,
    tiers: HashMap<String, DefaultKeyedRateLimiter<String>>,
    clock: DefaultClock,
}

impl RateLimit {
    pub fn new(cfg: &RateLimitConfig) -> Self {
        Self {
            default: limiter(cfg.requests_per_second, cfg.burst),
            tiers: cfg
                .tiers
                .iter()
                .map(|(name, t)| (name.clone(), limiter(t.requests_per_second, t.burst)))
                .collect(),
            clock: DefaultClock::default(),
        }
    }

    /// Spends one request of `who` under `tier` (see [`tier`]).
    pub fn check(&self, who: &Identity, tier: Option<&str>) -> Result<(), ApiError> {
        let limiter = tier
            .and_then(|t| self.tiers.get(t))
            .unwrap_or(&self.default);
        limiter.check_key(&who.0).map_err(|not_until| {
            let wait: Duration = not_until.wait_time_from(self.clock.now());
            ApiError::RateLimited {
                retry_after: Some(wait),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use forwarder_config::TierLimits;

    fn cfg() -> RateLimitConfig {
        RateLimitConfig {
            requests_per_second: 1,
            burst: 1,
            tiers: [(
                "gold".to_string(),
                TierLimits {
                    requests_per_second: 100,
                    burst: 5,
                    tokens_per_minute: None,
                },
            )]
            .into(),
            client_tiers: [("alice".to_string(), "gold".to_string())].into(),
            ..RateLimitConfig::default()
        }
    }

    #[test]
    fn a_claimed_tier_wins_an_unknown_one_falls_back() {
        let c = cfg();
        let bob = Identity::api_key("bob");
        let alice = Identity::api_key("alice");
        assert_eq!(tier(&c, &bob, Some("gold")), Some("gold"));
        assert_eq!(tier(&c, &bob, Some("platinum")), None);
        assert_eq!(tier(&c, &bob, None), None);
        assert_eq!(tier(&c, &alice, None), Some("gold"));
        assert_eq!(tier(&c, &alice, Some("nope")), Some("gold"));
        // Another method's `alice` is not the API key's.
        assert_eq!(tier(&c, &Identity::jwt("", "alice"), None), None);
        assert_eq!(tier(&c, &Identity::cert("alice"), None), None);
    }

    #[test]
    fn each_tier_has_its_own_burst() {
        let c = cfg();
        let l = RateLimit::new(&c);
        let bob = Identity("bob".into());
        assert!(l.check(&bob, None).is_ok());
        assert!(l.check(&bob, None).is_err(), "default burst is 1");
        for _ in 0..5 {
            assert!(l.check(&bob, Some("gold")).is_ok());
        }
        assert!(l.check(&bob, Some("gold")).is_err(), "gold burst is 5");
    }
}
