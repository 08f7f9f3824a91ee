//! The WebSocket front end with a real client (tokio-tungstenite).

use std::time::Duration;

use forwarder::config::{Config, LatencyDist, MockSettings};
use futures::StreamExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::common::*;

fn with_auth(mut cfg: Config, dir: &tempfile::TempDir) -> Config {
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "ws-client: sk-ws\n").unwrap();
    cfg.auth.api_keys_file = Some(keys);
    cfg
}

#[tokio::test]
async fn authenticates_at_the_upgrade_by_header_subprotocol_or_query() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::default();
    cfg.server.listen = loopback();
    let fwd = start(with_auth(cfg, &dir)).await;

    for (url, headers) in [
        (fwd.ws.clone(), vec![("authorization", "Bearer sk-ws")]),
        (fwd.ws.clone(), vec![("x-api-key", "sk-ws")]),
        (
            fwd.ws.clone(),
            vec![("sec-websocket-protocol", "modelforwarder.v1, bearer.sk-ws")],
        ),
        (format!("{}?api_key=sk-ws", fwd.ws), vec![]),
    ] {
        let mut ws = ws_connect(&url, &headers)
            .await
            .unwrap_or_else(|e| panic!("{headers:?}: {e}"));
        ws_send(
            &mut ws,
            json!({"type": "request", "id": "1", "model": "mock", "prompt": "hi"}),
        )
        .await;
        let done = ws_recv(&mut ws).await;
        assert_eq!(done["type"], "done", "{done}");
        assert_eq!(done["reply"], "mock reply: hi");
    }

    for (url, headers) in [
        (fwd.ws.clone(), vec![]),
        (fwd.ws.clone(), vec![("authorization", "Bearer wrong")]),
        (format!("{}?api_key=wrong", fwd.ws), vec![]),
    ] {
        match ws_connect(&url, &headers).await {
            Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
            other => panic!(
                "expected 401 at the upgrade, got {:?}",
                other.map(|_| "a connection")
            ),
        }
    }
}

#[tokio::test]
async fn interleaves_requests_and_answers_them_as_they_complete() {
    let slow = mock(MockSettings {
        latency: LatencyDist::Fixed(Duration::from_millis(400)),
        ..Default::default()
    })
    .await;
    let fast = mock(MockSettings::default()).await;
    let fwd = start(config(vec![
        upstream("slow", &slow, "slow-model"),
        upstream("fast", &fast, "fast-model"),
    ]))
    .await;
    let mut ws = ws_connect(&fwd.ws, &[]).await.unwrap();
    ws_send(
        &mut ws,
        json!({"type": "request", "id": "a", "model": "slow-model", "prompt": "first"}),
    )
    .await;
    ws_send(&mut ws, json!({"type": "request", "id": "b", "model": "fast-model", "prompt": "second", "stream": true})).await;
    let mut order = Vec::new();
    let mut text_b = String::new();
    while order.len() < 2 {
        let f = ws_recv(&mut ws).await;
        match f["type"].as_str().unwrap() {
            "delta" => {
                assert_eq!(f["id"], "b");
                text_b.push_str(f["delta"].as_str().unwrap());
            }
            "done" => order.push(f),
            other => panic!("unexpected {other}: {f}"),
        }
    }
    assert_eq!(order[0]["id"], "b", "the fast request finished first");
    assert_eq!(order[1]["id"], "a");
    assert_eq!(order[1]["reply"], "mock reply: first");
    assert_eq!(text_b, "mock reply: second", "deltas arrive in order");
    assert_eq!(order[0]["finish_reason"], "stop");
    assert_eq!(order[0]["usage"]["completion_tokens"], 3);
    assert!(
        order[0].get("reply").is_none(),
        "streamed answers are not repeated in done"
    );
}

#[tokio::test]
async fn cancel_stops_one_request_and_the_connection_goes_on() {
    let m = mock(MockSettings {
        tokens_per_second: Some(5.0),
        reply_words: 50,
        ..Default::default()
    })
    .await;
    let fwd = start(config(vec![upstream("a", &m, "m")])).await;
    let mut ws = ws_connect(&fwd.ws, &[]).await.unwrap();
    ws_send(
        &mut ws,
        json!({"type": "request", "id": "long", "model": "m", "prompt": "x", "stream": true}),
    )
    .await;
    let first = ws_recv(&mut ws).await;
    assert_eq!(first["type"], "delta");
    ws_send(&mut ws, json!({"type": "cancel", "id": "long"})).await;
    let frames = ws_collect(&mut ws, "long").await;
    assert_eq!(frames.last().unwrap()["type"], "cancelled", "{frames:?}");
    ws_send(&mut ws, json!({"type": "cancel", "id": "never-sent"})).await;
    assert_eq!(
        ws_recv(&mut ws).await["error"]["code"],
        "unknown_request_id"
    );
    // The cancelled request counts as a client-closed request (499).
    tokio::time::sleep(Duration::from_millis(50)).await;
    let code = fwd
        .metric(
            "forwarder_requests_total",
            &[
                ("protocol", "websocket"),
                ("api", "chat_completions"),
                ("model", "m"),
                ("code", "499"),
            ],
        )
        .await;
    assert_eq!(code, 1.0);
    ws_send(
        &mut ws,
        json!({"type": "request", "id": "after", "model": "m", "prompt": "ok", "max_tokens": 3}),
    )
    .await;
    let done = ws_collect(&mut ws, "after").await;
    assert_eq!(done.last().unwrap()["reply"], "mock reply: ok");
}

#[tokio::test]
async fn bad_frames_get_error_frames_and_limits_hold() {
    let slow = mock(MockSettings {
        latency: LatencyDist::Fixed(Duration::from_millis(300)),
        ..Default::default()
    })
    .await;
    let mut cfg = config(vec![upstream("a", &slow, "m")]);
    cfg.websocket.max_in_flight = 2;
    cfg.websocket.max_frame_bytes = 4096;
    let fwd = start(cfg).await;
    let mut ws = ws_connect(&fwd.ws, &[]).await.unwrap();

    ws.send_text("{not json").await;
    let e = ws_recv(&mut ws).await;
    assert_eq!(
        (e["type"].as_str(), e["status"].as_u64()),
        (Some("error"), Some(400)),
        "{e}"
    );
    ws_send(
        &mut ws,
        json!({"type": "request", "id": "z", "model": "nope", "prompt": "x"}),
    )
    .await;
    let e = ws_recv(&mut ws).await;
    assert_eq!(
        (e["id"].as_str(), e["status"].as_u64()),
        (Some("z"), Some(404)),
        "{e}"
    );
    assert_eq!(e["error"]["code"], "model_not_found");

    for id in ["1", "2", "3"] {
        ws_send(
            &mut ws,
            json!({"type": "request", "id": id, "model": "m", "prompt": "x"}),
        )
        .await;
    }
    ws_send(
        &mut ws,
        json!({"type": "request", "id": "1", "model": "m", "prompt": "x"}),
    )
    .await;
    let refused = ws_recv(&mut ws).await;
    assert_eq!(refused["id"], "3");
    assert_eq!(refused["error"]["code"], "too_many_in_flight");
    assert_eq!(refused["status"], 429);
    let dup = ws_recv(&mut ws).await;
    assert_eq!(dup["error"]["code"], "duplicate_request_id", "{dup}");
    // Not addressed to the running request "1": a client routing frames by
    // id must not take it for that request's failure.
    assert!(dup["id"].is_null(), "{dup}");
    assert_eq!(dup["refused_id"], "1", "{dup}");
    for _ in 0..2 {
        assert_eq!(ws_recv(&mut ws).await["type"], "done");
    }

    // An oversized frame ends the connection (close code 1009).
    ws.send_text(&"x".repeat(8192)).await;
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    })
    .await
    .expect("connection ends");
    assert_eq!(end, Some(1009), "closed with {end:?}");
}

#[tokio::test]
async fn shutdown_lets_in_flight_answers_finish_then_closes_with_1001() {
    let m = mock(MockSettings {
        tokens_per_second: Some(20.0),
        reply_words: 10,
        ..Default::default()
    })
    .await;
    let fwd = start(config(vec![upstream("a", &m, "m")])).await;
    let mut ws = ws_connect(&fwd.ws, &[]).await.unwrap();
    ws_send(
        &mut ws,
        json!({"type": "request", "id": "s", "model": "m", "prompt": "x", "stream": true}),
    )
    .await;
    assert_eq!(ws_recv(&mut ws).await["type"], "delta");
    let Fwd { server, .. } = fwd;
    let stopping = tokio::spawn(server.shutdown());
    let frames = ws_collect(&mut ws, "s").await;
    assert_eq!(
        frames.last().unwrap()["type"],
        "done",
        "the stream finished"
    );
    let close = loop {
        match ws.next().await {
            Some(Ok(Message::Close(f))) => break f.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(close, Some(1001));
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .unwrap()
        .unwrap();
}

trait SendText {
    async fn send_text(&mut self, text: &str);
}

impl SendText for Ws {
    async fn send_text(&mut self, text: &str) {
        use futures::SinkExt;
        self.send(Message::Text(text.to_string().into()))
            .await
            .unwrap();
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// A client that stops reading must not make the forwarder buffer its
/// answer: backpressure reaches the upstream stream and memory stays flat.
#[tokio::test]
async fn a_slow_reader_does_not_grow_memory() {
    use crate::process::{binary, free_port, wait_ready, Child};
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("config.yaml");
    // Millions of words, unpaced: far more than any socket buffer holds.
    std::fs::write(
        &config,
        format!(
            "server: {{listen: 127.0.0.1:{port}}}\nlogging: {{access_log: false}}\n\
             upstreams: [{{name: m, provider: mock, models: [mock], mock: {{reply_words: 5000000}}}}]\n"
        ),
    )
    .unwrap();
    let child = binary()
        .args(["serve", "--config"])
        .arg(&config)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let child = Child(child);
    let base = format!("http://127.0.0.1:{port}");
    wait_ready(&base).await;
    let pid = child.0.id();
    let mut ws = ws_connect(&format!("ws://127.0.0.1:{port}/api/v1/ws"), &[])
        .await
        .unwrap();
    ws_send(
        &mut ws,
        json!({"type": "request", "id": "big", "model": "mock", "prompt": "x", "stream": true}),
    )
    .await;
    assert_eq!(ws_recv(&mut ws).await["type"], "delta");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let early = rss_kib(pid);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let late = rss_kib(pid);
    assert!(
        late < early + 8 * 1024,
        "RSS grew from {early} KiB to {late} KiB while the client was not reading"
    );
    // The stream is paused, not dead: reading resumes it.
    for _ in 0..1000 {
        assert_eq!(ws_recv(&mut ws).await["type"], "delta");
    }
}

/// An id may be reused once its request was cancelled, and the old task's
/// end must not remove the new request from the in-flight table (a later
/// duplicate is still refused, and the new request can still be cancelled).
#[tokio::test]
async fn an_id_reused_after_cancel_keeps_its_place_in_the_table() {
    let m = mock(MockSettings {
        tokens_per_second: Some(5.0),
        reply_words: 50,
        ..Default::default()
    })
    .await;
    let fwd = start(config(vec![upstream("a", &m, "m")])).await;
    let mut ws = ws_connect(&fwd.ws, &[]).await.unwrap();
    let long = json!({"type": "request", "id": "r", "model": "m", "prompt": "x", "stream": true});
    ws_send(&mut ws, long.clone()).await;
    assert_eq!(ws_recv(&mut ws).await["type"], "delta");
    ws_send(&mut ws, json!({"type": "cancel", "id": "r"})).await;
    // The same id at once, before the cancelled task has been reaped.
    ws_send(&mut ws, long.clone()).await;
    let frames = ws_collect(&mut ws, "r").await;
    assert_eq!(frames.last().unwrap()["type"], "cancelled", "{frames:?}");
    // Let the cancelled task end, then check the new "r" is still known.
    tokio::time::sleep(Duration::from_millis(300)).await;
    ws_send(&mut ws, long).await;
    let dup = loop {
        let f = ws_recv(&mut ws).await;
        if f["type"] == "error" {
            break f;
        }
    };
    assert_eq!(dup["error"]["code"], "duplicate_request_id", "{dup}");
    assert_eq!(dup["refused_id"], "r");
    ws_send(&mut ws, json!({"type": "cancel", "id": "r"})).await;
    let end = loop {
        let f = ws_recv(&mut ws).await;
        if f["type"] != "delta" {
            break f;
        }
    };
    assert_eq!(end["type"], "cancelled", "{end}");
}
