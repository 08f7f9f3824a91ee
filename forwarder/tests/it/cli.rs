//! The binary's subcommands: config checking, bad config, mock-llm.

use std::process::Stdio;

use serde_json::json;

use crate::process::{binary, free_port, Child};

fn check(yaml: &str, env: &[(&str, &str)]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.yaml");
    std::fs::write(&file, yaml).unwrap();
    let mut cmd = binary();
    cmd.arg("check-config").arg("--config").arg(&file);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn check_config_accepts_good_and_names_the_bad_field() {
    let (ok, out) = check("retry: {max_attempts: 2}\n", &[]);
    assert!(ok, "{out}");
    assert!(
        out.contains("configuration OK") && out.contains("mock"),
        "{out}"
    );

    let (ok, out) = check("retry: {max_attempts: 0}\n", &[]);
    assert!(!ok);
    assert!(out.contains("retry.max_attempts"), "{out}");

    let (ok, out) = check("server: {listen: 127.0.0.1:8080, colour: blue}\n", &[]);
    assert!(!ok);
    assert!(out.contains("colour"), "{out}");

    let (ok, out) = check(
        "upstreams: [{name: a, provider: openai, models: [m], base_url: 'http://127.0.0.1:1/v1', api_key_file: /nonexistent/key}]\n",
        &[],
    );
    assert!(!ok);
    assert!(out.contains("api_key_file"), "{out}");

    let (ok, out) = check(
        "server: {listen: 127.0.0.1:8080}\ngrpc: {enabled: true, listen: 127.0.0.1:8080}\nwebsocket: {max_frame_bytes: 10}\n",
        &[],
    );
    assert!(!ok);
    assert!(
        out.contains("grpc.listen") && out.contains("websocket.max_frame_bytes"),
        "{out}"
    );

    let (ok, out) = check("{}\n", &[("FORWARDER_RETRY__MAX_ATTEMPTS", "99")]);
    assert!(!ok, "environment overrides the file");
    assert!(out.contains("retry.max_attempts"), "{out}");
}

#[test]
fn serve_refuses_an_invalid_config() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.yaml");
    std::fs::write(&file, "routing: {strategy: random}\n").unwrap();
    let out = binary()
        .arg("serve")
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("strategy"));
}

#[tokio::test]
async fn mock_llm_subcommand_serves_openai_chat() {
    let port = free_port();
    let child = binary()
        .args([
            "mock-llm",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--latency",
            "uniform:5ms..20ms",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _child = Child(child);
    let base = format!("http://127.0.0.1:{port}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while crate::common::client()
        .get(format!("{base}/healthz"))
        .send()
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "mock-llm never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let r: serde_json::Value = crate::common::client()
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({"model": "any", "messages": [{"role": "user", "content": "ping"}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["choices"][0]["message"]["content"], "mock reply: ping");
}

#[test]
fn mock_llm_rejects_bad_settings() {
    let out = binary()
        .args(["mock-llm", "--error-rate", "1.5"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("error_rate"));
}

/// At trace level, with JSON logs, a request's prompt, reply and API key
/// appear nowhere in the forwarder's output.
#[tokio::test]
async fn no_log_level_shows_prompts_replies_or_keys() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.yaml");
    std::fs::write(&keys, "alice: sk-very-secret-key-123\n").unwrap();
    let port = free_port();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(
        &cfg,
        format!(
            "server: {{listen: 127.0.0.1:{port}}}\nauth: {{api_keys_file: {}}}\nlogging: {{level: trace, format: json, access_log: true}}\n",
            keys.display()
        ),
    )
    .unwrap();
    let log = dir.path().join("log");
    let mut cmd = binary();
    cmd.arg("serve")
        .arg("--config")
        .arg(&cfg)
        .env_remove("RUST_LOG")
        .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
        .stderr(Stdio::from(
            std::fs::File::create(dir.path().join("err")).unwrap(),
        ));
    let child = Child(cmd.spawn().unwrap());
    let base = format!("http://127.0.0.1:{port}");
    crate::process::wait_ready(&base).await;
    let http = crate::common::client();
    let auth = "Bearer sk-very-secret-key-123";
    for stream in [false, true] {
        let r = http
            .post(format!("{base}/v1/chat/completions"))
            .header("authorization", auth)
            .json(&json!({"model": "mock", "stream": stream,
                          "messages": [{"role": "user", "content": "PROMPT-TOP-SECRET"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.text().await.unwrap().contains("PROMPT-TOP-SECRET"));
    }
    let r = http
        .post(format!("{base}/api/v1/message"))
        .header("x-api-key", "sk-wrong-but-secret-456")
        .json(&json!({"model_id": "mock", "prompt": "PROMPT-TOP-SECRET"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    drop(child);
    let logs = std::fs::read_to_string(&log).unwrap()
        + &std::fs::read_to_string(dir.path().join("err")).unwrap();
    assert!(logs.contains("\"request\""), "the access log is on: {logs}");
    for secret in [
        "PROMPT-TOP-SECRET",
        "sk-very-secret-key-123",
        "sk-wrong-but-secret-456",
    ] {
        assert!(!logs.contains(secret), "{secret} leaked into the logs");
    }
}

/// The JWT + TLS example a user copies must pass `check-config` (which
/// loads its certificate, key and secret) from the repository root.
#[test]
fn the_jwt_tls_example_config_checks() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = binary()
        .current_dir(&root)
        .args(["check-config", "--config", "examples/config/jwt-tls.yaml"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("configuration OK"), "{text}");
    // The same file with a broken certificate path fails, naming the field.
    let dir = tempfile::tempdir().unwrap();
    let yaml = std::fs::read_to_string(root.join("examples/config/jwt-tls.yaml"))
        .unwrap()
        .replace("tls/server.crt", "tls/missing.crt");
    std::fs::write(dir.path().join("c.yaml"), yaml).unwrap();
    let out = binary()
        .current_dir(&root)
        .arg("check-config")
        .arg("--config")
        .arg(dir.path().join("c.yaml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success());
    assert!(
        text.contains("server.tls") && text.contains("missing.crt"),
        "{text}"
    );
}

#[test]
fn check_config_warns_of_header_patterns_that_cover_credentials() {
    let (ok, out) = check("headers: {to_upstream: ['x-*', openai-beta]}\n", &[]);
    assert!(ok, "{out}");
    assert!(
        out.contains("warning: headers.to_upstream") && out.contains("x-api-key"),
        "{out}"
    );
    let (ok, out) = check("headers: {to_upstream: [openai-beta]}\n", &[]);
    assert!(ok && !out.contains("warning"), "{out}");
}

#[test]
fn callback_networks_and_ports_are_typed() {
    let (ok, out) = check(
        "async: {callbacks: {allowed_networks: [{cidr: 10.20.0.0/16, ports: [443]}, {cidr: 'fd00::/8'}]}}\n",
        &[],
    );
    assert!(ok, "{out}");
    let (ok, out) = check(
        "async: {callbacks: {allowed_networks: [{cidr: 10.20.0.0}]}}\n",
        &[],
    );
    assert!(!ok, "a CIDR needs its prefix: {out}");
    let (ok, out) = check(
        "async: {callbacks: {secrets_file: /dev/null, allowed_hosts: [{host: h.example, ports: [0]}]}}\n",
        &[],
    );
    assert!(!ok);
    assert!(out.contains("async.callbacks.allowed_hosts"), "{out}");
}
