//! Shared state: one store per process, built from config, used by
//! idempotency, the response cache and async jobs. Callers see plaintext
//! [`Record`]s under [`StoreKey`]s; a backend (memory or Redis) sees only
//! digested names and, with a key ring, sealed blobs.
//!
//! Claims are atomic across every process on one backend: [`Store::claim`]
//! returns a [`ClaimGuard`] that completes (store + release in one step)
//! or, when dropped, abandons the key.

mod backend;
mod claim;
mod error;
mod key;
mod keyring;
mod layer;
mod memory;
mod metrics;
mod record;
mod redis;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::telemetry::Metrics;
use crate::BuildError;
use forwarder_config::{Config, StoreBackend};

pub use backend::{CounterOp, RateState};
pub use claim::{ClaimGuard, Claimed, HeldClaim, Renewer};
pub use error::StoreError;
pub use key::{Fingerprint, Space, StoreKey};
pub use keyring::{KeyRing, KeyRingError};
pub use metrics::StoreMetrics;
pub use record::Record;

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The completed record under `key`; an in-progress claim, an expired
    /// record and a record that fails authentication all read as `None`.
    async fn get(&self, key: &StoreKey) -> Result<Option<Record>, StoreError>;
    async fn put(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        value: Bytes,
        ttl: Duration,
    ) -> Result<(), StoreError>;
    async fn delete(&self, key: &StoreKey) -> Result<(), StoreError>;
    /// Atomic: claims `key` for `lease` unless claimed or completed.
    async fn claim(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Claimed, StoreError>;
    /// Whether an in-progress claim holds `key` now: a live holder keeps
    /// renewing it, a dead one's lease runs out. Changes nothing.
    async fn claimed(&self, key: &StoreKey) -> Result<bool, StoreError>;
    /// A set of members ordered by score under `key`, atomic across
    /// replicas (Redis: a sorted set). Members are stored as given, not
    /// sealed: ids only, never content. Adds or re-scores `member`, drops
    /// members scored below `drop_below`; the set lives `ttl` past its
    /// last change.
    async fn index_add(
        &self,
        key: &StoreKey,
        member: &str,
        score: u64,
        drop_below: u64,
        ttl: Duration,
    ) -> Result<(), StoreError>;
    /// Members by ascending score, at most `limit`.
    async fn index_list(
        &self,
        key: &StoreKey,
        limit: usize,
    ) -> Result<Vec<(String, u64)>, StoreError>;
    async fn index_remove(&self, key: &StoreKey, member: &str) -> Result<(), StoreError>;
    /// A rate limit (GCRA), atomic across every process on the backend:
    /// spends `cost` units of `rate` under `key`.
    async fn rate(&self, key: &StoreKey, rate: Rate, cost: u64) -> Result<RateState, StoreError> {
        let _ = (key, rate, cost);
        Err(StoreError::Unavailable(
            "this store does not keep rate limits".into(),
        ))
    }
    /// Integer counters (budgets), atomic across every process on the
    /// backend and across `counters` together: increment, then check each
    /// limit; when `check` and one is passed, nothing is added. Returns
    /// whether the increment stood and each counter's value after the call.
    async fn add(&self, counters: &[Counter], check: bool) -> Result<(bool, Vec<i64>), StoreError> {
        let _ = (counters, check);
        Err(StoreError::Unavailable(
            "this store does not keep counters".into(),
        ))
    }
}

/// One counter of [`Store::add`]: its key and what to do to it.
#[derive(Debug, Clone)]
pub struct Counter {
    pub key: StoreKey,
    pub op: CounterOp,
}

/// A limit of `burst` units, refilled one unit per `interval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub interval: Duration,
    pub burst: u64,
}

/// The process's store, from `cfg.store`. With Redis it connects in the
/// background (calls fail fast until connected), so it needs a tokio runtime.
pub fn build(cfg: &Config, metrics: &Metrics) -> Result<Arc<dyn Store>, BuildError> {
    let m = StoreMetrics::new(metrics);
    let mut reload = None;
    let seal: Option<Arc<dyn layer::Seal>> = match &cfg.store.encryption {
        Some(enc) => {
            let ring = Arc::new(
                KeyRing::load(&enc.key_file)
                    .map_err(|e| BuildError::new(format!("store.encryption.key_file: {e}")))?,
            );
            if tokio::runtime::Handle::try_current().is_ok() {
                reload = Some(crate::reload::poll(ring.clone(), enc.reload_interval));
            }
            Some(ring)
        }
        None => None,
    };
    let backend: Arc<dyn backend::Backend> = match cfg.store.backend {
        StoreBackend::Memory => Arc::new(memory::MemoryBackend::new(
            cfg.store.max_bytes,
            cfg.store.max_state_bytes,
            m.clone(),
        )),
        StoreBackend::Redis => {
            let r = cfg.store.redis.as_ref().ok_or_else(|| {
                BuildError::new("store.redis: required when store.backend is redis")
            })?;
            if seal.is_none() && !r.allow_plaintext {
                return Err(BuildError::new(
                    "store.encryption: the redis store needs an encryption key ring \
                     (or store.redis.allow_plaintext: true)",
                ));
            }
            Arc::new(redis::RedisBackend::start(r).map_err(BuildError::new)?)
        }
    };
    let mut store = layer::Layered::new(backend, seal, m);
    if let Some(task) = reload {
        store.hold(task);
    }
    Ok(Arc::new(store))
}

/// A memory store on its own (tests, tools).
pub fn memory(max_bytes: u64) -> Arc<dyn Store> {
    let m = StoreMetrics::unregistered();
    Arc::new(layer::Layered::new(
        Arc::new(memory::MemoryBackend::new(max_bytes, max_bytes, m.clone())),
        None,
        m,
    ))
}

/// Two replicas on one memory backend in the middle of a key rotation
/// (tests): the first has loaded keys `k1` and `k2` (`k2` encrypts), the
/// second only `k1`. `dir` holds the ring files.
#[cfg(test)]
pub(crate) fn two_replicas_mid_rotation(dir: &std::path::Path) -> (Arc<dyn Store>, Arc<dyn Store>) {
    use base64::Engine;
    let b64 = |n: u8| base64::engine::general_purpose::STANDARD.encode([n; 32]);
    let (old, new) = (dir.join("old"), dir.join("new"));
    std::fs::write(&old, format!("k1: {}\n", b64(1))).unwrap();
    std::fs::write(&new, format!("k1: {}\nk2: {}\n", b64(1), b64(2))).unwrap();
    let m = StoreMetrics::unregistered();
    let backend = Arc::new(memory::MemoryBackend::new(1 << 20, 1 << 20, m.clone()));
    let replica = |ring: &std::path::Path| -> Arc<dyn Store> {
        Arc::new(layer::Layered::new(
            backend.clone(),
            Some(Arc::new(KeyRing::load(ring).unwrap())),
            m.clone(),
        ))
    };
    (replica(&new), replica(&old))
}

#[cfg(test)]
mod tests;
