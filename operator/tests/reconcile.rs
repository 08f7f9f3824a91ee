//! Reconcile tests against kube-rs's mocked API server: each test lists the
//! exact requests the reconciler must make, in order, with the answers; the
//! verifier fails on any other request or a missing one.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use kube::core::error_boundary::InvalidObject;
use kube::core::{DeserializeGuard, ObjectMeta};
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use kube::Client;
use operator::crd::ModelForwarder;
use operator::reconcile::{error_policy, reconcile, Context, Error, RESYNC, RETRY};
use operator::telemetry::Metrics;
use serde_json::{json, Value};

mod support;
use support::*;

const NS: &str = "ai";
const NAME: &str = "bot";
const UID: &str = "0b5e7f5c-0000-4000-8000-000000000001";

fn context(client: Client) -> Arc<Context> {
    Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(
            client,
            Reporter {
                controller: "modelforwarder-operator".into(),
                instance: None,
            },
        ),
        default_image: "ghcr.io/modelforwarder/forwarder:test".into(),
        metrics: Metrics::new().expect("metrics"),
    })
}

/// Runs one reconciliation of `obj` against the scripted API server.
async fn run(
    obj: DeserializeGuard<ModelForwarder>,
    steps: Vec<Step>,
) -> (Action, Vec<Seen>, Arc<Context>) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context(Client::new(svc, "default"));
    let verifier = tokio::spawn(verify(handle, steps));
    let action = tokio::time::timeout(
        Duration::from_secs(10),
        reconcile(Arc::new(obj), ctx.clone()),
    )
    .await
    .expect("reconcile finishes")
    .expect("reconcile succeeds");
    let seen = verifier.await.expect("verifier");
    (action, seen, ctx)
}

fn resource(status: Option<Value>) -> ModelForwarder {
    resource_with_min(2, status)
}

fn resource_with_min(min: i32, status: Option<Value>) -> ModelForwarder {
    let mut v = json!({
        "apiVersion": "llm.forwarder.dev/v1alpha1",
        "kind": "ModelForwarder",
        "metadata": {"name": NAME, "namespace": NS, "uid": UID, "generation": 3, "resourceVersion": "41"},
        "spec": {
            "protocols": ["http", "grpc"],
            "upstreams": [{
                "name": "primary", "provider": "openai", "baseUrl": "https://llm.internal/v1",
                "models": ["qwen-max"], "apiKeySecretRef": {"name": "llm-keys", "key": "primary"}
            }],
            "auth": {"apiKeysSecretRef": {"name": "clients"}},
            "replicas": {"min": min, "max": 5}
        }
    });
    if let Some(s) = status {
        v["status"] = s;
    }
    serde_json::from_value(v).expect("valid resource")
}

/// The stored resource, as the API server returns it from a status patch.
fn stored() -> Value {
    serde_json::to_value(resource(None)).expect("encode")
}

fn secret(name: &str, keys: &[&str], rv: &str) -> Value {
    let data: serde_json::Map<String, Value> = keys
        .iter()
        .map(|k| (k.to_string(), json!("c2VjcmV0")))
        .collect();
    json!({"apiVersion": "v1", "kind": "Secret",
           "metadata": {"name": name, "namespace": NS, "resourceVersion": rv}, "data": data})
}

fn core(path: &str) -> String {
    format!("/api/v1/namespaces/{NS}/{path}")
}
fn apps(path: &str) -> String {
    format!("/apis/apps/v1/namespaces/{NS}/{path}")
}
fn policy(path: &str) -> String {
    format!("/apis/policy/v1/namespaces/{NS}/{path}")
}
fn status_path() -> String {
    format!("/apis/llm.forwarder.dev/v1alpha1/namespaces/{NS}/modelforwarders/{NAME}/status")
}
fn events_path() -> String {
    format!("/apis/events.k8s.io/v1/namespaces/{NS}/events")
}

/// The reads every reconciliation of [`resource`] starts with.
fn reads(clients: Reply, keys: Reply, dep: Reply, cm: Reply, svc: Reply, pdb: Reply) -> Vec<Step> {
    vec![
        step("GET", core("secrets/clients"), clients),
        step("GET", core("secrets/llm-keys"), keys),
        step("GET", apps("deployments/bot"), dep),
        step("GET", core("configmaps/bot-config"), cm),
        step("GET", core("services/bot"), svc),
        step("GET", policy("poddisruptionbudgets/bot"), pdb),
    ]
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .unwrap_or_else(|| panic!("condition {type_} in {status}"))
}

fn owned_by_resource(obj: &Value) {
    let refs = &obj["metadata"]["ownerReferences"];
    assert_eq!(refs[0]["uid"], UID, "{obj}");
    assert_eq!(refs[0]["kind"], "ModelForwarder");
    assert_eq!(refs[0]["controller"], true);
}

/// The first reconciliation of a new resource: what it must write.
async fn create() -> (Action, Vec<Seen>) {
    let mut steps = reads(
        Reply::Json(secret("clients", &["alice"], "100")),
        Reply::Json(secret("llm-keys", &["primary"], "200")),
        Reply::NotFound,
        Reply::NotFound,
        Reply::NotFound,
        Reply::NotFound,
    );
    steps.extend([
        apply(
            core("configmaps/bot-config"),
            "fieldManager=modelforwarder-operator",
            json!({}),
        ),
        apply(
            core("services/bot"),
            "fieldManager=modelforwarder-operator",
            json!({}),
        ),
        apply(
            policy("poddisruptionbudgets/bot"),
            "fieldManager=modelforwarder-operator",
            json!({}),
        ),
        // The API server defaults an unset replica count to 1.
        apply(
            apps("deployments/bot"),
            "fieldManager=modelforwarder-operator",
            json!({"spec": {"replicas": 1}}),
        ),
        apply(
            apps("deployments/bot"),
            "fieldManager=modelforwarder-operator-scaler",
            json!({}),
        ),
        step("POST", events_path(), Reply::Echo(json!({}))),
        step("POST", events_path(), Reply::Echo(json!({}))),
        apply(
            status_path(),
            "fieldManager=modelforwarder-operator",
            stored(),
        ),
    ]);
    let (action, seen, _) = run(DeserializeGuard(Ok(resource(None))), steps).await;
    (action, seen)
}

#[tokio::test]
async fn new_resource_applies_every_object_scales_to_min_and_reports() {
    let (action, seen) = create().await;
    assert_eq!(action, Action::requeue(RESYNC));

    let cm = &seen[6].body;
    owned_by_resource(cm);
    let config = cm["data"]["config.yaml"].as_str().expect("config text");
    let loaded = forwarder_config::load_from_str(config).expect("the forwarder accepts the config");
    assert_eq!(loaded.server.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(
        loaded.upstreams[0].base_url.as_deref(),
        Some("https://llm.internal/v1")
    );

    let svc = &seen[7].body;
    owned_by_resource(svc);
    let ports: Vec<&str> = svc["spec"]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(ports, vec!["http", "grpc"]);

    owned_by_resource(&seen[8].body);

    let dep = &seen[9].body;
    owned_by_resource(dep);
    assert!(
        dep["spec"].get("replicas").is_none(),
        "replicas never in the main apply: {dep}"
    );
    let tmpl = &dep["spec"]["template"];
    assert!(tmpl["metadata"]["annotations"]["llm.forwarder.dev/config-hash"].is_string());
    assert_eq!(
        tmpl["spec"]["containers"][0]["image"],
        "ghcr.io/modelforwarder/forwarder:test"
    );

    let scale = &seen[10].body;
    assert_eq!(
        scale["spec"],
        json!({"replicas": 2}),
        "the scaler owns only replicas"
    );

    assert_eq!(seen[11].body["reason"], "Applied");
    assert_eq!(seen[11].body["type"], "Normal");
    assert_eq!(seen[12].body["reason"], "Scaled");

    let status = &seen[13].body["status"];
    assert_eq!(status["observedGeneration"], 3);
    assert_eq!(condition(status, "Degraded")["status"], "False");
    assert_eq!(condition(status, "Progressing")["status"], "True");
    assert_eq!(condition(status, "Ready")["status"], "False");
    assert_eq!(
        status["selector"],
        "app.kubernetes.io/instance=bot,app.kubernetes.io/name=forwarder"
    );
}

#[tokio::test]
async fn unchanged_resource_writes_nothing_and_hand_edits_are_undone() {
    // Objects as the first reconciliation applied them, now healthy.
    let (_, first) = create().await;
    let mut dep = first[9].body.clone();
    merge(
        &mut dep,
        &json!({
            "metadata": {"generation": 1},
            "spec": {"replicas": 2},
            "status": {"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2,
                       "readyReplicas": 2, "availableReplicas": 2}
        }),
    );
    let existing = || {
        reads(
            Reply::Json(secret("clients", &["alice"], "100")),
            Reply::Json(secret("llm-keys", &["primary"], "200")),
            Reply::Json(dep.clone()),
            Reply::Json(first[6].body.clone()),
            Reply::Json(first[7].body.clone()),
            Reply::Json(first[8].body.clone()),
        )
    };

    // The pods became ready since the stored status: only the status moves.
    let stale = first[13].body["status"].clone();
    let mut steps = existing();
    steps.push(apply(
        status_path(),
        "fieldManager=modelforwarder-operator",
        stored(),
    ));
    let (_, seen, _) = run(DeserializeGuard(Ok(resource(Some(stale)))), steps).await;
    let current = seen[6].body["status"].clone();
    assert_eq!(condition(&current, "Ready")["status"], "True");
    assert_eq!(
        condition(&current, "Progressing")["reason"],
        "RolloutComplete"
    );

    // Nothing changed at all: reads only, not a single write.
    let (action, seen, _) = run(
        DeserializeGuard(Ok(resource(Some(current.clone())))),
        existing(),
    )
    .await;
    assert_eq!(action, Action::requeue(RESYNC));
    assert!(seen.iter().all(|s| s.method == "GET"), "{seen:?}");

    // A hand edit to the ConfigMap (annotation untouched) is put back.
    let mut edited = first[6].body.clone();
    edited["data"]["config.yaml"] = json!("server: {listen: 0.0.0.0:1}\n");
    let mut steps = existing();
    steps[3] = step("GET", core("configmaps/bot-config"), Reply::Json(edited));
    steps.extend([
        apply(
            core("configmaps/bot-config"),
            "fieldManager=modelforwarder-operator",
            json!({}),
        ),
        step("POST", events_path(), Reply::Echo(json!({}))),
    ]);
    let (_, seen, _) = run(DeserializeGuard(Ok(resource(Some(current)))), steps).await;
    assert_eq!(seen[6].body["data"], first[6].body["data"], "restored");
    assert_eq!(seen[7].body["note"], "applied ConfigMap bot-config");
}

#[tokio::test]
async fn missing_secret_degrades_and_waits_without_applying() {
    let mut steps = reads(
        Reply::NotFound,
        Reply::Json(secret("llm-keys", &["other"], "200")),
        Reply::NotFound,
        Reply::NotFound,
        Reply::NotFound,
        Reply::NotFound,
    );
    steps.extend([
        step("POST", events_path(), Reply::Echo(json!({}))),
        apply(
            status_path(),
            "fieldManager=modelforwarder-operator",
            stored(),
        ),
    ]);
    let (action, seen, _) = run(DeserializeGuard(Ok(resource(None))), steps).await;
    assert_eq!(
        action,
        Action::await_change(),
        "wait for a change, do not retry in a loop"
    );

    let event = &seen[6].body;
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "SecretNotFound");
    let status = &seen[7].body["status"];
    let degraded = condition(status, "Degraded");
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "SecretNotFound");
    let msg = degraded["message"].as_str().expect("message");
    assert!(
        msg.contains("\"clients\"") && msg.contains("spec.auth.apiKeysSecretRef"),
        "{msg}"
    );
    assert!(msg.contains("has no key \"primary\""), "{msg}");
    assert_eq!(condition(status, "Progressing")["reason"], "Blocked");
}

#[tokio::test]
async fn rejected_apply_degrades_and_waits_instead_of_looping() {
    let mut steps = reads(
        Reply::Json(secret("clients", &["alice"], "100")),
        Reply::Json(secret("llm-keys", &["primary"], "200")),
        Reply::NotFound,
        Reply::NotFound,
        Reply::NotFound,
        Reply::NotFound,
    );
    let rejection =
        "Deployment.apps \"bot\" is invalid: spec.template.metadata.labels: Invalid value: \"a b\"";
    steps.extend([
        apply(
            core("configmaps/bot-config"),
            "fieldManager=modelforwarder-operator",
            json!({}),
        ),
        apply(
            core("services/bot"),
            "fieldManager=modelforwarder-operator",
            json!({}),
        ),
        apply(
            policy("poddisruptionbudgets/bot"),
            "fieldManager=modelforwarder-operator",
            json!({}),
        ),
        Step {
            method: "PATCH",
            path: apps("deployments/bot"),
            query: vec!["fieldManager=modelforwarder-operator"],
            reply: Reply::Invalid(rejection),
        },
        step("POST", events_path(), Reply::Echo(json!({}))),
        step("POST", events_path(), Reply::Echo(json!({}))),
        apply(
            status_path(),
            "fieldManager=modelforwarder-operator",
            stored(),
        ),
    ]);
    let (action, seen, _) = run(DeserializeGuard(Ok(resource(None))), steps).await;
    assert_eq!(action, Action::await_change());
    assert_eq!(
        seen[10].body["reason"], "Applied",
        "the writes that did happen are reported"
    );
    assert_eq!(seen[11].body["type"], "Warning");
    assert_eq!(seen[11].body["reason"], "ApplyRejected");
    let degraded = condition(&seen[12].body["status"], "Degraded").clone();
    assert_eq!(degraded["reason"], "ApplyRejected");
    assert!(degraded["message"]
        .as_str()
        .unwrap_or_default()
        .contains("spec.template.metadata.labels"));
}

#[tokio::test]
async fn foreign_object_of_the_same_name_is_not_taken_over() {
    let foreign = json!({"apiVersion": "v1", "kind": "Service",
                         "metadata": {"name": NAME, "namespace": NS, "resourceVersion": "5"}});
    let mut steps = reads(
        Reply::Json(secret("clients", &["alice"], "100")),
        Reply::Json(secret("llm-keys", &["primary"], "200")),
        Reply::NotFound,
        Reply::NotFound,
        Reply::Json(foreign),
        Reply::NotFound,
    );
    steps.extend([
        step("POST", events_path(), Reply::Echo(json!({}))),
        apply(
            status_path(),
            "fieldManager=modelforwarder-operator",
            stored(),
        ),
    ]);
    let (action, seen, _) = run(DeserializeGuard(Ok(resource(None))), steps).await;
    assert_eq!(action, Action::await_change());
    assert_eq!(seen[6].body["reason"], "NameConflict");
    let degraded = condition(&seen[7].body["status"], "Degraded").clone();
    assert_eq!(degraded["reason"], "NameConflict");
    assert!(degraded["message"]
        .as_str()
        .unwrap_or_default()
        .contains("Service \"bot\""));
}

#[tokio::test]
async fn single_replica_needs_no_pdb_and_leaves_a_foreign_one_alone() {
    let foreign = json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                         "metadata": {"name": NAME, "namespace": NS, "resourceVersion": "5"}});
    let mut steps = reads(
        Reply::Json(secret("clients", &["alice"], "100")),
        Reply::Json(secret("llm-keys", &["primary"], "200")),
        Reply::NotFound,
        Reply::NotFound,
        Reply::NotFound,
        Reply::Json(foreign),
    );
    steps.extend([
        apply(
            core("configmaps/bot-config"),
            "fieldManager=modelforwarder-operator",
            json!({}),
        ),
        apply(
            core("services/bot"),
            "fieldManager=modelforwarder-operator",
            json!({}),
        ),
        apply(
            apps("deployments/bot"),
            "fieldManager=modelforwarder-operator",
            json!({"spec": {"replicas": 1}}),
        ),
        step("POST", events_path(), Reply::Echo(json!({}))),
        apply(
            status_path(),
            "fieldManager=modelforwarder-operator",
            stored(),
        ),
    ]);
    let (action, seen, _) = run(DeserializeGuard(Ok(resource_with_min(1, None))), steps).await;
    assert_eq!(action, Action::requeue(RESYNC));
    assert_eq!(
        seen[9].body["note"],
        "applied ConfigMap bot-config, applied Service bot, applied Deployment bot"
    );
    assert_eq!(
        condition(&seen[10].body["status"], "Degraded")["status"],
        "False"
    );
}

#[tokio::test]
async fn deleted_resource_makes_no_requests() {
    let mut mf = resource(None);
    mf.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        jiff::Timestamp::from_second(1_700_000_000).expect("time"),
    ));
    // Owner references let the garbage collector delete the objects.
    let (action, seen, _) = run(DeserializeGuard(Ok(mf)), Vec::new()).await;
    assert_eq!(action, Action::await_change());
    assert!(seen.is_empty());
}

#[tokio::test]
async fn undeserialisable_object_is_reported_not_fatal() {
    let invalid = InvalidObject {
        error: "spec.upstreams: invalid type: string \"x\", expected a sequence".into(),
        metadata: ObjectMeta {
            name: Some(NAME.into()),
            namespace: Some(NS.into()),
            uid: Some(UID.into()),
            ..ObjectMeta::default()
        },
    };
    let steps = vec![step("POST", events_path(), Reply::Echo(json!({})))];
    let (action, seen, ctx) = run(DeserializeGuard(Err(invalid)), steps).await;
    assert_eq!(action, Action::await_change());
    assert_eq!(seen[0].body["reason"], "InvalidObject");
    assert_eq!(seen[0].body["regarding"]["name"], NAME);
    assert_eq!(ctx.metrics.invalid_objects.get(), 1);
}

#[tokio::test]
async fn failed_reconcile_is_retried_counted_and_reported() {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context(Client::new(svc, "default"));
    let verifier = tokio::spawn(verify(
        handle,
        vec![step("POST", events_path(), Reply::Echo(json!({})))],
    ));
    let obj = Arc::new(DeserializeGuard(Ok(resource(None))));
    let action = error_policy(obj, &Error::MissingField("metadata.uid"), ctx.clone());
    assert_eq!(action, Action::requeue(RETRY));
    let seen = verifier.await.expect("verifier");
    assert_eq!(seen[0].body["type"], "Warning");
    assert_eq!(seen[0].body["reason"], "ReconcileFailed");
    assert_eq!(
        ctx.metrics
            .errors
            .with_label_values(&["missing_field"])
            .get(),
        1
    );
}
