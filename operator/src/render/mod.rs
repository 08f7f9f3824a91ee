//! Spec → Kubernetes objects, as pure functions.
//!
//! Nothing here talks to the API server: the reconciler gathers the inputs
//! (the resource, the referenced Secrets' resource versions) and applies
//! what these functions return.

pub mod aliases;
pub mod budgets;
pub mod config;
pub mod connections;
pub mod deployment;
pub mod labels;
pub mod pdb;
pub mod service;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use sha2::{Digest, Sha256};

use crate::crd::ModelForwarderSpec;

/// Everything the render functions need besides the forwarder config.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    /// Name of the ModelForwarder; also the instance label and object names.
    pub name: &'a str,
    pub namespace: &'a str,
    /// Controller owner reference to the ModelForwarder, so deletion cascades.
    pub owner: OwnerReference,
    pub spec: &'a ModelForwarderSpec,
    /// Image used when `spec.pod.image` is unset.
    pub default_image: &'a str,
    /// Referenced Secrets: name → hash of their data. Part of the pod hash,
    /// so a rotated key rolls the pods (and a label change does not).
    pub secret_versions: &'a BTreeMap<String, String>,
    /// The Deployment's replica count after this reconcile; the PDB
    /// follows it.
    pub replicas: i32,
    /// The key that encrypts, when the operator names it (a key rotation
    /// in two phases); written to the ConfigMap, outside the pod hash: the
    /// forwarder reloads it from the projected file without a restart.
    pub encryption_primary: Option<&'a str>,
}

/// The objects that run one ModelForwarder.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub config_map: ConfigMap,
    pub deployment: Deployment,
    pub service: Service,
    /// Present only when the replica count exceeds one.
    pub pdb: Option<PodDisruptionBudget>,
}

/// Name of the ConfigMap holding the forwarder config.
pub fn config_map_name(instance: &str) -> String {
    format!("{instance}-config")
}

/// Metadata shared by every rendered object.
pub(crate) fn metadata(inputs: &Inputs<'_>, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(inputs.namespace.to_string()),
        labels: Some(labels::common(inputs.name)),
        owner_references: Some(vec![inputs.owner.clone()]),
        ..ObjectMeta::default()
    }
}

/// Hash of the config text and the referenced Secrets' versions.
pub fn config_hash(config_yaml: &str, secret_versions: &BTreeMap<String, String>) -> String {
    let mut h = Sha256::new();
    h.update(config_yaml.as_bytes());
    for (name, version) in secret_versions {
        h.update(format!("\0secret/{name}={version}").as_bytes());
    }
    hex(&h.finalize()[..16])
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The ConfigMap with the forwarder config.
pub fn config_map(inputs: &Inputs<'_>, config_yaml: &str) -> ConfigMap {
    let mut data = BTreeMap::from([(config::CONFIG_KEY.to_string(), config_yaml.to_string())]);
    if let Some(primary) = inputs.encryption_primary {
        data.insert(config::ENCRYPTION_PRIMARY_KEY.into(), primary.into());
    }
    ConfigMap {
        metadata: metadata(inputs, config_map_name(inputs.name)),
        data: Some(data),
        ..ConfigMap::default()
    }
}

/// The pod hash the Deployment's template carries for this config.
pub fn pod_hash(
    config: &forwarder_config::Config,
    secret_versions: &BTreeMap<String, String>,
) -> Result<String, serde_yaml::Error> {
    Ok(config_hash(&config::to_yaml(config)?, secret_versions))
}

/// Renders every object from the resource and its forwarder config.
pub fn render(
    inputs: &Inputs<'_>,
    config: &forwarder_config::Config,
) -> Result<Rendered, serde_yaml::Error> {
    let yaml = config::to_yaml(config)?;
    let hash = config_hash(&yaml, inputs.secret_versions);
    Ok(Rendered {
        config_map: config_map(inputs, &yaml),
        deployment: deployment::deployment(inputs, &hash),
        service: service::service(inputs),
        pdb: pdb::pdb(inputs),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn owner() -> OwnerReference {
        OwnerReference {
            api_version: "llm.forwarder.dev/v1alpha1".into(),
            kind: "ModelForwarder".into(),
            name: "bot".into(),
            uid: "uid-1".into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }
    }

    pub(crate) fn inputs<'a>(
        spec: &'a ModelForwarderSpec,
        secrets: &'a BTreeMap<String, String>,
    ) -> Inputs<'a> {
        Inputs {
            name: "bot",
            namespace: "ai",
            owner: owner(),
            spec,
            default_image: "ghcr.io/modelforwarder/forwarder:0.1.0",
            secret_versions: secrets,
            replicas: spec.replicas.min,
            encryption_primary: None,
        }
    }

    #[test]
    fn every_object_is_owned_labelled_and_namespaced() {
        let spec = config::tests::spec();
        let secrets = BTreeMap::new();
        let i = inputs(&spec, &secrets);
        let c = config::render(&spec).expect("config");
        let r = render(&i, &c).expect("renders");
        let pdb = r.pdb.expect("min 2 → pdb");
        for meta in [
            &r.config_map.metadata,
            &r.deployment.metadata,
            &r.service.metadata,
            &pdb.metadata,
        ] {
            assert_eq!(meta.namespace.as_deref(), Some("ai"));
            assert_eq!(meta.owner_references, Some(vec![owner()]));
            assert_eq!(
                meta.labels.as_ref().expect("labels")[labels::INSTANCE],
                "bot"
            );
        }
        assert_eq!(r.config_map.metadata.name.as_deref(), Some("bot-config"));
    }

    #[test]
    fn config_map_holds_the_rendered_config() {
        let spec = config::tests::spec();
        let secrets = BTreeMap::new();
        let c = config::render(&spec).expect("config");
        let yaml = config::to_yaml(&c).expect("yaml");
        let cm = config_map(&inputs(&spec, &secrets), &yaml);
        let text = &cm.data.expect("data")["config.yaml"];
        assert_eq!(forwarder_config::load_from_str(text).expect("loads"), c);
    }

    #[test]
    fn hash_changes_with_config_and_secret_versions() {
        let none = BTreeMap::new();
        let v1 = BTreeMap::from([("keys".to_string(), "100".to_string())]);
        let v2 = BTreeMap::from([("keys".to_string(), "101".to_string())]);
        let base = config_hash("a: 1\n", &none);
        assert_eq!(base, config_hash("a: 1\n", &none), "stable");
        assert_ne!(base, config_hash("a: 2\n", &none));
        assert_ne!(config_hash("a: 1\n", &v1), config_hash("a: 1\n", &v2));
        assert_ne!(base, config_hash("a: 1\n", &v1));
    }
}
