//! The driver: runs a batch's lines as jobs under the batch's lease,
//! writes the output and error files, and takes over batches whose
//! driver's lease lapsed (a replica killed or paused).

use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;

use super::files::{key, Line, LineSplitter, Writer};
use super::model::{self, Batch, BatchStatus, FileMeta, Outcome};
use super::upload::{new_file_id, too_long};
use super::{jsonl, lease, BatchError, Batches};
use crate::api::ApiError;
use crate::auth::{Identity, Principal};
use crate::jobs::model::{BatchTag, JobKind, JobState};
use crate::jobs::{now_ms, Submission};
use crate::store::{HeldClaim, StoreError};

impl Batches {
    /// Takes over live batches whose driver's lease lapsed, until the
    /// batches are dropped (the process ends).
    pub(super) async fn sweep(me: std::sync::Weak<Self>) {
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

    /// Runs a batch to its end under its lease. A store failure (a Redis
    /// restart, a timeout) does not fail the batch: the lease is dropped
    /// unfinished, so once it lapses a replica's sweep takes the batch over
    /// and runs it again from its input (the lines' jobs are found, not
    /// resubmitted). A batch still lasts no longer than its window.
    pub(super) async fn drive(
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
            let c = &mut b.request_counts;
            c.failed += 1;
            match outcome {
                Outcome::NotRun {
                    code: "batch_cancelled",
                    ..
                } => c.cancelled += 1,
                Outcome::NotRun {
                    code: "batch_expired",
                    ..
                } => c.expired += 1,
                _ => {}
            }
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
