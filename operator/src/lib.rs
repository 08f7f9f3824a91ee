//! The ModelForwarder operator: reconciles `ModelForwarder` resources into
//! the Kubernetes objects that run forwarders.

pub mod autoscale;
pub mod client;
pub mod controller;
pub mod crd;
pub mod crdgen;
pub mod drift;
pub mod events;
pub mod leader;
pub mod reconcile;
pub mod render;
pub mod status;
pub mod telemetry;

pub use kube;

/// Forwarder image used when neither `--forwarder-image` nor
/// `spec.pod.image` says otherwise.
pub const DEFAULT_FORWARDER_IMAGE: &str = concat!(
    "ghcr.io/modelforwarder/forwarder:",
    env!("CARGO_PKG_VERSION")
);
