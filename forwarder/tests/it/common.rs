use std::net::SocketAddr;
use std::time::Duration;

use forwarder::config::{Config, MockSettings, Provider, UpstreamConfig};
use forwarder::mock_llm::MockServer;
use forwarder::server::Server;
use serde_json::{json, Value};

pub const MS: Duration = Duration::from_millis(1);

/// A plain HTTP client for tests (TLS provider installed first).
pub fn client() -> reqwest::Client {
    forwarder::install_crypto_provider();
    reqwest::Client::new()
}

pub async fn mock(settings: MockSettings) -> MockServer {
    MockServer::start(loopback(), settings)
        .await
        .expect("mock-llm starts")
}

pub fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// An `openai` upstream pointing at a mock-llm server.
pub fn upstream(name: &str, mock: &MockServer, model: &str) -> UpstreamConfig {
    UpstreamConfig {
        name: name.into(),
        provider: Provider::Openai,
        base_url: Some(mock.base_url()),
        models: vec![model.into()],
        weight: 1,
        api_key_file: None,
        api_key_env: None,
        connect_timeout: Duration::from_secs(1),
        timeout: Duration::from_secs(5),
        mock: None,
        tls: None,
    }
}

/// A config on an ephemeral loopback port with fast retries, so tests
/// are quick but still exercise real backoff.
pub fn config(upstreams: Vec<UpstreamConfig>) -> Config {
    let mut cfg = Config::default();
    cfg.server.listen = loopback();
    cfg.server.shutdown.grace_period = Duration::from_secs(5);
    cfg.retry.base_delay = 20 * MS;
    cfg.retry.max_delay = 200 * MS;
    cfg.upstreams = upstreams;
    cfg.logging.access_log = false;
    cfg.grpc.enabled = true;
    cfg.grpc.listen = loopback();
    cfg
}

pub async fn start(cfg: Config) -> Fwd {
    let server = Server::start(cfg).await.expect("forwarder starts");
    Fwd {
        base: format!("http://{}", server.addr),
        ws: format!("ws://{}/api/v1/ws", server.addr),
        grpc: server.grpc_addr.map(|a| format!("http://{a}")),
        server,
        http: client(),
    }
}

pub struct Fwd {
    pub base: String,
    pub ws: String,
    pub grpc: Option<String>,
    /// Kept alive for the test's duration.
    pub server: Server,
    pub http: reqwest::Client,
}

pub struct Resp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn error_code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("<none>")
    }
}

pub fn chat(model: &str, prompt: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": prompt}]})
}

impl Fwd {
    pub async fn post(&self, path: &str, body: &Value, headers: &[(&str, &str)]) -> Resp {
        self.post_raw(path, serde_json::to_vec(body).unwrap(), headers)
            .await
    }

    pub async fn post_raw(&self, path: &str, body: Vec<u8>, headers: &[(&str, &str)]) -> Resp {
        let mut req = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        into_resp(req.send().await.expect("request sent")).await
    }

    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Resp {
        let mut req = self.http.get(format!("{}{path}", self.base));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        into_resp(req.send().await.expect("request sent")).await
    }

    pub async fn delete(&self, path: &str, headers: &[(&str, &str)]) -> Resp {
        let mut req = self.http.delete(format!("{}{path}", self.base));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        into_resp(req.send().await.expect("request sent")).await
    }

    /// The value of one sample in `/metrics`, matched by name and exact labels
    /// (in any order); 0 when absent.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = self.get("/metrics", &[]).await.text;
        metric_value(&text, name, labels).unwrap_or(0.0)
    }

    /// The sum of every series of `name` that has `labels` (and any others).
    pub async fn metric_sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = self.get("/metrics", &[]).await.text;
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                let (n, rest) = series.split_once('{')?;
                let matches = n == name
                    && labels
                        .iter()
                        .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
                matches.then(|| value.parse::<f64>().ok()).flatten()
            })
            .sum()
    }
}

pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            let mut have: Vec<(String, String)> = rest
                .split(',')
                .filter(|p| !p.is_empty())
                .filter_map(|p| {
                    let (k, v) = p.split_once('=')?;
                    Some((k.to_string(), v.trim_matches('"').to_string()))
                })
                .collect();
            let mut want: Vec<(String, String)> = labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            have.sort();
            want.sort();
            (have == want).then(|| value.parse().ok()).flatten()
        })
}

pub async fn into_resp(r: reqwest::Response) -> Resp {
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Resp {
        status,
        headers,
        body,
        text,
    }
}

/// Reads a whole SSE response into its `data:` payloads.
pub async fn sse_events(resp: reqwest::Response) -> Vec<String> {
    let text = resp.text().await.expect("stream body");
    text.lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(str::to_string)
        .collect()
}

/// The concatenated delta text of SSE chunk payloads.
pub fn stream_text(events: &[String]) -> String {
    events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a WebSocket to the forwarder with extra handshake headers.
pub async fn ws_connect(
    url: &str,
    headers: &[(&str, &str)],
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request()?;
    for (k, v) in headers {
        req.headers_mut().insert(
            reqwest::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    tokio_tungstenite::connect_async(req)
        .await
        .map(|(ws, _)| ws)
}

pub async fn ws_send(ws: &mut Ws, v: Value) {
    use futures::SinkExt;
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        v.to_string().into(),
    ))
    .await
    .expect("frame sent");
}

/// The next JSON frame (pings skipped); panics after 10 s or on close.
pub async fn ws_recv(ws: &mut Ws) -> Value {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a frame within 10 s")
            .expect("connection open")
            .expect("valid frame");
        match msg {
            Message::Text(t) => return serde_json::from_str(&t).expect("JSON frame"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// Frames for request `id` until its `done`, `error` or `cancelled` frame.
pub async fn ws_collect(ws: &mut Ws, id: &str) -> Vec<Value> {
    let mut frames = Vec::new();
    loop {
        let f = ws_recv(ws).await;
        if f["id"] != id {
            continue;
        }
        let last = matches!(f["type"].as_str(), Some("done" | "error" | "cancelled"));
        frames.push(f);
        if last {
            return frames;
        }
    }
}

pub async fn grpc_client(
    fwd: &Fwd,
) -> forwarder::frontends::grpc::pb::forwarder_client::ForwarderClient<tonic::transport::Channel> {
    let url = fwd.grpc.clone().expect("grpc enabled");
    forwarder::frontends::grpc::pb::forwarder_client::ForwarderClient::connect(url)
        .await
        .expect("grpc connects")
}

/// A mock whose every answer takes `latency`.
pub async fn slow_mock(latency: Duration) -> MockServer {
    mock(MockSettings {
        latency: forwarder::config::LatencyDist::Fixed(latency),
        ..MockSettings::default()
    })
    .await
}

/// Polls an async job (as the client `headers` name) until it leaves
/// `queued`/`running`; at most 30 s.
pub async fn wait_job(f: &Fwd, id: &str, headers: &[(&str, &str)]) -> Value {
    for _ in 0..1200 {
        let r = f.get(&format!("/v1/async/jobs/{id}"), headers).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let s = r.body["status"].as_str().unwrap().to_string();
        if s != "queued" && s != "running" {
            return r.body;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("job {id} did not finish");
}

/// Lets callbacks reach receivers on loopback over plain HTTP (the host on
/// the allow-list, its address on the network list, which loopback needs),
/// signed with the secrets in `secrets_file` (shared by every client when
/// `shared`).
pub fn loopback_callbacks(
    cb: &mut forwarder::config::CallbackConfig,
    secrets_file: std::path::PathBuf,
    shared: bool,
) {
    cb.secrets_file = Some(secrets_file);
    cb.shared_secret_fallback = shared;
    cb.allowed_hosts = vec![forwarder::config::CallbackHost {
        host: "127.0.0.1".into(),
        allow_http: true,
        ports: Vec::new(),
    }];
    cb.allowed_networks = vec![forwarder::config::CallbackNetwork {
        cidr: "127.0.0.1/32".parse().unwrap(),
        ports: Vec::new(),
    }];
}
