//! `spec.budgets`: per-client token and spend budgets over the UTC day and
//! month, rendered into the forwarder's `budgets` section.

use std::collections::BTreeMap;

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::FailurePolicy;

/// Per-client budgets (`spec.budgets`); the field's own comment in
/// `ModelForwarderSpec` is what `kubectl explain` shows.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BudgetsSpec {
    /// Limits for every client without limits of its own or of its tier;
    /// absent: such clients have no budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<BudgetLimits>,
    /// Limits per rate-limit tier (the tier in force for the client); each
    /// name must be a tier of `spec.rateLimits.tiers`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub tiers: BTreeMap<String, BudgetLimits>,
    /// Limits per client identity (`key:<name>`, `jwt:<issuer>:<sub>`,
    /// `cert:<CN>`; a bare name is the API key of that name). Win over the
    /// tier's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 10000))]
    pub clients: BTreeMap<String, BudgetLimits>,
    /// Prices in US dollars per million tokens, per served model or alias
    /// (`spec.models`). A model without a price spends nothing (its tokens
    /// still count).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 256))]
    pub prices: BTreeMap<String, ModelPrice>,
    /// When the store fails: `FailOpen` admits the request uncounted,
    /// `FailClosed` answers 503.
    #[serde(default)]
    pub on_store_error: FailurePolicy,
    /// Clients with series of their own in the budget metrics: those each
    /// replica charged the most tokens lately; the rest are counted under
    /// `client="other"`.
    #[serde(default = "default_metric_clients")]
    #[schemars(range(min = 0, max = 10000))]
    pub metric_clients: u32,
}

fn default_metric_clients() -> u32 {
    50
}

/// Limits over the UTC day and month; a field left out is unlimited, and
/// at least one must be set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("has(self.dailyTokens) || has(self.monthlyTokens) || has(self.dailySpend) || has(self.monthlySpend)").message("a budget must set at least one of dailyTokens, monthlyTokens, dailySpend, monthlySpend"))]
pub struct BudgetLimits {
    /// Tokens (input and output) per UTC day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub daily_tokens: Option<i64>,
    /// Tokens (input and output) per UTC month.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub monthly_tokens: Option<i64>,
    /// US dollars per UTC day, at `prices`; above 0, below 1e9.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1e9), extend("exclusiveMinimum" = true, "exclusiveMaximum" = true))]
    pub daily_spend: Option<f64>,
    /// US dollars per UTC month, at `prices`; above 0, below 1e9.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1e9), extend("exclusiveMinimum" = true, "exclusiveMaximum" = true))]
    pub monthly_spend: Option<f64>,
}

/// A model's price, in US dollars per million tokens.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ModelPrice {
    /// Per million input tokens (Anthropic's cache tokens count as input).
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 1e6))]
    pub input: f64,
    /// Per million output tokens.
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 1e6))]
    pub output: f64,
}
