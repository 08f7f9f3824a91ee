//! The operator's own metrics and health endpoints.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Counters and timings of the control loop, served on `/metrics`.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Reconciliations by result (`ok`, `error`).
    pub reconciles: IntCounterVec,
    /// Failed reconciliations by error kind.
    pub errors: IntCounterVec,
    pub duration: Histogram,
    /// Objects that could not be deserialised as a ModelForwarder.
    pub invalid_objects: IntCounter,
    /// 1 while this replica holds the leader lease.
    pub leader: IntGauge,
    /// Autoscaler decisions, by direction (`up`, `down`, `none`) and reason.
    pub scale_decisions: IntCounterVec,
    /// SLO breaches seen by the autoscaler, by resource.
    pub slo_breaches: IntCounterVec,
    /// Alerts received on the webhook, by result (`accepted`, `ignored`, `invalid`).
    pub alerts: IntCounterVec,
    /// Requests this operator sent to the API server, by method (`watch`
    /// for a GET that opens a watch), counted by [`CountRequests`].
    pub api_requests: IntCounterVec,
    /// Unix time at which the autoscaler's scheduler loop last ran (it
    /// wakes every second; evaluations run beside it, each bounded).
    pub autoscaler_last_round: IntGauge,
    /// Seconds after which a loop that did not run means a stalled
    /// autoscaler (`/healthz` fails); 0 while the autoscaler is not running.
    stall_limit_secs: Arc<AtomicU64>,
    /// Start times of the reconciliations running now, by a serial number.
    reconciling: Arc<Mutex<BTreeMap<u64, Instant>>>,
    serial: Arc<AtomicU64>,
}

/// A running reconciliation; it ends when dropped.
pub struct Running {
    id: u64,
    reconciling: Arc<Mutex<BTreeMap<u64, Instant>>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.reconciling
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

/// A reconciliation running longer than this means the reconciler is
/// stuck (its own bound, 20 s, did not fire): `/healthz` fails.
pub const RECONCILE_STALL: Duration = Duration::from_secs(60);

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new(
                "modelforwarder_operator_reconciliations_total",
                "Reconciliations of ModelForwarder resources, by result",
            ),
            &["result"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "modelforwarder_operator_reconcile_errors_total",
                "Failed reconciliations, by error kind",
            ),
            &["kind"],
        )?;
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "modelforwarder_operator_reconcile_duration_seconds",
                "Time spent in one reconciliation",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )?;
        let invalid_objects = IntCounter::new(
            "modelforwarder_operator_invalid_objects_total",
            "ModelForwarder objects that could not be deserialised",
        )?;
        let leader = IntGauge::new(
            "modelforwarder_operator_leader",
            "1 while this replica holds the leader lease",
        )?;
        let scale_decisions = IntCounterVec::new(
            Opts::new(
                "modelforwarder_scale_decisions_total",
                "Autoscaler decisions, by direction and reason",
            ),
            &["direction", "reason"],
        )?;
        let slo_breaches = IntCounterVec::new(
            Opts::new(
                "modelforwarder_slo_breaches_total",
                "Evaluations that found a ModelForwarder breaching its SLO",
            ),
            &["namespace", "name"],
        )?;
        let alerts = IntCounterVec::new(
            Opts::new(
                "modelforwarder_operator_alerts_total",
                "Alertmanager alerts received on the webhook, by result",
            ),
            &["result"],
        )?;
        let api_requests = IntCounterVec::new(
            Opts::new(
                "modelforwarder_operator_api_requests_total",
                "Requests the operator sent to the Kubernetes API server, by method (watch: a GET opening a watch)",
            ),
            &["method"],
        )?;
        registry.register(Box::new(api_requests.clone()))?;
        let autoscaler_last_round = IntGauge::new(
            "modelforwarder_autoscaler_last_round_timestamp_seconds",
            "Unix time at which the autoscaler's scheduler loop last ran",
        )?;
        registry.register(Box::new(autoscaler_last_round.clone()))?;
        registry.register(Box::new(scale_decisions.clone()))?;
        registry.register(Box::new(slo_breaches.clone()))?;
        registry.register(Box::new(alerts.clone()))?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(invalid_objects.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        Ok(Self {
            registry,
            reconciles,
            errors,
            duration,
            invalid_objects,
            leader,
            scale_decisions,
            slo_breaches,
            alerts,
            api_requests,
            autoscaler_last_round,
            stall_limit_secs: Arc::default(),
            reconciling: Arc::default(),
            serial: Arc::default(),
        })
    }

    /// The autoscaler runs: from now on `/healthz` fails when its loop does
    /// not run within `stall_limit`.
    pub fn autoscaler_started(&self, stall_limit: Duration) {
        self.autoscaler_last_round.set(unix_now());
        self.stall_limit_secs
            .store(stall_limit.as_secs().max(1), Ordering::Relaxed);
    }

    /// The autoscaler's loop ran.
    pub fn autoscaler_alive(&self) {
        self.autoscaler_last_round.set(unix_now());
    }

    /// Marks a reconciliation as running until the guard is dropped.
    pub fn reconcile_running(&self) -> Running {
        let id = self.serial.fetch_add(1, Ordering::Relaxed);
        self.reconciling
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, Instant::now());
        Running {
            id,
            reconciling: self.reconciling.clone(),
        }
    }

    /// How long the oldest running reconciliation has been running.
    fn oldest_reconcile(&self) -> Option<Duration> {
        let m = self.reconciling.lock().unwrap_or_else(|e| e.into_inner());
        m.values().min().map(Instant::elapsed)
    }

    /// `Err` with the reason when the autoscaler's loop or a
    /// reconciliation is stalled.
    pub fn health(&self) -> Result<(), String> {
        self.health_with(RECONCILE_STALL)
    }

    fn health_with(&self, reconcile_stall: Duration) -> Result<(), String> {
        if let Some(age) = self.oldest_reconcile().filter(|a| *a > reconcile_stall) {
            return Err(format!(
                "reconciler stalled: a reconciliation has run for {}s (limit {}s)",
                age.as_secs(),
                reconcile_stall.as_secs()
            ));
        }
        let limit = self.stall_limit_secs.load(Ordering::Relaxed);
        let age = unix_now() - self.autoscaler_last_round.get();
        if limit > 0 && age > limit as i64 {
            return Err(format!(
                "autoscaler stalled: its loop last ran {age}s ago (limit {limit}s)"
            ));
        }
        Ok(())
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec only fails on malformed metric families,
        // which registration has already ruled out.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// A client layer counting the requests it sends into
/// [`Metrics::api_requests`] (so the operator's own API cost is visible on
/// `/metrics`).
#[derive(Clone)]
pub struct CountRequests<S> {
    pub inner: S,
    pub counter: IntCounterVec,
}

/// The method label of a request (pure).
pub fn method_label<B>(req: &http::Request<B>) -> &'static str {
    let watch = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"));
    match *req.method() {
        _ if watch => "watch",
        http::Method::GET => "get",
        http::Method::POST => "post",
        http::Method::PUT => "put",
        http::Method::PATCH => "patch",
        http::Method::DELETE => "delete",
        _ => "other",
    }
}

impl<S, B> tower::Service<http::Request<B>> for CountRequests<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        self.counter.with_label_values(&[method_label(&req)]).inc();
        self.inner.call(req)
    }
}

async fn metrics(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        m.render(),
    )
}

async fn healthz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    match m.health() {
        Ok(()) => (StatusCode::OK, "ok".to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

/// `/metrics` and `/healthz` (failing while the autoscaler is stalled, so
/// the kubelet restarts a replica whose loop hangs).
pub fn router(m: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(m)
}

/// Serves [`router`] on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, m: Arc<Metrics>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics and /healthz");
    axum::serve(listener, router(m)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_reconcile_count_errors_and_duration() {
        let m = Metrics::new().expect("metrics");
        m.reconciles.with_label_values(&["ok"]).inc();
        m.errors.with_label_values(&["api"]).inc();
        m.duration.observe(0.02);
        let text = m.render();
        assert!(
            text.contains("modelforwarder_operator_reconciliations_total{result=\"ok\"} 1"),
            "{text}"
        );
        assert!(text.contains("modelforwarder_operator_reconcile_errors_total{kind=\"api\"} 1"));
        assert!(text.contains("modelforwarder_operator_reconcile_duration_seconds_count 1"));
    }

    #[tokio::test]
    async fn serves_metrics_and_healthz_over_http() {
        let m = Arc::new(Metrics::new().expect("metrics"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move { axum::serve(listener, router(m)).await });
        for (path, needle) in [
            ("/healthz", "ok"),
            ("/metrics", "modelforwarder_operator_leader"),
        ] {
            let body = get_text(addr, path).await;
            assert!(body.contains(needle), "{path}: {body}");
        }
        server.abort();
    }

    #[tokio::test]
    async fn healthz_fails_while_the_autoscaler_is_stalled() {
        let m = Arc::new(Metrics::new().expect("metrics"));
        assert!(m.health().is_ok(), "no autoscaler: healthy");
        m.autoscaler_started(Duration::from_secs(60));
        assert!(m.health().is_ok());
        // The loop last ran long ago.
        m.autoscaler_last_round.set(unix_now() - 61);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = router(m.clone());
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let body = get_text(addr, "/healthz").await;
        assert!(
            body.starts_with("HTTP/1.1 503") && body.contains("autoscaler stalled"),
            "{body}"
        );
        m.autoscaler_alive();
        assert!(get_text(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        server.abort();
    }

    #[test]
    fn api_requests_are_labelled_by_method_and_watch() {
        let req = |m: &str, uri: &str| {
            http::Request::builder()
                .method(m)
                .uri(uri)
                .body(())
                .unwrap()
        };
        assert_eq!(
            method_label(&req("GET", "/api/v1/pods?watch=true&x=1")),
            "watch"
        );
        assert_eq!(method_label(&req("GET", "/api/v1/pods?limit=1")), "get");
        assert_eq!(method_label(&req("PATCH", "/apis/apps/v1/x")), "patch");
        assert_eq!(method_label(&req("POST", "/x")), "post");
    }

    #[test]
    fn healthz_fails_while_a_reconciliation_outlives_its_bound() {
        let m = Metrics::new().expect("metrics");
        let running = m.reconcile_running();
        assert!(m.health().is_ok());
        std::thread::sleep(Duration::from_millis(20));
        let e = m
            .health_with(Duration::from_millis(10))
            .expect_err("stalled");
        assert!(e.starts_with("reconciler stalled"), "{e}");
        drop(running);
        assert!(m.health_with(Duration::from_millis(10)).is_ok(), "ended");
    }

    async fn get_text(addr: SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }
}
