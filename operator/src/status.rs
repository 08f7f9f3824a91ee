//! Status and conditions, computed as a pure function of what was observed.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::{EncryptionStatus, ModelForwarderStatus};
use crate::render::config::Problem;
use crate::render::labels;

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";

/// What the reconciler saw, for [`compute`].
#[derive(Debug, Clone)]
pub struct Observed<'a> {
    /// `metadata.generation` of the ModelForwarder.
    pub generation: Option<i64>,
    /// The forwarder Deployment as last read or applied.
    pub deployment: Option<&'a Deployment>,
    /// `spec.replicas.min`.
    pub min_replicas: i32,
    /// Problems that stopped the objects from being applied.
    pub blocking: &'a [Problem],
    /// Problems that did not (e.g. JWT configured but unsupported).
    pub warnings: &'a [Problem],
    /// Label selector of the pods.
    pub selector: String,
    /// Where the key ring's rotation stands (with `spec.encryption`).
    pub encryption: Option<EncryptionStatus>,
    pub now: Time,
}

/// Whether every pod runs the template that carries `pod_hash`: the
/// rollout finished, with the config and Secret versions this pass sees.
pub fn rolled_out(d: &Deployment, pod_hash: &str) -> bool {
    let carried = d
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(labels::CONFIG_HASH));
    carried.is_some_and(|h| h == pod_hash) && matches!(rollout(d), Rollout::Complete)
}

/// Whether a Deployment has finished rolling out its current template.
fn rollout(d: &Deployment) -> Rollout {
    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let Some(s) = &d.status else {
        return Rollout::InProgress("the Deployment has no status yet".into());
    };
    if s.conditions.iter().flatten().any(|c| {
        c.type_ == "Progressing" && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
    }) {
        return Rollout::Stuck;
    }
    let (updated, total, available) = (
        s.updated_replicas.unwrap_or(0),
        s.replicas.unwrap_or(0),
        s.available_replicas.unwrap_or(0),
    );
    if s.observed_generation < d.metadata.generation {
        Rollout::InProgress("the Deployment controller has not seen the new template yet".into())
    } else if updated < want || total > updated || available < want {
        Rollout::InProgress(format!(
            "{updated} of {want} pods updated, {available} available, {} old",
            total - updated
        ))
    } else {
        Rollout::Complete
    }
}

enum Rollout {
    Complete,
    InProgress(String),
    Stuck,
}

fn condition(type_: &str, ok: bool, reason: &str, message: String, o: &Observed<'_>) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: o.generation,
        last_transition_time: o.now.clone(),
    }
}

/// The operator's part of the status. `previous` supplies transition times:
/// a condition whose status did not change keeps its `lastTransitionTime`,
/// so an unchanged world yields an identical status (and no write).
pub fn compute(o: &Observed<'_>, previous: Option<&ModelForwarderStatus>) -> ModelForwarderStatus {
    let dep_status = o.deployment.and_then(|d| d.status.as_ref());
    let replicas = dep_status.and_then(|s| s.replicas).unwrap_or(0);
    let ready = dep_status.and_then(|s| s.ready_replicas).unwrap_or(0);
    let rollout = o.deployment.map(rollout);

    let mut problems: Vec<Problem> = o.blocking.iter().chain(o.warnings).cloned().collect();
    if matches!(rollout, Some(Rollout::Stuck)) {
        problems.push(Problem::new(
            "RolloutStuck",
            "the Deployment exceeded its progress deadline; see `kubectl describe deployment`",
        ));
    }
    let degraded = match problems.first() {
        Some(first) => condition(
            DEGRADED,
            true,
            first.reason,
            problems
                .iter()
                .map(|p| p.message.as_str())
                .collect::<Vec<_>>()
                .join("; "),
            o,
        ),
        None => condition(DEGRADED, false, "AsExpected", "all is well".into(), o),
    };

    let progressing = if !o.blocking.is_empty() {
        condition(
            PROGRESSING,
            false,
            "Blocked",
            "waiting for a change to the resource or to a referenced Secret".into(),
            o,
        )
    } else {
        match rollout {
            None => condition(
                PROGRESSING,
                true,
                "Creating",
                "creating the Deployment".into(),
                o,
            ),
            Some(Rollout::InProgress(msg)) => condition(PROGRESSING, true, "RollingOut", msg, o),
            Some(Rollout::Stuck) => condition(
                PROGRESSING,
                false,
                "ProgressDeadlineExceeded",
                "the rollout is stuck".into(),
                o,
            ),
            Some(Rollout::Complete) => condition(
                PROGRESSING,
                false,
                "RolloutComplete",
                "all pods run the current config".into(),
                o,
            ),
        }
    };

    let need = o.min_replicas.max(1);
    let ready_cond = if ready >= need {
        condition(
            READY,
            true,
            "MinimumReplicasReady",
            format!("{ready} of {replicas} pods ready (minimum {need})"),
            o,
        )
    } else {
        condition(
            READY,
            false,
            "WaitingForReplicas",
            format!("{ready} of {replicas} pods ready, {need} needed"),
            o,
        )
    };

    let mut conditions = vec![ready_cond, progressing, degraded];
    for c in &mut conditions {
        if let Some(old) = previous
            .into_iter()
            .flat_map(|p| &p.conditions)
            .find(|old| old.type_ == c.type_ && old.status == c.status)
        {
            c.last_transition_time = old.last_transition_time.clone();
        }
    }

    ModelForwarderStatus {
        observed_generation: o.generation,
        replicas: Some(replicas),
        ready_replicas: Some(ready),
        selector: Some(o.selector.clone()),
        conditions,
        encryption: o.encryption.clone(),
        ..ModelForwarderStatus::default()
    }
}

/// The fields of `status` this operator owns, for comparing with what is
/// stored (the autoscaler owns the others).
pub fn owned_part(s: &ModelForwarderStatus) -> ModelForwarderStatus {
    ModelForwarderStatus {
        observed_generation: s.observed_generation,
        replicas: s.replicas,
        ready_replicas: s.ready_replicas,
        selector: s.selector.clone(),
        conditions: s
            .conditions
            .iter()
            .filter(|c| matches!(c.type_.as_str(), READY | PROGRESSING | DEGRADED))
            .cloned()
            .collect(),
        encryption: s.encryption.clone(),
        ..ModelForwarderStatus::default()
    }
}

/// The condition of a type, if present.
pub fn find<'a>(s: Option<&'a ModelForwarderStatus>, type_: &str) -> Option<&'a Condition> {
    s.into_iter()
        .flat_map(|s| &s.conditions)
        .find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn time(secs: i64) -> Time {
        Time(jiff::Timestamp::from_second(secs).expect("valid"))
    }

    fn dep(want: i32, updated: i32, ready: i32, total: i32) -> Deployment {
        Deployment {
            metadata: ObjectMeta {
                generation: Some(2),
                ..ObjectMeta::default()
            },
            spec: Some(DeploymentSpec {
                replicas: Some(want),
                ..DeploymentSpec::default()
            }),
            status: Some(DeploymentStatus {
                observed_generation: Some(2),
                replicas: Some(total),
                updated_replicas: Some(updated),
                ready_replicas: Some(ready),
                available_replicas: Some(ready),
                ..DeploymentStatus::default()
            }),
        }
    }

    fn observed<'a>(
        d: Option<&'a Deployment>,
        blocking: &'a [Problem],
        warnings: &'a [Problem],
    ) -> Observed<'a> {
        Observed {
            generation: Some(7),
            deployment: d,
            min_replicas: 2,
            blocking,
            warnings,
            selector: "a=b".into(),
            encryption: None,
            now: time(1000),
        }
    }

    fn get<'a>(s: &'a ModelForwarderStatus, t: &str) -> &'a Condition {
        find(Some(s), t).expect("condition present")
    }

    #[test]
    fn healthy_rollout_is_ready_and_not_progressing() {
        let d = dep(2, 2, 2, 2);
        let s = compute(&observed(Some(&d), &[], &[]), None);
        assert_eq!(s.observed_generation, Some(7));
        assert_eq!((s.replicas, s.ready_replicas), (Some(2), Some(2)));
        assert_eq!(get(&s, READY).status, "True");
        assert_eq!(get(&s, PROGRESSING).reason, "RolloutComplete");
        assert_eq!(get(&s, DEGRADED).status, "False");
        assert_eq!(get(&s, READY).observed_generation, Some(7));
    }

    #[test]
    fn rolling_out_is_progressing() {
        let d = dep(2, 1, 2, 3);
        let s = compute(&observed(Some(&d), &[], &[]), None);
        assert_eq!(get(&s, PROGRESSING).status, "True");
        assert_eq!(get(&s, PROGRESSING).reason, "RollingOut");
        assert_eq!(get(&s, READY).status, "True");
    }

    #[test]
    fn blocked_is_degraded_with_the_problem() {
        let p = [Problem::new("SecretNotFound", "Secret \"k\" not found")];
        let s = compute(&observed(None, &p, &[]), None);
        let d = get(&s, DEGRADED);
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "SecretNotFound")
        );
        assert!(d.message.contains("not found"));
        assert_eq!(get(&s, PROGRESSING).reason, "Blocked");
        assert_eq!(get(&s, READY).status, "False");
    }

    #[test]
    fn warnings_degrade_but_do_not_block() {
        let w = [Problem::new("JwtUnsupported", "jwt")];
        let d = dep(2, 2, 2, 2);
        let s = compute(&observed(Some(&d), &[], &w), None);
        assert_eq!(get(&s, DEGRADED).reason, "JwtUnsupported");
        assert_eq!(get(&s, READY).status, "True");
        assert_eq!(get(&s, PROGRESSING).reason, "RolloutComplete");
    }

    #[test]
    fn transition_time_is_kept_while_status_holds() {
        let d = dep(2, 2, 2, 2);
        let first = compute(&observed(Some(&d), &[], &[]), None);
        let mut later = observed(Some(&d), &[], &[]);
        later.now = time(5000);
        let second = compute(&later, Some(&first));
        assert_eq!(first, second, "unchanged world, identical status");
        let not_ready = dep(2, 2, 1, 2);
        let mut o = observed(Some(&not_ready), &[], &[]);
        o.now = time(6000);
        let third = compute(&o, Some(&second));
        assert_eq!(get(&third, READY).last_transition_time, time(6000));
        assert_eq!(get(&third, DEGRADED).last_transition_time, time(1000));
    }

    #[test]
    fn owned_part_drops_autoscaler_fields() {
        let mut s = compute(&observed(None, &[], &[]), None);
        s.desired_replicas = Some(9);
        s.conditions.push(Condition {
            type_: "SLOBreached".into(),
            status: "False".into(),
            reason: "x".into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: time(1),
        });
        let owned = owned_part(&s);
        assert_eq!(owned.desired_replicas, None);
        assert_eq!(owned.conditions.len(), 3);
    }
}
