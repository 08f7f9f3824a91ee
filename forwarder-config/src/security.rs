//! Security settings: JWT verification (`auth.jwt`), TLS on the listeners
//! (`server.tls`) and towards upstreams (`upstreams[].tls`).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// JWT verification. Exactly one key source: `secret_file` (HS256/384/512
/// with a shared secret), `jwks_file` (a JWKS document, e.g. a mounted
/// Secret, reloaded on change) or `jwks_url` (fetched and cached).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    /// File holding the HMAC shared secret (surrounding whitespace ignored).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// File holding a JWKS document (`{"keys": [...]}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<PathBuf>,
    /// URL of a JWKS document, fetched at start and refreshed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    /// Accepted algorithms (`HS256`, `HS384`, `HS512`, `RS256`, `RS384`,
    /// `RS512`, `PS256`, `PS384`, `PS512`, `ES256`, `ES384`, `EdDSA`). Each key
    /// verifies only the algorithms of its own type (and its JWK `alg`, when
    /// set) among these, so `none` and HMAC-with-a-public-key never pass.
    pub algorithms: Vec<String>,
    /// Required `iss`, when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// Accepted `aud` values; when non-empty a token must name one of them.
    pub audiences: Vec<String>,
    /// Tokens without `exp` are refused.
    pub require_exp: bool,
    /// Tokens whose `iat` is older than this are refused (and `iat` becomes
    /// required).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_age: Option<Duration>,
    /// Clock skew allowed on `exp`, `nbf` and `iat`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// Longest accepted token, in bytes; a longer one is refused unparsed.
    pub max_token_bytes: usize,
    /// The claim naming the client (scopes rate limits and idempotency).
    pub principal_claim: String,
    /// A claim holding the models the client may use (a list of strings);
    /// absent claim: every model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub models_claim: Option<String>,
    /// A claim holding the client's rate-limit tier (a string).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tier_claim: Option<String>,
    /// How often `jwks_file` is checked, and how long a fetched `jwks_url`
    /// document is used before it is fetched again.
    #[serde(with = "humantime_serde")]
    pub refresh_interval: Duration,
    /// A token with an unknown `kid` triggers a `jwks_url` fetch at most
    /// this often (unknown kids must not make us hammer the issuer).
    #[serde(with = "humantime_serde")]
    pub min_refresh_interval: Duration,
    /// Verified tokens remembered (until their expiry), so a client reusing
    /// its token skips the signature check. 0 disables the cache.
    pub cache_entries: u64,
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            secret_file: None,
            jwks_file: None,
            jwks_url: None,
            algorithms: Vec::new(),
            issuer: None,
            audiences: Vec::new(),
            require_exp: true,
            max_age: None,
            leeway: Duration::from_secs(30),
            max_token_bytes: 8 * 1024,
            principal_claim: "sub".into(),
            models_claim: None,
            tier_claim: None,
            refresh_interval: Duration::from_secs(300),
            min_refresh_interval: Duration::from_secs(30),
            cache_entries: 10_000,
        }
    }
}

/// The algorithm names `algorithms` accepts.
pub const JWT_ALGORITHMS: &[&str] = &[
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256",
    "ES384", "EdDSA",
];

/// TLS on the HTTP (HTTPS, WSS) and gRPC listeners.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain (leaf first), e.g. a kubernetes.io/tls Secret's
    /// `tls.crt`.
    pub cert_file: PathBuf,
    /// PEM private key (`tls.key`).
    pub key_file: PathBuf,
    /// PEM CA bundle: when set, clients must present a certificate it signed
    /// (mTLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
    /// A request without an API key or token, over a verified client
    /// certificate, is the client named by the certificate's subject CN.
    #[serde(default)]
    pub client_cert_principal: bool,
    /// How often the files are checked for changes (cert-manager rotation);
    /// new connections get the new certificate, open ones keep theirs.
    #[serde(default = "default_tls_reload", with = "humantime_serde")]
    pub reload_interval: Duration,
}

fn default_tls_reload() -> Duration {
    Duration::from_secs(5)
}

/// TLS towards the trace collector (an `https://` endpoint, OTLP over
/// `http/protobuf`). The files are read at start.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CollectorTlsConfig {
    /// PEM CA bundle trusted instead of the system roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain and key (both or neither), for a collector
    /// that requires them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// The name sent as SNI and checked against the certificate, when it
    /// differs from the endpoint's host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

impl CollectorTlsConfig {
    /// The same files, as the client TLS settings an upstream has.
    pub fn as_client(&self) -> UpstreamTlsConfig {
        UpstreamTlsConfig {
            ca_file: self.ca_file.clone(),
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
            server_name: self.server_name.clone(),
            ..UpstreamTlsConfig::default()
        }
    }
}

/// TLS towards one upstream (an `https://` base URL).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// PEM CA bundle trusted instead of the system roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain and key for upstream mTLS (both or neither).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// The name sent as SNI and checked against the certificate, when it
    /// differs from the URL's host (e.g. connecting by IP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// How often the files are checked for changes; a change builds a new
    /// client for new connections (pooled ones finish their requests).
    #[serde(default = "default_tls_reload", with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl Default for UpstreamTlsConfig {
    fn default() -> Self {
        Self {
            ca_file: None,
            cert_file: None,
            key_file: None,
            server_name: None,
            reload_interval: default_tls_reload(),
        }
    }
}
