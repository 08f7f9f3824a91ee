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
    std::fs::write(&secrets, format!("{SECRET}\n")).unwrap();
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
