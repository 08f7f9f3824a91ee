//! The SLO autoscaler: reads each ModelForwarder's metrics from Prometheus
//! (`metrics`), decides a replica count with a pure policy (`policy`), and
//! acts on it (`evaluate`) through a [`ScaleTarget`]: the forwarder
//! Deployment in the operator (`workload`), local processes in the loop
//! test harness. In the operator, `run` schedules each resource's
//! evaluations (`schedule`) over watch-fed caches (`cache`) and writes
//! status only when it changed (`status_change`). `alerts` is the
//! Alertmanager webhook that advances a resource's next evaluation.

pub mod alerts;
pub mod cache;
pub mod evaluate;
pub mod metrics;
pub mod policy;
pub mod queue;
pub mod rules;
pub mod run;
pub mod schedule;
pub mod status_change;
pub mod workload;

pub use evaluate::{
    Evaluation, Evaluator, MetricsSource, Prometheus, ScaleError, ScaleTarget, TargetState,
};
