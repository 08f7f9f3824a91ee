//! The mock model: shared by the built-in `mock` provider and the standalone
//! OpenAI-compatible `forwarder mock-llm` server used by tests and load tests.

pub mod calls;
mod model;
mod server;

pub use model::{Fault, MockModel};
pub use server::{serve, MockServer};
