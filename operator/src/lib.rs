pub use kube;
