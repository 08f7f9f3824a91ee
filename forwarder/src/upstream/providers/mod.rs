//! Provider adapters: one per upstream API kind, all behind one trait. Each
//! adapter says which of the envelope's APIs ([`ApiKind`]) it speaks and
//! owns the mapping to its upstream's wire format. Same API in and out is
//! the identity (an OpenAI-compatible upstream gets OpenAI's APIs, an
//! Anthropic one Anthropic's, the mock all of them); between the families
//! the adapter translates Anthropic Messages to an OpenAI-compatible
//! upstream's chat completions, and chat completions to an Anthropic
//! upstream's Messages ([`translate`]). Embeddings, Responses and
//! count_tokens are not translated.

mod anthropic;
mod mock;
mod openai;
pub mod translate;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use http::HeaderMap;

use crate::api::HeaderAllow;
use crate::pipeline::envelope::Envelope;
use crate::pipeline::ApiKind;
use crate::upstream::UpstreamError;

pub use mock::MockProvider;
pub use openai::OpenAiProvider;

/// A whole completion: headers on the `to_client` allow-list and the body.
pub struct Completed {
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// What an upstream answered on an object it keeps: a whole body, or (a
/// retrieve with `stream=true`) the object's events as they come.
pub enum ObjectBody {
    Whole(Bytes),
    Events(RawEvents),
}

/// An answer on an object: headers on the `to_client` allow-list, and the body.
pub struct ObjectReply {
    pub headers: HeaderMap,
    pub body: ObjectBody,
}

/// An open stream: headers, then whole SSE events in the request's API's format.
pub struct Opened {
    pub headers: HeaderMap,
    pub events: RawEvents,
}

/// Runs of whole Server-Sent Events: each item is one or more events, each
/// ending with its blank line (never a part of one). The stream
/// ends when the upstream's body ends; whether it ended complete is for the
/// caller to judge from the events (`[DONE]`, `finish_reason`).
pub type RawEvents = BoxStream<'static, Result<Bytes, UpstreamError>>;

/// One upstream endpoint's API. Timeouts are the caller's business.
#[async_trait]
pub trait Provider: Send + Sync {
    /// Whether this adapter can forward a request of `api`; the pipeline
    /// sends it nothing else.
    fn supports(&self, api: ApiKind) -> bool {
        self.support(api) != Support::None
    }

    /// How this adapter takes a request of `api`: natively, translated, or
    /// not at all. Endpoints that take it natively are preferred.
    fn support(&self, api: ApiKind) -> Support;

    async fn complete(&self, req: &Envelope) -> Result<Completed, UpstreamError>;

    /// Resolves once the upstream has accepted the request and its stream
    /// has begun; errors after that come through the stream.
    async fn stream(&self, req: &Envelope) -> Result<Opened, UpstreamError>;

    /// A request on an object the upstream keeps (`GET` or `DELETE
    /// /responses/{id}`), `path` under its base URL. Adapters that keep
    /// none answer 404.
    async fn object(&self, method: http::Method, path: &str) -> Result<ObjectReply, UpstreamError> {
        let _ = (method, path);
        Err(UpstreamError::Status {
            status: 404,
            retry_after: None,
            body: Bytes::from_static(
                br#"{"error":{"message":"this upstream keeps no such objects","type":"invalid_request_error","code":"not_found"}}"#,
            ),
        })
    }

    /// Re-reads files the adapter was built from (TLS material); returns
    /// whether anything changed.
    fn reload_files(&self) -> Result<bool, crate::BuildError> {
        Ok(false)
    }
}

/// How an adapter takes a request of some API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Support {
    None,
    /// Translated to the upstream's own API and back.
    Translated,
    /// As it came.
    Native,
}

/// What every adapter shares: bounds and the response-header allow-list.
#[derive(Clone)]
pub struct AdapterLimits {
    pub max_body_bytes: usize,
    pub max_event_bytes: usize,
    pub to_client: HeaderAllow,
}

impl AdapterLimits {
    pub fn from_config(cfg: &forwarder_config::Config) -> Self {
        Self {
            max_body_bytes: cfg.limits.max_upstream_body_bytes,
            max_event_bytes: cfg.limits.max_event_bytes,
            to_client: HeaderAllow::new(&cfg.headers.to_client),
        }
    }
}

/// Builds the adapter an upstream's config asks for.
pub fn build(
    cfg: &forwarder_config::UpstreamConfig,
    limits: &AdapterLimits,
) -> Result<Arc<dyn Provider>, crate::BuildError> {
    use forwarder_config::Provider as Kind;
    Ok(match cfg.provider {
        Kind::Mock => Arc::new(MockProvider::new(cfg.mock.clone().unwrap_or_default())),
        Kind::Openai => Arc::new(OpenAiProvider::new(cfg, limits.clone())?),
        Kind::Anthropic => Arc::new(anthropic::provider(cfg, limits.clone())?),
    })
}
