//! One evaluation of one autoscaled workload: observe the scale target,
//! read its metrics, decide, and scale. Kept apart from Kubernetes so the
//! same loop drives Deployments (the operator) and local processes (the
//! loop test harness).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::metrics::{self, MetricsError, Target};
use super::policy::{self, Decision, Observed, Policy, Recommendation, Replicas};

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
}

#[derive(Debug, thiserror::Error)]
#[error("scale target: {0}")]
pub struct ScaleError(pub String);

/// Where metrics come from; Prometheus in production, anything in tests.
#[async_trait]
pub trait MetricsSource: Send + Sync {
    async fn read(&self, target: &Target) -> Result<Observed, MetricsError>;
}

/// Prometheus over HTTP.
pub struct Prometheus(pub prometheus_http_query::Client);

#[async_trait]
impl MetricsSource for Prometheus {
    async fn read(&self, target: &Target) -> Result<Observed, MetricsError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        metrics::read(&self.0, target, now).await
    }
}

/// What one evaluation saw and did.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub from: u32,
    pub decision: Decision,
    pub observed: Observed,
    /// The metrics read failed (Prometheus down, …); `observed` is empty.
    pub metrics_error: Option<String>,
    pub scaled: bool,
}

/// The per-workload memory the policy needs: its recent recommendations.
/// Lost on restart by design: the stabilization rule then holds until a
/// full window has been observed again.
pub struct Evaluator {
    pub policy: Policy,
    history: Vec<Recommendation>,
    origin: Instant,
}

impl Evaluator {
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            history: Vec::new(),
            origin: Instant::now(),
        }
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
            Err(e) => (Observed::default(), Some(e.to_string())),
        };
        let now = self.origin.elapsed();
        let decision = policy::decide(
            &self.policy,
            &observed,
            Replicas {
                current: state.current,
                ready: state.ready,
            },
            &self.history,
            now,
        );
        self.history.push(Recommendation {
            at: now,
            replicas: decision.recommendation,
        });
        policy::prune(&mut self.history, self.policy.stabilization, now);
        let scaled = decision.desired != state.current;
        if scaled {
            workload.scale(decision.desired).await?;
        }
        Ok(Evaluation {
            from: state.current,
            decision,
            observed,
            metrics_error,
            scaled,
        })
    }
}

/// A one-line account of a decision, for status, Events and logs.
pub fn explain(e: &Evaluation) -> String {
    let o = &e.observed;
    let num = |v: Option<f64>, unit: &str| v.map_or("n/a".to_string(), |v| format!("{v:.1}{unit}"));
    format!(
        "{} → {} ({:?}): qps={} p99={} upstream_p99={} error_rate={} inflight={} pods_reporting={}",
        e.from,
        e.decision.desired,
        e.decision.reason,
        num(o.qps, ""),
        num(o.p99_ms, "ms"),
        num(o.upstream_p99_ms, "ms"),
        o.error_rate
            .map_or("n/a".to_string(), |v| format!("{v:.4}")),
        num(o.inflight, ""),
        o.reporting,
    )
}

/// Default evaluation interval: one Prometheus scrape (15 s) so every
/// decision sees fresh samples; the webhook shortcuts it on alerts.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(15);

#[cfg(test)]
mod tests {
    use super::*;
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
        }
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
