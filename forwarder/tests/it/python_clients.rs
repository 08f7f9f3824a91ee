//! Third-party clients: the official `openai` SDK over HTTP, `websockets`
//! over WebSocket and `grpcio` over gRPC.

use std::path::PathBuf;
use std::process::Command;

use forwarder::config::{Config, Provider, UpstreamConfig};

use crate::common::*;
use crate::scripted::Scripted;

fn python() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        venv.exists(),
        "these tests need the project virtualenv: run ./scripts/test.sh (it creates .venv from scripts/requirements-test.txt)"
    );
    venv
}

/// A forwarder with all three front ends and one API key; with `scripted`,
/// also the hand-written upstream's `full` and `reject` models.
async fn forwarder(dir: &tempfile::TempDir, scripted: Option<&Scripted>) -> Fwd {
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "py: sk-py-test\nother: sk-py-other\n").unwrap();
    let mut cfg = Config::default();
    if let Some(up) = scripted {
        cfg.upstreams.push(UpstreamConfig {
            name: "scripted".into(),
            provider: Provider::Openai,
            base_url: Some(up.base_url()),
            models: vec!["full".into(), "reject".into()],
            weight: 1,
            api_key_file: None,
            api_key_env: None,
            connect_timeout: std::time::Duration::from_secs(1),
            timeout: std::time::Duration::from_secs(5),
            mock: None,
            tls: None,
        });
    }
    cfg.server.listen = loopback();
    cfg.grpc.enabled = true;
    cfg.grpc.listen = loopback();
    cfg.auth.api_keys_file = Some(keys);
    start(cfg).await
}

async fn run_script(script: &str, env: Vec<(&'static str, String)>) {
    let python = python();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(script);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python).arg(script).envs(env).output().unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ALL OK"), "{stdout}");
}

#[tokio::test]
async fn the_official_openai_python_sdk_works_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let fwd = forwarder(&dir, Some(&up)).await;
    run_script(
        "openai_sdk.py",
        vec![
            ("FORWARDER_BASE_URL", format!("{}/v1", fwd.base)),
            ("FORWARDER_API_KEY", "sk-py-test".into()),
        ],
    )
    .await;
}

#[tokio::test]
async fn python_websockets_and_grpcio_clients_work() {
    let dir = tempfile::tempdir().unwrap();
    let fwd = forwarder(&dir, None).await;
    let grpc = fwd
        .grpc
        .clone()
        .unwrap()
        .trim_start_matches("http://")
        .to_string();
    run_script(
        "python_clients.py",
        vec![
            ("FORWARDER_WS_URL", fwd.ws.clone()),
            ("FORWARDER_GRPC_ADDR", grpc),
            ("FORWARDER_API_KEY", "sk-py-test".into()),
            (
                "FORWARDER_PROTO_DIR",
                format!("{}/proto", env!("CARGO_MANIFEST_DIR")),
            ),
        ],
    )
    .await;
}

/// A forwarder with the built-in `mock`, and a mock-llm server behind it
/// as `gpt` (OpenAI-compatible) and `claude` (`provider: anthropic`); the
/// scripts set the server's faults through its admin API.
async fn apis_forwarder(dir: &tempfile::TempDir, m: &forwarder::mock_llm::MockServer) -> Fwd {
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "py: sk-py-test\nother: sk-py-other\n").unwrap();
    let mut cfg = Config::default();
    for (name, provider, model) in [
        ("oa", Provider::Openai, "gpt"),
        ("an", Provider::Anthropic, "claude"),
    ] {
        cfg.upstreams.push(UpstreamConfig {
            name: name.into(),
            provider,
            base_url: Some(m.base_url()),
            models: vec![model.into()],
            weight: 1,
            api_key_file: None,
            api_key_env: None,
            connect_timeout: std::time::Duration::from_secs(1),
            timeout: std::time::Duration::from_secs(5),
            mock: None,
            tls: None,
        });
    }
    cfg.server.listen = loopback();
    cfg.retry.base_delay = std::time::Duration::from_millis(20);
    cfg.auth.api_keys_file = Some(keys);
    start(cfg).await
}

#[tokio::test]
async fn the_official_openai_sdk_uses_embeddings_and_responses() {
    let dir = tempfile::tempdir().unwrap();
    let m = mock(Default::default()).await;
    let fwd = apis_forwarder(&dir, &m).await;
    run_script(
        "openai_apis.py",
        vec![
            ("FORWARDER_BASE_URL", format!("{}/v1", fwd.base)),
            ("FORWARDER_API_KEY", "sk-py-test".into()),
            ("MOCK_ADMIN_URL", format!("http://{}", m.addr)),
        ],
    )
    .await;
}

#[tokio::test]
async fn the_official_anthropic_sdk_works_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let m = mock(Default::default()).await;
    let fwd = apis_forwarder(&dir, &m).await;
    run_script(
        "anthropic_sdk.py",
        vec![
            ("FORWARDER_BASE_URL", fwd.base.clone()),
            ("FORWARDER_API_KEY", "sk-py-test".into()),
            ("MOCK_ADMIN_URL", format!("http://{}", m.addr)),
        ],
    )
    .await;
}

/// Anthropic's Message Batches API with the official SDK
/// (`forwarder/tests/anthropic_batches.py`).
#[tokio::test]
async fn the_official_anthropic_sdk_runs_message_batches() {
    let dir = tempfile::tempdir().unwrap();
    let m = mock(Default::default()).await;
    let fwd = apis_forwarder(&dir, &m).await;
    run_script(
        "anthropic_batches.py",
        vec![
            ("FORWARDER_BASE_URL", fwd.base.clone()),
            ("FORWARDER_API_KEY", "sk-py-test".into()),
            ("OTHER_API_KEY", "sk-py-other".into()),
        ],
    )
    .await;
}

/// `GET`/`DELETE /v1/responses/{id}`, `/cancel` and `/input_items` reach
/// the upstream that created the response (two upstreams serve the model;
/// each keeps its own), for its creator only.
#[tokio::test]
async fn the_official_openai_sdk_retrieves_and_deletes_responses_where_they_were_made() {
    let dir = tempfile::tempdir().unwrap();
    let (m1, m2) = (
        mock(Default::default()).await,
        mock(Default::default()).await,
    );
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "alice: sk-alice\nbob: sk-bob\n").unwrap();
    let mut cfg = config(vec![
        upstream("one", &m1, "gpt"),
        upstream("two", &m2, "gpt"),
    ]);
    cfg.auth.api_keys_file = Some(keys);
    let fwd = start(cfg).await;
    run_script(
        "openai_responses.py",
        vec![
            ("FORWARDER_BASE_URL", format!("{}/v1", fwd.base)),
            ("ALICE_KEY", "sk-alice".into()),
            ("BOB_KEY", "sk-bob".into()),
        ],
    )
    .await;
    // Both upstreams created some (routing was put to the test), and each
    // kept what it made (10), less what was deleted (4).
    assert!(m1.model.requests() > 0 && m2.model.requests() > 0);
    let held = |m: &forwarder::mock_llm::MockServer| m.model.stored_responses.lock().len();
    assert_eq!(held(&m1) + held(&m2), 6);
}
