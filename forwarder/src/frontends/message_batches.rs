//! Anthropic's Message Batches API: `POST`/`GET /v1/messages/batches`,
//! `GET`/`DELETE /v1/messages/batches/{id}`, `POST .../{id}/cancel` and
//! `GET .../{id}/results`, on the Batch API's batches (see
//! [`crate::batch::anthropic`]): the same store, driver, grants, limits and
//! budgets, shown in Anthropic's shapes and refused with its error body.
//! Each batch is visible to the client that created it only.

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{StreamExt, TryStreamExt};
use serde::Deserialize;
use serde_json::json;

use super::anthropic::error_response;
use super::batch::BatchState;
use super::owner::Owner;
use crate::api::ApiError;
use crate::auth::{Identity, Principal};
use crate::batch::anthropic::{self as shape, ENDPOINT};
use crate::batch::model::Batch;
use crate::batch::BatchError;

/// The largest create request: it is read whole (then written to the
/// store as an input file), so it is bounded well below the 200 MB an
/// uploaded file may have; a bigger batch goes through `/v1/files` and
/// `/v1/batches` with `endpoint: /v1/messages`.
pub const MAX_CREATE_BYTES: usize = 32 * 1024 * 1024;

pub(super) fn routes() -> Router<BatchState> {
    Router::new()
        .route(
            "/v1/messages/batches",
            post(create)
                .layer(DefaultBodyLimit::max(MAX_CREATE_BYTES))
                .get(list),
        )
        .route("/v1/messages/batches/{id}", get(retrieve).delete(delete))
        .route("/v1/messages/batches/{id}/cancel", post(cancel))
        .route("/v1/messages/batches/{id}/results", get(results))
        // The owner's 401 or 429, a rejected query or body: in Anthropic's
        // shape too.
        .layer(axum::middleware::map_response(
            super::anthropic::reshape_refusal,
        ))
}

/// A refusal in Anthropic's error shape.
fn refuse(e: BatchError) -> Response {
    match e {
        BatchError::BadRequest(m) | BatchError::Conflict(m) => {
            error_response(ApiError::BadRequest(m))
        }
        BatchError::NotFound(m) => not_found(m),
        BatchError::Store(e) => {
            tracing::warn!(error = %e, "message batches: store unavailable");
            error_response(ApiError::StoreUnavailable("batches"))
        }
    }
}

fn not_found(message: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"type": "error", "error": {"type": "not_found_error", "message": message}})),
    )
        .into_response()
}

/// The batch behind `id`, if it is one of this client's message batches.
async fn message_batch(s: &BatchState, owner: &Identity, id: &str) -> Result<Batch, Response> {
    let Some(batch_id) = shape::batch_id(id) else {
        return Err(not_found("no such message batch"));
    };
    match s.batches.get(owner, &batch_id).await {
        Ok(b) if b.endpoint == ENDPOINT => Ok(b),
        Ok(_) | Err(BatchError::NotFound(_)) => Err(not_found("no such message batch")),
        Err(e) => Err(refuse(e)),
    }
}

fn shown(b: &Batch) -> Response {
    match shape::view(b) {
        Some(v) => Json(v).into_response(),
        None => not_found("no such message batch"),
    }
}

/// `POST /v1/messages/batches`: the requests become a batch input file
/// (checked as an upload's lines are), then a batch of `/v1/messages`.
async fn create(
    State(s): State<BatchState>,
    Owner(principal): Owner,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let lines = match shape::input_lines(&body) {
        Ok(l) => l,
        Err(m) => return error_response(ApiError::BadRequest(m)),
    };
    if let Err(e) = s.pipeline.check_budget_room(&principal).await {
        return error_response(e);
    }
    let mut upload = s.batches.upload(&principal.identity);
    if let Err(e) = upload.push(&lines).await {
        upload.abandon().await;
        return refuse(e);
    }
    let file = match upload.finish("message_batch.jsonl".into()).await {
        Ok(f) => f,
        Err(e) => return refuse(e),
    };
    let trace = super::batch::traceparent(&headers);
    match s
        .batches
        .create(&principal, trace, &file.id, ENDPOINT, "24h", None)
        .await
    {
        Ok(b) => shown(&b),
        Err(e) => refuse(e),
    }
}

async fn retrieve(
    State(s): State<BatchState>,
    Owner(Principal {
        identity: owner, ..
    }): Owner,
    Path(id): Path<String>,
) -> Response {
    match message_batch(&s, &owner, &id).await {
        Ok(b) => shown(&b),
        Err(r) => r,
    }
}

async fn cancel(
    State(s): State<BatchState>,
    Owner(Principal {
        identity: owner, ..
    }): Owner,
    Path(id): Path<String>,
) -> Response {
    let b = match message_batch(&s, &owner, &id).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    match s.batches.cancel(&owner, &b.id).await {
        Ok(b) => shown(&b),
        // Already ended or ending: shown as it is, as Anthropic does.
        Err(BatchError::Conflict(_)) => shown(&b),
        Err(e) => refuse(e),
    }
}

/// `DELETE /v1/messages/batches/{id}`: a batch that has ended, with its
/// results; one still processing is refused (cancel it first).
async fn delete(
    State(s): State<BatchState>,
    Owner(Principal {
        identity: owner, ..
    }): Owner,
    Path(id): Path<String>,
) -> Response {
    let b = match message_batch(&s, &owner, &id).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    match s.batches.delete(&owner, &b.id).await {
        Ok(_) => Json(json!({"id": id, "type": "message_batch_deleted"})).into_response(),
        Err(e) => refuse(e),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<usize>,
    after_id: Option<String>,
    before_id: Option<String>,
}

/// `GET /v1/messages/batches`: newest first, `limit` (1–1000, 20) per
/// page, `after_id` for the next (older) page, `before_id` for the
/// previous (newer) one.
async fn list(
    State(s): State<BatchState>,
    Owner(Principal {
        identity: owner, ..
    }): Owner,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    let q = match query {
        Ok(Query(q)) => q,
        Err(e) => return error_response(ApiError::BadRequest(e.body_text())),
    };
    let limit = q.limit.unwrap_or(20);
    if !(1..=1000).contains(&limit) {
        return error_response(ApiError::BadRequest(
            "limit must be between 1 and 1000".into(),
        ));
    }
    if q.before_id.is_some() && q.after_id.is_some() {
        return error_response(ApiError::BadRequest(
            "before_id and after_id cannot be used together".into(),
        ));
    }
    if let Some(before) = q.before_id.as_deref() {
        let Some(before) = shape::batch_id(before) else {
            return not_found("no such message batch");
        };
        let keep = |b: &Batch| shape::view(b).is_some();
        return match s.batches.list_before(&owner, limit, &before, keep).await {
            Ok((page, more)) => page_of(page.iter().filter_map(shape::view).collect(), more),
            Err(BatchError::NotFound(_)) => not_found("no such message batch"),
            Err(e) => refuse(e),
        };
    }
    let after = match q.after_id.as_deref().map(shape::batch_id) {
        None => None,
        Some(Some(id)) => Some(id),
        Some(None) => return not_found("no such message batch"),
    };
    // The client's batches of every endpoint, newest first, a page at a
    // time until one more than `limit` of this API's are found (that one
    // says there are more).
    let mut data = Vec::new();
    let mut after = after;
    loop {
        let (page, more) = match s.batches.list(&owner, limit + 1, after.as_deref()).await {
            Ok(p) => p,
            Err(BatchError::NotFound(_)) => return not_found("no such message batch"),
            Err(e) => return refuse(e),
        };
        after = page.last().map(|b| b.id.clone());
        data.extend(page.iter().filter_map(shape::view));
        if data.len() > limit || !more || after.is_none() {
            break;
        }
    }
    let has_more = data.len() > limit;
    data.truncate(limit);
    page_of(data, has_more)
}

/// A page of the list, in Anthropic's shape.
fn page_of(data: Vec<serde_json::Value>, has_more: bool) -> Response {
    Json(json!({
        "first_id": data.first().map(|b| b["id"].clone()),
        "last_id": data.last().map(|b| b["id"].clone()),
        "has_more": has_more,
        "data": data,
    }))
    .into_response()
}

/// `GET /v1/messages/batches/{id}/results`: once the batch ended, a JSONL
/// line per request (its output file, then its error file), streamed.
async fn results(
    State(s): State<BatchState>,
    Owner(Principal {
        identity: owner, ..
    }): Owner,
    Path(id): Path<String>,
) -> Response {
    let b = match message_batch(&s, &owner, &id).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    if !b.status.is_final() {
        return error_response(ApiError::BadRequest(format!(
            "message batch {id} has not ended: its results are not ready"
        )));
    }
    let mut files = Vec::new();
    for file_id in [&b.output_file_id, &b.error_file_id].into_iter().flatten() {
        match s.batches.file(&owner, file_id).await {
            Ok(meta) => files.push(meta),
            Err(e) => return refuse(e),
        }
    }
    let batches = s.batches.clone();
    let lines = futures::stream::iter(files)
        .flat_map(move |meta| batches.content(owner.clone(), &meta).boxed())
        .map_err(std::io::Error::other)
        .scan(Vec::new(), |carry: &mut Vec<u8>, chunk| {
            // Lines may span chunks: whole ones are shown, the rest waits.
            let out = chunk.map(|chunk| {
                carry.extend_from_slice(&chunk);
                let end = carry.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
                let whole: Vec<u8> = carry.drain(..end).collect();
                let shown: Vec<u8> = whole
                    .split(|&b| b == b'\n')
                    .filter(|l| !l.is_empty())
                    .filter_map(shape::result_line)
                    .flatten()
                    .collect();
                bytes::Bytes::from(shown)
            });
            futures::future::ready(Some(out))
        });
    (
        [(header::CONTENT_TYPE, "application/x-jsonl")],
        Body::from_stream(lines),
    )
        .into_response()
}
