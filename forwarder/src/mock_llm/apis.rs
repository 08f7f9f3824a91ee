//! The mock's answers on the APIs beside chat completions: embeddings
//! (deterministic vectors derived from the input), the Responses API and
//! Anthropic Messages (whole, or streamed with each API's own event types)
//! and Messages' count_tokens. The built-in `mock` provider and the
//! standalone `forwarder mock-llm` server both answer through here, so
//! they say the same bytes.
//!
//! The reply is the chat mock's: "mock reply:", the last user text, then
//! `reply_words` of filler, cut to the request's token limit. A Messages
//! request that offers `tools` (and whose last message is not a tool
//! result) is answered with a call of its first tool, input
//! `{"prompt": <the last user text>}`.

use base64::Engine;
use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::model::{MockModel, ReplyWords};
use super::Fault;
use crate::api::unix_now;
use crate::pipeline::{ApiKind, Family};
use crate::sse;

/// The mock's answer: a body, or whole SSE events.
pub enum MockAnswer {
    Complete(Bytes),
    Events(BoxStream<'static, Bytes>),
}

/// A request the mock refuses: status and a body in the API's error shape.
#[derive(Debug, Clone)]
pub struct Rejection {
    pub status: u16,
    pub body: Bytes,
}

/// An error body in `family`'s shape.
pub fn error_body(family: Family, status: u16, message: &str) -> Bytes {
    let v = match family {
        Family::OpenAi => json!({"error": {
            "message": message,
            "type": if status >= 500 { "server_error" } else { "invalid_request_error" },
            "param": null,
            "code": null,
        }}),
        Family::Anthropic => json!({"type": "error", "error": {
            "type": anthropic_error_type(status),
            "message": message,
        }}),
    };
    v.to_string().into()
}

/// Anthropic's error `type` for an HTTP status.
pub fn anthropic_error_type(status: u16) -> &'static str {
    match status {
        400 | 405 | 409 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        504 => "timeout_error",
        _ => "api_error",
    }
}

fn reject(family: Family, message: &str) -> Rejection {
    Rejection {
        status: 400,
        body: error_body(family, 400, message),
    }
}

/// The text of a content value: a string, or the `text` of its parts
/// (Messages `text` blocks, Responses `input_text` parts), joined; a
/// Messages `tool_result` block counts with its own content's text.
fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match p.get("type").and_then(Value::as_str) {
                Some("tool_result") => p.get("content").map(text_of).unwrap_or_default(),
                _ => p
                    .get("text")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            })
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

fn words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// The last user message's text, every message's word count, and whether
/// the last message carries a tool result.
fn conversation(messages: &[Value]) -> (String, u64, bool) {
    let prompt = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .and_then(|m| m.get("content"))
        .map(text_of)
        .unwrap_or_default();
    let tokens = messages
        .iter()
        .map(|m| words(&m.get("content").map(text_of).unwrap_or_default()))
        .sum();
    let tool_result = messages
        .last()
        .and_then(|m| m.get("content"))
        .and_then(Value::as_array)
        .is_some_and(|parts| {
            parts
                .iter()
                .any(|p| p.get("type").and_then(Value::as_str) == Some("tool_result"))
        });
    (prompt, tokens, tool_result)
}

impl MockModel {
    /// Answers a request of `api` (not chat completions, which the chat
    /// mock answers). `fault` is a mid-stream fault ([`Fault::Cut`],
    /// [`Fault::StreamError`]) applied to a streamed answer.
    pub fn answer(
        &self,
        api: ApiKind,
        body: &[u8],
        fault: Option<Fault>,
    ) -> Result<MockAnswer, Rejection> {
        let family = api.family();
        let req: Value = serde_json::from_slice(body)
            .map_err(|e| reject(family, &format!("invalid JSON body: {e}")))?;
        if !req.is_object() {
            return Err(reject(family, "the body must be a JSON object"));
        }
        let model = req
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
        let events = match api {
            ApiKind::Embeddings => return embeddings(&req, &model).map(MockAnswer::Complete),
            ApiKind::CountTokens => {
                let messages = messages_of(&req, family)?;
                let (_, tokens, _) = conversation(messages);
                let system = req.get("system").map(text_of).unwrap_or_default();
                let n = tokens + words(&system);
                return Ok(MockAnswer::Complete(
                    json!({"input_tokens": n}).to_string().into(),
                ));
            }
            ApiKind::Messages => {
                let messages = messages_of(&req, family)?;
                let max = req.get("max_tokens").and_then(Value::as_u64);
                if max.is_none() {
                    return Err(reject(family, "max_tokens: field required"));
                }
                let (prompt, input_tokens, tool_result) = conversation(messages);
                let tool = (!tool_result)
                    .then(|| {
                        req.get("tools")?
                            .as_array()?
                            .first()?
                            .get("name")?
                            .as_str()
                            .map(str::to_string)
                    })
                    .flatten();
                let m = Message {
                    id: self.id_with("msg_mock"),
                    model,
                    input_tokens,
                    words: self.words_for(&prompt, max),
                    tool: tool.map(|name| (self.id_with("toolu_mock"), name, prompt)),
                };
                if !stream {
                    return Ok(MockAnswer::Complete(m.whole().to_string().into()));
                }
                m.events()
            }
            ApiKind::Responses => {
                let input = req.get("input").cloned().unwrap_or(Value::Null);
                let (prompt, input_tokens) = match &input {
                    Value::String(s) => (s.clone(), words(s)),
                    Value::Array(items) => {
                        let (p, n, _) = conversation(items);
                        (p, n)
                    }
                    _ => (String::new(), 0),
                };
                let max = req.get("max_output_tokens").and_then(Value::as_u64);
                let r = Response {
                    id: self.response_id(),
                    item_id: self.id_with("msg_mock"),
                    model,
                    created: unix_now(),
                    input_tokens,
                    words: self.words_for(&prompt, max),
                };
                if !stream {
                    return Ok(MockAnswer::Complete(r.whole().to_string().into()));
                }
                r.events()
            }
            ApiKind::ChatCompletions => {
                return Err(reject(family, "the chat mock answers chat completions"))
            }
        };
        let pace = self.pace();
        let events = paced(events, pace);
        Ok(MockAnswer::Events(with_fault(events, api, fault)))
    }
}

/// The `messages` of a Messages or count_tokens request: a non-empty
/// array of `{role: user|assistant, content}`.
fn messages_of(req: &Value, family: Family) -> Result<&[Value], Rejection> {
    let messages = match req.get("messages").and_then(Value::as_array) {
        Some(m) if !m.is_empty() => m,
        _ => return Err(reject(family, "messages: a non-empty array is required")),
    };
    for (i, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str);
        if !matches!(role, Some("user" | "assistant")) {
            return Err(reject(
                family,
                &format!("messages.{i}.role: user or assistant"),
            ));
        }
        if !m
            .get("content")
            .is_some_and(|c| c.is_string() || c.is_array())
        {
            return Err(reject(
                family,
                &format!("messages.{i}.content: field required"),
            ));
        }
    }
    Ok(messages)
}

/// Events produced one at a time (a huge reply costs no memory up front).
type Lazy = Box<dyn FnMut(usize) -> Option<Bytes> + Send>;

fn paced(mut next: Lazy, pace: Option<std::time::Duration>) -> BoxStream<'static, Bytes> {
    stream::iter(0..)
        .map(move |i| (i, next(i)))
        .take_while(|(_, e)| futures::future::ready(e.is_some()))
        .then(move |(i, e)| async move {
            if let (Some(p), true) = (pace, i > 1) {
                tokio::time::sleep(p).await;
            }
            e.unwrap_or_default()
        })
        .boxed()
}

/// Applies a mid-stream fault: after two events, end (`Cut`) or send the
/// API's error event and end (`StreamError`).
pub fn with_fault(
    events: BoxStream<'static, Bytes>,
    api: ApiKind,
    fault: Option<Fault>,
) -> BoxStream<'static, Bytes> {
    match fault {
        Some(Fault::Cut) => events.take(2).boxed(),
        Some(Fault::StreamError) => events
            .take(2)
            .chain(stream::once(async move { stream_error_event(api) }))
            .boxed(),
        _ => events,
    }
}

/// The error event an upstream of `api` sends when it fails mid-stream.
pub fn stream_error_event(api: ApiKind) -> Bytes {
    match api {
        ApiKind::Messages => sse::named_event(
            "error",
            br#"{"type":"error","error":{"type":"overloaded_error","message":"injected mock error"}}"#,
        ),
        ApiKind::Responses => sse::named_event(
            "error",
            br#"{"type":"error","code":"server_error","message":"injected mock error","param":null,"sequence_number":2}"#,
        ),
        _ => sse::data_event(
            br#"{"error":{"message":"injected mock error","type":"server_error","param":null,"code":"injected_fault"}}"#,
        ),
    }
}

/// Embeddings: one unit vector per input, derived from the input alone
/// (SHA-256 in counter mode), `dimensions` long (default 16); base64 of
/// little-endian f32 when `encoding_format` is `base64`.
fn embeddings(req: &Value, model: &str) -> Result<Bytes, Rejection> {
    let bad = |m: &str| reject(Family::OpenAi, m);
    let inputs: Vec<Value> = match req.get("input") {
        Some(Value::String(s)) => vec![Value::String(s.clone())],
        Some(Value::Array(a)) if a.is_empty() => return Err(bad("input must not be empty")),
        // A list of token ids is one input.
        Some(Value::Array(a)) if a.iter().all(Value::is_number) => vec![Value::Array(a.clone())],
        Some(Value::Array(a)) if a.iter().all(|x| x.is_string() || x.is_array()) => a.clone(),
        _ => {
            return Err(bad(
                "input must be a string, an array of strings or of token arrays",
            ))
        }
    };
    let dims = match req.get("dimensions") {
        None | Some(Value::Null) => 16,
        Some(d) => match d.as_u64() {
            Some(n @ 1..=4096) => n as usize,
            _ => return Err(bad("dimensions must be an integer from 1 to 4096")),
        },
    };
    let base64 = match req.get("encoding_format").and_then(Value::as_str) {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => return Err(bad(&format!("unknown encoding_format {other:?}"))),
    };
    let mut tokens = 0;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            tokens += match input {
                Value::String(s) => words(s),
                Value::Array(a) => a.len() as u64,
                _ => 0,
            };
            let v = vector(input.to_string().as_bytes(), dims);
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    Ok(json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })
    .to_string()
    .into())
}

/// A unit vector of `dims` derived from `seed` alone.
pub fn vector(seed: &[u8], dims: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(dims);
    let mut counter = 0u32;
    while out.len() < dims {
        let block = Sha256::new()
            .chain_update(seed)
            .chain_update(counter.to_le_bytes())
            .finalize();
        counter += 1;
        for pair in block.chunks_exact(2) {
            if out.len() == dims {
                break;
            }
            let n = u16::from_le_bytes([pair[0], pair[1]]);
            out.push(f32::from(n) / 32767.5 - 1.0);
        }
    }
    let norm = out.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        for x in &mut out {
            *x /= norm;
        }
    }
    out
}

/// An Anthropic Messages answer.
struct Message {
    id: String,
    model: String,
    input_tokens: u64,
    words: ReplyWords,
    /// A tool call: (id, tool name, the prompt given as its input).
    tool: Option<(String, String, String)>,
}

impl Message {
    fn stop_reason(&self) -> &'static str {
        if self.tool.is_some() {
            "tool_use"
        } else if self.words.truncated {
            "max_tokens"
        } else {
            "end_turn"
        }
    }

    fn output_tokens(&self) -> u64 {
        match &self.tool {
            Some((_, _, prompt)) => words(prompt) + 1,
            None => self.words.total as u64,
        }
    }

    fn tool_input(&self) -> String {
        let prompt = self.tool.as_ref().map_or("", |t| t.2.as_str());
        json!({"prompt": prompt}).to_string()
    }

    fn whole(&self) -> Value {
        let content = match &self.tool {
            Some((id, name, prompt)) => json!([{
                "type": "tool_use", "id": id, "name": name, "input": {"prompt": prompt},
            }]),
            None => json!([{"type": "text", "text": self.words.text()}]),
        };
        json!({
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": self.stop_reason(),
            "stop_sequence": null,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens()},
        })
    }

    /// message_start, content_block_start, ping, the deltas,
    /// content_block_stop, message_delta, message_stop.
    fn events(self) -> Lazy {
        let ev = |name: &str, v: Value| sse::named_event(name, v.to_string().as_bytes());
        let start = ev(
            "message_start",
            json!({"type": "message_start", "message": {
                "id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": self.input_tokens, "output_tokens": 1},
            }}),
        );
        let block = match &self.tool {
            Some((id, name, _)) => {
                json!({"type": "tool_use", "id": id, "name": name, "input": {}})
            }
            None => json!({"type": "text", "text": ""}),
        };
        let head = [
            start,
            ev(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": block}),
            ),
            ev("ping", json!({"type": "ping"})),
        ];
        let tail = [
            ev(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ),
            ev(
                "message_delta",
                json!({"type": "message_delta",
                    "delta": {"stop_reason": self.stop_reason(), "stop_sequence": null},
                    "usage": {"output_tokens": self.output_tokens()}}),
            ),
            ev("message_stop", json!({"type": "message_stop"})),
        ];
        // A tool call's input streams as two JSON fragments.
        let input = self.tool.is_some().then(|| self.tool_input());
        let deltas = match &input {
            Some(_) => 2,
            None => self.words.total,
        };
        let words = self.words;
        Box::new(move |i| {
            if i < head.len() {
                return Some(head[i].clone());
            }
            let d = i - head.len();
            if d < deltas {
                let delta = match &input {
                    Some(json) => {
                        let mut mid = json.len() / 2;
                        while !json.is_char_boundary(mid) {
                            mid -= 1;
                        }
                        let part = if d == 0 { &json[..mid] } else { &json[mid..] };
                        json!({"type": "input_json_delta", "partial_json": part})
                    }
                    None => json!({"type": "text_delta", "text": words.token(d)}),
                };
                return Some(ev(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0, "delta": delta}),
                ));
            }
            tail.get(d - deltas).cloned()
        })
    }
}

/// An OpenAI Responses answer.
struct Response {
    id: String,
    item_id: String,
    model: String,
    created: u64,
    input_tokens: u64,
    words: ReplyWords,
}

impl Response {
    fn item(&self, text: Option<&str>) -> Value {
        let content = match text {
            Some(t) => json!([{"type": "output_text", "text": t, "annotations": []}]),
            None => json!([]),
        };
        json!({
            "id": self.item_id, "type": "message", "role": "assistant",
            "status": if text.is_some() { "completed" } else { "in_progress" },
            "content": content,
        })
    }

    /// The response object; `text` is `None` while in progress.
    fn object(&self, text: Option<&str>) -> Value {
        let done = text.is_some();
        let output_tokens = self.words.total as u64;
        let status = match (done, self.words.truncated) {
            (false, _) => "in_progress",
            (true, false) => "completed",
            (true, true) => "incomplete",
        };
        json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": null,
            "incomplete_details": if done && self.words.truncated {
                json!({"reason": "max_output_tokens"})
            } else {
                Value::Null
            },
            "instructions": null,
            "model": self.model,
            "output": if done { json!([self.item(text)]) } else { json!([]) },
            "parallel_tool_calls": true,
            "tool_choice": "auto",
            "tools": [],
            "temperature": 1.0,
            "top_p": 1.0,
            "metadata": {},
            "usage": if done {
                json!({
                    "input_tokens": self.input_tokens,
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": output_tokens,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": self.input_tokens + output_tokens,
                })
            } else {
                Value::Null
            },
        })
    }

    fn whole(&self) -> Value {
        self.object(Some(&self.words.text()))
    }

    /// response.created, .in_progress, .output_item.added,
    /// .content_part.added, the .output_text.delta events,
    /// .output_text.done, .content_part.done, .output_item.done, and
    /// .completed (or .incomplete when cut by `max_output_tokens`); each
    /// with its `sequence_number`.
    fn events(self) -> Lazy {
        let ev = move |name: &str, seq: usize, mut v: Value| {
            v["type"] = json!(name);
            v["sequence_number"] = json!(seq);
            sse::named_event(name, v.to_string().as_bytes())
        };
        let text = self.words.text();
        let part = |t: &str| json!({"type": "output_text", "text": t, "annotations": []});
        let at = json!({"item_id": self.item_id, "output_index": 0, "content_index": 0});
        let with = move |extra: Value| {
            let mut v = at.clone();
            if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
                o.extend(e.clone());
            }
            v
        };
        let head = [
            ev(
                "response.created",
                0,
                json!({"response": self.object(None)}),
            ),
            ev(
                "response.in_progress",
                1,
                json!({"response": self.object(None)}),
            ),
            ev(
                "response.output_item.added",
                2,
                json!({"output_index": 0, "item": self.item(None)}),
            ),
            ev(
                "response.content_part.added",
                3,
                with(json!({"part": part("")})),
            ),
        ];
        let n = self.words.total;
        let last = if self.words.truncated {
            "response.incomplete"
        } else {
            "response.completed"
        };
        let tail = [
            ev(
                "response.output_text.done",
                4 + n,
                with(json!({"text": text, "logprobs": []})),
            ),
            ev(
                "response.content_part.done",
                5 + n,
                with(json!({"part": part(&text)})),
            ),
            ev(
                "response.output_item.done",
                6 + n,
                json!({"output_index": 0, "item": self.item(Some(&text))}),
            ),
            ev(last, 7 + n, json!({"response": self.object(Some(&text))})),
        ];
        let words = self.words;
        Box::new(move |i| {
            if i < head.len() {
                return Some(head[i].clone());
            }
            let d = i - head.len();
            if d < n {
                return Some(ev(
                    "response.output_text.delta",
                    i,
                    with(json!({"delta": words.token(d), "logprobs": []})),
                ));
            }
            tail.get(d - n).cloned()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use forwarder_config::MockSettings;

    fn model() -> MockModel {
        MockModel::new(MockSettings::default())
    }

    async fn events(api: ApiKind, body: Value, fault: Option<Fault>) -> Vec<(String, Value)> {
        let MockAnswer::Events(s) = model()
            .answer(api, body.to_string().as_bytes(), fault)
            .unwrap()
        else {
            panic!("expected events");
        };
        s.map(|e| {
            let name = std::str::from_utf8(sse::event_type(&e).unwrap())
                .unwrap()
                .to_string();
            let data: Value = serde_json::from_slice(&sse::data(&e).unwrap()).unwrap();
            (name, data)
        })
        .collect()
        .await
    }

    fn complete(api: ApiKind, body: Value) -> Value {
        match model().answer(api, body.to_string().as_bytes(), None) {
            Ok(MockAnswer::Complete(b)) => serde_json::from_slice(&b).unwrap(),
            _ => panic!("expected a body"),
        }
    }

    #[test]
    fn embeddings_depend_on_the_input_only_and_are_unit_vectors() {
        let a = complete(
            ApiKind::Embeddings,
            json!({"model": "e", "input": ["x y", "z"]}),
        );
        let b = complete(ApiKind::Embeddings, json!({"model": "e", "input": "x y"}));
        assert_eq!(a["data"][0]["embedding"], b["data"][0]["embedding"]);
        assert_ne!(a["data"][0]["embedding"], a["data"][1]["embedding"]);
        assert_eq!(a["usage"]["prompt_tokens"], 3);
        let v: Vec<f64> = serde_json::from_value(a["data"][1]["embedding"].clone()).unwrap();
        assert_eq!(v.len(), 16);
        let norm: f64 = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{norm}");
        let c = complete(
            ApiKind::Embeddings,
            json!({"model": "e", "input": "x y", "dimensions": 4, "encoding_format": "base64"}),
        );
        let raw = base64::engine::general_purpose::STANDARD
            .decode(c["data"][0]["embedding"].as_str().unwrap())
            .unwrap();
        assert_eq!(raw.len(), 16);
        let first = f32::from_le_bytes(raw[..4].try_into().unwrap());
        assert!((-1.0..=1.0).contains(&first));
        assert!(model()
            .answer(ApiKind::Embeddings, br#"{"model":"e","input":[]}"#, None)
            .is_err());
    }

    #[tokio::test]
    async fn a_streamed_message_is_the_whole_one_in_anthropic_events() {
        let req = json!({"model": "c", "max_tokens": 100, "stream": true,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi there"}]}]});
        let ev = events(ApiKind::Messages, req.clone(), None).await;
        let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names[..3], ["message_start", "content_block_start", "ping"]);
        assert_eq!(
            names[names.len() - 3..],
            ["content_block_stop", "message_delta", "message_stop"]
        );
        let text: String = ev
            .iter()
            .filter(|(n, _)| n == "content_block_delta")
            .map(|(_, d)| d["delta"]["text"].as_str().unwrap().to_string())
            .collect();
        let mut unstreamed = req;
        unstreamed["stream"] = json!(false);
        let whole = complete(ApiKind::Messages, unstreamed);
        assert_eq!(text, whole["content"][0]["text"]);
        assert_eq!(text, "mock reply: hi there");
        assert_eq!(whole["stop_reason"], "end_turn");
        for (n, d) in &ev {
            assert_eq!(d["type"], n.as_str());
        }
    }

    #[tokio::test]
    async fn offered_tools_are_called_and_a_tool_result_is_answered() {
        let req = json!({"model": "c", "max_tokens": 100,
            "tools": [{"name": "lookup", "input_schema": {"type": "object"}}],
            "messages": [{"role": "user", "content": "find x"}]});
        // A prompt of multi-byte characters splits on a character boundary.
        let mut wide = req.clone();
        wide["stream"] = json!(true);
        wide["messages"][0]["content"] = json!("éééééé");
        let parts: String = events(ApiKind::Messages, wide, None)
            .await
            .iter()
            .filter_map(|(_, d)| d["delta"]["partial_json"].as_str().map(str::to_string))
            .collect();
        assert_eq!(parts, r#"{"prompt":"éééééé"}"#);
        let whole = complete(ApiKind::Messages, req.clone());
        assert_eq!(whole["stop_reason"], "tool_use");
        assert_eq!(whole["content"][0]["name"], "lookup");
        assert_eq!(whole["content"][0]["input"], json!({"prompt": "find x"}));
        let mut streamed = req.clone();
        streamed["stream"] = json!(true);
        let json: String = events(ApiKind::Messages, streamed, None)
            .await
            .iter()
            .filter_map(|(_, d)| d["delta"]["partial_json"].as_str().map(str::to_string))
            .collect();
        assert_eq!(
            serde_json::from_str::<Value>(&json).unwrap(),
            json!({"prompt": "find x"})
        );
        let mut answered = req;
        answered["messages"] = json!([
            {"role": "user", "content": "find x"},
            {"role": "assistant", "content": [whole["content"][0].clone()]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "found"}]},
        ]);
        let reply = complete(ApiKind::Messages, answered);
        assert_eq!(reply["content"][0]["text"], "mock reply: found");
    }

    #[tokio::test]
    async fn responses_stream_with_sequence_numbers_to_completed() {
        let req = json!({"model": "r", "input": "a b", "stream": true});
        let ev = events(ApiKind::Responses, req, None).await;
        assert_eq!(ev.first().unwrap().0, "response.created");
        assert_eq!(ev.last().unwrap().0, "response.completed");
        for (i, (_, d)) in ev.iter().enumerate() {
            assert_eq!(d["sequence_number"], i, "{d}");
        }
        let text: String = ev
            .iter()
            .filter(|(n, _)| n == "response.output_text.delta")
            .map(|(_, d)| d["delta"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(text, "mock reply: a b");
        let done = &ev.last().unwrap().1["response"];
        assert_eq!(done["output"][0]["content"][0]["text"], "mock reply: a b");
        assert_eq!(done["usage"]["total_tokens"], 2 + 4);
    }

    #[tokio::test]
    async fn mid_stream_faults_cut_or_end_with_the_apis_error_event() {
        let req = json!({"model": "c", "max_tokens": 9, "stream": true,
            "messages": [{"role": "user", "content": "x"}]});
        let cut = events(ApiKind::Messages, req.clone(), Some(Fault::Cut)).await;
        assert_eq!(cut.len(), 2);
        let err = events(ApiKind::Messages, req, Some(Fault::StreamError)).await;
        assert_eq!(err.last().unwrap().0, "error");
        assert_eq!(err.last().unwrap().1["error"]["type"], "overloaded_error");
    }

    #[test]
    fn count_tokens_and_refusals_are_in_anthropic_shape() {
        let n = complete(
            ApiKind::CountTokens,
            json!({"model": "c", "system": "be brief", "messages": [{"role": "user", "content": "a b c"}]}),
        );
        assert_eq!(n, json!({"input_tokens": 5}));
        let Err(r) = model().answer(
            ApiKind::Messages,
            br#"{"model":"c","messages":[{"role":"user","content":"x"}]}"#,
            None,
        ) else {
            panic!("max_tokens is required");
        };
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!((r.status, v["type"].as_str()), (400, Some("error")));
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
}
