use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

impl ChatRequest {
    /// One user message: the shape of the simple API, the WebSocket
    /// `prompt` form and gRPC's `prompt` field.
    pub fn from_prompt(model: impl Into<String>, prompt: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            messages: vec![ChatMessage::text("user", prompt)],
            stream: false,
            params: Map::new(),
        }
    }

    /// A streamed request that asks for usage in its last chunk (what the
    /// WebSocket and gRPC front ends show in their final frame).
    pub fn streamed_with_usage(mut self) -> Self {
        self.stream = true;
        self.params.insert(
            "stream_options".into(),
            serde_json::json!({"include_usage": true}),
        );
        self
    }

    /// Sets the tuning fields the simple API and gRPC carry explicitly.
    pub fn with_tuning(mut self, max_tokens: Option<u32>, temperature: Option<f64>) -> Self {
        if let Some(m) = max_tokens {
            self.params.insert("max_tokens".into(), m.into());
        }
        if let Some(t) = temperature {
            self.params.insert("temperature".into(), t.into());
        }
        self
    }
}

/// The messages of a request given either a prompt or a message list (not
/// both). An empty result is left to the pipeline's validation.
pub fn prompt_or_messages(
    prompt: Option<String>,
    messages: Vec<ChatMessage>,
) -> Result<Vec<ChatMessage>, super::ApiError> {
    match (prompt, messages.is_empty()) {
        (Some(_), false) => Err(super::ApiError::BadRequest(
            "send either prompt or messages, not both".into(),
        )),
        (Some(prompt), true) => Ok(vec![ChatMessage::text("user", prompt)]),
        (None, _) => Ok(messages),
    }
}

/// An OpenAI-style chat completion request. Parameters this forwarder does
/// not interpret (temperature, tools, …) ride along in `params` untouched.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
    #[serde(flatten)]
    pub params: Map<String, Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    /// A string, an array of content parts, or null (tool calls).
    #[serde(default)]
    pub content: Value,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ChatMessage {
    pub fn text(role: &str, text: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: Value::String(text.into()),
            extra: Map::new(),
        }
    }

    /// The message's text: the string content, or its text parts joined.
    pub fn content_text(&self) -> String {
        content_text(&self.content)
    }
}

pub fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatResponse {
    pub id: String,
    #[serde(default = "completion_object")]
    pub object: String,
    #[serde(default)]
    pub created: u64,
    pub model: String,
    pub choices: Vec<Choice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn completion_object() -> String {
    "chat.completion".into()
}

impl ChatResponse {
    /// The first choice's text, which the simple API returns as `reply`.
    pub fn reply_text(&self) -> String {
        self.choices
            .first()
            .map(|c| c.message.content_text())
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Choice {
    #[serde(default)]
    pub index: u32,
    pub message: ChatMessage,
    #[serde(default)]
    pub finish_reason: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One Server-Sent Event of a streamed completion (`chat.completion.chunk`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatChunk {
    pub id: String,
    #[serde(default = "chunk_object")]
    pub object: String,
    #[serde(default)]
    pub created: u64,
    pub model: String,
    #[serde(default)]
    pub choices: Vec<ChunkChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn chunk_object() -> String {
    "chat.completion.chunk".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChunkChoice {
    #[serde(default)]
    pub index: u32,
    #[serde(default)]
    pub delta: Delta,
    #[serde(default)]
    pub finish_reason: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Delta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ChatChunk {
    pub fn delta_text(&self) -> &str {
        self.choices
            .first()
            .and_then(|c| c.delta.content.as_deref())
            .unwrap_or("")
    }
}

/// `GET /v1/models` entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelInfo {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
}

/// The simple API's request: `POST /api/v1/message`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimpleRequest {
    pub model_id: String,
    pub prompt: String,
    /// Doubles as the idempotency key.
    #[serde(default)]
    pub request_id: Option<String>,
    #[serde(default, deserialize_with = "whole_u32")]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Run as an async job: answered `202` with the job at once.
    #[serde(default, rename = "async", deserialize_with = "null_is_false")]
    pub run_async: bool,
    /// With `async`: where the signed result is POSTed.
    #[serde(default)]
    pub callback_url: Option<String>,
}

/// A count that JSON may spell `256` or `256.0` (JSON Schema's `integer`
/// admits both, and some clients send whole floats); fractions, negatives
/// and values past `u32::MAX` are errors.
fn whole_u32<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    let whole = match n.as_u64() {
        Some(v) => u32::try_from(v).ok(),
        None => n
            .as_f64()
            .filter(|f| f.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(f))
            .map(|f| f as u32),
    };
    whole.map(Some).ok_or_else(|| {
        serde::de::Error::custom(format!(
            "max_tokens must be a whole number from 0 to {}, not {n}",
            u32::MAX
        ))
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct SimpleResponse {
    pub reply: String,
    pub model_id: String,
    pub request_id: String,
    /// The upstream's `usage` as it sent it; absent when it sent none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Box<serde_json::value::RawValue>>,
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `null` reads as absent (`false`), as for the simple API's other
/// optional fields.
fn null_is_false<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_tokens(v: &str) -> Result<Option<u32>, String> {
        let body = format!(r#"{{"model_id":"m","prompt":"p","max_tokens":{v}}}"#);
        serde_json::from_str::<SimpleRequest>(&body)
            .map(|r| r.max_tokens)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn max_tokens_takes_whole_numbers_however_spelled() {
        assert_eq!(max_tokens("331"), Ok(Some(331)));
        assert_eq!(max_tokens("331.0"), Ok(Some(331)));
        assert_eq!(max_tokens("4294967295"), Ok(Some(u32::MAX)));
        assert_eq!(max_tokens("null"), Ok(None));
        for bad in ["1.5", "-1", "4294967296", "1e300", "\"7\""] {
            let e = max_tokens(bad).unwrap_err();
            assert!(
                e.contains("max_tokens") || e.contains("invalid type"),
                "{bad}: {e}"
            );
        }
    }
}
