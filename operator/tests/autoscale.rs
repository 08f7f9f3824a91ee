//! The autoscaler's requests against kube-rs's mocked API server: it reads
//! nothing (its caches hold the Deployment and pods), scales, writes the
//! status it owns only when it changed, and publishes Events.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http::{Request, Response};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::client::Body;
use kube::core::PartialObjectMeta;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{reflector, watcher};
use kube::Client;
use operator::autoscale::cache::Cluster;
use operator::autoscale::metrics::{MetricsError, Target};
use operator::autoscale::policy::Observed;
use operator::autoscale::run::Autoscaler;
use operator::autoscale::workload::policy_for;
use operator::autoscale::{Evaluator, MetricsSource};
use operator::crd::ModelForwarder;
use operator::render::labels::selector;
use operator::telemetry::Metrics;
use serde_json::{json, Value};

mod support;
use support::*;

const NS: &str = "ai";
const NAME: &str = "bot";

struct Fixed(Option<Observed>, std::sync::Mutex<Option<Target>>);

#[async_trait]
impl MetricsSource for Fixed {
    async fn read(&self, target: &Target) -> Result<Observed, MetricsError> {
        *self.1.lock().unwrap() = Some(target.clone());
        // The autoscaler passes the live pods it listed.
        assert_eq!(
            target.live_pods.as_ref().map(|p| p.len()),
            Some(2),
            "terminating pods are not live"
        );
        self.0
            .clone()
            .ok_or(MetricsError::Shape("prometheus unreachable"))
    }
}

fn resource(status: Option<Value>) -> ModelForwarder {
    let mut v = json!({
        "apiVersion": "llm.forwarder.dev/v1alpha1",
        "kind": "ModelForwarder",
        "metadata": {"name": NAME, "namespace": NS, "uid": "u-1", "generation": 2},
        "spec": {
            "upstreams": [{"name": "m", "provider": "mock", "models": ["mock"]}],
            "replicas": {"min": 1, "max": 10},
            "slo": {"p99LatencyMs": 500, "maxErrorRate": 0.01, "targetQpsPerReplica": 50}
        }
    });
    if let Some(s) = status {
        v["status"] = s;
    }
    serde_json::from_value(v).expect("valid resource")
}

/// The autoscaler's caches as its watches would fill them: the Deployment
/// (2 replicas, 2 Ready) and three pods, one of them terminating.
fn cluster() -> Cluster {
    let (deployments, mut w) = reflector::store::<Deployment>();
    let d: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": NAME, "namespace": NS},
        "spec": {"replicas": 2, "selector": {}, "template": {}},
        "status": {"replicas": 2, "readyReplicas": 2}
    }))
    .expect("deployment");
    w.apply_watcher_event(&watcher::Event::Apply(d));
    let (pods, mut w) = reflector::store::<PartialObjectMeta<Pod>>();
    for (name, deleting) in [("bot-a", false), ("bot-b", false), ("bot-old", true)] {
        let mut p = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": selector(NAME)}});
        if deleting {
            p["metadata"]["deletionTimestamp"] = json!("2026-11-24T00:00:00Z");
        }
        w.apply_watcher_event(&watcher::Event::Apply(
            serde_json::from_value(p).expect("pod metadata"),
        ));
    }
    // Another resource's pod in the namespace is not this one's.
    w.apply_watcher_event(&watcher::Event::Apply(
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "other-a", "namespace": NS, "labels": selector("other")}}))
        .expect("pod metadata"),
    ));
    let (resources, _) = reflector::store();
    Cluster::from_stores(resources, deployments, pods)
}

/// The stored resource, as the API server returns it from a status patch.
fn stored() -> Value {
    serde_json::to_value(resource(None)).expect("encode")
}

fn status_path() -> String {
    format!("/apis/llm.forwarder.dev/v1alpha1/namespaces/{NS}/modelforwarders/{NAME}/status")
}

async fn evaluate(
    mf: ModelForwarder,
    metrics: Option<Observed>,
    steps: Vec<Step>,
) -> (Vec<Seen>, Metrics) {
    let (seen, m, _) = evaluate_with_target(mf, metrics, steps).await;
    (seen, m)
}

/// Also returns what the autoscaler asked the metrics source for.
async fn evaluate_with_target(
    mf: ModelForwarder,
    metrics: Option<Observed>,
    steps: Vec<Step>,
) -> (Vec<Seen>, Metrics, Target) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let m = Metrics::new().expect("metrics");
    let source = Arc::new(Fixed(metrics, Default::default()));
    let scaler = Autoscaler {
        client: client.clone(),
        namespaces: vec![NS.into()],
        recorder: Recorder::new(
            client,
            Reporter {
                controller: "modelforwarder-operator".into(),
                instance: None,
            },
        ),
        metrics: m.clone(),
        source: source.clone(),
        interval: Duration::from_secs(15),
        window: Duration::from_secs(60),
        max_age: Duration::from_secs(45),
        prometheus_rules: false,
        handover: None,
    };
    let verifier = tokio::spawn(verify(handle, steps));
    let mut ev = Evaluator::new(policy_for(&mf.spec));
    let cluster = cluster();
    tokio::time::timeout(
        Duration::from_secs(10),
        scaler.evaluate_one(&cluster, &mf, &mut ev),
    )
    .await
    .expect("evaluation finishes")
    .expect("evaluation succeeds")
    .expect("the resource is autoscaled");
    let target = source.1.lock().unwrap().clone().expect("metrics were read");
    (verifier.await.expect("verifier"), m, target)
}

#[tokio::test]
async fn scales_the_deployment_records_status_and_explains_it() {
    let busy = Observed {
        qps: Some(300.0),
        p99_ms: Some(120.0),
        error_rate: Some(0.0),
        inflight: Some(12.0),
        upstream_p99_ms: Some(119.0),
        reporting: 2,
        ..Default::default()
    };
    let mut steps = Vec::new();
    steps.push(apply(
        format!("/apis/apps/v1/namespaces/{NS}/deployments/{NAME}"),
        "fieldManager=modelforwarder-operator-autoscaler",
        json!({}),
    ));
    steps.push(apply(
        status_path(),
        "fieldManager=modelforwarder-operator-autoscaler",
        stored(),
    ));
    steps.push(step(
        "POST",
        format!("/apis/events.k8s.io/v1/namespaces/{NS}/events"),
        Reply::Echo(json!({})),
    ));
    let (seen, metrics) = evaluate(resource(None), Some(busy), steps).await;

    assert_eq!(
        seen[0].body["spec"]["replicas"], 6,
        "2 → 6: 300 qps at 50 per replica"
    );
    let status = &seen[1].body["status"];
    assert_eq!(status["desiredReplicas"], 6);
    assert_eq!(status["metrics"]["qps"], 300.0);
    assert!(status["lastScaleReason"]
        .as_str()
        .unwrap()
        .starts_with("2 → 6 (Capacity)"));
    let cond = |t: &str| {
        status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == t)
            .unwrap()
            .clone()
    };
    assert_eq!(cond("SLOBreached")["status"], "False");
    assert_eq!(cond("MetricsAvailable")["status"], "True");
    assert_eq!(cond("UpstreamSlow")["status"], "False");
    assert_eq!(seen[2].body["reason"], "Scaled");
    assert!(metrics
        .render()
        .contains(r#"modelforwarder_scale_decisions_total{direction="up",reason="capacity"} 1"#));
}

#[tokio::test]
async fn a_slow_upstream_raises_conditions_and_events_but_does_not_scale() {
    let slow = Observed {
        qps: Some(100.0),
        p99_ms: Some(2000.0),
        error_rate: Some(0.0),
        inflight: Some(200.0),
        upstream_p99_ms: Some(1990.0),
        own_p99_ms: Some(3.0),
        requests: Some(6000.0),
        reporting: 2,
        ..Default::default()
    };
    let mut steps = Vec::new();
    steps.push(apply(
        status_path(),
        "fieldManager=modelforwarder-operator-autoscaler",
        stored(),
    ));
    steps.push(step(
        "POST",
        format!("/apis/events.k8s.io/v1/namespaces/{NS}/events"),
        Reply::Echo(json!({})),
    ));
    steps.push(step(
        "POST",
        format!("/apis/events.k8s.io/v1/namespaces/{NS}/events"),
        Reply::Echo(json!({})),
    ));
    let (seen, metrics) = evaluate(resource(None), Some(slow), steps).await;
    let status = &seen[0].body["status"];
    assert_eq!(status["desiredReplicas"], 2);
    let conds = status["conditions"].as_array().unwrap();
    let breached = conds.iter().find(|c| c["type"] == "SLOBreached").unwrap();
    assert_eq!(breached["status"], "True");
    assert_eq!(breached["message"], "P99 2000 ms > 500 ms");
    assert_eq!(
        conds.iter().find(|c| c["type"] == "UpstreamSlow").unwrap()["status"],
        "True"
    );
    assert_eq!(seen[1].body["reason"], "SLOBreached");
    assert_eq!(seen[2].body["reason"], "UpstreamSlow");
    assert!(metrics
        .render()
        .contains(r#"modelforwarder_slo_breaches_total{name="bot",namespace="ai"} 1"#));
}

#[tokio::test]
async fn prometheus_down_holds_replicas_and_says_so() {
    let previous = json!({"conditions": [{
        "type": "MetricsAvailable", "status": "True", "reason": "MetricsRead", "message": "",
        "lastTransitionTime": "2026-11-24T00:00:00Z"
    }]});
    let mut steps = Vec::new();
    steps.push(apply(
        status_path(),
        "fieldManager=modelforwarder-operator-autoscaler",
        stored(),
    ));
    steps.push(step(
        "POST",
        format!("/apis/events.k8s.io/v1/namespaces/{NS}/events"),
        Reply::Echo(json!({})),
    ));
    let (seen, _) = evaluate(resource(Some(previous)), None, steps).await;
    let status = &seen[0].body["status"];
    assert_eq!(status["desiredReplicas"], 2, "held");
    let available = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "MetricsAvailable")
        .unwrap()
        .clone();
    assert_eq!(available["status"], "False");
    assert!(available["message"]
        .as_str()
        .unwrap()
        .contains("prometheus unreachable"));
    assert_eq!(seen[1].body["reason"], "MetricsUnavailable");
}

#[tokio::test]
async fn the_resource_can_override_the_selector_and_the_rate_window() {
    let mut mf = resource(None);
    mf.spec.scaling.metrics_selector = Some(r#"job="llm",deployment="bot""#.into());
    mf.spec.scaling.rate_window_seconds = Some(120);
    let steps = vec![apply(
        status_path(),
        "fieldManager=modelforwarder-operator-autoscaler",
        stored(),
    )];
    let (_, _, target) = evaluate_with_target(mf, None, steps).await;
    assert_eq!(target.selector, r#"job="llm",deployment="bot""#);
    assert_eq!(target.window, Duration::from_secs(120));

    let steps = vec![apply(
        status_path(),
        "fieldManager=modelforwarder-operator-autoscaler",
        stored(),
    )];
    let (_, _, target) = evaluate_with_target(resource(None), None, steps).await;
    assert_eq!(
        target.selector,
        r#"namespace="ai",app_kubernetes_io_instance="bot""#
    );
    assert_eq!(target.window, Duration::from_secs(60));
}

#[tokio::test]
async fn a_steady_resource_costs_no_request_once_its_status_is_written() {
    let steady = Observed {
        qps: Some(80.0),
        p99_ms: Some(100.0),
        error_rate: Some(0.0),
        inflight: Some(4.0),
        upstream_p99_ms: Some(99.0),
        reporting: 2,
        ..Default::default()
    };
    let first = vec![apply(
        status_path(),
        "fieldManager=modelforwarder-operator-autoscaler",
        stored(),
    )];
    let (seen, _) = evaluate(resource(None), Some(steady.clone()), first).await;
    assert_eq!(seen[0].body["status"]["desiredReplicas"], 2);
    // The stored status is what was written: the same metrics again (and
    // jitter within 10%) make no request at all.
    let written = seen[0].body["status"].clone();
    let mut jitter = steady;
    jitter.qps = Some(84.0);
    let (seen, _) = evaluate(resource(Some(written)), Some(jitter), Vec::new()).await;
    assert!(seen.is_empty(), "{seen:?}");
}
