//! The mock model: shared by the built-in `mock` provider and the standalone
//! `forwarder mock-llm` server used by tests and load tests. It speaks
//! OpenAI chat completions, embeddings and Responses, and Anthropic
//! Messages (with count_tokens).

mod apis;
pub mod calls;
mod model;
mod server;

pub use apis::{
    anthropic_error_type, error_body, stream_error_event, vector, with_fault, MockAnswer, Rejection,
};
pub use model::{Fault, MockModel};
pub use server::{serve, MockServer};
