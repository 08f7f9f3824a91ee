use std::time::Duration;

/// How one attempt against one endpoint failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect failed: {0}")]
    Connect(String),
    #[error("attempt timed out")]
    Timeout,
    /// A non-2xx answer. The body (bounded) is kept for 4xx, which are
    /// passed on to the client; it is never logged.
    #[error("upstream answered {status}")]
    Status {
        status: u16,
        retry_after: Option<Duration>,
        body: bytes::Bytes,
    },
    /// The answer (or one stream event) exceeds the configured bound.
    #[error("upstream answer exceeds {0} bytes")]
    TooLarge(usize),
    /// Connection reset, malformed body, broken stream.
    #[error("upstream protocol error: {0}")]
    Protocol(String),
    /// The upstream began a 200 answer and then failed it (the body cut
    /// off or not JSON, the head unparseable): it produced the answer, so
    /// sending the request again is not safe by default.
    #[error("upstream answer failed after it began: {0}")]
    Answered(String),
}

impl UpstreamError {
    /// Safe to send again (to this or another endpoint): nothing reached the
    /// client yet and the upstream did not reject the request itself.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Connect(_) | Self::Timeout | Self::Protocol(_) => true,
            Self::Status { status, .. } => *status == 429 || *status >= 500,
            // The same request would get the same answer.
            Self::TooLarge(_) => false,
            // Only when `retry.after_answer_began` says so (the caller's call).
            Self::Answered(_) => false,
        }
    }

    /// Counts against the endpoint's circuit breaker. A 429 means "busy", not
    /// "broken", and 4xx means the request was bad, so neither counts.
    pub fn is_endpoint_failure(&self) -> bool {
        match self {
            Self::Connect(_) | Self::Timeout | Self::Protocol(_) | Self::Answered(_) => true,
            Self::Status { status, .. } => *status >= 500,
            Self::TooLarge(_) => false,
        }
    }

    /// A short label for metrics (`outcome`, `reason`).
    pub fn label(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect_error",
            Self::Timeout => "timeout",
            Self::Protocol(_) | Self::Answered(_) => "protocol_error",
            Self::TooLarge(_) => "too_large",
            Self::Status { status: 429, .. } => "rate_limited",
            Self::Status { status, .. } if *status >= 500 => "server_error",
            Self::Status { .. } => "client_error",
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}
