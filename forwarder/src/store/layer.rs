//! The caller-facing store over any backend: encodes records, seals them
//! when a key ring is configured, and turns a record that fails
//! authentication or decoding into a miss (counted and logged, never served).
//! A record sealed under a key id this replica has not loaded (a key
//! rotation still rolling out) is not corrupt: it is left in place and the
//! call fails as the store being unavailable for that record.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};

use super::backend::{Backend, RawClaimed};
use super::claim::{ClaimGuard, Claimed};
use super::error::StoreError;
use super::key::{Fingerprint, StoreKey};
use super::metrics::StoreMetrics;
use super::record::Record;
use super::Store;

/// First byte of a blob that is a plain (unsealed) record.
pub const PLAIN: u8 = 0;

/// Authenticated encryption of records, bound to their key (`ad`).
pub trait Seal: Send + Sync + 'static {
    fn seal(&self, ad: &[u8], plain: &[u8]) -> Bytes;
    /// The plaintext, or why the blob was refused (never its content).
    fn open(&self, ad: &[u8], blob: &[u8]) -> Result<Bytes, Refused>;
}

/// Why a stored blob was not opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Sealed under a key id not in this replica's ring: readable
    /// elsewhere (or here after a reload), so never deleted.
    UnknownKey(String),
    /// Tampered, truncated or undecodable: a miss, and removable.
    Invalid(String),
}

pub struct Core {
    pub backend: Arc<dyn Backend>,
    pub seal: Option<Arc<dyn Seal>>,
    pub metrics: StoreMetrics,
}

impl Core {
    pub fn name(&self, key: &StoreKey) -> String {
        key.name().to_string()
    }

    pub fn seal(&self, key: &StoreKey, record: &Record) -> Bytes {
        let plain = record.encode();
        match &self.seal {
            Some(s) => s.seal(key.name().as_bytes(), &plain),
            None => {
                let mut b = BytesMut::with_capacity(1 + plain.len());
                b.put_u8(PLAIN);
                b.put_slice(&plain);
                b.freeze()
            }
        }
    }

    /// A blob read back: the record; `Ok(None)` (counted, logged) if it
    /// cannot be trusted; an error if it is sealed under a key not loaded
    /// here (counted apart: a rotation in progress, not an attack).
    fn open(&self, key: &StoreKey, blob: Bytes) -> Result<Option<Record>, StoreError> {
        let plain = match (&self.seal, blob.first()) {
            // With a key ring, plaintext records are refused: anyone who
            // can write to the backend could otherwise plant answers.
            (Some(s), _) => s.open(key.name().as_bytes(), &blob),
            (None, Some(&PLAIN)) => Ok(blob.slice(1..)),
            // Sealed elsewhere, while this replica runs without a ring:
            // the same case as a key it has not loaded.
            (None, _) => Err(Refused::UnknownKey("(no key ring here)".into())),
        };
        let record = plain
            .and_then(|p| Record::decode(p).ok_or_else(|| Refused::Invalid("undecodable".into())));
        match record {
            Ok(r) => Ok(Some(r)),
            Err(Refused::UnknownKey(id)) => {
                self.metrics.unreadable.inc();
                tracing::warn!(key = %key.name(), key_id = %id, "stored record sealed under a key not loaded here; left in place");
                Err(StoreError::UnknownKey(id))
            }
            Err(Refused::Invalid(why)) => {
                self.metrics.corrupt.inc();
                tracing::warn!(key = %key.name(), reason = %why, "stored record refused; treated as a miss");
                Ok(None)
            }
        }
    }

    fn failed(&self, op: &str, e: StoreError) -> StoreError {
        self.metrics.errors.with_label_values(&[op]).inc();
        e
    }
}

/// A [`Store`] over a backend, sealing when configured.
pub struct Layered {
    core: Arc<Core>,
    /// Background work that ends with the store (the key ring's reload).
    tasks: Vec<tokio_util::task::AbortOnDropHandle<()>>,
}

impl Layered {
    pub fn new(
        backend: Arc<dyn Backend>,
        seal: Option<Arc<dyn Seal>>,
        metrics: StoreMetrics,
    ) -> Self {
        Self {
            core: Arc::new(Core {
                backend,
                seal,
                metrics,
            }),
            tasks: Vec::new(),
        }
    }

    pub fn hold(&mut self, task: tokio::task::JoinHandle<()>) {
        self.tasks
            .push(tokio_util::task::AbortOnDropHandle::new(task));
    }
}

#[async_trait]
impl Store for Layered {
    async fn get(&self, key: &StoreKey) -> Result<Option<Record>, StoreError> {
        let blob = self
            .core
            .backend
            .get(&self.core.name(key))
            .await
            .map_err(|e| self.core.failed("get", e))?;
        match blob {
            Some(b) => self.core.open(key, b),
            None => Ok(None),
        }
    }

    async fn put(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        value: Bytes,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let blob = self.core.seal(key, &Record::new(fingerprint, value));
        self.core
            .backend
            .put(&self.core.name(key), blob, ttl)
            .await
            .map_err(|e| self.core.failed("put", e))
    }

    async fn delete(&self, key: &StoreKey) -> Result<(), StoreError> {
        self.core
            .backend
            .delete(&self.core.name(key))
            .await
            .map_err(|e| self.core.failed("delete", e))
    }

    async fn claimed(&self, key: &StoreKey) -> Result<bool, StoreError> {
        self.core
            .backend
            .claimed(&self.core.name(key))
            .await
            .map_err(|e| self.core.failed("claimed", e))
    }

    async fn index_add(
        &self,
        key: &StoreKey,
        member: &str,
        score: u64,
        drop_below: u64,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.core
            .backend
            .index_add(&self.core.name(key), member, score, drop_below, ttl)
            .await
            .map_err(|e| self.core.failed("index", e))
    }

    async fn index_list(
        &self,
        key: &StoreKey,
        limit: usize,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        self.core
            .backend
            .index_list(&self.core.name(key), limit)
            .await
            .map_err(|e| self.core.failed("index", e))
    }

    async fn index_remove(&self, key: &StoreKey, member: &str) -> Result<(), StoreError> {
        self.core
            .backend
            .index_remove(&self.core.name(key), member)
            .await
            .map_err(|e| self.core.failed("index", e))
    }

    async fn rate(
        &self,
        key: &StoreKey,
        rate: super::Rate,
        cost: u64,
    ) -> Result<super::RateState, StoreError> {
        let interval = u64::try_from(rate.interval.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        self.core
            .backend
            .gcra(&self.core.name(key), interval, rate.burst.max(1), cost)
            .await
            .map_err(|e| self.core.failed("rate", e))
    }

    async fn add(
        &self,
        counters: &[super::Counter],
        check: bool,
    ) -> Result<(bool, Vec<i64>), StoreError> {
        let names: Vec<String> = counters.iter().map(|c| self.core.name(&c.key)).collect();
        let ops: Vec<super::CounterOp> = counters.iter().map(|c| c.op).collect();
        self.core
            .backend
            .add(&names, &ops, check)
            .await
            .map_err(|e| self.core.failed("counter", e))
    }

    async fn claim(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Claimed, StoreError> {
        let name = self.core.name(key);
        // Twice at most: a record that cannot be trusted is removed and the
        // claim retried once, so it reads as a miss. One sealed under a key
        // not loaded here is an error instead, and stays.
        for _ in 0..2 {
            let token: super::backend::Token = rand::random();
            let raw = self
                .core
                .backend
                .claim(&name, token, fingerprint, lease)
                .await
                .map_err(|e| self.core.failed("claim", e))?;
            match raw {
                RawClaimed::Won => {
                    return Ok(Claimed::Won(ClaimGuard {
                        core: self.core.clone(),
                        key: key.clone(),
                        token,
                        fingerprint,
                        held: true,
                    }))
                }
                RawClaimed::Busy(fingerprint) => return Ok(Claimed::Busy { fingerprint }),
                RawClaimed::Done(blob) => match self.core.open(key, blob)? {
                    Some(r) => return Ok(Claimed::Done(r)),
                    None => {
                        self.core
                            .backend
                            .delete(&name)
                            .await
                            .map_err(|e| self.core.failed("delete", e))?;
                    }
                },
            }
        }
        Err(StoreError::Corrupt(
            "a record kept reappearing corrupt".into(),
        ))
    }
}
