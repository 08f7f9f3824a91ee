//! Retries, backoff, Retry-After, failover and the circuit breaker.

use std::time::{Duration, Instant};

use forwarder::config::{MockSettings, Strategy};
use forwarder::mock_llm::Fault;

use crate::common::*;

fn status(code: u16) -> Fault {
    Fault::Error {
        status: code,
        retry_after: None,
    }
}

#[tokio::test]
async fn retries_safe_failures_with_bounded_jittered_backoff() {
    let m = mock(MockSettings::default()).await;
    let mut cfg = config(vec![upstream("a", &m, "m")]);
    cfg.retry.max_attempts = 4;
    cfg.retry.base_delay = 100 * MS;
    cfg.retry.max_delay = 150 * MS;
    let fwd = start(cfg).await;

    // Three failures of three kinds, then success on the fourth attempt.
    m.model.fail_next(1, status(503));
    let started = Instant::now();
    let first = fwd
        .post("/v1/chat/completions", &chat("m", "hi"), &[])
        .await;
    assert_eq!(first.status, 200);
    m.model.fail_next(3, status(502));
    let started_2 = Instant::now();
    let r = fwd
        .post("/v1/chat/completions", &chat("m", "hi"), &[])
        .await;
    let took = started_2.elapsed();
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(m.model.requests(), 2 + 4);
    // Full jitter: each wait is in [0, min(150, 100·2ⁿ⁻¹)] ms, so three waits
    // total at most 100 + 150 + 150 = 400 ms (plus request time).
    assert!(took < Duration::from_millis(400 + 300), "took {took:?}");
    assert!(started.elapsed() >= took);
    assert_eq!(
        fwd.metric(
            "forwarder_retries_total",
            &[("upstream", "a"), ("reason", "server_error")]
        )
        .await,
        4.0
    );
}

#[tokio::test]
async fn gives_up_after_max_attempts_and_never_retries_client_errors() {
    let m = mock(MockSettings::default()).await;
    let mut cfg = config(vec![upstream("a", &m, "m")]);
    cfg.retry.max_attempts = 3;
    let fwd = start(cfg).await;

    m.model.fail_next(5, status(503));
    let r = fwd
        .post("/v1/chat/completions", &chat("m", "hi"), &[])
        .await;
    assert_eq!(r.status, 502);
    assert_eq!(m.model.requests(), 3, "exactly max_attempts attempts");

    m.model.fail_next(1, status(422));
    let r = fwd
        .post("/v1/chat/completions", &chat("m", "hi"), &[])
        .await;
    assert_eq!(
        r.status, 422,
        "the upstream's rejection is passed on: {}",
        r.text
    );
    assert_eq!(m.model.requests(), 4, "a 4xx is not retried");
}

#[tokio::test]
async fn honours_retry_after_on_the_same_endpoint_capped_at_max_delay() {
    let m = mock(MockSettings::default()).await;
    let mut cfg = config(vec![upstream("a", &m, "m")]);
    cfg.retry.max_delay = Duration::from_secs(1);
    let fwd = start(cfg).await;
    for (retry_after, why) in [(1, "honoured"), (3600, "capped at retry.max_delay")] {
        m.model.fail_next(
            1,
            Fault::Error {
                status: 429,
                retry_after: Some(Duration::from_secs(retry_after)),
            },
        );
        let started = Instant::now();
        let r = fwd
            .post("/v1/chat/completions", &chat("m", "hi"), &[])
            .await;
        let took = started.elapsed();
        assert_eq!(r.status, 200, "{why}");
        assert!(
            took >= Duration::from_millis(1000),
            "{why}: waited only {took:?}"
        );
        assert!(took < Duration::from_millis(2000), "{why}: took {took:?}");
    }
}

#[tokio::test]
async fn fails_over_to_the_next_endpoint_without_waiting_for_retry_after() {
    let bad = mock(MockSettings::default()).await;
    let good = mock(MockSettings::default()).await;
    let mut cfg = config(vec![
        upstream("bad", &bad, "m"),
        upstream("good", &good, "m"),
    ]);
    cfg.routing.strategy = Strategy::RoundRobin;
    cfg.retry.max_attempts = 2;
    let fwd = start(cfg).await;
    for _ in 0..4 {
        bad.model.fail_next(
            1,
            Fault::Error {
                status: 503,
                retry_after: Some(Duration::from_secs(30)),
            },
        );
        let started = Instant::now();
        let r = fwd
            .post("/v1/chat/completions", &chat("m", "hi"), &[])
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "Retry-After only binds the same endpoint"
        );
    }
    assert!(
        bad.model.requests() >= 1,
        "round robin sent traffic to the bad endpoint"
    );
    assert_eq!(
        good.model.requests(),
        4,
        "every request was answered by the good one"
    );
}

#[tokio::test]
async fn fails_over_on_connect_errors_and_resets() {
    let good = mock(MockSettings::default()).await;
    let dead = mock(MockSettings::default()).await;
    let mut dead_upstream = upstream("dead", &dead, "m");
    drop(dead); // nothing listens on its port any more
    dead_upstream.weight = 100;
    let resetting = mock(MockSettings {
        reset_rate: 1.0,
        ..Default::default()
    })
    .await;
    let mut resetting_upstream = upstream("resetting", &resetting, "m");
    resetting_upstream.weight = 100;
    let mut cfg = config(vec![
        dead_upstream,
        resetting_upstream,
        upstream("good", &good, "m"),
    ]);
    cfg.retry.max_attempts = 3;
    let fwd = start(cfg).await;
    for _ in 0..3 {
        let r = fwd
            .post("/v1/chat/completions", &chat("m", "hi"), &[])
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    assert_eq!(good.model.requests(), 3);
}

#[tokio::test]
async fn circuit_breaker_opens_then_half_opens_and_recovers() {
    let flaky = mock(MockSettings {
        error_rate: 1.0,
        ..Default::default()
    })
    .await;
    let good = mock(MockSettings::default()).await;
    let mut cfg = config(vec![
        upstream("flaky", &flaky, "m"),
        upstream("good", &good, "m"),
    ]);
    cfg.routing.strategy = Strategy::RoundRobin;
    cfg.circuit_breaker.failure_threshold = 2;
    cfg.circuit_breaker.open_duration = Duration::from_millis(500);
    cfg.retry.max_attempts = 2;
    let fwd = start(cfg).await;

    for _ in 0..6 {
        assert_eq!(
            fwd.post("/v1/chat/completions", &chat("m", "hi"), &[])
                .await
                .status,
            200
        );
    }
    assert_eq!(
        flaky.model.requests(),
        2,
        "ejected after two consecutive failures"
    );
    assert_eq!(
        fwd.metric("forwarder_circuit_open", &[("upstream", "flaky")])
            .await,
        1.0
    );

    // Recover the endpoint; after the open period one probe gets through,
    // succeeds, and closes the circuit.
    flaky.model.set_settings(MockSettings::default());
    tokio::time::sleep(Duration::from_millis(600)).await;
    for _ in 0..4 {
        assert_eq!(
            fwd.post("/v1/chat/completions", &chat("m", "hi"), &[])
                .await
                .status,
            200
        );
    }
    assert!(flaky.model.requests() >= 3, "probed and back in rotation");
    assert_eq!(
        fwd.metric("forwarder_circuit_open", &[("upstream", "flaky")])
            .await,
        0.0
    );
}

#[tokio::test]
async fn all_circuits_open_is_503_with_retry_after() {
    let flaky = mock(MockSettings {
        error_rate: 1.0,
        ..Default::default()
    })
    .await;
    let mut cfg = config(vec![upstream("flaky", &flaky, "m")]);
    cfg.circuit_breaker.failure_threshold = 1;
    cfg.circuit_breaker.open_duration = Duration::from_secs(5);
    cfg.retry.max_attempts = 1;
    let fwd = start(cfg).await;
    assert_eq!(
        fwd.post("/v1/chat/completions", &chat("m", "hi"), &[])
            .await
            .status,
        502
    );
    let r = fwd
        .post("/v1/chat/completions", &chat("m", "hi"), &[])
        .await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(r.error_code(), "no_healthy_upstream");
    assert!(r.header("retry-after").is_some());
    assert_eq!(
        flaky.model.requests(),
        1,
        "an open circuit sends nothing upstream"
    );
}
