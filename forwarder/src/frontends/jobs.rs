//! HTTP routes of the async jobs: `POST /v1/async/chat/completions` (and the
//! simple API's `"async": true`) accept a job with `202`; `GET` and
//! `DELETE /v1/async/jobs/{id}` read and cancel it. A job is visible to
//! the client that submitted it only: anyone else gets 404.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use super::http::{meta, not_found, post_only, read_body, Presented, RequestId};
use super::owner::Owner;
use crate::api::{ApiError, SimpleRequest};
use crate::auth::Principal;
use crate::frontends::tls::PeerSubject;
use crate::jobs::model::{Job, JobKind};
use crate::jobs::{now_ms, CancelError, Jobs, Submission};
use crate::pipeline::envelope::peek_as;
use crate::pipeline::{check_key_len, Admission, Pipeline};

/// The header naming a job's callback on the OpenAI-format route (the body
/// goes upstream byte for byte, so it cannot carry the URL).
pub const CALLBACK_URL: &str = "x-callback-url";

#[derive(Clone)]
struct JobsState {
    pipeline: Arc<Pipeline>,
    jobs: Arc<Jobs>,
}

impl axum::extract::FromRef<JobsState> for Arc<Pipeline> {
    fn from_ref(s: &JobsState) -> Self {
        s.pipeline.clone()
    }
}

pub fn routes(pipeline: Arc<Pipeline>, jobs: Arc<Jobs>) -> Router {
    Router::new()
        .route("/v1/async/chat/completions", post_only(submit_chat))
        .route("/v1/async/embeddings", post_only(submit_embeddings))
        .route("/v1/async/responses", post_only(submit_responses))
        .route("/v1/async/messages", post_only(submit_messages))
        .route("/v1/async/jobs/{id}", get(get_job).delete(cancel_job))
        .with_state(JobsState {
            pipeline: pipeline.clone(),
            jobs: jobs.clone(),
        })
        .merge(super::batch::routes(pipeline, jobs))
}

async fn submit_chat(State(s): State<JobsState>, req: Request) -> Response {
    submit_api(s, req, JobKind::Chat).await
}

async fn submit_embeddings(State(s): State<JobsState>, req: Request) -> Response {
    submit_api(s, req, JobKind::Embeddings).await
}

async fn submit_responses(State(s): State<JobsState>, req: Request) -> Response {
    submit_api(s, req, JobKind::Responses).await
}

/// Anthropic's Messages API as a job; refusals in Anthropic's shape.
async fn submit_messages(State(s): State<JobsState>, req: Request) -> Response {
    super::anthropic::reshape_refusal(submit_api(s, req, JobKind::Messages).await).await
}

/// A job for one of the endpoints jobs stand for.
async fn submit_api(s: JobsState, req: Request, kind: JobKind) -> Response {
    let (parts, body) = req.into_parts();
    let id = parts
        .extensions
        .get::<RequestId>()
        .cloned()
        .unwrap_or_else(|| RequestId(uuid::Uuid::new_v4().to_string()));
    let peer = parts.extensions.get::<PeerSubject>().cloned();
    let headers = parts.headers;
    let callback_url = match headers.get(CALLBACK_URL).map(|v| v.to_str()) {
        None => None,
        // An empty header is none, as an empty Idempotency-Key is.
        Some(Ok(v)) => Some(v.trim().to_string()).filter(|v| !v.is_empty()),
        Some(Err(_)) => {
            return ApiError::BadRequest(format!("{CALLBACK_URL} is not a valid URL"))
                .into_response()
        }
    };
    let upstream_headers = headers.clone();
    let mut request_meta = meta(Presented { headers, peer }, &id);
    request_meta.api = kind.api();
    let adm = match s.pipeline.admit(request_meta) {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    let body = match read_body(body, s.pipeline.config().server.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => return adm.refuse(e).into_response(),
    };
    let idempotency_key = adm.idempotency_key().map(str::to_owned);
    submit(
        &s.pipeline,
        &s.jobs,
        adm,
        kind,
        body,
        &upstream_headers,
        callback_url,
        idempotency_key,
    )
    .await
}

/// The simple API's `"async": true`: the same job, its result the simple
/// API's answer.
pub async fn submit_simple(
    p: &Pipeline,
    jobs: Option<&Arc<Jobs>>,
    adm: Admission,
    req: &SimpleRequest,
) -> Response {
    let Some(jobs) = jobs else {
        return adm
            .refuse(ApiError::BadRequest(
                "async jobs are not enabled on this forwarder".into(),
            ))
            .into_response();
    };
    if let Err(e) = check_key_len(req.request_id.as_deref()) {
        return adm.refuse(e).into_response();
    }
    let body = super::http::simple_to_chat(req);
    let kind = JobKind::Simple {
        request_id: req.request_id.clone(),
    };
    // The simple API's `request_id` is its idempotency key, as on the
    // synchronous path (an empty one is none).
    let idempotency_key = req
        .request_id
        .clone()
        .filter(|k| !k.trim().is_empty())
        .or_else(|| adm.idempotency_key().map(str::to_owned));
    submit(
        p,
        jobs,
        adm,
        kind,
        body,
        &HeaderMap::new(),
        req.callback_url.clone(),
        idempotency_key,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn submit(
    p: &Pipeline,
    jobs: &Jobs,
    adm: Admission,
    kind: JobKind,
    body: Bytes,
    headers: &HeaderMap,
    callback_url: Option<String>,
    idempotency_key: Option<String>,
) -> Response {
    if let Err(e) = check_key_len(idempotency_key.as_deref()) {
        return adm.refuse(e).into_response();
    }
    let model = match peek_as(kind.api(), &body) {
        Ok(peeked) if peeked.stream => {
            return adm
                .refuse(ApiError::BadRequest(
                    "async jobs do not stream: drop \"stream\": true".into(),
                ))
                .into_response()
        }
        Ok(peeked) => peeked.model.into_owned(),
        Err(e) => return adm.refuse(e).into_response(),
    };
    if !p.has_model(&model) || !adm.grants(&model) {
        return adm.refuse(ApiError::ModelNotFound(model)).into_response();
    }
    // Charged now, as a call would be: the client learns of its limit at
    // submission, and the job does not spend it again when it runs.
    if let Err(e) = p.charge(&adm, &body).await {
        return adm.refuse(e).into_response();
    }
    // A spent budget is refused now, not when the job runs.
    if let Err(e) = p.check_budget(&adm, &model, &body).await {
        return adm.refuse(e).into_response();
    }
    let sub = Submission {
        owner: adm.client(),
        kind,
        model: model.clone(),
        body,
        callback_url,
        idempotency_key,
        charged: true,
        batch: None,
        trace: adm.traceparent(),
    };
    match jobs.submit(sub, headers).await {
        Ok(job) => {
            adm.answered(&model, StatusCode::ACCEPTED.as_u16());
            accepted(&job)
        }
        Err(e) => adm.refuse(e).into_response(),
    }
}

fn accepted(job: &Job) -> Response {
    let mut resp = (StatusCode::ACCEPTED, Json(job.view(now_ms()))).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/async/jobs/{}", job.id)) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

async fn get_job(
    State(s): State<JobsState>,
    Owner(Principal {
        identity: owner, ..
    }): Owner,
    Path(id): Path<String>,
) -> Response {
    match s.jobs.lookup(&owner, &id).await {
        Ok(Some(job)) => Json(job.view(now_ms())).into_response(),
        Ok(None) => not_found("no such job"),
        Err(e) => e.into_response(),
    }
}

async fn cancel_job(
    State(s): State<JobsState>,
    Owner(Principal {
        identity: owner, ..
    }): Owner,
    Path(id): Path<String>,
) -> Response {
    match s.jobs.cancel(&owner, &id).await {
        Ok(job) => Json(job.view(now_ms())).into_response(),
        Err(CancelError::NotFound) => not_found("no such job"),
        Err(CancelError::NotQueued(state)) => (
            StatusCode::CONFLICT,
            Json(serde_json::json!({"error": {
                "message": format!("only a queued job can be cancelled; this one is {}", state.label()),
                "type": "invalid_request_error",
                "code": "job_not_cancellable",
            }})),
        )
            .into_response(),
        Err(CancelError::Unavailable) => ApiError::StoreUnavailable("jobs").into_response(),
    }
}
