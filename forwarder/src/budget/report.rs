//! `GET /v1/budget`: the caller's own usage and limits, per period.

use serde::Serialize;

use super::limits::{micros_to_dollars, Limits, Unit};
use super::period::{Period, Span};
use crate::auth::Identity;
use crate::store::StoreKey;

#[derive(Debug, Serialize)]
pub struct Report {
    pub object: &'static str,
    /// The caller, as the forwarder names it (`key:…`, `jwt:…`, `cert:…`).
    pub client: String,
    pub tier: Option<String>,
    /// Whether the caller has a budget at all.
    pub limited: bool,
    pub daily: PeriodReport,
    pub monthly: PeriodReport,
}

#[derive(Debug, Serialize)]
pub struct PeriodReport {
    /// `2026-12-07`, `2026-12`.
    pub period: String,
    pub resets_at: String,
    pub tokens: Figure<u64>,
    pub spend_usd: Figure<f64>,
}

#[derive(Debug, Serialize)]
pub struct Figure<T> {
    pub used: T,
    /// `null`: unlimited.
    pub limit: Option<T>,
}

impl Report {
    pub fn new(
        who: &Identity,
        tier: Option<&str>,
        limits: Option<&Limits>,
        slots: &[(Period, Unit, StoreKey)],
        values: &[i64],
    ) -> Self {
        let period = |span: Span| {
            let find = |unit: Unit| {
                slots
                    .iter()
                    .zip(values)
                    .find(|((p, u, _), _)| p.span == span && *u == unit)
                    .map(|((p, _, _), v)| (p.clone(), *v))
            };
            let (p, tokens) = find(Unit::Tokens).unwrap_or_else(|| (Period::at(span, 0), 0));
            let spend = find(Unit::Spend).map_or(0, |(_, v)| v);
            let limit = |unit| limits.and_then(|l| l.get(span, unit));
            PeriodReport {
                period: p
                    .name
                    .split_once(':')
                    .map_or(p.name.clone(), |(_, d)| d.to_string()),
                resets_at: p.ends_rfc3339(),
                tokens: Figure {
                    used: u64::try_from(tokens).unwrap_or(0),
                    limit: limit(Unit::Tokens).map(|v| u64::try_from(v).unwrap_or(0)),
                },
                spend_usd: Figure {
                    used: micros_to_dollars(spend.max(0)),
                    limit: limit(Unit::Spend).map(micros_to_dollars),
                },
            }
        };
        Self {
            object: "budget",
            client: who.0.clone(),
            tier: tier.map(str::to_string),
            limited: limits.is_some(),
            daily: period(Span::Day),
            monthly: period(Span::Month),
        }
    }
}
