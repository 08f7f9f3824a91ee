//! The control loop: one ModelForwarder in, applied objects, status and
//! Events out.
//!
//! One reconciliation runs in stages, each a small function with its own
//! error variant: **observe** (the referenced Secrets and the children,
//! from the caches; `observe.rs`) → **validate** (can the spec work; pure,
//! `validate.rs`) → **build** (the objects; pure) → **plan** (which of them
//! must be written; pure, `plan.rs`) → **apply** (server-side, one field
//! manager, the replica count under a second; `apply.rs`) → **status**
//! (Events for what was done and for new problems, the status written only
//! when it changed; `report.rs`).

mod apply;
mod observe;
mod plan;
mod report;
mod rotation;
mod validate;

use plan::{build, plan};
use validate::{validate, Verdict};

use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::Api;
use kube::core::error_boundary::InvalidObject;
use kube::core::{DeserializeGuard, PartialObjectMeta};
use kube::runtime::controller::Action;
use kube::runtime::events::{EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::crd::{ModelForwarder, ModelForwarderSpec, Replicas};
use crate::render::config::Problem;
use crate::render::{self, Inputs};
use crate::telemetry::Metrics;

/// How often a healthy resource is reconciled even without a change.
pub const RESYNC: Duration = Duration::from_secs(300);
/// First retry delay after a failed reconciliation; doubled on each
/// further failure up to [`RETRY_MAX`], with jitter.
pub const RETRY: Duration = Duration::from_secs(1);
/// Longest retry delay.
pub const RETRY_MAX: Duration = Duration::from_secs(300);
/// Bound on one reconciliation, every API call in it included: a hung call
/// frees its slot and is retried with backoff. Below the pods' 30 s
/// termination grace, so a shutdown that waits for the reconciles in
/// flight still releases the lease.
pub const RECONCILE_TIMEOUT: Duration = Duration::from_secs(20);

/// Delay before retry number `failures` (1 = the first): exponential from
/// [`RETRY`] up to [`RETRY_MAX`], times a random factor in [0.75, 1.25) so
/// resources that failed together do not retry together.
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    let base = RETRY.saturating_mul(1 << exp).min(RETRY_MAX);
    let r = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    let factor = 0.75 + (r % 1000) as f64 / 2000.0;
    base.mul_f64(factor)
}

/// The controller's caches of the owned objects: the reconciler reads
/// children from them instead of the API server.
#[derive(Clone)]
pub struct Caches {
    pub deployments: Store<Deployment>,
    pub config_maps: Store<ConfigMap>,
    pub services: Store<Service>,
    pub pdbs: Store<PodDisruptionBudget>,
    /// Names of every object of those kinds (ours or not), once listed.
    pub names: Option<Names>,
}

/// Metadata-only caches of every Deployment, ConfigMap, Service and PDB in
/// the watched namespaces (not only the labelled ones): a name absent
/// from them is absent from the cluster, so a first reconcile needs no GET
/// to tell a free name from a foreign object.
#[derive(Clone)]
pub struct Names {
    pub deployments: Store<PartialObjectMeta<Deployment>>,
    pub config_maps: Store<PartialObjectMeta<ConfigMap>>,
    pub services: Store<PartialObjectMeta<Service>>,
    pub pdbs: Store<PartialObjectMeta<PodDisruptionBudget>>,
    /// Set once all four have had their first full list.
    pub ready: Arc<std::sync::atomic::AtomicBool>,
}

/// A child's kind in the name caches.
pub trait NamedIn: Resource<DynamicType = ()> + Clone + 'static {
    fn store(names: &Names) -> &Store<PartialObjectMeta<Self>>;
}

impl NamedIn for Deployment {
    fn store(n: &Names) -> &Store<PartialObjectMeta<Self>> {
        &n.deployments
    }
}
impl NamedIn for ConfigMap {
    fn store(n: &Names) -> &Store<PartialObjectMeta<Self>> {
        &n.config_maps
    }
}
impl NamedIn for Service {
    fn store(n: &Names) -> &Store<PartialObjectMeta<Self>> {
        &n.services
    }
}
impl NamedIn for PodDisruptionBudget {
    fn store(n: &Names) -> &Store<PartialObjectMeta<Self>> {
        &n.pdbs
    }
}

/// Per-resource retry state: consecutive failures and the note of the last
/// Warning Event, so a repeated failure is not published again.
#[derive(Debug, Default)]
pub struct Failures {
    by_object: Mutex<HashMap<(String, String), (u32, String)>>,
}

impl Failures {
    /// Counts a failure; returns the count and whether `note` differs from
    /// the last one published for the object.
    fn record(&self, key: (String, String), note: &str) -> (u32, bool) {
        let mut m = self.by_object.lock().unwrap_or_else(|e| e.into_inner());
        let e = m.entry(key).or_default();
        e.0 += 1;
        let changed = e.1 != note;
        if changed {
            e.1 = note.to_string();
        }
        (e.0, changed)
    }

    fn clear(&self, key: &(String, String)) {
        let mut m = self.by_object.lock().unwrap_or_else(|e| e.into_inner());
        m.remove(key);
    }
}

/// Shared state of the controller.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    /// Forwarder image when `spec.pod.image` is unset.
    pub default_image: String,
    pub metrics: Metrics,
    /// Children caches; `None`: read children with GETs (a reconcile run
    /// outside the controller).
    pub caches: Option<Caches>,
    pub failures: Failures,
    /// Bound on one reconciliation ([`RECONCILE_TIMEOUT`]).
    pub timeout: Duration,
}

impl Context {
    pub fn new(
        client: Client,
        recorder: Recorder,
        default_image: String,
        metrics: Metrics,
    ) -> Self {
        Self {
            client,
            recorder,
            default_image,
            metrics,
            caches: None,
            failures: Failures::default(),
            timeout: RECONCILE_TIMEOUT,
        }
    }

    /// A context for another controller (one per watched namespace): the
    /// same client, recorder, image, metrics and bound; caches and retry
    /// state of its own.
    pub fn sibling(&self) -> Self {
        let mut ctx = Self::new(
            self.client.clone(),
            self.recorder.clone(),
            self.default_image.clone(),
            self.metrics.clone(),
        );
        ctx.timeout = self.timeout;
        ctx
    }
}

/// A failed API call and what it was for.
#[derive(Debug, thiserror::Error)]
#[error("{action}: {source}")]
pub struct ApiError {
    pub action: String,
    #[source]
    pub source: kube::Error,
}

/// Why a reconciliation failed, one variant per stage; it is retried with
/// [`backoff`]. (A spec that cannot work is no error: it becomes a
/// condition.)
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The resource lacks what every object needs (namespace, UID).
    #[error("the ModelForwarder has no {0}")]
    Validate(&'static str),
    /// Reading the referenced Secrets or the children.
    #[error(transparent)]
    Observe(ApiError),
    /// Rendering the forwarder config.
    #[error("serialising the forwarder config: {0}")]
    Build(#[source] serde_yaml::Error),
    /// Hashing the rendered objects.
    #[error("serialising an object: {0}")]
    Plan(#[source] serde_json::Error),
    /// Writing the children or the replica count.
    #[error(transparent)]
    Apply(ApiError),
    /// Writing the status.
    #[error(transparent)]
    Status(ApiError),
    #[error("the reconciliation did not finish within {0:?} (an API call hung?)")]
    Timeout(Duration),
}

impl Error {
    /// Low-cardinality label for the errors metric.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Observe(_) | Error::Apply(_) | Error::Status(_) => "api",
            Error::Build(_) | Error::Plan(_) => "serialise",
            Error::Validate(_) => "missing_field",
            Error::Timeout(_) => "timeout",
        }
    }
}

fn api_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> ApiError {
    let action = action.into();
    move |source| ApiError { action, source }
}

/// The resource being reconciled and the API handles of its namespace.
struct Target {
    name: String,
    ns: String,
    owner: k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
    regarding: ObjectReference,
    apis: Apis,
}

struct Apis {
    deployments: Api<Deployment>,
    config_maps: Api<ConfigMap>,
    services: Api<Service>,
    pdbs: Api<PodDisruptionBudget>,
    secrets: Api<Secret>,
}

impl Apis {
    fn new(client: &Client, ns: &str) -> Self {
        Self {
            deployments: Api::namespaced(client.clone(), ns),
            config_maps: Api::namespaced(client.clone(), ns),
            services: Api::namespaced(client.clone(), ns),
            pdbs: Api::namespaced(client.clone(), ns),
            secrets: Api::namespaced(client.clone(), ns),
        }
    }
}

/// One use of a Secret by the spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretUse {
    pub name: String,
    /// The key that must exist; `None` when the whole Secret is used.
    pub key: Option<String>,
    /// Spec path of the reference, for messages.
    pub field: String,
}

/// Secrets the forwarder pods mount: their versions are in the pod hash,
/// so a changed Secret also rolls the pods (the forwarder reloads keys and
/// certificates itself before that).
pub fn secret_uses(spec: &ModelForwarderSpec) -> Vec<SecretUse> {
    crate::render::deployment::secret_mounts(spec)
        .into_iter()
        .flat_map(|m| {
            let keys: Vec<Option<String>> = match &m.items {
                None => vec![None],
                Some(items) => items.iter().map(|(k, _)| Some(k.to_string())).collect(),
            };
            keys.into_iter().map(move |key| SecretUse {
                name: m.secret.to_string(),
                key,
                field: m.field.clone(),
            })
        })
        .collect()
}

/// Parts of the spec the forwarder does not implement yet: reported as
/// Degraded, while everything else is deployed. None today (JWT, once
/// reported here as `JwtUnsupported`, is enforced).
pub fn unsupported(_spec: &ModelForwarderSpec) -> Vec<Problem> {
    Vec::new()
}

/// Whether a Secret (by namespace and name) is referenced by a resource.
pub fn references_secret(mf: &ModelForwarder, namespace: &str, name: &str) -> bool {
    mf.namespace().as_deref() == Some(namespace)
        && secret_uses(&mf.spec).iter().any(|u| u.name == name)
}

/// Resources to reconcile when a Secret changes (the controller's mapper;
/// the Secret watch holds metadata only).
pub fn resources_referencing<S: Resource>(
    resources: &[Arc<DeserializeGuard<ModelForwarder>>],
    secret: &S,
) -> Vec<ObjectRef<DeserializeGuard<ModelForwarder>>> {
    let (Some(ns), Some(name)) = (
        secret.meta().namespace.as_deref(),
        secret.meta().name.as_deref(),
    ) else {
        return Vec::new();
    };
    resources
        .iter()
        .filter_map(|g| g.0.as_ref().ok())
        .filter(|mf| references_secret(mf, ns, name))
        .map(|mf| ObjectRef::new(&mf.name_any()).within(ns))
        .collect()
}

/// The replica count to set, if the current one must change: the pinned
/// `desired`, else the current count clamped into `[min, max]`.
pub fn scale_target(current: Option<i32>, r: &Replicas) -> Option<i32> {
    let want = match (r.desired, current) {
        (Some(d), _) => d.clamp(r.min, r.max.max(r.min)),
        (None, None) => r.min,
        (None, Some(c)) => c.clamp(r.min, r.max.max(r.min)),
    };
    (current != Some(want)).then_some(want)
}

/// The replica count the Deployment will have after this pass (the PDB
/// follows it: one replica needs no PDB; an autoscaled pool does).
pub fn replicas_after(current: Option<i32>, r: &Replicas) -> i32 {
    scale_target(current, r).or(current).unwrap_or(r.min)
}

/// Hash of a rendered object, stored on it so an unchanged object is not
/// applied again.
pub fn applied_hash<K: Serialize>(obj: &K) -> Result<String, serde_json::Error> {
    let bytes = serde_json::to_vec(obj)?;
    Ok(render::hex(&Sha256::digest(&bytes)[..16]))
}

/// A keyed digest of a Secret's data (keys and values), for the pods'
/// config hash: a rotated key rolls the pods, a label change does not.
/// HMAC-SHA-256 keyed with the Secret's UID (random, and not visible to
/// whoever may only read pods), so the pod annotation derived from it
/// cannot be brute-forced back to low-entropy data such as a one-key Redis
/// password. A Secret deleted and recreated (a new UID) rolls the pods.
pub fn secret_data_hash(secret: &Secret) -> String {
    let uid = secret.metadata.uid.as_deref().unwrap_or_default();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, uid.as_bytes());
    let mut h = ring::hmac::Context::with_key(&key);
    for (k, v) in secret.data.iter().flatten() {
        h.update(k.as_bytes());
        h.update(&[0]);
        h.update(&v.0);
        h.update(&[0]);
    }
    for (k, v) in secret.string_data.iter().flatten() {
        h.update(k.as_bytes());
        h.update(&[1]);
        h.update(v.as_bytes());
        h.update(&[0]);
    }
    render::hex(&h.sign().as_ref()[..16])
}

/// Publishes an Event off the reconcile path: the reconciliation does not
/// wait for the Events API (an Event that cannot be written is logged).
async fn publish(
    ctx: &Context,
    regarding: &ObjectReference,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let (recorder, regarding, reason) =
        (ctx.recorder.clone(), regarding.clone(), reason.to_string());
    tokio::spawn(async move {
        crate::events::publish(&recorder, &regarding, type_, &reason, "Reconcile", &note).await;
    });
}

/// The controller's entry point: tolerates objects that fail to deserialise.
pub async fn reconcile(
    obj: Arc<DeserializeGuard<ModelForwarder>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let started = Instant::now();
    // `/healthz` fails while a reconciliation outlives its bound.
    let _running = ctx.metrics.reconcile_running();
    let work = async {
        match &obj.0 {
            Ok(mf) => reconcile_one(mf, &ctx).await,
            Err(invalid) => {
                report_invalid(invalid, &ctx).await;
                Ok(Action::await_change())
            }
        }
    };
    let result = tokio::time::timeout(ctx.timeout, work)
        .await
        .unwrap_or(Err(Error::Timeout(ctx.timeout)));
    ctx.metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    let label = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics.reconciles.with_label_values(&[label]).inc();
    result
}

/// Called by the controller after a failed reconciliation.
pub fn error_policy(
    obj: Arc<DeserializeGuard<ModelForwarder>>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    let name = match &obj.0 {
        Ok(mf) => mf.name_any(),
        Err(invalid) => invalid.metadata.name.clone().unwrap_or_default(),
    };
    let namespace = match &obj.0 {
        Ok(mf) => mf.namespace().unwrap_or_default(),
        Err(invalid) => invalid.metadata.namespace.clone().unwrap_or_default(),
    };
    ctx.metrics.errors.with_label_values(&[error.kind()]).inc();
    let note = error.to_string();
    let (failures, changed) = ctx.failures.record((namespace, name.clone()), &note);
    let delay = backoff(failures);
    tracing::warn!(%error, name, failures, retry_in = ?delay, "reconcile failed; retrying");
    // Say it on the resource too, once per distinct error rather than on
    // every retry. The policy is synchronous, so the Event is sent from a
    // task.
    if let (Ok(mf), true) = (&obj.0, changed) {
        let regarding = mf.object_ref(&());
        let note = format!("{note}; retrying with backoff");
        tokio::spawn(async move {
            publish(
                &ctx,
                &regarding,
                EventType::Warning,
                "ReconcileFailed",
                note,
            )
            .await;
        });
    }
    Action::requeue(delay)
}

/// An object that is not a valid ModelForwarder: say so on the object and
/// wait for it to change.
async fn report_invalid(invalid: &InvalidObject, ctx: &Context) {
    ctx.metrics.invalid_objects.inc();
    let m = &invalid.metadata;
    tracing::warn!(name = ?m.name, namespace = ?m.namespace, error = %invalid.error, "invalid ModelForwarder");
    let regarding = ObjectReference {
        api_version: Some(ModelForwarder::api_version(&()).into_owned()),
        kind: Some(ModelForwarder::kind(&()).into_owned()),
        name: m.name.clone(),
        namespace: m.namespace.clone(),
        uid: m.uid.clone(),
        resource_version: m.resource_version.clone(),
        ..ObjectReference::default()
    };
    publish(
        ctx,
        &regarding,
        EventType::Warning,
        "InvalidObject",
        format!("cannot read the resource: {}", invalid.error),
    )
    .await;
}

/// With `spec.encryption`: which key encrypts, given how far the key ring's
/// Secret has rolled out (`rotation.rs`).
fn key_rotation(
    mf: &ModelForwarder,
    observed: &observe::Observed,
    config: &forwarder_config::Config,
    secret_versions: &std::collections::BTreeMap<String, String>,
) -> Result<Option<rotation::Decision>, Error> {
    let Some(e) = &mf.spec.encryption else {
        return Ok(None);
    };
    let Some(Some(secret)) = observed.secrets.get(&e.key_secret_ref.name) else {
        return Ok(None);
    };
    let hash = render::pod_hash(config, secret_versions).map_err(Error::Build)?;
    let rolled_out = observed
        .deployment
        .as_ref()
        .is_some_and(|d| crate::status::rolled_out(d, &hash));
    let previous = mf.status.as_ref().and_then(|s| s.encryption.as_ref());
    Ok(Some(rotation::decide(
        &rotation::Ring::of(secret),
        previous,
        rolled_out,
    )))
}

/// Reconciles one valid ModelForwarder, stage by stage.
pub async fn reconcile_one(mf: &ModelForwarder, ctx: &Context) -> Result<Action, Error> {
    // Owner references cascade the deletion; nothing to clean up by hand
    // but the retry state.
    if mf.metadata.deletion_timestamp.is_some() {
        ctx.failures
            .clear(&(mf.namespace().unwrap_or_default(), mf.name_any()));
        return Ok(Action::await_change());
    }
    let (ns, owner) = validate::identity(mf)?;
    let t = Target {
        name: mf.name_any(),
        apis: Apis::new(&ctx.client, &ns),
        ns,
        owner,
        regarding: mf.object_ref(&()),
    };

    let observed = observe::observe(mf, ctx.caches.as_ref(), &t).await?;
    let replicas = replicas_after(observed.current_replicas(), &mf.spec.replicas);
    let Verdict {
        config,
        secret_versions,
        mut blocking,
        warnings,
    } = validate(&mf.spec, &t.ns, &t.owner.uid, &observed, replicas);

    let mut applied = apply::Applied::default();
    let mut apply_error = None;
    // Blocked: the rotation stands where it stood.
    let mut encryption = mf.status.as_ref().and_then(|s| s.encryption.clone());
    match (blocking.is_empty(), config) {
        (true, Some(config)) => {
            let keys = key_rotation(mf, &observed, &config, &secret_versions)?;
            let inputs = Inputs {
                name: &t.name,
                namespace: &t.ns,
                owner: t.owner.clone(),
                spec: &mf.spec,
                default_image: &ctx.default_image,
                secret_versions: &secret_versions,
                replicas,
                encryption_primary: keys.as_ref().and_then(|k| k.render_primary.as_deref()),
            };
            let plan = plan(build(&inputs, &config)?, &observed, &t.owner.uid)?;
            applied.deployment = observed.deployment;
            if let Err(e) = apply::apply(&t, plan, &mf.spec.replicas, &mut applied).await {
                let (problem, retry) = apply::refusal(e);
                blocking.push(problem);
                apply_error = retry;
            }
            encryption = keys.map(|k| k.status);
        }
        _ => applied.deployment = observed.deployment,
    }

    report::report(ctx, mf, &t, &applied, &blocking, &warnings, encryption).await?;

    let key = (t.ns, t.name);
    if let Some(e) = apply_error {
        // Retried by the error policy, with backoff.
        return Err(e);
    }
    // A name conflict clears when the foreign object goes, which no watch
    // of ours sees (it does not carry our label): look again, backing off.
    if blocking.iter().any(|p| p.reason == "NameConflict") {
        let (failures, _) = ctx.failures.record(key, "NameConflict");
        return Ok(Action::requeue(backoff(failures)));
    }
    ctx.failures.clear(&key);
    // Other blocked resources wait for a change to themselves or to a
    // Secret they reference (both trigger a reconcile).
    Ok(if blocking.is_empty() {
        Action::requeue(RESYNC)
    } else {
        Action::await_change()
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn replicas(min: i32, max: i32, desired: Option<i32>) -> Replicas {
        Replicas { min, max, desired }
    }

    #[test]
    fn scale_target_only_moves_out_of_bounds_counts() {
        let r = replicas(2, 5, None);
        assert_eq!(scale_target(None, &r), Some(2), "absent → min");
        assert_eq!(scale_target(Some(1), &r), Some(2), "below min → min");
        assert_eq!(scale_target(Some(3), &r), None, "within bounds: leave it");
        assert_eq!(scale_target(Some(9), &r), Some(5), "above max → max");
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        for n in 1..=24u32 {
            let base = RETRY.saturating_mul(1 << (n - 1).min(16)).min(RETRY_MAX);
            let d = backoff(n);
            assert!(
                d >= base.mul_f64(0.75) && d < base.mul_f64(1.25),
                "retry {n}: {d:?} not within 25% of {base:?}"
            );
        }
        // Jitter: resources failing together do not retry together.
        let delays: std::collections::BTreeSet<_> = (0..20).map(|_| backoff(3)).collect();
        assert!(delays.len() > 1);
    }

    #[test]
    fn repeated_failures_count_and_publish_once_per_distinct_error() {
        let f = Failures::default();
        let key = ("ns".to_string(), "bot".to_string());
        assert_eq!(f.record(key.clone(), "quota"), (1, true));
        assert_eq!(f.record(key.clone(), "quota"), (2, false));
        assert_eq!(f.record(key.clone(), "webhook"), (3, true));
        f.clear(&key);
        assert_eq!(f.record(key, "webhook"), (1, true));
    }

    #[tokio::test]
    async fn a_hung_api_call_ends_the_reconcile_at_its_bound() {
        use http::{Request, Response};
        use kube::client::Body;
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        // An API server that accepts every request and never answers.
        let holder = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some((_, send)) = handle.next_request().await {
                held.push(send);
            }
        });
        let client = Client::new(svc, "default");
        let recorder = Recorder::new(
            client.clone(),
            kube::runtime::events::Reporter {
                controller: "test".into(),
                instance: None,
            },
        );
        let metrics = Metrics::new().expect("metrics");
        let mut ctx = Context::new(client, recorder, "img".into(), metrics.clone());
        ctx.timeout = Duration::from_millis(300);
        let mut mf = ModelForwarder::new("bot", crate::render::config::tests::spec());
        mf.metadata.namespace = Some("ai".into());
        mf.metadata.uid = Some("u-1".into());
        let started = Instant::now();
        let r = reconcile(Arc::new(DeserializeGuard(Ok(mf))), Arc::new(ctx)).await;
        assert!(matches!(r, Err(Error::Timeout(_))), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(metrics
            .render()
            .contains(r#"modelforwarder_operator_reconciliations_total{result="error"} 1"#));
        holder.abort();
    }

    #[test]
    fn scale_target_honours_a_pinned_count() {
        let r = replicas(2, 5, Some(4));
        assert_eq!(scale_target(Some(3), &r), Some(4));
        assert_eq!(scale_target(Some(4), &r), None);
        assert_eq!(scale_target(None, &r), Some(4));
    }

    #[test]
    fn the_secret_hash_is_keyed_by_the_secrets_uid() {
        use k8s_openapi::ByteString;
        let secret = |uid: &str, password: &str, label: &str| Secret {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                uid: Some(uid.into()),
                labels: Some([("l".to_string(), label.to_string())].into()),
                ..Default::default()
            },
            data: Some([("password".to_string(), ByteString(password.into()))].into()),
            ..Secret::default()
        };
        let a = secret_data_hash(&secret("uid-1", "hunter2", "x"));
        assert_eq!(
            a,
            secret_data_hash(&secret("uid-1", "hunter2", "y")),
            "labels"
        );
        assert_ne!(
            a,
            secret_data_hash(&secret("uid-1", "hunter3", "x")),
            "data"
        );
        assert_ne!(a, secret_data_hash(&secret("uid-2", "hunter2", "x")), "uid");
        // Not the unkeyed digest a pod reader could recompute.
        let mut plain = Sha256::new();
        plain.update(b"password\0hunter2\0");
        assert_ne!(a, render::hex(&plain.finalize()[..16]));
    }

    #[test]
    fn secret_uses_name_their_fields() {
        let spec = crate::render::config::tests::spec();
        let uses = secret_uses(&spec);
        assert_eq!(
            uses,
            vec![
                SecretUse {
                    name: "clients".into(),
                    key: None,
                    field: "spec.auth.apiKeysSecretRef".into()
                },
                SecretUse {
                    name: "llm-keys".into(),
                    key: Some("primary".into()),
                    field: "spec.upstreams[0].apiKeySecretRef".into()
                },
            ]
        );
    }

    #[test]
    fn secret_changes_map_to_the_resources_that_reference_them() {
        let mut a = ModelForwarder::new("a", crate::render::config::tests::spec());
        a.metadata.namespace = Some("ai".into());
        let mut b = a.clone();
        b.metadata.name = Some("b".into());
        b.metadata.namespace = Some("other".into());
        let all = vec![
            Arc::new(DeserializeGuard(Ok(a))),
            Arc::new(DeserializeGuard(Ok(b))),
        ];
        let secret = |ns: &str, name: &str| Secret {
            metadata: kube::api::ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                ..Default::default()
            },
            ..Secret::default()
        };
        let hits = resources_referencing(&all, &secret("ai", "llm-keys"));
        assert_eq!(hits, vec![ObjectRef::new("a").within("ai")]);
        assert!(resources_referencing(&all, &secret("ai", "unrelated")).is_empty());
    }

    #[test]
    fn jwt_and_tls_secrets_are_required_and_tracked() {
        let mut spec = crate::render::config::tests::spec();
        spec.auth = serde_json::from_value(serde_json::json!({
            "jwt": {"issuer": "https://id", "audience": "bot",
                    "jwksSecretRef": {"name": "jwks", "key": "jwks.json"}}
        }))
        .expect("auth");
        spec.tls = serde_json::from_value(serde_json::json!({
            "secretRef": {"name": "mf-tls"},
            "clientCaSecretRef": {"name": "client-ca", "key": "ca.crt"}
        }))
        .expect("tls");
        assert!(unsupported(&spec).is_empty(), "JWT is enforced now");
        let uses = secret_uses(&spec);
        let find = |name: &str| {
            uses.iter()
                .filter(|u| u.name == name)
                .map(|u| (u.key.clone().unwrap_or_default(), u.field.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            find("jwks"),
            vec![("jwks.json".into(), "spec.auth.jwt.jwksSecretRef".into())]
        );
        assert_eq!(
            find("mf-tls"),
            vec![
                ("tls.crt".into(), "spec.tls.secretRef".into()),
                ("tls.key".into(), "spec.tls.secretRef".into())
            ]
        );
        assert_eq!(
            find("client-ca"),
            vec![("ca.crt".into(), "spec.tls.clientCaSecretRef".into())]
        );
    }

    #[test]
    fn applied_hash_tracks_content() {
        let a = ConfigMap::default();
        let mut b = ConfigMap::default();
        assert_eq!(
            applied_hash(&a).expect("hash"),
            applied_hash(&b).expect("hash")
        );
        b.data = Some(BTreeMap::from([("k".into(), "v".into())]));
        assert_ne!(
            applied_hash(&a).expect("hash"),
            applied_hash(&b).expect("hash")
        );
    }
}
