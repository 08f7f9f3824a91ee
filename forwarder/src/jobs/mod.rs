//! Asynchronous jobs: a request accepted now (`202` and a job id), run
//! later by a worker through the same pipeline as a synchronous request,
//! its answer kept for the client to fetch and, optionally, POSTed to a
//! signed callback.
//!
//! The job id is the request's idempotency key in the pipeline, so a job
//! delivered twice runs upstream once: the second run replays or joins.
//! Queues: embedded ([`queue::EmbeddedQueue`], in process, lost on restart)
//! or Kafka (`kafka.rs`: at-least-once, an offset committed only after the
//! job's result is stored). A job's record in the shared store
//! (`records.rs`) is the truth every replica reads; `table.rs` is this
//! replica's bounded cache of it, for when the store cannot answer.

mod callback;
mod kafka;
mod metrics;
pub mod model;
mod offsets;
pub mod queue;
mod records;
mod submissions;
mod table;
pub mod webhook;
pub mod wire;
mod worker;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::HeaderMap;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::{ApiError, HeaderAllow};
use crate::auth::{Identity, Principal};
use crate::pipeline::Pipeline;
use crate::BuildError;
use callback::Callbacks;
use forwarder_config::{AsyncConfig, QueueKind};
use metrics::JobMetrics;
use model::{Callback, DeliveryState, Job, JobKind, JobState};
use queue::{EmbeddedQueue, Queue, QueueError};
use table::JobTable;

/// How often `forwarder_queue_depth` is read from the queue on a clock.
const DEPTH_REFRESH: Duration = Duration::from_secs(1);

/// Why a cancellation was refused.
#[derive(Debug)]
pub enum CancelError {
    NotFound,
    NotQueued(JobState),
    /// The store could not say whether a worker took the job first.
    Unavailable,
}

/// What a client asked to run later.
pub struct Submission {
    /// The client, with what its credential grants.
    pub owner: Principal,
    pub kind: JobKind,
    pub model: String,
    /// A chat-completions request already checked by the front end.
    pub body: Bytes,
    pub callback_url: Option<String>,
    pub idempotency_key: Option<String>,
    /// Its shared limits were charged ([`Pipeline::charge`]); a batch
    /// line's are charged when it runs.
    pub charged: bool,
    /// The Batch API batch and line it runs.
    pub batch: Option<model::BatchTag>,
    /// The submission span's `traceparent`, when traces are on.
    pub trace: Option<String>,
}

pub struct Jobs {
    cfg: AsyncConfig,
    pipeline: Arc<Pipeline>,
    table: Arc<JobTable>,
    records: Arc<records::Records>,
    submissions: submissions::Submissions,
    queue: Arc<dyn Queue>,
    callbacks: Option<Arc<Callbacks>>,
    metrics: Arc<JobMetrics>,
    to_upstream: HeaderAllow,
    stop: CancellationToken,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Jobs {
    pub async fn new(pipeline: Arc<Pipeline>) -> Result<Arc<Self>, BuildError> {
        let cfg = pipeline.config().async_jobs.clone();
        let metrics = Arc::new(JobMetrics::new(pipeline.metrics().registry()));
        let callbacks = Callbacks::from_config(&cfg.callbacks)?.map(Arc::new);
        let queue: Arc<dyn Queue> = match cfg.queue {
            QueueKind::Embedded => Arc::new(EmbeddedQueue::new(cfg.capacity)),
            QueueKind::Kafka => kafka::KafkaQueue::start(&cfg.kafka, cfg.workers).await?,
        };
        let records = Arc::new(records::Records::new(
            pipeline.store().clone(),
            cfg.job_ttl.saturating_mul(2),
            pipeline.config().idempotency.lease,
        ));
        Ok(Arc::new(Self {
            records,
            submissions: submissions::Submissions::new(pipeline.store().clone(), cfg.job_ttl),
            table: Arc::new(JobTable::new(cfg.max_jobs)),
            queue,
            to_upstream: HeaderAllow::new(&pipeline.config().headers.to_upstream),
            callbacks,
            metrics,
            stop: CancellationToken::new(),
            pipeline,
            cfg,
        }))
    }

    /// Starts the workers and the sweeper of expired records.
    pub fn start(self: &Arc<Self>) -> Vec<JoinHandle<()>> {
        let mut tasks: Vec<JoinHandle<()>> = (0..self.cfg.workers)
            .map(|_| tokio::spawn(self.clone().work()))
            .collect();
        // A broker's lag changes while no worker fetches (the last jobs
        // finishing, another replica draining the backlog): without this the
        // gauge kept the value read at the last fetch, up to a minute.
        let me = self.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = me.stop.cancelled() => return,
                    () = tokio::time::sleep(DEPTH_REFRESH) => {}
                }
                me.metrics.queue_depth.set(depth(me.queue.as_ref()));
            }
        }));
        let me = self.clone();
        tasks.push(tokio::spawn(async move {
            let every =
                (me.cfg.job_ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
            loop {
                tokio::select! {
                    () = me.stop.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
                let ttl = u64::try_from(me.cfg.job_ttl.as_millis()).unwrap_or(u64::MAX);
                me.table.sweep(now_ms(), ttl);
                me.metrics.queue_depth.set(depth(me.queue.as_ref()));
            }
        }));
        tasks
    }

    /// Stops fetching jobs; runs already started finish (the caller bounds
    /// the wait with the grace period).
    pub fn stop(&self) {
        self.queue.stop();
        self.stop.cancel();
    }

    /// After the workers stopped: commits what finished.
    pub async fn close(&self) {
        self.queue.close().await;
    }

    /// Accepts a job. With an idempotency key, a repeat of the same
    /// submission returns the job it first created.
    pub async fn submit(&self, sub: Submission, headers: &HeaderMap) -> Result<Job, ApiError> {
        let Some(k) = sub.idempotency_key.clone() else {
            return self.create(sub, headers, None).await;
        };
        let simple = matches!(sub.kind, JobKind::Simple { .. });
        // Two APIs' bodies may be byte-identical: the API is part of it
        // (chat keeps the fingerprint older records have).
        let scope = match &sub.kind {
            JobKind::Embeddings | JobKind::Responses | JobKind::Messages => {
                format!("{}\u{1f}{}", sub.kind.api().label(), sub.model)
            }
            _ => sub.model.clone(),
        };
        let fp = submissions::fingerprint(&scope, &sub.body, sub.callback_url.as_deref(), simple);
        let owner = sub.owner.identity.clone();
        match self.submissions.begin(&owner, &k, fp).await? {
            submissions::Keyed::Existing(id) => self
                .get(&owner, &id)
                .await
                .ok_or(ApiError::StoreUnavailable("jobs")),
            submissions::Keyed::Create(claim) => {
                // A submission that died after enqueueing and before binding
                // the key left its job under this id: that job stands.
                let id = submissions::job_id(&owner, &k);
                let made = self
                    .records
                    .load(&id)
                    .await
                    .map_err(|_| ApiError::StoreUnavailable("jobs"))?;
                let job = match made {
                    Some(job) => {
                        if job.state == JobState::Queued {
                            // Its message may not have reached the queue: one
                            // more delivery is harmless (the record decides).
                            if let Err(e) = self.queue.push(&job).await {
                                tracing::warn!(error = %e, "could not enqueue a found job again");
                            }
                        }
                        job
                    }
                    None => self.create(sub, headers, Some(id)).await?,
                };
                self.submissions.created(claim, &job.id).await;
                Ok(job)
            }
        }
    }

    async fn create(
        &self,
        sub: Submission,
        headers: &HeaderMap,
        id: Option<String>,
    ) -> Result<Job, ApiError> {
        let Submission {
            owner,
            kind,
            model,
            body,
            callback_url,
            charged,
            batch,
            trace,
            ..
        } = sub;
        let owner = &owner;
        let callback = match callback_url {
            None => None,
            Some(url) => {
                let Some(cb) = &self.callbacks else {
                    return Err(ApiError::BadRequest(
                        "callbacks are not enabled on this forwarder".into(),
                    ));
                };
                cb.check(&url)
                    .map_err(|e| ApiError::BadRequest(e.to_string()))?;
                if !cb.signs_for(owner) {
                    return Err(ApiError::BadRequest(
                        "no callback signing secret for this client".into(),
                    ));
                }
                Some(Callback {
                    url,
                    state: DeliveryState::Pending,
                    attempts: 0,
                    last_error: None,
                })
            }
        };
        let now = now_ms();
        let ttl = u64::try_from(self.cfg.job_ttl.as_millis()).unwrap_or(u64::MAX);
        let job = Job {
            submission_trace: trace,
            id: id.unwrap_or_else(|| format!("job_{}", uuid::Uuid::new_v4().simple())),
            owner: owner.identity.clone(),
            grants: model::Grants::of(owner),
            kind,
            model,
            body,
            headers: job_headers(&self.to_upstream, headers),
            state: JobState::Queued,
            created_at: now / 1000,
            created_ms: now,
            started_at: None,
            finished_at: None,
            expires_at_ms: now.saturating_add(ttl),
            response: None,
            callback,
            batch,
            charged,
            run_lease_expired: false,
        };
        // Stored before it is enqueued: a worker on another replica may
        // finish it before `push` returns, and its finished record must not
        // be overwritten by this `queued` one. Not accepted when it cannot
        // be stored: no replica could answer for it.
        if let Err(e) = self.records.save(&job).await {
            tracing::warn!(error = %e, "could not store a new job's record; refused");
            return Err(ApiError::StoreUnavailable("jobs"));
        }
        self.table.put(&job);
        if let Err(e) = self.queue.push(&job).await {
            // Never left queued with no delivery on the way.
            let mut cancelled = job.clone();
            if cancelled.cancel(now).is_ok() {
                self.table.put(&cancelled);
                if let Err(e) = self.records.save(&cancelled).await {
                    tracing::warn!(error = %e, "could not store a refused job's record");
                }
            }
            return Err(match e {
                QueueError::Full | QueueError::Unavailable => ApiError::Overloaded,
                QueueError::TooLarge => ApiError::PayloadTooLarge(job.body.len()),
                QueueError::Closed => ApiError::ShuttingDown,
            });
        }
        self.metrics.queue_depth.set(depth(self.queue.as_ref()));
        self.metrics.entered(JobState::Queued);
        Ok(job)
    }

    /// The job if `owner` owns it: the shared record (any replica's
    /// progress, kept in this replica's cache), else the cached copy.
    pub async fn get(&self, owner: &Identity, id: &str) -> Option<Job> {
        self.lookup(owner, id).await.ok().flatten()
    }

    /// [`Self::get`], saying when the store could not answer for a job
    /// this replica has no copy of (down, or the record is sealed under a
    /// key not loaded here): the job may exist, so it is not a 404.
    pub async fn lookup(&self, owner: &Identity, id: &str) -> Result<Option<Job>, ApiError> {
        match self.records.load(id).await {
            Ok(Some(mut job)) if &job.owner == owner => {
                self.table.put(&job);
                if job.state == JobState::Running {
                    // A worker renews the run's lease while it runs: one
                    // that lapsed means the worker died mid-run.
                    job.run_lease_expired = matches!(self.records.run_is_live(id).await, Ok(false));
                }
                Ok(Some(job))
            }
            Ok(Some(_)) => Ok(None),
            Ok(None) => Ok(self.table.get(id, owner)),
            Err(e) => {
                tracing::warn!(error = %e, "could not read a job record; answering from this replica's copy");
                match self.table.get(id, owner) {
                    Some(job) => Ok(Some(job)),
                    None => Err(ApiError::StoreUnavailable("jobs")),
                }
            }
        }
    }

    pub async fn cancel(&self, owner: &Identity, id: &str) -> Result<Job, CancelError> {
        let stored = self
            .records
            .load(id)
            .await
            .map_err(|_| CancelError::Unavailable)?;
        let mut job = stored
            .or_else(|| self.table.get_any(id))
            .filter(|j| &j.owner == owner)
            .ok_or(CancelError::NotFound)?;
        let now = now_ms();
        let state = job.visible_state(now);
        if state != JobState::Queued {
            return Err(CancelError::NotQueued(state));
        }
        // A worker on another replica may be starting it right now: the
        // store's turn decides.
        match self.records.take_turn(id, records::Move::Cancel).await {
            records::Turn::Taken => {}
            records::Turn::Lost(records::Move::Start) => {
                return Err(CancelError::NotQueued(JobState::Running))
            }
            records::Turn::Lost(records::Move::Cancel) => {
                return Err(CancelError::NotQueued(JobState::Cancelled))
            }
            records::Turn::Unknown => return Err(CancelError::Unavailable),
        }
        job.cancel(now).map_err(|e| CancelError::NotQueued(e.0))?;
        self.table.put(&job);
        if let Err(e) = self.records.save(&job).await {
            // The turn is taken: the worker that meets it stores the record.
            tracing::warn!(error = %e, "could not store a cancelled job's record");
        }
        self.metrics.entered(JobState::Cancelled);
        Ok(job)
    }
}

/// What a job keeps of its client's headers: those on the pass-through
/// allow-list, and the cache directives the pipeline obeys when it runs
/// (`Cache-Control: no-store` must hold for a job as for a call).
fn job_headers(to_upstream: &HeaderAllow, headers: &HeaderMap) -> HeaderMap {
    let mut kept = to_upstream.filter(headers);
    for name in [
        http::header::CACHE_CONTROL,
        http::HeaderName::from_static(crate::cache::OPT_IN),
    ] {
        if !kept.contains_key(&name) {
            for v in headers.get_all(&name) {
                kept.append(name.clone(), v.clone());
            }
        }
    }
    kept
}

fn depth(q: &dyn Queue) -> i64 {
    i64::try_from(q.depth()).unwrap_or(i64::MAX)
}
