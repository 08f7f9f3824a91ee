//! Leader election on a `coordination.k8s.io/v1` Lease, so that two
//! operator replicas never both act.
//!
//! The rules are client-go's: a leader renews every `retry_period`; one
//! whose last successful renewal was **sent** more than `renew_deadline`
//! ago (shorter than the lease duration) stops acting before anyone else
//! may take the lease; a standby looks at the lease every `retry_period`
//! and takes it when it is free or when it has seen no change to it for the
//! lease duration, timed on its own monotonic clock from the moment it saw
//! the change (never from the `renewTime` the holder wrote, so skewed wall
//! clocks do not matter); a leader that shuts down releases the lease (no holder), so the
//! standby leads within one retry period rather than after expiry. Writes
//! are merge patches that carry the `resourceVersion` they read, so two
//! replicas cannot both win. Exiting on loss (rather than pausing)
//! guarantees that no reconcile still in flight can race the new leader:
//! the pod restarts and waits again.

mod lease;
pub mod rules;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use kube::Client;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

pub use rules::{decide, Step};

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
    /// The wall clock that stamps `acquireTime` and `renewTime` (read by
    /// people, never by the election's decisions); tests skew it.
    pub wall_clock: fn() -> jiff::Timestamp,
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
            wall_clock: jiff::Timestamp::now,
        }
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

/// The election loop: look or renew every `retry_period`; as leader, stop
/// (state `false`, and the loop ends) when the renew deadline passed since
/// the last successful renewal was sent, or when someone else holds the
/// lease.
async fn campaign(
    api: Api<Lease>,
    cfg: LeaderConfig,
    state: watch::Sender<bool>,
    handover: Arc<OnceLock<Instant>>,
    mut release: oneshot::Receiver<oneshot::Sender<Result<(), kube::Error>>>,
) {
    let mut leading = false;
    let mut observed = None;
    let mut renew_sent = Instant::now();
    loop {
        // Each attempt is bounded, so a hung API server cannot hold the
        // leader past its deadline.
        let sent = Instant::now();
        let budget = if leading {
            rules::time_left(renew_sent, cfg.renew_deadline, sent).unwrap_or_default()
        } else {
            cfg.retry_period.max(Duration::from_secs(5))
        };
        let attempt =
            tokio::time::timeout(budget, lease::try_hold(&api, &cfg, &mut observed)).await;
        match attempt {
            Ok(Ok(true)) => {
                renew_sent = sent;
                if !leading {
                    if let Some(seen) = observed
                        .as_ref()
                        .and_then(|o: &rules::Observed| o.predecessor_seen(&cfg.identity))
                    {
                        let _ = handover.set(seen);
                    }
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
        // A renewal answered late may leave less than a retry period: the
        // next look comes no later than the deadline.
        let mut pause = cfg.retry_period;
        if leading {
            match rules::time_left(renew_sent, cfg.renew_deadline, Instant::now()) {
                None => {
                    tracing::error!(deadline = ?cfg.renew_deadline, "could not renew the lease in time");
                    state.send_replace(false);
                    return;
                }
                Some(left) => pause = pause.min(left),
            }
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            reply = &mut release => {
                if let Ok(reply) = reply {
                    // Bounded like every renewal: a hung API server must
                    // not hold the shutdown past the pod's grace period.
                    let result = if leading {
                        match tokio::time::timeout(cfg.renew_deadline, lease::give_up(&api, &cfg)).await {
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
    handover: Arc<OnceLock<Instant>>,
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
        let handover = Arc::new(OnceLock::new());
        let task = tokio::spawn(campaign(api, cfg.clone(), tx, handover.clone(), release_rx));
        Ok(Self {
            state,
            handover,
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

    /// Once leading: when this replica last saw the previous leader's hold
    /// on the lease change (its last renewal or its release), on this
    /// replica's monotonic clock. `None` when it took a lease that did not
    /// exist or was its own.
    pub fn handover(&self) -> Option<Instant> {
        self.handover.get().copied()
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

    #[tokio::test]
    async fn waits_for_the_lock_then_reports_its_loss() {
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
    fn the_defaults_stop_a_leader_before_its_lease_expires() {
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
