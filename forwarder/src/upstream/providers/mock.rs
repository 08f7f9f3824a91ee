use async_trait::async_trait;
use futures::StreamExt;

use super::{ChunkStream, Provider};
use crate::api::{ChatRequest, ChatResponse};
use crate::mock_llm::{Fault, MockModel};
use crate::upstream::UpstreamError;
use forwarder_config::MockSettings;

/// The built-in mock model, answered in-process with no network hop. It
/// honours the same latency and fault settings as `forwarder mock-llm`.
pub struct MockProvider {
    model: MockModel,
}

impl MockProvider {
    pub fn new(settings: MockSettings) -> Self {
        Self {
            model: MockModel::new(settings),
        }
    }

    async fn prelude(&self) -> Result<(), UpstreamError> {
        let (latency, fault) = self.model.begin();
        // tokio's timer has 1 ms granularity: a zero sleep would still cost ~1 ms.
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        match fault {
            None => Ok(()),
            Some(Fault::Error {
                status,
                retry_after,
            }) => Err(UpstreamError::Status {
                status,
                retry_after,
                message: "injected mock error".into(),
            }),
            Some(Fault::Hang) => futures::future::pending().await,
            Some(Fault::Reset) => Err(UpstreamError::Protocol("injected connection reset".into())),
        }
    }
}

#[async_trait]
impl Provider for MockProvider {
    async fn complete(&self, req: &ChatRequest) -> Result<ChatResponse, UpstreamError> {
        self.prelude().await?;
        Ok(self.model.respond(req))
    }

    async fn stream(&self, req: &ChatRequest) -> Result<ChunkStream, UpstreamError> {
        self.prelude().await?;
        Ok(self.model.chunk_stream(req).map(Ok).boxed())
    }
}
