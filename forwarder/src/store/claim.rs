//! Claims: a guard that completes or, when dropped, abandons its key.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::backend::Token;
use super::error::StoreError;
use super::key::{Fingerprint, StoreKey};
use super::layer::Core;
use super::record::Record;

pub enum Claimed {
    /// Ours: do the work, then [`ClaimGuard::complete`]; dropping the guard
    /// abandons (frees the key at once, best effort; the lease is the backstop).
    Won(ClaimGuard),
    /// Another request (this process or another replica) holds the claim.
    Busy { fingerprint: Fingerprint },
    /// Already completed: the stored record.
    Done(Record),
}

impl std::fmt::Debug for Claimed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Won(g) => write!(f, "Won({:?})", g.key),
            Self::Busy { .. } => f.write_str("Busy"),
            Self::Done(_) => f.write_str("Done"),
        }
    }
}

pub struct ClaimGuard {
    pub(super) core: Arc<Core>,
    pub(super) key: StoreKey,
    pub(super) token: Token,
    pub(super) fingerprint: Fingerprint,
    /// Cleared once completed or abandoned explicitly.
    pub(super) held: bool,
}

impl ClaimGuard {
    pub fn key(&self) -> &StoreKey {
        &self.key
    }

    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// A handle that renews this claim from another task (a stream's
    /// keep-alive) without owning it.
    pub fn renewer(&self) -> Renewer {
        Renewer {
            core: self.core.clone(),
            key: self.key.clone(),
            token: self.token,
        }
    }

    /// Extends the claim; `false`: it was lost (the lease ran out and
    /// another request took the key).
    pub async fn renew(&self, lease: Duration) -> Result<bool, StoreError> {
        self.core
            .backend
            .renew(&self.core.name(&self.key), self.token, lease)
            .await
    }

    /// Stores `value` under the key and releases the claim, atomically.
    pub async fn complete(mut self, value: Bytes, ttl: Duration) -> Result<(), StoreError> {
        let blob = self
            .core
            .seal(&self.key, &Record::new(self.fingerprint, value));
        let done = self
            .core
            .backend
            .complete(&self.core.name(&self.key), self.token, blob, ttl)
            .await;
        match done {
            Ok(true) => {
                self.held = false;
                Ok(())
            }
            Ok(false) => {
                self.held = false;
                Err(StoreError::ClaimLost)
            }
            // Unknown outcome: the drop still tries to release the claim.
            Err(e) => Err(e),
        }
    }

    /// Releases the claim now, waiting for the backend.
    pub async fn abandon(mut self) -> Result<(), StoreError> {
        self.held = false;
        self.core
            .backend
            .abandon(&self.core.name(&self.key), self.token)
            .await
    }
}

/// Renews a claim it does not own; dropping it does nothing.
#[derive(Clone)]
pub struct Renewer {
    core: Arc<Core>,
    key: StoreKey,
    token: Token,
}

impl Renewer {
    pub async fn renew(&self, lease: Duration) -> Result<bool, StoreError> {
        self.core
            .backend
            .renew(&self.core.name(&self.key), self.token, lease)
            .await
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if !self.held {
            return;
        }
        let name = self.core.name(&self.key);
        if self.core.backend.abandon_now(&name, self.token) {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (core, token) = (self.core.clone(), self.token);
            rt.spawn(async move {
                if let Err(e) = core.backend.abandon(&name, token).await {
                    tracing::debug!(error = %e, "could not release a claim; its lease will expire");
                }
            });
        }
    }
}

/// A claim kept alive in the background (renewed every third of its lease)
/// until completed or dropped. A holder that dies stops renewing, so a
/// waiter on another replica sees the key free within one lease instead of
/// waiting out a long one.
pub struct HeldClaim {
    guard: ClaimGuard,
    _renew: tokio_util::task::AbortOnDropHandle<()>,
}

impl HeldClaim {
    /// `what` names the use in the log ("an idempotency claim").
    pub fn hold(guard: ClaimGuard, lease: Duration, what: &'static str) -> Self {
        let renewer = guard.renewer();
        let every = (lease / 3).max(Duration::from_millis(10));
        let renew = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match renewer.renew(lease).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(
                            claim = what,
                            "a claim was lost before its answer was stored"
                        );
                        return;
                    }
                    Err(e) => tracing::warn!(claim = what, error = %e, "could not renew a claim"),
                }
            }
        });
        Self {
            guard,
            _renew: tokio_util::task::AbortOnDropHandle::new(renew),
        }
    }

    /// Stores `value` under the key and releases the claim.
    pub async fn complete(self, value: Bytes, ttl: Duration) -> Result<(), StoreError> {
        self.guard.complete(value, ttl).await
    }
}
