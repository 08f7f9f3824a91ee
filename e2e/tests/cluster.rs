//! Cluster tests of the operator: CRD install and validation, objects with
//! the right owner, rollout on spec and Secret changes, Degraded on a
//! missing Secret, garbage collection on delete.
//!
//! Run with `KUBECONFIG=... cargo test -p e2e -- --nocapture` (without
//! `KUBECONFIG` at build time the test is reported as ignored). The
//! controller runs in this process, scoped to a fresh namespace, so no
//! operator image is needed; forwarder pods need not become ready.

use std::time::Duration;

use anyhow::{anyhow, Context as _};
use e2e::{cluster, say, unique_namespace, wait_for};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Recorder, Reporter};
use kube::{Client, CustomResourceExt, Resource, ResourceExt};
use operator::crd::ModelForwarder;
use operator::reconcile::Context;
use operator::render::labels::CONFIG_HASH;
use operator::telemetry::Metrics;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(90);

async fn install_crd(client: &Client) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = ModelForwarder::crd();
    let name = crd.name_any();
    crds.patch(
        &name,
        &PatchParams::apply("modelforwarder-e2e").force(),
        &Patch::Apply(&crd),
    )
    .await
    .context("installing the CRD (its schema and CEL rules must be accepted)")?;
    wait_for("the CRD to be established", WAIT, || async {
        let crd = crds.get(&name).await?;
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        Ok(established.then_some(()))
    })
    .await
}

fn owned_by(meta: &kube::api::ObjectMeta, uid: &str) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == uid && o.controller == Some(true) && o.kind == "ModelForwarder")
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

fn resource(name: &str, min: i32, clients_secret: &str) -> anyhow::Result<ModelForwarder> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "llm.forwarder.dev/v1alpha1",
        "kind": "ModelForwarder",
        "metadata": {"name": name},
        "spec": {
            "protocols": ["http", "grpc"],
            "upstreams": [
                {"name": "primary", "provider": "openai", "baseUrl": "http://mock-llm:8081/v1",
                 "models": ["qwen-max"], "apiKeySecretRef": {"name": "llm-keys", "key": "primary"}},
                {"name": "local", "provider": "mock", "models": ["mock"]}
            ],
            "auth": {"apiKeysSecretRef": {"name": clients_secret}},
            "replicas": {"min": min, "max": 5}
        }
    }))?)
}

async fn secret(api: &Api<Secret>, name: &str, key: &str, value: &str) -> anyhow::Result<()> {
    let s: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
        "stringData": {key: value}
    }))?;
    api.patch(
        name,
        &PatchParams::apply("modelforwarder-e2e").force(),
        &Patch::Apply(&s),
    )
    .await?;
    Ok(())
}

async fn get_owned<K>(api: &Api<K>, name: &str, uid: &str) -> anyhow::Result<Option<K>>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    Ok(api.get_opt(name).await?.filter(|o| owned_by(o.meta(), uid)))
}

#[tokio::test]
#[cfg_attr(not(cluster), ignore = "needs a cluster: KUBECONFIG")]
async fn operator_reconciles_rolls_out_degrades_and_garbage_collects() -> anyhow::Result<()> {
    let client = cluster("operator_reconciles_rolls_out_degrades_and_garbage_collects").await?;
    install_crd(&client).await?;

    let ns = unique_namespace("mf-e2e");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace: Namespace = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": ns, "labels": {"app.kubernetes.io/part-of": "modelforwarder-e2e"}}
    }))?;
    namespaces
        .create(&PostParams::default(), &namespace)
        .await?;
    say(&format!("namespace {ns}"));
    let result = scenario(&client, &ns).await;
    // Clean up even when the scenario failed; report the scenario's error.
    let _ = namespaces.delete(&ns, &DeleteParams::background()).await;
    result
}

async fn scenario(client: &Client, ns: &str) -> anyhow::Result<()> {
    let mfs: Api<ModelForwarder> = Api::namespaced(client.clone(), ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), ns);

    // The schema's CEL rules reject what types alone cannot.
    let mut bad = resource("bad", 2, "clients")?;
    bad.spec.replicas.min = 9;
    let err = mfs
        .create(&PostParams::default(), &bad)
        .await
        .err()
        .ok_or_else(|| anyhow!("min > max was accepted"))?;
    anyhow::ensure!(
        err.to_string().contains("min must not exceed max"),
        "unexpected rejection: {err}"
    );

    secret(&secrets, "clients", "web", "sk-client-1").await?;
    secret(&secrets, "llm-keys", "primary", "sk-upstream-1").await?;

    let ctx = Context::new(
        client.clone(),
        Recorder::new(
            client.clone(),
            Reporter {
                controller: "modelforwarder-operator".into(),
                instance: Some("e2e".into()),
            },
        ),
        operator::DEFAULT_FORWARDER_IMAGE.into(),
        Metrics::new()?,
    );
    let controller = tokio::spawn(operator::controller::run(
        client.clone(),
        Some(ns.to_string()),
        ctx,
    ));

    let mf = mfs
        .create(&PostParams::default(), &resource("bot", 2, "clients")?)
        .await?;
    let uid = mf
        .uid()
        .ok_or_else(|| anyhow!("created resource has no uid"))?;

    // Every object appears, owned by the resource.
    let dep = wait_for("the owned Deployment", WAIT, || {
        get_owned(&deployments, "bot", &uid)
    })
    .await?;
    wait_for("the owned Service", WAIT, || {
        get_owned(&services, "bot", &uid)
    })
    .await?;
    wait_for("the owned ConfigMap", WAIT, || {
        get_owned(&config_maps, "bot-config", &uid)
    })
    .await?;
    wait_for("the owned PodDisruptionBudget", WAIT, || {
        get_owned(&pdbs, "bot", &uid)
    })
    .await?;
    let replicas = wait_for("replicas at min", WAIT, || async {
        let d = deployments.get("bot").await?;
        Ok(d.spec.and_then(|s| s.replicas).filter(|r| *r == 2))
    })
    .await?;
    say(&format!("objects created, replicas {replicas}"));
    let first_hash = pod_hash(&dep).ok_or_else(|| anyhow!("no config hash on the pod template"))?;

    wait_for(
        "status with observedGeneration and conditions",
        WAIT,
        || async {
            let mf = mfs.get("bot").await?;
            let gen = mf.metadata.generation;
            Ok(mf
                .status
                .filter(|s| s.observed_generation == gen && s.conditions.len() >= 3))
        },
    )
    .await?;

    // A spec change rolls the pods.
    mfs.patch(
        "bot",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"retry": {"maxAttempts": 5}}})),
    )
    .await?;
    let second_hash = wait_for(
        "the config hash to change after a spec change",
        WAIT,
        || async {
            let d = deployments.get("bot").await?;
            Ok(pod_hash(&d).filter(|h| *h != first_hash))
        },
    )
    .await?;
    let cm = config_maps.get("bot-config").await?;
    let text = cm
        .data
        .unwrap_or_default()
        .remove("config.yaml")
        .unwrap_or_default();
    anyhow::ensure!(
        text.contains("max_attempts: 5"),
        "config not updated:\n{text}"
    );

    // A rotated Secret rolls the pods too (the Secret watch triggers it).
    secret(&secrets, "llm-keys", "primary", "sk-upstream-2").await?;
    wait_for(
        "the config hash to change after a Secret change",
        WAIT,
        || async {
            let d = deployments.get("bot").await?;
            Ok(pod_hash(&d).filter(|h| *h != second_hash))
        },
    )
    .await?;
    say("spec and Secret changes rolled the pod template");

    // A missing Secret: Degraded, nothing applied.
    mfs.create(
        &PostParams::default(),
        &resource("orphan", 1, "no-such-secret")?,
    )
    .await?;
    wait_for("Degraded/SecretNotFound", WAIT, || async {
        let mf = mfs.get("orphan").await?;
        let degraded =
            mf.status.into_iter().flat_map(|s| s.conditions).find(|c| {
                c.type_ == "Degraded" && c.status == "True" && c.reason == "SecretNotFound"
            });
        Ok(degraded)
    })
    .await?;
    anyhow::ensure!(
        deployments.get_opt("orphan").await?.is_none(),
        "applied despite a missing Secret"
    );

    // Deleting the resource garbage-collects what it owns.
    mfs.delete("bot", &DeleteParams::background()).await?;
    wait_for("garbage collection of the owned objects", WAIT, || async {
        let gone = deployments.get_opt("bot").await?.is_none()
            && services.get_opt("bot").await?.is_none()
            && config_maps.get_opt("bot-config").await?.is_none()
            && pdbs.get_opt("bot").await?.is_none();
        Ok(gone.then_some(()))
    })
    .await?;
    say("owned objects garbage-collected");

    controller.abort();
    Ok(())
}
