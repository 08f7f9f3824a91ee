//! The `ModelForwarder` custom resource (`llm.forwarder.dev/v1alpha1`).
//!
//! Doc comments on these types become the CRD's OpenAPI descriptions, so
//! `kubectl explain modelforwarder.spec` shows them. Every field has a
//! default or is required, and is validated by the schema (ranges, patterns,
//! list types) or by CEL rules where the schema alone cannot say it.

// Several `printcolumn(...)` share a `type_`; clippy mistakes them for
// duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::core::Duration;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

mod aliases;
mod budgets;

pub use aliases::{AliasTarget, ModelAlias};
pub use budgets::{BudgetLimits, BudgetsSpec, ModelPrice};

/// API group of the resource.
pub const GROUP: &str = "llm.forwarder.dev";

/// Desired state of a forwarder: what it serves, to whom, and within which
/// replica bounds and SLOs.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "llm.forwarder.dev",
    version = "v1alpha1",
    kind = "ModelForwarder",
    plural = "modelforwarders",
    shortname = "mf",
    namespaced,
    status = "ModelForwarderStatus",
    derive = "PartialEq",
    doc = "A ModelForwarder runs a pool of forwarder pods that route LLM requests (HTTP, WebSocket, gRPC) to upstream providers.",
    // The name becomes a Service name (a DNS-1035 label) and a label value.
    validation = kube::core::Rule::new("self.metadata.name.size() <= 63 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')").message("metadata.name must be a DNS-1035 label (lower case, starts with a letter, at most 63 characters): it names the Service"),
    scale(
        spec_replicas_path = ".spec.replicas.desired",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "The Ready condition"
    ),
    printcolumn(
        name = "Degraded",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Degraded\")].status",
        description = "The Degraded condition"
    ),
    printcolumn(
        name = "Pods",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        description = "Pods ready to serve"
    ),
    printcolumn(
        name = "Min",
        type_ = "integer",
        json_path = ".spec.replicas.min",
        description = "Fewest replicas"
    ),
    printcolumn(
        name = "Max",
        type_ = "integer",
        json_path = ".spec.replicas.max",
        description = "Most replicas"
    ),
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".status.desiredReplicas",
        description = "Replicas the operator wants"
    ),
    printcolumn(
        name = "P99ms",
        type_ = "number",
        json_path = ".status.metrics.p99LatencyMs",
        description = "Observed P99 latency in milliseconds"
    ),
    printcolumn(
        name = "QPS",
        type_ = "number",
        json_path = ".status.metrics.qps",
        description = "Observed requests per second"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = api_server_formats)]
#[x_kube(validation = kube::core::Rule::new("!has(self.store) || has(self.encryption) || self.store.allowPlaintext").message("store needs encryption.keySecretRef (or store.allowPlaintext: true)"))]
#[x_kube(validation = kube::core::Rule::new("!has(self.slo) || !has(self.slo.maxQueueDelaySeconds) || has(self.async)").message("slo.maxQueueDelaySeconds needs spec.async (the Kafka queue): the embedded queue keeps each pod's backlog to itself, so more replicas would not drain it"))]
pub struct ModelForwarderSpec {
    /// Protocols the forwarder serves. `http` (simple and OpenAI-compatible
    /// APIs) and `websocket` (`/api/v1/ws`) share the `http` port 8080;
    /// `grpc` adds the `grpc` port 9090. The HTTP listener always runs, since
    /// it also serves health, readiness and metrics.
    #[serde(default = "default_protocols")]
    #[schemars(length(min = 1), extend("x-kubernetes-list-type" = "set"))]
    pub protocols: Vec<Protocol>,

    /// Upstream endpoints. A model is served by every upstream that lists
    /// it, weighted by `weight`. Names are unique.
    #[schemars(
        length(min = 1, max = 32),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"])
    )]
    pub upstreams: Vec<Upstream>,

    /// Client authentication. Absent: the forwarder accepts every request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<Auth>,

    /// Retry policy towards upstreams.
    #[serde(default)]
    pub retry: Retry,

    /// Replica bounds; the operator (and later its autoscaler) keeps the
    /// Deployment's replica count within them.
    #[serde(default)]
    pub replicas: Replicas,

    /// Service-level objectives the autoscaler holds the forwarder to.
    #[serde(default)]
    pub slo: Slo,

    /// How fast the autoscaler may change the replica count.
    #[serde(default)]
    pub scaling: Scaling,

    /// Overrides for the forwarder pods.
    #[serde(default)]
    pub pod: PodOverrides,

    /// TLS on the forwarder's listeners; absent: plain TCP (terminate TLS
    /// in front, or inside a mesh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,

    /// Shared state on Redis (idempotency records, cached answers, shared
    /// rate limits), so the replicas act as one. Absent: each pod keeps
    /// its own in memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreSpec>,

    /// The exact-match response cache, per model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheSpec>,

    /// Per-client rate limits, kept in the store (one limit across the
    /// replicas when `store` is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limits: Option<RateLimits>,

    /// AES-256-GCM for every stored record. Required with `store` unless
    /// `store.allowPlaintext` is true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,

    /// Asynchronous jobs on Kafka (`POST /v1/async/chat/completions`).
    /// Absent: the embedded queue, in each pod (jobs do not survive a
    /// restart).
    #[serde(rename = "async", default, skip_serializing_if = "Option::is_none")]
    pub async_jobs: Option<AsyncSpec>,

    /// Per-client token and spend budgets over the UTC day and the UTC
    /// month, kept in the store: one budget across the replicas with
    /// `store` (Redis), else each pod counts its own. A request that would
    /// pass a limit is refused before it is forwarded (429
    /// `budget_exceeded`); a stream that crosses one finishes and the
    /// overrun is recorded. A client's limits are its own entry in
    /// `clients`, else its tier's in `tiers`, else `default`; without any
    /// it has no budget. Clients read their own figures at
    /// `GET /v1/budget`. Absent: no budgets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budgets: Option<BudgetsSpec>,

    /// Model aliases: a name clients send (not a model some upstream
    /// serves) → targets, each a model of `upstreams`. The first choice is
    /// drawn by weight among the targets weighted above 0; when it fails in
    /// a way that means "try elsewhere" (an upstream 5xx, a 429 or a
    /// timeout after its retries, no healthy endpoint, a prompt too long
    /// for the model) the other targets are tried in their listed order,
    /// never after a stream has begun. Answers name the target that served
    /// them (`x-forwarded-model`); `/v1/models` lists the aliases.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 256))]
    pub models: BTreeMap<String, ModelAlias>,
}

/// Schema fixes for the API server, applied to the whole (inlined) spec:
/// - `format: uint32` is not a Kubernetes format (the API server warns on
///   every apply): unsigned fields become `int32`, their `minimum` (0 or
///   more) stays;
/// - quantities (`x-kubernetes-int-or-string` fields such as
///   `resources.limits.cpu`) get the pattern Kubernetes parses, so
///   `cpu: lots` is refused when the resource is written instead of failing
///   every apply of the Deployment.
pub fn api_server_formats(schema: &mut schemars::Schema) {
    fn walk(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                if m.get("format").and_then(|f| f.as_str()) == Some("uint32") {
                    m.insert("format".into(), "int32".into());
                    m.entry("minimum").or_insert(0.into());
                }
                let quantity = m.get("x-kubernetes-int-or-string") == Some(&true.into())
                    && m.get("description")
                        .and_then(|d| d.as_str())
                        .is_some_and(|d| d.starts_with("Quantity is"));
                if quantity {
                    m.insert("pattern".into(), QUANTITY_PATTERN.into());
                }
                m.values_mut().for_each(walk);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(walk),
            _ => {}
        }
    }
    let mut v = serde_json::Value::from(std::mem::take(schema));
    walk(&mut v);
    *schema = schemars::Schema::try_from(v).unwrap_or_default();
}

/// What `resource.Quantity` accepts (the pattern controller-gen emits).
pub const QUANTITY_PATTERN: &str = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$";

fn default_protocols() -> Vec<Protocol> {
    vec![Protocol::Http]
}

/// A protocol the forwarder serves.
#[derive(
    JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP: the simple API and the OpenAI-compatible API, on port `http` (8080).
    Http,
    /// WebSocket at `/api/v1/ws`, on the same port as `http`.
    Websocket,
    /// gRPC, on port `grpc` (9090).
    Grpc,
}

/// One upstream endpoint.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("!(self.provider in ['openai', 'anthropic']) || has(self.baseUrl)").message("baseUrl is required for provider openai or anthropic"))]
pub struct Upstream {
    /// Unique name, used in metrics, logs and the key's mount path.
    #[schemars(
        length(min = 1, max = 40),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,

    /// The API the upstream speaks: `openai` (any OpenAI-compatible server:
    /// OpenAI, vLLM, Ollama, ...: chat completions, Responses, embeddings),
    /// `anthropic` (an Anthropic Messages server: /v1/messages and
    /// count_tokens) or `mock` (answered inside the forwarder, every API).
    /// Other values are accepted by the schema but reported as Degraded
    /// until the forwarder supports them.
    #[schemars(length(min = 1, max = 32), regex(pattern = r"^[a-z0-9-]+$"))]
    pub provider: String,

    /// Base URL including the API prefix, e.g. `https://api.openai.com/v1`.
    /// Required for `openai` and `anthropic`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = r"^https?://.+"))]
    pub base_url: Option<String>,

    /// Model names this upstream serves.
    #[schemars(length(min = 1, max = 64), extend("x-kubernetes-list-type" = "set"), inner(length(min = 1, max = 253)))]
    pub models: Vec<String>,

    /// Secret key holding this upstream's API key. It is mounted as a file
    /// into the pods, never copied into the ConfigMap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret_ref: Option<SecretKeyRef>,

    /// Share of traffic relative to the model's other upstreams.
    #[serde(default = "default_weight")]
    #[schemars(range(min = 1, max = 1000))]
    pub weight: u32,

    /// Time allowed to open a connection (Go duration, e.g. `2s`).
    #[serde(default = "default_connect_timeout")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$"))]
    pub connect_timeout: Duration,

    /// Per-attempt timeout: until the full answer, or for streams until the
    /// first byte and then between chunks (Go duration, e.g. `60s`).
    #[serde(default = "default_timeout")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$"))]
    pub timeout: Duration,
}

fn default_weight() -> u32 {
    1
}
fn default_connect_timeout() -> Duration {
    std::time::Duration::from_secs(2).into()
}
fn default_timeout() -> Duration {
    std::time::Duration::from_secs(60).into()
}

/// A reference to one key of a Secret in the resource's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// A reference to a whole Secret in the resource's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Client authentication.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Auth {
    /// Secret of client API keys: each key of the Secret is a client name,
    /// its value that client's API key. Mounted into the pods; changes are
    /// picked up by the forwarder and also roll the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_keys_secret_ref: Option<SecretRef>,

    /// JWT bearer-token verification. With `apiKeysSecretRef` too, a
    /// credential is tried as an API key, then as a JWT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<Jwt>,
}

/// JWT verification: exactly one key source (`jwksSecretRef`, `jwksUrl` or
/// `secretRef` for HS256/384/512 shared secrets). Secret-mounted keys are
/// reloaded by the forwarder when the Secret changes (and the pods roll).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("(has(self.jwksSecretRef) ? 1 : 0) + (has(self.jwksUrl) ? 1 : 0) + (has(self.secretRef) ? 1 : 0) == 1").message("exactly one of jwksSecretRef, jwksUrl and secretRef is required"))]
#[x_kube(validation = kube::core::Rule::new("!has(self.secretRef) || self.algorithms.all(a, a.startsWith('HS'))").message("secretRef verifies HS256/HS384/HS512 only"))]
pub struct Jwt {
    /// Required `iss` claim; absent: not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    pub issuer: Option<String>,
    /// A required `aud` value (kept for older resources; see `audiences`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    pub audience: Option<String>,
    /// Accepted `aud` values; a token must name one of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub audiences: Vec<String>,
    /// Accepted signature algorithms; each key verifies only those of its
    /// own type, so `none` and HMAC-with-a-public-key are always refused.
    #[serde(default = "default_jwt_algorithms")]
    #[schemars(length(min = 1, max = 12), extend("x-kubernetes-list-type" = "set"))]
    pub algorithms: Vec<JwtAlgorithm>,
    /// Secret key holding a JSON Web Key Set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_secret_ref: Option<SecretKeyRef>,
    /// URL of the issuer's JWKS, fetched and cached by each pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = r"^https?://"))]
    pub jwks_url: Option<String>,
    /// Secret key holding an HMAC shared secret (HS256/384/512).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
    /// Claim naming the client (scopes rate limits and idempotency); default `sub`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub principal_claim: Option<String>,
    /// Claim listing the models the client may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub models_claim: Option<String>,
    /// Claim holding the client's rate-limit tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub tier_claim: Option<String>,
}

/// A JWT signature algorithm.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum JwtAlgorithm {
    HS256,
    HS384,
    HS512,
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    EdDSA,
}

impl JwtAlgorithm {
    pub fn name(self) -> String {
        format!("{self:?}")
    }
}

fn default_jwt_algorithms() -> Vec<JwtAlgorithm> {
    vec![JwtAlgorithm::RS256]
}

/// TLS on the forwarder's listeners (HTTPS, WSS, gRPC over TLS).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("!self.clientCertPrincipal || has(self.clientCaSecretRef)").message("clientCertPrincipal needs clientCaSecretRef"))]
pub struct Tls {
    /// A `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`), e.g. one that
    /// cert-manager issues and renews; renewals are picked up without
    /// dropping connections.
    pub secret_ref: SecretRef,
    /// Secret key holding the CA bundle client certificates must chain to:
    /// set, clients must present one (mTLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca_secret_ref: Option<SecretKeyRef>,
    /// With mTLS, a request without an API key or token is the client
    /// named by its certificate's subject CN.
    #[serde(default)]
    pub client_cert_principal: bool,
}

/// Retry policy: exponential backoff with full jitter.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("duration(self.baseDelay) <= duration(self.maxDelay)").message("baseDelay must not exceed maxDelay"))]
pub struct Retry {
    /// Attempts per request, the first included (1 = no retry).
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1, max = 10))]
    pub max_attempts: u32,
    /// Backoff cap before the first retry; doubles per retry (Go duration).
    #[serde(default = "default_base_delay")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$"))]
    pub base_delay: Duration,
    /// Largest backoff between two attempts (Go duration).
    #[serde(default = "default_max_delay")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$"))]
    pub max_delay: Duration,
}

fn default_max_attempts() -> u32 {
    3
}
fn default_base_delay() -> Duration {
    std::time::Duration::from_millis(200).into()
}
fn default_max_delay() -> Duration {
    std::time::Duration::from_secs(4).into()
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            max_attempts: default_max_attempts(),
            base_delay: default_base_delay(),
            max_delay: default_max_delay(),
        }
    }
}

/// Replica bounds.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = kube::core::Rule::new("self.min <= self.max").message("min must not exceed max"),
    validation = kube::core::Rule::new("!has(self.desired) || (self.desired >= self.min && self.desired <= self.max)").message("desired must lie within [min, max]")
)]
pub struct Replicas {
    /// Fewest replicas. When `min > 1` a PodDisruptionBudget allows one
    /// voluntary disruption at a time.
    #[serde(default = "default_min")]
    #[schemars(range(min = 1, max = 1000))]
    pub min: i32,
    /// Most replicas.
    #[serde(default = "default_max")]
    #[schemars(range(min = 1, max = 1000))]
    pub max: i32,
    /// Pinned replica count, written by `kubectl scale` through the scale
    /// subresource. Unset: the count is chosen within [min, max] (today:
    /// `min`; later: by the autoscaler). Set: exactly this many run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub desired: Option<i32>,
}

fn default_min() -> i32 {
    1
}
fn default_max() -> i32 {
    10
}

impl Default for Replicas {
    fn default() -> Self {
        Self {
            min: default_min(),
            max: default_max(),
            desired: None,
        }
    }
}

/// Service-level objectives (used by the autoscaler, a later component).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Slo {
    /// Target 99th-percentile request latency, in milliseconds.
    #[serde(default = "default_p99")]
    #[schemars(range(min = 1, max = 600000))]
    pub p99_latency_ms: u32,
    /// Largest acceptable fraction of failed requests (0 to 1).
    #[serde(default = "default_error_rate")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_error_rate: f64,
    /// Requests per second one replica is sized for.
    #[serde(default = "default_qps")]
    #[schemars(range(min = 1, max = 1000000))]
    pub target_qps_per_replica: u32,
    /// Target 99th-percentile time to first token of streamed requests, in
    /// milliseconds. When set, streams are judged by it instead of by their
    /// total duration (which is the model's generation time): while the
    /// window holds streamed requests, `p99LatencyMs` is not applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 600000))]
    pub ttft_p99_ms: Option<u32>,
    /// Longest an async job should wait in the queue, in seconds: the
    /// autoscaler keeps enough replicas (each running `async.workers` jobs
    /// at once) to absorb the jobs arriving and drain the backlog
    /// (`forwarder_queue_depth`, the consumer lag) within it. Needs
    /// `spec.async`. Unset: the queue is not a scaling signal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub max_queue_delay_seconds: Option<u32>,
}

fn default_p99() -> u32 {
    500
}
fn default_error_rate() -> f64 {
    0.01
}
fn default_qps() -> u32 {
    50
}

impl Default for Slo {
    fn default() -> Self {
        Self {
            p99_latency_ms: default_p99(),
            max_error_rate: default_error_rate(),
            target_qps_per_replica: default_qps(),
            ttft_p99_ms: None,
            max_queue_delay_seconds: None,
        }
    }
}

/// Scaling behaviour (used by the autoscaler, a later component).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
// Label matchers only (`name op "value"`, comma separated): the selector is
// placed inside PromQL braces, so anything else could change the query.
// The autoscaler checks the same (`autoscale::metrics::validate_selector`).
#[x_kube(validation = kube::core::Rule::new(r#"!has(self.metricsSelector) || self.metricsSelector.matches('^\\s*[a-zA-Z_][a-zA-Z0-9_]*\\s*(=~|!~|!=|=)\\s*"([^"\\\\\\n]|\\\\.)*"\\s*(,\\s*[a-zA-Z_][a-zA-Z0-9_]*\\s*(=~|!~|!=|=)\\s*"([^"\\\\\\n]|\\\\.)*"\\s*)*,?\\s*$')"#).message(r#"metricsSelector must be PromQL label matchers only, such as job="llm",pod=~"bot-.*" (operators =, !=, =~, !~; double-quoted values)"#))]
pub struct Scaling {
    /// How long the metrics must justify a smaller count before scaling down.
    #[serde(default = "default_stabilization")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_down_stabilization_seconds: u32,
    /// Most replicas added in one step.
    #[serde(default = "default_up_step")]
    #[schemars(range(min = 1, max = 100))]
    pub max_scale_up_step: u32,
    /// PromQL label matchers (without braces) selecting this resource's
    /// forwarder series, replacing the default
    /// `namespace="<ns>",app_kubernetes_io_instance="<name>"`; for scrape
    /// configs that label pods differently. Series must still carry `pod`.
    /// Only matchers `name op "value"` (=, !=, =~, !~), comma separated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub metrics_selector: Option<String>,
    /// Rate window of the queries, in seconds; default: the operator's
    /// `--rate-window` (1 minute). Keep it at least four scrape intervals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 3600))]
    pub rate_window_seconds: Option<u32>,
}

fn default_stabilization() -> u32 {
    300
}
fn default_up_step() -> u32 {
    4
}

impl Default for Scaling {
    fn default() -> Self {
        Self {
            scale_down_stabilization_seconds: default_stabilization(),
            max_scale_up_step: default_up_step(),
            metrics_selector: None,
            rate_window_seconds: None,
        }
    }
}

/// Overrides for the forwarder pods.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodOverrides {
    /// Forwarder image; default: the operator's `--forwarder-image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub image: Option<String>,
    /// Image pull policy: `Always`, `IfNotPresent` or `Never`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// CPU and memory requests and limits of the forwarder container;
    /// default: requests 100m CPU and 64Mi memory, limit 256Mi memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node labels the pods must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the pods tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Extra pod labels; the `app.kubernetes.io/*` labels cannot be overridden.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra pod annotations; the operator's own annotations win on conflict.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Service account of the pods; default: the namespace's `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub service_account_name: Option<String>,
}

/// Image pull policy.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// Observed state, written by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ModelForwarderStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pods of the forwarder Deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Pods passing their readiness probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Replicas the autoscaler wants (set by the autoscaler).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// Label selector of the pods, for the scale subresource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// `Ready`, `Progressing`, `Degraded` (operator); `SLOBreached`,
    /// `MetricsAvailable` (autoscaler).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Last metrics read from Prometheus (set by the autoscaler).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<ObservedMetrics>,
    /// When the replica count last changed (set by the autoscaler).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
    /// Why the replica count last changed (set by the autoscaler).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_reason: Option<String>,
    /// While the autoscaler holds the count for its scale-down
    /// stabilization window (set by the autoscaler; a new leader continues
    /// the window from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stabilization: Option<Stabilization>,
    /// The store's key ring as rolled out (with `spec.encryption`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionStatus>,
}

/// Where a key rotation stands: a key added to the Secret decrypts in
/// every pod before it may encrypt (docs/store.md, "Rotating keys").
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct EncryptionStatus {
    /// The key id that encrypts new records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    /// Key ids every pod has loaded (a finished rollout of the Secret's
    /// current version); only these can become primary.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loaded_keys: Vec<String>,
    /// Key ids in the Secret that some pods have not loaded yet: they
    /// decrypt where loaded and become primary once the rollout finishes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_keys: Vec<String>,
}

/// A scale-down held by the stabilization window.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Stabilization {
    /// Since when the autoscaler's recommendations have stayed below the
    /// current count.
    pub since: Time,
    /// The highest of those recommendations: the count a scale-down may go
    /// to once the window has passed.
    pub peak_replicas: i32,
}

/// Metrics observed for the forwarder's pods.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ObservedMetrics {
    /// 99th-percentile request latency, in milliseconds; absent without
    /// requests in the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_latency_ms: Option<f64>,
    /// 99th-percentile time spent in the forwarder itself (upstream
    /// attempts and backoff excluded), in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub own_p99_latency_ms: Option<f64>,
    /// 99th-percentile time to first token of streamed requests, in
    /// milliseconds; absent without streams in the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_p99_ms: Option<f64>,
    /// Async jobs waiting (the consumer lag summed over the pods, less the
    /// jobs running); with `slo.maxQueueDelaySeconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_backlog: Option<f64>,
    /// Seconds the current replicas need to drain that backlog while jobs
    /// keep arriving; absent when it would never drain or is unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_delay_seconds: Option<f64>,
    /// Jobs per second one replica runs (its workers over the mean run
    /// time), as the autoscaler estimates it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jobs_per_second_per_replica: Option<f64>,
    /// Requests per second over all pods.
    pub qps: f64,
    /// Fraction of requests that failed.
    pub error_rate: f64,
    /// When these values were read.
    pub observed_at: Time,
}

const GO_DURATION: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$";

/// Redis connection for the shared store.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("self.tls || (!has(self.caSecretRef) && !has(self.clientCertSecretRef))").message("caSecretRef and clientCertSecretRef need tls: true"))]
pub struct StoreSpec {
    /// `host:port` of a standalone Redis.
    #[schemars(
        length(min = 3, max = 253),
        regex(pattern = r"^[A-Za-z0-9.-]+:[0-9]{1,5}$")
    )]
    pub address: String,
    /// Database number.
    #[serde(default)]
    #[schemars(range(min = 0, max = 255))]
    pub db: u32,
    /// TLS to Redis (`rediss://`; the system roots unless `caSecretRef`).
    #[serde(default)]
    pub tls: bool,
    /// Secret key holding the PEM CA bundle Redis's certificate is checked
    /// against. Read at start: a change rolls the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
    /// Secret of type kubernetes.io/tls (`tls.crt`, `tls.key`): the client
    /// certificate for Redis with `tls-auth-clients yes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_secret_ref: Option<SecretRef>,
    /// ACL user; absent: the default user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9._-]+$"))]
    pub username: Option<String>,
    /// Secret key holding the password. Read at start: a change rolls the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
    /// Bound on every Redis call (Go duration); then the use's failure policy.
    #[serde(default = "default_store_timeout")]
    #[schemars(regex(pattern = GO_DURATION))]
    pub timeout: Duration,
    /// Idempotency when Redis fails: `FailOpen` forwards unprotected,
    /// `FailClosed` answers 503.
    #[serde(default)]
    pub idempotency_policy: FailurePolicy,
    /// Store records in the clear (no `encryption`).
    #[serde(default)]
    pub allow_plaintext: bool,
}

fn default_store_timeout() -> Duration {
    std::time::Duration::from_millis(50).into()
}

/// What a use of the store does when Redis fails.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FailurePolicy {
    #[default]
    FailOpen,
    FailClosed,
}

/// The response cache.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CacheSpec {
    /// Cache policy per model; models not listed are never cached.
    #[schemars(
        length(min = 1, max = 64),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["model"])
    )]
    pub models: Vec<ModelCache>,
}

/// One model's cache policy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelCache {
    #[schemars(length(min = 1, max = 256))]
    pub model: String,
    /// How long an answer is served (Go duration).
    #[serde(default = "default_cache_ttl")]
    #[schemars(regex(pattern = GO_DURATION))]
    pub ttl: Duration,
    /// `Deterministic`: only `temperature: 0` or clients sending
    /// `X-Cache-Opt-In: true`; `All`: every request.
    #[serde(default)]
    pub cacheable: CacheableSpec,
    /// One cache for every client (a public FAQ); default: per client.
    #[serde(default)]
    pub shared: bool,
    /// Larger answers are served but not cached.
    #[serde(default = "default_max_entry_bytes")]
    #[schemars(range(min = 1, max = 16777216))]
    pub max_entry_bytes: u32,
}

fn default_cache_ttl() -> Duration {
    std::time::Duration::from_secs(600).into()
}

fn default_max_entry_bytes() -> u32 {
    256 * 1024
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CacheableSpec {
    #[default]
    Deterministic,
    All,
}

/// Per-client rate limits (GCRA).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RateLimits {
    #[schemars(range(min = 1, max = 1000000))]
    pub requests_per_second: u32,
    /// Requests allowed at once above the sustained rate.
    #[serde(default = "default_rl_burst")]
    #[schemars(range(min = 1, max = 1000000))]
    pub burst: u32,
    /// Tokens per client per minute (estimated before the call, corrected
    /// with the usage a completion reports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000000))]
    pub tokens_per_minute: Option<u32>,
    /// When the store fails: `FailOpen` admits, `FailClosed` answers 503.
    #[serde(default)]
    pub policy: FailurePolicy,
    /// Named tiers with limits of their own. A client's tier comes from
    /// its JWT's tier claim (`spec.auth.jwt`), else from `clientTiers`;
    /// without one (or naming an unlisted tier) the limits above apply.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub tiers: BTreeMap<String, RateLimitTier>,
    /// Client identity (`key:<name>`, `jwt:<issuer>:<sub>`, `cert:<CN>`; a
    /// bare name is the API key of that name, never a JWT subject) → tier
    /// name; every tier must be in `tiers` (checked when the config is
    /// built).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 10000))]
    pub client_tiers: BTreeMap<String, String>,
}

/// One rate-limit tier.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitTier {
    #[schemars(range(min = 1, max = 1000000))]
    pub requests_per_second: u32,
    #[serde(default = "default_rl_burst")]
    #[schemars(range(min = 1, max = 1000000))]
    pub burst: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000000))]
    pub tokens_per_minute: Option<u32>,
}

fn default_rl_burst() -> u32 {
    10
}

/// Encryption at rest.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Encryption {
    /// Secret of keys: each key of the Secret is a key id, its value a
    /// base64 32-byte AES key. All decrypt; the greatest id that every pod
    /// has loaded encrypts, so a key added to the Secret is decrypt-only
    /// until the rollout it causes has finished, and becomes primary after
    /// (status.encryption shows where a rotation stands). A `primary`
    /// entry in the Secret names the encrypting key instead. Mounted as a
    /// directory and reloaded by the forwarder.
    pub key_secret_ref: SecretRef,
}

const KAFKA_NAME: &str = r"^[A-Za-z0-9._-]+$";

/// Asynchronous jobs on a Kafka-protocol broker: a jobs topic read by a
/// consumer group, with signed result callbacks.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("has(self.saslMechanism) == has(self.saslSecretRef)").message("saslMechanism and saslSecretRef go together"))]
#[x_kube(validation = kube::core::Rule::new("!has(self.caSecretRef) || self.tls").message("caSecretRef needs tls: true"))]
pub struct AsyncSpec {
    /// The brokers, `host:port` each (a schema pattern, not CEL: a rule over
    /// every entry costs more than the API server's budget allows).
    #[schemars(
        length(min = 1, max = 16),
        inner(
            length(min = 3, max = 253),
            regex(pattern = r"^[A-Za-z0-9.-]+:[0-9]{1,5}$")
        )
    )]
    pub bootstrap_servers: Vec<String>,
    /// The jobs topic (a dead-letter topic `<topic>-dead-letter` beside it).
    #[serde(default = "default_jobs_topic")]
    #[schemars(length(min = 1, max = 200), regex(pattern = KAFKA_NAME))]
    pub topic: String,
    /// The consumer group every replica joins.
    #[serde(default = "default_consumer_group")]
    #[schemars(length(min = 1, max = 200), regex(pattern = KAFKA_NAME))]
    pub consumer_group: String,
    /// Jobs each replica runs at once.
    #[serde(default = "default_workers")]
    #[schemars(range(min = 1, max = 1000))]
    pub workers: u32,
    /// TLS to the brokers (system roots, or `caSecretRef`).
    #[serde(default)]
    pub tls: bool,
    /// Secret key holding the brokers' CA bundle (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
    /// SASL mechanism; with `saslSecretRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_mechanism: Option<SaslMechanism>,
    /// Secret with keys `username` and `password` for SASL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_secret_ref: Option<SecretRef>,
    /// Secret key holding the callback signing secrets, one a line:
    /// `<client> whsec_...` for one client (`key:<name>`,
    /// `jwt:<issuer>:<sub>`, `cert:<CN>`, `tier:<name>`) or a bare
    /// `whsec_...` for every client without lines of its own; several
    /// lines for one client all sign (rotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_secret_ref: Option<SecretKeyRef>,
    /// Hosts a job's `callback_url` may name (https only); none: callbacks
    /// are refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 64),
        inner(length(min = 1, max = 253)),
        extend("x-kubernetes-list-type" = "set")
    )]
    pub allowed_callback_hosts: Vec<String>,
    /// Networks (CIDRs, e.g. `10.20.0.0/16`) callbacks may reach although
    /// they are internal (private, loopback, link-local, unique-local...):
    /// a callback host is resolved and every address must be public or in
    /// one of these. In-cluster receivers need their Service or Pod CIDR
    /// here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 64),
        inner(length(min = 3, max = 49)),
        extend("x-kubernetes-list-type" = "set")
    )]
    pub allowed_callback_networks: Vec<String>,
    /// Kafka static group membership: each pod joins the consumer group
    /// under its own name (`group.instance.id`, from the downward API), so
    /// a restarted container takes its partitions back at once instead of
    /// making the group rebalance twice. A removed pod's partitions then
    /// wait for the session timeout (10 s) before they move.
    #[serde(default = "default_static_membership")]
    pub static_membership: bool,
}

fn default_static_membership() -> bool {
    true
}

fn default_jobs_topic() -> String {
    "forwarder-jobs".into()
}

fn default_consumer_group() -> String {
    "forwarder".into()
}

fn default_workers() -> u32 {
    10
}

/// SASL mechanisms the forwarder's Kafka client speaks.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}
