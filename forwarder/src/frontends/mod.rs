//! Front ends: each translates its wire protocol to the pipeline's request
//! and the pipeline's answer back. No pipeline stage lives here.

pub mod anthropic;
pub mod batch;
pub mod budget;
pub mod conn;
pub mod grpc;
pub mod http;
pub mod jobs;
mod message_batches;
mod owner;
pub mod serve;
pub mod tls;
pub mod ws;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Shutdown plumbing for long-lived sessions (WebSocket connections, which
/// outlive the HTTP server's own graceful shutdown once upgraded).
#[derive(Clone, Default)]
pub struct Lifecycle {
    /// Cancelled when the listeners close: sessions stop taking requests,
    /// finish what is in flight, then close.
    pub stop: CancellationToken,
    /// Every session, so shutdown can wait for them within the grace period.
    pub sessions: TaskTracker,
}
