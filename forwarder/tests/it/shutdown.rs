//! Graceful shutdown of the real binary on SIGTERM with a stream in flight.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::*;
use crate::process::{binary, free_port, wait_ready, Child};

#[tokio::test]
async fn sigterm_drains_then_refuses_then_finishes_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    std::fs::write(dir.path().join("keys"), "ops: sk-very-secret-key\n").unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            r#"
server:
  listen: 127.0.0.1:{port}
  shutdown: {{drain_delay: 600ms, grace_period: 10s}}
auth:
  api_keys_file: {keys}
upstreams:
  - name: builtin
    provider: mock
    models: [mock]
    mock: {{tokens_per_second: 10, reply_words: 12}}
"#,
            keys = dir.path().join("keys").display()
        ),
    )
    .unwrap();
    let log = dir.path().join("stderr.log");
    let child = binary()
        .args(["serve", "--config"])
        .arg(&config)
        .stderr(std::fs::File::create(&log).unwrap())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Child(child);
    let base = format!("http://127.0.0.1:{port}");
    wait_ready(&base).await;

    let stream = crate::common::client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth("sk-very-secret-key")
        .json(&json!({"model": "mock", "stream": true,
                      "messages": [{"role": "user", "content": "confidential prompt words"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);

    let pid = child.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let sent = Instant::now();

    // While draining: still accepting, but not ready.
    let fresh = || {
        reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap()
    };
    // The signal is handled on its own task: on a busy machine the first
    // probe can race it, so poll within the drain delay.
    let mut status = 0;
    while sent.elapsed() < Duration::from_millis(600) {
        let r = fresh().get(format!("{base}/readyz")).send().await.unwrap();
        status = r.status().as_u16();
        if status == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, 503, "readyz fails once SIGTERM arrives");
    assert!(sent.elapsed() < Duration::from_millis(600));

    // After the drain delay: new connections are refused.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let refused = fresh().get(format!("{base}/healthz")).send().await;
    assert!(
        refused.is_err(),
        "new connections must be refused after the drain delay"
    );

    // The in-flight stream still finishes completely.
    let events = sse_events(stream).await;
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    assert!(stream_text(&events).starts_with("mock reply: confidential prompt words lorem"));

    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "forwarder did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exit status {status:?}");

    let mut logs = String::new();
    std::fs::File::open(&log)
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    assert!(
        logs.contains(r#""status":200"#) && logs.contains(r#""stream":true"#),
        "access log line: {logs}"
    );
    assert!(
        !logs.contains("confidential"),
        "prompt text leaked into logs: {logs}"
    );
    assert!(!logs.contains("lorem"), "reply text leaked into logs");
    assert!(
        !logs.contains("sk-very-secret-key"),
        "API key leaked into logs"
    );
}
