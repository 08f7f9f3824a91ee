//! A worker's part of a job: fetch a delivery, run it through the pipeline
//! unless the shared record says it ran already, store the result, settle
//! its callback, and only then acknowledge the delivery. Store and queue
//! calls are retried in place, never abandoned on a live consumer.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::json;

use super::model::{DeliveryState, Job, JobKind, JobResponse, JobState};
use super::queue::Delivery;
use super::{depth, now_ms, records, webhook, Jobs};
use crate::api::{ApiError, CompletionView, SimpleResponse};
use crate::pipeline::envelope::ReplyBody;
use crate::pipeline::{Call, RequestMeta};
use crate::telemetry::Protocol;

/// The header carrying a job's id to the upstream on the job's calls.
const UPSTREAM_IDEMPOTENCY_KEY: http::HeaderName = http::HeaderName::from_static("idempotency-key");
/// How soon a job whose claim another run holds tries again.
const CLAIM_RETRY: Duration = Duration::from_millis(200);
/// Bounds of the in-place retries of a worker's store and queue calls.
const PATIENCE_BASE: Duration = Duration::from_millis(100);
const PATIENCE_MAX: Duration = Duration::from_secs(5);

impl Jobs {
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
    pub(super) async fn work(self: Arc<Self>) {
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
        // Held from before the record says running until this delivery is
        // done with (the result stored): a reader that finds the record
        // running and the lease lapsed knows this worker died.
        let _run = self.records.hold_run(&job.id).await;
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
        // Write-once: the first run of this job to finish decides its
        // result, so a run that raced it cannot replace its answer.
        let Some(response) = self
            .patiently("result write", || {
                self.records.first_result(&job.id, &response)
            })
            .await
        else {
            return;
        };
        if job.finish(response, done).is_err() {
            return self.queue.ack(delivery).await;
        }
        // A second run of this job (a redelivery while this one ran) may
        // have finished it and moved its callback on: that record stands.
        // Overwritten with this run's copy, its callback would read
        // `pending` again. (Read, then write: the result is the same either
        // way, but in a narrow window a settled callback can read
        // `pending` again and be delivered once more, which at least once
        // allows.)
        let Some(stored) = self
            .patiently("record read", || self.records.load(&job.id))
            .await
        else {
            return;
        };
        if let Some(stored) = stored.filter(|s| s.state.is_terminal()) {
            self.table.put(&stored);
            return me.settle(stored, delivery, None).await;
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
            meta.api = job.kind.api();
            meta.trace_link.clone_from(&job.submission_trace);
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
                Err(e) => return error_response(&job.kind, &e),
            }
        };
        let ReplyBody::Complete(bytes) = answer.reply.body else {
            return error_response(&job.kind, &ApiError::BadGateway("unexpected stream".into()));
        };
        match &job.kind {
            JobKind::Chat | JobKind::Embeddings | JobKind::Responses | JobKind::Messages => {
                JobResponse {
                    status_code: 200,
                    body: bytes,
                }
            }
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
                Err(e) => error_response(&job.kind, &e),
            },
        }
    }
}

/// Answers worth another run later: the upstream was overloaded or down
/// (the pipeline's own retries are spent by then).
fn is_transient(status: u16) -> bool {
    matches!(status, 408 | 429 | 500 | 502 | 503 | 504)
}

/// The error answer the synchronous endpoint would have sent (in
/// Anthropic's shape for a Messages job).
fn error_response(kind: &JobKind, e: &ApiError) -> JobResponse {
    if *kind == JobKind::Messages {
        return JobResponse {
            status_code: e.status().as_u16(),
            body: crate::frontends::anthropic::error_json(e)
                .to_string()
                .into(),
        };
    }
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
