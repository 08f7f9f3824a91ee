//! A hand-written OpenAI-compatible (and Anthropic Messages) upstream whose
//! answers carry every field OpenAI or Anthropic send (and some vendor
//! ones), in odd but valid formatting, so byte-identity is observable. The
//! scenario is chosen by the model name; every request's bytes and headers
//! are recorded (under the model name; the API's path for the APIs beside
//! chat completions, e.g. `messages:full`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use futures::StreamExt;

/// A completion with every field: usage details, logprobs, tool calls,
/// refusal, annotations, service tier, a vendor field, nulls, and spacing
/// a re-encoder would not keep.
pub const FULL_COMPLETION: &str = r#"{"id":"chatcmpl-full","object":"chat.completion","created":1700000000,"model":"full-2025",
 "choices":[{"index":0,"message":{"role":"assistant","content":"Hello \u00e9 there","refusal":null,
   "annotations":[{"type":"url_citation","url_citation":{"url":"https://example.com","title":"Ex","start_index":0,"end_index":5}}],
   "tool_calls":[{"id":"call_1","type":"function","function":{"name":"lookup","arguments":"{\"q\":\"return policy\"}"}}]},
  "logprobs":{"content":[{"token":"Hello","logprob":-0.01,"bytes":[72,101,108,108,111],"top_logprobs":[]}],"refusal":null},
  "finish_reason":"tool_calls"}],
 "usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19,
   "prompt_tokens_details":{"cached_tokens":4,"audio_tokens":0},
   "completion_tokens_details":{"reasoning_tokens":2,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},
 "service_tier":"default","system_fingerprint":null,"x_vendor":{"region":"eu","cost":1.5e-3}}"#;

/// A streamed tool call with logprobs, a keep-alive comment, a usage chunk
/// (`include_usage`) and `[DONE]`.
pub const FULL_STREAM: &[&str] = &[
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"full-2025\",\"service_tier\":\"default\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":null,\"refusal\":null},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
    ": keep-alive\n\n",
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"full-2025\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":\"lookup\",\"arguments\":\"\"}}]},\"finish_reason\":null}],\"usage\":null}\n\n",
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"full-2025\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"q\\\":\\\"x\\\"}\"}}]},\"finish_reason\":null}],\"usage\":null}\n\n",
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"full-2025\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"logprobs\":{\"content\":[{\"token\":\"Hi\",\"logprob\":-0.5,\"bytes\":[72,105],\"top_logprobs\":[]}]},\"finish_reason\":null}],\"usage\":null}\n\n",
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"full-2025\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}],\"usage\":null}\n\n",
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"full-2025\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":3,\"total_tokens\":15,\"prompt_tokens_details\":{\"cached_tokens\":4},\"completion_tokens_details\":{\"reasoning_tokens\":1}}}\n\n",
    "data: [DONE]\n\n",
];

/// An upstream 4xx that clients branch on.
pub const CONTEXT_ERROR: &str = r#"{"error":{"message":"This model's maximum context length is 8192 tokens.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#;

#[derive(Default)]
pub struct Seen {
    /// Calls per model.
    pub calls: HashMap<String, usize>,
    /// The last request's body and headers per model.
    pub last: HashMap<String, (Bytes, HeaderMap)>,
}

pub struct Scripted {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Scripted {
    pub async fn start() -> Self {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let app = Router::new()
            .route("/v1/chat/completions", post(handle))
            .route(
                "/v1/embeddings",
                post(|s, h, b| other(s, h, b, "embeddings")),
            )
            .route("/v1/responses", post(|s, h, b| other(s, h, b, "responses")))
            .route("/v1/messages", post(|s, h, b| other(s, h, b, "messages")))
            .route(
                "/v1/messages/count_tokens",
                post(|s, h, b| other(s, h, b, "count_tokens")),
            )
            .with_state(seen.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { addr, seen, task }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn calls(&self, model: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .calls
            .get(model)
            .copied()
            .unwrap_or(0)
    }

    pub fn last(&self, model: &str) -> (Bytes, HeaderMap) {
        self.seen.lock().unwrap().last[model].clone()
    }
}

fn headers() -> [(&'static str, &'static str); 5] {
    [
        ("x-ratelimit-remaining-requests", "99"),
        ("x-ratelimit-reset-tokens", "6ms"),
        ("openai-processing-ms", "12"),
        ("openai-model", "full-2025"),
        ("x-internal-secret", "not-for-clients"),
    ]
}

/// Events sent after the given pauses.
fn events(script: Vec<(Duration, String)>) -> Response {
    let body = futures::stream::iter(script).then(|(pause, event)| async move {
        tokio::time::sleep(pause).await;
        Ok::<_, std::convert::Infallible>(Bytes::from(event))
    });
    let mut resp = (
        [("content-type", "text/event-stream")],
        Body::from_stream(body),
    )
        .into_response();
    for (k, v) in headers() {
        resp.headers_mut().insert(k, v.parse().unwrap());
    }
    resp
}

fn now(events: &[&str]) -> Vec<(Duration, String)> {
    events
        .iter()
        .map(|e| (Duration::ZERO, e.to_string()))
        .collect()
}

async fn handle(State(seen): State<Arc<Mutex<Seen>>>, h: HeaderMap, body: Bytes) -> Response {
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let model = v["model"].as_str().unwrap_or_default().to_string();
    let stream = v["stream"].as_bool().unwrap_or(false);
    let call = {
        let mut seen = seen.lock().unwrap();
        seen.last.insert(model.clone(), (body.clone(), h));
        let n = seen.calls.entry(model.clone()).or_default();
        *n += 1;
        *n
    };
    match (model.as_str(), stream) {
        ("full", false) => {
            let mut resp =
                ([("content-type", "application/json")], FULL_COMPLETION).into_response();
            for (k, v) in headers() {
                resp.headers_mut().insert(k, v.parse().unwrap());
            }
            resp
        }
        ("full", true) => events(now(FULL_STREAM)),
        ("reject", _) => (
            StatusCode::BAD_REQUEST,
            [("content-type", "application/json")],
            CONTEXT_ERROR,
        )
            .into_response(),
        ("crash", _) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "panic at db.rs:42 password=hunter2",
        )
            .into_response(),
        // A 200 whose body is not a completion: a 502, never retried.
        ("garbage", false) => {
            ([("content-type", "application/json")], "not json at all").into_response()
        }
        // A 200 whose body breaks off (the connection is aborted mid-body).
        // The pause lets the head and the first bytes go out first.
        ("cut", false) => {
            let parts = futures::stream::iter([true, false]).then(|first| async move {
                if first {
                    Ok(Bytes::from_static(b"{\"id\":\"chatcmpl-cut\","))
                } else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Err(std::io::Error::other("reset"))
                }
            });
            (
                [("content-type", "application/json")],
                Body::from_stream(parts),
            )
                .into_response()
        }
        // Ends mid-answer: no finish_reason, no [DONE].
        ("truncated", true) => events(now(&FULL_STREAM[..5])),
        // Finishes without [DONE] (some servers do).
        ("nodone", true) => events(now(&[FULL_STREAM[4], FULL_STREAM[5]])),
        // The first call ends before any event; later ones are whole.
        ("early-once", true) if call == 1 => events(vec![]),
        ("early-once", true) => events(now(FULL_STREAM)),
        // Keep-alives longer in total than the attempt timeout, then the answer.
        ("keepalive", true) => {
            let mut script: Vec<(Duration, String)> = (0..6)
                .map(|_| (Duration::from_millis(100), ": ping\n\n".to_string()))
                .collect();
            script.extend(now(FULL_STREAM));
            events(script)
        }
        _ => (StatusCode::NOT_FOUND, "no such scenario").into_response(),
    }
}

/// Embeddings with a vendor field and odd spacing.
pub const FULL_EMBEDDINGS: &str = r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.125, -2.5e-1 ,1]}],
 "model":"full-emb-3","usage":{"prompt_tokens":2,"total_tokens":2},"x_vendor":{"shard":7}}"#;

/// A Responses API answer with reasoning and a vendor field.
pub const FULL_RESPONSE: &str = r#"{"id":"resp_full","object":"response","created_at":1700000000,"status":"completed","model":"full-2025",
 "output":[{"type":"reasoning","id":"rs_1","summary":[]},{"type":"message","id":"msg_1","status":"completed","role":"assistant","content":[{"type":"output_text","text":"Hello \u00e9","annotations":[]}]}],
 "usage":{"input_tokens":5,"input_tokens_details":{"cached_tokens":2},"output_tokens":3,"output_tokens_details":{"reasoning_tokens":1},"total_tokens":8},"x_vendor":true}"#;

/// A Responses stream, with a keep-alive comment.
pub const RESPONSE_STREAM: &[&str] = &[
    "event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_s\",\"object\":\"response\",\"status\":\"in_progress\",\"output\":[]}}\n\n",
    ": keep-alive\n\n",
    "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":1,\"item_id\":\"m\",\"output_index\":0,\"content_index\":0,\"delta\":\"Hi\"}\n\n",
    "event: response.completed\ndata: {\"type\":\"response.completed\",\"sequence_number\":2,\"response\":{\"id\":\"resp_s\",\"object\":\"response\",\"status\":\"completed\",\"output\":[],\"usage\":{\"input_tokens\":1,\"output_tokens\":1,\"total_tokens\":2}}}\n\n",
];

/// A Messages answer with a tool call, thinking, cache tokens and a vendor
/// field, formatted as no re-encoder would.
pub const FULL_MESSAGE: &str = r#"{"id":"msg_full","type":"message","role":"assistant","model":"claude-full",
 "content":[{"type":"thinking","thinking":"hmm","signature":"sig=="},{"type":"text","text":"Let me look \u00e9"},
  {"type":"tool_use","id":"toolu_1","name":"lookup","input":{"q":"return policy"}}],
 "stop_reason":"tool_use","stop_sequence":null,
 "usage":{"input_tokens":12,"cache_creation_input_tokens":3,"cache_read_input_tokens":40,"output_tokens":7,"service_tier":"standard"},"x_vendor":[1,2]}"#;

/// A streamed tool call with a ping, a vendor event and `message_stop`.
pub const MESSAGE_STREAM: &[&str] = &[
    "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_s\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-full\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":12,\"cache_read_input_tokens\":40,\"output_tokens\":1}}}\n\n",
    "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_1\",\"name\":\"lookup\",\"input\":{}}}\n\n",
    "event: ping\ndata: {\"type\": \"ping\"}\n\n",
    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"q\\\": \"}}\n\n",
    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"\\\"x\\\"}\"}}\n\n",
    "event: vendor_stats\ndata: {\"type\":\"vendor_stats\",\"ms\":5}\n\n",
    "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
    "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":9}}\n\n",
    "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
];

/// An Anthropic 400, as Anthropic words it.
pub const ANTHROPIC_REJECT: &str = r#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 210000 tokens > 200000 maximum"}}"#;

/// The APIs beside chat completions; recorded under `<api>:<model>`. A
/// model `claude-<scenario>` plays `<scenario>`.
async fn other(
    State(seen): State<Arc<Mutex<Seen>>>,
    h: HeaderMap,
    body: Bytes,
    api: &'static str,
) -> Response {
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let model = v["model"].as_str().unwrap_or_default().to_string();
    let stream = v["stream"].as_bool().unwrap_or(false);
    let key = format!("{api}:{model}");
    {
        let mut seen = seen.lock().unwrap();
        seen.last.insert(key.clone(), (body.clone(), h));
        *seen.calls.entry(key).or_default() += 1;
    }
    let json = |body: &'static str| {
        let mut resp = ([("content-type", "application/json")], body).into_response();
        resp.headers_mut().insert(
            "anthropic-ratelimit-requests-remaining",
            "41".parse().unwrap(),
        );
        resp.headers_mut()
            .insert("x-internal-secret", "not-for-clients".parse().unwrap());
        resp
    };
    // `claude-<scenario>`: a forwarder may route Anthropic models apart.
    let scenario = model.strip_prefix("claude-").unwrap_or(&model);
    match (api, scenario, stream) {
        ("embeddings", "full", false) => json(FULL_EMBEDDINGS),
        ("responses", "full", false) => json(FULL_RESPONSE),
        ("responses", "full", true) => events(now(RESPONSE_STREAM)),
        // Ends mid-answer: no response.completed.
        ("responses", "truncated", true) => events(now(&RESPONSE_STREAM[..3])),
        ("messages", "full", false) => json(FULL_MESSAGE),
        ("messages", "full", true) => events(now(MESSAGE_STREAM)),
        // Ends mid-answer: no message_stop.
        ("messages", "truncated", true) => events(now(&MESSAGE_STREAM[..5])),
        ("count_tokens", "full", false) => json(r#"{"input_tokens": 52}"#),
        (_, "reject", _) => (
            StatusCode::BAD_REQUEST,
            [("content-type", "application/json")],
            if api == "messages" || api == "count_tokens" {
                ANTHROPIC_REJECT
            } else {
                CONTEXT_ERROR
            },
        )
            .into_response(),
        _ => (StatusCode::NOT_FOUND, "no such scenario").into_response(),
    }
}
