//! The reconcile burst bench (run on demand): the operator binary in its
//! own process against a real control plane (envtest), and this process
//! as the measuring client. It creates `SCALE_N` ModelForwarders as fast
//! as the API server takes them (32 creates in flight) while watching
//! them, and prints, for each resource, the time from its create's answer
//! to the first status the operator wrote for its generation (P50, P99,
//! max), the time from the last create to all reconciled, the operator's
//! own API requests per resource (from its `/metrics`) and its RSS.
//!
//! ```sh
//! cargo build --release -p operator --bin operator
//! KUBEBUILDER_ASSETS=$PWD/target/k8s-bin OPERATOR_BIN=$PWD/target/release/operator SCALE_N=100 \
//!   cargo test -p operator --test scale_bench -- --ignored --nocapture
//! ```

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use operator::crd::ModelForwarder;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn install_crd(client: &Client) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/modelforwarder.yaml");
    let crd: CustomResourceDefinition =
        serde_yaml::from_str(&std::fs::read_to_string(path).expect("CRD file")).expect("CRD");
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    api.create(&PostParams::default(), &crd)
        .await
        .expect("creating the CRD");
    let deadline = Instant::now() + Duration::from_secs(30);
    while Api::<ModelForwarder>::all(client.clone())
        .list(&kube::api::ListParams::default().limit(1))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "CRD not served");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `GET path` on 127.0.0.1:port; the body.
async fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

/// The operator's non-watch API requests so far, from its `/metrics`.
async fn operator_requests(port: u16) -> u64 {
    let text = http_get(port, "/metrics").await.expect("operator /metrics");
    text.lines()
        .filter(|l| l.starts_with("modelforwarder_operator_api_requests_total{"))
        .filter(|l| !l.contains("method=\"watch\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn rss_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// CPU seconds a process has used (user + system), from `/proc/<pid>/stat`.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces): utime is the 12th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let f: Vec<u64> = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    f.iter().sum::<u64>() as f64 / ticks_per_sec()
}

/// CPU seconds the whole machine was busy (every core: not idle, not
/// waiting on I/O), from `/proc/stat`.
fn machine_busy_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (v.iter().take(8).sum::<u64>() - idle) as f64 / ticks_per_sec()
}

/// USER_HZ: 100 on every Linux this runs on.
fn ticks_per_sec() -> f64 {
    100.0
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "scale bench, run on demand (needs KUBEBUILDER_ASSETS; see the module doc)"]
async fn reconcile_burst() {
    let n: usize = std::env::var("SCALE_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let bin =
        std::env::var("OPERATOR_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_operator").into());
    let cp = envtest::control_plane();
    let admin = cp.client().await;
    install_crd(&admin).await;
    let ns = cp.namespace(&admin, "bench").await;

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut op = tokio::process::Command::new(&bin)
        .args([
            format!("--namespace={ns}"),
            "--leader-election=false".into(),
            format!("--metrics-addr=127.0.0.1:{port}"),
            "--log-format=text".into(),
        ])
        .env("KUBECONFIG", &cp.kubeconfig)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {bin}: {e}"));
    let pid = op.id().expect("operator pid");
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(port, "/metrics").await.is_none() {
        assert!(
            Instant::now() < deadline,
            "the operator did not serve /metrics"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its watches listed (an empty namespace) before the burst.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The first status for each resource's generation, as watched.
    let reconciled: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let seen = reconciled.clone();
    let api: Api<ModelForwarder> = Api::namespaced(admin.clone(), &ns);
    let watch = tokio::spawn(
        watcher(api.clone(), watcher::Config::default())
            .applied_objects()
            .for_each(move |mf| {
                if let Ok(mf) = mf {
                    let current = mf.status.as_ref().and_then(|s| s.observed_generation)
                        == mf.metadata.generation;
                    if current {
                        seen.lock()
                            .unwrap()
                            .entry(mf.name_any())
                            .or_insert_with(Instant::now);
                    }
                }
                futures::future::ready(())
            }),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    let requests_before = operator_requests(port).await;
    let (cpu_before, busy_before) = (cpu_secs(pid), machine_busy_secs());
    let started = Instant::now();
    let created: Vec<(String, Instant)> = futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            let ns = ns.clone();
            async move {
                let name = format!("mf-{i}");
                let mf: ModelForwarder = serde_json::from_value(json!({
                    "apiVersion": "llm.forwarder.dev/v1alpha1", "kind": "ModelForwarder",
                    "metadata": {"name": name, "namespace": ns},
                    "spec": {
                        "protocols": ["http"],
                        "upstreams": [{"name": "local", "provider": "mock", "models": ["mock"]}],
                        "replicas": {"min": 1, "max": 3}
                    }
                }))
                .expect("resource");
                api.create(&PostParams::default(), &mf)
                    .await
                    .expect("create");
                (name, Instant::now())
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let last_create = Instant::now();
    let creating = started.elapsed();
    let deadline = last_create + Duration::from_secs(300);
    loop {
        let done = reconciled.lock().unwrap().len();
        if done == n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{done}/{n} reconciled 300 s after the last create"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all_after = reconciled
        .lock()
        .unwrap()
        .values()
        .max()
        .unwrap()
        .saturating_duration_since(last_create);
    let requests = operator_requests(port).await - requests_before;
    // How much of the machine the operator used: the rest went to etcd, the
    // API server, the controller manager and this client.
    let (cpu, busy) = (
        cpu_secs(pid) - cpu_before,
        machine_busy_secs() - busy_before,
    );
    let (rss, hwm) = (rss_kb(pid, "VmRSS:"), rss_kb(pid, "VmHWM:"));
    let times = reconciled.lock().unwrap().clone();
    let mut latencies: Vec<Duration> = created
        .iter()
        .map(|(name, at)| times[name].saturating_duration_since(*at))
        .collect();
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "N={n} creates {:.1}s | creation → first reconcile P50 {:.0} ms, P99 {:.0} ms, max {:.0} ms | last create → all reconciled {:.0} ms | operator API requests {requests} ({:.1}/resource) | operator RSS {:.1} MB (peak {:.1} MB) | operator CPU {cpu:.1} s of {busy:.1} s the machine was busy | {bin}",
        creating.as_secs_f64(),
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
        ms(*latencies.last().unwrap()),
        ms(all_after),
        requests as f64 / n as f64,
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0,
    );
    watch.abort();
    let _ = op.kill().await;
}
