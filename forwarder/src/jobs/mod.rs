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

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::HeaderMap;
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::{ApiError, CompletionView, HeaderAllow, SimpleResponse};
use crate::auth::{Identity, Principal};
use crate::pipeline::envelope::ReplyBody;
use crate::pipeline::{Call, Pipeline, RequestMeta};
use crate::telemetry::Protocol;
use crate::BuildError;
use callback::Callbacks;
use forwarder_config::{AsyncConfig, QueueKind};
use metrics::JobMetrics;
use model::{Callback, DeliveryState, Job, JobKind, JobResponse, JobState};
use queue::{Delivery, EmbeddedQueue, Queue, QueueError};
use table::JobTable;

/// The header carrying a job's id to the upstream on the job's calls.
const UPSTREAM_IDEMPOTENCY_KEY: http::HeaderName = http::HeaderName::from_static("idempotency-key");
/// How soon a job whose claim another run holds tries again.
const CLAIM_RETRY: Duration = Duration::from_millis(200);
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

/// Bounds of the in-place retries of a worker's store and queue calls.
const PATIENCE_BASE: Duration = Duration::from_millis(100);
const PATIENCE_MAX: Duration = Duration::from_secs(5);

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
            return self.create(sub, headers).await;
        };
        let simple = matches!(sub.kind, JobKind::Simple { .. });
        let fp =
            submissions::fingerprint(&sub.model, &sub.body, sub.callback_url.as_deref(), simple);
        let owner = sub.owner.identity.clone();
        match self.submissions.begin(&owner, &k, fp).await? {
            submissions::Keyed::Existing(id) => self
                .get(&owner, &id)
                .await
                .ok_or(ApiError::StoreUnavailable("jobs")),
            submissions::Keyed::Create(claim) => {
                let job = self.create(sub, headers).await?;
                self.submissions.created(claim, &job.id).await;
                Ok(job)
            }
        }
    }

    async fn create(&self, sub: Submission, headers: &HeaderMap) -> Result<Job, ApiError> {
        let Submission {
            owner,
            kind,
            model,
            body,
            callback_url,
            charged,
            batch,
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
            id: format!("job_{}", uuid::Uuid::new_v4().simple()),
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
            Ok(Some(job)) if &job.owner == owner => {
                self.table.put(&job);
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

    /// Runs `op` until it succeeds, backing off (capped, jittered) between
    /// tries: a worker's store and queue calls are retried in place, so a
    /// delivery is never left unacknowledged on a live consumer (which
    /// would hold its partition's offset for good). `None` once the
    /// replica is stopping: the delivery then stays unacknowledged and a
    /// broker redelivers it to the next consumer.
    async fn patiently<T, E, F, Fut>(&self, what: &'static str, mut op: F) -> Option<T>
    where
        E: std::fmt::Display,
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        for attempt in 1u32.. {
            match op().await {
                Ok(v) => return Some(v),
                Err(e) => {
                    self.metrics.worker_retries.with_label_values(&[what]).inc();
                    tracing::warn!(error = %e, attempt, "a job's {what} failed; retrying");
                }
            }
            let wait = webhook::backoff(attempt, PATIENCE_BASE, PATIENCE_MAX, rand::random());
            tokio::select! {
                () = self.stop.cancelled() => return None,
                () = tokio::time::sleep(wait) => {}
            }
        }
        None
    }

    /// One worker: fetch, run, store, acknowledge, until stopped.
    async fn work(self: Arc<Self>) {
        loop {
            let delivery = tokio::select! {
                () = self.stop.cancelled() => return,
                d = self.queue.next() => match d {
                    Some(d) => d,
                    None => return,
                },
            };
            self.metrics.queue_depth.set(depth(self.queue.as_ref()));
            self.handle(&self, delivery).await;
        }
    }

    async fn handle(&self, me: &Arc<Self>, delivery: Delivery) {
        let id = delivery.job_id.clone();
        // The record is the truth: finished or cancelled on any replica (a
        // redelivery after a crash, a DELETE elsewhere), it does not run
        // again. A `running` record is a run cut short (a crash): it runs
        // again, and the job id's idempotency claim replays or joins.
        let Some(stored) = self
            .patiently("record read", || self.records.load(&id))
            .await
        else {
            return;
        };
        let mut job = match (stored, delivery.job.as_deref()) {
            (Some(stored), _) if stored.state.is_terminal() => {
                self.table.put(&stored);
                // Its callback may still be pending: the run that finished
                // it died or stopped before the delivery settled.
                return me.settle(stored, delivery, None).await;
            }
            (Some(stored), _) => stored,
            (None, Some(accepted)) => accepted.clone(),
            (None, None) => {
                tracing::warn!("a delivered job has no record; dropped");
                return self.queue.ack(delivery).await;
            }
        };
        // A DELETE on another replica may be cancelling it right now.
        let turn = self
            .patiently("turn", || async {
                match self.records.take_turn(&id, records::Move::Start).await {
                    records::Turn::Unknown => Err("the store could not say"),
                    t => Ok(t),
                }
            })
            .await;
        let Some(turn) = turn else { return };
        if let records::Turn::Lost(_) = turn {
            // Cancelled first, perhaps by a replica that could not store
            // the record: store it now.
            if job.cancel(now_ms()).is_ok()
                && self
                    .patiently("record write", || self.records.save(&job))
                    .await
                    .is_none()
            {
                return;
            }
            self.table.put(&job);
            return self.queue.ack(delivery).await;
        }
        if job.state == JobState::Running {
            let _ = job.requeue();
        }
        let picked = now_ms();
        match job.start(picked) {
            Ok(true) => {}
            Ok(false) => {
                if self
                    .patiently("record write", || self.records.save(&job))
                    .await
                    .is_none()
                {
                    return;
                }
                self.table.put(&job);
                self.metrics.entered(JobState::Expired);
                return self.queue.ack(delivery).await;
            }
            Err(_) => return self.queue.ack(delivery).await,
        }
        self.metrics
            .wait
            .observe(picked.saturating_sub(job.created_ms()) as f64 / 1000.0);
        self.metrics.entered(JobState::Running);
        self.table.put(&job);
        // Every replica answers GET from the record: it says running now.
        // Best effort: until the result is stored, it reads queued.
        if let Err(e) = self.records.save(&job).await {
            tracing::warn!(error = %e, "could not store a running job's record");
        }
        let response = self.call(&job).await;
        let done = now_ms();
        self.metrics
            .run
            .observe(done.saturating_sub(picked) as f64 / 1000.0);
        let transient = is_transient(response.status_code);
        if transient && self.queue.can_retry(delivery.attempt) {
            let _ = job.requeue();
            self.table.put(&job);
            self.metrics.entered(JobState::Queued);
            if let Err(e) = self.records.save(&job).await {
                tracing::warn!(error = %e, "could not store a requeued job's record");
            }
            // The next run is enqueued before this delivery is acknowledged:
            // a crash in between runs it twice at worst, which the job's
            // claim absorbs.
            let next = delivery.attempt + 1;
            if self
                .patiently("retry enqueue", || self.queue.requeue(&job, next))
                .await
                .is_some()
            {
                self.queue.ack(delivery).await;
            }
            return;
        }
        if job.finish(response, done).is_err() {
            return self.queue.ack(delivery).await;
        }
        // Acknowledged (the offset committed) only once the result is stored.
        if self
            .patiently("record write", || self.records.save(&job))
            .await
            .is_none()
        {
            return;
        }
        self.table.put(&job);
        self.metrics.entered(job.state);
        let dead = (transient && delivery.token.is_some())
            .then(|| format!("failed {} times", delivery.attempt));
        me.settle(job, delivery, dead).await;
    }

    /// Ends a finished job's delivery. With a callback still pending, the
    /// delivery is acknowledged only once the callback settles (delivered,
    /// or out of attempts), in the background: until then a crash or a
    /// shutdown leaves the message unacknowledged, the broker redelivers
    /// it, and whichever replica receives it resumes the callback (at
    /// least once, the same `webhook-id`). The embedded queue has no
    /// redelivery: there a callback in progress at a restart is lost.
    async fn settle(self: &Arc<Self>, job: Job, delivery: Delivery, dead_letter: Option<String>) {
        let pending = job
            .callback
            .as_ref()
            .is_some_and(|c| c.state == DeliveryState::Pending);
        let Some(cb) = self.callbacks.clone().filter(|_| pending) else {
            return self.release(delivery, &job, dead_letter).await;
        };
        let me = self.clone();
        tokio::spawn(async move {
            let payload = callback_payload(&job, now_ms());
            let (table, records, metrics) =
                (me.table.clone(), me.records.clone(), me.metrics.clone());
            if cb
                .deliver(
                    job.clone(),
                    payload,
                    table,
                    records,
                    metrics,
                    me.stop.clone(),
                )
                .await
            {
                me.release(delivery, &job, dead_letter).await;
            }
        });
    }

    async fn release(&self, delivery: Delivery, job: &Job, dead_letter: Option<String>) {
        match dead_letter {
            Some(reason) => self.queue.dead_letter(delivery, job, &reason).await,
            None => self.queue.ack(delivery).await,
        }
    }

    /// Runs the job's request through the pipeline, its id the idempotency
    /// key, and renders the answer as the synchronous endpoint would.
    async fn call(&self, job: &Job) -> JobResponse {
        let mut prepaid = job.charged;
        let answer = loop {
            let mut meta = RequestMeta::new(Protocol::Http, job.id.clone());
            meta.headers = job.headers.clone();
            // The job id goes upstream too, so a provider that honours
            // idempotency keys answers a re-run (after a crash mid-call)
            // with its first answer instead of running the model again.
            if let Ok(v) = http::HeaderValue::from_str(&job.id) {
                meta.upstream_headers.insert(UPSTREAM_IDEMPOTENCY_KEY, v);
            }
            meta.prepaid = prepaid;
            let adm = self.pipeline.admit_as(job.principal(), meta);
            let call = Call {
                body: job.body.clone(),
                idempotency_key: Some(job.id.clone()),
            };
            match self.pipeline.run(adm, Ok(call)).await {
                Ok(a) => break a,
                // Another run holds the job's claim: a live replica (it
                // stores the answer, replayed next time round) or a killed
                // one (its lease runs out, then this run leads). Not a
                // failure of the job: wait, do not end it `failed` (409).
                Err(ApiError::IdempotencyInProgress) if now_ms() < job.expires_at_ms => {
                    // The limits were spent before the claim was met.
                    prepaid = true;
                    tokio::time::sleep(CLAIM_RETRY).await;
                }
                // The client's shared limit is spent (a batch line, charged
                // when it runs): wait for it rather than fail the job.
                Err(ApiError::QuotaExceeded { retry_after, .. })
                    if now_ms() < job.expires_at_ms =>
                {
                    tokio::time::sleep(retry_after.clamp(CLAIM_RETRY, Duration::from_secs(60)))
                        .await;
                }
                Err(e) => return error_response(&e),
            }
        };
        let ReplyBody::Complete(bytes) = answer.reply.body else {
            return error_response(&ApiError::BadGateway("unexpected stream".into()));
        };
        match &job.kind {
            JobKind::Chat => JobResponse {
                status_code: 200,
                body: bytes,
            },
            JobKind::Simple { request_id } => match CompletionView::parse(&bytes) {
                Ok(view) => {
                    let body = SimpleResponse {
                        reply: view.text,
                        model_id: view.model,
                        request_id: request_id.clone().unwrap_or_else(|| job.id.clone()),
                        usage: view.usage,
                    };
                    JobResponse {
                        status_code: 200,
                        body: serde_json::to_vec(&body).unwrap_or_default().into(),
                    }
                }
                Err(e) => error_response(&e),
            },
        }
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

/// Answers worth another run later: the upstream was overloaded or down
/// (the pipeline's own retries are spent by then).
fn is_transient(status: u16) -> bool {
    matches!(status, 408 | 429 | 500 | 502 | 503 | 504)
}

fn depth(q: &dyn Queue) -> i64 {
    i64::try_from(q.depth()).unwrap_or(i64::MAX)
}

/// The error answer the synchronous endpoint would have sent.
fn error_response(e: &ApiError) -> JobResponse {
    let body = match e {
        // An upstream's own error object, byte for byte, as the sync path relays it.
        ApiError::UpstreamRejected { body, .. }
            if serde_json::from_slice::<serde_json::Value>(body)
                .is_ok_and(|v| v.get("error").is_some_and(serde_json::Value::is_object)) =>
        {
            body.clone()
        }
        _ => serde_json::to_vec(&e.body()).unwrap_or_default().into(),
    };
    JobResponse {
        status_code: e.status().as_u16(),
        body,
    }
}

/// The callback's body: a Standard Webhooks event carrying the job.
fn callback_payload(job: &Job, now_ms: u64) -> Bytes {
    let ts = UNIX_EPOCH + Duration::from_millis(now_ms);
    let event = json!({
        "type": "async.job.completed",
        "timestamp": humantime::format_rfc3339_millis(ts).to_string(),
        "data": job.view(now_ms),
    });
    serde_json::to_vec(&event).unwrap_or_default().into()
}
