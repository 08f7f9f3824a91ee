//! Forwarder replicas sharing one real Redis: two processes sharing
//! idempotency, the cache, sealed records and rate limits; the example
//! config; and the documented behaviour when Redis goes away.

use std::time::{Duration, Instant};

use forwarder::config::{FailurePolicy, MockSettings};
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
pub async fn connected(f: &Fwd) {
    let k = forwarder::store::StoreKey::new(forwarder::store::Space::Cache, "probe", b"p");
    for _ in 0..500 {
        if f.server.pipeline.store().get(&k).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("replica never connected to redis");
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

/// Every `mf:*` key in Redis.
async fn redis_keys(redis: &RedisServer) -> Vec<String> {
    let mut c = redis.conn().await;
    redis::cmd("KEYS")
        .arg("mf:*")
        .query_async(&mut c)
        .await
        .unwrap()
}

/// Two forwarder processes (the real binary, as two pods would run it)
/// sharing one Redis with sealed records: a retry on the other replica is
/// replayed, concurrent duplicates make one upstream call, a cached answer
/// is served by the other replica, a record tampered with in Redis is a
/// counted miss (never a wrong answer), records sealed before a key
/// rotation are still read after it, and a shared rate limit (a tier) holds
/// across both.
#[cfg_attr(not(redis_server), ignore = "redis-server not installed")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_replays_the_cache_sealed_records_and_limits() {
    use crate::process::Replica;
    let m = slow_mock(Duration::from_millis(300)).await;
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ring = dir.path().join("ring");
    write_keys(&ring, &[("k1", 7)]);
    std::fs::write(dir.path().join("keys"), "alice: sk-alice\nlim: sk-lim\n").unwrap();
    let mut cfg = config(vec![upstream("a", &m, "m")]);
    cfg.store = redis.store_config(Some(&ring));
    cfg.store.redis.as_mut().unwrap().timeout = Duration::from_secs(1);
    cfg.auth.api_keys_file = Some(dir.path().join("keys"));
    cfg.cache
        .models
        .insert("m".into(), forwarder::config::ModelCacheConfig::default());
    cfg.rate_limit = Some(forwarder::config::RateLimitConfig {
        requests_per_second: 1000,
        burst: 1000,
        shared: true,
        tiers: [(
            "tight".to_string(),
            forwarder::config::TierLimits {
                requests_per_second: 1,
                burst: 3,
                tokens_per_minute: None,
            },
        )]
        .into(),
        client_tiers: [("lim".to_string(), "tight".to_string())].into(),
        ..Default::default()
    });
    let mut a = Replica::new("a", dir.path(), &cfg);
    let mut b = Replica::new("b", dir.path(), &cfg);
    a.start().await;
    b.start().await;
    let alice = ("authorization", "Bearer sk-alice");

    // A retry that lands on the other replica is replayed.
    let story = chat("m", "tell me a story");
    let one = a
        .post(
            "/v1/chat/completions",
            &story,
            &[alice, ("idempotency-key", "r-1")],
        )
        .await;
    assert_eq!(one.status, 200, "{}", one.text);
    let two = b
        .post(
            "/v1/chat/completions",
            &story,
            &[alice, ("idempotency-key", "r-1")],
        )
        .await;
    assert_eq!(two.header("idempotent-replayed"), Some("true"));
    assert_eq!(two.body, one.body);
    assert_eq!(m.model.requests(), 1);

    // Concurrent duplicates on both replicas: one upstream call.
    let dup = [alice, ("idempotency-key", "r-2")];
    let (x, y) = tokio::join!(
        a.post("/v1/chat/completions", &story, &dup),
        b.post("/v1/chat/completions", &story, &dup)
    );
    assert_eq!((x.status, y.status), (200, 200), "{} / {}", x.text, y.text);
    assert_eq!(x.body, y.body);
    assert_eq!(m.model.requests(), 2);

    // A cached answer is served by the other replica.
    let cacheable = |prompt: &str| {
        let mut body = chat("m", prompt);
        body["temperature"] = json!(0);
        body
    };
    let faq = cacheable("what is the return policy?");
    let miss = a.post("/v1/chat/completions", &faq, &[alice]).await;
    assert_eq!(miss.header("x-cache"), Some("MISS"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let hit = b.post("/v1/chat/completions", &faq, &[alice]).await;
    assert_eq!(hit.header("x-cache"), Some("HIT"), "{}", hit.text);
    assert_eq!(hit.body, miss.body);

    // A record tampered with in Redis: a counted miss, answered afresh.
    let before = redis_keys(&redis).await;
    let hours = cacheable("what are your opening hours?");
    let first = a.post("/v1/chat/completions", &hours, &[alice]).await;
    assert_eq!(first.header("x-cache"), Some("MISS"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c = redis.conn().await;
    let mut flipped = 0;
    for name in redis_keys(&redis).await {
        if before.contains(&name) {
            continue;
        }
        let raw: Vec<u8> = redis::cmd("GET")
            .arg(&name)
            .query_async(&mut c)
            .await
            .unwrap_or_default();
        if raw.len() < 40 {
            continue;
        }
        let at = raw.len() - 5;
        let _: () = redis::cmd("SETRANGE")
            .arg(&name)
            .arg(at)
            .arg(&[raw[at] ^ 0x01][..])
            .query_async(&mut c)
            .await
            .unwrap();
        flipped += 1;
    }
    assert!(flipped >= 1, "the cached answer is in Redis");
    let after = b.post("/v1/chat/completions", &hours, &[alice]).await;
    assert_eq!(after.status, 200, "{}", after.text);
    assert_eq!(
        after.header("x-cache"),
        Some("MISS"),
        "tampered: never served"
    );
    assert_eq!(
        after.body["choices"][0]["message"]["content"],
        first.body["choices"][0]["message"]["content"]
    );
    assert!(b.metric("forwarder_store_corrupt_records_total", &[]).await >= 1.0);

    // Rotation: a second key is added (it seals from now on); the answer
    // sealed under the first is still read.
    write_keys(&ring, &[("k1", 7), ("k2", 9)]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let old = b.post("/v1/chat/completions", &faq, &[alice]).await;
    assert_eq!(
        old.header("x-cache"),
        Some("HIT"),
        "sealed under k1, read after rotation"
    );
    let fresh = cacheable("do you ship abroad?");
    assert_eq!(
        a.post("/v1/chat/completions", &fresh, &[alice])
            .await
            .header("x-cache"),
        Some("MISS")
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        b.post("/v1/chat/completions", &fresh, &[alice])
            .await
            .header("x-cache"),
        Some("HIT")
    );
    let mut sealed_k2 = false;
    for name in redis_keys(&redis).await {
        let raw: Vec<u8> = redis::cmd("GET")
            .arg(&name)
            .query_async(&mut c)
            .await
            .unwrap_or_default();
        sealed_k2 |= raw.windows(4).any(|w| w == [1, 2, b'k', b'2']);
    }
    assert!(
        sealed_k2,
        "records written after the rotation are sealed with k2"
    );

    // One tier's limit across both processes: a burst of 3, then 429.
    let lim = ("authorization", "Bearer sk-lim");
    let mut statuses = Vec::new();
    for i in 0..4 {
        let r = if i % 2 == 0 { &a } else { &b };
        statuses.push(r.post("/v1/chat/completions", &faq, &[lim]).await.status);
    }
    assert_eq!(&statuses[..3], [200; 3], "{statuses:?}");
    assert_eq!(statuses[3], 429, "{statuses:?}");
}

/// A DELETE on one replica for a job another replica is running: the
/// job's turn in the shared store says it started, so the answer is 409
/// and the job still ends `succeeded` (it was once answered 200
/// "cancelled" while the other replica ran it to the end).
#[cfg_attr(not(redis_server), ignore = "redis-server not installed")]
#[tokio::test]
async fn a_job_running_on_one_replica_cannot_be_cancelled_on_the_other() {
    let m = slow_mock(Duration::from_millis(1500)).await;
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    write_keys(&keys, &[("k1", 7)]);
    let a = replica(&redis, &m, &keys).await;
    let b = replica(&redis, &m, &keys).await;
    connected(&a).await;
    connected(&b).await;
    let r = a
        .post("/v1/async/chat/completions", &chat("m", "long"), &[])
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_string();
    let path = format!("/v1/async/jobs/{id}");
    for _ in 0..100 {
        if a.get(&path, &[]).await.body["status"] == "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(a.get(&path, &[]).await.body["status"], "running");
    let r = b.delete(&path, &[]).await;
    assert_eq!(r.status, 409, "{}", r.text);
    assert_eq!(wait_job(&a, &id, &[]).await["status"], "succeeded");
    assert_eq!(m.model.requests(), 1);
}
