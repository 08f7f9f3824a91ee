//! WebSocket (`/api/v1/ws`): one long-lived connection carrying many
//! requests, each tagged with the client's `id`, answered as they complete.
//!
//! Client → server (JSON text frames):
//! `{"type":"request","id":"r1","model":"m","messages":[…] | "prompt":"…","stream":true,"idempotency_key":"k"}`
//! `{"type":"cancel","id":"r1"}`
//! Server → client:
//! `{"type":"delta","id":"r1","delta":"…"}` (streams only),
//! `{"type":"done","id":"r1","model":"m","reply":"…"?,"finish_reason":"stop","usage":{…},"replayed":false}`
//! (`reply` only for non-streamed requests),
//! `{"type":"error","id":"r1","status":404,"error":{"message","type","code"}}`,
//! `{"type":"cancelled","id":"r1"}`.
//!
//! Authentication happens at the upgrade: `Authorization: Bearer`,
//! `x-api-key`, a `Sec-WebSocket-Protocol` entry `bearer.<key>` (browsers
//! cannot set headers), or the `api_key` query parameter.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};

use super::http::RequestId;
use super::Lifecycle;
use crate::api::{prompt_or_messages, ApiError, ChatMessage, ChatRequest, Usage};
use crate::auth;
use crate::pipeline::{Answer, Call, Pipeline, Reply, RequestMeta};
use crate::telemetry::Protocol;
use forwarder_config::WebSocketConfig;

/// The subprotocol a client may ask for; chosen when offered.
pub const SUBPROTOCOL: &str = "modelforwarder.v1";
const BEARER_PREFIX: &str = "bearer.";
/// Initial read/write buffer of a connection.
const WS_BUFFER_BYTES: usize = 4 * 1024;

#[derive(Clone)]
pub struct WsState {
    pub pipeline: Arc<Pipeline>,
    pub lifecycle: Lifecycle,
}

pub async fn upgrade(
    State(st): State<WsState>,
    Extension(id): Extension<RequestId>,
    Query(query): Query<HashMap<String, String>>,
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
    if let Err(e) = p.authenticate(credential.as_deref()) {
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
    ws.read_buffer_size(WS_BUFFER_BYTES)
        .write_buffer_size(WS_BUFFER_BYTES)
        .max_message_size(cfg.max_frame_bytes)
        .max_frame_size(cfg.max_frame_bytes)
        .protocols(chosen)
        .on_upgrade(move |socket| tracker.track_future(session(socket, st, credential, id.0, cfg)))
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
    /// Other OpenAI parameters (max_tokens, temperature, …), passed on.
    #[serde(flatten)]
    params: Map<String, Value>,
}

impl WsRequest {
    fn into_chat(self) -> Result<ChatRequest, ApiError> {
        Ok(ChatRequest {
            model: self.model,
            messages: prompt_or_messages(self.prompt, self.messages)?,
            stream: self.stream,
            params: self.params,
        })
    }
}

fn frame(v: Value) -> Message {
    Message::Text(Utf8Bytes::from(v.to_string()))
}

fn error_frame(id: Option<&str>, e: &ApiError) -> Message {
    let mut body = e.body();
    body["type"] = json!("error");
    body["id"] = json!(id);
    body["status"] = json!(e.status().as_u16());
    frame(body)
}

/// Decrements the session gauge however the session ends.
struct SessionGauge(prometheus::IntGauge);

impl Drop for SessionGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn session(
    socket: WebSocket,
    st: WsState,
    credential: Option<String>,
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
    // from the upstream, so memory per connection stays bounded.
    let (out, out_rx) = mpsc::channel::<Message>(cfg.send_buffer);
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
                if let Some(id) = ids.remove(&task) {
                    by_id.remove(&id);
                }
                idle.as_mut().reset(tokio::time::Instant::now() + cfg.idle_timeout);
            }
            msg = incoming.next(), if !closing => {
                idle.as_mut().reset(tokio::time::Instant::now() + cfg.idle_timeout);
                match msg {
                    Some(Ok(Message::Text(text))) => {
                        let accepted = on_text(&st, &cfg, &credential, &conn_id, &out, text.as_str(), &mut tasks, &mut by_id, &mut ids).await;
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
                    // The client closed, went away, or broke the protocol
                    // (an oversized frame among others): nobody to answer.
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
    credential: &Option<String>,
    conn_id: &str,
    out: &mpsc::Sender<Message>,
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
        return out.send(error_frame(Some(&id), &err)).await.is_ok();
    }
    let meta = RequestMeta {
        protocol: Protocol::WebSocket,
        request_id: format!("{conn_id}/{id}"),
        credential: credential.clone(),
        idempotency_key: None,
    };
    let (pipeline, out, task_id) = (p.clone(), out.clone(), id.clone());
    let handle = tasks.spawn(async move {
        answer(&pipeline, meta, req, &out, &task_id).await;
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
    out: &mpsc::Sender<Message>,
    id: &str,
) {
    let key = req.idempotency_key.clone();
    let result = p
        .run(meta, || {
            Ok(Call {
                chat: req.into_chat()?,
                idempotency_key: key,
            })
        })
        .await;
    let (reply, replayed) = match result {
        Ok(Answer { reply, replayed }) => (reply, replayed),
        Err(e) => {
            let _ = out.send(error_frame(Some(id), &e)).await;
            return;
        }
    };
    let done =
        |model: &str, reply: Option<String>, finish: Option<String>, usage: Option<Usage>| {
            let mut v = json!({"type": "done", "id": id, "model": model, "finish_reason": finish,
                           "usage": usage.unwrap_or_default(), "replayed": replayed});
            if let Some(r) = reply {
                v["reply"] = json!(r);
            }
            frame(v)
        };
    match reply {
        Reply::Complete(r) => {
            let finish = r.choices.first().and_then(|c| c.finish_reason.clone());
            let _ = out
                .send(done(&r.model, Some(r.reply_text()), finish, r.usage))
                .await;
        }
        Reply::Stream(mut stream) => {
            let (mut model, mut finish, mut usage) = (String::new(), None, None);
            while let Some(item) = stream.next().await {
                match item {
                    Ok(chunk) => {
                        if model.is_empty() {
                            model.clone_from(&chunk.model);
                        }
                        if let Some(f) = chunk.choices.first().and_then(|c| c.finish_reason.clone())
                        {
                            finish = Some(f);
                        }
                        if chunk.usage.is_some() {
                            usage = chunk.usage;
                        }
                        let delta = chunk.delta_text();
                        if !delta.is_empty() {
                            let f = frame(json!({"type": "delta", "id": id, "delta": delta}));
                            if out.send(f).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = out.send(error_frame(Some(id), &e)).await;
                        return;
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
            msg = queue.recv() => match msg {
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
