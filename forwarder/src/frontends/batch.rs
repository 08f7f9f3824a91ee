//! HTTP routes of the OpenAI Batch API: `/v1/files` (upload, metadata,
//! content) and `/v1/batches` (create, get, cancel, list). Every object is
//! visible to the client that created it only: anyone else gets 404.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::multipart::MultipartRejection;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::TryStreamExt;
use serde::Deserialize;
use serde_json::json;

use super::http::not_found;
use super::message_batches;
use super::owner::Owner;
use crate::api::ApiError;
use crate::auth::Principal;
use crate::batch::{BatchError, Batches};
use crate::jobs::Jobs;
use crate::pipeline::Pipeline;
use forwarder_config::StoreBackend;

#[derive(Clone)]
pub(super) struct BatchState {
    pub(super) pipeline: Arc<Pipeline>,
    pub(super) batches: Arc<Batches>,
}

impl axum::extract::FromRef<BatchState> for Arc<Pipeline> {
    fn from_ref(s: &BatchState) -> Self {
        s.pipeline.clone()
    }
}

pub fn routes(pipeline: Arc<Pipeline>, jobs: Arc<Jobs>) -> Router {
    let cfg = &pipeline.config().async_jobs;
    let ttl = cfg.job_ttl.saturating_mul(2);
    let mut limits = cfg.batch.clone();
    let store = &pipeline.config().store;
    if store.backend == StoreBackend::Memory {
        // The memory store evicts least recently used records when full: a
        // file is kept to a quarter of it so a batch's chunks stay there.
        let quarter = usize::try_from(store.max_bytes / 4).unwrap_or(usize::MAX);
        limits.max_file_bytes = limits.max_file_bytes.min(quarter);
    }
    let body_limit = pipeline.config().server.max_body_bytes;
    let batches = Batches::new(pipeline.clone(), jobs, limits, ttl, body_limit);
    // Room for the multipart framing around the largest file.
    let limit = batches.max_file_bytes().saturating_add(1 << 20);
    Router::new()
        .route("/v1/files", post(upload_file))
        .route("/v1/files/{id}", get(get_file))
        .route("/v1/files/{id}/content", get(file_content))
        .route("/v1/batches", post(create_batch).get(list_batches))
        .route("/v1/batches/{id}", get(get_batch))
        .route("/v1/batches/{id}/cancel", post(cancel_batch))
        .merge(message_batches::routes())
        .layer(DefaultBodyLimit::max(limit))
        .with_state(BatchState { pipeline, batches })
}

fn refused(e: BatchError) -> Response {
    match e {
        BatchError::BadRequest(m) => ApiError::BadRequest(m).into_response(),
        BatchError::NotFound(m) => not_found(m),
        BatchError::Conflict(m) => (
            StatusCode::CONFLICT,
            Json(json!({"error": {"message": m, "type": "invalid_request_error", "code": "batch_not_cancellable"}})),
        )
            .into_response(),
        BatchError::Store(e) => {
            tracing::warn!(error = %e, "batch API: store unavailable");
            ApiError::Overloaded.into_response()
        }
    }
}

async fn upload_file(
    State(s): State<BatchState>,
    Owner(Principal {
        identity: owner, ..
    }): Owner,
    form: Result<Multipart, MultipartRejection>,
) -> Response {
    // Authenticated first; then a body that is not multipart is a 400 in
    // the OpenAI error shape.
    let mut form = match form {
        Ok(f) => f,
        Err(e) => return ApiError::BadRequest(e.body_text()).into_response(),
    };
    let mut purpose = None;
    let mut stored = None;
    loop {
        let mut field = match form.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                return ApiError::BadRequest(format!("malformed multipart body: {e}"))
                    .into_response()
            }
        };
        match field.name() {
            Some("purpose") => match field.text().await {
                Ok(t) => purpose = Some(t),
                Err(e) => return ApiError::BadRequest(format!("purpose: {e}")).into_response(),
            },
            Some("file") if stored.is_none() => {
                let filename = field.file_name().unwrap_or("upload.jsonl").to_string();
                let mut upload = s.batches.upload(&owner);
                // Each chunk is checked and stored as it arrives.
                let streamed: Result<(), BatchError> =
                    async {
                        while let Some(chunk) = field.chunk().await.map_err(|e| {
                            BatchError::BadRequest(format!("the upload failed: {e}"))
                        })? {
                            upload.push(&chunk).await?;
                        }
                        Ok(())
                    }
                    .await;
                if let Err(e) = streamed {
                    upload.abandon().await;
                    return refused(e);
                }
                stored = Some((upload, filename));
            }
            _ => {}
        }
    }
    let Some((upload, filename)) = stored else {
        return ApiError::BadRequest("the form has no \"file\" field".into()).into_response();
    };
    if purpose.as_deref() != Some("batch") {
        upload.abandon().await;
        return ApiError::BadRequest(format!(
            "purpose must be \"batch\", not {:?}",
            purpose.unwrap_or_default()
        ))
        .into_response();
    }
    match upload.finish(filename).await {
        Ok(meta) => Json(meta.view()).into_response(),
        Err(e) => refused(e),
    }
}

async fn get_file(
    State(s): State<BatchState>,
    Owner(Principal {
        identity: owner, ..
    }): Owner,
    Path(id): Path<String>,
) -> Response {
    match s.batches.file(&owner, &id).await {
        Ok(meta) => Json(meta.view()).into_response(),
        Err(e) => refused(e),
    }
}

async fn file_content(
    State(s): State<BatchState>,
    Owner(Principal {
        identity: owner, ..
    }): Owner,
    Path(id): Path<String>,
) -> Response {
    match s.batches.file(&owner, &id).await {
        Ok(meta) => {
            let stream = s
                .batches
                .content(owner, &meta)
                .map_err(std::io::Error::other);
            (
                [(header::CONTENT_TYPE, "application/jsonl")],
                Body::from_stream(stream),
            )
                .into_response()
        }
        Err(e) => refused(e),
    }
}

#[derive(Deserialize)]
struct CreateBatch {
    input_file_id: String,
    endpoint: String,
    completion_window: String,
    #[serde(default)]
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

/// A creation request's `traceparent`, kept for the lines' run spans to
/// link to: a well-formed W3C value only (55 characters in version 00;
/// later versions may be longer).
pub(super) fn traceparent(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
}

async fn create_batch(
    State(s): State<BatchState>,
    Owner(principal): Owner,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let trace = traceparent(&headers);
    let req: CreateBatch = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return ApiError::BadRequest(format!("invalid batch request: {e}")).into_response()
        }
    };
    // A spent budget is refused now, not line by line into the error file.
    if let Err(e) = s.pipeline.check_budget_room(&principal).await {
        return e.into_response();
    }
    match s
        .batches
        .create(
            &principal,
            trace,
            &req.input_file_id,
            &req.endpoint,
            &req.completion_window,
            req.metadata,
        )
        .await
    {
        Ok(b) => Json(b).into_response(),
        Err(e) => refused(e),
    }
}

async fn get_batch(
    State(s): State<BatchState>,
    Owner(Principal {
        identity: owner, ..
    }): Owner,
    Path(id): Path<String>,
) -> Response {
    match s.batches.get(&owner, &id).await {
        Ok(b) => Json(b).into_response(),
        Err(e) => refused(e),
    }
}

async fn cancel_batch(
    State(s): State<BatchState>,
    Owner(Principal {
        identity: owner, ..
    }): Owner,
    Path(id): Path<String>,
) -> Response {
    match s.batches.cancel(&owner, &id).await {
        Ok(b) => Json(b).into_response(),
        Err(e) => refused(e),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<usize>,
    after: Option<String>,
}

async fn list_batches(
    State(s): State<BatchState>,
    Owner(Principal {
        identity: owner, ..
    }): Owner,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    // As OpenAI: a malformed or out-of-range `limit` is a 400 (in the
    // error body every other refusal uses), not silently clamped.
    let q = match query {
        Ok(Query(q)) => q,
        Err(e) => return ApiError::BadRequest(e.body_text()).into_response(),
    };
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return ApiError::BadRequest("limit must be between 1 and 100".into()).into_response();
    }
    match s.batches.list(&owner, limit, q.after.as_deref()).await {
        Ok((data, has_more)) => Json(json!({
            "object": "list",
            "first_id": data.first().map(|b| &b.id),
            "last_id": data.last().map(|b| &b.id),
            "has_more": has_more,
            "data": data,
        }))
        .into_response(),
        Err(e) => refused(e),
    }
}
