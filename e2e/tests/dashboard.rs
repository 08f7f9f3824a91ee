//! The chart's Grafana dashboard shows data: every panel's PromQL is run
//! against a real Prometheus scraping a real forwarder under a short mixed
//! load (chat, streams, cache hits, async jobs, Messages, Responses,
//! embeddings, upstream failures), and each query must return a sample
//! that is a number. Needs the Debian `prometheus` package (installed by
//! scripts/test.sh).

use std::time::{Duration, Instant};

use e2e::local::prometheus::Prometheus;
use forwarder::mock_llm::{Fault, MockServer};
use serde_json::{json, Value};

/// Queries of metrics no forwarder exports, with why they are exempt.
const EXEMPT: &[(&str, &str)] = &[(
    "kube_deployment_spec_replicas",
    "kube-state-metrics' series: it needs a cluster",
)];

fn dashboard() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/modelforwarder-operator/dashboards/modelforwarder.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("dashboard is JSON")
}

/// Every (panel title, expr) of the dashboard.
fn queries(dash: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            out.push((
                p["title"].as_str().unwrap().to_string(),
                t["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    out
}

/// The dashboard's variables, as Grafana would expand them for this test.
fn expand(expr: &str) -> String {
    expr.replace("$namespace", "ai")
        .replace("$modelforwarder", "support-bot")
        .replace("$__rate_interval", "20s")
}

#[test]
fn the_dashboard_has_the_panels_the_issue_asks_for() {
    let dash = dashboard();
    let titles: Vec<String> = queries(&dash).into_iter().map(|(t, _)| t).collect();
    for want in [
        "Requests per second by API",
        "Time to first token P99",
        "Cache hit ratio",
        "Async queue depth",
        "Async queue wait P99",
        "Upstream errors by outcome",
        "Errors by status code",
    ] {
        assert!(
            titles.iter().any(|t| t == want),
            "no panel {want}: {titles:?}"
        );
    }
}

/// Percent-encodes a query parameter's value.
fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn post(http: &reqwest::Client, url: &str, body: Value) -> u16 {
    match http.post(url).json(&body).send().await {
        // Read to the end: a dropped stream would count as a client gone.
        Ok(r) => {
            let status = r.status().as_u16();
            let _ = r.bytes().await;
            status
        }
        Err(_) => 0,
    }
}

/// One round of the mixed load; returns the statuses it got.
async fn round(http: &reqwest::Client, base: &str, mock: &MockServer, i: usize) -> Vec<u16> {
    let chat = |model: &str, text: &str| json!({"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8});
    // One upstream failure a round, retried: an upstream error series.
    mock.model.fail_next(
        1,
        Fault::Error {
            status: 503,
            retry_after: None,
        },
    );
    let mut s = vec![
        post(http, &format!("{base}/v1/chat/completions"), chat("m", &format!("n{i}"))).await,
        // The same body every round: cache hits after the first.
        post(http, &format!("{base}/v1/chat/completions"), chat("cached", "faq")).await,
        post(
            http,
            &format!("{base}/v1/chat/completions"),
            json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "s"}]}),
        )
        .await,
        post(
            http,
            &format!("{base}/v1/embeddings"),
            json!({"model": "m", "input": format!("e{i}")}),
        )
        .await,
        post(
            http,
            &format!("{base}/v1/responses"),
            json!({"model": "m", "input": "r"}),
        )
        .await,
        post(
            http,
            &format!("{base}/v1/messages"),
            json!({"model": "claude", "max_tokens": 8, "messages": [{"role": "user", "content": "m"}]}),
        )
        .await,
        post(
            http,
            &format!("{base}/v1/async/chat/completions"),
            chat("m", "job"),
        )
        .await,
        // Always failing upstream: 5xx answers.
        post(http, &format!("{base}/v1/chat/completions"), chat("broken", "x")).await,
    ];
    s.sort_unstable();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_query_returns_data_from_a_live_forwarder() {
    e2e::local::procs::install_crypto_provider();
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let mock = MockServer::start(loopback, Default::default())
        .await
        .unwrap();
    let failing = MockServer::start(
        loopback,
        forwarder::config::MockSettings {
            error_rate: 1.0,
            error_status: 503,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let yaml = format!(
        r#"
server: {{listen: "127.0.0.1:0"}}
logging: {{access_log: false}}
retry: {{base_delay: 10ms, max_delay: 50ms, max_attempts: 2}}
circuit_breaker: {{failure_threshold: 1000000}}
upstreams:
  - {{name: mock-openai, provider: openai, base_url: "{m}", models: [m, cached]}}
  - {{name: mock-anthropic, provider: anthropic, base_url: "{m}", models: [claude]}}
  - {{name: failing, provider: openai, base_url: "{f}", models: [broken]}}
cache:
  models:
    cached: {{enabled: true, ttl: 10m, cacheable: all}}
async: {{enabled: true, workers: 2}}
"#,
        m = mock.base_url(),
        f = failing.base_url(),
    );
    let cfg = forwarder::config::load_from_str(&yaml).expect("config");
    let server = forwarder::server::Server::start(cfg)
        .await
        .expect("forwarder starts");
    let base = format!("http://{}", server.addr);

    let dir = tempfile::tempdir().unwrap();
    let targets = dir.path().join("targets.json");
    std::fs::write(
        &targets,
        json!([{"targets": [server.addr.to_string()],
                "labels": {"namespace": "ai", "app_kubernetes_io_instance": "support-bot", "pod": "support-bot-0"}}])
        .to_string(),
    )
    .unwrap();
    let prom = match Prometheus::start(dir.path(), &targets, Duration::from_secs(1)).await {
        Ok(p) => p,
        Err(e) => panic!("{e:#}"),
    };

    // About eight seconds of load, scraped every second.
    let http = reqwest::Client::new();
    let began = Instant::now();
    let mut i = 0;
    let mut statuses = std::collections::BTreeMap::new();
    while began.elapsed() < Duration::from_secs(8) && i < 200 {
        for s in round(&http, &base, &mock, i).await {
            *statuses.entry(s).or_insert(0) += 1;
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    e2e::say(&format!("{i} rounds, statuses {statuses:?}"));
    assert!(
        statuses.contains_key(&200) && statuses.contains_key(&202) && statuses.contains_key(&502)
    );

    let dash = dashboard();
    let mut empty = Vec::new();
    for (title, expr) in queries(&dash) {
        if let Some((_, why)) = EXEMPT.iter().find(|(m, _)| expr.contains(m)) {
            e2e::say(&format!("skipped {title}: {why}"));
            continue;
        }
        let q = expand(&expr);
        // The last scrape may still be on its way: a few tries.
        let mut result = Value::Null;
        for _ in 0..10 {
            let r: Value = http
                .get(format!("{}/api/v1/query?query={}", prom.url, encode(&q)))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(r["status"], "success", "{title}: {q}: {r}");
            result = r["data"]["result"].clone();
            let numbers = result.as_array().unwrap().iter().any(|s| {
                s["value"][1]
                    .as_str()
                    .and_then(|v| v.parse::<f64>().ok())
                    .is_some_and(f64::is_finite)
            });
            if numbers {
                break;
            }
            result = Value::Null;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if result.is_null() {
            empty.push(format!("{title}: {q}"));
        } else {
            e2e::say(&format!("{title}: {result}"));
        }
    }
    assert!(
        empty.is_empty(),
        "panels without data:\n{}",
        empty.join("\n")
    );
    drop(prom);
    server.shutdown().await;
}
