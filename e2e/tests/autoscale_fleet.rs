//! The closed loop through a real API server (envtest: etcd,
//! kube-apiserver, kube-controller-manager): the autoscaler scales a real
//! Deployment, the real ReplicaSet controller creates and deletes its Pods,
//! and a "fleet" stands in for the kubelet: one local forwarder process per
//! Pod, labelled as the Pod (`namespace`, `pod`, instance), scraped by a
//! real Prometheus, the Pod marked Ready when its forwarder is. Same phases
//! and budget as `autoscale_loop` (issue 14).

use std::collections::BTreeSet;
use std::sync::{Arc, Weak};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::Client;
use operator::autoscale::workload::DeploymentTarget;
use operator::autoscale::ScaleTarget;
use operator::render::labels::{selector, selector_string, FIELD_MANAGER};
use serde_json::json;

use e2e::local::fleet::Fleet;
use e2e::local::scenario::{self, format_sample};
use e2e::local::{checks, presets};

const NAME: &str = "bot";

/// The kubelet's part: a forwarder per Pod of the Deployment, the Pod
/// Ready once its forwarder is. Ends when the fleet is dropped.
fn follow_pods(fleet: Weak<Fleet>, pods: Api<Pod>) {
    tokio::spawn(async move {
        let lp = ListParams::default().labels(&selector_string(NAME));
        while let Some(fleet) = fleet.upgrade() {
            if let Ok(list) = pods.list(&lp).await {
                let live: Vec<&Pod> = list
                    .items
                    .iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_none())
                    .collect();
                let names: BTreeSet<String> = live
                    .iter()
                    .filter_map(|p| p.metadata.name.clone())
                    .collect();
                match fleet.adopt(&names).await {
                    Ok(ready) => {
                        for p in live {
                            let name = p.metadata.name.clone().unwrap_or_default();
                            let marked = p
                                .status
                                .as_ref()
                                .and_then(|s| s.conditions.as_ref())
                                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready"));
                            if ready.contains(&name) && !marked {
                                let status = json!({"status": {
                                    "phase": "Running",
                                    "conditions": [{"type": "Ready", "status": "True"}],
                                }});
                                let _ = pods
                                    .patch_status(
                                        &name,
                                        &PatchParams::default(),
                                        &Patch::Merge(&status),
                                    )
                                    .await;
                            }
                        }
                    }
                    Err(e) => e2e::say(&format!("fleet: {e}")),
                }
            }
            drop(fleet);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}

/// The forwarder Deployment as the reconciler applies it (no replicas:
/// those are the scaler's).
async fn deployment(client: &Client, ns: &str) {
    let labels = selector(NAME);
    let body = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": NAME, "namespace": ns},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "forwarder", "image": "forwarder:test"}]}
            }
        }
    });
    Api::<Deployment>::namespaced(client.clone(), ns)
        .patch(
            NAME,
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Apply(&body),
        )
        .await
        .expect("applying the Deployment");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(envtest),
    ignore = "set KUBEBUILDER_ASSETS: needs a real kube-apiserver"
)]
async fn the_loop_through_a_real_api_server_scales_on_load_not_on_a_failing_upstream_and_holds_bounded(
) {
    let cp = envtest::control_plane();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "fleet").await;
    deployment(&client, &ns).await;

    let s = presets::standard(1);
    let (policy, interval) = (s.policy.clone(), s.interval);
    let (c, n) = (client.clone(), ns.clone());
    let samples = scenario::run_with(
        s,
        (&ns, NAME),
        move |fleet| {
            follow_pods(Arc::downgrade(&fleet), Api::namespaced(c.clone(), &n));
            Ok(Arc::new(DeploymentTarget {
                deployments: Api::namespaced(c.clone(), &n),
                pods: Api::namespaced(c, &n),
                name: NAME.into(),
            }) as Arc<dyn ScaleTarget>)
        },
        |s| e2e::say(&format_sample(s)),
    )
    .await
    .expect("scenario runs");
    checks::issue14_phases(&samples, &policy, interval);
}
