//! The metrics contract after known traffic.

use forwarder::config::MockSettings;
use forwarder::mock_llm::Fault;
use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn counters_and_histograms_match_the_traffic_sent() {
    let m = mock(MockSettings::default()).await;
    let mut cfg = config(vec![upstream("up-1", &m, "m")]);
    cfg.retry.max_attempts = 2;
    let fwd = start(cfg).await;
    for _ in 0..3 {
        fwd.post("/v1/chat/completions", &chat("m", "hi"), &[])
            .await;
    }
    fwd.post(
        "/api/v1/message",
        &json!({"model_id": "m", "prompt": "x"}),
        &[],
    )
    .await;
    m.model.fail_next(
        1,
        Fault::Error {
            status: 503,
            retry_after: None,
        },
    );
    fwd.post("/v1/chat/completions", &chat("m", "retried"), &[])
        .await;
    fwd.post("/v1/chat/completions", &chat("nope-1", "hi"), &[])
        .await;
    fwd.post("/v1/chat/completions", &chat("nope-2", "hi"), &[])
        .await;

    let text = fwd.get("/metrics", &[]).await.text;
    let v = |name: &str, labels: &[(&str, &str)]| metric_value(&text, name, labels).unwrap_or(0.0);
    let http_m = [
        ("protocol", "http"),
        ("api", "chat_completions"),
        ("model", "m"),
    ];
    assert_eq!(
        v(
            "forwarder_requests_total",
            &[
                ("protocol", "http"),
                ("api", "chat_completions"),
                ("model", "m"),
                ("code", "200")
            ]
        ),
        5.0
    );
    assert_eq!(
        v(
            "forwarder_requests_total",
            &[
                ("protocol", "http"),
                ("api", "chat_completions"),
                ("model", "unknown"),
                ("code", "404")
            ]
        ),
        2.0,
        "unknown models share one label value"
    );
    assert_eq!(v("forwarder_request_duration_seconds_count", &http_m), 5.0);
    assert_eq!(
        v(
            "forwarder_request_duration_seconds_bucket",
            &[
                ("protocol", "http"),
                ("api", "chat_completions"),
                ("model", "m"),
                ("le", "120")
            ]
        ),
        5.0
    );
    assert_eq!(
        v(
            "forwarder_upstream_requests_total",
            &[("upstream", "up-1"), ("model", "m"), ("outcome", "success")]
        ),
        5.0
    );
    assert_eq!(
        v(
            "forwarder_upstream_requests_total",
            &[
                ("upstream", "up-1"),
                ("model", "m"),
                ("outcome", "server_error")
            ]
        ),
        1.0
    );
    assert_eq!(
        v(
            "forwarder_upstream_duration_seconds_count",
            &[("upstream", "up-1"), ("model", "m")]
        ),
        6.0
    );
    assert_eq!(
        v(
            "forwarder_retries_total",
            &[("upstream", "up-1"), ("reason", "server_error")]
        ),
        1.0
    );
    assert_eq!(v("forwarder_inflight_requests", &[]), 0.0);
    assert_eq!(v("forwarder_circuit_open", &[("upstream", "up-1")]), 0.0);
    assert!(text.contains("forwarder_idempotent_replays_total 0"));
}

/// A new replica reports at once: its per-model series exist at zero
/// before any traffic (the autoscaler reads zero as data, not as absence).
#[tokio::test]
async fn series_exist_at_zero_from_start_then_own_time_and_ttft_are_observed() {
    let m = mock(MockSettings {
        latency: forwarder::config::LatencyDist::Fixed(std::time::Duration::from_millis(50)),
        ..Default::default()
    })
    .await;
    let fwd = start(config(vec![upstream("up-1", &m, "m")])).await;
    let text = fwd.get("/metrics", &[]).await.text;
    for proto in ["http", "websocket", "grpc"] {
        let labels = [
            ("protocol", proto),
            ("api", "chat_completions"),
            ("model", "m"),
            ("code", "200"),
        ];
        assert_eq!(
            metric_value(&text, "forwarder_requests_total", &labels),
            Some(0.0),
            "{proto}"
        );
        let labels = [
            ("protocol", proto),
            ("api", "chat_completions"),
            ("model", "m"),
        ];
        let h = "forwarder_request_duration_seconds_count";
        assert_eq!(metric_value(&text, h, &labels), Some(0.0), "{h} {proto}");
        for h in [
            "forwarder_own_duration_seconds_count",
            "forwarder_time_to_first_token_seconds_count",
        ] {
            let labels = [("protocol", proto), ("model", "m")];
            assert_eq!(metric_value(&text, h, &labels), Some(0.0), "{h} {proto}");
        }
    }

    fwd.post("/v1/chat/completions", &chat("m", "hi"), &[])
        .await;
    let mut body = chat("m", "hi");
    body["stream"] = json!(true);
    let r = fwd
        .post_raw("/v1/chat/completions", body.to_string().into_bytes(), &[])
        .await;
    assert!(r.text.ends_with("data: [DONE]\n\n"));
    let text = fwd.get("/metrics", &[]).await.text;
    let labels = [("protocol", "http"), ("model", "m")];
    let v = |name: &str| metric_value(&text, name, &labels).unwrap();
    assert_eq!(v("forwarder_own_duration_seconds_count"), 2.0);
    assert_eq!(
        v("forwarder_time_to_first_token_seconds_count"),
        1.0,
        "streams only"
    );
    // The upstream's 50 ms each are not the forwarder's own time.
    assert!(v("forwarder_own_duration_seconds_sum") < 0.05, "{text}");
    assert!(v("forwarder_time_to_first_token_seconds_sum") >= 0.05);
}

/// The forwarder's own time never counts a request that failed upstream: retries, backoff and the
/// slot held meanwhile are the upstream's doing, and must not make the
/// autoscaler add replicas for a failing upstream.
#[tokio::test]
async fn own_time_is_not_observed_for_requests_that_failed_upstream() {
    let m = mock(MockSettings {
        error_rate: 1.0,
        error_status: 503,
        ..Default::default()
    })
    .await;
    let mut cfg = config(vec![upstream("up-1", &m, "m")]);
    cfg.retry.max_attempts = 3;
    cfg.retry.base_delay = std::time::Duration::from_millis(100);
    cfg.retry.max_delay = std::time::Duration::from_millis(100);
    let fwd = start(cfg).await;
    let own_count = |text: &str| {
        let labels = [("protocol", "http"), ("model", "m")];
        metric_value(text, "forwarder_own_duration_seconds_count", &labels).unwrap()
    };
    let r = fwd
        .post("/v1/chat/completions", &chat("m", "hi"), &[])
        .await;
    assert_eq!(r.status, 502);
    assert_eq!(own_count(&fwd.get("/metrics", &[]).await.text), 0.0);
    m.model.set_settings(MockSettings::default());
    let r = fwd
        .post("/v1/chat/completions", &chat("m", "hi"), &[])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(own_count(&fwd.get("/metrics", &[]).await.text), 1.0);
}

/// The request metrics carry the API (a bounded label: five values), so
/// each API's rate, errors and latency can be told apart.
#[tokio::test]
async fn request_metrics_are_labelled_by_api() {
    let m = mock(MockSettings::default()).await;
    let mut anthropic = upstream("claude-up", &m, "claude");
    anthropic.provider = forwarder::config::Provider::Anthropic;
    let fwd = start(config(vec![upstream("up-1", &m, "m"), anthropic])).await;
    let text = fwd.get("/metrics", &[]).await.text;
    // Chat completions' series exist from the start; the others appear
    // at their first request.
    assert!(text.contains(r#"api="chat_completions""#), "{text}");
    assert!(!text.contains(r#"api="embeddings""#), "{text}");

    let calls: [(&str, serde_json::Value, &str); 5] = [
        ("/v1/chat/completions", chat("m", "hi"), "chat_completions"),
        (
            "/v1/embeddings",
            json!({"model": "m", "input": "hi"}),
            "embeddings",
        ),
        (
            "/v1/responses",
            json!({"model": "m", "input": "hi"}),
            "responses",
        ),
        (
            "/v1/messages",
            json!({"model": "claude", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}),
            "messages",
        ),
        (
            "/v1/messages/count_tokens",
            json!({"model": "claude", "messages": [{"role": "user", "content": "hi"}]}),
            "count_tokens",
        ),
    ];
    for (path, body, _) in &calls {
        let r = fwd.post(path, body, &[]).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text);
    }
    let r = fwd
        .post("/v1/embeddings", &json!({"model": "m"}), &[])
        .await;
    assert_eq!(r.status, 400);
    let text = fwd.get("/metrics", &[]).await.text;
    for (path, body, api) in &calls {
        let model = body["model"].as_str().unwrap();
        let labels = [("protocol", "http"), ("api", *api), ("model", model)];
        let ok = [&labels[..], &[("code", "200")]].concat();
        assert_eq!(
            metric_value(&text, "forwarder_requests_total", &ok),
            Some(1.0),
            "{path}"
        );
        assert_eq!(
            metric_value(&text, "forwarder_request_duration_seconds_count", &labels),
            Some(1.0),
            "{path}"
        );
    }
    // A body that cannot be read names no model.
    let bad = [
        ("protocol", "http"),
        ("api", "embeddings"),
        ("model", "unknown"),
        ("code", "400"),
    ];
    assert_eq!(
        metric_value(&text, "forwarder_requests_total", &bad),
        Some(1.0)
    );
}
