//! The autoscaling loop on one machine, for real except for Kubernetes: a
//! real Prometheus scrapes real forwarder processes (targets from a file
//! this harness rewrites), a load generator drives them through a
//! round-robin "Service" to `forwarder mock-llm`, and the operator's own
//! autoscaler decides; its decisions start and stop forwarder processes.
//! Used by the `autoscale_loop` test and the `autoscale-demo` binary.
//! Everything listens on 127.0.0.1 and stops when dropped.

pub mod broker;
pub mod checks;
pub mod fleet;
pub mod load;
pub mod plot;
pub mod presets;
pub mod procs;
pub mod prometheus;
pub mod scenario;
