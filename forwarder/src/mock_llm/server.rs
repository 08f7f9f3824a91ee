//! `forwarder mock-llm`: the mock model as a standalone OpenAI-compatible
//! server, with admin endpoints so tests can change faults at run time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderValue, Request, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures::StreamExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tower::ServiceExt;

use super::calls::Begin;
use super::{Fault, MockModel};
use crate::api::{unix_now, ApiError, ChatRequest};
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
        None => None,
        Some(k) => match model.calls.begin(k).await {
            Begin::Replay(body) => return json_bytes(body),
            Begin::Lead(lead) => Some(lead),
            Begin::Untracked => None,
        },
    };
    let (latency, fault) = model.begin();
    // tokio's timer has 1 ms granularity: a zero sleep would still cost ~1 ms.
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    match fault {
        None => {}
        Some(Fault::Error {
            status,
            retry_after,
        }) => {
            let code = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            let mut resp = (
                code,
                Json(json!({"error": {"message": "injected mock error", "type": "mock_error", "param": null, "code": "injected_fault"}})),
            )
                .into_response();
            if let Some(ra) = retry_after {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(ra.as_secs()));
            }
            return resp;
        }
        Some(Fault::Hang) => futures::future::pending::<()>().await,
        Some(Fault::Reset) => {
            let mut resp = StatusCode::INTERNAL_SERVER_ERROR.into_response();
            resp.extensions_mut().insert(ResetConnection);
            return resp;
        }
    }
    if req.stream {
        let events = model
            .chunk_stream(&req)
            .map(|c| Event::default().json_data(c))
            .chain(futures::stream::once(async {
                Ok(Event::default().data("[DONE]"))
            }));
        Sse::new(events).into_response()
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
    /// `error` (default), `hang` or `reset`.
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
        other => return ApiError::BadRequest(format!("unknown fault {other:?}")).into_response(),
    };
    model.fail_next(f.count, fault);
    StatusCode::NO_CONTENT.into_response()
}
