//! Reads one ModelForwarder's metrics from Prometheus: QPS, error rate, P99,
//! in-flight requests and the upstream's own P99, restricted to pods that
//! exist and are being scraped. An unreachable Prometheus, an empty result,
//! NaN or stale series all mean "no data" (`None`), never zero.
//!
//! Series are selected by the labels the recommended scrape config maps
//! from pods (docs/operator.md): `namespace`, `pod`, and the pod label
//! `app.kubernetes.io/instance` as `app_kubernetes_io_instance`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use prometheus_http_query::response::Data;
use prometheus_http_query::Client;

use super::policy::Observed;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("prometheus query failed: {0}")]
    Query(#[from] prometheus_http_query::Error),
    #[error("prometheus answered an unexpected result type for {0}")]
    Shape(&'static str),
}

/// What to read for one resource.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// PromQL label matchers without braces.
    pub selector: String,
    /// Rate window; at least four scrape intervals.
    pub window: Duration,
    /// Pods that exist now (from the API server); `None` trusts Prometheus.
    pub live_pods: Option<BTreeSet<String>>,
    /// Series whose newest sample is older than this are ignored.
    pub max_age: Duration,
}

/// The default selector for a resource.
pub fn default_selector(namespace: &str, name: &str) -> String {
    format!(
        r#"namespace="{}",app_kubernetes_io_instance="{}""#,
        escape(namespace),
        escape(name)
    )
}

fn escape(v: &str) -> String {
    v.replace('\\', r"\\").replace('"', "\\\"")
}

fn secs(d: Duration) -> String {
    format!("{}s", d.as_secs().max(1))
}

/// The per-pod queries (pure, so their text is tested).
pub fn per_pod_queries(t: &Target) -> [(&'static str, String); 4] {
    let (sel, w) = (&t.selector, secs(t.window));
    [
        (
            "freshness",
            format!("max by (pod) (timestamp(forwarder_inflight_requests{{{sel}}}))"),
        ),
        (
            "qps",
            format!("sum by (pod) (rate(forwarder_requests_total{{{sel}}}[{w}]))"),
        ),
        (
            "errors",
            format!(r#"sum by (pod) (rate(forwarder_requests_total{{{sel},code=~"5.."}}[{w}]))"#),
        ),
        (
            "inflight",
            format!("sum by (pod) (forwarder_inflight_requests{{{sel}}})"),
        ),
    ]
}

/// P99 of a duration histogram over the given pods only.
pub fn p99_query(t: &Target, histogram: &str, pods: &BTreeSet<String>) -> String {
    let names: Vec<String> = pods.iter().map(|p| regex_escape(p)).collect();
    format!(
        r#"histogram_quantile(0.99, sum by (le) (rate({histogram}_bucket{{{},pod=~"{}"}}[{}])))"#,
        t.selector,
        names.join("|"),
        secs(t.window)
    )
}

fn regex_escape(v: &str) -> String {
    v.chars()
        .flat_map(|c| {
            let special = ".+*?()|[]{}^$\\".contains(c);
            special
                .then_some('\\')
                .into_iter()
                .chain(std::iter::once(c))
        })
        .collect::<String>()
        .replace('"', "\\\"")
}

/// Per-pod values of an instant vector.
async fn per_pod(
    client: &Client,
    what: &'static str,
    q: &str,
) -> Result<BTreeMap<String, f64>, MetricsError> {
    let result = client.query(q).get().await?;
    match result.data() {
        Data::Vector(v) => Ok(v
            .iter()
            .filter_map(|s| {
                let pod = s.metric().get("pod")?.clone();
                let value = s.sample().value();
                value.is_finite().then_some((pod, value))
            })
            .collect()),
        _ => Err(MetricsError::Shape(what)),
    }
}

/// A single value; empty or NaN is `None`.
async fn scalar(client: &Client, what: &'static str, q: &str) -> Result<Option<f64>, MetricsError> {
    let result = client.query(q).get().await?;
    match result.data() {
        Data::Vector(v) => Ok(v
            .first()
            .map(|s| s.sample().value())
            .filter(|x| x.is_finite())),
        Data::Scalar(s) => Ok(Some(s.value()).filter(|x| x.is_finite())),
        _ => Err(MetricsError::Shape(what)),
    }
}

/// Reads everything the policy needs; `now_unix` is the caller's clock.
pub async fn read(client: &Client, t: &Target, now_unix: f64) -> Result<Observed, MetricsError> {
    let [fresh_q, qps_q, err_q, inflight_q] = per_pod_queries(t);
    let fresh = per_pod(client, fresh_q.0, &fresh_q.1).await?;
    let usable: BTreeSet<String> = fresh
        .into_iter()
        .filter(|(_, ts)| now_unix - ts <= t.max_age.as_secs_f64())
        .map(|(pod, _)| pod)
        .filter(|pod| t.live_pods.as_ref().is_none_or(|live| live.contains(pod)))
        .collect();
    if usable.is_empty() {
        return Ok(Observed::default());
    }
    let sum = |m: &BTreeMap<String, f64>| -> (Option<f64>, u32) {
        let vals: Vec<f64> = m
            .iter()
            .filter(|(p, _)| usable.contains(*p))
            .map(|(_, v)| *v)
            .collect();
        let n = vals.len() as u32;
        ((n > 0).then(|| vals.iter().sum()), n)
    };
    let (qps, reporting) = sum(&per_pod(client, qps_q.0, &qps_q.1).await?);
    let (errors, _) = sum(&per_pod(client, err_q.0, &err_q.1).await?);
    let (inflight, _) = sum(&per_pod(client, inflight_q.0, &inflight_q.1).await?);
    let error_rate = qps.map(|q| {
        if q > 0.0 {
            errors.unwrap_or(0.0) / q
        } else {
            0.0
        }
    });
    let p99 = scalar(
        client,
        "p99",
        &p99_query(t, "forwarder_request_duration_seconds", &usable),
    )
    .await?;
    let upstream = scalar(
        client,
        "upstream p99",
        &p99_query(t, "forwarder_upstream_duration_seconds", &usable),
    )
    .await?;
    Ok(Observed {
        qps,
        p99_ms: p99.map(|s| s * 1000.0),
        error_rate,
        inflight,
        upstream_p99_ms: upstream.map(|s| s * 1000.0),
        reporting,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target {
            selector: default_selector("ai", "support-bot"),
            window: Duration::from_secs(60),
            live_pods: None,
            max_age: Duration::from_secs(45),
        }
    }

    #[test]
    fn queries_select_by_namespace_and_instance() {
        let q = per_pod_queries(&target());
        assert_eq!(
            q[1].1,
            r#"sum by (pod) (rate(forwarder_requests_total{namespace="ai",app_kubernetes_io_instance="support-bot"}[60s]))"#
        );
        assert!(q[2].1.contains(r#"code=~"5..""#));
        let pods: BTreeSet<String> = ["bot-7d9f-a".to_string(), "bot-7d9f-b".to_string()].into();
        assert_eq!(
            p99_query(&target(), "forwarder_request_duration_seconds", &pods),
            r#"histogram_quantile(0.99, sum by (le) (rate(forwarder_request_duration_seconds_bucket{namespace="ai",app_kubernetes_io_instance="support-bot",pod=~"bot-7d9f-a|bot-7d9f-b"}[60s])))"#
        );
    }

    #[test]
    fn label_values_cannot_break_out_of_the_query() {
        assert_eq!(
            default_selector("a\"b", "c"),
            r#"namespace="a\"b",app_kubernetes_io_instance="c""#
        );
        assert_eq!(regex_escape("a.b"), r"a\.b");
    }
}
