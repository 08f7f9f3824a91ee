//! Byte fidelity and stream integrity against a hand-written upstream that
//! sends every OpenAI field: bodies and events reach the client as the
//! upstream sent them, requests reach the upstream as the client sent them,
//! and a stream is complete only when its upstream says so.

use std::time::Duration;

use forwarder::config::Provider;
use forwarder::config::UpstreamConfig;

use crate::common::*;
use crate::scripted::{Scripted, CONTEXT_ERROR, FULL_COMPLETION, FULL_STREAM};

const MODELS: &[&str] = &[
    "full",
    "reject",
    "crash",
    "garbage",
    "cut",
    "truncated",
    "nodone",
    "early-once",
    "keepalive",
];

async fn setup() -> (Scripted, Fwd) {
    setup_with(|_| {}).await
}

async fn setup_with(edit: impl FnOnce(&mut forwarder::config::Config)) -> (Scripted, Fwd) {
    let up = Scripted::start().await;
    let mut cfg = config(vec![UpstreamConfig {
        name: "scripted".into(),
        provider: Provider::Openai,
        base_url: Some(up.base_url()),
        models: MODELS.iter().map(|m| m.to_string()).collect(),
        weight: 1,
        api_key_file: None,
        api_key_env: None,
        connect_timeout: Duration::from_secs(1),
        timeout: Duration::from_millis(300),
        mock: None,
        tls: None,
    }]);
    edit(&mut cfg);
    (up, start(cfg).await)
}

/// A request body with spacing and fields a re-encoder would not keep.
fn raw_body(model: &str, stream: bool) -> String {
    format!(
        "{{ \"model\" : \"{model}\",\n  \"messages\": [{{\"role\":\"user\",\"content\":\"caf\\u00e9\"}}],\"stream\":{stream},\
         \"tools\":[{{\"type\":\"function\",\"function\":{{\"name\":\"lookup\",\"parameters\":{{}}}}}}],\
         \"stream_options\":null, \"x_vendor_flag\": 1.50 }}"
    )
}

async fn send(fwd: &Fwd, body: String, extra: &[(&str, &str)]) -> reqwest::Response {
    let mut req = fwd
        .http
        .post(format!("{}/v1/chat/completions", fwd.base))
        .header("content-type", "application/json")
        .body(body);
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn answers_and_requests_cross_byte_for_byte_with_allow_listed_headers() {
    let (up, fwd) = setup().await;
    let body = raw_body("full", false);
    let resp = send(
        &fwd,
        body.clone(),
        &[
            ("OpenAI-Beta", "assistants=v2"),
            ("OpenAI-Organization", "org-1"),
            ("x-custom-internal", "keep-out"),
            ("authorization", "Bearer client-key"),
        ],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    assert_eq!(h["x-ratelimit-remaining-requests"], "99");
    assert_eq!(h["x-ratelimit-reset-tokens"], "6ms");
    assert_eq!(h["openai-processing-ms"], "12");
    assert_eq!(h["openai-model"], "full-2025");
    assert!(
        h.get("x-internal-secret").is_none(),
        "not on the allow-list"
    );
    assert_eq!(resp.text().await.unwrap(), FULL_COMPLETION);

    let (seen_body, seen_headers) = up.last("full");
    assert_eq!(
        seen_body,
        body.as_bytes(),
        "the request body is forwarded as sent"
    );
    assert_eq!(seen_headers["openai-beta"], "assistants=v2");
    assert_eq!(seen_headers["openai-organization"], "org-1");
    assert!(seen_headers.get("x-custom-internal").is_none());
    assert!(
        seen_headers.get("authorization").is_none(),
        "the client's credential never goes upstream"
    );
}

#[tokio::test]
async fn streamed_events_are_relayed_verbatim() {
    let (_up, fwd) = setup().await;
    let resp = send(&fwd, raw_body("full", true), &[]).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert_eq!(resp.headers()["openai-model"], "full-2025");
    assert_eq!(resp.text().await.unwrap(), FULL_STREAM.concat());
}

#[tokio::test]
async fn an_upstream_4xx_keeps_type_code_and_param_and_5xx_internals_stay_hidden() {
    let (_up, fwd) = setup().await;
    let resp = send(&fwd, raw_body("reject", false), &[]).await;
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.text().await.unwrap(), CONTEXT_ERROR);

    let resp = send(&fwd, raw_body("crash", false), &[]).await;
    assert_eq!(resp.status(), 502);
    let text = resp.text().await.unwrap();
    assert!(
        !text.contains("hunter2") && !text.contains("db.rs"),
        "{text}"
    );
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["code"], "bad_gateway");
}

#[tokio::test]
async fn a_non_json_200_is_a_502_never_retried_nor_stored_and_the_simple_api_says_502_too() {
    let (up, fwd) = setup().await;
    for round in 1..=2 {
        let resp = send(
            &fwd,
            raw_body("garbage", false),
            &[("idempotency-key", "garbage-1")],
        )
        .await;
        assert_eq!(resp.status(), 502, "round {round}");
        assert!(resp.headers().get("idempotent-replayed").is_none());
        let v: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "bad_gateway");
        // One call per request: not retried, and not stored for replay.
        assert_eq!(up.calls("garbage"), round);
    }
    let (up, fwd) = setup().await;

    let r = fwd
        .post(
            "/api/v1/message",
            &serde_json::json!({"model_id": "garbage", "prompt": "x"}),
            &[],
        )
        .await;
    assert_eq!(r.status, 502, "{}", r.text);
    assert_eq!(up.calls("garbage"), 1, "one call, not retried");
}

#[tokio::test]
async fn a_200_whose_body_breaks_off_is_a_502_and_retried_only_when_configured() {
    let (up, fwd) = setup().await;
    let resp = send(&fwd, raw_body("cut", false), &[]).await;
    assert_eq!(resp.status(), 502);
    assert_eq!(
        up.calls("cut"),
        1,
        "the upstream answered once: not sent again"
    );

    let (up, fwd) = setup_with(|c| {
        c.retry.after_answer_began = true;
        c.retry.base_delay = Duration::from_millis(1);
        c.retry.max_delay = Duration::from_millis(2);
    })
    .await;
    let resp = send(&fwd, raw_body("cut", false), &[]).await;
    assert_eq!(resp.status(), 502);
    assert_eq!(
        up.calls("cut"),
        3,
        "retry.after_answer_began: every attempt"
    );
}

#[tokio::test]
async fn a_stream_cut_short_is_an_error_counted_upstream_and_never_replayed() {
    let (up, fwd) = setup().await;
    for round in 1..=2 {
        let resp = send(
            &fwd,
            raw_body("truncated", true),
            &[("idempotency-key", "cut-1")],
        )
        .await;
        assert_eq!(resp.status(), 200);
        let text = resp.text().await.unwrap();
        assert!(!text.contains("[DONE]"), "{text}");
        let last = text.trim_end().rsplit("\n\n").next().unwrap();
        assert!(
            last.contains("\"error\""),
            "ends with an error event: {last}"
        );
        assert!(last.contains("ended before it was complete"), "{last}");
        assert_eq!(up.calls("truncated"), round, "not stored, so asked again");
    }
    let failures = fwd
        .metric(
            "forwarder_upstream_requests_total",
            &[
                ("upstream", "scripted"),
                ("model", "truncated"),
                ("outcome", "protocol_error"),
            ],
        )
        .await;
    assert_eq!(failures, 2.0);
}

#[tokio::test]
async fn a_finished_stream_without_done_is_complete_and_gets_done() {
    let (_up, fwd) = setup().await;
    let resp = send(&fwd, raw_body("nodone", true), &[]).await;
    let text = resp.text().await.unwrap();
    assert_eq!(
        text,
        format!("{}{}data: [DONE]\n\n", FULL_STREAM[4], FULL_STREAM[5])
    );
}

#[tokio::test]
async fn a_stream_that_ends_before_any_event_is_retried() {
    let (up, fwd) = setup().await;
    let resp = send(&fwd, raw_body("early-once", true), &[]).await;
    assert_eq!(resp.text().await.unwrap(), FULL_STREAM.concat());
    assert_eq!(up.calls("early-once"), 2);
}

#[tokio::test]
async fn keep_alive_comments_count_as_liveness() {
    let (up, fwd) = setup().await;
    // 600 ms of comments against a 300 ms attempt timeout.
    let resp = send(&fwd, raw_body("keepalive", true), &[]).await;
    let text = resp.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(text.contains("\"Hi\""), "{text}");
    assert_eq!(up.calls("keepalive"), 1);
}

/// An upstream that answers every request with a 200 whose head does not
/// parse; counts the requests it read.
async fn bad_head_upstream() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                seen.fetch_add(1, Ordering::SeqCst);
                let _ = conn
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: twelve\r\n\r\n{\"id\":\"x\"}")
                    .await;
                let _ = conn.shutdown().await;
            });
        }
    });
    (format!("http://{addr}/v1"), calls)
}

#[tokio::test]
async fn a_200_with_an_unparseable_head_is_a_502_not_retried() {
    let (base, calls) = bad_head_upstream().await;
    let cfg = config(vec![UpstreamConfig {
        name: "badhead".into(),
        provider: Provider::Openai,
        base_url: Some(base),
        models: vec!["badhead".into()],
        weight: 1,
        api_key_file: None,
        api_key_env: None,
        connect_timeout: Duration::from_secs(1),
        timeout: Duration::from_secs(2),
        mock: None,
        tls: None,
    }]);
    let fwd = start(cfg).await;
    let resp = send(&fwd, raw_body("badhead", false), &[]).await;
    assert_eq!(resp.status(), 502);
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the upstream answered once: not sent again"
    );
}
