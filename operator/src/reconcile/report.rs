//! Stage status: Events for what was done and for new problems, and the
//! status written only when it changed.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::Resource;

use super::apply::Applied;
use super::{api_err, publish, Context, Error, Target};
use crate::crd::{EncryptionStatus, ModelForwarder};
use crate::render::config::Problem;
use crate::render::labels::{self, FIELD_MANAGER};
use crate::status::{self, Observed};

/// Publishes the Events and writes the status.
pub async fn report(
    ctx: &Context,
    mf: &ModelForwarder,
    t: &Target,
    applied: &Applied,
    blocking: &[Problem],
    warnings: &[Problem],
    encryption: Option<EncryptionStatus>,
) -> Result<(), Error> {
    let regarding = &t.regarding;
    if !applied.done.is_empty() {
        publish(
            ctx,
            regarding,
            EventType::Normal,
            "Applied",
            applied.done.join(", "),
        )
        .await;
    }
    if let Some((from, to)) = applied.scaled {
        let from = from.map_or_else(|| "unset".to_string(), |n| n.to_string());
        let r = &mf.spec.replicas;
        publish(
            ctx,
            regarding,
            EventType::Normal,
            "Scaled",
            format!(
                "Deployment replicas {from} → {to} (min {}, max {})",
                r.min, r.max
            ),
        )
        .await;
    }

    let previous = mf.status.as_ref();
    let new_status = status::compute(
        &Observed {
            generation: mf.metadata.generation,
            deployment: applied.deployment.as_ref(),
            min_replicas: mf.spec.replicas.min,
            blocking,
            warnings,
            selector: labels::selector_string(&t.name),
            encryption,
            now: Time(jiff::Timestamp::now()),
        },
        previous,
    );

    // Events for new problems and for recovery, not for every pass.
    let old = status::find(previous, status::DEGRADED);
    let new = status::find(Some(&new_status), status::DEGRADED);
    if let Some(new) = new {
        let changed = old.is_none_or(|o| {
            o.status != new.status || o.reason != new.reason || o.message != new.message
        });
        if changed && new.status == "True" {
            publish(
                ctx,
                regarding,
                EventType::Warning,
                &new.reason,
                new.message.clone(),
            )
            .await;
        } else if new.status == "False" && old.is_some_and(|o| o.status == "True") {
            publish(
                ctx,
                regarding,
                EventType::Normal,
                "Recovered",
                "no longer degraded".into(),
            )
            .await;
        }
    }

    if previous.map(status::owned_part) == Some(new_status.clone()) {
        return Ok(());
    }
    let name = &t.name;
    let api: Api<ModelForwarder> = Api::namespaced(ctx.client.clone(), &t.ns);
    let body = serde_json::json!({
        "apiVersion": ModelForwarder::api_version(&()),
        "kind": ModelForwarder::kind(&()),
        "metadata": {"name": name},
        "status": new_status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(api_err(format!("writing the status of {name}")))
    .map_err(Error::Status)?;
    Ok(())
}
