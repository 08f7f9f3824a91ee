//! The forwarder's configuration, typed.
//!
//! This crate is the one source of truth for the forwarder's config file: the
//! forwarder deserialises it, the operator renders it into a ConfigMap. It has
//! no server dependencies so the operator can use it cheaply.
//!
//! Loading order (later wins): embedded defaults → YAML file → environment
//! variables prefixed `FORWARDER_`, with `__` between path segments, e.g.
//! `FORWARDER_SERVER__LISTEN=0.0.0.0:8080` or `FORWARDER_RETRY__MAX_ATTEMPTS=5`.

mod budget;
mod latency;
mod load;
mod security;
mod types;
mod validate;

pub use budget::*;
pub use latency::{LatencyDist, ParseLatencyError};
pub use load::{load, load_from_str, ConfigError};
pub use security::*;
pub use types::*;
pub use validate::{validate, warnings, FieldError, MAX_DURATION};
