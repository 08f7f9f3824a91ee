use std::time::Duration;

use async_trait::async_trait;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};

use super::{ChunkStream, Provider};
use crate::api::{ChatChunk, ChatRequest, ChatResponse};
use crate::upstream::UpstreamError;
use crate::BuildError;

/// Any OpenAI-compatible `/chat/completions` server.
pub struct OpenAiProvider {
    client: reqwest::Client,
    /// Parsed once: parsing a URL per request was ~15% of the forwarder's CPU.
    url: reqwest::Url,
    auth: Option<HeaderValue>,
}

/// Longest upstream error body read to extract a message.
const MAX_ERROR_BODY: usize = 8 * 1024;

impl OpenAiProvider {
    pub fn new(cfg: &forwarder_config::UpstreamConfig) -> Result<Self, BuildError> {
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
        Ok(Self { client, url, auth })
    }

    async fn send(&self, req: &ChatRequest) -> Result<reqwest::Response, UpstreamError> {
        let body = serde_json::to_vec(req).map_err(|e| UpstreamError::Protocol(e.to_string()))?;
        let mut builder = self
            .client
            .post(self.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(body);
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
    let retry_after = resp
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(Ok(chunk)) = stream.next().await {
        body.extend_from_slice(&chunk);
        if body.len() >= MAX_ERROR_BODY {
            break;
        }
    }
    UpstreamError::Status {
        status,
        retry_after,
        message: error_message(&body),
    }
}

/// The `error.message` of an OpenAI-shaped error body, else a short excerpt.
fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.pointer("/error/message")?.as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned())
}

#[async_trait]
impl Provider for OpenAiProvider {
    async fn complete(&self, req: &ChatRequest) -> Result<ChatResponse, UpstreamError> {
        let resp = self.send(req).await?;
        let bytes = resp.bytes().await.map_err(classify)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| UpstreamError::Protocol(format!("invalid completion from upstream: {e}")))
    }

    async fn stream(&self, req: &ChatRequest) -> Result<ChunkStream, UpstreamError> {
        let resp = self.send(req).await?;
        let events = resp.bytes_stream().eventsource();
        let chunks = events
            .take_while(|ev| {
                let done = matches!(ev, Ok(e) if e.data.trim() == "[DONE]");
                futures::future::ready(!done)
            })
            .filter_map(|ev| {
                futures::future::ready(match ev {
                    Ok(e) if e.data.trim().is_empty() => None,
                    Ok(e) => Some(serde_json::from_str::<ChatChunk>(&e.data).map_err(|err| {
                        UpstreamError::Protocol(format!(
                            "invalid stream chunk from upstream: {err}"
                        ))
                    })),
                    Err(e) => Some(Err(UpstreamError::Protocol(e.to_string()))),
                })
            });
        Ok(chunks.boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_message_prefers_the_openai_shape() {
        let body = br#"{"error": {"message": "slow down", "type": "x"}}"#;
        assert_eq!(error_message(body), "slow down");
        assert_eq!(error_message(b"plain failure"), "plain failure");
    }
}
