//! The Kubernetes side of the autoscaler: a forwarder Deployment as a
//! [`ScaleTarget`], the policy from a resource's spec, and the status the
//! autoscaler owns (desired replicas, metrics, last scale, and the
//! `SLOBreached`, `MetricsAvailable`, `UpstreamSlow`, `ScalingLimited` and
//! `ScaleConflict` conditions).

use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::Resource;
use serde_json::{json, Value};

use super::cache::Cluster;
use super::evaluate::{explain, Evaluation, ScaleError, ScaleTarget, TargetState};
use super::policy::{Policy, QueueNeed, QueueSlo, Reason};
use crate::crd::{ModelForwarder, ModelForwarderSpec, ModelForwarderStatus};
use crate::render::labels::{selector_string, SCALER_FIELD_MANAGER};

/// Field manager of the status fields the autoscaler owns.
pub const AUTOSCALER_FIELD_MANAGER: &str = "modelforwarder-operator-autoscaler";
pub const SLO_BREACHED: &str = "SLOBreached";
pub const METRICS_AVAILABLE: &str = "MetricsAvailable";
pub const UPSTREAM_SLOW: &str = "UpstreamSlow";
/// True while a scale-up is held for replicas that are not Ready.
pub const SCALING_LIMITED: &str = "ScalingLimited";
/// True while another field manager sets the Deployment's replicas.
pub const SCALE_CONFLICT: &str = "ScaleConflict";

/// The autoscaling policy a resource asks for.
pub fn policy_for(spec: &ModelForwarderSpec) -> Policy {
    let min = spec.replicas.min.max(1) as u32;
    let mut p = Policy::new(
        min,
        (spec.replicas.max.max(1) as u32).max(min),
        f64::from(spec.slo.p99_latency_ms),
        spec.slo.max_error_rate,
        f64::from(spec.slo.target_qps_per_replica),
        Duration::from_secs(u64::from(spec.scaling.scale_down_stabilization_seconds)),
        spec.scaling.max_scale_up_step,
    );
    p.ttft_slo_ms = spec.slo.ttft_p99_ms.map(f64::from);
    // Only on Kafka (the CRD requires `spec.async` for it): the embedded
    // queue keeps each pod's backlog to itself.
    p.queue = spec
        .slo
        .max_queue_delay_seconds
        .zip(spec.async_jobs.as_ref())
        .map(|(delay, a)| QueueSlo {
            max_delay_s: f64::from(delay),
            workers_per_replica: f64::from(a.workers.max(1)),
            lag_includes_running: true,
        });
    p
}

/// How long ago the last scale recorded in status was a scale-up (pure):
/// `lastScaleReason` starts with "FROM → TO" (as [`explain`] writes it)
/// and TO > FROM. `None` for a scale-down, no record, or a time ahead of
/// `now`.
pub fn last_scale_up_ago(
    status: Option<&ModelForwarderStatus>,
    now: jiff::Timestamp,
) -> Option<Duration> {
    let s = status?;
    let at = s.last_scale_time.as_ref()?.0;
    let reason = s.last_scale_reason.as_deref()?;
    let (from, rest) = reason.split_once(" → ")?;
    let to = rest.split_whitespace().next()?;
    let (from, to): (u32, u32) = (from.trim().parse().ok()?, to.parse().ok()?);
    if to <= from {
        return None;
    }
    Duration::try_from(now.duration_since(at)).ok()
}

/// Field managers, other than the operator's two (the reconciler's bounds,
/// the autoscaler's count), that own the Deployment's `spec.replicas`
/// (from `managedFields`): an HPA (`kube-controller-manager` on the scale
/// subresource) or `kubectl scale deployment`. The autoscaler's forced
/// apply takes the field back, so a manager listed here wrote it since the
/// autoscaler's last scale.
pub fn foreign_replica_managers(d: &Deployment) -> Vec<String> {
    let ours = [SCALER_FIELD_MANAGER, AUTOSCALER_FIELD_MANAGER];
    let mut out: Vec<String> = d
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| !m.manager.as_deref().is_some_and(|n| ours.contains(&n)))
        .filter(|m| {
            m.fields_v1
                .as_ref()
                .and_then(|f| f.0.get("f:spec"))
                .and_then(|spec| spec.get("f:replicas"))
                .is_some()
        })
        .map(|m| {
            let name = m.manager.clone().unwrap_or_else(|| "(unnamed)".into());
            match m.subresource.as_deref() {
                Some(sub) if !sub.is_empty() => format!("{name} (/{sub})"),
                _ => name,
            }
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// A forwarder Deployment and its pods, read from the API server at each
/// evaluation (the loop test harness; the operator reads its caches through
/// [`CachedDeployment`]).
pub struct DeploymentTarget {
    pub deployments: Api<Deployment>,
    pub pods: Api<Pod>,
    pub name: String,
}

#[async_trait]
impl ScaleTarget for DeploymentTarget {
    async fn state(&self) -> Result<TargetState, ScaleError> {
        let err = |e: kube::Error| ScaleError(e.to_string());
        let d = self.deployments.get(&self.name).await.map_err(err)?;
        // Pods that exist and are not terminating: series from any other
        // pod are phantom load.
        let pods = self
            .pods
            .list(&ListParams::default().labels(&selector_string(&self.name)))
            .await
            .map_err(err)?;
        let live_pods = pods
            .items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        Ok(state_of(&d, live_pods))
    }

    async fn scale(&self, replicas: u32) -> Result<(), ScaleError> {
        scale(&self.deployments, &self.name, replicas).await
    }
}

/// Sets a Deployment's replicas, under the autoscaler's field manager: the
/// reconciler's apply of the Deployment never contains them, and the
/// reconciler's bounds (`SCALER_FIELD_MANAGER`) write them only when a
/// count leaves `[min, max]`. Both applies are forced, so neither ever
/// gets a conflict: the last writer owns the field (both, when they set
/// the same count), and `managedFields` says which set the current count.
async fn scale(api: &Api<Deployment>, name: &str, replicas: u32) -> Result<(), ScaleError> {
    let body = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {"replicas": replicas},
    });
    api.patch(
        name,
        &PatchParams::apply(AUTOSCALER_FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map(|_| ())
    .map_err(|e| ScaleError(e.to_string()))
}

/// The state of a Deployment as the autoscaler reads it (pure).
fn state_of(d: &Deployment, live_pods: std::collections::BTreeSet<String>) -> TargetState {
    let current = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0).max(0) as u32;
    let ready = d
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0)
        .max(0) as u32;
    TargetState {
        current,
        ready,
        live_pods,
        foreign_managers: foreign_replica_managers(d),
    }
}

/// A forwarder Deployment read from the autoscaler's caches (the
/// operator's target): no API request to observe it, one apply to scale.
pub struct CachedDeployment<'a> {
    pub cluster: &'a Cluster,
    /// For scaling.
    pub api: Api<Deployment>,
    pub namespace: String,
    pub name: String,
}

#[async_trait]
impl ScaleTarget for CachedDeployment<'_> {
    async fn state(&self) -> Result<TargetState, ScaleError> {
        let d = self
            .cluster
            .deployment(&self.namespace, &self.name)
            .ok_or_else(|| {
                ScaleError(format!(
                    "no Deployment {}/{} in the cache yet",
                    self.namespace, self.name
                ))
            })?;
        Ok(state_of(
            &d,
            self.cluster.live_pods(&self.namespace, &self.name),
        ))
    }

    async fn scale(&self, replicas: u32) -> Result<(), ScaleError> {
        scale(&self.api, &self.name, replicas).await
    }
}

fn condition(
    previous: Option<&ModelForwarderStatus>,
    type_: &str,
    on: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = if on { "True" } else { "False" };
    // Keep the transition time while the status stays the same.
    let since = previous
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
        .filter(|c| c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: since,
    }
}

/// Whether a condition of this type is currently True.
pub fn is_true(status: Option<&ModelForwarderStatus>, type_: &str) -> bool {
    status
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
        .is_some_and(|c| c.status == "True")
}

/// The status the autoscaler applies after an evaluation (pure).
pub fn status_patch(mf: &ModelForwarder, e: &Evaluation, now: &Time) -> Value {
    let prev = mf.status.as_ref();
    let gen = mf.metadata.generation;
    let d = &e.decision;
    let o = &e.observed;
    let breach_msg = d.breach.map_or_else(
        || "within the SLO".to_string(),
        |b| {
            let mut parts = Vec::new();
            if let Some((v, slo)) = b.p99_ms {
                parts.push(format!("P99 {v:.0} ms > {slo:.0} ms"));
            }
            if let Some((v, slo)) = b.ttft_ms {
                parts.push(format!("TTFT P99 {v:.0} ms > {slo:.0} ms"));
            }
            if let Some((v, max)) = b.error_rate {
                parts.push(format!("error rate {v:.4} > {max:.4}"));
            }
            if let Some((v, slo)) = b.queue_delay_s {
                let backlog = o.backlog.unwrap_or_default();
                parts.push(if v.is_finite() {
                    format!("queue delay {v:.0} s > {slo:.0} s ({backlog:.0} jobs waiting)")
                } else {
                    format!("queue delay unbounded > {slo:.0} s ({backlog:.0} jobs waiting, arriving faster than the replicas run them)")
                });
            }
            parts.join("; ")
        },
    );
    let conditions = vec![
        condition(
            prev,
            SLO_BREACHED,
            d.breach.is_some(),
            if d.breach.is_some() {
                "Breached"
            } else {
                "WithinSLO"
            },
            breach_msg,
            gen,
            now,
        ),
        condition(
            prev,
            METRICS_AVAILABLE,
            d.metrics_available,
            match (&e.metrics_error, d.metrics_available) {
                (_, true) => "MetricsRead",
                (Some(err), false) => err.reason,
                (None, false) => "NoData",
            },
            match (&e.metrics_error, d.metrics_available) {
                (Some(err), _) => format!("holding replicas: {}", err.message),
                (None, false) => "holding replicas: no series for this resource's pods".into(),
                (None, true) => format!("{} pod(s) reporting", o.reporting),
            },
            gen,
            now,
        ),
        condition(
            prev,
            UPSTREAM_SLOW,
            d.upstream_slow,
            if d.upstream_slow {
                "UpstreamLatency"
            } else {
                "UpstreamOk"
            },
            if d.upstream_slow {
                let ms = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.0} ms"));
                format!(
                    "the forwarder's own P99 ({}) is within its share and it is not saturated; the breach comes from the upstream (P99 {}, error rate {}): more replicas would not help",
                    ms(o.own_p99_ms),
                    ms(o.upstream_p99_ms),
                    o.error_rate.map_or("n/a".into(), |v| format!("{v:.4}")),
                )
            } else {
                "the upstream does not explain an SLO breach".into()
            },
            gen,
            now,
        ),
        {
            let held = d.reason == Reason::WaitingForReady;
            let waited = d.not_ready_for.unwrap_or_default().as_secs();
            condition(
                prev,
                SCALING_LIMITED,
                held,
                match d.reason {
                    Reason::WaitingForReady => "WaitingForReady",
                    Reason::ReadyTimeout => "ReadyTimeout",
                    _ => "NotLimited",
                },
                match d.reason {
                    Reason::WaitingForReady => format!(
                        "scale-up held: {} of {} replicas Ready after {waited}s (held for at most {}s)",
                        e.ready,
                        e.from,
                        policy_for(&mf.spec).ready_timeout.as_secs(),
                    ),
                    Reason::ReadyTimeout => format!(
                        "replicas not Ready for {waited}s: scaled up beside them; check why they do not become Ready"
                    ),
                    _ => "scale-ups are not held".into(),
                },
                gen,
                now,
            )
        },
        condition(
            prev,
            SCALE_CONFLICT,
            !e.foreign_managers.is_empty(),
            if e.foreign_managers.is_empty() {
                "NoConflict"
            } else {
                "ForeignReplicaManager"
            },
            if e.foreign_managers.is_empty() {
                "only the autoscaler sets the Deployment's replicas".into()
            } else {
                format!(
                    "{} also set the Deployment's spec.replicas (an HPA or kubectl scale deployment?): remove it, or pin replicas with spec.replicas.desired",
                    e.foreign_managers.join(", ")
                )
            },
            gen,
            now,
        ),
    ];
    let mut status = json!({
        "desiredReplicas": d.desired,
        "conditions": conditions,
    });
    if let (Some(qps), Some(err)) = (o.qps, o.error_rate) {
        let mut m = json!({"qps": qps, "errorRate": err, "observedAt": now});
        let (backlog, delay, per_replica) = match d.queue {
            QueueNeed::Sized {
                backlog,
                per_replica,
                delay_s,
                ..
            } => (Some(backlog), Some(delay_s), per_replica),
            QueueNeed::UnknownCapacity { backlog } | QueueNeed::NotCredible { backlog, .. } => {
                (Some(backlog), None, None)
            }
            QueueNeed::Off | QueueNeed::Missing => (None, None, None),
        };
        for (key, v) in [
            ("p99LatencyMs", o.p99_ms),
            ("ownP99LatencyMs", o.own_p99_ms),
            ("ttftP99Ms", o.ttft_p99_ms),
            ("queueBacklog", backlog),
            ("queueDelaySeconds", delay.filter(|d| d.is_finite())),
            ("jobsPerSecondPerReplica", per_replica),
        ] {
            if let Some(v) = v {
                m[key] = json!(v);
            }
        }
        status["metrics"] = m;
    }
    if e.scaled {
        status["lastScaleTime"] = json!(now);
        status["lastScaleReason"] = json!(explain(e));
    } else if let Some(p) = prev {
        // Keep owning them, unchanged, so the apply does not drop them.
        if let Some(t) = &p.last_scale_time {
            status["lastScaleTime"] = json!(t);
        }
        if let Some(r) = &p.last_scale_reason {
            status["lastScaleReason"] = json!(r);
        }
    }
    if let Some((since, peak)) = e.stabilizing {
        let peak = i32::try_from(peak).unwrap_or(i32::MAX);
        // The same peak: the stored one stands (its `since` is the start of
        // the same run; the history's start moves as it is pruned).
        status["stabilization"] = match prev.and_then(|p| p.stabilization.as_ref()) {
            Some(s) if s.peak_replicas == peak => json!(s),
            _ => json!({"since": Time(since), "peakReplicas": peak}),
        };
    }
    json!({
        "apiVersion": ModelForwarder::api_version(&()),
        "kind": ModelForwarder::kind(&()),
        "metadata": {"name": mf.metadata.name},
        "status": status,
    })
}

/// `up`, `down` or `none`, for the decisions metric.
pub fn direction(e: &Evaluation) -> &'static str {
    match e.decision.desired.cmp(&e.from) {
        std::cmp::Ordering::Greater => "up",
        std::cmp::Ordering::Less => "down",
        std::cmp::Ordering::Equal => "none",
    }
}

pub fn reason_label(r: Reason) -> &'static str {
    match r {
        Reason::Stable => "stable",
        Reason::Capacity => "capacity",
        Reason::LatencySlo => "latency_slo",
        Reason::ErrorSlo => "error_slo",
        Reason::WaitingForReady => "waiting_for_ready",
        Reason::ReadyTimeout => "ready_timeout",
        Reason::Settling => "settling",
        Reason::Stabilizing => "stabilizing",
        Reason::ScaleDown => "scale_down",
        Reason::QueueDelay => "queue_delay",
        Reason::NoData => "no_data",
        Reason::Bounds => "bounds",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoscale::evaluate::MetricsFailure;
    use crate::autoscale::policy::{Decision, Observed};

    fn deployment(managed: Value) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "bot", "managedFields": managed},
        }))
        .expect("deployment")
    }

    #[test]
    fn the_last_scale_up_is_read_back_from_status() {
        let status = |reason: &str| -> ModelForwarderStatus {
            serde_json::from_value(json!({
                "lastScaleTime": "2026-12-01T00:00:00Z",
                "lastScaleReason": reason,
            }))
            .unwrap()
        };
        let now: jiff::Timestamp = "2026-12-01T00:00:40Z".parse().unwrap();
        let up = status("4 → 8 (LatencySlo): qps=200.0 p99=900.0ms");
        assert_eq!(
            last_scale_up_ago(Some(&up), now),
            Some(Duration::from_secs(40))
        );
        let down = status("8 → 6 (ScaleDown): qps=10.0");
        assert_eq!(last_scale_up_ago(Some(&down), now), None);
        assert_eq!(last_scale_up_ago(Some(&status("garbage")), now), None);
        assert_eq!(last_scale_up_ago(None, now), None);
        let before: jiff::Timestamp = "2026-11-30T00:00:00Z".parse().unwrap();
        assert_eq!(last_scale_up_ago(Some(&up), before), None, "in the future");
    }

    #[test]
    fn foreign_managers_of_replicas_come_from_managed_fields() {
        let replicas = json!({"f:spec": {"f:replicas": {}}});
        let d = deployment(json!([
            {"manager": "modelforwarder-operator", "operation": "Apply",
             "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:template": {}}}},
            {"manager": SCALER_FIELD_MANAGER, "operation": "Apply",
             "fieldsType": "FieldsV1", "fieldsV1": replicas},
            {"manager": AUTOSCALER_FIELD_MANAGER, "operation": "Apply",
             "fieldsType": "FieldsV1", "fieldsV1": replicas},
        ]));
        assert!(
            foreign_replica_managers(&d).is_empty(),
            "the bounds and the autoscaler are both the operator"
        );
        let d = deployment(json!([
            {"manager": SCALER_FIELD_MANAGER, "operation": "Apply",
             "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}},
            {"manager": "kube-controller-manager", "operation": "Update", "subresource": "scale",
             "fieldsType": "FieldsV1", "fieldsV1": replicas},
            {"manager": "kubectl", "operation": "Update",
             "fieldsType": "FieldsV1", "fieldsV1": replicas},
        ]));
        assert_eq!(
            foreign_replica_managers(&d),
            ["kube-controller-manager (/scale)", "kubectl"]
        );
    }

    /// A scale-down held by the window is kept in status for a new
    /// leader, written once: the same peak on later evaluations (whose
    /// history start moves as it is pruned) writes nothing.
    #[test]
    fn a_held_scale_down_is_kept_in_status_and_written_once() {
        use crate::autoscale::status_change::needs_write;
        let now = Time(jiff::Timestamp::UNIX_EPOCH + jiff::SignedDuration::from_secs(1000));
        let since = jiff::Timestamp::UNIX_EPOCH + jiff::SignedDuration::from_secs(900);
        let mut e = evaluation(Reason::Stabilizing, Observed::default());
        e.stabilizing = Some((since, 2));
        let mut mf = resource();
        let p = status_patch(&mf, &e, &now);
        assert_eq!(
            p["status"]["stabilization"],
            json!({"since": Time(since), "peakReplicas": 2})
        );
        let first: crate::crd::ModelForwarderStatus =
            serde_json::from_value(p["status"].clone()).unwrap();
        assert!(needs_write(mf.status.as_ref(), &first, now.0));
        mf.status = Some(first.clone());
        e.stabilizing = Some((since + jiff::SignedDuration::from_secs(15), 2));
        let p = status_patch(&mf, &e, &now);
        let next: crate::crd::ModelForwarderStatus =
            serde_json::from_value(p["status"].clone()).unwrap();
        assert_eq!(next.stabilization, first.stabilization);
        assert!(!needs_write(Some(&first), &next, now.0));
        // A higher peak, or the hold ending, is written.
        e.stabilizing = Some((since, 3));
        let p = status_patch(&mf, &e, &now);
        let next: crate::crd::ModelForwarderStatus =
            serde_json::from_value(p["status"].clone()).unwrap();
        assert!(needs_write(Some(&first), &next, now.0));
        e.stabilizing = None;
        let p = status_patch(&mf, &e, &now);
        assert!(p["status"].get("stabilization").is_none());
    }

    fn resource() -> ModelForwarder {
        serde_json::from_value(json!({
            "apiVersion": "llm.forwarder.dev/v1alpha1", "kind": "ModelForwarder",
            "metadata": {"name": "bot", "namespace": "ai", "generation": 1},
            "spec": {"upstreams": [{"name": "m", "provider": "mock", "models": ["mock"]}],
                     "slo": {"ttftP99Ms": 800}}
        }))
        .expect("resource")
    }

    fn evaluation(reason: Reason, observed: Observed) -> Evaluation {
        Evaluation {
            from: 3,
            ready: 2,
            decision: Decision {
                desired: 3,
                reason,
                recommendation: 3,
                breach: None,
                upstream_slow: false,
                metrics_available: observed.qps.is_some(),
                not_ready_for: Some(Duration::from_secs(40)),
                queue: QueueNeed::Off,
            },
            observed,
            metrics_error: None,
            stabilizing: None,
            scaled: false,
            foreign_managers: vec![],
        }
    }

    fn cond<'a>(patch: &'a Value, type_: &str) -> &'a Value {
        patch["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == type_)
            .unwrap()
    }

    #[test]
    fn a_queue_slo_is_read_only_with_kafka_and_its_breach_is_explained() {
        let mut mf = resource();
        mf.spec.slo.max_queue_delay_seconds = Some(60);
        assert_eq!(
            policy_for(&mf.spec).queue,
            None,
            "embedded queue: no signal"
        );
        mf.spec.async_jobs = serde_json::from_value(json!({
            "bootstrapServers": ["kafka:9092"], "workers": 8
        }))
        .expect("async");
        assert_eq!(
            policy_for(&mf.spec).queue,
            Some(QueueSlo {
                max_delay_s: 60.0,
                workers_per_replica: 8.0,
                lag_includes_running: true,
            })
        );
        let now = Time(jiff::Timestamp::UNIX_EPOCH);
        let seen = Observed {
            qps: Some(5.0),
            error_rate: Some(0.0),
            backlog: Some(1200.0),
            job_arrivals: Some(10.0),
            reporting: 3,
            ..Default::default()
        };
        let mut e = evaluation(Reason::QueueDelay, seen);
        e.decision.desired = 5;
        e.decision.queue = QueueNeed::Sized {
            replicas: 5,
            backlog: 1200.0,
            per_replica: Some(4.0),
            delay_s: 600.0,
        };
        e.decision.breach = Some(crate::autoscale::policy::Breach {
            p99_ms: None,
            ttft_ms: None,
            error_rate: None,
            queue_delay_s: Some((600.0, 60.0)),
        });
        e.scaled = true;
        let p = status_patch(&mf, &e, &now);
        let breached = cond(&p, SLO_BREACHED);
        assert_eq!(breached["status"], "True");
        assert_eq!(
            breached["message"],
            "queue delay 600 s > 60 s (1200 jobs waiting)"
        );
        let m = &p["status"]["metrics"];
        assert_eq!(
            (
                &m["queueBacklog"],
                &m["queueDelaySeconds"],
                &m["jobsPerSecondPerReplica"]
            ),
            (&json!(1200.0), &json!(600.0), &json!(4.0))
        );
        // The names are the CRD's (the API server would prune others).
        let typed: ModelForwarderStatus =
            serde_json::from_value(p["status"].clone()).expect("a status");
        let typed = typed.metrics.expect("metrics");
        assert_eq!(
            (
                typed.queue_backlog,
                typed.queue_delay_seconds,
                typed.jobs_per_second_per_replica
            ),
            (Some(1200.0), Some(600.0), Some(4.0))
        );
        let reason = p["status"]["lastScaleReason"].as_str().unwrap();
        assert!(
            reason.starts_with("3 → 5 (QueueDelay)")
                && reason.contains("backlog=1200 job_arrivals=10.0/s jobs_per_replica=4.0/s queue_delay=600s queue_needs=5"),
            "{reason}"
        );
        assert_eq!(reason_label(Reason::QueueDelay), "queue_delay");
        // Growing without bound: said so, no number in the status.
        e.decision.queue = QueueNeed::Sized {
            replicas: 5,
            backlog: 1200.0,
            per_replica: Some(4.0),
            delay_s: f64::INFINITY,
        };
        e.decision.breach = e.decision.breach.map(|b| crate::autoscale::policy::Breach {
            queue_delay_s: Some((f64::INFINITY, 60.0)),
            ..b
        });
        let p = status_patch(&mf, &e, &now);
        assert!(cond(&p, SLO_BREACHED)["message"]
            .as_str()
            .unwrap()
            .starts_with("queue delay unbounded > 60 s"));
        assert!(p["status"]["metrics"].get("queueDelaySeconds").is_none());
    }

    #[test]
    fn status_says_why_scaling_is_held_who_else_scales_and_shows_ttft() {
        let now = Time(jiff::Timestamp::UNIX_EPOCH);
        let seen = Observed {
            qps: Some(0.0),
            error_rate: Some(0.0),
            ttft_p99_ms: Some(420.0),
            own_p99_ms: Some(0.4),
            reporting: 2,
            ..Default::default()
        };
        let mut e = evaluation(Reason::WaitingForReady, seen);
        e.foreign_managers = vec!["kubectl".into()];
        let p = status_patch(&resource(), &e, &now);
        let limited = cond(&p, SCALING_LIMITED);
        assert_eq!(
            (&limited["status"], &limited["reason"]),
            (&json!("True"), &json!("WaitingForReady"))
        );
        assert_eq!(
            limited["message"],
            "scale-up held: 2 of 3 replicas Ready after 40s (held for at most 300s)"
        );
        let conflict = cond(&p, SCALE_CONFLICT);
        assert_eq!(conflict["status"], "True");
        assert!(conflict["message"]
            .as_str()
            .unwrap()
            .starts_with("kubectl also set"));
        // Zero traffic: metrics shown without a P99.
        let m = &p["status"]["metrics"];
        assert_eq!((&m["qps"], &m["ttftP99Ms"]), (&json!(0.0), &json!(420.0)));
        assert!(m.get("p99LatencyMs").is_none());
        assert_eq!(policy_for(&resource().spec).ttft_slo_ms, Some(800.0));

        let mut e = evaluation(Reason::NoData, Observed::default());
        e.metrics_error = Some(MetricsFailure {
            reason: "QueryTimeout",
            message: "prometheus did not answer".into(),
        });
        let p = status_patch(&resource(), &e, &now);
        let available = cond(&p, METRICS_AVAILABLE);
        assert_eq!(
            (&available["status"], &available["reason"]),
            (&json!("False"), &json!("QueryTimeout"))
        );
        assert_eq!(cond(&p, SCALING_LIMITED)["status"], "False");
    }
}
