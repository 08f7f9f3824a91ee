//! ModelForwarder's data plane: every front end turns its input into one
//! [`pipeline::Request`] and hands it to the one [`pipeline::Pipeline`]
//! (authenticate → rate-limit → idempotency → route → retry/breaker →
//! provider), wrapped by metrics and access logs.

pub mod api;
pub mod auth;
pub mod batch;
pub mod budget;
pub mod cache;
pub mod frontends;
pub mod jobs;
pub mod mock_llm;
pub mod openapi;
pub mod pipeline;
pub mod reload;
pub mod server;
pub mod sse;
pub mod store;
pub mod telemetry;
pub mod upstream;

pub use forwarder_config as config;

/// The forwarder could not be built from its configuration (a key file that
/// cannot be read, an invalid header value, …): reported at start, never
/// at request time.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BuildError(String);

impl BuildError {
    pub fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

/// Installs the process-wide TLS crypto provider (ring, as kube uses) that
/// reqwest's rustls needs; idempotent.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
