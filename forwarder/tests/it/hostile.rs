//! Hostile clients against the real binary: slow heads, bodies that never
//! end, half-sent bodies without credentials, readers that stop reading,
//! thousands of idle connections, more connections than the cap. After each,
//! the forwarder must still answer a normal request promptly.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use crate::common::metric_value;
use crate::process::{binary, free_port, wait_ready, Child};

const KEY: &str = "sk-hostile-test-key";

struct Forwarder {
    child: Child,
    base: String,
    addr: String,
    _dir: tempfile::TempDir,
}

/// Starts the binary with `server` settings (YAML lines under `server:`)
/// and extra YAML upstream entries; auth on with [`KEY`].
async fn forwarder(server: &[&str], upstreams: &str) -> Forwarder {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, format!("tester: {KEY}\n")).unwrap();
    let server: String = server.iter().map(|l| format!("  {l}\n")).collect();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "server:\n  listen: 127.0.0.1:{port}\n{server}\
             auth:\n  api_keys_file: {keys}\n\
             logging:\n  access_log: false\n  level: warn\n\
             upstreams:\n  - name: builtin\n    provider: mock\n    models: [mock]\n{upstreams}",
            keys = keys.display()
        ),
    )
    .unwrap();
    let child = binary()
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let child = Child(child);
    let base = format!("http://127.0.0.1:{port}");
    wait_ready(&base).await;
    Forwarder {
        child,
        addr: format!("127.0.0.1:{port}"),
        base,
        _dir: dir,
    }
}

impl Forwarder {
    /// A normal authenticated request is answered, and promptly.
    async fn assert_answers(&self, after: &str) {
        let started = Instant::now();
        let r = crate::common::client()
            .post(format!("{}/v1/chat/completions", self.base))
            .bearer_auth(KEY)
            .json(&crate::common::chat("mock", "still there?"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .unwrap_or_else(|e| panic!("no answer after {after}: {e}"));
        assert_eq!(r.status(), 200, "after {after}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "slow answer after {after}: {:?}",
            started.elapsed()
        );
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.0.id()))
            .expect("the forwarder runs");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    async fn open_connections(&self) -> f64 {
        let text = crate::common::client()
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        metric_value(&text, "forwarder_connections", &[("protocol", "http")]).unwrap_or(0.0)
    }

    async fn connect(&self) -> TcpStream {
        TcpStream::connect(&self.addr).await.expect("connects")
    }
}

/// Reads until the peer closes (EOF or reset); `None` if it has not within
/// `limit`. Returns what was read.
async fn read_until_closed(conn: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn slow_headers_are_cut_off_within_the_header_timeout() {
    let fwd = forwarder(&["header_timeout: 2s"], "").await;
    // A byte a second, never finishing the head: once after a request line
    // sent at once, once from the very first byte (before the protocol is
    // even known).
    for opening in [&b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "[..], b""] {
        let mut conn = fwd.connect().await;
        let started = Instant::now();
        let (mut rd, mut wr) = conn.split();
        let trickle = async {
            if wr.write_all(opening).await.is_err() {
                return;
            }
            for b in b"POST /v1/chat/completions HTTP/1.1\r\n"
                .iter()
                .cycle()
                .take(10)
            {
                if wr.write_all(&[*b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        };
        let mut buf = [0u8; 64];
        tokio::select! {
            () = trickle => panic!("a slow head was never cut off"),
            r = rd.read(&mut buf) => assert!(matches!(r, Ok(0) | Err(_)), "{r:?}"),
        }
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(1800) && elapsed < Duration::from_millis(3500),
            "closed after {elapsed:?}, expected about the 2 s header timeout"
        );
        fwd.assert_answers("a slow head").await;
    }
}

#[tokio::test]
async fn a_kept_alive_connection_is_closed_after_the_idle_timeout_not_the_header_timeout() {
    let fwd = forwarder(&["header_timeout: 10s", "idle_timeout: 1s"], "").await;
    let mut conn = fwd.connect().await;
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = conn.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let idle_from = Instant::now();
    let closed = read_until_closed(&mut conn, Duration::from_secs(5)).await;
    assert!(closed.is_some(), "an idle connection must be closed");
    let idle = idle_from.elapsed();
    assert!(
        idle >= Duration::from_millis(800) && idle < Duration::from_secs(3),
        "closed after {idle:?} idle, expected about 1 s"
    );
    fwd.assert_answers("an idle connection").await;
}

#[tokio::test]
async fn a_body_that_never_ends_gets_408_within_the_body_timeout() {
    let fwd = forwarder(&["body_timeout: 1s"], "").await;
    let mut conn = fwd.connect().await;
    let started = Instant::now();
    conn.write_all(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{{\"model\":\"mock\","
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let (mut rd, mut wr) = conn.into_split();
    let writer = tokio::spawn(async move {
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if wr.write_all(b" ").await.is_err() {
                return;
            }
        }
    });
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), rd.read_to_end(&mut answer)).await;
    let elapsed = started.elapsed();
    writer.abort();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    let json: serde_json::Value = serde_json::from_str(body).expect("a JSON error body");
    assert_eq!(json["error"]["code"], "request_timeout", "{json}");
    assert!(json["error"]["message"].is_string() && json["error"]["type"].is_string());
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(3),
        "answered after {elapsed:?}, expected about the 1 s body timeout"
    );
    fwd.assert_answers("a body that never ends").await;
}

#[tokio::test]

async fn three_hundred_unauthenticated_half_sent_bodies_cost_under_10_mib() {
    let fwd = forwarder(&["body_timeout: 20s", "max_body_bytes: 1048576"], "").await;
    fwd.assert_answers("start").await;
    let before = fwd.rss_kib();
    let half = vec![b'x'; 512 * 1024];
    let mut conns = Vec::new();
    for _ in 0..300 {
        let mut conn = fwd.connect().await;
        conn.write_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\
              Content-Type: application/json\r\nContent-Length: 1048576\r\n\r\n",
        )
        .await
        .unwrap();
        // As much of the half body as the socket takes; a server that
        // does not read it leaves the rest with us.
        let _ = tokio::time::timeout(Duration::from_millis(20), conn.write_all(&half)).await;
        conns.push(conn);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown = fwd.rss_kib().saturating_sub(before);
    assert!(
        grown < 10 * 1024,
        "RSS grew by {grown} KiB with 300 half-sent bodies"
    );
    drop(conns);
    fwd.assert_answers("300 half-sent bodies").await;
}

/// An OpenAI-compatible upstream that streams chunks as fast as it can,
/// forever; reports on `cancelled` once the forwarder drops the call.
async fn endless_upstream() -> (String, oneshot::Receiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "the forwarder sent no request");
            head.extend_from_slice(&buf[..n]);
        }
        conn.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
              transfer-encoding: chunked\r\n\r\n",
        )
        .await
        .unwrap();
        let words = "lorem ipsum dolor sit amet ".repeat(30);
        let event = format!(
            "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":0,\
             \"model\":\"endless\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{words}\"}},\
             \"finish_reason\":null}}]}}\n\n"
        );
        let chunk = format!("{:x}\r\n{event}\r\n", event.len());
        loop {
            if conn.write_all(chunk.as_bytes()).await.is_err() {
                let _ = tx.send(());
                return;
            }
        }
    });
    (format!("http://{addr}/v1"), rx)
}

/// The upstreams entry (YAML) of [`endless_upstream`] at `url`.
fn endless_entry(url: &str) -> String {
    format!("  - name: endless\n    provider: openai\n    base_url: {url}\n    models: [endless]\n")
}

/// A streamed request for the endless model over HTTP/1.1, sent; the
/// connection, to read (or not) from.
async fn send_endless_h1(fwd: &Forwarder) -> TcpStream {
    let mut conn = fwd.connect().await;
    let body = r#"{"model":"endless","stream":true,"messages":[{"role":"user","content":"go"}]}"#;
    conn.write_all(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    conn
}

#[tokio::test]
async fn a_reader_that_stops_is_disconnected_and_its_upstream_call_cancelled() {
    let (upstream, cancelled) = endless_upstream().await;
    let fwd = forwarder(&["write_timeout: 1s"], &endless_entry(&upstream)).await;
    let mut conn = send_endless_h1(&fwd).await;
    let mut first = [0u8; 1024];
    let n = conn.read(&mut first).await.unwrap();
    assert!(first[..n].starts_with(b"HTTP/1.1 200"), "the stream starts");
    // Stop reading. The forwarder's writes stall once the socket buffers
    // are full; after the write timeout it must hang up, and drop the
    // upstream call with it.
    tokio::time::timeout(Duration::from_secs(15), cancelled)
        .await
        .expect("the upstream call must be cancelled after the write timeout")
        .expect("the upstream saw the cancellation");
    let rest = read_until_closed(&mut conn, Duration::from_secs(10))
        .await
        .expect("the stalled client must be disconnected");
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        !rest.contains("[DONE]"),
        "an endless stream cannot be complete"
    );
    fwd.assert_answers("a reader that stopped").await;
}

/// Sends a streamed chat request for `model` over HTTP/2 (prior
/// knowledge) from a client whose stream window is 0: the forwarder may
/// send the head, never a byte of the body. Returns the response head,
/// and the connection to keep it open.
async fn unread_h2_stream(
    fwd: &Forwarder,
    model: &str,
) -> (
    http::Response<hyper::body::Incoming>,
    hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>,
) {
    let io = hyper_util::rt::TokioIo::new(fwd.connect().await);
    let (mut send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(0)
            .initial_connection_window_size(65_535)
            .handshake(io)
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let body = format!(
        r#"{{"model":"{model}","stream":true,"messages":[{{"role":"user","content":"go"}}]}}"#
    );
    let req = http::Request::post(format!("{}/v1/chat/completions", fwd.base))
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let head = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
        .await
        .expect("the head arrives although no body may")
        .expect("the stream starts");
    assert_eq!(head.status(), 200);
    (head, send)
}

#[tokio::test]
async fn an_http2_stream_whose_window_never_opens_frees_its_upstream_call() {
    let (upstream, cancelled) = endless_upstream().await;
    let fwd = forwarder(
        &["write_timeout: 1s", "request_timeout: 60s"],
        &endless_entry(&upstream),
    )
    .await;
    let started = Instant::now();
    let (_head, _conn) = unread_h2_stream(&fwd, "endless").await;
    // Other streams of the connection still flow, so the connection's
    // write timeout never fires: the stream's watchdog must.
    tokio::time::timeout(Duration::from_secs(15), cancelled)
        .await
        .expect("the upstream call must end after the write timeout, not at the deadline")
        .expect("the upstream saw the cancellation");
    eprintln!(
        "upstream released {:?} after the request",
        started.elapsed()
    );
    fwd.assert_answers("an HTTP/2 stream never read").await;
}

#[tokio::test]
async fn the_request_deadline_bounds_a_client_that_stops_reading() {
    let (upstream, cancelled) = endless_upstream().await;
    let fwd = forwarder(
        &["write_timeout: 60s", "request_timeout: 2s"],
        &endless_entry(&upstream),
    )
    .await;
    let mut conn = send_endless_h1(&fwd).await;
    let started = Instant::now();
    let mut first = [0u8; 1024];
    let n = conn.read(&mut first).await.unwrap();
    assert!(first[..n].starts_with(b"HTTP/1.1 200"), "the stream starts");
    // Stop reading: the write timeout is a minute away, the deadline 2 s.
    tokio::time::timeout(Duration::from_secs(20), cancelled)
        .await
        .expect("the upstream call must end at the request deadline")
        .expect("the upstream saw the cancellation");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "released after {took:?}, not at the deadline"
    );
    fwd.assert_answers("a reader that stopped before its deadline")
        .await;
}

/// Raises this process's open-file limit to its hard limit (children
/// inherit it); returns the new soft limit.
fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

#[tokio::test]
async fn two_thousand_idle_connections_then_normal_service_and_reaping() {
    let limit = raise_nofile_limit();
    // Both ends of every connection live in processes with this limit;
    // scale down (and say so) where the hard limit is low.
    let n = 2000.min(limit.saturating_sub(200) as usize);
    if n < 2000 {
        eprintln!("RLIMIT_NOFILE hard limit {limit}: testing {n} idle connections, not 2000");
    }
    // Long enough for a loaded machine to open them all before the
    // first are reaped.
    let fwd = forwarder(&["header_timeout: 15s"], "").await;
    let mut idle = Vec::with_capacity(n);
    while idle.len() < n {
        let batch = (n - idle.len()).min(100);
        let conns = futures::future::join_all((0..batch).map(|_| fwd.connect())).await;
        idle.extend(conns);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while fwd.open_connections().await < n as f64 {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} accepted",
            fwd.open_connections().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fwd.assert_answers("2000 idle connections").await;
    // Connections that never send a request are closed after the header
    // timeout.
    let deadline = Instant::now() + Duration::from_secs(25);
    loop {
        let open = fwd.open_connections().await;
        if open < 5.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{open} idle connections not reaped"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(idle);
    fwd.assert_answers("reaping idle connections").await;
}

#[tokio::test]
async fn connections_beyond_the_cap_wait_in_the_backlog_then_are_served() {
    let fwd = forwarder(&["max_connections: 20", "header_timeout: 1s"], "").await;
    // wait_ready's connections may still be open for a moment
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(fwd.connect().await);
    }
    let started = Instant::now();
    let mut extra = fwd.connect().await; // the kernel completes the handshake
    extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    // Not served while 20 are open...
    assert!(
        tokio::time::timeout(Duration::from_millis(500), extra.read(&mut buf))
            .await
            .is_err(),
        "a connection beyond the cap must not be served yet"
    );
    // ...but as soon as the idle ones are reaped.
    let n = tokio::time::timeout(Duration::from_secs(4), extra.read(&mut buf))
        .await
        .expect("served once slots free up")
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    assert!(started.elapsed() < Duration::from_secs(3));
    drop(held);
    fwd.assert_answers("a full connection table").await;
}

#[tokio::test]
async fn a_websocket_session_outlives_the_http_idle_and_header_timeouts() {
    let mut cfg = crate::common::config(vec![forwarder::config::UpstreamConfig::builtin_mock()]);
    cfg.server.header_timeout = Duration::from_millis(500);
    cfg.server.idle_timeout = Duration::from_millis(500);
    let fwd = crate::common::start(cfg).await;
    let mut ws = crate::common::ws_connect(&fwd.ws, &[]).await.unwrap();
    // Quiet for longer than both HTTP timeouts: the session owns its timers.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    crate::common::ws_send(
        &mut ws,
        serde_json::json!({"type": "request", "id": "1", "model": "mock", "prompt": "hi"}),
    )
    .await;
    let done = crate::common::ws_recv(&mut ws).await;
    assert_eq!(done["type"], "done", "{done}");
}

#[tokio::test]
async fn a_huge_request_head_gets_431() {
    let fwd = forwarder(&["max_header_bytes: 16384"], "").await;
    let mut conn = fwd.connect().await;
    let big = "a".repeat(32 * 1024);
    conn.write_all(format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let answer = read_until_closed(&mut conn, Duration::from_secs(5))
        .await
        .expect("answered and closed");
    assert!(
        answer.starts_with(b"HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    fwd.assert_answers("a huge head").await;
}

#[tokio::test]
async fn http2_connections_are_served_and_idle_ones_closed() {
    let fwd = forwarder(&["idle_timeout: 1s", "header_timeout: 5s"], "").await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2
        .post(format!("{}/v1/chat/completions", fwd.base))
        .bearer_auth(KEY)
        .json(&crate::common::chat("mock", "over h2"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    // A body far larger than the flow-control windows still arrives.
    let big = "word ".repeat(150_000);
    let r = h2
        .post(format!("{}/v1/chat/completions", fwd.base))
        .bearer_auth(KEY)
        .json(&crate::common::chat("mock", &big))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The idle h2 connection is closed after about a second.
    let deadline = Instant::now() + Duration::from_secs(5);
    while fwd.open_connections().await > 1.0 {
        assert!(
            Instant::now() < deadline,
            "idle HTTP/2 connection kept open"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(h2);
}

#[tokio::test]
async fn a_grpc_connection_that_never_opens_is_closed_and_grpc_still_works() {
    let mut cfg = crate::common::config(vec![forwarder::config::UpstreamConfig::builtin_mock()]);
    cfg.server.header_timeout = Duration::from_millis(800);
    let fwd = crate::common::start(cfg).await;
    let grpc = fwd.grpc.clone().expect("gRPC enabled");
    let mut silent = TcpStream::connect(grpc.trim_start_matches("http://"))
        .await
        .unwrap();
    let started = Instant::now();
    let closed = read_until_closed(&mut silent, Duration::from_secs(5)).await;
    assert!(closed.is_some(), "a silent gRPC connection must be closed");
    assert!(started.elapsed() < Duration::from_secs(3));
    // A real client, quiet for longer than the header timeout between
    // calls, keeps working.
    let mut client = crate::common::grpc_client(&fwd).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let reply = client
        .forward(forwarder::frontends::grpc::pb::ForwardRequest {
            model_id: "mock".into(),
            prompt: "hi".into(),
            ..Default::default()
        })
        .await
        .expect("a unary call after a quiet spell");
    assert_eq!(reply.into_inner().reply, "mock reply: hi");
}

#[tokio::test]
async fn a_grpc_stream_never_read_frees_its_upstream_call() {
    let (upstream, cancelled) = endless_upstream().await;
    let mut u = forwarder::config::UpstreamConfig::builtin_mock();
    u.name = "endless".into();
    u.provider = forwarder::config::Provider::Openai;
    u.base_url = Some(upstream);
    u.models = vec!["endless".into()];
    u.mock = None;
    u.timeout = Duration::from_secs(60);
    let mut cfg = crate::common::config(vec![u]);
    cfg.server.write_timeout = Duration::from_secs(1);
    cfg.server.request_timeout = Duration::from_secs(60);
    let fwd = crate::common::start(cfg).await;
    let channel = tonic::transport::Endpoint::from_shared(fwd.grpc.clone().expect("gRPC enabled"))
        .unwrap()
        .initial_stream_window_size(Some(0))
        .connect()
        .await
        .expect("grpc connects");
    let mut client =
        forwarder::frontends::grpc::pb::forwarder_client::ForwarderClient::new(channel);
    let _unread = tokio::time::timeout(
        Duration::from_secs(10),
        client.forward_stream(forwarder::frontends::grpc::pb::ForwardRequest {
            model_id: "endless".into(),
            prompt: "go".into(),
            ..Default::default()
        }),
    )
    .await
    .expect("the head arrives")
    .expect("the stream starts");
    tokio::time::timeout(Duration::from_secs(15), cancelled)
        .await
        .expect("the upstream call must end after the write timeout")
        .expect("the upstream saw the cancellation");
}

#[tokio::test]
async fn a_websocket_client_that_stops_reading_frees_its_upstream_call() {
    use crate::common::{ws_connect, ws_recv, ws_send};
    let (upstream, cancelled) = endless_upstream().await;
    let fwd = forwarder(
        &["write_timeout: 1s", "request_timeout: 60s"],
        &endless_entry(&upstream),
    )
    .await;
    let auth = format!("Bearer {KEY}");
    let mut ws = ws_connect(
        &format!("ws://{}/api/v1/ws", fwd.addr),
        &[("authorization", &auth)],
    )
    .await
    .expect("websocket");
    ws_send(
        &mut ws,
        serde_json::json!({"type": "request", "id": "r", "model": "endless",
                           "prompt": "go", "stream": true}),
    )
    .await;
    assert_eq!(ws_recv(&mut ws).await["type"], "delta", "the stream starts");
    // Stop reading: the session's writes back up; the connection's write
    // timeout (or, were the socket still taking bytes, the stream's
    // watchdog) ends the call.
    tokio::time::timeout(Duration::from_secs(15), cancelled)
        .await
        .expect("the upstream call must end after the write timeout")
        .expect("the upstream saw the cancellation");
    drop(ws);
    fwd.assert_answers("a websocket client that stopped reading")
        .await;
}
