//! The autoscaler's loop in the operator: every interval, and at once when
//! the alert webhook names a resource, evaluate each ModelForwarder and
//! record what was decided (Deployment replicas, status, Events, metrics).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource, ResourceExt};
use tokio::sync::mpsc;

use super::alerts::Key;
use super::evaluate::{explain, Evaluation, Evaluator, MetricsSource, ScaleError};
use super::metrics::{default_selector, Target};
use super::rules;
use super::workload::{
    direction, is_true, policy_for, reason_label, status_patch, DeploymentTarget,
    AUTOSCALER_FIELD_MANAGER, METRICS_AVAILABLE, SLO_BREACHED, UPSTREAM_SLOW,
};
use crate::crd::ModelForwarder;
use crate::telemetry::Metrics;

pub struct Autoscaler {
    pub client: Client,
    /// Watch one namespace, or all.
    pub namespace: Option<String>,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub source: Arc<dyn MetricsSource>,
    /// Evaluation interval (default: one 15 s scrape interval).
    pub interval: Duration,
    /// PromQL rate window (default 1 m: four 15 s scrapes, so one missed
    /// scrape never empties it).
    pub window: Duration,
    /// Series older than this are stale (default 45 s: three scrapes).
    pub max_age: Duration,
    /// Create a PrometheusRule with the SLO alerts per resource.
    pub prometheus_rules: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("listing ModelForwarders: {0}")]
    List(kube::Error),
    #[error(transparent)]
    Scale(#[from] ScaleError),
    #[error("writing the status of {name}: {source}")]
    Status { name: String, source: kube::Error },
}

impl Autoscaler {
    fn resources(&self) -> Api<DeserializeGuard<ModelForwarder>> {
        match &self.namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        }
    }

    /// Runs until the process ends.
    pub async fn run(self, mut trigger: mpsc::Receiver<Key>) {
        let mut evaluators: HashMap<Key, Evaluator> = HashMap::new();
        // The last rule applied per resource, so an unchanged one is not re-sent.
        let mut rules_applied: HashMap<Key, serde_json::Value> = HashMap::new();
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let only = tokio::select! {
                _ = tick.tick() => None,
                Some(key) = trigger.recv() => Some(key),
            };
            let list = match self.resources().list(&ListParams::default()).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %Error::List(e), "autoscaler: cannot list resources");
                    continue;
                }
            };
            // Objects that fail to deserialise are the reconciler's to report.
            let resources: Vec<ModelForwarder> =
                list.items.into_iter().filter_map(|g| g.0.ok()).collect();
            if only.is_none() {
                evaluators.retain(|k, _| resources.iter().any(|mf| key(mf) == *k));
            }
            for mf in &resources {
                let k = key(mf);
                if only.as_ref().is_some_and(|o| *o != k) {
                    continue;
                }
                if self.prometheus_rules {
                    let rule = rules::render(mf);
                    if rules_applied.get(&k) != Some(&rule) {
                        match rules::apply(self.client.clone(), mf, &rule).await {
                            Ok(()) => {
                                rules_applied.insert(k.clone(), rule);
                            }
                            Err(e) => tracing::warn!(
                                name = %mf.name_any(),
                                error = %e,
                                "cannot apply the PrometheusRule (are the prometheus-operator CRDs installed?)"
                            ),
                        }
                    }
                }
                let ev = evaluators
                    .entry(k)
                    .or_insert_with(|| Evaluator::new(policy_for(&mf.spec)));
                match self.evaluate_one(mf, ev).await {
                    Ok(Some(e)) => tracing::info!(
                        namespace = %mf.namespace().unwrap_or_default(),
                        name = %mf.name_any(),
                        decision = %explain(&e),
                        "autoscaler evaluated"
                    ),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(name = %mf.name_any(), error = %e, "autoscaler evaluation failed")
                    }
                }
            }
        }
    }

    /// Evaluates one resource and records the outcome. `None`: not
    /// autoscaled now (replicas pinned with `kubectl scale`, or deleting).
    pub async fn evaluate_one(
        &self,
        mf: &ModelForwarder,
        ev: &mut Evaluator,
    ) -> Result<Option<Evaluation>, Error> {
        if mf.spec.replicas.desired.is_some() || mf.metadata.deletion_timestamp.is_some() {
            return Ok(None);
        }
        let ns = mf.namespace().unwrap_or_default();
        let name = mf.name_any();
        ev.policy = policy_for(&mf.spec);
        let workload = DeploymentTarget {
            deployments: Api::namespaced(self.client.clone(), &ns),
            pods: Api::namespaced(self.client.clone(), &ns),
            name: name.clone(),
        };
        let scaling = &mf.spec.scaling;
        let target = Target {
            selector: scaling
                .metrics_selector
                .clone()
                .unwrap_or_else(|| default_selector(&ns, &name)),
            window: scaling
                .rate_window_seconds
                .map_or(self.window, |s| Duration::from_secs(u64::from(s))),
            live_pods: None,
            max_age: self.max_age,
        };
        let e = ev
            .evaluate(self.source.as_ref(), &target, &workload)
            .await?;
        let d = &e.decision;
        self.metrics
            .scale_decisions
            .with_label_values(&[direction(&e), reason_label(d.reason)])
            .inc();
        if d.breach.is_some() {
            self.metrics
                .slo_breaches
                .with_label_values(&[&ns, &name])
                .inc();
        }

        let now = Time(jiff::Timestamp::now());
        let patch = status_patch(mf, &e, &now);
        Api::<ModelForwarder>::namespaced(self.client.clone(), &ns)
            .patch_status(
                &name,
                &PatchParams::apply(AUTOSCALER_FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map_err(|source| Error::Status {
                name: name.clone(),
                source,
            })?;

        let prev = mf.status.as_ref();
        let conditions = &patch["status"]["conditions"];
        let mut events = Vec::new();
        if e.scaled {
            events.push((EventType::Normal, "Scaled", explain(&e)));
        }
        if d.breach.is_some() && !is_true(prev, SLO_BREACHED) {
            events.push((EventType::Warning, SLO_BREACHED, message(conditions, 0)));
        }
        if d.upstream_slow && !is_true(prev, UPSTREAM_SLOW) {
            events.push((EventType::Warning, UPSTREAM_SLOW, message(conditions, 2)));
        }
        if !d.metrics_available && is_true(prev, METRICS_AVAILABLE) {
            events.push((
                EventType::Warning,
                "MetricsUnavailable",
                message(conditions, 1),
            ));
        }
        let regarding = mf.object_ref(&());
        for (type_, reason, note) in events {
            let ev = Event {
                type_,
                reason: reason.into(),
                note: Some(note.chars().take(1000).collect()),
                action: "Autoscale".into(),
                secondary: None,
            };
            if let Err(err) = self.recorder.publish(&ev, &regarding).await {
                tracing::warn!(error = %err, reason, "publishing an Event");
            }
        }
        Ok(Some(e))
    }
}

fn key(mf: &ModelForwarder) -> Key {
    Key {
        namespace: mf.namespace().unwrap_or_default(),
        name: mf.name_any(),
    }
}

fn message(conditions: &serde_json::Value, i: usize) -> String {
    conditions[i]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}
