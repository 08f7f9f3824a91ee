//! Reading answers for the front ends that do not speak OpenAI's wire format
//! (the simple API, WebSocket, gRPC): a borrowed parse of the few fields they
//! show. The OpenAI front end never parses answers; it relays their bytes.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::ApiError;

/// A non-streamed completion, as the simple API, WebSocket and gRPC show it.
#[derive(Debug, Clone, Default)]
pub struct CompletionView {
    pub model: String,
    pub text: String,
    pub finish_reason: Option<String>,
    /// The upstream's `usage` object as it sent it, or none.
    pub usage: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
struct Completion<'a> {
    #[serde(default, borrow)]
    model: Cow<'a, str>,
    #[serde(default, borrow)]
    choices: Vec<CompletionChoice<'a>>,
    #[serde(default, borrow)]
    usage: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct CompletionChoice<'a> {
    #[serde(default, borrow)]
    message: Option<Message<'a>>,
    #[serde(default, borrow)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(default, borrow)]
    content: Option<Content<'a>>,
}

/// A string, or an array of content parts whose texts are joined.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content<'a> {
    #[serde(borrow)]
    Text(Cow<'a, str>),
    Parts(Vec<Part<'a>>),
}

#[derive(Deserialize)]
struct Part<'a> {
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
}

impl Content<'_> {
    fn push_to(&self, out: &mut String) {
        match self {
            Self::Text(t) => out.push_str(t),
            Self::Parts(parts) => parts
                .iter()
                .filter_map(|p| p.text.as_deref())
                .for_each(|t| out.push_str(t)),
        }
    }
}

fn non_null(raw: Option<&RawValue>) -> Option<Box<RawValue>> {
    raw.filter(|r| r.get() != "null").map(ToOwned::to_owned)
}

impl CompletionView {
    /// Reads a completion body. A 200 whose body cannot be read is the
    /// upstream's fault: 502.
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        let c: Completion = serde_json::from_slice(body)
            .map_err(|_| ApiError::BadGateway("the upstream's answer could not be read".into()))?;
        let first = c
            .choices
            .first()
            .ok_or_else(|| ApiError::BadGateway("the upstream's answer has no choices".into()))?;
        let mut text = String::new();
        if let Some(content) = first.message.as_ref().and_then(|m| m.content.as_ref()) {
            content.push_to(&mut text);
        }
        Ok(Self {
            model: c.model.into_owned(),
            text,
            finish_reason: first.finish_reason.as_deref().map(str::to_string),
            usage: non_null(c.usage),
        })
    }
}

/// One streamed chunk, as WebSocket and gRPC show it.
#[derive(Debug, Clone, Default)]
pub struct ChunkView {
    pub model: String,
    pub delta: String,
    pub finish_reason: Option<String>,
    pub usage: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(default, borrow)]
    model: Cow<'a, str>,
    #[serde(default, borrow)]
    choices: Vec<ChunkChoice<'a>>,
    #[serde(default, borrow)]
    usage: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ChunkChoice<'a> {
    #[serde(default, borrow)]
    delta: Option<Message<'a>>,
    #[serde(default, borrow)]
    finish_reason: Option<Cow<'a, str>>,
}

impl ChunkView {
    /// Reads one event's data; `None` for `[DONE]`.
    pub fn parse(data: &[u8]) -> Result<Option<Self>, ApiError> {
        if data.trim_ascii() == b"[DONE]" {
            return Ok(None);
        }
        let c: Chunk = serde_json::from_slice(data).map_err(|_| {
            ApiError::BadGateway("the upstream sent a stream event that could not be read".into())
        })?;
        let mut view = Self {
            model: c.model.into_owned(),
            usage: non_null(c.usage),
            ..Default::default()
        };
        if let Some(first) = c.choices.first() {
            if let Some(content) = first.delta.as_ref().and_then(|d| d.content.as_ref()) {
                content.push_to(&mut view.delta);
            }
            view.finish_reason = first.finish_reason.as_deref().map(str::to_string);
        }
        Ok(Some(view))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_view_reads_text_parts_escapes_and_raw_usage() {
        let body = br#"{"model":"m","choices":[{"message":{"content":[{"type":"text","text":"a\"b"},{"type":"text","text":"c"}]},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"x":{"y":2}}}"#;
        let v = CompletionView::parse(body).unwrap();
        assert_eq!(v.text, "a\"bc");
        assert_eq!(v.finish_reason.as_deref(), Some("stop"));
        assert_eq!(v.usage.unwrap().get(), r#"{"prompt_tokens":1,"x":{"y":2}}"#);
    }

    #[test]
    fn a_completion_without_choices_is_a_bad_gateway() {
        let e = CompletionView::parse(br#"{"model":"m","choices":[]}"#).unwrap_err();
        assert_eq!(e.status().as_u16(), 502);
        assert!(CompletionView::parse(b"not json").is_err());
    }

    #[test]
    fn chunk_view_handles_done_null_usage_and_tool_calls() {
        assert!(ChunkView::parse(b"[DONE]").unwrap().is_none());
        let c = ChunkView::parse(br#"{"model":"m","choices":[{"delta":{"tool_calls":[{"index":0}]},"finish_reason":null}],"usage":null}"#)
            .unwrap()
            .unwrap();
        assert_eq!(c.delta, "");
        assert!(c.usage.is_none() && c.finish_reason.is_none());
    }
}
