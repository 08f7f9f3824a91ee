//! Behaviour tests on a real API server (envtest: etcd, kube-apiserver and
//! kube-controller-manager, started once for this test binary). Each test
//! works in its own namespace and checks what the server ends up holding,
//! not which requests were made in which order.
//!
//! Without `KUBEBUILDER_ASSETS` these tests are reported as ignored.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, ResourceQuota, Secret, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::core::DeserializeGuard;
use kube::runtime::events::{Recorder, Reporter};
use kube::{Client, ResourceExt};
use operator::crd::ModelForwarder;
use operator::reconcile::{error_policy, reconcile, Context, Error};
use operator::render::labels::{CONFIG_HASH, FIELD_MANAGER, SCALER_FIELD_MANAGER};
use operator::telemetry::Metrics;
use serde_json::{json, Value};

/// Requests a client made: (method, path and query).
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<(String, String)>>>);

impl Log {
    fn take(&self) -> Vec<(String, String)> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
    /// Requests that change something (not GET, LIST or WATCH).
    fn writes(&self) -> Vec<(String, String)> {
        self.take()
            .into_iter()
            .filter(|(m, _)| m != "GET")
            .collect()
    }
}

/// An admin client that records its requests, and fails them all while
/// `broken` is set (an operator cut off from the API server).
async fn recording_client(log: &Log, broken: Arc<AtomicBool>) -> Client {
    let config = envtest::control_plane().config().await;
    let log = log.clone();
    let layer = tower::filter::FilterLayer::new(
        move |req: http::Request<kube::client::Body>| -> Result<_, tower::BoxError> {
            if broken.load(Ordering::SeqCst) {
                return Err("cut off from the API server".into());
            }
            let uri = req.uri();
            let path = match uri.query() {
                Some(q) => format!("{}?{q}", uri.path()),
                None => uri.path().to_string(),
            };
            log.0.lock().unwrap().push((req.method().to_string(), path));
            Ok(req)
        },
    );
    kube::client::ClientBuilder::try_from(config)
        .expect("client builder")
        .with_layer(&layer)
        .build()
}

fn context(client: Client) -> Arc<Context> {
    Arc::new(Context::new(
        client.clone(),
        Recorder::new(
            client,
            Reporter {
                controller: "modelforwarder-operator".into(),
                instance: None,
            },
        ),
        "ghcr.io/modelforwarder/forwarder:test".into(),
        Metrics::new().expect("metrics"),
    ))
}

/// The admin client, a fresh namespace, and the CRD installed (from the
/// same generator as `crds/modelforwarder.yaml`).
async fn setup(prefix: &str) -> (Client, String) {
    let cp = envtest::control_plane();
    let client = cp.client().await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd: CustomResourceDefinition =
        serde_yaml::from_str(&operator::crdgen::render().expect("crd")).expect("crd yaml");
    let name = crd.name_any();
    crds.patch(
        &name,
        &PatchParams::apply("envtest").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("install CRD");
    wait("CRD established", Duration::from_secs(30), || async {
        crds.get(&name).await.ok().is_some_and(|c| {
            c.status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        })
    })
    .await;
    let ns = cp.namespace(&client, prefix).await;
    (client, ns)
}

async fn wait<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn spec(min: i32, max: i32) -> Value {
    json!({
        "protocols": ["http"],
        "upstreams": [{"name": "local", "provider": "mock", "models": ["mock"]}],
        "replicas": {"min": min, "max": max}
    })
}

async fn create(client: &Client, ns: &str, name: &str, spec: Value) -> ModelForwarder {
    let api: Api<ModelForwarder> = Api::namespaced(client.clone(), ns);
    let mf: ModelForwarder = serde_json::from_value(json!({
        "apiVersion": "llm.forwarder.dev/v1alpha1",
        "kind": "ModelForwarder",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }))
    .expect("resource");
    api.create(&PostParams::default(), &mf)
        .await
        .expect("create ModelForwarder")
}

async fn fetch(client: &Client, ns: &str, name: &str) -> ModelForwarder {
    Api::<ModelForwarder>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .expect("get ModelForwarder")
}

/// One reconcile of the stored resource, as the controller would run it.
async fn reconcile_stored(
    ctx: &Arc<Context>,
    client: &Client,
    ns: &str,
    name: &str,
) -> Result<kube::runtime::controller::Action, Error> {
    let mf = fetch(client, ns, name).await;
    reconcile(Arc::new(DeserializeGuard(Ok(mf))), ctx.clone()).await
}

fn condition(mf: &ModelForwarder, type_: &str) -> Option<(String, String, String)> {
    mf.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn managers_of_replicas(dep: &Deployment) -> Vec<String> {
    dep.metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| {
            m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0.pointer("/f:spec/f:replicas").is_some())
        })
        .filter_map(|m| m.manager.clone())
        .collect()
}

#[tokio::test]
#[cfg_attr(
    not(envtest),
    ignore = "set KUBEBUILDER_ASSETS: needs a real kube-apiserver"
)]
async fn a_new_resource_gets_owned_children_and_an_unchanged_one_costs_no_writes() {
    let (admin, ns) = setup("create").await;
    let log = Log::default();
    let client = recording_client(&log, Arc::default()).await;
    let ctx = context(client.clone());
    let mf = create(&admin, &ns, "bot", spec(2, 5)).await;
    let uid = mf.uid().expect("uid");

    reconcile_stored(&ctx, &admin, &ns, "bot")
        .await
        .expect("reconcile");
    let writes = log.writes();
    assert!(
        writes.iter().filter(|(m, _)| m == "PATCH").count() >= 5,
        "applies every child, scales and writes status: {writes:?}"
    );

    let owned = |meta: &kube::api::ObjectMeta| {
        let refs = meta.owner_references.clone().unwrap_or_default();
        assert_eq!(refs.len(), 1, "{:?}: one owner", meta.name);
        assert_eq!(refs[0].uid, uid);
        assert_eq!(refs[0].kind, "ModelForwarder");
        assert_eq!(refs[0].controller, Some(true));
    };
    let dep = Api::<Deployment>::namespaced(admin.clone(), &ns)
        .get("bot")
        .await
        .expect("Deployment");
    owned(&dep.metadata);
    assert_eq!(
        dep.spec.as_ref().and_then(|s| s.replicas),
        Some(2),
        "scaled to min"
    );
    let cm = Api::<ConfigMap>::namespaced(admin.clone(), &ns)
        .get(&operator::render::config_map_name("bot"))
        .await
        .expect("ConfigMap");
    owned(&cm.metadata);
    owned(
        &Api::<Service>::namespaced(admin.clone(), &ns)
            .get("bot")
            .await
            .expect("Service")
            .metadata,
    );
    owned(
        &Api::<PodDisruptionBudget>::namespaced(admin.clone(), &ns)
            .get("bot")
            .await
            .expect("PDB")
            .metadata,
    );
    let stored = fetch(&admin, &ns, "bot").await;
    let status = stored.status.as_ref().expect("status written");
    assert_eq!(status.observed_generation, stored.metadata.generation);
    assert!(condition(&stored, "Ready").is_some());

    // Again: no child is applied twice. The Deployment controller may still
    // be filling in the Deployment's status, which the resource's status
    // reflects; once it has settled, a reconcile writes nothing at all.
    reconcile_stored(&ctx, &admin, &ns, "bot")
        .await
        .expect("reconcile");
    let writes = log.writes();
    assert!(
        writes.iter().all(|(_, p)| p.contains("/modelforwarders/")),
        "second reconcile touched children: {writes:?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    reconcile_stored(&ctx, &admin, &ns, "bot")
        .await
        .expect("reconcile");
    log.take();
    reconcile_stored(&ctx, &admin, &ns, "bot")
        .await
        .expect("reconcile");
    assert_eq!(
        log.writes(),
        vec![],
        "a settled, unchanged resource costs no write"
    );
}

#[tokio::test]
#[cfg_attr(
    not(envtest),
    ignore = "set KUBEBUILDER_ASSETS: needs a real kube-apiserver"
)]
async fn hand_edits_are_repaired_and_replicas_belong_to_the_scaler() {
    let (admin, ns) = setup("drift").await;
    let ctx = context(admin.clone());
    create(&admin, &ns, "bot", spec(2, 5)).await;
    reconcile_stored(&ctx, &admin, &ns, "bot")
        .await
        .expect("reconcile");
    let deps: Api<Deployment> = Api::namespaced(admin.clone(), &ns);
    let before = deps.get("bot").await.expect("Deployment");
    assert_eq!(
        managers_of_replicas(&before),
        vec![SCALER_FIELD_MANAGER.to_string()]
    );

    // kubectl edit: another image, an extra env var; and a replica count
    // within bounds set by someone else (an autoscaler).
    deps.patch(
        "bot",
        &PatchParams::default(),
        &Patch::Strategic(
            json!({"spec": {"replicas": 3, "template": {"spec": {"containers": [
                {"name": "forwarder", "image": "evil:latest"}
            ]}}}}),
        ),
    )
    .await
    .expect("hand edit");
    reconcile_stored(&ctx, &admin, &ns, "bot")
        .await
        .expect("reconcile");
    let after = deps.get("bot").await.expect("Deployment");
    let image = |d: &Deployment| {
        d.spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
            .image
            .clone()
    };
    assert_eq!(image(&after), image(&before), "drift repaired");
    assert_eq!(
        after.spec.as_ref().and_then(|s| s.replicas),
        Some(3),
        "a count within [min, max] is left to whoever scales"
    );
    // The reconciler's own apply never claims spec.replicas.
    assert!(!managers_of_replicas(&after).contains(&FIELD_MANAGER.to_string()));

    // Out of bounds: the scaler's field manager brings it back.
    deps.patch(
        "bot",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 9}})),
    )
    .await
    .expect("scale out of bounds");
    reconcile_stored(&ctx, &admin, &ns, "bot")
        .await
        .expect("reconcile");
    let clamped = deps.get("bot").await.expect("Deployment");
    assert_eq!(clamped.spec.as_ref().and_then(|s| s.replicas), Some(5));
    assert!(managers_of_replicas(&clamped).contains(&SCALER_FIELD_MANAGER.to_string()));
}

#[tokio::test]
#[cfg_attr(
    not(envtest),
    ignore = "set KUBEBUILDER_ASSETS: needs a real kube-apiserver"
)]
async fn conditions_from_two_writers_are_merged() {
    let (admin, ns) = setup("conditions").await;
    let ctx = context(admin.clone());
    create(&admin, &ns, "bot", spec(1, 3)).await;
    reconcile_stored(&ctx, &admin, &ns, "bot")
        .await
        .expect("reconcile");
    let api: Api<ModelForwarder> = Api::namespaced(admin.clone(), &ns);
    // The autoscaler's condition, under its own field manager.
    api.patch_status(
        "bot",
        &PatchParams::apply("modelforwarder-operator-autoscaler").force(),
        &Patch::Apply(json!({
            "apiVersion": "llm.forwarder.dev/v1alpha1", "kind": "ModelForwarder",
            "status": {"conditions": [{"type": "SLOBreached", "status": "False", "reason": "WithinSLO",
                                       "message": "p99 within the SLO", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
        })),
    )
    .await
    .expect("autoscaler status");
    // A spec change: the operator writes its status again.
    api.patch(
        "bot",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": {"max": 4}}})),
    )
    .await
    .unwrap();
    reconcile_stored(&ctx, &admin, &ns, "bot")
        .await
        .expect("reconcile");
    let mf = fetch(&admin, &ns, "bot").await;
    assert_eq!(
        mf.status.as_ref().and_then(|s| s.observed_generation),
        mf.metadata.generation,
        "the operator wrote its status"
    );
    assert!(
        condition(&mf, "Ready").is_some(),
        "the operator's conditions"
    );
    assert_eq!(
        condition(&mf, "SLOBreached").map(|c| c.1),
        Some("WithinSLO".to_string()),
        "the autoscaler's condition survives the operator's status apply"
    );
}

#[tokio::test]
#[cfg_attr(
    not(envtest),
    ignore = "set KUBEBUILDER_ASSETS: needs a real kube-apiserver"
)]
async fn the_pdb_follows_the_replica_count() {
    let (admin, ns) = setup("pdb").await;
    let ctx = context(admin.clone());
    create(&admin, &ns, "bot", spec(1, 5)).await;
    reconcile_stored(&ctx, &admin, &ns, "bot")
        .await
        .expect("reconcile");
    let deps: Api<Deployment> = Api::namespaced(admin.clone(), &ns);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(admin.clone(), &ns);
    assert!(
        pdbs.get_opt("bot").await.unwrap().is_none(),
        "one replica: no PDB"
    );
    // Scaled out (by the autoscaler, say): protected, although min is 1.
    let scale = |n: i32| {
        let deps = deps.clone();
        async move {
            deps.patch(
                "bot",
                &PatchParams::apply("modelforwarder-operator-autoscaler").force(),
                &Patch::Apply(
                    json!({"apiVersion": "apps/v1", "kind": "Deployment", "spec": {"replicas": n}}),
                ),
            )
            .await
            .expect("scale")
        }
    };
    scale(3).await;
    reconcile_stored(&ctx, &admin, &ns, "bot")
        .await
        .expect("reconcile");
    assert!(
        pdbs.get_opt("bot").await.unwrap().is_some(),
        "three replicas: a PDB"
    );
    scale(1).await;
    reconcile_stored(&ctx, &admin, &ns, "bot")
        .await
        .expect("reconcile");
    assert!(
        pdbs.get_opt("bot").await.unwrap().is_none(),
        "back to one: no PDB"
    );
}

#[tokio::test]
#[cfg_attr(
    not(envtest),
    ignore = "set KUBEBUILDER_ASSETS: needs a real kube-apiserver"
)]
async fn the_scale_subresource_pins_and_unpins_the_count() {
    let (admin, ns) = setup("scale").await;
    let ctx = context(admin.clone());
    let api: Api<ModelForwarder> = Api::namespaced(admin.clone(), &ns);
    create(&admin, &ns, "bot", spec(1, 5)).await;
    reconcile_stored(&ctx, &admin, &ns, "bot")
        .await
        .expect("reconcile");

    // Without `desired` the API server has no spec replicas to show: /scale
    // answers an error naming the field (pin with `kubectl patch` first).
    let err = api.get_scale("bot").await.expect_err("nothing pinned");
    assert!(err.to_string().contains(".spec.replicas.desired"), "{err}");

    // Pinned: kubectl scale mf/bot --replicas=4 works through /scale.
    api.patch(
        "bot",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": {"desired": 2}}})),
    )
    .await
    .expect("pin");
    let scale = api.get_scale("bot").await.expect("GET /scale");
    assert_eq!(scale.spec.and_then(|s| s.replicas), Some(2));
    assert!(
        scale
            .status
            .and_then(|s| s.selector)
            .is_some_and(|s| s.contains("bot")),
        "the selector of the pods, for kubectl and HPA"
    );
    api.patch_scale(
        "bot",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 4}})),
    )
    .await
    .expect("PATCH /scale");
    let mf = fetch(&admin, &ns, "bot").await;
    assert_eq!(mf.spec.replicas.desired, Some(4));
    reconcile_stored(&ctx, &admin, &ns, "bot")
        .await
        .expect("reconcile");
    let deps: Api<Deployment> = Api::namespaced(admin.clone(), &ns);
    assert_eq!(
        deps.get("bot").await.unwrap().spec.and_then(|s| s.replicas),
        Some(4)
    );

    // Beyond max: refused by the CEL rule behind /scale too.
    let err = api
        .patch_scale(
            "bot",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 9}})),
        )
        .await
        .expect_err("desired above max");
    assert!(err.to_string().contains("desired must lie within"), "{err}");

    // Unpinned: the count stays where it is (within bounds).
    api.patch(
        "bot",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": {"desired": null}}})),
    )
    .await
    .expect("unpin");
    reconcile_stored(&ctx, &admin, &ns, "bot")
        .await
        .expect("reconcile");
    assert_eq!(
        deps.get("bot").await.unwrap().spec.and_then(|s| s.replicas),
        Some(4)
    );
}

#[tokio::test]
#[cfg_attr(
    not(envtest),
    ignore = "set KUBEBUILDER_ASSETS: needs a real kube-apiserver"
)]
async fn the_schema_and_cel_rules_refuse_invalid_resources() {
    let (admin, ns) = setup("cel").await;
    let api: Api<ModelForwarder> = Api::namespaced(admin.clone(), &ns);
    let attempt = |name: &'static str, spec: Value| {
        let api = api.clone();
        let ns = ns.clone();
        async move {
            let body = json!({
                "apiVersion": "llm.forwarder.dev/v1alpha1", "kind": "ModelForwarder",
                "metadata": {"name": name, "namespace": ns}, "spec": spec,
            });
            let mf: ModelForwarder = serde_json::from_value(body).expect("typed");
            api.create(&PostParams::default(), &mf).await
        }
    };
    let refused = |r: Result<ModelForwarder, kube::Error>, want: &str| match r {
        Ok(_) => panic!("accepted; expected a refusal mentioning {want:?}"),
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 422, "{s:?}");
            assert!(s.message.contains(want), "{want:?} not in {:?}", s.message);
        }
        Err(e) => panic!("{e}"),
    };
    refused(attempt("a", spec(5, 2)).await, "min must not exceed max");
    let mut s = spec(1, 3);
    s["replicas"]["desired"] = json!(7);
    refused(attempt("b", s).await, "desired must lie within");
    let mut s = spec(1, 3);
    s["upstreams"] = json!([{"name": "x", "provider": "openai", "models": ["m"]}]);
    refused(attempt("c", s).await, "baseUrl is required");
    refused(attempt("Bad_Name", spec(1, 2)).await, "DNS-1035");
    // The quantity case: refused when written, not at every apply.
    let mut s = spec(1, 2);
    s["pod"] = json!({"resources": {"limits": {"cpu": "lots"}}});
    refused(attempt("d", s).await, "spec.pod.resources.limits.cpu");
    let mut s = spec(1, 2);
    s["pod"] =
        json!({"resources": {"limits": {"cpu": "500m", "memory": "1Gi"}, "requests": {"cpu": 1}}});
    attempt("e", s).await.expect("valid quantities pass");
    // A queue SLO needs the Kafka queue, and at least a second.
    let mut s = spec(1, 2);
    s["slo"] = json!({"maxQueueDelaySeconds": 60});
    refused(
        attempt("f", s.clone()).await,
        "slo.maxQueueDelaySeconds needs spec.async",
    );
    s["async"] = json!({"bootstrapServers": ["kafka:9092"]});
    attempt("g", s.clone())
        .await
        .expect("a queue SLO with spec.async passes");
    s["slo"] = json!({"maxQueueDelaySeconds": 0});
    refused(attempt("h", s).await, "maxQueueDelaySeconds");
}

#[tokio::test]
#[cfg_attr(
    not(envtest),
    ignore = "set KUBEBUILDER_ASSETS: needs a real kube-apiserver"
)]
async fn deleting_a_resource_collects_its_children() {
    let (admin, ns) = setup("gc").await;
    let ctx = context(admin.clone());
    create(&admin, &ns, "bot", spec(2, 3)).await;
    reconcile_stored(&ctx, &admin, &ns, "bot")
        .await
        .expect("reconcile");
    Api::<ModelForwarder>::namespaced(admin.clone(), &ns)
        .delete("bot", &DeleteParams::foreground())
        .await
        .expect("delete");
    let deps: Api<Deployment> = Api::namespaced(admin.clone(), &ns);
    let svcs: Api<Service> = Api::namespaced(admin.clone(), &ns);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(admin.clone(), &ns);
    wait("garbage collection", Duration::from_secs(60), || async {
        deps.get_opt("bot").await.unwrap().is_none()
            && svcs.get_opt("bot").await.unwrap().is_none()
            && pdbs.get_opt("bot").await.unwrap().is_none()
    })
    .await;
}

#[tokio::test]
#[cfg_attr(
    not(envtest),
    ignore = "set KUBEBUILDER_ASSETS: needs a real kube-apiserver"
)]
async fn a_persistent_apply_failure_is_a_degraded_condition_and_heals() {
    let (admin, ns) = setup("quota").await;
    let ctx = context(admin.clone());
    // No Services allowed in this namespace: every apply of one fails.
    let quota: ResourceQuota = serde_json::from_value(json!({
        "metadata": {"name": "no-services"},
        "spec": {"hard": {"services": "0"}}
    }))
    .unwrap();
    let quotas: Api<ResourceQuota> = Api::namespaced(admin.clone(), &ns);
    quotas
        .create(&PostParams::default(), &quota)
        .await
        .expect("quota");
    // The quota controller must have counted usage before it enforces.
    wait("quota status", Duration::from_secs(30), || async {
        quotas
            .get("no-services")
            .await
            .ok()
            .and_then(|q| q.status)
            .and_then(|s| s.used)
            .is_some()
    })
    .await;
    create(&admin, &ns, "bot", spec(1, 3)).await;
    let err = reconcile_stored(&ctx, &admin, &ns, "bot")
        .await
        .expect_err("the Service cannot be created");
    let mf = fetch(&admin, &ns, "bot").await;
    let (status, reason, message) = condition(&mf, "Degraded").expect("Degraded condition");
    assert_eq!((status.as_str(), reason.as_str()), ("True", "ApplyFailed"));
    assert!(message.contains("exceeded quota"), "{message}");

    // Retried with a growing, jittered delay; one Event for the error, not
    // one per retry.
    let obj = Arc::new(DeserializeGuard(Ok(mf.clone())));
    let mut delays = Vec::new();
    for _ in 0..4 {
        let action = error_policy(obj.clone(), &err, ctx.clone());
        delays.push(format!("{action:?}"));
    }
    let secs: Vec<f64> = delays
        .iter()
        .map(|d| {
            let inner = d.split("requeue_after: Some(").nth(1).expect("requeue");
            let dur = inner.split(')').next().unwrap();
            humantime_secs(dur)
        })
        .collect();
    assert!(secs.windows(2).all(|w| w[1] > w[0]), "backs off: {secs:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let events: Api<Event> = Api::namespaced(admin.clone(), &ns);
    let failed: Vec<Event> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("ReconcileFailed"))
        .collect();
    assert_eq!(failed.len(), 1, "one Event for a repeated error");
    assert!(
        failed[0].series.as_ref().is_none_or(|s| s.count <= 1),
        "the repeated error was not published again: {:?}",
        failed[0].series
    );

    // The quota goes: the next retry heals it.
    quotas
        .delete("no-services", &DeleteParams::default())
        .await
        .unwrap();
    reconcile_stored(&ctx, &admin, &ns, "bot")
        .await
        .expect("healed");
    let mf = fetch(&admin, &ns, "bot").await;
    let (status, _, _) = condition(&mf, "Degraded").expect("Degraded condition");
    assert_eq!(status, "False");
}

/// "1.234567s" or "750ms" (Debug of a Duration) in seconds.
fn humantime_secs(s: &str) -> f64 {
    if let Some(ms) = s.strip_suffix("ms") {
        ms.parse::<f64>().unwrap() / 1000.0
    } else if let Some(us) = s.strip_suffix("µs") {
        us.parse::<f64>().unwrap() / 1e6
    } else {
        s.trim_end_matches('s').parse().unwrap()
    }
}

/// The controller, in-process, against the real server.
struct Running {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn run_controller(client: Client, ns: &str) -> Running {
    let ctx = Context::new(
        client.clone(),
        Recorder::new(
            client.clone(),
            Reporter {
                controller: "modelforwarder-operator".into(),
                instance: None,
            },
        ),
        "ghcr.io/modelforwarder/forwarder:test".into(),
        Metrics::new().expect("metrics"),
    );
    Running {
        task: tokio::spawn(operator::controller::run(client, Some(ns.to_string()), ctx)),
    }
}

async fn config_hash(deps: &Api<Deployment>, name: &str) -> Option<String> {
    deps.get_opt(name)
        .await
        .unwrap()?
        .spec?
        .template
        .metadata?
        .annotations?
        .get(CONFIG_HASH)
        .cloned()
}

#[tokio::test]
#[cfg_attr(
    not(envtest),
    ignore = "set KUBEBUILDER_ASSETS: needs a real kube-apiserver"
)]
async fn the_controller_reads_caches_and_reacts_only_to_real_changes() {
    let (admin, ns) = setup("controller").await;
    let log = Log::default();
    let client = recording_client(&log, Arc::default()).await;
    let _running = run_controller(client, &ns);
    let deps: Api<Deployment> = Api::namespaced(admin.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &ns);

    // Waits for its Secret, then starts when the Secret is created.
    let mut s = spec(1, 3);
    s["auth"] = json!({"apiKeysSecretRef": {"name": "clients"}});
    create(&admin, &ns, "bot", s).await;
    let api: Api<ModelForwarder> = Api::namespaced(admin.clone(), &ns);
    wait("SecretNotFound", Duration::from_secs(20), || async {
        let mf = api.get("bot").await.unwrap();
        condition(&mf, "Degraded").is_some_and(|c| c.1 == "SecretNotFound")
    })
    .await;
    assert!(deps.get_opt("bot").await.unwrap().is_none());
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "clients"}, "stringData": {"keys": "k1"}
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    wait("the Deployment", Duration::from_secs(20), || async {
        deps.get_opt("bot").await.unwrap().is_some()
    })
    .await;
    let hash = config_hash(&deps, "bot").await.expect("config hash");

    // Quiet: let the Deployment controller settle, then watch for writes.
    tokio::time::sleep(Duration::from_secs(4)).await;
    log.take();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let writes = log.writes();
    assert_eq!(writes, vec![], "a settled controller writes nothing");

    // Someone else writes status (the autoscaler's metrics): the
    // generation does not change, so no reconcile and no GETs of children.
    api.patch_status(
        "bot",
        &PatchParams::apply("modelforwarder-operator-autoscaler").force(),
        &Patch::Apply(json!({
            "apiVersion": "llm.forwarder.dev/v1alpha1", "kind": "ModelForwarder",
            "status": {"metrics": {"qps": 1.5, "errorRate": 0.0, "p99LatencyMs": 12.0, "observedAt": "2026-01-01T00:00:00Z"}}
        })),
    )
    .await
    .expect("status write");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_status = log.take();
    assert!(
        after_status
            .iter()
            .all(|(m, p)| m == "GET" && p.contains("watch=true")),
        "a status-only change triggered requests: {after_status:?}"
    );

    // A label on the Secret: no new pods. New data: new pods.
    secrets
        .patch(
            "clients",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"team": "a"}}})),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(config_hash(&deps, "bot").await.as_ref(), Some(&hash));
    secrets
        .patch(
            "clients",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"keys": "k2"}})),
        )
        .await
        .unwrap();
    wait("a rolled config hash", Duration::from_secs(20), || async {
        config_hash(&deps, "bot").await.as_ref() != Some(&hash)
    })
    .await;
    // The reconciles read children from the caches: no GET of a child.
    let gets: Vec<_> = log
        .take()
        .into_iter()
        .filter(|(m, p)| {
            m == "GET"
                && !p.contains("watch=true")
                && (p.contains("/deployments/")
                    || p.contains("/services/")
                    || p.contains("/configmaps/")
                    || p.contains("/poddisruptionbudgets/"))
        })
        .collect();
    assert_eq!(gets, vec![], "children read from the caches");
}

#[tokio::test]
#[cfg_attr(
    not(envtest),
    ignore = "set KUBEBUILDER_ASSETS: needs a real kube-apiserver"
)]
async fn a_name_conflict_clears_when_the_foreign_object_goes() {
    let (admin, ns) = setup("conflict").await;
    let services: Api<Service> = Api::namespaced(admin.clone(), &ns);
    let foreign: Service = serde_json::from_value(json!({
        "metadata": {"name": "bot"},
        "spec": {"ports": [{"port": 80}]}
    }))
    .unwrap();
    services
        .create(&PostParams::default(), &foreign)
        .await
        .unwrap();
    let _running = run_controller(admin.clone(), &ns);
    create(&admin, &ns, "bot", spec(1, 3)).await;
    let api: Api<ModelForwarder> = Api::namespaced(admin.clone(), &ns);
    wait("NameConflict", Duration::from_secs(20), || async {
        let mf = api.get("bot").await.unwrap();
        condition(&mf, "Degraded").is_some_and(|c| c.1 == "NameConflict")
    })
    .await;
    let svc = services.get("bot").await.unwrap();
    assert!(svc.metadata.owner_references.is_none(), "not taken over");

    services
        .delete("bot", &DeleteParams::default())
        .await
        .unwrap();
    wait("the conflict to clear", Duration::from_secs(30), || async {
        let mf = api.get("bot").await.unwrap();
        condition(&mf, "Degraded").is_some_and(|c| c.0 == "False")
    })
    .await;
    let svc = services.get("bot").await.unwrap();
    assert!(svc.metadata.owner_references.is_some(), "ours now");
}

#[tokio::test]
#[cfg_attr(
    not(envtest),
    ignore = "set KUBEBUILDER_ASSETS: needs a real kube-apiserver"
)]
async fn an_unreadable_resource_is_reported_on_itself() {
    let (admin, ns) = setup("malformed").await;
    let mf = create(&admin, &ns, "bot", spec(1, 2)).await;
    let ctx = context(admin.clone());
    let invalid = kube::core::error_boundary::InvalidObject {
        error: "spec.upstreams: invalid type: string \"x\", expected a sequence".into(),
        metadata: mf.metadata.clone(),
    };
    let action = reconcile(Arc::new(DeserializeGuard(Err(invalid))), ctx.clone())
        .await
        .expect("not fatal");
    assert_eq!(action, kube::runtime::controller::Action::await_change());
    assert_eq!(ctx.metrics.invalid_objects.get(), 1);
    let events: Api<Event> = Api::namespaced(admin.clone(), &ns);
    let reported = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .any(|e| {
            e.reason.as_deref() == Some("InvalidObject")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("bot")
        });
    assert!(reported, "an InvalidObject Event regarding the resource");
}

#[tokio::test]
#[cfg_attr(
    not(envtest),
    ignore = "set KUBEBUILDER_ASSETS: needs a real kube-apiserver"
)]
async fn a_leader_that_cannot_renew_stops_and_a_released_lease_is_taken_at_once() {
    use operator::leader::{Election, LeaderConfig};
    let (admin, ns) = setup("leader").await;
    let cfg = |id: &str| LeaderConfig {
        lease_duration: Duration::from_secs(6),
        renew_deadline: Duration::from_secs(4),
        retry_period: Duration::from_millis(500),
        ..LeaderConfig::new("operator".into(), ns.clone(), id.into())
    };
    let broken = Arc::new(AtomicBool::new(false));
    let a_client = recording_client(&Log::default(), broken.clone()).await;
    let mut a = Election::start(a_client, &cfg("a")).await.unwrap();
    a.acquired().await.unwrap();
    let mut b = Election::start(admin.clone(), &cfg("b")).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!b.is_leader(), "one leader at a time");

    // A is cut off: it must stop acting before its lease expires, that is
    // before B may lead.
    broken.store(true, Ordering::SeqCst);
    let cut = Instant::now();
    let lost = tokio::time::timeout(Duration::from_secs(10), a.lost())
        .await
        .expect("a leader that cannot renew gives up");
    let a_stopped = cut.elapsed();
    eprintln!("a stopped after {a_stopped:?}: {lost}");
    tokio::time::timeout(Duration::from_secs(15), b.acquired())
        .await
        .expect("the standby leads after expiry")
        .unwrap();
    let b_leads = cut.elapsed();
    assert!(
        a_stopped < b_leads,
        "the old leader stopped ({a_stopped:?}) before the new one started ({b_leads:?})"
    );
    assert!(a_stopped <= Duration::from_secs(5), "{a_stopped:?}");

    // B shuts down and releases: a new standby C leads within about one
    // retry period, not after the 6 s lease.
    let mut c = Election::start(admin.clone(), &cfg("c")).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!c.is_leader());
    let released = Instant::now();
    b.release().await.expect("release");
    tokio::time::timeout(Duration::from_secs(3), c.acquired())
        .await
        .expect("the standby leads at once after a release")
        .unwrap();
    eprintln!("c leads {:?} after the release", released.elapsed());
    assert!(released.elapsed() < Duration::from_secs(2));
    drop(a);
}

/// Scale figures for docs/operator.md (not a pass/fail test): N resources
/// (`SCALE_N`, default 100) applied to the in-process controller; prints
/// the time from the last apply until every resource is reconciled, the
/// operator's API requests per minute at steady state, and the test
/// process's RSS (operator plus test client; the control plane runs in its
/// own processes).
///
/// `KUBEBUILDER_ASSETS=$PWD/target/k8s-bin cargo test --release -p operator --test api -- --ignored scale_figures --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "scale figures, run on demand (needs KUBEBUILDER_ASSETS)"]
async fn scale_figures() {
    use futures::StreamExt;
    let n: usize = std::env::var("SCALE_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let (admin, ns) = setup("scale-figures").await;
    let log = Log::default();
    let client = recording_client(&log, Arc::default()).await;
    let _running = run_controller(client, &ns);
    let api: Api<ModelForwarder> = Api::namespaced(admin.clone(), &ns);

    let started = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let admin = admin.clone();
            let ns = ns.clone();
            async move { create(&admin, &ns, &format!("mf-{i}"), spec(1, 3)).await }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    let applied = started.elapsed();
    let last_apply = Instant::now();
    let deps: Api<Deployment> = Api::namespaced(admin.clone(), &ns);
    loop {
        let mfs = api.list(&ListParams::default()).await.unwrap().items;
        let done = mfs
            .iter()
            .filter(|m| {
                m.status.as_ref().and_then(|s| s.observed_generation) == m.metadata.generation
            })
            .count();
        let dep_count = deps
            .list_metadata(&ListParams::default())
            .await
            .unwrap()
            .items
            .len();
        if done == n && dep_count == n {
            break;
        }
        if last_apply.elapsed() > Duration::from_secs(300) {
            let mut problems: Vec<String> = mfs
                .iter()
                .filter_map(|m| condition(m, "Degraded"))
                .filter(|c| c.0 == "True")
                .map(|c| format!("{}: {}", c.1, c.2))
                .collect();
            problems.sort();
            problems.dedup();
            panic!(
                "after 300 s: {done}/{n} with a current status, {dep_count} Deployments; problems: {:?}",
                &problems[..problems.len().min(5)]
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reconciled = last_apply.elapsed();
    let during = log
        .take()
        .iter()
        .filter(|(_, p)| !p.contains("watch=true"))
        .count();

    // Steady state: once the Deployment controller has rolled out every
    // Deployment (its status changes are real changes the status follows).
    let settle = Instant::now();
    loop {
        let all = deps.list(&ListParams::default()).await.unwrap().items;
        let settled = all.iter().all(|d| {
            let st = d.status.clone().unwrap_or_default();
            st.observed_generation == d.metadata.generation
                && st.replicas == d.spec.as_ref().and_then(|s| s.replicas)
                && st
                    .conditions
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Progressing")
        });
        if settled || settle.elapsed() > Duration::from_secs(600) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let settled_after = settle.elapsed();
    tokio::time::sleep(Duration::from_secs(10)).await;
    log.take();
    let window = Duration::from_secs(60);
    tokio::time::sleep(window).await;
    let steady: Vec<_> = log
        .take()
        .into_iter()
        .filter(|(_, p)| !p.contains("watch=true"))
        .collect();
    let per_minute = steady.len() as f64 * 60.0 / window.as_secs_f64();

    // A spec change reaching the children.
    let changed = Instant::now();
    api.patch(
        "mf-0",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": {"min": 2}}})),
    )
    .await
    .unwrap();
    wait("the spec change", Duration::from_secs(30), || async {
        deps.get("mf-0")
            .await
            .unwrap()
            .spec
            .and_then(|s| s.replicas)
            == Some(2)
    })
    .await;
    let propagation = changed.elapsed();

    let rss = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap_or_default()
        .to_string();
    eprintln!(
        "scale figures: {n} resources; applies took {:.1} s; all reconciled {:.2} s after the last apply; \
         {during} operator requests (non-watch) meanwhile; steady state: {per_minute:.0} requests/min ({:.2} per resource per minute); \
         a spec change reached the Deployment in {:.2} s; {rss} (Deployments settled {:.0} s after that)",
        applied.as_secs_f64(),
        reconciled.as_secs_f64(),
        per_minute / n as f64,
        propagation.as_secs_f64(),
        settled_after.as_secs_f64()
    );
    if !steady.is_empty() {
        eprintln!(
            "steady-state requests (first 10): {:?}",
            &steady[..steady.len().min(10)]
        );
    }
}

/// `spec.budgets` and `spec.models` (aliases) on the real API server: the
/// schema takes them, the ConfigMap carries them as the forwarder reads
/// them, and a resource the forwarder could not serve is refused with a
/// condition naming the field (no children applied).
#[tokio::test]
#[cfg_attr(
    not(envtest),
    ignore = "set KUBEBUILDER_ASSETS: needs a real kube-apiserver"
)]
async fn budgets_and_aliases_reach_the_config_map_and_mistakes_are_refused() {
    let (admin, ns) = setup("aliases").await;
    let ctx = context(admin.clone());
    let mut s = spec(1, 2);
    s["upstreams"] = json!([
        {"name": "local", "provider": "mock", "models": ["mock", "mock-large"]}
    ]);
    s["rateLimits"] = json!({"requestsPerSecond": 5, "tiers": {"gold": {"requestsPerSecond": 50}}});
    s["models"] = json!({
        "fast": {"targets": [{"model": "mock", "weight": 3}, {"model": "mock-large", "weight": 0}]},
        "raw": {"targets": [{"model": "mock"}], "rewriteModel": false}
    });
    s["budgets"] = json!({
        "default": {"dailyTokens": 200000},
        "tiers": {"gold": {"monthlySpend": 300.5}},
        "clients": {"key:analytics": {"monthlyTokens": 20000000, "dailySpend": 25}},
        "prices": {"fast": {"input": 0.4, "output": 1.2}},
        "onStoreError": "FailClosed"
    });
    create(&admin, &ns, "bot", s.clone()).await;
    reconcile_stored(&ctx, &admin, &ns, "bot")
        .await
        .expect("reconcile");
    let cm = Api::<ConfigMap>::namespaced(admin.clone(), &ns)
        .get(&operator::render::config_map_name("bot"))
        .await
        .expect("ConfigMap");
    let text = &cm.data.expect("data")["config.yaml"];
    let config = forwarder_config::load_from_str(text).expect("the forwarder reads it");
    let fast = &config.models["fast"];
    assert_eq!(
        fast.targets
            .iter()
            .map(|t| (t.model.as_str(), t.weight))
            .collect::<Vec<_>>(),
        vec![("mock", 3), ("mock-large", 0)],
        "weights and fallback order"
    );
    assert!(fast.rewrite_model);
    assert!(!config.models["raw"].rewrite_model);
    let b = config.budgets.as_ref().expect("budgets rendered");
    assert_eq!(
        b.default.as_ref().and_then(|d| d.daily_tokens),
        Some(200000)
    );
    assert_eq!(b.tiers["gold"].monthly_spend, Some(300.5));
    let analytics = &b.clients["key:analytics"];
    assert_eq!(
        (analytics.monthly_tokens, analytics.daily_spend),
        (Some(20000000), Some(25.0))
    );
    assert_eq!(
        (b.prices["fast"].input, b.prices["fast"].output),
        (0.4, 1.2)
    );
    assert_eq!(
        b.on_store_error,
        forwarder_config::FailurePolicy::FailClosed
    );
    let mf = fetch(&admin, &ns, "bot").await;
    assert_eq!(
        condition(&mf, "Degraded").map(|c| c.0),
        Some("False".into())
    );

    // A target no upstream serves, and a budget for a tier rateLimits does
    // not define: the schema cannot tell, the operator refuses.
    let mut bad = s.clone();
    bad["models"]["fast"]["targets"][1]["model"] = json!("gpt-5");
    create(&admin, &ns, "bad-alias", bad).await;
    let mut bad = s.clone();
    bad["budgets"]["tiers"] = json!({"silver": {"dailyTokens": 10}});
    create(&admin, &ns, "bad-budget", bad).await;
    for (name, reason, field) in [
        (
            "bad-alias",
            "InvalidModelAlias",
            "spec.models.fast.targets[1].model: \"gpt-5\" is served by no upstream",
        ),
        (
            "bad-budget",
            "InvalidBudget",
            "spec.budgets.tiers.silver: names a tier not in spec.rateLimits.tiers",
        ),
    ] {
        reconcile_stored(&ctx, &admin, &ns, name)
            .await
            .expect("a refused spec is a condition, not an error");
        let mf = fetch(&admin, &ns, name).await;
        let (status, got, message) = condition(&mf, "Degraded").expect("Degraded");
        assert_eq!((status.as_str(), got.as_str()), ("True", reason), "{name}");
        assert!(message.contains(field), "{name}: {message}");
        assert_eq!(
            condition(&mf, "Progressing").map(|c| c.1),
            Some("Blocked".into())
        );
        let cm = Api::<ConfigMap>::namespaced(admin.clone(), &ns)
            .get_opt(&operator::render::config_map_name(name))
            .await
            .expect("read");
        assert!(cm.is_none(), "{name}: nothing applied");
    }

    // What the schema can say, it refuses when the resource is written.
    let api: Api<ModelForwarder> = Api::namespaced(admin.clone(), &ns);
    for (name, patch, want) in [
        (
            "zero",
            json!({"budgets": {"default": {"dailyTokens": 0}}}),
            "spec.budgets.default.dailyTokens",
        ),
        (
            "negative",
            json!({"budgets": {"clients": {"bob": {"dailySpend": -1}}}}),
            "spec.budgets.clients.bob.dailySpend",
        ),
        (
            "empty",
            json!({"budgets": {"default": {}}}),
            "a budget must set at least one of",
        ),
        (
            "noweight",
            json!({"models": {"fast": {"targets": [{"model": "mock", "weight": 0}]}}}),
            "at least one target needs a weight above 0",
        ),
    ] {
        let mut s = spec(1, 2);
        if let (Value::Object(s), Value::Object(p)) = (&mut s, patch) {
            s.extend(p);
        }
        let mf: ModelForwarder = serde_json::from_value(json!({
            "apiVersion": "llm.forwarder.dev/v1alpha1", "kind": "ModelForwarder",
            "metadata": {"name": name, "namespace": ns}, "spec": s,
        }))
        .expect("typed");
        match api.create(&PostParams::default(), &mf).await {
            Err(kube::Error::Api(s)) => {
                assert_eq!(s.code, 422, "{name}: {s:?}");
                assert!(s.message.contains(want), "{name}: {:?}", s.message);
            }
            other => panic!("{name}: expected a refusal, got {other:?}"),
        }
    }
}

/// The Deployment's `spec.replicas` has two writers under two field
/// managers: the reconciler's bounds (`SCALER_FIELD_MANAGER`) and the
/// autoscaler (`AUTOSCALER_FIELD_MANAGER`). Both apply with force, so
/// neither meets a conflict; `managedFields` names whichever set the
/// current count, and neither is a foreign manager to the autoscaler.
#[tokio::test]
#[cfg_attr(
    not(envtest),
    ignore = "set KUBEBUILDER_ASSETS: needs a real kube-apiserver"
)]
async fn the_bounds_and_the_autoscaler_own_replicas_under_their_own_managers() {
    use operator::autoscale::workload::{
        foreign_replica_managers, DeploymentTarget, AUTOSCALER_FIELD_MANAGER,
    };
    use operator::autoscale::ScaleTarget;
    let (admin, ns) = setup("managers").await;
    let ctx = context(admin.clone());
    create(&admin, &ns, "bot", spec(2, 5)).await;
    reconcile_stored(&ctx, &admin, &ns, "bot")
        .await
        .expect("reconcile");
    let deps: Api<Deployment> = Api::namespaced(admin.clone(), &ns);
    let target = DeploymentTarget {
        deployments: deps.clone(),
        pods: Api::namespaced(admin.clone(), &ns),
        name: "bot".into(),
    };
    let read = || async {
        let d = deps.get("bot").await.expect("Deployment");
        let count = d.spec.as_ref().and_then(|s| s.replicas);
        assert!(foreign_replica_managers(&d).is_empty(), "ours only");
        (count, managers_of_replicas(&d))
    };
    assert_eq!(read().await, (Some(2), vec![SCALER_FIELD_MANAGER.into()]));

    // The autoscaler scales within bounds: its manager takes the field.
    target.scale(4).await.expect("autoscaler scales");
    assert_eq!(
        read().await,
        (Some(4), vec![AUTOSCALER_FIELD_MANAGER.into()])
    );
    // A reconcile leaves a count within bounds alone.
    reconcile_stored(&ctx, &admin, &ns, "bot")
        .await
        .expect("reconcile");
    assert_eq!(
        read().await,
        (Some(4), vec![AUTOSCALER_FIELD_MANAGER.into()])
    );

    // max lowered below the count: the bounds take it back, no conflict.
    Api::<ModelForwarder>::namespaced(admin.clone(), &ns)
        .patch(
            "bot",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": {"max": 3}}})),
        )
        .await
        .expect("lower max");
    reconcile_stored(&ctx, &admin, &ns, "bot")
        .await
        .expect("reconcile");
    assert_eq!(read().await, (Some(3), vec![SCALER_FIELD_MANAGER.into()]));

    // The same count from both: they share the field, still no conflict.
    target.scale(3).await.expect("autoscaler scales");
    let (count, mut managers) = read().await;
    managers.sort();
    assert_eq!(
        (count, managers),
        (
            Some(3),
            vec![
                AUTOSCALER_FIELD_MANAGER.to_string(),
                SCALER_FIELD_MANAGER.to_string()
            ]
        )
    );
}

/// Marks every pod of the namespace Running and Ready (the kubelet's part;
/// envtest has none), so the Deployment controller counts them available.
async fn pods_become_ready(admin: &Client, ns: &str) {
    use k8s_openapi::api::core::v1::Pod;
    let pods = Api::<Pod>::namespaced(admin.clone(), ns);
    let ready = json!({"status": {"phase": "Running",
        "conditions": [{"type": "Ready", "status": "True"}]}});
    for p in pods.list(&ListParams::default()).await.expect("pods").items {
        let name = p.name_any();
        // A pod the ReplicaSet has just deleted may be gone already.
        let _ = pods
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&ready))
            .await;
    }
}

#[tokio::test]
#[cfg_attr(
    not(envtest),
    ignore = "set KUBEBUILDER_ASSETS: needs a real kube-apiserver"
)]
async fn a_new_encryption_key_decrypts_in_every_pod_before_it_encrypts() {
    let (admin, ns) = setup("rotate").await;
    let ctx = context(admin.clone());
    // base64 of 32 bytes each.
    let key = |b: u8| match b {
        1 => "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
        _ => "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=",
    };
    let secrets = Api::<Secret>::namespaced(admin.clone(), &ns);
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "store-keys"},
        "stringData": {"k1": key(1)},
    }))
    .expect("secret");
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .expect("create Secret");
    let mut s = spec(1, 1);
    s["encryption"] = json!({"keySecretRef": {"name": "store-keys"}});
    create(&admin, &ns, "bot", s).await;

    let cms = Api::<ConfigMap>::namespaced(admin.clone(), &ns);
    let deps = Api::<Deployment>::namespaced(admin.clone(), &ns);
    let primary = || async {
        let cm = cms
            .get(&operator::render::config_map_name("bot"))
            .await
            .expect("ConfigMap");
        cm.data
            .unwrap_or_default()
            .get("encryption-primary")
            .cloned()
    };
    let encryption = || async {
        let mf = fetch(&admin, &ns, "bot").await;
        let e = mf.status.and_then(|s| s.encryption).unwrap_or_default();
        (e.primary, e.loaded_keys, e.pending_keys)
    };
    let rolled_out = || async {
        let d = deps.get("bot").await.expect("Deployment");
        let (spec_gen, st) = (d.metadata.generation, d.status.unwrap_or_default());
        st.observed_generation == spec_gen
            && st.updated_replicas == Some(1)
            && st.available_replicas == Some(1)
            && st.replicas == Some(1)
    };
    let hash = || async { config_hash(&deps, "bot").await };

    reconcile_stored(&ctx, &admin, &ns, "bot")
        .await
        .expect("reconcile");
    assert_eq!(primary().await.as_deref(), Some("k1"));
    let d = deps.get("bot").await.expect("Deployment");
    let volume = d
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|p| p.volumes)
        .unwrap_or_default()
        .into_iter()
        .find(|v| v.name == "encryption-keys")
        .expect("key ring volume");
    let sources = volume.projected.and_then(|p| p.sources).unwrap_or_default();
    assert_eq!(
        sources
            .iter()
            .filter_map(|s| s.config_map.as_ref())
            .flat_map(|c| c.items.clone().unwrap_or_default())
            .map(|i| (i.key, i.path))
            .collect::<Vec<_>>(),
        vec![("encryption-primary".to_string(), "primary".to_string())],
        "the primary is projected into the ring directory"
    );
    wait(
        "the first pod available",
        Duration::from_secs(60),
        || async {
            pods_become_ready(&admin, &ns).await;
            rolled_out().await
        },
    )
    .await;
    let first_hash = hash().await;

    // Phase one: k2 joins the Secret; the rollout that carries it starts.
    secrets
        .patch(
            "store-keys",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"k2": key(2)}})),
        )
        .await
        .expect("add k2");
    reconcile_stored(&ctx, &admin, &ns, "bot")
        .await
        .expect("reconcile");
    assert_ne!(hash().await, first_hash, "the new key rolls the pods");
    assert_eq!(
        encryption().await,
        (Some("k1".into()), vec!["k1".into()], vec!["k2".into()])
    );
    // While the new pod is not ready, passes keep k1 (an old pod cannot
    // read k2 yet).
    wait("the new pod", Duration::from_secs(60), || async {
        !rolled_out().await
            && deps
                .get("bot")
                .await
                .ok()
                .and_then(|d| d.status)
                .and_then(|s| s.updated_replicas)
                == Some(1)
    })
    .await;
    for _ in 0..3 {
        reconcile_stored(&ctx, &admin, &ns, "bot")
            .await
            .expect("reconcile");
        assert_eq!(primary().await.as_deref(), Some("k1"), "k2 decrypt-only");
    }

    // The rollout finishes: k2 becomes primary, without another rollout.
    let rolled_hash = hash().await;
    wait("the rollout to finish", Duration::from_secs(60), || async {
        pods_become_ready(&admin, &ns).await;
        rolled_out().await
    })
    .await;
    reconcile_stored(&ctx, &admin, &ns, "bot")
        .await
        .expect("reconcile");
    assert_eq!(primary().await.as_deref(), Some("k2"));
    assert_eq!(
        encryption().await,
        (Some("k2".into()), vec!["k1".into(), "k2".into()], vec![])
    );
    assert_eq!(hash().await, rolled_hash, "the primary needs no rollout");
    // Later passes keep it.
    reconcile_stored(&ctx, &admin, &ns, "bot")
        .await
        .expect("reconcile");
    assert_eq!(primary().await.as_deref(), Some("k2"));
}

#[tokio::test]
#[cfg_attr(
    not(envtest),
    ignore = "set KUBEBUILDER_ASSETS: needs a real kube-apiserver"
)]
async fn a_list_of_namespaces_is_watched_with_rights_in_those_namespaces_only() {
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    let (admin, ns_a) = setup("watch-a").await;
    let cp = envtest::control_plane();
    let ns_b = cp.namespace(&admin, "watch-b").await;
    let ns_c = cp.namespace(&admin, "unwatched").await;
    // The operator's identity may act in a and b, and nowhere else.
    let (sa_ns, sa) = (ns_a.clone(), "operator");
    for ns in [&ns_a, &ns_b] {
        let role: Role = serde_json::from_value(json!({
            "metadata": {"name": "operator", "namespace": ns},
            "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]
        }))
        .unwrap();
        Api::<Role>::namespaced(admin.clone(), ns)
            .create(&PostParams::default(), &role)
            .await
            .expect("Role");
        let binding: RoleBinding = serde_json::from_value(json!({
            "metadata": {"name": "operator", "namespace": ns},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "operator"},
            "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": sa_ns}]
        }))
        .unwrap();
        Api::<RoleBinding>::namespaced(admin.clone(), ns)
            .create(&PostParams::default(), &binding)
            .await
            .expect("RoleBinding");
    }
    let operator = cp.service_account_client(&sa_ns, sa).await;
    let ctx = Context::new(
        operator.clone(),
        Recorder::new(
            operator.clone(),
            Reporter {
                controller: "modelforwarder-operator".into(),
                instance: None,
            },
        ),
        "ghcr.io/modelforwarder/forwarder:test".into(),
        Metrics::new().expect("metrics"),
    );
    let _running = Running {
        task: tokio::spawn(operator::controller::run_all(
            operator,
            vec![ns_a.clone(), ns_b.clone()],
            ctx,
        )),
    };
    for ns in [&ns_a, &ns_b, &ns_c] {
        create(&admin, ns, "bot", spec(1, 1)).await;
    }
    let cm = operator::render::config_map_name("bot");
    for ns in [&ns_a, &ns_b] {
        let cms = Api::<ConfigMap>::namespaced(admin.clone(), ns);
        wait(
            &format!("the resource in {ns} reconciled"),
            Duration::from_secs(30),
            || async { cms.get_opt(&cm).await.ok().flatten().is_some() },
        )
        .await;
        let stored = fetch(&admin, ns, "bot").await;
        assert!(condition(&stored, "Ready").is_some(), "status in {ns}");
    }
    // Not watched: left alone.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let unwatched = Api::<ConfigMap>::namespaced(admin.clone(), &ns_c);
    assert!(unwatched.get_opt(&cm).await.unwrap().is_none());
    assert!(fetch(&admin, &ns_c, "bot").await.status.is_none());
}
