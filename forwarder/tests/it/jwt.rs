//! JWT authentication, with tokens minted by an independent implementation
//! (PyJWT with `cryptography`, from the project's `.venv`): every supported
//! algorithm accepted over HTTP, WebSocket and gRPC; the negative table
//! refused with 401 and its reason counted; a key removed from the JWKS
//! file revokes its tokens.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use forwarder::config::{Config, JwtConfig};
use serde_json::Value;

use crate::common::*;

fn python() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        venv.exists(),
        "these tests need the project virtualenv: run ./scripts/test.sh (it creates .venv from scripts/requirements-test.txt)"
    );
    venv
}

/// Runs `jwt_tokens.py MODE DIR` and returns its stdout.
async fn tokens_py(mode: &str, dir: &Path, env: Vec<(&'static str, String)>) -> String {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/jwt_tokens.py");
    let (mode, dir) = (mode.to_string(), dir.to_path_buf());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .arg(script)
            .arg(mode)
            .arg(dir)
            .envs(env)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Runs a short pyjwt script with `dir` as its argument; its stdout.
fn py_script(script: &str, dir: &Path) -> String {
    let out = Command::new(python())
        .args(["-c", script])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn jwt_config(dir: &Path, jwks: bool) -> Config {
    let mut cfg = config(vec![]);
    cfg.upstreams = Config::default().upstreams;
    let mut jwt = JwtConfig {
        issuer: Some("https://issuer.test".into()),
        audiences: vec!["modelforwarder".into()],
        models_claim: Some("models".into()),
        refresh_interval: Duration::from_millis(100),
        ..JwtConfig::default()
    };
    if jwks {
        jwt.jwks_file = Some(dir.join("jwks.json"));
        jwt.algorithms = [
            "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
            "HS384",
        ]
        .map(String::from)
        .to_vec();
    } else {
        jwt.secret_file = Some(dir.join("hs.secret"));
        jwt.algorithms = ["HS256", "HS384", "HS512"].map(String::from).to_vec();
    }
    cfg.auth.jwt = Some(jwt);
    cfg
}

async fn failures(fwd: &Fwd, reason: &str) -> f64 {
    fwd.metric("forwarder_auth_failures_total", &[("reason", reason)])
        .await
}

#[tokio::test]
async fn pyjwt_tokens_of_every_algorithm_pass_over_http_websocket_and_grpc() {
    let dir = tempfile::tempdir().unwrap();
    tokens_py("keys", dir.path(), vec![]).await;
    let jwks = start(jwt_config(dir.path(), true)).await;
    let secret = start(jwt_config(dir.path(), false)).await;
    let grpc = |f: &Fwd| {
        f.grpc
            .clone()
            .unwrap()
            .trim_start_matches("http://")
            .to_string()
    };
    let out = tokens_py(
        "clients",
        dir.path(),
        vec![
            ("JWKS_HTTP", jwks.base.clone()),
            ("JWKS_WS", jwks.ws.clone()),
            ("JWKS_GRPC", grpc(&jwks)),
            ("SECRET_HTTP", secret.base.clone()),
            ("SECRET_WS", secret.ws.clone()),
            ("SECRET_GRPC", grpc(&secret)),
            (
                "FORWARDER_PROTO_DIR",
                format!("{}/proto", env!("CARGO_MANIFEST_DIR")),
            ),
        ],
    )
    .await;
    assert!(out.contains("ALL OK"), "{out}");
    for alg in [
        "RS256", "PS512", "ES256", "ES384", "EdDSA", "HS256", "HS512",
    ] {
        assert!(
            out.contains(&format!(" {alg}\n")),
            "{alg} not exercised:\n{out}"
        );
    }
    assert_eq!(
        failures(&jwks, "bad_signature").await,
        1.0,
        "the tampered token"
    );
}

#[tokio::test]
async fn the_negative_table_is_refused_with_401_and_each_reason_counted() {
    let dir = tempfile::tempdir().unwrap();
    tokens_py("keys", dir.path(), vec![]).await;
    let jwks = start(jwt_config(dir.path(), true)).await;
    let secret = start(jwt_config(dir.path(), false)).await;
    let cases: Vec<Value> =
        serde_json::from_str(&tokens_py("negative", dir.path(), vec![]).await).unwrap();
    assert!(cases.len() >= 13, "{cases:?}");
    for case in &cases {
        let fwd = if case["target"] == "jwks" {
            &jwks
        } else {
            &secret
        };
        let (name, token) = (
            case["case"].as_str().unwrap(),
            case["token"].as_str().unwrap(),
        );
        let reason = case["reason"].as_str().unwrap();
        let before = failures(fwd, reason).await;
        let bearer = format!("Bearer {token}");
        let r = fwd
            .post(
                "/v1/chat/completions",
                &chat("mock", "hi"),
                &[("authorization", &bearer)],
            )
            .await;
        assert_eq!(r.status, 401, "{name}: {}", r.text);
        assert!(
            !r.text.contains(reason) && !r.text.contains(token),
            "{name}: the client learns nothing specific: {}",
            r.text
        );
        assert_eq!(
            failures(fwd, reason).await,
            before + 1.0,
            "{name}: reason {reason}"
        );
    }
    let r = jwks
        .post("/v1/chat/completions", &chat("mock", "hi"), &[])
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(failures(&jwks, "missing").await, 1.0);
}

#[tokio::test]
async fn a_key_removed_from_the_jwks_file_revokes_its_tokens() {
    let dir = tempfile::tempdir().unwrap();
    tokens_py("keys", dir.path(), vec![]).await;
    let fwd = start(jwt_config(dir.path(), true)).await;
    // A token of the key about to be removed, minted by PyJWT.
    let script = r#"
import json, sys, time, jwt
priv = json.load(open(sys.argv[1] + "/private.json"))
now = int(time.time())
print(jwt.encode({"sub": "old", "iss": "https://issuer.test", "aud": "modelforwarder", "exp": now + 300},
                 priv["rs-old"], algorithm="RS256", headers={"kid": "rs-old"}))
"#;
    let out = py_script(script, dir.path());
    let bearer = format!("Bearer {}", out.trim());
    let auth = [("authorization", bearer.as_str())];
    let r = fwd
        .post("/v1/chat/completions", &chat("mock", "hi"), &auth)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    // Twice: the second is answered from the verified-token cache, which
    // must not outlive the key either.
    let r = fwd
        .post("/v1/chat/completions", &chat("mock", "hi"), &auth)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    std::fs::copy(
        dir.path().join("jwks-rotated.json"),
        dir.path().join("jwks.json"),
    )
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = fwd
            .post("/v1/chat/completions", &chat("mock", "hi"), &auth)
            .await;
        if r.status == 401 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still accepted: {}",
            r.text
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(failures(&fwd, "unknown_kid").await, 1.0);
}

#[tokio::test]
async fn api_keys_and_jwts_work_side_by_side() {
    let dir = tempfile::tempdir().unwrap();
    tokens_py("keys", dir.path(), vec![]).await;
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "alice: sk-alice\n").unwrap();
    let mut cfg = jwt_config(dir.path(), false);
    cfg.auth.api_keys_file = Some(keys);
    let fwd = start(cfg).await;
    let script = r#"
import sys, time, jwt
secret = open(sys.argv[1] + "/hs.secret").read().strip().encode()
now = int(time.time())
print(jwt.encode({"sub": "bob", "iss": "https://issuer.test", "aud": "modelforwarder", "exp": now + 300}, secret, algorithm="HS256"))
"#;
    let out = py_script(script, dir.path());
    let token = out.trim().to_string();
    let bearer = format!("Bearer {token}");
    for auth in [
        ("x-api-key", "sk-alice"),
        ("authorization", bearer.as_str()),
    ] {
        let r = fwd
            .post("/v1/chat/completions", &chat("mock", "hi"), &[auth])
            .await;
        assert_eq!(r.status, 200, "{auth:?}: {}", r.text);
    }
    let r = fwd
        .post(
            "/v1/chat/completions",
            &chat("mock", "hi"),
            &[("x-api-key", "sk-wrong")],
        )
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(failures(&fwd, "unknown_key").await, 1.0);
}

/// A JWKS served over HTTP on loopback, counting its fetches.
struct JwksServer {
    url: String,
    body: std::sync::Arc<parking_lot::Mutex<String>>,
    fetches: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

async fn jwks_server(body: String) -> JwksServer {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let body = Arc::new(parking_lot::Mutex::new(body));
    let fetches = Arc::new(AtomicUsize::new(0));
    let (b, f) = (body.clone(), fetches.clone());
    let app = axum::Router::new().route(
        "/jwks",
        axum::routing::get(move || {
            let (b, f) = (b.clone(), f.clone());
            async move {
                f.fetch_add(1, Ordering::SeqCst);
                let text = b.lock().clone();
                text
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let url = format!("http://{}/jwks", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    JwksServer { url, body, fetches }
}

#[tokio::test]
async fn a_jwks_url_is_fetched_refreshed_on_an_unknown_kid_and_rate_limited() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    tokens_py("keys", dir.path(), vec![]).await;
    let tokens: Value = serde_json::from_str(&tokens_py("mint", dir.path(), vec![]).await).unwrap();
    let jwks: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("jwks.json")).unwrap())
            .unwrap();
    let only = |kids: &[&str]| {
        let keys: Vec<&Value> = jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|k| kids.contains(&k["kid"].as_str().unwrap()))
            .collect();
        serde_json::json!({ "keys": keys }).to_string()
    };
    let server = jwks_server(only(&["es"])).await;
    let mut cfg = jwt_config(dir.path(), true);
    let jwt = cfg.auth.jwt.as_mut().unwrap();
    jwt.jwks_file = None;
    jwt.jwks_url = Some(server.url.clone());
    jwt.refresh_interval = Duration::from_secs(3600);
    jwt.min_refresh_interval = Duration::from_millis(500);
    let fwd = start(cfg).await;
    let call = |kid: &str| {
        let bearer = format!("Bearer {}", tokens[kid].as_str().unwrap());
        let fwd = &fwd;
        async move {
            fwd.post(
                "/v1/chat/completions",
                &chat("mock", "hi"),
                &[("authorization", &bearer)],
            )
            .await
            .status
        }
    };
    // The first fetch happens in the background at start.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while call("es").await != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the JWKS was never fetched"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(server.fetches.load(Ordering::SeqCst), 1);
    // A key the issuer publishes later: unknown at first, then fetched.
    *server.body.lock() = only(&["es", "ed"]);
    let started = tokio::time::Instant::now();
    let mut refused = 0;
    while call("ed").await != 200 {
        refused += 1;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the new key was never fetched"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused >= 1, "the first request saw an unknown kid");
    assert!(failures(&fwd, "unknown_kid").await >= 1.0);
    // Many unknown kids cost at most one fetch per min_refresh_interval.
    for _ in 0..30 {
        assert_eq!(call("rs").await, 401);
    }
    let fetches = server.fetches.load(Ordering::SeqCst);
    assert!(
        fetches <= 4,
        "{fetches} fetches: unknown kids must not hammer the issuer"
    );
}

/// Rate-limit tiers: from the JWT's tier claim, or from the config for an
/// API-key client; everyone else gets the default limits.
#[tokio::test]
async fn a_tier_from_the_token_or_the_config_sets_the_rate_limit() {
    let dir = tempfile::tempdir().unwrap();
    tokens_py("keys", dir.path(), vec![]).await;
    std::fs::write(dir.path().join("keys"), "alice: sk-alice\nbob: sk-bob\n").unwrap();
    let mut cfg = jwt_config(dir.path(), false);
    cfg.auth.api_keys_file = Some(dir.path().join("keys"));
    if let Some(jwt) = cfg.auth.jwt.as_mut() {
        jwt.tier_claim = Some("tier".into());
    }
    cfg.rate_limit = Some(forwarder::config::RateLimitConfig {
        requests_per_second: 1,
        burst: 1,
        shared: true,
        tiers: [(
            "gold".to_string(),
            forwarder::config::TierLimits {
                requests_per_second: 1,
                burst: 3,
                tokens_per_minute: None,
            },
        )]
        .into(),
        client_tiers: [("alice".to_string(), "gold".to_string())].into(),
        ..Default::default()
    });
    let fwd = start(cfg).await;
    let script = r#"
import sys, time, jwt
secret = open(sys.argv[1] + "/hs.secret").read().strip().encode()
now = int(time.time())
for sub, tier in [("carol", "gold"), ("dave", None), ("erin", "platinum")]:
    claims = {"sub": sub, "iss": "https://issuer.test", "aud": "modelforwarder", "exp": now + 300}
    if tier:
        claims["tier"] = tier
    print(jwt.encode(claims, secret, algorithm="HS256"))
"#;
    let out = py_script(script, dir.path());
    let tokens: Vec<String> = out.lines().map(|t| format!("Bearer {t}")).collect();
    // (client, its header, requests admitted in one burst)
    let clients = [
        ("alice (config tier)", ("x-api-key", "sk-alice"), 3),
        ("bob (no tier)", ("x-api-key", "sk-bob"), 1),
        (
            "carol (claimed gold)",
            ("authorization", tokens[0].as_str()),
            3,
        ),
        ("dave (no claim)", ("authorization", tokens[1].as_str()), 1),
        (
            "erin (unknown tier)",
            ("authorization", tokens[2].as_str()),
            1,
        ),
    ];
    for (who, header, burst) in clients {
        for i in 0..burst {
            let r = fwd
                .post("/v1/chat/completions", &chat("mock", "hi"), &[header])
                .await;
            assert_eq!(r.status, 200, "{who} request {i}: {}", r.text);
            assert_eq!(
                r.headers["x-ratelimit-limit-requests"],
                burst.to_string(),
                "{who}"
            );
        }
        let r = fwd
            .post("/v1/chat/completions", &chat("mock", "hi"), &[header])
            .await;
        assert_eq!(r.status, 429, "{who}: over its burst of {burst}");
    }
}
