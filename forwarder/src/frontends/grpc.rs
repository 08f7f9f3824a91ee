//! gRPC (`modelforwarder.v1.Forwarder`): unary `Forward` and server-streaming
//! `ForwardStream`, on their own HTTP/2 listener, plus the standard
//! `grpc.health.v1` health service and server reflection.

use std::sync::Arc;

use futures::stream::BoxStream;
use futures::StreamExt;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Request, Response, Status};

use crate::api::{prompt_or_messages, ApiError, ChatMessage, ChatRequest, ChatResponse, Usage};
use crate::auth;
use crate::pipeline::{Answer, Call, Pipeline, Reply, RequestMeta};
use crate::telemetry::Protocol;

pub mod pb {
    tonic::include_proto!("modelforwarder.v1");
    /// The encoded descriptors, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("forwarder_descriptor");
}

use pb::forwarder_server::{Forwarder, ForwarderServer};
use pb::{ForwardChunk, ForwardRequest, ForwardResponse};

pub struct GrpcFrontend {
    pipeline: Arc<Pipeline>,
}

impl GrpcFrontend {
    pub fn service(pipeline: Arc<Pipeline>) -> ForwarderServer<Self> {
        let limit = pipeline.config().server.max_body_bytes;
        ForwarderServer::new(Self { pipeline })
            .max_decoding_message_size(limit)
            .max_encoding_message_size(usize::MAX)
    }

    /// The pipeline's view of the call, and the request id to echo.
    fn meta<T>(req: &Request<T>) -> RequestMeta {
        let headers = req.metadata().clone().into_headers();
        let text = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_string)
        };
        RequestMeta {
            protocol: Protocol::Grpc,
            request_id: text("x-request-id")
                .filter(|v| v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            credential: auth::credential(&headers).map(str::to_string),
            idempotency_key: text("idempotency-key"),
        }
    }
}

fn to_chat(req: ForwardRequest, stream: bool) -> Result<Call, ApiError> {
    if req.model_id.is_empty() {
        return Err(ApiError::BadRequest("model_id is required".into()));
    }
    let messages = req
        .messages
        .into_iter()
        .map(|m| ChatMessage::text(&m.role, m.content))
        .collect();
    let prompt = Some(req.prompt).filter(|p| !p.is_empty());
    let chat = ChatRequest {
        model: req.model_id,
        messages: prompt_or_messages(prompt, messages)?,
        stream,
        params: Default::default(),
    }
    .with_tuning(req.max_tokens, req.temperature);
    Ok(Call {
        chat,
        idempotency_key: Some(req.request_id).filter(|k| !k.is_empty()),
    })
}

/// The gRPC status for an error; metadata carries the HTTP status and
/// error code the HTTP API would give, so clients map 1:1.
pub fn to_status(e: &ApiError) -> Status {
    let http = e.status().as_u16();
    let code = match http {
        400 | 413 => Code::InvalidArgument,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::NotFound,
        409 => Code::Aborted,
        422 => Code::FailedPrecondition,
        429 => Code::ResourceExhausted,
        502 | 503 => Code::Unavailable,
        504 => Code::DeadlineExceeded,
        400..=499 => Code::InvalidArgument,
        _ => Code::Internal,
    };
    let mut md = MetadataMap::new();
    md.insert("x-http-status", MetadataValue::from(http));
    if let Ok(v) = e.kind().1.parse() {
        md.insert("x-error-code", v);
    }
    if let Some(after) = e.retry_after() {
        md.insert("retry-after", MetadataValue::from(after.as_secs().max(1)));
    }
    Status::with_metadata(code, e.to_string(), md)
}

fn usage(u: Option<Usage>) -> Option<pb::Usage> {
    u.map(|u| pb::Usage {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        total_tokens: u.total_tokens,
    })
}

fn with_request_id<T>(body: T, request_id: &str) -> Response<T> {
    let mut resp = Response::new(body);
    if let Ok(v) = request_id.parse() {
        resp.metadata_mut().insert("x-request-id", v);
    }
    resp
}

fn complete_reply(r: &ChatResponse, request_id: String, replayed: bool) -> ForwardResponse {
    ForwardResponse {
        reply: r.reply_text(),
        model_id: r.model.clone(),
        request_id,
        usage: usage(r.usage),
        finish_reason: r
            .choices
            .first()
            .and_then(|c| c.finish_reason.clone())
            .unwrap_or_default(),
        replayed,
    }
}

#[tonic::async_trait]
impl Forwarder for GrpcFrontend {
    async fn forward(
        &self,
        req: Request<ForwardRequest>,
    ) -> Result<Response<ForwardResponse>, Status> {
        let meta = Self::meta(&req);
        let rid = meta.request_id.clone();
        let body = req.into_inner();
        let shown_id = Some(body.request_id.clone())
            .filter(|k| !k.is_empty())
            .unwrap_or_else(|| rid.clone());
        match self.pipeline.run(meta, || to_chat(body, false)).await {
            Ok(Answer {
                reply: Reply::Complete(r),
                replayed,
            }) => Ok(with_request_id(
                complete_reply(&r, shown_id, replayed),
                &rid,
            )),
            Ok(Answer {
                reply: Reply::Stream(_),
                ..
            }) => Err(Status::internal("unexpected stream")),
            Err(e) => Err(to_status(&e)),
        }
    }

    type ForwardStreamStream = BoxStream<'static, Result<ForwardChunk, Status>>;

    async fn forward_stream(
        &self,
        req: Request<ForwardRequest>,
    ) -> Result<Response<Self::ForwardStreamStream>, Status> {
        let meta = Self::meta(&req);
        let rid = meta.request_id.clone();
        let body = req.into_inner();
        let chunks: Self::ForwardStreamStream =
            match self.pipeline.run(meta, || to_chat(body, true)).await {
                Ok(Answer {
                    reply: Reply::Stream(s),
                    ..
                }) => s
                    .map(|item| match item {
                        Ok(c) => Ok(ForwardChunk {
                            delta: c.delta_text().to_string(),
                            finish_reason: c
                                .choices
                                .first()
                                .and_then(|x| x.finish_reason.clone())
                                .unwrap_or_default(),
                            usage: usage(c.usage),
                        }),
                        Err(e) => Err(to_status(&e)),
                    })
                    .boxed(),
                Ok(Answer {
                    reply: Reply::Complete(r),
                    ..
                }) => {
                    let reply = complete_reply(&r, String::new(), true);
                    futures::stream::once(async move {
                        Ok(ForwardChunk {
                            delta: reply.reply,
                            finish_reason: reply.finish_reason,
                            usage: reply.usage,
                        })
                    })
                    .boxed()
                }
                Err(e) => return Err(to_status(&e)),
            };
        Ok(with_request_id(chunks, &rid))
    }
}
