//! The Kubernetes side of the autoscaler: a forwarder Deployment as a
//! [`ScaleTarget`], the policy from a resource's spec, and the status the
//! autoscaler owns (desired replicas, metrics, last scale, and the
//! `SLOBreached`, `MetricsAvailable`, `UpstreamSlow` conditions).

use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::Resource;
use serde_json::{json, Value};

use super::evaluate::{explain, Evaluation, ScaleError, ScaleTarget, TargetState};
use super::policy::{Policy, Reason};
use crate::crd::{ModelForwarder, ModelForwarderSpec, ModelForwarderStatus};
use crate::render::labels::{selector_string, SCALER_FIELD_MANAGER};

/// Field manager of the status fields the autoscaler owns.
pub const AUTOSCALER_FIELD_MANAGER: &str = "modelforwarder-operator-autoscaler";
pub const SLO_BREACHED: &str = "SLOBreached";
pub const METRICS_AVAILABLE: &str = "MetricsAvailable";
pub const UPSTREAM_SLOW: &str = "UpstreamSlow";

/// The autoscaling policy a resource asks for.
pub fn policy_for(spec: &ModelForwarderSpec) -> Policy {
    let min = spec.replicas.min.max(1) as u32;
    Policy::new(
        min,
        (spec.replicas.max.max(1) as u32).max(min),
        f64::from(spec.slo.p99_latency_ms),
        spec.slo.max_error_rate,
        f64::from(spec.slo.target_qps_per_replica),
        Duration::from_secs(u64::from(spec.scaling.scale_down_stabilization_seconds)),
        spec.scaling.max_scale_up_step,
    )
}

/// A forwarder Deployment and its pods.
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
        let current = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0).max(0) as u32;
        let ready = d
            .status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0)
            .max(0) as u32;
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
        Ok(TargetState {
            current,
            ready,
            live_pods,
        })
    }

    async fn scale(&self, replicas: u32) -> Result<(), ScaleError> {
        // Replicas are owned by this field manager alone; the reconciler's
        // apply never contains them, so the two never fight.
        let body = json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": self.name},
            "spec": {"replicas": replicas},
        });
        self.deployments
            .patch(
                &self.name,
                &PatchParams::apply(SCALER_FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await
            .map(|_| ())
            .map_err(|e| ScaleError(e.to_string()))
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
            if let Some((v, max)) = b.error_rate {
                parts.push(format!("error rate {v:.4} > {max:.4}"));
            }
            parts.join("; ")
        },
    );
    let conditions = vec![
        condition(
            prev,
            SLO_BREACHED,
            d.breach.is_some(),
            if d.breach.is_some() { "Breached" } else { "WithinSLO" },
            breach_msg,
            gen,
            now,
        ),
        condition(
            prev,
            METRICS_AVAILABLE,
            d.metrics_available,
            if d.metrics_available { "MetricsRead" } else { "NoData" },
            match (&e.metrics_error, d.metrics_available) {
                (Some(err), _) => format!("holding replicas: {err}"),
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
            if d.upstream_slow { "UpstreamLatency" } else { "UpstreamOk" },
            match (o.p99_ms, o.upstream_p99_ms, d.upstream_slow) {
                (Some(p), Some(u), true) => format!(
                    "the upstream's P99 ({u:.0} ms) explains the forwarder's ({p:.0} ms); more replicas would not help"
                ),
                _ => "the upstream does not explain the latency".into(),
            },
            gen,
            now,
        ),
    ];
    let mut status = json!({
        "desiredReplicas": d.desired,
        "conditions": conditions,
    });
    if let (Some(qps), Some(p99), Some(err)) = (o.qps, o.p99_ms, o.error_rate) {
        status["metrics"] =
            json!({"p99LatencyMs": p99, "qps": qps, "errorRate": err, "observedAt": now});
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
        Reason::Stabilizing => "stabilizing",
        Reason::ScaleDown => "scale_down",
        Reason::NoData => "no_data",
        Reason::Bounds => "bounds",
    }
}
