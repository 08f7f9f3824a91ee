//! The chaos run of the seed's case study (issue 20's proof): three
//! forwarder processes share a real redis-server (AOF on, fsync always)
//! and a Kafka-protocol broker (tansu). Clients send the simple API
//! synchronously and `/v1/async/chat/completions` with callbacks to a
//! receiver that checks Standard Webhooks signatures and answers 500 to
//! some first deliveries; batches run through the official `openai` SDK.
//! The upstream (mock-llm) counts every call by its `Idempotency-Key` (the
//! job id, honoured as a de-duplicating provider does) or by a marker in
//! the prompt (the synchronous calls, never de-duplicated).
//!
//! While the load runs, on one schedule: `kill -9` of a random replica
//! every `CHAOS_KILL_EVERY` seconds (restarted as a pod is), a graceful
//! rolling restart of all three, a key rotation in two phases (the new key
//! decrypt-only on every replica, then primary), a restart of redis-server
//! and a restart of the broker (both SIGKILL). Then it waits for the work
//! to settle and checks, printing a table: every accepted job `succeeded`,
//! each with its own answer; each job's model ran once; every extra
//! upstream call of a marker falls in a fault's window; every callback
//! arrived with a valid signature under one `webhook-id`; every batch
//! completed with each `custom_id` once (the line made to fail in the
//! error file); no 503 for a full table; each replica's RSS stayed bounded.
//!
//! `CHAOS_SECS` (default 180) and `CHAOS_RATE` (requests/s, default 12)
//! size the run; `e2e/chaos/run.sh` runs it long and writes its timeline
//! (`CHAOS_OUT`). Without a broker or redis-server it is reported as
//! ignored.

#![allow(dead_code)]

#[path = "it/broker.rs"]
mod broker;
#[path = "it/common.rs"]
mod common;
#[path = "it/process.rs"]
mod process;
#[path = "it/redis_server.rs"]
mod redis_server;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use forwarder::config::{LatencyDist, MockSettings};
use parking_lot::Mutex;
use rand::Rng;
use serde_json::{json, Value};
use tokio::sync::Mutex as AsyncMutex;

use broker::{group_offsets, kafka_config, Broker};
use common::*;
use process::Replica;
use redis_server::RedisServer;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// An RSS above this in any replica fails the run (the bound is loose: it
/// catches growth with the run's length, not a few MiB).
const RSS_LIMIT_KIB: u64 = 512 * 1024;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A fault and when it was in effect (ms since the epoch).
#[derive(Clone, Debug)]
struct Fault {
    what: String,
    from: u64,
    to: u64,
}

/// Per `webhook-id`: deliveries, 2xx answers, bad signatures.
#[derive(Default, Clone, Copy)]
struct Seen {
    deliveries: u32,
    ok: u32,
    bad_signatures: u32,
}

type Hooks = Arc<Mutex<HashMap<String, Seen>>>;
/// Per second since the start: each replica's RSS (KiB).
type RssSeries = Vec<(u64, Vec<u64>)>;

/// Checks a Standard Webhooks signature (HMAC-SHA256 of `id.ts.body`
/// under the secret's base64 bytes), written from the specification, not
/// with the forwarder's signer.
fn signature_valid(headers: &HeaderMap, body: &[u8]) -> bool {
    use base64::Engine;
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("");
    let raw = base64::engine::general_purpose::STANDARD
        .decode(SECRET.trim_start_matches("whsec_"))
        .unwrap();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &raw);
    let mut signed = format!("{}.{}.", h("webhook-id"), h("webhook-timestamp")).into_bytes();
    signed.extend_from_slice(body);
    let want = base64::engine::general_purpose::STANDARD.encode(ring::hmac::sign(&key, &signed));
    h("webhook-signature")
        .split(' ')
        .any(|s| s.strip_prefix("v1,") == Some(want.as_str()))
}

/// The receiver: verifies, answers 500 to the first delivery of one event
/// in four, 200 otherwise.
async fn receiver(hooks: Hooks) -> String {
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(
                |State(hooks): State<Hooks>, headers: HeaderMap, body: axum::body::Bytes| async move {
                    let id = headers
                        .get("webhook-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    let valid = signature_valid(&headers, &body);
                    let mut all = hooks.lock();
                    let s = all.entry(id.clone()).or_default();
                    s.deliveries += 1;
                    if !valid {
                        s.bad_signatures += 1;
                        return StatusCode::UNAUTHORIZED;
                    }
                    let unlucky = id.bytes().map(u32::from).sum::<u32>() % 4 == 0;
                    if unlucky && s.deliveries == 1 {
                        return StatusCode::INTERNAL_SERVER_ERROR;
                    }
                    s.ok += 1;
                    StatusCode::OK
                },
            ),
        )
        .with_state(hooks);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// Writes a key ring: every id a key of 32 bytes, `primary` named.
fn write_ring(path: &Path, keys: &[(&str, u8)], primary: &str) {
    use base64::Engine;
    let mut text: String = keys
        .iter()
        .map(|(id, b)| {
            format!(
                "{id}: {}\n",
                base64::engine::general_purpose::STANDARD.encode([*b; 32])
            )
        })
        .collect();
    text.push_str(&format!("primary: {primary}\n"));
    // Replaced whole, as a mounted Secret is: a reader never sees half.
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The fleet: replicas behind one "Service" (clients pick any that is up).
struct Fleet {
    replicas: Vec<AsyncMutex<Replica>>,
    up: Vec<Mutex<bool>>,
    bases: Vec<String>,
}

impl Fleet {
    /// A base of a replica that is up, at random.
    fn pick(&self) -> String {
        let live: Vec<usize> = (0..self.bases.len())
            .filter(|i| *self.up[*i].lock())
            .collect();
        let i = if live.is_empty() {
            rand::rng().random_range(0..self.bases.len())
        } else {
            live[rand::rng().random_range(0..live.len())]
        };
        self.bases[i].clone()
    }
}

/// What the clients saw.
#[derive(Default)]
struct Tally {
    sync_ok: BTreeMap<String, String>,
    sync_gave_up: Vec<String>,
    /// marker → job id
    jobs: BTreeMap<String, String>,
    jobs_gave_up: Vec<String>,
    /// Answers by status and error code, over every attempt.
    answers: BTreeMap<String, u64>,
    /// Per second since the start: requests sent, answered 2xx, failed tries.
    timeline: BTreeMap<u64, [u64; 3]>,
}

impl Tally {
    fn answer(&mut self, started: Instant, status: u16, code: &str) {
        *self.answers.entry(format!("{status} {code}")).or_default() += 1;
        let t = self
            .timeline
            .entry(started.elapsed().as_secs())
            .or_default();
        if (200..300).contains(&status) {
            t[1] += 1;
        } else {
            t[2] += 1;
        }
    }
}

/// Sends until a 2xx (connection errors, 5xx and 429 are retried on any
/// replica, as a client behind a Service retries), for at most 60 s.
async fn send(
    fleet: &Fleet,
    tally: &Mutex<Tally>,
    began: Instant,
    path: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> Option<Value> {
    let http = client();
    let deadline = Instant::now() + Duration::from_secs(60);
    tally
        .lock()
        .timeline
        .entry(began.elapsed().as_secs())
        .or_default()[0] += 1;
    while Instant::now() < deadline {
        let mut req = http.post(format!("{}{path}", fleet.pick())).json(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        match req.timeout(Duration::from_secs(20)).send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                let v: Value = r.json().await.unwrap_or(Value::Null);
                let code = v["error"]["code"].as_str().unwrap_or("-").to_string();
                tally.lock().answer(began, status, &code);
                if (200..300).contains(&status) {
                    return Some(v);
                }
                assert!(
                    status >= 500 || status == 429 || status == 409,
                    "{path}: a client error under chaos: {status} {v}"
                );
            }
            Err(_) => tally.lock().answer(began, 0, "connect"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// Runs one batch through the official SDK (`tests/chaos_batch.py`),
/// against every replica's base (the script moves on when one is down).
async fn sdk_batch(fleet: Arc<Fleet>, tag: String, lines: usize) -> Value {
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        python.exists(),
        "the chaos run needs the project virtualenv: run ./scripts/test.sh"
    );
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/chaos_batch.py");
    let bases = fleet
        .bases
        .iter()
        .map(|b| format!("{b}/v1"))
        .collect::<Vec<_>>()
        .join(",");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .env("CHAOS_BASES", bases)
            .env("CHAOS_TAG", tag)
            .env("CHAOS_LINES", lines.to_string())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the SDK batch failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("the script's summary")
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(all(kafka, redis_server)),
    ignore = "needs a Kafka-protocol broker (TANSU_BIN) and redis-server"
)]
async fn chaos_run_every_job_once_every_callback_every_batch() {
    let secs = env_or("CHAOS_SECS", 180);
    let rate = env_or("CHAOS_RATE", 12).max(1);
    let kill_every = env_or("CHAOS_KILL_EVERY", 60).max(10);
    let began = Instant::now();
    let dir = tempfile::tempdir().unwrap();

    let mut redis = RedisServer::start_durable().await;
    let mut broker = Broker::start().await;
    let m = mock(MockSettings {
        latency: LatencyDist::Uniform {
            min: Duration::from_millis(50),
            max: Duration::from_millis(400),
        },
        ..MockSettings::default()
    })
    .await;
    let hooks: Hooks = Arc::default();
    let hook = receiver(hooks.clone()).await;
    let secrets = dir.path().join("webhook-secrets");
    std::fs::write(&secrets, format!("{SECRET}\n")).unwrap();

    let names = ["a", "b", "c"];
    let rings: Vec<PathBuf> = names
        .iter()
        .map(|n| dir.path().join(format!("ring-{n}")))
        .collect();
    for r in &rings {
        write_ring(r, &[("k1", 7)], "k1");
    }
    let mut cfg = kafka_config(&m, &broker, "chaos");
    cfg.async_jobs.workers = 8;
    cfg.idempotency.lease = Duration::from_secs(5);
    cfg.idempotency.wait = Duration::from_secs(2);
    cfg.server.shutdown.drain_delay = Duration::ZERO;
    let cb = &mut cfg.async_jobs.callbacks;
    loopback_callbacks(cb, secrets, true);
    cb.max_attempts = 30;
    cb.base_delay = Duration::from_millis(300);
    cb.max_delay = Duration::from_secs(3);
    let mut replicas = Vec::new();
    for (n, ring) in names.iter().zip(&rings) {
        let mut c = cfg.clone();
        c.store = redis.store_config(Some(ring));
        c.async_jobs.kafka.group_instance_id = Some(format!("chaos-{n}"));
        let mut r = Replica::new(n, dir.path(), &c);
        r.start().await;
        replicas.push(r);
    }
    let fleet = Arc::new(Fleet {
        bases: replicas.iter().map(Replica::base).collect(),
        up: replicas.iter().map(|_| Mutex::new(true)).collect(),
        replicas: replicas.into_iter().map(AsyncMutex::new).collect(),
    });
    let logs: Vec<PathBuf> = {
        let mut v = Vec::new();
        for r in &fleet.replicas {
            v.push(r.lock().await.log.clone());
        }
        v
    };
    let faults: Arc<Mutex<Vec<Fault>>> = Arc::default();
    let tally: Arc<Mutex<Tally>> = Arc::default();
    let run_for = Duration::from_secs(secs);

    // RSS of every replica, every second.
    let rss_peak: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(vec![0; names.len()]));
    let rss_series: Arc<Mutex<RssSeries>> = Arc::default();
    let sampler = {
        let (fleet, peak, series) = (fleet.clone(), rss_peak.clone(), rss_series.clone());
        tokio::spawn(async move {
            loop {
                let mut now = Vec::new();
                for (i, r) in fleet.replicas.iter().enumerate() {
                    let pid = r.lock().await.pid();
                    let kib = pid.and_then(rss_kib).unwrap_or(0);
                    let mut p = peak.lock();
                    p[i] = p[i].max(kib);
                    now.push(kib);
                }
                series.lock().push((began.elapsed().as_secs(), now));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };

    // The faults, on one schedule (fractions of the run), and a kill -9
    // every `kill_every` seconds between them.
    let chaos = {
        let (fleet, faults, rings) = (fleet.clone(), faults.clone(), rings.clone());
        tokio::spawn(async move {
            let at = |f: f64| began + run_for.mul_f64(f);
            let mut plan: Vec<(Instant, &str)> = vec![
                (at(0.25), "rolling restart"),
                (at(0.40), "key k2 decrypt-only"),
                (at(0.50), "key k2 primary"),
            ];
            let mut t = began + Duration::from_secs(kill_every / 3);
            while t < began + run_for {
                plan.push((t, "kill -9"));
                t += Duration::from_secs(kill_every);
            }
            plan.sort_by_key(|(t, _)| *t);
            for (when, what) in plan {
                tokio::time::sleep_until(when.into()).await;
                let from = now_ms();
                let what = if what == "kill -9" {
                    let i = rand::rng().random_range(0..fleet.replicas.len());
                    let mut r = fleet.replicas[i].lock().await;
                    *fleet.up[i].lock() = false;
                    r.kill9();
                    let down = rand::rng().random_range(200..2000);
                    tokio::time::sleep(Duration::from_millis(down)).await;
                    r.start().await;
                    *fleet.up[i].lock() = true;
                    format!("kill -9 of replica {}", ["a", "b", "c"][i])
                } else if what == "rolling restart" {
                    for (i, r) in fleet.replicas.iter().enumerate() {
                        let mut r = r.lock().await;
                        *fleet.up[i].lock() = false;
                        r.stop().await;
                        r.start().await;
                        *fleet.up[i].lock() = true;
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                    what.to_string()
                } else {
                    let primary = if what.ends_with("primary") {
                        "k2"
                    } else {
                        "k1"
                    };
                    // One replica at a time, as a rollout reaches them.
                    for ring in &rings {
                        write_ring(ring, &[("k1", 7), ("k2", 8)], primary);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    what.to_string()
                };
                faults.lock().push(Fault {
                    what,
                    from,
                    to: now_ms(),
                });
            }
        })
    };
    // Redis and the broker are restarted here, on their own schedule (the
    // chaos task cannot hold them: they outlive it for the checks).
    let outages = {
        let faults = faults.clone();
        async move {
            let at = |f: f64| began + run_for.mul_f64(f);
            tokio::time::sleep_until(at(0.62).into()).await;
            let from = now_ms();
            redis.restart().await;
            faults.lock().push(Fault {
                what: "redis restart".into(),
                from,
                to: now_ms(),
            });
            tokio::time::sleep_until(at(0.78).into()).await;
            let from = now_ms();
            broker.restart().await;
            faults.lock().push(Fault {
                what: "broker restart".into(),
                from,
                to: now_ms(),
            });
            (redis, broker)
        }
    };

    // The load: `rate` requests a second, alternately sync and async.
    let load = {
        let (fleet, tally, hook) = (fleet.clone(), tally.clone(), hook.clone());
        tokio::spawn(async move {
            let mut tasks = tokio::task::JoinSet::new();
            let mut tick = tokio::time::interval(Duration::from_secs(1) / rate as u32);
            let mut n = 0u64;
            while began.elapsed() < run_for {
                tick.tick().await;
                n += 1;
                let (fleet, tally, hook) = (fleet.clone(), tally.clone(), hook.clone());
                tasks.spawn(async move {
                    if n.is_multiple_of(2) {
                        let marker = format!("s-{n}");
                        let body = json!({"model_id": "mock", "prompt": format!("<<m:{marker}>> hello"), "request_id": marker});
                        match send(&fleet, &tally, began, "/api/v1/message", &body, &[]).await {
                            Some(v) => {
                                let reply = v["reply"].as_str().unwrap_or_default().to_string();
                                tally.lock().sync_ok.insert(marker, reply);
                            }
                            None => tally.lock().sync_gave_up.push(marker),
                        }
                    } else {
                        let marker = format!("a-{n}");
                        let body = chat("mock", &format!("<<m:{marker}>> job"));
                        let headers = [("idempotency-key", marker.as_str()), ("x-callback-url", hook.as_str())];
                        match send(&fleet, &tally, began, "/v1/async/chat/completions", &body, &headers).await {
                            Some(v) => {
                                let id = v["id"].as_str().unwrap_or_default().to_string();
                                tally.lock().jobs.insert(marker, id);
                            }
                            None => tally.lock().jobs_gave_up.push(marker),
                        }
                    }
                });
            }
            while tasks.join_next().await.is_some() {}
        })
    };
    let batch_lines = env_or("CHAOS_BATCH_LINES", 30) as usize;
    let batches = {
        let fleet = fleet.clone();
        tokio::spawn(async move {
            let mut out = Vec::new();
            for (k, f) in [0.1, 0.45].into_iter().enumerate() {
                tokio::time::sleep_until((began + run_for.mul_f64(f)).into()).await;
                out.push(sdk_batch(fleet.clone(), format!("b{k}"), batch_lines));
            }
            futures::future::join_all(out).await
        })
    };

    let (redis, _broker) = outages.await;
    load.await.unwrap();
    chaos.await.unwrap();
    let batch_results = batches.await.unwrap();
    let load_ended = began.elapsed();

    // Settle: every accepted job terminal, every callback delivered.
    let jobs: Vec<(String, String)> = tally.lock().jobs.clone().into_iter().collect();
    let http = client();
    let mut finished: HashMap<String, Value> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    while finished.len() < jobs.len() && Instant::now() < deadline {
        for (_, id) in &jobs {
            if finished.contains_key(id) {
                continue;
            }
            let Ok(r) = http
                .get(format!("{}/v1/async/jobs/{id}", fleet.pick()))
                .send()
                .await
            else {
                continue;
            };
            let v: Value = r.json().await.unwrap_or(Value::Null);
            let done = matches!(
                v["status"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            ) && !matches!(v["callback"]["status"].as_str(), Some("pending"));
            if done {
                finished.insert(id.clone(), v);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let settled = began.elapsed();
    sampler.abort();

    // The checks.
    let calls: serde_json::Map<String, Value> = http
        .get(format!(
            "{}/mock/calls",
            m.base_url().trim_end_matches("/v1")
        ))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["calls"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let faults = faults.lock().clone();
    let explained = |c: &Value| {
        let (first, last) = (
            c["first_ms"].as_u64().unwrap_or(0),
            c["last_ms"].as_u64().unwrap_or(0),
        );
        faults
            .iter()
            .any(|f| f.from <= last && f.to + 5_000 >= first)
    };
    let tally = std::mem::take(&mut *tally.lock());
    let mut problems: Vec<String> = Vec::new();
    let row = |what: &str, seen: String, ok: bool, table: &mut Vec<(String, String, bool)>| {
        table.push((what.to_string(), seen, ok));
    };
    let mut table = Vec::new();

    // Jobs: every accepted job succeeded with its own answer.
    let not_succeeded: Vec<String> = jobs
        .iter()
        .filter(|(marker, id)| {
            let v = finished.get(id);
            let answer = v
                .and_then(|v| v["response"]["body"]["choices"][0]["message"]["content"].as_str())
                .unwrap_or_default();
            v.map(|v| v["status"] != "succeeded").unwrap_or(true)
                || !answer.contains(marker.as_str())
        })
        .map(|(m, id)| format!("{m}={id}"))
        .collect();
    row(
        "async jobs accepted / succeeded with own answer",
        format!("{} / {}", jobs.len(), jobs.len() - not_succeeded.len()),
        not_succeeded.is_empty() && tally.jobs_gave_up.is_empty(),
        &mut table,
    );
    // The model ran each job once (the job id is the upstream key).
    let mut ran_twice = Vec::new();
    let mut extra_job_calls = (0, 0);
    for (marker, id) in &jobs {
        match calls.get(id) {
            Some(c) => {
                if c["answered"] != 1 {
                    ran_twice.push(format!("{marker}: {c}"));
                }
                let extra = c["started"].as_u64().unwrap_or(1).saturating_sub(1);
                extra_job_calls.0 += extra;
                if extra > 0 && explained(c) {
                    extra_job_calls.1 += extra;
                }
            }
            None => ran_twice.push(format!("{marker}: never reached the upstream")),
        }
    }
    row(
        "async jobs whose model ran exactly once",
        format!("{} / {}", jobs.len() - ran_twice.len(), jobs.len()),
        ran_twice.is_empty(),
        &mut table,
    );
    row(
        "extra upstream calls of jobs (explained by a fault)",
        format!("{} ({})", extra_job_calls.0, extra_job_calls.1),
        extra_job_calls.0 == extra_job_calls.1,
        &mut table,
    );
    // Sync: each answered with its own reply; extra calls only in a fault.
    let wrong_reply = tally
        .sync_ok
        .iter()
        .filter(|(m, r)| !r.contains(m.as_str()))
        .count();
    let (mut sync_extra, mut sync_explained, mut sync_missing) = (0, 0, 0);
    for marker in tally.sync_ok.keys() {
        match calls.get(marker) {
            Some(c) => {
                let extra = c["answered"].as_u64().unwrap_or(1).saturating_sub(1);
                sync_extra += extra;
                if extra > 0 && explained(c) {
                    sync_explained += extra;
                }
            }
            None => sync_missing += 1,
        }
    }
    row(
        "sync requests answered with own reply / gave up",
        format!(
            "{} / {}",
            tally.sync_ok.len() - wrong_reply,
            tally.sync_gave_up.len()
        ),
        wrong_reply == 0 && tally.sync_gave_up.is_empty(),
        &mut table,
    );
    row(
        "extra upstream calls of sync markers (explained by a fault)",
        format!("{sync_extra} ({sync_explained}); {sync_missing} replayed without a call"),
        sync_extra == sync_explained,
        &mut table,
    );
    // Callbacks: one webhook-id per job, each delivered with 2xx, every
    // signature valid.
    let hooks = hooks.lock().clone();
    let undelivered = jobs
        .iter()
        .filter(|(_, id)| hooks.get(&format!("msg_{id}")).is_none_or(|s| s.ok == 0))
        .count();
    let bad_sig: u32 = hooks.values().map(|s| s.bad_signatures).sum();
    let deliveries: u32 = hooks.values().map(|s| s.deliveries).sum();
    let stray = hooks
        .keys()
        .filter(|k| !jobs.iter().any(|(_, id)| **k == format!("msg_{id}")))
        .count();
    row(
        "callbacks delivered (2xx) / deliveries / bad signatures / stray ids",
        format!(
            "{} / {deliveries} / {bad_sig} / {stray}",
            jobs.len() - undelivered
        ),
        undelivered == 0 && bad_sig == 0 && stray == 0,
        &mut table,
    );
    for b in &batch_results {
        row(
            &format!("batch {} (SDK)", b["tag"].as_str().unwrap_or("?")),
            format!(
                "{} completed, {} output ids once, {} failed line(s) in the error file",
                b["status"], b["output_unique"], b["errors"]
            ),
            b["ok"] == true,
            &mut table,
        );
    }
    let full = tally
        .answers
        .iter()
        .filter(|(k, _)| k.starts_with("503") && k.contains("full"))
        .map(|(_, n)| n)
        .sum::<u64>();
    row(
        "503 answers for a full table",
        full.to_string(),
        full == 0,
        &mut table,
    );
    let peaks = rss_peak.lock().clone();
    row(
        "peak RSS per replica (MiB)",
        peaks
            .iter()
            .map(|k| format!("{:.1}", *k as f64 / 1024.0))
            .collect::<Vec<_>>()
            .join(" / "),
        peaks.iter().all(|k| *k > 0 && *k < RSS_LIMIT_KIB),
        &mut table,
    );

    // The report.
    println!(
        "\nchaos run: {secs} s of load at {rate}/s, settled {:.0} s after the load ended",
        (settled - load_ended).as_secs_f64()
    );
    for f in &faults {
        println!(
            "  fault at {:>6.1} s for {:>5.1} s: {}",
            (f.from as f64 - (now_ms() as f64 - began.elapsed().as_millis() as f64)) / 1000.0,
            (f.to - f.from) as f64 / 1000.0,
            f.what
        );
    }
    println!("  answers over every attempt: {:?}", tally.answers);
    println!("\n| check | seen | ok |\n|---|---|---|");
    for (what, seen, ok) in &table {
        println!("| {what} | {seen} | {} |", if *ok { "yes" } else { "NO" });
        if !ok {
            problems.push(what.clone());
        }
    }
    if let Ok(out) = std::env::var("CHAOS_OUT") {
        let out = PathBuf::from(out);
        std::fs::create_dir_all(&out).unwrap();
        let rss: HashMap<u64, Vec<u64>> = rss_series.lock().iter().cloned().collect();
        let mut csv =
            String::from("second,sent,answered_2xx,failed_tries,rss_a_kib,rss_b_kib,rss_c_kib\n");
        for (s, [a, b, c]) in &tally.timeline {
            let r = rss.get(s).cloned().unwrap_or_default();
            let r: Vec<String> = (0..3)
                .map(|i| r.get(i).copied().unwrap_or(0).to_string())
                .collect();
            csv.push_str(&format!("{s},{a},{b},{c},{}\n", r.join(",")));
        }
        std::fs::write(out.join("timeline.csv"), csv).unwrap();
        let faults_csv: String = faults
            .iter()
            .map(|f| {
                let zero = now_ms() - began.elapsed().as_millis() as u64;
                format!(
                    "{},{},{}\n",
                    (f.from - zero) / 1000,
                    (f.to - zero) / 1000,
                    f.what
                )
            })
            .collect();
        std::fs::write(
            out.join("faults.csv"),
            format!("from_s,to_s,fault\n{faults_csv}"),
        )
        .unwrap();
        let md: String = table
            .iter()
            .map(|(w, s, ok)| format!("| {w} | {s} | {} |\n", if *ok { "yes" } else { "NO" }))
            .collect();
        std::fs::write(out.join("table.md"), md).unwrap();
    }
    if !problems.is_empty() {
        let tail = |p: &Path| {
            let t = std::fs::read_to_string(p).unwrap_or_default();
            t.lines().rev().take(10).collect::<Vec<_>>().join("\n")
        };
        for (n, log) in names.iter().zip(&logs) {
            eprintln!("--- replica {n}'s log ends:\n{}", tail(log));
        }
        eprintln!(
            "not succeeded: {:?}",
            &not_succeeded[..not_succeeded.len().min(10)]
        );
        for (_, id) in jobs
            .iter()
            .filter(|(_, id)| finished.get(id).is_none_or(|v| v["status"] != "succeeded"))
            .take(3)
        {
            let v: Value = match http
                .get(format!("{}/v1/async/jobs/{id}", fleet.pick()))
                .send()
                .await
            {
                Ok(r) => r.json().await.unwrap_or(Value::Null),
                Err(_) => Value::Null,
            };
            eprintln!("stuck job {id}: {v}");
        }
        eprintln!(
            "group offsets (partition, committed, high): {:?}",
            group_offsets(&_broker.addr, "chaos").await
        );
        for base in &fleet.bases {
            let text = match http.get(format!("{base}/metrics")).send().await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            let jobs: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("forwarder_jobs") || l.starts_with("forwarder_queue"))
                .collect();
            eprintln!("{base} metrics: {jobs:?}");
        }
        eprintln!("logs kept in {}", dir.keep().display());
        eprintln!("ran twice: {:?}", &ran_twice[..ran_twice.len().min(10)]);
        panic!("the chaos run failed: {problems:?}");
    }
    drop(redis);
}
