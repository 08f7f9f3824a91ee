//! `spec.budgets` → the forwarder's `budgets`, checked first so a mistake
//! names the spec's field (the schema refuses most of them already; these
//! checks also hold for what it cannot say, such as a tier that
//! `spec.rateLimits` does not define).

use forwarder_config::{BudgetsConfig, FailurePolicy};

use super::aliases::served_models;
use super::config::Problem;
use crate::crd::{BudgetLimits, FailurePolicy as Policy, ModelForwarderSpec};

/// Condition reason of a budget the forwarder could not enforce.
pub const INVALID_BUDGET: &str = "InvalidBudget";

/// Largest daily or monthly spend, in US dollars (the forwarder's bound).
const MAX_SPEND: f64 = 1e9;
/// Largest price per million tokens, in US dollars (the forwarder's bound).
const MAX_PRICE: f64 = 1e6;

fn limits_problems(at: &str, l: &BudgetLimits, out: &mut Vec<Problem>) {
    let mut bad = |field: String, why: &str| {
        out.push(Problem::new(INVALID_BUDGET, format!("{field}: {why}")));
    };
    if l.daily_tokens.is_none()
        && l.monthly_tokens.is_none()
        && l.daily_spend.is_none()
        && l.monthly_spend.is_none()
    {
        bad(at.to_string(), "sets no limit");
    }
    for (f, v) in [
        ("dailyTokens", l.daily_tokens),
        ("monthlyTokens", l.monthly_tokens),
    ] {
        if v.is_some_and(|v| v < 1) {
            bad(format!("{at}.{f}"), "must be at least 1 token");
        }
    }
    for (f, v) in [
        ("dailySpend", l.daily_spend),
        ("monthlySpend", l.monthly_spend),
    ] {
        if v.is_some_and(|v| !(v.is_finite() && v > 0.0 && v < MAX_SPEND)) {
            bad(
                format!("{at}.{f}"),
                "must be a positive number of US dollars below 1e9",
            );
        }
    }
}

/// Every reason `spec.budgets` cannot work, naming the spec's fields.
pub fn validate(spec: &ModelForwarderSpec) -> Vec<Problem> {
    let Some(b) = &spec.budgets else {
        return Vec::new();
    };
    let mut problems = Vec::new();
    if let Some(d) = &b.default {
        limits_problems("spec.budgets.default", d, &mut problems);
    }
    let tiers = spec.rate_limits.as_ref().map(|r| &r.tiers);
    for (name, l) in &b.tiers {
        let at = format!("spec.budgets.tiers.{name}");
        if !tiers.is_some_and(|t| t.contains_key(name)) {
            problems.push(Problem::new(
                INVALID_BUDGET,
                format!("{at}: names a tier not in spec.rateLimits.tiers"),
            ));
        }
        limits_problems(&at, l, &mut problems);
    }
    for (client, l) in &b.clients {
        let at = format!("spec.budgets.clients.{client}");
        if client.is_empty() {
            problems.push(Problem::new(INVALID_BUDGET, format!("{at}: empty client")));
        }
        limits_problems(&at, l, &mut problems);
    }
    let served = served_models(spec);
    for (model, p) in &b.prices {
        let at = format!("spec.budgets.prices.{model}");
        if !served.contains(model.as_str()) && !spec.models.contains_key(model) {
            problems.push(Problem::new(
                INVALID_BUDGET,
                format!("{at}: names no model of spec.upstreams nor alias of spec.models"),
            ));
        }
        if ![p.input, p.output]
            .iter()
            .all(|v| v.is_finite() && *v >= 0.0 && *v <= MAX_PRICE)
        {
            problems.push(Problem::new(
                INVALID_BUDGET,
                format!("{at}: prices are US dollars per million tokens, 0 to 1e6"),
            ));
        }
    }
    problems
}

fn limits(l: &BudgetLimits) -> forwarder_config::BudgetLimits {
    // Validated: token limits are at least 1, so they fit a u64.
    let tokens = |v: Option<i64>| v.and_then(|v| u64::try_from(v).ok());
    forwarder_config::BudgetLimits {
        daily_tokens: tokens(l.daily_tokens),
        monthly_tokens: tokens(l.monthly_tokens),
        daily_spend: l.daily_spend,
        monthly_spend: l.monthly_spend,
    }
}

/// The forwarder's budgets (`None` without `spec.budgets`), or every
/// reason they cannot work.
pub fn render(spec: &ModelForwarderSpec) -> Result<Option<BudgetsConfig>, Vec<Problem>> {
    let problems = validate(spec);
    if !problems.is_empty() {
        return Err(problems);
    }
    let Some(b) = &spec.budgets else {
        return Ok(None);
    };
    let map = |m: &std::collections::BTreeMap<String, BudgetLimits>| {
        m.iter().map(|(k, l)| (k.clone(), limits(l))).collect()
    };
    Ok(Some(BudgetsConfig {
        default: b.default.as_ref().map(limits),
        tiers: map(&b.tiers),
        clients: map(&b.clients),
        prices: b
            .prices
            .iter()
            .map(|(model, p)| {
                let price = forwarder_config::ModelPrice {
                    input: p.input,
                    output: p.output,
                };
                (model.clone(), price)
            })
            .collect(),
        on_store_error: match b.on_store_error {
            Policy::FailOpen => FailurePolicy::FailOpen,
            Policy::FailClosed => FailurePolicy::FailClosed,
        },
        metric_clients: b.metric_clients as usize,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::config::tests::spec;

    fn with_budgets(budgets: serde_json::Value) -> ModelForwarderSpec {
        let mut s = spec();
        s.rate_limits = serde_json::from_value(serde_json::json!({
            "requestsPerSecond": 5,
            "tiers": {"gold": {"requestsPerSecond": 50}}
        }))
        .expect("rate limits");
        s.models = serde_json::from_value(serde_json::json!({
            "fast": {"targets": [{"model": "qwen-max"}]}
        }))
        .expect("models");
        s.budgets = Some(serde_json::from_value(budgets).expect("budgets"));
        s
    }

    #[test]
    fn renders_every_field_unchanged_in_meaning() {
        let s = with_budgets(serde_json::json!({
            "default": {"dailyTokens": 200000},
            "tiers": {"gold": {"dailyTokens": 5000000, "monthlySpend": 300}},
            "clients": {"key:analytics": {"monthlyTokens": 20000000, "dailySpend": 25.5}},
            "prices": {"qwen-max": {"input": 0.4, "output": 1.2}, "fast": {"output": 2}},
            "onStoreError": "FailClosed",
            "metricClients": 7
        }));
        let b = render(&s).expect("renders").expect("budgets");
        let want = |dt, mt, ds, ms| forwarder_config::BudgetLimits {
            daily_tokens: dt,
            monthly_tokens: mt,
            daily_spend: ds,
            monthly_spend: ms,
        };
        assert_eq!(b.default, Some(want(Some(200000), None, None, None)));
        assert_eq!(
            b.tiers["gold"],
            want(Some(5000000), None, None, Some(300.0))
        );
        assert_eq!(
            b.clients["key:analytics"],
            want(None, Some(20000000), Some(25.5), None)
        );
        assert_eq!(
            (b.prices["qwen-max"].input, b.prices["qwen-max"].output),
            (0.4, 1.2)
        );
        assert_eq!(
            (b.prices["fast"].input, b.prices["fast"].output),
            (0.0, 2.0)
        );
        assert_eq!(b.on_store_error, FailurePolicy::FailClosed);
        assert_eq!(b.metric_clients, 7);
        // Defaults: fail open, 50 metric clients, as the forwarder's.
        let s = with_budgets(serde_json::json!({"default": {"dailyTokens": 1}}));
        let b = render(&s).expect("renders").expect("budgets");
        assert_eq!(b.on_store_error, FailurePolicy::FailOpen);
        assert_eq!(b.metric_clients, 50);
        // Absent: no budgets section at all.
        assert_eq!(render(&spec()).expect("renders"), None);
    }

    #[test]
    fn zero_negative_and_empty_limits_are_refused_naming_the_field() {
        for (budgets, want) in [
            (
                serde_json::json!({"default": {"dailyTokens": 0}}),
                "spec.budgets.default.dailyTokens: must be at least 1 token",
            ),
            (
                serde_json::json!({"clients": {"bob": {"monthlyTokens": -5}}}),
                "spec.budgets.clients.bob.monthlyTokens: must be at least 1 token",
            ),
            (
                serde_json::json!({"tiers": {"gold": {"dailySpend": -1.0}}}),
                "spec.budgets.tiers.gold.dailySpend: must be a positive number",
            ),
            (
                serde_json::json!({"default": {"monthlySpend": 0.0}}),
                "spec.budgets.default.monthlySpend: must be a positive number",
            ),
            (
                serde_json::json!({"default": {"monthlySpend": 2e9}}),
                "spec.budgets.default.monthlySpend: must be a positive number",
            ),
            (
                serde_json::json!({"clients": {"bob": {}}}),
                "spec.budgets.clients.bob: sets no limit",
            ),
            (
                serde_json::json!({"tiers": {"silver": {"dailyTokens": 10}}}),
                "spec.budgets.tiers.silver: names a tier not in spec.rateLimits.tiers",
            ),
            (
                serde_json::json!({"prices": {"gpt-5": {"input": 1.0}}}),
                "spec.budgets.prices.gpt-5: names no model",
            ),
            (
                serde_json::json!({"prices": {"mock": {"input": -1.0}}}),
                "spec.budgets.prices.mock: prices are US dollars per million tokens",
            ),
        ] {
            let problems = render(&with_budgets(budgets)).unwrap_err();
            assert!(
                problems
                    .iter()
                    .any(|p| p.reason == INVALID_BUDGET && p.message.starts_with(want)),
                "{want}: {problems:?}"
            );
        }
    }
}
