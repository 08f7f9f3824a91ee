//! The PodDisruptionBudget, when there is more than one replica to protect.

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{labels, metadata, Inputs};

/// A PDB allowing one voluntary disruption at a time, when the Deployment
/// has (or is about to have) more than one replica, whatever `min` says;
/// with a single replica a PDB would only block node drains.
pub fn pdb(inputs: &Inputs<'_>) -> Option<PodDisruptionBudget> {
    (inputs.replicas > 1).then(|| PodDisruptionBudget {
        metadata: metadata(inputs, inputs.name.to_string()),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(labels::selector(inputs.name)),
                match_expressions: None,
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::render::config::tests::spec;
    use crate::render::tests::inputs;

    #[test]
    fn only_when_the_replica_count_exceeds_one() {
        let secrets = BTreeMap::new();
        let mut s = spec();
        s.replicas.min = 1;
        assert!(pdb(&inputs(&s, &secrets)).is_none());
        s.replicas.min = 2;
        assert!(pdb(&inputs(&s, &secrets)).is_some());
        // Autoscaled above a min of 1: protected all the same.
        s.replicas.min = 1;
        let mut i = inputs(&s, &secrets);
        i.replicas = 4;
        let p = pdb(&i).expect("pdb");
        let spec = p.spec.expect("spec");
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
        assert_eq!(
            spec.selector.and_then(|s| s.match_labels),
            Some(labels::selector("bot"))
        );
    }
}
