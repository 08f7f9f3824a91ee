//! Reads one ModelForwarder's metrics from Prometheus: QPS, error rate, the
//! P99s of request duration, of the forwarder's own time and of time to
//! first token, in-flight requests and the upstream's P99, restricted to
//! pods that exist and are being scraped. An unreachable (or hung)
//! Prometheus, an empty result or stale series mean "no data" (`None`),
//! never zero; a NaN P99 from fresh series at zero traffic is "no samples"
//! and the policy tells the two apart by the request count.
//!
//! With a queue SLO it also reads the async queue: the backlog
//! (`forwarder_queue_depth`), runs entering the queue and jobs finished
//! (`forwarder_jobs_total`), and the mean run time
//! (`forwarder_job_run_seconds`).
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
    #[error("prometheus did not answer the {0} query within {1:?}")]
    Timeout(&'static str, Duration),
    #[error(transparent)]
    Selector(#[from] SelectorError),
}

impl MetricsError {
    /// A condition reason for it.
    pub fn reason(&self) -> &'static str {
        match self {
            MetricsError::Query(_) => "QueryFailed",
            MetricsError::Shape(_) => "UnexpectedResult",
            MetricsError::Timeout(..) => "QueryTimeout",
            MetricsError::Selector(_) => "InvalidSelector",
        }
    }
}

/// `spec.scaling.metricsSelector` that is not a list of label matchers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(r#"invalid spec.scaling.metricsSelector at character {at}: {what}; expected label matchers such as job="llm",pod=~"bot-.*" (operators =, !=, =~, !~; double-quoted values)"#)]
pub struct SelectorError {
    pub at: usize,
    pub what: &'static str,
}

/// Checks a selector is label matchers only (`name op "value"`, comma
/// separated) and returns it normalised, so nothing else can be spliced
/// into a query. The CRD's CEL rule says the same; this also covers
/// objects stored before the rule existed.
pub fn validate_selector(s: &str) -> Result<String, SelectorError> {
    let b: Vec<char> = s.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    let skip = |i: &mut usize| {
        while *i < b.len() && b[*i].is_whitespace() {
            *i += 1;
        }
    };
    let fail = |at, what| Err(SelectorError { at, what });
    loop {
        skip(&mut i);
        if i == b.len() && !out.is_empty() {
            break;
        }
        let start = i;
        if i < b.len() && (b[i].is_ascii_alphabetic() || b[i] == '_') {
            i += 1;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == '_') {
                i += 1;
            }
        } else {
            return fail(i, "a label name must start here");
        }
        let name: String = b[start..i].iter().collect();
        skip(&mut i);
        let op = match (b.get(i), b.get(i + 1)) {
            (Some('='), Some('~')) => "=~",
            (Some('!'), Some('~')) => "!~",
            (Some('!'), Some('=')) => "!=",
            (Some('='), _) => "=",
            _ => return fail(i, "expected =, !=, =~ or !~"),
        };
        i += op.len();
        skip(&mut i);
        if b.get(i) != Some(&'"') {
            return fail(i, "the value must be a double-quoted string");
        }
        let vstart = i;
        i += 1;
        loop {
            match b.get(i) {
                None | Some('\n') => return fail(vstart, "unterminated string"),
                Some('\\') if b.get(i + 1).is_some_and(|c| *c != '\n') => i += 2,
                Some('\\') => return fail(i, "a backslash must escape a character"),
                Some('"') => break,
                Some(_) => i += 1,
            }
        }
        i += 1;
        let value: String = b[vstart..i].iter().collect();
        out.push(format!("{name}{op}{value}"));
        skip(&mut i);
        match b.get(i) {
            None => break,
            Some(',') => i += 1,
            Some(_) => return fail(i, "expected a comma between matchers"),
        }
    }
    Ok(out.join(","))
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
    /// Read the async queue too (the resource has a queue SLO).
    pub queue: bool,
}

/// The histograms whose P99 is read, by what they are called in errors.
pub const P99_HISTOGRAMS: [(&str, &str); 4] = [
    ("p99", "forwarder_request_duration_seconds"),
    ("own p99", "forwarder_own_duration_seconds"),
    ("ttft p99", "forwarder_time_to_first_token_seconds"),
    ("upstream p99", "forwarder_upstream_duration_seconds"),
];

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

/// The per-pod queries (pure, so their text is tested). Freshness is the
/// age of each pod's newest sample, computed by Prometheus against its own
/// clock: the operator's clock may differ.
pub fn per_pod_queries(t: &Target) -> [(&'static str, String); 5] {
    let (sel, w) = (&t.selector, secs(t.window));
    [
        (
            "freshness",
            format!("min by (pod) (time() - timestamp(forwarder_inflight_requests{{{sel}}}))"),
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
        (
            "streams",
            format!(
                "sum by (pod) (rate(forwarder_time_to_first_token_seconds_count{{{sel}}}[{w}]))"
            ),
        ),
    ]
}

/// The queue's per-pod queries (pure): backlog, runs entering the queue
/// (new jobs and retries: `queued` is counted for both) and jobs finished.
/// The backlog is a gauge: for Kafka each pod reports the lag of the
/// partitions assigned to it, so the sum is the group's lag.
pub fn queue_queries(t: &Target) -> [(&'static str, String); 3] {
    let (sel, w) = (&t.selector, secs(t.window));
    [
        (
            "backlog",
            format!("sum by (pod) (forwarder_queue_depth{{{sel}}})"),
        ),
        (
            "job arrivals",
            format!(r#"sum by (pod) (rate(forwarder_jobs_total{{{sel},state="queued"}}[{w}]))"#),
        ),
        (
            "jobs finished",
            format!(
                r#"sum by (pod) (rate(forwarder_jobs_total{{{sel},state=~"succeeded|failed"}}[{w}]))"#
            ),
        ),
    ]
}

/// Mean job run time over the given pods: NaN (no data) when no run ended
/// in the window.
pub fn job_run_query(t: &Target, pods: &BTreeSet<String>) -> String {
    let names: Vec<String> = pods.iter().map(|p| regex_escape(p)).collect();
    let (sel, w) = (&t.selector, secs(t.window));
    let pods = names.join("|");
    format!(
        r#"sum(rate(forwarder_job_run_seconds_sum{{{sel},pod=~"{pods}"}}[{w}])) / sum(rate(forwarder_job_run_seconds_count{{{sel},pod=~"{pods}"}}[{w}]))"#
    )
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

/// Runs one instant query, bounded in time: a Prometheus that accepts
/// connections and never answers must not hold the evaluation.
async fn query(
    client: &Client,
    what: &'static str,
    q: &str,
    timeout: Duration,
) -> Result<Data, MetricsError> {
    match tokio::time::timeout(timeout, client.query(q).get()).await {
        Ok(r) => Ok(r?.into_inner().0),
        Err(_) => Err(MetricsError::Timeout(what, timeout)),
    }
}

/// Per-pod values of an instant vector.
async fn per_pod(
    client: &Client,
    what: &'static str,
    q: &str,
    timeout: Duration,
) -> Result<BTreeMap<String, f64>, MetricsError> {
    match query(client, what, q, timeout).await? {
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
async fn scalar(
    client: &Client,
    what: &'static str,
    q: &str,
    timeout: Duration,
) -> Result<Option<f64>, MetricsError> {
    match query(client, what, q, timeout).await? {
        Data::Vector(v) => Ok(v
            .first()
            .map(|s| s.sample().value())
            .filter(|x| x.is_finite())),
        Data::Scalar(s) => Ok(Some(s.value()).filter(|x| x.is_finite())),
        _ => Err(MetricsError::Shape(what)),
    }
}

/// Reads everything the policy needs; each query is bounded by `timeout`
/// and all but the first run concurrently, so a read takes at most about
/// two timeouts.
pub async fn read(
    client: &Client,
    t: &Target,
    timeout: Duration,
) -> Result<Observed, MetricsError> {
    let t = Target {
        selector: validate_selector(&t.selector)?,
        ..t.clone()
    };
    let [fresh_q, qps_q, err_q, inflight_q, streams_q] = per_pod_queries(&t);
    let fresh = per_pod(client, fresh_q.0, &fresh_q.1, timeout).await?;
    let usable: BTreeSet<String> = fresh
        .into_iter()
        .filter(|(_, age)| *age <= t.max_age.as_secs_f64())
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
    let p99s: Vec<String> = P99_HISTOGRAMS
        .iter()
        .map(|(_, h)| p99_query(&t, h, &usable))
        .collect();
    let queue = async {
        if !t.queue {
            return Ok(None);
        }
        let [backlog_q, arrivals_q, finished_q] = queue_queries(&t);
        let run_q = job_run_query(&t, &usable);
        futures::try_join!(
            per_pod(client, backlog_q.0, &backlog_q.1, timeout),
            per_pod(client, arrivals_q.0, &arrivals_q.1, timeout),
            per_pod(client, finished_q.0, &finished_q.1, timeout),
            scalar(client, "job run time", &run_q, timeout),
        )
        .map(Some)
    };
    let (qps, errors, inflight, streams, p99, own, ttft, upstream, queue) = futures::try_join!(
        per_pod(client, qps_q.0, &qps_q.1, timeout),
        per_pod(client, err_q.0, &err_q.1, timeout),
        per_pod(client, inflight_q.0, &inflight_q.1, timeout),
        per_pod(client, streams_q.0, &streams_q.1, timeout),
        scalar(client, P99_HISTOGRAMS[0].0, &p99s[0], timeout),
        scalar(client, P99_HISTOGRAMS[1].0, &p99s[1], timeout),
        scalar(client, P99_HISTOGRAMS[2].0, &p99s[2], timeout),
        scalar(client, P99_HISTOGRAMS[3].0, &p99s[3], timeout),
        queue,
    )?;
    let (qps, reporting) = sum(&qps);
    let (errors, _) = sum(&errors);
    let (inflight, _) = sum(&inflight);
    let (streams, _) = sum(&streams);
    let error_rate = qps.map(|q| {
        if q > 0.0 {
            errors.unwrap_or(0.0) / q
        } else {
            0.0
        }
    });
    let window = t.window.as_secs().max(1) as f64;
    let ms = |v: Option<f64>| v.map(|s| s * 1000.0);
    // A pod without queue series (an older forwarder) counts as zero, as
    // for requests; none at all is no data.
    let (backlog, job_arrivals, jobs_finished, job_run_s) = match &queue {
        Some((b, a, f, run)) => (sum(b).0, sum(a).0, sum(f).0, *run),
        None => (None, None, None, None),
    };
    Ok(Observed {
        qps,
        // rate × window is the window's increase: the P99's sample count.
        requests: qps.map(|q| q * window),
        p99_ms: ms(p99),
        own_p99_ms: ms(own),
        streams: streams.map(|s| s * window),
        ttft_p99_ms: ms(ttft),
        error_rate,
        inflight,
        upstream_p99_ms: ms(upstream),
        reporting,
        backlog,
        job_arrivals,
        jobs_finished,
        job_run_s,
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
            queue: false,
        }
    }

    #[test]
    fn queue_queries_read_the_lag_arrivals_finished_jobs_and_run_time() {
        let q = queue_queries(&target());
        assert_eq!(
            q[0].1,
            r#"sum by (pod) (forwarder_queue_depth{namespace="ai",app_kubernetes_io_instance="support-bot"})"#
        );
        assert_eq!(
            q[1].1,
            r#"sum by (pod) (rate(forwarder_jobs_total{namespace="ai",app_kubernetes_io_instance="support-bot",state="queued"}[60s]))"#
        );
        assert!(
            q[2].1.contains(r#"state=~"succeeded|failed""#),
            "{}",
            q[2].1
        );
        let pods: BTreeSet<String> = ["bot-a".to_string()].into();
        assert_eq!(
            job_run_query(&target(), &pods),
            r#"sum(rate(forwarder_job_run_seconds_sum{namespace="ai",app_kubernetes_io_instance="support-bot",pod=~"bot-a"}[60s])) / sum(rate(forwarder_job_run_seconds_count{namespace="ai",app_kubernetes_io_instance="support-bot",pod=~"bot-a"}[60s]))"#
        );
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

    #[test]
    fn freshness_is_computed_by_prometheus() {
        let q = per_pod_queries(&target());
        assert!(
            q[0].1.starts_with("min by (pod) (time() - timestamp("),
            "{}",
            q[0].1
        );
    }

    #[test]
    fn selectors_are_label_matchers_only() {
        for (ok, normalised) in [
            (r#"job="llm""#, r#"job="llm""#),
            (
                r#" job = "llm" , pod=~"bot-.*", env!="dev",x!~"a\"b", "#,
                r#"job="llm",pod=~"bot-.*",env!="dev",x!~"a\"b""#,
            ),
            (r#"_a1="}""#, r#"_a1="}""#),
        ] {
            assert_eq!(validate_selector(ok).as_deref(), Ok(normalised), "{ok}");
        }
        for bad in [
            "",
            r#"job="llm"}) or vector(1000"#,
            r#"job="llm"} + on() vector(1) or up{a="b""#,
            r#"job=llm"#,
            r#"job='llm'"#,
            r#"job=="llm""#,
            r#"1job="llm""#,
            r#"job="llm" pod="x""#,
            r#"job="unterminated"#,
            r#"job.name="x""#,
            ",",
        ] {
            let e = validate_selector(bad).expect_err(bad);
            assert!(e.to_string().contains("label matchers"), "{e}");
        }
    }
}
