//! Async jobs: accepted with 202, run by workers through the pipeline, read
//! back as the synchronous endpoint would have answered; cancel, expiry,
//! tenant isolation; signed callbacks checked by an independent (Python
//! `hmac`) implementation of Standard Webhooks.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use forwarder::config::{Config, MockSettings};
use parking_lot::Mutex;
use serde_json::{json, Value};

use crate::common::*;

/// Two clients, `alice` and `bob`.
fn keys(dir: &tempfile::TempDir) -> PathBuf {
    let path = dir.path().join("keys");
    std::fs::write(&path, "alice: sk-alice\nbob: sk-bob\n").unwrap();
    path
}

const ALICE: (&str, &str) = ("authorization", "Bearer sk-alice");
const BOB: (&str, &str) = ("authorization", "Bearer sk-bob");

fn base_config(m: &forwarder::mock_llm::MockServer, dir: &tempfile::TempDir) -> Config {
    let mut cfg = config(vec![upstream("m", m, "mock")]);
    cfg.auth.api_keys_file = Some(keys(dir));
    cfg
}

#[tokio::test]
async fn a_job_is_accepted_run_and_answered_as_the_sync_endpoint_would() {
    let dir = tempfile::tempdir().unwrap();
    let m = mock(MockSettings::default()).await;
    let f = start(base_config(&m, &dir)).await;
    let body = chat("mock", "tell me about queues");
    let sync = f.post("/v1/chat/completions", &body, &[ALICE]).await;
    assert_eq!(sync.status, 200);

    let r = f.post("/v1/async/chat/completions", &body, &[ALICE]).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("job_"));
    assert_eq!(r.body["status"], "queued");
    assert!(r.body["created_at"].as_u64().unwrap() > 0);
    assert_eq!(
        r.header("location"),
        Some(format!("/v1/async/jobs/{id}").as_str())
    );
    // The 202 is counted under its model, as a synchronous answer is.
    assert_eq!(
        f.metric(
            "forwarder_requests_total",
            &[
                ("protocol", "http"),
                ("api", "chat_completions"),
                ("model", "mock"),
                ("code", "202")
            ]
        )
        .await,
        1.0
    );

    let job = wait_job(&f, &id, &[ALICE]).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let result = &job["response"]["body"];
    assert_eq!(job["response"]["status_code"], 200);
    assert_eq!(result["object"], sync.body["object"]);
    assert_eq!(result["model"], sync.body["model"]);
    assert_eq!(
        result["choices"][0]["message"], sync.body["choices"][0]["message"],
        "same request, same answer"
    );
    assert_eq!(result["usage"], sync.body["usage"]);
    assert_eq!(
        f.metric("forwarder_jobs_total", &[("state", "succeeded")])
            .await,
        1.0
    );
    assert_eq!(f.metric("forwarder_job_run_seconds_count", &[]).await, 1.0);

    // Another client cannot see, cancel or learn about it.
    let other = f.get(&format!("/v1/async/jobs/{id}"), &[BOB]).await;
    assert_eq!(other.status, 404);
    let del = f
        .http
        .delete(format!("{}/v1/async/jobs/{id}", f.base))
        .header(BOB.0, BOB.1)
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 404);
    let anon = f.get(&format!("/v1/async/jobs/{id}"), &[]).await;
    assert_eq!(anon.status, 401);
    assert_eq!(f.get("/v1/async/jobs/job_nope", &[ALICE]).await.status, 404);
}

#[tokio::test]
async fn bad_submissions_are_refused_and_nothing_is_queued() {
    let dir = tempfile::tempdir().unwrap();
    let m = mock(MockSettings::default()).await;
    let f = start(base_config(&m, &dir)).await;
    let mut streamed = chat("mock", "x");
    streamed["stream"] = json!(true);
    for (body, status) in [
        (b"{".to_vec(), 400),
        (serde_json::to_vec(&chat("nope", "x")).unwrap(), 404),
        (serde_json::to_vec(&streamed).unwrap(), 400),
    ] {
        let r = f
            .post_raw("/v1/async/chat/completions", body, &[ALICE])
            .await;
        assert_eq!(r.status, status, "{}", r.text);
    }
    let r = f
        .post("/v1/async/chat/completions", &chat("mock", "x"), &[])
        .await;
    assert_eq!(r.status, 401);
    let r = f
        .post(
            "/v1/async/chat/completions",
            &chat("mock", "x"),
            &[ALICE, ("x-callback-url", "http://127.0.0.1:9/cb")],
        )
        .await;
    assert_eq!(r.status, 400, "callbacks are not configured: {}", r.text);
    // An idempotency key over 256 characters, as a header or as the simple
    // API's request_id, is refused as a synchronous request's is.
    let long = "k".repeat(257);
    let r = f
        .post(
            "/v1/async/chat/completions",
            &chat("mock", "x"),
            &[ALICE, ("idempotency-key", &long)],
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text);
    let simple = json!({"model_id": "mock", "prompt": "x", "request_id": long, "async": true});
    let r = f.post("/api/v1/message", &simple, &[ALICE]).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(
        f.metric("forwarder_jobs_total", &[("state", "queued")])
            .await,
        0.0
    );
}

#[tokio::test]
async fn the_simple_api_runs_async_and_answers_in_its_own_format() {
    let dir = tempfile::tempdir().unwrap();
    let m = mock(MockSettings::default()).await;
    let f = start(base_config(&m, &dir)).await;
    let body = json!({"model_id": "mock", "prompt": "hi", "request_id": "r-1", "async": true});
    let r = f.post("/api/v1/message", &body, &[ALICE]).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_string();
    let job = wait_job(&f, &id, &[ALICE]).await;
    assert_eq!(job["status"], "succeeded");
    let result = &job["response"]["body"];
    let sync = f
        .post(
            "/api/v1/message",
            &json!({"model_id": "mock", "prompt": "hi"}),
            &[ALICE],
        )
        .await;
    assert_eq!(result["reply"], sync.body["reply"]);
    assert_eq!(result["model_id"], "mock");
    assert_eq!(result["request_id"], "r-1");
}

#[tokio::test]
async fn a_queued_job_can_be_cancelled_and_never_reaches_the_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let m = slow_mock(Duration::from_millis(400)).await;
    let mut cfg = base_config(&m, &dir);
    cfg.async_jobs.workers = 1;
    let f = start(cfg).await;
    let a = f
        .post("/v1/async/chat/completions", &chat("mock", "a"), &[ALICE])
        .await;
    let b = f
        .post("/v1/async/chat/completions", &chat("mock", "b"), &[ALICE])
        .await;
    let (a, b) = (
        a.body["id"].as_str().unwrap(),
        b.body["id"].as_str().unwrap(),
    );
    let del = f
        .http
        .delete(format!("{}/v1/async/jobs/{b}", f.base))
        .header(ALICE.0, ALICE.1)
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 200);
    let v: Value = del.json().await.unwrap();
    assert_eq!(v["status"], "cancelled");
    assert_eq!(wait_job(&f, a, &[ALICE]).await["status"], "succeeded");
    // b's delivery was taken by the worker after a and skipped.
    tokio::time::sleep(100 * MS).await;
    let b_now = wait_job(&f, b, &[ALICE]).await;
    assert_eq!(b_now["status"], "cancelled");
    assert!(b_now.get("response").is_none());
    assert_eq!(m.model.requests(), 1, "only a was sent upstream");
    // A finished job cannot be cancelled.
    let again = f
        .http
        .delete(format!("{}/v1/async/jobs/{a}", f.base))
        .header(ALICE.0, ALICE.1)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409);
}

#[tokio::test]
async fn jobs_expire_unstarted_and_results_expire_after_their_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let m = slow_mock(Duration::from_millis(500)).await;
    let mut cfg = base_config(&m, &dir);
    cfg.async_jobs.workers = 1;
    cfg.async_jobs.job_ttl = Duration::from_millis(700);
    let f = start(cfg).await;
    let a = f
        .post("/v1/async/chat/completions", &chat("mock", "a"), &[ALICE])
        .await;
    tokio::time::sleep(300 * MS).await;
    let b = f
        .post("/v1/async/chat/completions", &chat("mock", "b"), &[ALICE])
        .await;
    let (a, b) = (
        a.body["id"].as_str().unwrap(),
        b.body["id"].as_str().unwrap(),
    );
    let a_done = wait_job(&f, a, &[ALICE]).await;
    assert_eq!(a_done["status"], "succeeded", "{a_done}");
    // b waited behind a; a's result is visible until a's ttl passes.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let a_later = wait_job(&f, a, &[ALICE]).await;
    assert_eq!(a_later["status"], "expired");
    assert!(a_later.get("response").is_none(), "{a_later}");
    let b_later = wait_job(&f, b, &[ALICE]).await;
    assert_eq!(b_later["status"], "expired");
    assert!(b_later.get("response").is_none());
}

/// What the test receiver saw: headers and body of each delivery.
pub(crate) type Seen = Arc<Mutex<Vec<(HeaderMap, bytes::Bytes)>>>;

/// A callback receiver on loopback answering 500 to the first `fail`
/// deliveries, then 200.
pub(crate) async fn receiver(fail: usize) -> (String, Seen) {
    let seen: Seen = Arc::default();
    let app = axum::Router::new()
        .route(
            "/hook",
            post(
                |State((seen, fail)): State<(Seen, usize)>,
                 headers: HeaderMap,
                 body: bytes::Bytes| async move {
                    let mut s = seen.lock();
                    s.push((headers, body));
                    if s.len() <= fail {
                        StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        StatusCode::OK
                    }
                },
            ),
        )
        .with_state((seen.clone(), fail));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/hook"), seen)
}

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const OLD_SECRET: &str = "whsec_b2xkIHNlY3JldCBrZXkgZm9yIHJvdGF0aW9u";

fn callback_config(m: &forwarder::mock_llm::MockServer, dir: &tempfile::TempDir) -> Config {
    let mut cfg = base_config(m, dir);
    let secrets = dir.path().join("webhook-secrets");
    std::fs::write(&secrets, format!("{SECRET}\n{OLD_SECRET}\n")).unwrap();
    let cb = &mut cfg.async_jobs.callbacks;
    // Both secrets are shared ones: every client's callbacks are signed
    // with them.
    loopback_callbacks(cb, secrets, true);
    cb.max_attempts = 3;
    cb.base_delay = 20 * MS;
    cb.max_delay = 100 * MS;
    cb.timeout = Duration::from_secs(2);
    cfg
}

/// Verifies a delivery's signature with Python's `hmac`, independently of
/// the forwarder's code: every secret must have a matching `v1,` entry.
pub(crate) fn python_verifies(headers: &HeaderMap, body: &[u8], secrets: &[&str]) -> bool {
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let python = if python.exists() {
        python
    } else {
        PathBuf::from("python3")
    };
    let h = |n: &str| headers.get(n).unwrap().to_str().unwrap().to_string();
    let input = json!({
        "id": h("webhook-id"),
        "ts": h("webhook-timestamp"),
        "sig": h("webhook-signature"),
        "body": String::from_utf8(body.to_vec()).unwrap(),
        "secrets": secrets,
    });
    let script = r#"
import base64, hashlib, hmac, json, sys, time
m = json.load(sys.stdin)
assert abs(time.time() - int(m["ts"])) < 300, "stale timestamp"
content = f'{m["id"]}.{m["ts"]}.{m["body"]}'.encode()
got = {p.split(",", 1)[1] for p in m["sig"].split(" ") if p.startswith("v1,")}
for s in m["secrets"]:
    key = base64.b64decode(s[len("whsec_"):])
    want = base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()
    assert any(hmac.compare_digest(want, g) for g in got), "no matching signature"
print("VERIFIED")
"#;
    use std::io::Write;
    let mut child = std::process::Command::new(python)
        .arg("-c")
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !stdout.contains("VERIFIED") {
        eprintln!("python: {}", String::from_utf8_lossy(&out.stderr));
    }
    stdout.contains("VERIFIED")
}

async fn wait_callback(f: &Fwd, id: &str, want: &str) -> Value {
    for _ in 0..200 {
        let job = wait_job(f, id, &[ALICE]).await;
        if job["callback"]["status"] == want {
            return job;
        }
        tokio::time::sleep(25 * MS).await;
    }
    panic!("callback of {id} never became {want}");
}

#[tokio::test]
async fn a_callback_failing_twice_is_retried_and_delivered_signed() {
    let dir = tempfile::tempdir().unwrap();
    let m = mock(MockSettings::default()).await;
    let f = start(callback_config(&m, &dir)).await;
    let (url, seen) = receiver(2).await;
    let r = f
        .post(
            "/v1/async/chat/completions",
            &chat("mock", "call me back"),
            &[ALICE, ("x-callback-url", &url)],
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_string();
    let job = wait_callback(&f, &id, "delivered").await;
    assert_eq!(job["callback"]["attempts"], 3);
    let seen = seen.lock().clone();
    assert_eq!(seen.len(), 3, "two failures, then the delivery");
    let ids: Vec<_> = seen.iter().map(|(h, _)| h["webhook-id"].clone()).collect();
    assert!(
        ids.iter().all(|i| *i == ids[0]),
        "one message id across retries"
    );
    for (headers, body) in &seen {
        assert!(python_verifies(headers, body, &[SECRET, OLD_SECRET]));
        assert!(!python_verifies(
            headers,
            body,
            &["whsec_d3Jvbmcgc2VjcmV0IGtleSBoZXJl"]
        ));
    }
    let (_, last) = seen.last().unwrap();
    let event: Value = serde_json::from_slice(last).unwrap();
    assert_eq!(event["type"], "async.job.completed");
    assert_eq!(event["data"]["id"], id.as_str());
    assert_eq!(event["data"]["status"], "succeeded");
    assert_eq!(
        event["data"]["response"], job["response"],
        "the result as GET shows it"
    );
    assert_eq!(
        f.metric(
            "forwarder_callback_deliveries_total",
            &[("outcome", "retried")]
        )
        .await,
        2.0
    );
    assert_eq!(
        f.metric(
            "forwarder_callback_deliveries_total",
            &[("outcome", "delivered")]
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn a_receiver_that_always_fails_ends_as_failed_delivery_and_the_result_stays() {
    let dir = tempfile::tempdir().unwrap();
    let m = mock(MockSettings::default()).await;
    let f = start(callback_config(&m, &dir)).await;
    let (url, seen) = receiver(usize::MAX).await;
    let body = json!({"model_id": "mock", "prompt": "x", "async": true, "callback_url": url});
    let r = f.post("/api/v1/message", &body, &[ALICE]).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_string();
    let job = wait_callback(&f, &id, "failed").await;
    assert_eq!(job["callback"]["attempts"], 3);
    assert!(job["callback"]["last_error"]
        .as_str()
        .unwrap()
        .contains("500"));
    assert_eq!(job["status"], "succeeded", "the result is still there");
    assert!(job["response"]["body"]["reply"].is_string(), "{job}");
    assert_eq!(seen.lock().len(), 3);
    assert_eq!(
        f.metric(
            "forwarder_callback_deliveries_total",
            &[("outcome", "failed")]
        )
        .await,
        1.0
    );

    // A host not on the list, or plain http where only https is allowed.
    for bad in ["http://example.com/hook", "ftp://127.0.0.1/x"] {
        let r = f
            .post(
                "/v1/async/chat/completions",
                &chat("mock", "x"),
                &[ALICE, ("x-callback-url", bad)],
            )
            .await;
        assert_eq!(r.status, 400, "{bad}: {}", r.text);
    }
}

/// Embeddings and Responses requests run as async jobs: accepted, run on
/// their own API, answered as the synchronous endpoint would, and counted
/// under their API.
#[tokio::test]
async fn embeddings_and_responses_run_as_async_jobs() {
    let mut cfg = forwarder::config::Config::default();
    cfg.server.listen = loopback();
    cfg.async_jobs.enabled = true;
    let f = start(cfg).await;
    for (path, body, check, api) in [
        (
            "/v1/async/embeddings",
            json!({"model": "mock", "input": "hi", "encoding_format": "float"}),
            "/data/0/embedding",
            "embeddings",
        ),
        (
            "/v1/async/responses",
            json!({"model": "mock", "input": "hi"}),
            "/output/0/content/0/text",
            "responses",
        ),
    ] {
        let r = f.post(path, &body, &[]).await;
        assert_eq!(r.status, 202, "{path}: {}", r.text);
        let id = r.body["id"].as_str().unwrap().to_string();
        let job = wait_job(&f, &id, &[]).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        assert!(
            job["response"]["body"].pointer(check).is_some(),
            "{path}: {job}"
        );
        let labels = [("protocol", "http"), ("api", api), ("model", "mock")];
        assert_eq!(
            f.metric_sum(
                "forwarder_requests_total",
                &[&labels[..], &[("code", "202")]].concat()
            )
            .await,
            1.0,
            "{path}"
        );
        assert_eq!(
            f.metric_sum(
                "forwarder_requests_total",
                &[&labels[..], &[("code", "200")]].concat()
            )
            .await,
            1.0,
            "{path}: the run"
        );
    }
    // A body of the wrong API is refused at submission.
    let r = f
        .post("/v1/async/embeddings", &json!({"model": "mock"}), &[])
        .await;
    assert_eq!(r.status, 400, "{}", r.text);
}

/// Anthropic Messages requests run as async jobs (`/v1/async/messages`):
/// authenticated by `x-api-key` as the synchronous route is, the
/// result the Messages answer, and refusals, at submission and in the
/// result, in Anthropic's error shape.
#[tokio::test]
async fn messages_run_as_async_jobs_in_anthropics_shape() {
    let m = mock(Default::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "alice: sk-alice\n").unwrap();
    let mut cfg = config(vec![upstream("a", &m, "claude")]);
    cfg.auth.api_keys_file = Some(keys);
    cfg.async_jobs.enabled = true;
    let f = start(cfg).await;
    let alice = [
        ("x-api-key", "sk-alice"),
        ("anthropic-version", "2023-06-01"),
    ];
    let body = json!({"model": "claude", "max_tokens": 16,
        "messages": [{"role": "user", "content": "hi"}]});
    let r = f.post("/v1/async/messages", &body, &alice).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let job = wait_job(&f, r.body["id"].as_str().unwrap(), &alice).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["response"]["status_code"], 200, "{job}");
    let answer = &job["response"]["body"];
    assert_eq!(answer["type"], "message", "{job}");
    assert!(answer["content"][0]["text"].is_string(), "{job}");
    assert!(answer["usage"]["input_tokens"].is_u64(), "{job}");

    // Refused at submission: Anthropic's shape, the status kept.
    let unknown = json!({"model": "nope", "max_tokens": 16,
        "messages": [{"role": "user", "content": "hi"}]});
    let r = f.post("/v1/async/messages", &unknown, &alice).await;
    assert_eq!(r.status, 404, "{}", r.text);
    assert_eq!(r.body["type"], "error", "{}", r.text);
    assert_eq!(r.body["error"]["type"], "not_found_error", "{}", r.text);
    let r = f.post("/v1/async/messages", &body, &[]).await;
    assert_eq!(r.status, 401, "{}", r.text);
    assert_eq!(
        r.body["error"]["type"], "authentication_error",
        "{}",
        r.text
    );

    // Refused when it runs (the upstream fails it): the result is in
    // Anthropic's shape too.
    m.model.fail_next(
        1,
        forwarder::mock_llm::Fault::Error {
            status: 400,
            retry_after: None,
        },
    );
    let r = f.post("/v1/async/messages", &body, &alice).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let job = wait_job(&f, r.body["id"].as_str().unwrap(), &alice).await;
    assert_eq!(job["response"]["status_code"], 400, "{job}");
    assert_eq!(job["response"]["body"]["type"], "error", "{job}");
    assert_eq!(
        job["response"]["body"]["error"]["type"], "invalid_request_error",
        "{job}"
    );

    // A body only the upstream checks (a `tools` item that is not an
    // object) is accepted, and the job ends with the upstream's refusal.
    let mut bad = body.clone();
    bad["tools"] = json!([[null, null]]);
    let r = f.post("/v1/async/messages", &bad, &alice).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let job = wait_job(&f, r.body["id"].as_str().unwrap(), &alice).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["response"]["status_code"], 400, "{job}");
    assert_eq!(job["response"]["body"]["type"], "error", "{job}");
}
