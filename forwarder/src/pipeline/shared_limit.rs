//! Rate limits kept in the store (GCRA, atomic in Redis across replicas;
//! in memory otherwise): requests per second with a burst, and tokens per
//! minute, per client identity. Answers carry OpenAI-style
//! `x-ratelimit-*` headers; a refusal is 429 with `Retry-After`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use forwarder_config::{FailurePolicy, RateLimitConfig};

use crate::api::ApiError;
use crate::auth::Identity;
use crate::store::{Rate, RateState, Space, Store, StoreKey};

pub type LimitHeaders = Vec<(&'static str, String)>;

pub struct SharedLimit {
    store: Arc<dyn Store>,
    default: Rates,
    tiers: HashMap<String, Rates>,
    policy: FailurePolicy,
}

/// One tier's limits as GCRA rates.
#[derive(Clone, Copy)]
struct Rates {
    requests: Rate,
    tokens: Option<Rate>,
}

impl Rates {
    fn new(rps: u32, burst: u32, tokens_per_minute: Option<u32>) -> Self {
        let rps = rps.max(1);
        Self {
            requests: Rate {
                interval: Duration::from_secs(1) / rps,
                burst: u64::from(burst.max(1)),
            },
            tokens: tokens_per_minute.map(|t| Rate {
                interval: Duration::from_secs(60) / t.max(1),
                burst: u64::from(t.max(1)),
            }),
        }
    }
}

/// `1.5s`, `120ms`: the reset as OpenAI writes it.
fn reset(us: u64) -> String {
    let d = Duration::from_micros(us);
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.3}s", d.as_secs_f64())
    }
}

/// Tokens a request is charged before its answer: its body's bytes / 4.
pub fn estimate(body: &[u8]) -> u64 {
    (body.len() as u64).div_ceil(4).max(1)
}

impl SharedLimit {
    pub fn new(cfg: &RateLimitConfig, store: Arc<dyn Store>) -> Self {
        Self {
            store,
            default: Rates::new(cfg.requests_per_second, cfg.burst, cfg.tokens_per_minute),
            tiers: cfg
                .tiers
                .iter()
                .map(|(name, t)| {
                    let rates = Rates::new(t.requests_per_second, t.burst, t.tokens_per_minute);
                    (name.clone(), rates)
                })
                .collect(),
            policy: cfg.on_store_error,
        }
    }

    fn rates(&self, tier: Option<&str>) -> (Rates, String) {
        match tier.and_then(|t| self.tiers.get(t).map(|r| (t, r))) {
            Some((t, r)) => (*r, format!("@{t}")),
            None => (self.default, String::new()),
        }
    }

    /// A client's counter; a tier has counters of its own, so a client
    /// moved to another tier starts afresh there.
    fn key(who: &Identity, what: &str, tier: &str) -> StoreKey {
        StoreKey::new(Space::RateLimit, &who.0, format!("{what}{tier}").as_bytes())
    }

    /// Spends one request and the estimated tokens of `who` under `tier`
    /// (see [`super::rate_limit::tier`]); the headers for the answer, or
    /// the refusal.
    pub async fn check(
        &self,
        who: &Identity,
        tier: Option<&str>,
        tokens: u64,
    ) -> Result<LimitHeaders, ApiError> {
        let (rates, suffix) = self.rates(tier);
        let mut headers = LimitHeaders::new();
        let req = self
            .spend(&Self::key(who, "requests", &suffix), rates.requests, 1)
            .await?;
        if let Some(s) = req {
            headers.extend(Self::headers("requests", rates.requests, s));
            if !s.allowed {
                return Err(refused(s, headers));
            }
        }
        if let Some(rate) = rates.tokens {
            let key = Self::key(who, "tokens", &suffix);
            if let Some(s) = self.spend(&key, rate, tokens).await? {
                headers.extend(Self::headers("tokens", rate, s));
                if !s.allowed {
                    return Err(refused(s, headers));
                }
            }
        }
        Ok(headers)
    }

    /// Charges the tokens an answer used beyond the estimate (best effort:
    /// a charge that no longer fits is dropped, not carried over).
    pub async fn correct(&self, who: &Identity, tier: Option<&str>, estimated: u64, used: u64) {
        let (rates, suffix) = self.rates(tier);
        if let (Some(rate), true) = (rates.tokens, used > estimated) {
            let key = Self::key(who, "tokens", &suffix);
            let _ = self.store.rate(&key, rate, used - estimated).await;
        }
    }

    pub fn counts_tokens(&self, tier: Option<&str>) -> bool {
        self.rates(tier).0.tokens.is_some()
    }

    /// `None`: the store failed and the policy admits.
    async fn spend(
        &self,
        key: &StoreKey,
        rate: Rate,
        cost: u64,
    ) -> Result<Option<RateState>, ApiError> {
        match self.store.rate(key, rate, cost).await {
            Ok(s) => Ok(Some(s)),
            Err(e) => match self.policy {
                FailurePolicy::FailOpen => {
                    tracing::warn!(error = %e, "rate-limit store failed; admitting (fail_open)");
                    Ok(None)
                }
                FailurePolicy::FailClosed => {
                    tracing::warn!(error = %e, "rate-limit store failed; refusing (fail_closed)");
                    Err(ApiError::StoreUnavailable("rate limit"))
                }
            },
        }
    }

    fn headers(what: &'static str, rate: Rate, s: RateState) -> LimitHeaders {
        let (limit, remaining, reset_name) = match what {
            "requests" => (
                "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests",
            ),
            _ => (
                "x-ratelimit-limit-tokens",
                "x-ratelimit-remaining-tokens",
                "x-ratelimit-reset-tokens",
            ),
        };
        vec![
            (limit, rate.burst.to_string()),
            (remaining, s.remaining.to_string()),
            (reset_name, reset(s.reset_us)),
        ]
    }
}

fn refused(s: RateState, limits: LimitHeaders) -> ApiError {
    ApiError::QuotaExceeded {
        retry_after: Duration::from_micros(s.retry_after_us),
        limits,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn requests_and_tokens_are_limited_with_headers() {
        let cfg = RateLimitConfig {
            requests_per_second: 1,
            burst: 2,
            shared: true,
            tokens_per_minute: Some(100),
            on_store_error: FailurePolicy::FailOpen,
            tiers: [(
                "gold".to_string(),
                forwarder_config::TierLimits {
                    requests_per_second: 1,
                    burst: 5,
                    tokens_per_minute: Some(1000),
                },
            )]
            .into(),
            ..RateLimitConfig::default()
        };
        let l = SharedLimit::new(&cfg, crate::store::memory(1 << 20));
        let who = Identity("a".into());
        let h = l.check(&who, None, 10).await.unwrap();
        assert!(h.contains(&("x-ratelimit-limit-requests", "2".into())));
        assert!(h.contains(&("x-ratelimit-remaining-requests", "1".into())));
        assert!(h.contains(&("x-ratelimit-remaining-tokens", "90".into())));
        l.check(&who, None, 10).await.unwrap();
        match l.check(&who, None, 10).await {
            Err(ApiError::QuotaExceeded {
                retry_after,
                limits,
            }) => {
                assert!(
                    retry_after > Duration::from_millis(500)
                        && retry_after <= Duration::from_secs(1)
                );
                assert!(limits.contains(&("x-ratelimit-remaining-requests", "0".into())));
            }
            other => panic!("expected 429, got {other:?}"),
        }
        // Another client has its own limit; a request over the token budget is refused.
        let b = Identity("b".into());
        assert!(matches!(
            l.check(&b, None, 500).await,
            Err(ApiError::QuotaExceeded { .. })
        ));
        // A tier has its own limits and its own counters: the client
        // refused above still has its gold budget.
        let h = l.check(&who, Some("gold"), 500).await.unwrap();
        assert!(h.contains(&("x-ratelimit-limit-requests", "5".into())));
        assert!(h.contains(&("x-ratelimit-remaining-tokens", "500".into())));
        assert!(l.counts_tokens(Some("gold")));
    }

    #[test]
    fn resets_read_like_openais() {
        assert_eq!(reset(120_000), "120ms");
        assert_eq!(reset(1_500_000), "1.500s");
        assert_eq!(estimate(b"12345"), 2);
    }
}
