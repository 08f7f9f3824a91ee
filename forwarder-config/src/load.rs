use std::path::Path;

use figment::providers::{Env, Format, Serialized, Yaml};
use figment::Figment;

use crate::{validate, Config, FieldError};

/// Why a configuration could not be loaded. Every variant names the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// Syntax or type error; figment's message names the key and the source.
    #[error("{0}")]
    Parse(Box<figment::Error>),
    #[error("invalid config:\n{}", .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<FieldError>),
}

fn finish(figment: Figment) -> Result<Config, ConfigError> {
    let config: Config = figment
        .merge(Env::prefixed("FORWARDER_").split("__"))
        .extract()
        .map_err(|e| ConfigError::Parse(Box::new(e)))?;
    validate(&config).map_err(ConfigError::Invalid)?;
    Ok(config)
}

/// Loads the configuration: embedded defaults, then the YAML file if given,
/// then `FORWARDER_*` environment variables; then validates it.
pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    if let Some(path) = file {
        // Read it ourselves: figment silently ignores a missing file.
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        figment = figment.merge(Yaml::string(&text));
    }
    finish(figment)
}

/// Like [`load`], from YAML text.
pub fn load_from_str(yaml: &str) -> Result<Config, ConfigError> {
    finish(Figment::from(Serialized::defaults(Config::default())).merge(Yaml::string(yaml)))
}

#[cfg(test)]
// figment::Jail closures must return figment's (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use crate::Provider;
    use std::time::Duration;

    #[test]
    fn empty_file_gives_the_embedded_defaults() {
        figment::Jail::expect_with(|_| {
            assert_eq!(load_from_str("").unwrap(), Config::default());
            Ok(())
        });
    }

    #[test]
    fn defaults_serve_mock_on_loopback() {
        let c = Config::default();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.models(), vec!["mock".to_string()]);
        assert_eq!(c.upstreams[0].provider, Provider::Mock);
        assert!(c.auth.api_keys_file.is_none());
    }

    #[test]
    fn file_values_override_defaults_and_env_overrides_file() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("FORWARDER_RETRY__MAX_ATTEMPTS", "7");
            jail.set_env("FORWARDER_SERVER__LISTEN", "0.0.0.0:9999");
            let c = load_from_str("retry: {max_attempts: 2, base_delay: 50ms}\n").unwrap();
            assert_eq!(c.retry.max_attempts, 7);
            assert_eq!(c.retry.base_delay, Duration::from_millis(50));
            assert_eq!(c.server.listen.to_string(), "0.0.0.0:9999");
            Ok(())
        });
    }

    #[test]
    fn type_errors_name_the_field() {
        figment::Jail::expect_with(|_| {
            let e = load_from_str("retry: {max_attempts: lots}").unwrap_err();
            assert!(e.to_string().contains("retry.max_attempts"), "{e}");
            let e = load_from_str("server: {listen: 1.2.3.4:80, lisen: x}").unwrap_err();
            assert!(e.to_string().contains("lisen"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn missing_file_is_an_error() {
        let e = load(Some(Path::new("/nonexistent/forwarder.yaml"))).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e}");
    }

    #[test]
    fn rendered_config_round_trips() {
        figment::Jail::expect_with(|_| {
            let mut c = Config::default();
            c.upstreams[0].mock = Some(crate::MockSettings::default());
            let yaml = serde_yaml::to_string(&c).unwrap();
            assert_eq!(load_from_str(&yaml).unwrap(), c);
            Ok(())
        });
    }
}
