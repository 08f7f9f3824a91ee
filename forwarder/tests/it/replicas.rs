//! Two forwarders (replicas) sharing one real Redis: idempotency across
//! replicas and the documented behaviour when Redis goes away.

use std::time::{Duration, Instant};

use forwarder::config::{FailurePolicy, LatencyDist, MockSettings};
use forwarder::mock_llm::MockServer;
use serde_json::json;

use crate::common::*;
use crate::redis_server::{write_keys, RedisServer};

async fn replica(redis: &RedisServer, m: &MockServer, keys: &std::path::Path) -> Fwd {
    let mut cfg = config(vec![upstream("a", m, "m")]);
    cfg.store = redis.store_config(Some(keys));
    start(cfg).await
}

/// Waits until a replica's store has connected (it connects in the background).
async fn connected(f: &Fwd) {
    let k = forwarder::store::StoreKey::new(forwarder::store::Space::Cache, "probe", b"p");
    for _ in 0..500 {
        if f.server.pipeline.store().get(&k).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("replica never connected to redis");
}

async fn two_replicas(m: &MockServer) -> (RedisServer, tempfile::TempDir, Fwd, Fwd) {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    write_keys(&keys, &[("k1", 7)]);
    let a = replica(&redis, m, &keys).await;
    let b = replica(&redis, m, &keys).await;
    connected(&a).await;
    connected(&b).await;
    (redis, dir, a, b)
}

#[cfg_attr(not(redis_server), ignore = "redis-server not installed")]
#[tokio::test]
async fn a_retry_on_the_other_replica_is_replayed() {
    let m = mock(MockSettings::default()).await;
    let (_redis, _dir, a, b) = two_replicas(&m).await;
    let key = [("idempotency-key", "order-1")];
    let first = a.post("/v1/chat/completions", &chat("m", "hi"), &key).await;
    let retry = b.post("/v1/chat/completions", &chat("m", "hi"), &key).await;
    assert_eq!(first.status, 200, "{}", first.text);
    assert_eq!(retry.body, first.body, "same answer, same completion id");
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(m.model.requests(), 1);
    let reused = b
        .post("/v1/chat/completions", &chat("m", "other"), &key)
        .await;
    assert_eq!(reused.status, 422, "{}", reused.text);

    // Streams too: stored on one replica, replayed as a stream on the other.
    let mut body = chat("m", "one two");
    body["stream"] = json!(true);
    let skey = [("idempotency-key", "stream-1")];
    let s1 = a.post("/v1/chat/completions", &body, &skey).await;
    assert!(s1.text.ends_with("data: [DONE]\n\n"), "{}", s1.text);
    let mut replayed = None;
    for _ in 0..50 {
        let s2 = b.post("/v1/chat/completions", &body, &skey).await;
        if s2.header("idempotent-replayed") == Some("true") {
            replayed = Some(s2);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s2 = replayed.expect("the stream is replayed on the other replica");
    assert_eq!(s2.text, s1.text);
    assert_eq!(m.model.requests(), 2);
}

#[cfg_attr(not(redis_server), ignore = "redis-server not installed")]
#[tokio::test]
async fn concurrent_duplicates_on_two_replicas_make_one_upstream_call() {
    let m = mock(MockSettings {
        latency: LatencyDist::Fixed(Duration::from_millis(300)),
        ..Default::default()
    })
    .await;
    let (_redis, _dir, a, b) = two_replicas(&m).await;
    let key = [("idempotency-key", "dup")];
    let body = chat("m", "hi");
    let (r1, r2, r3, r4) = tokio::join!(
        a.post("/v1/chat/completions", &body, &key),
        b.post("/v1/chat/completions", &body, &key),
        a.post("/v1/chat/completions", &body, &key),
        b.post("/v1/chat/completions", &body, &key),
    );
    for r in [&r1, &r2, &r3, &r4] {
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body, r1.body);
    }
    assert_eq!(m.model.requests(), 1, "four duplicates, one upstream call");
    let replayed = [&r1, &r2, &r3, &r4]
        .iter()
        .filter(|r| r.header("idempotent-replayed") == Some("true"))
        .count();
    assert_eq!(replayed, 3);
}

#[cfg_attr(not(redis_server), ignore = "redis-server not installed")]
#[tokio::test]
async fn redis_killed_and_restarted_mid_run_follows_the_policy() {
    let m = mock(MockSettings::default()).await;
    let mut redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    write_keys(&keys, &[("k1", 7)]);
    let open = replica(&redis, &m, &keys).await;
    let mut cfg = config(vec![upstream("a", &m, "m")]);
    cfg.store = redis.store_config(Some(&keys));
    cfg.idempotency.on_store_error = FailurePolicy::FailClosed;
    let closed = start(cfg).await;
    connected(&open).await;
    connected(&closed).await;
    let key = |k: &'static str| [("idempotency-key", k)];
    assert_eq!(
        open.post("/v1/chat/completions", &chat("m", "a"), &key("before"))
            .await
            .status,
        200
    );

    redis.kill();
    for i in 0..5 {
        let t = Instant::now();
        let r = open
            .post(
                "/v1/chat/completions",
                &chat("m", "b"),
                &[("idempotency-key", &format!("down-{i}"))],
            )
            .await;
        assert_eq!(r.status, 200, "fail_open forwards: {}", r.text);
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        let t = Instant::now();
        let r = closed
            .post(
                "/v1/chat/completions",
                &chat("m", "b"),
                &[("idempotency-key", &format!("down-{i}"))],
            )
            .await;
        assert_eq!(r.status, 503, "fail_closed refuses: {}", r.text);
        assert_eq!(r.error_code(), "store_unavailable");
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        // Requests without a key never touch the store.
        let plain = closed
            .post("/v1/chat/completions", &chat("m", "c"), &[])
            .await;
        assert_eq!(plain.status, 200);
    }
    let m_before = m.model.requests();

    redis.restart().await;
    // Both replicas reconnect by themselves; then a keyed request is
    // stored and replayed across them again.
    connected(&open).await;
    connected(&closed).await;
    let r = closed
        .post("/v1/chat/completions", &chat("m", "d"), &key("after"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let again = open
        .post("/v1/chat/completions", &chat("m", "d"), &key("after"))
        .await;
    assert_eq!(
        again.header("idempotent-replayed"),
        Some("true"),
        "{}",
        again.text
    );
    assert_eq!(m.model.requests(), m_before + 1);
}

#[cfg_attr(not(redis_server), ignore = "redis-server not installed")]
#[tokio::test]
async fn a_cached_answer_is_served_by_the_other_replica() {
    let m = mock(MockSettings::default()).await;
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    write_keys(&keys, &[("k1", 7)]);
    let mk = || {
        let mut cfg = config(vec![upstream("a", &m, "m")]);
        cfg.store = redis.store_config(Some(&keys));
        cfg.cache
            .models
            .insert("m".into(), forwarder::config::ModelCacheConfig::default());
        cfg
    };
    let (a, b) = (start(mk()).await, start(mk()).await);
    connected(&a).await;
    connected(&b).await;
    let mut body = chat("m", "return policy?");
    body["temperature"] = json!(0);
    let first = a.post("/v1/chat/completions", &body, &[]).await;
    assert_eq!(first.header("x-cache"), Some("MISS"));
    // The answer is stored in the background just after it is sent.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let hit = b.post("/v1/chat/completions", &body, &[]).await;
    assert_eq!(
        hit.header("x-cache"),
        Some("HIT"),
        "served by the other replica"
    );
    assert_eq!(hit.body, first.body);
    assert_eq!(m.model.requests(), 1);
}

/// `examples/config/redis.yaml` as a user would run it: two replicas from
/// the same file (listen address and Redis URL overridden) share the cache
/// and idempotency records, sealed with the demo key beside it.
#[cfg_attr(not(redis_server), ignore = "redis-server not installed")]
#[tokio::test]
async fn the_example_redis_config_runs_two_sharing_replicas() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let yaml = std::fs::read_to_string(root.join("examples/config/redis.yaml")).unwrap();
    let example = forwarder::config::load_from_str(&yaml).expect("the example is valid");
    let redis = RedisServer::start().await;
    let mk = || {
        let mut cfg = example.clone();
        cfg.server.listen = loopback();
        cfg.logging.access_log = false;
        let r = cfg.store.redis.as_mut().unwrap();
        assert_eq!(r.url, "redis://127.0.0.1:6379");
        r.url = redis.url();
        let enc = cfg.store.encryption.as_mut().unwrap();
        enc.key_file = root.join(&enc.key_file);
        cfg
    };
    let (a, b) = (start(mk()).await, start(mk()).await);
    connected(&a).await;
    connected(&b).await;
    let mut body = chat("mock", "what is the return policy?");
    body["temperature"] = json!(0);
    let first = a.post("/v1/chat/completions", &body, &[]).await;
    assert_eq!(
        (first.status, first.header("x-cache")),
        (200, Some("MISS")),
        "{}",
        first.text
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let hit = b.post("/v1/chat/completions", &body, &[]).await;
    assert_eq!(hit.header("x-cache"), Some("HIT"));
    assert_eq!(hit.body, first.body);
    let key = [("idempotency-key", "example-1")];
    let sampled = chat("mock", "tell me a story");
    let one = a.post("/v1/chat/completions", &sampled, &key).await;
    let two = b.post("/v1/chat/completions", &sampled, &key).await;
    assert_eq!(two.header("idempotent-replayed"), Some("true"));
    assert_eq!(two.body, one.body);
    // Nothing readable in Redis: digested names, sealed values.
    let mut c = redis.conn().await;
    let names: Vec<String> = redis::cmd("KEYS")
        .arg("mf:*")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(names.len() >= 2, "{names:?}");
    for n in names {
        let v: Vec<u8> = redis::cmd("GET").arg(&n).query_async(&mut c).await.unwrap();
        assert!(
            !v.windows(6).any(|w| w == b"policy" || w == b"a stor"),
            "{n} holds plaintext"
        );
    }
}

#[cfg_attr(not(redis_server), ignore = "redis-server not installed")]
#[tokio::test]
async fn a_shared_rate_limit_holds_across_both_replicas() {
    let m = mock(MockSettings::default()).await;
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    write_keys(&keys, &[("k1", 7)]);
    let mk = || {
        let mut cfg = config(vec![upstream("a", &m, "m")]);
        cfg.store = redis.store_config(Some(&keys));
        cfg.rate_limit = Some(forwarder::config::RateLimitConfig {
            requests_per_second: 1,
            burst: 4,
            shared: true,
            tokens_per_minute: Some(100_000),
            ..Default::default()
        });
        // Generous: this test is about the limit, not about a slow machine
        // timing a call out (fail_open would then admit without headers).
        cfg.store.redis.as_mut().unwrap().timeout = Duration::from_secs(1);
        cfg
    };
    let (a, b) = (start(mk()).await, start(mk()).await);
    connected(&a).await;
    connected(&b).await;
    let body = chat("m", "hi");
    let mut statuses = Vec::new();
    let started = Instant::now();
    for i in 0..6 {
        let f = if i % 2 == 0 { &a } else { &b };
        let r = f.post("/v1/chat/completions", &body, &[]).await;
        if r.status == 200 {
            assert!(r.header("x-ratelimit-remaining-requests").is_some());
            assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("100000"));
        } else {
            assert_eq!(r.status, 429, "{}", r.text);
            assert_eq!(r.header("x-ratelimit-limit-requests"), Some("4"));
            assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));
            let after: u64 = r.header("retry-after").unwrap().parse().unwrap();
            assert!((1..=2).contains(&after), "{after}");
        }
        statuses.push(r.status);
    }
    // One limit across both: the burst of 4 admitted, then refused on
    // either (one more per second elapsed, on a slow machine).
    let ok = statuses.iter().filter(|s| **s == 200).count() as u64;
    assert!(
        ok >= 4 && ok <= 4 + started.elapsed().as_secs(),
        "{statuses:?}"
    );
    assert_eq!(&statuses[..4], [200; 4]);
    if started.elapsed() < Duration::from_secs(1) {
        assert_eq!(statuses, [200, 200, 200, 200, 429, 429]);
    }
}
