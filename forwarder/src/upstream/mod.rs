//! Upstream model providers: the adapters that talk to them, and the
//! machinery that picks one (balancing, circuit breaking, backoff).

pub mod aliases;
pub mod balance;
pub mod breaker;
mod error;
pub mod pool;
pub mod providers;
pub mod retry;
pub mod tls;

pub use error::UpstreamError;
pub use pool::{Endpoint, Lease, PickError, Pools};
