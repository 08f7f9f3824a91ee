//! The autoscaler's loop in the operator: every interval, and at once when
//! the alert webhook names a resource, evaluate each ModelForwarder and
//! record what was decided (Deployment replicas, status, Events, metrics).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource, ResourceExt};
use tokio::sync::mpsc;

use super::alerts::Key;
use super::evaluate::{explain, Evaluation, Evaluator, MetricsSource, ScaleError};
use super::metrics::{default_selector, validate_selector, Target};
use super::rules;
use super::workload::{
    direction, is_true, policy_for, reason_label, status_patch, DeploymentTarget,
    AUTOSCALER_FIELD_MANAGER, METRICS_AVAILABLE, SCALE_CONFLICT, SLO_BREACHED, UPSTREAM_SLOW,
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
    #[error("the evaluation did not finish within {0:?}")]
    Timeout(Duration),
}

/// Resources evaluated at once: enough that one slow resource (a hung
/// query, a slow API call) never delays the others by more than its own
/// timeout, few enough to bound the load on Prometheus and the API server.
const CONCURRENT_EVALUATIONS: usize = 16;

impl Autoscaler {
    fn resources(&self) -> Api<DeserializeGuard<ModelForwarder>> {
        match &self.namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        }
    }

    /// An evaluation round older than this means the loop is stalled
    /// (`/healthz` then fails): three intervals plus one evaluation's bound.
    pub fn stall_limit(&self) -> Duration {
        self.interval * 4
    }

    /// Runs until the process ends.
    pub async fn run(self, mut trigger: mpsc::Receiver<Key>) {
        self.metrics.autoscaler_started(self.stall_limit());
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
            let listed =
                tokio::time::timeout(self.interval, self.resources().list(&ListParams::default()))
                    .await;
            let list = match listed {
                Ok(Ok(l)) => l,
                Ok(Err(e)) => {
                    tracing::warn!(error = %Error::List(e), "autoscaler: cannot list resources");
                    continue;
                }
                Err(_) => {
                    tracing::warn!(error = %Error::Timeout(self.interval), "autoscaler: cannot list resources");
                    continue;
                }
            };
            // Objects that fail to deserialise are the reconciler's to report.
            let resources: Vec<ModelForwarder> =
                list.items.into_iter().filter_map(|g| g.0.ok()).collect();
            if only.is_none() {
                evaluators.retain(|k, _| resources.iter().any(|mf| key(mf) == *k));
            }
            let this = &self;
            let mut jobs = Vec::new();
            for mf in &resources {
                let k = key(mf);
                if only.as_ref().is_some_and(|o| *o != k) {
                    continue;
                }
                let selector_ok = mf
                    .spec
                    .scaling
                    .metrics_selector
                    .as_deref()
                    .is_none_or(|s| validate_selector(s).is_ok());
                if self.prometheus_rules && selector_ok {
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
                let mut ev = evaluators
                    .remove(&k)
                    .unwrap_or_else(|| Evaluator::new(policy_for(&mf.spec)));
                jobs.push(async move {
                    // Bounded, so one stuck resource cannot stall the round.
                    let r = tokio::time::timeout(this.interval, this.evaluate_one(mf, &mut ev))
                        .await
                        .unwrap_or(Err(Error::Timeout(this.interval)));
                    (k, ev, r, mf)
                });
            }
            let done: Vec<_> = futures::stream::iter(jobs)
                .buffer_unordered(CONCURRENT_EVALUATIONS)
                .collect()
                .await;
            for (k, ev, r, mf) in done {
                evaluators.insert(k, ev);
                match r {
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
            self.metrics.autoscaler_round_completed();
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
            ev.forget();
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
            queue: ev.policy.queue.is_some(),
        };
        // SLO steps wait a rate window and an interval after a scale-up
        // (requests queued before it still complete, slowly, just after);
        // three missed evaluations make a gap in the stabilization history.
        ev.policy.settle = target.window + self.interval;
        ev.policy.max_gap = self.interval * 3;
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
        if !e.foreign_managers.is_empty() && !is_true(prev, SCALE_CONFLICT) {
            events.push((EventType::Warning, SCALE_CONFLICT, message(conditions, 4)));
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
