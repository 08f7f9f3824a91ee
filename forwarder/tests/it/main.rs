//! Integration tests: real forwarders and mock-llm servers on loopback
//! sockets, driven by a real HTTP client.

mod auth;
mod cli;
mod common;
mod endpoints;
mod errors;
mod idempotency;
mod metrics;
mod openai_sdk;
mod resilience;
mod shutdown;
mod streaming;
