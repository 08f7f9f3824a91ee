use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};

use super::{AdapterLimits, Completed, Opened, Provider};
use crate::pipeline::envelope::Envelope;
use crate::sse::{self, Splitter};
use crate::upstream::retry::parse_retry_after;
use crate::upstream::UpstreamError;
use crate::BuildError;

/// Any OpenAI-compatible `/chat/completions` server. Bodies pass through
/// untouched both ways: this adapter's format mapping is the identity.
pub struct OpenAiProvider {
    client: reqwest::Client,
    /// Parsed once: parsing a URL per request was ~15% of the forwarder's CPU.
    url: reqwest::Url,
    auth: Option<HeaderValue>,
    limits: AdapterLimits,
}

/// Longest upstream error body kept (4xx bodies are passed to the client).
const MAX_ERROR_BODY: usize = 64 * 1024;

impl OpenAiProvider {
    pub fn new(
        cfg: &forwarder_config::UpstreamConfig,
        limits: AdapterLimits,
    ) -> Result<Self, BuildError> {
        let base = cfg
            .base_url
            .as_deref()
            .unwrap_or_default()
            .trim_end_matches('/');
        let key = read_key(cfg)?;
        let auth = match key {
            Some(k) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {k}")).map_err(|_| {
                    BuildError::new(format!(
                        "upstream {}: API key is not a valid header value",
                        cfg.name
                    ))
                })?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        crate::install_crypto_provider();
        let client = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .tcp_keepalive(Duration::from_secs(30))
            // An API proxy must not follow redirects (and the policy cost
            // ~7% of the CPU per request).
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| BuildError::new(format!("upstream {}: {e}", cfg.name)))?;
        let url = reqwest::Url::parse(&format!("{base}/chat/completions"))
            .map_err(|e| BuildError::new(format!("upstreams.{}.base_url: {e}", cfg.name)))?;
        Ok(Self {
            client,
            url,
            auth,
            limits,
        })
    }

    async fn send(&self, req: &Envelope) -> Result<reqwest::Response, UpstreamError> {
        let mut builder = self
            .client
            .post(self.url.clone())
            .headers(req.headers.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(req.body.clone());
        if let Some(auth) = &self.auth {
            builder = builder.header(AUTHORIZATION, auth.clone());
        }
        let resp = builder.send().await.map_err(classify)?;
        if resp.status().is_success() {
            Ok(resp)
        } else {
            Err(status_error(resp).await)
        }
    }
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

fn classify(e: reqwest::Error) -> UpstreamError {
    if e.is_connect() {
        UpstreamError::Connect(e.to_string())
    } else if e.is_timeout() {
        UpstreamError::Timeout
    } else {
        UpstreamError::Protocol(e.to_string())
    }
}

async fn status_error(resp: reqwest::Response) -> UpstreamError {
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
    resp: reqwest::Response,
    limit: usize,
    truncate: bool,
) -> Result<Bytes, UpstreamError> {
    let mut first: Option<Bytes> = None;
    let mut rest = BytesMut::new();
    let mut len = 0usize;
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let mut chunk = chunk.map_err(classify)?;
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
    async fn complete(&self, req: &Envelope) -> Result<Completed, UpstreamError> {
        let resp = self.send(req).await?;
        let headers = self.limits.to_client.filter(resp.headers());
        let body = read_bounded(resp, self.limits.max_body_bytes, false).await?;
        Ok(Completed { headers, body })
    }

    async fn stream(&self, req: &Envelope) -> Result<Opened, UpstreamError> {
        let resp = self.send(req).await?;
        let headers = self.limits.to_client.filter(resp.headers());
        let events = EventReader {
            body: resp.bytes_stream().boxed(),
            splitter: Splitter::new(self.limits.max_event_bytes),
            ended: false,
        };
        Ok(Opened {
            headers,
            events: events.boxed(),
        })
    }
}

/// Cuts an upstream body into whole SSE events.
struct EventReader {
    body: futures::stream::BoxStream<'static, reqwest::Result<Bytes>>,
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
            match futures::ready!(this.body.poll_next_unpin(cx)) {
                Some(Ok(chunk)) => this.splitter.push(&chunk),
                Some(Err(e)) => {
                    this.ended = true;
                    return Poll::Ready(Some(Err(classify(e))));
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
