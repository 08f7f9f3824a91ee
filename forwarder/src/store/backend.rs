//! What a backend provides: atomic operations on opaque blobs under names.
//! Encoding, sealing and the caller-facing [`super::Store`] live above it
//! (see `layer.rs`), so every backend gets encryption the same way.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::error::StoreError;
use super::key::Fingerprint;

/// Identifies one claim, so only its holder can renew, complete or abandon it.
pub type Token = [u8; 16];

/// A rate limit's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateState {
    pub allowed: bool,
    /// Units left after this call.
    pub remaining: u64,
    /// When refused: how long until `cost` units are available.
    pub retry_after_us: u64,
    /// How long until the limit is full again.
    pub reset_us: u64,
}

/// GCRA on a theoretical arrival time `tat` (µs), pure: the new `tat` to
/// keep (if allowed) and the answer. Shared by the memory backend and, as
/// Lua, by Redis.
pub fn gcra_step(
    now: u64,
    tat: Option<u64>,
    interval: u64,
    burst: u64,
    cost: u64,
) -> (Option<u64>, RateState) {
    let tat = tat.unwrap_or(now).max(now);
    let new_tat = tat + interval * cost;
    let allow_at = new_tat.saturating_sub(interval * burst);
    if now < allow_at {
        return (
            None,
            RateState {
                allowed: false,
                remaining: 0,
                retry_after_us: allow_at - now,
                reset_us: tat - now,
            },
        );
    }
    let remaining = (now + interval * burst - new_tat) / interval.max(1);
    (
        Some(new_tat),
        RateState {
            allowed: true,
            remaining,
            retry_after_us: 0,
            reset_us: new_tat - now,
        },
    )
}

/// One counter of an atomic [`Backend::add`]: add `delta`; with a
/// `limit` and a checked call, the whole call is undone when the sum
/// passes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterOp {
    pub delta: i64,
    pub limit: Option<i64>,
    /// How long the counter lives from its first use.
    pub ttl: Duration,
}

/// Increment, then check (pure; the memory backend's, and the Redis
/// script's, decision): the values after the call and whether it stood.
pub fn counters_step(current: &[i64], ops: &[CounterOp], check: bool) -> (bool, Vec<i64>) {
    let added: Vec<i64> = current
        .iter()
        .zip(ops)
        .map(|(v, op)| v.saturating_add(op.delta))
        .collect();
    let over = check
        && added
            .iter()
            .zip(ops)
            .any(|(v, op)| op.limit.is_some_and(|l| *v > l));
    if over {
        (false, current.to_vec())
    } else {
        (true, added)
    }
}

/// A claim attempt's outcome on the raw blobs.
pub enum RawClaimed {
    Won,
    Busy(Fingerprint),
    /// A completed record's blob (still sealed).
    Done(Bytes),
}

#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// A completed record's blob; an in-progress claim reads as `None`.
    async fn get(&self, name: &str) -> Result<Option<Bytes>, StoreError>;
    async fn put(&self, name: &str, blob: Bytes, ttl: Duration) -> Result<(), StoreError>;
    async fn delete(&self, name: &str) -> Result<(), StoreError>;
    /// Atomic: claims `name` for `lease` unless it is claimed or completed.
    async fn claim(
        &self,
        name: &str,
        token: Token,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<RawClaimed, StoreError>;
    /// Extends a claim still held by `token`; `false` if it was lost.
    async fn renew(&self, name: &str, token: Token, lease: Duration) -> Result<bool, StoreError>;
    /// Stores `blob` and releases the claim in one step, if `token` still
    /// holds it or nobody does; `false` if another claim or record holds it.
    async fn complete(
        &self,
        name: &str,
        token: Token,
        blob: Bytes,
        ttl: Duration,
    ) -> Result<bool, StoreError>;
    /// Releases a claim still held by `token`.
    async fn abandon(&self, name: &str, token: Token) -> Result<(), StoreError>;
    /// Whether an in-progress claim holds `name` now (changes nothing).
    async fn claimed(&self, name: &str) -> Result<bool, StoreError>;
    /// GCRA, atomic: spends `cost` units of a limit refilled one unit per
    /// `interval_us`, holding at most `burst` units.
    async fn gcra(
        &self,
        name: &str,
        interval_us: u64,
        burst: u64,
        cost: u64,
    ) -> Result<RateState, StoreError>;
    /// A set of members ordered by score (Redis: a sorted set): adds or
    /// re-scores `member`, drops members scored below `drop_below`, and
    /// keeps the set `ttl` past this change. Atomic per set.
    async fn index_add(
        &self,
        name: &str,
        member: &str,
        score: u64,
        drop_below: u64,
        ttl: Duration,
    ) -> Result<(), StoreError>;
    /// Members by ascending score, at most `limit`.
    async fn index_list(&self, name: &str, limit: usize) -> Result<Vec<(String, u64)>, StoreError>;
    async fn index_remove(&self, name: &str, member: &str) -> Result<(), StoreError>;
    /// Counters (integers, not sealed), atomic across `names` together:
    /// adds each op's delta; when `check` and a counter passes its limit,
    /// nothing is added. Returns whether it was added and the values.
    async fn add(
        &self,
        names: &[String],
        ops: &[CounterOp],
        check: bool,
    ) -> Result<(bool, Vec<i64>), StoreError> {
        let _ = (names, ops, check);
        Err(StoreError::Unavailable(
            "this store does not keep counters".into(),
        ))
    }
    /// Releases a claim without awaiting, when the backend can (memory);
    /// `false` means the caller must spawn [`Backend::abandon`].
    fn abandon_now(&self, _name: &str, _token: Token) -> bool {
        false
    }
}

#[cfg(test)]
mod counter_tests {
    use super::*;

    #[test]
    fn a_checked_add_past_a_limit_is_undone_whole() {
        let op = |delta, limit| CounterOp {
            delta,
            limit,
            ttl: Duration::from_secs(1),
        };
        let ops = [op(5, Some(10)), op(3, None)];
        assert_eq!(counters_step(&[4, 0], &ops, true), (true, vec![9, 3]));
        assert_eq!(counters_step(&[6, 1], &ops, true), (false, vec![6, 1]));
        // Corrections are unchecked, and may be negative (a refund).
        assert_eq!(counters_step(&[6, 1], &ops, false), (true, vec![11, 4]));
        assert_eq!(
            counters_step(&[6], &[op(-2, Some(1))], false),
            (true, vec![4])
        );
        // Exactly at the limit fits.
        assert_eq!(
            counters_step(&[5], &[op(5, Some(10))], true),
            (true, vec![10])
        );
    }
}
