//! Compatibility with the official Python `openai` SDK.

use std::path::PathBuf;
use std::process::Command;

use forwarder::config::Config;

use crate::common::*;

fn python() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        venv.exists(),
        "the openai SDK test needs the project virtualenv: run ./scripts/test.sh (it creates .venv with `pip install openai websockets`)"
    );
    venv
}

#[tokio::test]
async fn the_official_openai_python_sdk_works_unchanged() {
    let python = python();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "sdk: sk-sdk-test\n").unwrap();
    let mut cfg = Config::default();
    cfg.server.listen = loopback();
    cfg.auth.api_keys_file = Some(keys);
    let fwd = start(cfg).await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/openai_sdk.py");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .env("FORWARDER_BASE_URL", format!("{}/v1", fwd.base))
            .env("FORWARDER_API_KEY", "sk-sdk-test")
            .output()
            .unwrap()
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
