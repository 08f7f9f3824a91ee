//! Store semantics, run against the memory backend (the Redis backend is
//! checked with the same expectations in forwarder/tests/it/store.rs).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::layer::{Layered, Refused, Seal};
use super::memory::MemoryBackend;
use super::*;

fn store() -> (Arc<MemoryBackend>, StoreMetrics, Layered) {
    store_with(None)
}

fn store_with(seal: Option<Arc<dyn Seal>>) -> (Arc<MemoryBackend>, StoreMetrics, Layered) {
    let m = StoreMetrics::unregistered();
    let b = Arc::new(MemoryBackend::new(1 << 20, 1 << 20, m.clone()));
    (b.clone(), m.clone(), Layered::new(b, seal, m))
}

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(60);

fn key(k: &str) -> StoreKey {
    StoreKey::new(Space::Idempotency, "tenant", k.as_bytes())
}

#[tokio::test]
async fn put_get_delete_round_trip() {
    let (_, _, s) = store();
    assert!(s.get(&key("a")).await.unwrap().is_none());
    s.put(&key("a"), [1; 32], Bytes::from_static(b"v"), TTL)
        .await
        .unwrap();
    let r = s.get(&key("a")).await.unwrap().unwrap();
    assert_eq!((r.fingerprint, r.value.as_ref()), ([1; 32], &b"v"[..]));
    s.delete(&key("a")).await.unwrap();
    assert!(s.get(&key("a")).await.unwrap().is_none());
}

#[tokio::test]
async fn one_claim_wins_then_the_record_is_done() {
    let (_, _, s) = store();
    let Claimed::Won(guard) = s.claim(&key("k"), [1; 32], LEASE).await.unwrap() else {
        panic!("first claim wins")
    };
    match s.claim(&key("k"), [2; 32], LEASE).await.unwrap() {
        Claimed::Busy { fingerprint } => assert_eq!(fingerprint, [1; 32]),
        other => panic!("expected Busy, got {other:?}"),
    }
    assert!(
        s.get(&key("k")).await.unwrap().is_none(),
        "a claim is not a record"
    );
    assert!(guard.renew(LEASE).await.unwrap());
    guard
        .complete(Bytes::from_static(b"answer"), TTL)
        .await
        .unwrap();
    match s.claim(&key("k"), [1; 32], LEASE).await.unwrap() {
        Claimed::Done(r) => assert_eq!(r.value.as_ref(), b"answer"),
        other => panic!("expected Done, got {other:?}"),
    }
}

#[tokio::test]
async fn a_dropped_guard_frees_the_key_at_once() {
    let (_, _, s) = store();
    let Claimed::Won(guard) = s.claim(&key("k"), [1; 32], LEASE).await.unwrap() else {
        panic!()
    };
    drop(guard);
    assert!(matches!(
        s.claim(&key("k"), [1; 32], LEASE).await.unwrap(),
        Claimed::Won(_)
    ));
}

#[tokio::test]
async fn a_lapsed_lease_is_lost_and_cannot_overwrite_the_new_holder() {
    let (_, _, s) = store();
    let Claimed::Won(old) = s
        .claim(&key("k"), [1; 32], Duration::from_millis(30))
        .await
        .unwrap()
    else {
        panic!()
    };
    tokio::time::sleep(Duration::from_millis(80)).await;
    let Claimed::Won(new) = s.claim(&key("k"), [1; 32], LEASE).await.unwrap() else {
        panic!("the lapsed lease frees the key")
    };
    assert!(!old.renew(LEASE).await.unwrap(), "the old claim is lost");
    assert!(matches!(
        old.complete(Bytes::from_static(b"late"), TTL).await,
        Err(StoreError::ClaimLost)
    ));
    new.complete(Bytes::from_static(b"new"), TTL).await.unwrap();
    assert_eq!(
        s.get(&key("k")).await.unwrap().unwrap().value.as_ref(),
        b"new"
    );
}

#[tokio::test]
async fn records_expire_after_their_ttl() {
    let (_, _, s) = store();
    s.put(
        &key("t"),
        [0; 32],
        Bytes::from_static(b"v"),
        Duration::from_millis(30),
    )
    .await
    .unwrap();
    assert!(s.get(&key("t")).await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert!(s.get(&key("t")).await.unwrap().is_none());
}

#[tokio::test]
async fn memory_is_bounded_in_bytes_lru_and_admits_new_records() {
    let m = StoreMetrics::unregistered();
    let b = Arc::new(MemoryBackend::new(20_000, 20_000, m.clone()));
    let s = Layered::new(b.clone(), None, m.clone());
    for i in 0..50 {
        let k = key(&format!("k{i}"));
        s.put(&k, [0; 32], Bytes::from(vec![b'x'; 1000]), TTL)
            .await
            .unwrap();
        b.settle();
        assert!(s.get(&k).await.unwrap().is_some(), "k{i} admitted");
    }
    b.settle();
    assert!(m.bytes.get() <= 20_000, "bytes {}", m.bytes.get());
    assert!(m.evictions.get() > 0);
    assert!(s.get(&key("k0")).await.unwrap().is_none(), "oldest evicted");
}

/// A test seal: XOR with a byte, with a check byte bound to the key.
struct Xor;

impl Seal for Xor {
    fn seal(&self, ad: &[u8], plain: &[u8]) -> Bytes {
        let mut v = vec![1, ad.iter().fold(0u8, |a, b| a ^ b)];
        v.extend(plain.iter().map(|b| b ^ 0x5a));
        v.into()
    }
    fn open(&self, ad: &[u8], blob: &[u8]) -> Result<Bytes, Refused> {
        match blob {
            [1, check, rest @ ..] if *check == ad.iter().fold(0u8, |a, b| a ^ b) => {
                Ok(rest.iter().map(|b| b ^ 0x5a).collect::<Vec<_>>().into())
            }
            _ => Err(Refused::Invalid("authentication failed".into())),
        }
    }
}

#[tokio::test]
async fn records_that_fail_to_open_are_counted_misses_and_claimable() {
    let (b, m, s) = store_with(Some(Arc::new(Xor)));
    s.put(&key("a"), [1; 32], Bytes::from_static(b"v"), TTL)
        .await
        .unwrap();
    assert!(s.get(&key("a")).await.unwrap().is_some());
    // A plaintext record planted in the backend is refused.
    use super::backend::Backend;
    let name = key("a").name().to_string();
    b.put(&name, Bytes::from_static(b"\0garbage"), TTL)
        .await
        .unwrap();
    assert!(s.get(&key("a")).await.unwrap().is_none());
    assert_eq!(m.corrupt.get(), 1);
    // A claim on a corrupt record removes it and wins.
    assert!(matches!(
        s.claim(&key("a"), [1; 32], LEASE).await.unwrap(),
        Claimed::Won(_)
    ));
    assert_eq!(m.corrupt.get(), 2);
}

/// Two replicas on one backend while a key rotation rolls out: the one
/// that has not loaded the new key neither serves nor deletes its records.
#[tokio::test]
async fn a_record_under_a_key_not_loaded_here_is_unavailable_and_kept() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let b64 = |n: u8| base64::engine::general_purpose::STANDARD.encode([n; 32]);
    let (old, new) = (dir.path().join("old"), dir.path().join("new"));
    std::fs::write(&old, format!("k1: {}\n", b64(1))).unwrap();
    std::fs::write(&new, format!("k1: {}\nk2: {}\n", b64(1), b64(2))).unwrap();
    let m = StoreMetrics::unregistered();
    let backend = Arc::new(MemoryBackend::new(1 << 20, 1 << 20, m.clone()));
    let a = Layered::new(
        backend.clone(),
        Some(Arc::new(KeyRing::load(&new).unwrap())),
        m.clone(),
    );
    let b = Layered::new(
        backend.clone(),
        Some(Arc::new(KeyRing::load(&old).unwrap())),
        m.clone(),
    );
    let Claimed::Won(g) = a.claim(&key("idem"), [7; 32], LEASE).await.unwrap() else {
        panic!("first claim wins")
    };
    g.complete(Bytes::from_static(b"answer A"), TTL)
        .await
        .unwrap();
    for _ in 0..3 {
        assert!(matches!(b.get(&key("idem")).await, Err(StoreError::UnknownKey(id)) if id == "k2"));
        assert!(matches!(
            b.claim(&key("idem"), [7; 32], LEASE).await,
            Err(StoreError::UnknownKey(_))
        ));
    }
    assert_eq!(m.unreadable.get(), 6);
    assert_eq!(m.corrupt.get(), 0, "not counted as tampering");
    let Claimed::Done(r) = a.claim(&key("idem"), [7; 32], LEASE).await.unwrap() else {
        panic!("the record is still there for the replica that can read it")
    };
    assert_eq!(&r.value[..], b"answer A");
}

/// A large upload's worth of payload does not evict a tenant's claim, a
/// job record or a rate limit: payload has its own budget (they once
/// shared one LRU, and a few uploads flushed every tenant's state).
#[tokio::test]
async fn payload_never_evicts_coordination_state() {
    let m = StoreMetrics::unregistered();
    let b = Arc::new(MemoryBackend::new(50_000, 50_000, m.clone()));
    let s = Layered::new(b.clone(), None, m.clone());
    let claim = key("held");
    let Claimed::Won(_guard) = s.claim(&claim, [1; 32], LEASE).await.unwrap() else {
        panic!("won")
    };
    let job = StoreKey::new(Space::Job, "job", b"job_1");
    s.put(&job, [0; 32], Bytes::from_static(b"{}"), TTL)
        .await
        .unwrap();
    let limit = StoreKey::new(Space::RateLimit, "alice", b"rps");
    let rate = Rate {
        interval: Duration::from_secs(60),
        burst: 2,
    };
    assert!(s.rate(&limit, rate, 1).await.unwrap().allowed);
    for i in 0..100 {
        let chunk = StoreKey::new(Space::File, "chunk", format!("{i}").as_bytes());
        s.put(&chunk, [0; 32], Bytes::from(vec![b'x'; 4000]), TTL)
            .await
            .unwrap();
        let cached = StoreKey::new(Space::Cache, "t", format!("{i}").as_bytes());
        s.put(&cached, [0; 32], Bytes::from(vec![b'y'; 4000]), TTL)
            .await
            .unwrap();
        b.settle();
    }
    assert!(m.evictions.get() > 0, "the payload budget evicted payload");
    assert!(
        matches!(
            s.claim(&claim, [1; 32], LEASE).await.unwrap(),
            Claimed::Busy { .. }
        ),
        "the claim is still held"
    );
    assert!(s.get(&job).await.unwrap().is_some(), "the job record stays");
    assert!(s.rate(&limit, rate, 1).await.unwrap().allowed);
    assert!(
        !s.rate(&limit, rate, 1).await.unwrap().allowed,
        "the limit's state was kept: a third unit in a minute is refused"
    );
}

/// The memory backend's sorted indexes (batch lists) live within a budget
/// of their own (a quarter of the state budget): past it, the largest
/// index loses its oldest members, and a small index keeps all of its.
#[tokio::test]
async fn memory_indexes_are_bounded_and_the_largest_loses_its_oldest() {
    use super::backend::Backend;
    let m = StoreMetrics::unregistered();
    // 40,000 bytes of state: 10,000 for indexes, about 180 members of 8
    // characters each.
    let b = MemoryBackend::new(40_000, 40_000, m.clone());
    let day = Duration::from_secs(86_400);
    b.index_add("small", "a", 1, 0, day).await.unwrap();
    b.index_add("small", "b", 2, 0, day).await.unwrap();
    for i in 0..1_000u64 {
        b.index_add("big", &format!("m{i:07}"), i, 0, day)
            .await
            .unwrap();
    }
    let big = b.index_list("big", usize::MAX).await.unwrap();
    assert!(big.len() < 200, "{} members kept", big.len());
    assert!(big.len() > 100, "{} members kept", big.len());
    // The newest stayed; the oldest went.
    assert_eq!(big.last().map(|(_, s)| *s), Some(999));
    assert!(
        big.first().is_some_and(|(_, s)| *s > 800),
        "{:?}",
        big.first()
    );
    assert_eq!(b.index_list("small", 10).await.unwrap().len(), 2);
    assert!(m.evictions.get() >= 800);
}
