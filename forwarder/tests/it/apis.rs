//! The APIs beside chat completions (embeddings, Responses, Anthropic
//! Messages and count_tokens) through a real forwarder: bytes pass both
//! ways, protocol headers cross, streams end on their API's terminal event
//! or with its error event, errors keep the route's shape, and the
//! pipeline's stages (auth, retries, idempotency, cache, metrics) apply.

use std::time::Duration;

use forwarder::config::{Config, ModelCacheConfig, Provider, UpstreamConfig};
use serde_json::{json, Value};

use crate::common::*;
use crate::scripted::{self, Scripted};

/// An upstream entry for `base_url` speaking `provider`.
fn upstream_at(
    name: &str,
    provider: Provider,
    base_url: String,
    models: &[&str],
) -> UpstreamConfig {
    UpstreamConfig {
        name: name.into(),
        provider,
        base_url: Some(base_url),
        models: models.iter().map(|m| m.to_string()).collect(),
        weight: 1,
        api_key_file: None,
        api_key_env: None,
        connect_timeout: Duration::from_secs(1),
        timeout: Duration::from_secs(5),
        mock: None,
        tls: None,
    }
}

/// A forwarder with API keys, in front of the scripted upstream twice:
/// models `full`, `truncated` and `reject` as an OpenAI-compatible
/// upstream, and `claude-full`, `claude-truncated` and `claude-reject` (the
/// same scenarios) as an Anthropic one, with a key of its own.
async fn fwd_with(dir: &tempfile::TempDir, up: &Scripted, tweak: impl FnOnce(&mut Config)) -> Fwd {
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "t: sk-client\n").unwrap();
    let upstream_key = dir.path().join("upstream-key");
    std::fs::write(&upstream_key, "sk-upstream-anthropic\n").unwrap();
    let mut anthropic = upstream_at(
        "anthropic",
        Provider::Anthropic,
        up.base_url(),
        &["claude-full", "claude-truncated", "claude-reject"],
    );
    anthropic.api_key_file = Some(upstream_key);
    let mut cfg = config(vec![
        upstream_at(
            "openai",
            Provider::Openai,
            up.base_url(),
            &["full", "truncated", "reject"],
        ),
        anthropic,
    ]);
    cfg.auth.api_keys_file = Some(keys);
    tweak(&mut cfg);
    start(cfg).await
}

const KEY: (&str, &str) = ("authorization", "Bearer sk-client");

#[tokio::test]
async fn embeddings_and_responses_pass_byte_for_byte_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let fwd = fwd_with(&dir, &up, |_| {}).await;
    // Odd spacing and an unknown field: what a re-encoder would change.
    let sent = r#"{ "input" : ["a", "b"],"model":"full",  "x_client":{"z":1,"a":2}}"#;
    let r = fwd
        .post_raw(
            "/v1/embeddings",
            sent.into(),
            &[KEY, ("openai-beta", "x=1")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.text, scripted::FULL_EMBEDDINGS);
    let (body, headers) = up.last("embeddings:full");
    assert_eq!(body, sent.as_bytes());
    assert_eq!(headers["openai-beta"], "x=1");
    assert!(
        headers.get("authorization").is_none(),
        "the client's key stays here"
    );

    let sent = r#"{"model":"full","input":[{"role":"user","content":"hi"}], "reasoning":{"effort":"low"}}"#;
    let r = fwd.post_raw("/v1/responses", sent.into(), &[KEY]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.text, scripted::FULL_RESPONSE);
    assert_eq!(up.last("responses:full").0, sent.as_bytes());

    let streamed = r#"{"model":"full","input":"hi","stream":true}"#;
    let r = fwd.post_raw("/v1/responses", streamed.into(), &[KEY]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert_eq!(r.text, scripted::RESPONSE_STREAM.concat());
}

#[tokio::test]
async fn messages_pass_byte_for_byte_with_their_headers_and_the_upstreams_key() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let fwd = fwd_with(&dir, &up, |_| {}).await;
    let sent = r#"{"model":"claude-full", "max_tokens":64,"system":[{"type":"text","text":"be brief","cache_control":{"type":"ephemeral"}}],
      "tools":[{"name":"lookup","input_schema":{"type":"object"}}],"messages":[{"role":"user","content":"policy?"}]}"#;
    let headers = [
        ("x-api-key", "sk-client"),
        ("anthropic-version", "2023-06-01"),
        (
            "anthropic-beta",
            "prompt-caching-2024-07-31,tools-2024-05-16",
        ),
    ];
    let r = fwd.post_raw("/v1/messages", sent.into(), &headers).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.text, scripted::FULL_MESSAGE);
    assert_eq!(
        r.header("anthropic-ratelimit-requests-remaining"),
        Some("41")
    );
    assert_eq!(r.header("x-internal-secret"), None);
    let (body, seen) = up.last("messages:claude-full");
    assert_eq!(body, sent.as_bytes());
    assert_eq!(seen["anthropic-version"], "2023-06-01");
    assert_eq!(
        seen["anthropic-beta"],
        "prompt-caching-2024-07-31,tools-2024-05-16"
    );
    assert_eq!(seen["x-api-key"], "sk-upstream-anthropic");
    assert!(seen.get("authorization").is_none());

    // Streamed: every event verbatim, the vendor's own included, ending
    // at message_stop.
    let streamed = sent.replacen("\"max_tokens\":64", "\"max_tokens\":64,\"stream\":true", 1);
    let r = fwd.post_raw("/v1/messages", streamed.into(), &[KEY]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert_eq!(r.text, scripted::MESSAGE_STREAM.concat());
    // Bearer works too, and a client without anthropic-version gets the
    // default one upstream.
    assert_eq!(
        up.last("messages:claude-full").1["anthropic-version"],
        "2023-06-01"
    );

    let count = r#"{"model":"claude-full","messages":[{"role":"user","content":"x"}]}"#;
    let r = fwd
        .post_raw("/v1/messages/count_tokens", count.into(), &headers)
        .await;
    assert_eq!(
        (r.status, r.text.as_str()),
        (200, r#"{"input_tokens": 52}"#)
    );
    assert_eq!(up.last("count_tokens:claude-full").0, count.as_bytes());
}

#[tokio::test]
async fn a_stream_cut_mid_answer_ends_with_the_apis_error_event() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let fwd = fwd_with(&dir, &up, |_| {}).await;
    let body = json!({"model": "claude-truncated", "max_tokens": 5, "stream": true,
        "messages": [{"role": "user", "content": "x"}]});
    let r = fwd.post("/v1/messages", &body, &[KEY]).await;
    assert_eq!(r.status, 200);
    let relayed: String = scripted::MESSAGE_STREAM[..5].concat();
    assert!(r.text.starts_with(&relayed), "{}", r.text);
    let tail = &r.text[relayed.len()..];
    assert!(tail.starts_with("event: error\ndata: "), "{tail}");
    let data: Value = serde_json::from_str(tail["event: error\ndata: ".len()..].trim()).unwrap();
    assert_eq!(data["type"], "error");
    assert_eq!(data["error"]["type"], "api_error");
    assert!(!r.text.contains("message_stop"));

    let body = json!({"model": "truncated", "input": "x", "stream": true});
    let r = fwd.post("/v1/responses", &body, &[KEY]).await;
    assert_eq!(r.status, 200);
    let relayed: String = scripted::RESPONSE_STREAM[..3].concat();
    let tail = r.text.strip_prefix(&relayed).expect("events relayed first");
    let data: Value = serde_json::from_str(
        tail.strip_prefix("event: error\ndata: ")
            .expect("an error event")
            .trim(),
    )
    .unwrap();
    assert_eq!(data["type"], "error");
    assert_eq!(data["code"], "bad_gateway");
    assert_eq!(data["sequence_number"], 2, "the next after 0 and 1");
    assert!(!r.text.contains("response.completed"));
    // Counted as failed upstream, not as a success.
    assert_eq!(
        fwd.metric(
            "forwarder_upstream_requests_total",
            &[
                ("upstream", "anthropic"),
                ("model", "claude-truncated"),
                ("outcome", "protocol_error")
            ],
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn errors_on_the_messages_routes_are_in_anthropics_shape() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let fwd = fwd_with(&dir, &up, |c| c.server.max_body_bytes = 4096).await;
    let msg = |model: &str| json!({"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]});
    let check = |r: &Resp, status: u16, kind: &str| {
        assert_eq!(r.status, status, "{}", r.text);
        assert_eq!(r.body["type"], "error", "{}", r.text);
        assert_eq!(r.body["error"]["type"], kind, "{}", r.text);
        assert!(r.body["error"]["message"].is_string(), "{}", r.text);
    };
    let r = fwd.post("/v1/messages", &msg("claude-full"), &[]).await;
    check(&r, 401, "authentication_error");
    let r = fwd
        .post(
            "/v1/messages",
            &msg("claude-full"),
            &[("x-api-key", "wrong")],
        )
        .await;
    check(&r, 401, "authentication_error");
    let r = fwd
        .post_raw("/v1/messages", b"{\"model\":".to_vec(), &[KEY])
        .await;
    check(&r, 400, "invalid_request_error");
    let r = fwd
        .post(
            "/v1/messages",
            &json!({"model": "claude-full", "messages": []}),
            &[KEY],
        )
        .await;
    check(&r, 400, "invalid_request_error");
    let r = fwd
        .post("/v1/messages", &msg("no-such-model"), &[KEY])
        .await;
    check(&r, 404, "not_found_error");
    let big = json!({"model": "claude-full", "messages": [{"role": "user", "content": "x".repeat(8192)}]});
    let r = fwd.post("/v1/messages", &big, &[KEY]).await;
    check(&r, 413, "request_too_large");
    // count_tokens for a model whose upstreams speak only OpenAI's APIs:
    // refused (no equivalent), not forwarded.
    let r = fwd
        .post("/v1/messages/count_tokens", &msg("full"), &[KEY])
        .await;
    check(&r, 400, "invalid_request_error");
    assert!(r.text.contains("translation"), "{}", r.text);
    // A Messages field with no chat equivalent is refused, naming it.
    let mut top_k = msg("full");
    top_k["top_k"] = json!(5);
    let r = fwd.post("/v1/messages", &top_k, &[KEY]).await;
    check(&r, 400, "invalid_request_error");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("top_k"),
        "{}",
        r.text
    );
    let r = fwd
        .post("/v1/messages/count_tokens", &msg("no-such-model"), &[KEY])
        .await;
    check(&r, 404, "not_found_error");
    // The upstream's own 4xx body, byte for byte.
    let r = fwd
        .post("/v1/messages", &msg("claude-reject"), &[KEY])
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.text, scripted::ANTHROPIC_REJECT);
    // And the other way: an OpenAI route keeps OpenAI's shape.
    let r = fwd
        .post(
            "/v1/embeddings",
            &json!({"model": "claude-full", "input": "x"}),
            &[KEY],
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.error_code(), "invalid_request");
    let r = fwd
        .post("/v1/embeddings", &json!({"model": "full"}), &[KEY])
        .await;
    assert_eq!((r.status, r.error_code()), (400, "invalid_request"));
}

/// A forwarder in front of a mock-llm server, which speaks both families:
/// `emb` and `gpt` through it as an OpenAI-compatible upstream, `claude`
/// as an Anthropic one; embeddings of `emb` cached.
async fn with_mock(m: &forwarder::mock_llm::MockServer) -> Fwd {
    let mut cfg = config(vec![
        upstream_at("oa", Provider::Openai, m.base_url(), &["emb", "gpt"]),
        upstream_at("an", Provider::Anthropic, m.base_url(), &["claude"]),
    ]);
    cfg.cache
        .models
        .insert("emb".into(), ModelCacheConfig::default());
    start(cfg).await
}

#[tokio::test]
async fn retries_idempotency_cache_and_metrics_apply_to_the_new_apis() {
    use forwarder::mock_llm::Fault;
    let m = mock(Default::default()).await;
    let fwd = with_mock(&m).await;
    let calls = || m.model.requests();

    // Embeddings are cached whatever their temperature: one upstream call.
    let emb = json!({"model": "emb", "input": ["a", "b c"]});
    let first = fwd.post("/v1/embeddings", &emb, &[]).await;
    assert_eq!((first.status, first.header("x-cache")), (200, Some("MISS")));
    assert_eq!(first.body["data"][1]["index"], 1);
    let mut second = None;
    for _ in 0..50 {
        // The entry is written in the background.
        let r = fwd.post("/v1/embeddings", &emb, &[]).await;
        if r.header("x-cache") == Some("HIT") {
            second = Some(r);
            break;
        }
        tokio::time::sleep(10 * MS).await;
    }
    let second = second.expect("the second identical request is a cache hit");
    assert_eq!(second.text, first.text);
    let upstream_calls = calls();
    // The same body on the Responses API is another request.
    let r = fwd
        .post(
            "/v1/responses",
            &json!({"model": "emb", "input": ["a", "b c"]}),
            &[],
        )
        .await;
    assert_eq!((r.status, r.header("x-cache")), (200, None), "{}", r.text);
    assert_eq!(calls(), upstream_calls + 1);

    // A 503 is retried on the Messages route as on chat completions.
    m.model.fail_next(
        1,
        Fault::Error {
            status: 503,
            retry_after: None,
        },
    );
    let msg = json!({"model": "claude", "max_tokens": 20, "messages": [{"role": "user", "content": "hello there"}]});
    let before = calls();
    let r = fwd.post("/v1/messages", &msg, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["content"][0]["text"], "mock reply: hello there");
    assert_eq!(calls(), before + 2);
    assert_eq!(
        fwd.metric(
            "forwarder_retries_total",
            &[("upstream", "an"), ("reason", "server_error")]
        )
        .await,
        1.0
    );

    // Idempotency: a repeat is the first answer, the upstream called once,
    // whole and streamed.
    let key = [("idempotency-key", "msg-1")];
    let before = calls();
    let a = fwd.post("/v1/messages", &msg, &key).await;
    let b = fwd.post("/v1/messages", &msg, &key).await;
    assert_eq!((a.status, b.status), (200, 200));
    assert_eq!(a.text, b.text);
    assert_eq!(b.header("idempotent-replayed"), Some("true"));
    assert_eq!(calls(), before + 1);
    let mut streamed = msg.clone();
    streamed["stream"] = json!(true);
    let key = [("idempotency-key", "msg-2")];
    let a = fwd.post("/v1/messages", &streamed, &key).await;
    assert!(a
        .text
        .ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));
    let mut b = None;
    for _ in 0..50 {
        // The stream is stored once it has ended.
        let r = fwd.post("/v1/messages", &streamed, &key).await;
        if r.status == 200 {
            b = Some(r);
            break;
        }
        tokio::time::sleep(10 * MS).await;
    }
    let b = b.expect("the stream is replayed");
    assert_eq!(b.text, a.text);
    assert_eq!(b.header("idempotent-replayed"), Some("true"));
    // The same key with the same body on another API is a different
    // request (never the stored message): refused as a reused key.
    let r = fwd
        .post(
            "/v1/messages/count_tokens",
            &msg,
            &[("idempotency-key", "msg-1")],
        )
        .await;
    assert_eq!(r.status, 422, "{}", r.text);
    assert_eq!(r.body["error"]["type"], "invalid_request_error");
    let r = fwd.post("/v1/messages/count_tokens", &msg, &[]).await;
    assert_eq!(r.body, json!({"input_tokens": 2}));

    // Requests are counted under their model, like chat completions.
    let ok = fwd
        .metric_sum(
            "forwarder_requests_total",
            &[("protocol", "http"), ("model", "claude"), ("code", "200")],
        )
        .await;
    assert_eq!(ok, 6.0);
}

#[tokio::test]
async fn an_upstream_error_event_is_relayed_and_the_stream_marked_failed() {
    use forwarder::mock_llm::Fault;
    let m = mock(Default::default()).await;
    let fwd = with_mock(&m).await;
    let body = json!({"model": "claude", "max_tokens": 20, "stream": true,
        "messages": [{"role": "user", "content": "a b c d"}]});
    m.model.fail_next(1, Fault::StreamError);
    let r = fwd.post("/v1/messages", &body, &[]).await;
    assert_eq!(r.status, 200);
    let names: Vec<&str> = r
        .text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    // Two events, the upstream's error as it sent it, then the forwarder's
    // own: the stream never reached message_stop.
    assert_eq!(
        names,
        ["message_start", "content_block_start", "error", "error"],
        "{}",
        r.text
    );
    assert!(r.text.contains("\"overloaded_error\""));
    m.model.fail_next(1, Fault::Cut);
    let r = fwd.post("/v1/messages", &body, &[]).await;
    let names: Vec<&str> = r
        .text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(names, ["message_start", "content_block_start", "error"]);
    assert_eq!(
        fwd.metric(
            "forwarder_requests_total",
            &[
                ("protocol", "http"),
                ("api", "messages"),
                ("model", "claude"),
                ("code", "502"),
            ],
        )
        .await,
        2.0
    );
}

#[tokio::test]
async fn messages_for_an_openai_upstream_are_translated_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let fwd = fwd_with(&dir, &up, |_| {}).await;
    let req = json!({"model": "full", "max_tokens": 64, "system": "be brief",
        "tools": [{"name": "lookup", "input_schema": {"type": "object"}}],
        "messages": [{"role": "user", "content": "policy?"}]});
    let r = fwd
        .post(
            "/v1/messages",
            &req,
            &[KEY, ("anthropic-version", "2023-06-01")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["type"], "message");
    assert_eq!(
        r.body["content"][0],
        json!({"type": "text", "text": "Hello \u{e9} there"})
    );
    assert_eq!(
        r.body["content"][1],
        json!({"type": "tool_use", "id": "call_1", "name": "lookup", "input": {"q": "return policy"}})
    );
    assert_eq!(r.body["stop_reason"], "tool_use");
    assert_eq!(
        r.body["usage"],
        json!({"input_tokens": 8, "cache_read_input_tokens": 4, "output_tokens": 7})
    );
    // The upstream got a chat completion, without Anthropic's headers.
    let (body, headers) = up.last("full");
    let chat: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        chat["messages"][0],
        json!({"role": "system", "content": "be brief"})
    );
    assert_eq!(
        chat["messages"][1],
        json!({"role": "user", "content": "policy?"})
    );
    assert_eq!(chat["tools"][0]["function"]["name"], "lookup");
    assert!(headers.get("anthropic-version").is_none());

    let mut streamed = req.clone();
    streamed["stream"] = json!(true);
    let r = fwd.post("/v1/messages", &streamed, &[KEY]).await;
    assert_eq!(r.status, 200);
    let names: Vec<&str> = r
        .text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(
        names,
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
        ],
        "{}",
        r.text
    );
    assert!(
        r.text.contains(r#""partial_json":"{\"q\":\"x\"}""#),
        "{}",
        r.text
    );
    assert!(r.text.contains(r#""stop_reason":"tool_use""#));
    // The keep-alive comment passed as it came.
    assert!(r.text.contains(": keep-alive\n\n"));
    let chat: Value = serde_json::from_slice(&up.last("full").0).unwrap();
    assert_eq!(chat["stream_options"], json!({"include_usage": true}));

    // Cut before it finished: the client's stream ends with an error event.
    let mut cut = streamed;
    cut["model"] = json!("truncated");
    let r = fwd.post("/v1/messages", &cut, &[KEY]).await;
    let names: Vec<&str> = r
        .text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(names.last(), Some(&"error"), "{}", r.text);
    assert!(!names.contains(&"message_stop"));
}

/// Malformed and odd bodies on every new route, to the built-in mock, a
/// mock-llm server and the translation: each gets an answer in its route's
/// shape (never a dropped connection), and the forwarder stays up.
#[tokio::test]
async fn odd_bodies_get_answers_in_the_routes_shape() {
    let m = mock(Default::default()).await;
    let fwd = with_mock(&m).await;
    let bodies: &[&[u8]] = &[
        b"",
        b"null",
        b"[]",
        b"{\"model\":1}",
        b"\xff\xfe",
        br#"{"model":"MODEL","messages":"x","input":{}}"#,
        br#"{"model":"MODEL","messages":[1,null,{}],"input":[[1,2],["x"]],"max_tokens":-1}"#,
        br#"{"model":"MODEL","messages":[{"role":"user","content":[{"type":"image"},{"type":"tool_result","content":[{"type":"image"}]}]}],"max_tokens":5,"input":[{"role":"user","content":[{"type":"input_text"}]}]}"#,
        br#"{"model":"MODEL","messages":[{"role":"assistant","content":[{"type":"tool_use","input":"not an object"}]}],"max_tokens":5,"input":"x","dimensions":0,"stream":true}"#,
        br#"{"model":"MODEL","messages":[{"role":"user","content":"x"}],"max_tokens":5,"tools":[{}],"tool_choice":{"type":"other"},"input":"x","encoding_format":"hex"}"#,
    ];
    for path in [
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/responses",
        "/v1/embeddings",
    ] {
        let anthropic = path.starts_with("/v1/messages");
        for model in ["mock", "emb", "claude", "gpt"] {
            for body in bodies {
                let body = String::from_utf8_lossy(body).replace("MODEL", model);
                let r = fwd.post_raw(path, body.clone().into_bytes(), &[]).await;
                assert!(
                    (200..500).contains(&r.status),
                    "{path} {body}: {} {}",
                    r.status,
                    r.text
                );
                if r.status >= 400 {
                    if anthropic {
                        assert_eq!(r.body["type"], "error", "{path} {body}: {}", r.text);
                        assert!(r.body["error"]["message"].is_string(), "{}", r.text);
                    } else {
                        assert!(
                            r.body["error"]["message"].is_string(),
                            "{path} {body}: {}",
                            r.text
                        );
                    }
                }
            }
        }
    }
    assert_eq!(fwd.get("/healthz", &[]).await.status, 200);
}

#[tokio::test]
async fn chat_completions_for_an_anthropic_upstream_are_translated_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let fwd = fwd_with(&dir, &up, |_| {}).await;
    let req = json!({"model": "claude-full", "max_tokens": 64,
        "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "policy?"}]});
    let r = fwd.post("/v1/chat/completions", &req, &[KEY]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let choice = &r.body["choices"][0];
    assert_eq!(choice["message"]["content"], "Let me look \u{e9}");
    assert_eq!(
        choice["message"]["tool_calls"][0]["function"],
        json!({"name": "lookup", "arguments": "{\"q\":\"return policy\"}"})
    );
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(
        r.body["usage"],
        json!({"prompt_tokens": 55, "completion_tokens": 7, "total_tokens": 62,
            "prompt_tokens_details": {"cached_tokens": 40}})
    );
    // The upstream got a Messages request, with its key and version.
    let (body, headers) = up.last("messages:claude-full");
    let sent: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(sent["system"], "be brief");
    assert_eq!(
        sent["messages"],
        json!([{"role": "user", "content": [{"type": "text", "text": "policy?"}]}])
    );
    assert_eq!(
        sent["tools"][0],
        json!({"name": "lookup", "input_schema": {"type": "object"}})
    );
    assert_eq!(headers["x-api-key"], "sk-upstream-anthropic");
    assert_eq!(headers["anthropic-version"], "2023-06-01");

    let mut streamed = req.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let resp = fwd
        .http
        .post(format!("{}/v1/chat/completions", fwd.base))
        .header("authorization", "Bearer sk-client")
        .json(&streamed)
        .send()
        .await
        .unwrap();
    let events = sse_events(resp).await;
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let args: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str())
        .collect();
    assert_eq!(args, "{\"q\": \"x\"}");
    assert!(chunks
        .iter()
        .any(|c| c["choices"][0]["finish_reason"] == "tool_calls"));
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 9);

    // The simple API rides the same translation.
    let r = fwd
        .post(
            "/api/v1/message",
            &json!({"model_id": "claude-full", "prompt": "hi"}),
            &[KEY],
        )
        .await;
    assert_eq!(
        (r.status, r.body["reply"].as_str()),
        (200, Some("Let me look \u{e9}"))
    );
    // A chat field with no Messages equivalent is refused, naming it.
    let mut n = req;
    n["n"] = json!(2);
    let r = fwd.post("/v1/chat/completions", &n, &[KEY]).await;
    assert_eq!((r.status, r.error_code()), (400, "<none>"), "{}", r.text);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("n:"),
        "{}",
        r.text
    );
}
