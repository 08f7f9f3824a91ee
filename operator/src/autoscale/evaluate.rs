//! One evaluation of one autoscaled workload: observe the scale target,
//! read its metrics, decide, and scale. Kept apart from Kubernetes so the
//! same loop drives Deployments (the operator) and local processes (the
//! loop test harness).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::metrics::{self, MetricsError, Target};
use super::policy::{self, Decision, History, Observed, Policy, QueueNeed, Replicas};
use super::queue::Doubt;

/// What runs the replicas.
#[async_trait]
pub trait ScaleTarget: Send + Sync {
    /// Current (desired by the workload) and ready replicas, and the names
    /// of pods that exist now.
    async fn state(&self) -> Result<TargetState, ScaleError>;
    async fn scale(&self, replicas: u32) -> Result<(), ScaleError>;
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetState {
    pub current: u32,
    pub ready: u32,
    pub live_pods: BTreeSet<String>,
    /// Field managers other than the autoscaler that set the workload's
    /// replicas (an HPA, `kubectl scale`): they fight the autoscaler.
    pub foreign_managers: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("scale target: {0}")]
pub struct ScaleError(pub String);

/// Where metrics come from; Prometheus in production, anything in tests.
#[async_trait]
pub trait MetricsSource: Send + Sync {
    async fn read(&self, target: &Target) -> Result<Observed, MetricsError>;
}

/// Prometheus over HTTP, each query bounded by `timeout`.
pub struct Prometheus {
    pub client: prometheus_http_query::Client,
    pub timeout: Duration,
}

impl Prometheus {
    pub fn new(client: prometheus_http_query::Client, timeout: Duration) -> Self {
        Self { client, timeout }
    }
}

#[async_trait]
impl MetricsSource for Prometheus {
    async fn read(&self, target: &Target) -> Result<Observed, MetricsError> {
        metrics::read(&self.client, target, self.timeout).await
    }
}

/// Why metrics could not be read, for conditions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsFailure {
    /// A condition reason (`QueryTimeout`, `InvalidSelector`, …).
    pub reason: &'static str,
    pub message: String,
}

/// What one evaluation saw and did.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub from: u32,
    /// Ready replicas when evaluated.
    pub ready: u32,
    pub decision: Decision,
    pub observed: Observed,
    /// The metrics read failed (Prometheus down, …); `observed` is empty.
    pub metrics_error: Option<MetricsFailure>,
    pub scaled: bool,
    pub foreign_managers: Vec<String>,
    /// While the count is held by the stabilization window: since when the
    /// recommendations have stayed below it, and the highest of them (kept
    /// in status, so a new leader continues the window).
    pub stabilizing: Option<(jiff::Timestamp, u32)>,
}

/// The per-workload memory the policy needs (its [`History`]). A new
/// leader restores from the status the time of the last scale-up (the
/// settle guard, [`Evaluator::restore_scale_up`]) and, when the handover
/// gap is known, a stabilization window in progress
/// ([`Evaluator::restore_stabilizing`]); otherwise the stabilization rule
/// holds until a full window has been observed again.
pub struct Evaluator {
    pub policy: Policy,
    history: History,
    origin: Instant,
    /// The wall-clock time of `origin`: history times written to status are
    /// `origin_wall + at`, the same text for the same entry every time.
    origin_wall: jiff::Timestamp,
}

/// How far back the evaluator's clock starts, so a scale-up that happened
/// before it existed (restored from status) has a time on it.
const CLOCK_BACKDATE: Duration = Duration::from_secs(24 * 3600);

impl Evaluator {
    pub fn new(policy: Policy) -> Self {
        let now = Instant::now();
        let origin = now.checked_sub(CLOCK_BACKDATE).unwrap_or(now);
        let back = jiff::SignedDuration::try_from(now - origin).unwrap_or_default();
        Self {
            policy,
            history: History::default(),
            origin,
            origin_wall: jiff::Timestamp::now() - back,
        }
    }

    /// Whole seconds, rounded up: a restored window never starts earlier
    /// than observed.
    fn wall(&self, at: Duration) -> jiff::Timestamp {
        let secs = at.as_secs() + u64::from(at.subsec_nanos() > 0);
        let at = jiff::SignedDuration::from_secs(i64::try_from(secs).unwrap_or(i64::MAX));
        self.origin_wall
            .saturating_add(at)
            .unwrap_or(self.origin_wall)
    }

    /// A stabilization window in progress, read from status by a new
    /// leader: the recommendations stayed below the count from `since`
    /// (wall clock) with `peak` the highest, as observed by the previous
    /// leader, which was last seen alive `seen_ago` (the election's
    /// observed time of its last lease change). The window is continued up
    /// to one `interval` before that (its last evaluation may be that much
    /// older), entries every `interval`; the gap from there to this
    /// evaluator's first evaluation is judged by the history's gap limit
    /// like any other.
    pub fn restore_stabilizing(
        &mut self,
        since: jiff::Timestamp,
        peak: u32,
        seen_ago: Duration,
        interval: Duration,
    ) {
        let now = self.origin.elapsed();
        let age = jiff::Timestamp::now().duration_since(since);
        let Ok(age) = Duration::try_from(age) else {
            return; // in the future: a skewed clock, do not trust it
        };
        let (Some(from), Some(until)) =
            (now.checked_sub(age), now.checked_sub(seen_ago + interval))
        else {
            return;
        };
        self.history
            .restore_stabilizing(from, until, peak, interval);
    }

    /// A scale-up happened `ago` (read from status by a new leader): SLO
    /// steps settle from it as if this evaluator had made it, so a P99 from
    /// before the scale-up never adds a second step.
    pub fn restore_scale_up(&mut self, ago: Duration) {
        let now = self.origin.elapsed();
        if let Some(at) = now.checked_sub(ago) {
            self.history.last_scale_up = Some(at);
        }
    }

    /// Not evaluated now (replicas pinned by hand): what was observed
    /// before no longer describes the window.
    pub fn forget(&mut self) {
        self.history.forget();
    }

    pub async fn evaluate(
        &mut self,
        source: &dyn MetricsSource,
        target: &Target,
        workload: &dyn ScaleTarget,
    ) -> Result<Evaluation, ScaleError> {
        let state = workload.state().await?;
        let mut target = target.clone();
        target.live_pods = Some(state.live_pods.clone());
        let (observed, metrics_error) = match source.read(&target).await {
            Ok(o) => (o, None),
            Err(e) => (
                Observed::default(),
                Some(MetricsFailure {
                    reason: e.reason(),
                    message: e.to_string(),
                }),
            ),
        };
        let now = self.origin.elapsed();
        let replicas = Replicas {
            current: state.current,
            ready: state.ready,
        };
        let decision = policy::decide(&self.policy, &observed, replicas, &self.history, now);
        self.history.record(&self.policy, replicas, &decision, now);
        self.history
            .record_runs(&self.policy, observed.job_run_s, now);
        let stabilizing = if decision.desired == state.current {
            self.history
                .stabilizing(state.current)
                .map(|(at, peak)| (self.wall(at), peak))
        } else {
            None
        };
        let scaled = decision.desired != state.current;
        if scaled {
            workload.scale(decision.desired).await?;
        }
        Ok(Evaluation {
            from: state.current,
            ready: state.ready,
            decision,
            observed,
            metrics_error,
            stabilizing,
            scaled,
            foreign_managers: state.foreign_managers,
        })
    }
}

/// A one-line account of a decision, for status, Events and logs.
pub fn explain(e: &Evaluation) -> String {
    let o = &e.observed;
    let num = |v: Option<f64>, unit: &str| v.map_or("n/a".to_string(), |v| format!("{v:.1}{unit}"));
    format!(
        "{} → {} ({:?}): qps={} p99={} own_p99={} ttft_p99={} upstream_p99={} error_rate={} inflight={} pods_reporting={}",
        e.from,
        e.decision.desired,
        e.decision.reason,
        num(o.qps, ""),
        num(o.p99_ms, "ms"),
        num(o.own_p99_ms, "ms"),
        num(o.ttft_p99_ms, "ms"),
        num(o.upstream_p99_ms, "ms"),
        o.error_rate
            .map_or("n/a".to_string(), |v| format!("{v:.4}")),
        num(o.inflight, ""),
        o.reporting,
    ) + &explain_queue(e)
}

/// The queue's part of the explanation, with a queue SLO.
fn explain_queue(e: &Evaluation) -> String {
    let secs = |v: f64| {
        if v.is_finite() {
            format!("{v:.0}s")
        } else {
            "growing".into()
        }
    };
    match e.decision.queue {
        QueueNeed::Off => String::new(),
        QueueNeed::Missing => " queue=n/a (holding: no queue series)".into(),
        QueueNeed::UnknownCapacity { backlog } => format!(
            " backlog={backlog:.0} (holding: no job ended in the window, a replica's job rate is unknown)"
        ),
        QueueNeed::NotCredible {
            backlog,
            doubt: Doubt::Upstream,
        } => format!(
            " backlog={backlog:.0} (holding: the upstream is failing or slow, more replicas would not run jobs faster)"
        ),
        QueueNeed::NotCredible {
            backlog,
            doubt: Doubt::SlowerRuns { run_s, shortest_s },
        } => format!(
            " backlog={backlog:.0} (holding: jobs run {run_s:.0}s, over 1.5x the window's shortest {shortest_s:.0}s; the upstream sets the pace)"
        ),
        QueueNeed::Sized {
            replicas,
            backlog,
            per_replica,
            delay_s,
        } => format!(
            " backlog={backlog:.0} job_arrivals={} jobs_per_replica={} queue_delay={} queue_needs={replicas}",
            e.observed
                .job_arrivals
                .map_or("n/a".into(), |v| format!("{v:.1}/s")),
            per_replica.map_or("n/a".into(), |v| format!("{v:.1}/s")),
            secs(delay_s),
        ),
    }
}

/// Default evaluation interval: one Prometheus scrape (15 s) so every
/// decision sees fresh samples; the webhook shortcuts it on alerts.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(15);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoscale::policy::Reason;
    use std::sync::Mutex;

    struct Fixed(Observed);

    #[async_trait]
    impl MetricsSource for Fixed {
        async fn read(&self, _: &Target) -> Result<Observed, MetricsError> {
            Ok(self.0.clone())
        }
    }

    struct Down;

    #[async_trait]
    impl MetricsSource for Down {
        async fn read(&self, _: &Target) -> Result<Observed, MetricsError> {
            Err(MetricsError::Shape("prometheus is down"))
        }
    }

    struct Workload(Mutex<u32>);

    #[async_trait]
    impl ScaleTarget for Workload {
        async fn state(&self) -> Result<TargetState, ScaleError> {
            let n = *self.0.lock().unwrap();
            Ok(TargetState {
                current: n,
                ready: n,
                live_pods: (0..n).map(|i| format!("pod-{i}")).collect(),
                foreign_managers: vec![],
            })
        }
        async fn scale(&self, replicas: u32) -> Result<(), ScaleError> {
            *self.0.lock().unwrap() = replicas;
            Ok(())
        }
    }

    fn target() -> Target {
        Target {
            selector: metrics::default_selector("ns", "mf"),
            window: Duration::from_secs(60),
            live_pods: None,
            max_age: Duration::from_secs(45),
            queue: false,
        }
    }

    #[tokio::test]
    async fn a_restored_scale_up_settles_a_new_evaluator() {
        let policy = Policy::new(1, 20, 500.0, 0.01, 50.0, Duration::from_secs(300), 4);
        let breach = Fixed(Observed {
            qps: Some(200.0),
            p99_ms: Some(900.0),
            own_p99_ms: Some(600.0),
            error_rate: Some(0.0),
            inflight: Some(40.0),
            upstream_p99_ms: Some(300.0),
            requests: Some(12000.0),
            reporting: 8,
            ..Default::default()
        });
        // A new leader, the scale-up 4 → 8 made 10 s ago by the old one.
        let mut ev = Evaluator::new(policy.clone());
        ev.restore_scale_up(Duration::from_secs(10));
        let w = Workload(Mutex::new(8));
        let e = ev.evaluate(&breach, &target(), &w).await.unwrap();
        assert_eq!(
            (e.decision.desired, e.decision.reason),
            (8, Reason::Settling)
        );
        // Without it, the breach from before the scale-up steps again.
        let mut fresh = Evaluator::new(policy);
        let w = Workload(Mutex::new(8));
        let e = fresh.evaluate(&breach, &target(), &w).await.unwrap();
        assert!(e.decision.desired > 8, "{:?}", e.decision);
    }

    /// A failover in the middle of a scale-down window: the new leader
    /// restores the window from what the old one put in status and scales
    /// down when the window ends, where a leader without it would hold for
    /// a whole window more. (Short windows: 3 s, evaluations every 0.5 s.)
    #[tokio::test]
    async fn a_new_leader_continues_a_stabilization_window_from_status() {
        let interval = Duration::from_millis(500);
        let policy = Policy {
            stabilization: Duration::from_secs(3),
            max_gap: Duration::from_secs(1),
            ..Policy::new(1, 20, 500.0, 0.01, 50.0, Duration::from_secs(3), 4)
        };
        // 90 requests/s want 2 replicas; 4 run.
        let low = Fixed(Observed {
            qps: Some(90.0),
            p99_ms: Some(100.0),
            own_p99_ms: Some(1.0),
            error_rate: Some(0.0),
            inflight: Some(5.0),
            upstream_p99_ms: Some(99.0),
            requests: Some(5400.0),
            reporting: 4,
            ..Default::default()
        });
        let start = Instant::now();
        let mut old = Evaluator::new(policy.clone());
        let w = Workload(Mutex::new(4));
        let mut held = None;
        for _ in 0..6 {
            let e = old.evaluate(&low, &target(), &w).await.unwrap();
            assert_eq!(
                (e.decision.desired, e.decision.reason),
                (4, Reason::Stabilizing)
            );
            held = e.stabilizing;
            tokio::time::sleep(interval).await;
        }
        let (since, peak) = held.expect("the old leader reports the window");
        assert_eq!(peak, 2);
        // The old leader stops; the new one saw its lease renewed just now.
        let mut new = Evaluator::new(policy.clone());
        new.restore_stabilizing(since, peak, Duration::ZERO, interval);
        let mut fresh = Evaluator::new(policy);
        let (wn, wf) = (Workload(Mutex::new(4)), Workload(Mutex::new(4)));
        let (mut new_down, mut fresh_down) = (None, None);
        while start.elapsed() < Duration::from_secs(7) {
            let e = new.evaluate(&low, &target(), &wn).await.unwrap();
            if e.scaled && new_down.is_none() {
                new_down = Some(start.elapsed());
            }
            let e = fresh.evaluate(&low, &target(), &wf).await.unwrap();
            if e.scaled && fresh_down.is_none() {
                fresh_down = Some(start.elapsed());
            }
            tokio::time::sleep(interval).await;
        }
        let new_down = new_down.expect("the new leader scales down");
        // The window (3 s, its start rounded up to a whole second) ends
        // about 4 s after the old leader's first look.
        assert!(new_down <= Duration::from_millis(4600), "{new_down:?}");
        // Without the status, a whole window from the new leader's start
        // (about 3 s after the old leader's 6 looks).
        assert!(
            fresh_down.is_none_or(|f| f > new_down + Duration::from_secs(1)),
            "{fresh_down:?} vs {new_down:?}"
        );
        // A handover seen too long ago (a gap beyond the history's limit)
        // restores nothing useful: the window starts again.
        let mut late = Evaluator::new(Policy {
            stabilization: Duration::from_secs(3),
            max_gap: Duration::from_secs(1),
            ..Policy::new(1, 20, 500.0, 0.01, 50.0, Duration::from_secs(3), 4)
        });
        late.restore_stabilizing(since, peak, Duration::from_secs(5), interval);
        let e = late
            .evaluate(&low, &target(), &Workload(Mutex::new(4)))
            .await
            .unwrap();
        assert_eq!(e.decision.reason, Reason::Stabilizing);
    }

    #[tokio::test]
    async fn scales_the_workload_and_holds_when_metrics_fail() {
        let policy = Policy::new(1, 10, 500.0, 0.01, 50.0, Duration::from_secs(300), 4);
        let mut ev = Evaluator::new(policy);
        let w = Workload(Mutex::new(2));
        let busy = Fixed(Observed {
            qps: Some(300.0),
            p99_ms: Some(100.0),
            error_rate: Some(0.0),
            inflight: Some(10.0),
            upstream_p99_ms: Some(99.0),
            reporting: 2,
            ..Default::default()
        });
        let e = ev.evaluate(&busy, &target(), &w).await.unwrap();
        assert!(e.scaled);
        assert_eq!(
            (e.from, e.decision.desired, *w.0.lock().unwrap()),
            (2, 6, 6)
        );
        assert!(
            explain(&e).starts_with("2 → 6 (Capacity): qps=300.0"),
            "{}",
            explain(&e)
        );

        let e = ev.evaluate(&Down, &target(), &w).await.unwrap();
        assert!(!e.scaled && !e.decision.metrics_available);
        assert!(e.metrics_error.is_some());
        assert_eq!(*w.0.lock().unwrap(), 6, "held");
    }
}
