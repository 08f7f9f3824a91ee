//! The controller wiring against a mocked API server that answers by route
//! (lists, watches, reads, applies) in whatever order the watchers ask: a
//! malformed resource in the list is reported as an Event and does not stop
//! the valid one next to it from being reconciled; a Secret appearing on the
//! Secret watch wakes the resource that was waiting for it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use kube::Client;
use operator::reconcile::Context;
use operator::telemetry::Metrics;
use serde_json::{json, Value};

type Send = tower_test::mock::SendResponse<Response<Body>>;

/// What the scripted API server knows.
#[derive(Default)]
struct World {
    seen: Mutex<Vec<(String, String, Value)>>,
    /// Whether Secret `clients` exists.
    secret: AtomicBool,
    /// `good` references Secret `clients`.
    good_uses_secret: AtomicBool,
    /// The pending watch on Secrets, to push an event into.
    secret_watch: Mutex<Option<Send>>,
}

fn good_spec(world: &World) -> Value {
    let mut spec =
        json!({"upstreams": [{"name": "local", "provider": "mock", "models": ["mock"]}]});
    if world.good_uses_secret.load(Ordering::SeqCst) {
        spec["auth"] = json!({"apiKeysSecretRef": {"name": "clients"}});
    }
    spec
}

fn clients_secret() -> Value {
    json!({"apiVersion": "v1", "kind": "Secret",
           "metadata": {"name": "clients", "namespace": "ai", "resourceVersion": "101"},
           "data": {"web": "c2stMQ=="}})
}

fn respond(send: Send, status: StatusCode, body: &[u8]) {
    send.send_response(
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(body.to_vec()))
            .expect("response"),
    );
}

fn list(kind: &str, api_version: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": api_version, "kind": format!("{kind}List"),
           "metadata": {"resourceVersion": "100"}, "items": items})
}

fn resources(world: &World) -> Value {
    let good = json!({
        "apiVersion": "llm.forwarder.dev/v1alpha1", "kind": "ModelForwarder",
        "metadata": {"name": "good", "namespace": "ai", "uid": "uid-good", "generation": 1, "resourceVersion": "10"},
        "spec": good_spec(world)
    });
    // Not a ModelForwarder any more (say, written under an older schema).
    let broken = json!({
        "apiVersion": "llm.forwarder.dev/v1alpha1", "kind": "ModelForwarder",
        "metadata": {"name": "broken", "namespace": "ai", "uid": "uid-broken", "generation": 1, "resourceVersion": "11"},
        "spec": {"upstreams": "oops"}
    });
    list(
        "ModelForwarder",
        "llm.forwarder.dev/v1alpha1",
        vec![good, broken],
    )
}

fn not_found() -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
    )
}

/// Answers one request by its route.
fn answer(
    world: &World,
    method: &str,
    path: &str,
    query: &str,
    body: &Value,
) -> (StatusCode, Value) {
    let tail = path.rsplit('/').next().unwrap_or_default();
    match (method, tail) {
        ("GET", "modelforwarders") => (StatusCode::OK, resources(world)),
        ("GET", "clients") if world.secret.load(Ordering::SeqCst) => {
            (StatusCode::OK, clients_secret())
        }
        ("GET", "deployments") => (StatusCode::OK, list("Deployment", "apps/v1", vec![])),
        ("GET", "configmaps") => (StatusCode::OK, list("ConfigMap", "v1", vec![])),
        ("GET", "services") => (StatusCode::OK, list("Service", "v1", vec![])),
        ("GET", "poddisruptionbudgets") => (
            StatusCode::OK,
            list("PodDisruptionBudget", "policy/v1", vec![]),
        ),
        ("GET", "secrets") => (StatusCode::OK, list("Secret", "v1", vec![])),
        ("GET", _) => not_found(),
        ("POST", "events") => (StatusCode::OK, body.clone()),
        ("PATCH", "status") => (
            StatusCode::OK,
            json!({"apiVersion": "llm.forwarder.dev/v1alpha1", "kind": "ModelForwarder",
                   "metadata": {"name": "good", "namespace": "ai", "uid": "uid-good"},
                   "spec": good_spec(world),
                   "status": body["status"].clone()}),
        ),
        ("PATCH", _) => {
            let mut v = body.clone();
            if v["kind"] == "Deployment" && v["spec"].get("replicas").is_none() {
                v["spec"]["replicas"] = json!(1);
            }
            (StatusCode::OK, v)
        }
        _ => panic!("unexpected {method} {path}?{query}"),
    }
}

/// Starts the scripted API server and the controller; returns the
/// controller's context and a guard that stops both.
fn start(world: Arc<World>) -> (Arc<Context>, impl Drop) {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let w = world.clone();
    let server = tokio::spawn(async move {
        // Watches are held open (never answered) so the watchers idle; the
        // one on Secrets is kept where the test can push an event into it.
        let mut watches = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            let method = req.method().to_string();
            let path = req.uri().path().to_string();
            let query = req.uri().query().unwrap_or_default().to_string();
            if query.contains("watch=true") {
                if path.ends_with("/secrets") {
                    *w.secret_watch.lock().expect("slot") = Some(send);
                } else {
                    watches.push(send);
                }
                continue;
            }
            let bytes = req.into_body().collect_bytes().await.expect("body");
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let (status, answer) = answer(&w, &method, &path, &query, &body);
            w.seen.lock().expect("log").push((method, path, body));
            respond(send, status, &serde_json::to_vec(&answer).expect("encode"));
        }
    });
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "modelforwarder-operator".into(),
                instance: None,
            },
        ),
        default_image: "ghcr.io/modelforwarder/forwarder:test".into(),
        metrics: Metrics::new().expect("metrics"),
    });
    let controller = tokio::spawn(operator::controller::run(
        client,
        Some("ai".into()),
        ctx.clone(),
    ));
    struct Stop(Vec<tokio::task::JoinHandle<()>>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.iter().for_each(|t| t.abort());
        }
    }
    (ctx, Stop(vec![controller, server]))
}

/// Waits until `cond` holds for the requests seen so far.
async fn until(world: &World, what: &str, cond: impl Fn(&[(String, String, Value)]) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        {
            let seen = world.seen.lock().expect("log");
            if cond(&seen) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; requests: {:#?}",
                seen.iter()
                    .map(|(m, p, _)| format!("{m} {p}"))
                    .collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn applied_deployment(seen: &[(String, String, Value)]) -> bool {
    seen.iter()
        .any(|(m, p, _)| m == "PATCH" && p == "/apis/apps/v1/namespaces/ai/deployments/good")
}

#[tokio::test]
async fn a_malformed_resource_is_reported_and_the_rest_still_reconcile() {
    let world = Arc::new(World::default());
    let (ctx, _stop) = start(world.clone());
    until(
        &world,
        "the InvalidObject Event and the good status",
        |seen| {
            let invalid_reported = seen.iter().any(|(m, _, b)| {
                m == "POST" && b["reason"] == "InvalidObject" && b["regarding"]["name"] == "broken"
            });
            let good_status = seen
                .iter()
                .any(|(m, p, _)| m == "PATCH" && p.ends_with("/modelforwarders/good/status"));
            invalid_reported && good_status
        },
    )
    .await;

    let seen = world.seen.lock().expect("log").clone();
    assert!(applied_deployment(&seen));
    assert!(seen
        .iter()
        .any(|(m, p, _)| m == "PATCH" && p == "/api/v1/namespaces/ai/configmaps/good-config"));
    assert!(
        !seen
            .iter()
            .any(|(m, p, _)| m == "PATCH" && p.contains("broken")),
        "nothing is written for the malformed resource"
    );
    assert_eq!(ctx.metrics.invalid_objects.get(), 1);
}

#[tokio::test]
async fn a_created_secret_unblocks_the_resource_that_waits_for_it() {
    let world = Arc::new(World::default());
    world.good_uses_secret.store(true, Ordering::SeqCst);
    let (_ctx, _stop) = start(world.clone());

    until(&world, "Degraded/SecretNotFound on good", |seen| {
        seen.iter().any(|(m, p, b)| {
            m == "PATCH"
                && p.ends_with("/modelforwarders/good/status")
                && b["status"]["conditions"]
                    .as_array()
                    .is_some_and(|cs| cs.iter().any(|c| c["reason"] == "SecretNotFound"))
        })
    })
    .await;
    assert!(
        !applied_deployment(&world.seen.lock().expect("log")),
        "blocked"
    );

    // The Secret appears: the Secret watch must wake the waiting resource.
    world.secret.store(true, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let watch = loop {
        if let Some(w) = world.secret_watch.lock().expect("slot").take() {
            break w;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no watch on Secrets"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let event = json!({"type": "ADDED", "object": clients_secret()});
    respond(watch, StatusCode::OK, format!("{event}\n").as_bytes());

    until(
        &world,
        "the Deployment applied after the Secret appeared",
        applied_deployment,
    )
    .await;
}
