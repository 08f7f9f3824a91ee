//! Provider adapters: one per upstream API kind, all behind one trait.

mod mock;
mod openai;

use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::api::{ChatChunk, ChatRequest, ChatResponse};
use crate::upstream::UpstreamError;

pub use mock::MockProvider;
pub use openai::OpenAiProvider;

/// A stream of completion chunks, ending after the last one.
pub type ChunkStream = BoxStream<'static, Result<ChatChunk, UpstreamError>>;

/// One upstream endpoint's API. Timeouts are the caller's business.
#[async_trait]
pub trait Provider: Send + Sync {
    async fn complete(&self, req: &ChatRequest) -> Result<ChatResponse, UpstreamError>;

    /// Resolves once the upstream has accepted the request and its stream
    /// has begun; errors after that come through the stream.
    async fn stream(&self, req: &ChatRequest) -> Result<ChunkStream, UpstreamError>;
}

/// Builds the adapter an upstream's config asks for.
pub fn build(
    cfg: &forwarder_config::UpstreamConfig,
) -> Result<Arc<dyn Provider>, crate::BuildError> {
    use forwarder_config::Provider as Kind;
    Ok(match cfg.provider {
        Kind::Mock => Arc::new(MockProvider::new(cfg.mock.clone().unwrap_or_default())),
        Kind::Openai => Arc::new(OpenAiProvider::new(cfg)?),
    })
}
