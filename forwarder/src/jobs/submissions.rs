//! Async submissions de-duplicated by the client's `Idempotency-Key`: the
//! same key (per client) returns the job it first created, on any replica;
//! the same key with a different request is refused (422), as on the
//! synchronous path. The key's record holds the job id, for the job's TTL.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::api::ApiError;
use crate::auth::Identity;
use crate::store::{ClaimGuard, Claimed, Fingerprint, Space, Store, StoreKey};

/// How long a submission holds its key while its job is created.
const LEASE: Duration = Duration::from_secs(10);
/// How long a duplicate waits for the first submission to finish creating.
const WAIT: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(25);

/// What a keyed submission does.
pub enum Keyed {
    /// Create the job, then [`Submissions::created`] with this claim.
    Create(ClaimGuard),
    /// The key already made this job: answer with it.
    Existing(String),
}

pub struct Submissions {
    store: Arc<dyn Store>,
    ttl: Duration,
}

/// The request a key stands for: what the job would run, and where its
/// result goes.
pub fn fingerprint(
    model: &str,
    body: &[u8],
    callback_url: Option<&str>,
    simple: bool,
) -> Fingerprint {
    let mut h = Sha256::new();
    for part in [
        model.as_bytes(),
        body,
        callback_url.unwrap_or("").as_bytes(),
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.update([u8::from(simple), u8::from(callback_url.is_some())]);
    h.finalize().into()
}

/// The id of the job a client's key makes: the same on every replica and
/// every try, so a submission that dies after enqueueing its job and before
/// binding its key is found again by the retry instead of made twice.
pub fn job_id(owner: &Identity, idempotency_key: &str) -> String {
    let mut h = Sha256::new();
    for part in [owner.0.as_bytes(), idempotency_key.as_bytes()] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    let digest = h.finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("job_{hex}")
}

fn key(owner: &Identity, idempotency_key: &str) -> StoreKey {
    StoreKey::new(
        Space::Job,
        &owner.0,
        format!("submit\u{1f}{idempotency_key}").as_bytes(),
    )
}

impl Submissions {
    pub fn new(store: Arc<dyn Store>, ttl: Duration) -> Self {
        Self { store, ttl }
    }

    pub async fn begin(
        &self,
        owner: &Identity,
        idempotency_key: &str,
        fp: Fingerprint,
    ) -> Result<Keyed, ApiError> {
        let key = key(owner, idempotency_key);
        let give_up = Instant::now() + WAIT;
        loop {
            match self.store.claim(&key, fp, LEASE).await {
                Ok(Claimed::Won(guard)) => return Ok(Keyed::Create(guard)),
                Ok(Claimed::Done(r)) if r.fingerprint != fp => {
                    return Err(ApiError::IdempotencyMismatch)
                }
                Ok(Claimed::Done(r)) => {
                    return String::from_utf8(r.value.to_vec())
                        .map(Keyed::Existing)
                        .map_err(|_| ApiError::StoreUnavailable("jobs"))
                }
                Ok(Claimed::Busy { fingerprint }) if fingerprint != fp => {
                    return Err(ApiError::IdempotencyMismatch)
                }
                Ok(Claimed::Busy { .. }) if Instant::now() + POLL < give_up => {
                    tokio::time::sleep(POLL).await;
                }
                Ok(Claimed::Busy { .. }) => return Err(ApiError::IdempotencyInProgress),
                Err(e) => {
                    // Creating a second job would break the key's promise.
                    tracing::warn!(error = %e, "submission key unavailable; refused");
                    return Err(ApiError::StoreUnavailable("jobs"));
                }
            }
        }
    }

    /// Binds the key to the job it created.
    pub async fn created(&self, claim: ClaimGuard, job_id: &str) {
        if let Err(e) = claim
            .complete(Bytes::copy_from_slice(job_id.as_bytes()), self.ttl)
            .await
        {
            tracing::warn!(error = %e, "could not bind a submission key to its job");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_key_one_job_per_client_and_a_changed_request_is_refused() {
        let s = Submissions::new(crate::store::memory(1 << 20), Duration::from_secs(60));
        let (alice, bob) = (Identity("alice".into()), Identity("bob".into()));
        let fp = fingerprint("m", b"{}", None, false);
        let Keyed::Create(claim) = s.begin(&alice, "k", fp).await.unwrap() else {
            panic!("first")
        };
        s.created(claim, "job_1").await;
        assert!(
            matches!(s.begin(&alice, "k", fp).await.unwrap(), Keyed::Existing(id) if id == "job_1")
        );
        assert!(
            matches!(s.begin(&bob, "k", fp).await.unwrap(), Keyed::Create(_)),
            "scoped per client"
        );
        let other = fingerprint("m", b"{\"x\":1}", None, false);
        assert!(matches!(
            s.begin(&alice, "k", other).await,
            Err(ApiError::IdempotencyMismatch)
        ));
        assert_ne!(fp, fingerprint("m", b"{}", Some("https://h/"), false));
    }

    #[test]
    fn a_keys_job_id_is_stable_and_scoped_to_its_client() {
        let (alice, bob) = (Identity("alice".into()), Identity("bob".into()));
        assert_eq!(job_id(&alice, "k"), job_id(&alice, "k"));
        assert_ne!(job_id(&alice, "k"), job_id(&bob, "k"));
        assert_ne!(job_id(&alice, "k"), job_id(&alice, "k2"));
        assert_eq!(job_id(&alice, "k").len(), "job_".len() + 32);
    }
}
