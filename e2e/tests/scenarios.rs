//! End-to-end scenarios against the operator installed by its Helm chart in
//! a real cluster (e2e/kind/up.sh): the full example served over HTTP,
//! WebSocket and gRPC through its Service; a rotated client key rolling the
//! pods; garbage collection; scaling up under load and back down after the
//! stabilization window with SLO status; a chart upgrade with a resource in
//! place.
//!
//!   e2e/kind/up.sh
//!   KUBECONFIG=.tools/kind-modelforwarder.kubeconfig cargo test -p e2e --test scenarios -- --nocapture
//!
//! Without `KUBECONFIG` at build time the cluster tests are reported as
//! ignored ("needs a cluster: KUBECONFIG"); run with `--ignored` and no
//! `KUBECONFIG`, they fail.
//! With it, the chart-installed operator must be running (RELEASE,
//! RELEASE_NAMESPACE; defaults as in up.sh) and watch E2E_NAMESPACE
//! (default mf-scenarios): the tests fail, naming up.sh, if it is not.
//! Requests go through `kubectl port-forward` to the Service, so kubectl
//! must be on PATH. The scenarios share that namespace and run one at a time.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context as _};
use e2e::{cluster, say, wait_for};
use futures::{SinkExt, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::pinned_kind;
use kube::{Client, ResourceExt};
use operator::crd::ModelForwarder;
use operator::render::labels::CONFIG_HASH;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const FIELD_MANAGER: &str = "modelforwarder-e2e";
const READY: Duration = Duration::from_secs(240);
const CLIENT_KEY: &str = "sk-client-web-0123456789";

/// The scenarios share one watched namespace: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

fn namespace() -> String {
    env_or("E2E_NAMESPACE", "mf-scenarios")
}

fn forwarder_image() -> String {
    env_or("FORWARDER_IMAGE", operator::DEFAULT_FORWARDER_IMAGE)
}

fn example(name: &str) -> anyhow::Result<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// Checks the chart-installed operator is there and watches our namespace;
/// creates the namespace.
async fn setup(test: &str) -> anyhow::Result<Client> {
    let client = cluster(test).await?;
    let release = env_or("RELEASE", "modelforwarder-operator");
    let release_ns = env_or("RELEASE_NAMESPACE", "modelforwarder-system");
    let ns = namespace();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &release_ns);
    let op = deployments.get_opt(&release).await?.ok_or_else(|| {
        anyhow!(
            "no operator Deployment {release_ns}/{release}: install it with e2e/kind/up.sh \
             (or set RELEASE and RELEASE_NAMESPACE)"
        )
    })?;
    let args = op
        .spec
        .and_then(|s| s.template.spec)
        .map(|p| p.containers)
        .unwrap_or_default()
        .into_iter()
        .flat_map(|c| c.args.unwrap_or_default())
        .collect::<Vec<_>>();
    ensure!(
        args.contains(&format!("--namespace={ns}")),
        "the operator does not watch {ns} (args {args:?}): install it with e2e/kind/up.sh \
         or set E2E_NAMESPACE to the namespace it watches"
    );
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let n: Namespace = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}
    }))?;
    namespaces
        .patch(&ns, &PatchParams::apply(FIELD_MANAGER), &Patch::Apply(&n))
        .await?;
    Ok(client)
}

/// Server-side applies every document of a YAML stream into `ns`, after
/// `edit` had its say on each (as JSON).
async fn apply_yaml(
    client: &Client,
    ns: &str,
    text: &str,
    edit: impl Fn(&mut Value),
) -> anyhow::Result<()> {
    use serde::Deserialize as _;
    for doc in serde_yaml::Deserializer::from_str(text) {
        let mut v: Value = serde_json::to_value(serde_yaml::Value::deserialize(doc)?)?;
        if v.is_null() {
            continue;
        }
        edit(&mut v);
        let api_version = v["apiVersion"].as_str().unwrap_or_default().to_string();
        let kind = v["kind"].as_str().unwrap_or_default().to_string();
        let (group, version) = api_version
            .rsplit_once('/')
            .unwrap_or(("", api_version.as_str()));
        let gvk = GroupVersionKind::gvk(group, version, &kind);
        let (resource, _) = pinned_kind(client, &gvk)
            .await
            .with_context(|| format!("discovering {api_version} {kind}"))?;
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &resource);
        let obj: DynamicObject = serde_json::from_value(v)?;
        let name = obj.name_any();
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&obj),
        )
        .await
        .with_context(|| format!("applying {kind} {ns}/{name}"))?;
    }
    Ok(())
}

/// Sets the forwarder image everywhere the examples name one.
fn use_test_image(v: &mut Value) {
    let image = forwarder_image();
    if v["kind"] == "ModelForwarder" {
        v["spec"]["pod"]["image"] = json!(image);
    }
    if v["kind"] == "Deployment" {
        if let Some(cs) = v["spec"]["template"]["spec"]["containers"].as_array_mut() {
            for c in cs {
                c["image"] = json!(image);
            }
        }
    }
}

async fn condition(
    mfs: &Api<ModelForwarder>,
    name: &str,
    type_: &str,
) -> anyhow::Result<Option<(String, String)>> {
    let mf = mfs.get(name).await?;
    Ok(mf
        .status
        .into_iter()
        .flat_map(|s| s.conditions)
        .find(|c| c.type_ == type_)
        .map(|c| (c.status, c.reason)))
}

async fn wait_ready(mfs: &Api<ModelForwarder>, name: &str) -> anyhow::Result<()> {
    wait_for(&format!("{name} Ready=True"), READY, || async {
        Ok(condition(mfs, name, "Ready")
            .await?
            .filter(|(s, _)| s == "True")
            .map(|_| ()))
    })
    .await?;
    say(&format!("{name}: Ready"));
    Ok(())
}

/// `kubectl port-forward svc/<name>` to free local ports; the child dies
/// with this value.
struct PortForward {
    _child: Child,
    ports: Vec<u16>,
}

impl PortForward {
    async fn start(ns: &str, svc: &str, remote: &[u16]) -> anyhow::Result<Self> {
        let mut cmd = Command::new("kubectl");
        cmd.args(["-n", ns, "port-forward", &format!("svc/{svc}")])
            .args(remote.iter().map(|p| format!(":{p}")))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .context("running kubectl port-forward (is kubectl on PATH?)")?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut lines = BufReader::new(stdout).lines();
        let mut ports = vec![0u16; remote.len()];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        // "Forwarding from 127.0.0.1:43567 -> 8080"
        while ports.contains(&0) {
            let line = tokio::time::timeout_at(deadline, lines.next_line())
                .await
                .context("kubectl port-forward did not start in 30s")??
                .ok_or_else(|| anyhow!("kubectl port-forward exited"))?;
            if let Some(rest) = line.strip_prefix("Forwarding from 127.0.0.1:") {
                let (local, remote_port) = rest
                    .split_once(" -> ")
                    .ok_or_else(|| anyhow!("unexpected: {line}"))?;
                let remote_port: u16 = remote_port.trim().parse()?;
                if let Some(i) = remote.iter().position(|p| *p == remote_port) {
                    ports[i] = local.parse()?;
                }
            }
        }
        // Keep draining stdout so kubectl never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            _child: child,
            ports,
        })
    }
}

fn http() -> anyhow::Result<reqwest::Client> {
    // reqwest is built without a default TLS crypto provider in this
    // workspace; install one (plain-HTTP requests still need it).
    let _ = rustls::crypto::ring::default_provider().install_default();
    Ok(reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?)
}

/// POST /api/v1/message; the status and body.
async fn message(
    http: &reqwest::Client,
    port: u16,
    key: &str,
    model: &str,
) -> anyhow::Result<(u16, Value)> {
    let r = http
        .post(format!("http://127.0.0.1:{port}/api/v1/message"))
        .bearer_auth(key)
        .json(&json!({"model_id": model, "prompt": "hello from e2e"}))
        .send()
        .await?;
    let status = r.status().as_u16();
    Ok((status, r.json().await.unwrap_or(Value::Null)))
}

async fn check_http(port: u16) -> anyhow::Result<()> {
    let http = http()?;
    // Through the forwarder to the standalone mock-llm Deployment (openai provider).
    let (status, body) = message(&http, port, CLIENT_KEY, "qwen-max").await?;
    ensure!(status == 200, "HTTP qwen-max: {status} {body}");
    ensure!(
        body["reply"].as_str().is_some_and(|r| !r.is_empty()),
        "no reply: {body}"
    );
    // The in-process mock model, OpenAI-compatible endpoint, streamed.
    let r = http
        .post(format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .bearer_auth(CLIENT_KEY)
        .json(&json!({"model": "mock", "stream": true,
                      "messages": [{"role": "user", "content": "stream please"}]}))
        .send()
        .await?;
    ensure!(r.status() == 200, "SSE: {}", r.status());
    let text = r.text().await?;
    ensure!(
        text.trim_end().ends_with("data: [DONE]"),
        "stream did not end with [DONE]: {text}"
    );
    // No key: 401 in the OpenAI error shape.
    let r = http
        .post(format!("http://127.0.0.1:{port}/api/v1/message"))
        .json(&json!({"model_id": "mock", "prompt": "x"}))
        .send()
        .await?;
    ensure!(r.status() == 401, "without a key: {}", r.status());
    say("HTTP: simple API to the upstream, OpenAI SSE stream, 401 without a key");
    Ok(())
}

async fn check_websocket(port: u16) -> anyhow::Result<()> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let mut req = format!("ws://127.0.0.1:{port}/api/v1/ws").into_client_request()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {CLIENT_KEY}").parse()?);
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .context("WebSocket upgrade")?;
    ws.send(Message::text(
        json!({"type": "request", "id": "r1", "model": "qwen-max", "prompt": "hi", "stream": true})
            .to_string(),
    ))
    .await?;
    let mut deltas = 0;
    let done = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(frame) = ws.next().await {
            let Message::Text(t) = frame? else { continue };
            let v: Value = serde_json::from_str(t.as_str())?;
            match v["type"].as_str() {
                Some("delta") => deltas += 1,
                Some("done") => return Ok(v),
                Some("error") => bail!("error frame: {v}"),
                _ => {}
            }
        }
        bail!("connection closed before done")
    })
    .await
    .context("no done frame in 60s")??;
    ensure!(
        done["id"] == "r1" && deltas > 0,
        "done {done} after {deltas} deltas"
    );
    let _ = ws.close(None).await;
    say(&format!("WebSocket: streamed {deltas} deltas and done"));
    Ok(())
}

async fn check_grpc(port: u16) -> anyhow::Result<()> {
    use forwarder::frontends::grpc::pb::forwarder_client::ForwarderClient;
    use forwarder::frontends::grpc::pb::ForwardRequest;
    let mut client = ForwarderClient::connect(format!("http://127.0.0.1:{port}")).await?;
    let mut req = tonic::Request::new(ForwardRequest {
        model_id: "qwen-max".into(),
        prompt: "hi over grpc".into(),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {CLIENT_KEY}").parse()?);
    let reply = client.forward(req).await?.into_inner();
    ensure!(!reply.reply.is_empty(), "empty gRPC reply");
    let unauthenticated = client
        .forward(ForwardRequest {
            model_id: "mock".into(),
            prompt: "x".into(),
            ..Default::default()
        })
        .await
        .err()
        .ok_or_else(|| anyhow!("gRPC without a key succeeded"))?;
    ensure!(
        unauthenticated.code() == tonic::Code::Unauthenticated,
        "{unauthenticated:?}"
    );
    say("gRPC: Forward to the upstream, UNAUTHENTICATED without a key");
    Ok(())
}

fn pod_hash(d: &Deployment) -> Option<String> {
    d.spec
        .as_ref()?
        .template
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
        .get(CONFIG_HASH)
        .cloned()
}

/// The Deployment's rollout of its current template is complete.
fn rolled_out(d: &Deployment) -> bool {
    let (Some(spec), Some(status)) = (&d.spec, &d.status) else {
        return false;
    };
    let want = spec.replicas.unwrap_or(1);
    status.observed_generation == d.metadata.generation
        && status.updated_replicas == Some(want)
        && status.available_replicas == Some(want)
        && status.replicas == Some(want)
}

async fn delete_all(client: &Client, ns: &str) -> anyhow::Result<()> {
    let mfs: Api<ModelForwarder> = Api::namespaced(client.clone(), ns);
    for mf in mfs.list(&ListParams::default()).await? {
        mfs.delete(&mf.name_any(), &DeleteParams::background())
            .await?;
    }
    Ok(())
}

#[tokio::test]
#[cfg_attr(not(cluster), ignore = "needs a cluster: KUBECONFIG")]
async fn full_example_serves_all_protocols_rolls_on_key_change_and_is_collected(
) -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let test = "full_example_serves_all_protocols_rolls_on_key_change_and_is_collected";
    let client = setup(test).await?;
    let ns = namespace();
    delete_all(&client, &ns).await?;
    let mfs: Api<ModelForwarder> = Api::namespaced(client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);

    apply_yaml(&client, &ns, &example("mock-llm.yaml")?, use_test_image).await?;
    apply_yaml(&client, &ns, &example("full.yaml")?, use_test_image).await?;
    wait_for("mock-llm rolled out", READY, || async {
        Ok(rolled_out(&deployments.get("mock-llm").await?).then_some(()))
    })
    .await?;
    wait_ready(&mfs, "support-bot").await?;
    wait_for("support-bot pods rolled out", READY, || async {
        Ok(rolled_out(&deployments.get("support-bot").await?).then_some(()))
    })
    .await?;

    {
        let pf = PortForward::start(&ns, "support-bot", &[8080, 9090]).await?;
        check_http(pf.ports[0]).await?;
        check_websocket(pf.ports[0]).await?;
        check_grpc(pf.ports[1]).await?;
    }

    // Rotate the client key: a new pod template, a finished rollout, the new
    // key accepted and the old one refused.
    let before = pod_hash(&deployments.get("support-bot").await?)
        .ok_or_else(|| anyhow!("no config hash"))?;
    let rotated: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "support-bot-clients"},
        "stringData": {"web-frontend": "sk-client-web-rotated-42", "batch-jobs": "sk-client-batch-0123456789"}
    }))?;
    secrets
        .patch(
            "support-bot-clients",
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&rotated),
        )
        .await?;
    wait_for(
        "a new pod template after the key rotation",
        READY,
        || async {
            let d = deployments.get("support-bot").await?;
            Ok(pod_hash(&d).filter(|h| *h != before).map(|_| ()))
        },
    )
    .await?;
    wait_for("the rollout after the key rotation", READY, || async {
        Ok(rolled_out(&deployments.get("support-bot").await?).then_some(()))
    })
    .await?;
    {
        let pf = PortForward::start(&ns, "support-bot", &[8080]).await?;
        let http = http()?;
        let (new, body) = message(&http, pf.ports[0], "sk-client-web-rotated-42", "mock").await?;
        ensure!(new == 200, "rotated key refused: {new} {body}");
        let (old, _) = message(&http, pf.ports[0], CLIENT_KEY, "mock").await?;
        ensure!(old == 401, "old key still accepted: {old}");
    }
    say("key rotation rolled the pods; new key accepted, old refused");

    // Delete: everything it owned is garbage-collected.
    mfs.delete("support-bot", &DeleteParams::foreground())
        .await?;
    wait_for("garbage collection", READY, || async {
        let gone = deployments.get_opt("support-bot").await?.is_none()
            && services.get_opt("support-bot").await?.is_none()
            && config_maps.get_opt("support-bot-config").await?.is_none()
            && mfs.get_opt("support-bot").await?.is_none();
        Ok(gone.then_some(()))
    })
    .await?;
    say("deleted: owned objects garbage-collected");
    Ok(())
}

/// Drives `qps` requests per second through a port-forward until `stop`.
async fn drive_load(port: u16, qps: u32, stop: tokio::sync::watch::Receiver<bool>) -> (u64, u64) {
    let Ok(http) = http() else { return (0, 0) };
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(qps.max(1))));
    let (ok, failed) = (
        std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0)),
        std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0)),
    );
    while !*stop.borrow() {
        tick.tick().await;
        let (http, ok, failed) = (http.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            // No auth on this resource: the key is ignored.
            let good = message(&http, port, "unused", "qwen-max")
                .await
                .is_ok_and(|(s, _)| s == 200);
            let counter = if good { &ok } else { &failed };
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        });
    }
    (
        ok.load(std::sync::atomic::Ordering::Relaxed),
        failed.load(std::sync::atomic::Ordering::Relaxed),
    )
}

#[tokio::test]
#[cfg_attr(not(cluster), ignore = "needs a cluster: KUBECONFIG")]
async fn scales_up_under_load_reports_slo_and_scales_down_after_the_window() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let test = "scales_up_under_load_reports_slo_and_scales_down_after_the_window";
    let client = setup(test).await?;
    let ns = namespace();
    delete_all(&client, &ns).await?;
    let mfs: Api<ModelForwarder> = Api::namespaced(client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    // 5 requests/s per replica and a P99 target of 50 ms that the mock
    // LLM's 200 ms latency (examples/mock-llm.yaml) breaks: 40 requests/s
    // wants 8 replicas (capped at 4) and breaches the SLO.
    apply_yaml(&client, &ns, &example("mock-llm.yaml")?, use_test_image).await?;
    let mf = json!({
        "apiVersion": "llm.forwarder.dev/v1alpha1", "kind": "ModelForwarder",
        "metadata": {"name": "scale-bot"},
        "spec": {
            "upstreams": [{"name": "mock-llm", "provider": "openai",
                           "baseUrl": "http://mock-llm:8081/v1", "models": ["qwen-max"]}],
            "replicas": {"min": 1, "max": 4},
            "slo": {"p99LatencyMs": 50, "maxErrorRate": 0.01, "targetQpsPerReplica": 5},
            "scaling": {"scaleDownStabilizationSeconds": 60, "maxScaleUpStep": 4},
            "pod": {"image": forwarder_image()}
        }
    });
    apply_yaml(&client, &ns, &serde_yaml::to_string(&mf)?, |_| {}).await?;
    wait_ready(&mfs, "scale-bot").await?;
    let pf = PortForward::start(&ns, "scale-bot", &[8080]).await?;
    let port = pf.ports[0];

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(drive_load(port, 40, stop_rx));
    let up = wait_for(
        "replicas above min under load",
        Duration::from_secs(300),
        || async {
            let d = deployments.get("scale-bot").await?;
            Ok(d.spec.and_then(|s| s.replicas).filter(|r| *r > 1))
        },
    )
    .await;
    let status = wait_for(
        "status metrics and SLOBreached",
        Duration::from_secs(180),
        || async {
            let mf = mfs.get("scale-bot").await?;
            let Some(s) = mf.status else { return Ok(None) };
            let breached = s
                .conditions
                .iter()
                .any(|c| c.type_ == "SLOBreached" && c.status == "True");
            let metrics = s.metrics.is_some();
            let available = s
                .conditions
                .iter()
                .any(|c| c.type_ == "MetricsAvailable" && c.status == "True");
            Ok((breached && metrics && available && s.desired_replicas.is_some()).then_some(s))
        },
    )
    .await;
    stop_tx.send(true)?;
    let (ok, failed) = load.await?;
    say(&format!("load: {ok} answered, {failed} failed"));
    let up = up?;
    let status = status?;
    say(&format!(
        "scaled up to {up}; desiredReplicas {:?}, lastScaleReason {:?}",
        status.desired_replicas, status.last_scale_reason
    ));
    ensure!(
        status.last_scale_reason.is_some() && status.last_scale_time.is_some(),
        "no lastScaleReason/lastScaleTime after scaling"
    );
    drop(pf);

    // The breach also went metric → alert → webhook: Prometheus (rules from
    // the chart, `for: 30s` in up.sh) fired, Alertmanager posted to the
    // operator's /alerts, which counted it.
    let release = env_or("RELEASE", "modelforwarder-operator");
    let release_ns = env_or("RELEASE_NAMESPACE", "modelforwarder-system");
    let op = PortForward::start(&release_ns, &release, &[8080]).await?;
    let http = http()?;
    let alerts = wait_for(
        "an Alertmanager alert at the operator's webhook",
        Duration::from_secs(240),
        || async {
            let text = http
                .get(format!("http://127.0.0.1:{}/metrics", op.ports[0]))
                .send()
                .await?
                .text()
                .await?;
            let received: f64 = text
                .lines()
                .filter(|l| l.starts_with("modelforwarder_operator_alerts_total"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            Ok((received > 0.0).then_some(received))
        },
    )
    .await?;
    say(&format!(
        "the operator's webhook received {alerts} alert(s)"
    ));
    drop(op);

    // No load: back to min only after the stabilization window (60 s).
    let stopped = tokio::time::Instant::now();
    wait_for(
        "replicas back to min after the window",
        Duration::from_secs(420),
        || async {
            let d = deployments.get("scale-bot").await?;
            Ok(d.spec.and_then(|s| s.replicas).filter(|r| *r == 1))
        },
    )
    .await?;
    let after = stopped.elapsed();
    ensure!(
        after >= Duration::from_secs(55),
        "scaled down after {after:?}, inside the 60 s stabilization window"
    );
    say(&format!(
        "scaled back to min {after:?} after the load stopped"
    ));
    mfs.delete("scale-bot", &DeleteParams::background()).await?;
    Ok(())
}

#[tokio::test]
#[cfg_attr(not(cluster), ignore = "needs a cluster: KUBECONFIG")]
async fn chart_upgrade_keeps_resources_running_and_reconciled() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let test = "chart_upgrade_keeps_resources_running_and_reconciled";
    let client = setup(test).await?;
    let ns = namespace();
    delete_all(&client, &ns).await?;
    let release = env_or("RELEASE", "modelforwarder-operator");
    let release_ns = env_or("RELEASE_NAMESPACE", "modelforwarder-system");
    let helm = env_or("HELM", "helm");
    let mfs: Api<ModelForwarder> = Api::namespaced(client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let op_deployments: Api<Deployment> = Api::namespaced(client.clone(), &release_ns);

    apply_yaml(&client, &ns, &example("minimal.yaml")?, use_test_image).await?;
    let name = mfs
        .list(&ListParams::default())
        .await?
        .items
        .first()
        .map(|m| m.name_any())
        .ok_or_else(|| anyhow!("examples/minimal.yaml created no ModelForwarder"))?;
    wait_ready(&mfs, &name).await?;
    let before = deployments.get(&name).await?;
    let hash = pod_hash(&before).ok_or_else(|| anyhow!("no config hash"))?;

    // Upgrade the release in place (a pod annotation forces new operator pods).
    let chart =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/modelforwarder-operator");
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let out = Command::new(&helm)
        .args(["upgrade", &release])
        .arg(&chart)
        .args([
            "--namespace",
            &release_ns,
            "--reuse-values",
            "--wait",
            "--timeout",
            "180s",
        ])
        .args(["--set", &format!("podAnnotations.e2e-upgrade=\"{stamp}\"")])
        .output()
        .await
        .with_context(|| format!("running {helm} (set HELM)"))?;
    ensure!(
        out.status.success(),
        "helm upgrade failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("the upgraded operator rolled out", READY, || async {
        Ok(rolled_out(&op_deployments.get(&release).await?).then_some(()))
    })
    .await?;
    say("chart upgraded, operator rolled out");

    // The resource kept running, untouched by the upgrade.
    wait_ready(&mfs, &name).await?;
    let after = deployments.get(&name).await?;
    ensure!(
        pod_hash(&after).as_deref() == Some(hash.as_str()),
        "the upgrade rolled the forwarder pods"
    );
    // …and the new operator still reconciles it.
    mfs.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"retry": {"maxAttempts": 4}}})),
    )
    .await?;
    wait_for(
        "the new operator to reconcile a spec change",
        READY,
        || async {
            let d = deployments.get(&name).await?;
            Ok(pod_hash(&d).filter(|h| *h != hash).map(|_| ()))
        },
    )
    .await?;
    say("the upgraded operator reconciles the existing resource");
    mfs.delete(&name, &DeleteParams::background()).await?;
    Ok(())
}

// --- the scenario's clients, proven locally ---------------------------------

/// A binary built next to this test (target/<profile>/<name>).
fn sibling_binary(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .ok_or_else(|| anyhow!("unexpected test path {}", exe.display()))?;
    let bin = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    ensure!(
        bin.is_file(),
        "{} is missing: build it with `cargo build -p forwarder --bin forwarder` \
         (`cargo test --workspace` does)",
        bin.display()
    );
    Ok(bin)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn local_process(bin: &std::path::Path, args: &[&str]) -> anyhow::Result<Child> {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    // FORWARDER_* variables are config overrides: keep the caller's out.
    for (k, _) in std::env::vars() {
        if k.starts_with("FORWARDER_") {
            cmd.env_remove(k);
        }
    }
    Ok(cmd.spawn()?)
}

async fn wait_http_ok(url: &str) -> anyhow::Result<()> {
    let http = http()?;
    wait_for(url, Duration::from_secs(30), || async {
        Ok(http
            .get(url)
            .send()
            .await
            .ok()
            .filter(|r| r.status().is_success())
            .map(|_| ()))
    })
    .await
}

/// Runs this file's HTTP, WebSocket and gRPC checks against a local
/// forwarder set up like the full example (client keys, a `mock-llm`
/// upstream for qwen-max, the in-process mock, gRPC on): the cluster
/// scenario's clients are exercised on every CI run, not only on kind.
#[tokio::test]
async fn scenario_clients_pass_against_a_local_forwarder_like_the_full_example(
) -> anyhow::Result<()> {
    let forwarder = sibling_binary("forwarder")?;
    let dir = std::env::temp_dir().join(format!("mf-scenario-local-{}", std::process::id()));
    let keys = dir.join("client-keys");
    std::fs::create_dir_all(&keys)?;
    std::fs::write(keys.join("web-frontend"), CLIENT_KEY)?;
    let (mock_port, http_port, grpc_port) = (free_port()?, free_port()?, free_port()?);
    let config = dir.join("forwarder.yaml");
    std::fs::write(
        &config,
        format!(
            "server: {{listen: \"127.0.0.1:{http_port}\"}}\n\
             auth: {{api_keys_file: \"{}\"}}\n\
             grpc: {{enabled: true, listen: \"127.0.0.1:{grpc_port}\"}}\n\
             logging: {{access_log: false}}\n\
             upstreams:\n\
             \x20 - {{name: primary, provider: openai, base_url: \"http://127.0.0.1:{mock_port}/v1\", models: [qwen-max]}}\n\
             \x20 - {{name: local, provider: mock, models: [mock]}}\n",
            keys.display()
        ),
    )?;
    let mock_listen = format!("127.0.0.1:{mock_port}");
    let _mock = local_process(
        &forwarder,
        &["mock-llm", "--listen", &mock_listen, "--latency", "5ms"],
    )?;
    let _fwd = local_process(
        &forwarder,
        &["serve", "--config", config.to_str().unwrap_or_default()],
    )?;
    wait_http_ok(&format!("http://127.0.0.1:{mock_port}/healthz")).await?;
    wait_http_ok(&format!("http://127.0.0.1:{http_port}/readyz")).await?;

    let result = async {
        check_http(http_port).await?;
        check_websocket(http_port).await?;
        check_grpc(grpc_port).await
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}
