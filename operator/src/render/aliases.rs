//! `spec.models` → the forwarder's `models` (aliases), checked against the
//! spec's own upstreams so a mistake names the spec's field.

use std::collections::{BTreeMap, BTreeSet};

use forwarder_config::{AliasConfig, AliasTarget};

use super::config::Problem;
use crate::crd::ModelForwarderSpec;

/// Condition reason of an alias the forwarder could not serve.
pub const INVALID_ALIAS: &str = "InvalidModelAlias";

/// Models some upstream of the spec lists.
pub fn served_models(spec: &ModelForwarderSpec) -> BTreeSet<&str> {
    spec.upstreams
        .iter()
        .flat_map(|u| u.models.iter().map(String::as_str))
        .collect()
}

/// Every reason `spec.models` cannot work, naming the spec's fields.
pub fn validate(spec: &ModelForwarderSpec) -> Vec<Problem> {
    let served = served_models(spec);
    let mut problems = Vec::new();
    let mut bad = |at: String, why: String| {
        problems.push(Problem::new(INVALID_ALIAS, format!("{at}: {why}")));
    };
    for (alias, a) in &spec.models {
        let at = format!("spec.models.{alias}");
        if alias.is_empty() {
            bad(at.clone(), "an alias needs a name".into());
        }
        if served.contains(alias.as_str()) {
            bad(
                at.clone(),
                "is also a model an upstream serves; an alias must be a name of its own".into(),
            );
        }
        if a.targets.is_empty() {
            bad(
                format!("{at}.targets"),
                "must list at least one model".into(),
            );
        } else if a.targets.iter().all(|t| t.weight == 0) {
            bad(
                format!("{at}.targets"),
                "at least one target needs a weight above 0".into(),
            );
        }
        for (i, t) in a.targets.iter().enumerate() {
            let at = format!("{at}.targets[{i}]");
            if !served.contains(t.model.as_str()) {
                let why = if spec.models.contains_key(&t.model) {
                    format!("{:?} is an alias; a target must be a served model", t.model)
                } else {
                    format!(
                        "{:?} is served by no upstream of spec.upstreams (served: {})",
                        t.model,
                        served.iter().copied().collect::<Vec<_>>().join(", ")
                    )
                };
                bad(format!("{at}.model"), why);
            }
            if t.weight > 1000 {
                bad(format!("{at}.weight"), "must be at most 1000".into());
            }
        }
    }
    problems
}

/// The forwarder's alias table, or every reason it cannot work.
pub fn render(spec: &ModelForwarderSpec) -> Result<BTreeMap<String, AliasConfig>, Vec<Problem>> {
    let problems = validate(spec);
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(spec
        .models
        .iter()
        .map(|(alias, a)| {
            let targets = a
                .targets
                .iter()
                .map(|t| AliasTarget {
                    model: t.model.clone(),
                    weight: t.weight,
                })
                .collect();
            let config = AliasConfig {
                targets,
                rewrite_model: a.rewrite_model,
            };
            (alias.clone(), config)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::config::tests::spec;

    fn with_models(models: serde_json::Value) -> ModelForwarderSpec {
        let mut s = spec();
        s.models = serde_json::from_value(models).expect("models");
        s
    }

    #[test]
    fn renders_weights_order_and_rewrite_unchanged_in_meaning() {
        let s = with_models(serde_json::json!({
            "fast": {"targets": [{"model": "qwen-max", "weight": 3},
                                 {"model": "mock", "weight": 0}]},
            "raw": {"targets": [{"model": "mock"}], "rewriteModel": false}
        }));
        let m = render(&s).expect("renders");
        let fast = &m["fast"];
        assert_eq!(
            fast.targets,
            vec![
                AliasTarget {
                    model: "qwen-max".into(),
                    weight: 3
                },
                AliasTarget {
                    model: "mock".into(),
                    weight: 0
                },
            ]
        );
        assert!(fast.rewrite_model, "rewriteModel defaults to true");
        assert_eq!(m["raw"].targets[0].weight, 1, "weight defaults to 1");
        assert!(!m["raw"].rewrite_model);
        // No aliases: an empty table, as the forwarder's default.
        assert!(render(&spec()).expect("renders").is_empty());
    }

    #[test]
    fn a_target_no_upstream_serves_is_refused_naming_the_field() {
        let s = with_models(serde_json::json!({
            "fast": {"targets": [{"model": "qwen-max"}, {"model": "gpt-5"}]}
        }));
        let problems = render(&s).unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].reason, INVALID_ALIAS);
        assert!(
            problems[0].message.starts_with(
                "spec.models.fast.targets[1].model: \"gpt-5\" is served by no upstream"
            ),
            "{problems:?}"
        );
        assert!(problems[0].message.contains("served: mock, qwen-max"));
    }

    #[test]
    fn every_other_mistake_is_refused_naming_the_field() {
        for (models, want) in [
            (
                serde_json::json!({"mock": {"targets": [{"model": "qwen-max"}]}}),
                "spec.models.mock: is also a model an upstream serves",
            ),
            (
                serde_json::json!({"fast": {"targets": []}}),
                "spec.models.fast.targets: must list at least one model",
            ),
            (
                serde_json::json!({"fast": {"targets": [{"model": "mock", "weight": 0}]}}),
                "spec.models.fast.targets: at least one target needs a weight above 0",
            ),
            (
                serde_json::json!({"fast": {"targets": [{"model": "mock", "weight": 1001}]}}),
                "spec.models.fast.targets[0].weight: must be at most 1000",
            ),
            (
                serde_json::json!({"a": {"targets": [{"model": "mock"}]},
                                   "b": {"targets": [{"model": "a"}]}}),
                "spec.models.b.targets[0].model: \"a\" is an alias",
            ),
        ] {
            let problems = render(&with_models(models)).unwrap_err();
            assert!(
                problems
                    .iter()
                    .any(|p| p.reason == INVALID_ALIAS && p.message.starts_with(want)),
                "{want}: {problems:?}"
            );
        }
    }
}
