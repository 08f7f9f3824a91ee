//! Metrics (the contract the operator's queries depend on) and logging.

mod logging;
mod metrics;

pub use logging::init_logging;
pub use metrics::{Metrics, ModelSeries, Protocol};
