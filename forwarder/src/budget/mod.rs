//! Per-client budgets over the UTC day and month, in tokens and in spend
//! (prices per model), kept as counters in the store: on Redis one budget
//! across every replica, charged by an atomic increment-then-check.
//!
//! A request is charged its estimate before it is forwarded (refused with
//! 429 `budget_exceeded` when that would pass a limit), and corrected to
//! what the upstream reports after (refunded when it fails). A stream that
//! passes a limit mid-way finishes, and the overrun is recorded. Clients
//! without a budget cost no store call.

mod limits;
mod metrics;
mod period;
mod report;
mod reservation;
mod stage;
mod stream;
mod top_clients;
pub mod usage;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use forwarder_config::{BudgetsConfig, FailurePolicy};

use crate::api::ApiError;
use crate::auth::Identity;
use crate::store::{Counter, CounterOp, Space, Store, StoreKey};
use crate::telemetry::Metrics;
use limits::{Limits, Prices, Unit};
use metrics::BudgetMetrics;
use period::{Period, Span};
pub use report::Report;
pub use reservation::Reservation;
pub use stage::{charge, Held};
pub use stream::tap;
use usage::Usage;

pub struct Budgets {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    cfg: BudgetsConfig,
    prices: Prices,
    policy: FailurePolicy,
    metrics: BudgetMetrics,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The four counters of a client at `now`: tokens and spend (micro-dollars)
/// for the day and the month, in that order.
fn slots(who: &Identity, now: i64) -> Vec<(Period, Unit, StoreKey)> {
    let mut v = Vec::with_capacity(4);
    for span in Span::ALL {
        let p = Period::at(span, now);
        for unit in Unit::ALL {
            let key = StoreKey::new(
                Space::Budget,
                &who.0,
                format!("{}:{}", p.name, unit.label()).as_bytes(),
            );
            v.push((p.clone(), unit, key));
        }
    }
    v
}

impl Budgets {
    pub fn new(cfg: &BudgetsConfig, store: Arc<dyn Store>, metrics: &Metrics) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                prices: Prices::new(&cfg.prices),
                policy: cfg.on_store_error,
                metrics: BudgetMetrics::new(metrics, cfg.metric_clients),
                cfg: cfg.clone(),
            }),
        }
    }

    /// The limits in force for a client, if it has any.
    fn limits(&self, who: &Identity, tier: Option<&str>) -> Option<Limits> {
        Limits::for_client(&self.inner.cfg, who, tier)
    }

    /// Charges the estimate of a request for `model` to `who`'s budget,
    /// or refuses it. `None`: the client has no budget (nothing was
    /// done), or the store failed and the policy admits.
    pub async fn reserve(
        &self,
        who: &Identity,
        tier: Option<&str>,
        model: &str,
        body: &[u8],
    ) -> Result<Option<Reservation>, ApiError> {
        let Some(limits) = self.limits(who, tier) else {
            return Ok(None);
        };
        let estimate = usage::estimate(body);
        let now = now();
        let slots = slots(who, now);
        let counters = self.counters(&slots, &limits, model, estimate, now);
        match self.inner.store.add(&counters, true).await {
            Ok((true, _)) => Ok(Some(Reservation::new(
                self.inner.clone(),
                who.clone(),
                model,
                counters,
                estimate,
            ))),
            Ok((false, values)) => Err(self.refusal(who, &slots, &counters, &values, now)),
            Err(e) => self.store_failed(&e).map(|()| None),
        }
    }

    /// Refuses a request whose estimate would pass a limit now, and
    /// charges nothing: an async job is charged when it runs, and its
    /// client learns at submission that its budget is spent. (Two
    /// submissions checked at once may both pass; the run is the charge.)
    pub async fn check(
        &self,
        who: &Identity,
        tier: Option<&str>,
        model: &str,
        body: &[u8],
    ) -> Result<(), ApiError> {
        let Some(limits) = self.limits(who, tier) else {
            return Ok(());
        };
        let now = now();
        let slots = slots(who, now);
        let counters = self.counters(&slots, &limits, model, usage::estimate(body), now);
        self.check_counters(who, &slots, &counters, now).await
    }

    /// Refuses work whose size is not known yet (a batch, before its lines
    /// are read) when a limit has no room left at all: one more token, or
    /// one more micro-dollar. Charges nothing: each line is charged as it
    /// runs, and a line that meets a spent budget fails on its own.
    pub async fn check_room(&self, who: &Identity, tier: Option<&str>) -> Result<(), ApiError> {
        let Some(limits) = self.limits(who, tier) else {
            return Ok(());
        };
        let now = now();
        let slots = slots(who, now);
        let counters: Vec<Counter> = slots
            .iter()
            .map(|(p, unit, key)| Counter {
                key: key.clone(),
                op: CounterOp {
                    delta: 1,
                    limit: limits.get(p.span, *unit),
                    ttl: p.ttl(now),
                },
            })
            .collect();
        self.check_counters(who, &slots, &counters, now).await
    }

    /// Reads `counters` (changing nothing) and refuses when one would pass
    /// its limit.
    async fn check_counters(
        &self,
        who: &Identity,
        slots: &[(Period, Unit, StoreKey)],
        counters: &[Counter],
        now: i64,
    ) -> Result<(), ApiError> {
        let reads: Vec<Counter> = counters.iter().map(|c| reading(&c.key, c.op.ttl)).collect();
        match self.inner.store.add(&reads, false).await {
            Ok((_, values)) if fits(counters, &values) => Ok(()),
            Ok((_, values)) => Err(self.refusal(who, slots, counters, &values, now)),
            Err(e) => self.store_failed(&e),
        }
    }

    /// The charge of `estimate` on each of `slots`, with its limit.
    fn counters(
        &self,
        slots: &[(Period, Unit, StoreKey)],
        limits: &Limits,
        model: &str,
        estimate: Usage,
        now: i64,
    ) -> Vec<Counter> {
        let cost = self.inner.prices.cost(model, estimate);
        slots
            .iter()
            .map(|(p, unit, key)| Counter {
                key: key.clone(),
                op: CounterOp {
                    delta: match unit {
                        Unit::Tokens => i64::try_from(estimate.total()).unwrap_or(i64::MAX),
                        Unit::Spend => cost,
                    },
                    limit: limits.get(p.span, *unit),
                    ttl: p.ttl(now),
                },
            })
            .collect()
    }

    /// The 429 naming the first limit `counters` would pass at `values`.
    fn refusal(
        &self,
        who: &Identity,
        slots: &[(Period, Unit, StoreKey)],
        counters: &[Counter],
        values: &[i64],
        now: i64,
    ) -> ApiError {
        let inner = &self.inner;
        let over = slots
            .iter()
            .zip(counters)
            .zip(values)
            .find(|((_, c), v)| passes(c, **v))
            .map(|(((p, unit, _), c), v)| (p.clone(), *unit, *v, c.op.limit.unwrap_or(0)));
        let Some((p, unit, used, limit)) = over else {
            return ApiError::BadGateway("budget store answered inconsistently".into());
        };
        let name = metrics::budget_name(p.span, unit);
        inner.metrics.refused(who, &name);
        ApiError::BudgetExceeded {
            budget: name,
            used: unit.show(used),
            limit: unit.show(limit),
            resets_at: p.ends_rfc3339(),
            retry_after: p.left(now),
        }
    }

    /// The store failed: admit or refuse as `on_store_error` says.
    fn store_failed(&self, e: &dyn std::fmt::Display) -> Result<(), ApiError> {
        match self.inner.policy {
            FailurePolicy::FailOpen => {
                tracing::warn!(error = %e, "budget store failed; admitting (fail_open)");
                Ok(())
            }
            FailurePolicy::FailClosed => {
                tracing::warn!(error = %e, "budget store failed; refusing (fail_closed)");
                Err(ApiError::StoreUnavailable("budget"))
            }
        }
    }

    /// The caller's own usage and limits (`GET /v1/budget`).
    pub async fn report(&self, who: &Identity, tier: Option<&str>) -> Result<Report, ApiError> {
        let limits = self.limits(who, tier);
        let now = now();
        let slots = slots(who, now);
        let values = match &limits {
            // No budget: nothing is counted, so nothing is read.
            None => vec![0; slots.len()],
            Some(_) => {
                let reads: Vec<Counter> = slots
                    .iter()
                    .map(|(p, _, key)| reading(key, p.ttl(now)))
                    .collect();
                self.inner
                    .store
                    .add(&reads, false)
                    .await
                    .map_err(|_| ApiError::StoreUnavailable("budget"))?
                    .1
            }
        };
        Ok(Report::new(who, tier, limits.as_ref(), &slots, &values))
    }
}

/// Whether a charge would pass its limit from `used`.
fn passes(c: &Counter, used: i64) -> bool {
    c.op.limit.is_some_and(|l| used + c.op.delta > l)
}

/// Whether every charge fits under its limit at `values`.
fn fits(counters: &[Counter], values: &[i64]) -> bool {
    counters.len() == values.len() && !counters.iter().zip(values).any(|(c, v)| passes(c, *v))
}

/// A counter read, not changed.
fn reading(key: &StoreKey, ttl: std::time::Duration) -> Counter {
    Counter {
        key: key.clone(),
        op: CounterOp {
            delta: 0,
            limit: None,
            ttl,
        },
    }
}
