//! Stage validate (pure): can the spec, with what was observed, become a
//! working forwarder? Problems that block the apply, problems that only
//! degrade, and the inputs the build needs.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

use super::observe::Observed;
use super::{secret_data_hash, secret_uses, unsupported, Error, SecretUse};
use crate::crd::{ModelForwarder, ModelForwarderSpec};
use crate::render::config::Problem;

/// The resource's namespace and controller owner reference (checked
/// first: observing needs the namespace).
pub fn identity(mf: &ModelForwarder) -> Result<(String, OwnerReference), Error> {
    let ns = mf
        .namespace()
        .ok_or(Error::Validate("metadata.namespace"))?;
    let owner = mf
        .controller_owner_ref(&())
        .ok_or(Error::Validate("metadata.uid"))?;
    Ok((ns, owner))
}

/// What validation concluded.
#[derive(Debug, Clone, Default)]
pub struct Verdict {
    /// The forwarder config, when the spec renders one.
    pub config: Option<forwarder_config::Config>,
    /// Referenced Secrets: name → keyed digest of their data (the pod hash).
    pub secret_versions: BTreeMap<String, String>,
    /// Problems that stop the objects from being applied.
    pub blocking: Vec<Problem>,
    /// Problems reported as Degraded while everything is applied.
    pub warnings: Vec<Problem>,
}

pub(super) fn owned_by(meta: &ObjectMeta, uid: &str) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == uid && o.controller == Some(true))
}

/// Validates the spec against what was observed. `replicas` is the count
/// the Deployment will have after this pass (a PDB of our name is only a
/// conflict when one is wanted).
pub fn validate(
    spec: &ModelForwarderSpec,
    ns: &str,
    uid: &str,
    observed: &Observed,
    replicas: i32,
) -> Verdict {
    let mut v = Verdict::default();
    match crate::render::config::render(spec) {
        Ok(c) => v.config = Some(c),
        Err(problems) => v.blocking.extend(problems),
    }
    secrets(spec, ns, observed, &mut v);
    v.warnings.extend(unsupported(spec));
    v.blocking.extend(name_conflicts(observed, uid, replicas));
    v
}

/// Referenced Secrets: existence, key, and version (for the pod hash).
fn secrets(spec: &ModelForwarderSpec, ns: &str, observed: &Observed, v: &mut Verdict) {
    let mut by_secret: BTreeMap<String, Vec<SecretUse>> = BTreeMap::new();
    for u in secret_uses(spec) {
        by_secret.entry(u.name.clone()).or_default().push(u);
    }
    for (secret_name, uses) in &by_secret {
        let Some(secret) = observed.secrets.get(secret_name).and_then(Option::as_ref) else {
            for u in uses {
                v.blocking.push(Problem::new(
                    "SecretNotFound",
                    format!(
                        "Secret {secret_name:?} ({}) not found in namespace {ns:?}",
                        u.field
                    ),
                ));
            }
            continue;
        };
        for u in uses {
            let Some(key) = &u.key else { continue };
            let has = secret.data.as_ref().is_some_and(|d| d.contains_key(key))
                || secret
                    .string_data
                    .as_ref()
                    .is_some_and(|d| d.contains_key(key));
            if !has {
                v.blocking.push(Problem::new(
                    "SecretKeyNotFound",
                    format!("Secret {secret_name:?} has no key {key:?} ({})", u.field),
                ));
            }
        }
        v.secret_versions
            .insert(secret_name.clone(), secret_data_hash(secret));
    }
}

/// Never take over an object someone else created under our name.
fn name_conflicts(observed: &Observed, uid: &str, replicas: i32) -> Vec<Problem> {
    [
        (
            "Deployment",
            observed.deployment.as_ref().map(|o| &o.metadata),
        ),
        (
            "ConfigMap",
            observed.config_map.as_ref().map(|o| &o.metadata),
        ),
        ("Service", observed.service.as_ref().map(|o| &o.metadata)),
        (
            "PodDisruptionBudget",
            // Only a conflict when we need a PDB of that name.
            observed
                .pdb
                .as_ref()
                .map(|o| &o.metadata)
                .filter(|_| replicas > 1),
        ),
    ]
    .into_iter()
    .filter_map(|(kind, meta)| {
        let meta = meta.filter(|m| !owned_by(m, uid))?;
        Some(Problem::new(
            "NameConflict",
            format!(
                "{kind} {:?} exists and is not owned by this ModelForwarder",
                meta.name.as_deref().unwrap_or_default()
            ),
        ))
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Secret, Service};
    use k8s_openapi::ByteString;

    fn meta(name: &str, owner_uid: Option<&str>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            owner_references: owner_uid.map(|uid| {
                vec![OwnerReference {
                    uid: uid.into(),
                    controller: Some(true),
                    ..OwnerReference::default()
                }]
            }),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn missing_secrets_and_keys_block_and_present_ones_are_hashed() {
        let spec = crate::render::config::tests::spec();
        // `clients` (whole Secret) present; `llm-keys` lacks key `primary`.
        let secret = |key: &str| Secret {
            metadata: ObjectMeta {
                uid: Some("s".into()),
                ..ObjectMeta::default()
            },
            data: Some([(key.to_string(), ByteString(b"v".to_vec()))].into()),
            ..Secret::default()
        };
        let mut observed = Observed {
            secrets: [
                ("clients".to_string(), Some(secret("alice"))),
                ("llm-keys".to_string(), Some(secret("other"))),
            ]
            .into(),
            ..Observed::default()
        };
        let v = validate(&spec, "ai", "uid-1", &observed, 2);
        assert!(v.config.is_some());
        assert_eq!(v.blocking.len(), 1, "{:?}", v.blocking);
        assert_eq!(v.blocking[0].reason, "SecretKeyNotFound");
        assert_eq!(
            v.secret_versions.keys().collect::<Vec<_>>(),
            ["clients", "llm-keys"]
        );
        // Gone altogether: one problem per use, naming the field.
        observed.secrets.insert("llm-keys".into(), None);
        let v = validate(&spec, "ai", "uid-1", &observed, 2);
        assert_eq!(v.blocking[0].reason, "SecretNotFound");
        assert!(v.blocking[0]
            .message
            .contains("spec.upstreams[0].apiKeySecretRef"));
        assert!(!v.secret_versions.contains_key("llm-keys"));
    }

    #[test]
    fn foreign_objects_under_our_names_conflict_and_a_foreign_pdb_only_when_wanted() {
        let spec = crate::render::config::tests::spec();
        let mut observed = Observed {
            secrets: [
                ("clients".to_string(), Some(Secret::default())),
                ("llm-keys".to_string(), None),
            ]
            .into(),
            service: Some(Service {
                metadata: meta("bot", Some("someone-else")),
                ..Service::default()
            }),
            pdb: Some(k8s_openapi::api::policy::v1::PodDisruptionBudget {
                metadata: meta("bot", None),
                ..Default::default()
            }),
            ..Observed::default()
        };
        let conflicts = |observed: &Observed, replicas| {
            validate(&spec, "ai", "uid-1", observed, replicas)
                .blocking
                .into_iter()
                .filter(|p| p.reason == "NameConflict")
                .map(|p| p.message)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            conflicts(&observed, 1),
            vec!["Service \"bot\" exists and is not owned by this ModelForwarder"]
        );
        assert_eq!(
            conflicts(&observed, 2).len(),
            2,
            "the PDB is wanted at 2 replicas"
        );
        // Ours: no conflict.
        observed.service = Some(Service {
            metadata: meta("bot", Some("uid-1")),
            ..Service::default()
        });
        assert_eq!(conflicts(&observed, 1), Vec::<String>::new());
    }

    #[test]
    fn a_spec_that_does_not_render_blocks_with_its_problems_first() {
        let mut spec = crate::render::config::tests::spec();
        spec.upstreams[1].provider = "bedrock".into();
        let v = validate(&spec, "ai", "uid-1", &Observed::default(), 1);
        assert!(v.config.is_none());
        assert_eq!(v.blocking[0].reason, "UnknownProvider");
        // The missing Secrets follow.
        assert!(v.blocking[1..].iter().all(|p| p.reason == "SecretNotFound"));
    }
}
