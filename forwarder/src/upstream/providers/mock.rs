use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use http::HeaderMap;

use super::{Completed, Opened, Provider};
use crate::api::ChatRequest;
use crate::mock_llm::{error_body, Fault, MockAnswer, MockModel};
use crate::pipeline::envelope::Envelope;
use crate::pipeline::ApiKind;
use crate::sse;
use crate::upstream::UpstreamError;
use forwarder_config::MockSettings;

/// The built-in mock model, answered in-process with no network hop. It
/// honours the same latency and fault settings as `forwarder mock-llm`, and
/// speaks every API the forwarder forwards like a real upstream: its
/// answers are bytes.
pub struct MockProvider {
    model: MockModel,
}

impl MockProvider {
    pub fn new(settings: MockSettings) -> Self {
        Self {
            model: MockModel::new(settings),
        }
    }

    /// Latency and faults. Returns a mid-stream fault for a stream to
    /// apply; for a completion such a fault fails the request here.
    async fn prelude(&self, req: &Envelope) -> Result<Option<Fault>, UpstreamError> {
        let (latency, fault) = self.model.begin();
        // tokio's timer has 1 ms granularity: a zero sleep would still cost ~1 ms.
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let injected = |status: u16, retry_after| {
            UpstreamError::Status {
            status,
            retry_after,
            body: match req.api {
                ApiKind::ChatCompletions => Bytes::from_static(
                    br#"{"error":{"message":"injected mock error","type":"mock_error","code":"injected"}}"#,
                ),
                api => error_body(api.family(), status, "injected mock error"),
            },
        }
        };
        match fault {
            None => Ok(None),
            Some(Fault::Error {
                status,
                retry_after,
            }) => Err(injected(status, retry_after)),
            Some(Fault::Hang) => futures::future::pending().await,
            Some(Fault::Reset) => Err(UpstreamError::Protocol("injected connection reset".into())),
            Some(f @ (Fault::Cut | Fault::StreamError)) if req.stream => Ok(Some(f)),
            Some(Fault::Cut) => Err(UpstreamError::Protocol("injected connection reset".into())),
            Some(Fault::StreamError) => Err(injected(500, None)),
        }
    }

    /// The mock's format mapping for chat: it reads the request like any
    /// OpenAI server.
    fn chat(req: &Envelope) -> Result<ChatRequest, UpstreamError> {
        serde_json::from_slice(&req.body).map_err(|_| UpstreamError::Status {
            status: 400,
            retry_after: None,
            body: Bytes::from_static(
                br#"{"error":{"message":"the mock could not read the request","type":"invalid_request_error","code":"invalid_request"}}"#,
            ),
        })
    }

    /// Any other API's answer.
    fn answer(&self, req: &Envelope, fault: Option<Fault>) -> Result<MockAnswer, UpstreamError> {
        self.model
            .answer(req.api, &req.body, fault)
            .map_err(|r| UpstreamError::Status {
                status: r.status,
                retry_after: None,
                body: r.body,
            })
    }
}

#[async_trait]
impl Provider for MockProvider {
    fn support(&self, _: ApiKind) -> super::Support {
        super::Support::Native
    }

    async fn complete(&self, req: &Envelope) -> Result<Completed, UpstreamError> {
        self.prelude(req).await?;
        if req.api != ApiKind::ChatCompletions {
            return match self.answer(req, None)? {
                MockAnswer::Complete(body) => Ok(Completed {
                    headers: HeaderMap::new(),
                    body,
                }),
                MockAnswer::Events(_) => Err(UpstreamError::Protocol(
                    "the mock streamed an unstreamed request".into(),
                )),
            };
        }
        let chat = Self::chat(req)?;
        let body = serde_json::to_vec(&self.model.respond(&chat))
            .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
        Ok(Completed {
            headers: HeaderMap::new(),
            body: body.into(),
        })
    }

    async fn stream(&self, req: &Envelope) -> Result<Opened, UpstreamError> {
        let fault = self.prelude(req).await?;
        if req.api != ApiKind::ChatCompletions {
            return match self.answer(req, fault)? {
                MockAnswer::Events(events) => Ok(Opened {
                    headers: HeaderMap::new(),
                    events: events.map(Ok).boxed(),
                }),
                MockAnswer::Complete(_) => Err(UpstreamError::Protocol(
                    "the mock answered a stream with a body".into(),
                )),
            };
        }
        let chat = Self::chat(req)?;
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
        let events = crate::mock_llm::with_fault(
            events.map(|e| e.unwrap_or_default()).boxed(),
            req.api,
            fault,
        );
        Ok(Opened {
            headers: HeaderMap::new(),
            events: events.map(Ok).boxed(),
        })
    }
}
