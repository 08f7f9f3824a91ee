//! Labels and annotations shared by every object the operator renders.

use std::collections::BTreeMap;

/// Field manager of the operator's server-side applies.
pub const FIELD_MANAGER: &str = "modelforwarder-operator";
/// Field manager that owns only the Deployment's `spec.replicas`.
pub const SCALER_FIELD_MANAGER: &str = "modelforwarder-operator-scaler";

pub const NAME: &str = "app.kubernetes.io/name";
pub const INSTANCE: &str = "app.kubernetes.io/instance";
pub const COMPONENT: &str = "app.kubernetes.io/component";
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const PART_OF: &str = "app.kubernetes.io/part-of";

/// Pod-template annotation: hash of the config and the referenced Secrets'
/// resource versions; a change rolls the pods.
pub const CONFIG_HASH: &str = "llm.forwarder.dev/config-hash";
/// Object annotation: hash of the rendered object, so an unchanged object
/// is not applied again.
pub const APPLIED_HASH: &str = "llm.forwarder.dev/applied-hash";

/// Labels that select one ModelForwarder's pods (Service, PDB, Deployment).
pub fn selector(instance: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (NAME.to_string(), "forwarder".to_string()),
        (INSTANCE.to_string(), instance.to_string()),
    ])
}

/// [`selector`] as a label-selector string, for the scale subresource.
pub fn selector_string(instance: &str) -> String {
    selector(instance)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The full `app.kubernetes.io/*` label set of every rendered object.
pub fn common(instance: &str) -> BTreeMap<String, String> {
    let mut labels = selector(instance);
    labels.insert(COMPONENT.into(), "forwarder".into());
    labels.insert(MANAGED_BY.into(), FIELD_MANAGER.into());
    labels.insert(PART_OF.into(), "modelforwarder".into());
    labels
}

/// Pod labels: the user's extra labels, then ours, so ours cannot be
/// overridden (the selector depends on them).
pub fn pod(instance: &str, extra: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut labels = extra.clone();
    labels.extend(common(instance));
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_labels_name_the_instance() {
        let l = common("support-bot");
        assert_eq!(l[NAME], "forwarder");
        assert_eq!(l[INSTANCE], "support-bot");
        assert_eq!(l[COMPONENT], "forwarder");
        assert_eq!(l[MANAGED_BY], "modelforwarder-operator");
        assert_eq!(l[PART_OF], "modelforwarder");
    }

    #[test]
    fn user_labels_cannot_override_ours() {
        let extra = BTreeMap::from([
            (INSTANCE.to_string(), "evil".to_string()),
            ("team".to_string(), "ai".to_string()),
        ]);
        let l = pod("bot", &extra);
        assert_eq!(l[INSTANCE], "bot");
        assert_eq!(l["team"], "ai");
    }

    #[test]
    fn selector_string_is_sorted_and_stable() {
        assert_eq!(
            selector_string("bot"),
            "app.kubernetes.io/instance=bot,app.kubernetes.io/name=forwarder"
        );
    }
}
