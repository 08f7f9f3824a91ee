//! OpenTelemetry traces: a real OTLP receiver (the official protocol
//! definitions' gRPC service, or the HTTP/protobuf endpoint) on loopback,
//! a forwarder exporting to it, and a real upstream on loopback that
//! records the `traceparent` it is sent.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::IntoResponse;
use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use parking_lot::Mutex;
use prost::Message;
use serde_json::json;

use crate::common::*;

/// The spans a receiver got, with their resource's `service.name`.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<(String, Span)>>>);

impl Received {
    fn take(&self, req: ExportTraceServiceRequest) {
        let mut spans = self.0.lock();
        for rs in req.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    Any::StringValue(s) => s.clone(),
                    _ => String::new(),
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push((service.clone(), span));
                }
            }
        }
    }

    fn spans(&self) -> Vec<Span> {
        self.0.lock().iter().map(|(_, s)| s.clone()).collect()
    }
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.take(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Starts an OTLP receiver on loopback; returns its endpoint URL.
async fn receiver(grpc: bool, received: Received) -> String {
    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    if grpc {
        let incoming = tokio_stream_from(listener);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(received))
                .serve_with_incoming(incoming),
        );
    } else {
        async fn traces(State(r): State<Received>, body: Bytes) -> impl IntoResponse {
            match ExportTraceServiceRequest::decode(body) {
                Ok(req) => {
                    r.take(req);
                    (
                        [("content-type", "application/x-protobuf")],
                        ExportTraceServiceResponse {
                            partial_success: None,
                        }
                        .encode_to_vec(),
                    )
                        .into_response()
                }
                Err(_) => http::StatusCode::BAD_REQUEST.into_response(),
            }
        }
        let app = axum::Router::new()
            .route("/v1/traces", axum::routing::post(traces))
            .with_state(received);
        tokio::spawn(async move { axum::serve(listener, app).await });
    }
    format!("http://{addr}")
}

fn tokio_stream_from(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| s);
        Some((r, l))
    })
}

/// A chat-completions upstream that fails its first `fail` calls with 503,
/// records every `traceparent` and body it is sent, and answers as another
/// model.
#[derive(Clone, Default)]
struct Upstream {
    fail: Arc<AtomicU32>,
    traceparents: Arc<Mutex<Vec<String>>>,
    bodies: Arc<Mutex<Vec<serde_json::Value>>>,
}

async fn recording_upstream(state: Upstream) -> String {
    async fn chat(
        State(u): State<Upstream>,
        headers: http::HeaderMap,
        body: Bytes,
    ) -> axum::response::Response {
        if let Some(tp) = headers.get("traceparent").and_then(|v| v.to_str().ok()) {
            u.traceparents.lock().push(tp.to_string());
        }
        if u.fail
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return (http::StatusCode::SERVICE_UNAVAILABLE, "busy").into_response();
        }
        let req: serde_json::Value = serde_json::from_slice(&body).unwrap();
        u.bodies.lock().push(req.clone());
        if req["stream"] == true {
            let chunks = [
                json!({"id":"s1","model":"served-v2","choices":[{"index":0,"delta":{"content":"streamed reply"}}]}),
                json!({"id":"s1","model":"served-v2","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}),
                json!({"id":"s1","model":"served-v2","choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2,"total_tokens":6}}),
            ];
            let mut text = String::new();
            for c in chunks {
                text.push_str(&format!("data: {c}\n\n"));
            }
            text.push_str("data: [DONE]\n\n");
            return ([("content-type", "text/event-stream")], text).into_response();
        }
        axum::Json(json!({
            "id": "c1", "object": "chat.completion", "model": "served-v2",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "the whole reply"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}
        }))
        .into_response()
    }
    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route("/v1/chat/completions", axum::routing::post(chat))
        .with_state(state);
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/v1")
}

fn attr(span: &Span, key: &str) -> Option<Any> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.clone())
}

fn string(span: &Span, key: &str) -> Option<String> {
    match attr(span, key)? {
        Any::StringValue(s) => Some(s),
        _ => None,
    }
}

fn int(span: &Span, key: &str) -> Option<i64> {
    match attr(span, key)? {
        Any::IntValue(i) => Some(i),
        _ => None,
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

const PROMPT: &str = "a secret prompt 7f3a";

async fn spans_are_exported(grpc: bool) {
    let received = Received::default();
    let endpoint = receiver(grpc, received.clone()).await;
    let up = Upstream::default();
    let base = recording_upstream(up.clone()).await;
    let llm = mock(Default::default()).await;
    let mut cfg = config(vec![
        forwarder::config::UpstreamConfig {
            base_url: Some(base),
            ..upstream("primary", &llm, "chat-model")
        },
        upstream("mockllm", &llm, "embed-model"),
        forwarder::config::UpstreamConfig::builtin_mock(),
    ]);
    cfg.tracing.enabled = true;
    cfg.tracing.endpoint = Some(endpoint);
    cfg.tracing.protocol = Some(if grpc { "grpc" } else { "http/protobuf" }.into());
    cfg.tracing.service_name = Some("fwd-under-test".into());
    let f = start(cfg).await;

    // A client's trace: the forwarder's span must continue it.
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{client_trace}-{client_span}-01");
    up.fail.store(1, Ordering::SeqCst);
    let r = f
        .post(
            "/v1/chat/completions",
            &chat("chat-model", PROMPT),
            &[("traceparent", &traceparent)],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);

    let streamed = f
        .http
        .post(format!("{}/v1/chat/completions", f.base))
        .json(&json!({"model": "chat-model", "stream": true,
                      "messages": [{"role": "user", "content": PROMPT}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), 200);
    let events = sse_events(streamed).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));

    let r = f
        .post(
            "/v1/embeddings",
            &json!({"model": "embed-model", "input": [PROMPT]}),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = f
        .post(
            "/v1/messages",
            &json!({"model": "mock", "max_tokens": 16,
                    "messages": [{"role": "user", "content": PROMPT}]}),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = f
        .post("/v1/chat/completions", &chat("nope", PROMPT), &[])
        .await;
    assert_eq!(r.status, 404);

    // A shutdown exports what is buffered (the HTTP run); so does a flush.
    if grpc {
        f.server.pipeline.flush_traces().await;
    } else {
        f.server.shutdown().await;
    }
    // Within 2 s: well before the exporter's own 5 s schedule would send them.
    let mut spans = Vec::new();
    for _ in 0..20 {
        spans = received.spans();
        if spans.len() >= 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // 5 requests; attempts: 2 + 1 (stream) + 1 (embeddings) + 1 (messages).
    assert_eq!(spans.len(), 10, "{spans:#?}");
    assert!(received
        .0
        .lock()
        .iter()
        .all(|(service, _)| service == "fwd-under-test"));

    let by_id: HashMap<Vec<u8>, &Span> = spans.iter().map(|s| (s.span_id.clone(), s)).collect();
    let servers: Vec<&Span> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Server as i32)
        .collect();
    assert_eq!(servers.len(), 5);
    let request = |api: &str, stream: bool| {
        servers
            .iter()
            .find(|s| {
                string(s, "forwarder.api").as_deref() == Some(api)
                    && attr(s, "forwarder.stream") == Some(Any::BoolValue(stream))
                    && string(s, "gen_ai.request.model").as_deref() != Some("nope")
            })
            .copied()
            .unwrap_or_else(|| panic!("no {api} span (stream {stream}): {servers:#?}"))
    };
    let children = |parent: &Span| -> Vec<&Span> {
        let mut c: Vec<&Span> = spans
            .iter()
            .filter(|s| s.parent_span_id == parent.span_id)
            .collect();
        c.sort_by_key(|s| int(s, "forwarder.attempt"));
        c
    };

    // The whole chat completion: the client's trace, GenAI attributes,
    // one failed and one successful attempt as children.
    let chat_span = request("chat_completions", false);
    assert_eq!(hex(&chat_span.trace_id), client_trace);
    assert_eq!(hex(&chat_span.parent_span_id), client_span);
    assert_eq!(chat_span.name, "chat chat-model");
    assert_eq!(
        string(chat_span, "gen_ai.operation.name").as_deref(),
        Some("chat")
    );
    assert_eq!(
        string(chat_span, "gen_ai.request.model").as_deref(),
        Some("chat-model")
    );
    assert_eq!(
        string(chat_span, "gen_ai.response.model").as_deref(),
        Some("served-v2")
    );
    assert_eq!(
        string(chat_span, "gen_ai.response.id").as_deref(),
        Some("c1")
    );
    assert_eq!(int(chat_span, "gen_ai.usage.input_tokens"), Some(11));
    assert_eq!(int(chat_span, "gen_ai.usage.output_tokens"), Some(5));
    assert_eq!(
        string(chat_span, "gen_ai.provider.name").as_deref(),
        Some("openai")
    );
    assert_eq!(
        string(chat_span, "server.address").as_deref(),
        Some("127.0.0.1")
    );
    assert!(int(chat_span, "server.port").is_some_and(|p| p > 0));
    assert_eq!(int(chat_span, "forwarder.attempts"), Some(2));
    assert_eq!(string(chat_span, "error.type"), None);
    let attempts = children(chat_span);
    assert_eq!(attempts.len(), 2, "{attempts:#?}");
    for a in &attempts {
        assert_eq!(a.kind, SpanKind::Client as i32);
        assert_eq!(a.trace_id, chat_span.trace_id);
        assert_eq!(string(a, "server.address").as_deref(), Some("127.0.0.1"));
        assert_eq!(
            string(a, "gen_ai.request.model").as_deref(),
            Some("chat-model")
        );
    }
    assert_eq!(
        string(attempts[0], "error.type").as_deref(),
        Some("server_error")
    );
    assert_eq!(int(attempts[0], "http.response.status_code"), Some(503));
    assert_eq!(string(attempts[1], "error.type"), None);
    // The upstream was sent the client's trace, under the request's span.
    let sent = up.traceparents.lock().clone();
    assert_eq!(sent.len(), 3, "{sent:?}");
    assert_eq!(
        sent[0],
        format!("00-{client_trace}-{}-01", hex(&chat_span.span_id))
    );

    // The stream: time to first token and the usage chunk's counts; a new
    // trace of its own (no traceparent from the client).
    let stream_span = request("chat_completions", true);
    assert_ne!(hex(&stream_span.trace_id), client_trace);
    assert!(stream_span.parent_span_id.is_empty());
    assert!(matches!(
        attr(stream_span, "gen_ai.server.time_to_first_token"),
        Some(Any::DoubleValue(t)) if t > 0.0
    ));
    assert_eq!(int(stream_span, "gen_ai.usage.input_tokens"), Some(4));
    assert_eq!(int(stream_span, "gen_ai.usage.output_tokens"), Some(2));
    assert_eq!(
        string(stream_span, "gen_ai.response.model").as_deref(),
        Some("served-v2")
    );
    assert_eq!(children(stream_span).len(), 1);
    assert!(sent[2].contains(&hex(&stream_span.trace_id)));

    let emb = request("embeddings", false);
    assert_eq!(
        string(emb, "gen_ai.operation.name").as_deref(),
        Some("embeddings")
    );
    assert!(int(emb, "gen_ai.usage.input_tokens").is_some_and(|n| n > 0));
    let msg = request("messages", false);
    assert_eq!(
        string(msg, "gen_ai.operation.name").as_deref(),
        Some("chat")
    );
    assert_eq!(string(msg, "gen_ai.provider.name").as_deref(), Some("mock"));
    assert!(int(msg, "gen_ai.usage.output_tokens").is_some_and(|n| n > 0));

    let unknown = servers
        .iter()
        .find(|s| string(s, "gen_ai.request.model").as_deref() == Some("nope"))
        .expect("the refused request's span");
    assert_eq!(string(unknown, "error.type").as_deref(), Some("404"));
    assert!(children(unknown).is_empty());

    // Every attempt hangs under a request span; no content anywhere.
    for s in &spans {
        if s.kind == SpanKind::Client as i32 {
            let parent = by_id.get(&s.parent_span_id).expect("parent exported");
            assert_eq!(parent.kind, SpanKind::Server as i32);
        }
        let dump = format!("{s:?}");
        for secret in [PROMPT, "the whole reply", "streamed reply", "mock reply"] {
            assert!(!dump.contains(secret), "span carries content: {dump}");
        }
    }
}

#[tokio::test]
async fn spans_are_exported_over_otlp_grpc() {
    spans_are_exported(true).await;
}

#[tokio::test]
async fn spans_are_exported_over_otlp_http() {
    spans_are_exported(false).await;
}

/// Off by default: no traceparent is invented for the upstream.
#[tokio::test]
async fn tracing_is_off_by_default() {
    let up = Upstream::default();
    let base = recording_upstream(up.clone()).await;
    let llm = mock(Default::default()).await;
    let f = start(config(vec![forwarder::config::UpstreamConfig {
        base_url: Some(base),
        ..upstream("primary", &llm, "chat-model")
    }]))
    .await;
    let r = f
        .post("/v1/chat/completions", &chat("chat-model", "hi"), &[])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(up.traceparents.lock().is_empty());
}

/// An async job's run is a span of its own (its own trace), linked to the
/// span of the request that submitted it.
#[tokio::test]
async fn a_jobs_run_span_links_to_its_submission() {
    let received = Received::default();
    let endpoint = receiver(true, received.clone()).await;
    let mut cfg = forwarder::config::Config::default();
    cfg.server.listen = loopback();
    cfg.async_jobs.enabled = true;
    cfg.tracing.enabled = true;
    cfg.tracing.endpoint = Some(endpoint);
    cfg.tracing.protocol = Some("grpc".into());
    let f = start(cfg).await;
    let r = f
        .post(
            "/v1/async/embeddings",
            &json!({"model": "mock", "input": PROMPT}),
            &[],
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
    let job = wait_job(&f, r.body["id"].as_str().unwrap(), &[]).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    f.server.pipeline.flush_traces().await;
    let mut spans = Vec::new();
    for _ in 0..100 {
        spans = received.spans();
        if spans.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let server = |status: i64| {
        spans
            .iter()
            .find(|s| {
                s.kind == SpanKind::Server as i32 && int(s, "forwarder.status") == Some(status)
            })
            .unwrap_or_else(|| panic!("no span with status {status}: {spans:#?}"))
    };
    let (submitted, run) = (server(202), server(200));
    assert_eq!(
        string(submitted, "gen_ai.operation.name").as_deref(),
        Some("embeddings")
    );
    assert_eq!(
        string(run, "gen_ai.operation.name").as_deref(),
        Some("embeddings")
    );
    assert_ne!(
        run.trace_id, submitted.trace_id,
        "the run is a trace of its own"
    );
    assert_eq!(run.links.len(), 1, "{run:#?}");
    assert_eq!(run.links[0].trace_id, submitted.trace_id);
    assert_eq!(run.links[0].span_id, submitted.span_id);
}

/// A WebSocket session's requests continue the client's trace: the
/// upgrade's `traceparent` is the parent of each request that names none,
/// and a request's own `traceparent` field wins (and is not sent upstream
/// as a body parameter).
#[tokio::test]
async fn websocket_requests_continue_the_clients_trace() {
    let received = Received::default();
    let endpoint = receiver(true, received.clone()).await;
    let up = Upstream::default();
    let base = recording_upstream(up.clone()).await;
    let llm = mock(Default::default()).await;
    let mut cfg = config(vec![forwarder::config::UpstreamConfig {
        base_url: Some(base),
        ..upstream("primary", &llm, "chat-model")
    }]);
    cfg.tracing.enabled = true;
    cfg.tracing.endpoint = Some(endpoint);
    cfg.tracing.protocol = Some("grpc".into());
    let f = start(cfg).await;

    let session_trace = "11111111111111111111111111111111";
    let session_span = "2222222222222222";
    let own_trace = "33333333333333333333333333333333";
    let own_span = "4444444444444444";
    let upgrade = format!("00-{session_trace}-{session_span}-01");
    let mut ws = ws_connect(&f.ws, &[("traceparent", &upgrade)])
        .await
        .unwrap();
    ws_send(
        &mut ws,
        json!({"type": "request", "id": "a", "model": "chat-model", "prompt": "hi"}),
    )
    .await;
    let done = ws_recv(&mut ws).await;
    assert_eq!(done["type"], "done", "{done}");
    ws_send(
        &mut ws,
        json!({"type": "request", "id": "b", "model": "chat-model", "prompt": "hi",
               "traceparent": format!("00-{own_trace}-{own_span}-01")}),
    )
    .await;
    let done = ws_recv(&mut ws).await;
    assert_eq!(done["type"], "done", "{done}");

    f.server.pipeline.flush_traces().await;
    let mut spans = Vec::new();
    for _ in 0..50 {
        spans = received.spans();
        if spans.len() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let servers: Vec<&Span> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Server as i32)
        .collect();
    assert_eq!(servers.len(), 2, "{spans:#?}");
    let in_trace = |trace: &str, parent: &str| {
        servers
            .iter()
            .any(|s| hex(&s.trace_id) == trace && hex(&s.parent_span_id) == parent)
    };
    assert!(in_trace(session_trace, session_span), "{servers:#?}");
    assert!(in_trace(own_trace, own_span), "{servers:#?}");
    // The upstream saw each request's trace, and no `traceparent` field in
    // a body.
    let seen = up.traceparents.lock().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen.iter().any(|t| t.contains(session_trace)), "{seen:?}");
    assert!(seen.iter().any(|t| t.contains(own_trace)), "{seen:?}");
    assert!(
        up.bodies
            .lock()
            .iter()
            .all(|b| b.get("traceparent").is_none()),
        "a traceparent reached a body"
    );
}

/// A batch's lines run as spans of their own, each linked to the span
/// named by the `traceparent` the batch's creation request carried.
#[tokio::test]
async fn batch_lines_link_to_the_request_that_created_the_batch() {
    use crate::batch::{jsonl, line, upload};
    let received = Received::default();
    let endpoint = receiver(true, received.clone()).await;
    let mut cfg = forwarder::config::Config::default();
    cfg.server.listen = loopback();
    cfg.async_jobs.enabled = true;
    cfg.tracing.enabled = true;
    cfg.tracing.endpoint = Some(endpoint);
    cfg.tracing.protocol = Some("grpc".into());
    let f = start(cfg).await;
    let who = ("authorization", "Bearer anything");
    let up = upload(
        &f,
        &jsonl(&[line("a", "one"), line("b", "two")]),
        "batch",
        who,
    )
    .await;
    assert_eq!(up.status, 200, "{}", up.text);
    let client_trace = "55555555555555555555555555555555";
    let client_span = "6666666666666666";
    let req = json!({"input_file_id": up.body["id"], "endpoint": "/v1/chat/completions",
                     "completion_window": "24h"});
    let b = f
        .post(
            "/v1/batches",
            &req,
            &[
                who,
                (
                    "traceparent",
                    &format!("00-{client_trace}-{client_span}-01"),
                ),
            ],
        )
        .await;
    assert_eq!(b.status, 200, "{}", b.text);
    let id = b.body["id"].as_str().unwrap().to_string();
    let mut status = serde_json::Value::Null;
    for _ in 0..400 {
        status = f.get(&format!("/v1/batches/{id}"), &[who]).await.body;
        if status["status"] == "completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(status["status"], "completed", "{status}");
    f.server.pipeline.flush_traces().await;
    let mut runs = Vec::new();
    for _ in 0..50 {
        runs = received
            .spans()
            .into_iter()
            .filter(|s| {
                s.kind == SpanKind::Server as i32 && int(s, "forwarder.status") == Some(200)
            })
            .collect();
        if runs.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(runs.len(), 2, "{runs:#?}");
    for run in &runs {
        assert_ne!(
            hex(&run.trace_id),
            client_trace,
            "a run is a trace of its own"
        );
        assert_eq!(run.links.len(), 1, "{run:#?}");
        assert_eq!(hex(&run.links[0].trace_id), client_trace);
        assert_eq!(hex(&run.links[0].span_id), client_span);
    }
}

/// An OTLP `http/protobuf` receiver behind TLS with this certificate.
async fn tls_receiver(received: Received, cert: &str, key: &str) -> String {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tower::ServiceExt;
    forwarder::install_crypto_provider();
    let certs = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    async fn traces(State(r): State<Received>, body: Bytes) -> impl IntoResponse {
        r.take(ExportTraceServiceRequest::decode(body).unwrap());
        (
            [("content-type", "application/x-protobuf")],
            ExportTraceServiceResponse {
                partial_success: None,
            }
            .encode_to_vec(),
        )
    }
    let app = axum::Router::new()
        .route("/v1/traces", axum::routing::post(traces))
        .with_state(received);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        app.clone().oneshot(req.map(axum::body::Body::new))
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                .await;
            });
        }
    });
    format!("https://127.0.0.1:{port}")
}

#[tokio::test]
async fn spans_reach_an_https_collector_that_the_configured_ca_vouches_for() {
    let dir = tempfile::tempdir().unwrap();
    let ca = crate::tls::Ca::new("collector CA");
    let (cert, key) = ca.leaf("collector", &["localhost", "127.0.0.1"]);
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let run = |tls: Option<forwarder::config::CollectorTlsConfig>| {
        let (cert, key) = (cert.clone(), key.clone());
        async move {
            let received = Received::default();
            let endpoint = tls_receiver(received.clone(), &cert, &key).await;
            let mut cfg = config(vec![forwarder::config::UpstreamConfig::builtin_mock()]);
            cfg.tracing.enabled = true;
            cfg.tracing.endpoint = Some(endpoint);
            cfg.tracing.protocol = Some("http/protobuf".into());
            cfg.tracing.tls = tls;
            let f = start(cfg).await;
            let r = f
                .post("/v1/chat/completions", &chat("mock", "hi"), &[])
                .await;
            assert_eq!(r.status, 200, "{}", r.text);
            f.server.shutdown().await;
            for _ in 0..30 {
                if !received.spans().is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            received.spans().len()
        }
    };
    let trusted = forwarder::config::CollectorTlsConfig {
        ca_file: Some(ca_file.clone()),
        ..Default::default()
    };
    assert!(run(Some(trusted)).await > 0, "spans over TLS");
    // The system roots do not know this CA: nothing is exported, and the
    // requests are served all the same.
    assert_eq!(run(None).await, 0, "an unverified collector gets nothing");
    // A name the certificate does not carry fails too.
    let elsewhere = forwarder::config::CollectorTlsConfig {
        ca_file: Some(ca_file.clone()),
        server_name: Some("elsewhere.test".into()),
        ..Default::default()
    };
    assert_eq!(run(Some(elsewhere)).await, 0, "the server name is checked");

    // TLS to a gRPC collector is not built: refused at start.
    let mut cfg = config(vec![forwarder::config::UpstreamConfig::builtin_mock()]);
    cfg.tracing.enabled = true;
    cfg.tracing.endpoint = Some("https://127.0.0.1:4317".into());
    cfg.tracing.protocol = Some("grpc".into());
    let refused = forwarder::server::Server::start(cfg)
        .await
        .err()
        .expect("refused");
    assert!(refused.to_string().contains("http/protobuf"), "{refused}");
}
