//! Budget series per client, bounded: the first `cap` clients seen by this
//! process get a `client` label of their own, every later one is counted
//! under `client="other"`, so a flood of identities (JWT subjects) cannot
//! grow the series without bound.

use std::collections::HashSet;

use parking_lot::Mutex;
use prometheus::{CounterVec, IntCounterVec, Opts};

use crate::auth::Identity;
use crate::telemetry::Metrics;

pub const OTHER: &str = "other";

pub struct BudgetMetrics {
    pub tokens: IntCounterVec,
    pub spend: CounterVec,
    pub refusals: IntCounterVec,
    labels: Labels,
}

/// Which clients have series of their own.
pub struct Labels {
    cap: usize,
    named: Mutex<HashSet<String>>,
}

impl Labels {
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            named: Mutex::default(),
        }
    }

    /// `who`'s label: its identity while fewer than `cap` have one.
    pub fn of(&self, who: &Identity) -> String {
        let mut named = self.named.lock();
        if named.contains(&who.0) {
            return who.0.clone();
        }
        if named.len() < self.cap && who.0 != OTHER {
            named.insert(who.0.clone());
            return who.0.clone();
        }
        OTHER.to_string()
    }
}

impl BudgetMetrics {
    pub fn new(metrics: &Metrics, cap: usize) -> Self {
        let m = Self {
            tokens: IntCounterVec::new(
                Opts::new(
                    "forwarder_budget_tokens_total",
                    "Tokens charged to client budgets (as the upstream reported them)",
                ),
                &["client"],
            )
            .expect("valid metric"),
            spend: CounterVec::new(
                Opts::new(
                    "forwarder_budget_spend_dollars_total",
                    "US dollars charged to client budgets at the configured prices",
                ),
                &["client"],
            )
            .expect("valid metric"),
            refusals: IntCounterVec::new(
                Opts::new(
                    "forwarder_budget_refusals_total",
                    "Requests refused because a budget was spent, by budget",
                ),
                &["client", "budget"],
            )
            .expect("valid metric"),
            labels: Labels::new(cap),
        };
        for c in [
            Box::new(m.tokens.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.spend.clone()),
            Box::new(m.refusals.clone()),
        ] {
            let _ = metrics.registry().register(c);
        }
        m
    }

    pub fn label(&self, who: &Identity) -> String {
        self.labels.of(who)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_past_the_cap_share_the_other_series() {
        let l = Labels::new(2);
        let id = |s: &str| Identity(s.into());
        assert_eq!(l.of(&id("key:a")), "key:a");
        assert_eq!(l.of(&id("key:b")), "key:b");
        assert_eq!(l.of(&id("key:c")), OTHER);
        assert_eq!(l.of(&id("key:a")), "key:a");
        // A client literally named "other" cannot take a slot of its own.
        assert_eq!(Labels::new(5).of(&id(OTHER)), OTHER);
    }
}
