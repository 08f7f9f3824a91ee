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
    /// Releases a claim without awaiting, when the backend can (memory);
    /// `false` means the caller must spawn [`Backend::abandon`].
    fn abandon_now(&self, _name: &str, _token: Token) -> bool {
        false
    }
}
