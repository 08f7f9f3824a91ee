//! One stored form, the completion JSON, served both ways: a completion
//! is replayed as a stream of chunks, and a recorded stream is assembled
//! into a completion. Answers with anything but text (tool calls) are not
//! cached: their deltas cannot be replayed faithfully.

use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::sse;

/// The text choices of a completion: `(index, content, finish_reason)`.
fn text_choices(v: &Value) -> Option<Vec<(u64, String, Value)>> {
    let choices = v.get("choices")?.as_array()?;
    if choices.is_empty() {
        return None;
    }
    choices
        .iter()
        .map(|c| {
            let msg = c.get("message")?;
            if msg.get("tool_calls").is_some() || msg.get("function_call").is_some() {
                return None;
            }
            Some((
                c.get("index").and_then(Value::as_u64).unwrap_or(0),
                msg.get("content")?.as_str()?.to_string(),
                c.get("finish_reason").cloned().unwrap_or(Value::Null),
            ))
        })
        .collect()
}

/// Whether a completion body can be cached (and replayed as a stream).
pub fn cacheable(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| text_choices(&v))
        .is_some()
}

/// Whether an answer of `api` can be cached: a text completion (see
/// [`cacheable`]), or an embeddings list (`data` an array of embeddings).
pub fn cacheable_as(api: crate::pipeline::ApiKind, body: &[u8]) -> bool {
    use crate::pipeline::ApiKind;
    match api {
        ApiKind::ChatCompletions => cacheable(body),
        ApiKind::Embeddings => serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| {
                v.get("data")?
                    .as_array()
                    .map(|d| !d.is_empty() && d.iter().all(|e| e.get("embedding").is_some()))
            })
            .unwrap_or(false),
        _ => false,
    }
}

/// A stored completion as stream events, `[DONE]` last.
pub fn to_events(body: &[u8]) -> Option<Vec<Bytes>> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let choices = text_choices(&v)?;
    let head = |choices: Value| {
        json!({
            "id": v.get("id").cloned().unwrap_or(Value::Null),
            "object": "chat.completion.chunk",
            "created": v.get("created").cloned().unwrap_or(Value::Null),
            "model": v.get("model").cloned().unwrap_or(Value::Null),
            "choices": choices,
        })
    };
    let mut events = Vec::with_capacity(2 * choices.len() + 1);
    for (index, content, finish) in choices {
        let delta = json!([{"index": index, "delta": {"role": "assistant", "content": content}, "finish_reason": null}]);
        events.push(sse::data_event(head(delta).to_string().as_bytes()));
        let end = json!([{"index": index, "delta": {}, "finish_reason": finish}]);
        events.push(sse::data_event(head(end).to_string().as_bytes()));
    }
    events.push(Bytes::from_static(sse::DONE_EVENT));
    Some(events)
}

/// A complete recorded stream (`[DONE]` included) as a completion body.
pub fn from_events(recorded: Bytes) -> Option<Bytes> {
    let mut head: Option<Map<String, Value>> = None;
    let mut texts: std::collections::BTreeMap<u64, (String, Value)> = Default::default();
    let mut usage = Value::Null;
    let mut done = false;
    for event in sse::split_all(recorded) {
        let Some(data) = sse::data(&event) else {
            continue;
        };
        if data.as_ref() == b"[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_slice(&data).ok()?;
        if head.is_none() {
            let mut h = Map::new();
            for k in ["id", "created", "model", "system_fingerprint"] {
                if let Some(x) = v.get(k) {
                    h.insert(k.into(), x.clone());
                }
            }
            head = Some(h);
        }
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            usage = u.clone();
        }
        for c in v.get("choices")?.as_array()? {
            let index = c.get("index").and_then(Value::as_u64).unwrap_or(0);
            let entry = texts.entry(index).or_insert((String::new(), Value::Null));
            let delta = c.get("delta")?;
            if delta.get("tool_calls").is_some() || delta.get("function_call").is_some() {
                return None;
            }
            if let Some(t) = delta.get("content").and_then(Value::as_str) {
                entry.0.push_str(t);
            }
            if let Some(f) = c.get("finish_reason").filter(|f| !f.is_null()) {
                entry.1 = f.clone();
            }
        }
    }
    if !done || texts.is_empty() {
        return None;
    }
    let mut out = head.unwrap_or_default();
    out.insert("object".into(), "chat.completion".into());
    out.insert(
        "choices".into(),
        texts
            .into_iter()
            .map(|(index, (content, finish))| {
                json!({"index": index, "message": {"role": "assistant", "content": content}, "finish_reason": finish})
            })
            .collect(),
    );
    if !usage.is_null() {
        out.insert("usage".into(), usage);
    }
    Some(Value::Object(out).to_string().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMPLETION: &str = r#"{"id":"c1","object":"chat.completion","created":5,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hello world"},"finish_reason":"stop"}],"usage":{"total_tokens":3}}"#;

    #[test]
    fn a_completion_round_trips_through_a_stream() {
        let events = to_events(COMPLETION.as_bytes()).unwrap();
        assert_eq!(events.last().unwrap().as_ref(), sse::DONE_EVENT);
        let recorded: Vec<u8> = events.concat();
        let back: Value = serde_json::from_slice(&from_events(recorded.into()).unwrap()).unwrap();
        assert_eq!(back["choices"][0]["message"]["content"], "hello world");
        assert_eq!(back["choices"][0]["finish_reason"], "stop");
        assert_eq!(back["id"], "c1");
        assert_eq!(back["object"], "chat.completion");
    }

    #[test]
    fn tool_calls_and_truncated_streams_are_not_cacheable() {
        assert!(cacheable(COMPLETION.as_bytes()));
        let tool = r#"{"choices":[{"index":0,"message":{"role":"assistant","content":null,"tool_calls":[]}}]}"#;
        assert!(!cacheable(tool.as_bytes()));
        assert!(!cacheable(b"{\"error\":{}}"));
        let events = to_events(COMPLETION.as_bytes()).unwrap();
        let truncated: Vec<u8> = events[..events.len() - 1].concat();
        assert!(
            from_events(truncated.into()).is_none(),
            "no [DONE]: not stored"
        );
    }
}
