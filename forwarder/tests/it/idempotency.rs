//! Idempotent replay and coalescing of concurrent duplicates.

use std::time::Duration;

use forwarder::config::{LatencyDist, MockSettings};
use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn a_repeated_key_replays_the_stored_answer() {
    let m = mock(MockSettings::default()).await;
    let fwd = start(config(vec![upstream("a", &m, "m")])).await;
    let key = [("idempotency-key", "order-42")];
    let first = fwd
        .post("/v1/chat/completions", &chat("m", "hi"), &key)
        .await;
    let second = fwd
        .post("/v1/chat/completions", &chat("m", "hi"), &key)
        .await;
    assert_eq!(first.status, 200);
    assert_eq!(second.body, first.body, "same answer, same completion id");
    assert_eq!(second.header("idempotent-replayed"), Some("true"));
    assert_eq!(first.header("idempotent-replayed"), None);
    assert_eq!(m.model.requests(), 1);
    assert_eq!(
        fwd.metric("forwarder_idempotent_replays_total", &[]).await,
        1.0
    );

    let other = fwd
        .post("/v1/chat/completions", &chat("m", "something else"), &key)
        .await;
    assert_eq!(
        other.status, 422,
        "a key reused for another request: {}",
        other.text
    );
    assert_eq!(other.error_code(), "idempotency_key_reused");
}

#[tokio::test]
async fn the_simple_apis_request_id_is_an_idempotency_key() {
    let m = mock(MockSettings::default()).await;
    let fwd = start(config(vec![upstream("a", &m, "m")])).await;
    let body = json!({"model_id": "m", "prompt": "pay invoice", "request_id": "req-7"});
    let a = fwd.post("/api/v1/message", &body, &[]).await;
    let b = fwd.post("/api/v1/message", &body, &[]).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body, b.body);
    assert_eq!(a.body["request_id"], "req-7");
    assert_eq!(m.model.requests(), 1);
}

#[tokio::test]
async fn concurrent_duplicates_share_one_upstream_call() {
    let m = mock(MockSettings {
        latency: LatencyDist::Fixed(Duration::from_millis(300)),
        ..Default::default()
    })
    .await;
    let fwd = start(config(vec![upstream("a", &m, "m")])).await;
    let key = [("idempotency-key", "dup")];
    let body = chat("m", "hi");
    let (a, b) = tokio::join!(
        fwd.post("/v1/chat/completions", &body, &key),
        fwd.post("/v1/chat/completions", &body, &key)
    );
    assert_eq!(a.status, 200);
    assert_eq!(a.body, b.body);
    assert_eq!(
        m.model.requests(),
        1,
        "two concurrent identical requests, one upstream call"
    );
    assert_eq!(
        [
            a.header("idempotent-replayed"),
            b.header("idempotent-replayed")
        ]
        .iter()
        .filter(|h| h.is_some())
        .count(),
        1,
        "one led, one joined"
    );
}

#[tokio::test]
async fn failures_are_not_stored_so_a_retry_with_the_key_can_succeed() {
    let m = mock(MockSettings::default()).await;
    let mut cfg = config(vec![upstream("a", &m, "m")]);
    cfg.retry.max_attempts = 1;
    let fwd = start(cfg).await;
    m.model.fail_next(
        1,
        forwarder::mock_llm::Fault::Error {
            status: 503,
            retry_after: None,
        },
    );
    let key = [("idempotency-key", "k")];
    assert_eq!(
        fwd.post("/v1/chat/completions", &chat("m", "hi"), &key)
            .await
            .status,
        502
    );
    assert_eq!(
        fwd.post("/v1/chat/completions", &chat("m", "hi"), &key)
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn streams_replay_after_completion_and_refuse_duplicates_in_flight() {
    let m = mock(MockSettings {
        tokens_per_second: Some(20.0),
        ..Default::default()
    })
    .await;
    let fwd = start(config(vec![upstream("a", &m, "m")])).await;
    let mut body = chat("m", "one two three");
    body["stream"] = json!(true);
    let send = || {
        fwd.http
            .post(format!("{}/v1/chat/completions", fwd.base))
            .header("idempotency-key", "s1")
            .json(&body)
            .send()
    };
    let first = send().await.unwrap();
    assert_eq!(first.status(), 200);
    let dup = send().await.unwrap();
    assert_eq!(
        dup.status(),
        409,
        "a duplicate of a running stream is refused"
    );
    let events = sse_events(first).await;
    assert_eq!(stream_text(&events), "mock reply: one two three");
    // Storing happens just after the stream ends.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let replay = send().await.unwrap();
    assert_eq!(replay.headers().get("idempotent-replayed").unwrap(), "true");
    let replayed = sse_events(replay).await;
    assert_eq!(replayed, events, "the same chunks, then [DONE]");
    assert_eq!(m.model.requests(), 1);
}

#[tokio::test]
async fn keys_are_scoped_per_client() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.yaml");
    std::fs::write(&keys, "alice: sk-alice\nbob: sk-bob\n").unwrap();
    let m = mock(MockSettings::default()).await;
    let mut cfg = config(vec![upstream("a", &m, "m")]);
    cfg.auth.api_keys_file = Some(keys);
    let fwd = start(cfg).await;
    let a = fwd
        .post(
            "/v1/chat/completions",
            &chat("m", "hi"),
            &[("x-api-key", "sk-alice"), ("idempotency-key", "k")],
        )
        .await;
    let b = fwd
        .post(
            "/v1/chat/completions",
            &chat("m", "hi"),
            &[("x-api-key", "sk-bob"), ("idempotency-key", "k")],
        )
        .await;
    assert_eq!((a.status, b.status), (200, 200));
    assert_ne!(
        a.body["id"], b.body["id"],
        "bob does not get alice's answer"
    );
    assert_eq!(m.model.requests(), 2);
}

/// The claim on a key is a guard: a client that goes away before its stream
/// began does not leave the key locked.
#[tokio::test]
async fn a_client_that_cancels_before_the_first_event_releases_its_key() {
    let m = mock(MockSettings {
        latency: LatencyDist::Fixed(Duration::from_millis(400)),
        ..Default::default()
    })
    .await;
    let fwd = start(config(vec![upstream("a", &m, "m")])).await;
    let mut body = chat("m", "hi");
    body["stream"] = json!(true);
    let url = format!("{}/v1/chat/completions", fwd.base);
    let first = {
        let (http, url, body) = (fwd.http.clone(), url.clone(), body.clone());
        tokio::spawn(async move {
            http.post(url)
                .header("idempotency-key", "gone")
                .json(&body)
                .send()
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    first.abort();
    let _ = first.await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let again = fwd
        .post(
            "/v1/chat/completions",
            &body,
            &[("idempotency-key", "gone")],
        )
        .await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert!(again.text.ends_with("data: [DONE]\n\n"), "{}", again.text);
}
