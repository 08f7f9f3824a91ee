use forwarder::config::{Config, MockSettings};
use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn embedded_defaults_answer_on_every_endpoint() {
    let mut cfg = Config::default();
    cfg.server.listen = loopback();
    let fwd = start(cfg).await;

    let r = fwd
        .post(
            "/api/v1/message",
            &json!({"model_id": "mock", "prompt": "hello world"}),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["reply"], "mock reply: hello world");
    assert_eq!(r.body["model_id"], "mock");
    assert_eq!(r.body["usage"]["completion_tokens"], 4);
    let generated = r
        .header("x-request-id")
        .expect("request id returned")
        .to_string();
    assert_eq!(r.body["request_id"], generated.as_str());

    let r = fwd
        .post("/v1/chat/completions", &chat("mock", "hi"), &[])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["object"], "chat.completion");
    assert_eq!(r.body["choices"][0]["message"]["content"], "mock reply: hi");
    assert_eq!(r.body["choices"][0]["finish_reason"], "stop");

    let r = fwd.get("/v1/models", &[]).await;
    assert_eq!(r.body["object"], "list");
    assert_eq!(r.body["data"][0]["id"], "mock");

    assert_eq!(fwd.get("/healthz", &[]).await.status, 200);
    assert_eq!(fwd.get("/readyz", &[]).await.status, 200);
    let m = fwd.get("/metrics", &[]).await;
    assert!(m.text.contains("forwarder_requests_total"), "{}", m.text);
}

#[tokio::test]
async fn client_request_ids_are_echoed_and_unsafe_ones_replaced() {
    let mut cfg = Config::default();
    cfg.server.listen = loopback();
    let fwd = start(cfg).await;
    let body = json!({"model_id": "mock", "prompt": "x"});
    let r = fwd
        .post("/api/v1/message", &body, &[("x-request-id", "trace-123")])
        .await;
    assert_eq!(r.header("x-request-id"), Some("trace-123"));
    let long = "a".repeat(300);
    let r = fwd
        .post("/api/v1/message", &body, &[("x-request-id", &long)])
        .await;
    let id = r.header("x-request-id").unwrap();
    assert_ne!(id, long);
    assert_eq!(id.len(), 36, "a generated UUID replaces an oversized id");
}

#[tokio::test]
async fn openai_upstream_gets_the_request_and_parameters() {
    let m = mock(MockSettings::default()).await;
    let fwd = start(config(vec![upstream("a", &m, "gpt-test")])).await;
    let mut body = chat("gpt-test", "one two three four five");
    body["max_tokens"] = json!(3);
    body["temperature"] = json!(0.2);
    let r = fwd.post("/v1/chat/completions", &body, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.body["choices"][0]["message"]["content"], "mock reply: one",
        "max_tokens passed through to the upstream"
    );
    assert_eq!(m.model.requests(), 1);

    let r = fwd
        .post(
            "/api/v1/message",
            &json!({"model_id": "gpt-test", "prompt": "a b c", "max_tokens": 2}),
            &[],
        )
        .await;
    assert_eq!(r.body["reply"], "mock reply:");
}

#[tokio::test]
async fn wrong_methods_get_405_with_a_json_error_and_models_can_be_read_one_by_one() {
    let mut cfg = forwarder::config::Config::default();
    cfg.server.listen = loopback();
    let fwd = start(cfg).await;
    let r = fwd.get("/v1/chat/completions", &[]).await;
    assert_eq!(r.status, 405, "{}", r.text);
    assert_eq!(r.error_code(), "method_not_allowed");
    assert_eq!(r.body["error"]["type"], "invalid_request_error");

    let r = fwd.get("/v1/models/mock", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["id"], "mock");
    assert_eq!(r.body["object"], "model");
    let r = fwd.get("/v1/models/nope", &[]).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code(), "model_not_found");
}
