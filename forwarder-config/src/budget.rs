//! Per-client budgets over a day and a month (`budgets`), in tokens and in
//! spend, with prices per model. Kept in the store (one budget across
//! every replica on Redis).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::FailurePolicy;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetsConfig {
    /// Limits for every client without limits of its own or of its tier;
    /// absent: such clients have no budget (and cost no store call).
    #[serde(default)]
    pub default: Option<BudgetLimits>,
    /// Limits per rate-limit tier (`rate_limit.tiers`, the tier in force).
    #[serde(default)]
    pub tiers: BTreeMap<String, BudgetLimits>,
    /// Limits per client identity (`key:<name>`, `jwt:<issuer>:<sub>`,
    /// `cert:<CN>`; a bare name is an API key's name). Wins over the tier.
    #[serde(default)]
    pub clients: BTreeMap<String, BudgetLimits>,
    /// Prices per served model (or alias), in US dollars per million
    /// tokens. A model without a price spends nothing.
    #[serde(default)]
    pub prices: BTreeMap<String, ModelPrice>,
    /// When the store fails: `fail_open` admits (uncounted), `fail_closed`
    /// answers 503 `store_unavailable`.
    #[serde(default = "fail_open")]
    pub on_store_error: FailurePolicy,
    /// Clients with series of their own in the budget metrics: those
    /// charged the most tokens lately; the rest are counted under
    /// `client="other"`.
    #[serde(default = "default_metric_clients")]
    pub metric_clients: usize,
}

/// Limits over the UTC day and month; an absent field is unlimited.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetLimits {
    #[serde(default)]
    pub daily_tokens: Option<u64>,
    #[serde(default)]
    pub monthly_tokens: Option<u64>,
    /// US dollars.
    #[serde(default)]
    pub daily_spend: Option<f64>,
    #[serde(default)]
    pub monthly_spend: Option<f64>,
}

impl BudgetLimits {
    pub fn is_empty(&self) -> bool {
        self.daily_tokens.is_none()
            && self.monthly_tokens.is_none()
            && self.daily_spend.is_none()
            && self.monthly_spend.is_none()
    }
}

/// US dollars per million tokens.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    #[serde(default)]
    pub input: f64,
    #[serde(default)]
    pub output: f64,
}

fn fail_open() -> FailurePolicy {
    FailurePolicy::FailOpen
}

fn default_metric_clients() -> usize {
    50
}
