//! The autoscaler in the operator: a scheduler of per-resource evaluations.
//! Each ModelForwarder is evaluated on its own schedule ([`Schedule`]) by a
//! bounded pool of workers, each evaluation bounded in time, reading the
//! cluster from watch-fed caches ([`Cluster`]); what was decided is
//! recorded (Deployment replicas, status when it changed, Events, metrics).
//! The loop itself never waits on an evaluation, so its liveness
//! (`/healthz`) says the loop runs, whatever Prometheus or the API server
//! do.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{EventType, Recorder};
use kube::{Client, Resource, ResourceExt};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;

use super::alerts::Key;
use super::cache::{key, Cluster};
use super::evaluate::{explain, Evaluation, Evaluator, MetricsSource, ScaleError};
use super::metrics::{default_selector, validate_selector, Target};
use super::rules;
use super::schedule::Schedule;
use super::status_change::needs_write;
use super::workload::{
    direction, is_true, last_scale_up_ago, policy_for, reason_label, status_patch,
    CachedDeployment, AUTOSCALER_FIELD_MANAGER, METRICS_AVAILABLE, SCALE_CONFLICT, SLO_BREACHED,
    UPSTREAM_SLOW,
};
use crate::crd::{ModelForwarder, ModelForwarderStatus};
use crate::telemetry::Metrics;

pub struct Autoscaler {
    pub client: Client,
    /// Watch these namespaces; empty: all.
    pub namespaces: Vec<String>,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub source: Arc<dyn MetricsSource>,
    /// Evaluation interval of each resource (default: one 15 s scrape
    /// interval).
    pub interval: Duration,
    /// PromQL rate window (default 1 m: four 15 s scrapes, so one missed
    /// scrape never empties it).
    pub window: Duration,
    /// Series older than this are stale (default 45 s: three scrapes).
    pub max_age: Duration,
    /// Create a PrometheusRule with the SLO alerts per resource.
    pub prometheus_rules: bool,
    /// When this replica, before it led, last saw the previous leader's
    /// lease change (the election's observed time): a stabilization window
    /// in progress in status is continued across the handover. `None`
    /// (unknown, or no election): the window starts again.
    pub handover: Option<std::time::Instant>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Scale(#[from] ScaleError),
    #[error("writing the status of {name}: {source}")]
    Status { name: String, source: kube::Error },
    #[error("the status rendered for {name} is not a ModelForwarder status: {source}")]
    StatusShape {
        name: String,
        source: serde_json::Error,
    },
    #[error("the evaluation did not finish within {0:?}")]
    Timeout(Duration),
}

/// Evaluations running at once. Each is bounded by the interval, so a hung
/// Prometheus holds at most this many workers for an interval; the others
/// keep their cadence as long as fewer resources hang than there are
/// workers. Also bounds the load on Prometheus and the API server.
pub const WORKERS: usize = 64;

/// How often the loop wakes at least: to pick up new and deleted resources
/// from the cache and to prove it is alive.
const TICK: Duration = Duration::from_secs(1);

/// What the autoscaler keeps per resource between evaluations.
struct Slot {
    evaluator: Evaluator,
    /// The PrometheusRule last applied, so an unchanged one is not re-sent.
    rule: Option<serde_json::Value>,
}

struct Done {
    key: Key,
    slot: Slot,
    started: Instant,
    outcome: Result<Option<Evaluation>, Error>,
    name: String,
    namespace: String,
}

/// Ends a spawned task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Autoscaler {
    /// `/healthz` fails when the loop has not run for this long: it wakes
    /// every second, so only a stopped (or blocked) loop gets there.
    pub fn stall_limit(&self) -> Duration {
        self.interval.max(Duration::from_secs(15)) * 4
    }

    /// Starts the caches and runs the scheduler until the future is dropped.
    pub async fn run(self, trigger: mpsc::Receiver<Key>) {
        let (cluster, feed) = Cluster::watch(&self.client, &self.namespaces);
        let _feed = AbortOnDrop(tokio::spawn(feed));
        self.metrics.autoscaler_started(self.stall_limit());
        // The loop is alive while the caches fill.
        let waiting = cluster.clone();
        let ready = async move { waiting.ready().await };
        tokio::pin!(ready);
        let mut beat = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                () = &mut ready => break,
                _ = beat.tick() => self.metrics.autoscaler_alive(),
            }
        }
        self.schedule(cluster, trigger).await;
    }

    /// The scheduler over filled caches.
    pub async fn schedule(self, cluster: Cluster, mut trigger: mpsc::Receiver<Key>) {
        // Whether rules can be applied at all, asked once: without the
        // prometheus-operator CRDs, one warning instead of one per resource
        // per evaluation.
        let rules_on = self.prometheus_rules
            && {
                let present = rules::available(&self.client).await;
                if !present {
                    tracing::warn!(
                    "--prometheus-rules: the API server serves no monitoring.coreos.com/v1 PrometheusRule (prometheus-operator CRDs not installed); no rules will be applied until the operator restarts"
                );
                }
                present
            };
        let this = Arc::new(self);
        let workers = Arc::new(Semaphore::new(WORKERS));
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
        let mut schedule = Schedule::new(this.interval);
        let mut slots: HashMap<Key, Slot> = HashMap::new();
        let mut beat = tokio::time::interval(TICK);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next = schedule.next_due().unwrap_or_else(|| Instant::now() + TICK);
            tokio::select! {
                _ = beat.tick() => {
                    this.metrics.autoscaler_alive();
                    let resources = cluster.resources();
                    let keys: Vec<Key> = resources.iter().map(key).collect();
                    for gone in schedule.sync(&keys, Instant::now()) {
                        slots.remove(&gone);
                    }
                }
                Some(k) = trigger.recv() => {
                    if schedule.alert(&k, Instant::now()) {
                        tracing::debug!(namespace = %k.namespace, name = %k.name, "alert: evaluating now");
                    }
                }
                Some(done) = done_rx.recv() => {
                    schedule.finished(&done.key, done.started, Instant::now());
                    this.report(&done);
                    // Dropped from the schedule while running: forget it.
                    if schedule.contains(&done.key) {
                        slots.insert(done.key, done.slot);
                    }
                }
                () = tokio::time::sleep_until(next) => {}
            }
            for k in schedule.take_due(Instant::now()) {
                let Some(mf) = cluster.resource(&k) else {
                    // Deleted since the last sync: the next one drops it.
                    schedule.finished(&k, Instant::now(), Instant::now());
                    continue;
                };
                let slot = slots.remove(&k).unwrap_or_else(|| {
                    let mut evaluator = Evaluator::new(policy_for(&mf.spec));
                    // A new leader (or a restart) settles after the last
                    // scale-up as the one that made it would have.
                    if let Some(ago) = last_scale_up_ago(mf.status.as_ref(), jiff::Timestamp::now())
                    {
                        evaluator.restore_scale_up(ago);
                    }
                    // And continues a scale-down window in progress.
                    let held = mf.status.as_ref().and_then(|s| s.stabilization.as_ref());
                    if let (Some(h), Some(seen)) = (held, this.handover) {
                        evaluator.restore_stabilizing(
                            h.since.0,
                            u32::try_from(h.peak_replicas).unwrap_or(0),
                            seen.elapsed(),
                            this.interval,
                        );
                    }
                    Slot {
                        evaluator,
                        rule: None,
                    }
                });
                let (this, cluster, workers, done_tx) = (
                    this.clone(),
                    cluster.clone(),
                    workers.clone(),
                    done_tx.clone(),
                );
                tokio::spawn(async move {
                    // The pool is never closed, so a permit always comes.
                    let _permit = workers.acquire_owned().await.ok();
                    let started = Instant::now();
                    let mut slot = slot;
                    let outcome = tokio::time::timeout(
                        this.interval,
                        this.evaluate_one(&cluster, &mf, &mut slot.evaluator),
                    )
                    .await
                    .unwrap_or(Err(Error::Timeout(this.interval)));
                    if rules_on {
                        this.apply_rule(&mf, &mut slot).await;
                    }
                    let _ = done_tx.send(Done {
                        key: k,
                        slot,
                        started,
                        outcome,
                        name: mf.name_any(),
                        namespace: mf.namespace().unwrap_or_default(),
                    });
                });
            }
        }
    }

    fn report(&self, done: &Done) {
        match &done.outcome {
            Ok(Some(e)) => tracing::debug!(
                namespace = %done.namespace,
                name = %done.name,
                decision = %explain(e),
                "autoscaler evaluated"
            ),
            Ok(None) => {}
            Err(e) => tracing::warn!(
                namespace = %done.namespace,
                name = %done.name,
                error = %e,
                "autoscaler evaluation failed"
            ),
        }
    }

    /// Applies the resource's PrometheusRule when it changed, bounded in
    /// time, after its evaluation (never delaying it). A failure is logged
    /// and retried at the next evaluation; a name taken by a rule this
    /// resource does not own is reported once (an Event) and checked again
    /// when the rule would change.
    async fn apply_rule(&self, mf: &ModelForwarder, slot: &mut Slot) {
        let selector_ok = mf
            .spec
            .scaling
            .metrics_selector
            .as_deref()
            .is_none_or(|s| validate_selector(s).is_ok());
        if !selector_ok {
            return;
        }
        let rule = rules::render(mf);
        if slot.rule.as_ref() == Some(&rule) {
            return;
        }
        match tokio::time::timeout(self.interval, rules::apply(self.client.clone(), mf, &rule))
            .await
        {
            Ok(Ok(())) => slot.rule = Some(rule),
            Ok(Err(e @ rules::RuleError::NameConflict(_))) => {
                tracing::warn!(name = %mf.name_any(), error = %e, "PrometheusRule not applied");
                crate::events::publish(
                    &self.recorder,
                    &mf.object_ref(&()),
                    EventType::Warning,
                    "PrometheusRuleConflict",
                    "Autoscale",
                    &e.to_string(),
                )
                .await;
                slot.rule = Some(rule);
            }
            Ok(Err(e)) => {
                tracing::warn!(name = %mf.name_any(), error = %e, "PrometheusRule not applied")
            }
            Err(_) => {
                tracing::warn!(name = %mf.name_any(), "applying the PrometheusRule timed out")
            }
        }
    }

    /// Evaluates one resource and records the outcome, reading the
    /// Deployment and pods from `cluster`. `None`: not autoscaled now
    /// (replicas pinned with `spec.replicas.desired`, or deleting).
    pub async fn evaluate_one(
        &self,
        cluster: &Cluster,
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
        let workload = CachedDeployment {
            cluster,
            api: Api::namespaced(self.client.clone(), &ns),
            namespace: ns.clone(),
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
        // three missed evaluations of this resource make a gap in its
        // stabilization history.
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

        let now = jiff::Timestamp::now();
        let patch = status_patch(mf, &e, &Time(now));
        let next: ModelForwarderStatus =
            serde_json::from_value(patch["status"].clone()).map_err(|source| {
                Error::StatusShape {
                    name: name.clone(),
                    source,
                }
            })?;
        let prev = mf.status.as_ref();
        if needs_write(prev, &next, now) {
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
        }

        let mut events = Vec::new();
        if e.scaled {
            events.push((EventType::Normal, "Scaled", explain(&e)));
        }
        if d.breach.is_some() && !is_true(prev, SLO_BREACHED) {
            events.push((
                EventType::Warning,
                SLO_BREACHED,
                message(&next, SLO_BREACHED),
            ));
        }
        if d.upstream_slow && !is_true(prev, UPSTREAM_SLOW) {
            events.push((
                EventType::Warning,
                UPSTREAM_SLOW,
                message(&next, UPSTREAM_SLOW),
            ));
        }
        if !e.foreign_managers.is_empty() && !is_true(prev, SCALE_CONFLICT) {
            events.push((
                EventType::Warning,
                SCALE_CONFLICT,
                message(&next, SCALE_CONFLICT),
            ));
        }
        if !d.metrics_available && is_true(prev, METRICS_AVAILABLE) {
            events.push((
                EventType::Warning,
                "MetricsUnavailable",
                message(&next, METRICS_AVAILABLE),
            ));
        }
        let regarding = mf.object_ref(&());
        for (type_, reason, note) in events {
            crate::events::publish(
                &self.recorder,
                &regarding,
                type_,
                reason,
                "Autoscale",
                &note,
            )
            .await;
        }
        Ok(Some(e))
    }
}

/// The message of the condition of that type.
fn message(status: &ModelForwarderStatus, type_: &str) -> String {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.message.clone())
        .unwrap_or_default()
}
