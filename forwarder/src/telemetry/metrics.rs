//! The forwarder's Prometheus metrics. Names and labels are a contract with
//! the operator's PromQL and the dashboards (DESIGN.md §2): change both
//! together.

use crate::pipeline::ApiKind;
use std::collections::HashMap;
use std::sync::Arc;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The front end a request came through (`protocol` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    WebSocket,
    Grpc,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Self::Http, Self::WebSocket, Self::Grpc];

    fn index(self) -> usize {
        self as usize
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::WebSocket => "websocket",
            Self::Grpc => "grpc",
        }
    }
}

/// Histogram buckets from 1 ms to 120 s: LLM calls span both ends.
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// One registry per forwarder instance (not the global one), so that several
/// forwarders in one test process keep separate counts.
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    /// Time spent in the forwarder itself: the request's duration until its
    /// answer began, minus upstream attempts and backoff. The autoscaler
    /// scales on this, so a slow or failing upstream does not add replicas.
    pub own_duration: HistogramVec,
    /// Streams: request arrival to the first event sent to the client.
    pub time_to_first_token: HistogramVec,
    pub upstream_requests: IntCounterVec,
    pub upstream_duration: HistogramVec,
    pub inflight: IntGauge,
    pub retries: IntCounterVec,
    pub circuit_open: IntGaugeVec,
    pub idempotent_replays: IntCounter,
    /// Open client connections: TCP connections on the HTTP and gRPC
    /// listeners, and WebSocket sessions.
    pub connections: IntGaugeVec,
    /// Refused credentials, by reason (`expired`, `bad_signature`, …).
    pub auth_failures: IntCounterVec,
    /// Per served model, front end and API, the hot series, each bound
    /// once (a label lookup hashes and locks on every request): chat
    /// completions' at start, the other APIs' at their first request.
    series: std::sync::OnceLock<HashMap<String, Box<SeriesSlots>>>,
    /// Per upstream and model, the series of a successful attempt.
    upstream_series: std::sync::OnceLock<HashMap<String, HashMap<String, Arc<UpstreamSeries>>>>,
}

/// A model's series by front end and API.
type SeriesSlots = [[std::sync::OnceLock<Arc<ModelSeries>>; ApiKind::ALL.len()]; 3];

/// One (upstream, model)'s successful-attempt series, resolved once.
pub struct UpstreamSeries {
    pub success: IntCounter,
    pub duration: Histogram,
}

/// One (front end, model)'s request series, resolved once.
pub struct ModelSeries {
    pub ok: IntCounter,
    pub duration: Histogram,
    pub own: Histogram,
    pub ttft: Histogram,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "forwarder_requests_total",
                "Requests answered, by front end, API, model and status code.",
            ),
            &["protocol", "api", "model", "code"],
        )
        .expect("valid metric");
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "forwarder_request_duration_seconds",
                "Time from request to the last byte of the answer.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["protocol", "api", "model"],
        )
        .expect("valid metric");
        let own_duration = HistogramVec::new(
            HistogramOpts::new(
                "forwarder_own_duration_seconds",
                "Time spent in the forwarder until the answer began, excluding upstream attempts and backoff.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["protocol", "model"],
        )
        .expect("valid metric");
        let time_to_first_token = HistogramVec::new(
            HistogramOpts::new(
                "forwarder_time_to_first_token_seconds",
                "Streamed requests: time from arrival to the first event sent to the client.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["protocol", "model"],
        )
        .expect("valid metric");
        let upstream_requests = IntCounterVec::new(
            Opts::new(
                "forwarder_upstream_requests_total",
                "Attempts sent upstream, by outcome.",
            ),
            &["upstream", "model", "outcome"],
        )
        .expect("valid metric");
        let upstream_duration = HistogramVec::new(
            HistogramOpts::new(
                "forwarder_upstream_duration_seconds",
                "Duration of one upstream attempt (for streams, until the last chunk).",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["upstream", "model"],
        )
        .expect("valid metric");
        let inflight = IntGauge::new(
            "forwarder_inflight_requests",
            "Requests being answered now.",
        )
        .expect("valid metric");
        let retries = IntCounterVec::new(
            Opts::new(
                "forwarder_retries_total",
                "Attempts retried, by the endpoint that failed and why.",
            ),
            &["upstream", "reason"],
        )
        .expect("valid metric");
        let circuit_open = IntGaugeVec::new(
            Opts::new(
                "forwarder_circuit_open",
                "1 while an endpoint's circuit breaker is open.",
            ),
            &["upstream"],
        )
        .expect("valid metric");
        let idempotent_replays = IntCounter::new(
            "forwarder_idempotent_replays_total",
            "Requests answered from an earlier request with the same idempotency key.",
        )
        .expect("valid metric");
        let connections = IntGaugeVec::new(
            Opts::new(
                "forwarder_connections",
                "Open client connections, by protocol.",
            ),
            &["protocol"],
        )
        .expect("valid metric");
        let auth_failures = IntCounterVec::new(
            Opts::new(
                "forwarder_auth_failures_total",
                "Requests refused authentication, by reason.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        for c in [
            Box::new(auth_failures.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(requests.clone()),
            Box::new(request_duration.clone()),
            Box::new(own_duration.clone()),
            Box::new(time_to_first_token.clone()),
            Box::new(upstream_requests.clone()),
            Box::new(upstream_duration.clone()),
            Box::new(inflight.clone()),
            Box::new(retries.clone()),
            Box::new(circuit_open.clone()),
            Box::new(idempotent_replays.clone()),
            Box::new(connections.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Self {
            registry,
            requests,
            request_duration,
            own_duration,
            time_to_first_token,
            upstream_requests,
            upstream_duration,
            inflight,
            retries,
            circuit_open,
            idempotent_replays,
            connections,
            auth_failures,
            series: std::sync::OnceLock::new(),
            upstream_series: std::sync::OnceLock::new(),
        }
    }

    /// Creates the per-model series at zero, so a new replica reports at
    /// once (a rate over a series that does not exist yet is no data, and
    /// the autoscaler would have to guess), and binds them for the hot path.
    /// Only `protocols` get zero series; every front end gets bound handles.
    pub fn init_series(&self, protocols: &[Protocol], models: &[String]) {
        let table = models
            .iter()
            .map(|m| {
                let slots: Box<SeriesSlots> = Box::default();
                // Chat completions (every front end's API) from the start.
                for p in protocols {
                    let chat = &slots[p.index()][ApiKind::ChatCompletions as usize];
                    let _ = chat.set(self.bind(*p, ApiKind::ChatCompletions, m));
                }
                (m.clone(), slots)
            })
            .collect();
        let _ = self.series.set(table);
    }

    fn bind(&self, p: Protocol, api: ApiKind, m: &str) -> Arc<ModelSeries> {
        let labels = [p.label(), m];
        Arc::new(ModelSeries {
            ok: self
                .requests
                .with_label_values(&[p.label(), api.label(), m, "200"]),
            duration: self
                .request_duration
                .with_label_values(&[p.label(), api.label(), m]),
            own: self.own_duration.with_label_values(&labels),
            ttft: self.time_to_first_token.with_label_values(&labels),
        })
    }

    /// Binds the successful-attempt series of each (upstream, model).
    pub fn init_upstream_series<'a>(&self, pairs: impl IntoIterator<Item = (&'a str, &'a str)>) {
        let mut table: HashMap<String, HashMap<String, Arc<UpstreamSeries>>> = HashMap::new();
        for (u, m) in pairs {
            let series = Arc::new(UpstreamSeries {
                success: self.upstream_requests.with_label_values(&[u, m, "success"]),
                duration: self.upstream_duration.with_label_values(&[u, m]),
            });
            table
                .entry(u.to_string())
                .or_default()
                .insert(m.to_string(), series);
        }
        let _ = self.upstream_series.set(table);
    }

    pub fn upstream_series(&self, upstream: &str, model: &str) -> Option<&UpstreamSeries> {
        self.upstream_series
            .get()?
            .get(upstream)?
            .get(model)
            .map(|s| &**s)
    }

    /// The bound series of a served model, for a request of `api` over
    /// `protocol` (bound at its first use: the label set stays bounded by
    /// the served models, three front ends and five APIs).
    pub fn series(
        &self,
        protocol: Protocol,
        api: ApiKind,
        model: &str,
    ) -> Option<Arc<ModelSeries>> {
        let slot = &self.series.get()?.get(model)?[protocol.index()][api as usize];
        Some(slot.get_or_init(|| self.bind(protocol, api, model)).clone())
    }

    /// The Prometheus text exposition of every metric.
    /// For subsystems that own their series (the store).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
