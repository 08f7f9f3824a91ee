//! Asynchronous jobs: a request accepted now (`202` and a job id), run
//! later by a worker through the same pipeline as a synchronous request,
//! its answer kept for the client to fetch and, optionally, POSTed to a
//! signed callback.
//!
//! The job id is the request's idempotency key in the pipeline, so a job
//! delivered twice runs upstream once: the second run replays or joins.
//! Queues: embedded ([`queue::EmbeddedQueue`], in process, lost on restart)
//! or Kafka (`kafka.rs`: at-least-once, an offset committed only after the
//! job's result is stored). Job records live in this process (`table.rs`)
//! and, for every replica to see, in the shared store (`records.rs`).

mod callback;
mod kafka;
mod metrics;
pub mod model;
mod offsets;
pub mod queue;
mod records;
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
use table::{JobTable, Start};

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
}

pub struct Jobs {
    cfg: AsyncConfig,
    pipeline: Arc<Pipeline>,
    table: Arc<JobTable>,
    records: Arc<records::Records>,
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

    /// Accepts a job for `owner`. `body` is a chat-completions request
    /// already checked by the front end.
    pub async fn submit(
        &self,
        owner: &Principal,
        kind: JobKind,
        model: String,
        body: Bytes,
        headers: &HeaderMap,
        callback_url: Option<String>,
    ) -> Result<Job, ApiError> {
        self.submit_tagged(owner, kind, model, body, headers, callback_url, None)
            .await
    }

    /// [`Self::submit`] for a request of a Batch API batch, tagged with it.
    #[allow(clippy::too_many_arguments)]
    pub async fn submit_tagged(
        &self,
        owner: &Principal,
        kind: JobKind,
        model: String,
        body: Bytes,
        headers: &HeaderMap,
        callback_url: Option<String>,
        batch: Option<model::BatchTag>,
    ) -> Result<Job, ApiError> {
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
            headers: self.to_upstream.filter(headers),
            state: JobState::Queued,
            created_at: now / 1000,
            created_ms: now,
            started_at: None,
            finished_at: None,
            expires_at_ms: now.saturating_add(ttl),
            response: None,
            callback,
            batch,
        };
        self.table
            .insert(job.clone(), now)
            .map_err(|()| ApiError::Overloaded)?;
        // Stored before it is enqueued: a worker on another replica may
        // finish it before `push` returns, and its finished record must not
        // be overwritten by this `queued` one.
        self.records.save(&job).await;
        if let Err(e) = self.queue.push(&job).await {
            // Never left queued with no delivery on the way.
            if let Some(Ok(cancelled)) = self.table.cancel(&job.id, &job.owner, now) {
                self.records.save(&cancelled).await;
            }
            return Err(match e {
                QueueError::Full | QueueError::Unavailable => ApiError::Overloaded,
                QueueError::Closed => ApiError::ShuttingDown,
            });
        }
        self.metrics.queue_depth.set(depth(self.queue.as_ref()));
        self.metrics.entered(JobState::Queued);
        Ok(job)
    }

    /// The job if `owner` owns it: the shared record (any replica's
    /// progress), else this replica's own.
    pub async fn get(&self, owner: &Identity, id: &str) -> Option<Job> {
        match self.records.load(id).await {
            Some(job) if &job.owner == owner => Some(job),
            Some(_) => None,
            None => self.table.get(id, owner),
        }
    }

    pub async fn cancel(&self, owner: &Identity, id: &str) -> Result<Job, CancelError> {
        // A job accepted by another replica is known here from its record.
        if let Some(job) = self.records.load(id).await.filter(|j| &j.owner == owner) {
            self.table.adopt(&job, now_ms());
        }
        // Only a queued job can be cancelled, and a worker on another
        // replica may be starting it right now: the store's turn decides.
        if self
            .table
            .get(id, owner)
            .is_some_and(|j| j.state == JobState::Queued)
        {
            if let records::Turn::Lost(_) = self.records.take_turn(id, records::Move::Cancel).await
            {
                return Err(CancelError::NotQueued(JobState::Running));
            }
        }
        match self.table.cancel(id, owner, now_ms()) {
            None => Err(CancelError::NotFound),
            Some(Err(e)) => Err(CancelError::NotQueued(e.0)),
            Some(Ok(job)) => {
                self.records.save(&job).await;
                self.metrics.entered(JobState::Cancelled);
                Ok(job)
            }
        }
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
            self.handle(delivery).await;
        }
    }

    async fn handle(&self, delivery: Delivery) {
        // Finished or cancelled on any replica (a redelivery after a crash,
        // a DELETE elsewhere): its record says so, and it does not run again.
        // A `running` record is a run cut short (a crash): it runs again.
        if let Some(stored) = self.records.load(&delivery.job_id).await {
            if stored.state.is_terminal() {
                self.table.adopt(&stored, now_ms());
                return self.queue.ack(delivery).await;
            }
        }
        if let Some(job) = &delivery.job {
            if !self.table.adopt(job, now_ms()) {
                // No room: leave it unacknowledged, to be redelivered.
                tracing::warn!("job table full; a delivered job is handed back");
                return;
            }
        }
        let id = delivery.job_id.clone();
        // A DELETE on another replica may be cancelling it right now.
        if let records::Turn::Lost(_) = self.records.take_turn(&id, records::Move::Start).await {
            if let Some(stored) = self.records.load(&id).await {
                self.table.adopt(&stored, now_ms());
            }
            return self.queue.ack(delivery).await;
        }
        let picked = now_ms();
        let job = match self.table.start(&id, picked) {
            Start::Run(job) => job,
            Start::Expired => {
                self.metrics.entered(JobState::Expired);
                return self.queue.ack(delivery).await;
            }
            Start::Skip => return self.queue.ack(delivery).await,
        };
        self.metrics
            .wait
            .observe(picked.saturating_sub(job.created_ms()) as f64 / 1000.0);
        self.metrics.entered(JobState::Running);
        // Every replica answers GET from the record: it says running now.
        self.records.save(&job).await;
        let response = self.call(&job).await;
        let done = now_ms();
        self.metrics
            .run
            .observe(done.saturating_sub(picked) as f64 / 1000.0);
        let transient = is_transient(response.status_code);
        if transient && self.queue.can_retry(delivery.attempt) {
            self.table.requeue(&id);
            self.metrics.entered(JobState::Queued);
            if let Err(e) = self.queue.retry(delivery, &job).await {
                tracing::warn!(error = %e, "could not enqueue a job's retry; it is redelivered later");
            }
            return;
        }
        // The result is stored before the delivery is acknowledged.
        let finished = self.table.finish(&id, response, done);
        if let Ok(job) = &finished {
            // Stored before the delivery is acknowledged (committed).
            self.records.save(job).await;
        }
        if transient && delivery.token.is_some() {
            let reason = format!("failed {} times", delivery.attempt);
            self.queue.dead_letter(delivery, &job, &reason).await;
        } else {
            self.queue.ack(delivery).await;
        }
        let Ok(job) = finished else { return };
        self.metrics.entered(job.state);
        if let (Some(cb), Some(_)) = (&self.callbacks, &job.callback) {
            let payload = callback_payload(&job, done);
            tokio::spawn(cb.clone().deliver(
                job,
                payload,
                self.table.clone(),
                self.records.clone(),
                self.metrics.clone(),
            ));
        }
    }

    /// Runs the job's request through the pipeline, its id the idempotency
    /// key, and renders the answer as the synchronous endpoint would.
    async fn call(&self, job: &Job) -> JobResponse {
        let answer = loop {
            let mut meta = RequestMeta::new(Protocol::Http, job.id.clone());
            meta.headers = job.headers.clone();
            // The job id goes upstream too, so a provider that honours
            // idempotency keys answers a re-run (after a crash mid-call)
            // with its first answer instead of running the model again.
            if let Ok(v) = http::HeaderValue::from_str(&job.id) {
                meta.upstream_headers.insert(UPSTREAM_IDEMPOTENCY_KEY, v);
            }
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
                    tokio::time::sleep(CLAIM_RETRY).await;
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
