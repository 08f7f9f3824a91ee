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
mod stream;
pub mod usage;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use forwarder_config::{BudgetsConfig, FailurePolicy};

use crate::api::ApiError;
use crate::auth::Identity;
use crate::pipeline::envelope::ReplyBody;
use crate::pipeline::{Answer, ApiKind};
use crate::store::{Counter, CounterOp, Space, Store, StoreKey};
use crate::telemetry::Metrics;
use limits::{Limits, Prices, Unit};
use metrics::BudgetMetrics;
use period::{Period, Span};
pub use report::Report;
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
        let inner = &self.inner;
        let estimate = usage::estimate(body);
        let now = now();
        let slots = slots(who, now);
        let charge = |u: Usage| -> Vec<i64> {
            let cost = inner.prices.cost(model, u);
            slots
                .iter()
                .map(|(_, unit, _)| match unit {
                    Unit::Tokens => i64::try_from(u.total()).unwrap_or(i64::MAX),
                    Unit::Spend => cost,
                })
                .collect()
        };
        let deltas = charge(estimate);
        let counters: Vec<Counter> = slots
            .iter()
            .zip(&deltas)
            .map(|((p, unit, key), d)| Counter {
                key: key.clone(),
                op: CounterOp {
                    delta: *d,
                    limit: limits.get(p.span, *unit),
                    ttl: p.ttl(now),
                },
            })
            .collect();
        match inner.store.add(&counters, true).await {
            Ok((true, _)) => Ok(Some(Reservation {
                inner: inner.clone(),
                who: who.clone(),
                model: model.to_string(),
                keys: counters,
                charged: estimate,
                settled: false,
            })),
            Ok((false, values)) => {
                let over = slots
                    .iter()
                    .zip(&counters)
                    .zip(&values)
                    .find(|((_, c), v)| c.op.limit.is_some_and(|l| **v + c.op.delta > l))
                    .map(|(((p, unit, _), c), v)| (p.clone(), *unit, *v, c.op.limit.unwrap_or(0)));
                let Some((p, unit, used, limit)) = over else {
                    return Err(ApiError::BadGateway(
                        "budget store answered inconsistently".into(),
                    ));
                };
                let name = format!("{} {}", p.span.label(), unit.noun());
                inner
                    .metrics
                    .refusals
                    .with_label_values(&[&inner.metrics.label(who), &name])
                    .inc();
                Err(ApiError::BudgetExceeded {
                    budget: name,
                    used: unit.show(used),
                    limit: unit.show(limit),
                    resets_at: p.ends_rfc3339(),
                    retry_after: p.left(now),
                })
            }
            Err(e) => match inner.policy {
                FailurePolicy::FailOpen => {
                    tracing::warn!(error = %e, "budget store failed; admitting (fail_open)");
                    Ok(None)
                }
                FailurePolicy::FailClosed => {
                    tracing::warn!(error = %e, "budget store failed; refusing (fail_closed)");
                    Err(ApiError::StoreUnavailable("budget"))
                }
            },
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
                    .map(|(p, _, key)| Counter {
                        key: key.clone(),
                        op: CounterOp {
                            delta: 0,
                            limit: None,
                            ttl: p.ttl(now),
                        },
                    })
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

/// A request's charge, held until its answer says what it used. Dropped
/// unsettled (the request failed, the client went away before an answer),
/// the estimate is refunded.
pub struct Reservation {
    inner: Arc<Inner>,
    who: Identity,
    model: String,
    keys: Vec<Counter>,
    /// What the counters hold for this request now.
    charged: Usage,
    settled: bool,
}

impl Reservation {
    /// Charges what the answer used (`None`: the answer did not say, and
    /// the estimate stands).
    pub fn settle(mut self, used: Option<Usage>) {
        self.settled = true;
        let used = used.unwrap_or(self.charged);
        let (t, s) = self.inner.counted(&self.model, used);
        self.inner
            .metrics
            .tokens
            .with_label_values(&[&self.inner.metrics.label(&self.who)])
            .inc_by(t);
        self.inner
            .metrics
            .spend
            .with_label_values(&[&self.inner.metrics.label(&self.who)])
            .inc_by(s);
        self.correct(used);
    }

    /// Moves the counters from the charged estimate to `used` (unchecked:
    /// an overrun is recorded, not refused), in the background.
    fn correct(&self, used: Usage) {
        let prices = &self.inner.prices;
        let dt = i64::try_from(used.total()).unwrap_or(i64::MAX)
            - i64::try_from(self.charged.total()).unwrap_or(i64::MAX);
        let ds = prices.cost(&self.model, used) - prices.cost(&self.model, self.charged);
        if dt == 0 && ds == 0 {
            return;
        }
        let counters: Vec<Counter> = self
            .keys
            .iter()
            .enumerate()
            .map(|(i, c)| Counter {
                key: c.key.clone(),
                op: CounterOp {
                    // Day tokens, day spend, month tokens, month spend.
                    delta: if i % 2 == 0 { dt } else { ds },
                    limit: None,
                    ttl: c.op.ttl,
                },
            })
            .collect();
        let store = self.inner.store.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = store.add(&counters, false).await {
                    tracing::warn!(error = %e, "budget correction not recorded");
                }
            });
        }
    }
}

impl Inner {
    /// Tokens and dollars of `used`, for the metrics.
    fn counted(&self, model: &str, used: Usage) -> (u64, f64) {
        (used.total(), self.prices.cost(model, used) as f64 / 1e6)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.settled {
            self.correct(Usage::default());
        }
    }
}

/// A budgeted request on its way: its reservation, and whether its stream
/// carries a usage chunk the client did not ask for.
pub struct Held {
    reservation: Reservation,
    api: ApiKind,
    strip: bool,
}

impl Budgets {
    /// The pipeline's budget stage: reserves the request's estimate and,
    /// for a chat stream whose client did not ask for usage, asks for it
    /// (the body returned is the one to forward). `None`: no budget work
    /// for this request.
    pub async fn admit(
        &self,
        who: &Identity,
        tier: Option<&str>,
        model: &str,
        api: ApiKind,
        stream: bool,
        body: Bytes,
    ) -> Result<(Option<Held>, Bytes), ApiError> {
        let Some(reservation) = self.reserve(who, tier, model, &body).await? else {
            return Ok((None, body));
        };
        let injected = (stream && api == ApiKind::ChatCompletions && !usage::asks_usage(&body))
            .then(|| usage::with_usage(&body))
            .flatten();
        let strip = injected.is_some();
        let body = injected.map_or(body, Bytes::from);
        Ok((
            Some(Held {
                reservation,
                api,
                strip,
            }),
            body,
        ))
    }
}

/// Charges an answer to its reservation: a completion at once, a stream
/// when it ends (without the usage chunk the client did not ask for). A
/// replayed answer costs nothing; a failed request is refunded (its
/// reservation dropped).
pub fn charge(held: Option<Held>, answer: Result<Answer, ApiError>) -> Result<Answer, ApiError> {
    let Some(held) = held else {
        return answer;
    };
    let mut answer = answer?;
    let Held {
        reservation,
        api,
        strip,
    } = held;
    let reservation = (!answer.replayed).then_some(reservation);
    answer.reply.body = match answer.reply.body {
        ReplyBody::Complete(body) => {
            if let Some(r) = reservation {
                r.settle(usage::of_body(api, &body));
            }
            ReplyBody::Complete(body)
        }
        ReplyBody::Stream(s) => ReplyBody::Stream(tap(s, api, strip, reservation)),
    };
    Ok(answer)
}
