//! A scripted run of the loop: phases of load, upstream latency and
//! failures, Prometheus up, down or hung, and replicas that never get
//! ready, with the autoscaler evaluating on its interval.
//! Returns the timeline for assertions (the test) or plotting (the demo).

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use operator::autoscale::metrics::{default_selector, Target};
use operator::autoscale::policy::{Policy, Reason};
use operator::autoscale::{Evaluator, MetricsSource, Prometheus as PromSource, ScaleTarget};

use super::fleet::{Fleet, FleetConfig};
use super::load::Load;
use super::procs::{forwarder_bin, free_port, wait_http_ok, Proc};
use super::prometheus::Prometheus;

#[derive(Debug, Clone)]
pub struct Phase {
    pub name: &'static str,
    pub duration: Duration,
    /// Offered load, requests per second.
    pub rps: f64,
    /// The upstream's latency.
    pub upstream_latency: Duration,
    /// Share of upstream answers that are HTTP 500.
    pub upstream_errors: f64,
    pub prometheus: PromState,
    /// Pods started from this phase on that never become ready.
    pub stuck_pods: u32,
    /// The load submits async jobs instead of synchronous requests.
    pub jobs: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromState {
    Up,
    /// Accepts connections and never answers.
    Hung,
    Down,
}

pub struct Scenario {
    pub policy: Policy,
    pub interval: Duration,
    pub scrape: Duration,
    pub window: Duration,
    pub max_concurrency: usize,
    /// `async.workers` per replica; `None`: the forwarder's default.
    pub async_workers: Option<usize>,
    /// A Kafka-protocol broker for the async queue (else embedded).
    pub kafka: Option<String>,
    pub phases: Vec<Phase>,
}

/// One evaluation, with what the clients saw.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Seconds since the start.
    pub t: f64,
    pub phase: &'static str,
    pub offered_rps: f64,
    pub client_p99_ms: Option<f64>,
    pub client_errors: u64,
    pub client_requests: u64,
    pub replicas: u32,
    pub ready: u32,
    pub reason: Reason,
    pub metrics_available: bool,
    /// The condition reason when metrics were unavailable.
    pub metrics_error: Option<&'static str>,
    /// How long the evaluation took.
    pub eval_secs: f64,
    pub upstream_slow: bool,
    pub slo_breached: bool,
    pub qps: Option<f64>,
    pub p99_ms: Option<f64>,
    pub upstream_p99_ms: Option<f64>,
    /// Async jobs waiting, summed over the pods (with a queue SLO).
    pub backlog: Option<f64>,
    /// The SLO breach includes the queue's.
    pub queue_breached: bool,
    /// The SLO breach includes P99, TTFT or the error rate.
    pub request_slo_breached: bool,
    pub explanation: String,
}

/// Runs the scenario with local processes as the scale target.
pub async fn run(s: Scenario, on_sample: impl FnMut(&Sample)) -> anyhow::Result<Vec<Sample>> {
    run_with(
        s,
        ("local", "demo"),
        |fleet| Ok(fleet as Arc<dyn ScaleTarget>),
        on_sample,
    )
    .await
}

/// Runs the scenario for the forwarder `instance` in `namespace` (the
/// labels Prometheus attaches), scaled through the target `workload`
/// builds around the fleet: the fleet itself, or a real API server's
/// Deployment whose pods the fleet follows.
pub async fn run_with(
    s: Scenario,
    (namespace, instance): (&str, &str),
    workload: impl FnOnce(Arc<Fleet>) -> anyhow::Result<Arc<dyn ScaleTarget>>,
    mut on_sample: impl FnMut(&Sample),
) -> anyhow::Result<Vec<Sample>> {
    let dir = tempfile::tempdir()?;
    let forwarder = forwarder_bin()?;
    let mock_port = free_port()?;
    let first = s
        .phases
        .first()
        .map_or(Duration::from_millis(100), |p| p.upstream_latency);
    let _mock = Proc::spawn(
        "mock-llm",
        Command::new(&forwarder)
            .args(["mock-llm", "--listen", &format!("127.0.0.1:{mock_port}")])
            .arg("--latency")
            .arg(format!("{}ms", first.as_millis())),
    )?;
    let mock_url = format!("http://127.0.0.1:{mock_port}");
    wait_http_ok(&format!("{mock_url}/healthz"), Duration::from_secs(10)).await?;

    let fleet = Arc::new(Fleet::new(FleetConfig {
        forwarder,
        dir: dir.path().to_path_buf(),
        upstream: format!("{mock_url}/v1"),
        max_concurrency: s.max_concurrency,
        namespace: namespace.into(),
        instance: instance.into(),
        async_workers: s.async_workers,
        kafka: s.kafka.clone(),
    }));
    fleet.init()?;
    let mut prometheus = Prometheus::start(dir.path(), &fleet.targets_file(), s.scrape).await?;
    let timeout = s.interval / 3;
    let source = PromSource::new(
        prometheus_http_query::Client::try_from(prometheus.url.as_str())?,
        timeout,
    );
    let hung = Hung::start().await?;
    let hung_source = PromSource::new(
        prometheus_http_query::Client::try_from(hung.url.as_str())?,
        timeout,
    );
    let scaled = workload(fleet.clone())?;
    scaled
        .scale(s.policy.min)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let load = Load::start(fleet.endpoints());
    let target = Target {
        selector: default_selector(namespace, instance),
        window: s.window,
        live_pods: None,
        max_age: s.scrape * 3,
        queue: s.policy.queue.is_some(),
    };
    let mut evaluator = Evaluator::new(s.policy.clone());
    let http = reqwest::Client::new();
    let started = Instant::now();
    let mut samples = Vec::new();
    for phase in &s.phases {
        load.set_jobs(phase.jobs);
        load.set_rate(phase.rps);
        let settings = serde_json::json!({
            "latency": format!("{}ms", phase.upstream_latency.as_millis()),
            "error_rate": phase.upstream_errors,
            "error_status": 500,
        });
        let answer = http
            .put(format!("{mock_url}/mock/settings"))
            .json(&settings)
            .send()
            .await?;
        anyhow::ensure!(
            answer.status().is_success(),
            "mock settings: {}",
            answer.text().await?
        );
        fleet.make_next_stuck(phase.stuck_pods);
        if phase.prometheus == PromState::Down {
            prometheus.stop();
        }
        let source: &dyn MetricsSource = match phase.prometheus {
            PromState::Hung => &hung_source,
            _ => &source,
        };
        let phase_end = Instant::now() + phase.duration;
        while Instant::now() < phase_end {
            tokio::time::sleep(s.interval).await;
            let began = Instant::now();
            let e = evaluator
                .evaluate(source, &target, scaled.as_ref())
                .await
                .map_err(|e| anyhow::anyhow!(e))?;
            let eval_secs = began.elapsed().as_secs_f64();
            let state = scaled.state().await.map_err(|e| anyhow::anyhow!(e))?;
            let (p99, errors, requests) = load.recent(s.interval);
            let sample = Sample {
                t: started.elapsed().as_secs_f64(),
                phase: phase.name,
                offered_rps: phase.rps,
                client_p99_ms: p99,
                client_errors: errors,
                client_requests: requests,
                replicas: state.current,
                ready: state.ready,
                reason: e.decision.reason,
                metrics_available: e.decision.metrics_available,
                metrics_error: e.metrics_error.as_ref().map(|f| f.reason),
                eval_secs,
                upstream_slow: e.decision.upstream_slow,
                slo_breached: e.decision.breach.is_some(),
                qps: e.observed.qps,
                p99_ms: e.observed.p99_ms,
                upstream_p99_ms: e.observed.upstream_p99_ms,
                backlog: e.observed.backlog,
                queue_breached: e.decision.breach.is_some_and(|b| b.queue_delay_s.is_some()),
                request_slo_breached: e.decision.breach.is_some_and(|b| {
                    b.p99_ms.is_some() || b.ttft_ms.is_some() || b.error_rate.is_some()
                }),
                explanation: operator::autoscale::evaluate::explain(&e),
            };
            on_sample(&sample);
            samples.push(sample);
        }
    }
    load.set_rate(0.0);
    Ok(samples)
}

/// A "Prometheus" that accepts connections and never answers.
struct Hung {
    url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Hung {
    async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        Ok(Self { url, task })
    }
}

impl Drop for Hung {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The timeline as aligned text lines.
pub fn format_sample(s: &Sample) -> String {
    let ms = |v: Option<f64>| v.map_or("   -".to_string(), |v| format!("{v:4.0}"));
    format!(
        "t={:5.1}s {:<14} load={:4.0}rps client_p99={}ms errors={:<3} replicas={} ready={} | {}{}{}",
        s.t,
        s.phase,
        s.offered_rps,
        ms(s.client_p99_ms),
        s.client_errors,
        s.replicas,
        s.ready,
        s.explanation,
        if s.slo_breached { " SLOBreached" } else { "" },
        if s.upstream_slow { " UpstreamSlow" } else { "" },
    )
}
