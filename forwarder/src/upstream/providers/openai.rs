use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::Stream;
use http::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Body as _;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::{translate, AdapterLimits, Completed, Opened, Provider};
use crate::pipeline::envelope::Envelope;
use crate::pipeline::{ApiKind, Family};
use crate::reload::Swap;
use crate::sse::{self, Chunker, Splitter};
use crate::upstream::retry::parse_retry_after;
use crate::upstream::UpstreamError;
use crate::BuildError;

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Any OpenAI-compatible server (`/chat/completions`, `/embeddings`,
/// `/responses`), or, with the Anthropic dialect, an Anthropic Messages
/// server (`/messages`, `/messages/count_tokens`). Bodies of the upstream's
/// own APIs pass through untouched both ways; the dialect decides the
/// paths it serves and how it authenticates. Between the families this
/// edge translates ([`super::translate`]): an OpenAI-compatible upstream
/// also takes Messages requests (as chat completions), an Anthropic one
/// chat-completions requests (as Messages).
///
/// It speaks through hyper's pooled client directly: reqwest's redirect,
/// retry and URL layers cost about a third of the forwarder's instructions
/// per request, and a proxy needs none of them (it never follows redirects,
/// and retries are the pipeline's).
pub struct OpenAiProvider {
    /// Rebuilt when the upstream's TLS files change.
    client: Swap<HttpsClient>,
    /// The upstream's config, when it has TLS files to watch.
    files: Option<forwarder_config::UpstreamConfig>,
    /// Per [`ApiKind`] (by its index), parsed once.
    uris: Vec<Uri>,
    dialect: Family,
    /// The key's header: `authorization: Bearer …` or Anthropic's `x-api-key`.
    auth: Option<(HeaderName, HeaderValue)>,
    limits: AdapterLimits,
}

/// The `anthropic-version` sent when the client sent none (Anthropic
/// requires one; the Messages format this forwarder documents is this one).
pub const DEFAULT_ANTHROPIC_VERSION: &str = "2023-06-01";

/// Longest upstream error body kept (4xx bodies are passed to the client).
const MAX_ERROR_BODY: usize = 64 * 1024;

impl OpenAiProvider {
    pub fn new(
        cfg: &forwarder_config::UpstreamConfig,
        limits: AdapterLimits,
    ) -> Result<Self, BuildError> {
        Self::with_dialect(cfg, limits, Family::OpenAi)
    }

    pub fn with_dialect(
        cfg: &forwarder_config::UpstreamConfig,
        limits: AdapterLimits,
        dialect: Family,
    ) -> Result<Self, BuildError> {
        let base = cfg
            .base_url
            .as_deref()
            .unwrap_or_default()
            .trim_end_matches('/');
        let key = read_key(cfg)?;
        let auth = match key {
            Some(k) => {
                let (name, value) = match dialect {
                    Family::OpenAi => (AUTHORIZATION, format!("Bearer {k}")),
                    Family::Anthropic => (HeaderName::from_static("x-api-key"), k),
                };
                let mut v = HeaderValue::from_str(&value).map_err(|_| {
                    BuildError::new(format!(
                        "upstream {}: API key is not a valid header value",
                        cfg.name
                    ))
                })?;
                v.set_sensitive(true);
                Some((name, v))
            }
            None => None,
        };
        // Read before the files are, so a rotation racing the build is
        // seen by the next poll.
        let fingerprint = crate::upstream::tls::files_fingerprint(cfg.tls.as_ref());
        let client = https_client(cfg)?;
        let mut uris = Vec::with_capacity(ApiKind::ALL.len());
        for api in ApiKind::ALL {
            let uri: Uri = format!("{base}{}", api.path())
                .parse()
                .map_err(|e| BuildError::new(format!("upstreams.{}.base_url: {e}", cfg.name)))?;
            if uri.scheme().is_none() || uri.host().is_none() {
                return Err(BuildError::new(format!(
                    "upstreams.{}.base_url: must be an absolute http(s) URL",
                    cfg.name
                )));
            }
            uris.push(uri);
        }
        let files = cfg
            .tls
            .as_ref()
            .is_some_and(|t| t.ca_file.is_some() || t.cert_file.is_some())
            .then(|| cfg.clone());
        Ok(Self {
            client: Swap::new(client, fingerprint),
            files,
            uris,
            dialect,
            auth,
            limits,
        })
    }

    /// The API a request of `api` is translated to, if it is: Messages
    /// to an OpenAI-compatible upstream's chat completions, chat
    /// completions to an Anthropic upstream's Messages.
    fn translates(&self, api: ApiKind) -> Option<ApiKind> {
        match (self.dialect, api) {
            (Family::OpenAi, ApiKind::Messages) => Some(ApiKind::ChatCompletions),
            (Family::Anthropic, ApiKind::ChatCompletions) => Some(ApiKind::Messages),
            _ => None,
        }
    }

    async fn send(&self, req: &Envelope) -> Result<Response<Incoming>, UpstreamError> {
        let to = self.translates(req.api);
        let translated = to.is_some();
        let (uri, body) = match to {
            Some(to) => {
                let body = match to {
                    ApiKind::Messages => translate::chat_to_messages(&req.body),
                    _ => translate::messages_to_chat(&req.body),
                };
                let body = body.map_err(|e| UpstreamError::Status {
                    status: 400,
                    retry_after: None,
                    body: crate::mock_llm::error_body(req.api.family(), 400, &e.0),
                })?;
                (&self.uris[to as usize], Bytes::from(body))
            }
            None => (&self.uris[req.api as usize], req.body.clone()),
        };
        let mut request = Request::post(uri.clone())
            .body(Full::new(body))
            .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
        let headers = request.headers_mut();
        headers.reserve(req.headers.len() + 3);
        for (name, value) in &req.headers {
            // Anthropic's protocol headers mean nothing to a translated request's upstream.
            if translated && req.api.protocol_headers().contains(&name.as_str()) {
                continue;
            }
            headers.append(name, value.clone());
        }
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some((name, value)) = &self.auth {
            headers.insert(name, value.clone());
        }
        if self.dialect == Family::Anthropic && !headers.contains_key("anthropic-version") {
            headers.insert(
                "anthropic-version",
                HeaderValue::from_static(DEFAULT_ANTHROPIC_VERSION),
            );
        }
        let resp = self.client.get().request(request).await.map_err(classify)?;
        if resp.status().is_success() {
            Ok(resp)
        } else {
            Err(status_error(resp).await)
        }
    }
}

/// The pooled client for `cfg`: TLS from its files (read now), or the
/// shared system-roots config.
fn https_client(cfg: &forwarder_config::UpstreamConfig) -> Result<HttpsClient, BuildError> {
    let base = cfg.base_url.as_deref().unwrap_or_default();
    crate::install_crypto_provider();
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(30)));
    http.set_connect_timeout(Some(cfg.connect_timeout));
    http.enforce_http(false);
    // The system roots are loaded (once) only for https upstreams
    // without a CA bundle of their own.
    let https_url = base.starts_with("https:");
    let tls = match (&cfg.tls, https_url) {
        (Some(t), true) => crate::upstream::tls::client_config(&cfg.name, t, || {
            crate::upstream::tls::system_roots().clone()
        })?,
        (None, true) => crate::upstream::tls::system_roots().clone(),
        (_, false) => rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
    };
    let server_name = match &cfg.tls {
        Some(t) => crate::upstream::tls::server_name(&cfg.name, t)?,
        None => None,
    };
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    let https = match server_name {
        Some(name) => builder
            .with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
            .enable_all_versions()
            .wrap_connector(http),
        None => builder.enable_all_versions().wrap_connector(http),
    };
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_timer(TokioTimer::new())
        .build(https))
}

fn read_key(cfg: &forwarder_config::UpstreamConfig) -> Result<Option<String>, BuildError> {
    if let Some(path) = &cfg.api_key_file {
        let key = std::fs::read_to_string(path).map_err(|e| {
            BuildError::new(format!(
                "upstreams.{}.api_key_file {}: {e}",
                cfg.name,
                path.display()
            ))
        })?;
        return Ok(Some(key.trim().to_string()));
    }
    if let Some(var) = &cfg.api_key_env {
        let key = std::env::var(var).map_err(|_| {
            BuildError::new(format!(
                "upstreams.{}.api_key_env: variable {var} is not set",
                cfg.name
            ))
        })?;
        return Ok(Some(key.trim().to_string()));
    }
    Ok(None)
}

fn classify(e: hyper_util::client::legacy::Error) -> UpstreamError {
    use std::error::Error as _;
    if e.is_connect() {
        return UpstreamError::Connect(e.to_string());
    }
    // A head the upstream sent but that does not parse: it answered.
    let parse = e
        .source()
        .and_then(|s| s.downcast_ref::<hyper::Error>())
        .is_some_and(hyper::Error::is_parse);
    if parse {
        UpstreamError::Answered(e.to_string())
    } else {
        UpstreamError::Protocol(e.to_string())
    }
}

/// A completion's body after a 200 head: a read that failed (the
/// connection reset mid-body) is an answer that began and failed.
fn answer_error(e: UpstreamError) -> UpstreamError {
    match e {
        UpstreamError::Protocol(m) => UpstreamError::Answered(m),
        other => other,
    }
}

/// Whether a completion's body is well-formed JSON (what every completion
/// API answers); checked before it is answered from, stored or cached.
fn is_json(body: &[u8]) -> bool {
    serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok()
}

fn body_error(e: hyper::Error) -> UpstreamError {
    UpstreamError::Protocol(e.to_string())
}

async fn status_error(resp: Response<Incoming>) -> UpstreamError {
    let status = resp.status().as_u16();
    let retry_after = parse_retry_after(resp.headers());
    // 5xx bodies are never shown to clients: do not even read them.
    let body = if status < 500 {
        read_bounded(resp, MAX_ERROR_BODY, true)
            .await
            .unwrap_or_default()
    } else {
        Bytes::new()
    };
    UpstreamError::Status {
        status,
        retry_after,
        body,
    }
}

/// Reads a body up to `limit` bytes: truncated when `truncate`, else an
/// error. A body that arrives in one chunk is kept without a copy.
async fn read_bounded(
    resp: Response<Incoming>,
    limit: usize,
    truncate: bool,
) -> Result<Bytes, UpstreamError> {
    let mut first: Option<Bytes> = None;
    let mut rest = BytesMut::new();
    let mut len = 0usize;
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        let Ok(mut chunk) = frame.map_err(body_error)?.into_data() else {
            continue; // trailers
        };
        if len + chunk.len() > limit {
            if !truncate {
                return Err(UpstreamError::TooLarge(limit));
            }
            chunk.truncate(limit - len);
        }
        len += chunk.len();
        match &first {
            None => first = Some(chunk),
            Some(f) => {
                if rest.is_empty() {
                    rest.extend_from_slice(f);
                }
                rest.extend_from_slice(&chunk);
            }
        }
        if len >= limit {
            break;
        }
    }
    Ok(if rest.is_empty() {
        first.unwrap_or_default()
    } else {
        rest.freeze()
    })
}

#[async_trait]
impl Provider for OpenAiProvider {
    fn support(&self, api: ApiKind) -> super::Support {
        if api.family() == self.dialect {
            super::Support::Native
        } else if self.translates(api).is_some() {
            super::Support::Translated
        } else {
            super::Support::None
        }
    }

    /// Rebuilds the client if the TLS files changed; returns whether they
    /// did. A failed rebuild (a half-written rotation) keeps the old one.
    fn reload_files(&self) -> Result<bool, BuildError> {
        let Some(cfg) = &self.files else {
            return Ok(false);
        };
        let fingerprint = crate::upstream::tls::files_fingerprint(cfg.tls.as_ref());
        if self.client.is_current(&fingerprint) {
            return Ok(false);
        }
        Ok(self.client.install(https_client(cfg)?, fingerprint))
    }

    async fn complete(&self, req: &Envelope) -> Result<Completed, UpstreamError> {
        let resp = self.send(req).await?;
        let headers = self.limits.to_client.filter(resp.headers());
        let body = read_bounded(resp, self.limits.max_body_bytes, false)
            .await
            .map_err(answer_error)?;
        if let Some(to) = self.translates(req.api) {
            let back = match to {
                ApiKind::Messages => translate::message_to_chat(&body),
                _ => translate::chat_to_message(&body),
            };
            let back = back.ok_or_else(|| {
                UpstreamError::Answered("the upstream's answer is not in its API's shape".into())
            })?;
            return Ok(Completed {
                headers,
                body: back.into(),
            });
        }
        if !is_json(&body) {
            return Err(UpstreamError::Answered(
                "the upstream's 200 answer is not JSON".into(),
            ));
        }
        Ok(Completed { headers, body })
    }

    async fn object(
        &self,
        method: http::Method,
        path: &str,
    ) -> Result<super::ObjectReply, UpstreamError> {
        // `uris[Responses]` is `<base>/responses`: the base is what precedes it.
        let responses = self.uris[ApiKind::Responses as usize].to_string();
        let base = responses.trim_end_matches(ApiKind::Responses.path());
        let uri: Uri = format!("{base}{path}")
            .parse()
            .map_err(|e: http::uri::InvalidUri| UpstreamError::Protocol(e.to_string()))?;
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .body(Full::new(Bytes::new()))
            .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
        if let Some((name, value)) = &self.auth {
            request.headers_mut().insert(name, value.clone());
        }
        let resp = self.client.get().request(request).await.map_err(classify)?;
        if !resp.status().is_success() {
            return Err(status_error(resp).await);
        }
        let headers = self.limits.to_client.filter(resp.headers());
        let events = resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let body = if events {
            // A retrieve with `stream=true`: relayed as it comes.
            let max_event = self.limits.max_event_bytes;
            super::ObjectBody::Events(Box::pin(ChunkReader {
                body: resp.into_body(),
                max_event,
                chunker: Chunker::new(max_event),
                ended: false,
                body_done: false,
                failed: None,
            }))
        } else {
            super::ObjectBody::Whole(read_bounded(resp, self.limits.max_body_bytes, false).await?)
        };
        Ok(super::ObjectReply { headers, body })
    }

    async fn stream(&self, req: &Envelope) -> Result<Opened, UpstreamError> {
        let resp = self.send(req).await?;
        let headers = self.limits.to_client.filter(resp.headers());
        let max_event = self.limits.max_event_bytes;
        let body = resp.into_body();
        // Translation works event by event; a stream in the client's own
        // API is relayed as the runs of whole events each read yields.
        let events: super::RawEvents = match self.translates(req.api) {
            Some(to) => {
                let events = Box::pin(EventReader {
                    body,
                    splitter: Splitter::new(max_event),
                    ended: false,
                });
                match to {
                    ApiKind::ChatCompletions => translated(events),
                    _ => to_chunks(events, include_usage(&req.body)),
                }
            }
            None => Box::pin(ChunkReader {
                body,
                max_event,
                chunker: Chunker::new(max_event),
                ended: false,
                body_done: false,
                failed: None,
            }),
        };
        Ok(Opened { headers, events })
    }
}

/// A chat-completions stream as Anthropic's events. An upstream that ends
/// after saying how the answer finished, without `[DONE]`, still gets its
/// `message_stop`; one that ends before gets none (the pipeline then ends
/// the client's stream with an error event).
fn translated(events: super::RawEvents) -> super::RawEvents {
    use futures::StreamExt;
    let state = std::sync::Arc::new(parking_lot::Mutex::new(
        translate::StreamTranslator::default(),
    ));
    let at_end = state.clone();
    let body = events.flat_map(move |item| {
        let out: Vec<Result<Bytes, UpstreamError>> = match item {
            Ok(event) => state.lock().feed(&event).into_iter().map(Ok).collect(),
            Err(e) => vec![Err(e)],
        };
        futures::stream::iter(out)
    });
    let tail = futures::stream::once(async move {
        let mut t = at_end.lock();
        let out = if t.finished() { t.finish() } else { Vec::new() };
        futures::stream::iter(out.into_iter().map(Ok))
    })
    .flatten();
    body.chain(tail).boxed()
}

/// Whether a chat request asked for a usage chunk.
fn include_usage(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.pointer("/stream_options/include_usage")?.as_bool())
        .unwrap_or(false)
}

/// An Anthropic stream as chat chunks, `[DONE]` at `message_stop`.
fn to_chunks(events: super::RawEvents, include_usage: bool) -> super::RawEvents {
    use futures::StreamExt;
    let mut t = translate::ChunkTranslator::new(include_usage);
    events
        .flat_map(move |item| {
            let out: Vec<Result<Bytes, UpstreamError>> = match item {
                Ok(event) => t.feed(&event).into_iter().map(Ok).collect(),
                Err(e) => vec![Err(e)],
            };
            futures::stream::iter(out)
        })
        .boxed()
}

/// Cuts an upstream body into whole SSE events.
struct EventReader {
    body: Incoming,
    splitter: Splitter,
    ended: bool,
}

impl Stream for EventReader {
    type Item = Result<Bytes, UpstreamError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.ended {
                return Poll::Ready(None);
            }
            match this.splitter.next_event() {
                Ok(Some(event)) => return Poll::Ready(Some(Ok(event))),
                Ok(None) => {}
                Err(e) => {
                    this.ended = true;
                    return Poll::Ready(Some(Err(UpstreamError::TooLarge(e.0))));
                }
            }
            match futures::ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Some(chunk) = frame.data_ref() {
                        this.splitter.push(chunk);
                    }
                }
                Some(Err(e)) => {
                    this.ended = true;
                    return Poll::Ready(Some(Err(body_error(e))));
                }
                None => {
                    this.ended = true;
                    // Servers that close right after `data: [DONE]` without
                    // its blank line still ended cleanly; any other partial
                    // event is dropped, and the stream judged incomplete.
                    let rest = this.splitter.take_partial();
                    if sse::scan(&rest).done {
                        return Poll::Ready(Some(Ok(Bytes::from_static(sse::DONE_EVENT))));
                    }
                    return Poll::Ready(None);
                }
            }
        }
    }
}

/// The most bytes gathered into one chunk before it is passed on.
const MAX_CHUNK: usize = 64 * 1024;

/// Passes an upstream body on as runs of whole events: every frame hyper
/// has ready is gathered (up to [`MAX_CHUNK`]) and cut after its last
/// blank line, so a burst of events costs one item and one client write.
struct ChunkReader {
    body: Incoming,
    max_event: usize,
    chunker: Chunker,
    ended: bool,
    body_done: bool,
    /// A body error seen after whole events that are passed on first.
    failed: Option<UpstreamError>,
}

impl Stream for ChunkReader {
    type Item = Result<Bytes, UpstreamError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.ended {
                return Poll::Ready(None);
            }
            let mut pending = false;
            // A lone frame that ends with a blank line (and cannot hold an
            // oversized event) is passed on as it came: no copy, no cut.
            let mut direct: Option<Bytes> = None;
            if !this.body_done && this.failed.is_none() {
                // At least one frame per turn, then what else is ready.
                let mut first = true;
                while first || this.chunker.len() < MAX_CHUNK {
                    first = false;
                    match Pin::new(&mut this.body).poll_frame(cx) {
                        Poll::Ready(Some(Ok(frame))) => {
                            let Ok(data) = frame.into_data() else {
                                continue; // trailers
                            };
                            if direct.is_none()
                                && this.chunker.is_empty()
                                && data.len() <= this.max_event
                                && data.ends_with(b"\n\n")
                            {
                                direct = Some(data);
                            } else {
                                if let Some(d) = direct.take() {
                                    this.chunker.push(&d);
                                }
                                this.chunker.push(&data);
                            }
                        }
                        Poll::Ready(Some(Err(e))) => {
                            this.failed = Some(body_error(e));
                            break;
                        }
                        Poll::Ready(None) => {
                            this.body_done = true;
                            break;
                        }
                        Poll::Pending => {
                            pending = true;
                            break;
                        }
                    }
                }
            }
            if let Some(d) = direct {
                return Poll::Ready(Some(Ok(d)));
            }
            match this.chunker.take_events() {
                Ok(Some(chunk)) => return Poll::Ready(Some(Ok(chunk))),
                Ok(None) => {}
                Err(e) => {
                    this.ended = true;
                    return Poll::Ready(Some(Err(UpstreamError::TooLarge(e.0))));
                }
            }
            if let Some(e) = this.failed.take() {
                this.ended = true;
                return Poll::Ready(Some(Err(e)));
            }
            if this.body_done {
                this.ended = true;
                // As EventReader: a `data: [DONE]` cut before its blank
                // line still ends the stream cleanly; any other partial
                // event is dropped.
                let rest = this.chunker.take_partial();
                if sse::scan(&rest).done {
                    return Poll::Ready(Some(Ok(Bytes::from_static(sse::DONE_EVENT))));
                }
                return Poll::Ready(None);
            }
            if pending {
                return Poll::Pending;
            }
        }
    }
}
