//! API-key authentication: accept, reject, reload.

use std::time::Duration;

use forwarder::config::Config;

use crate::common::*;

async fn with_keys(path: std::path::PathBuf) -> Fwd {
    let mut cfg = Config::default();
    cfg.server.listen = loopback();
    cfg.auth.api_keys_file = Some(path);
    cfg.auth.reload_interval = Duration::from_millis(50);
    start(cfg).await
}

#[tokio::test]
async fn accepts_bearer_and_x_api_key_and_rejects_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys");
    std::fs::write(&file, "# one key per line\nsk-first\nsk-second\n").unwrap();
    let fwd = with_keys(file).await;
    let body = chat("mock", "hi");
    let ok = |r: Resp| assert_eq!(r.status, 200, "{}", r.text);
    ok(fwd
        .post(
            "/v1/chat/completions",
            &body,
            &[("authorization", "Bearer sk-first")],
        )
        .await);
    ok(fwd
        .post("/v1/chat/completions", &body, &[("x-api-key", "sk-second")])
        .await);
    ok(fwd
        .get("/v1/models", &[("authorization", "Bearer sk-second")])
        .await);

    for headers in [
        vec![],
        vec![("authorization", "Bearer sk-wrong")],
        vec![("authorization", "Bearer ")],
        vec![("x-api-key", "sk-first-but-longer")],
        vec![("authorization", "Basic c2stZmlyc3Q=")],
    ] {
        let r = fwd.post("/v1/chat/completions", &body, &headers).await;
        assert_eq!(r.status, 401, "{headers:?}");
        assert_eq!(r.error_code(), "invalid_api_key");
    }
    assert_eq!(fwd.get("/v1/models", &[]).await.status, 401);
    // Probes and scrapes need no key.
    assert_eq!(fwd.get("/healthz", &[]).await.status, 200);
    assert_eq!(fwd.get("/readyz", &[]).await.status, 200);
    assert_eq!(fwd.get("/metrics", &[]).await.status, 200);
    // Authentication comes before parsing: an unknown client learns nothing.
    let r = fwd
        .post_raw("/v1/chat/completions", b"{broken".to_vec(), &[])
        .await;
    assert_eq!(r.status, 401);
}

#[tokio::test]
async fn reloads_keys_when_the_file_changes() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.yaml");
    std::fs::write(&file, "team-a: sk-old\n").unwrap();
    let fwd = with_keys(file.clone()).await;
    let body = chat("mock", "hi");
    let old = [("x-api-key", "sk-old")];
    let new = [("x-api-key", "sk-new")];
    assert_eq!(
        fwd.post("/v1/chat/completions", &body, &old).await.status,
        200
    );
    assert_eq!(
        fwd.post("/v1/chat/completions", &body, &new).await.status,
        401
    );

    // Rotate the way a Secret update lands: write elsewhere, rename over.
    let tmp = dir.path().join("keys.yaml.tmp");
    std::fs::write(&tmp, "team-a: sk-new\n").unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while fwd.post("/v1/chat/completions", &body, &new).await.status != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "new key never accepted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        fwd.post("/v1/chat/completions", &body, &old).await.status,
        401,
        "old key revoked"
    );

    // A broken source keeps the keys in force.
    std::fs::remove_file(&file).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        fwd.post("/v1/chat/completions", &body, &new).await.status,
        200
    );
}

#[tokio::test]
async fn reads_a_mounted_secret_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("billing-bot"), "sk-billing\n").unwrap();
    std::fs::write(dir.path().join("support-bot"), "sk-support").unwrap();
    let fwd = with_keys(dir.path().to_path_buf()).await;
    let body = chat("mock", "hi");
    assert_eq!(
        fwd.post(
            "/v1/chat/completions",
            &body,
            &[("x-api-key", "sk-billing")]
        )
        .await
        .status,
        200
    );
    assert_eq!(
        fwd.post(
            "/v1/chat/completions",
            &body,
            &[("x-api-key", "sk-support")]
        )
        .await
        .status,
        200
    );
    assert_eq!(
        fwd.post(
            "/v1/chat/completions",
            &body,
            &[("x-api-key", "billing-bot")]
        )
        .await
        .status,
        401
    );
}
