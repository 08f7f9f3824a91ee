//! Wires the reconciler into a kube-runtime `Controller`.
//!
//! What the controller watches, and why it stays cheap at scale:
//! - ModelForwarders, filtered by `metadata.generation`: a status write
//!   (ours or the autoscaler's) does not trigger a reconcile;
//! - the owned Deployments, ConfigMaps, Services and PDBs (labelled ones
//!   only), through reflectors whose stores the reconciler reads instead of
//!   GETting each child;
//! - Secrets as metadata only (no data held in memory): a change maps to the
//!   resources that reference the Secret, which then read its data;
//! - the names (metadata only) of every Deployment, ConfigMap, Service and
//!   PDB in scope, so a first reconcile tells a free name from a foreign
//!   object without a GET.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::core::DeserializeGuard;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{controller, predicates, watcher, Controller, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use crate::crd::ModelForwarder;
use crate::reconcile::{error_policy, reconcile, resources_referencing, Caches, Context, Names};
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

/// A reflector over the labelled children of one kind: its store, and the
/// stream of changes that drives the controller.
fn owned<K>(
    client: &Client,
    ns: Option<&str>,
    trim: fn(&mut K),
) -> (
    Store<K>,
    impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static,
)
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    // Owned objects carry the managed-by label; watching only those keeps
    // the caches small.
    let cfg = watcher::Config::default()
        .labels(&format!("{}={}", labels::MANAGED_BY, labels::FIELD_MANAGER))
        .any_semantic();
    let (reader, writer) = reflector::store();
    let stream = watcher(scoped::<K>(client, ns), cfg)
        .default_backoff()
        // The reconciler never reads managedFields: do not keep them.
        .modify(move |o: &mut K| {
            o.managed_fields_mut().clear();
            trim(o);
        })
        .reflect(writer)
        .touched_objects();
    (reader, stream)
}

/// Ends a spawned task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A metadata-only reflector over every object of a kind (labels,
/// annotations and managedFields dropped: only names and owners kept).
fn all_names<K>(
    client: &Client,
    ns: Option<&str>,
) -> (
    Store<PartialObjectMeta<K>>,
    impl futures::Future<Output = ()> + Send + 'static,
)
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let api: Api<PartialObjectMeta<K>> = match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let feed = watcher(api, watcher::Config::default().any_semantic())
        .default_backoff()
        .modify(|o: &mut PartialObjectMeta<K>| {
            o.metadata.managed_fields = None;
            o.metadata.annotations = None;
            o.metadata.labels = None;
        })
        .reflect(writer)
        .for_each(|_| async {});
    (reader, feed)
}

/// The name caches of the children's kinds, and the future that fills
/// them (and marks them listed).
fn names(
    client: &Client,
    ns: Option<&str>,
) -> (Names, impl futures::Future<Output = ()> + Send + 'static) {
    let (deployments, d) = all_names::<Deployment>(client, ns);
    let (config_maps, c) = all_names::<ConfigMap>(client, ns);
    let (services, s) = all_names::<Service>(client, ns);
    let (pdbs, p) = all_names::<PodDisruptionBudget>(client, ns);
    let names = Names {
        deployments,
        config_maps,
        services,
        pdbs,
        ready: Arc::default(),
    };
    let n = names.clone();
    let feed = async move {
        let listed = async {
            let _ = futures::join!(
                n.deployments.wait_until_ready(),
                n.config_maps.wait_until_ready(),
                n.services.wait_until_ready(),
                n.pdbs.wait_until_ready(),
            );
            n.ready.store(true, std::sync::atomic::Ordering::Release);
        };
        futures::join!(d, c, s, p, listed);
    };
    (names, feed)
}

/// Quiet time before a resource's queued reconcile runs.
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// Reconciliations at once (8 before issue 22; 16 measured at least as fast
/// as 64 with less memory, see docs/operator.md).
pub const CONCURRENCY: u16 = 16;

/// Runs a controller for each of `namespaces` (each with caches and a
/// watch of its own, so the operator needs rights in those namespaces
/// only), or one for the whole cluster when the list is empty, until
/// SIGTERM/SIGINT.
pub async fn run_all(client: Client, namespaces: Vec<String>, ctx: Context) {
    if namespaces.is_empty() {
        return run(client, None, ctx).await;
    }
    let runs = namespaces
        .into_iter()
        .map(|ns| run(client.clone(), Some(ns), ctx.sibling()));
    futures::future::join_all(runs).await;
}

/// Runs the controller until SIGTERM/SIGINT (or until the future is
/// dropped). `namespace`: watch only this namespace; `None`: all.
pub async fn run(client: Client, namespace: Option<String>, mut ctx: Context) {
    let ns = namespace.as_deref();
    // DeserializeGuard: a malformed object is handed to the reconciler as an
    // error (reported as an Event) instead of breaking the watch.
    let resources: Api<DeserializeGuard<ModelForwarder>> = scoped(&client, ns);
    let (store, writer) = reflector::store();
    let primary = watcher(resources, watcher::Config::default().any_semantic())
        .default_backoff()
        .modify(|o: &mut DeserializeGuard<ModelForwarder>| o.managed_fields_mut().clear())
        .reflect(writer)
        .applied_objects()
        // Status writes do not change the generation: no reconcile for them.
        .predicate_filter(predicates::generation, Default::default());

    let (deployments, deployment_events) = owned(&client, ns, crate::drift::trim_deployment);
    let (config_maps, config_map_events) = owned::<ConfigMap>(&client, ns, |_| {});
    let (services, service_events) = owned::<Service>(&client, ns, |_| {});
    let (pdbs, pdb_events) = owned::<PodDisruptionBudget>(&client, ns, |_| {});
    let (names, names_feed) = names(&client, ns);
    // Driven beside the controller, ended with it.
    let _names_feed = AbortOnDrop(tokio::spawn(names_feed));
    ctx.caches = Some(Caches {
        deployments,
        config_maps,
        services,
        pdbs,
        names: Some(names),
    });
    // Metadata only: the Secrets' data stays out of the operator's memory.
    let secret_api: Api<PartialObjectMeta<Secret>> = match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let secrets = watcher(secret_api, watcher::Config::default())
        .default_backoff()
        .touched_objects();

    let mapper_store = store.clone();
    Controller::for_stream(primary, store)
        // A rollout sends a burst of Deployment status updates; fold each
        // burst into one reconcile (a short debounce: it delays every first
        // reconcile too), and bound the parallel ones (64 were measured too:
        // no faster on two cores, 9 MB more at 1,000 resources;
        // docs/operator.md).
        .with_config(
            controller::Config::default()
                .debounce(DEBOUNCE)
                .concurrency(CONCURRENCY),
        )
        .owns_stream(deployment_events)
        .owns_stream(config_map_events)
        .owns_stream(service_events)
        .owns_stream(pdb_events)
        .watches_stream(secrets, move |secret| {
            resources_referencing(&mapper_store.state(), &secret)
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, Arc::new(ctx))
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => {
                    tracing::debug!(name = %obj.name, namespace = ?obj.namespace, "reconciled")
                }
                // Normal after a deletion: children events for a resource
                // that is gone. Not worth a warning.
                Err(controller::Error::ObjectNotFound(obj)) => {
                    tracing::debug!(name = %obj.name, "object gone from the cache")
                }
                Err(e) => tracing::warn!(error = %e, "controller"),
            }
        })
        .await;
}
