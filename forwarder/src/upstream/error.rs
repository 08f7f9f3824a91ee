use std::time::Duration;

/// How one attempt against one endpoint failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect failed: {0}")]
    Connect(String),
    #[error("attempt timed out")]
    Timeout,
    #[error("upstream answered {status}: {message}")]
    Status {
        status: u16,
        retry_after: Option<Duration>,
        message: String,
    },
    /// Connection reset, malformed body, broken stream.
    #[error("upstream protocol error: {0}")]
    Protocol(String),
}

impl UpstreamError {
    /// Safe to send again (to this or another endpoint): nothing reached the
    /// client yet and the upstream did not reject the request itself.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Connect(_) | Self::Timeout | Self::Protocol(_) => true,
            Self::Status { status, .. } => *status == 429 || *status >= 500,
        }
    }

    /// Counts against the endpoint's circuit breaker. A 429 means "busy", not
    /// "broken", and 4xx means the request was bad, so neither counts.
    pub fn is_endpoint_failure(&self) -> bool {
        match self {
            Self::Connect(_) | Self::Timeout | Self::Protocol(_) => true,
            Self::Status { status, .. } => *status >= 500,
        }
    }

    /// A short label for metrics (`outcome`, `reason`).
    pub fn label(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect_error",
            Self::Timeout => "timeout",
            Self::Protocol(_) => "protocol_error",
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
