//! The exact-match response cache: a completed answer stored under a
//! digest of (scope, canonical request) and replayed to an identical
//! request, as a completion or a stream, whichever the client asked for.
//!
//! Policy per model (`cache.models`); a client's `Cache-Control:
//! no-store` skips the cache, `no-cache` skips reading but refreshes the
//! entry. Errors, tool-call answers and truncated streams are never
//! stored. The cache fails open: a store error is a miss.
//!
//! A miss claims its key in the store while it is forwarded, so identical
//! requests arriving meanwhile, on any replica, wait for that answer
//! instead of forwarding too (the FAQ case: a hot question asked again
//! before its first answer is back).

pub mod convert;
pub mod key;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use forwarder_config::{CacheConfig, Cacheable, ModelCacheConfig};
use http::HeaderMap;
use prometheus::{IntCounter, IntCounterVec, Opts};

use crate::pipeline::ApiKind;
use crate::store::{Claimed, HeldClaim, Record, Space, Store, StoreKey};
use crate::telemetry::Metrics;

/// How often a request waiting for an identical one's answer looks again.
const CLAIM_POLL: std::time::Duration = std::time::Duration::from_millis(25);
/// A miss's claim lease, renewed while it is forwarded: if its replica
/// dies, the waiters forward within this.
const CLAIM_LEASE: std::time::Duration = std::time::Duration::from_secs(5);

/// The request header with which a client opts a non-deterministic
/// request into the cache.
pub const OPT_IN: &str = "x-cache-opt-in";

/// What the client asked for in its headers.
#[derive(Debug, Default, Clone, Copy)]
pub struct Directives {
    pub no_store: bool,
    pub no_cache: bool,
    pub opt_in: bool,
}

impl Directives {
    pub fn from_headers(h: &HeaderMap) -> Self {
        let mut d = Self::default();
        for v in h.get_all(http::header::CACHE_CONTROL) {
            for token in v.to_str().unwrap_or("").split(',') {
                match token.trim().to_ascii_lowercase().as_str() {
                    "no-store" => d.no_store = true,
                    "no-cache" => d.no_cache = true,
                    _ => {}
                }
            }
        }
        d.opt_in = h
            .get(OPT_IN)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
        d
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The model has no cache: no header, no count.
    Off,
    /// Forwarded without reading; `write`: the answer refreshes the entry.
    Bypass { write: bool },
    /// Read, and on a miss store the answer.
    Lookup,
}

/// The decision for one request (pure).
pub fn decide(policy: Option<&ModelCacheConfig>, deterministic: bool, d: Directives) -> Decision {
    let Some(p) = policy.filter(|p| p.enabled) else {
        return Decision::Off;
    };
    let eligible = deterministic || d.opt_in || p.cacheable == Cacheable::All;
    if d.no_store || !eligible {
        Decision::Bypass { write: false }
    } else if d.no_cache {
        Decision::Bypass { write: true }
    } else {
        Decision::Lookup
    }
}

/// What the pipeline does with one request.
#[derive(Clone)]
pub struct Plan {
    pub decision: Decision,
    pub key: StoreKey,
    pub fingerprint: [u8; 32],
    pub model: String,
    /// The request's API: the answer's shape, and part of the key.
    pub api: ApiKind,
    ttl: Duration,
    max_entry: usize,
}

impl Plan {
    /// Largest answer stored (a recorded stream is cut off past it).
    pub fn max_entry(&self) -> usize {
        self.max_entry
    }

    pub fn writes(&self) -> bool {
        matches!(
            self.decision,
            Decision::Lookup | Decision::Bypass { write: true }
        )
    }
}

pub struct ResponseCache {
    store: Arc<dyn Store>,
    models: BTreeMap<String, ModelCacheConfig>,
    requests: IntCounterVec,
    stored_bytes: IntCounter,
}

/// Scope of entries shared by every client (no identity can be empty).
const SHARED_SCOPE: &str = "";

impl ResponseCache {
    /// `None` when no model is configured.
    pub fn new(cfg: &CacheConfig, store: Arc<dyn Store>, metrics: &Metrics) -> Option<Self> {
        if !cfg.models.values().any(|m| m.enabled) {
            return None;
        }
        let requests = IntCounterVec::new(
            Opts::new(
                "forwarder_cache_requests_total",
                "Requests for a cached model, by result (hit, miss, bypass)",
            ),
            &["model", "result"],
        )
        .expect("valid metric");
        let stored_bytes = IntCounter::new(
            "forwarder_cache_stored_bytes_total",
            "Bytes of answers written to the cache",
        )
        .expect("valid metric");
        let _ = metrics.registry().register(Box::new(requests.clone()));
        let _ = metrics.registry().register(Box::new(stored_bytes.clone()));
        for (m, c) in &cfg.models {
            if c.enabled {
                for r in ["hit", "miss", "bypass"] {
                    requests.with_label_values(&[m, r]);
                }
            }
        }
        Some(Self {
            store,
            models: cfg.models.clone(),
            requests,
            stored_bytes,
        })
    }

    /// The plan for a request; `None` when its model is not cached or
    /// its API's answers are not (see [`ApiKind::cacheable`]).
    pub fn plan(
        &self,
        model: &str,
        api: ApiKind,
        scope: &str,
        body: &[u8],
        d: Directives,
    ) -> Option<Plan> {
        let policy = self.models.get(model)?;
        if !api.cacheable() {
            return None;
        }
        let canon = key::canonical_for(api, body)?;
        let decision = decide(Some(policy), canon.deterministic, d);
        if decision == Decision::Off {
            return None;
        }
        let scope = if policy.shared { SHARED_SCOPE } else { scope };
        Some(Plan {
            decision,
            key: StoreKey::new(Space::Cache, scope, &canon.bytes),
            fingerprint: canon.digest,
            model: model.to_string(),
            api,
            ttl: policy.ttl,
            max_entry: policy.max_entry_bytes,
        })
    }

    /// A stored answer (a completion body); a store error is a miss.
    pub async fn lookup(&self, plan: &Plan) -> Option<Record> {
        if plan.decision != Decision::Lookup {
            return None;
        }
        match self.store.get(&plan.key).await {
            Ok(r) => r.filter(|r| r.fingerprint == plan.fingerprint),
            Err(e) => {
                tracing::debug!(error = %e, "cache lookup failed; treated as a miss");
                None
            }
        }
    }

    pub fn count(&self, plan: &Plan, result: &str) {
        self.requests
            .with_label_values(&[&plan.model, result])
            .inc();
    }

    /// After a miss: the key's claim, held (renewed) while this request is forwarded
    /// (`Ok(Some)`: complete it through [`ResponseCache::store`]), or the
    /// answer of an identical request that held it meanwhile (`Err`: a hit),
    /// waited for until `until`. `Ok(None)`: forward without a claim (the
    /// store failed, the wait ran out, or the holder gave up: then every
    /// waiter forwards at once rather than one after another).
    pub async fn lead_or_wait(
        &self,
        plan: &Plan,
        until: tokio::time::Instant,
    ) -> Result<Option<HeldClaim>, Record> {
        if plan.decision != Decision::Lookup {
            return Ok(None);
        }
        let mut waited = false;
        loop {
            let now = tokio::time::Instant::now();
            match self
                .store
                .claim(&plan.key, plan.fingerprint, CLAIM_LEASE)
                .await
            {
                Ok(Claimed::Won(guard)) if !waited => {
                    return Ok(Some(HeldClaim::hold(guard, CLAIM_LEASE, "cache")))
                }
                Ok(Claimed::Won(_)) => return Ok(None),
                Ok(Claimed::Done(r)) if r.fingerprint == plan.fingerprint => return Err(r),
                Ok(Claimed::Busy { .. }) if now + CLAIM_POLL < until => {
                    waited = true;
                    tokio::time::sleep(CLAIM_POLL).await;
                }
                Ok(_) => return Ok(None),
                Err(e) => {
                    tracing::debug!(error = %e, "cache claim failed; forwarding without one");
                    return Ok(None);
                }
            }
        }
    }

    /// Stores a completion body in the background, if it may be cached:
    /// through the key's claim when this request held it (waiters read it
    /// at once), else as a plain write. An answer that may not be cached
    /// drops the claim, which frees the key for the waiters.
    pub fn store(self: &Arc<Self>, plan: &Plan, lead: Option<HeldClaim>, completion: Bytes) {
        if !plan.writes()
            || completion.len() > plan.max_entry
            || !convert::cacheable_as(plan.api, &completion)
        {
            return;
        }
        let (this, key, fp, ttl) = (self.clone(), plan.key.clone(), plan.fingerprint, plan.ttl);
        tokio::spawn(async move {
            let n = completion.len() as u64;
            let stored = match lead {
                Some(guard) => guard.complete(completion, ttl).await,
                None => this.store.put(&key, fp, completion, ttl).await,
            };
            match stored {
                Ok(()) => this.stored_bytes.inc_by(n),
                Err(e) => tracing::debug!(error = %e, "could not store a cached answer"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdrs(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    /// The semantics table: policy × determinism × client directives.
    #[test]
    fn decisions_follow_the_table() {
        let det = ModelCacheConfig::default();
        let all = ModelCacheConfig {
            cacheable: Cacheable::All,
            ..Default::default()
        };
        let off = ModelCacheConfig {
            enabled: false,
            ..Default::default()
        };
        let d = |h: &[(&str, &str)]| Directives::from_headers(&hdrs(h));
        use Decision::*;
        let rows: &[(Option<&ModelCacheConfig>, bool, Directives, Decision)] = &[
            (None, true, d(&[]), Off),
            (Some(&off), true, d(&[]), Off),
            (Some(&det), true, d(&[]), Lookup),
            (Some(&det), false, d(&[]), Bypass { write: false }),
            (Some(&det), false, d(&[(OPT_IN, "true")]), Lookup),
            (Some(&all), false, d(&[]), Lookup),
            (
                Some(&det),
                true,
                d(&[("cache-control", "no-cache")]),
                Bypass { write: true },
            ),
            (
                Some(&det),
                true,
                d(&[("cache-control", "max-age=0, No-Store")]),
                Bypass { write: false },
            ),
            (
                Some(&all),
                false,
                d(&[("cache-control", "no-store")]),
                Bypass { write: false },
            ),
        ];
        for (i, (p, det, dir, want)) in rows.iter().enumerate() {
            assert_eq!(decide(*p, *det, *dir), *want, "row {i}");
        }
    }
}
