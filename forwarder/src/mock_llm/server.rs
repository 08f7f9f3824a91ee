//! `forwarder mock-llm`: the mock model as a standalone server speaking
//! OpenAI's chat completions, embeddings and Responses and Anthropic's
//! Messages, with admin endpoints so tests can change faults at run time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures::StreamExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tower::ServiceExt;

use super::calls::Begin;
use super::{Fault, MockAnswer, MockModel};
use crate::api::{unix_now, ApiError, ChatRequest};
use crate::pipeline::ApiKind;
use forwarder_config::MockSettings;

/// Marks a response whose connection must be reset instead of answered.
#[derive(Clone, Copy)]
struct ResetConnection;

/// A running mock server; stops accepting when dropped.
pub struct MockServer {
    pub addr: SocketAddr,
    pub model: Arc<MockModel>,
    task: JoinHandle<()>,
}

impl MockServer {
    /// Binds `addr` (port 0 for an ephemeral port) and serves in the background.
    pub async fn start(addr: SocketAddr, settings: MockSettings) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let model = Arc::new(MockModel::new(settings));
        let task = tokio::spawn(serve(listener, model.clone()));
        Ok(Self { addr, model, task })
    }

    /// The OpenAI base URL of this server, e.g. `http://127.0.0.1:9000/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn router(model: Arc<MockModel>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/responses", post(responses))
        .route(
            "/v1/responses/{id}",
            get(get_response).delete(delete_response),
        )
        .route("/v1/responses/{id}/cancel", post(cancel_response))
        .route("/v1/responses/{id}/input_items", get(input_items))
        .route("/v1/messages", post(messages))
        .route("/v1/messages/count_tokens", post(count_tokens))
        .route("/v1/models", get(models))
        .route("/healthz", get(|| async { "ok" }))
        .route("/mock/stats", get(stats))
        .route("/mock/calls", get(calls))
        .route("/mock/settings", put(set_settings).get(get_settings))
        .route("/mock/fail-next", post(fail_next))
        .with_state(model)
}

/// Accepts connections until the task is aborted.
pub async fn serve(listener: TcpListener, model: Arc<MockModel>) {
    let app = router(model);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        // Linger 0: closing the socket sends RST, a real connection reset.
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        let app = app.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: Request<Incoming>| handle(app.clone(), req));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Answers one request, or fails the connection (an RST, thanks to linger 0)
/// when the route asked for a reset.
async fn handle(app: Router, req: Request<Incoming>) -> Result<Response, std::io::Error> {
    let resp = match app.oneshot(req.map(axum::body::Body::new)).await {
        Ok(resp) => resp,
        Err(never) => match never {},
    };
    if resp.extensions().get::<ResetConnection>().is_some() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "injected reset",
        ));
    }
    Ok(resp)
}

async fn chat(
    State(model): State<Arc<MockModel>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let req: ChatRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return ApiError::BadRequest(format!("invalid JSON body: {e}")).into_response(),
    };
    // Like a provider honouring `Idempotency-Key` (completions, not streams):
    // a repeated key gets its first answer, the model runs once.
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty() && !req.stream);
    let lead = match key {
        None if req.stream => None,
        None => {
            if let Some(m) = super::calls::marker(&body) {
                model.calls.note(m);
            }
            None
        }
        Some(k) => match model.calls.begin(k).await {
            Begin::Replay(body) => return json_bytes(body),
            Begin::Lead(lead) => Some(lead),
            Begin::Untracked => None,
        },
    };
    let fault = match prelude(&model, ApiKind::ChatCompletions, req.stream).await {
        Ok(fault) => fault,
        Err(resp) => return resp,
    };
    if req.stream {
        let events = model
            .chunk_stream(&req)
            .map(|c| crate::sse::data_event(&serde_json::to_vec(&c).unwrap_or_default()))
            .chain(futures::stream::once(async {
                axum::body::Bytes::from_static(crate::sse::DONE_EVENT)
            }))
            .boxed();
        event_stream(super::with_fault(events, ApiKind::ChatCompletions, fault))
    } else {
        let body = match serde_json::to_vec(&model.respond(&req)) {
            Ok(b) => axum::body::Bytes::from(b),
            Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        };
        if let Some(lead) = lead {
            lead.answered(body.clone());
        }
        json_bytes(body)
    }
}

/// Latency and faults, as every route applies them: `Ok` with a
/// mid-stream fault for a stream to apply, or the injected answer.
async fn prelude(model: &MockModel, api: ApiKind, stream: bool) -> Result<Option<Fault>, Response> {
    let (latency, fault) = model.begin();
    // tokio's timer has 1 ms granularity: a zero sleep would still cost ~1 ms.
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let injected = |status: u16, retry_after: Option<Duration>| {
        let code = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        let body = match api {
            ApiKind::ChatCompletions => json!({"error": {"message": "injected mock error", "type": "mock_error", "param": null, "code": "injected_fault"}}).to_string().into(),
            api => super::error_body(api.family(), status, "injected mock error"),
        };
        let mut resp = (code, json_bytes(body)).into_response();
        if let Some(ra) = retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(ra.as_secs()));
        }
        resp
    };
    let reset = || {
        let mut resp = StatusCode::INTERNAL_SERVER_ERROR.into_response();
        resp.extensions_mut().insert(ResetConnection);
        resp
    };
    match fault {
        None => Ok(None),
        Some(Fault::Error {
            status,
            retry_after,
        }) => Err(injected(status, retry_after)),
        Some(Fault::Hang) => futures::future::pending().await,
        Some(Fault::Reset) => Err(reset()),
        Some(f @ (Fault::Cut | Fault::StreamError)) if stream => Ok(Some(f)),
        Some(Fault::Cut) => Err(reset()),
        Some(Fault::StreamError) => Err(injected(500, None)),
    }
}

/// Whole SSE events as a streamed body.
fn event_stream(events: futures::stream::BoxStream<'static, axum::body::Bytes>) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        axum::body::Body::from_stream(events.map(Ok::<_, std::convert::Infallible>)),
    )
        .into_response()
}

async fn embeddings(State(model): State<Arc<MockModel>>, body: axum::body::Bytes) -> Response {
    answer(&model, ApiKind::Embeddings, &body).await
}

/// Answers, and keeps whole answers for `GET`/`DELETE /v1/responses/{id}`.
async fn responses(State(model): State<Arc<MockModel>>, body: axum::body::Bytes) -> Response {
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let resp = answer(&model, ApiKind::Responses, &body).await;
    let json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v == "application/json");
    if resp.status() != StatusCode::OK || !json {
        return resp;
    }
    let Ok(body) = axum::body::to_bytes(resp.into_body(), usize::MAX).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    if let Some(id) = crate::pipeline::responses::response_id(&body) {
        let kept = super::model::StoredResponse {
            body: body.clone(),
            input_items: input_items_of(&id, &request["input"]),
            background: request["background"] == json!(true),
        };
        let mut stored = model.stored_responses.lock();
        if stored.len() < super::model::MAX_STORED_RESPONSES {
            stored.insert(id, kept);
        }
    }
    json_bytes(body)
}

/// A Responses request's `input` as the items `input_items` lists: a
/// string is one user message; listed messages get ids.
fn input_items_of(response: &str, input: &Value) -> Vec<Value> {
    let message = |i: usize, role: &Value, content: &Value| {
        let content = match content {
            Value::String(text) => json!([{"type": "input_text", "text": text}]),
            other => other.clone(),
        };
        json!({"id": format!("msg_{response}_{i}"), "type": "message", "role": role,
            "status": "completed", "content": content})
    };
    match input {
        Value::String(_) => vec![message(0, &json!("user"), input)],
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item.get("content") {
                Some(content) if item.get("role").is_some() => message(i, &item["role"], content),
                _ => item.clone(),
            })
            .collect(),
        _ => Vec::new(),
    }
}

#[derive(Default, serde::Deserialize)]
#[serde(default)]
struct RetrieveQuery {
    stream: bool,
    starting_after: Option<u64>,
}

async fn get_response(
    State(model): State<Arc<MockModel>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    axum::extract::Query(q): axum::extract::Query<RetrieveQuery>,
) -> Response {
    let Some(kept) = model.stored_responses.lock().get(&id).cloned() else {
        return no_response(&id);
    };
    if !q.stream {
        return json_bytes(kept.body);
    }
    match replay(&kept.body, q.starting_after) {
        Some(events) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            )],
            events,
        )
            .into_response(),
        None => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// A kept response as the events that made it (`GET ...?stream=true`):
/// `response.created`, one `response.output_text.delta` per word of its
/// text, `response.completed`; numbered, and only those after
/// `starting_after`.
fn replay(body: &[u8], starting_after: Option<u64>) -> Option<Vec<u8>> {
    let whole: Value = serde_json::from_slice(body).ok()?;
    let text = whole
        .pointer("/output/0/content/0/text")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let mut created = whole.clone();
    created["status"] = json!("in_progress");
    created["output"] = json!([]);
    let mut events = vec![("response.created", json!({"response": created}))];
    for (i, word) in text.split_inclusive(' ').enumerate() {
        events.push((
            "response.output_text.delta",
            json!({"output_index": 0, "content_index": 0, "delta": word, "logprobs": [],
                "item_id": whole.pointer("/output/0/id").cloned().unwrap_or(Value::Null),
                "obfuscation": format!("{i}")}),
        ));
    }
    events.push(("response.completed", json!({"response": whole})));
    let mut out = Vec::new();
    for (seq, (name, mut v)) in events.into_iter().enumerate() {
        let seq = seq as u64;
        if starting_after.is_some_and(|after| seq <= after) {
            continue;
        }
        v["type"] = json!(name);
        v["sequence_number"] = json!(seq);
        out.extend_from_slice(&crate::sse::named_event(name, v.to_string().as_bytes()));
    }
    Some(out)
}

/// As OpenAI answers: only a background response can be cancelled.
async fn cancel_response(
    State(model): State<Arc<MockModel>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let Some(kept) = model.stored_responses.lock().get(&id).cloned() else {
        return no_response(&id);
    };
    if !kept.background {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {
                "message": "Only responses created with background=true can be cancelled.",
                "type": "invalid_request_error", "param": null, "code": null}})),
        )
            .into_response();
    }
    let mut body: Value = serde_json::from_slice(&kept.body).unwrap_or(Value::Null);
    body["status"] = json!("cancelled");
    Json(body).into_response()
}

#[derive(serde::Deserialize)]
struct ItemsQuery {
    after: Option<String>,
    limit: Option<usize>,
    order: Option<String>,
}

/// A page of a response's input items: `order` (`desc` unless `asc`),
/// `after` an item id, `limit` (20 unless given).
async fn input_items(
    State(model): State<Arc<MockModel>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    axum::extract::Query(q): axum::extract::Query<ItemsQuery>,
) -> Response {
    let Some(kept) = model.stored_responses.lock().get(&id).cloned() else {
        return no_response(&id);
    };
    let mut items = kept.input_items;
    if q.order.as_deref() != Some("asc") {
        items.reverse();
    }
    if let Some(after) = &q.after {
        let at = items.iter().position(|i| i["id"].as_str() == Some(after));
        items.drain(..at.map_or(items.len(), |p| p + 1));
    }
    let limit = q.limit.unwrap_or(20).clamp(1, 100);
    let has_more = items.len() > limit;
    items.truncate(limit);
    Json(json!({
        "object": "list",
        "first_id": items.first().map(|i| i["id"].clone()),
        "last_id": items.last().map(|i| i["id"].clone()),
        "has_more": has_more,
        "data": items,
    }))
    .into_response()
}

async fn delete_response(
    State(model): State<Arc<MockModel>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    match model.stored_responses.lock().remove(&id) {
        Some(_) => Json(json!({"id": id, "object": "response", "deleted": true})).into_response(),
        None => no_response(&id),
    }
}

fn no_response(id: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(
            json!({"error": {"message": format!("Response with id '{id}' not found."),
            "type": "invalid_request_error", "param": null, "code": null}}),
        ),
    )
        .into_response()
}

async fn messages(State(model): State<Arc<MockModel>>, body: axum::body::Bytes) -> Response {
    answer(&model, ApiKind::Messages, &body).await
}

async fn count_tokens(State(model): State<Arc<MockModel>>, body: axum::body::Bytes) -> Response {
    answer(&model, ApiKind::CountTokens, &body).await
}

/// Answers any API but chat completions.
async fn answer(model: &MockModel, api: ApiKind, body: &[u8]) -> Response {
    let stream = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("stream").and_then(serde_json::Value::as_bool))
        .unwrap_or(false);
    let fault = match prelude(model, api, stream).await {
        Ok(fault) => fault,
        Err(resp) => return resp,
    };
    match model.answer(api, body, fault) {
        Ok(MockAnswer::Complete(body)) => json_bytes(body),
        Ok(MockAnswer::Events(events)) => event_stream(events),
        Err(r) => {
            let code = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_REQUEST);
            (code, json_bytes(r.body)).into_response()
        }
    }
}

fn json_bytes(body: axum::body::Bytes) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// Per `Idempotency-Key`: requests started, answers produced, replays.
async fn calls(State(model): State<Arc<MockModel>>) -> Json<serde_json::Value> {
    Json(json!({"calls": model.calls.counts()}))
}

async fn models() -> Json<serde_json::Value> {
    Json(json!({"object": "list", "data": [
        {"id": "mock", "object": "model", "created": unix_now(), "owned_by": "mock-llm"}
    ]}))
}

async fn stats(State(model): State<Arc<MockModel>>) -> Json<serde_json::Value> {
    Json(json!({"requests": model.requests()}))
}

async fn get_settings(State(model): State<Arc<MockModel>>) -> Json<MockSettings> {
    Json(model.settings())
}

async fn set_settings(
    State(model): State<Arc<MockModel>>,
    Json(s): Json<MockSettings>,
) -> Response {
    if let Err(errors) = s.validate("settings") {
        let msg = errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        return ApiError::BadRequest(msg).into_response();
    }
    model.set_settings(s);
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
struct FailNext {
    count: usize,
    /// `error` (default), `hang`, `reset`, `cut` or `stream_error`.
    #[serde(default)]
    fault: Option<String>,
    #[serde(default)]
    status: Option<u16>,
    #[serde(default)]
    retry_after_secs: Option<u64>,
}

async fn fail_next(State(model): State<Arc<MockModel>>, Json(f): Json<FailNext>) -> Response {
    let fault = match f.fault.as_deref().unwrap_or("error") {
        "error" => Fault::Error {
            status: f.status.unwrap_or(503),
            retry_after: f.retry_after_secs.map(Duration::from_secs),
        },
        "hang" => Fault::Hang,
        "reset" => Fault::Reset,
        "cut" => Fault::Cut,
        "stream_error" => Fault::StreamError,
        other => return ApiError::BadRequest(format!("unknown fault {other:?}")).into_response(),
    };
    model.fail_next(f.count, fault);
    StatusCode::NO_CONTENT.into_response()
}
