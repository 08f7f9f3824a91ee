//! Stage apply: the plan's writes (server-side apply, one field manager,
//! the children at once), then the replica count under the scaler's
//! manager.

use std::fmt::Debug;

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::plan::{PdbStep, Plan};
use super::{api_err, scale_target, ApiError, Error, Target};
use crate::crd::Replicas;
use crate::render::config::Problem;
use crate::render::config_map_name;
use crate::render::labels::{FIELD_MANAGER, SCALER_FIELD_MANAGER};

/// What the apply stage did, also when it stopped half-way.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// One line per write, for the `Applied` Event.
    pub done: Vec<String>,
    /// The Deployment as last observed or written.
    pub deployment: Option<Deployment>,
    /// Replica count changed: (from, to).
    pub scaled: Option<(Option<i32>, i32)>,
}

async fn write<K>(api: &Api<K>, desired: Option<K>) -> Result<Option<K>, ApiError>
where
    K: Resource<DynamicType = ()> + Serialize + DeserializeOwned + Clone + Debug,
{
    let Some(desired) = desired else {
        return Ok(None);
    };
    let name = desired.name_any();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&desired),
    )
    .await
    .map(Some)
    .map_err(api_err(format!("applying {} {name}", K::kind(&()))))
}

/// Makes the plan's writes; `out` keeps what was done even when a write
/// fails.
pub async fn apply(
    t: &Target,
    plan: Plan,
    replicas: &Replicas,
    out: &mut Applied,
) -> Result<(), ApiError> {
    let (name, apis) = (&t.name, &t.apis);
    // The children are independent: applied at once, not in turn.
    let pdb = async {
        match plan.pdb {
            PdbStep::Apply(pdb) => {
                write(&apis.pdbs, Some(*pdb)).await?;
                Ok(Some(format!("applied PodDisruptionBudget {name}")))
            }
            PdbStep::Delete => {
                apis.pdbs
                    .delete(name, &DeleteParams::default())
                    .await
                    .map_err(api_err(format!("deleting PodDisruptionBudget {name}")))?;
                Ok(Some(format!("deleted PodDisruptionBudget {name}")))
            }
            PdbStep::Leave => Ok(None),
        }
    };
    let (cm, svc, pdb, dep) = futures::try_join!(
        write(&apis.config_maps, plan.config_map),
        write(&apis.services, plan.service),
        pdb,
        write(&apis.deployments, plan.deployment),
    )?;
    if cm.is_some() {
        out.done
            .push(format!("applied ConfigMap {}", config_map_name(name)));
    }
    if svc.is_some() {
        out.done.push(format!("applied Service {name}"));
    }
    out.done.extend(pdb);
    if let Some(applied) = dep {
        out.done.push(format!("applied Deployment {name}"));
        out.deployment = Some(applied);
    }

    // Replicas live under their own field manager, never in the apply
    // above, so applying and scaling do not fight. Decided from the
    // applied Deployment: a new one has the API server's default count.
    let current = out
        .deployment
        .as_ref()
        .and_then(|d| d.spec.as_ref())
        .and_then(|s| s.replicas);
    if let Some(target) = scale_target(current, replicas) {
        let body = serde_json::json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {"replicas": target},
        });
        let patched = apis
            .deployments
            .patch(
                name,
                &PatchParams::apply(SCALER_FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await
            .map_err(api_err(format!("scaling Deployment {name}")))?;
        out.deployment = Some(patched);
        out.scaled = Some((current, target));
    }
    Ok(())
}

/// A failed apply as a Degraded problem, and the error to retry with
/// backoff, if retrying can help.
pub fn refusal(e: ApiError) -> (Problem, Option<Error>) {
    match &e.source {
        // The API server refused an object the schema let through (say an
        // invalid pod label): retrying cannot help, so report and wait.
        kube::Error::Api(status) if matches!(status.code, 400 | 422) => (
            Problem::new("ApplyRejected", format!("{}: {}", e.action, status.message)),
            None,
        ),
        // A refusal that will not heal by itself (a quota, a full Service
        // IP range, an admission webhook): say so in a Degraded condition,
        // and retry with backoff.
        _ => (
            Problem::new("ApplyFailed", e.to_string()),
            Some(Error::Apply(e)),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16) -> ApiError {
        ApiError {
            action: "applying Service bot".into(),
            source: kube::Error::Api(
                kube::core::Status::failure("no room", "Invalid")
                    .with_code(code)
                    .boxed(),
            ),
        }
    }

    #[test]
    fn a_refused_object_waits_and_a_failing_server_is_retried() {
        let (p, retry) = refusal(api_error(422));
        assert_eq!(p.reason, "ApplyRejected");
        assert_eq!(p.message, "applying Service bot: no room");
        assert!(retry.is_none());
        let (p, retry) = refusal(api_error(500));
        assert_eq!(p.reason, "ApplyFailed");
        assert!(p.message.starts_with("applying Service bot: "), "{p:?}");
        assert!(matches!(retry, Some(Error::Apply(_))));
    }
}
