//! The election's requests on the Lease: take or renew it, give it up.

use std::time::Instant;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};

use super::rules::Observed;
use super::LeaderConfig;

fn stamp(cfg: &LeaderConfig) -> MicroTime {
    MicroTime((cfg.wall_clock)())
}

/// One attempt to take or renew the lease. `Ok(true)`: held now.
/// `observed` is this replica's record of when it saw the lease change,
/// updated by the read.
pub(super) async fn try_hold(
    api: &Api<Lease>,
    cfg: &LeaderConfig,
    observed: &mut Option<Observed>,
) -> Result<bool, kube::Error> {
    let duration = i32::try_from(cfg.lease_duration.as_secs()).unwrap_or(i32::MAX);
    let Some(mut lease) = api.get_opt(&cfg.lease_name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(cfg.lease_name.clone()),
                namespace: Some(cfg.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(cfg.identity.clone()),
                lease_duration_seconds: Some(duration),
                acquire_time: Some(stamp(cfg)),
                renew_time: Some(stamp(cfg)),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    let seen = Observed::update(observed.take(), spec, Instant::now());
    let free = seen.available(&cfg.identity, Instant::now());
    *observed = Some(seen);
    if !free {
        return Ok(false);
    }
    if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
        spec.holder_identity = Some(cfg.identity.clone());
        spec.acquire_time = Some(stamp(cfg));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.lease_duration_seconds = Some(duration);
    spec.renew_time = Some(stamp(cfg));
    // resourceVersion in the body: a concurrent writer makes this a 409.
    match update(api, &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Gives the lease up if this replica holds it: no holder, a one-second
/// duration, so a standby takes it at its next look.
pub(super) async fn give_up(api: &Api<Lease>, cfg: &LeaderConfig) -> Result<(), kube::Error> {
    let Some(mut lease) = api.get_opt(&cfg.lease_name).await? else {
        return Ok(());
    };
    let Some(spec) = lease.spec.as_mut() else {
        return Ok(());
    };
    if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(stamp(cfg));
    update(api, &lease).await.map(drop)
}

/// A merge patch of the lease's spec, conditional on the resourceVersion
/// read (a 409 if someone wrote in between). `holderIdentity` is sent even
/// when empty, as `null`, so a release clears it.
async fn update(api: &Api<Lease>, lease: &Lease) -> Result<Lease, kube::Error> {
    let mut spec = serde_json::to_value(lease.spec.clone().unwrap_or_default())
        .map_err(kube::Error::SerdeError)?;
    if let Some(m) = spec.as_object_mut() {
        m.entry("holderIdentity").or_insert(serde_json::Value::Null);
    }
    let body = serde_json::json!({
        "metadata": {"resourceVersion": lease.metadata.resource_version},
        "spec": spec,
    });
    let name = lease.metadata.name.clone().unwrap_or_default();
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&body))
        .await
}
