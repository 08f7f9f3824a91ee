//! Key files on a running forwarder: formats, reloads that fail safe, and
//! identities that do not depend on line numbers.

use std::time::Duration;

use forwarder::config::{Config, RateLimitConfig};

use crate::common::*;

async fn with_keys(path: std::path::PathBuf, rate_limit: Option<RateLimitConfig>) -> Fwd {
    let mut cfg = Config::default();
    cfg.server.listen = loopback();
    cfg.auth.api_keys_file = Some(path);
    cfg.auth.reload_interval = Duration::from_millis(50);
    cfg.rate_limit = rate_limit;
    start(cfg).await
}

async fn status(fwd: &Fwd, key: &str) -> u16 {
    fwd.post(
        "/v1/chat/completions",
        &chat("mock", "hi"),
        &[("authorization", &format!("Bearer {key}"))],
    )
    .await
    .status
}

/// Long enough for several reload intervals.
async fn reloaded() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_yaml_list_is_a_list_of_keys() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys");
    std::fs::write(&file, "- sk-list-1\n- sk-list-2\n").unwrap();
    let fwd = with_keys(file, None).await;
    assert_eq!(status(&fwd, "sk-list-1").await, 200);
    assert_eq!(status(&fwd, "sk-list-2").await, 200);
    assert_eq!(
        status(&fwd, "- sk-list-1").await,
        401,
        "the dash is no part of a key"
    );
}

#[tokio::test]
async fn a_broken_map_on_reload_keeps_the_previous_keys_and_is_never_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys");
    std::fs::write(&file, "alice: sk-alice\n").unwrap();
    let fwd = with_keys(file.clone(), None).await;
    assert_eq!(status(&fwd, "sk-alice").await, 200);
    // An edit that lost the space after the colon.
    std::fs::write(&file, "alice: sk-alice\nbob:sk-bob\n").unwrap();
    reloaded().await;
    assert_eq!(status(&fwd, "sk-alice").await, 200, "previous keys kept");
    assert_eq!(status(&fwd, "bob:sk-bob").await, 401);
    assert_eq!(status(&fwd, "sk-bob").await, 401);
    // Fixed: the new keys apply.
    std::fs::write(&file, "alice: sk-alice\nbob: sk-bob\n").unwrap();
    reloaded().await;
    assert_eq!(status(&fwd, "sk-bob").await, 200);
}

#[tokio::test]
async fn emptying_the_file_rejects_everyone_and_deleting_it_keeps_the_keys() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys");
    std::fs::write(&file, "sk-one\n").unwrap();
    let fwd = with_keys(file.clone(), None).await;
    assert_eq!(status(&fwd, "sk-one").await, 200);
    std::fs::remove_file(&file).unwrap();
    reloaded().await;
    assert_eq!(
        status(&fwd, "sk-one").await,
        200,
        "a missing file keeps the keys"
    );
    std::fs::write(&file, "").unwrap();
    reloaded().await;
    assert_eq!(
        status(&fwd, "sk-one").await,
        401,
        "an empty file holds no keys"
    );
}

#[tokio::test]
async fn a_line_file_identity_survives_lines_moving() {
    // One request per second per client (the least there is): a second
    // request from the same identity within the second is limited,
    // whatever line its key is on.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys");
    std::fs::write(&file, "sk-moving\n").unwrap();
    let limit = RateLimitConfig {
        requests_per_second: 1,
        burst: 1,
        ..Default::default()
    };
    let fwd = with_keys(file.clone(), Some(limit)).await;
    assert_eq!(status(&fwd, "sk-moving").await, 200);
    std::fs::write(&file, "# a new client first\nsk-newcomer\n\nsk-moving\n").unwrap();
    reloaded().await;
    assert_eq!(
        status(&fwd, "sk-moving").await,
        429,
        "same key, same identity, same limit"
    );
    assert_eq!(status(&fwd, "sk-newcomer").await, 200, "its own limit");
}
