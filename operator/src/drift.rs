//! Has someone changed an owned object behind the operator's back?
//!
//! An object whose applied-hash annotation matches the rendered one is not
//! applied again. These checks catch hand edits that leave the annotation in
//! place, on the fields that matter; the API server's defaulting makes a
//! whole-object comparison useless, so each kind compares what we set.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, PodTemplateSpec, Service, Volume};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Our labels and owner references are still on the object.
fn meta_drifted(existing: &ObjectMeta, desired: &ObjectMeta) -> bool {
    !subset(desired.labels.as_ref(), existing.labels.as_ref())
        || existing.owner_references != desired.owner_references
}

fn subset(
    want: Option<&BTreeMap<String, String>>,
    have: Option<&BTreeMap<String, String>>,
) -> bool {
    want.into_iter()
        .flatten()
        .all(|(k, v)| have.and_then(|h| h.get(k)) == Some(v))
}

pub fn config_map(existing: &ConfigMap, desired: &ConfigMap) -> bool {
    meta_drifted(&existing.metadata, &desired.metadata) || existing.data != desired.data
}

pub fn service(existing: &Service, desired: &Service) -> bool {
    let ports = |s: &Service| -> Vec<(Option<String>, i32, Option<String>)> {
        s.spec
            .iter()
            .flat_map(|s| s.ports.iter().flatten())
            .map(|p| {
                let target = p.target_port.as_ref().map(|t| match t {
                    k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i) => {
                        i.to_string()
                    }
                    k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => {
                        s.clone()
                    }
                });
                (p.name.clone(), p.port, target)
            })
            .collect()
    };
    let selector = |s: &Service| s.spec.as_ref().and_then(|s| s.selector.clone());
    meta_drifted(&existing.metadata, &desired.metadata)
        || ports(existing) != ports(desired)
        || selector(existing) != selector(desired)
}

pub fn pdb(existing: &PodDisruptionBudget, desired: &PodDisruptionBudget) -> bool {
    let key = |p: &PodDisruptionBudget| {
        p.spec.as_ref().map(|s| {
            (
                s.max_unavailable.clone(),
                s.min_available.clone(),
                s.selector.clone(),
            )
        })
    };
    meta_drifted(&existing.metadata, &desired.metadata) || key(existing) != key(desired)
}

/// What of a container the operator sets and a hand edit would change.
#[derive(PartialEq)]
struct ContainerKey {
    name: String,
    image: Option<String>,
    command: Option<Vec<String>>,
    args: Option<Vec<String>>,
}

pub fn deployment(existing: &Deployment, desired: &Deployment) -> bool {
    let template = |d: &Deployment| d.spec.as_ref().map(|s| s.template.clone());
    let (Some(have), Some(want)) = (template(existing), template(desired)) else {
        return true;
    };
    let annotations_ok = subset(
        want.metadata.as_ref().and_then(|m| m.annotations.as_ref()),
        have.metadata.as_ref().and_then(|m| m.annotations.as_ref()),
    );
    let labels_ok = subset(
        want.metadata.as_ref().and_then(|m| m.labels.as_ref()),
        have.metadata.as_ref().and_then(|m| m.labels.as_ref()),
    );
    let containers = |t: &PodTemplateSpec| -> Vec<ContainerKey> {
        t.spec
            .iter()
            .flat_map(|s| &s.containers)
            .map(|c: &Container| ContainerKey {
                name: c.name.clone(),
                image: c.image.clone(),
                command: c.command.clone(),
                args: c.args.clone(),
            })
            .collect()
    };
    let volumes = |t: &PodTemplateSpec| -> Vec<String> {
        t.spec
            .iter()
            .flat_map(|s| s.volumes.iter().flatten())
            .map(|v| v.name.clone())
            .collect()
    };
    meta_drifted(&existing.metadata, &desired.metadata)
        || !annotations_ok
        || !labels_ok
        || containers(&have) != containers(&want)
        || volumes(&have) != volumes(&want)
}

/// Trims a cached Deployment to what the reconciler reads (pure): the
/// fields [`deployment`] compares, the template's annotations (the pod
/// hash), the replica count, the metadata and the status. The rest of the
/// pod spec (probes, env, mounts, volume sources, security settings) is
/// most of a Deployment's size and is never read from the cache.
pub fn trim_deployment(d: &mut Deployment) {
    d.metadata.managed_fields = None;
    let Some(pod) = d.spec.as_mut().and_then(|s| {
        s.strategy = None;
        s.template.spec.as_mut()
    }) else {
        return;
    };
    let containers = std::mem::take(&mut pod.containers)
        .into_iter()
        .map(|c| Container {
            name: c.name,
            image: c.image,
            command: c.command,
            args: c.args,
            ..Container::default()
        })
        .collect();
    let volumes = pod.volumes.take().map(|v| {
        v.into_iter()
            .map(|v| Volume {
                name: v.name,
                ..Volume::default()
            })
            .collect()
    });
    *pod = PodSpec {
        containers,
        volumes,
        ..PodSpec::default()
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};

    #[test]
    fn a_trimmed_deployment_compares_as_the_whole_one() {
        use std::collections::BTreeMap;
        let spec = crate::render::config::tests::spec();
        let secrets = BTreeMap::new();
        let inputs = crate::render::tests::inputs(&spec, &secrets);
        let desired = crate::render::deployment::deployment(&inputs, "h1");
        let mut trimmed = desired.clone();
        trim_deployment(&mut trimmed);
        assert!(!deployment(&trimmed, &desired), "as applied: no drift");
        let size = |d: &Deployment| serde_json::to_vec(d).unwrap().len();
        assert!(size(&trimmed) * 2 < size(&desired), "most of it goes");
        let edits: [fn(&mut PodSpec); 3] = [
            |p| p.containers[0].image = Some("other".into()),
            |p| p.containers[0].args = Some(vec!["--x".into()]),
            |p| drop(p.volumes.as_mut().unwrap().pop()),
        ];
        for edit in edits {
            let mut edited = desired.clone();
            edit(
                edited
                    .spec
                    .as_mut()
                    .unwrap()
                    .template
                    .spec
                    .as_mut()
                    .unwrap(),
            );
            trim_deployment(&mut edited);
            assert!(deployment(&edited, &desired), "an edit is still seen");
        }
        let hash = |d: &Deployment| {
            d.spec
                .as_ref()
                .unwrap()
                .template
                .metadata
                .as_ref()
                .unwrap()
                .annotations
                .clone()
        };
        assert_eq!(hash(&trimmed), hash(&desired), "the pod hash stays");
    }

    fn cm(value: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                labels: Some(BTreeMap::from([("a".into(), "1".into())])),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([("config.yaml".into(), value.into())])),
            ..ConfigMap::default()
        }
    }

    #[test]
    fn config_map_edits_are_drift_extra_labels_are_not() {
        let desired = cm("x");
        let mut existing = cm("x");
        existing
            .metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert("added-by-someone".into(), "ok".into());
        assert!(!config_map(&existing, &desired));
        assert!(config_map(&cm("edited"), &desired));
        let mut unlabelled = cm("x");
        unlabelled.metadata.labels = None;
        assert!(config_map(&unlabelled, &desired));
    }

    #[test]
    fn service_port_edits_are_drift_defaults_are_not() {
        let svc = |port: i32, protocol: Option<&str>| Service {
            spec: Some(ServiceSpec {
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port,
                    protocol: protocol.map(Into::into),
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        };
        assert!(
            !service(&svc(8080, Some("TCP")), &svc(8080, None)),
            "server defaults"
        );
        assert!(service(&svc(9999, None), &svc(8080, None)));
    }

    #[test]
    fn deployment_image_or_hash_edits_are_drift() {
        use std::collections::BTreeMap;
        let spec = crate::render::config::tests::spec();
        let secrets = BTreeMap::new();
        let inputs = crate::render::tests::inputs(&spec, &secrets);
        let desired = crate::render::deployment::deployment(&inputs, "h1");
        let mut existing = desired.clone();
        // Server-side defaults and the scaler's replicas are not drift.
        if let Some(s) = existing.spec.as_mut() {
            s.replicas = Some(4);
            s.progress_deadline_seconds = Some(600);
        }
        assert!(!deployment(&existing, &desired));

        let mut edited = existing.clone();
        if let Some(c) = edited
            .spec
            .as_mut()
            .and_then(|s| s.template.spec.as_mut())
            .and_then(|p| p.containers.first_mut())
        {
            c.image = Some("someone/else:latest".into());
        }
        assert!(deployment(&edited, &desired));

        let other_hash = crate::render::deployment::deployment(&inputs, "h2");
        assert!(deployment(&other_hash, &desired));
    }
}
