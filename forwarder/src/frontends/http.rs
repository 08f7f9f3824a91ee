//! HTTP: the simple API (`POST /api/v1/message`), the OpenAI-compatible API
//! (`POST /v1/chat/completions`, `/v1/responses` with SSE streaming,
//! `/v1/embeddings`, `GET /v1/models`), Anthropic's Messages API
//! (`POST /v1/messages`, `/v1/messages/count_tokens`; see
//! [`super::anthropic`]), and the health, readiness and metrics endpoints.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Extension;
use axum::{Json, Router};
use futures::StreamExt;
use serde_json::json;

use crate::api::{
    unix_now, ApiError, ChatRequest, CompletionView, ModelInfo, SimpleRequest, SimpleResponse,
};
use crate::auth;
use crate::frontends::tls::PeerSubject;
use crate::pipeline::envelope::{Reply, ReplyBody};
use crate::pipeline::responses::ResponsePath;
use crate::pipeline::{Answer, ApiKind, Call, Pipeline, RequestMeta};
use crate::sse;
use crate::telemetry::Protocol;
use crate::upstream::providers::{ObjectBody, RawEvents};

use super::{jobs as async_jobs, ws, Lifecycle};
use crate::jobs::Jobs;

/// The HTTP routes' state: the pipeline, and the async jobs when enabled.
#[derive(Clone)]
pub struct HttpState {
    pub pipeline: Arc<Pipeline>,
    pub jobs: Option<Arc<Jobs>>,
}

impl axum::extract::FromRef<HttpState> for Arc<Pipeline> {
    fn from_ref(s: &HttpState) -> Self {
        s.pipeline.clone()
    }
}

/// The request's id: the client's `X-Request-Id` if usable, else generated.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

const REQUEST_ID: &str = "x-request-id";
const IDEMPOTENCY_KEY: &str = "idempotency-key";
const REPLAYED: &str = "idempotent-replayed";

pub fn router(pipeline: Arc<Pipeline>, lifecycle: Lifecycle, jobs: Option<Arc<Jobs>>) -> Router {
    let state = HttpState {
        pipeline: pipeline.clone(),
        jobs: jobs.clone(),
    };
    // The two forwarding routes set their request id themselves: the
    // middleware's boxing and request extensions cost about a tenth of the
    // forwarder's instructions per request.
    let hot = Router::new()
        .route("/api/v1/message", post_only(simple_message))
        .route("/v1/chat/completions", post_only(chat_completions))
        .route("/v1/embeddings", post_only(embeddings))
        .route("/v1/responses", post_only(responses))
        .route("/v1/messages", post_only(super::anthropic::messages))
        .route(
            "/v1/messages/count_tokens",
            post_only(super::anthropic::count_tokens),
        )
        .with_state(state);
    let mut rest = Router::new();
    if pipeline.config().websocket.enabled {
        let ws = ws::WsState {
            pipeline: pipeline.clone(),
            lifecycle,
        };
        rest = rest.merge(
            Router::new()
                .route("/api/v1/ws", get(ws::upgrade))
                .with_state(ws),
        );
    }
    let async_routes = jobs.map(|jobs| async_jobs::routes(pipeline.clone(), jobs));
    let rest = rest
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/v1/budget", get(super::budget::get_budget))
        .route(
            "/v1/responses/{id}",
            get(get_response).delete(delete_response),
        )
        .route("/v1/responses/{id}/cancel", post(cancel_response))
        .route("/v1/responses/{id}/input_items", get(response_input_items))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi_document))
        .fallback(|| async { not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed.into_response() })
        .with_state(pipeline);
    let rest = match async_routes {
        Some(routes) => rest.merge(routes),
        None => rest,
    }
    .layer(middleware::from_fn(request_id));
    hot.merge(rest)
}

/// A POST route whose other methods get the JSON 405.
pub(super) fn post_only<H, T, S>(handler: H) -> axum::routing::MethodRouter<S>
where
    H: axum::handler::Handler<T, S>,
    S: Clone + Send + Sync + 'static,
    T: 'static,
{
    post(handler).fallback(|| async {
        let mut resp = ApiError::MethodNotAllowed.into_response();
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        resp
    })
}

/// The request's id: the client's `X-Request-Id` if usable, else a new one.
fn request_id_of(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| valid_request_id(v))
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_string)
}

/// Echoes the request id on a response.
pub(super) fn with_request_id(mut resp: Response, id: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp
}

/// Accepts or generates the request id and echoes it on the response.
async fn request_id(mut req: Request, next: Next) -> Response {
    let id = request_id_of(req.headers());
    req.extensions_mut().insert(RequestId(id.clone()));
    with_request_id(next.run(req).await, &id)
}

/// Client ids are logged, so only short printable ASCII is trusted.
fn valid_request_id(v: &str) -> bool {
    !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic())
}

/// A request's id, headers and body, taken apart without copies (the
/// `HeaderMap` extractor would clone).
fn split(req: Request) -> (RequestId, Presented, Body) {
    let (mut parts, body) = req.into_parts();
    let peer = parts.extensions.remove::<PeerSubject>();
    (
        RequestId(request_id_of(&parts.headers)),
        Presented {
            headers: parts.headers,
            peer,
        },
        body,
    )
}

/// A request's headers and its connection's client certificate subject.
pub(super) struct Presented {
    pub(super) headers: HeaderMap,
    pub(super) peer: Option<PeerSubject>,
}

/// The pipeline's view of an HTTP request; the header map moves in whole
/// (the pipeline passes on the allow-listed part).
pub(super) fn meta(presented: Presented, id: &RequestId) -> RequestMeta {
    let Presented { headers, peer } = presented;
    let mut meta = RequestMeta::new(Protocol::Http, id.0.clone());
    meta.peer = peer.map(|p| p.0.to_string());
    meta.credential = auth::credential(&headers).map(str::to_string);
    meta.idempotency_key = headers
        .get(IDEMPOTENCY_KEY)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty());
    meta.headers = headers;
    meta
}

/// Reads the body up to the configured limit. Called only after the
/// request was admitted: an unauthenticated body is never buffered.
pub(super) async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
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

pub(super) fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

/// `POST /v1/chat/completions`: the body goes upstream as it came, and the
/// answer comes back as the upstream sent it.
async fn chat_completions(State(p): State<Arc<Pipeline>>, req: Request) -> Response {
    openai_route(&p, req, ApiKind::ChatCompletions).await
}

/// `POST /v1/embeddings`: as chat completions (never streamed).
async fn embeddings(State(p): State<Arc<Pipeline>>, req: Request) -> Response {
    openai_route(&p, req, ApiKind::Embeddings).await
}

/// `POST /v1/responses`: as chat completions; a stream keeps the
/// Responses API's named events.
async fn responses(State(p): State<Arc<Pipeline>>, req: Request) -> Response {
    openai_route(&p, req, ApiKind::Responses).await
}

async fn openai_route(p: &Pipeline, req: Request, api: ApiKind) -> Response {
    let (id, headers, body) = split(req);
    let resp = match forward(p, &id, headers, body, api).await {
        Ok(answer) => api_response(answer, api),
        Err(e) => e.into_response(),
    };
    with_request_id(resp, &id.0)
}

/// Splits an HTTP request of `api` for the pipeline and runs it: one path
/// for every API whose body is forwarded as it came.
pub(super) async fn forward_request(
    p: &Pipeline,
    req: Request,
    api: ApiKind,
) -> (RequestId, Result<Answer, ApiError>) {
    let (id, headers, body) = split(req);
    let answer = forward(p, &id, headers, body, api).await;
    (id, answer)
}

async fn forward(
    p: &Pipeline,
    id: &RequestId,
    headers: Presented,
    body: Body,
    api: ApiKind,
) -> Result<Answer, ApiError> {
    let mut meta = meta(headers, id);
    meta.api = api;
    let admitted = p.admit(meta)?;
    let body = read_body(body, p.config().server.max_body_bytes).await;
    let call = body.map(|body| Call {
        body,
        idempotency_key: None,
    });
    p.run(admitted, call).await
}

/// An answer of `api` as an HTTP response: the body as it came, or the
/// events verbatim (a failure written as the API's error event).
pub(super) fn api_response(answer: Answer, api: ApiKind) -> Response {
    let Reply { headers, body } = answer.reply;
    let mut resp = match body {
        ReplyBody::Complete(bytes) => {
            ([(header::CONTENT_TYPE, "application/json")], bytes).into_response()
        }
        ReplyBody::Stream(events) => sse_response(events, api),
    };
    resp.headers_mut().extend(headers);
    mark_replayed(resp, answer.replayed)
}

/// The event that ends a failed stream of `api`, after `relayed` events
/// (not counting comments; the Responses API numbers its events from 0):
/// chat completions' error `data:` (and no `[DONE]`), the Responses API's
/// `error` event, Anthropic's `error` event. Clients cannot mistake it
/// for a complete answer.
pub(super) fn stream_failure(api: ApiKind, e: &ApiError, relayed: usize) -> Bytes {
    match api {
        ApiKind::Messages | ApiKind::CountTokens => sse::named_event(
            "error",
            super::anthropic::error_json(e).to_string().as_bytes(),
        ),
        ApiKind::Responses => {
            let (_, code) = e.kind();
            let v = json!({
                "type": "error",
                "code": code,
                "message": e.to_string(),
                "param": null,
                "sequence_number": relayed,
            });
            sse::named_event("error", v.to_string().as_bytes())
        }
        ApiKind::ChatCompletions | ApiKind::Embeddings => {
            sse::data_event(e.body().to_string().as_bytes())
        }
    }
}

/// Relays runs of events verbatim; a failed stream ends with the API's error event
/// (see [`stream_failure`]) instead of its terminal event.
///
/// Each run is one write: the upstream adapter gathers what each read
/// yields, and replays come as one run.
fn sse_response(events: crate::pipeline::EventStream, api: ApiKind) -> Response {
    let mut relayed = 0usize;
    let body = events
        .map(move |item| match item {
            Ok(events) => {
                // Only the Responses API numbers its events (keep-alive
                // comments carry no number); other streams are not split.
                if api == ApiKind::Responses {
                    relayed += sse::events(&events)
                        .filter(|e| !e.starts_with(b":"))
                        .count();
                }
                events
            }
            Err(e) => stream_failure(api, &e, relayed),
        })
        .map(Ok::<_, Infallible>);
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

/// `POST /api/v1/message`: translated to a chat request at this edge.
async fn simple_message(
    State(p): State<Arc<Pipeline>>,
    State(s): State<HttpState>,
    req: Request,
) -> Response {
    let (id, headers, body) = split(req);
    let resp = forward_simple(&p, s.jobs.as_ref(), &id, headers, body).await;
    with_request_id(resp, &id.0)
}

async fn forward_simple(
    p: &Pipeline,
    jobs: Option<&Arc<Jobs>>,
    id: &RequestId,
    headers: Presented,
    body: Body,
) -> Response {
    let admitted = match p.admit(meta(headers, id)) {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    let body = read_body(body, p.config().server.max_body_bytes).await;
    let parsed = body.and_then(|body| parse_json::<SimpleRequest>(&body));
    if let Ok(req) = &parsed {
        if req.run_async {
            return async_jobs::submit_simple(p, jobs, admitted, req).await;
        }
    }
    let mut client_request_id = None;
    let call = parsed.map(|req| {
        // An empty `request_id` is no key, as an empty Idempotency-Key
        // header is none (else every such request would share one key).
        let key = req.request_id.clone().filter(|k| !k.trim().is_empty());
        client_request_id.clone_from(&key);
        Call {
            body: simple_to_chat(&req),
            idempotency_key: key,
        }
    });
    let answer = match p.run(admitted, call).await {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    let ReplyBody::Complete(bytes) = &answer.reply.body else {
        // The simple API never asks for a stream.
        return ApiError::BadGateway("unexpected stream".into()).into_response();
    };
    match CompletionView::parse(bytes) {
        Ok(view) => {
            let body = SimpleResponse {
                reply: view.text,
                model_id: view.model,
                request_id: client_request_id.unwrap_or_else(|| id.0.clone()),
                usage: view.usage,
            };
            mark_replayed(Json(body).into_response(), answer.replayed)
        }
        Err(e) => e.into_response(),
    }
}

/// The simple API's request as a chat-completions body.
pub fn simple_to_chat(req: &SimpleRequest) -> Bytes {
    let chat = ChatRequest::from_prompt(&req.model_id, &req.prompt)
        .with_tuning(req.max_tokens, req.temperature);
    // Serialising plain strings and numbers cannot fail.
    serde_json::to_vec(&chat).unwrap_or_default().into()
}

fn mark_replayed(mut resp: Response, replayed: bool) -> Response {
    if replayed {
        resp.headers_mut()
            .insert(REPLAYED, HeaderValue::from_static("true"));
    }
    resp
}

/// The subject of the connection's client certificate, from the extension
/// the TLS server puts on each request.
fn peer_of(peer: &Option<Extension<PeerSubject>>) -> Option<&str> {
    peer.as_ref().map(|Extension(p)| &*p.0)
}

async fn list_models(
    State(p): State<Arc<Pipeline>>,
    peer: Option<Extension<PeerSubject>>,
    headers: HeaderMap,
) -> Response {
    let principal = match p.authenticate_peer(auth::credential(&headers), peer_of(&peer)) {
        Ok(principal) => principal,
        Err(e) => return e.into_response(),
    };
    let created = unix_now();
    let data: Vec<ModelInfo> = p
        .models()
        .into_iter()
        .filter(|m| principal.may_use(m))
        .map(|id| ModelInfo {
            id,
            object: "model",
            created,
            owned_by: "modelforwarder",
        })
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

async fn get_model(
    State(p): State<Arc<Pipeline>>,
    Path(model): Path<String>,
    peer: Option<Extension<PeerSubject>>,
    headers: HeaderMap,
) -> Response {
    let principal = match p.authenticate_peer(auth::credential(&headers), peer_of(&peer)) {
        Ok(principal) => principal,
        Err(e) => return e.into_response(),
    };
    if !principal.may_use(&model) {
        return ApiError::ModelNotFound(model).into_response();
    }
    if !p.has_model(&model) {
        return ApiError::ModelNotFound(model).into_response();
    }
    Json(ModelInfo {
        id: model,
        object: "model",
        created: unix_now(),
        owned_by: "modelforwarder",
    })
    .into_response()
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

/// The OpenAPI document (`docs/openapi.json`, embedded at build time).
async fn openapi_document() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi::DOCUMENT,
    )
        .into_response()
}

pub(super) fn not_found(msg: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": {"message": msg, "type": "invalid_request_error", "code": "not_found"}})),
    )
        .into_response()
}

/// `GET /v1/responses/{id}`: from the upstream that created it, its query
/// (`stream`, `starting_after`, `include`) passed as sent; with
/// `stream=true` the upstream's events are relayed as they come.
async fn get_response(
    State(p): State<Arc<Pipeline>>,
    super::owner::Owner(owner): super::owner::Owner,
    Path(id): Path<String>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Response {
    let at = ResponsePath {
        query: query.as_deref(),
        ..ResponsePath::new(&id)
    };
    response_object(&p, &owner.identity, http::Method::GET, at).await
}

/// `DELETE /v1/responses/{id}`: at the upstream that created it.
async fn delete_response(
    State(p): State<Arc<Pipeline>>,
    super::owner::Owner(owner): super::owner::Owner,
    Path(id): Path<String>,
) -> Response {
    let at = ResponsePath::new(&id);
    response_object(&p, &owner.identity, http::Method::DELETE, at).await
}

/// `POST /v1/responses/{id}/cancel`: at the upstream that created it (which
/// answers whether a response of its can be cancelled).
async fn cancel_response(
    State(p): State<Arc<Pipeline>>,
    super::owner::Owner(owner): super::owner::Owner,
    Path(id): Path<String>,
) -> Response {
    let at = ResponsePath {
        tail: "/cancel",
        ..ResponsePath::new(&id)
    };
    response_object(&p, &owner.identity, http::Method::POST, at).await
}

/// `GET /v1/responses/{id}/input_items`: from the upstream that created
/// it, its query (`after`, `limit`, `order`, `include`) passed as sent.
async fn response_input_items(
    State(p): State<Arc<Pipeline>>,
    super::owner::Owner(owner): super::owner::Owner,
    Path(id): Path<String>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Response {
    let at = ResponsePath {
        tail: "/input_items",
        query: query.as_deref(),
        ..ResponsePath::new(&id)
    };
    response_object(&p, &owner.identity, http::Method::GET, at).await
}

/// A retrieve's events as they come; an upstream that fails mid-way ends
/// them with an `error` event (the Responses API's), never a bare cut.
fn relayed(events: RawEvents) -> impl futures::Stream<Item = Result<Bytes, Infallible>> {
    futures::stream::unfold(Some(events), |events| async move {
        let mut events = events?;
        match events.next().await? {
            Ok(b) => Some((Ok(b), Some(events))),
            Err(e) => {
                tracing::warn!(error = %e, "a streamed response retrieve failed mid-way");
                let error = json!({"type": "error", "code": "upstream_error",
                    "message": "the upstream's stream failed before it ended"});
                let event = sse::named_event("error", error.to_string().as_bytes());
                Some((Ok(event), None))
            }
        }
    })
}

async fn response_object(
    p: &Pipeline,
    owner: &crate::auth::Identity,
    method: http::Method,
    at: ResponsePath<'_>,
) -> Response {
    let id = at.id;
    match p.response_object(owner, method, at).await {
        Ok(Some((headers, body))) => {
            let (content_type, body) = match body {
                ObjectBody::Whole(b) => ("application/json", Body::from(b)),
                ObjectBody::Events(events) => {
                    ("text/event-stream", Body::from_stream(relayed(events)))
                }
            };
            let mut r = (
                [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
                body,
            )
                .into_response();
            r.headers_mut().extend(headers);
            r
        }
        Ok(None) => not_found(&format!("no response with id {id:?}")),
        Err(e) => e.into_response(),
    }
}
