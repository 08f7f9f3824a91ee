//! Integration tests: real forwarders and mock-llm servers on loopback
//! sockets, driven by a real HTTP client.

mod aliases;
mod apis;
mod async_jobs;
mod auth;
mod batch;
mod cache;
mod cli;
mod common;
mod endpoints;
mod errors;
mod fidelity;
mod fleet;
mod grpc;
mod guarantee;
mod hostile;
mod idempotency;
mod isolation;
mod jwt;
mod kafka;
mod keys;
mod metrics;
mod openapi;
mod process;
mod python_clients;
mod redis_server;
mod replicas;
mod resilience;
mod scripted;
mod shared_table;
mod shutdown;
mod store;
mod streaming;
mod tls;
mod tracing;
mod websocket;
