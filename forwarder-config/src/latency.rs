use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A latency distribution, written as a string so it fits a flag or a YAML
/// scalar: `200ms` (fixed), `uniform:100ms..300ms`, `normal:200ms,20ms`
/// (mean, standard deviation; negative samples clamp to zero).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum LatencyDist {
    Fixed(Duration),
    Uniform { min: Duration, max: Duration },
    Normal { mean: Duration, std_dev: Duration },
}

#[derive(Debug, thiserror::Error)]
#[error("invalid latency {input:?}: {reason} (expected `200ms`, `uniform:100ms..300ms` or `normal:200ms,20ms`)")]
pub struct ParseLatencyError {
    input: String,
    reason: String,
}

impl FromStr for LatencyDist {
    type Err = ParseLatencyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| ParseLatencyError {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        let dur =
            |part: &str| humantime::parse_duration(part.trim()).map_err(|e| err(&e.to_string()));
        if let Some(rest) = s.strip_prefix("uniform:") {
            let (a, b) = rest.split_once("..").ok_or_else(|| err("missing `..`"))?;
            let (min, max) = (dur(a)?, dur(b)?);
            if min > max {
                return Err(err("min is greater than max"));
            }
            Ok(Self::Uniform { min, max })
        } else if let Some(rest) = s.strip_prefix("normal:") {
            let (a, b) = rest.split_once(',').ok_or_else(|| err("missing `,`"))?;
            Ok(Self::Normal {
                mean: dur(a)?,
                std_dev: dur(b)?,
            })
        } else {
            Ok(Self::Fixed(dur(s)?))
        }
    }
}

impl fmt::Display for LatencyDist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = humantime::format_duration;
        match self {
            Self::Fixed(d) => write!(f, "{}", h(*d)),
            Self::Uniform { min, max } => write!(f, "uniform:{}..{}", h(*min), h(*max)),
            Self::Normal { mean, std_dev } => write!(f, "normal:{},{}", h(*mean), h(*std_dev)),
        }
    }
}

impl TryFrom<String> for LatencyDist {
    type Error = ParseLatencyError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<LatencyDist> for String {
    fn from(d: LatencyDist) -> Self {
        d.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_every_form() {
        for s in ["200ms", "uniform:100ms..300ms", "normal:200ms,20ms", "0s"] {
            let d: LatencyDist = s.parse().unwrap();
            assert_eq!(d.to_string().parse::<LatencyDist>().unwrap(), d);
        }
        assert_eq!(
            "uniform:1ms..2ms".parse::<LatencyDist>().unwrap(),
            LatencyDist::Uniform {
                min: Duration::from_millis(1),
                max: Duration::from_millis(2)
            }
        );
    }

    #[test]
    fn rejects_garbage_with_the_input_named() {
        let e = "uniform:3s..1s".parse::<LatencyDist>().unwrap_err();
        assert!(e.to_string().contains("uniform:3s..1s"), "{e}");
        assert!("fast".parse::<LatencyDist>().is_err());
        assert!("normal:1s".parse::<LatencyDist>().is_err());
    }
}
