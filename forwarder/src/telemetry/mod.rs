//! Metrics (the contract the operator's queries depend on), logging and
//! OpenTelemetry traces.

mod logging;
mod metrics;
pub mod traces;

pub use logging::init_logging;
pub use metrics::{Metrics, ModelSeries, Protocol};
