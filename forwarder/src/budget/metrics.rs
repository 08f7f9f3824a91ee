//! Budget series per client, bounded: the `cap` clients charged the most
//! tokens lately (see [`TopClients`]) get a `client` label of their own,
//! every other one is counted under `client="other"`, so a flood of
//! identities (JWT subjects) cannot grow the series without bound. A
//! client that loses its place has its series folded into `other`, so the
//! sum over clients never goes back.

use std::time::{Duration, Instant};

use parking_lot::Mutex;
use prometheus::{CounterVec, IntCounterVec, Opts};

use super::limits::Unit;
use super::period::Span;
use super::top_clients::TopClients;
use crate::auth::Identity;
use crate::telemetry::Metrics;

pub const OTHER: &str = "other";

/// How often the ranking's counts are halved.
const HALF_LIFE: Duration = Duration::from_secs(3600);

pub struct BudgetMetrics {
    tokens: IntCounterVec,
    spend: CounterVec,
    refusals: IntCounterVec,
    /// Held while a series is counted, so a demotion cannot race a count.
    ranking: Mutex<Ranking>,
}

struct Ranking {
    top: TopClients,
    decayed: Instant,
}

/// A budget's name in messages and in the `budget` label: `daily token`.
pub fn budget_name(span: Span, unit: Unit) -> String {
    format!("{} {}", span.label(), unit.noun())
}

impl BudgetMetrics {
    pub fn new(metrics: &Metrics, cap: usize) -> Self {
        let m = Self::unregistered(cap);
        for c in [
            Box::new(m.tokens.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.spend.clone()),
            Box::new(m.refusals.clone()),
        ] {
            let _ = metrics.registry().register(c);
        }
        m
    }

    fn unregistered(cap: usize) -> Self {
        Self {
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
            ranking: Mutex::new(Ranking {
                top: TopClients::new(cap),
                decayed: Instant::now(),
            }),
        }
    }

    /// Counts what a request used under `who`'s label.
    pub fn charged(&self, who: &Identity, tokens: u64, dollars: f64) {
        let mut r = self.ranking.lock();
        let label = self.place(&mut r, who, tokens);
        self.tokens.with_label_values(&[label]).inc_by(tokens);
        self.spend.with_label_values(&[label]).inc_by(dollars);
    }

    /// Counts a refusal by `budget` under `who`'s label.
    pub fn refused(&self, who: &Identity, budget: &str) {
        let mut r = self.ranking.lock();
        let label = self.place(&mut r, who, 0);
        self.refusals.with_label_values(&[label, budget]).inc();
    }

    /// `who`'s label after charging it `tokens`, folding the series of a
    /// client it displaced into `other`.
    fn place<'a>(&self, r: &mut Ranking, who: &'a Identity, tokens: u64) -> &'a str {
        while r.decayed.elapsed() >= HALF_LIFE {
            r.top.decay();
            r.decayed += HALF_LIFE;
        }
        // A client literally named "other" cannot take a slot of its own.
        if who.0 == OTHER {
            return OTHER;
        }
        let p = r.top.charge(&who.0, tokens);
        if let Some(d) = p.demoted {
            self.fold(&d);
        }
        if p.named {
            &who.0
        } else {
            OTHER
        }
    }

    /// Moves `client`'s counts to `other` and drops its series. (A lookup
    /// creates a series that is absent; it is removed again at once.)
    fn fold(&self, client: &str) {
        if let Ok(c) = self.tokens.get_metric_with_label_values(&[client]) {
            self.tokens.with_label_values(&[OTHER]).inc_by(c.get());
            let _ = self.tokens.remove_label_values(&[client]);
        }
        if let Ok(c) = self.spend.get_metric_with_label_values(&[client]) {
            self.spend.with_label_values(&[OTHER]).inc_by(c.get());
            let _ = self.spend.remove_label_values(&[client]);
        }
        for span in Span::ALL {
            for unit in Unit::ALL {
                let budget = budget_name(span, unit);
                let labels = [client, budget.as_str()];
                if let Ok(c) = self.refusals.get_metric_with_label_values(&labels) {
                    let n = c.get();
                    let _ = self.refusals.remove_label_values(&labels);
                    if n > 0 {
                        self.refusals
                            .with_label_values(&[OTHER, budget.as_str()])
                            .inc_by(n);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Identity {
        Identity(s.into())
    }

    fn tokens(m: &BudgetMetrics) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = prometheus::core::Collector::collect(&m.tokens)
            .iter()
            .flat_map(|f| f.get_metric().iter())
            .map(|s| {
                (
                    s.get_label()[0].value().to_string(),
                    s.get_counter().get_value() as u64,
                )
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_displaced_client_is_folded_into_other_and_the_sum_holds() {
        let m = BudgetMetrics::unregistered(1);
        m.charged(&id("key:a"), 10, 0.1);
        m.refused(&id("key:a"), "daily token");
        m.charged(&id("key:b"), 8, 0.0);
        assert_eq!(tokens(&m), [("key:a".into(), 10), (OTHER.into(), 8)]);
        // b, certainly past a's 10, takes a's series; a's 10 move to other.
        m.charged(&id("key:b"), 5, 0.0);
        assert_eq!(tokens(&m), [("key:b".into(), 5), (OTHER.into(), 18)]);
        assert_eq!(
            m.refusals.with_label_values(&[OTHER, "daily token"]).get(),
            1
        );
        assert!((m.spend.with_label_values(&[OTHER]).get() - 0.1).abs() < 1e-12);
        // A client literally named "other" never takes a slot.
        m.charged(&id(OTHER), 1_000, 0.0);
        assert_eq!(tokens(&m), [("key:b".into(), 5), (OTHER.into(), 1_018)]);
    }
}
