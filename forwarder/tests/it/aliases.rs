//! Model aliases: a client's model name served by weighted targets with an
//! ordered fallback chain, the body's `model` rewritten (or not) as the
//! alias says, and the answer marked with the model that served it.

use forwarder::config::{AliasConfig, AliasTarget, MockSettings};
use forwarder::mock_llm::Fault;
use serde_json::json;

use crate::common::*;

fn target(model: &str, weight: u32) -> AliasTarget {
    AliasTarget {
        model: model.into(),
        weight,
    }
}

#[tokio::test]
async fn an_alias_falls_back_along_its_chain_and_says_what_served_it() {
    let big = mock(MockSettings::default()).await;
    let small = mock(MockSettings::default()).await;
    let mut cfg = config(vec![
        upstream("a", &big, "big"),
        upstream("b", &small, "small"),
    ]);
    cfg.retry.max_attempts = 2;
    // Failures below are deliberate: keep the circuits closed.
    cfg.circuit_breaker.failure_threshold = 100;
    cfg.models.insert(
        "fast".into(),
        AliasConfig {
            targets: vec![target("big", 1), target("small", 0)],
            rewrite_model: true,
        },
    );
    cfg.models.insert(
        "keep".into(),
        AliasConfig {
            targets: vec![target("small", 1)],
            rewrite_model: false,
        },
    );
    let fwd = start(cfg).await;
    let models = fwd.get("/v1/models", &[]).await;
    let ids: Vec<&str> = models.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["big", "fast", "keep", "small"]);

    // The weighted first choice; the body's model is the target's.
    let r = fwd
        .post("/v1/chat/completions", &chat("fast", "hi"), &[])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-forwarded-model"), Some("big"));
    assert_eq!(
        r.body["model"], "big",
        "the mock echoes the model it was sent"
    );
    assert_eq!((big.model.requests(), small.model.requests()), (1, 0));

    // The first target fails after its retries: the next one answers.
    big.model.fail_next(
        2,
        Fault::Error {
            status: 503,
            retry_after: None,
        },
    );
    let r = fwd
        .post("/v1/chat/completions", &chat("fast", "hi"), &[])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-forwarded-model"), Some("small"));
    assert_eq!((big.model.requests(), small.model.requests()), (3, 1));

    // Streams fall back too, while nothing has been sent.
    big.model.fail_next(2, Fault::Reset);
    let mut body = chat("fast", "a b");
    body["stream"] = json!(true);
    let resp = fwd
        .http
        .post(format!("{}/v1/chat/completions", fwd.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-forwarded-model"], "small");
    let events = sse_events(resp).await;
    assert_eq!(stream_text(&events), "mock reply: a b");
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));

    // A request the client got wrong is answered, not tried elsewhere.
    big.model.fail_next(
        1,
        Fault::Error {
            status: 400,
            retry_after: None,
        },
    );
    let before = small.model.requests();
    let r = fwd
        .post("/v1/chat/completions", &chat("fast", "hi"), &[])
        .await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(small.model.requests(), before);

    // Every target failing: the last failure is the answer.
    big.model.fail_next(
        2,
        Fault::Error {
            status: 503,
            retry_after: None,
        },
    );
    small.model.fail_next(
        2,
        Fault::Error {
            status: 503,
            retry_after: None,
        },
    );
    let r = fwd
        .post("/v1/chat/completions", &chat("fast", "hi"), &[])
        .await;
    assert_eq!((r.status, r.error_code()), (502, "bad_gateway"));

    // Without rewrite_model the body goes up with the alias in it.
    let r = fwd
        .post("/v1/chat/completions", &chat("keep", "hi"), &[])
        .await;
    assert_eq!(r.header("x-forwarded-model"), Some("small"));
    assert_eq!(r.body["model"], "keep");

    // Aliases serve the other APIs too, and count under the alias.
    let r = fwd
        .post(
            "/v1/embeddings",
            &json!({"model": "fast", "input": "x"}),
            &[],
        )
        .await;
    assert_eq!(
        (r.status, r.header("x-forwarded-model")),
        (200, Some("big"))
    );
    for (api, n) in [("chat_completions", 3.0), ("embeddings", 1.0)] {
        let labels = [
            ("protocol", "http"),
            ("api", api),
            ("model", "fast"),
            ("code", "200"),
        ];
        assert_eq!(fwd.metric("forwarder_requests_total", &labels).await, n);
    }
}
