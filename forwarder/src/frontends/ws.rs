//! WebSocket (`/api/v1/ws`): one long-lived connection carrying many
//! requests, each tagged with the client's `id`, answered as they complete.
//!
//! Client → server (JSON text frames):
//! `{"type":"request","id":"r1","model":"m","messages":[…] | "prompt":"…","stream":true,"idempotency_key":"k"}`
//! `{"type":"cancel","id":"r1"}`
//! Server → client:
//! `{"type":"delta","id":"r1","delta":"…"}` (streams only),
//! `{"type":"done","id":"r1","model":"m","reply":"…"?,"finish_reason":"stop","usage":{…}?,"replayed":false}`
//! (`reply` only for non-streamed requests; `usage` as the upstream sent
//! it, absent when it sent none),
//! `{"type":"error","id":"r1","status":404,"error":{"message","type","code"}}`,
//! `{"type":"cancelled","id":"r1"}`.
//! A request refused because its id is already in flight is answered with
//! `"id": null` and `"refused_id": "r1"`, so it cannot be mistaken for the
//! running request's failure. A frame larger than `websocket.max_frame_bytes`
//! closes the connection with code 1009 (message too big).
//!
//! Authentication happens at the upgrade: `Authorization: Bearer`,
//! `x-api-key`, a `Sec-WebSocket-Protocol` entry `bearer.<key>` (browsers
//! cannot set headers), or the `api_key` query parameter.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::task::{AbortHandle, JoinSet};

use super::http::RequestId;
use super::tls::PeerSubject;
use super::Lifecycle;
use crate::api::{
    prompt_or_messages, ApiError, ChatMessage, ChatRequest, ChunkView, CompletionView,
};
use crate::auth;
use crate::pipeline::envelope::ReplyBody;
use crate::pipeline::{Answer, Call, Pipeline, RequestMeta};
use crate::sse;
use crate::telemetry::Protocol;
use forwarder_config::WebSocketConfig;

/// The subprotocol a client may ask for; chosen when offered.
pub const SUBPROTOCOL: &str = "modelforwarder.v1";
const BEARER_PREFIX: &str = "bearer.";
/// Initial read buffer of a connection: an idle connection holds it for
/// good, so it starts small (it grows to the largest frame read).
const WS_READ_BUFFER_BYTES: usize = 512;
/// Bytes gathered before a write is flushed.
const WS_WRITE_BUFFER_BYTES: usize = 4 * 1024;

#[derive(Clone)]
pub struct WsState {
    pub pipeline: Arc<Pipeline>,
    pub lifecycle: Lifecycle,
}

pub async fn upgrade(
    State(st): State<WsState>,
    Extension(id): Extension<RequestId>,
    Query(query): Query<HashMap<String, String>>,
    peer: Option<Extension<PeerSubject>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let offered: Vec<String> = headers
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect();
    let from_protocol = offered.iter().find_map(|p| p.strip_prefix(BEARER_PREFIX));
    let credential = auth::credential(&headers)
        .or(from_protocol)
        .or(query.get("api_key").map(String::as_str))
        .map(str::to_string);
    let p = &st.pipeline;
    let presented = Presented {
        credential,
        peer: peer.map(|Extension(p)| p.0.to_string()),
        trace: trace_context(&headers).map(Arc::new),
    };
    if let Err(e) = p.authenticate_peer(presented.credential.as_deref(), presented.peer.as_deref())
    {
        return p.reject(Protocol::WebSocket, &id.0, e).into_response();
    }
    if st.lifecycle.stop.is_cancelled() {
        return p
            .reject(Protocol::WebSocket, &id.0, ApiError::ShuttingDown)
            .into_response();
    }
    let cfg = p.config().websocket.clone();
    // Browsers fail the handshake unless the server picks one of the
    // protocols they offered: ours if offered, else their bearer entry.
    let mut chosen: Vec<String> = vec![SUBPROTOCOL.into()];
    chosen.extend(
        offered
            .iter()
            .filter(|p| p.starts_with(BEARER_PREFIX))
            .cloned(),
    );
    let tracker = st.lifecycle.sessions.clone();
    // tungstenite's default 128 KiB read and write buffers per connection
    // would cost over a gigabyte at 10,000 idle connections; messages larger
    // than these still work (the buffers grow), they just start small.
    ws.read_buffer_size(WS_READ_BUFFER_BYTES)
        .write_buffer_size(WS_WRITE_BUFFER_BYTES)
        .max_message_size(cfg.max_frame_bytes)
        .max_frame_size(cfg.max_frame_bytes)
        .protocols(chosen)
        .on_upgrade(move |socket| tracker.track_future(session(socket, st, presented, id.0, cfg)))
}

/// A request frame.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ClientFrame {
    Request(WsRequest),
    Cancel { id: String },
}

#[derive(Deserialize)]
struct WsRequest {
    id: String,
    model: String,
    #[serde(default)]
    messages: Vec<ChatMessage>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    idempotency_key: Option<String>,
    /// W3C trace context for this request (else the upgrade's), never
    /// passed on as a body parameter.
    #[serde(default)]
    traceparent: Option<String>,
    #[serde(default)]
    tracestate: Option<String>,
    /// Other OpenAI parameters (max_tokens, temperature, …), passed on.
    #[serde(flatten)]
    params: Map<String, Value>,
}

impl WsRequest {
    /// The request as a chat-completions body (this edge's translation).
    fn into_body(self) -> Result<bytes::Bytes, ApiError> {
        let mut chat = ChatRequest {
            model: self.model,
            messages: prompt_or_messages(self.prompt, self.messages)?,
            stream: false,
            params: self.params,
        };
        if self.stream && !chat.params.contains_key("stream_options") {
            chat = chat.streamed_with_usage();
        }
        chat.stream = self.stream;
        serde_json::to_vec(&chat)
            .map(Into::into)
            .map_err(|e| ApiError::BadRequest(format!("invalid request: {e}")))
    }
}

fn frame(v: Value) -> Message {
    Message::Text(Utf8Bytes::from(v.to_string()))
}

fn error_body(id: Option<&str>, e: &ApiError) -> Value {
    let mut body = e.body();
    body["type"] = json!("error");
    body["id"] = json!(id);
    body["status"] = json!(e.status().as_u16());
    body
}

fn error_frame(id: Option<&str>, e: &ApiError) -> Message {
    frame(error_body(id, e))
}

/// A frame over `websocket.max_frame_bytes`.
fn is_too_big(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(tungstenite::Error::Capacity(_)) = err.downcast_ref::<tungstenite::Error>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// Decrements the session gauge however the session ends.
struct SessionGauge(prometheus::IntGauge);

impl Drop for SessionGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What the client authenticated with at the upgrade; every request on
/// the connection is admitted with it.
#[derive(Clone)]
struct Presented {
    credential: Option<String>,
    peer: Option<String>,
    /// The upgrade request's `traceparent` and `tracestate`: the parent of
    /// every request on the connection that names none of its own.
    trace: Option<Arc<HeaderMap>>,
}

/// The W3C trace context headers of `headers`, if a `traceparent` is there.
fn trace_context(headers: &HeaderMap) -> Option<HeaderMap> {
    headers.get(TRACEPARENT)?;
    Some(
        [TRACEPARENT, TRACESTATE]
            .into_iter()
            .filter_map(|name| Some((name.clone(), headers.get(&name)?.clone())))
            .collect(),
    )
}

/// A request's trace context: its own fields, else the connection's.
fn request_trace(req: &WsRequest, session: Option<&HeaderMap>) -> Option<HeaderMap> {
    let Some(parent) = &req.traceparent else {
        return session.cloned();
    };
    let mut h = HeaderMap::new();
    h.insert(TRACEPARENT, HeaderValue::from_str(parent).ok()?);
    if let Some(v) = req
        .tracestate
        .as_deref()
        .and_then(|v| HeaderValue::from_str(v).ok())
    {
        h.insert(TRACESTATE, v);
    }
    Some(h)
}

const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
const TRACESTATE: http::HeaderName = http::HeaderName::from_static("tracestate");

async fn session(
    socket: WebSocket,
    st: WsState,
    credential: Presented,
    conn_id: String,
    cfg: WebSocketConfig,
) {
    let gauge = st
        .pipeline
        .metrics()
        .connections
        .with_label_values(&["websocket"]);
    gauge.inc();
    let _gauge = SessionGauge(gauge);
    let (sink, mut incoming) = socket.split();
    // Bounded: a slow reader makes answers wait here, which stops pulling
    // from the upstream, so memory per connection stays bounded. (futures'
    // channel allocates per queued frame; tokio's holds a block of 32 slots
    // for every idle connection.)
    let (mut out, out_rx) = mpsc::channel::<Message>(cfg.send_buffer);
    let writer = tokio::spawn(write_loop(sink, out_rx, cfg.ping_interval));

    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut by_id: HashMap<String, AbortHandle> = HashMap::new();
    let mut ids: HashMap<tokio::task::Id, String> = HashMap::new();
    let idle = tokio::time::sleep(cfg.idle_timeout);
    tokio::pin!(idle);
    let mut closing = false;
    let close = loop {
        tokio::select! {
            _ = st.lifecycle.stop.cancelled(), if !closing => closing = true,
            Some(done) = tasks.join_next_with_id() => {
                let task = match done {
                    Ok((task, ())) => task,
                    Err(e) => e.id(),
                };
                // The id may already name a newer request (after a cancel):
                // only the task that ended leaves the table.
                if let Some(id) = ids.remove(&task) {
                    if by_id.get(&id).is_some_and(|h| h.id() == task) {
                        by_id.remove(&id);
                    }
                }
                idle.as_mut().reset(tokio::time::Instant::now() + cfg.idle_timeout);
            }
            msg = incoming.next(), if !closing => {
                idle.as_mut().reset(tokio::time::Instant::now() + cfg.idle_timeout);
                match msg {
                    Some(Ok(Message::Text(text))) => {
                        // Boxed: its state lives only while a frame is
                        // handled, not in every idle connection's task.
                        let accepted = Box::pin(on_text(&st, &cfg, &credential, &conn_id, &mut out, text.as_str(), &mut tasks, &mut by_id, &mut ids)).await;
                        if !accepted {
                            break None;
                        }
                    }
                    Some(Ok(Message::Binary(_))) => {
                        let e = ApiError::BadRequest("binary frames are not supported; send JSON text".into());
                        if out.send(error_frame(None, &e)).await.is_err() {
                            break None;
                        }
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Err(e)) if is_too_big(&e) => {
                        tasks.abort_all();
                        break Some((1009, "message too big"));
                    }
                    // The client closed, went away, or broke the protocol:
                    // nobody to answer.
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                        tasks.abort_all();
                        break None;
                    }
                }
            }
            _ = &mut idle, if tasks.is_empty() && !closing => {
                break Some((1000, "idle timeout"));
            }
        }
        if closing && tasks.is_empty() {
            break Some((1001, "server shutting down"));
        }
    };
    if let Some((code, reason)) = close {
        let _ = out
            .send(Message::Close(Some(CloseFrame {
                code,
                reason: Utf8Bytes::from_static(reason),
            })))
            .await;
    }
    drop(out);
    drop(tasks);
    let _ = writer.await;
}

/// Handles one text frame; returns false when the connection must end.
#[allow(clippy::too_many_arguments)]
async fn on_text(
    st: &WsState,
    cfg: &WebSocketConfig,
    credential: &Presented,
    conn_id: &str,
    out: &mut mpsc::Sender<Message>,
    text: &str,
    tasks: &mut JoinSet<()>,
    by_id: &mut HashMap<String, AbortHandle>,
    ids: &mut HashMap<tokio::task::Id, String>,
) -> bool {
    let p = &st.pipeline;
    let parsed: Result<ClientFrame, _> = serde_json::from_str(text);
    let req = match parsed {
        Ok(ClientFrame::Request(req)) => req,
        Ok(ClientFrame::Cancel { id }) => {
            let reply = match by_id.remove(&id) {
                Some(task) => {
                    task.abort();
                    json!({"type": "cancelled", "id": id})
                }
                None => json!({"type": "error", "id": id, "status": 404,
                    "error": {"message": "no request with this id is in flight", "type": "invalid_request_error", "code": "unknown_request_id"}}),
            };
            return out.send(frame(reply)).await.is_ok();
        }
        Err(e) => {
            // Answer under the frame's id when one can be read.
            let id = serde_json::from_str::<Value>(text)
                .ok()
                .and_then(|v| v.get("id").and_then(Value::as_str).map(str::to_string));
            let err = ApiError::BadRequest(format!("invalid frame: {e}"));
            let err = p.reject(Protocol::WebSocket, conn_id, err);
            return out.send(error_frame(id.as_deref(), &err)).await.is_ok();
        }
    };
    let id = req.id.clone();
    let refusal = if by_id.contains_key(&id) {
        Some(ApiError::DuplicateId(id.clone()))
    } else if by_id.len() >= cfg.max_in_flight {
        Some(ApiError::TooManyInFlight(cfg.max_in_flight))
    } else {
        None
    };
    if let Some(err) = refusal {
        let err = p.reject(Protocol::WebSocket, &format!("{conn_id}/{id}"), err);
        // A duplicate's refusal must not look like the running request's error.
        let f = match err {
            ApiError::DuplicateId(_) => {
                let mut f = error_body(None, &err);
                f["refused_id"] = json!(id);
                f
            }
            _ => error_body(Some(&id), &err),
        };
        return out.send(frame(f)).await.is_ok();
    }
    let mut meta = RequestMeta::new(Protocol::WebSocket, format!("{conn_id}/{id}"));
    meta.credential.clone_from(&credential.credential);
    meta.peer.clone_from(&credential.peer);
    if let Some(trace) = request_trace(&req, credential.trace.as_deref()) {
        meta.headers = trace;
    }
    // A sender of its own for the request's task (one per request in
    // flight: each sender may queue one frame past the bound).
    let (pipeline, out, task_id) = (p.clone(), out.clone(), id.clone());
    let handle = tasks.spawn(async move {
        answer(&pipeline, meta, req, out, &task_id).await;
    });
    ids.insert(handle.id(), id.clone());
    by_id.insert(id, handle);
    true
}

/// Runs one request and sends its frames. Returns early if the connection
/// is gone.
async fn answer(
    p: &Pipeline,
    meta: RequestMeta,
    req: WsRequest,
    mut out: mpsc::Sender<Message>,
    id: &str,
) {
    let key = req.idempotency_key.clone();
    let result = match p.admit(meta) {
        Ok(admitted) => {
            let call = req.into_body().map(|body| Call {
                body,
                idempotency_key: key,
            });
            p.run(admitted, call).await
        }
        Err(e) => Err(e),
    };
    let (body, replayed) = match result {
        Ok(Answer { reply, replayed }) => (reply.body, replayed),
        Err(e) => {
            let _ = out.send(error_frame(Some(id), &e)).await;
            return;
        }
    };
    let done = |model: &str, reply: Option<String>, finish: Option<String>, usage| {
        let mut v = json!({"type": "done", "id": id, "model": model, "finish_reason": finish,
                           "replayed": replayed});
        if let Some(r) = reply {
            v["reply"] = json!(r);
        }
        if let Some(u) = usage {
            v["usage"] = json!(u);
        }
        frame(v)
    };
    match body {
        ReplyBody::Complete(bytes) => {
            let f = match CompletionView::parse(&bytes) {
                Ok(v) => done(&v.model, Some(v.text), v.finish_reason, v.usage),
                Err(e) => error_frame(Some(id), &e),
            };
            let _ = out.send(f).await;
        }
        ReplyBody::Stream(mut stream) => {
            let (mut model, mut finish, mut usage) = (String::new(), None, None);
            while let Some(item) = stream.next().await {
                // Each item is a run of events: one frame per delta.
                let run = match item {
                    Ok(run) => run,
                    Err(e) => {
                        let _ = out.send(error_frame(Some(id), &e)).await;
                        return;
                    }
                };
                for event in sse::events(&run) {
                    let chunk = match sse::data(event) {
                        Some(data) => ChunkView::parse(&data),
                        None => Ok(None), // a keep-alive comment
                    };
                    match chunk {
                        Ok(Some(c)) => {
                            if model.is_empty() {
                                model = c.model;
                            }
                            if c.finish_reason.is_some() {
                                finish = c.finish_reason;
                            }
                            if c.usage.is_some() {
                                usage = c.usage;
                            }
                            if !c.delta.is_empty() {
                                let f = frame(json!({"type": "delta", "id": id, "delta": c.delta}));
                                if out.send(f).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            let _ = out.send(error_frame(Some(id), &e)).await;
                            return;
                        }
                    }
                }
            }
            let _ = out.send(done(&model, None, finish, usage)).await;
        }
    }
}

/// Sends queued frames and keep-alive pings until the queue closes or the
/// socket fails.
async fn write_loop(
    mut sink: futures::stream::SplitSink<WebSocket, Message>,
    mut queue: mpsc::Receiver<Message>,
    ping_every: std::time::Duration,
) {
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    loop {
        tokio::select! {
            msg = queue.next() => match msg {
                Some(msg) => {
                    let is_close = matches!(msg, Message::Close(_));
                    if sink.send(msg).await.is_err() || is_close {
                        break;
                    }
                }
                None => {
                    let _ = sink.close().await;
                    break;
                }
            },
            _ = ping.tick() => {
                if sink.send(Message::Ping(Default::default())).await.is_err() {
                    break;
                }
            }
        }
    }
}
