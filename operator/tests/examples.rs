//! The examples in `examples/` are valid ModelForwarders whose rendered
//! config the forwarder accepts.

use std::path::Path;

use operator::crd::ModelForwarder;
use operator::reconcile::secret_uses;
use serde::Deserialize;

fn resources(file: &str) -> Vec<ModelForwarder> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde_yaml::Value::deserialize(doc).expect("YAML document"))
        .filter(|v| v["kind"].as_str() == Some("ModelForwarder"))
        .map(|v| serde_yaml::from_value(v).expect("a valid ModelForwarder"))
        .collect()
}

#[test]
fn minimal_renders_a_working_config() {
    let mfs = resources("minimal.yaml");
    assert_eq!(mfs.len(), 1);
    let config = operator::render::config::render(&mfs[0].spec).expect("renders");
    assert_eq!(config.models(), vec!["mock".to_string()]);
    assert!(secret_uses(&mfs[0].spec).is_empty());
}

#[test]
fn full_renders_a_working_config_and_references_its_secrets() {
    let mfs = resources("full.yaml");
    assert_eq!(mfs.len(), 1);
    let spec = &mfs[0].spec;
    let config = operator::render::config::render(spec).expect("renders");
    let yaml = operator::render::config::to_yaml(&config).expect("yaml");
    forwarder_config::load_from_str(&yaml).expect("the forwarder accepts it");
    let secrets: Vec<String> = secret_uses(spec).into_iter().map(|u| u.name).collect();
    assert_eq!(secrets, vec!["support-bot-clients", "llm-keys"]);
    assert_eq!(spec.replicas.min, 2);
    assert_eq!(spec.protocols.len(), 3);
    assert!(config.websocket.enabled && config.grpc.enabled);
    assert_eq!(config.models["fast"].targets.len(), 2);
    let budgets = config.budgets.as_ref().expect("budgets");
    assert_eq!(
        budgets.clients["batch-jobs"].monthly_tokens,
        Some(20_000_000)
    );
}
