//! Opt-in (`--prometheus-rules`): a PrometheusRule per ModelForwarder with
//! its SLO alerts, for clusters running the prometheus-operator. Routed to
//! the operator's `/alerts` webhook, the alerts make the autoscaler
//! evaluate at once; they also page humans like any other alert.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use serde_json::{json, Value};

use super::metrics::{default_selector, validate_selector};
use super::workload::AUTOSCALER_FIELD_MANAGER;
use crate::crd::ModelForwarder;
use crate::render::labels::common;

pub fn api_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "monitoring.coreos.com",
        "v1",
        "PrometheusRule",
    ))
}

/// The rule object for a resource (pure). A `metricsSelector` that is not
/// label matchers is never spliced in: the default selector stands in (the
/// autoscaler does not apply rules for such a resource, and reports it).
pub fn render(mf: &ModelForwarder) -> Value {
    let ns = mf.namespace().unwrap_or_default();
    let name = mf.name_any();
    let sel = mf
        .spec
        .scaling
        .metrics_selector
        .as_deref()
        .and_then(|s| validate_selector(s).ok())
        .unwrap_or_else(|| default_selector(&ns, &name));
    let slo = &mf.spec.slo;
    let labels = json!({"severity": "warning", "modelforwarder": name, "namespace": ns});
    let owner = mf.meta().uid.as_ref().map(|uid| OwnerReference {
        api_version: ModelForwarder::api_version(&()).into(),
        kind: ModelForwarder::kind(&()).into(),
        name: name.clone(),
        uid: uid.clone(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    });
    let mut rules = vec![
        json!({
            "alert": "ModelForwarderP99High",
            "expr": format!(
                "histogram_quantile(0.99, sum by (le) (rate(forwarder_request_duration_seconds_bucket{{{sel}}}[5m]))) * 1000 > {}",
                slo.p99_latency_ms
            ),
            "for": "2m",
            "labels": labels,
            "annotations": {
                "summary": format!("{name}: P99 latency above {} ms", slo.p99_latency_ms),
                "description": "The forwarder's P99 latency breaches its SLO; the operator re-evaluates replicas when this fires.",
            },
        }),
        json!({
            "alert": "ModelForwarderErrorRateHigh",
            "expr": format!(
                r#"sum(rate(forwarder_requests_total{{{sel},code=~"5.."}}[5m])) / sum(rate(forwarder_requests_total{{{sel}}}[5m])) > {}"#,
                slo.max_error_rate
            ),
            "for": "2m",
            "labels": labels,
            "annotations": {
                "summary": format!("{name}: error rate above {}", slo.max_error_rate),
                "description": "More 5xx answers than the SLO allows.",
            },
        }),
    ];
    rules.extend(slo.ttft_p99_ms.map(|ttft| json!({
                "alert": "ModelForwarderTtftHigh",
                "expr": format!(
                    "histogram_quantile(0.99, sum by (le) (rate(forwarder_time_to_first_token_seconds_bucket{{{sel}}}[5m]))) * 1000 > {ttft}"
                ),
                "for": "2m",
                "labels": labels,
                "annotations": {
                    "summary": format!("{name}: P99 time to first token above {ttft} ms"),
                    "description": "Streams wait too long for their first token; the operator re-evaluates replicas when this fires.",
                },
            })));
    // The backlog over the rate jobs finish at: how long the queue takes to
    // drain at the current pace (infinite, so firing, when jobs wait and
    // none finish). Only with Kafka, as the autoscaler reads it.
    let queue_slo = slo
        .max_queue_delay_seconds
        .filter(|_| mf.spec.async_jobs.is_some());
    rules.extend(queue_slo.map(|delay| json!({
                "alert": "ModelForwarderQueueDelayHigh",
                "expr": format!(
                    r#"sum(forwarder_queue_depth{{{sel}}}) / sum(rate(forwarder_jobs_total{{{sel},state=~"succeeded|failed"}}[5m])) > {delay}"#
                ),
                "for": "2m",
                "labels": labels,
                "annotations": {
                    "summary": format!("{name}: async jobs would wait more than {delay} s"),
                    "description": "The async queue's backlog takes longer than spec.slo.maxQueueDelaySeconds to drain at the rate jobs finish; the operator re-evaluates replicas when this fires.",
                },
            })));
    json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": format!("{name}-slo"),
            "namespace": ns,
            "labels": common(&name),
            "ownerReferences": owner.into_iter().collect::<Vec<_>>(),
        },
        "spec": {"groups": [{
            "name": format!("modelforwarder-{name}"),
            "rules": rules,
        }]},
    })
}

/// Why a rule was not applied.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error("a PrometheusRule {0:?} exists and is not owned by this ModelForwarder: left alone")]
    NameConflict(String),
    #[error("reading PrometheusRule {name}: {source}")]
    Read { name: String, source: kube::Error },
    #[error("applying PrometheusRule {name}: {source}")]
    Apply { name: String, source: kube::Error },
}

/// Whether the API server serves PrometheusRules (the prometheus-operator
/// CRDs are installed). Asked once, when the autoscaler starts.
pub async fn available(client: &Client) -> bool {
    let gvk = GroupVersionKind::gvk("monitoring.coreos.com", "v1", "PrometheusRule");
    kube::discovery::pinned_kind(client, &gvk).await.is_ok()
}

/// Whether `meta` is controlled by the resource with this UID.
fn controlled_by(meta: &kube::api::ObjectMeta, uid: Option<&str>) -> bool {
    uid.is_some_and(|uid| {
        meta.owner_references
            .iter()
            .flatten()
            .any(|o| o.uid == uid && o.controller == Some(true))
    })
}

/// Applies the rule under the autoscaler's field manager (apart from the
/// reconciler's, which owns the children), unless a rule of
/// that name exists that this resource does not control (a user's rule is
/// never overwritten, nor garbage-collected with the resource).
pub async fn apply(client: Client, mf: &ModelForwarder, rule: &Value) -> Result<(), RuleError> {
    let ns = mf.namespace().unwrap_or_default();
    let api: Api<DynamicObject> = Api::namespaced_with(client, &ns, &api_resource());
    let name = format!("{}-slo", mf.name_any());
    let existing = api.get_opt(&name).await.map_err(|source| RuleError::Read {
        name: name.clone(),
        source,
    })?;
    if existing.is_some_and(|e| !controlled_by(&e.metadata, mf.meta().uid.as_deref())) {
        return Err(RuleError::NameConflict(name));
    }
    api.patch(
        &name,
        &PatchParams::apply(AUTOSCALER_FIELD_MANAGER).force(),
        &Patch::Apply(rule),
    )
    .await
    .map(|_| ())
    .map_err(|source| RuleError::Apply { name, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_carry_the_slo_and_name_the_resource_for_the_webhook() {
        let mf: ModelForwarder = serde_json::from_value(json!({
            "apiVersion": "llm.forwarder.dev/v1alpha1", "kind": "ModelForwarder",
            "metadata": {"name": "bot", "namespace": "ai", "uid": "u-1"},
            "spec": {"upstreams": [{"name": "m", "provider": "mock", "models": ["mock"]}],
                     "slo": {"p99LatencyMs": 400, "maxErrorRate": 0.02, "targetQpsPerReplica": 50}}
        }))
        .unwrap();
        let r = render(&mf);
        assert_eq!(r["metadata"]["name"], "bot-slo");
        assert_eq!(r["metadata"]["ownerReferences"][0]["uid"], "u-1");
        let rules = r["spec"]["groups"][0]["rules"].as_array().unwrap();
        let p99 = rules[0]["expr"].as_str().unwrap();
        assert!(
            p99.contains(r#"{namespace="ai",app_kubernetes_io_instance="bot"}"#)
                && p99.ends_with("> 400"),
            "{p99}"
        );
        assert!(rules[1]["expr"].as_str().unwrap().ends_with("> 0.02"));
        // The labels the webhook reads to pick the resource.
        assert_eq!(rules[0]["labels"]["modelforwarder"], "bot");
        assert_eq!(rules[0]["labels"]["namespace"], "ai");
        assert_eq!(api_resource().plural, "prometheusrules");
        assert_eq!(rules.len(), 2, "no TTFT alert without a TTFT SLO");
    }

    #[test]
    fn a_queue_slo_adds_the_queue_delay_alert() {
        let mf: ModelForwarder = serde_json::from_value(json!({
            "apiVersion": "llm.forwarder.dev/v1alpha1", "kind": "ModelForwarder",
            "metadata": {"name": "bot", "namespace": "ai", "uid": "u-1"},
            "spec": {"upstreams": [{"name": "m", "provider": "mock", "models": ["mock"]}],
                     "async": {"bootstrapServers": ["kafka:9092"]},
                     "slo": {"maxQueueDelaySeconds": 90}}
        }))
        .unwrap();
        let r = render(&mf);
        let rules = r["spec"]["groups"][0]["rules"].as_array().unwrap();
        let queue = rules
            .iter()
            .find(|r| r["alert"] == "ModelForwarderQueueDelayHigh")
            .expect("queue alert");
        let expr = queue["expr"].as_str().unwrap();
        assert_eq!(
            expr,
            r#"sum(forwarder_queue_depth{namespace="ai",app_kubernetes_io_instance="bot"}) / sum(rate(forwarder_jobs_total{namespace="ai",app_kubernetes_io_instance="bot",state=~"succeeded|failed"}[5m])) > 90"#
        );
        assert_eq!(queue["labels"]["modelforwarder"], "bot");
    }

    #[test]
    fn a_ttft_slo_adds_its_alert_and_a_bad_selector_is_never_spliced() {
        let mf: ModelForwarder = serde_json::from_value(json!({
            "apiVersion": "llm.forwarder.dev/v1alpha1", "kind": "ModelForwarder",
            "metadata": {"name": "bot", "namespace": "ai", "uid": "u-1"},
            "spec": {"upstreams": [{"name": "m", "provider": "mock", "models": ["mock"]}],
                     "slo": {"ttftP99Ms": 800},
                     "scaling": {"metricsSelector": "job=\"x\"}) or vector(1) or up{a=\"b\""}}
        }))
        .unwrap();
        let r = render(&mf);
        let rules = r["spec"]["groups"][0]["rules"].as_array().unwrap();
        let ttft = rules[2]["expr"].as_str().unwrap();
        assert!(
            ttft.contains("forwarder_time_to_first_token_seconds_bucket")
                && ttft.ends_with("> 800"),
            "{ttft}"
        );
        for rule in rules {
            let expr = rule["expr"].as_str().unwrap();
            assert!(!expr.contains("vector(1)"), "{expr}");
        }
    }
}
