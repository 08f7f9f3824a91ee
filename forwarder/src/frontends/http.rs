//! HTTP: the simple API (`POST /api/v1/message`), the OpenAI-compatible API
//! (`POST /v1/chat/completions` with SSE streaming, `GET /v1/models`), and
//! the health, readiness and metrics endpoints.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use futures::StreamExt;
use serde_json::json;

use crate::api::{unix_now, ApiError, ChatRequest, ModelInfo, SimpleRequest, SimpleResponse};
use crate::auth;
use crate::pipeline::{Answer, Call, Pipeline, Reply, ReplyStream, RequestMeta};
use crate::telemetry::Protocol;

use super::{ws, Lifecycle};

/// The request's id: the client's `X-Request-Id` if usable, else generated.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

const REQUEST_ID: &str = "x-request-id";
const IDEMPOTENCY_KEY: &str = "idempotency-key";
const REPLAYED: &str = "idempotent-replayed";

pub fn router(pipeline: Arc<Pipeline>, lifecycle: Lifecycle) -> Router {
    let mut app = Router::new();
    if pipeline.config().websocket.enabled {
        let ws = ws::WsState {
            pipeline: pipeline.clone(),
            lifecycle,
        };
        app = app.merge(
            Router::new()
                .route("/api/v1/ws", get(ws::upgrade))
                .with_state(ws),
        );
    }
    app.route("/api/v1/message", post(simple_message))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(list_models))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { not_found("no such endpoint") })
        .with_state(pipeline)
        .layer(middleware::from_fn(request_id))
}

/// Accepts or generates the request id and echoes it on the response.
async fn request_id(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| valid_request_id(v))
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_string);
    req.extensions_mut().insert(RequestId(id.clone()));
    let mut resp = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp
}

/// Client ids are logged, so only short printable ASCII is trusted.
fn valid_request_id(v: &str) -> bool {
    !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic())
}

fn meta(headers: &HeaderMap, id: &RequestId) -> RequestMeta {
    RequestMeta {
        protocol: Protocol::Http,
        request_id: id.0.clone(),
        credential: auth::credential(headers).map(str::to_string),
        idempotency_key: headers
            .get(IDEMPOTENCY_KEY)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty()),
    }
}

/// Reads the body up to the configured limit. The result is only looked at
/// after authentication, so a 413 is never shown to an unknown client.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let too_large = e
            .into_inner()
            .downcast_ref::<http_body_util::LengthLimitError>()
            .is_some();
        if too_large {
            ApiError::PayloadTooLarge(limit)
        } else {
            ApiError::BadRequest("could not read the request body".into())
        }
    })
}

fn parse_json<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, ApiError>,
) -> Result<T, ApiError> {
    serde_json::from_slice(&body?)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

async fn chat_completions(
    State(p): State<Arc<Pipeline>>,
    Extension(id): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let body = read_body(body, p.config().server.max_body_bytes).await;
    let answer = p
        .run(meta(&headers, &id), || {
            Ok(Call {
                chat: parse_json(body)?,
                idempotency_key: None,
            })
        })
        .await;
    match answer {
        Ok(Answer {
            reply: Reply::Complete(resp),
            replayed,
        }) => mark_replayed(Json(resp).into_response(), replayed),
        Ok(Answer {
            reply: Reply::Stream(stream),
            replayed,
        }) => mark_replayed(sse(stream), replayed),
        Err(e) => e.into_response(),
    }
}

async fn simple_message(
    State(p): State<Arc<Pipeline>>,
    Extension(id): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let body = read_body(body, p.config().server.max_body_bytes).await;
    let mut client_request_id = None;
    let answer = p
        .run(meta(&headers, &id), || {
            let req: SimpleRequest = parse_json(body)?;
            client_request_id.clone_from(&req.request_id);
            Ok(Call {
                chat: simple_to_chat(&req),
                idempotency_key: req.request_id,
            })
        })
        .await;
    match answer {
        Ok(Answer {
            reply: Reply::Complete(resp),
            replayed,
        }) => {
            let body = SimpleResponse {
                reply: resp.reply_text(),
                model_id: resp.model.clone(),
                request_id: client_request_id.unwrap_or(id.0),
                usage: resp.usage.unwrap_or_default(),
            };
            mark_replayed(Json(body).into_response(), replayed)
        }
        // The simple API never asks for a stream.
        Ok(Answer {
            reply: Reply::Stream(_),
            ..
        }) => ApiError::BadGateway("unexpected stream".into()).into_response(),
        Err(e) => e.into_response(),
    }
}

pub fn simple_to_chat(req: &SimpleRequest) -> ChatRequest {
    ChatRequest::from_prompt(&req.model_id, &req.prompt)
        .with_tuning(req.max_tokens, req.temperature)
}

fn mark_replayed(mut resp: Response, replayed: bool) -> Response {
    if replayed {
        resp.headers_mut()
            .insert(REPLAYED, HeaderValue::from_static("true"));
    }
    resp
}

/// Server-Sent Events as OpenAI sends them: one `data:` line per chunk,
/// `data: [DONE]` at a clean end, an error object if the stream fails.
fn sse(stream: ReplyStream) -> Response {
    let failed = Arc::new(AtomicBool::new(false));
    let seen = failed.clone();
    let events = stream
        .map(move |item| match item {
            Ok(chunk) => Event::default().json_data(chunk),
            Err(e) => {
                seen.store(true, Ordering::Relaxed);
                Ok(Event::default().data(e.body().to_string()))
            }
        })
        .chain(
            futures::stream::once(async move { Ok(Event::default().data("[DONE]")) })
                .filter(move |_| futures::future::ready(!failed.load(Ordering::Relaxed))),
        );
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn list_models(State(p): State<Arc<Pipeline>>, headers: HeaderMap) -> Response {
    if let Err(e) = p.authenticate(auth::credential(&headers)) {
        return e.into_response();
    }
    let created = unix_now();
    let data: Vec<ModelInfo> = p
        .models()
        .into_iter()
        .map(|id| ModelInfo {
            id,
            object: "model",
            created,
            owned_by: "modelforwarder",
        })
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

async fn readyz(State(p): State<Arc<Pipeline>>) -> Response {
    if p.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
    }
}

async fn metrics(State(p): State<Arc<Pipeline>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        p.metrics().render(),
    )
        .into_response()
}

fn not_found(msg: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": {"message": msg, "type": "invalid_request_error", "code": "not_found"}})),
    )
        .into_response()
}
