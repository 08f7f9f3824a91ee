//! A request's charge between admission and answer: settled to what the
//! upstream reported, or refunded when dropped unsettled.

use std::sync::Arc;

use super::usage::Usage;
use super::Inner;
use crate::auth::Identity;
use crate::store::{Counter, CounterOp};

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
    pub(super) fn new(
        inner: Arc<Inner>,
        who: Identity,
        model: &str,
        keys: Vec<Counter>,
        charged: Usage,
    ) -> Self {
        Self {
            inner,
            who,
            model: model.to_string(),
            keys,
            charged,
            settled: false,
        }
    }

    /// Charges what the answer used (`None`: the answer did not say, and
    /// the estimate stands).
    pub fn settle(mut self, used: Option<Usage>) {
        self.settled = true;
        let used = used.unwrap_or(self.charged);
        let (tokens, dollars) = self.inner.counted(&self.model, used);
        self.inner.metrics.charged(&self.who, tokens, dollars);
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
