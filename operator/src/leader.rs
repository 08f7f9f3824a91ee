//! Leader election on a `coordination.k8s.io/v1` Lease, so that two
//! operator replicas never both act.
//!
//! The rules are client-go's: a leader renews every `retry_period`; one
//! that has not renewed within `renew_deadline` (shorter than the lease
//! duration) stops acting before anyone else may take the lease; a standby
//! looks at the lease every `retry_period` and takes it when it is free or
//! expired; a leader that shuts down releases the lease (no holder), so the
//! standby leads within one retry period rather than after expiry. Writes
//! are merge patches that carry the `resourceVersion` they read, so two
//! replicas cannot both win. Exiting on loss (rather than pausing)
//! guarantees that no reconcile still in flight can race the new leader:
//! the pod restarts and waits again.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::Client;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// Settings of the election (client-go's defaults: 15 s, 10 s, 2 s).
#[derive(Debug, Clone)]
pub struct LeaderConfig {
    pub lease_name: String,
    pub namespace: String,
    /// Unique per replica, e.g. the pod name.
    pub identity: String,
    /// How long a lease stays valid without renewal; what a standby waits
    /// for before taking over from a leader that vanished.
    pub lease_duration: Duration,
    /// A leader that has not renewed for this long stops acting. Shorter
    /// than `lease_duration`, so it stops before anyone else may start.
    pub renew_deadline: Duration,
    /// How often the leader renews and a standby looks at the lease (a
    /// released lease is taken over within this time).
    pub retry_period: Duration,
}

impl LeaderConfig {
    /// The defaults, for a lease name, namespace and identity.
    pub fn new(lease_name: String, namespace: String, identity: String) -> Self {
        Self {
            lease_name,
            namespace,
            identity,
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(1),
        }
    }
}

/// What to do on a lock-state observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Not leader yet: keep waiting.
    Wait,
    /// Just became leader: start the controller.
    Lead,
    /// Still leader: carry on.
    Continue,
    /// Was leader and no longer is: stop acting at once (exit).
    Exit,
}

/// The pure decision: from "was I leading" and "do I hold the lock now".
pub fn decide(leading: bool, holds_lock: bool) -> Step {
    match (leading, holds_lock) {
        (false, false) => Step::Wait,
        (false, true) => Step::Lead,
        (true, true) => Step::Continue,
        (true, false) => Step::Exit,
    }
}

/// Why leadership could not be had or was lost.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("lease: {0}")]
    Api(#[from] kube::Error),
    #[error("the election stopped")]
    Stopped,
    #[error("lost the leader lease")]
    Lost,
    #[error("renew deadline passed: the lease could not be renewed for {0:?}")]
    RenewDeadline(Duration),
}

/// Waits on the lock-state channel until this replica holds the lock.
pub async fn acquired(state: &mut watch::Receiver<bool>) -> Result<(), LeaderError> {
    loop {
        if decide(false, *state.borrow_and_update()) == Step::Lead {
            return Ok(());
        }
        state.changed().await.map_err(|_| LeaderError::Stopped)?;
    }
}

/// Waits on the lock-state channel, as leader, until the lock is gone (or
/// the election stops, which must be treated the same).
pub async fn lost(state: &mut watch::Receiver<bool>) -> LeaderError {
    loop {
        if state.changed().await.is_err() {
            return LeaderError::Stopped;
        }
        if decide(true, *state.borrow_and_update()) == Step::Exit {
            return LeaderError::Lost;
        }
    }
}

fn now() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

/// Whether the lease is free for `identity`: unheld, held by it, or not
/// renewed within its duration.
pub fn available(spec: &LeaseSpec, identity: &str, at: jiff::Timestamp) -> bool {
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder.is_empty() || holder == identity {
        return true;
    }
    let (Some(renewed), Some(secs)) = (&spec.renew_time, spec.lease_duration_seconds) else {
        return true;
    };
    let expiry = renewed.0 + jiff::SignedDuration::from_secs(i64::from(secs));
    expiry < at
}

/// One attempt to take or renew the lease. `Ok(true)`: held now.
async fn try_hold(api: &Api<Lease>, cfg: &LeaderConfig) -> Result<bool, kube::Error> {
    let duration = i32::try_from(cfg.lease_duration.as_secs()).unwrap_or(i32::MAX);
    let Some(mut lease) = api.get_opt(&cfg.lease_name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(cfg.lease_name.clone()),
                namespace: Some(cfg.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(cfg.identity.clone()),
                lease_duration_seconds: Some(duration),
                acquire_time: Some(now()),
                renew_time: Some(now()),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    if !available(spec, &cfg.identity, jiff::Timestamp::now()) {
        return Ok(false);
    }
    if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
        spec.holder_identity = Some(cfg.identity.clone());
        spec.acquire_time = Some(now());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.lease_duration_seconds = Some(duration);
    spec.renew_time = Some(now());
    // resourceVersion in the body: a concurrent writer makes this a 409.
    match update(api, &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Gives the lease up if this replica holds it: no holder, a one-second
/// duration, so a standby takes it at its next look.
async fn give_up(api: &Api<Lease>, cfg: &LeaderConfig) -> Result<(), kube::Error> {
    let Some(mut lease) = api.get_opt(&cfg.lease_name).await? else {
        return Ok(());
    };
    let Some(spec) = lease.spec.as_mut() else {
        return Ok(());
    };
    if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(now());
    update(api, &lease).await.map(drop)
}

/// A merge patch of the lease's spec, conditional on the resourceVersion
/// read (a 409 if someone wrote in between). `holderIdentity` is sent even
/// when empty, as `null`, so a release clears it.
async fn update(api: &Api<Lease>, lease: &Lease) -> Result<Lease, kube::Error> {
    let mut spec = serde_json::to_value(lease.spec.clone().unwrap_or_default())
        .map_err(kube::Error::SerdeError)?;
    if let Some(m) = spec.as_object_mut() {
        m.entry("holderIdentity").or_insert(serde_json::Value::Null);
    }
    let body = serde_json::json!({
        "metadata": {"resourceVersion": lease.metadata.resource_version},
        "spec": spec,
    });
    let name = lease.metadata.name.clone().unwrap_or_default();
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&body))
        .await
}

/// The election loop: look or renew every `retry_period`; as leader, stop
/// (state `false`, and the loop ends) when no renewal succeeded within
/// `renew_deadline`, or when someone else holds the lease.
async fn campaign(
    api: Api<Lease>,
    cfg: LeaderConfig,
    state: watch::Sender<bool>,
    mut release: oneshot::Receiver<oneshot::Sender<Result<(), kube::Error>>>,
) {
    let mut leading = false;
    let mut renewed = Instant::now();
    loop {
        // Each attempt is bounded, so a hung API server cannot hold the
        // leader past its deadline.
        let budget = if leading {
            cfg.renew_deadline.saturating_sub(renewed.elapsed())
        } else {
            cfg.retry_period.max(Duration::from_secs(5))
        };
        let attempt = tokio::time::timeout(budget, try_hold(&api, &cfg)).await;
        match attempt {
            Ok(Ok(true)) => {
                renewed = Instant::now();
                if !leading {
                    leading = true;
                    state.send_replace(true);
                }
            }
            Ok(Ok(false)) => {
                if leading {
                    tracing::error!(holder = "another replica", "the lease was taken over");
                    state.send_replace(false);
                    return;
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, leading, "lease request failed"),
            Err(_) => tracing::warn!(leading, "lease request timed out"),
        }
        if leading && renewed.elapsed() >= cfg.renew_deadline {
            tracing::error!(deadline = ?cfg.renew_deadline, "could not renew the lease in time");
            state.send_replace(false);
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(cfg.retry_period) => {}
            reply = &mut release => {
                if let Ok(reply) = reply {
                    // Bounded like every renewal: a hung API server must
                    // not hold the shutdown past the pod's grace period.
                    let result = if leading {
                        match tokio::time::timeout(cfg.renew_deadline, give_up(&api, &cfg)).await {
                            Ok(r) => r,
                            Err(_) => {
                                tracing::warn!("releasing the lease timed out; it expires by itself");
                                Ok(())
                            }
                        }
                    } else {
                        Ok(())
                    };
                    let _ = reply.send(result);
                }
                return;
            }
        }
    }
}

/// A running election.
pub struct Election {
    state: watch::Receiver<bool>,
    release: Option<oneshot::Sender<oneshot::Sender<Result<(), kube::Error>>>>,
    task: JoinHandle<()>,
}

impl Election {
    /// Starts competing for the lease.
    pub async fn start(client: Client, cfg: &LeaderConfig) -> Result<Self, LeaderError> {
        assert!(
            cfg.renew_deadline < cfg.lease_duration,
            "the renew deadline must be shorter than the lease duration"
        );
        let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
        let (tx, state) = watch::channel(false);
        let (release, release_rx) = oneshot::channel();
        let task = tokio::spawn(campaign(api, cfg.clone(), tx, release_rx));
        Ok(Self {
            state,
            release: Some(release),
            task,
        })
    }

    /// Resolves once this replica holds the lease.
    pub async fn acquired(&mut self) -> Result<(), LeaderError> {
        acquired(&mut self.state).await
    }

    /// Resolves (with an error) when the lease is lost or could not be
    /// renewed before the renew deadline; never while held.
    pub async fn lost(&mut self) -> LeaderError {
        lost(&mut self.state).await
    }

    /// Whether this replica holds the lease now.
    pub fn is_leader(&self) -> bool {
        *self.state.borrow()
    }

    /// Gives the lease up, so a standby replica takes over at its next look
    /// (within its retry period) instead of waiting for the lease to expire.
    pub async fn release(mut self) -> Result<(), LeaderError> {
        let (reply, answer) = oneshot::channel();
        if let Some(r) = self.release.take() {
            if r.send(reply).is_err() {
                return Err(LeaderError::Stopped);
            }
        }
        let result = answer.await.map_err(|_| LeaderError::Stopped)?;
        let _ = (&mut self.task).await;
        Ok(result?)
    }
}

impl Drop for Election {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_leads_continues_and_exits_on_loss() {
        assert_eq!(decide(false, false), Step::Wait);
        assert_eq!(decide(false, true), Step::Lead);
        assert_eq!(decide(true, true), Step::Continue);
        assert_eq!(decide(true, false), Step::Exit);
    }

    #[tokio::test]
    async fn waits_for_the_lock_then_reports_its_loss() {
        use std::time::Duration;
        let (tx, mut rx) = watch::channel(false);
        let waiting = tokio::time::timeout(Duration::from_millis(50), acquired(&mut rx)).await;
        assert!(waiting.is_err(), "no lock, no leadership");

        tx.send(true).expect("send");
        acquired(&mut rx).await.expect("acquired");

        // A renewal (still true) is not a loss.
        tx.send(true).expect("send");
        let still = tokio::time::timeout(Duration::from_millis(50), lost(&mut rx)).await;
        assert!(still.is_err(), "renewals keep the leadership");

        tx.send(false).expect("send");
        assert!(matches!(lost(&mut rx).await, LeaderError::Lost));
    }

    #[test]
    fn a_lease_is_available_when_unheld_own_or_expired() {
        let at = jiff::Timestamp::now();
        let held = |holder: Option<&str>, renewed_secs_ago: i64| LeaseSpec {
            holder_identity: holder.map(str::to_string),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(
                at - jiff::SignedDuration::from_secs(renewed_secs_ago),
            )),
            ..LeaseSpec::default()
        };
        assert!(available(&held(None, 0), "a", at));
        assert!(available(&held(Some(""), 0), "a", at));
        assert!(available(&held(Some("a"), 0), "a", at));
        assert!(!available(&held(Some("b"), 5), "a", at));
        assert!(available(&held(Some("b"), 16), "a", at));
        let defaults = LeaderConfig::new("l".into(), "ns".into(), "a".into());
        assert!(defaults.renew_deadline < defaults.lease_duration);
    }

    #[tokio::test]
    async fn a_stopped_lease_manager_counts_as_lost() {
        let (tx, mut rx) = watch::channel(true);
        rx.borrow_and_update();
        drop(tx);
        assert!(matches!(lost(&mut rx).await, LeaderError::Stopped));
        let (tx, mut rx) = watch::channel(false);
        drop(tx);
        assert!(matches!(acquired(&mut rx).await, Err(LeaderError::Stopped)));
    }
}
