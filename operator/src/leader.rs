//! Leader election on a `coordination.k8s.io/v1` Lease, so that two
//! operator replicas never both act.
//!
//! The lease itself is kept by `kube-lease-manager` (server-side apply on
//! the Lease, renewals before expiry, clock-skew grace). This module decides
//! what the process does as the lock state changes: wait, lead, or exit.
//! Exiting on loss (rather than pausing) guarantees that no reconcile still
//! in flight can race the new leader: the pod restarts and waits again.

use kube::Client;
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Settings of the election.
#[derive(Debug, Clone)]
pub struct LeaderConfig {
    pub lease_name: String,
    pub namespace: String,
    /// Unique per replica, e.g. the pod name.
    pub identity: String,
    /// Seconds a lock stays valid without renewal.
    pub duration_secs: u64,
    /// Seconds before expiry at which the holder renews.
    pub grace_secs: u64,
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
    #[error("lease manager: {0}")]
    Manager(#[from] kube_lease_manager::LeaseManagerError),
    #[error("the lease manager stopped")]
    Stopped,
    #[error("lost the leader lease")]
    Lost,
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
/// the lease manager stops, which must be treated the same).
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

/// A running election.
pub struct Election {
    state: watch::Receiver<bool>,
    task: JoinHandle<kube_lease_manager::Result<LeaseManager>>,
}

impl Election {
    /// Starts competing for the lease.
    pub async fn start(client: Client, cfg: &LeaderConfig) -> Result<Self, LeaderError> {
        let manager = LeaseManagerBuilder::new(client, &cfg.lease_name)
            .with_namespace(&cfg.namespace)
            .with_identity(&cfg.identity)
            .with_duration(cfg.duration_secs)
            .with_grace(cfg.grace_secs)
            .build()
            .await?;
        let (state, task) = manager.watch().await;
        Ok(Self { state, task })
    }

    /// Resolves once this replica holds the lease.
    pub async fn acquired(&mut self) -> Result<(), LeaderError> {
        acquired(&mut self.state).await
    }

    /// Resolves (with an error) when the lease is lost; never while held.
    pub async fn lost(&mut self) -> LeaderError {
        lost(&mut self.state).await
    }

    /// Gives the lease up, so a standby replica takes over without waiting
    /// for it to expire.
    pub async fn release(self) -> Result<(), LeaderError> {
        drop(self.state);
        match self.task.await {
            Ok(Ok(manager)) => Ok(manager.release().await?),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(LeaderError::Stopped),
        }
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
