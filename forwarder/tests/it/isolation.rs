//! Tenant isolation, tested as the attacker: a callback aimed at the
//! cluster's insides (a receiver on loopback stands for them), a second
//! client, a second identity with the same name.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::any;
use forwarder::config::{CallbackHost, CallbackNetwork, Config, MockSettings};
use serde_json::Value;

use crate::common::*;

const ALICE: (&str, &str) = ("authorization", "Bearer sk-alice");
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A receiver on loopback counting every request that reaches it; `/302`
/// and `/307` redirect to `redirect_to`, anything else answers 200.
async fn receiver(redirect_to: Option<String>) -> (u16, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().fallback(any(move |uri: axum::http::Uri| {
        h.fetch_add(1, Ordering::SeqCst);
        let to = redirect_to.clone().unwrap_or_default();
        async move {
            match uri.path() {
                "/302" => (StatusCode::FOUND, [(header::LOCATION, to)]).into_response(),
                "/307" => {
                    (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, to)]).into_response()
                }
                _ => StatusCode::OK.into_response(),
            }
        }
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, hits)
}

fn callback_config(
    m: &forwarder::mock_llm::MockServer,
    dir: &tempfile::TempDir,
    hosts: &[&str],
    networks: Vec<CallbackNetwork>,
) -> Config {
    let mut cfg = config(vec![upstream("m", m, "mock")]);
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "alice: sk-alice\nbob: sk-bob\n").unwrap();
    cfg.auth.api_keys_file = Some(keys);
    let secrets = dir.path().join("webhook-secrets");
    std::fs::write(&secrets, format!("key:alice {SECRET}\n")).unwrap();
    let cb = &mut cfg.async_jobs.callbacks;
    cb.secrets_file = Some(secrets);
    cb.allowed_hosts = hosts
        .iter()
        .map(|h| CallbackHost {
            host: h.to_string(),
            allow_http: true,
            ports: Vec::new(),
        })
        .collect();
    cb.allowed_networks = networks;
    cb.max_attempts = 1;
    cb.timeout = Duration::from_secs(2);
    cfg
}

/// Submits a job with `url` as its callback: `Err(message)` when refused
/// at submission (400), else the job once its delivery is settled.
async fn job_with_callback(f: &Fwd, url: &str) -> Result<Value, String> {
    let r = f
        .post(
            "/v1/async/chat/completions",
            &chat("mock", "call me back"),
            &[ALICE, ("x-callback-url", url)],
        )
        .await;
    if r.status == 400 {
        return Err(r.body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_string());
    }
    assert_eq!(r.status, 202, "{url}: {}", r.text);
    let id = r.body["id"].as_str().unwrap().to_string();
    for _ in 0..400 {
        let job = wait_job(f, &id, &[ALICE]).await;
        if job["callback"]["status"] != "pending" {
            return Ok(job);
        }
        tokio::time::sleep(25 * MS).await;
    }
    panic!("the callback of {id} never settled");
}

#[tokio::test]
async fn callbacks_never_reach_loopback_by_any_spelling() {
    let dir = tempfile::tempdir().unwrap();
    let m = mock(MockSettings::default()).await;
    let (port, hits) = receiver(None).await;
    let tricks = [
        "localhost",
        "127.1",
        "2130706433",
        "0x7f000001",
        "127.0.0.1",
        "[::ffff:127.0.0.1]",
        "0.0.0.0",
    ];
    // Every spelling is an allowed host: only the address check stands
    // between the tenant and loopback.
    let f = start(callback_config(&m, &dir, &tricks, Vec::new())).await;
    for host in tricks {
        let url = format!("http://{host}:{port}/hook");
        match job_with_callback(&f, &url).await {
            Err(message) => assert_eq!(message, "target not allowed", "{url}"),
            Ok(job) => {
                assert_eq!(job["callback"]["status"], "failed", "{url}: {job}");
                assert_eq!(
                    job["callback"]["last_error"], "target not allowed",
                    "{url}: {job}"
                );
            }
        }
    }
    // Credentials in the URL: refused whatever follows the `@`.
    let url = format!("http://localhost@127.0.0.1:{port}/hook");
    let refused = job_with_callback(&f, &url).await.unwrap_err();
    assert!(refused.contains("credentials"), "{refused}");
    tokio::time::sleep(100 * MS).await;
    assert_eq!(hits.load(Ordering::SeqCst), 0, "nothing reached loopback");
}

#[tokio::test]
async fn redirects_are_not_followed_and_only_the_allowed_port_is_reached() {
    let dir = tempfile::tempdir().unwrap();
    let m = mock(MockSettings::default()).await;
    // The inside: a port the tenant must not reach.
    let (inside, inside_hits) = receiver(None).await;
    let (hook, hook_hits) = receiver(Some(format!("http://127.0.0.1:{inside}/admin"))).await;
    let nets = vec![CallbackNetwork {
        cidr: "127.0.0.1/32".parse().unwrap(),
        ports: vec![hook],
    }];
    let f = start(callback_config(&m, &dir, &["127.0.0.1"], nets)).await;

    let ok = job_with_callback(&f, &format!("http://127.0.0.1:{hook}/ok"))
        .await
        .unwrap();
    assert_eq!(ok["callback"]["status"], "delivered", "{ok}");
    for code in ["302", "307"] {
        let job = job_with_callback(&f, &format!("http://127.0.0.1:{hook}/{code}"))
            .await
            .unwrap();
        assert_eq!(job["callback"]["status"], "failed", "{job}");
        assert_eq!(
            job["callback"]["last_error"],
            format!("receiver answered {code}").as_str()
        );
    }
    assert_eq!(hook_hits.load(Ordering::SeqCst), 3);
    // The same address on another port: refused before any connection.
    let refused = job_with_callback(&f, &format!("http://127.0.0.1:{inside}/admin"))
        .await
        .unwrap_err();
    assert_eq!(refused, "target not allowed");
    tokio::time::sleep(100 * MS).await;
    assert_eq!(
        inside_hits.load(Ordering::SeqCst),
        0,
        "no redirect followed"
    );
}

const JWT_SECRET: &str = "isolation-test-hmac-secret-0123456789";

/// An HS256 token for `claims` (an hour to live unless `exp` is given).
fn token(mut claims: Value) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    if claims.get("exp").is_none() {
        claims["exp"] = (now + 3600).into();
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

/// API keys (`alice`, and a list-file key) and HS256 tokens side by side.
fn keys_and_tokens(m: &forwarder::mock_llm::MockServer, dir: &tempfile::TempDir) -> Config {
    let mut cfg = config(vec![upstream("m", m, "mock")]);
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "alice: sk-alice\nbob: sk-bob\n").unwrap();
    cfg.auth.api_keys_file = Some(keys);
    let secret = dir.path().join("jwt-secret");
    std::fs::write(&secret, JWT_SECRET).unwrap();
    cfg.auth.jwt = Some(forwarder::config::JwtConfig {
        secret_file: Some(secret),
        algorithms: vec!["HS256".into()],
        models_claim: Some("models".into()),
        tier_claim: Some("tier".into()),
        ..Default::default()
    });
    cfg
}

#[tokio::test]
async fn a_token_whose_sub_is_alice_is_not_the_api_key_alice() {
    let dir = tempfile::tempdir().unwrap();
    let m = mock(MockSettings::default()).await;
    let f = start(keys_and_tokens(&m, &dir)).await;
    let mallory = format!("Bearer {}", token(serde_json::json!({"sub": "alice"})));
    let mallory = ("authorization", mallory.as_str());
    let key_alice = format!("Bearer {}", token(serde_json::json!({"sub": "key:alice"})));
    let key_alice = ("authorization", key_alice.as_str());

    // Alice (API key): a job, a file, an idempotent answer.
    let r = f
        .post(
            "/v1/async/chat/completions",
            &chat("mock", "alice's job"),
            &[ALICE],
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
    let job = r.body["id"].as_str().unwrap().to_string();
    let data = crate::batch::jsonl(&[crate::batch::line("c1", "alice's line")]);
    let r = crate::batch::upload(&f, &data, "batch", ALICE).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let file = r.body["id"].as_str().unwrap().to_string();
    let body = chat("mock", "alice's question");
    let idem = ("idempotency-key", "alice-key-1");
    let first = f.post("/v1/chat/completions", &body, &[ALICE, idem]).await;
    assert_eq!(first.status, 200, "{}", first.text);
    let again = f.post("/v1/chat/completions", &body, &[ALICE, idem]).await;
    assert_eq!(again.status, 200);
    assert_eq!(
        f.metric("forwarder_idempotent_replays_total", &[]).await,
        1.0
    );

    for who in [mallory, key_alice] {
        for path in [
            format!("/v1/async/jobs/{job}"),
            format!("/v1/files/{file}"),
            format!("/v1/files/{file}/content"),
        ] {
            let r = f.get(&path, &[who]).await;
            assert_eq!(r.status, 404, "{path}: {}", r.text);
        }
        let r = f.delete(&format!("/v1/async/jobs/{job}"), &[who]).await;
        assert_eq!(r.status, 404, "{}", r.text);
        // Same key, same body: answered afresh, never from alice's record.
        let r = f.post("/v1/chat/completions", &body, &[who, idem]).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    assert_eq!(
        f.metric("forwarder_idempotent_replays_total", &[]).await,
        1.0,
        "no token was served alice's stored answer"
    );
    // Alice still sees her own.
    let r = f.get(&format!("/v1/async/jobs/{job}"), &[ALICE]).await;
    assert_eq!(r.status, 200, "{}", r.text);
}

/// An OpenAI-compatible upstream on loopback that records the headers of
/// every request reaching it.
async fn recording_upstream() -> (String, Arc<parking_lot::Mutex<Vec<axum::http::HeaderMap>>>) {
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let s = seen.clone();
    let app = axum::Router::new().fallback(any(move |headers: axum::http::HeaderMap| {
        s.lock().push(headers);
        async {
            axum::Json(serde_json::json!({
                "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "mock",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
            }))
        }
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/v1"), seen)
}

#[tokio::test]
async fn a_client_credential_never_reaches_the_upstream_whatever_the_patterns() {
    let dir = tempfile::tempdir().unwrap();
    let m = mock(MockSettings::default()).await;
    let (base, seen) = recording_upstream().await;
    let mut up = upstream("rec", &m, "mock");
    up.base_url = Some(base);
    let mut cfg = config(vec![up]);
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "alice: sk-alice-secret\n").unwrap();
    cfg.auth.api_keys_file = Some(keys);
    cfg.headers.to_upstream = vec![
        "x-*".into(),
        "authorization".into(),
        "cookie".into(),
        "api-key".into(),
    ];
    let f = start(cfg).await;
    let headers = [
        ("x-api-key", "sk-alice-secret"),
        ("cookie", "session=sk-alice-secret"),
        ("api-key", "sk-alice-secret"),
        ("x-trace-id", "t-1"),
    ];
    let r = f
        .post("/v1/chat/completions", &chat("mock", "sync"), &headers)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = f
        .post(
            "/v1/async/chat/completions",
            &chat("mock", "async"),
            &headers,
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_string();
    let job = wait_job(&f, &id, &[("x-api-key", "sk-alice-secret")]).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let seen = seen.lock().clone();
    assert_eq!(seen.len(), 2, "the sync call and the job");
    for h in &seen {
        assert_eq!(h.get("x-trace-id").unwrap(), "t-1", "allowed headers pass");
        for (name, value) in h {
            let v = value.to_str().unwrap_or("");
            assert!(!v.contains("sk-alice-secret"), "{name} carried the key");
        }
        assert!(h.get("cookie").is_none() && h.get("api-key").is_none());
    }
}

/// `cheap` and `expensive` on one mock; a token granted `cheap` only.
fn two_models(m: &forwarder::mock_llm::MockServer, dir: &tempfile::TempDir) -> Config {
    let mut cfg = keys_and_tokens(m, dir);
    cfg.upstreams = vec![
        upstream("cheap", m, "cheap"),
        upstream("expensive", m, "expensive"),
    ];
    cfg.websocket.enabled = true;
    cfg
}

#[tokio::test]
async fn a_model_the_token_does_not_grant_is_refused_the_same_through_every_door() {
    use forwarder::frontends::grpc::pb::ForwardRequest;
    let dir = tempfile::tempdir().unwrap();
    let m = mock(MockSettings::default()).await;
    let f = start(two_models(&m, &dir)).await;
    let bearer = format!(
        "Bearer {}",
        token(serde_json::json!({"sub": "cheapskate", "models": ["cheap"]}))
    );
    let who = ("authorization", bearer.as_str());
    // Every door's answer to a request for `expensive`: (status, code).
    let mut refusals: Vec<(&str, u64, String)> = Vec::new();
    let code = |v: &Value| v["error"]["code"].as_str().unwrap_or("-").to_string();

    let r = f
        .post("/v1/chat/completions", &chat("expensive", "x"), &[who])
        .await;
    refusals.push(("http", r.status.into(), code(&r.body)));
    let simple = serde_json::json!({"model_id": "expensive", "prompt": "x"});
    let r = f.post("/api/v1/message", &simple, &[who]).await;
    refusals.push(("simple", r.status.into(), code(&r.body)));
    let r = f
        .post(
            "/v1/async/chat/completions",
            &chat("expensive", "x"),
            &[who],
        )
        .await;
    refusals.push(("async", r.status.into(), code(&r.body)));
    let async_simple = serde_json::json!({"model_id": "expensive", "prompt": "x", "async": true});
    let r = f.post("/api/v1/message", &async_simple, &[who]).await;
    refusals.push(("async simple", r.status.into(), code(&r.body)));

    let mut ws = ws_connect(&f.ws, &[who]).await.expect("upgrade");
    ws_send(
        &mut ws,
        serde_json::json!({"type": "request", "id": "w", "model": "expensive", "prompt": "x"}),
    )
    .await;
    let e = ws_collect(&mut ws, "w").await.pop().unwrap();
    refusals.push(("websocket", e["status"].as_u64().unwrap_or(0), code(&e)));

    let mut grpc = grpc_client(&f).await;
    let mut req = tonic::Request::new(ForwardRequest {
        model_id: "expensive".into(),
        prompt: "x".into(),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("authorization", bearer.parse().unwrap());
    let status = grpc.forward(req).await.unwrap_err();
    let http: u64 = status
        .metadata()
        .get("x-http-status")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0);
    let grpc_code = if status.code() == tonic::Code::NotFound {
        "model_not_found"
    } else {
        "-"
    };
    refusals.push(("grpc", http, grpc_code.into()));

    // A batch line: the error file holds the same refusal; the granted
    // line runs.
    let mut line = crate::batch::line("forbidden", "x");
    line["body"]["model"] = "expensive".into();
    let mut ok = crate::batch::line("granted", "x");
    ok["body"]["model"] = "cheap".into();
    let data = crate::batch::jsonl(&[line, ok]);
    let r = crate::batch::upload(&f, &data, "batch", who).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = crate::batch::create(&f, r.body["id"].as_str().unwrap(), who).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_string();
    let mut batch = Value::Null;
    for _ in 0..400 {
        batch = f.get(&format!("/v1/batches/{id}"), &[who]).await.body;
        if batch["status"] == "completed" {
            break;
        }
        tokio::time::sleep(25 * MS).await;
    }
    assert_eq!(batch["status"], "completed", "{batch}");
    assert_eq!(batch["request_counts"]["completed"], 1, "{batch}");
    let errors = f
        .get(
            &format!(
                "/v1/files/{}/content",
                batch["error_file_id"].as_str().unwrap()
            ),
            &[who],
        )
        .await;
    let e: Value = serde_json::from_str(errors.text.lines().next().unwrap()).unwrap();
    assert_eq!(e["custom_id"], "forbidden");
    refusals.push((
        "batch line",
        e["response"]["status_code"].as_u64().unwrap_or(0),
        code(&e["response"]["body"]),
    ));

    for (door, status, code) in &refusals {
        assert_eq!(
            (*status, code.as_str()),
            (404, "model_not_found"),
            "{door}: {refusals:?}"
        );
    }
    // Nothing for `expensive` reached the upstream; the granted line did.
    let upstream_calls = |model: &'static str| {
        let f = &f;
        async move {
            f.metric(
                "forwarder_upstream_requests_total",
                &[
                    ("upstream", model),
                    ("model", model),
                    ("outcome", "success"),
                ],
            )
            .await
        }
    };
    assert_eq!(upstream_calls("expensive").await, 0.0);
    assert_eq!(upstream_calls("cheap").await, 1.0);
}

#[tokio::test]
async fn object_routes_and_batch_lines_spend_the_clients_rate_limit() {
    let dir = tempfile::tempdir().unwrap();
    let m = mock(MockSettings::default()).await;
    let mut cfg = keys_and_tokens(&m, &dir);
    cfg.rate_limit = Some(forwarder::config::RateLimitConfig {
        requests_per_second: 10,
        burst: 3,
        ..Default::default()
    });
    let f = start(cfg).await;
    // Job, file and batch reads are requests like any other.
    let mut codes = Vec::new();
    for path in [
        "/v1/async/jobs/job_x",
        "/v1/files/file-x",
        "/v1/batches/batch_x",
        "/v1/batches",
    ] {
        codes.push(f.get(path, &[ALICE]).await.status);
    }
    assert!(codes[..3].iter().all(|c| *c != 429), "{codes:?}");
    assert_eq!(codes[3], 429, "the burst of 3 is spent: {codes:?}");
    // Another client's limit is its own.
    let bob = ("authorization", "Bearer sk-bob");
    assert_ne!(f.get("/v1/batches", &[bob]).await.status, 429);

    // A batch of 12 lines goes at 10 a second, not at worker speed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let lines: Vec<Value> = (0..12)
        .map(|i| crate::batch::line(&format!("l{i}"), "x"))
        .collect();
    let mut lines = lines;
    for l in &mut lines {
        l["body"]["model"] = "mock".into();
    }
    let r = crate::batch::upload(&f, &crate::batch::jsonl(&lines), "batch", bob).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = crate::batch::create(&f, r.body["id"].as_str().unwrap(), bob).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_string();
    // `/metrics` is not a client's route: reading it spends nothing.
    let served = || async {
        f.metric(
            "forwarder_upstream_requests_total",
            &[("upstream", "m"), ("model", "mock"), ("outcome", "success")],
        )
        .await
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let early = served().await;
    // At worker speed all 12 are done well within 300 ms; at 10/s with
    // what is left of a burst of 3, about 5.
    assert!(early <= 8.0, "{early} lines ran within 300 ms");
    let mut last = Value::Null;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if served().await >= 12.0 {
            let r = f.get(&format!("/v1/batches/{id}"), &[bob]).await;
            last = r.body;
            if last["status"] == "completed" {
                break;
            }
        }
    }
    assert_eq!(last["status"], "completed", "{last}");
    assert_eq!(last["request_counts"]["completed"], 12, "{last}");
}

const ALICE_NEW: &str = "whsec_YWxpY2UncyBuZXcgc2lnbmluZyBrZXk=";
const BOB_SECRET: &str = "whsec_Ym9iJ3Mgb3duIHNpZ25pbmcga2V5";
const GOLD_SECRET: &str = "whsec_dGhlIGdvbGQgdGllcidzIGtleQ==";

#[tokio::test]
async fn each_client_receives_callbacks_signed_with_its_own_secrets_only() {
    let dir = tempfile::tempdir().unwrap();
    let m = mock(MockSettings::default()).await;
    let mut cfg = keys_and_tokens(&m, &dir);
    let secrets = dir.path().join("webhook-secrets");
    // Alice rotates (new and old both sign); bob has his own; the gold
    // tier one for its members; nothing shared.
    std::fs::write(
        &secrets,
        format!("key:alice {ALICE_NEW}\nkey:alice {SECRET}\nkey:bob {BOB_SECRET}\ntier:gold {GOLD_SECRET}\n"),
    )
    .unwrap();
    let cb = &mut cfg.async_jobs.callbacks;
    loopback_callbacks(cb, secrets, false);
    cb.max_attempts = 1;
    cfg.rate_limit = Some(forwarder::config::RateLimitConfig {
        requests_per_second: 1000,
        burst: 1000,
        tiers: [(
            "gold".to_string(),
            forwarder::config::TierLimits {
                requests_per_second: 1000,
                burst: 1000,
                tokens_per_minute: None,
            },
        )]
        .into(),
        ..Default::default()
    });
    let f = start(cfg).await;
    let gold = format!(
        "Bearer {}",
        token(serde_json::json!({"sub": "goldie", "tier": "gold"}))
    );
    let nobody = format!("Bearer {}", token(serde_json::json!({"sub": "carol"})));
    let (url, seen) = crate::async_jobs::receiver(0).await;
    let submit = |who: String| {
        let (f, url) = (&f, url.clone());
        async move {
            f.post(
                "/v1/async/chat/completions",
                &chat("mock", "signed"),
                &[
                    ("authorization", who.as_str()),
                    ("x-callback-url", url.as_str()),
                ],
            )
            .await
        }
    };
    for who in ["Bearer sk-alice".to_string(), "Bearer sk-bob".into(), gold] {
        let r = submit(who.clone()).await;
        assert_eq!(r.status, 202, "{}", r.text);
        let id = r.body["id"].as_str().unwrap().to_string();
        let mut delivered = false;
        for _ in 0..400 {
            let job = wait_job(&f, &id, &[("authorization", who.as_str())]).await;
            if job["callback"]["status"] == "delivered" {
                delivered = true;
                break;
            }
            tokio::time::sleep(25 * MS).await;
        }
        assert!(delivered, "{id}");
    }
    // A client with no secret of its own and no fallback: refused.
    let r = submit(nobody).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.text.contains("signing secret"), "{}", r.text);

    let seen = seen.lock().clone();
    assert_eq!(seen.len(), 3);
    let verifies = |i: usize, secrets: &[&str]| {
        crate::async_jobs::python_verifies(&seen[i].0, &seen[i].1, secrets)
    };
    // The receivers' order is the submissions' (each waited for).
    assert!(
        verifies(0, &[ALICE_NEW, SECRET]),
        "alice's, both in rotation"
    );
    assert!(!verifies(0, &[BOB_SECRET]) && !verifies(0, &[GOLD_SECRET]));
    assert!(verifies(1, &[BOB_SECRET]), "bob's");
    assert!(!verifies(1, &[SECRET]) && !verifies(1, &[ALICE_NEW]));
    assert!(verifies(2, &[GOLD_SECRET]), "the gold tier's");
    assert!(!verifies(2, &[BOB_SECRET]) && !verifies(2, &[SECRET]));
}

#[tokio::test]
async fn an_oversized_body_is_refused_413_through_every_http_door_and_a_batch_line() {
    let dir = tempfile::tempdir().unwrap();
    let m = mock(MockSettings::default()).await;
    let mut cfg = keys_and_tokens(&m, &dir);
    cfg.server.max_body_bytes = 2048;
    // Lines may be longer than a request (the upload takes them); the
    // line's request is still held to the body limit when it runs. With
    // the default bound the upload itself refuses the line (batch.rs).
    cfg.async_jobs.batch.max_line_bytes = Some(1 << 20);
    let f = start(cfg).await;
    let big = "x".repeat(3000);
    let mut refusals: Vec<(&str, u64)> = Vec::new();
    let r = f
        .post("/v1/chat/completions", &chat("mock", &big), &[ALICE])
        .await;
    refusals.push(("http", r.status.into()));
    let simple = serde_json::json!({"model_id": "mock", "prompt": big});
    let r = f.post("/api/v1/message", &simple, &[ALICE]).await;
    refusals.push(("simple", r.status.into()));
    let r = f
        .post("/v1/async/chat/completions", &chat("mock", &big), &[ALICE])
        .await;
    refusals.push(("async", r.status.into()));
    let async_simple = serde_json::json!({"model_id": "mock", "prompt": big, "async": true});
    let r = f.post("/api/v1/message", &async_simple, &[ALICE]).await;
    refusals.push(("async simple", r.status.into()));

    let lines = [
        crate::batch::line("big", &big),
        crate::batch::line("small", "x"),
    ];
    let r = crate::batch::upload(&f, &crate::batch::jsonl(&lines), "batch", ALICE).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = crate::batch::create(&f, r.body["id"].as_str().unwrap(), ALICE).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_string();
    let mut batch = Value::Null;
    for _ in 0..400 {
        batch = f.get(&format!("/v1/batches/{id}"), &[ALICE]).await.body;
        if batch["status"] == "completed" {
            break;
        }
        tokio::time::sleep(25 * MS).await;
    }
    assert_eq!(batch["request_counts"]["completed"], 1, "{batch}");
    let errors = f
        .get(
            &format!(
                "/v1/files/{}/content",
                batch["error_file_id"].as_str().unwrap()
            ),
            &[ALICE],
        )
        .await;
    let e: Value = serde_json::from_str(errors.text.lines().next().unwrap()).unwrap();
    assert_eq!(e["custom_id"], "big");
    refusals.push((
        "batch line",
        e["response"]["status_code"].as_u64().unwrap_or(0),
    ));
    for (door, status) in &refusals {
        assert_eq!(*status, 413, "{door}: {refusals:?}");
    }
}

#[tokio::test]
#[cfg_attr(
    not(kafka),
    ignore = "no Kafka-protocol broker: set TANSU_BIN (scripts/test.sh does)"
)]
async fn no_credential_is_written_into_a_kafka_job_message() {
    let broker = crate::broker::Broker::start().await;
    let m = mock(MockSettings::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let topic = format!("jobs-secrets-{}", rand::random::<u32>());
    let mut cfg = crate::broker::kafka_config(&m, &broker, &topic);
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "alice: sk-alice-kafka-secret\n").unwrap();
    cfg.auth.api_keys_file = Some(keys);
    cfg.headers.to_upstream = vec!["x-*".into(), "authorization".into(), "cookie".into()];
    let f = start(cfg).await;
    let who = ("x-api-key", "sk-alice-kafka-secret");
    let r = f
        .post(
            "/v1/async/chat/completions",
            &chat("mock", "queued"),
            &[
                who,
                ("cookie", "s=sk-alice-kafka-secret"),
                ("x-trace-id", "t-9"),
            ],
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_string();
    let messages = crate::kafka::read_topic(&broker, &topic, 1).await;
    let (key, payload) = &messages[0];
    assert_eq!(key, &id);
    let text = String::from_utf8_lossy(payload);
    assert!(
        text.contains("x-trace-id"),
        "allowed headers are queued: {text}"
    );
    assert!(!text.contains("sk-alice-kafka-secret"), "{text}");
    assert_eq!(wait_job(&f, &id, &[who]).await["status"], "succeeded");
}

#[tokio::test]
async fn a_batch_spends_its_creators_token_budget_and_nobody_elses() {
    let dir = tempfile::tempdir().unwrap();
    let m = mock(MockSettings::default()).await;
    let mut cfg = keys_and_tokens(&m, &dir);
    cfg.rate_limit = Some(forwarder::config::RateLimitConfig {
        requests_per_second: 1000,
        burst: 1000,
        shared: true,
        tokens_per_minute: Some(200),
        ..Default::default()
    });
    let f = start(cfg).await;
    let bob = ("authorization", "Bearer sk-bob");
    let lines: Vec<Value> = (0..6)
        .map(|i| crate::batch::line(&format!("l{i}"), "spend"))
        .collect();
    let r = crate::batch::upload(&f, &crate::batch::jsonl(&lines), "batch", ALICE).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = crate::batch::create(&f, r.body["id"].as_str().unwrap(), ALICE).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_string();
    let mut batch = Value::Null;
    for _ in 0..400 {
        batch = f.get(&format!("/v1/batches/{id}"), &[ALICE]).await.body;
        if batch["status"] == "completed" {
            break;
        }
        tokio::time::sleep(25 * MS).await;
    }
    assert_eq!(batch["status"], "completed", "{batch}");
    assert!(
        batch["request_counts"]["completed"].as_u64().unwrap() >= 1,
        "{batch}"
    );
    // The same small request from each: alice's budget shows her batch.
    let remaining = |r: &Resp| -> u64 {
        r.header("x-ratelimit-remaining-tokens")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let a = f
        .post("/v1/chat/completions", &chat("mock", "x"), &[ALICE])
        .await;
    let b = f
        .post("/v1/chat/completions", &chat("mock", "x"), &[bob])
        .await;
    assert_eq!(b.status, 200, "{}", b.text);
    assert!(
        a.status == 429 || remaining(&a) < remaining(&b),
        "alice {} {:?}, bob {:?}",
        a.status,
        a.header("x-ratelimit-remaining-tokens"),
        b.header("x-ratelimit-remaining-tokens")
    );
    assert!(remaining(&b) > 0);
}
