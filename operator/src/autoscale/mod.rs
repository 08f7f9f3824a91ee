//! The SLO autoscaler: reads each ModelForwarder's metrics from Prometheus
//! (`metrics`), decides a replica count with a pure policy (`policy`), and
//! acts on it (`evaluate`) through a [`ScaleTarget`]: the forwarder
//! Deployment in the operator (`workload`, `run`), local processes in the
//! loop test harness. `alerts` is the Alertmanager webhook that triggers an
//! evaluation at once.

pub mod alerts;
pub mod evaluate;
pub mod metrics;
pub mod policy;
pub mod rules;
pub mod run;
pub mod workload;

pub use evaluate::{
    Evaluation, Evaluator, MetricsSource, Prometheus, ScaleError, ScaleTarget, TargetState,
};
