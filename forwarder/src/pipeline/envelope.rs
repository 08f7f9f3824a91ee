//! The one request value every front end builds and every stage passes on,
//! and the one answer value that comes back. Bodies are bytes in the format
//! of the request's [`ApiKind`] (chat completions, embeddings, Responses,
//! Anthropic Messages), forwarded as they came: the forwarder reads what it
//! needs with a borrowed parse and re-encodes nothing.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use futures::stream::BoxStream;
use http::HeaderMap;
use serde::de::{IgnoredAny, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use tokio::time::Instant;

use super::kind::ApiKind;
use crate::api::ApiError;
use crate::auth::Identity;
use crate::telemetry::Protocol;

/// Who asked, through which front end, and until when.
#[derive(Debug, Clone)]
pub struct Context {
    pub principal: Identity,
    pub request_id: String,
    pub deadline: Instant,
    pub protocol: Protocol,
}

/// A request on its way through the pipeline.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub ctx: Context,
    /// The API the body is written in (the upstream path follows from it).
    pub api: ApiKind,
    pub model: String,
    pub stream: bool,
    pub idempotency_key: Option<String>,
    /// Client headers on the pass-through allow-list (`headers.to_upstream`).
    pub headers: HeaderMap,
    /// The request, byte for byte as the client sent it (or as a front end
    /// of another protocol wrote it).
    pub body: Bytes,
}

/// An answer: headers on the `headers.to_client` allow-list and a body.
pub struct Reply {
    pub headers: HeaderMap,
    pub body: ReplyBody,
}

pub enum ReplyBody {
    /// A completion's JSON, as the upstream sent it.
    Complete(Bytes),
    /// Runs of whole Server-Sent Events (each item one or more events, each
    /// with its blank line; [`crate::sse::events`] splits an item), relayed
    /// verbatim in the pieces the upstream's reads yield; the last is the API's terminal event (`data: [DONE]`,
    /// `message_stop`, `response.completed`). An `Err` ends a stream that
    /// failed.
    Stream(EventStream),
}

pub type EventStream = BoxStream<'static, Result<Bytes, ApiError>>;

/// What the pipeline checks in a chat request before forwarding it.
#[derive(Debug, PartialEq, Eq)]
pub struct Peek<'a> {
    pub model: Cow<'a, str>,
    pub stream: bool,
}

#[derive(Deserialize)]
struct RawPeek<'a> {
    /// Not an `Option`: serde borrows a `Cow` only as a direct field.
    #[serde(default, borrow)]
    model: Cow<'a, str>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    messages: Option<Count>,
    #[serde(default)]
    input: Option<IgnoredAny>,
}

/// The length of a JSON array, counted without decoding its elements.
struct Count(usize);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of messages")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Count, A::Error> {
                let mut n = 0;
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    n += 1;
                }
                Ok(Count(n))
            }
        }
        d.deserialize_seq(V)
    }
}

/// Validates a chat-completions body: well-formed JSON, a `model` string,
/// a non-empty `messages` array, `stream` a boolean if present. Nothing is
/// copied but a model name with escapes.
pub fn peek(body: &[u8]) -> Result<Peek<'_>, ApiError> {
    peek_as(ApiKind::ChatCompletions, body)
}

/// Validates a body of `api` for what the pipeline needs: well-formed JSON,
/// a `model` string, `stream` a boolean if present (and `true` only where
/// the API streams), a non-empty `messages` array (chat completions,
/// Messages, count_tokens) or an `input` (embeddings). Everything else is
/// the upstream's to judge.
pub fn peek_as(api: ApiKind, body: &[u8]) -> Result<Peek<'_>, ApiError> {
    let raw: RawPeek = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?;
    let model = raw.model;
    if model.is_empty() {
        return Err(ApiError::BadRequest("model is required".into()));
    }
    if api.needs_messages() {
        match raw.messages {
            Some(Count(n)) if n > 0 => {}
            Some(_) => return Err(ApiError::BadRequest("messages must not be empty".into())),
            None => return Err(ApiError::BadRequest("messages is required".into())),
        }
    }
    if api.needs_input() && raw.input.is_none() {
        return Err(ApiError::BadRequest("input is required".into()));
    }
    let stream = raw.stream.unwrap_or(false);
    if stream && !api.may_stream() {
        return Err(ApiError::BadRequest(format!(
            "stream is not supported on {}",
            api.label()
        )));
    }
    Ok(Peek { model, stream })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peek_reads_model_stream_and_counts_messages() {
        let p = peek(br#"{"messages":[{"role":"user","content":[1,{"x":[]}]}],"model":"m","stream":true,"tools":[{}]}"#).unwrap();
        assert_eq!(
            p,
            Peek {
                model: "m".into(),
                stream: true
            }
        );
        assert!(matches!(p.model, Cow::Borrowed(_)));
    }

    #[test]
    fn peek_rejects_what_cannot_be_forwarded() {
        for (body, want) in [
            (&b"{"[..], "invalid JSON"),
            (br#"{"messages":[{}]}"#, "model is required"),
            (br#"{"model":"","messages":[{}]}"#, "model is required"),
            (br#"{"model":"m","messages":[]}"#, "must not be empty"),
            (br#"{"model":"m"}"#, "messages is required"),
            (br#"{"model":"m","messages":{}}"#, "invalid JSON"),
            (
                br#"{"model":"m","messages":[{}],"stream":"yes"}"#,
                "invalid JSON",
            ),
            (br#"[1]"#, "invalid JSON"),
        ] {
            let e = peek(body).unwrap_err();
            assert!(
                e.to_string().contains(want),
                "{}: {e}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn each_api_requires_what_it_routes_on() {
        use ApiKind::*;
        let ok: &[(ApiKind, &[u8], bool)] = &[
            (Embeddings, br#"{"model":"e","input":"x"}"#, false),
            (Embeddings, br#"{"model":"e","input":[[1,2]]}"#, false),
            (
                Responses,
                br#"{"model":"r","input":"x","stream":true}"#,
                true,
            ),
            (
                Responses,
                br#"{"model":"r","previous_response_id":"p"}"#,
                false,
            ),
            (
                Messages,
                br#"{"model":"c","max_tokens":5,"messages":[{}],"stream":true}"#,
                true,
            ),
            (CountTokens, br#"{"model":"c","messages":[{}]}"#, false),
        ];
        for (api, body, stream) in ok {
            let p = peek_as(*api, body).unwrap();
            assert_eq!(p.stream, *stream, "{api:?}");
        }
        let bad: &[(ApiKind, &[u8], &str)] = &[
            (Embeddings, br#"{"model":"e"}"#, "input is required"),
            (
                Embeddings,
                br#"{"model":"e","input":null}"#,
                "input is required",
            ),
            (
                Embeddings,
                br#"{"model":"e","input":"x","stream":true}"#,
                "not supported",
            ),
            (Responses, br#"{"input":"x"}"#, "model is required"),
            (
                Messages,
                br#"{"model":"c","messages":[]}"#,
                "must not be empty",
            ),
            (CountTokens, br#"{"model":"c"}"#, "messages is required"),
            (
                CountTokens,
                br#"{"model":"c","messages":[{}],"stream":true}"#,
                "not supported",
            ),
            (Messages, br#"{"model":"c","messages":[{}]"#, "invalid JSON"),
        ];
        for (api, body, want) in bad {
            let e = peek_as(*api, body).unwrap_err().to_string();
            assert!(
                e.contains(want),
                "{api:?} {}: {e}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
