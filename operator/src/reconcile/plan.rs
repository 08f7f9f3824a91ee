//! Stages build and plan (both pure): the objects the spec renders to,
//! then which of them must be written, given what was observed.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::ResourceExt;
use serde::Serialize;

use super::observe::Observed;
use super::validate::owned_by;
use super::{applied_hash, Error};
use crate::drift;
use crate::render::labels::APPLIED_HASH;
use crate::render::{self, Inputs, Rendered};

/// Stage build: every child object from the spec and its forwarder config.
pub fn build(inputs: &Inputs<'_>, config: &forwarder_config::Config) -> Result<Rendered, Error> {
    render::render(inputs, config).map_err(Error::Build)
}

/// What to do with the PodDisruptionBudget.
#[derive(Debug, Clone, PartialEq)]
pub enum PdbStep {
    Apply(Box<PodDisruptionBudget>),
    /// Ours, and no longer wanted.
    Delete,
    Leave,
}

/// The writes one reconcile makes to the children (the replica count
/// aside: it is decided from the applied Deployment, see
/// [`super::scale_target`]). A child is `None` when the cluster already
/// holds it as rendered.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub config_map: Option<ConfigMap>,
    pub service: Option<Service>,
    pub deployment: Option<Deployment>,
    pub pdb: PdbStep,
}

impl Plan {
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.config_map.is_none()
            && self.service.is_none()
            && self.deployment.is_none()
            && self.pdb == PdbStep::Leave
    }
}

/// `desired` stamped with its applied hash, unless `existing` carries the
/// same hash and shows no hand edits (`drifted`).
fn stamp<K>(
    existing: Option<&K>,
    mut desired: K,
    drifted: fn(&K, &K) -> bool,
) -> Result<Option<K>, serde_json::Error>
where
    K: kube::Resource + Serialize,
{
    let hash = applied_hash(&desired)?;
    if let Some(e) = existing {
        if e.annotations().get(APPLIED_HASH) == Some(&hash) && !drifted(e, &desired) {
            return Ok(None);
        }
    }
    desired.annotations_mut().insert(APPLIED_HASH.into(), hash);
    Ok(Some(desired))
}

/// Stage plan: the rendered objects against the observed ones.
pub fn plan(rendered: Rendered, observed: &Observed, uid: &str) -> Result<Plan, Error> {
    let step = || -> Result<Plan, serde_json::Error> {
        let pdb = match rendered.pdb {
            Some(pdb) => stamp(observed.pdb.as_ref(), pdb, drift::pdb)?
                .map_or(PdbStep::Leave, |p| PdbStep::Apply(Box::new(p))),
            None if observed
                .pdb
                .as_ref()
                .is_some_and(|p| owned_by(&p.metadata, uid)) =>
            {
                PdbStep::Delete
            }
            None => PdbStep::Leave,
        };
        Ok(Plan {
            config_map: stamp(
                observed.config_map.as_ref(),
                rendered.config_map,
                drift::config_map,
            )?,
            service: stamp(observed.service.as_ref(), rendered.service, drift::service)?,
            deployment: stamp(
                observed.deployment.as_ref(),
                rendered.deployment,
                drift::deployment,
            )?,
            pdb,
        })
    };
    step().map_err(Error::Plan)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::render::tests::inputs;

    fn rendered(replicas: i32) -> Rendered {
        let spec = crate::render::config::tests::spec();
        let secrets = BTreeMap::new();
        let mut i = inputs(&spec, &secrets);
        i.replicas = replicas;
        let config = crate::render::config::render(&spec).expect("config");
        build(&i, &config).expect("renders")
    }

    /// The cluster after a plan's writes (what a server-side apply keeps).
    fn applied(plan: &Plan) -> Observed {
        Observed {
            config_map: plan.config_map.clone(),
            service: plan.service.clone(),
            deployment: plan.deployment.clone(),
            pdb: match &plan.pdb {
                PdbStep::Apply(p) => Some((**p).clone()),
                _ => None,
            },
            ..Observed::default()
        }
    }

    #[test]
    fn a_new_resource_writes_every_child_stamped_with_its_hash() {
        let p = plan(rendered(2), &Observed::default(), "uid-1").expect("plan");
        let cm = p.config_map.as_ref().expect("ConfigMap");
        assert!(cm.annotations().contains_key(APPLIED_HASH));
        assert!(p.service.is_some() && p.deployment.is_some());
        assert!(matches!(p.pdb, PdbStep::Apply(_)));
    }

    #[test]
    fn what_the_cluster_holds_as_rendered_is_not_written_again() {
        let first = plan(rendered(2), &Observed::default(), "uid-1").expect("plan");
        let again = plan(rendered(2), &applied(&first), "uid-1").expect("plan");
        assert!(again.is_empty(), "{again:?}");
    }

    #[test]
    fn a_hand_edit_or_a_spec_change_is_written() {
        let first = plan(rendered(2), &Observed::default(), "uid-1").expect("plan");
        let mut cluster = applied(&first);
        // Someone edits the ConfigMap and keeps our annotation.
        if let Some(cm) = cluster.config_map.as_mut() {
            cm.data = Some(BTreeMap::from([("config.yaml".into(), "x: 1".into())]));
        }
        let p = plan(rendered(2), &cluster, "uid-1").expect("plan");
        assert!(p.config_map.is_some(), "drift repaired");
        assert!(p.service.is_none() && p.deployment.is_none());
        // A new config hash (a rotated Secret) reaches the Deployment.
        let spec = crate::render::config::tests::spec();
        let secrets = BTreeMap::from([("llm-keys".to_string(), "v2".to_string())]);
        let config = crate::render::config::render(&spec).expect("config");
        let r = build(&inputs(&spec, &secrets), &config).expect("renders");
        let p = plan(r, &applied(&first), "uid-1").expect("plan");
        assert!(p.deployment.is_some() && p.config_map.is_none());
    }

    #[test]
    fn an_unwanted_pdb_is_deleted_only_when_ours() {
        let first = plan(rendered(2), &Observed::default(), "uid-1").expect("plan");
        let cluster = applied(&first);
        // One replica: no PDB wanted; ours (owner uid-1) goes.
        let p = plan(rendered(1), &cluster, "uid-1").expect("plan");
        assert_eq!(p.pdb, PdbStep::Delete);
        // Someone else's of that name stays.
        let p = plan(rendered(1), &cluster, "another-uid").expect("plan");
        assert_eq!(p.pdb, PdbStep::Leave);
        let p = plan(rendered(1), &Observed::default(), "uid-1").expect("plan");
        assert_eq!(p.pdb, PdbStep::Leave);
    }
}
