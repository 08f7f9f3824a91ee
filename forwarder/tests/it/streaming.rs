//! Server-Sent Events: order, termination, retry before the first chunk,
//! and a clean error event when the upstream stalls mid-stream.

use std::time::Duration;

use forwarder::config::MockSettings;
use forwarder::mock_llm::Fault;
use serde_json::{json, Value};

use crate::common::*;

fn stream_body(model: &str, prompt: &str) -> Value {
    let mut b = chat(model, prompt);
    b["stream"] = json!(true);
    b
}

async fn open(fwd: &Fwd, body: &Value) -> reqwest::Response {
    fwd.http
        .post(format!("{}/v1/chat/completions", fwd.base))
        .json(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn streams_every_token_in_order_then_done() {
    let m = mock(MockSettings {
        tokens_per_second: Some(200.0),
        ..Default::default()
    })
    .await;
    let fwd = start(config(vec![upstream("a", &m, "m")])).await;
    let mut body = stream_body("m", "one two three four five six");
    body["stream_options"] = json!({"include_usage": true});
    let resp = open(&fwd, &body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let events = sse_events(resp).await;
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    assert_eq!(events.iter().filter(|e| *e == "[DONE]").count(), 1);
    assert_eq!(
        stream_text(&events),
        "mock reply: one two three four five six"
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("each event is a JSON chunk"))
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    // With include_usage, usage comes last in a chunk of its own.
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], 8);
}

#[tokio::test]
async fn the_builtin_mock_streams_too() {
    let mut cfg = forwarder::config::Config::default();
    cfg.server.listen = loopback();
    let fwd = start(cfg).await;
    let events = sse_events(open(&fwd, &stream_body("mock", "a b")).await).await;
    assert_eq!(stream_text(&events), "mock reply: a b");
    assert_eq!(events.last().unwrap(), "[DONE]");
}

#[tokio::test]
async fn retries_a_stream_that_fails_before_its_first_chunk() {
    let m = mock(MockSettings::default()).await;
    let fwd = start(config(vec![upstream("a", &m, "m")])).await;
    m.model.fail_next(
        2,
        Fault::Error {
            status: 503,
            retry_after: None,
        },
    );
    let events = sse_events(open(&fwd, &stream_body("m", "x y")).await).await;
    assert_eq!(stream_text(&events), "mock reply: x y");
    assert_eq!(m.model.requests(), 3);
}

#[tokio::test]
async fn a_stream_failing_before_any_chunk_is_a_plain_error_response() {
    let m = mock(MockSettings {
        error_rate: 1.0,
        ..Default::default()
    })
    .await;
    let mut cfg = config(vec![upstream("a", &m, "m")]);
    cfg.retry.max_attempts = 2;
    let fwd = start(cfg).await;
    let resp = open(&fwd, &stream_body("m", "x")).await;
    assert_eq!(resp.status(), 502);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_gateway");
}

#[tokio::test]
async fn a_stall_after_the_first_chunk_ends_with_an_error_event_and_no_retry() {
    // The first two chunks come at once; the rest are paced at 1 per second,
    // longer than the 300 ms idle timeout.
    let m = mock(MockSettings {
        tokens_per_second: Some(1.0),
        ..Default::default()
    })
    .await;
    let mut u = upstream("a", &m, "m");
    u.timeout = Duration::from_millis(300);
    let fwd = start(config(vec![u])).await;
    let resp = open(&fwd, &stream_body("m", "slow words here")).await;
    assert_eq!(resp.status(), 200, "headers were sent with the first chunk");
    let events = sse_events(resp).await;
    assert!(stream_text(&events).starts_with("mock"), "{events:?}");
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_timeout", "{events:?}");
    assert!(
        !events.iter().any(|e| e == "[DONE]"),
        "a failed stream is not marked done"
    );
    assert_eq!(m.model.requests(), 1, "bytes reached the client: no retry");
    assert_eq!(
        fwd.metric(
            "forwarder_requests_total",
            &[
                ("protocol", "http"),
                ("api", "chat_completions"),
                ("model", "m"),
                ("code", "504")
            ]
        )
        .await,
        1.0
    );
}
