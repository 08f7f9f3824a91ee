//! The autoscaler at fleet scale on a real API server (envtest: etcd,
//! kube-apiserver, kube-controller-manager), with metrics from a Prometheus
//! stub served over HTTP on 127.0.0.1:
//!
//! - at steady state (fixed metrics) it makes no API request and writes
//!   nothing, while every resource is still evaluated at its interval;
//! - with 300 resources, one resource whose queries never answer delays
//!   only itself; with every query hung, `/healthz` stays healthy and each
//!   resource is still evaluated within its history gap limit;
//! - two decisions on one resource are two Events, each with its own note;
//! - a user's PrometheusRule named like the resource's is left alone.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Recorder, Reporter};
use kube::Client;
use operator::autoscale::run::Autoscaler;
use operator::autoscale::Prometheus;
use operator::crd::ModelForwarder;
use operator::render::labels::{common, selector, FIELD_MANAGER, SCALER_FIELD_MANAGER};
use operator::telemetry::Metrics;
use serde_json::{json, Value};

/// Only one test of this binary runs at a time: they share two cores with
/// the control plane, and the cadence checks need the CPU.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn install_crd(client: &Client) {
    static ONCE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    ONCE.get_or_init(|| async {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/modelforwarder.yaml");
        let crd: CustomResourceDefinition =
            serde_yaml::from_str(&std::fs::read_to_string(path).expect("CRD file")).expect("CRD");
        let api = Api::<CustomResourceDefinition>::all(client.clone());
        api.create(&PostParams::default(), &crd)
            .await
            .expect("creating the CRD");
        wait("the CRD established", Duration::from_secs(30), || async {
            api.get("modelforwarders.llm.forwarder.dev")
                .await
                .ok()
                .and_then(|c| c.status)
                .and_then(|s| s.conditions)
                .filter(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                })
                .map(|_| ())
        })
        .await;
        // The CRD is served a moment after it is Established.
        wait(
            "ModelForwarders served",
            Duration::from_secs(30),
            || async {
                Api::<ModelForwarder>::all(client.clone())
                    .list(&ListParams::default().limit(1))
                    .await
                    .ok()
                    .map(|_| ())
            },
        )
        .await;
    })
    .await;
}

async fn wait<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A ModelForwarder and its Deployment as the reconciler applies them
/// (labels, replicas under the scaler's field manager). `paused`: the
/// Deployment controller creates no ReplicaSet or pods for it.
async fn resource(client: &Client, ns: &str, name: &str, replicas: i32, paused: bool) {
    let mf: ModelForwarder = serde_json::from_value(json!({
        "apiVersion": "llm.forwarder.dev/v1alpha1", "kind": "ModelForwarder",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "upstreams": [{"name": "m", "provider": "mock", "models": ["mock"]}],
            "replicas": {"min": 1, "max": 10},
            "slo": {"p99LatencyMs": 500, "maxErrorRate": 0.01, "targetQpsPerReplica": 50}
        }
    }))
    .expect("resource");
    Api::<ModelForwarder>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &mf)
        .await
        .expect("creating the ModelForwarder");
    let labels = common(name);
    let deployments = Api::<Deployment>::namespaced(client.clone(), ns);
    let body = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {
            "paused": paused,
            "selector": {"matchLabels": selector(name)},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "forwarder", "image": "forwarder:test"}]}
            }
        }
    });
    deployments
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Apply(&body),
        )
        .await
        .expect("applying the Deployment");
    let body = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name}, "spec": {"replicas": replicas},
    });
    deployments
        .patch(
            name,
            &PatchParams::apply(SCALER_FIELD_MANAGER),
            &Patch::Apply(&body),
        )
        .await
        .expect("scaling the Deployment");
}

/// What the stub answers and what it saw.
#[derive(Default)]
struct Stub {
    /// Pods reporting, by resource (instance label).
    pods: Mutex<BTreeMap<String, Vec<String>>>,
    /// Requests per second per pod.
    qps_per_pod: f64,
    /// This resource's queries are never answered.
    hung: Mutex<Option<String>>,
    /// No query is answered.
    hang_all: AtomicBool,
    /// When each resource's evaluation read its metrics (the first query
    /// of a read).
    reads: Mutex<HashMap<String, Vec<Instant>>>,
}

fn instance(q: &str) -> Option<String> {
    let start = q.find("app_kubernetes_io_instance=\"")? + "app_kubernetes_io_instance=\"".len();
    let len = q[start..].find('"')?;
    Some(q[start..start + len].to_string())
}

fn vector(samples: Vec<(Option<&str>, f64)>) -> Json<Value> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let result: Vec<Value> = samples
        .into_iter()
        .map(|(pod, v)| {
            let metric = pod.map_or(json!({}), |p| json!({"pod": p}));
            json!({"metric": metric, "value": [now, v.to_string()]})
        })
        .collect();
    Json(json!({"status": "success", "data": {"resultType": "vector", "result": result}}))
}

async fn query(
    State(stub): State<Arc<Stub>>,
    Query(params): Query<HashMap<String, String>>,
) -> Json<Value> {
    let q = params.get("query").cloned().unwrap_or_default();
    let who = instance(&q).unwrap_or_default();
    let freshness = q.starts_with("min by (pod) (time() - timestamp(");
    if freshness {
        stub.reads
            .lock()
            .unwrap()
            .entry(who.clone())
            .or_default()
            .push(Instant::now());
    }
    let hung = stub.hung.lock().unwrap().as_deref() == Some(who.as_str());
    if hung || stub.hang_all.load(Ordering::Relaxed) {
        std::future::pending::<()>().await;
    }
    let pods = stub
        .pods
        .lock()
        .unwrap()
        .get(&who)
        .cloned()
        .unwrap_or_default();
    let per_pod = |v: f64| vector(pods.iter().map(|p| (Some(p.as_str()), v)).collect());
    if freshness {
        per_pod(1.0)
    } else if q.starts_with("histogram_quantile") {
        // 100 ms for every P99 (request, own, TTFT, upstream).
        vector(vec![(None, 0.1)])
    } else if q.contains("code=~\"5..\"") || q.contains("time_to_first_token") {
        per_pod(0.0)
    } else if q.contains("forwarder_requests_total") {
        per_pod(stub.qps_per_pod)
    } else {
        // In-flight requests.
        per_pod(1.0)
    }
}

/// Serves the stub on an ephemeral 127.0.0.1 port; returns its URL.
async fn serve(stub: Arc<Stub>) -> (String, tokio::task::JoinHandle<()>) {
    let app = Router::new()
        .route("/api/v1/query", get(query).post(query))
        .with_state(stub);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, task)
}

/// Requests a client made, as "METHOD path?query".
type Log = Arc<Mutex<Vec<String>>>;

#[derive(Clone)]
struct Count<S> {
    inner: S,
    log: Log,
}

impl<S> tower::Service<http::Request<kube::client::Body>> for Count<S>
where
    S: tower::Service<http::Request<kube::client::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<kube::client::Body>) -> Self::Future {
        self.log
            .lock()
            .unwrap()
            .push(format!("{} {}", req.method(), req.uri()));
        self.inner.call(req)
    }
}

/// An admin client whose every request is logged.
async fn counting_client(log: &Log) -> Client {
    let config = envtest::control_plane().config().await;
    let log = log.clone();
    kube::client::ClientBuilder::try_from(config)
        .expect("client builder")
        .with_layer(&tower::layer::layer_fn(move |inner| Count {
            inner,
            log: log.clone(),
        }))
        .build()
}

fn autoscaler(client: Client, ns: &str, url: &str, interval: Duration, m: &Metrics) -> Autoscaler {
    Autoscaler {
        client: client.clone(),
        namespaces: vec![ns.into()],
        recorder: Recorder::new(
            client,
            Reporter {
                controller: "modelforwarder-operator".into(),
                instance: None,
            },
        ),
        metrics: m.clone(),
        // As the operator's main sets it: a third of the interval at most.
        source: Arc::new(Prometheus::new(
            prometheus_http_query::Client::try_from(url).unwrap(),
            interval / 3,
        )),
        interval,
        window: Duration::from_secs(60),
        max_age: Duration::from_secs(45),
        prometheus_rules: false,
        handover: None,
    }
}

/// The largest gap between consecutive reads of one resource within
/// [from, to], counting from `from` and up to `to`.
fn max_gap(reads: &[Instant], from: Instant, to: Instant) -> Duration {
    let mut last = from;
    let mut gap = Duration::ZERO;
    for &t in reads.iter().filter(|t| **t >= from && **t <= to) {
        gap = gap.max(t - last);
        last = t;
    }
    gap.max(to - last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(envtest),
    ignore = "set KUBEBUILDER_ASSETS: needs a real kube-apiserver"
)]
async fn at_steady_state_the_autoscaler_makes_no_api_request_and_writes_nothing() {
    let _serial = SERIAL.lock().await;
    const N: usize = 5;
    const INTERVAL: Duration = Duration::from_secs(2);
    const WINDOW: Duration = Duration::from_secs(30);
    let cp = envtest::control_plane();
    let admin = cp.client().await;
    install_crd(&admin).await;
    let ns = cp.namespace(&admin, "steady").await;
    let names: Vec<String> = (0..N).map(|i| format!("steady-{i}")).collect();
    for name in &names {
        resource(&admin, &ns, name, 2, false).await;
    }
    // The kubelet's part, once: the ReplicaSets' pods run and are Ready.
    let pods = Api::<Pod>::namespaced(admin.clone(), &ns);
    let listed = wait("2 pods per resource", Duration::from_secs(60), || async {
        let l = pods.list(&ListParams::default()).await.ok()?;
        (l.items.len() == 2 * N).then_some(l.items)
    })
    .await;
    let stub = Arc::new(Stub {
        // 2 pods × 40/s = 80/s at 50 per replica: 2 replicas, steady.
        qps_per_pod: 40.0,
        ..Stub::default()
    });
    for p in &listed {
        let name = p.metadata.name.clone().unwrap();
        let status = json!({"status": {"phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}]}});
        pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .expect("pod Ready");
        let owner = instance_of(p);
        stub.pods
            .lock()
            .unwrap()
            .entry(owner)
            .or_default()
            .push(name);
    }
    let deployments = Api::<Deployment>::namespaced(admin.clone(), &ns);
    wait("Deployments Ready", Duration::from_secs(60), || async {
        let l = deployments.list(&ListParams::default()).await.ok()?;
        l.items
            .iter()
            .all(|d| d.status.as_ref().and_then(|s| s.ready_replicas) == Some(2))
            .then_some(())
    })
    .await;

    let (url, server) = serve(stub.clone()).await;
    let log: Log = Arc::default();
    let client = counting_client(&log).await;
    let metrics = Metrics::new().expect("metrics");
    let (_trigger, triggered) = tokio::sync::mpsc::channel(4);
    let task = tokio::spawn(autoscaler(client, &ns, &url, INTERVAL, &metrics).run(triggered));

    // Every resource evaluated and its status written once.
    let mfs = Api::<ModelForwarder>::namespaced(admin.clone(), &ns);
    wait("every status written", Duration::from_secs(30), || async {
        let l = mfs.list(&ListParams::default()).await.ok()?;
        l.items
            .iter()
            .all(|mf| {
                let s = mf.status.as_ref();
                s.and_then(|s| s.desired_replicas) == Some(2)
                    && s.and_then(|s| s.metrics.as_ref()).is_some()
            })
            .then_some(())
    })
    .await;
    // Two more intervals, so the first writes are back in the caches.
    tokio::time::sleep(INTERVAL * 2).await;
    let before = log.lock().unwrap().len();
    let from = Instant::now();
    tokio::time::sleep(WINDOW).await;
    let to = Instant::now();
    let during: Vec<String> = log.lock().unwrap()[before..].to_vec();
    task.abort();
    server.abort();

    let writes: Vec<&String> = during.iter().filter(|r| !r.starts_with("GET ")).collect();
    let reads = stub.reads.lock().unwrap().clone();
    let evaluations: usize = names
        .iter()
        .map(|n| {
            reads
                .get(n)
                .map_or(0, |v| v.iter().filter(|t| **t >= from && **t <= to).count())
        })
        .sum();
    e2e_say(&format!(
        "steady state, {N} resources, {WINDOW:?} at a {INTERVAL:?} interval: {evaluations} evaluations, {} API requests ({} writes): {during:?}",
        during.len(),
        writes.len()
    ));
    // The autoscaler did evaluate: every resource at its interval.
    for n in &names {
        let gap = max_gap(reads.get(n).map_or(&[][..], |v| v), from, to);
        assert!(gap <= INTERVAL * 2, "{n}: {gap:?} between evaluations");
    }
    assert!(writes.is_empty(), "writes at steady state: {writes:?}");
    // ≤ 1 request per resource per minute (watches renewing included).
    let budget = N * WINDOW.as_secs() as usize / 60;
    assert!(
        during.len() <= budget,
        "{} requests for {N} resources in {WINDOW:?} (budget {budget}): {during:?}",
        during.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(envtest),
    ignore = "set KUBEBUILDER_ASSETS: needs a real kube-apiserver"
)]
async fn with_300_resources_a_hung_query_delays_only_its_own_resource_and_the_loop_stays_live() {
    let _serial = SERIAL.lock().await;
    const N: usize = 300;
    const INTERVAL: Duration = Duration::from_secs(3);
    const PHASE: Duration = Duration::from_secs(20);
    let cp = envtest::control_plane();
    let admin = cp.client().await;
    install_crd(&admin).await;
    let ns = cp.namespace(&admin, "fleet").await;
    let names: Vec<String> = (0..N).map(|i| format!("r{i:03}")).collect();
    let created = Instant::now();
    for chunk in names.chunks(20) {
        futures::future::join_all(
            chunk
                .iter()
                .map(|name| resource(&admin, &ns, name, 1, true)),
        )
        .await;
    }
    e2e_say(&format!(
        "{N} resources created in {:.1}s",
        created.elapsed().as_secs_f64()
    ));
    let hung = "r007".to_string();
    let stub = Arc::new(Stub {
        hung: Mutex::new(Some(hung.clone())),
        ..Stub::default()
    });
    let (url, server) = serve(stub.clone()).await;
    let metrics = Metrics::new().expect("metrics");
    let (_trigger, triggered) = tokio::sync::mpsc::channel(4);
    let task =
        tokio::spawn(autoscaler(admin.clone(), &ns, &url, INTERVAL, &metrics).run(triggered));
    // Every resource read once (the first writes of 300 statuses settle).
    wait(
        "every resource evaluated",
        Duration::from_secs(60),
        || async {
            let reads = stub.reads.lock().unwrap();
            names.iter().all(|n| reads.contains_key(n)).then_some(())
        },
    )
    .await;
    tokio::time::sleep(INTERVAL * 2).await;

    // Phase 1: one resource's queries hang; the others keep their cadence.
    let from = Instant::now();
    let mut health = Vec::new();
    while from.elapsed() < PHASE {
        health.push(metrics.health());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let to = Instant::now();
    let reads = stub.reads.lock().unwrap().clone();
    let gaps: Vec<(String, Duration)> = names
        .iter()
        .map(|n| {
            (
                n.clone(),
                max_gap(reads.get(n).map_or(&[][..], |v| v), from, to),
            )
        })
        .collect();
    let worst = gaps
        .iter()
        .filter(|(n, _)| *n != hung)
        .map(|(_, g)| *g)
        .max()
        .unwrap();
    e2e_say(&format!(
        "one hung resource among {N}: the others' longest gap between evaluations {:.2}s (interval {INTERVAL:?}); the hung one's {:.2}s",
        worst.as_secs_f64(),
        gaps.iter().find(|(n, _)| *n == hung).unwrap().1.as_secs_f64()
    ));
    assert!(health.iter().all(Result::is_ok), "{health:?}");
    assert!(
        worst <= INTERVAL + INTERVAL / 2,
        "a resource waited {worst:?} between evaluations"
    );
    let mfs = Api::<ModelForwarder>::namespaced(admin.clone(), &ns);
    let reason = mfs
        .get(&hung)
        .await
        .unwrap()
        .status
        .and_then(|s| {
            s.conditions
                .into_iter()
                .find(|c| c.type_ == "MetricsAvailable")
        })
        .map(|c| c.reason);
    assert_eq!(reason.as_deref(), Some("QueryTimeout"));

    // Phase 2: every query hangs (a hung Prometheus). Each evaluation takes
    // a query timeout; the loop stays live and every resource is still
    // evaluated within its history gap limit (three intervals).
    stub.hang_all.store(true, Ordering::Relaxed);
    let from = Instant::now();
    let mut health = Vec::new();
    while from.elapsed() < PHASE {
        health.push(metrics.health());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let to = Instant::now();
    let reads = stub.reads.lock().unwrap().clone();
    let worst = names
        .iter()
        .map(|n| max_gap(reads.get(n).map_or(&[][..], |v| v), from, to))
        .max()
        .unwrap();
    e2e_say(&format!(
        "every query hung, {N} resources: longest gap between a resource's evaluations {:.2}s (limit {:?})",
        worst.as_secs_f64(),
        INTERVAL * 3
    ));
    assert!(health.iter().all(Result::is_ok), "{health:?}");
    assert!(worst <= INTERVAL * 3, "a resource waited {worst:?}");
    task.abort();
    server.abort();
}

/// The resource a pod belongs to (its instance label).
fn instance_of(p: &Pod) -> String {
    p.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("app.kubernetes.io/instance"))
        .cloned()
        .unwrap_or_default()
}

/// Prints past the test harness's capture.
fn e2e_say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(envtest),
    ignore = "set KUBEBUILDER_ASSETS: needs a real kube-apiserver"
)]
async fn two_scale_decisions_are_two_events_each_with_its_own_note() {
    use k8s_openapi::api::events::v1::Event as ApiEvent;
    use kube::runtime::events::{Event, EventType};
    use kube::Resource;
    let _serial = SERIAL.lock().await;
    let cp = envtest::control_plane();
    let admin = cp.client().await;
    install_crd(&admin).await;
    let ns = cp.namespace(&admin, "events").await;
    resource(&admin, &ns, "bot", 1, true).await;
    resource(&admin, &ns, "raw", 1, true).await;
    let mfs = Api::<ModelForwarder>::namespaced(admin.clone(), &ns);
    let recorder = Recorder::new(
        admin.clone(),
        Reporter {
            controller: "modelforwarder-operator".into(),
            instance: Some("test".into()),
        },
    );
    let notes = [
        "2 → 6 (Capacity): qps=300.0",
        "6 → 4 (ScaleDown): qps=180.0",
    ];
    let bot = mfs.get("bot").await.unwrap().object_ref(&());
    let raw = mfs.get("raw").await.unwrap().object_ref(&());
    for note in notes {
        operator::events::publish(
            &recorder,
            &bot,
            EventType::Normal,
            "Scaled",
            "Autoscale",
            note,
        )
        .await;
        // What the operator did before: one action for every decision.
        let ev = Event {
            type_: EventType::Normal,
            reason: "Scaled".into(),
            note: Some(note.into()),
            action: "Autoscale".into(),
            secondary: None,
        };
        recorder.publish(&ev, &raw).await.expect("raw event");
    }
    let events = Api::<ApiEvent>::namespaced(admin.clone(), &ns);
    let notes_of = |name: &str, all: &[ApiEvent]| -> Vec<String> {
        let mut v: Vec<String> = all
            .iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .filter_map(|e| e.note.clone())
            .collect();
        v.sort();
        v
    };
    let all = events.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(notes_of("bot", &all), notes, "both decisions readable");
    // kube-runtime's series kept only the first note for the raw ones.
    assert_eq!(notes_of("raw", &all), [notes[0]], "the old behaviour");
}

/// A minimal PrometheusRule CRD (the prometheus-operator's group, version
/// and kind; any content).
async fn install_prometheus_rule_crd(client: &Client) {
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "prometheusrules.monitoring.coreos.com"},
        "spec": {
            "group": "monitoring.coreos.com",
            "names": {"kind": "PrometheusRule", "plural": "prometheusrules",
                      "singular": "prometheusrule", "listKind": "PrometheusRuleList"},
            "scope": "Namespaced",
            "versions": [{"name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object",
                    "x-kubernetes-preserve-unknown-fields": true}}}]
        }
    }))
    .unwrap();
    Api::<CustomResourceDefinition>::all(client.clone())
        .create(&PostParams::default(), &crd)
        .await
        .expect("creating the PrometheusRule CRD");
    wait(
        "PrometheusRules served",
        Duration::from_secs(30),
        || async {
            operator::autoscale::rules::available(client)
                .await
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(envtest),
    ignore = "set KUBEBUILDER_ASSETS: needs a real kube-apiserver"
)]
async fn a_users_prometheus_rule_of_the_same_name_is_left_alone() {
    use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
    let _serial = SERIAL.lock().await;
    let cp = envtest::control_plane();
    let admin = cp.client().await;
    install_crd(&admin).await;
    // No prometheus-operator CRDs: detected (once, at start).
    assert!(!operator::autoscale::rules::available(&admin).await);
    install_prometheus_rule_crd(&admin).await;
    let ns = cp.namespace(&admin, "rules").await;
    resource(&admin, &ns, "mine", 1, true).await;
    resource(&admin, &ns, "theirs", 1, true).await;
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "monitoring.coreos.com",
        "v1",
        "PrometheusRule",
    ));
    let rules: Api<DynamicObject> = Api::namespaced_with(admin.clone(), &ns, &ar);
    let users: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
        "metadata": {"name": "theirs-slo"},
        "spec": {"groups": [{"name": "the-users-own", "rules": []}]}
    }))
    .unwrap();
    rules
        .create(&PostParams::default(), &users)
        .await
        .expect("the user's rule");

    let stub = Arc::new(Stub::default());
    let (url, server) = serve(stub).await;
    let metrics = Metrics::new().expect("metrics");
    let mut scaler = autoscaler(admin.clone(), &ns, &url, Duration::from_secs(2), &metrics);
    scaler.prometheus_rules = true;
    let (_trigger, triggered) = tokio::sync::mpsc::channel(4);
    let task = tokio::spawn(scaler.run(triggered));

    let mfs = Api::<ModelForwarder>::namespaced(admin.clone(), &ns);
    let mine_uid = mfs.get("mine").await.unwrap().metadata.uid.unwrap();
    let applied = wait("mine-slo applied", Duration::from_secs(30), || async {
        rules.get_opt("mine-slo").await.ok().flatten()
    })
    .await;
    let owner = &applied.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.uid.as_str(), owner.controller),
        (mine_uid.as_str(), Some(true))
    );
    // Applied by the autoscaler under its own field manager, apart from
    // the reconciler's.
    let managers: Vec<&str> = applied
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.as_deref())
        .collect();
    assert_eq!(
        managers,
        [operator::autoscale::workload::AUTOSCALER_FIELD_MANAGER],
        "{managers:?}"
    );
    // The conflict is reported on the resource; the user's rule is intact.
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(admin.clone(), &ns);
    let note = wait(
        "PrometheusRuleConflict Event",
        Duration::from_secs(30),
        || async {
            events
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find(|e| e.reason.as_deref() == Some("PrometheusRuleConflict"))
                .and_then(|e| e.note)
        },
    )
    .await;
    assert!(note.contains("\"theirs-slo\""), "{note}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let theirs = rules.get("theirs-slo").await.unwrap();
    assert!(theirs.metadata.owner_references.is_none(), "{theirs:?}");
    assert_eq!(
        theirs.data["spec"]["groups"][0]["name"], "the-users-own",
        "{theirs:?}"
    );
    task.abort();
    server.abort();
}
