use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use http::HeaderMap;

use super::{Completed, Opened, Provider};
use crate::api::ChatRequest;
use crate::mock_llm::{Fault, MockModel};
use crate::pipeline::envelope::Envelope;
use crate::sse;
use crate::upstream::UpstreamError;
use forwarder_config::MockSettings;

/// The built-in mock model, answered in-process with no network hop. It
/// honours the same latency and fault settings as `forwarder mock-llm`, and
/// speaks OpenAI's format like a real upstream: its answers are bytes.
pub struct MockProvider {
    model: MockModel,
}

impl MockProvider {
    pub fn new(settings: MockSettings) -> Self {
        Self {
            model: MockModel::new(settings),
        }
    }

    async fn prelude(&self, req: &Envelope) -> Result<ChatRequest, UpstreamError> {
        let (latency, fault) = self.model.begin();
        // tokio's timer has 1 ms granularity: a zero sleep would still cost ~1 ms.
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        match fault {
            None => {}
            Some(Fault::Error {
                status,
                retry_after,
            }) => {
                return Err(UpstreamError::Status {
                    status,
                    retry_after,
                    body: Bytes::from_static(
                        br#"{"error":{"message":"injected mock error","type":"mock_error","code":"injected"}}"#,
                    ),
                })
            }
            Some(Fault::Hang) => futures::future::pending().await,
            Some(Fault::Reset) => {
                return Err(UpstreamError::Protocol("injected connection reset".into()))
            }
        }
        // The mock's format mapping: it reads the request like any OpenAI server.
        serde_json::from_slice(&req.body).map_err(|_| UpstreamError::Status {
            status: 400,
            retry_after: None,
            body: Bytes::from_static(
                br#"{"error":{"message":"the mock could not read the request","type":"invalid_request_error","code":"invalid_request"}}"#,
            ),
        })
    }
}

#[async_trait]
impl Provider for MockProvider {
    async fn complete(&self, req: &Envelope) -> Result<Completed, UpstreamError> {
        let chat = self.prelude(req).await?;
        let body = serde_json::to_vec(&self.model.respond(&chat))
            .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
        Ok(Completed {
            headers: HeaderMap::new(),
            body: body.into(),
        })
    }

    async fn stream(&self, req: &Envelope) -> Result<Opened, UpstreamError> {
        let chat = self.prelude(req).await?;
        let events = self
            .model
            .chunk_stream(&chat)
            .map(|chunk| {
                serde_json::to_vec(&chunk)
                    .map(|json| sse::data_event(&json))
                    .map_err(|e| UpstreamError::Protocol(e.to_string()))
            })
            .chain(futures::stream::once(async {
                Ok(Bytes::from_static(sse::DONE_EVENT))
            }));
        Ok(Opened {
            headers: HeaderMap::new(),
            events: events.boxed(),
        })
    }
}
