//! What a span reports about an answer, read from its body or its stream's
//! events (pure): the model that answered, its id, and token counts. Never
//! the content. Read only when traces are on.

use serde::Deserialize;

use crate::pipeline::ApiKind;

/// What the answer said about itself so far.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Answered {
    pub model: Option<String>,
    pub id: Option<String>,
    /// Input tokens, cached ones included.
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
}

#[derive(Deserialize, Default)]
struct Usage {
    // OpenAI chat completions and embeddings.
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    // Responses and Anthropic Messages.
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
}

/// The fields every API's answer object shares (the Messages answer, a
/// chat completion or chunk, a response, an embeddings list).
#[derive(Deserialize, Default)]
struct Object {
    model: Option<String>,
    id: Option<String>,
    usage: Option<Usage>,
    /// count_tokens answers `{"input_tokens": n}`.
    input_tokens: Option<u64>,
    /// Messages' `message_start` event wraps the message.
    message: Option<Box<Object>>,
    /// Responses' events wrap the response.
    response: Option<Box<Object>>,
}

impl Answered {
    /// Reads a whole answer of `api`.
    pub fn from_body(api: ApiKind, body: &[u8]) -> Self {
        let mut a = Self::default();
        if let Ok(o) = serde_json::from_slice::<Object>(body) {
            a.take(api, o);
        }
        a
    }

    /// Reads one event of a stream of `api` (the data of an SSE event).
    /// Cheap for the events that carry neither a model nor usage.
    pub fn read_event(&mut self, api: ApiKind, data: &[u8]) {
        let wanted = (self.model.is_none() && memchr::memmem::find(data, b"\"model\"").is_some())
            || memchr::memmem::find(data, b"\"usage\"").is_some();
        if !wanted {
            return;
        }
        if let Ok(o) = serde_json::from_slice::<Object>(data) {
            self.take(api, o);
        }
    }

    fn take(&mut self, api: ApiKind, o: Object) {
        if let Some(inner) = o.message.or(o.response) {
            return self.take(api, *inner);
        }
        if self.model.is_none() {
            self.model = o.model;
        }
        if self.id.is_none() {
            self.id = o.id;
        }
        if api == ApiKind::CountTokens {
            self.input_tokens = o.input_tokens.or(self.input_tokens);
            return;
        }
        let Some(u) = o.usage else { return };
        let cached =
            u.cache_creation_input_tokens.unwrap_or(0) + u.cache_read_input_tokens.unwrap_or(0);
        let input = u.prompt_tokens.or(u.input_tokens.map(|i| i + cached));
        // Messages' `message_delta` repeats the count so far (output only,
        // or input too): later counts replace earlier ones.
        self.input_tokens = input.or(self.input_tokens);
        self.output_tokens = u
            .completion_tokens
            .or(u.output_tokens)
            .or(self.output_tokens);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_answers_of_each_api() {
        let chat = br#"{"id":"c1","model":"gpt-x","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#;
        assert_eq!(
            Answered::from_body(ApiKind::ChatCompletions, chat),
            Answered {
                model: Some("gpt-x".into()),
                id: Some("c1".into()),
                input_tokens: Some(5),
                output_tokens: Some(7)
            }
        );
        let emb = br#"{"object":"list","data":[],"model":"e","usage":{"prompt_tokens":3,"total_tokens":3}}"#;
        let e = Answered::from_body(ApiKind::Embeddings, emb);
        assert_eq!((e.input_tokens, e.output_tokens), (Some(3), None));
        let msg = br#"{"id":"m","model":"claude","content":[{"type":"text","text":"secret"}],"usage":{"input_tokens":4,"output_tokens":2,"cache_read_input_tokens":10,"cache_creation_input_tokens":null}}"#;
        let m = Answered::from_body(ApiKind::Messages, msg);
        assert_eq!((m.input_tokens, m.output_tokens), (Some(14), Some(2)));
        let ct = Answered::from_body(ApiKind::CountTokens, br#"{"input_tokens":9}"#);
        assert_eq!((ct.input_tokens, ct.model), (Some(9), None));
        assert_eq!(
            Answered::from_body(ApiKind::Responses, b"not json"),
            Answered::default()
        );
    }

    #[test]
    fn streams_of_each_api() {
        let mut chat = Answered::default();
        for d in [
            &br#"{"id":"c","model":"m1","choices":[{"delta":{"content":"hi"}}]}"#[..],
            br#"{"id":"c","model":"m1","choices":[],"usage":{"prompt_tokens":2,"completion_tokens":3}}"#,
        ] {
            chat.read_event(ApiKind::ChatCompletions, d);
        }
        assert_eq!(
            (chat.model.as_deref(), chat.input_tokens, chat.output_tokens),
            (Some("m1"), Some(2), Some(3))
        );
        let mut msg = Answered::default();
        for d in [
            &br#"{"type":"message_start","message":{"id":"x","model":"claude","usage":{"input_tokens":6,"output_tokens":1}}}"#[..],
            br#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"hi"}}"#,
            br#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":8}}"#,
        ] {
            msg.read_event(ApiKind::Messages, d);
        }
        assert_eq!(
            (msg.model.as_deref(), msg.input_tokens, msg.output_tokens),
            (Some("claude"), Some(6), Some(8))
        );
        let mut resp = Answered::default();
        for d in [
            &br#"{"type":"response.created","response":{"id":"r","model":"m2","usage":null}}"#[..],
            br#"{"type":"response.completed","response":{"id":"r","model":"m2","usage":{"input_tokens":3,"output_tokens":4,"total_tokens":7}}}"#,
        ] {
            resp.read_event(ApiKind::Responses, d);
        }
        assert_eq!(
            (resp.id.as_deref(), resp.input_tokens, resp.output_tokens),
            (Some("r"), Some(3), Some(4))
        );
    }
}
