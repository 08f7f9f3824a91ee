//! The response cache's semantics table, over HTTP with the memory store
//! (and across two replicas on Redis in replicas.rs).

use std::time::Duration;

use forwarder::config::{Cacheable, MockSettings, ModelCacheConfig};
use serde_json::{json, Value};

use crate::common::*;

fn det(prompt: &str) -> Value {
    let mut b = chat("m", prompt);
    b["temperature"] = json!(0);
    b
}

fn streamed(mut b: Value) -> Value {
    b["stream"] = json!(true);
    b
}

#[tokio::test]
async fn deterministic_requests_hit_and_cross_serve_streams() {
    let m = mock(MockSettings::default()).await;
    let mut cfg = config(vec![upstream("a", &m, "m")]);
    cfg.cache
        .models
        .insert("m".into(), ModelCacheConfig::default());
    let fwd = start(cfg).await;
    let url = "/v1/chat/completions";

    let first = fwd.post(url, &det("return policy?"), &[]).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-cache"), Some("MISS"));
    tokio::time::sleep(Duration::from_millis(50)).await; // stored in the background
    let second = fwd.post(url, &det("return policy?"), &[]).await;
    assert_eq!(second.header("x-cache"), Some("HIT"));
    assert!(second.header("age").is_some());
    assert_eq!(second.body, first.body, "the stored answer, same id");
    assert_eq!(m.model.requests(), 1);

    // Non-semantic fields (user, key order) share the entry.
    let mut other_user = det("return policy?");
    other_user["user"] = json!("someone-else");
    let third = fwd.post(url, &other_user, &[]).await;
    assert_eq!(third.header("x-cache"), Some("HIT"));

    // The stored completion answers a streamed request as a stream.
    let s = fwd.post(url, &streamed(det("return policy?")), &[]).await;
    assert_eq!(s.header("x-cache"), Some("HIT"));
    assert_eq!(s.header("content-type"), Some("text/event-stream"));
    let events: Vec<String> = s
        .text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(String::from)
        .collect();
    let text = stream_text(&events);
    assert_eq!(
        text,
        first.body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
    );
    assert_eq!(m.model.requests(), 1);

    // A stored stream answers a completion request.
    let s1 = fwd.post(url, &streamed(det("shipping?")), &[]).await;
    assert_eq!(s1.header("x-cache"), Some("MISS"));
    assert!(s1.text.ends_with("data: [DONE]\n\n"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let c = fwd.post(url, &det("shipping?"), &[]).await;
    assert_eq!(c.header("x-cache"), Some("HIT"), "{}", c.text);
    assert_eq!(
        c.body["choices"][0]["message"]["content"],
        "mock reply: shipping?"
    );
    assert_eq!(c.body["object"], "chat.completion");
    assert_eq!(m.model.requests(), 2);

    assert_eq!(
        fwd.metric(
            "forwarder_cache_requests_total",
            &[("model", "m"), ("result", "hit")]
        )
        .await,
        4.0
    );
    assert_eq!(
        fwd.metric(
            "forwarder_cache_requests_total",
            &[("model", "m"), ("result", "miss")]
        )
        .await,
        2.0
    );
    assert!(fwd.metric("forwarder_cache_stored_bytes_total", &[]).await > 0.0);
}

#[tokio::test]
async fn sampling_opt_in_and_cache_control_follow_the_table() {
    let m = mock(MockSettings::default()).await;
    let mut cfg = config(vec![upstream("a", &m, "m"), upstream("b", &m, "all")]);
    cfg.cache
        .models
        .insert("m".into(), ModelCacheConfig::default());
    cfg.cache.models.insert(
        "all".into(),
        ModelCacheConfig {
            cacheable: Cacheable::All,
            ..Default::default()
        },
    );
    let fwd = start(cfg).await;
    let url = "/v1/chat/completions";
    let settle = || tokio::time::sleep(Duration::from_millis(50));

    // Sampling (no temperature: 1): never cached under `deterministic`.
    for _ in 0..2 {
        let r = fwd.post(url, &chat("m", "poem"), &[]).await;
        assert_eq!(r.header("x-cache"), Some("BYPASS"));
        settle().await;
    }
    assert_eq!(m.model.requests(), 2);
    // ... unless the client opts in, or the model caches everything.
    let opt = [("x-cache-opt-in", "true")];
    assert_eq!(
        fwd.post(url, &chat("m", "poem"), &opt)
            .await
            .header("x-cache"),
        Some("MISS")
    );
    settle().await;
    assert_eq!(
        fwd.post(url, &chat("m", "poem"), &opt)
            .await
            .header("x-cache"),
        Some("HIT")
    );
    assert_eq!(
        fwd.post(url, &chat("all", "poem"), &[])
            .await
            .header("x-cache"),
        Some("MISS")
    );
    settle().await;
    assert_eq!(
        fwd.post(url, &chat("all", "poem"), &[])
            .await
            .header("x-cache"),
        Some("HIT")
    );
    let before = m.model.requests();

    // no-store: neither read nor written.
    let ns = [("cache-control", "no-store")];
    let r = fwd.post(url, &det("q1"), &ns).await;
    assert_eq!(r.header("x-cache"), Some("BYPASS"));
    settle().await;
    assert_eq!(
        fwd.post(url, &det("q1"), &[]).await.header("x-cache"),
        Some("MISS"),
        "no-store wrote nothing"
    );
    settle().await;
    assert_eq!(
        fwd.post(url, &det("q1"), &ns).await.header("x-cache"),
        Some("BYPASS"),
        "no-store reads nothing"
    );
    // no-cache: not read, but the fresh answer replaces the entry.
    let fresh = fwd
        .post(url, &det("q1"), &[("cache-control", "no-cache")])
        .await;
    assert_eq!(fresh.header("x-cache"), Some("BYPASS"));
    settle().await;
    let after = fwd.post(url, &det("q1"), &[]).await;
    assert_eq!(after.header("x-cache"), Some("HIT"));
    assert_eq!(after.body["id"], fresh.body["id"], "refreshed by no-cache");
    assert_eq!(m.model.requests(), before + 4);
}

#[tokio::test]
async fn errors_truncated_streams_and_expired_entries_are_not_served() {
    let m = mock(MockSettings {
        tokens_per_second: Some(50.0),
        ..Default::default()
    })
    .await;
    let mut cfg = config(vec![upstream("a", &m, "m")]);
    cfg.retry.max_attempts = 1;
    cfg.cache.models.insert(
        "m".into(),
        ModelCacheConfig {
            ttl: Duration::from_millis(400),
            ..Default::default()
        },
    );
    let fwd = start(cfg).await;
    let url = "/v1/chat/completions";

    m.model.fail_next(
        1,
        forwarder::mock_llm::Fault::Error {
            status: 500,
            retry_after: None,
        },
    );
    assert_eq!(fwd.post(url, &det("e"), &[]).await.status, 502);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = fwd.post(url, &det("e"), &[]).await;
    assert_eq!(
        (r.status, r.header("x-cache")),
        (200, Some("MISS")),
        "the error was not cached"
    );

    // A client that leaves mid-stream: nothing stored.
    let resp = fwd
        .http
        .post(format!("{}{url}", fwd.base))
        .json(&streamed(det("one two three four five six seven eight")))
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    use futures::StreamExt;
    let _first = body.next().await;
    drop(body);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again = fwd
        .post(url, &det("one two three four five six seven eight"), &[])
        .await;
    assert_eq!(
        again.header("x-cache"),
        Some("MISS"),
        "a truncated stream is never cached"
    );

    // TTL: served within it, a miss after it.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        fwd.post(url, &det("ttl"), &[]).await.header("x-cache"),
        Some("MISS")
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        fwd.post(url, &det("ttl"), &[]).await.header("x-cache"),
        Some("HIT")
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        fwd.post(url, &det("ttl"), &[]).await.header("x-cache"),
        Some("MISS")
    );
}

#[tokio::test]
async fn entries_are_per_client_unless_the_model_is_shared() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.yaml");
    std::fs::write(&keys, "alice: sk-alice\nbob: sk-bob\n").unwrap();
    let m = mock(MockSettings::default()).await;
    let mut cfg = config(vec![upstream("a", &m, "m"), upstream("b", &m, "faq")]);
    cfg.auth.api_keys_file = Some(keys);
    cfg.cache
        .models
        .insert("m".into(), ModelCacheConfig::default());
    cfg.cache.models.insert(
        "faq".into(),
        ModelCacheConfig {
            shared: true,
            ..Default::default()
        },
    );
    let fwd = start(cfg).await;
    let url = "/v1/chat/completions";
    let (alice, bob) = ([("x-api-key", "sk-alice")], [("x-api-key", "sk-bob")]);
    let mut faq = det("return policy?");
    faq["model"] = json!("faq");
    for body in [det("return policy?"), faq.clone()] {
        assert_eq!(
            fwd.post(url, &body, &alice).await.header("x-cache"),
            Some("MISS")
        );
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        fwd.post(url, &det("return policy?"), &bob)
            .await
            .header("x-cache"),
        Some("MISS"),
        "per client"
    );
    assert_eq!(
        fwd.post(url, &faq, &bob).await.header("x-cache"),
        Some("HIT"),
        "shared"
    );
    // The simple API goes through the same pipeline.
    let simple = json!({"model_id": "faq", "prompt": "return policy?", "temperature": 0});
    let a = fwd.post("/api/v1/message", &simple, &alice).await;
    assert_eq!(a.status, 200, "{}", a.text);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let before = m.model.requests();
    let b = fwd.post("/api/v1/message", &simple, &bob).await;
    assert_eq!(b.body["reply"], a.body["reply"]);
    assert_eq!(m.model.requests(), before, "served from the shared cache");
}

/// Identical requests arriving while the first is still upstream wait for
/// its answer instead of forwarding too (one upstream call, the others
/// HITs); when that first request fails, the waiters forward together
/// rather than one after another.
#[tokio::test]
async fn concurrent_identical_misses_make_one_upstream_call() {
    let m = slow_mock(Duration::from_millis(400)).await;
    let mut cfg = config(vec![upstream("a", &m, "m")]);
    cfg.retry.max_attempts = 1;
    cfg.cache
        .models
        .insert("m".into(), ModelCacheConfig::default());
    let fwd = start(cfg).await;
    let url = "/v1/chat/completions";
    let body = det("what is the return policy?");
    let answers = futures::future::join_all((0..6).map(|_| fwd.post(url, &body, &[]))).await;
    let mut cache = Vec::new();
    for a in &answers {
        assert_eq!(a.status, 200, "{}", a.text);
        assert_eq!(a.body, answers[0].body, "every one gets the same answer");
        cache.push(a.header("x-cache").unwrap_or("none").to_string());
    }
    cache.sort();
    assert_eq!(cache, ["HIT", "HIT", "HIT", "HIT", "HIT", "MISS"]);
    assert_eq!(m.model.requests(), 1);

    // The leader fails: the five waiters then forward at once (about one
    // upstream latency in all, not five in a row).
    m.model.fail_next(
        1,
        forwarder::mock_llm::Fault::Error {
            status: 500,
            retry_after: None,
        },
    );
    let body = det("do you ship abroad?");
    let started = std::time::Instant::now();
    let leader = fwd.post(url, &body, &[]);
    let waiters = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        futures::future::join_all((0..5).map(|_| fwd.post(url, &body, &[]))).await
    };
    let (leader, waiters) = tokio::join!(leader, waiters);
    assert_eq!(leader.status, 502, "{}", leader.text);
    for w in &waiters {
        assert_eq!(w.status, 200, "{}", w.text);
    }
    assert!(
        started.elapsed() < Duration::from_millis(1600),
        "waiters forwarded one after another: {:?}",
        started.elapsed()
    );
}
