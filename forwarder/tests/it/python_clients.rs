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
    std::fs::write(&keys, "py: sk-py-test\n").unwrap();
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
