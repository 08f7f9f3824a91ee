//! The edge translation between Anthropic Messages and OpenAI chat
//! completions, both ways: a Messages request whose model an
//! OpenAI-compatible upstream serves, and a chat-completions request whose
//! model an Anthropic upstream serves. Pure functions: each request, each
//! answer, and each stream (event by event). Fields with no equivalent that would change the
//! answer's meaning are refused, naming the field, never dropped; the
//! table is in docs/anthropic.md.

use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::sse;

/// Why a request cannot be translated: a message for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Untranslatable(pub String);

fn refuse<T>(msg: impl Into<String>) -> Result<T, Untranslatable> {
    Err(Untranslatable(msg.into()))
}

/// Top-level Messages fields that are translated.
const KNOWN: &[&str] = &[
    "model",
    "max_tokens",
    "system",
    "messages",
    "tools",
    "tool_choice",
    "stop_sequences",
    "temperature",
    "top_p",
    "stream",
    "metadata",
];

/// Text of a `system` value or a `tool_result` content: a string, or the
/// text of its `text` blocks (refusing other blocks).
fn text_of(v: &Value, at: &str) -> Result<String, Untranslatable> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut out = Vec::new();
            for (i, b) in blocks.iter().enumerate() {
                match b.get("type").and_then(Value::as_str) {
                    Some("text") => out.push(
                        b.get("text")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_string(),
                    ),
                    other => {
                        return refuse(format!(
                        "{at}[{i}]: a {} block cannot be sent to this model's upstream (only text)",
                        other.unwrap_or("typeless")
                    ))
                    }
                }
            }
            Ok(out.join("\n"))
        }
        Value::Null => Ok(String::new()),
        _ => refuse(format!("{at}: must be a string or an array of blocks")),
    }
}

/// An image block as a chat content part.
fn image_part(b: &Value, at: &str) -> Result<Value, Untranslatable> {
    let src = b.get("source").cloned().unwrap_or(Value::Null);
    let url = match src.get("type").and_then(Value::as_str) {
        Some("base64") => format!(
            "data:{};base64,{}",
            src.get("media_type")
                .and_then(Value::as_str)
                .unwrap_or_default(),
            src.get("data").and_then(Value::as_str).unwrap_or_default()
        ),
        Some("url") => src
            .get("url")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        _ => return refuse(format!("{at}.source: only base64 and url images translate")),
    };
    Ok(json!({"type": "image_url", "image_url": {"url": url}}))
}

/// One Messages message as chat messages (a user turn with tool results
/// becomes `tool` messages, then the rest of the turn).
fn message(m: &Value, i: usize, out: &mut Vec<Value>) -> Result<(), Untranslatable> {
    let at = format!("messages[{i}]");
    let role = m.get("role").and_then(Value::as_str).unwrap_or_default();
    let content = m.get("content").cloned().unwrap_or(Value::Null);
    let blocks = match content {
        Value::String(s) => {
            out.push(json!({"role": role, "content": s}));
            return Ok(());
        }
        Value::Array(blocks) => blocks,
        _ => {
            return refuse(format!(
                "{at}.content: must be a string or an array of blocks"
            ))
        }
    };
    match role {
        "user" => {
            let mut parts = Vec::new();
            for (j, b) in blocks.iter().enumerate() {
                let at = format!("{at}.content[{j}]");
                match b.get("type").and_then(Value::as_str) {
                    Some("text") => parts.push(
                        json!({"type": "text", "text": b.get("text").cloned().unwrap_or_default()}),
                    ),
                    Some("image") => parts.push(image_part(b, &at)?),
                    Some("tool_result") => {
                        if b.get("is_error").and_then(Value::as_bool) == Some(true) {
                            return refuse(format!(
                                "{at}.is_error: a failed tool result has no equivalent upstream"
                            ));
                        }
                        out.push(json!({
                            "role": "tool",
                            "tool_call_id": b.get("tool_use_id").cloned().unwrap_or_default(),
                            "content": text_of(b.get("content").unwrap_or(&Value::Null), &format!("{at}.content"))?,
                        }));
                    }
                    other => {
                        return refuse(format!(
                            "{at}: a {} block has no equivalent upstream",
                            other.unwrap_or("typeless")
                        ))
                    }
                }
            }
            if !parts.is_empty() {
                out.push(json!({"role": "user", "content": parts}));
            }
        }
        "assistant" => {
            let mut text = String::new();
            let mut calls = Vec::new();
            for (j, b) in blocks.iter().enumerate() {
                match b.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        text.push_str(b.get("text").and_then(Value::as_str).unwrap_or_default())
                    }
                    Some("tool_use") => calls.push(json!({
                        "id": b.get("id").cloned().unwrap_or_default(),
                        "type": "function",
                        "function": {
                            "name": b.get("name").cloned().unwrap_or_default(),
                            "arguments": b.get("input").cloned().unwrap_or(json!({})).to_string(),
                        },
                    })),
                    other => {
                        return refuse(format!(
                            "{at}.content[{j}]: a {} block has no equivalent upstream",
                            other.unwrap_or("typeless")
                        ))
                    }
                }
            }
            let mut msg = json!({"role": "assistant", "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { Value::String(text) }});
            if !calls.is_empty() {
                msg["tool_calls"] = Value::Array(calls);
            }
            out.push(msg);
        }
        other => {
            return refuse(format!(
                "{at}.role: {other:?} is neither user nor assistant"
            ))
        }
    }
    Ok(())
}

/// A Messages request as a chat-completions request.
pub fn messages_to_chat(body: &[u8]) -> Result<Vec<u8>, Untranslatable> {
    let Ok(Value::Object(req)) = serde_json::from_slice::<Value>(body) else {
        return refuse("the body must be a JSON object");
    };
    if let Some(k) = req.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return refuse(format!(
            "{k}: has no equivalent on this model's upstream (an OpenAI-compatible one); refused rather than dropped"
        ));
    }
    let mut out = Map::new();
    out.insert(
        "model".into(),
        req.get("model").cloned().unwrap_or_default(),
    );
    let mut messages = Vec::new();
    if let Some(system) = req.get("system") {
        messages.push(json!({"role": "system", "content": text_of(system, "system")?}));
    }
    let Some(Value::Array(turns)) = req.get("messages") else {
        return refuse("messages: must be an array");
    };
    for (i, m) in turns.iter().enumerate() {
        message(m, i, &mut messages)?;
    }
    out.insert("messages".into(), Value::Array(messages));
    if let Some(v) = req.get("max_tokens") {
        out.insert("max_tokens".into(), v.clone());
    }
    for k in ["temperature", "top_p"] {
        if let Some(v) = req.get(k) {
            out.insert(k.into(), v.clone());
        }
    }
    if let Some(v) = req.get("stop_sequences") {
        out.insert("stop".into(), v.clone());
    }
    if let Some(user) = req.get("metadata").and_then(|m| m.get("user_id")) {
        out.insert("user".into(), user.clone());
    }
    if let Some(tools) = req.get("tools") {
        let Value::Array(tools) = tools else {
            return refuse("tools: must be an array");
        };
        let mut fns = Vec::new();
        for (i, t) in tools.iter().enumerate() {
            if !t.get("name").is_some_and(Value::is_string) {
                return refuse(format!("tools[{i}]: must be an object with a \"name\""));
            }
            if t.get("type").is_some_and(|ty| ty != "custom") {
                return refuse(format!(
                    "tools[{i}]: Anthropic's server tools have no equivalent upstream"
                ));
            }
            fns.push(json!({"type": "function", "function": {
                "name": t.get("name").cloned().unwrap_or_default(),
                "description": t.get("description").cloned().unwrap_or_default(),
                "parameters": t.get("input_schema").cloned().unwrap_or(json!({"type": "object"})),
            }}));
        }
        out.insert("tools".into(), Value::Array(fns));
    }
    if let Some(choice) = req.get("tool_choice") {
        let mapped = match choice.get("type").and_then(Value::as_str) {
            Some("auto") => json!("auto"),
            Some("any") => json!("required"),
            Some("none") => json!("none"),
            Some("tool") => {
                json!({"type": "function", "function": {"name": choice.get("name").cloned().unwrap_or_default()}})
            }
            _ => return refuse("tool_choice: unknown type"),
        };
        out.insert("tool_choice".into(), mapped);
        if choice
            .get("disable_parallel_tool_use")
            .and_then(Value::as_bool)
            == Some(true)
        {
            out.insert("parallel_tool_calls".into(), json!(false));
        }
    }
    if req.get("stream").and_then(Value::as_bool) == Some(true) {
        out.insert("stream".into(), json!(true));
        out.insert("stream_options".into(), json!({"include_usage": true}));
    }
    Ok(Value::Object(out).to_string().into_bytes())
}

/// OpenAI's `finish_reason` as Anthropic's `stop_reason`.
pub fn stop_reason(finish: &str) -> &'static str {
    match finish {
        "length" => "max_tokens",
        "tool_calls" | "function_call" => "tool_use",
        "content_filter" => "refusal",
        _ => "end_turn",
    }
}

/// Chat usage as Messages usage: cached prompt tokens are reported apart,
/// as Anthropic does (its `input_tokens` excludes cache reads).
fn usage(u: &Value) -> Value {
    let prompt = u.get("prompt_tokens").and_then(Value::as_u64).unwrap_or(0);
    let cached = u
        .pointer("/prompt_tokens_details/cached_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let output = u
        .get("completion_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    json!({
        "input_tokens": prompt.saturating_sub(cached),
        "cache_read_input_tokens": cached,
        "output_tokens": output,
    })
}

/// A chat completion as a Messages answer.
pub fn chat_to_message(body: &[u8]) -> Option<Vec<u8>> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let choice = v.get("choices")?.get(0)?;
    let msg = choice.get("message")?;
    let mut content = Vec::new();
    if let Some(text) = msg.get("content").and_then(Value::as_str) {
        if !text.is_empty() {
            content.push(json!({"type": "text", "text": text}));
        }
    }
    content.extend(tool_use_blocks(msg));
    let finish = choice
        .get("finish_reason")
        .and_then(Value::as_str)
        .unwrap_or("stop");
    Some(
        json!({
            "id": v.get("id").cloned().unwrap_or_default(),
            "type": "message",
            "role": "assistant",
            "model": v.get("model").cloned().unwrap_or_default(),
            "content": content,
            "stop_reason": stop_reason(finish),
            "stop_sequence": null,
            "usage": usage(v.get("usage").unwrap_or(&Value::Null)),
        })
        .to_string()
        .into_bytes(),
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Text,
    /// A tool call, by its index in the chunks' `tool_calls`.
    Tool(u64),
}

/// Chat chunks in, Anthropic's events out.
#[derive(Default)]
pub struct StreamTranslator {
    started: bool,
    /// The open content block and its index.
    open: Option<(usize, Block)>,
    next_index: usize,
    stop_reason: Option<&'static str>,
    usage: Option<Value>,
    ended: bool,
}

fn event(name: &str, v: Value) -> Bytes {
    sse::named_event(name, v.to_string().as_bytes())
}

impl StreamTranslator {
    fn close(&mut self, out: &mut Vec<Bytes>) {
        if let Some((index, _)) = self.open.take() {
            out.push(event(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": index}),
            ));
        }
    }

    fn open(&mut self, block: Block, start: Value, out: &mut Vec<Bytes>) -> usize {
        if let Some((index, b)) = self.open {
            if b == block {
                return index;
            }
        }
        self.close(out);
        let index = self.next_index;
        self.next_index += 1;
        out.push(event(
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": start}),
        ));
        self.open = Some((index, block));
        index
    }

    /// The events for one upstream event (a keep-alive comment passes as
    /// it came; `[DONE]` ends the message).
    pub fn feed(&mut self, upstream: &[u8]) -> Vec<Bytes> {
        let mut out = Vec::new();
        if self.ended {
            return out;
        }
        let Some(data) = sse::data(upstream) else {
            out.push(Bytes::copy_from_slice(upstream));
            return out;
        };
        if data.as_ref().trim_ascii() == b"[DONE]" {
            return self.finish();
        }
        let Ok(chunk) = serde_json::from_slice::<Value>(&data) else {
            return out;
        };
        if !self.started {
            self.started = true;
            out.push(event(
                "message_start",
                json!({"type": "message_start", "message": {
                    "id": chunk.get("id").cloned().unwrap_or_default(),
                    "type": "message", "role": "assistant",
                    "model": chunk.get("model").cloned().unwrap_or_default(),
                    "content": [], "stop_reason": null, "stop_sequence": null,
                    "usage": {"input_tokens": 0, "output_tokens": 0},
                }}),
            ));
        }
        if let Some(u) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(u.clone());
        }
        let Some(choice) = chunk.get("choices").and_then(|c| c.get(0)) else {
            return out;
        };
        let delta = choice.get("delta").cloned().unwrap_or_default();
        if let Some(text) = delta.get("content").and_then(Value::as_str) {
            if !text.is_empty() {
                let index = self.open(Block::Text, json!({"type": "text", "text": ""}), &mut out);
                out.push(event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": index,
                    "delta": {"type": "text_delta", "text": text}}),
                ));
            }
        }
        for call in delta
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let n = call.get("index").and_then(Value::as_u64).unwrap_or(0);
            let start = json!({"type": "tool_use",
                "id": call.get("id").cloned().unwrap_or_default(),
                "name": call.pointer("/function/name").cloned().unwrap_or_default(),
                "input": {}});
            let index = self.open(Block::Tool(n), start, &mut out);
            let args = call
                .pointer("/function/arguments")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if !args.is_empty() {
                out.push(event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": args}}),
                ));
            }
        }
        if let Some(finish) = choice.get("finish_reason").and_then(Value::as_str) {
            self.stop_reason = Some(stop_reason(finish));
            self.close(&mut out);
        }
        out
    }

    /// Whether the upstream said how the answer ended (so an end of the
    /// body without `[DONE]` still completes it).
    pub fn finished(&self) -> bool {
        self.stop_reason.is_some()
    }

    /// message_delta and message_stop, once.
    pub fn finish(&mut self) -> Vec<Bytes> {
        let mut out = Vec::new();
        if self.ended || !self.started {
            return out;
        }
        self.ended = true;
        self.close(&mut out);
        let mut u = usage(self.usage.as_ref().unwrap_or(&Value::Null));
        if self.usage.is_none() {
            u = json!({"output_tokens": 0});
        }
        out.push(event(
            "message_delta",
            json!({"type": "message_delta",
            "delta": {"stop_reason": self.stop_reason.unwrap_or("end_turn"), "stop_sequence": null},
            "usage": u}),
        ));
        out.push(event("message_stop", json!({"type": "message_stop"})));
        out
    }
}

// ---- Chat completions in, Anthropic Messages upstream ----

/// `max_tokens` sent to an Anthropic upstream when a chat request has
/// none (Anthropic requires one): the answer is cut there, with
/// `finish_reason: length`.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// Chat-completion fields that are translated or ignored; any other is
/// refused.
const CHAT_KNOWN: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "stream",
    "stream_options",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "user",
];

/// A chat content value as Anthropic blocks (text and images).
fn chat_parts(content: &Value, at: &str) -> Result<Vec<Value>, Untranslatable> {
    match content {
        Value::String(s) => Ok(vec![json!({"type": "text", "text": s})]),
        Value::Null => Ok(Vec::new()),
        Value::Array(parts) => parts
            .iter()
            .enumerate()
            .map(|(i, p)| match p.get("type").and_then(Value::as_str) {
                Some("text") => Ok(json!({"type": "text", "text": p.get("text").cloned().unwrap_or_default()})),
                Some("image_url") => {
                    let url = p.pointer("/image_url/url").and_then(Value::as_str).unwrap_or_default();
                    match url.strip_prefix("data:").and_then(|r| r.split_once(";base64,")) {
                        Some((media, data)) => Ok(json!({"type": "image", "source": {"type": "base64", "media_type": media, "data": data}})),
                        None => Ok(json!({"type": "image", "source": {"type": "url", "url": url}})),
                    }
                }
                other => refuse(format!("{at}[{i}]: a {} part has no equivalent upstream", other.unwrap_or("typeless"))),
            })
            .collect(),
        _ => refuse(format!("{at}: must be a string or an array of parts")),
    }
}

/// A chat-completions request as a Messages request.
pub fn chat_to_messages(body: &[u8]) -> Result<Vec<u8>, Untranslatable> {
    let Ok(Value::Object(req)) = serde_json::from_slice::<Value>(body) else {
        return refuse("the body must be a JSON object");
    };
    if let Some(k) = req.keys().find(|k| !CHAT_KNOWN.contains(&k.as_str())) {
        return refuse(format!(
            "{k}: has no equivalent on this model's upstream (an Anthropic one); refused rather than dropped"
        ));
    }
    let mut system = Vec::new();
    let mut messages: Vec<Value> = Vec::new();
    // Consecutive tool results make one user turn.
    let mut results: Vec<Value> = Vec::new();
    let flush = |results: &mut Vec<Value>, messages: &mut Vec<Value>| {
        if !results.is_empty() {
            messages.push(json!({"role": "user", "content": std::mem::take(results)}));
        }
    };
    for (i, m) in req
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let at = format!("messages[{i}]");
        let content = m.get("content").cloned().unwrap_or(Value::Null);
        match m.get("role").and_then(Value::as_str).unwrap_or_default() {
            "system" | "developer" => system.push(text_of(&content, &format!("{at}.content"))?),
            "tool" => results.push(json!({
                "type": "tool_result",
                "tool_use_id": m.get("tool_call_id").cloned().unwrap_or_default(),
                "content": text_of(&content, &format!("{at}.content"))?,
            })),
            "user" => {
                flush(&mut results, &mut messages);
                messages.push(json!({"role": "user", "content": chat_parts(&content, &format!("{at}.content"))?}));
            }
            "assistant" => {
                flush(&mut results, &mut messages);
                let mut blocks = chat_parts(&content, &format!("{at}.content"))?;
                blocks.extend(tool_use_blocks(m));
                messages.push(json!({"role": "assistant", "content": blocks}));
            }
            other => return refuse(format!("{at}.role: {other:?} has no equivalent upstream")),
        }
    }
    flush(&mut results, &mut messages);
    if messages.is_empty() {
        return refuse(
            "messages: an Anthropic upstream needs a user or assistant message besides the system ones",
        );
    }
    let mut out = Map::new();
    out.insert(
        "model".into(),
        req.get("model").cloned().unwrap_or_default(),
    );
    let max = req
        .get("max_completion_tokens")
        .or_else(|| req.get("max_tokens"))
        .cloned()
        .unwrap_or(json!(DEFAULT_MAX_TOKENS));
    out.insert("max_tokens".into(), max);
    if !system.is_empty() {
        out.insert("system".into(), json!(system.join("\n")));
    }
    out.insert("messages".into(), Value::Array(messages));
    for k in ["temperature", "top_p"] {
        if let Some(v) = req.get(k) {
            out.insert(k.into(), v.clone());
        }
    }
    match req.get("stop") {
        Some(Value::String(s)) => {
            out.insert("stop_sequences".into(), json!([s]));
        }
        Some(v @ Value::Array(_)) => {
            out.insert("stop_sequences".into(), v.clone());
        }
        _ => {}
    }
    if let Some(u) = req.get("user") {
        out.insert("metadata".into(), json!({"user_id": u}));
    }
    if let Some(tools) = req.get("tools") {
        let Value::Array(tools) = tools else {
            return refuse("tools: must be an array");
        };
        let mut list = Vec::new();
        for (i, t) in tools.iter().enumerate() {
            if t.get("type").and_then(Value::as_str) != Some("function") {
                return refuse(format!("tools[{i}]: only function tools translate"));
            }
            if !t.pointer("/function/name").is_some_and(Value::is_string) {
                return refuse(format!("tools[{i}]: function.name must be a string"));
            }
            let f = t.get("function").cloned().unwrap_or_default();
            let mut tool = json!({
                "name": f.get("name").cloned().unwrap_or_default(),
                "input_schema": f.get("parameters").cloned().unwrap_or(json!({"type": "object"})),
            });
            if let Some(d) = f.get("description") {
                tool["description"] = d.clone();
            }
            list.push(tool);
        }
        out.insert("tools".into(), Value::Array(list));
    }
    let mut choice = match req.get("tool_choice") {
        None => None,
        Some(Value::String(s)) => Some(match s.as_str() {
            "auto" => json!({"type": "auto"}),
            "required" => json!({"type": "any"}),
            "none" => json!({"type": "none"}),
            other => return refuse(format!("tool_choice: {other:?} has no equivalent upstream")),
        }),
        Some(v) => Some(
            json!({"type": "tool", "name": v.pointer("/function/name").cloned().unwrap_or_default()}),
        ),
    };
    if req.get("parallel_tool_calls").and_then(Value::as_bool) == Some(false) {
        let c = choice.get_or_insert_with(|| json!({"type": "auto"}));
        c["disable_parallel_tool_use"] = json!(true);
    }
    if let Some(c) = choice {
        out.insert("tool_choice".into(), c);
    }
    if req.get("stream").and_then(Value::as_bool) == Some(true) {
        out.insert("stream".into(), json!(true));
    }
    Ok(Value::Object(out).to_string().into_bytes())
}

/// Anthropic's `stop_reason` as OpenAI's `finish_reason`.
pub fn finish_reason(stop: &str) -> &'static str {
    match stop {
        "max_tokens" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        _ => "stop",
    }
}

/// Messages usage as chat usage: cache reads and writes count as prompt
/// tokens, as OpenAI counts cached ones.
fn chat_usage(u: &Value) -> Value {
    let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
    let cached = n("cache_read_input_tokens");
    let prompt = n("input_tokens") + cached + n("cache_creation_input_tokens");
    let completion = n("output_tokens");
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

/// A Messages answer as a chat completion (thinking blocks are not
/// carried: chat has no place for them).
pub fn message_to_chat(body: &[u8]) -> Option<Vec<u8>> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let mut text = String::new();
    let mut calls = Vec::new();
    for b in v.get("content")?.as_array()? {
        match b.get("type").and_then(Value::as_str) {
            Some("text") => {
                text.push_str(b.get("text").and_then(Value::as_str).unwrap_or_default())
            }
            Some("tool_use") => calls.push(json!({
                "id": b.get("id").cloned().unwrap_or_default(),
                "type": "function",
                "function": {
                    "name": b.get("name").cloned().unwrap_or_default(),
                    "arguments": b.get("input").cloned().unwrap_or(json!({})).to_string(),
                },
            })),
            _ => {}
        }
    }
    let mut message = json!({"role": "assistant", "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { Value::String(text) }});
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    let stop = v
        .get("stop_reason")
        .and_then(Value::as_str)
        .unwrap_or("end_turn");
    Some(
        json!({
            "id": v.get("id").cloned().unwrap_or_default(),
            "object": "chat.completion",
            "created": crate::api::unix_now(),
            "model": v.get("model").cloned().unwrap_or_default(),
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(stop)}],
            "usage": chat_usage(v.get("usage").unwrap_or(&Value::Null)),
        })
        .to_string()
        .into_bytes(),
    )
}

/// Anthropic's events in, chat chunks out.
pub struct ChunkTranslator {
    id: Value,
    model: Value,
    created: u64,
    include_usage: bool,
    /// Content block index → tool call index, for tool_use blocks.
    tools: Vec<(u64, usize)>,
    usage: Value,
    ended: bool,
}

impl ChunkTranslator {
    pub fn new(include_usage: bool) -> Self {
        Self {
            id: Value::Null,
            model: Value::Null,
            created: crate::api::unix_now(),
            include_usage,
            tools: Vec::new(),
            usage: json!({}),
            ended: false,
        }
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Bytes {
        let c = json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        sse::data_event(c.to_string().as_bytes())
    }

    /// The chunks for one upstream event (`ping` is dropped, an `error`
    /// event becomes an error `data:` chunk, `message_stop` is `[DONE]`).
    pub fn feed(&mut self, upstream: &[u8]) -> Vec<Bytes> {
        let mut out = Vec::new();
        if self.ended {
            return out;
        }
        let Some(data) = sse::data(upstream) else {
            out.push(Bytes::copy_from_slice(upstream));
            return out;
        };
        let Ok(v) = serde_json::from_slice::<Value>(&data) else {
            return out;
        };
        let kind = sse::event_type(upstream).map(|t| String::from_utf8_lossy(t).into_owned());
        match kind.as_deref() {
            Some("message_start") => {
                self.id = v.pointer("/message/id").cloned().unwrap_or_default();
                self.model = v.pointer("/message/model").cloned().unwrap_or_default();
                if let Some(u) = v.pointer("/message/usage").and_then(Value::as_object) {
                    if let Some(o) = self.usage.as_object_mut() {
                        o.extend(u.clone());
                    }
                }
                out.push(self.chunk(json!({"role": "assistant", "content": ""}), None));
            }
            Some("content_block_start") => {
                let block = v.get("content_block").cloned().unwrap_or_default();
                if block.get("type").and_then(Value::as_str) == Some("tool_use") {
                    let n = self.tools.len();
                    self.tools
                        .push((v.get("index").and_then(Value::as_u64).unwrap_or(0), n));
                    out.push(self.chunk(json!({"tool_calls": [{"index": n,
                        "id": block.get("id").cloned().unwrap_or_default(), "type": "function",
                        "function": {"name": block.get("name").cloned().unwrap_or_default(), "arguments": ""}}]}), None));
                }
            }
            Some("content_block_delta") => {
                let d = v.get("delta").cloned().unwrap_or_default();
                match d.get("type").and_then(Value::as_str) {
                    Some("text_delta") => out.push(self.chunk(
                        json!({"content": d.get("text").cloned().unwrap_or_default()}),
                        None,
                    )),
                    Some("input_json_delta") => {
                        let index = v.get("index").and_then(Value::as_u64).unwrap_or(0);
                        if let Some((_, n)) = self.tools.iter().find(|(b, _)| *b == index) {
                            out.push(self.chunk(json!({"tool_calls": [{"index": n,
                                "function": {"arguments": d.get("partial_json").cloned().unwrap_or_default()}}]}), None));
                        }
                    }
                    _ => {}
                }
            }
            Some("message_delta") => {
                if let (Some(u), Some(o)) = (
                    v.get("usage").and_then(Value::as_object),
                    self.usage.as_object_mut(),
                ) {
                    o.extend(u.clone());
                }
                let stop = v
                    .pointer("/delta/stop_reason")
                    .and_then(Value::as_str)
                    .unwrap_or("end_turn");
                out.push(self.chunk(json!({}), Some(finish_reason(stop))));
            }
            Some("message_stop") => {
                self.ended = true;
                if self.include_usage {
                    let c = json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                        "model": self.model, "choices": [], "usage": chat_usage(&self.usage)});
                    out.push(sse::data_event(c.to_string().as_bytes()));
                }
                out.push(Bytes::from_static(sse::DONE_EVENT));
            }
            Some("error") => {
                let message = v.pointer("/error/message").cloned().unwrap_or_default();
                let kind = v.pointer("/error/type").cloned().unwrap_or_default();
                let e = json!({"error": {"message": message, "type": kind, "code": null}});
                out.push(sse::data_event(e.to_string().as_bytes()));
            }
            _ => {}
        }
        out
    }
}

/// A chat message's `tool_calls` as Anthropic `tool_use` blocks (arguments
/// that are not JSON become an empty object).
fn tool_use_blocks(msg: &Value) -> impl Iterator<Item = Value> + '_ {
    msg.get("tool_calls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|call| {
            let args = call
                .pointer("/function/arguments")
                .and_then(Value::as_str)
                .unwrap_or("{}");
            json!({
                "type": "tool_use",
                "id": call.get("id").cloned().unwrap_or_default(),
                "name": call.pointer("/function/name").cloned().unwrap_or_default(),
                "input": serde_json::from_str::<Value>(args).unwrap_or(json!({})),
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to_chat(v: Value) -> Result<Value, Untranslatable> {
        messages_to_chat(v.to_string().as_bytes()).map(|b| serde_json::from_slice(&b).unwrap())
    }

    /// The mapping table, Messages → chat: each row one field.
    #[test]
    fn requests_translate_field_by_field() {
        let base = |extra: Value| {
            let mut v = json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            v
        };
        let rows: Vec<(Value, &str, Value)> = vec![
            (base(json!({})), "/max_tokens", json!(10)),
            (
                base(json!({})),
                "/messages/0",
                json!({"role": "user", "content": "hi"}),
            ),
            (
                base(json!({"system": "be brief"})),
                "/messages/0",
                json!({"role": "system", "content": "be brief"}),
            ),
            (
                base(
                    json!({"system": [{"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "b"}]}),
                ),
                "/messages/0/content",
                json!("a\nb"),
            ),
            (
                base(json!({"stop_sequences": ["X"]})),
                "/stop",
                json!(["X"]),
            ),
            (
                base(json!({"temperature": 0.5, "top_p": 0.9})),
                "/top_p",
                json!(0.9),
            ),
            (
                base(json!({"metadata": {"user_id": "u1"}})),
                "/user",
                json!("u1"),
            ),
            (
                base(json!({"stream": true})),
                "/stream_options",
                json!({"include_usage": true}),
            ),
            (
                base(
                    json!({"tools": [{"name": "f", "description": "d", "input_schema": {"type": "object"}}]}),
                ),
                "/tools/0",
                json!({"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}),
            ),
            (
                base(json!({"tool_choice": {"type": "any"}})),
                "/tool_choice",
                json!("required"),
            ),
            (
                base(
                    json!({"tool_choice": {"type": "tool", "name": "f", "disable_parallel_tool_use": true}}),
                ),
                "/parallel_tool_calls",
                json!(false),
            ),
            (
                base(
                    json!({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAA"}}]}]}),
                ),
                "/messages/0/content/0/image_url/url",
                json!("data:image/png;base64,AAA"),
            ),
            (
                base(json!({"messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": [{"type": "text", "text": "let me"}, {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "42"}]}, {"type": "text", "text": "thanks"}]},
                ]})),
                "/messages/1/tool_calls/0",
                json!({"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}),
            ),
        ];
        for (i, (req, pointer, want)) in rows.iter().enumerate() {
            let chat = to_chat(req.clone()).unwrap();
            assert_eq!(chat.pointer(pointer), Some(want), "row {i}: {chat}");
        }
        let chat = to_chat(rows.last().unwrap().0.clone()).unwrap();
        assert_eq!(
            chat["messages"][2],
            json!({"role": "tool", "tool_call_id": "t1", "content": "42"})
        );
        assert_eq!(chat["messages"][3]["content"][0]["text"], "thanks");
        assert_eq!(chat["messages"][1]["content"], "let me");
    }

    #[test]
    fn what_has_no_equivalent_is_refused_naming_the_field() {
        let base = json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});
        let with = |k: &str, v: Value| {
            let mut b = base.clone();
            b[k] = v;
            b
        };
        for (req, field) in [
            (with("top_k", json!(5)), "top_k"),
            (
                with(
                    "thinking",
                    json!({"type": "enabled", "budget_tokens": 1024}),
                ),
                "thinking",
            ),
            (
                with(
                    "tools",
                    json!([{"type": "web_search_20250305", "name": "web_search"}]),
                ),
                "tools[0]",
            ),
            (
                with(
                    "messages",
                    json!([{"role": "user", "content": [{"type": "document", "source": {}}]}]),
                ),
                "messages[0].content[0]",
            ),
            (
                with(
                    "messages",
                    json!([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "is_error": true, "content": "x"}]}]),
                ),
                "is_error",
            ),
            (
                with(
                    "messages",
                    json!([{"role": "assistant", "content": [{"type": "thinking", "thinking": "x"}]}]),
                ),
                "messages[0].content[0]",
            ),
            // Malformed, not merely untranslatable: refused, never turned
            // into an empty tool or conversation.
            (with("tools", json!([[null, null]])), "tools[0]"),
            (
                with("tools", json!({"name": "f"})),
                "tools: must be an array",
            ),
            (with("messages", json!("hi")), "messages: must be an array"),
        ] {
            let e = to_chat(req).unwrap_err();
            assert!(e.0.contains(field), "{field}: {}", e.0);
        }
    }

    /// The mapping table, chat → Messages.
    #[test]
    fn answers_translate_back() {
        let chat = json!({"id": "c1", "model": "gpt", "choices": [{"index": 0, "finish_reason": "tool_calls",
            "message": {"role": "assistant", "content": "looking",
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"q\":\"x\"}"}}]}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13, "prompt_tokens_details": {"cached_tokens": 4}}});
        let m: Value =
            serde_json::from_slice(&chat_to_message(chat.to_string().as_bytes()).unwrap()).unwrap();
        assert_eq!(m["type"], "message");
        assert_eq!(m["content"][0], json!({"type": "text", "text": "looking"}));
        assert_eq!(
            m["content"][1],
            json!({"type": "tool_use", "id": "call_1", "name": "f", "input": {"q": "x"}})
        );
        assert_eq!(m["stop_reason"], "tool_use");
        assert_eq!(
            m["usage"],
            json!({"input_tokens": 6, "cache_read_input_tokens": 4, "output_tokens": 3})
        );
        for (finish, stop) in [
            ("stop", "end_turn"),
            ("length", "max_tokens"),
            ("content_filter", "refusal"),
            ("tool_calls", "tool_use"),
        ] {
            assert_eq!(stop_reason(finish), stop);
        }
    }

    fn names(events: &[Bytes]) -> Vec<String> {
        events
            .iter()
            .filter_map(|e| sse::event_type(e).map(|t| String::from_utf8_lossy(t).into_owned()))
            .collect()
    }

    #[test]
    fn a_streamed_tool_call_becomes_anthropic_events() {
        let chunks = [
            r#"data: {"id":"c","model":"gpt","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#,
            r#"data: {"id":"c","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#,
            r#"data: {"id":"c","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"f","arguments":""}}]},"finish_reason":null}]}"#,
            r#"data: {"id":"c","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"q\":1}"}}]},"finish_reason":null}]}"#,
            r#"data: {"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#,
            r#"data: {"id":"c","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}"#,
            "data: [DONE]",
        ];
        let mut t = StreamTranslator::default();
        let events: Vec<Bytes> = chunks
            .iter()
            .flat_map(|c| t.feed(format!("{c}\n\n").as_bytes()))
            .collect();
        assert_eq!(
            names(&events),
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        let data = |i: usize| -> Value {
            serde_json::from_slice(&sse::data(&events[i]).unwrap()).unwrap()
        };
        assert_eq!(
            data(2)["delta"],
            json!({"type": "text_delta", "text": "Hi"})
        );
        assert_eq!(data(4)["content_block"]["name"], "f");
        assert_eq!(data(4)["index"], 1);
        assert_eq!(data(5)["delta"]["partial_json"], "{\"q\":1}");
        assert_eq!(data(7)["delta"]["stop_reason"], "tool_use");
        assert_eq!(data(7)["usage"]["output_tokens"], 2);
        assert!(t.feed(b"data: [DONE]\n\n").is_empty(), "ends once");
        // Without [DONE], finish() ends a stream whose finish_reason came.
        let mut t = StreamTranslator::default();
        t.feed(format!("{}\n\n", chunks[1]).as_bytes());
        assert!(!t.finished());
        t.feed(format!("{}\n\n", chunks[4]).as_bytes());
        assert!(t.finished());
        assert_eq!(names(&t.finish()), ["message_delta", "message_stop"]);
    }

    #[test]
    fn chat_requests_translate_to_messages_field_by_field() {
        let chat = json!({"model": "c", "max_completion_tokens": 50, "stop": "END", "user": "u1",
        "parallel_tool_calls": false, "stream": true, "stream_options": {"include_usage": true},
        "tools": [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}],
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}}]},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]},
            {"role": "tool", "tool_call_id": "t1", "content": "42"},
        ]});
        let m: Value =
            serde_json::from_slice(&chat_to_messages(chat.to_string().as_bytes()).unwrap())
                .unwrap();
        for (pointer, want) in [
            ("/max_tokens", json!(50)),
            ("/system", json!("be brief")),
            ("/stop_sequences", json!(["END"])),
            ("/metadata", json!({"user_id": "u1"})),
            (
                "/tool_choice",
                json!({"type": "auto", "disable_parallel_tool_use": true}),
            ),
            (
                "/tools/0",
                json!({"name": "f", "description": "d", "input_schema": {"type": "object"}}),
            ),
            (
                "/messages/0/content/1/source",
                json!({"type": "base64", "media_type": "image/png", "data": "AAA"}),
            ),
            (
                "/messages/1/content/0",
                json!({"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}),
            ),
            (
                "/messages/2",
                json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "42"}]}),
            ),
            ("/stream", json!(true)),
        ] {
            assert_eq!(m.pointer(pointer), Some(&want), "{pointer}: {m}");
        }
        let bare: Value = serde_json::from_slice(
            &chat_to_messages(br#"{"model":"c","messages":[{"role":"user","content":"hi"}]}"#)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(bare["max_tokens"], DEFAULT_MAX_TOKENS);
        for (field, body) in [
            ("n", json!({"model": "c", "n": 2, "messages": []})),
            (
                "response_format",
                json!({"model": "c", "response_format": {"type": "json_object"}, "messages": []}),
            ),
            (
                "logprobs",
                json!({"model": "c", "logprobs": true, "messages": []}),
            ),
            (
                "messages[0].content[0]",
                json!({"model": "c", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}),
            ),
            (
                "messages:",
                json!({"model": "c", "messages": [{"role": "system", "content": "only"}]}),
            ),
        ] {
            let e = chat_to_messages(body.to_string().as_bytes()).unwrap_err();
            assert!(e.0.starts_with(field), "{field}: {}", e.0);
        }
    }

    #[test]
    fn messages_answers_translate_to_chat() {
        let msg = json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude",
            "content": [{"type": "thinking", "thinking": "x"}, {"type": "text", "text": "ok"}, {"type": "tool_use", "id": "t", "name": "f", "input": {"q": 1}}],
            "stop_reason": "tool_use", "usage": {"input_tokens": 5, "cache_read_input_tokens": 10, "output_tokens": 3}});
        let c: Value =
            serde_json::from_slice(&message_to_chat(msg.to_string().as_bytes()).unwrap()).unwrap();
        assert_eq!(c["choices"][0]["message"]["content"], "ok");
        assert_eq!(
            c["choices"][0]["message"]["tool_calls"][0]["function"],
            json!({"name": "f", "arguments": "{\"q\":1}"})
        );
        assert_eq!(c["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(
            c["usage"],
            json!({"prompt_tokens": 15, "completion_tokens": 3, "total_tokens": 18, "prompt_tokens_details": {"cached_tokens": 10}})
        );
        for (stop, finish) in [
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("max_tokens", "length"),
            ("tool_use", "tool_calls"),
            ("refusal", "content_filter"),
        ] {
            assert_eq!(finish_reason(stop), finish);
        }
    }

    #[test]
    fn anthropic_events_become_chat_chunks() {
        let events = [
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"claude\",\"usage\":{\"input_tokens\":4,\"output_tokens\":1}}}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
            "event: ping\ndata: {\"type\":\"ping\"}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"t\",\"name\":\"f\",\"input\":{}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{}\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\"},\"usage\":{\"output_tokens\":7}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        ];
        let mut t = ChunkTranslator::new(true);
        let out: Vec<Bytes> = events.iter().flat_map(|e| t.feed(e.as_bytes())).collect();
        let data: Vec<Value> = out
            .iter()
            .filter_map(|e| sse::data(e))
            .filter(|d| d.as_ref() != b"[DONE]")
            .map(|d| serde_json::from_slice(&d).unwrap())
            .collect();
        assert_eq!(data[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(data[1]["choices"][0]["delta"]["content"], "Hi");
        assert_eq!(
            data[2]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"],
            "f"
        );
        assert_eq!(
            data[3]["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"],
            "{}"
        );
        assert_eq!(data[4]["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(data[5]["usage"]["completion_tokens"], 7);
        assert_eq!(data[5]["usage"]["prompt_tokens"], 4);
        assert_eq!(out.last().unwrap().as_ref(), sse::DONE_EVENT);
        assert_eq!(data.len(), 6);
    }
}
