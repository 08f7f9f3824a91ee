//! Who drives a batch. A batch is driven (its lines submitted, their
//! results collected) by whichever replica holds its lease in the shared
//! store, renewed while it runs. Every live batch is in one store-wide
//! index; each replica sweeps it, and a batch whose lease lapsed (its
//! driver was killed or stopped) is taken over by the first replica to
//! claim the lease. The new driver runs the batch again from its input
//! file: every line's submission carries an idempotency key of the batch
//! and the line's `custom_id`, so it finds the job it submitted before
//! instead of making a second one, and the result files are written anew,
//! each `custom_id` once.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::auth::{Identity, Principal};
use crate::store::{Claimed, HeldClaim, Space, Store, StoreError, StoreKey};

/// A driver's lease, renewed every third of it.
pub const LEASE: Duration = Duration::from_secs(15);
/// How often a replica looks for batches without a driver.
pub const SWEEP: Duration = Duration::from_secs(3);
/// Live batches looked at per sweep.
const SWEEP_LIMIT: usize = 200;

/// What a new driver needs that the batch's id alone does not give: its
/// creator, whose grants and tier the batch keeps.
#[derive(Serialize, Deserialize)]
struct Driver {
    owner: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    models: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    trace: Option<String>,
}

/// Who a batch runs as, and the W3C `traceparent` its creation request
/// carried (each line's run span links to it), as any driver reads them.
#[derive(Debug, Clone)]
pub struct Creator {
    pub principal: Principal,
    pub trace: Option<String>,
}

fn lease_key(batch_id: &str) -> StoreKey {
    StoreKey::new(Space::Job, "batch-lease", batch_id.as_bytes())
}

fn driver_key(batch_id: &str) -> StoreKey {
    StoreKey::new(Space::Job, "batch-driver", batch_id.as_bytes())
}

/// The store-wide index of batches not yet finished (members: batch ids).
fn live_key() -> StoreKey {
    StoreKey::new(Space::Job, "batch-live", b"")
}

/// The idempotency key of a batch line's job submission.
pub fn line_key(batch_id: &str, custom_id: &str) -> String {
    format!("batch\u{1f}{batch_id}\u{1f}{custom_id}")
}

/// Records a new batch as live, with what a driver needs.
pub async fn register(
    store: &dyn Store,
    batch_id: &str,
    creator: &Creator,
    ttl: Duration,
) -> Result<(), StoreError> {
    let p = &creator.principal;
    let driver = serde_json::to_vec(&Driver {
        owner: p.identity.0.clone(),
        models: p.models.as_ref().map(|m| m.to_vec()),
        tier: p.tier.as_deref().map(String::from),
        trace: creator.trace.clone(),
    })
    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    store
        .put(&driver_key(batch_id), [0; 32], driver.into(), ttl)
        .await?;
    store
        .index_add(&live_key(), batch_id, crate::jobs::now_ms(), 0, ttl)
        .await
}

/// The outcome of trying a batch's lease.
pub enum Take {
    /// This replica drives it now.
    Held(HeldClaim, Box<Creator>),
    /// A live driver holds it.
    Busy,
    /// It was driven to its end.
    Finished,
}

pub async fn take(store: &dyn Store, batch_id: &str) -> Result<Take, StoreError> {
    match store.claim(&lease_key(batch_id), [0; 32], LEASE).await? {
        Claimed::Won(guard) => {
            let held = HeldClaim::hold(guard, LEASE, "batch driver");
            let owner = store
                .get(&driver_key(batch_id))
                .await?
                .and_then(|r| serde_json::from_slice::<Driver>(&r.value).ok())
                .map(|d| Creator {
                    principal: Principal {
                        identity: Identity(d.owner),
                        models: d.models.map(std::sync::Arc::from),
                        tier: d.tier.map(std::sync::Arc::from),
                    },
                    trace: d.trace,
                });
            match owner {
                Some(owner) => Ok(Take::Held(held, Box::new(owner))),
                // Its record expired with it: nothing left to drive.
                None => {
                    finished(store, batch_id, held).await;
                    Ok(Take::Finished)
                }
            }
        }
        Claimed::Busy { .. } => Ok(Take::Busy),
        Claimed::Done(_) => {
            let _ = store.index_remove(&live_key(), batch_id).await;
            Ok(Take::Finished)
        }
    }
}

/// The batch reached its end: its lease completes (no one takes it over)
/// and it leaves the live index.
pub async fn finished(store: &dyn Store, batch_id: &str, held: HeldClaim) {
    if let Err(e) = held
        .complete(bytes::Bytes::from_static(b"done"), LEASE * 8)
        .await
    {
        tracing::warn!(error = %e, "could not close a batch's lease");
    }
    if let Err(e) = store.index_remove(&live_key(), batch_id).await {
        tracing::warn!(error = %e, "could not remove a finished batch from the live index");
    }
}

/// Batches not yet finished, oldest first.
pub async fn live(store: &dyn Store) -> Result<Vec<String>, StoreError> {
    Ok(store
        .index_list(&live_key(), SWEEP_LIMIT)
        .await?
        .into_iter()
        .map(|(id, _)| id)
        .collect())
}
