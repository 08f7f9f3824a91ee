//! Issue 12's delivery guarantee under `kill -9`: two forwarder processes
//! (real children of the `forwarder` binary) share a Kafka-protocol broker
//! (tansu) and a real redis-server; N jobs (`GUARANTEE_JOBS`, default 1,000)
//! are submitted while one replica is killed with SIGKILL at random points
//! `GUARANTEE_KILLS` times (default 3) and restarted. Every job must end
//! `succeeded` with the answer to its own prompt (a per-job token), and the
//! upstream (mock-llm, which honours `Idempotency-Key` like a provider that
//! de-duplicates) must have produced exactly one answer per job id. How
//! many job ids reached the upstream more than once (a call in flight at a
//! kill, re-run after the redelivery) is printed, not hidden.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use forwarder::config::{LatencyDist, MockSettings};
use rand::Rng;
use serde_json::Value;

use crate::broker::{group_offsets, kafka_config, Broker};
use crate::common::*;
use crate::process::Replica;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(all(kafka, redis_server)),
    ignore = "needs a Kafka-protocol broker (TANSU_BIN) and redis-server"
)]
async fn kill_nine_three_times_every_job_succeeds_with_one_upstream_answer() {
    let n = env_or("GUARANTEE_JOBS", 1000);
    let kills = env_or("GUARANTEE_KILLS", 3);
    let began = Instant::now();
    let broker = Broker::start().await;
    let redis = crate::redis_server::RedisServer::start().await;
    let m = mock(MockSettings {
        latency: LatencyDist::Uniform {
            min: Duration::from_millis(100),
            max: Duration::from_millis(300),
        },
        ..MockSettings::default()
    })
    .await;
    let mut cfg = kafka_config(&m, &broker, "jobs-kill9");
    cfg.store = redis.store_config(None);
    cfg.async_jobs.workers = 10;
    // A killed replica's claims hold its job ids for 5 s, longer than a
    // restart takes, so redelivered jobs meet the dead claim (and must wait
    // it out rather than fail after the 1 s duplicate wait).
    cfg.idempotency.lease = Duration::from_secs(5);
    cfg.idempotency.wait = Duration::from_secs(1);
    cfg.server.shutdown.drain_delay = Duration::ZERO;
    let dir = tempfile::tempdir().unwrap();
    // Each restarted as itself: the group gives it its partitions back.
    let as_member = |name: &str| {
        let mut c = cfg.clone();
        c.async_jobs.kafka.group_instance_id = Some(format!("replica-{name}"));
        c
    };
    let mut a = Replica::new("a", dir.path(), &as_member("a"));
    let mut b = Replica::new("b", dir.path(), &as_member("b"));
    a.start().await;
    b.start().await;

    // The killer: B dies at random points while jobs are submitted and run.
    let killer = tokio::spawn(async move {
        let mut at = Vec::new();
        for _ in 0..kills {
            // A random point while B is running jobs (calls in flight).
            let wait = rand::rng().random_range(300..2500);
            tokio::time::sleep(Duration::from_millis(wait)).await;
            let mut busy = b.in_flight().await;
            let give_up = Instant::now() + Duration::from_secs(15);
            while busy < 1.0 && Instant::now() < give_up {
                tokio::time::sleep(Duration::from_millis(20)).await;
                busy = b.in_flight().await;
            }
            b.kill9();
            at.push((began.elapsed(), busy));
            let down = rand::rng().random_range(100..1500);
            tokio::time::sleep(Duration::from_millis(down)).await;
            b.start().await;
        }
        (b, at)
    });

    // Submissions go to A (never killed), 16 at a time.
    let http = client();
    let jobs: Vec<(String, String)> = {
        use futures::StreamExt;
        futures::stream::iter(0..n)
            .map(|i| {
                let (http, base) = (http.clone(), a.base());
                async move {
                    let token = format!("token-{i}-{:016x}", rand::random::<u64>());
                    let r = http
                        .post(format!("{base}/v1/async/chat/completions"))
                        .json(&chat("mock", &format!("job {token}")))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 202);
                    let v: Value = r.json().await.unwrap();
                    (v["id"].as_str().unwrap().to_string(), token)
                }
            })
            .buffer_unordered(16)
            .collect()
            .await
    };
    let (b, kill_times) = killer.await.unwrap();
    assert_eq!(kill_times.len(), kills);
    let killed_mid_run: f64 = kill_times.iter().map(|(_, busy)| busy).sum();

    // Every job ends `succeeded` with its own answer, read from either replica.
    let mut pending: HashMap<String, String> = jobs.iter().cloned().collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut finished: HashMap<String, Value> = HashMap::new();
    while !pending.is_empty() {
        if Instant::now() >= deadline {
            let tail = |p: &std::path::Path| {
                let t = std::fs::read_to_string(p).unwrap_or_default();
                t.lines().rev().take(15).collect::<Vec<_>>().join("\n")
            };
            panic!(
                "{} jobs never finished (e.g. {:?}); group offsets {:?}; A's log ends:\n{}\nB's log ends:\n{}",
                pending.len(),
                group_offsets(&broker.addr, "jobs-kill9").await,
                pending.keys().next(),
                tail(&a.log),
                tail(&b.log)
            );
        }
        eprintln!("{:?}: {} jobs pending", began.elapsed(), pending.len());
        for (k, id) in pending
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .iter()
            .enumerate()
        {
            let base = if k % 2 == 0 { a.base() } else { b.base() };
            let r = http
                .get(format!("{base}/v1/async/jobs/{id}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let v: Value = r.json().await.unwrap();
            let s = v["status"].as_str().unwrap().to_string();
            if s != "queued" && s != "running" {
                pending.remove(id);
                finished.insert(id.clone(), v);
            }
        }
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let drained = began.elapsed();
    for (id, token) in &jobs {
        let job = &finished[id];
        assert_eq!(job["status"], "succeeded", "{job}");
        let text = job["response"]["body"]["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default();
        assert!(text.contains(token.as_str()), "job {id}: {text}");
    }

    // The upstream's view, per job id.
    let calls = mock_calls(&m).await;
    let (mut repeated, mut replayed) = (0u32, 0);
    for (id, _) in &jobs {
        let c = &calls[id.as_str()];
        assert_eq!(c["answered"], 1, "job {id}: {c}");
        if c["started"].as_u64().unwrap() > 1 {
            repeated += 1;
        }
        replayed += c["replayed"].as_u64().unwrap();
    }
    assert_eq!(calls.len(), n, "no call under any other job id");
    assert!(
        killed_mid_run >= 1.0,
        "no kill hit B with a job in flight: {kill_times:?}"
    );
    assert!(
        f64::from(repeated) <= killed_mid_run,
        "only a job in flight at a kill is sent upstream twice: {repeated} > {killed_mid_run}"
    );
    println!(
        "guarantee: {n} jobs, {kills} kill -9 at (time, jobs in flight on B) {kill_times:?}; all succeeded with their own \
         answer; upstream answers per job id: exactly 1; job ids sent upstream more than once: \
         {repeated} ({replayed} answered by the upstream's idempotency replay); \
         drained in {drained:?}, total {:?}",
        began.elapsed()
    );
}

/// The mock upstream's calls by `Idempotency-Key` (started, answered,
/// replayed).
async fn mock_calls(m: &forwarder::mock_llm::MockServer) -> serde_json::Map<String, Value> {
    let calls: Value = client()
        .get(format!(
            "{}/mock/calls",
            m.base_url().trim_end_matches("/v1")
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    calls["calls"].as_object().expect("mock calls").clone()
}

/// Callbacks on a fleet: two processes on Kafka and Redis, a receiver that
/// answers 503 to the first delivery of every event, and SIGKILLs while
/// every retry waits (one replica, then both). Every job's
/// event must reach the receiver with a 2xx at least once, under one
/// `webhook-id` per job, and every job's record must end `delivered`. A
/// delivery was once a detached task after the acknowledgement: a kill lost
/// it and left `callback.status: pending` for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(all(kafka, redis_server)),
    ignore = "needs a Kafka-protocol broker (TANSU_BIN) and redis-server"
)]
async fn callbacks_pending_at_a_kill_nine_are_resumed_and_delivered() {
    use std::collections::HashSet;
    use std::sync::Arc;

    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use parking_lot::Mutex;

    /// Per webhook-id: deliveries seen, and whether one was answered 2xx.
    type Seen = Arc<Mutex<HashMap<String, (u32, bool)>>>;
    let seen: Seen = Arc::default();
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(|State(seen): State<Seen>, headers: HeaderMap| async move {
                let id = headers
                    .get("webhook-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                let mut s = seen.lock();
                let e = s.entry(id).or_default();
                e.0 += 1;
                if e.0 == 1 {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    e.1 = true;
                    StatusCode::OK
                }
            }),
        )
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let n = env_or("CALLBACK_JOBS", 60);
    let broker = Broker::start().await;
    let redis = crate::redis_server::RedisServer::start().await;
    let m = mock(MockSettings {
        latency: LatencyDist::Fixed(Duration::from_millis(50)),
        ..MockSettings::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("webhook-secrets");
    std::fs::write(&secrets, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n").unwrap();
    let mut cfg = kafka_config(&m, &broker, "jobs-callbacks");
    cfg.store = redis.store_config(None);
    cfg.idempotency.lease = Duration::from_secs(2);
    cfg.server.shutdown.drain_delay = Duration::ZERO;
    let cb = &mut cfg.async_jobs.callbacks;
    loopback_callbacks(cb, secrets, true);
    cb.max_attempts = 20;
    // Long enough that a kill finds retries waiting on the killed replica.
    cb.base_delay = Duration::from_millis(1500);
    cb.max_delay = Duration::from_millis(2000);
    let as_member = |name: &str| {
        let mut c = cfg.clone();
        c.async_jobs.kafka.group_instance_id = Some(format!("cb-{name}"));
        c
    };
    let mut a = Replica::new("a", dir.path(), &as_member("a"));
    let mut b = Replica::new("b", dir.path(), &as_member("b"));
    a.start().await;
    b.start().await;

    let http = client();
    let mut ids = Vec::new();
    for i in 0..n {
        let base = if i % 2 == 0 { a.base() } else { b.base() };
        let r = http
            .post(format!("{base}/v1/async/chat/completions"))
            .header("x-callback-url", &hook)
            .json(&chat("mock", &format!("event {i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let v: Value = r.json().await.unwrap();
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    // Once every event's first delivery has failed and its retry waits:
    // kill -9 one replica, then (after a restart) both at once, so no
    // retry in flight survives in any process.
    let first_tries = Instant::now() + Duration::from_secs(30);
    while seen.lock().len() < n {
        assert!(Instant::now() < first_tries, "first deliveries never came");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    b.kill9();
    tokio::time::sleep(Duration::from_millis(200)).await;
    b.start().await;
    tokio::time::sleep(Duration::from_millis(rand::rng().random_range(100..400))).await;
    a.kill9();
    b.kill9();
    a.start().await;
    b.start().await;

    let want: HashSet<String> = ids.iter().map(|id| format!("msg_{id}")).collect();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let delivered: HashSet<String> = seen
            .lock()
            .iter()
            .filter(|(_, (_, ok))| *ok)
            .map(|(id, _)| id.clone())
            .collect();
        let missing = want.difference(&delivered).count();
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {n} callbacks never got a 2xx delivery"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        seen.lock().keys().all(|id| want.contains(id)),
        "one webhook-id per job, no other"
    );
    // Every record ends `delivered`, read from either replica.
    let deadline = Instant::now() + Duration::from_secs(30);
    for (k, id) in ids.iter().enumerate() {
        let base = if k % 2 == 0 { a.base() } else { b.base() };
        loop {
            let v: Value = http
                .get(format!("{base}/v1/async/jobs/{id}"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if v["callback"]["status"] == "delivered" {
                break;
            }
            assert!(Instant::now() < deadline, "job {id}: {v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let duplicates: u32 = seen.lock().values().map(|(c, _)| c.saturating_sub(2)).sum();
    println!("callbacks: {n} jobs, 3 kill -9; all delivered; {duplicates} deliveries beyond the expected two per event");
}

/// A batch outlives the replica driving it: two processes on Kafka and
/// Redis, a 40-line batch created on B, B killed with SIGKILL while the
/// batch runs (and restarted, as a pod is). A replica's sweep takes the
/// batch's lapsed lease over, finds the lines' jobs again (none is
/// submitted twice) and completes it with every `custom_id` exactly once.
/// The batch once stayed `in_progress` for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(all(kafka, redis_server)),
    ignore = "needs a Kafka-protocol broker (TANSU_BIN) and redis-server"
)]
async fn a_batch_whose_driver_is_killed_is_taken_over_and_completed() {
    let broker = Broker::start().await;
    let redis = crate::redis_server::RedisServer::start().await;
    let m = mock(MockSettings {
        latency: LatencyDist::Fixed(Duration::from_millis(150)),
        ..MockSettings::default()
    })
    .await;
    let mut cfg = kafka_config(&m, &broker, "jobs-batch-takeover");
    cfg.store = redis.store_config(None);
    cfg.async_jobs.workers = 2;
    cfg.server.shutdown.drain_delay = Duration::ZERO;
    let dir = tempfile::tempdir().unwrap();
    let as_member = |name: &str| {
        let mut c = cfg.clone();
        c.async_jobs.kafka.group_instance_id = Some(format!("bt-{name}"));
        c
    };
    let mut a = Replica::new("a", dir.path(), &as_member("a"));
    let mut b = Replica::new("b", dir.path(), &as_member("b"));
    a.start().await;
    b.start().await;

    let n = 40;
    let lines: Vec<String> = (0..n)
        .map(|i| {
            serde_json::json!({"custom_id": format!("c{i}"), "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "mock", "messages": [{"role": "user", "content": format!("line {i}")}]}})
            .to_string()
        })
        .collect();
    let http = client();
    let boundary = "----mfbatchboundary";
    let mut body = format!("--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\r\n").into_bytes();
    body.extend_from_slice(lines.join("\n").as_bytes());
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let file: Value = http
        .post(format!("{}/v1/files", b.base()))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let created: Value = http
        .post(format!("{}/v1/batches", b.base()))
        .json(&serde_json::json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().expect("a batch").to_string();
    tokio::time::sleep(Duration::from_millis(800)).await;
    b.kill9();
    // Restarted as a pod would be (it gets its Kafka partitions back as the
    // same static member); the batch's old driver is gone with the process.
    tokio::time::sleep(Duration::from_millis(500)).await;
    b.start().await;

    let deadline = Instant::now() + Duration::from_secs(60);
    let done = loop {
        let v: Value = http
            .get(format!("{}/v1/batches/{id}", a.base()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if v["status"] == "completed" {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "the batch was never finished: {v}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(done["request_counts"]["completed"], n, "{done}");
    let out = http
        .get(format!(
            "{}/v1/files/{}/content",
            a.base(),
            done["output_file_id"].as_str().unwrap()
        ))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut ids: Vec<String> = out
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["response"]["status_code"], 200, "{v}");
            v["custom_id"].as_str().unwrap().to_string()
        })
        .collect();
    ids.sort();
    let mut want: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
    want.sort();
    assert_eq!(ids, want, "each custom_id exactly once");
    // The upstream answered each line's job once (no second job per line).
    let calls = mock_calls(&m).await;
    assert_eq!(calls.len(), n, "one job id per line: {}", calls.len());
    for (job, c) in &calls {
        assert_eq!(c["answered"], 1, "job {job}: {c}");
    }
}

/// A job whose worker is killed mid-run (issue 20): while the worker lives
/// its run lease is renewed and `GET` (on another replica) reads plain
/// `running`; once it is killed, the lease runs out and `GET` says
/// `running` with `run_lease_expired: true`; the restarted replica gets the
/// message again from the broker and the job ends `succeeded`, with the
/// mark gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(all(kafka, redis_server)),
    ignore = "needs a Kafka-protocol broker (TANSU_BIN) and redis-server"
)]
async fn a_running_job_whose_worker_died_reads_so_and_runs_again() {
    let broker = Broker::start().await;
    let redis = crate::redis_server::RedisServer::start().await;
    // Long enough to kill the worker mid-call.
    let m = mock(MockSettings {
        latency: LatencyDist::Fixed(Duration::from_secs(4)),
        ..MockSettings::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = kafka_config(&m, &broker, "jobs-lease");
    cfg.store = redis.store_config(None);
    cfg.idempotency.lease = Duration::from_secs(1);
    cfg.server.shutdown.drain_delay = Duration::ZERO;
    cfg.async_jobs.kafka.group_instance_id = Some("lease-runner".into());
    let mut runner = Replica::new("runner", dir.path(), &cfg);
    // A replica that runs nothing of this topic: it reads the shared
    // records only.
    let mut reader_cfg = cfg.clone();
    reader_cfg.async_jobs.queue = forwarder::config::QueueKind::Embedded;
    let mut reader = Replica::new("reader", dir.path(), &reader_cfg);
    runner.start().await;
    reader.start().await;

    let http = client();
    let r = http
        .post(format!("{}/v1/async/chat/completions", runner.base()))
        .json(&chat("mock", "lease"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let read = || {
        let (http, url) = (
            http.clone(),
            format!("{}/v1/async/jobs/{id}", reader.base()),
        );
        async move {
            let r = http.get(url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut job = read().await;
    while job["status"] != "running" {
        assert!(Instant::now() < deadline, "never ran: {job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        job = read().await;
    }
    // Past one lease (1 s) into the 4 s call: renewed, so still live.
    tokio::time::sleep(Duration::from_millis(1_800)).await;
    let job = read().await;
    assert_eq!(job["status"], "running", "{job}");
    assert!(job.get("run_lease_expired").is_none(), "a live run: {job}");

    runner.kill9();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut job = read().await;
    while job.get("run_lease_expired").is_none() {
        assert!(
            Instant::now() < deadline,
            "the lapsed lease never showed: {job}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        job = read().await;
    }
    assert_eq!(job["status"], "running", "{job}");
    assert_eq!(job["run_lease_expired"], true, "{job}");

    runner.start().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut job = read().await;
    while job["status"] != "succeeded" {
        assert!(Instant::now() < deadline, "never ran again: {job}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        job = read().await;
    }
    assert!(job.get("run_lease_expired").is_none(), "{job}");
    assert_eq!(job["response"]["status_code"], 200, "{job}");
    runner.stop().await;
    reader.stop().await;
}
