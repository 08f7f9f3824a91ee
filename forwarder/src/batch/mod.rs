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

pub mod files;
pub mod jsonl;
mod lease;
pub mod model;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use parking_lot::Mutex;

use crate::api::ApiError;
use crate::auth::{Identity, Principal};
use crate::jobs::model::{BatchTag, JobKind, JobState};
use crate::jobs::{now_ms, Jobs, Submission};
use crate::pipeline::Pipeline;
use crate::store::{HeldClaim, Store, StoreError};
use files::{key, FileStore, Line, LineSplitter, Writer};
use forwarder_config::BatchConfig;
use model::{Batch, BatchStatus, Counts, FileMeta, Outcome};

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

/// An upload in progress: bytes stored as they come, lines checked.
pub struct Upload {
    writer: Writer,
    split: LineSplitter,
    checker: jsonl::Checker,
    line_no: usize,
    max_bytes: usize,
    max_line: usize,
}

impl Upload {
    pub async fn push(&mut self, data: &[u8]) -> Result<(), BatchError> {
        if self.writer.bytes as usize + data.len() > self.max_bytes {
            return Err(BatchError::BadRequest(format!(
                "the file exceeds the limit of {} bytes",
                self.max_bytes
            )));
        }
        let (checker, n, max) = (&mut self.checker, &mut self.line_no, self.max_line);
        self.split
            .push(data, |line| {
                *n += 1;
                match line {
                    Line::Whole(line) => checker.check(*n, line),
                    Line::TooLong => Err(too_long(*n, max)),
                }
            })
            .map_err(BatchError::BadRequest)?;
        self.writer.write(data).await?;
        Ok(())
    }

    pub async fn finish(mut self, filename: String) -> Result<FileMeta, BatchError> {
        let split = std::mem::replace(&mut self.split, LineSplitter::new(0));
        if let Some(last) = split.finish() {
            self.line_no += 1;
            match last {
                Ok(last) => self.checker.check(self.line_no, &last),
                Err(()) => Err(too_long(self.line_no, self.max_line)),
            }
            .map_err(BatchError::BadRequest)?;
        }
        if self.checker.lines() == 0 {
            return Err(BatchError::BadRequest("the file has no requests".into()));
        }
        self.writer.lines = self.checker.lines() as u64;
        Ok(self
            .writer
            .finish(filename, "batch", now_ms() / 1000)
            .await?)
    }

    pub async fn abandon(self) {
        self.writer.abandon().await;
    }
}

fn too_long(n: usize, max: usize) -> String {
    format!("line {n} is longer than the limit of {max} bytes (async.batch.max_line_bytes)")
}

fn new_file_id() -> String {
    format!("file-{}", uuid::Uuid::new_v4().simple())
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

    /// Takes over live batches whose driver's lease lapsed, until the
    /// batches are dropped (the process ends).
    async fn sweep(me: std::sync::Weak<Self>) {
        loop {
            tokio::time::sleep(lease::SWEEP).await;
            let Some(me) = me.upgrade() else { return };
            let store = me.files.store.clone();
            let ids = match lease::live(&*store).await {
                Ok(ids) => ids,
                Err(e) => {
                    tracing::debug!(error = %e, "could not list live batches");
                    continue;
                }
            };
            for id in ids {
                match lease::take(&*store, &id).await {
                    Ok(lease::Take::Held(held, owner)) => me.clone().resume(held, *owner, id).await,
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "could not try a batch's lease"),
                }
            }
        }
    }

    /// Drives a batch whose lease this replica just took over, as its
    /// creator (the grants and tier recorded when it was created).
    async fn resume(self: Arc<Self>, held: HeldClaim, creator: lease::Creator, id: String) {
        let store = self.files.store.clone();
        let owner = creator.principal.identity.clone();
        let batch = match self.get(&owner, &id).await {
            Ok(b) if !b.status.is_final() => b,
            _ => return lease::finished(&*store, &id, held).await,
        };
        let file = match self.file(&owner, &batch.input_file_id).await {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "a batch taken over has lost its input file");
                return lease::finished(&*store, &id, held).await;
            }
        };
        tracing::info!("taking over a batch whose driver stopped");
        tokio::spawn(self.drive(held, creator, batch, file));
    }

    pub fn max_file_bytes(&self) -> usize {
        self.cfg.max_file_bytes
    }

    pub fn upload(&self, owner: &Identity) -> Upload {
        Upload {
            writer: self.files.writer(owner, new_file_id()),
            split: LineSplitter::new(self.max_line),
            checker: jsonl::Checker::new(self.cfg.max_file_lines),
            line_no: 0,
            max_bytes: self.cfg.max_file_bytes,
            max_line: self.max_line,
        }
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

    /// The client's batches, newest first, after the batch `after`.
    pub async fn list(
        &self,
        owner: &Identity,
        limit: usize,
        after: Option<&str>,
    ) -> Result<(Vec<Batch>, bool), BatchError> {
        let ids: Vec<String> = self
            .files
            .store
            .index_list(&key("batch-list", owner, ""), usize::MAX)
            .await?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
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

    /// Runs a batch to its end under its lease. A store failure (a Redis
    /// restart, a timeout) does not fail the batch: the lease is dropped
    /// unfinished, so once it lapses a replica's sweep takes the batch over
    /// and runs it again from its input (the lines' jobs are found, not
    /// resubmitted). A batch still lasts no longer than its window.
    async fn drive(
        self: Arc<Self>,
        held: HeldClaim,
        creator: lease::Creator,
        mut b: Batch,
        file: FileMeta,
    ) {
        let id = b.id.clone();
        let trace = creator.trace.as_deref();
        let result = self.run(&creator.principal, trace, &mut b, &file).await;
        self.cancelled.lock().remove(&b.id);
        match result {
            Ok(()) => lease::finished(&*self.files.store, &id, held).await,
            Err(e) => {
                tracing::warn!(error = %e, "a batch paused on a store failure; its lease is released (or lapses, the store being down) and a replica takes it over");
                drop(held); // releases the lease now if the store answers
            }
        }
    }

    /// Whether the batch was cancelled (here or on another replica); keeps
    /// the stored cancel when saving progress.
    async fn sync(&self, owner: &Identity, b: &mut Batch) -> Result<(), StoreError> {
        if b.status != BatchStatus::Cancelling {
            let here = self.cancelled.lock().contains(&b.id);
            let stored: Option<Batch> = self.files.get_json(&key("batch", owner, &b.id)).await?;
            let there = stored
                .as_ref()
                .filter(|s| s.status == BatchStatus::Cancelling);
            if here || there.is_some() {
                b.status = BatchStatus::Cancelling;
                b.cancelling_at = there
                    .and_then(|s| s.cancelling_at)
                    .or(Some(now_ms() / 1000));
            }
        }
        self.save(owner, b).await
    }

    fn stop_reason(b: &Batch) -> Option<(&'static str, &'static str)> {
        if b.status == BatchStatus::Cancelling {
            Some((
                "batch_cancelled",
                "the batch was cancelled before this request ran",
            ))
        } else if now_ms() / 1000 >= b.expires_at {
            Some(("batch_expired", "the batch expired before this request ran"))
        } else {
            None
        }
    }

    async fn run(
        &self,
        creator: &Principal,
        trace: Option<&str>,
        b: &mut Batch,
        file: &FileMeta,
    ) -> Result<(), BatchError> {
        let owner = &creator.identity;
        b.status = BatchStatus::InProgress;
        b.in_progress_at = b.in_progress_at.or(Some(now_ms() / 1000));
        // A run taken over from a driver that died starts its counts and
        // result files afresh (the lines' jobs are found again, not rerun).
        b.request_counts.completed = 0;
        b.request_counts.failed = 0;
        self.sync(owner, b).await?;
        let mut results = Results {
            out: self.files.writer(owner, new_file_id()),
            err: self.files.writer(owner, new_file_id()),
        };
        // Submit every line as a job, waiting while the queue is full.
        let mut pending: Vec<(String, String)> = Vec::new();
        let mut full_wait = Duration::from_millis(50);
        let mut split = LineSplitter::new(self.max_line);
        // A line over the bound (a file uploaded under a larger one) is
        // `None`: it goes to the error file at once.
        let mut lines: Vec<Option<Vec<u8>>> = Vec::new();
        let mut line_no = 0usize;
        for n in 0..file.chunks {
            let chunk = self.files.chunk(owner, &file.id, n).await?;
            split
                .push::<()>(&chunk, |l| {
                    lines.push(match l {
                        Line::Whole(l) => Some(l.to_vec()),
                        Line::TooLong => None,
                    });
                    Ok(())
                })
                .ok();
            if n + 1 == file.chunks {
                let last = std::mem::replace(&mut split, LineSplitter::new(0)).finish();
                lines.extend(last.map(Result::ok));
            }
            for line in lines.drain(..) {
                line_no += 1;
                let Some(line) = line else {
                    let message = too_long(line_no, self.max_line);
                    let outcome = Outcome::NotRun {
                        code: "line_too_large",
                        message: &message,
                    };
                    results.add(b, &format!("line-{line_no}"), &outcome).await?;
                    continue;
                };
                let Ok(req) = jsonl::parse(&line) else {
                    continue;
                };
                // Refused before it is queued, with the answer every other
                // door gives it.
                let max_body = self.pipeline.config().server.max_body_bytes;
                let known = self.pipeline.has_model(&req.model);
                let refusal = if req.url != b.endpoint {
                    Some(ApiError::BadRequest(format!(
                        "the line's url {:?} is not the batch's endpoint {:?}",
                        req.url, b.endpoint
                    )))
                } else {
                    line_refusal(creator, known, max_body, &req)
                };
                if let Some(refusal) = refusal {
                    let body = serde_json::to_vec(&refusal.body()).unwrap_or_default();
                    let request_id = format!("req_{}", uuid::Uuid::new_v4().simple());
                    let outcome = Outcome::Answered {
                        status_code: refusal.status().as_u16(),
                        request_id: &request_id,
                        body: &body,
                    };
                    results.add(b, &req.custom_id, &outcome).await?;
                    continue;
                }
                let mut spent = false;
                loop {
                    if let Some((code, message)) = Self::stop_reason(b) {
                        results
                            .add(b, &req.custom_id, &Outcome::NotRun { code, message })
                            .await?;
                        break;
                    }
                    // One request of the creator's rate limit per line: a
                    // batch goes at the pace its creator may go.
                    if !spent {
                        match self.pipeline.spend(creator).await {
                            Ok(()) => spent = true,
                            Err(e) => {
                                let wait = match e {
                                    ApiError::RateLimited {
                                        retry_after: Some(d),
                                    } => d,
                                    _ => Duration::from_millis(50),
                                };
                                tokio::time::sleep(
                                    wait.clamp(Duration::from_millis(5), Duration::from_secs(1)),
                                )
                                .await;
                                self.sync(owner, b).await?;
                                continue;
                            }
                        }
                    }
                    let sub = Submission {
                        owner: creator.clone(),
                        kind: batch_kind(&b.endpoint),
                        model: req.model.clone(),
                        body: req.body.clone(),
                        callback_url: None,
                        // A driver that takes over finds this line's job.
                        idempotency_key: Some(lease::line_key(&b.id, &req.custom_id)),
                        charged: false,
                        trace: trace.map(str::to_string),
                        batch: Some(BatchTag {
                            batch_id: b.id.clone(),
                            custom_id: req.custom_id.clone(),
                        }),
                    };
                    let submitted = self.jobs.submit(sub, &HeaderMap::new()).await;
                    match submitted {
                        Ok(job) => {
                            full_wait = Duration::from_millis(50);
                            pending.push((req.custom_id.clone(), job.id));
                            // A long file: progress shown, a cancel seen.
                            if pending.len().is_multiple_of(500) {
                                self.sync(owner, b).await?;
                            }
                            break;
                        }
                        // Back-pressure (a full queue, a broker away) or a
                        // store away: wait, longer each time, and try the
                        // same line again (a store still away fails the
                        // sync, which pauses the batch).
                        Err(ApiError::Overloaded | ApiError::StoreUnavailable(_)) => {
                            tokio::time::sleep(full_wait).await;
                            full_wait = (full_wait * 2).min(Duration::from_secs(2));
                            self.sync(owner, b).await?;
                        }
                        Err(e) => {
                            let message = e.to_string();
                            let outcome = Outcome::NotRun {
                                code: "submit_failed",
                                message: &message,
                            };
                            results.add(b, &req.custom_id, &outcome).await?;
                            break;
                        }
                    }
                }
            }
        }
        // Collect results as jobs finish.
        let mut poll = Duration::from_millis(20);
        while !pending.is_empty() {
            tokio::time::sleep(poll).await;
            poll = (poll * 2).min(Duration::from_secs(1));
            self.sync(owner, b).await?;
            let stop = Self::stop_reason(b);
            let mut still = Vec::with_capacity(pending.len());
            for (custom_id, job_id) in pending.drain(..) {
                let Some(job) = self.jobs.get(owner, &job_id).await else {
                    let outcome = Outcome::NotRun {
                        code: "job_lost",
                        message: "the job's record is gone",
                    };
                    results.add(b, &custom_id, &outcome).await?;
                    continue;
                };
                match (job.state, &job.response) {
                    (JobState::Succeeded | JobState::Failed, Some(r)) => {
                        let outcome = Outcome::Answered {
                            status_code: r.status_code,
                            request_id: &job.id,
                            body: &r.body,
                        };
                        results.add(b, &custom_id, &outcome).await?;
                    }
                    (JobState::Queued, _)
                        if stop.is_some() && self.jobs.cancel(owner, &job_id).await.is_ok() =>
                    {
                        let (code, message) = stop.unwrap_or_default();
                        results
                            .add(b, &custom_id, &Outcome::NotRun { code, message })
                            .await?;
                    }
                    (JobState::Queued | JobState::Running, _) => still.push((custom_id, job_id)),
                    (state, _) => {
                        let code = if state == JobState::Expired {
                            "batch_expired"
                        } else {
                            "batch_cancelled"
                        };
                        let message = format!("the request's job ended {}", state.label());
                        results
                            .add(
                                b,
                                &custom_id,
                                &Outcome::NotRun {
                                    code,
                                    message: &message,
                                },
                            )
                            .await?;
                    }
                }
            }
            pending = still;
        }
        let stop = Self::stop_reason(b);
        b.status = BatchStatus::Finalizing;
        b.finalizing_at = Some(now_ms() / 1000);
        self.sync(owner, b).await?;
        let now = now_ms() / 1000;
        let Results { out, err } = results;
        if out.lines > 0 {
            let name = format!("{}_output.jsonl", b.id);
            b.output_file_id = Some(out.finish(name, "batch_output", now).await?.id);
        }
        if err.lines > 0 {
            let name = format!("{}_error.jsonl", b.id);
            b.error_file_id = Some(err.finish(name, "batch_output", now).await?.id);
        }
        match stop {
            None => {
                b.status = BatchStatus::Completed;
                b.completed_at = Some(now);
            }
            Some(("batch_cancelled", _)) => {
                b.status = BatchStatus::Cancelled;
                b.cancelled_at = Some(now);
            }
            Some(_) => {
                b.status = BatchStatus::Expired;
                b.expired_at = Some(now);
            }
        }
        self.save(owner, b).await?;
        Ok(())
    }
}

/// The job kind of a batch's lines.
fn batch_kind(endpoint: &str) -> JobKind {
    match endpoint {
        "/v1/embeddings" => JobKind::Embeddings,
        "/v1/responses" => JobKind::Responses,
        "/v1/messages" => JobKind::Messages,
        _ => JobKind::Chat,
    }
}

/// The refusal the synchronous doors give a batch line's request before
/// running it, if any: a body over `server.max_body_bytes` is `413`, a
/// model the creator's credential does not grant (or no upstream serves)
/// is `404 model_not_found`.
fn line_refusal(
    creator: &Principal,
    known_model: bool,
    max_body: usize,
    req: &jsonl::Request,
) -> Option<ApiError> {
    if req.body.len() > max_body {
        Some(ApiError::PayloadTooLarge(max_body))
    } else if !known_model || !creator.may_use(&req.model) {
        Some(ApiError::ModelNotFound(req.model.clone()))
    } else {
        None
    }
}

/// The output and error files being written.
struct Results {
    out: Writer,
    err: Writer,
}

impl Results {
    async fn add(
        &mut self,
        b: &mut Batch,
        custom_id: &str,
        outcome: &Outcome<'_>,
    ) -> Result<(), StoreError> {
        let id = format!("batch_req_{}", uuid::Uuid::new_v4().simple());
        let (ok, line) = model::result_line(&id, custom_id, outcome);
        if ok {
            b.request_counts.completed += 1;
            self.out.write_line(&line).await
        } else {
            b.request_counts.failed += 1;
            self.err.write_line(&line).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_refused_as_the_synchronous_doors_refuse_it() {
        let mut cheap_only = Principal::new(Identity::jwt("", "c"));
        cheap_only.models = Some(Arc::from(vec!["cheap".to_string()]));
        let line = |model: &str, body: usize| jsonl::Request {
            custom_id: "x".into(),
            model: model.into(),
            body: vec![b' '; body].into(),
            url: "/v1/chat/completions".into(),
        };
        let code = |e: Option<ApiError>| e.map(|e| e.status().as_u16());
        assert_eq!(
            code(line_refusal(&cheap_only, true, 100, &line("cheap", 100))),
            None
        );
        assert_eq!(
            code(line_refusal(&cheap_only, true, 100, &line("dear", 10))),
            Some(404)
        );
        assert_eq!(
            code(line_refusal(&cheap_only, false, 100, &line("cheap", 10))),
            Some(404)
        );
        assert_eq!(
            code(line_refusal(&cheap_only, true, 100, &line("cheap", 101))),
            Some(413)
        );
        let key = Principal::new(Identity::api_key("a"));
        assert_eq!(code(line_refusal(&key, true, 100, &line("dear", 10))), None);
    }
}
