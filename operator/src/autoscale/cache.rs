//! The autoscaler's view of the cluster: watch-fed caches of the
//! ModelForwarders, their Deployments and their pods, so an evaluation
//! reads nothing from the API server (one GET and one LIST per resource per
//! interval, and a LIST of every resource per pass, before).
//!
//! What is cached is trimmed to what the autoscaler reads: a Deployment
//! keeps its replicas, its ready replicas and the field managers of
//! `spec.replicas`; a pod only its metadata (a metadata-only watch, so the
//! pod specs never reach the operator).

use std::future::Future;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};
use kube::core::{DeserializeGuard, PartialObjectMeta};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};

use super::alerts::Key;
use crate::crd::ModelForwarder;
use crate::render::labels::{self, FIELD_MANAGER, INSTANCE, MANAGED_BY, NAME};

/// Caches of what the autoscaler reads: one scope per watched namespace
/// (one for the whole cluster when none is named). Cheap to clone (shared
/// stores).
#[derive(Clone)]
pub struct Cluster {
    scopes: Vec<Scope>,
}

/// The caches of one namespace, or of all.
#[derive(Clone)]
struct Scope {
    resources: Store<DeserializeGuard<ModelForwarder>>,
    deployments: Store<Deployment>,
    pods: Store<PartialObjectMeta<Pod>>,
}

fn scoped<K>(client: &Client, ns: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Whether a managed-fields entry owns the Deployment's `spec.replicas`.
fn owns_replicas(m: &ManagedFieldsEntry) -> bool {
    m.fields_v1
        .as_ref()
        .and_then(|f| f.0.get("f:spec"))
        .and_then(|spec| spec.get("f:replicas"))
        .is_some()
}

/// Keeps what the autoscaler reads of a Deployment (pure): the replica
/// counts and the managers of `spec.replicas`, reduced to that field.
pub fn trim_deployment(d: &mut Deployment) {
    let replicas = d.spec.as_ref().and_then(|s| s.replicas);
    d.spec = Some(DeploymentSpec {
        replicas,
        ..DeploymentSpec::default()
    });
    let ready_replicas = d.status.as_ref().and_then(|s| s.ready_replicas);
    d.status = Some(DeploymentStatus {
        ready_replicas,
        ..DeploymentStatus::default()
    });
    d.metadata.annotations = None;
    if let Some(managed) = d.metadata.managed_fields.as_mut() {
        managed.retain(owns_replicas);
        for m in managed.iter_mut() {
            m.fields_v1 = Some(FieldsV1(serde_json::json!({"f:spec": {"f:replicas": {}}})));
            m.time = None;
        }
    }
}

impl Cluster {
    /// Starts the watches (in each of `namespaces`, or in all when it is
    /// empty). The caches fill while the returned future runs; it runs
    /// until dropped.
    pub fn watch(
        client: &Client,
        namespaces: &[String],
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let named: Vec<Option<&str>> = if namespaces.is_empty() {
            vec![None]
        } else {
            namespaces.iter().map(|n| Some(n.as_str())).collect()
        };
        let (scopes, feeds): (Vec<_>, Vec<_>) =
            named.into_iter().map(|ns| Scope::watch(client, ns)).unzip();
        let feed = async move {
            futures::future::join_all(feeds).await;
        };
        (Self { scopes }, feed)
    }
}

impl Scope {
    fn watch(
        client: &Client,
        namespace: Option<&str>,
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        // The forwarder's children carry the managed-by label: watching
        // only those keeps the caches to the operator's own objects.
        let owned = watcher::Config::default()
            .labels(&format!("{MANAGED_BY}={FIELD_MANAGER}"))
            .any_semantic();
        let (resources, w_resources) = reflector::store();
        let resources_feed = watcher(
            scoped::<DeserializeGuard<ModelForwarder>>(client, namespace),
            watcher::Config::default().any_semantic(),
        )
        .default_backoff()
        .modify(|o: &mut DeserializeGuard<ModelForwarder>| o.managed_fields_mut().clear())
        .reflect(w_resources)
        .for_each(|_| async {});
        let (deployments, w_deployments) = reflector::store();
        let deployments_feed = watcher(scoped::<Deployment>(client, namespace), owned.clone())
            .default_backoff()
            .modify(trim_deployment)
            .reflect(w_deployments)
            .for_each(|_| async {});
        let (pods, w_pods) = reflector::store();
        // An Api of PartialObjectMeta makes metadata-only requests.
        let pods_feed = watcher(scoped::<PartialObjectMeta<Pod>>(client, namespace), owned)
            .default_backoff()
            .modify(|p: &mut PartialObjectMeta<Pod>| {
                p.managed_fields_mut().clear();
                p.metadata.annotations = None;
            })
            .reflect(w_pods)
            .for_each(|_| async {});
        let feed = async move {
            futures::join!(resources_feed, deployments_feed, pods_feed);
        };
        (
            Self {
                resources,
                deployments,
                pods,
            },
            feed,
        )
    }
}

impl Cluster {
    /// Caches filled by hand (tests).
    pub fn from_stores(
        resources: Store<DeserializeGuard<ModelForwarder>>,
        deployments: Store<Deployment>,
        pods: Store<PartialObjectMeta<Pod>>,
    ) -> Self {
        Self {
            scopes: vec![Scope {
                resources,
                deployments,
                pods,
            }],
        }
    }

    /// Waits until every cache has had its first full list.
    pub async fn ready(&self) {
        // A writer dropped before its first list means the watch future
        // was dropped: there is nothing to wait for then.
        for s in &self.scopes {
            let _ = s.resources.wait_until_ready().await;
            let _ = s.deployments.wait_until_ready().await;
            let _ = s.pods.wait_until_ready().await;
        }
    }

    /// The valid resources in the caches.
    pub fn resources(&self) -> Vec<ModelForwarder> {
        self.scopes
            .iter()
            .flat_map(|s| s.resources.state())
            .filter_map(|g| g.0.as_ref().ok().cloned())
            .collect()
    }

    /// One resource, if cached and valid.
    pub fn resource(&self, key: &Key) -> Option<ModelForwarder> {
        let r = ObjectRef::new(&key.name).within(&key.namespace);
        self.scopes
            .iter()
            .find_map(|s| s.resources.get(&r))
            .and_then(|g| g.0.as_ref().ok().cloned())
    }

    /// The cached (trimmed) Deployment of a resource.
    pub fn deployment(&self, namespace: &str, name: &str) -> Option<Deployment> {
        let r = ObjectRef::new(name).within(namespace);
        self.scopes
            .iter()
            .find_map(|s| s.deployments.get(&r))
            .map(|d| (*d).clone())
    }

    /// Names of a resource's pods that exist and are not terminating
    /// (selected as the Deployment selects them).
    pub fn live_pods(&self, namespace: &str, name: &str) -> std::collections::BTreeSet<String> {
        let want = labels::selector(name);
        self.scopes
            .iter()
            .flat_map(|s| s.pods.state())
            .filter(|p| p.metadata.namespace.as_deref() == Some(namespace))
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter(|p| {
                let l = p.labels();
                l.get(NAME) == want.get(NAME) && l.get(INSTANCE) == want.get(INSTANCE)
            })
            .map(|p| p.name_any())
            .collect()
    }
}

/// A resource's key in the caches and the schedule.
pub fn key(mf: &ModelForwarder) -> Key {
    Key {
        namespace: mf.namespace().unwrap_or_default(),
        name: mf.name_any(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_cached_deployment_keeps_only_what_the_autoscaler_reads() {
        let mut d: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "bot", "namespace": "ai",
                "annotations": {"big": "x"},
                "managedFields": [
                    {"manager": "modelforwarder-operator", "operation": "Apply",
                     "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:template": {"f:x": {}}}}},
                    {"manager": "kubectl", "operation": "Update", "subresource": "scale",
                     "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:replicas": {}}}}
                ]},
            "spec": {"replicas": 3, "selector": {"matchLabels": {"a": "b"}},
                     "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}}},
            "status": {"replicas": 3, "readyReplicas": 2, "observedGeneration": 4}
        }))
        .unwrap();
        trim_deployment(&mut d);
        let spec = d.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(3));
        assert!(spec.template.spec.is_none() && spec.selector.match_labels.is_none());
        assert_eq!(d.status.as_ref().unwrap().ready_replicas, Some(2));
        assert_eq!(d.status.as_ref().unwrap().replicas, None);
        assert!(d.metadata.annotations.is_none());
        // The foreign manager of replicas is still visible.
        assert_eq!(
            super::super::workload::foreign_replica_managers(&d),
            ["kubectl (/scale)"]
        );
        assert_eq!(d.metadata.managed_fields.as_ref().unwrap().len(), 1);
    }
}
