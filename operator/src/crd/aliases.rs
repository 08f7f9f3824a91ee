//! `spec.models`: model aliases, rendered into the forwarder's `models`
//! section.

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// A model alias: a name clients send, served by one of `targets`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("self.targets.exists(t, t.weight > 0)").message("at least one target needs a weight above 0"))]
pub struct ModelAlias {
    /// Served models, in fallback order. Each must be a model some entry
    /// of `spec.upstreams` lists (not another alias).
    #[schemars(length(min = 1, max = 32))]
    pub targets: Vec<AliasTarget>,
    /// Rewrite the request body's `model` to the target's name. Off: the
    /// body goes upstream with the alias in it, for upstreams that know the
    /// alias themselves.
    #[serde(default = "default_true")]
    pub rewrite_model: bool,
}

fn default_true() -> bool {
    true
}

/// One target of an alias.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AliasTarget {
    /// A model some upstream of `spec.upstreams` lists.
    #[schemars(length(min = 1, max = 253))]
    pub model: String,
    /// Share of first choices relative to the alias's other targets; 0
    /// makes the target a fallback only.
    #[serde(default = "default_weight")]
    #[schemars(range(min = 0, max = 1000))]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}
