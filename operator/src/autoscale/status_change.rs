//! Whether an evaluation's status is worth a write (pure): only when
//! something a user reads changed, so a fleet at steady state costs the API
//! server (and etcd) nothing. Metrics that merely jitter are not a change;
//! they are refreshed at least every [`METRICS_REFRESH`].

use std::time::Duration;

use crate::crd::{ModelForwarderStatus, ObservedMetrics};

/// The metrics in status are rewritten at least this often while they
/// stay within their tolerance, so `metrics.observedAt` is never older.
pub const METRICS_REFRESH: Duration = Duration::from_secs(300);

/// A value moved: by more than 10% of the larger of the two, plus a floor
/// below which differences are noise (`floor` in the value's unit).
fn moved(a: f64, b: f64, floor: f64) -> bool {
    (a - b).abs() > 0.1 * a.abs().max(b.abs()) + floor
}

fn metrics_moved(prev: &ObservedMetrics, next: &ObservedMetrics) -> bool {
    let opt = |a: Option<f64>, b: Option<f64>, floor: f64| match (a, b) {
        (None, None) => false,
        (Some(a), Some(b)) => moved(a, b, floor),
        _ => true,
    };
    moved(prev.qps, next.qps, 0.1)
        || moved(prev.error_rate, next.error_rate, 0.001)
        || opt(prev.p99_latency_ms, next.p99_latency_ms, 1.0)
        || opt(prev.own_p99_latency_ms, next.own_p99_latency_ms, 1.0)
        || opt(prev.ttft_p99_ms, next.ttft_p99_ms, 1.0)
        || opt(prev.queue_backlog, next.queue_backlog, 1.0)
        || opt(prev.queue_delay_seconds, next.queue_delay_seconds, 1.0)
        || opt(
            prev.jobs_per_second_per_replica,
            next.jobs_per_second_per_replica,
            0.01,
        )
}

/// Whether `next` (the autoscaler's part of the status) differs from what
/// is stored in a way a user would notice: the desired replicas, the last
/// scale, any of its conditions (status, reason, message, generation), or
/// metrics that appeared, vanished, moved beyond their tolerance, or were
/// last written [`METRICS_REFRESH`] ago or more (`now`).
pub fn needs_write(
    prev: Option<&ModelForwarderStatus>,
    next: &ModelForwarderStatus,
    now: jiff::Timestamp,
) -> bool {
    let Some(prev) = prev else {
        return true;
    };
    if prev.desired_replicas != next.desired_replicas
        || prev.last_scale_time != next.last_scale_time
        || prev.last_scale_reason != next.last_scale_reason
        || prev.stabilization != next.stabilization
    {
        return true;
    }
    let condition_changed = next.conditions.iter().any(|c| {
        prev.conditions
            .iter()
            .find(|p| p.type_ == c.type_)
            .is_none_or(|p| {
                p.status != c.status
                    || p.reason != c.reason
                    || p.message != c.message
                    || p.observed_generation != c.observed_generation
            })
    });
    if condition_changed {
        return true;
    }
    match (&prev.metrics, &next.metrics) {
        (None, None) => false,
        (Some(p), Some(n)) => {
            let age = now.duration_since(p.observed_at.0);
            metrics_moved(p, n)
                || age >= jiff::SignedDuration::try_from(METRICS_REFRESH).unwrap_or_default()
        }
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status(
        desired: i32,
        qps: f64,
        at: &str,
        breached: &str,
        message: &str,
    ) -> ModelForwarderStatus {
        serde_json::from_value(json!({
            "desiredReplicas": desired,
            "conditions": [
                {"type": "SLOBreached", "status": breached, "reason": "R", "message": message,
                 "observedGeneration": 1, "lastTransitionTime": "2026-12-01T00:00:00Z"},
                {"type": "Ready", "status": "True", "reason": "R", "message": "",
                 "lastTransitionTime": "2026-12-01T00:00:00Z"}
            ],
            "metrics": {"qps": qps, "errorRate": 0.0, "p99LatencyMs": 120.0, "observedAt": at}
        }))
        .unwrap()
    }

    fn at(s: &str) -> jiff::Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn a_steady_evaluation_is_not_written_a_change_a_user_reads_is() {
        let t = "2026-12-01T00:00:00Z";
        let prev = status(3, 100.0, t, "False", "within the SLO");
        let now = at("2026-12-01T00:01:00Z");
        // Same decision, metrics within 10%, a fresh observedAt: no write.
        let next = status(3, 104.0, "2026-12-01T00:01:00Z", "False", "within the SLO");
        assert!(!needs_write(Some(&prev), &next, now));
        assert!(needs_write(None, &next, now), "nothing stored yet");
        for (what, next) in [
            ("desired", status(4, 100.0, t, "False", "within the SLO")),
            ("qps +20%", status(3, 120.0, t, "False", "within the SLO")),
            (
                "condition",
                status(3, 100.0, t, "True", "P99 900 ms > 500 ms"),
            ),
            ("message", status(3, 100.0, t, "False", "other")),
        ] {
            assert!(needs_write(Some(&prev), &next, now), "{what}");
        }
        // The reconciler's conditions are not the autoscaler's to compare.
        let mut next = status(3, 100.0, t, "False", "within the SLO");
        next.conditions.retain(|c| c.type_ == "SLOBreached");
        assert!(!needs_write(Some(&prev), &next, now));
        // Metrics are refreshed every five minutes even when steady.
        let later = at("2026-12-01T00:05:00Z");
        assert!(needs_write(Some(&prev), &next, later));
        let mut gone = next.clone();
        gone.metrics = None;
        assert!(needs_write(Some(&prev), &gone, now), "metrics vanished");
        assert!(!moved(0.0, 0.05, 0.1), "jitter at zero traffic");
    }
}
