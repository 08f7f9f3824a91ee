//! The autoscaler's loop against a real API server (envtest: etcd,
//! kube-apiserver, kube-controller-manager; a stand-in "kubelet" marks the
//! ReplicaSet's pods Ready). What the API-mocked loop test cannot show:
//! replicas applied through the real field-ownership machinery, the status
//! accepted by the real CRD schema (unknown fields would be pruned), a
//! foreign manager of `spec.replicas` (`kubectl scale deployment` through
//! `/scale`) read from real `managedFields`, and one resource with a hung
//! metrics read not holding the others.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Recorder, Reporter};
use kube::Client;
use operator::autoscale::metrics::{MetricsError, Target};
use operator::autoscale::policy::Observed;
use operator::autoscale::run::Autoscaler;
use operator::autoscale::{MetricsSource, Prometheus};
use operator::crd::ModelForwarder;
use operator::render::labels::{common, selector, FIELD_MANAGER, SCALER_FIELD_MANAGER};
use operator::telemetry::Metrics;
use serde_json::json;

const INTERVAL: Duration = Duration::from_secs(2);

async fn install_crd(client: &Client) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/modelforwarder.yaml");
    let crd: CustomResourceDefinition =
        serde_yaml::from_str(&std::fs::read_to_string(path).expect("CRD file")).expect("CRD");
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    // One control plane per test binary, and this is its only test.
    api.create(&PostParams::default(), &crd)
        .await
        .expect("creating the CRD");
    let established = |c: &CustomResourceDefinition| {
        c.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            })
    };
    wait("the CRD established", Duration::from_secs(30), || async {
        api.get("modelforwarders.llm.forwarder.dev")
            .await
            .ok()
            .filter(established)
            .map(|_| ())
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
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A ModelForwarder and its Deployment (what the reconciler would apply,
/// reduced to what the autoscaler reads).
async fn resource(client: &Client, ns: &str, name: &str, replicas: i32) {
    let mf: ModelForwarder = serde_json::from_value(json!({
        "apiVersion": "llm.forwarder.dev/v1alpha1", "kind": "ModelForwarder",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "upstreams": [{"name": "m", "provider": "mock", "models": ["mock"]}],
            "replicas": {"min": 1, "max": 10},
            "slo": {"p99LatencyMs": 500, "maxErrorRate": 0.01, "targetQpsPerReplica": 50, "ttftP99Ms": 800}
        }
    }))
    .expect("resource");
    Api::<ModelForwarder>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &mf)
        .await
        .expect("creating the ModelForwarder");
    // As the reconciler does: the Deployment without replicas under its
    // field manager, then the replicas under the scaler's.
    // The labels the reconciler puts on the Deployment and its pods (the
    // autoscaler's caches watch the managed-by label).
    let labels = common(name);
    let deployments = Api::<Deployment>::namespaced(client.clone(), ns);
    let body = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {
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

/// The kubelet's part: every pod of the namespace runs and is Ready.
fn kubelet(client: Client, ns: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let pods = Api::<Pod>::namespaced(client, &ns);
        loop {
            if let Ok(list) = pods.list(&ListParams::default()).await {
                for p in list.items {
                    let ready = p
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready"));
                    let Some(name) = p.metadata.name.filter(|_| !ready) else {
                        continue;
                    };
                    let status = json!({"status": {
                        "phase": "Running",
                        "conditions": [{"type": "Ready", "status": "True"}],
                    }});
                    let _ = pods
                        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                        .await;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

/// Metrics by resource: `busy` is loaded, `stuck` never answers (the
/// loop's own bound must cut it), `hung` goes to a Prometheus that
/// accepts connections and never answers (the query timeout must).
struct Sources {
    hung: Prometheus,
}

#[async_trait]
impl MetricsSource for Sources {
    async fn read(&self, t: &Target) -> Result<Observed, MetricsError> {
        if t.selector.contains("\"stuck\"") {
            std::future::pending::<()>().await;
        }
        if t.selector.contains("\"hung\"") {
            return self.hung.read(t).await;
        }
        let pods = t.live_pods.as_ref().map_or(0, BTreeSet::len) as u32;
        Ok(Observed {
            qps: Some(300.0),
            requests: Some(18000.0),
            p99_ms: Some(120.0),
            own_p99_ms: Some(0.5),
            streams: Some(600.0),
            ttft_p99_ms: Some(90.0),
            error_rate: Some(0.0),
            inflight: Some(12.0),
            upstream_p99_ms: Some(119.0),
            reporting: pods,
            ..Default::default()
        })
    }
}

fn condition(mf: &ModelForwarder, type_: &str) -> Option<(String, String, String)> {
    mf.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(envtest),
    ignore = "set KUBEBUILDER_ASSETS: needs a real kube-apiserver"
)]
async fn the_loop_scales_reports_conflicts_and_survives_a_hung_prometheus_on_a_real_api_server() {
    let cp = envtest::control_plane();
    let client = cp.client().await;
    install_crd(&client).await;
    let ns = cp.namespace(&client, "autoscale").await;
    for (name, replicas) in [("busy", 2), ("hung", 2), ("stuck", 2)] {
        resource(&client, &ns, name, replicas).await;
    }
    let kubelet = kubelet(client.clone(), ns.clone());

    // A "Prometheus" that accepts and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung_url = format!("http://{}", listener.local_addr().unwrap());
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((c, _)) = listener.accept().await {
            held.push(c);
        }
    });
    let metrics = Metrics::new().expect("metrics");
    let scaler = Autoscaler {
        client: client.clone(),
        namespaces: vec![ns.clone()],
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "modelforwarder-operator".into(),
                instance: None,
            },
        ),
        metrics: metrics.clone(),
        source: Arc::new(Sources {
            hung: Prometheus::new(
                prometheus_http_query::Client::try_from(hung_url.as_str()).unwrap(),
                INTERVAL / 3,
            ),
        }),
        interval: INTERVAL,
        window: Duration::from_secs(60),
        max_age: Duration::from_secs(45),
        prometheus_rules: false,
        handover: None,
    };
    let (_trigger, triggered) = tokio::sync::mpsc::channel(4);
    let started = Instant::now();
    let loop_task = tokio::spawn(scaler.run(triggered));

    let mfs = Api::<ModelForwarder>::namespaced(client.clone(), &ns);
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    let replicas = |d: &Deployment| d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);

    // The loaded resource scales 2 → 6 (300 requests/s at 50 per replica)
    // once its pods are Ready, under the autoscaler's field manager only
    // (the reconciler's bounds, which set 2, hand the field over).
    let d = wait("busy scaled to 6", Duration::from_secs(60), || async {
        deployments
            .get("busy")
            .await
            .ok()
            .filter(|d| replicas(d) == 6)
    })
    .await;
    let scaled_after = started.elapsed();
    let owners: Vec<String> = d
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| {
            m.fields_v1.as_ref().is_some_and(|f| {
                f.0.get("f:spec")
                    .and_then(|s| s.get("f:replicas"))
                    .is_some()
            })
        })
        .filter_map(|m| m.manager.clone())
        .collect();
    assert_eq!(owners, ["modelforwarder-operator-autoscaler"], "{owners:?}");
    // The status is written after the replica patch: wait for it too (on a
    // busy machine the two can be a moment apart).
    let busy = wait("busy status says 6", Duration::from_secs(10), || async {
        mfs.get("busy")
            .await
            .ok()
            .filter(|mf| mf.status.as_ref().and_then(|s| s.desired_replicas) == Some(6))
    })
    .await;
    let status = busy.status.as_ref().expect("status written");
    // The real schema kept the new status fields.
    let m = status.metrics.as_ref().expect("metrics in status");
    assert_eq!(
        (m.own_p99_latency_ms, m.ttft_p99_ms),
        (Some(0.5), Some(90.0))
    );
    assert_eq!(condition(&busy, "ScaleConflict").unwrap().0, "False");

    // The hung Prometheus: MetricsAvailable=False (QueryTimeout) within
    // one interval of the loop's start (plus the time to write it).
    let hung = wait("hung reported", Duration::from_secs(10), || async {
        mfs.get("hung")
            .await
            .ok()
            .filter(|mf| condition(mf, "MetricsAvailable").is_some())
    })
    .await;
    let (status_, reason, message) = condition(&hung, "MetricsAvailable").unwrap();
    assert_eq!(
        (status_.as_str(), reason.as_str()),
        ("False", "QueryTimeout"),
        "{message}"
    );
    let hung_deployment = deployments.get("hung").await.unwrap();
    assert_eq!(replicas(&hung_deployment), 2, "held");

    // `kubectl scale deployment busy --replicas=3`: through /scale, as
    // another field manager. The next evaluation says who.
    let pp = PatchParams {
        field_manager: Some("kubectl".into()),
        ..PatchParams::default()
    };
    deployments
        .patch_scale(
            "busy",
            &pp,
            &Patch::Merge(&json!({"spec": {"replicas": 3}})),
        )
        .await
        .expect("kubectl scale");
    let conflict = wait("ScaleConflict", Duration::from_secs(20), || async {
        mfs.get("busy")
            .await
            .ok()
            .and_then(|mf| condition(&mf, "ScaleConflict"))
            .filter(|c| c.0 == "True")
    })
    .await;
    assert!(
        conflict.2.starts_with("kubectl (/scale) also set"),
        "{conflict:?}"
    );
    // The autoscaler takes its replicas back.
    wait("busy back to 6", Duration::from_secs(20), || async {
        deployments
            .get("busy")
            .await
            .ok()
            .filter(|d| replicas(d) == 6)
    })
    .await;

    // The stuck resource never got a status, yet the loop runs: it is
    // healthy.
    assert!(mfs.get("stuck").await.unwrap().status.is_none());
    assert!(metrics.health().is_ok(), "{:?}", metrics.health());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let round_age = now - metrics.autoscaler_last_round.get();
    assert!(
        round_age <= 2 * INTERVAL.as_secs() as i64 + 1,
        "last round {round_age}s ago"
    );
    e2e::say(&format!(
        "real API server: busy scaled 2 → 6 {:.1}s after the loop started",
        scaled_after.as_secs_f64()
    ));

    loop_task.abort();
    kubelet.abort();
    holder.abort();
}
