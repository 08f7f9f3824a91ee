//! The header allow-lists (`headers.to_upstream`, `headers.to_client`):
//! which headers cross the forwarder, compiled once from the config.
//! Credential and hop-by-hop headers ([`NEVER_FORWARDED`]) never pass,
//! whatever the patterns say.

use forwarder_config::NEVER_FORWARDED;
use http::{HeaderMap, HeaderName};

/// Whether `name` is a credential or hop-by-hop header, which no allow-list
/// lets through.
pub fn never_forwarded(name: &HeaderName) -> bool {
    NEVER_FORWARDED.contains(&name.as_str())
}

#[derive(Debug, Clone, Default)]
pub struct HeaderAllow {
    exact: Vec<HeaderName>,
    /// Lower-case prefixes, from entries ending in `*`.
    prefixes: Vec<String>,
}

impl HeaderAllow {
    /// Entries are validated by the config; one that is not a header name is skipped.
    pub fn new(entries: &[String]) -> Self {
        let mut allow = Self::default();
        for e in entries {
            let e = e.to_ascii_lowercase();
            match e.strip_suffix('*') {
                Some(prefix) => allow.prefixes.push(prefix.to_string()),
                None => allow
                    .exact
                    .extend(HeaderName::from_bytes(e.as_bytes()).ok()),
            }
        }
        allow
    }

    pub fn allows(&self, name: &HeaderName) -> bool {
        !never_forwarded(name)
            && (self.exact.contains(name)
                || self.prefixes.iter().any(|p| name.as_str().starts_with(p)))
    }

    /// The allowed headers of `from` (an empty map, allocation-free, when none).
    pub fn filter(&self, from: &HeaderMap) -> HeaderMap {
        let mut out = HeaderMap::new();
        if self.exact.is_empty() && self.prefixes.is_empty() {
            return out;
        }
        for (name, value) in from {
            if self.allows(name) {
                out.append(name.clone(), value.clone());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_names_and_prefixes_case_insensitively() {
        let allow = HeaderAllow::new(&["OpenAI-Beta".into(), "x-ratelimit-*".into()]);
        let mut h = HeaderMap::new();
        h.insert("openai-beta", "assistants=v2".parse().unwrap());
        h.insert("x-ratelimit-remaining-requests", "9".parse().unwrap());
        h.insert("authorization", "Bearer secret".parse().unwrap());
        let out = allow.filter(&h);
        assert_eq!(out.len(), 2);
        assert!(out.get("authorization").is_none());
    }

    #[test]
    fn credentials_and_hop_by_hop_headers_never_pass_any_pattern() {
        let allow = HeaderAllow::new(&[
            "*".into(),
            "x-*".into(),
            "authorization".into(),
            "cookie".into(),
        ]);
        let mut h = HeaderMap::new();
        for name in NEVER_FORWARDED {
            h.insert(
                HeaderName::from_static(name),
                "secret-value".parse().unwrap(),
            );
        }
        h.insert("x-trace", "1".parse().unwrap());
        let out = allow.filter(&h);
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(out.contains_key("x-trace"));
    }
}
