use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{CollectorTlsConfig, JwtConfig, LatencyDist, TlsConfig, UpstreamTlsConfig};

/// The whole forwarder configuration. `Config::default()` is the embedded
/// default: 127.0.0.1:8080, no auth, one model `mock` on the built-in mock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub auth: AuthConfig,
    /// Per-client rate limit; absent means unlimited.
    pub rate_limit: Option<RateLimitConfig>,
    pub idempotency: IdempotencyConfig,
    pub retry: RetryConfig,
    pub circuit_breaker: BreakerConfig,
    pub routing: RoutingConfig,
    /// Upstream endpoints. A model is served by every upstream that lists it.
    pub upstreams: Vec<UpstreamConfig>,
    pub logging: LoggingConfig,
    /// The WebSocket front end, `/api/v1/ws` on the HTTP listener.
    pub websocket: WebSocketConfig,
    /// The gRPC front end, on its own listener.
    pub grpc: GrpcConfig,
    /// Headers passed through between clients and upstreams.
    pub headers: HeadersConfig,
    /// Bounds on what upstreams may send.
    pub limits: LimitsConfig,
    /// Asynchronous jobs (`/v1/async/...`): queue, workers, retention, callbacks.
    #[serde(rename = "async")]
    pub async_jobs: AsyncConfig,
    /// Shared state (idempotency records, cached answers, job records).
    pub store: StoreConfig,
    /// The exact-match response cache, per model.
    pub cache: CacheConfig,
    /// Model aliases: a name clients send, mapped to one or more served
    /// models (weighted, with an ordered fallback chain).
    pub models: std::collections::BTreeMap<String, AliasConfig>,
    /// Per-client token and spend budgets over a day and a month; absent:
    /// none, and no request does any budget work. Left out of a written
    /// config when absent, so configs rendered before it read the same.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budgets: Option<crate::BudgetsConfig>,
    /// OpenTelemetry traces over OTLP (off by default).
    pub tracing: TracingConfig,
}

/// OpenTelemetry traces: a span per request and per upstream attempt,
/// exported over OTLP. Off unless `enabled` is true or an OTLP endpoint
/// variable (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
/// `OTEL_EXPORTER_OTLP_ENDPOINT`) is set; `OTEL_SDK_DISABLED=true` turns it
/// off whatever is set. The fields left unset here are read from the
/// standard `OTEL_*` variables.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracingConfig {
    pub enabled: bool,
    /// The collector's URL (for `http/protobuf` without the `/v1/traces`
    /// path, which is added). Else the variables, else the protocol's
    /// default on localhost.
    pub endpoint: Option<String>,
    /// `grpc` or `http/protobuf`. Else `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`,
    /// `OTEL_EXPORTER_OTLP_PROTOCOL`, else `http/protobuf`.
    pub protocol: Option<String>,
    /// The fraction of new traces sampled (0..=1); a request carrying a
    /// `traceparent` follows its sampled flag. Else `OTEL_TRACES_SAMPLER_ARG`
    /// (with a ratio sampler), else 1.
    pub sample_ratio: Option<f64>,
    /// `service.name`. Else `OTEL_SERVICE_NAME`, else `forwarder`.
    pub service_name: Option<String>,
    /// TLS to an `https://` collector over `http/protobuf`: a CA bundle
    /// instead of the system roots, a client certificate, a server name.
    /// Without it an `https://` endpoint is checked against the system
    /// roots. A `grpc` collector is reached over plain HTTP/2 only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<CollectorTlsConfig>,
}

/// A model alias (`models.<alias>`): the client's model name, served by
/// one of `targets`. The first target is chosen by weight among those with
/// a weight above 0; on a failure that means "try elsewhere" (an upstream
/// 5xx, a 429 or a timeout after the target's own retries, no healthy
/// endpoint, a context-length refusal) the remaining targets are tried in
/// their listed order, never after a stream has begun.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AliasConfig {
    pub targets: Vec<AliasTarget>,
    /// Rewrite the body's `model` field to the target's name (the one
    /// field the forwarder edits). Off: the body goes upstream with the
    /// alias in it, for upstreams that know the alias themselves.
    #[serde(default = "default_true")]
    pub rewrite_model: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AliasTarget {
    /// A model some upstream serves (not another alias).
    pub model: String,
    /// Share of first choices; 0 makes the target a fallback only.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_true() -> bool {
    true
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::default(),
            auth: AuthConfig::default(),
            rate_limit: None,
            idempotency: IdempotencyConfig::default(),
            retry: RetryConfig::default(),
            circuit_breaker: BreakerConfig::default(),
            routing: RoutingConfig::default(),
            upstreams: vec![UpstreamConfig::builtin_mock()],
            logging: LoggingConfig::default(),
            websocket: WebSocketConfig::default(),
            grpc: GrpcConfig::default(),
            headers: HeadersConfig::default(),
            limits: LimitsConfig::default(),
            async_jobs: AsyncConfig::default(),
            models: Default::default(),
            store: StoreConfig::default(),
            cache: CacheConfig::default(),
            budgets: None,
            tracing: TracingConfig::default(),
        }
    }
}

impl Config {
    /// The sorted, de-duplicated list of model names served by some upstream.
    pub fn models(&self) -> Vec<String> {
        let mut models: Vec<String> = self
            .upstreams
            .iter()
            .flat_map(|u| u.models.iter().cloned())
            .collect();
        models.sort();
        models.dedup();
        models
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the HTTP listener (simple API, OpenAI API, health, metrics).
    pub listen: SocketAddr,
    /// Largest accepted request body, in bytes; larger bodies get 413.
    pub max_body_bytes: usize,
    /// Overall deadline of one request, all attempts and backoff included;
    /// a streamed answer ends at it (after one second's grace) whether or
    /// not the client reads it.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    pub shutdown: ShutdownConfig,
    /// Requests forwarded at once by this replica. As many more may wait
    /// for a slot (within their deadline); beyond that they get 503 at
    /// once. Absent: no limit. A bound keeps a replica from overcommitting
    /// and shows overload as the forwarder's own queueing latency, which
    /// the autoscaler scales on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<usize>,
    /// A new connection must deliver its first request head, and a kept-alive
    /// connection the rest of a head once its first byte arrived, within
    /// this time; else it is closed (slowloris).
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// A request body must arrive in full within this time of its head;
    /// else the request is answered 408 and the connection closed.
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    /// A kept-alive connection with no request in flight is closed after
    /// this long without a byte from the client. Longer than the idle
    /// timeout of the load balancer in front (60 s for most), so the
    /// balancer, not the forwarder, closes idle connections.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A client that accepts no bytes for this long while an answer waits to
    /// be written is disconnected, and its upstream call cancelled; an
    /// HTTP/2 or gRPC stream the client does not read for this long (one
    /// to two periods: it is checked once a period) is ended alone.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Connections open at once (HTTP and gRPC listeners each). Beyond it,
    /// new connections wait in the kernel's accept backlog.
    pub max_connections: usize,
    /// Largest request head: HTTP/1 header section, HTTP/2 header list.
    pub max_header_bytes: usize,
    /// Concurrent streams one HTTP/2 connection may open.
    pub http2_max_concurrent_streams: u32,
    /// TLS on the HTTP and gRPC listeners; absent: plain TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 1024 * 1024,
            request_timeout: Duration::from_secs(120),
            shutdown: ShutdownConfig::default(),
            max_concurrency: None,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(75),
            write_timeout: Duration::from_secs(30),
            max_connections: 16_384,
            max_header_bytes: 64 * 1024,
            http2_max_concurrent_streams: 256,
            tls: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// After SIGTERM, how long `/readyz` reports not-ready while the listener
    /// still accepts, so load balancers stop routing here first (Kubernetes
    /// endpoints take a few seconds to update).
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,
    /// How long in-flight requests (streams included) may take to finish
    /// once the listener has closed.
    #[serde(with = "humantime_serde")]
    pub grace_period: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            drain_delay: Duration::ZERO,
            grace_period: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// File or directory of client API keys. A file holds one key per line or a
    /// YAML map `name: key`; a directory (a mounted Kubernetes Secret) holds one
    /// file per key, named after the client. Absent: authentication is off.
    pub api_keys_file: Option<PathBuf>,
    /// How often the key file is checked for changes.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
    /// JWT verification; with API keys also on, a credential is tried as a
    /// key first, then (if it looks like a JWT) as a token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            api_keys_file: None,
            reload_interval: Duration::from_secs(2),
            jwt: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained requests per second allowed per client identity.
    pub requests_per_second: u32,
    /// Requests a client may send at once above the sustained rate.
    #[serde(default = "default_burst")]
    pub burst: u32,
    /// Keep the limits in the store (`store.backend: redis`: one limit
    /// across every replica), checked after the body is read; otherwise
    /// in this process, before.
    #[serde(default)]
    pub shared: bool,
    /// Tokens per client per minute (shared limits only): estimated from
    /// the body before the call (bytes / 4), corrected after with the
    /// usage a completion reports.
    #[serde(default)]
    pub tokens_per_minute: Option<u32>,
    /// Shared limits when the store fails: `fail_open` admits, `fail_closed`
    /// answers 503.
    #[serde(default = "fail_open")]
    pub on_store_error: FailurePolicy,
    /// Named tiers with limits of their own. A client's tier comes from
    /// its JWT's `auth.jwt.tier_claim`, else from `client_tiers`; a client
    /// without one, or naming a tier not listed here, gets the limits above.
    #[serde(default)]
    pub tiers: BTreeMap<String, TierLimits>,
    /// Client identity → tier name. Identities are namespaced by method:
    /// `key:<name>`, `jwt:<issuer>:<subject>`, `cert:<CN>`; a bare name is
    /// an API key's name (so `alice` is `key:alice`, never a token's `sub`).
    #[serde(default)]
    pub client_tiers: BTreeMap<String, String>,
}

/// One tier's limits, in the units of [`RateLimitConfig`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierLimits {
    pub requests_per_second: u32,
    #[serde(default = "default_burst")]
    pub burst: u32,
    /// Shared limits only, as `rate_limit.tokens_per_minute`.
    #[serde(default)]
    pub tokens_per_minute: Option<u32>,
}

fn fail_open() -> FailurePolicy {
    FailurePolicy::FailOpen
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            requests_per_second: 10,
            burst: default_burst(),
            shared: false,
            tokens_per_minute: None,
            on_store_error: FailurePolicy::FailOpen,
            tiers: BTreeMap::new(),
            client_tiers: BTreeMap::new(),
        }
    }
}

fn default_burst() -> u32 {
    10
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// How long a completed answer is replayed for a repeated key.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Bounds `max_record_bytes`. Answers now live in the shared store,
    /// whose memory backend is bounded by `store.max_bytes`.
    pub max_bytes: u64,
    /// Largest answer recorded for replay (a streamed answer's events
    /// included); a longer answer is relayed but not stored.
    pub max_record_bytes: usize,
    /// What a request with a key does when the store fails (Redis down):
    /// `fail_open` forwards it unprotected; `fail_closed` answers 503.
    pub on_store_error: FailurePolicy,
    /// How long a claim on a key holds without renewal; renewed every
    /// third of it while the request runs, so a crashed replica's claim
    /// frees the key after at most this long.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How long a duplicate waits for another replica's claim on its key
    /// to complete (then replays it) before answering 409; also bounded
    /// by the request's own deadline.
    #[serde(with = "humantime_serde")]
    pub wait: Duration,
}

/// What a use of the store does when the store fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Go on as if the store had nothing (counted and logged).
    FailOpen,
    /// Refuse the request with 503 and a clear message.
    FailClosed,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(600),
            max_bytes: 64 * 1024 * 1024,
            max_record_bytes: 4 * 1024 * 1024,
            on_store_error: FailurePolicy::FailOpen,
            lease: Duration::from_secs(30),
            wait: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts per request, the first included (1 = no retry).
    pub max_attempts: u32,
    /// Backoff before retry n is uniform in [0, min(max_delay, base_delay·2ⁿ⁻¹)].
    #[serde(with = "humantime_serde")]
    pub base_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// Retry a completion whose 200 answer then failed (its body cut off or
    /// not JSON, or its head unparseable). Off by default: the upstream
    /// produced, and billed, that answer; sending the request again pays
    /// for it twice.
    pub after_answer_began: bool,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(4),
            after_answer_began: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive failures that open an endpoint's circuit.
    pub failure_threshold: u32,
    /// How long an open circuit rejects before one probe is let through.
    #[serde(with = "humantime_serde")]
    pub open_duration: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            open_duration: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConfig {
    pub strategy: Strategy,
}

/// How an endpoint is chosen among the healthy ones serving a model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Fewest in-flight requests relative to weight.
    #[default]
    LeastOutstanding,
    /// Smooth weighted round robin.
    RoundRobin,
}

/// The kind of API an upstream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    /// Any OpenAI-compatible server (OpenAI, vLLM, Ollama, …): chat
    /// completions, embeddings and Responses.
    Openai,
    /// An Anthropic Messages server: `/v1/messages` and
    /// `/v1/messages/count_tokens`, key sent as `x-api-key`.
    Anthropic,
    /// The built-in mock model, answered in-process (every API).
    Mock,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Unique name, used in metrics and logs.
    pub name: String,
    pub provider: Provider,
    /// Base URL including the API prefix, e.g. `https://api.example/v1`;
    /// required for `openai` and `anthropic`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// Models this upstream serves.
    pub models: Vec<String>,
    /// Share of traffic relative to the model's other upstreams.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// File holding the upstream API key (e.g. a mounted Secret key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_file: Option<PathBuf>,
    /// Environment variable holding the upstream API key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Per-attempt timeout: until the full answer, or for streams until the
    /// first byte and then between chunks.
    #[serde(default = "default_attempt_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Behaviour of a `mock` upstream; ignored for other providers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mock: Option<MockSettings>,
    /// TLS towards an `https://` base URL: CA bundle, client certificate,
    /// server name. Plain `http://` URLs never use TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTlsConfig>,
}

fn default_weight() -> u32 {
    1
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_attempt_timeout() -> Duration {
    Duration::from_secs(60)
}

impl UpstreamConfig {
    /// The embedded default upstream: model `mock`, answered in-process.
    pub fn builtin_mock() -> Self {
        Self {
            name: "mock".into(),
            provider: Provider::Mock,
            base_url: None,
            models: vec!["mock".into()],
            weight: 1,
            api_key_file: None,
            api_key_env: None,
            connect_timeout: default_connect_timeout(),
            timeout: default_attempt_timeout(),
            mock: None,
            tls: None,
        }
    }
}

/// Behaviour of the mock model, shared by the built-in `mock` provider and
/// the standalone `forwarder mock-llm` server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MockSettings {
    /// Time before the answer (or the first token) is sent.
    pub latency: LatencyDist,
    /// Stream pacing; absent means all tokens at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,
    /// Words in each reply beyond the echo; lets load tests size replies.
    pub reply_words: u32,
    /// Fraction of requests answered with `error_status`.
    pub error_rate: f64,
    pub error_status: u16,
    /// `Retry-After` seconds sent with injected 429/503 errors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u64>,
    /// Fraction of requests that never get an answer.
    pub hang_rate: f64,
    /// Fraction of requests whose connection is reset without an answer.
    pub reset_rate: f64,
}

impl Default for MockSettings {
    fn default() -> Self {
        Self {
            latency: LatencyDist::Fixed(Duration::ZERO),
            tokens_per_second: None,
            reply_words: 0,
            error_rate: 0.0,
            error_status: 503,
            retry_after_secs: None,
            hang_rate: 0.0,
            reset_rate: 0.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingConfig {
    /// `tracing` filter directive, e.g. `info` or `forwarder=debug`.
    pub level: String,
    pub format: LogFormat,
    /// One line per request (id, model, upstream, status, duration, attempts).
    pub access_log: bool,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Json,
            access_log: true,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Json,
    Text,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebSocketConfig {
    pub enabled: bool,
    /// Requests one connection may have in flight; more are refused.
    pub max_in_flight: usize,
    /// Largest accepted message (frame payload), in bytes.
    pub max_frame_bytes: usize,
    /// Server pings at this interval keep idle connections (and proxies) alive.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// A connection with nothing in flight and no frame from the client
    /// (pongs included) for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Outgoing messages buffered per connection before answers wait for a
    /// slow reader (backpressure: memory per connection stays bounded).
    pub send_buffer: usize,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_in_flight: 32,
            max_frame_bytes: 1024 * 1024,
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(120),
            send_buffer: 64,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcConfig {
    /// Off in the embedded defaults so `forwarder serve` binds one port only.
    pub enabled: bool,
    /// Address of the gRPC (HTTP/2) listener.
    pub listen: SocketAddr,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
        }
    }
}

/// Headers that never cross the forwarder in either direction, whatever
/// `headers.to_upstream` and `headers.to_client` say: credentials (the
/// client's key or token must not reach an upstream, nor be written into a
/// queued job) and hop-by-hop or framing headers (each hop sets its own).
pub const NEVER_FORWARDED: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "proxy-authenticate",
    "x-api-key",
    "api-key",
    "cookie",
    "set-cookie",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
];

/// Which headers cross the forwarder. Names are case-insensitive; a name
/// ending in `*` matches every header with that prefix. Everything else is
/// dropped, and the headers in [`NEVER_FORWARDED`] (credentials,
/// hop-by-hop) never pass, whatever the patterns say.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeadersConfig {
    /// From the client's request to the upstream.
    pub to_upstream: Vec<String>,
    /// From the upstream's response to the client.
    pub to_client: Vec<String>,
}

impl Default for HeadersConfig {
    fn default() -> Self {
        Self {
            to_upstream: ["openai-organization", "openai-project", "openai-beta"]
                .map(String::from)
                .to_vec(),
            to_client: [
                "x-ratelimit-*",
                "openai-processing-ms",
                "openai-model",
                "anthropic-ratelimit-*",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

/// Bounds on upstream answers, so memory stays bounded whatever an upstream sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest non-streamed upstream answer, in bytes; a longer one is a 502.
    pub max_upstream_body_bytes: usize,
    /// Largest single Server-Sent Event from an upstream, in bytes; a longer
    /// one ends the stream with an error.
    pub max_event_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_upstream_body_bytes: 16 * 1024 * 1024,
            max_event_bytes: 1024 * 1024,
        }
    }
}

/// Asynchronous jobs: accepted at once, run by workers through the same
/// pipeline as synchronous requests, their results kept for `job_ttl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AsyncConfig {
    pub enabled: bool,
    /// Where accepted jobs wait for a worker.
    pub queue: QueueKind,
    /// Jobs that may wait in the embedded queue at once; beyond it a
    /// submission is refused with 503 rather than queued without bound.
    pub capacity: usize,
    /// Jobs this replica runs at once.
    pub workers: usize,
    /// How long a job (and its result) is kept; a job not started by then
    /// is not run and ends `expired`.
    #[serde(with = "humantime_serde")]
    pub job_ttl: Duration,
    /// Jobs kept in this replica's cache of the shared job records (any
    /// state; the oldest go first when full: the records remain).
    pub max_jobs: usize,
    pub callbacks: CallbackConfig,
    /// With `queue: kafka`.
    pub kafka: KafkaConfig,
    /// The OpenAI Batch API (`/v1/files`, `/v1/batches`) on the same queue.
    pub batch: BatchConfig,
}

/// Limits of the Batch API's input files (OpenAI's own by default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchConfig {
    /// Requests (JSONL lines) per input file.
    pub max_file_lines: usize,
    /// Bytes per uploaded file.
    pub max_file_bytes: usize,
    /// Bytes per line (one request); unset: `server.max_body_bytes`, the
    /// bound a request sent directly meets. A longer line refuses the
    /// upload, and in a file accepted under a larger bound goes to the
    /// error file (`line_too_large`).
    pub max_line_bytes: Option<usize>,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_file_lines: 50_000,
            max_file_bytes: 200 * 1024 * 1024,
            max_line_bytes: None,
        }
    }
}

impl Default for AsyncConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            queue: QueueKind::Embedded,
            capacity: 10_000,
            workers: 10,
            job_ttl: Duration::from_secs(24 * 3600),
            max_jobs: 100_000,
            callbacks: CallbackConfig::default(),
            kafka: KafkaConfig::default(),
            batch: BatchConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueKind {
    /// In process and bounded: jobs do not survive a restart.
    #[default]
    Embedded,
    /// A Kafka-protocol broker: `async.kafka`.
    Kafka,
}

/// The Kafka queue: a jobs topic read by a consumer group; an offset is
/// committed only after the job's result is stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// `host:port[,host:port…]`.
    pub bootstrap_servers: String,
    pub topic: String,
    /// Where a job goes after `max_attempts` failed runs, or a message that
    /// is not a job.
    pub dead_letter_topic: String,
    pub consumer_group: String,
    /// Partitions of the topics when the forwarder creates them.
    pub partitions: i32,
    /// Runs of one job (a transient upstream failure counts) before it is
    /// dead-lettered.
    pub max_attempts: u32,
    /// `plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl`.
    pub security_protocol: String,
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`, with SASL.
    pub sasl_mechanism: Option<String>,
    pub sasl_username_file: Option<PathBuf>,
    pub sasl_password_file: Option<PathBuf>,
    /// CA bundle (PEM) for the brokers' certificates, with SSL.
    pub ssl_ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM), for mutual TLS.
    pub ssl_cert_file: Option<PathBuf>,
    pub ssl_key_file: Option<PathBuf>,
    /// Static group membership (Kafka's `group.instance.id`; e.g. the pod
    /// name of a StatefulSet): a replica restarted after a crash takes its
    /// partitions back at once instead of waiting for the broker to expire
    /// the dead member. Unique per replica; unset: dynamic membership.
    pub group_instance_id: Option<String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            bootstrap_servers: String::new(),
            topic: "forwarder-jobs".into(),
            dead_letter_topic: "forwarder-jobs-dead-letter".into(),
            consumer_group: "forwarder".into(),
            partitions: 12,
            max_attempts: 3,
            security_protocol: "plaintext".into(),
            sasl_mechanism: None,
            sasl_username_file: None,
            sasl_password_file: None,
            ssl_ca_file: None,
            ssl_cert_file: None,
            ssl_key_file: None,
            group_instance_id: None,
        }
    }
}

/// Result callbacks, signed per the Standard Webhooks specification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CallbackConfig {
    /// Hosts a `callback_url` may name; none means callbacks are refused.
    pub allowed_hosts: Vec<CallbackHost>,
    /// A callback's host is resolved before each delivery and every address
    /// it resolves to is checked; loopback, private, link-local,
    /// unique-local, multicast, unspecified and other special-purpose
    /// addresses (IPv4, IPv6 and IPv4-mapped) are refused unless a network
    /// listed here contains them (and, when the entry names ports, the port
    /// is one of them).
    pub allowed_networks: Vec<CallbackNetwork>,
    /// Signing secrets (`whsec_<base64>`), one a line: `<client> whsec_…`
    /// signs that client's callbacks (an identity `key:<name>`,
    /// `jwt:<issuer>:<sub>`, `cert:<CN>`, or a tier `tier:<name>`); a bare
    /// `whsec_…` is a shared secret. Several lines for one client are a
    /// rotation: each signs, every signature is in the header.
    pub secrets_file: Option<PathBuf>,
    /// Signs the callbacks of a client with no secret of its own (nor its
    /// tier's) with the shared secrets. Off: such a client's callback is
    /// refused at submission.
    pub shared_secret_fallback: bool,
    /// Delivery attempts before the job is marked `failed` delivery.
    pub max_attempts: u32,
    /// Backoff before attempt n is jittered in [d/2, d], d = min(max_delay, base_delay·2ⁿ⁻¹).
    #[serde(with = "humantime_serde")]
    pub base_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// One delivery attempt's deadline.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for CallbackConfig {
    fn default() -> Self {
        Self {
            allowed_hosts: Vec::new(),
            allowed_networks: Vec::new(),
            secrets_file: None,
            shared_secret_fallback: false,
            max_attempts: 6,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallbackHost {
    /// A host name or IP literal, matched exactly (case-insensitive).
    pub host: String,
    /// Allows `http://` to this host (otherwise only `https://`).
    #[serde(default)]
    pub allow_http: bool,
    /// Ports a callback to this host may name (the scheme's default port
    /// when the URL names none); empty: any port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
}

/// A network callbacks may reach although its addresses are internal
/// (see [`CallbackConfig::allowed_networks`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallbackNetwork {
    /// A CIDR, e.g. `10.20.0.0/16`, `127.0.0.1/32`, `fd00::/8`.
    pub cidr: ipnet::IpNet,
    /// Ports allowed in that network; empty: any port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
}
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreBackend {
    /// In this process only: bounded in bytes, least recently used evicted first.
    Memory,
    /// Shared by every replica on one Redis.
    Redis,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    pub backend: StoreBackend,
    /// Memory backend: bytes of payload kept (cached answers and Batch
    /// API files, keys included); the least recently used go first, so a
    /// new record is always admitted.
    pub max_bytes: u64,
    /// Memory backend: bytes of coordination state kept apart from the
    /// payload (claims, job records and turns, idempotency answers, rate
    /// limits, batches), so payload never evicts it.
    pub max_state_bytes: u64,
    /// Required when `backend: redis`.
    pub redis: Option<RedisConfig>,
    /// AES-256-GCM for every record written; required with Redis unless
    /// `redis.allow_plaintext` is set.
    pub encryption: Option<EncryptionConfig>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: StoreBackend::Memory,
            max_bytes: 64 * 1024 * 1024,
            max_state_bytes: 32 * 1024 * 1024,
            redis: None,
            encryption: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port` or `rediss://host:port` (TLS, rustls with the
    /// system roots). Credentials belong in `username`/`password_file`.
    pub url: String,
    /// Database number.
    pub db: i64,
    /// ACL user; absent: the default user.
    pub username: Option<String>,
    /// File holding the password (a mounted Secret); absent: no AUTH.
    pub password_file: Option<PathBuf>,
    /// Bound on every call; past it the call fails and the use's failure
    /// policy applies, so an outage never stalls a request.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Bound on (re)connecting.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Prefix of every key name.
    pub key_prefix: String,
    /// Start without `store.encryption`: records stored in the clear.
    pub allow_plaintext: bool,
    /// `rediss://` only: PEM CA bundle to trust instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// `rediss://` only: PEM client certificate and key (mutual TLS); both
    /// or neither.
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            db: 0,
            username: None,
            password_file: None,
            timeout: Duration::from_millis(50),
            connect_timeout: Duration::from_secs(1),
            key_prefix: "mf".into(),
            allow_plaintext: false,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EncryptionConfig {
    /// The key ring: a file of `id: base64(32 bytes)` lines, or a directory
    /// (a mounted Secret) with one file per key id. The newest key (the
    /// last line; in a directory, the greatest id) encrypts; all decrypt.
    pub key_file: PathBuf,
    /// How often the key ring is checked for changes.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl Default for EncryptionConfig {
    fn default() -> Self {
        Self {
            key_file: PathBuf::new(),
            reload_interval: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Cache policy per model name; a model not listed is never cached.
    pub models: std::collections::BTreeMap<String, ModelCacheConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cacheable {
    /// Only requests with `temperature: 0`, or whose client opts in with
    /// the `X-Cache-Opt-In: true` header.
    Deterministic,
    /// Every request (the answers of a sampling model are then replayed).
    All,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelCacheConfig {
    pub enabled: bool,
    /// How long an answer is served from the cache.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    pub cacheable: Cacheable,
    /// One cache for every client (a public FAQ); default: per client.
    pub shared: bool,
    /// Larger answers are served but not cached.
    pub max_entry_bytes: usize,
}

impl Default for ModelCacheConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            ttl: Duration::from_secs(600),
            cacheable: Cacheable::Deterministic,
            shared: false,
            max_entry_bytes: 256 * 1024,
        }
    }
}
