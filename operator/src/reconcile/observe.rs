//! Stage observe: what the cluster holds for one resource. The referenced
//! Secrets are read at once; the children come from the controller's
//! caches, with a GET only where the caches cannot tell.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::Api;
use kube::runtime::reflector::{ObjectRef, Store};
use serde::de::DeserializeOwned;

use super::{api_err, replicas_after, secret_uses, ApiError, Caches, Error, NamedIn, Target};
use crate::crd::ModelForwarder;
use crate::render::config_map_name;

/// What one reconcile starts from.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// Every Secret the spec references, by name; `None`: not found.
    pub secrets: BTreeMap<String, Option<Secret>>,
    pub deployment: Option<Deployment>,
    pub config_map: Option<ConfigMap>,
    pub service: Option<Service>,
    /// Read only when a PDB is wanted, or from the labelled cache (ours)
    /// when it may have to go.
    pub pdb: Option<PodDisruptionBudget>,
}

impl Observed {
    /// The Deployment's replica count as observed.
    pub fn current_replicas(&self) -> Option<i32> {
        self.deployment
            .as_ref()
            .and_then(|d| d.spec.as_ref())
            .and_then(|s| s.replicas)
    }
}

async fn get<K>(api: &Api<K>, name: &str) -> Result<Option<K>, ApiError>
where
    K: kube::Resource<DynamicType = ()> + DeserializeOwned + Clone + Debug,
{
    api.get_opt(name)
        .await
        .map_err(api_err(format!("reading {} {name}", K::kind(&()))))
}

/// A child from the controller's cache; a GET only when the cache has no
/// such object and the name caches do not show the name free (a foreign
/// object the labelled watch cannot see must be detected rather than taken
/// over; before the name caches are listed, every miss is a GET).
async fn cached<K>(
    caches: Option<&Caches>,
    store: fn(&Caches) -> &Store<K>,
    api: &Api<K>,
    ns: &str,
    name: &str,
) -> Result<Option<K>, ApiError>
where
    K: NamedIn + DeserializeOwned + Debug,
{
    if let Some(c) = caches {
        if let Some(obj) = store(c).get(&ObjectRef::new(name).within(ns)) {
            return Ok(Some((*obj).clone()));
        }
        if let Some(names) = c.names.as_ref() {
            let listed = names.ready.load(std::sync::atomic::Ordering::Acquire);
            let r = ObjectRef::<kube::core::PartialObjectMeta<K>>::new(name).within(ns);
            if listed && K::store(names).get(&r).is_none() {
                return Ok(None);
            }
        }
    }
    get(api, name).await
}

/// Reads the referenced Secrets and the children.
pub async fn observe(
    mf: &ModelForwarder,
    caches: Option<&Caches>,
    t: &Target,
) -> Result<Observed, Error> {
    observe_inner(mf, caches, t).await.map_err(Error::Observe)
}

async fn observe_inner(
    mf: &ModelForwarder,
    caches: Option<&Caches>,
    t: &Target,
) -> Result<Observed, ApiError> {
    let (ns, name, apis) = (&t.ns, &t.name, &t.apis);
    let names: BTreeSet<String> = secret_uses(&mf.spec).into_iter().map(|u| u.name).collect();
    // Read at once, not one after the other.
    let read = futures::future::try_join_all(names.iter().map(|n| get(&apis.secrets, n))).await?;
    let secrets = names.into_iter().zip(read).collect();

    let cm_name = config_map_name(name);
    // Cache misses (a first reconcile) are read at once, not in turn.
    let (deployment, config_map, service) = futures::try_join!(
        cached(caches, |c| &c.deployments, &apis.deployments, ns, name),
        cached(caches, |c| &c.config_maps, &apis.config_maps, ns, &cm_name),
        cached(caches, |c| &c.services, &apis.services, ns, name),
    )?;
    let mut observed = Observed {
        secrets,
        deployment,
        config_map,
        service,
        pdb: None,
    };
    // Without a PDB to apply, only our own (labelled, cached) one matters:
    // it is deleted. No GET for a name we do not need.
    let replicas = replicas_after(observed.current_replicas(), &mf.spec.replicas);
    observed.pdb = match (caches, replicas > 1) {
        (Some(c), false) => c
            .pdbs
            .get(&ObjectRef::new(name).within(ns))
            .map(|p| (*p).clone()),
        _ => cached(caches, |c| &c.pdbs, &apis.pdbs, ns, name).await?,
    };
    Ok(observed)
}
