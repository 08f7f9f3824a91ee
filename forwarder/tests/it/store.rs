//! The shared store on a real Redis: atomic claims across two instances
//! (two replicas), sealing, tamper and rotation, and outages.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use forwarder::config::Config;
use forwarder::store::{self, Claimed, Space, Store, StoreError, StoreKey};
use forwarder::telemetry::Metrics;

use crate::common::metric_value;
use crate::redis_server::{write_keys, RedisServer};

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(60);

fn build(redis: &RedisServer, keys: Option<&std::path::Path>) -> (Arc<dyn Store>, Arc<Metrics>) {
    let cfg = Config {
        store: redis.store_config(keys),
        ..Default::default()
    };
    let metrics = Arc::new(Metrics::new());
    (store::build(&cfg, &metrics).expect("store builds"), metrics)
}

/// Retries `f` until it stops failing as unavailable (the background
/// connect), for at most two seconds.
async fn ready(s: &dyn Store) {
    let k = StoreKey::new(Space::Cache, "probe", b"probe");
    for _ in 0..100 {
        if s.get(&k).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the store never connected");
}

fn key(k: &str) -> StoreKey {
    StoreKey::new(Space::Idempotency, "tenant", k.as_bytes())
}

#[cfg_attr(not(redis_server), ignore = "redis-server not installed")]
#[tokio::test]
async fn claims_are_atomic_across_two_replicas() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    write_keys(&keys, &[("k1", 1)]);
    let (a, _) = build(&redis, Some(&keys));
    let (b, _) = build(&redis, Some(&keys));
    ready(&*a).await;
    ready(&*b).await;

    // Many concurrent claims from both replicas: exactly one wins.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            match s.claim(&key("race"), [1; 32], LEASE).await.unwrap() {
                Claimed::Won(g) => Some(g),
                Claimed::Busy { fingerprint } => {
                    assert_eq!(fingerprint, [1; 32]);
                    None
                }
                Claimed::Done(_) => panic!("nothing completed yet"),
            }
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        if let Some(g) = t.await.unwrap() {
            winners.push(g);
        }
    }
    assert_eq!(winners.len(), 1, "one claim wins");
    let guard = winners.pop().unwrap();
    assert!(
        b.get(&key("race")).await.unwrap().is_none(),
        "a claim is not a record"
    );
    assert!(guard.renew(LEASE).await.unwrap());
    guard
        .complete(Bytes::from_static(b"the answer"), TTL)
        .await
        .unwrap();
    match b.claim(&key("race"), [1; 32], LEASE).await.unwrap() {
        Claimed::Done(r) => assert_eq!(r.value.as_ref(), b"the answer"),
        other => panic!("expected Done, got {other:?}"),
    }

    // A dropped guard frees the key for the other replica.
    let Claimed::Won(g) = a.claim(&key("drop"), [2; 32], LEASE).await.unwrap() else {
        panic!()
    };
    drop(g);
    let mut freed = false;
    for _ in 0..50 {
        if let Claimed::Won(_) = b.claim(&key("drop"), [2; 32], LEASE).await.unwrap() {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(freed, "the abandoned claim was released");

    // Key names are digests: no tenant or caller key appears in Redis.
    let mut c = redis.conn().await;
    let names: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(!names.is_empty());
    for n in &names {
        assert!(n.starts_with("mf:idem:"), "{n}");
        assert!(!n.contains("tenant") && !n.contains("race"), "{n}");
    }
    // Values are sealed: the answer's bytes are not in Redis.
    let raw: Vec<u8> = redis::cmd("GET")
        .arg(format!("mf:{}", key("race").name()))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(!raw.windows(10).any(|w| w == b"the answer"));
}

#[cfg_attr(not(redis_server), ignore = "redis-server not installed")]
#[tokio::test]
async fn tampered_or_moved_records_are_counted_misses() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    write_keys(&keys, &[("k1", 1)]);
    let (s, metrics) = build(&redis, Some(&keys));
    ready(&*s).await;
    s.put(&key("t"), [1; 32], Bytes::from_static(b"answer"), TTL)
        .await
        .unwrap();
    s.put(&key("m"), [1; 32], Bytes::from_static(b"answer"), TTL)
        .await
        .unwrap();
    assert!(s.get(&key("t")).await.unwrap().is_some());

    let mut c = redis.conn().await;
    let name = format!("mf:{}", key("t").name());
    let raw: Vec<u8> = redis::cmd("GET")
        .arg(&name)
        .query_async(&mut c)
        .await
        .unwrap();
    // Flip one byte of the ciphertext (past the 'R' tag and header).
    let at = raw.len() - 5;
    let _: () = redis::cmd("SETRANGE")
        .arg(&name)
        .arg(at)
        .arg(&[raw[at] ^ 0x01][..])
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(
        s.get(&key("t")).await.unwrap().is_none(),
        "tampered: a miss"
    );
    // Moved under another key: the associated data no longer matches.
    let _: () = redis::cmd("RENAME")
        .arg(format!("mf:{}", key("m").name()))
        .arg(format!("mf:{}", key("elsewhere").name()))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(
        s.get(&key("elsewhere")).await.unwrap().is_none(),
        "moved: a miss"
    );
    let text = metrics.render();
    assert_eq!(
        metric_value(&text, "forwarder_store_corrupt_records_total", &[]),
        Some(2.0)
    );
    // A claim on a tampered key reads as a miss and wins.
    assert!(matches!(
        s.claim(&key("t"), [1; 32], LEASE).await.unwrap(),
        Claimed::Won(_)
    ));
}

#[cfg_attr(not(redis_server), ignore = "redis-server not installed")]
#[tokio::test]
async fn records_survive_key_rotation() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    write_keys(&keys, &[("old", 1)]);
    let (s, _) = build(&redis, Some(&keys));
    ready(&*s).await;
    s.put(&key("before"), [1; 32], Bytes::from_static(b"v1"), TTL)
        .await
        .unwrap();
    write_keys(&keys, &[("old", 1), ("new", 2)]);
    // The ring is reloaded in the background (every 100 ms here).
    let mut c = redis.conn().await;
    let mut rotated = false;
    for _ in 0..50 {
        s.put(&key("after"), [1; 32], Bytes::from_static(b"v2"), TTL)
            .await
            .unwrap();
        let raw: Vec<u8> = redis::cmd("GET")
            .arg(format!("mf:{}", key("after").name()))
            .query_async(&mut c)
            .await
            .unwrap();
        // 'R', version, id length, id.
        if &raw[3..6] == b"new" {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rotated, "the newest key encrypts after the reload");
    assert_eq!(
        s.get(&key("before")).await.unwrap().unwrap().value.as_ref(),
        b"v1"
    );
    // A replica started with only the new key cannot read the old record:
    // it says so as an error (unavailable for that record), never a miss
    // it could overwrite, and the record stays for the replicas that can.
    let only_new = dir.path().join("only-new");
    write_keys(&only_new, &[("new", 2)]);
    let (fresh, _) = build(&redis, Some(&only_new));
    ready(&*fresh).await;
    assert!(matches!(
        fresh.get(&key("before")).await,
        Err(forwarder::store::StoreError::UnknownKey(id)) if id == "old"
    ));
    assert_eq!(
        s.get(&key("before")).await.unwrap().unwrap().value.as_ref(),
        b"v1"
    );
    assert_eq!(
        fresh
            .get(&key("after"))
            .await
            .unwrap()
            .unwrap()
            .value
            .as_ref(),
        b"v2"
    );
}

#[cfg_attr(not(redis_server), ignore = "redis-server not installed")]
#[tokio::test]
async fn an_outage_fails_calls_fast_and_the_store_reconnects() {
    let mut redis = RedisServer::start().await;
    let (s, _) = build(&redis, None);
    ready(&*s).await;
    s.put(&key("a"), [1; 32], Bytes::from_static(b"v"), TTL)
        .await
        .unwrap();
    redis.kill();
    for _ in 0..5 {
        let t = Instant::now();
        let r = s.get(&key("a")).await;
        assert!(
            matches!(r, Err(StoreError::Unavailable(_) | StoreError::Timeout(_))),
            "{r:?}"
        );
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }
    redis.restart().await;
    let t = Instant::now();
    loop {
        match s
            .put(&key("b"), [1; 32], Bytes::from_static(b"v"), TTL)
            .await
        {
            Ok(()) => break,
            Err(_) if t.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("no reconnection after 10 s: {e}"),
        }
    }
    assert!(s.get(&key("b")).await.unwrap().is_some());
}

#[tokio::test]
async fn redis_without_a_key_ring_refuses_to_start() {
    let mut cfg = Config::default();
    cfg.store.backend = forwarder::config::StoreBackend::Redis;
    cfg.store.redis = Some(Default::default());
    let e = store::build(&cfg, &Metrics::new())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("allow_plaintext"), "{e}");
    assert!(forwarder::config::validate(&cfg)
        .unwrap_err()
        .iter()
        .any(|f| f.field == "store.encryption"));
}

/// `rediss://` against a real redis-server with TLS and client
/// certificates required: the store connects with the configured CA and
/// client certificate, and without the certificate (or trusting only the
/// system roots) it never does, and calls fail as unavailable.
#[cfg_attr(not(redis_server), ignore = "redis-server not installed")]
#[tokio::test]
async fn rediss_with_a_custom_ca_and_a_client_certificate() {
    use crate::tls::Ca;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("redis test CA");
    let (cert, cert_key) = ca.leaf("redis", &["127.0.0.1", "localhost"]);
    let (client_cert, client_key) = ca.leaf("forwarder", &[]);
    let file = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let (ca_file, cert_file, key_file) = (
        file("ca.pem", &ca.pem),
        file("redis.crt", &cert),
        file("redis.key", &cert_key),
    );
    let (client_cert_file, client_key_file) = (
        file("client.crt", &client_cert),
        file("client.key", &client_key),
    );
    let tls_port = RedisServer::free_port();
    let arg = |p: &std::path::Path| p.display().to_string();
    let redis = RedisServer::start_with(vec![
        "--tls-port".into(),
        tls_port.to_string(),
        "--tls-cert-file".into(),
        arg(&cert_file),
        "--tls-key-file".into(),
        arg(&key_file),
        "--tls-ca-cert-file".into(),
        arg(&ca_file),
        "--tls-auth-clients".into(),
        "yes".into(),
    ])
    .await;
    let ring = dir.path().join("ring");
    write_keys(&ring, &[("k1", 1)]);
    let store_with = |ca: Option<&std::path::Path>, client: bool| {
        let mut cfg = Config {
            store: redis.store_config(Some(&ring)),
            ..Default::default()
        };
        let r = cfg.store.redis.as_mut().unwrap();
        r.url = format!("rediss://127.0.0.1:{tls_port}");
        r.ca_file = ca.map(|p| p.to_path_buf());
        if client {
            r.client_cert_file = Some(client_cert_file.clone());
            r.client_key_file = Some(client_key_file.clone());
        }
        forwarder::config::validate(&cfg).expect("a valid config");
        store::build(&cfg, &Arc::new(Metrics::new())).expect("store builds")
    };

    let s = store_with(Some(&ca_file), true);
    ready(&*s).await;
    s.put(&key("tls"), [1; 32], Bytes::from_static(b"over tls"), TTL)
        .await
        .unwrap();
    let got = s.get(&key("tls")).await.unwrap().expect("stored");
    assert_eq!(&got.value[..], b"over tls");

    // No client certificate, or the system roots only: never connected.
    for (label, s) in [
        ("no client certificate", store_with(Some(&ca_file), false)),
        ("system roots", store_with(None, true)),
    ] {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            matches!(s.get(&key("tls")).await, Err(StoreError::Unavailable(_))),
            "{label}: must not connect"
        );
    }
}

/// The sorted index (a Redis sorted set) two replicas share: atomic adds,
/// ascending order by score, old members dropped as it grows, removal.
#[cfg_attr(not(redis_server), ignore = "redis-server not installed")]
#[tokio::test]
async fn a_sorted_index_is_shared_ordered_and_trimmed() {
    let redis = RedisServer::start().await;
    let (a, _) = build(&redis, None);
    let (b, _) = build(&redis, None);
    ready(&*a).await;
    ready(&*b).await;
    let k = StoreKey::new(Space::Job, "batch-list", b"alice");
    let ttl = Duration::from_secs(60);
    let base = 1_796_670_903_123u64;
    let (x, y) = tokio::join!(
        a.index_add(&k, "batch_b", base + 2, 0, ttl),
        b.index_add(&k, "batch_a", base + 1, 0, ttl)
    );
    x.unwrap();
    y.unwrap();
    a.index_add(&k, "batch_c", base + 3, 0, ttl).await.unwrap();
    let ids = |v: Vec<(String, u64)>| v.into_iter().map(|(m, _)| m).collect::<Vec<_>>();
    assert_eq!(
        ids(b.index_list(&k, 10).await.unwrap()),
        ["batch_a", "batch_b", "batch_c"]
    );
    assert_eq!(
        a.index_list(&k, 10).await.unwrap()[0].1,
        base + 1,
        "scores exact"
    );
    assert_eq!(
        ids(a.index_list(&k, 2).await.unwrap()),
        ["batch_a", "batch_b"]
    );
    b.index_add(&k, "batch_d", base + 4, base + 2, ttl)
        .await
        .unwrap();
    assert_eq!(
        ids(a.index_list(&k, 10).await.unwrap()),
        ["batch_b", "batch_c", "batch_d"]
    );
    a.index_remove(&k, "batch_c").await.unwrap();
    assert_eq!(
        ids(b.index_list(&k, 10).await.unwrap()),
        ["batch_b", "batch_d"]
    );
}
