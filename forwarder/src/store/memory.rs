//! The embedded backend: bounded in bytes, least recently used evicted
//! first (so a new record is always admitted), each entry expiring after
//! its own TTL or lease. Claims are atomic per key (moka's compute).
//!
//! Two budgets, so payload never evicts coordination state: cached answers
//! and Batch API files (`cache:` and `file:` names) live in one bounded
//! map, everything else (claims, job turns and records, idempotency
//! answers, rate limits, batches) in another. A large upload can flush
//! cached answers, never a tenant's claims or limits. The sorted indexes
//! (batch lists) have a third budget, a quarter of the state budget.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use moka::ops::compute::{CompResult, Op};
use moka::sync::Cache;

use super::backend::{counters_step, gcra_step, Backend, CounterOp, RateState, RawClaimed, Token};
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
    /// A budget counter, and when it expires (set at its first use).
    Count(i64, Instant),
}

#[derive(Clone)]
struct Entry {
    slot: Slot,
    ttl: Duration,
}

impl Entry {
    fn weight(&self) -> usize {
        match &self.slot {
            Slot::Claim { .. } | Slot::Tat(_) | Slot::Count(..) => 64,
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

/// A sorted index: members and scores, and when the whole set expires.
struct Index {
    members: std::collections::HashMap<String, u64>,
    expires: Instant,
}

/// What one member of an index costs: its name, its score and the map's
/// own overhead (an estimate, as moka's weigher is for entries).
fn member_weight(member: &str) -> usize {
    member.len() + 48
}

impl Index {
    fn weight(&self) -> usize {
        self.members.keys().map(|m| member_weight(m)).sum()
    }
}

/// The sorted indexes (one per client's batches, one of live batches),
/// bounded by a budget of their own: a quarter of the state budget.
struct Indexes {
    all: std::collections::HashMap<String, Index>,
    budget: usize,
}

impl Indexes {
    /// Drops the lowest-scored members of the largest index until the
    /// indexes fit their budget (a client with the most batches loses its
    /// oldest entries first); returns how many were dropped.
    fn fit(&mut self) -> usize {
        let mut dropped = 0;
        loop {
            let total: usize = self.all.values().map(Index::weight).sum();
            if total <= self.budget {
                return dropped;
            }
            let Some(largest) = self.all.values_mut().max_by_key(|i| i.weight()) else {
                return dropped;
            };
            let mut by_score: Vec<(u64, String)> = largest
                .members
                .iter()
                .map(|(m, s)| (*s, m.clone()))
                .collect();
            by_score.sort_unstable();
            let mut over = total - self.budget;
            for (_, m) in by_score {
                if over == 0 {
                    break;
                }
                over = over.saturating_sub(member_weight(&m));
                largest.members.remove(&m);
                dropped += 1;
            }
            self.all.retain(|_, i| !i.members.is_empty());
        }
    }
}

pub struct MemoryBackend {
    indexes: parking_lot::Mutex<Indexes>,
    /// Cached answers and files.
    payload: Cache<String, Entry>,
    /// Claims, turns, records and limits.
    state: Cache<String, Entry>,
    epoch: Instant,
    metrics: StoreMetrics,
    /// Makes a counter call atomic across its counters (they live in
    /// `state`, bounded and evicted like other state).
    counters: parking_lot::Mutex<()>,
}

/// Whether a name holds payload (evictable by payload) rather than state.
fn is_payload(name: &str) -> bool {
    name.starts_with("cache:") || name.starts_with("file:")
}

fn bounded(max_bytes: u64, metrics: &StoreMetrics) -> Cache<String, Entry> {
    let evictions = metrics.evictions.clone();
    Cache::builder()
        .max_capacity(max_bytes)
        .weigher(|k: &String, v: &Entry| u32::try_from(k.len() + v.weight()).unwrap_or(u32::MAX))
        .expire_after(PerEntry)
        .eviction_policy(moka::policy::EvictionPolicy::lru())
        .eviction_listener(move |_, _, cause| {
            if cause == moka::notification::RemovalCause::Size {
                evictions.inc();
            }
        })
        .build()
}

impl MemoryBackend {
    /// `payload_bytes` for cached answers and files, `state_bytes` for
    /// everything else.
    pub fn new(payload_bytes: u64, state_bytes: u64, metrics: StoreMetrics) -> Self {
        Self {
            payload: bounded(payload_bytes, &metrics),
            state: bounded(state_bytes, &metrics),
            indexes: parking_lot::Mutex::new(Indexes {
                all: std::collections::HashMap::new(),
                budget: usize::try_from(state_bytes / 4).unwrap_or(usize::MAX),
            }),
            epoch: Instant::now(),
            metrics,
            counters: parking_lot::Mutex::default(),
        }
    }

    fn map(&self, name: &str) -> &Cache<String, Entry> {
        if is_payload(name) {
            &self.payload
        } else {
            &self.state
        }
    }

    fn update_bytes(&self) {
        let total = self.payload.weighted_size() + self.state.weighted_size();
        self.metrics
            .bytes
            .set(i64::try_from(total).unwrap_or(i64::MAX));
    }

    #[cfg(test)]
    pub fn settle(&self) {
        self.payload.run_pending_tasks();
        self.state.run_pending_tasks();
        self.update_bytes();
    }

    fn release(&self, name: &str, token: Token) {
        self.map(name)
            .entry_by_ref(name)
            .and_compute_with(|e| match e {
                Some(e) if e.value().held_by(&token) => Op::Remove,
                _ => Op::Nop,
            });
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    async fn get(&self, name: &str) -> Result<Option<Bytes>, StoreError> {
        Ok(self.map(name).get(name).and_then(|e| match e.slot {
            Slot::Record(b) => Some(b),
            Slot::Claim { .. } | Slot::Tat(_) | Slot::Count(..) => None,
        }))
    }

    async fn put(&self, name: &str, blob: Bytes, ttl: Duration) -> Result<(), StoreError> {
        self.map(name).insert(
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
        self.map(name).invalidate(name);
        Ok(())
    }

    async fn claimed(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .map(name)
            .get(name)
            .is_some_and(|e| matches!(e.slot, Slot::Claim { .. })))
    }

    async fn claim(
        &self,
        name: &str,
        token: Token,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<RawClaimed, StoreError> {
        let r = self
            .map(name)
            .entry_by_ref(name)
            .and_compute_with(|e| match e {
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
                Slot::Tat(_) | Slot::Count(..) => RawClaimed::Busy([0; 32]),
            },
            _ => RawClaimed::Won,
        })
    }

    async fn renew(&self, name: &str, token: Token, lease: Duration) -> Result<bool, StoreError> {
        let r = self
            .map(name)
            .entry_by_ref(name)
            .and_compute_with(|e| match e {
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
        let r = self
            .map(name)
            .entry_by_ref(name)
            .and_compute_with(|e| match e {
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
        self.map(name).entry_by_ref(name).and_compute_with(|e| {
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

    async fn add(
        &self,
        names: &[String],
        ops: &[CounterOp],
        check: bool,
    ) -> Result<(bool, Vec<i64>), StoreError> {
        let _held = self.counters.lock();
        let now = Instant::now();
        let current: Vec<(i64, Option<Instant>)> = names
            .iter()
            .map(|n| match self.state.get(n) {
                Some(Entry {
                    slot: Slot::Count(v, until),
                    ..
                }) if until > now => (v, Some(until)),
                _ => (0, None),
            })
            .collect();
        let values: Vec<i64> = current.iter().map(|c| c.0).collect();
        let (stood, after) = counters_step(&values, ops, check);
        if stood {
            for (i, name) in names.iter().enumerate() {
                let until = current[i].1.unwrap_or(now + ops[i].ttl);
                self.state.insert(
                    name.clone(),
                    Entry {
                        slot: Slot::Count(after[i], until),
                        ttl: until
                            .saturating_duration_since(now)
                            .max(Duration::from_millis(1)),
                    },
                );
            }
        }
        Ok((stood, after))
    }

    async fn index_add(
        &self,
        name: &str,
        member: &str,
        score: u64,
        drop_below: u64,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut indexes = self.indexes.lock();
        indexes.all.retain(|_, i| i.expires > now);
        let index = indexes
            .all
            .entry(name.to_string())
            .or_insert_with(|| Index {
                members: std::collections::HashMap::new(),
                expires: now,
            });
        index.members.insert(member.to_string(), score);
        index.members.retain(|_, s| *s >= drop_below);
        index.expires = now + ttl;
        let dropped = indexes.fit();
        self.metrics
            .evictions
            .inc_by(u64::try_from(dropped).unwrap_or(u64::MAX));
        Ok(())
    }

    async fn index_list(&self, name: &str, limit: usize) -> Result<Vec<(String, u64)>, StoreError> {
        let indexes = self.indexes.lock();
        let Some(index) = indexes.all.get(name).filter(|i| i.expires > Instant::now()) else {
            return Ok(Vec::new());
        };
        let mut v: Vec<(String, u64)> =
            index.members.iter().map(|(m, s)| (m.clone(), *s)).collect();
        v.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
        v.truncate(limit);
        Ok(v)
    }

    async fn index_remove(&self, name: &str, member: &str) -> Result<(), StoreError> {
        if let Some(index) = self.indexes.lock().all.get_mut(name) {
            index.members.remove(member);
        }
        Ok(())
    }

    fn abandon_now(&self, name: &str, token: Token) -> bool {
        self.release(name, token);
        true
    }
}
