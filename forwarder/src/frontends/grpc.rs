//! gRPC (`modelforwarder.v1.Forwarder`): unary `Forward` and server-streaming
//! `ForwardStream`, on their own HTTP/2 listener, plus the standard
//! `grpc.health.v1` health service and server reflection.

use std::sync::Arc;

use futures::stream::BoxStream;
use futures::StreamExt;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Request, Response, Status};

use std::time::Duration;

use crate::api::{
    prompt_or_messages, ApiError, ChatMessage, ChatRequest, ChunkView, CompletionView, Usage,
};
use crate::auth;
use crate::pipeline::envelope::ReplyBody;
use crate::pipeline::{Answer, Call, Pipeline, RequestMeta};
use crate::sse;
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
        let request_id = text("x-request-id")
            .filter(|v| v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let mut meta = RequestMeta::new(Protocol::Grpc, request_id);
        meta.credential = auth::credential(&headers).map(str::to_string);
        // Set by the TLS listener's connections (the subject of a verified
        // client certificate); plain connections carry none.
        meta.peer = req
            .extensions()
            .get::<Option<super::tls::PeerSubject>>()
            .and_then(|p| p.as_ref())
            .map(|p| p.0.to_string());
        meta.idempotency_key = text("idempotency-key");
        // Answer a little before the client's deadline, so it gets
        // DEADLINE_EXCEEDED with the HTTP mapping in metadata rather than
        // the transport's bare CANCELLED when the deadline fires there.
        meta.timeout = text("grpc-timeout")
            .and_then(|t| parse_grpc_timeout(&t))
            .map(|t| t.saturating_sub((t / 20).min(Duration::from_millis(20))));
        meta
    }

    /// Admits and runs one call.
    async fn run(
        &self,
        meta: RequestMeta,
        body: ForwardRequest,
        stream: bool,
    ) -> Result<Answer, ApiError> {
        let admitted = self.pipeline.admit(meta)?;
        self.pipeline.run(admitted, to_call(body, stream)).await
    }
}

/// `grpc-timeout` (gRPC over HTTP/2): up to 8 digits and a unit
/// (H, M, S, m, u, n). Malformed values are ignored, as the spec allows.
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The call as a chat-completions body (this edge's translation).
fn to_call(req: ForwardRequest, stream: bool) -> Result<Call, ApiError> {
    if req.model_id.is_empty() {
        return Err(ApiError::BadRequest("model_id is required".into()));
    }
    let messages = req
        .messages
        .into_iter()
        .map(|m| ChatMessage::text(&m.role, m.content))
        .collect();
    let prompt = Some(req.prompt).filter(|p| !p.is_empty());
    let mut chat = ChatRequest {
        model: req.model_id,
        messages: prompt_or_messages(prompt, messages)?,
        stream: false,
        params: Default::default(),
    }
    .with_tuning(req.max_tokens, req.temperature);
    if stream {
        chat = chat.streamed_with_usage();
    }
    let body = serde_json::to_vec(&chat)
        .map_err(|e| ApiError::BadRequest(format!("invalid request: {e}")))?;
    Ok(Call {
        body: body.into(),
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

/// The upstream's usage, if it sent one in the usual shape.
fn usage(raw: Option<&serde_json::value::RawValue>) -> Option<pb::Usage> {
    let u: Usage = serde_json::from_str(raw?.get()).ok()?;
    Some(pb::Usage {
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

fn complete_reply(
    body: &[u8],
    request_id: String,
    replayed: bool,
) -> Result<ForwardResponse, ApiError> {
    let v = CompletionView::parse(body)?;
    Ok(ForwardResponse {
        reply: v.text,
        model_id: v.model,
        request_id,
        usage: usage(v.usage.as_deref()),
        finish_reason: v.finish_reason.unwrap_or_default(),
        replayed,
    })
}

/// Translates events into chunks. A finish-only event is held back and
/// its reason carried by the usage chunk that follows (the gRPC edge asks
/// for usage), so the last chunk holds both; if no usage comes, the held
/// finish is sent at the end.
#[derive(Default)]
struct Chunker {
    held_finish: Option<String>,
}

impl Chunker {
    /// `None` for `[DONE]`, keep-alive comments and a held finish.
    fn chunk(&mut self, event: &[u8]) -> Result<Option<ForwardChunk>, ApiError> {
        let Some(data) = sse::data(event) else {
            return Ok(None);
        };
        let Some(c) = ChunkView::parse(&data)? else {
            return Ok(None);
        };
        let usage = usage(c.usage.as_deref());
        if c.finish_reason.is_some() && c.delta.is_empty() && usage.is_none() {
            self.held_finish = c.finish_reason;
            return Ok(None);
        }
        let finish = c.finish_reason.or_else(|| {
            if usage.is_some() {
                self.held_finish.take()
            } else {
                None
            }
        });
        Ok(Some(ForwardChunk {
            delta: c.delta,
            finish_reason: finish.unwrap_or_default(),
            usage,
        }))
    }

    fn finish(&mut self) -> Option<ForwardChunk> {
        self.held_finish.take().map(|f| ForwardChunk {
            delta: String::new(),
            finish_reason: f,
            usage: None,
        })
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
        let answer = self
            .run(meta, body, false)
            .await
            .map_err(|e| to_status(&e))?;
        let ReplyBody::Complete(bytes) = &answer.reply.body else {
            return Err(Status::internal("unexpected stream"));
        };
        let reply = complete_reply(bytes, shown_id, answer.replayed).map_err(|e| to_status(&e))?;
        Ok(with_request_id(reply, &rid))
    }

    type ForwardStreamStream = BoxStream<'static, Result<ForwardChunk, Status>>;

    async fn forward_stream(
        &self,
        req: Request<ForwardRequest>,
    ) -> Result<Response<Self::ForwardStreamStream>, Status> {
        let meta = Self::meta(&req);
        let rid = meta.request_id.clone();
        let body = req.into_inner();
        let answer = self
            .run(meta, body, true)
            .await
            .map_err(|e| to_status(&e))?;
        let chunks: Self::ForwardStreamStream = match answer.reply.body {
            ReplyBody::Stream(s) => {
                let chunker = Arc::new(parking_lot::Mutex::new(Chunker::default()));
                let at_end = chunker.clone();
                // Each item is a run of events: one message per event.
                s.flat_map(move |item| {
                    let mut out = Vec::new();
                    match item {
                        Ok(run) => {
                            let mut chunker = chunker.lock();
                            for event in sse::events(&run) {
                                match chunker.chunk(event) {
                                    Ok(Some(chunk)) => out.push(Ok(chunk)),
                                    Ok(None) => {}
                                    Err(e) => {
                                        out.push(Err(to_status(&e)));
                                        break;
                                    }
                                }
                            }
                        }
                        Err(e) => out.push(Err(to_status(&e))),
                    }
                    futures::stream::iter(out)
                })
                .chain(futures::stream::iter(std::iter::from_fn(move || {
                    at_end.lock().finish().map(Ok)
                })))
                .boxed()
            }

            ReplyBody::Complete(bytes) => {
                let reply =
                    complete_reply(&bytes, String::new(), true).map_err(|e| to_status(&e))?;
                futures::stream::once(async move {
                    Ok(ForwardChunk {
                        delta: reply.reply,
                        finish_reason: reply.finish_reason,
                        usage: reply.usage,
                    })
                })
                .boxed()
            }
        };
        Ok(with_request_id(chunks, &rid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units_and_malformed_values() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_grpc_timeout("99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
        for bad in ["", "m", "12", "1x", "123456789S", "-1S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_finish_reason_rides_on_the_usage_chunk() {
        let mut c = Chunker::default();
        let ev = |json: &str| format!("data: {json}\n\n");
        let text = c
            .chunk(
                ev(r#"{"choices":[{"delta":{"content":"hi"},"finish_reason":null}]}"#).as_bytes(),
            )
            .unwrap()
            .unwrap();
        assert_eq!(
            (text.delta.as_str(), text.finish_reason.as_str()),
            ("hi", "")
        );
        let held = c.chunk(ev(r#"{"choices":[{"delta":{},"finish_reason":"stop"}]}"#).as_bytes());
        assert!(held.unwrap().is_none());
        let last = c
            .chunk(ev(r#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#).as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(last.finish_reason, "stop");
        assert_eq!(last.usage.unwrap().total_tokens, 3);
        assert!(c.finish().is_none());
        assert!(c.chunk(b"data: [DONE]\n\n").unwrap().is_none());
    }
}
