//! Which limits a client has and what a request costs. Pure.

use std::collections::HashMap;

use forwarder_config::{BudgetLimits, BudgetsConfig, ModelPrice};

use super::period::Span;
use super::usage::Usage;
use crate::auth::Identity;

/// What a budget counts: tokens, or spend in micro-dollars.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Tokens,
    Spend,
}

impl Unit {
    pub const ALL: [Unit; 2] = [Unit::Tokens, Unit::Spend];

    pub fn label(self) -> &'static str {
        match self {
            Self::Tokens => "tokens",
            Self::Spend => "spend",
        }
    }

    /// As the refusal names it: `daily token budget`, `monthly spend budget`.
    pub fn noun(self) -> &'static str {
        match self {
            Self::Tokens => "token",
            Self::Spend => "spend",
        }
    }

    /// A counter's value as the client reads it.
    pub fn show(self, v: i64) -> String {
        match self {
            Self::Tokens => format!("{v} tokens"),
            Self::Spend => format!("${:.6}", micros_to_dollars(v)),
        }
    }
}

pub fn micros_to_dollars(v: i64) -> f64 {
    v as f64 / 1e6
}

fn dollars_to_micros(d: f64) -> i64 {
    (d * 1e6).round() as i64
}

/// A client's limits: tokens and micro-dollars per day and month.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    day: [Option<i64>; 2],
    month: [Option<i64>; 2],
}

impl Limits {
    fn from_config(l: &BudgetLimits) -> Self {
        let tokens = |t: Option<u64>| t.map(|t| i64::try_from(t).unwrap_or(i64::MAX));
        Self {
            day: [tokens(l.daily_tokens), l.daily_spend.map(dollars_to_micros)],
            month: [
                tokens(l.monthly_tokens),
                l.monthly_spend.map(dollars_to_micros),
            ],
        }
    }

    /// The client's own limits (by identity, or by API key name for a
    /// bare name), else its tier's, else the default; `None`: no budget.
    pub fn for_client(cfg: &BudgetsConfig, who: &Identity, tier: Option<&str>) -> Option<Self> {
        cfg.clients
            .get(&who.0)
            .or_else(|| who.key_name().and_then(|n| cfg.clients.get(n)))
            .or_else(|| tier.and_then(|t| cfg.tiers.get(t)))
            .or(cfg.default.as_ref())
            .map(Self::from_config)
    }

    pub fn get(&self, span: Span, unit: Unit) -> Option<i64> {
        let row = match span {
            Span::Day => &self.day,
            Span::Month => &self.month,
        };
        row[unit as usize]
    }
}

/// Prices per model in micro-dollars per token (a dollar price per
/// million tokens is the same number).
pub struct Prices(HashMap<String, (f64, f64)>);

impl Prices {
    pub fn new(cfg: &std::collections::BTreeMap<String, ModelPrice>) -> Self {
        Self(
            cfg.iter()
                .map(|(m, p)| (m.clone(), (p.input, p.output)))
                .collect(),
        )
    }

    /// What `used` costs on `model`, in micro-dollars, rounded up; 0 for a
    /// model without a price.
    pub fn cost(&self, model: &str, used: Usage) -> i64 {
        let Some((i, o)) = self.0.get(model) else {
            return 0;
        };
        (used.input as f64 * i + used.output as f64 * o).ceil() as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BudgetsConfig {
        serde_yaml::from_str(
            r#"
default: {daily_tokens: 100}
tiers: {gold: {daily_tokens: 1000, monthly_spend: 2.5}}
clients: {alice: {monthly_tokens: 7}, "jwt:iss:bob": {daily_spend: 0.5}}
prices: {m: {input: 1.0, output: 3.0}}
"#,
        )
        .unwrap()
    }

    #[test]
    fn a_clients_own_limits_win_over_its_tier_and_the_default() {
        let c = cfg();
        let id = |s: &str| Identity(s.into());
        let alice = Limits::for_client(&c, &id("key:alice"), Some("gold")).unwrap();
        assert_eq!(alice.get(Span::Month, Unit::Tokens), Some(7));
        assert_eq!(alice.get(Span::Day, Unit::Tokens), None);
        // A token's subject "alice" is not the API key alice.
        let jwt_alice = Limits::for_client(&c, &id("jwt:iss:alice"), None).unwrap();
        assert_eq!(jwt_alice.get(Span::Day, Unit::Tokens), Some(100));
        let bob = Limits::for_client(&c, &id("jwt:iss:bob"), None).unwrap();
        assert_eq!(bob.get(Span::Day, Unit::Spend), Some(500_000));
        let gold = Limits::for_client(&c, &id("key:carol"), Some("gold")).unwrap();
        assert_eq!(gold.get(Span::Month, Unit::Spend), Some(2_500_000));
        let none = BudgetsConfig { default: None, ..c };
        assert_eq!(Limits::for_client(&none, &id("key:dave"), None), None);
    }

    #[test]
    fn costs_are_micro_dollars_rounded_up() {
        let p = Prices::new(&cfg().prices);
        assert_eq!(
            p.cost(
                "m",
                Usage {
                    input: 10,
                    output: 2
                }
            ),
            16
        );
        assert_eq!(
            p.cost(
                "unpriced",
                Usage {
                    input: 10,
                    output: 2
                }
            ),
            0
        );
        assert_eq!(Unit::Spend.show(1_500_000), "$1.500000");
    }
}
