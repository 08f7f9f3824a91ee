//! Idempotency: a completed answer is stored under the client's key and
//! replayed for repeats within the TTL; concurrent duplicates share one
//! upstream call. The store is a trait so a shared (Redis) store can replace
//! the in-memory one; coalescing of in-flight calls is per process.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::{BoxFuture, Shared};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::api::{ApiError, ChatChunk, ChatRequest, ChatResponse};
use crate::auth::Identity;
use crate::pipeline::forward::Trace;

/// An answer kept for replay, with the fingerprint of the request that
/// produced it (a key reused for a different request is an error, not a replay).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredAnswer {
    pub fingerprint: String,
    pub reply: StoredReply,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum StoredReply {
    Complete(ChatResponse),
    Stream(Vec<ChatChunk>),
}

#[derive(Debug, thiserror::Error)]
#[error("idempotency store: {0}")]
pub struct StoreError(pub String);

/// Where answers are kept between requests.
#[async_trait]
pub trait IdempotencyStore: Send + Sync {
    async fn get(&self, key: &str) -> Result<Option<StoredAnswer>, StoreError>;
    async fn put(&self, key: &str, answer: StoredAnswer) -> Result<(), StoreError>;
}

/// The embedded store: bounded (oldest evicted first) with a TTL.
pub struct MemoryStore {
    cache: moka::sync::Cache<String, Arc<StoredAnswer>>,
}

impl MemoryStore {
    pub fn new(ttl: Duration, max_entries: u64) -> Self {
        Self {
            cache: moka::sync::Cache::builder()
                .time_to_live(ttl)
                .max_capacity(max_entries)
                .build(),
        }
    }
}

#[async_trait]
impl IdempotencyStore for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<StoredAnswer>, StoreError> {
        Ok(self.cache.get(key).map(|a| (*a).clone()))
    }

    async fn put(&self, key: &str, answer: StoredAnswer) -> Result<(), StoreError> {
        self.cache.insert(key.to_string(), Arc::new(answer));
        Ok(())
    }
}

/// The store key: scoped by client so two clients never share answers.
pub fn scoped_key(who: &Identity, key: &str) -> String {
    format!("{}\u{1f}{}", who.0, key)
}

/// A digest of everything that shapes the answer.
pub fn fingerprint(chat: &ChatRequest) -> String {
    let bytes = serde_json::to_vec(chat).unwrap_or_default();
    let digest = Sha256::digest(&bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The outcome of a shared upstream call.
pub type Flight = Shared<BoxFuture<'static, (Result<ChatResponse, ApiError>, Trace)>>;

enum InFlight {
    Complete {
        fingerprint: String,
        flight: Flight,
    },
    /// Streams are not shared: a second reader would miss what was sent.
    Stream {
        fingerprint: String,
    },
}

impl InFlight {
    fn fingerprint(&self) -> &str {
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

impl Flights {
    /// Claims `key` for a stream. Streams are never shared, so a duplicate
    /// of a running stream is refused (409) rather than joined.
    pub fn claim_stream(&self, key: &str, fingerprint: &str) -> Result<(), ApiError> {
        let mut map = self.map.lock();
        match map.get(key) {
            Some(f) if f.fingerprint() != fingerprint => Err(ApiError::IdempotencyMismatch),
            Some(_) => Err(ApiError::IdempotencyInProgress),
            None => {
                map.insert(
                    key.to_string(),
                    InFlight::Stream {
                        fingerprint: fingerprint.to_string(),
                    },
                );
                Ok(())
            }
        }
    }

    /// Claims `key` for a completion computed by `make` (spawned so that it
    /// finishes, and is stored, even if every waiting client goes away), or
    /// joins the flight that won the race.
    pub fn lead_or_join(
        &self,
        key: &str,
        fingerprint: &str,
        make: impl FnOnce() -> BoxFuture<'static, (Result<ChatResponse, ApiError>, Trace)>,
    ) -> Result<(Flight, bool), ApiError> {
        use futures::FutureExt;
        let mut map = self.map.lock();
        match map.get(key) {
            Some(f) if f.fingerprint() != fingerprint => Err(ApiError::IdempotencyMismatch),
            Some(InFlight::Complete { flight, .. }) => Ok((flight.clone(), false)),
            Some(InFlight::Stream { .. }) => Err(ApiError::IdempotencyInProgress),
            None => {
                // Spawned while the lock is held: the task's own `release`
                // blocks until the entry exists, so it can never be left behind.
                let task = tokio::spawn(make());
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
                        fingerprint: fingerprint.to_string(),
                        flight: flight.clone(),
                    },
                );
                Ok((flight, true))
            }
        }
    }

    pub fn release(&self, key: &str) {
        self.map.lock().remove(key);
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

    fn chat(prompt: &str) -> ChatRequest {
        ChatRequest::from_prompt("m", prompt)
    }

    #[test]
    fn fingerprints_differ_by_content_and_scope_by_client() {
        assert_eq!(fingerprint(&chat("a")), fingerprint(&chat("a")));
        assert_ne!(fingerprint(&chat("a")), fingerprint(&chat("b")));
        let (a, b) = (Identity("a".into()), Identity("b".into()));
        assert_ne!(scoped_key(&a, "k"), scoped_key(&b, "k"));
    }

    #[tokio::test]
    async fn a_second_claim_joins_or_is_refused() {
        let flights = Flights::default();
        assert!(flights.claim_stream("s", "f1").is_ok());
        assert!(matches!(
            flights.claim_stream("s", "f1"),
            Err(ApiError::IdempotencyInProgress)
        ));
        assert!(matches!(
            flights.claim_stream("s", "f2"),
            Err(ApiError::IdempotencyMismatch)
        ));
        flights.release("s");
        assert!(flights.is_empty());

        use futures::FutureExt;
        let make = || async { (Err(ApiError::BadGateway("x".into())), Trace::default()) }.boxed();
        let (_, led) = flights.lead_or_join("c", "f", make).unwrap();
        let (flight, led_again) = flights.lead_or_join("c", "f", make).unwrap();
        assert!(led && !led_again);
        assert!(flight.await.0.is_err());
    }

    #[tokio::test]
    async fn memory_store_round_trips() {
        let store = MemoryStore::new(Duration::from_secs(60), 10);
        assert!(store.get("k").await.unwrap().is_none());
        let answer = StoredAnswer {
            fingerprint: "f".into(),
            reply: StoredReply::Stream(vec![]),
        };
        store.put("k", answer).await.unwrap();
        assert_eq!(store.get("k").await.unwrap().unwrap().fingerprint, "f");
    }
}
