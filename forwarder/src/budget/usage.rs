//! What an answer used, read from the upstream's `usage` (a completion's
//! body, or a stream's events), and the one edit a budget makes to a
//! streamed chat request: asking for `stream_options.include_usage` when
//! the client did not, so the usage chunk can be read and then held back
//! from the client. Pure.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::pipeline::{ApiKind, Family};
use crate::sse;

/// Tokens in and out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input: u64,
    pub output: u64,
}

impl Usage {
    pub fn total(self) -> u64 {
        self.input.saturating_add(self.output)
    }
}

/// Every shape of `usage`: OpenAI's chat and embeddings
/// (`prompt_tokens`/`completion_tokens`), Responses' and Anthropic's
/// (`input_tokens`/`output_tokens`, Anthropic's cache tokens as input).
#[derive(Deserialize, Default)]
struct RawUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
}

impl RawUsage {
    fn usage(&self, family: Family) -> Usage {
        let cache = match family {
            Family::Anthropic => self
                .cache_creation_input_tokens
                .unwrap_or(0)
                .saturating_add(self.cache_read_input_tokens.unwrap_or(0)),
            Family::OpenAi => 0,
        };
        Usage {
            input: self
                .prompt_tokens
                .or(self.input_tokens)
                .unwrap_or(0)
                .saturating_add(cache),
            output: self.completion_tokens.or(self.output_tokens).unwrap_or(0),
        }
    }
}

/// The usage a completion's body reports; `None` when it reports none.
/// A token count (`count_tokens`) uses nothing.
pub fn of_body(api: ApiKind, body: &[u8]) -> Option<Usage> {
    #[derive(Deserialize)]
    struct Body {
        usage: Option<RawUsage>,
    }
    if api == ApiKind::CountTokens {
        return Some(Usage::default());
    }
    let u = serde_json::from_slice::<Body>(body).ok()?.usage?;
    Some(u.usage(api.family()))
}

/// The usage of a stream, gathered event by event.
#[derive(Debug, Default)]
pub struct StreamUsage {
    pub seen: Option<Usage>,
}

impl StreamUsage {
    /// Reads one whole event. Returns whether it is a chat usage chunk
    /// (`"choices": []` with a `usage`), the chunk an injected
    /// `include_usage` adds.
    pub fn event(&mut self, api: ApiKind, event: &[u8]) -> bool {
        // Most events carry no usage: skip them unparsed.
        if memchr::memmem::find(event, b"\"usage\"").is_none() {
            return false;
        }
        let Some(data) = sse::data(event) else {
            return false;
        };
        #[derive(Deserialize)]
        struct Inner {
            usage: Option<RawUsage>,
        }
        #[derive(Deserialize)]
        struct Event<'a> {
            #[serde(default, borrow)]
            choices: Option<&'a RawValue>,
            usage: Option<RawUsage>,
            /// Anthropic's `message_start`.
            message: Option<Inner>,
            /// Responses' `response.completed`.
            response: Option<Inner>,
        }
        let Ok(e) = serde_json::from_slice::<Event>(&data) else {
            return false;
        };
        let family = api.family();
        let chunk = e.usage.is_some()
            && e.choices.is_some_and(|c| c.get().trim() == "[]")
            && api == ApiKind::ChatCompletions;
        let inner = e
            .message
            .and_then(|m| m.usage)
            .or(e.response.and_then(|r| r.usage));
        match (family, e.usage, inner) {
            // Anthropic: input in `message_start`, output (cumulative) in
            // each `message_delta`.
            (Family::Anthropic, Some(u), _) => {
                let mut seen = self.seen.unwrap_or_default();
                let now = u.usage(family);
                if now.input > 0 {
                    seen.input = now.input;
                }
                seen.output = now.output.max(seen.output);
                self.seen = Some(seen);
            }
            (_, Some(u), _) | (_, None, Some(u)) => self.seen = Some(u.usage(family)),
            _ => {}
        }
        chunk
    }
}

/// Whether a chat request already asks for the usage chunk.
pub fn asks_usage(body: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Opts {
        include_usage: Option<bool>,
    }
    #[derive(Deserialize)]
    struct Body {
        stream_options: Option<Opts>,
    }
    serde_json::from_slice::<Body>(body)
        .ok()
        .and_then(|b| b.stream_options?.include_usage)
        .unwrap_or(false)
}

/// The chat request with `stream_options.include_usage: true` set (other
/// stream options kept); `None` if the body is not a JSON object.
pub fn with_usage(body: &[u8]) -> Option<Vec<u8>> {
    let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body).ok()?;
    let opts = v
        .entry("stream_options")
        .or_insert_with(|| serde_json::Value::Object(Default::default()));
    if !opts.is_object() {
        *opts = serde_json::Value::Object(Default::default());
    }
    opts.as_object_mut()?
        .insert("include_usage".into(), serde_json::Value::Bool(true));
    serde_json::to_vec(&v).ok()
}

/// Tokens a request is charged before its answer: its body's bytes / 4
/// for the input, and for the output the most it asks for
/// (`max_tokens`, `max_completion_tokens`, `max_output_tokens`), else
/// nothing until the answer says.
pub fn estimate(body: &[u8]) -> Usage {
    #[derive(Deserialize)]
    struct Body {
        max_tokens: Option<u64>,
        max_completion_tokens: Option<u64>,
        max_output_tokens: Option<u64>,
    }
    let out = serde_json::from_slice::<Body>(body)
        .ok()
        .and_then(|b| {
            b.max_completion_tokens
                .or(b.max_tokens)
                .or(b.max_output_tokens)
        })
        .unwrap_or(0);
    Usage {
        input: (body.len() as u64).div_ceil(4).max(1),
        output: out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_read_from_every_api_shape() {
        let chat = br#"{"usage":{"prompt_tokens":2,"completion_tokens":3,"total_tokens":5}}"#;
        assert_eq!(
            of_body(ApiKind::ChatCompletions, chat),
            Some(Usage {
                input: 2,
                output: 3
            })
        );
        let msg = br#"{"usage":{"input_tokens":3,"output_tokens":4,"cache_read_input_tokens":10}}"#;
        assert_eq!(
            of_body(ApiKind::Messages, msg),
            Some(Usage {
                input: 13,
                output: 4
            })
        );
        assert_eq!(of_body(ApiKind::ChatCompletions, b"{}"), None);
        assert_eq!(of_body(ApiKind::CountTokens, b"{}"), Some(Usage::default()));
    }

    #[test]
    fn a_streams_usage_is_gathered_and_its_usage_chunk_recognised() {
        let mut s = StreamUsage::default();
        let delta = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n";
        assert!(!s.event(ApiKind::ChatCompletions, delta));
        let usage = b"data: {\"id\":\"x\",\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":5}}\n\n";
        assert!(s.event(ApiKind::ChatCompletions, usage));
        assert_eq!(
            s.seen,
            Some(Usage {
                input: 2,
                output: 5
            })
        );

        let mut a = StreamUsage::default();
        let start = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":7,\"output_tokens\":1}}}\n\n";
        let delta = b"event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":9}}\n\n";
        assert!(!a.event(ApiKind::Messages, start));
        assert!(!a.event(ApiKind::Messages, delta));
        assert_eq!(
            a.seen,
            Some(Usage {
                input: 7,
                output: 9
            })
        );

        let mut r = StreamUsage::default();
        let done = b"event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":3,\"output_tokens\":4}}}\n\n";
        r.event(ApiKind::Responses, done);
        assert_eq!(
            r.seen,
            Some(Usage {
                input: 3,
                output: 4
            })
        );
    }

    #[test]
    fn include_usage_is_added_keeping_other_options() {
        let body = br#"{"model":"m","stream":true,"stream_options":{"x":1},"messages":[]}"#;
        assert!(!asks_usage(body));
        let edited = with_usage(body).unwrap();
        assert!(asks_usage(&edited));
        let v: serde_json::Value = serde_json::from_slice(&edited).unwrap();
        assert_eq!(v["stream_options"]["x"], 1);
        assert!(asks_usage(&with_usage(br#"{"model":"m"}"#).unwrap()));
        assert_eq!(with_usage(b"[1]"), None);
    }

    #[test]
    fn estimates_count_the_body_and_the_asked_output() {
        assert_eq!(
            estimate(br#"{"max_tokens":10}"#),
            Usage {
                input: 5,
                output: 10
            }
        );
        assert_eq!(estimate(b"x").output, 0);
    }
}
