//! Idempotency: a completed answer is stored under the client's key and
//! replayed for repeats within the TTL; concurrent duplicates share one
//! upstream call. Answers and cross-replica claims live in the shared
//! store (see `claims.rs`); this module keeps the per-process flights,
//! each held by a guard that releases its key when dropped, so duplicates
//! within one process join one call without polling the store.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::{BoxFuture, Shared};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use crate::api::ApiError;
use crate::auth::Identity;
use crate::pipeline::forward::Trace;

/// A digest of the request that produced an answer (the store's claim
/// keeps it): a key reused for a different request is an error, not a
/// replay.
pub use crate::store::Fingerprint;

/// An answer kept for replay (encoded into a store record by `claims.rs`).
#[derive(Debug, Clone)]
pub enum StoredReply {
    /// A completion's body, as the upstream sent it.
    Complete(Bytes),
    /// A stream's events, concatenated, `[DONE]` included.
    Stream(Bytes),
}

/// The store key: scoped by client so two clients never share answers.
/// With authentication off every caller is `anonymous`: one shared scope.
pub fn scoped_key(who: &Identity, key: &str) -> String {
    format!("{}\u{1f}{}", who.0, key)
}

/// A digest of everything that shapes the answer: the model and the body's bytes.
pub fn fingerprint(model: &str, body: &[u8]) -> Fingerprint {
    let mut h = Sha256::new();
    h.update(model.as_bytes());
    h.update([0x1f]);
    h.update(body);
    h.finalize().into()
}

/// The outcome of a shared upstream call: the completion's headers, body,
/// and whether it was a stored answer (from another replica) rather than
/// a fresh upstream call.
pub type FlightResult = (Result<(http::HeaderMap, Bytes, bool), ApiError>, Trace);
pub type Flight = Shared<BoxFuture<'static, FlightResult>>;

enum InFlight {
    Complete {
        fingerprint: Fingerprint,
        flight: Flight,
    },
    /// Streams are not shared: a second reader would miss what was sent.
    Stream { fingerprint: Fingerprint },
}

impl InFlight {
    fn fingerprint(&self) -> &Fingerprint {
        match self {
            Self::Complete { fingerprint, .. } | Self::Stream { fingerprint } => fingerprint,
        }
    }
}

/// In-flight keyed requests of this process.
#[derive(Default)]
pub struct Flights {
    map: Mutex<HashMap<String, InFlight>>,
}

/// A hold on a key: released when dropped.
pub struct Claim {
    flights: Arc<Flights>,
    key: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.flights.map.lock().remove(&self.key);
    }
}

impl Flights {
    /// Claims `key` for a stream. Streams are never shared, so a duplicate
    /// of a running stream is refused (409) rather than joined.
    pub fn claim_stream(
        self: &Arc<Self>,
        key: &str,
        fingerprint: Fingerprint,
    ) -> Result<Claim, ApiError> {
        let mut map = self.map.lock();
        match map.get(key) {
            Some(f) if *f.fingerprint() != fingerprint => Err(ApiError::IdempotencyMismatch),
            Some(_) => Err(ApiError::IdempotencyInProgress),
            None => {
                map.insert(key.to_string(), InFlight::Stream { fingerprint });
                Ok(Claim {
                    flights: self.clone(),
                    key: key.to_string(),
                })
            }
        }
    }

    /// Claims `key` for a completion computed by `make` (spawned so that it
    /// finishes, and is stored, even if every waiting client goes away), or
    /// joins the flight that won the race. `make` gets the claim and drops
    /// it when done.
    pub fn lead_or_join(
        self: &Arc<Self>,
        key: &str,
        fingerprint: Fingerprint,
        make: impl FnOnce(Claim) -> BoxFuture<'static, FlightResult>,
    ) -> Result<(Flight, bool), ApiError> {
        use futures::FutureExt;
        let mut map = self.map.lock();
        match map.get(key) {
            Some(f) if *f.fingerprint() != fingerprint => Err(ApiError::IdempotencyMismatch),
            Some(InFlight::Complete { flight, .. }) => Ok((flight.clone(), false)),
            Some(InFlight::Stream { .. }) => Err(ApiError::IdempotencyInProgress),
            None => {
                let claim = Claim {
                    flights: self.clone(),
                    key: key.to_string(),
                };
                // Spawned while the lock is held: the claim's release blocks
                // until the entry exists, so it can never be left behind.
                let task = tokio::spawn(make(claim));
                let flight: Flight = async move {
                    task.await.unwrap_or_else(|_| {
                        (
                            Err(ApiError::BadGateway("the upstream call was aborted".into())),
                            Trace::default(),
                        )
                    })
                }
                .boxed()
                .shared();
                map.insert(
                    key.to_string(),
                    InFlight::Complete {
                        fingerprint,
                        flight: flight.clone(),
                    },
                );
                Ok((flight, true))
            }
        }
    }

    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_differ_by_content_and_scope_by_client() {
        assert_eq!(fingerprint("m", b"a"), fingerprint("m", b"a"));
        assert_ne!(fingerprint("m", b"a"), fingerprint("m", b"b"));
        assert_ne!(fingerprint("m", b"a"), fingerprint("n", b"a"));
        let (a, b) = (Identity("a".into()), Identity("b".into()));
        assert_ne!(scoped_key(&a, "k"), scoped_key(&b, "k"));
    }

    #[tokio::test]
    async fn a_dropped_claim_releases_its_key() {
        let flights = Arc::new(Flights::default());
        let claim = flights.claim_stream("s", [1; 32]).unwrap();
        assert!(matches!(
            flights.claim_stream("s", [1; 32]),
            Err(ApiError::IdempotencyInProgress)
        ));
        assert!(matches!(
            flights.claim_stream("s", [2; 32]),
            Err(ApiError::IdempotencyMismatch)
        ));
        drop(claim);
        assert!(flights.is_empty());

        use futures::FutureExt;
        let make = |claim: Claim| {
            async move {
                drop(claim);
                (Err(ApiError::BadGateway("x".into())), Trace::default())
            }
            .boxed()
        };
        let (flight, led) = flights.lead_or_join("c", [3; 32], make).unwrap();
        assert!(led);
        assert!(flight.await.0.is_err());
        assert!(
            flights.is_empty(),
            "the leader's claim is released when it ends"
        );
    }
}
