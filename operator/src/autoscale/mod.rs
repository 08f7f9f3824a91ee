//! The SLO autoscaler: reads each ModelForwarder's metrics from Prometheus
//! (`metrics`), decides a replica count with a pure policy (`policy`), and
//! acts on it. Acting is behind [`ScaleTarget`], implemented for Deployments
//! by the operator and for local processes by the loop test harness.

pub mod evaluate;
pub mod metrics;
pub mod policy;

pub use evaluate::{
    Evaluation, Evaluator, MetricsSource, Prometheus, ScaleError, ScaleTarget, TargetState,
};
