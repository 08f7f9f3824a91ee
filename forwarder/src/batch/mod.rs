//! The OpenAI Batch API on the async jobs' queue: an uploaded JSONL file
//! (checked line by line as it streams in), a batch whose every line
//! becomes a job, and output/error files keyed by `custom_id`.
//!
//! Files, batches and each client's batch list live in the shared store,
//! keyed by owner. A batch runs as its creator: a line for a model the
//! creator's credential does not grant goes to the error file, answered
//! 404 `model_not_found` as every other door answers it, without running; every line spends a request of the creator's
//! per-process rate limit before it is queued (the batch waits when the
//! limit is reached), and each line's job carries the creator's grants and
//! tier, so shared request and token limits apply when it runs. A batch is
//! driven (its jobs submitted, their results collected) by the replica that
//! holds its lease (`lease.rs`); a batch whose driver dies is taken over by
//! another replica, as its creator still.

pub mod anthropic;
mod driver;
pub mod files;
pub mod jsonl;
mod lease;
pub mod model;
mod upload;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::auth::{Identity, Principal};
use crate::jobs::{now_ms, Jobs};
use crate::pipeline::Pipeline;
use crate::store::{Store, StoreError};
use files::{key, FileStore};
use forwarder_config::BatchConfig;
use model::{Batch, BatchStatus, Counts, FileMeta};
use upload::new_file_id;
pub use upload::Upload;

/// Why a Batch API call was refused.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("the store is unavailable: {0}")]
    Store(#[from] StoreError),
}

pub struct Batches {
    files: FileStore,
    pipeline: Arc<Pipeline>,
    jobs: Arc<Jobs>,
    cfg: BatchConfig,
    /// Bytes per line of an input file.
    max_line: usize,
    /// Cancelled here and not yet seen by their driver.
    cancelled: Mutex<HashSet<String>>,
}

impl Batches {
    pub fn new(
        pipeline: Arc<Pipeline>,
        jobs: Arc<Jobs>,
        cfg: BatchConfig,
        ttl: Duration,
        body_limit: usize,
    ) -> Arc<Self> {
        let store: Arc<dyn Store> = pipeline.store().clone();
        let me = Arc::new(Self {
            files: FileStore { store, ttl },
            pipeline,
            jobs,
            max_line: cfg.max_line_bytes.unwrap_or(body_limit),
            cfg,
            cancelled: Mutex::new(HashSet::new()),
        });
        tokio::spawn(Self::sweep(Arc::downgrade(&me)));
        me
    }

    pub fn max_file_bytes(&self) -> usize {
        self.cfg.max_file_bytes
    }

    pub fn upload(&self, owner: &Identity) -> Upload {
        Upload::new(
            self.files.writer(owner, new_file_id()),
            self.max_line,
            self.cfg.max_file_lines,
            self.cfg.max_file_bytes,
        )
    }

    pub async fn file(&self, owner: &Identity, id: &str) -> Result<FileMeta, BatchError> {
        self.files
            .meta(owner, id)
            .await?
            .ok_or(BatchError::NotFound("no such file"))
    }

    /// The content's chunks, read one at a time.
    pub fn content(
        &self,
        owner: Identity,
        meta: &FileMeta,
    ) -> impl futures::Stream<Item = Result<bytes::Bytes, StoreError>> + Send + 'static {
        let files = self.files.clone();
        let (id, chunks) = (meta.id.clone(), meta.chunks);
        futures::stream::unfold(0u32, move |n| {
            let (files, owner, id) = (files.clone(), owner.clone(), id.clone());
            async move {
                if n >= chunks {
                    return None;
                }
                Some((files.chunk(&owner, &id, n).await, n + 1))
            }
        })
    }

    /// Creates a batch that runs as `creator` (its grants and tier), its
    /// lines' run spans linked to `trace` (the creation request's W3C
    /// `traceparent`, if it sent one).
    pub async fn create(
        self: &Arc<Self>,
        creator: &Principal,
        trace: Option<String>,
        input_file_id: &str,
        endpoint: &str,
        window: &str,
        metadata: Option<serde_json::Map<String, serde_json::Value>>,
    ) -> Result<Batch, BatchError> {
        if !jsonl::ENDPOINTS.contains(&endpoint) {
            return Err(BatchError::BadRequest(format!(
                "endpoint must be one of {}",
                jsonl::ENDPOINTS.join(", ")
            )));
        }
        if window != "24h" {
            return Err(BatchError::BadRequest(
                "completion_window must be \"24h\"".into(),
            ));
        }
        let owner = &creator.identity;
        let file = self.file(owner, input_file_id).await?;
        if file.purpose != "batch" {
            return Err(BatchError::BadRequest(format!(
                "file {input_file_id} has purpose {:?}, not \"batch\"",
                file.purpose
            )));
        }
        let now = now_ms() / 1000;
        let batch = Batch {
            id: format!("batch_{}", uuid::Uuid::new_v4().simple()),
            object: "batch".into(),
            endpoint: endpoint.into(),
            errors: None,
            input_file_id: input_file_id.into(),
            completion_window: window.into(),
            status: BatchStatus::Validating,
            output_file_id: None,
            error_file_id: None,
            created_at: now,
            in_progress_at: None,
            expires_at: now + 24 * 3600,
            finalizing_at: None,
            completed_at: None,
            failed_at: None,
            expired_at: None,
            cancelling_at: None,
            cancelled_at: None,
            request_counts: Counts {
                total: file.lines,
                ..Counts::default()
            },
            metadata,
        };
        self.save(owner, &batch).await?;
        let store = self.files.store.clone();
        let ttl = self.files.ttl;
        // The client's list: atomic on the store, entries older than the
        // batches' TTL dropped as it grows.
        let created_ms = now_ms();
        let keep_from =
            created_ms.saturating_sub(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        store
            .index_add(
                &key("batch-list", owner, ""),
                &batch.id,
                created_ms,
                keep_from,
                ttl,
            )
            .await?;
        let creator = lease::Creator {
            principal: creator.clone(),
            trace,
        };
        lease::register(&*store, &batch.id, &creator, ttl).await?;
        // Else another replica's sweep took it first, and drives it.
        if let lease::Take::Held(held, _) = lease::take(&*store, &batch.id).await? {
            tokio::spawn(self.clone().drive(held, creator, batch.clone(), file));
        }
        Ok(batch)
    }

    async fn save(&self, owner: &Identity, b: &Batch) -> Result<(), StoreError> {
        self.files.put_json(&key("batch", owner, &b.id), b).await
    }

    pub async fn get(&self, owner: &Identity, id: &str) -> Result<Batch, BatchError> {
        self.files
            .get_json(&key("batch", owner, id))
            .await?
            .ok_or(BatchError::NotFound("no such batch"))
    }

    pub async fn cancel(&self, owner: &Identity, id: &str) -> Result<Batch, BatchError> {
        let mut b = self.get(owner, id).await?;
        match b.status {
            BatchStatus::Cancelling | BatchStatus::Cancelled => return Ok(b),
            s if s.is_final() || s == BatchStatus::Finalizing => {
                return Err(BatchError::Conflict(format!(
                    "a batch that is {} cannot be cancelled",
                    serde_json::to_value(s).unwrap_or_default()
                )))
            }
            _ => {}
        }
        b.status = BatchStatus::Cancelling;
        b.cancelling_at = Some(now_ms() / 1000);
        self.cancelled.lock().insert(b.id.clone());
        self.save(owner, &b).await?;
        Ok(b)
    }

    /// Deletes a batch that has ended: its record, its place in the
    /// client's list, and (as far as the store allows; the rest expires)
    /// its input, output and error files. A batch still running is refused
    /// (cancel it first).
    pub async fn delete(&self, owner: &Identity, id: &str) -> Result<Batch, BatchError> {
        let b = self.get(owner, id).await?;
        if !b.status.is_final() {
            return Err(BatchError::Conflict(format!(
                "batch {id} is still running: cancel it first, then delete it once it has ended"
            )));
        }
        let store = &self.files.store;
        store
            .index_remove(&key("batch-list", owner, ""), id)
            .await?;
        store.delete(&key("batch", owner, id)).await?;
        // The batch is gone; its files are removed as far as the store
        // allows, and what remains expires with the files' TTL.
        let files = [
            Some(&b.input_file_id),
            b.output_file_id.as_ref(),
            b.error_file_id.as_ref(),
        ];
        for file in files.into_iter().flatten() {
            if let Err(e) = self.files.remove(owner, file).await {
                tracing::warn!(error = %e, "a deleted batch's file stays until it expires");
            }
        }
        Ok(b)
    }

    /// The ids of the client's batches, oldest first.
    async fn ids(&self, owner: &Identity) -> Result<Vec<String>, StoreError> {
        let listed = self
            .files
            .store
            .index_list(&key("batch-list", owner, ""), usize::MAX)
            .await?;
        Ok(listed.into_iter().map(|(id, _)| id).collect())
    }

    /// Up to `limit` of the client's batches that `keep` accepts, newer
    /// than the batch `before` and nearest to it, newest first; and
    /// whether there are more beyond them.
    pub async fn list_before(
        &self,
        owner: &Identity,
        limit: usize,
        before: &str,
        keep: impl Fn(&Batch) -> bool,
    ) -> Result<(Vec<Batch>, bool), BatchError> {
        let ids = self.ids(owner).await?;
        let Some(at) = ids.iter().position(|i| i == before) else {
            return Err(BatchError::NotFound("no such batch"));
        };
        let mut out = Vec::new();
        for id in &ids[at + 1..] {
            if let Ok(b) = self.get(owner, id).await {
                if keep(&b) {
                    out.push(b);
                    if out.len() > limit {
                        break;
                    }
                }
            }
        }
        let more = out.len() > limit;
        out.truncate(limit);
        out.reverse();
        Ok((out, more))
    }

    /// The client's batches, newest first, after the batch `after`.
    pub async fn list(
        &self,
        owner: &Identity,
        limit: usize,
        after: Option<&str>,
    ) -> Result<(Vec<Batch>, bool), BatchError> {
        let ids = self.ids(owner).await?;
        let mut newest = ids.iter().rev();
        if let Some(after) = after {
            if !ids.iter().any(|i| i == after) {
                return Err(BatchError::NotFound("no such batch"));
            }
            for id in newest.by_ref() {
                if id == after {
                    break;
                }
            }
        }
        let mut out = Vec::new();
        let mut more = false;
        for id in newest {
            if out.len() == limit {
                more = true;
                break;
            }
            if let Ok(b) = self.get(owner, id).await {
                out.push(b);
            }
        }
        Ok((out, more))
    }
}
