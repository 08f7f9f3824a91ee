//! Wires the reconciler into a kube-runtime `Controller`.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::core::DeserializeGuard;
use kube::runtime::{controller, watcher, Controller};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

use crate::crd::ModelForwarder;
use crate::reconcile::{error_policy, reconcile, resources_referencing, Context};
use crate::render::labels;

fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs the controller until SIGTERM/SIGINT. `namespace`: watch only this
/// namespace; `None`: all namespaces.
pub async fn run(client: Client, namespace: Option<String>, ctx: Arc<Context>) {
    let ns = namespace.as_deref();
    // DeserializeGuard: a malformed object is handed to the reconciler as an
    // error (reported as an Event) instead of breaking the watch.
    let resources: Api<DeserializeGuard<ModelForwarder>> = scoped(&client, ns);
    // Owned objects carry the managed-by label; watching only those keeps
    // the caches small.
    let owned = watcher::Config::default().labels(&format!(
        "{}={}",
        labels::MANAGED_BY,
        labels::FIELD_MANAGER
    ));
    let controller = Controller::new(resources, watcher::Config::default().any_semantic())
        // A rollout sends a burst of Deployment status updates; fold each
        // burst into one reconcile, and bound the parallel ones.
        .with_config(
            controller::Config::default()
                .debounce(Duration::from_millis(500))
                .concurrency(8),
        );
    let store = controller.store();
    controller
        .owns(scoped::<Deployment>(&client, ns), owned.clone())
        .owns(scoped::<ConfigMap>(&client, ns), owned.clone())
        .owns(scoped::<Service>(&client, ns), owned.clone())
        .owns(scoped::<PodDisruptionBudget>(&client, ns), owned)
        .watches(
            scoped::<Secret>(&client, ns),
            watcher::Config::default(),
            move |secret| resources_referencing(&store.state(), &secret),
        )
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => {
                    tracing::debug!(name = %obj.name, namespace = ?obj.namespace, "reconciled")
                }
                Err(e) => tracing::warn!(error = %e, "controller"),
            }
        })
        .await;
}
