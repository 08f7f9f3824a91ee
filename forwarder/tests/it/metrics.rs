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
    let http_m = [("protocol", "http"), ("model", "m")];
    assert_eq!(
        v(
            "forwarder_requests_total",
            &[("protocol", "http"), ("model", "m"), ("code", "200")]
        ),
        5.0
    );
    assert_eq!(
        v(
            "forwarder_requests_total",
            &[("protocol", "http"), ("model", "unknown"), ("code", "404")]
        ),
        2.0,
        "unknown models share one label value"
    );
    assert_eq!(v("forwarder_request_duration_seconds_count", &http_m), 5.0);
    assert_eq!(
        v(
            "forwarder_request_duration_seconds_bucket",
            &[("protocol", "http"), ("model", "m"), ("le", "120")]
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
        let labels = [("protocol", proto), ("model", "m"), ("code", "200")];
        assert_eq!(
            metric_value(&text, "forwarder_requests_total", &labels),
            Some(0.0),
            "{proto}"
        );
        for h in [
            "forwarder_request_duration_seconds_count",
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

/// An upstream that only fails still leaves the forwarder's own time
/// observed (and small): retries and backoff are not the forwarder's.
#[tokio::test]
async fn own_time_is_observed_for_failures_and_excludes_backoff() {
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
    let r = fwd
        .post("/v1/chat/completions", &chat("m", "hi"), &[])
        .await;
    assert_eq!(r.status, 502);
    let text = fwd.get("/metrics", &[]).await.text;
    let labels = [("protocol", "http"), ("model", "m")];
    let v = |name: &str| metric_value(&text, name, &labels).unwrap();
    assert_eq!(v("forwarder_own_duration_seconds_count"), 1.0);
    assert!(v("forwarder_own_duration_seconds_sum") < 0.05, "{text}");
}
