//! The ModelForwarder operator: reconciles `ModelForwarder` resources into
//! the Kubernetes objects that run forwarders.

pub mod crd;
pub mod crdgen;
pub mod render;

pub use kube;
