//! The embedded backend: bounded in bytes, least recently used evicted
//! first (so a new record is always admitted), each entry expiring after
//! its own TTL or lease. Claims are atomic per key (moka's compute).

use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use moka::ops::compute::{CompResult, Op};
use moka::sync::Cache;

use super::backend::{gcra_step, Backend, RateState, RawClaimed, Token};
use super::error::StoreError;
use super::key::Fingerprint;
use super::metrics::StoreMetrics;

#[derive(Clone)]
enum Slot {
    Claim {
        token: Token,
        fingerprint: Fingerprint,
    },
    Record(Bytes),
    /// A rate limit's theoretical arrival time (µs since `epoch`).
    Tat(u64),
}

#[derive(Clone)]
struct Entry {
    slot: Slot,
    ttl: Duration,
}

impl Entry {
    fn weight(&self) -> usize {
        match &self.slot {
            Slot::Claim { .. } | Slot::Tat(_) => 64,
            Slot::Record(b) => b.len() + 64,
        }
    }

    fn held_by(&self, token: &Token) -> bool {
        matches!(&self.slot, Slot::Claim { token: t, .. } if t == token)
    }
}

/// Each entry expires after its own TTL (records) or lease (claims).
struct PerEntry;

impl moka::Expiry<String, Entry> for PerEntry {
    fn expire_after_create(&self, _: &String, v: &Entry, _: Instant) -> Option<Duration> {
        Some(v.ttl)
    }

    fn expire_after_update(
        &self,
        _: &String,
        v: &Entry,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.ttl)
    }
}

pub struct MemoryBackend {
    cache: Cache<String, Entry>,
    epoch: Instant,
    metrics: StoreMetrics,
}

impl MemoryBackend {
    pub fn new(max_bytes: u64, metrics: StoreMetrics) -> Self {
        let evictions = metrics.evictions.clone();
        Self {
            cache: Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|k: &String, v: &Entry| {
                    u32::try_from(k.len() + v.weight()).unwrap_or(u32::MAX)
                })
                .expire_after(PerEntry)
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .eviction_listener(move |_, _, cause| {
                    if cause == moka::notification::RemovalCause::Size {
                        evictions.inc();
                    }
                })
                .build(),
            epoch: Instant::now(),
            metrics,
        }
    }

    fn update_bytes(&self) {
        self.metrics
            .bytes
            .set(i64::try_from(self.cache.weighted_size()).unwrap_or(i64::MAX));
    }

    #[cfg(test)]
    pub fn settle(&self) {
        self.cache.run_pending_tasks();
        self.update_bytes();
    }

    fn release(&self, name: &str, token: Token) {
        self.cache.entry_by_ref(name).and_compute_with(|e| match e {
            Some(e) if e.value().held_by(&token) => Op::Remove,
            _ => Op::Nop,
        });
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    async fn get(&self, name: &str) -> Result<Option<Bytes>, StoreError> {
        Ok(self.cache.get(name).and_then(|e| match e.slot {
            Slot::Record(b) => Some(b),
            Slot::Claim { .. } | Slot::Tat(_) => None,
        }))
    }

    async fn put(&self, name: &str, blob: Bytes, ttl: Duration) -> Result<(), StoreError> {
        self.cache.insert(
            name.to_string(),
            Entry {
                slot: Slot::Record(blob),
                ttl,
            },
        );
        self.update_bytes();
        Ok(())
    }

    async fn delete(&self, name: &str) -> Result<(), StoreError> {
        self.cache.invalidate(name);
        Ok(())
    }

    async fn claim(
        &self,
        name: &str,
        token: Token,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<RawClaimed, StoreError> {
        let r = self.cache.entry_by_ref(name).and_compute_with(|e| match e {
            None => Op::Put(Entry {
                slot: Slot::Claim { token, fingerprint },
                ttl: lease,
            }),
            Some(_) => Op::Nop,
        });
        Ok(match r {
            CompResult::Unchanged(e) => match e.into_value().slot {
                Slot::Claim { fingerprint, .. } => RawClaimed::Busy(fingerprint),
                Slot::Record(b) => RawClaimed::Done(b),
                Slot::Tat(_) => RawClaimed::Busy([0; 32]),
            },
            _ => RawClaimed::Won,
        })
    }

    async fn renew(&self, name: &str, token: Token, lease: Duration) -> Result<bool, StoreError> {
        let r = self.cache.entry_by_ref(name).and_compute_with(|e| match e {
            Some(e) if e.value().held_by(&token) => Op::Put(Entry {
                slot: e.into_value().slot,
                ttl: lease,
            }),
            _ => Op::Nop,
        });
        Ok(matches!(r, CompResult::ReplacedWith(_)))
    }

    async fn complete(
        &self,
        name: &str,
        token: Token,
        blob: Bytes,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let r = self.cache.entry_by_ref(name).and_compute_with(|e| match e {
            Some(e) if !e.value().held_by(&token) => Op::Nop,
            _ => Op::Put(Entry {
                slot: Slot::Record(blob),
                ttl,
            }),
        });
        self.update_bytes();
        Ok(!matches!(r, CompResult::Unchanged(_)))
    }

    async fn abandon(&self, name: &str, token: Token) -> Result<(), StoreError> {
        self.release(name, token);
        Ok(())
    }

    async fn gcra(
        &self,
        name: &str,
        interval_us: u64,
        burst: u64,
        cost: u64,
    ) -> Result<RateState, StoreError> {
        let now = self.epoch.elapsed().as_micros() as u64;
        let mut state = None;
        self.cache.entry_by_ref(name).and_compute_with(|e| {
            let tat = e.and_then(|e| match e.into_value().slot {
                Slot::Tat(t) => Some(t),
                _ => None,
            });
            let (keep, s) = gcra_step(now, tat, interval_us, burst, cost);
            state = Some(s);
            match keep {
                Some(t) => Op::Put(Entry {
                    slot: Slot::Tat(t),
                    ttl: Duration::from_micros((t - now).max(1)),
                }),
                None => Op::Nop,
            }
        });
        Ok(state.expect("the closure ran"))
    }

    fn abandon_now(&self, name: &str, token: Token) -> bool {
        self.release(name, token);
        true
    }
}
