//! Every error status, in the OpenAI error shape.

use std::time::Duration;

use forwarder::config::{Config, MockSettings, RateLimitConfig};
use forwarder::mock_llm::Fault;
use serde_json::json;

use crate::common::*;

fn assert_error_shape(r: &Resp, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.text);
    assert_eq!(r.error_code(), code, "{}", r.text);
    assert!(r.body["error"]["message"].is_string(), "{}", r.text);
    assert!(r.body["error"]["type"].is_string(), "{}", r.text);
}

#[tokio::test]
async fn bad_input_gets_400_404_and_413() {
    let mut cfg = Config::default();
    cfg.server.listen = loopback();
    cfg.server.max_body_bytes = 1024;
    let fwd = start(cfg).await;

    let r = fwd
        .post_raw("/v1/chat/completions", b"{not json".to_vec(), &[])
        .await;
    assert_error_shape(&r, 400, "invalid_request");
    let r = fwd
        .post("/v1/chat/completions", &json!({"messages": []}), &[])
        .await;
    assert_error_shape(&r, 400, "invalid_request");
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("model"));
    let r = fwd
        .post(
            "/v1/chat/completions",
            &json!({"model": "mock", "messages": []}),
            &[],
        )
        .await;
    assert_error_shape(&r, 400, "invalid_request");
    let r = fwd
        .post("/api/v1/message", &json!({"model_id": "mock"}), &[])
        .await;
    assert_error_shape(&r, 400, "invalid_request");
    let r = fwd
        .post_raw("/api/v1/message", vec![0xff, 0xfe, 0x00], &[])
        .await;
    assert_error_shape(&r, 400, "invalid_request");

    let r = fwd
        .post("/v1/chat/completions", &chat("no-such-model", "hi"), &[])
        .await;
    assert_error_shape(&r, 404, "model_not_found");
    let r = fwd.get("/v2/nothing", &[]).await;
    assert_eq!(r.status, 404);

    let big = "x".repeat(4096);
    let r = fwd
        .post("/v1/chat/completions", &chat("mock", &big), &[])
        .await;
    assert_error_shape(&r, 413, "request_too_large");

    // The server is still healthy after all of that.
    let r = fwd
        .post("/v1/chat/completions", &chat("mock", "still here"), &[])
        .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn rate_limit_gives_429_with_retry_after() {
    let mut cfg = Config::default();
    cfg.server.listen = loopback();
    cfg.rate_limit = Some(RateLimitConfig {
        requests_per_second: 1,
        burst: 2,
        ..Default::default()
    });
    let fwd = start(cfg).await;
    let body = chat("mock", "hi");
    assert_eq!(
        fwd.post("/v1/chat/completions", &body, &[]).await.status,
        200
    );
    assert_eq!(
        fwd.post("/v1/chat/completions", &body, &[]).await.status,
        200
    );
    let r = fwd.post("/v1/chat/completions", &body, &[]).await;
    assert_error_shape(&r, 429, "rate_limit_exceeded");
    let after: u64 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=2).contains(&after), "retry-after {after}");
}

#[tokio::test]
async fn upstream_failures_map_to_502_504_and_pass_through_4xx() {
    let m = mock(MockSettings::default()).await;
    let mut u = upstream("a", &m, "m");
    u.timeout = Duration::from_millis(200);
    let mut cfg = config(vec![u]);
    cfg.retry.max_attempts = 1;
    let fwd = start(cfg).await;
    let body = chat("m", "hi");

    m.model.fail_next(
        1,
        Fault::Error {
            status: 500,
            retry_after: None,
        },
    );
    assert_error_shape(
        &fwd.post("/v1/chat/completions", &body, &[]).await,
        502,
        "bad_gateway",
    );

    m.model.fail_next(1, Fault::Reset);
    assert_error_shape(
        &fwd.post("/v1/chat/completions", &body, &[]).await,
        502,
        "bad_gateway",
    );

    m.model.fail_next(1, Fault::Hang);
    assert_error_shape(
        &fwd.post("/v1/chat/completions", &body, &[]).await,
        504,
        "upstream_timeout",
    );

    m.model.fail_next(
        1,
        Fault::Error {
            status: 429,
            retry_after: Some(Duration::from_secs(7)),
        },
    );
    let r = fwd.post("/v1/chat/completions", &body, &[]).await;
    assert_error_shape(&r, 429, "rate_limit_exceeded");
    assert_eq!(
        r.header("retry-after"),
        Some("7"),
        "the upstream's Retry-After is passed on"
    );

    m.model.fail_next(
        1,
        Fault::Error {
            status: 400,
            retry_after: None,
        },
    );
    // An upstream 4xx reaches the client as the upstream sent it.
    let r = fwd.post("/v1/chat/completions", &body, &[]).await;
    assert_error_shape(&r, 400, "injected_fault");
    assert!(r.body["error"]["param"].is_null(), "{}", r.text);
}

#[tokio::test]
async fn overall_deadline_bounds_retries_with_504() {
    let m = mock(MockSettings::default()).await;
    let mut u = upstream("a", &m, "m");
    u.timeout = Duration::from_secs(10);
    let mut cfg = config(vec![u]);
    cfg.server.request_timeout = Duration::from_millis(300);
    let fwd = start(cfg).await;
    m.model.fail_next(1, Fault::Hang);
    let started = std::time::Instant::now();
    let r = fwd
        .post("/v1/chat/completions", &chat("m", "hi"), &[])
        .await;
    assert_error_shape(&r, 504, "upstream_timeout");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_secs(3),
        "took {took:?}"
    );
}

#[tokio::test]
async fn max_concurrency_queues_and_sheds_with_503() {
    let m = mock(MockSettings {
        tokens_per_second: Some(5.0),
        reply_words: 5,
        ..Default::default()
    })
    .await;
    let mut cfg = config(vec![upstream("a", &m, "m")]);
    cfg.server.max_concurrency = Some(1);
    let fwd = start(cfg).await;
    // A slow stream holds the only slot…
    let mut body = chat("m", "hold");
    body["stream"] = json!(true);
    let stream = fwd
        .http
        .post(format!("{}/v1/chat/completions", fwd.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    // …one more request may wait for it…
    let waiter = {
        let (http, url) = (
            fwd.http.clone(),
            format!("{}/v1/chat/completions", fwd.base),
        );
        tokio::spawn(async move {
            http.post(url)
                .json(&chat("m", "waiting"))
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    // …and a third is shed at once instead of queueing without bound.
    let started = std::time::Instant::now();
    let r = fwd.post("/v1/chat/completions", &chat("m", "x"), &[]).await;
    assert_error_shape(&r, 503, "overloaded");
    assert!(started.elapsed() < Duration::from_millis(200));
    assert!(
        !waiter.is_finished(),
        "the waiter is still queued behind the stream"
    );
    drop(stream);
    assert_eq!(waiter.await.unwrap(), 200, "the waiter got the freed slot");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = fwd.post("/v1/chat/completions", &chat("m", "x"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
}
