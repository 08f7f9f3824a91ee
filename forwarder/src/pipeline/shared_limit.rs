//! Rate limits kept in the store (GCRA, atomic in Redis across replicas;
//! in memory otherwise): requests per second with a burst, and tokens per
//! minute, per client identity. Answers carry OpenAI-style
//! `x-ratelimit-*` headers; a refusal is 429 with `Retry-After`.

use std::sync::Arc;
use std::time::Duration;

use forwarder_config::{FailurePolicy, RateLimitConfig};

use crate::api::ApiError;
use crate::auth::Identity;
use crate::store::{Rate, RateState, Space, Store, StoreKey};

pub type LimitHeaders = Vec<(&'static str, String)>;

pub struct SharedLimit {
    store: Arc<dyn Store>,
    requests: Rate,
    tokens: Option<Rate>,
    policy: FailurePolicy,
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
        let rps = cfg.requests_per_second.max(1);
        Self {
            store,
            requests: Rate {
                interval: Duration::from_secs(1) / rps,
                burst: u64::from(cfg.burst.max(1)),
            },
            tokens: cfg.tokens_per_minute.map(|t| Rate {
                interval: Duration::from_secs(60) / t.max(1),
                burst: u64::from(t.max(1)),
            }),
            policy: cfg.on_store_error,
        }
    }

    fn key(who: &Identity, what: &[u8]) -> StoreKey {
        StoreKey::new(Space::RateLimit, &who.0, what)
    }

    /// Spends one request and the estimated tokens; the headers for the
    /// answer, or the refusal.
    pub async fn check(&self, who: &Identity, tokens: u64) -> Result<LimitHeaders, ApiError> {
        let mut headers = LimitHeaders::new();
        let req = self
            .spend(&Self::key(who, b"requests"), self.requests, 1)
            .await?;
        if let Some(s) = req {
            headers.extend(Self::headers("requests", self.requests, s));
            if !s.allowed {
                return Err(refused(s, headers));
            }
        }
        if let Some(rate) = self.tokens {
            if let Some(s) = self.spend(&Self::key(who, b"tokens"), rate, tokens).await? {
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
    pub async fn correct(&self, who: &Identity, estimated: u64, used: u64) {
        if let (Some(rate), true) = (self.tokens, used > estimated) {
            let _ = self
                .store
                .rate(&Self::key(who, b"tokens"), rate, used - estimated)
                .await;
        }
    }

    pub fn counts_tokens(&self) -> bool {
        self.tokens.is_some()
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
        };
        let l = SharedLimit::new(&cfg, crate::store::memory(1 << 20));
        let who = Identity("a".into());
        let h = l.check(&who, 10).await.unwrap();
        assert!(h.contains(&("x-ratelimit-limit-requests", "2".into())));
        assert!(h.contains(&("x-ratelimit-remaining-requests", "1".into())));
        assert!(h.contains(&("x-ratelimit-remaining-tokens", "90".into())));
        l.check(&who, 10).await.unwrap();
        match l.check(&who, 10).await {
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
            l.check(&b, 500).await,
            Err(ApiError::QuotaExceeded { .. })
        ));
    }

    #[test]
    fn resets_read_like_openais() {
        assert_eq!(reset(120_000), "120ms");
        assert_eq!(reset(1_500_000), "1.500s");
        assert_eq!(estimate(b"12345"), 2);
    }
}
