//! Spec → the forwarder's own typed config (`forwarder_config::Config`).
//!
//! The ConfigMap is `serde_yaml` of that value, never a hand-written string,
//! so the forwarder and the operator cannot disagree on its shape.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use forwarder_config::{AuthConfig, Config, Provider, RetryConfig, UpstreamConfig};

use super::connections;
use crate::crd::{ModelForwarderSpec, Protocol, Upstream};

/// Port of the HTTP listener (HTTP API, OpenAI API, WebSocket, health, metrics).
pub const HTTP_PORT: u16 = 8080;
/// Port of the gRPC listener.
pub const GRPC_PORT: u16 = 9090;
/// Where the ConfigMap's config file appears in the pod.
pub const CONFIG_PATH: &str = "/etc/forwarder/config.yaml";
/// Key of the config file in the ConfigMap.
pub const CONFIG_KEY: &str = "config.yaml";
/// Directory of the mounted client API-keys Secret (one file per client).
pub const CLIENT_KEYS_DIR: &str = "/etc/forwarder/client-keys";
/// Parent directory of the per-upstream API-key mounts.
pub const UPSTREAM_KEYS_DIR: &str = "/etc/forwarder/upstream-keys";
/// Mount of `spec.encryption.keySecretRef` (a key ring directory).
pub const ENCRYPTION_KEYS_DIR: &str = "/etc/forwarder/encryption-keys";
/// ConfigMap key holding the id of the encrypting key, projected into the
/// key ring directory as its `primary` entry (see `reconcile/rotation.rs`).
pub const ENCRYPTION_PRIMARY_KEY: &str = "encryption-primary";
/// The key ring's reserved entry naming the encrypting key.
pub const KEY_RING_PRIMARY: &str = "primary";
/// Mount of `spec.store.passwordSecretRef` (one file).
pub const REDIS_PASSWORD_DIR: &str = "/etc/forwarder/redis-password";
pub const REDIS_CA_DIR: &str = "/etc/forwarder/redis-ca";
pub const REDIS_CLIENT_CERT_DIR: &str = "/etc/forwarder/redis-client";
/// Directory of the mounted JWT key (`jwks.json` or `secret`).
pub const JWT_KEYS_DIR: &str = "/etc/forwarder/jwt";
/// Directory of the mounted kubernetes.io/tls Secret (`tls.crt`, `tls.key`).
pub const TLS_DIR: &str = "/etc/forwarder/tls";
/// Directory of the mounted client CA bundle (`ca.crt`).
pub const CLIENT_CA_DIR: &str = "/etc/forwarder/client-ca";
/// Mount of `spec.async.saslSecretRef` (`username`, `password`).
pub const KAFKA_SASL_DIR: &str = "/etc/forwarder/kafka-sasl";
/// Mount of `spec.async.caSecretRef` (`ca.crt`).
pub const KAFKA_CA_DIR: &str = "/etc/forwarder/kafka-ca";
/// Mount of `spec.async.callbackSecretRef` (`secrets`).
pub const CALLBACK_SECRETS_DIR: &str = "/etc/forwarder/callback-secrets";
/// After SIGTERM, how long `/readyz` fails before the listener closes.
pub const DRAIN_DELAY: Duration = Duration::from_secs(5);
/// How long in-flight requests may finish once the listener has closed.
pub const GRACE_PERIOD: Duration = Duration::from_secs(30);

/// Why a spec that passed the schema cannot become a working forwarder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Condition reason, PascalCase.
    pub reason: &'static str,
    pub message: String,
}

impl Problem {
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// Path of an upstream's API key inside the pod.
pub fn upstream_key_path(upstream: &str, key: &str) -> PathBuf {
    PathBuf::from(UPSTREAM_KEYS_DIR).join(upstream).join(key)
}

fn provider(at: &str, u: &Upstream) -> Result<Provider, Problem> {
    match u.provider.as_str() {
        "openai" => Ok(Provider::Openai),
        "anthropic" => Ok(Provider::Anthropic),
        "mock" => Ok(Provider::Mock),
        other => Err(Problem::new(
            "UnknownProvider",
            format!("{at}.provider: {other:?} is not supported by this forwarder (supported: openai, anthropic, mock)"),
        )),
    }
}

fn duration(at: String, d: kube::core::Duration) -> Result<Duration, Problem> {
    if d.is_negative() {
        return Err(Problem::new(
            "InvalidSpec",
            format!("{at}: must not be negative"),
        ));
    }
    Ok(d.into())
}

/// Builds the forwarder config, or every reason it cannot work.
pub fn render(spec: &ModelForwarderSpec) -> Result<Config, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut upstreams = Vec::with_capacity(spec.upstreams.len());
    for (i, u) in spec.upstreams.iter().enumerate() {
        let at = format!("spec.upstreams[{i}]");
        let provider = provider(&at, u);
        let connect = duration(format!("{at}.connectTimeout"), u.connect_timeout);
        let timeout = duration(format!("{at}.timeout"), u.timeout);
        match (provider, connect, timeout) {
            (Ok(provider), Ok(connect_timeout), Ok(timeout)) => upstreams.push(UpstreamConfig {
                name: u.name.clone(),
                provider,
                base_url: u.base_url.clone(),
                models: u.models.clone(),
                weight: u.weight,
                api_key_file: u
                    .api_key_secret_ref
                    .as_ref()
                    .map(|r| upstream_key_path(&u.name, &r.key)),
                api_key_env: None,
                connect_timeout,
                timeout,
                mock: None,
                tls: None,
            }),
            (p, c, t) => problems.extend([p.err(), c.err(), t.err()].into_iter().flatten()),
        }
    }
    let base_delay = duration("spec.retry.baseDelay".into(), spec.retry.base_delay);
    let max_delay = duration("spec.retry.maxDelay".into(), spec.retry.max_delay);
    let retry = match (base_delay, max_delay) {
        (Ok(base_delay), Ok(max_delay)) => RetryConfig {
            max_attempts: spec.retry.max_attempts,
            base_delay,
            max_delay,
            ..RetryConfig::default()
        },
        (b, m) => {
            problems.extend([b.err(), m.err()].into_iter().flatten());
            RetryConfig::default()
        }
    };
    if !problems.is_empty() {
        return Err(problems);
    }

    let mut config = Config {
        upstreams,
        retry,
        auth: AuthConfig {
            api_keys_file: spec
                .auth
                .as_ref()
                .and_then(|a| a.api_keys_secret_ref.as_ref())
                .map(|_| PathBuf::from(CLIENT_KEYS_DIR)),
            ..AuthConfig::default()
        },
        ..Config::default()
    };
    config.server.listen = SocketAddr::from(([0, 0, 0, 0], HTTP_PORT));
    // The HTTP listener always runs (health, readiness, metrics); the other
    // front ends follow `spec.protocols`.
    config.websocket.enabled = spec.protocols.contains(&Protocol::Websocket);
    config.grpc.enabled = spec.protocols.contains(&Protocol::Grpc);
    config.grpc.listen = SocketAddr::from(([0, 0, 0, 0], GRPC_PORT));
    config.server.shutdown.drain_delay = DRAIN_DELAY;
    config.server.shutdown.grace_period = GRACE_PERIOD;
    // Every listener full of connections waiting for their heads fits in
    // the pod's memory limit.
    let memory_limit = super::deployment::resources(spec)
        .limits
        .and_then(|l| l.get("memory").and_then(|q| connections::bytes(&q.0)));
    let listeners = 1 + u64::from(config.grpc.enabled);
    if let Some(n) = connections::max_connections(memory_limit, listeners) {
        config.server.max_connections = n;
    }
    config.auth.jwt = spec.auth.as_ref().and_then(|a| a.jwt.as_ref()).map(jwt);
    config.server.tls = spec.tls.as_ref().map(tls);
    if let Err(p) = store_and_limits(spec, &mut config) {
        problems.push(p);
    }
    if let Some(a) = &spec.async_jobs {
        if let Err(p) = async_jobs(a, &mut config.async_jobs) {
            problems.push(p);
        }
    }
    // Checked against the spec first, so a mistake names the spec's field
    // (and the forwarder's validation below does not repeat it).
    // Budgets are left out while the aliases they may price are refused.
    match (super::aliases::render(spec), super::budgets::render(spec)) {
        (Ok(models), Ok(budgets)) => (config.models, config.budgets) = (models, budgets),
        (a, b) => problems.extend([a.err(), b.err()].into_iter().flatten().flatten()),
    }

    // Models are declared per upstream (at least one each), so this only
    // guards against a future spec shape that could leave one unserved.
    if config.models().is_empty() {
        problems.push(Problem::new("NoModels", "no upstream serves any model"));
    }
    // The forwarder's own validation, so a config it would refuse at start
    // is reported here instead of as a crash-looping pod.
    if let Err(errors) = forwarder_config::validate(&config) {
        problems.extend(errors.into_iter().map(|e| {
            Problem::new(
                "InvalidConfig",
                format!("forwarder config {}: {}", e.field, e.message),
            )
        }));
    }
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(problems)
    }
}

/// `spec.auth.jwt` as the forwarder's settings, keys at their mount paths.
fn jwt(j: &crate::crd::Jwt) -> forwarder_config::JwtConfig {
    let dir = PathBuf::from(JWT_KEYS_DIR);
    let mut audiences = j.audiences.clone();
    audiences.extend(j.audience.clone());
    let d = forwarder_config::JwtConfig::default();
    forwarder_config::JwtConfig {
        secret_file: j.secret_ref.as_ref().map(|_| dir.join("secret")),
        jwks_file: j.jwks_secret_ref.as_ref().map(|_| dir.join("jwks.json")),
        jwks_url: j.jwks_url.clone(),
        algorithms: j.algorithms.iter().map(|a| a.name()).collect(),
        issuer: j.issuer.clone(),
        audiences,
        principal_claim: j
            .principal_claim
            .clone()
            .unwrap_or(d.principal_claim.clone()),
        models_claim: j.models_claim.clone(),
        tier_claim: j.tier_claim.clone(),
        ..d
    }
}

/// `spec.tls` as the forwarder's settings, files at their mount paths.
fn tls(t: &crate::crd::Tls) -> forwarder_config::TlsConfig {
    let dir = PathBuf::from(TLS_DIR);
    forwarder_config::TlsConfig {
        cert_file: dir.join("tls.crt"),
        key_file: dir.join("tls.key"),
        client_ca_file: t
            .client_ca_secret_ref
            .as_ref()
            .map(|_| PathBuf::from(CLIENT_CA_DIR).join("ca.crt")),
        client_cert_principal: t.client_cert_principal,
        reload_interval: Duration::from_secs(5),
    }
}

/// `spec.async`: the Kafka queue, its credentials and callbacks, files at
/// their mount paths.
fn async_jobs(
    a: &crate::crd::AsyncSpec,
    out: &mut forwarder_config::AsyncConfig,
) -> Result<(), Problem> {
    use forwarder_config::{CallbackHost, CallbackNetwork, QueueKind};
    out.enabled = true;
    out.queue = QueueKind::Kafka;
    out.workers = a.workers as usize;
    let k = &mut out.kafka;
    k.bootstrap_servers = a.bootstrap_servers.join(",");
    k.topic.clone_from(&a.topic);
    k.dead_letter_topic = format!("{}-dead-letter", a.topic);
    k.consumer_group.clone_from(&a.consumer_group);
    k.security_protocol = match (a.tls, a.sasl_mechanism.is_some()) {
        (false, false) => "plaintext",
        (true, false) => "ssl",
        (false, true) => "sasl_plaintext",
        (true, true) => "sasl_ssl",
    }
    .into();
    k.sasl_mechanism = a.sasl_mechanism.map(|m| m.as_str().to_string());
    if a.sasl_secret_ref.is_some() {
        k.sasl_username_file = Some(PathBuf::from(KAFKA_SASL_DIR).join("username"));
        k.sasl_password_file = Some(PathBuf::from(KAFKA_SASL_DIR).join("password"));
    }
    k.ssl_ca_file = a
        .ca_secret_ref
        .as_ref()
        .map(|_| PathBuf::from(KAFKA_CA_DIR).join("ca.crt"));
    out.callbacks.secrets_file = a
        .callback_secret_ref
        .as_ref()
        .map(|_| PathBuf::from(CALLBACK_SECRETS_DIR).join("secrets"));
    // The Secret's bare `whsec_` lines sign for every client without lines
    // of its own (`<client> whsec_…`), as before per-client secrets.
    out.callbacks.shared_secret_fallback = a.callback_secret_ref.is_some();
    out.callbacks.allowed_hosts = a
        .allowed_callback_hosts
        .iter()
        .map(|h| CallbackHost {
            host: h.clone(),
            allow_http: false,
            ports: Vec::new(),
        })
        .collect();
    out.callbacks.allowed_networks = a
        .allowed_callback_networks
        .iter()
        .map(|n| {
            n.parse().map(|cidr| CallbackNetwork {
                cidr,
                ports: Vec::new(),
            })
        })
        .collect::<Result<_, _>>()
        .map_err(|_| {
            Problem::new(
                "InvalidConfig",
                "spec.async.allowedCallbackNetworks: entries must be CIDRs (10.20.0.0/16, fd00::/8)",
            )
        })?;
    Ok(())
}

/// `spec.store`, `spec.encryption`, `spec.cache` and `spec.rateLimits`.
fn store_and_limits(spec: &ModelForwarderSpec, config: &mut Config) -> Result<(), Problem> {
    use crate::crd::{CacheableSpec, FailurePolicy as Policy};
    use forwarder_config::{
        Cacheable, EncryptionConfig, FailurePolicy, ModelCacheConfig, RateLimitConfig, RedisConfig,
        StoreBackend, TierLimits,
    };
    let policy = |p: Policy| match p {
        Policy::FailOpen => FailurePolicy::FailOpen,
        Policy::FailClosed => FailurePolicy::FailClosed,
    };
    if spec.encryption.is_some() {
        config.store.encryption = Some(EncryptionConfig {
            key_file: PathBuf::from(ENCRYPTION_KEYS_DIR),
            ..EncryptionConfig::default()
        });
    }
    if let Some(s) = &spec.store {
        config.store.backend = StoreBackend::Redis;
        config.store.redis = Some(RedisConfig {
            url: format!("{}://{}", if s.tls { "rediss" } else { "redis" }, s.address),
            db: i64::from(s.db),
            username: s.username.clone(),
            password_file: s
                .password_secret_ref
                .as_ref()
                .map(|r| PathBuf::from(REDIS_PASSWORD_DIR).join(&r.key)),
            timeout: duration("spec.store.timeout".into(), s.timeout)?,
            allow_plaintext: s.allow_plaintext,
            ca_file: s
                .ca_secret_ref
                .as_ref()
                .map(|_| PathBuf::from(REDIS_CA_DIR).join("ca.crt")),
            client_cert_file: s
                .client_cert_secret_ref
                .as_ref()
                .map(|_| PathBuf::from(REDIS_CLIENT_CERT_DIR).join("tls.crt")),
            client_key_file: s
                .client_cert_secret_ref
                .as_ref()
                .map(|_| PathBuf::from(REDIS_CLIENT_CERT_DIR).join("tls.key")),
            ..RedisConfig::default()
        });
        config.idempotency.on_store_error = policy(s.idempotency_policy);
    }
    if let Some(c) = &spec.cache {
        for (i, m) in c.models.iter().enumerate() {
            config.cache.models.insert(
                m.model.clone(),
                ModelCacheConfig {
                    enabled: true,
                    ttl: duration(format!("spec.cache.models[{i}].ttl"), m.ttl)?,
                    cacheable: match m.cacheable {
                        CacheableSpec::Deterministic => Cacheable::Deterministic,
                        CacheableSpec::All => Cacheable::All,
                    },
                    shared: m.shared,
                    max_entry_bytes: m.max_entry_bytes as usize,
                },
            );
        }
    }
    if let Some(r) = &spec.rate_limits {
        config.rate_limit = Some(RateLimitConfig {
            requests_per_second: r.requests_per_second,
            burst: r.burst,
            // In the store: across replicas with Redis, per pod otherwise.
            shared: true,
            tokens_per_minute: r.tokens_per_minute,
            on_store_error: policy(r.policy),
            tiers: r
                .tiers
                .iter()
                .map(|(name, t)| {
                    let limits = TierLimits {
                        requests_per_second: t.requests_per_second,
                        burst: t.burst,
                        tokens_per_minute: t.tokens_per_minute,
                    };
                    (name.clone(), limits)
                })
                .collect(),
            client_tiers: r.client_tiers.clone(),
        });
    }
    Ok(())
}

/// The config file's text, as the forwarder reads it.
pub fn to_yaml(config: &Config) -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(config)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::crd::Auth;

    pub(crate) fn spec() -> ModelForwarderSpec {
        serde_json::from_value(serde_json::json!({
            "upstreams": [{
                "name": "primary",
                "provider": "openai",
                "baseUrl": "https://llm.internal/v1",
                "models": ["qwen-max"],
                "apiKeySecretRef": {"name": "llm-keys", "key": "primary"},
                "weight": 3
            }, {
                "name": "local",
                "provider": "mock",
                "models": ["qwen-max", "mock"]
            }],
            "auth": {"apiKeysSecretRef": {"name": "clients"}},
            "retry": {"maxAttempts": 4, "baseDelay": "1s", "maxDelay": "8s"},
            "replicas": {"min": 2, "max": 20}
        }))
        .expect("valid spec")
    }

    #[test]
    fn the_connection_cap_follows_the_memory_limit_and_the_listeners() {
        let mut s = spec();
        assert_eq!(render(&s).expect("config").server.max_connections, 9_830);
        s.protocols.push(Protocol::Grpc);
        assert_eq!(render(&s).expect("config").server.max_connections, 4_915);
        s.pod.resources = serde_json::from_value(serde_json::json!({
            "limits": {"memory": "2Gi"}
        }))
        .expect("resources");
        assert_eq!(render(&s).expect("config").server.max_connections, 16_384);
        // Requests only: no limit to fit, the forwarder's default.
        s.pod.resources = serde_json::from_value(serde_json::json!({
            "requests": {"memory": "64Mi"}
        }))
        .expect("resources");
        assert_eq!(
            render(&s).expect("config").server.max_connections,
            forwarder_config::ServerConfig::default().max_connections
        );
    }

    #[test]
    fn renders_async_jobs_on_kafka_with_their_secret_files() {
        let mut s = spec();
        s.async_jobs = serde_json::from_value(serde_json::json!({
            "bootstrapServers": ["kafka-0.kafka:9093", "kafka-1.kafka:9093"],
            "topic": "bot-jobs", "workers": 16, "tls": true,
            "caSecretRef": {"name": "kafka-ca", "key": "ca.pem"},
            "saslMechanism": "SCRAM-SHA-512", "saslSecretRef": {"name": "kafka-user"},
            "callbackSecretRef": {"name": "hooks", "key": "whsec"},
            "allowedCallbackHosts": ["hooks.example.internal"],
            "allowedCallbackNetworks": ["10.96.0.0/12"]
        }))
        .expect("async");
        let c = render(&s).expect("renders");
        assert_eq!(
            c.async_jobs.callbacks.allowed_networks[0].cidr.to_string(),
            "10.96.0.0/12"
        );
        assert!(c.async_jobs.callbacks.shared_secret_fallback);
        let mut bad = s.clone();
        if let Some(a) = bad.async_jobs.as_mut() {
            a.allowed_callback_networks = vec!["10.96.0.0".into()];
        }
        let problems = render(&bad).unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.message.contains("allowedCallbackNetworks")),
            "{problems:?}"
        );
        let a = &c.async_jobs;
        assert_eq!(a.queue, forwarder_config::QueueKind::Kafka);
        assert_eq!(a.workers, 16);
        assert_eq!(
            a.kafka.bootstrap_servers,
            "kafka-0.kafka:9093,kafka-1.kafka:9093"
        );
        assert_eq!(
            (a.kafka.topic.as_str(), a.kafka.dead_letter_topic.as_str()),
            ("bot-jobs", "bot-jobs-dead-letter")
        );
        assert_eq!(a.kafka.consumer_group, "forwarder");
        assert_eq!(a.kafka.security_protocol, "sasl_ssl");
        assert_eq!(a.kafka.sasl_mechanism.as_deref(), Some("SCRAM-SHA-512"));
        assert_eq!(
            a.kafka.sasl_password_file,
            Some(PathBuf::from(KAFKA_SASL_DIR).join("password"))
        );
        assert_eq!(
            a.kafka.ssl_ca_file,
            Some(PathBuf::from(KAFKA_CA_DIR).join("ca.crt"))
        );
        assert_eq!(
            a.callbacks.secrets_file,
            Some(PathBuf::from(CALLBACK_SECRETS_DIR).join("secrets"))
        );
        assert_eq!(a.callbacks.allowed_hosts.len(), 1);
        assert!(!a.callbacks.allowed_hosts[0].allow_http);
        // The forwarder accepts what the operator renders.
        forwarder_config::validate(&c).expect("valid forwarder config");
        let uses = crate::reconcile::secret_uses(&s);
        for field in [
            "spec.async.saslSecretRef",
            "spec.async.caSecretRef",
            "spec.async.callbackSecretRef",
        ] {
            assert!(uses.iter().any(|u| u.field == field), "{field}");
        }
        // Absent: the embedded queue, as the forwarder defaults.
        let c = render(&spec()).expect("renders");
        assert_eq!(c.async_jobs.queue, forwarder_config::QueueKind::Embedded);
    }

    #[test]
    fn renders_store_encryption_cache_and_rate_limits() {
        let mut spec = spec();
        let extra: ModelForwarderSpec = serde_json::from_value(serde_json::json!({
            "upstreams": [{"name": "local", "provider": "mock", "models": ["mock"]}],
            "store": {"address": "redis.ai:6380", "db": 2, "tls": true, "username": "fwd",
                      "passwordSecretRef": {"name": "redis", "key": "password"},
                      "caSecretRef": {"name": "redis-ca", "key": "ca.pem"},
                      "clientCertSecretRef": {"name": "redis-client"},
                      "timeout": "80ms", "idempotencyPolicy": "FailClosed"},
            "encryption": {"keySecretRef": {"name": "store-keys"}},
            "cache": {"models": [{"model": "mock", "ttl": "5m", "cacheable": "All", "shared": true}]},
            "rateLimits": {"requestsPerSecond": 5, "burst": 20, "tokensPerMinute": 10000, "policy": "FailClosed"}
        }))
        .expect("valid spec");
        spec.store = extra.store;
        spec.encryption = extra.encryption;
        spec.cache = extra.cache;
        spec.rate_limits = extra.rate_limits;
        let c = render(&spec).expect("renders");
        let r = c.store.redis.as_ref().expect("redis");
        assert_eq!(c.store.backend, forwarder_config::StoreBackend::Redis);
        assert_eq!(r.url, "rediss://redis.ai:6380");
        let path = |p: &str| Some(PathBuf::from(p));
        assert_eq!(r.ca_file, path("/etc/forwarder/redis-ca/ca.crt"));
        assert_eq!(
            (r.client_cert_file.clone(), r.client_key_file.clone()),
            (
                path("/etc/forwarder/redis-client/tls.crt"),
                path("/etc/forwarder/redis-client/tls.key")
            )
        );
        // Mounted where the config names them, and their changes roll the pods.
        let mounts = crate::render::deployment::secret_mounts(&spec);
        let ca = mounts
            .iter()
            .find(|m| m.secret == "redis-ca")
            .expect("CA mounted");
        assert_eq!(ca.items, Some(vec![("ca.pem", "ca.crt")]));
        let uses = crate::reconcile::secret_uses(&spec);
        for (name, key) in [("redis-client", "tls.crt"), ("redis-client", "tls.key")] {
            assert!(
                uses.iter()
                    .any(|u| u.name == name && u.key.as_deref() == Some(key)),
                "{name}/{key}"
            );
        }
        assert_eq!((r.db, r.username.as_deref()), (2, Some("fwd")));
        assert_eq!(
            r.password_file.as_deref(),
            Some(std::path::Path::new(
                "/etc/forwarder/redis-password/password"
            ))
        );
        assert_eq!(r.timeout, Duration::from_millis(80));
        assert!(!r.allow_plaintext);
        assert_eq!(
            c.store.encryption.as_ref().map(|e| e.key_file.clone()),
            Some(PathBuf::from(ENCRYPTION_KEYS_DIR))
        );
        assert_eq!(
            c.idempotency.on_store_error,
            forwarder_config::FailurePolicy::FailClosed
        );
        let m = &c.cache.models["mock"];
        assert_eq!((m.ttl, m.shared), (Duration::from_secs(300), true));
        assert_eq!(m.cacheable, forwarder_config::Cacheable::All);
        let rl = c.rate_limit.as_ref().expect("limits");
        assert_eq!(
            (rl.requests_per_second, rl.burst, rl.tokens_per_minute),
            (5, 20, Some(10000))
        );
        assert!(rl.shared);
        // The secrets are mounted and part of the pod hash.
        let uses = crate::reconcile::secret_uses(&spec);
        assert!(uses
            .iter()
            .any(|u| u.field == "spec.encryption.keySecretRef" && u.name == "store-keys"));
        assert!(uses
            .iter()
            .any(|u| u.field == "spec.store.passwordSecretRef"
                && u.key.as_deref() == Some("password")));
    }

    #[test]
    fn renders_listen_shutdown_auth_and_key_paths() {
        let c = render(&spec()).expect("renders");
        assert_eq!(c.server.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.server.shutdown.drain_delay, Duration::from_secs(5));
        assert_eq!(
            c.auth.api_keys_file.as_deref(),
            Some(std::path::Path::new("/etc/forwarder/client-keys"))
        );
        assert_eq!(c.retry.max_attempts, 4);
        assert_eq!(c.retry.max_delay, Duration::from_secs(8));
        let primary = &c.upstreams[0];
        assert_eq!(primary.provider, Provider::Openai);
        assert_eq!(primary.weight, 3);
        assert_eq!(
            primary.api_key_file.as_deref(),
            Some(std::path::Path::new(
                "/etc/forwarder/upstream-keys/primary/primary"
            ))
        );
        assert_eq!(c.upstreams[1].provider, Provider::Mock);
        assert_eq!(c.upstreams[1].api_key_file, None);
        assert_eq!(c.models(), vec!["mock".to_string(), "qwen-max".to_string()]);
    }

    #[test]
    fn protocols_switch_the_front_ends() {
        let mut s = spec();
        s.protocols = vec![Protocol::Http];
        let c = render(&s).expect("renders");
        assert!(!c.websocket.enabled);
        assert!(!c.grpc.enabled);
        s.protocols = vec![Protocol::Http, Protocol::Websocket, Protocol::Grpc];
        let c = render(&s).expect("renders");
        assert!(c.websocket.enabled);
        assert!(c.grpc.enabled);
        assert_eq!(c.grpc.listen.to_string(), "0.0.0.0:9090");
    }

    #[test]
    fn rendered_yaml_loads_back_and_validates_in_the_forwarder() {
        let c = render(&spec()).expect("renders");
        let yaml = to_yaml(&c).expect("serialises");
        let loaded = forwarder_config::load_from_str(&yaml).expect("forwarder accepts it");
        assert_eq!(loaded, c);
    }

    #[test]
    fn jwt_and_tls_render_to_mounted_paths() {
        let mut s = spec();
        s.auth = serde_json::from_value(serde_json::json!({
            "jwt": {"issuer": "https://id", "audience": "bot", "audiences": ["api"],
                    "algorithms": ["ES256", "EdDSA"], "modelsClaim": "models",
                    "jwksSecretRef": {"name": "jwks", "key": "keys.json"}}
        }))
        .expect("auth");
        s.tls = serde_json::from_value(serde_json::json!({
            "secretRef": {"name": "mf-tls"},
            "clientCaSecretRef": {"name": "ca", "key": "ca.crt"},
            "clientCertPrincipal": true
        }))
        .expect("tls");
        let c = render(&s).expect("renders");
        let j = c.auth.jwt.as_ref().expect("jwt");
        assert_eq!(
            j.jwks_file.as_deref(),
            Some(std::path::Path::new("/etc/forwarder/jwt/jwks.json"))
        );
        assert_eq!(j.algorithms, vec!["ES256", "EdDSA"]);
        assert_eq!(j.audiences, vec!["api", "bot"]);
        assert_eq!(j.issuer.as_deref(), Some("https://id"));
        assert_eq!(j.models_claim.as_deref(), Some("models"));
        let t = c.server.tls.as_ref().expect("tls");
        assert_eq!(
            t.cert_file,
            std::path::Path::new("/etc/forwarder/tls/tls.crt")
        );
        assert_eq!(
            t.client_ca_file.as_deref(),
            Some(std::path::Path::new("/etc/forwarder/client-ca/ca.crt"))
        );
        // The forwarder accepts what the operator renders.
        let yaml = to_yaml(&c).expect("yaml");
        assert_eq!(forwarder_config::load_from_str(&yaml).expect("loads"), c);
    }

    #[test]
    fn no_auth_secret_means_auth_off() {
        let mut s = spec();
        s.auth = Some(Auth {
            api_keys_secret_ref: None,
            jwt: None,
        });
        assert_eq!(render(&s).expect("renders").auth.api_keys_file, None);
        s.auth = None;
        assert_eq!(render(&s).expect("renders").auth.api_keys_file, None);
    }

    #[test]
    fn unknown_provider_is_a_problem_naming_the_field() {
        let mut s = spec();
        s.upstreams[1].provider = "bedrock".into();
        let problems = render(&s).unwrap_err();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].reason, "UnknownProvider");
        assert!(
            problems[0].message.contains("spec.upstreams[1].provider"),
            "{problems:?}"
        );
    }

    #[test]
    fn forwarder_validation_errors_become_problems() {
        let mut s = spec();
        s.upstreams[0].timeout = std::time::Duration::ZERO.into();
        let problems = render(&s).unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.reason == "InvalidConfig" && p.message.contains("upstreams[0].timeout")),
            "{problems:?}"
        );
    }
}
