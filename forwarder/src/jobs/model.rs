//! A job and its state machine. Transitions are pure functions of the job
//! and the clock, so the worker, the API and the sweeper agree on them.

use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;

use std::sync::Arc;

use crate::auth::{Identity, Principal};

/// Where a job is in its life. `queued → running → succeeded | failed`;
/// `queued → cancelled` (DELETE) or `expired` (not started in time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Expired,
}

impl JobState {
    pub const ALL: [JobState; 6] = [
        Self::Queued,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
        Self::Expired,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Expired => "expired",
        }
    }

    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Queued | Self::Running)
    }
}

/// Which synchronous endpoint the job stands for: its result is what that
/// endpoint would have answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobKind {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /api/v1/message`; the client's `request_id`, if it sent one.
    Simple { request_id: Option<String> },
    /// `POST /v1/embeddings`.
    Embeddings,
    /// `POST /v1/responses` (never streamed).
    Responses,
    /// `POST /v1/messages`, Anthropic's Messages API (never streamed).
    Messages,
}

impl JobKind {
    /// The API the job's body is written in.
    pub fn api(&self) -> crate::pipeline::ApiKind {
        use crate::pipeline::ApiKind;
        match self {
            Self::Chat | Self::Simple { .. } => ApiKind::ChatCompletions,
            Self::Embeddings => ApiKind::Embeddings,
            Self::Responses => ApiKind::Responses,
            Self::Messages => ApiKind::Messages,
        }
    }

    /// The kind of a job for `api`'s endpoint; `None` for APIs jobs do
    /// not carry.
    pub fn of(api: crate::pipeline::ApiKind) -> Option<Self> {
        use crate::pipeline::ApiKind;
        match api {
            ApiKind::ChatCompletions => Some(Self::Chat),
            ApiKind::Embeddings => Some(Self::Embeddings),
            ApiKind::Responses => Some(Self::Responses),
            ApiKind::Messages => Some(Self::Messages),
            ApiKind::CountTokens => None,
        }
    }
}

/// The answer the synchronous endpoint would have given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobResponse {
    pub status_code: u16,
    /// JSON, byte for byte.
    pub body: Bytes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    Pending,
    Delivered,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Callback {
    pub url: String,
    pub state: DeliveryState,
    pub attempts: u32,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Job {
    pub id: String,
    pub owner: Identity,
    pub kind: JobKind,
    pub model: String,
    /// The chat-completions request to run.
    pub body: Bytes,
    /// Client headers on the pass-through allow-list, and its cache
    /// directives (`Cache-Control`, `x-cache-opt-in`).
    pub headers: http::HeaderMap,
    pub state: JobState,
    /// Unix seconds (the API's field).
    pub created_at: u64,
    /// Unix milliseconds, for the wait-time histogram; 0 on a message from
    /// a forwarder that did not send it (then `created_at` stands in).
    pub created_ms: u64,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    /// Unix milliseconds: not started by then → `expired`; finished → the
    /// result is no longer returned.
    pub expires_at_ms: u64,
    pub response: Option<JobResponse>,
    pub callback: Option<Callback>,
    /// Set for a request of a Batch API batch.
    pub batch: Option<BatchTag>,
    /// The client's shared limits were charged at submission: the run
    /// does not spend them again.
    pub charged: bool,
    /// What the submitting client's credential allowed; the run is held
    /// to it.
    pub grants: Grants,
    /// The W3C `traceparent` of the submission's span (traces on): the
    /// run's span links to it.
    pub submission_trace: Option<String>,
    /// Read `running`, but no worker holds its run lease: the one that
    /// started it died. Set by a read, never stored.
    pub run_lease_expired: bool,
}

/// A job's share of its client's credential: the models it may use and
/// its token's tier claim (a job keeps no token).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    /// `None`: every model.
    pub models: Option<Arc<[String]>>,
    pub tier: Option<Arc<str>>,
}

impl Grants {
    pub fn of(p: &Principal) -> Self {
        Self {
            models: p.models.clone(),
            tier: p.tier.clone(),
        }
    }
}

/// The batch and line a job runs (the Batch API).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct BatchTag {
    pub batch_id: String,
    pub custom_id: String,
}

/// Why a transition was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotAllowed(pub JobState);

impl Job {
    /// The client the job runs as: its owner, with the grants its
    /// credential had when the job was accepted.
    pub fn principal(&self) -> Principal {
        Principal {
            identity: self.owner.clone(),
            models: self.grants.models.clone(),
            tier: self.grants.tier.clone(),
        }
    }

    /// When it was accepted, in Unix milliseconds (to the second for a
    /// message without `created_ms`).
    pub fn created_ms(&self) -> u64 {
        if self.created_ms > 0 {
            self.created_ms
        } else {
            self.created_at.saturating_mul(1000)
        }
    }

    pub fn expired_at(&self, now_ms: u64) -> bool {
        now_ms >= self.expires_at_ms
    }

    /// The state a reader sees: a job past its expiry reads `expired`.
    pub fn visible_state(&self, now_ms: u64) -> JobState {
        match self.state {
            JobState::Queued | JobState::Succeeded | JobState::Failed
                if self.expired_at(now_ms) =>
            {
                JobState::Expired
            }
            s => s,
        }
    }

    /// A worker picks the job up: `Ok(true)` to run it, `Ok(false)` when it
    /// expired while queued (now marked so), `Err` when it is not queued
    /// (cancelled, or already run by an earlier delivery).
    pub fn start(&mut self, now_ms: u64) -> Result<bool, NotAllowed> {
        if self.state != JobState::Queued {
            return Err(NotAllowed(self.state));
        }
        if self.expired_at(now_ms) {
            self.state = JobState::Expired;
            self.finished_at = Some(now_ms / 1000);
            return Ok(false);
        }
        self.state = JobState::Running;
        self.started_at = Some(now_ms / 1000);
        Ok(true)
    }

    pub fn finish(&mut self, response: JobResponse, now_ms: u64) -> Result<JobState, NotAllowed> {
        if self.state != JobState::Running {
            return Err(NotAllowed(self.state));
        }
        self.state = if (200..300).contains(&response.status_code) {
            JobState::Succeeded
        } else {
            JobState::Failed
        };
        self.response = Some(response);
        self.finished_at = Some(now_ms / 1000);
        Ok(self.state)
    }

    /// A crashed or shut-down run goes back to the queue.
    pub fn requeue(&mut self) -> Result<(), NotAllowed> {
        if self.state != JobState::Running {
            return Err(NotAllowed(self.state));
        }
        self.state = JobState::Queued;
        self.started_at = None;
        Ok(())
    }

    pub fn cancel(&mut self, now_ms: u64) -> Result<(), NotAllowed> {
        let state = self.visible_state(now_ms);
        if state != JobState::Queued {
            return Err(NotAllowed(state));
        }
        self.state = JobState::Cancelled;
        self.finished_at = Some(now_ms / 1000);
        Ok(())
    }

    /// The job as the API shows it at `now_ms`.
    pub fn view(&self, now_ms: u64) -> JobView<'_> {
        let state = self.visible_state(now_ms);
        let response = match (state, &self.response) {
            (JobState::Succeeded | JobState::Failed, Some(r)) => Some(ResponseView {
                status_code: r.status_code,
                body: raw(&r.body),
            }),
            _ => None,
        };
        JobView {
            id: &self.id,
            object: "async.job",
            model: &self.model,
            status: state,
            created_at: self.created_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
            expires_at: self.expires_at_ms.div_ceil(1000),
            response,
            callback: self.callback.as_ref().map(|c| CallbackView {
                url: &c.url,
                status: c.state,
                attempts: c.attempts,
                last_error: c.last_error.as_deref(),
            }),
            batch: self.batch.as_ref(),
            run_lease_expired: state == JobState::Running && self.run_lease_expired,
        }
    }
}

/// Stored bodies are JSON the forwarder produced or relayed; one that is
/// not (an upstream's odd answer) is shown as a JSON string.
fn raw(body: &Bytes) -> Box<RawValue> {
    std::str::from_utf8(body)
        .ok()
        .and_then(|s| RawValue::from_string(s.to_string()).ok())
        .unwrap_or_else(|| {
            let s = serde_json::to_string(&String::from_utf8_lossy(body)).unwrap_or_default();
            RawValue::from_string(s).unwrap_or_else(|_| RawValue::NULL.to_owned())
        })
}

#[derive(Serialize)]
pub struct JobView<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub model: &'a str,
    pub status: JobState,
    pub created_at: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<u64>,
    pub expires_at: u64,
    /// Present once the job finished: the synchronous endpoint's answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<ResponseView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callback: Option<CallbackView<'a>>,
    /// The Batch API batch and line this job runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<&'a BatchTag>,
    /// `running`, and its worker died: it runs again when the queue
    /// redelivers it (Kafka), or never (the embedded queue).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub run_lease_expired: bool,
}

#[derive(Serialize)]
pub struct ResponseView {
    pub status_code: u16,
    pub body: Box<RawValue>,
}

#[derive(Serialize)]
pub struct CallbackView<'a> {
    pub url: &'a str,
    pub status: DeliveryState,
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<&'a str>,
}

/// A queued chat job for unit tests: id, owner and expiry as given,
/// everything else empty.
#[cfg(test)]
pub(crate) fn test_job(id: &str, owner: &str, expires_at_ms: u64) -> Job {
    Job {
        run_lease_expired: false,
        submission_trace: None,
        id: id.into(),
        owner: Identity(owner.into()),
        kind: JobKind::Chat,
        model: "m".into(),
        body: Bytes::new(),
        headers: http::HeaderMap::new(),
        state: JobState::Queued,
        created_at: 0,
        created_ms: 0,
        started_at: None,
        finished_at: None,
        expires_at_ms,
        response: None,
        callback: None,
        batch: None,
        charged: false,
        grants: Grants::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(expires_at_ms: u64) -> Job {
        test_job("job_1", "anonymous", expires_at_ms)
    }

    fn ok() -> JobResponse {
        JobResponse {
            status_code: 200,
            body: Bytes::from_static(b"{\"a\":1}"),
        }
    }

    #[test]
    fn a_job_runs_once_and_a_second_start_is_refused() {
        let mut j = job(10_000);
        assert_eq!(j.start(1), Ok(true));
        assert_eq!(j.start(2), Err(NotAllowed(JobState::Running)));
        assert_eq!(j.finish(ok(), 3), Ok(JobState::Succeeded));
        assert_eq!(j.start(4), Err(NotAllowed(JobState::Succeeded)));
        assert_eq!(j.cancel(5), Err(NotAllowed(JobState::Succeeded)));
        let v = serde_json::to_value(j.view(6)).unwrap();
        assert_eq!(v["response"]["body"]["a"], 1);
    }

    #[test]
    fn an_error_answer_fails_the_job_and_keeps_the_answer() {
        let mut j = job(10_000);
        j.start(1).unwrap();
        let resp = JobResponse {
            status_code: 502,
            body: Bytes::from_static(b"{\"error\":{}}"),
        };
        assert_eq!(j.finish(resp, 2), Ok(JobState::Failed));
        let v = serde_json::to_value(j.view(3)).unwrap();
        assert_eq!(v["status"], "failed");
        assert_eq!(v["response"]["status_code"], 502);
    }

    #[test]
    fn only_a_queued_job_can_be_cancelled_and_then_never_runs() {
        let mut j = job(10_000);
        assert_eq!(j.cancel(1), Ok(()));
        assert_eq!(j.start(2), Err(NotAllowed(JobState::Cancelled)));
        let mut r = job(10_000);
        r.start(1).unwrap();
        assert_eq!(r.cancel(2), Err(NotAllowed(JobState::Running)));
    }

    #[test]
    fn expiry_stops_a_queued_job_and_hides_a_finished_result() {
        let mut j = job(100);
        assert_eq!(j.start(100), Ok(false));
        assert_eq!(j.state, JobState::Expired);
        let mut done = job(100);
        done.start(1).unwrap();
        done.finish(ok(), 2).unwrap();
        assert_eq!(done.visible_state(99), JobState::Succeeded);
        let v = serde_json::to_value(done.view(100)).unwrap();
        assert_eq!(v["status"], "expired");
        assert!(v.get("response").is_none());
    }

    #[test]
    fn a_requeued_run_can_start_again() {
        let mut j = job(10_000);
        j.start(1).unwrap();
        j.requeue().unwrap();
        assert_eq!(j.start(2), Ok(true));
    }

    #[test]
    fn a_body_that_is_not_json_shows_as_a_string() {
        assert_eq!(raw(&Bytes::from_static(b"oops")).get(), "\"oops\"");
        assert_eq!(raw(&Bytes::from_static(b"[1]")).get(), "[1]");
    }
}
