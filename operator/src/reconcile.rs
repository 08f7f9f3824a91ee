//! The control loop: one ModelForwarder in, applied objects, status and
//! Events out.
//!
//! Order of one reconciliation: read the referenced Secrets and the owned
//! objects; decide whether the spec can work; apply
//! (server-side, one field manager) only the objects whose rendered form
//! changed; keep the replica count within bounds under a second field
//! manager; write status only when it changed; publish Events for what was
//! done and for new problems.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::core::error_boundary::InvalidObject;
use kube::core::{DeserializeGuard, PartialObjectMeta};
use kube::runtime::controller::Action;
use kube::runtime::events::{EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::crd::{ModelForwarder, ModelForwarderSpec, Replicas};
use crate::drift;
use crate::render::config::Problem;
use crate::render::labels::{APPLIED_HASH, FIELD_MANAGER, SCALER_FIELD_MANAGER};
use crate::render::{self, config_map_name, labels, Inputs};
use crate::status::{self, Observed};
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
}

/// Why a reconciliation failed; it is retried with [`backoff`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{action}: {source}")]
    Api {
        action: String,
        #[source]
        source: kube::Error,
    },
    #[error("serialising the forwarder config: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("serialising an object: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the ModelForwarder has no {0}")]
    MissingField(&'static str),
    #[error("the reconciliation did not finish within {0:?} (an API call hung?)")]
    Timeout(Duration),
}

impl Error {
    /// Low-cardinality label for the errors metric.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Api { .. } => "api",
            Error::Yaml(_) | Error::Json(_) => "serialise",
            Error::MissingField(_) => "missing_field",
            Error::Timeout(_) => "timeout",
        }
    }
}

fn api_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let action = action.into();
    move |source| Error::Api { action, source }
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

/// Hash of a rendered object, stored on it so an unchanged object is not
/// applied again.
pub fn applied_hash<K: Serialize>(obj: &K) -> Result<String, serde_json::Error> {
    let bytes = serde_json::to_vec(obj)?;
    Ok(render::hex(&Sha256::digest(&bytes)[..16]))
}

/// Applies `desired` unless `existing` carries the same applied hash and
/// shows no hand edits (`drifted`). Returns the applied object when it wrote.
async fn ensure<K>(
    api: &Api<K>,
    existing: Option<&K>,
    mut desired: K,
    drifted: fn(&K, &K) -> bool,
) -> Result<Option<K>, Error>
where
    K: Resource<DynamicType = ()> + Serialize + DeserializeOwned + Clone + Debug,
{
    let hash = applied_hash(&desired)?;
    if let Some(e) = existing {
        if e.annotations().get(APPLIED_HASH) == Some(&hash) && !drifted(e, &desired) {
            return Ok(None);
        }
    }
    desired.annotations_mut().insert(APPLIED_HASH.into(), hash);
    let name = desired.name_any();
    let applied = api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&desired),
        )
        .await
        .map_err(api_err(format!("applying {} {name}", K::kind(&()))))?;
    Ok(Some(applied))
}

async fn get<K>(api: &Api<K>, name: &str) -> Result<Option<K>, Error>
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Clone + Debug,
{
    api.get_opt(name)
        .await
        .map_err(api_err(format!("reading {} {name}", K::kind(&()))))
}

/// A child from the controller's cache; a GET only when the cache has no
/// such object and the name caches do not show the name free (a foreign
/// object the labelled watch cannot see must be detected rather than taken
/// over; before the name caches are listed, every miss is a GET).
async fn cached<K>(
    caches: Option<&Caches>,
    store: fn(&Caches) -> &Store<K>,
    api: &Api<K>,
    ns: &str,
    name: &str,
) -> Result<Option<K>, Error>
where
    K: NamedIn + DeserializeOwned + Debug,
{
    if let Some(c) = caches {
        if let Some(obj) = store(c).get(&ObjectRef::new(name).within(ns)) {
            return Ok(Some((*obj).clone()));
        }
        if let Some(names) = c.names.as_ref() {
            let listed = names.ready.load(std::sync::atomic::Ordering::Acquire);
            let r = ObjectRef::<PartialObjectMeta<K>>::new(name).within(ns);
            if listed && K::store(names).get(&r).is_none() {
                return Ok(None);
            }
        }
    }
    get(api, name).await
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

fn owned_by(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, uid: &str) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == uid && o.controller == Some(true))
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

/// Reconciles one valid ModelForwarder.
pub async fn reconcile_one(mf: &ModelForwarder, ctx: &Context) -> Result<Action, Error> {
    // Owner references cascade the deletion; nothing to clean up by hand
    // but the retry state.
    if mf.metadata.deletion_timestamp.is_some() {
        ctx.failures
            .clear(&(mf.namespace().unwrap_or_default(), mf.name_any()));
        return Ok(Action::await_change());
    }
    let name = mf.name_any();
    let ns = mf
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let owner = mf
        .controller_owner_ref(&())
        .ok_or(Error::MissingField("metadata.uid"))?;
    let uid = owner.uid.clone();
    let regarding = mf.object_ref(&());
    let client = ctx.client.clone();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);

    let mut blocking: Vec<Problem> = Vec::new();
    let mut warnings: Vec<Problem> = Vec::new();

    let config = match render::config::render(&mf.spec) {
        Ok(c) => Some(c),
        Err(problems) => {
            blocking.extend(problems);
            None
        }
    };

    // Referenced Secrets: existence, key, and version (for the pod hash).
    let mut by_secret: BTreeMap<String, Vec<SecretUse>> = BTreeMap::new();
    for u in secret_uses(&mf.spec) {
        by_secret.entry(u.name.clone()).or_default().push(u);
    }
    let mut secret_versions = BTreeMap::new();
    // Read at once, not one after the other.
    let read = futures::future::try_join_all(
        by_secret
            .keys()
            .map(|secret_name| get(&secrets, secret_name)),
    )
    .await?;
    for ((secret_name, uses), secret) in by_secret.iter().zip(read) {
        let Some(secret) = secret else {
            for u in uses {
                blocking.push(Problem::new(
                    "SecretNotFound",
                    format!(
                        "Secret {secret_name:?} ({}) not found in namespace {ns:?}",
                        u.field
                    ),
                ));
            }
            continue;
        };
        for u in uses {
            let Some(key) = &u.key else { continue };
            let has = secret.data.as_ref().is_some_and(|d| d.contains_key(key))
                || secret
                    .string_data
                    .as_ref()
                    .is_some_and(|d| d.contains_key(key));
            if !has {
                blocking.push(Problem::new(
                    "SecretKeyNotFound",
                    format!("Secret {secret_name:?} has no key {key:?} ({})", u.field),
                ));
            }
        }
        secret_versions.insert(secret_name.clone(), secret_data_hash(&secret));
    }

    warnings.extend(unsupported(&mf.spec));

    let cm_name = config_map_name(&name);
    let caches = ctx.caches.as_ref();
    // Cache misses (a first reconcile) are read at once, not in turn.
    let (existing_dep, existing_cm, existing_svc) = futures::try_join!(
        cached(caches, |c| &c.deployments, &deployments, &ns, &name),
        cached(caches, |c| &c.config_maps, &config_maps, &ns, &cm_name),
        cached(caches, |c| &c.services, &services, &ns, &name),
    )?;
    // The replica count the Deployment will have after this pass: the PDB
    // follows it (one replica needs no PDB; an autoscaled pool does).
    let current_replicas = existing_dep
        .as_ref()
        .and_then(|d| d.spec.as_ref())
        .and_then(|s| s.replicas);
    let replicas = scale_target(current_replicas, &mf.spec.replicas)
        .or(current_replicas)
        .unwrap_or(mf.spec.replicas.min);
    // Without a PDB to apply, only our own (labelled, cached) one matters:
    // it is deleted. No GET for a name we do not need.
    let existing_pdb = match (caches, replicas > 1) {
        (Some(c), false) => c
            .pdbs
            .get(&ObjectRef::new(&name).within(&ns))
            .map(|p| (*p).clone()),
        _ => cached(caches, |c| &c.pdbs, &pdbs, &ns, &name).await?,
    };
    // Never take over an object someone else created under our name.
    for (kind, meta) in [
        ("Deployment", existing_dep.as_ref().map(|o| &o.metadata)),
        ("ConfigMap", existing_cm.as_ref().map(|o| &o.metadata)),
        ("Service", existing_svc.as_ref().map(|o| &o.metadata)),
        (
            "PodDisruptionBudget",
            // Only a conflict when we need a PDB of that name.
            existing_pdb
                .as_ref()
                .map(|o| &o.metadata)
                .filter(|_| replicas > 1),
        ),
    ] {
        if let Some(meta) = meta.filter(|m| !owned_by(m, &uid)) {
            blocking.push(Problem::new(
                "NameConflict",
                format!(
                    "{kind} {:?} exists and is not owned by this ModelForwarder",
                    meta.name.as_deref().unwrap_or_default()
                ),
            ));
        }
    }

    let mut deployment = existing_dep;
    let mut apply_error: Option<Error> = None;
    let mut done: Vec<String> = Vec::new();
    let mut scaled: Option<(Option<i32>, i32)> = None;
    if let (true, Some(config)) = (blocking.is_empty(), config) {
        let applied: Result<(), Error> = async {
            let inputs = Inputs {
                name: &name,
                namespace: &ns,
                owner,
                spec: &mf.spec,
                default_image: &ctx.default_image,
                secret_versions: &secret_versions,
                replicas,
            };
            let r = render::render(&inputs, &config)?;
            // The children are independent: applied at once, not in turn.
            let pdb = async {
                if let Some(pdb) = r.pdb {
                    let applied = ensure(&pdbs, existing_pdb.as_ref(), pdb, drift::pdb).await?;
                    Ok(applied.map(|_| format!("applied PodDisruptionBudget {name}")))
                } else if existing_pdb
                    .as_ref()
                    .is_some_and(|p| owned_by(&p.metadata, &uid))
                {
                    pdbs.delete(&name, &DeleteParams::default())
                        .await
                        .map_err(api_err(format!("deleting PodDisruptionBudget {name}")))?;
                    Ok(Some(format!("deleted PodDisruptionBudget {name}")))
                } else {
                    Ok(None)
                }
            };
            let (cm, svc, pdb, dep) = futures::try_join!(
                ensure(
                    &config_maps,
                    existing_cm.as_ref(),
                    r.config_map,
                    drift::config_map,
                ),
                ensure(&services, existing_svc.as_ref(), r.service, drift::service),
                pdb,
                ensure(
                    &deployments,
                    deployment.as_ref(),
                    r.deployment,
                    drift::deployment,
                ),
            )?;
            if cm.is_some() {
                done.push(format!("applied ConfigMap {cm_name}"));
            }
            if svc.is_some() {
                done.push(format!("applied Service {name}"));
            }
            done.extend(pdb);
            if let Some(applied) = dep {
                done.push(format!("applied Deployment {name}"));
                deployment = Some(applied);
            }

            // Replicas live under their own field manager, never in the apply
            // above, so applying and scaling do not fight.
            let current = deployment
                .as_ref()
                .and_then(|d| d.spec.as_ref())
                .and_then(|s| s.replicas);
            if let Some(target) = scale_target(current, &mf.spec.replicas) {
                let body = serde_json::json!({
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "metadata": {"name": name},
                    "spec": {"replicas": target},
                });
                let patched = deployments
                    .patch(
                        &name,
                        &PatchParams::apply(SCALER_FIELD_MANAGER).force(),
                        &Patch::Apply(&body),
                    )
                    .await
                    .map_err(api_err(format!("scaling Deployment {name}")))?;
                deployment = Some(patched);
                scaled = Some((current, target));
            }
            Ok(())
        }
        .await;
        match applied {
            Ok(()) => {}
            // The API server refused an object the schema let through (say an
            // invalid pod label): retrying cannot help, so report and wait.
            Err(Error::Api {
                action,
                source: kube::Error::Api(status),
            }) if matches!(status.code, 400 | 422) => {
                blocking.push(Problem::new(
                    "ApplyRejected",
                    format!("{action}: {}", status.message),
                ));
            }
            // A refusal that will not heal by itself (a quota, a full
            // Service IP range, an admission webhook): say so in a Degraded
            // condition, and retry with backoff.
            Err(e @ Error::Api { .. }) => {
                blocking.push(Problem::new("ApplyFailed", e.to_string()));
                apply_error = Some(e);
            }
            Err(e) => return Err(e),
        }
    }

    if !done.is_empty() {
        publish(
            ctx,
            &regarding,
            EventType::Normal,
            "Applied",
            done.join(", "),
        )
        .await;
    }
    if let Some((from, to)) = scaled {
        let from = from.map_or_else(|| "unset".to_string(), |n| n.to_string());
        let r = &mf.spec.replicas;
        publish(
            ctx,
            &regarding,
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
            deployment: deployment.as_ref(),
            min_replicas: mf.spec.replicas.min,
            blocking: &blocking,
            warnings: &warnings,
            selector: labels::selector_string(&name),
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
                &regarding,
                EventType::Warning,
                &new.reason,
                new.message.clone(),
            )
            .await;
        } else if new.status == "False" && old.is_some_and(|o| o.status == "True") {
            publish(
                ctx,
                &regarding,
                EventType::Normal,
                "Recovered",
                "no longer degraded".into(),
            )
            .await;
        }
    }

    if previous.map(status::owned_part) != Some(new_status.clone()) {
        let api: Api<ModelForwarder> = Api::namespaced(client, &ns);
        let body = serde_json::json!({
            "apiVersion": ModelForwarder::api_version(&()),
            "kind": ModelForwarder::kind(&()),
            "metadata": {"name": name},
            "status": new_status,
        });
        api.patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(api_err(format!("writing the status of {name}")))?;
    }

    let key = (ns.clone(), name.clone());
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
