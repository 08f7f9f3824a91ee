//! Idempotency on the shared store: a keyed request claims its key (so a
//! duplicate on any replica sees the claim), keeps the claim alive while
//! it runs, and completes it with the answer; a duplicate waits, within a
//! bound, for the holder's answer and replays it.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use forwarder_config::{FailurePolicy, IdempotencyConfig};
use tokio::time::Instant;

use super::idempotency::{Fingerprint, StoredReply};
use crate::api::ApiError;
use crate::store::{ClaimGuard, Claimed, HeldClaim, Store, StoreError, StoreKey};

/// How often a waiting duplicate looks again.
const POLL: Duration = Duration::from_millis(25);

const COMPLETE: u8 = b'c';
const STREAM: u8 = b's';

pub fn encode(reply: &StoredReply) -> Bytes {
    let (tag, body) = match reply {
        StoredReply::Complete(b) => (COMPLETE, b),
        StoredReply::Stream(b) => (STREAM, b),
    };
    let mut v = BytesMut::with_capacity(1 + body.len());
    v.put_u8(tag);
    v.put_slice(body);
    v.freeze()
}

pub fn decode(v: Bytes) -> Option<StoredReply> {
    match *v.first()? {
        COMPLETE => Some(StoredReply::Complete(v.slice(1..))),
        STREAM => Some(StoredReply::Stream(v.slice(1..))),
        _ => None,
    }
}

/// A held idempotency claim (see [`HeldClaim`]): dropping it abandons
/// the claim, so the key is free for a retry at once.
pub struct Lease(HeldClaim);

impl Lease {
    fn hold(guard: ClaimGuard, lease: Duration) -> Self {
        Self(HeldClaim::hold(guard, lease, "idempotency"))
    }

    /// Stores the answer under the key and releases the claim.
    pub async fn complete(self, reply: &StoredReply, ttl: Duration) {
        if let Err(e) = self.0.complete(encode(reply), ttl).await {
            tracing::warn!(error = %e, "could not store an idempotent answer");
        }
    }
}

/// How a keyed request goes on.
pub enum Begin {
    /// Forward it; store the answer with the lease (`None`: the store
    /// failed and the policy is fail-open, so nothing is stored).
    Lead(Option<Lease>),
    /// Answer with what is stored.
    Replay(StoredReply),
}

pub struct Claims {
    pub store: Arc<dyn Store>,
    pub cfg: IdempotencyConfig,
}

impl Claims {
    /// Claims `key`, or replays its stored answer, or waits for the
    /// holder's answer (non-streams; a duplicate of a running stream is
    /// refused, as within one process). `deadline` bounds the wait.
    pub async fn begin(
        &self,
        key: &StoreKey,
        fp: Fingerprint,
        stream: bool,
        deadline: Instant,
    ) -> Result<Begin, ApiError> {
        let give_up = deadline.min(Instant::now() + self.cfg.wait);
        loop {
            match self.store.claim(key, fp, self.cfg.lease).await {
                Ok(Claimed::Won(g)) => {
                    return Ok(Begin::Lead(Some(Lease::hold(g, self.cfg.lease))))
                }
                Ok(Claimed::Done(r)) if r.fingerprint != fp => {
                    return Err(ApiError::IdempotencyMismatch)
                }
                Ok(Claimed::Done(r)) => match decode(r.value) {
                    Some(reply) => return Ok(Begin::Replay(reply)),
                    None => {
                        return self.failed(&StoreError::Corrupt("an undecodable record".into()))
                    }
                },
                Ok(Claimed::Busy { fingerprint }) if fingerprint != fp => {
                    return Err(ApiError::IdempotencyMismatch)
                }
                Ok(Claimed::Busy { .. }) => {
                    if stream || Instant::now() + POLL > give_up {
                        return Err(ApiError::IdempotencyInProgress);
                    }
                    tokio::time::sleep(POLL).await;
                }
                Err(e) => return self.failed(&e),
            }
        }
    }

    /// A stored answer for `key`, if any; fingerprint checked.
    pub async fn lookup(
        &self,
        key: &StoreKey,
        fp: &Fingerprint,
    ) -> Result<Option<StoredReply>, ApiError> {
        match self.store.get(key).await {
            Ok(Some(r)) if r.fingerprint != *fp => Err(ApiError::IdempotencyMismatch),
            Ok(Some(r)) => Ok(decode(r.value)),
            Ok(None) => Ok(None),
            Err(e) => {
                self.failed(&e)?;
                Ok(None)
            }
        }
    }

    fn failed(&self, why: &StoreError) -> Result<Begin, ApiError> {
        if let StoreError::UnknownKey(_) = why {
            // The key has an answer, sealed under a key this replica has
            // not loaded yet: forwarding would run the request twice
            // whatever the policy, so refuse; another replica (or this one
            // after its next key reload) replays it.
            tracing::warn!(error = %why, "idempotent answer not readable here; refusing");
            return Err(ApiError::StoreUnavailable("idempotency"));
        }
        match self.cfg.on_store_error {
            FailurePolicy::FailOpen => {
                tracing::warn!(error = %why, "idempotency store failed; forwarding without protection (fail_open)");
                Ok(Begin::Lead(None))
            }
            FailurePolicy::FailClosed => {
                tracing::warn!(error = %why, "idempotency store failed; refusing (fail_closed)");
                Err(ApiError::StoreUnavailable("idempotency"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_replies_round_trip() {
        for r in [
            StoredReply::Complete(Bytes::from_static(b"{}")),
            StoredReply::Stream(Bytes::from_static(b"data: x\n\n")),
        ] {
            let back = decode(encode(&r)).unwrap();
            assert_eq!(format!("{back:?}"), format!("{r:?}"));
        }
        assert!(decode(Bytes::from_static(b"x")).is_none());
        assert!(decode(Bytes::new()).is_none());
    }

    #[tokio::test]
    async fn a_duplicate_waits_for_the_holder_then_replays() {
        let claims = Arc::new(Claims {
            store: crate::store::memory(1 << 20),
            cfg: IdempotencyConfig::default(),
        });
        let key = StoreKey::new(crate::store::Space::Idempotency, "t", b"k");
        let deadline = Instant::now() + Duration::from_secs(5);
        let Begin::Lead(Some(lease)) = claims.begin(&key, [1; 32], false, deadline).await.unwrap()
        else {
            panic!("first leads")
        };
        assert!(matches!(
            claims.begin(&key, [2; 32], false, deadline).await,
            Err(ApiError::IdempotencyMismatch)
        ));
        assert!(matches!(
            claims.begin(&key, [1; 32], true, deadline).await,
            Err(ApiError::IdempotencyInProgress)
        ));
        let waiter = {
            let (claims, key) = (claims.clone(), key.clone());
            tokio::spawn(async move { claims.begin(&key, [1; 32], false, deadline).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        lease
            .complete(
                &StoredReply::Complete(Bytes::from_static(b"a")),
                Duration::from_secs(60),
            )
            .await;
        match waiter.await.unwrap() {
            Ok(Begin::Replay(StoredReply::Complete(b))) => assert_eq!(b.as_ref(), b"a"),
            _ => panic!("the waiter replays the holder's answer"),
        }
        // A short wait gives up with 409.
        let other = StoreKey::new(crate::store::Space::Idempotency, "t", b"k2");
        let _held = claims
            .begin(&other, [1; 32], false, deadline)
            .await
            .unwrap();
        let soon = Instant::now() + Duration::from_millis(60);
        assert!(matches!(
            claims.begin(&other, [1; 32], false, soon).await,
            Err(ApiError::IdempotencyInProgress)
        ));
    }
}
