//! API keys from a file or a mounted Secret directory, kept only as SHA-256
//! hashes, compared in constant time and reloaded when the source changes.
//!
//! Sources, and the name each gives a client (its identity, what rate
//! limits, idempotency keys, jobs and files are scoped by, is `key:` and
//! that name; see [`super::Identity`]):
//! - a directory (a mounted Secret): one file per client, named after it;
//!   the name is the file name. Empty files and `.`-entries are skipped.
//! - a YAML map `name: key`: the name is the map key.
//! - a YAML list `- key`: the name is `key-` and the first 16 hex digits
//!   of the key's SHA-256, stable whatever the key's position.
//! - one key per line (`#` comments and blank lines skipped): names as
//!   for a list. Such keys contain no `:` and no whitespace, so a broken map
//!   (`name:key`) is an error, never a key.
//!
//! An empty file (or one with only comments) holds no keys: it loads, with a
//! warning, and every request is rejected. A missing or unreadable source,
//! or one that does not parse, fails the start; on reload it is an error that
//! keeps the previous keys in force. Error messages never quote the source:
//! it holds secrets.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::Identity;
use crate::reload::{Reload, Swap};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read API keys from {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid API key file {path}: {source}")]
    Parse { path: PathBuf, source: ParseError },
}

/// Why a key file does not parse. Names positions, never contents.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("line {line}: not a key (a YAML map needs `name: key`, with a space after the colon; a plain key contains no ':' or whitespace)")]
    Malformed { line: usize },
    #[error("invalid YAML{}", .line.map(|l| format!(" at line {l}")).unwrap_or_default())]
    Yaml { line: Option<usize> },
    #[error("entry {entry}: the key must be a non-empty string")]
    NotAKey { entry: String },
    #[error("the file must be a YAML map, a YAML list or one key per line")]
    UnknownShape,
}

type Hash = [u8; 32];

fn hash(key: &str) -> Hash {
    Sha256::digest(key.as_bytes()).into()
}

/// The loaded key set. Cheap to share; swapped whole on reload.
pub struct ApiKeys {
    path: PathBuf,
    keys: Swap<Vec<(String, Hash)>>,
}

impl ApiKeys {
    /// Loads the keys; fails if the source cannot be read (a start-up error).
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let (keys, fingerprint) = read_source(path)?;
        if keys.is_empty() {
            tracing::warn!(path = %path.display(), "API key source holds no keys: every request will be rejected");
        }
        Ok(Self {
            path: path.to_path_buf(),
            keys: Swap::new(keys, fingerprint),
        })
    }

    /// The identity owning `presented`, if any. Every stored hash is compared
    /// (no early exit), each in constant time, so timing reveals nothing.
    pub fn verify(&self, presented: &str) -> Option<Identity> {
        let h = hash(presented);
        let keys = self.keys.get();
        let mut found: Option<&str> = None;
        for (name, stored) in keys.iter() {
            if bool::from(stored.ct_eq(&h)) && found.is_none() {
                found = Some(name);
            }
        }
        found.map(Identity::api_key)
    }

    pub fn len(&self) -> usize {
        self.keys.get().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Reload for ApiKeys {
    type Error = KeyError;
    const WHAT: &'static str = "API keys";

    /// Re-reads the source; returns whether the keys changed. On error the
    /// current keys stay in force (a half-written Secret must not lock
    /// every client out).
    fn reload(&self) -> Result<bool, KeyError> {
        let (keys, fingerprint) = read_source(&self.path)?;
        Ok(self.keys.install(keys, fingerprint))
    }
}

/// Reads a key file or a Secret directory into (name, hash) pairs plus a
/// fingerprint of the whole source.
fn read_source(path: &Path) -> Result<(Vec<(String, Hash)>, Hash), KeyError> {
    let err = |source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut fp = Sha256::new();
    let keys = if path.is_dir() {
        // A mounted Secret: one file per client, named after it. Entries
        // starting with '.' are the volume's internal `..data` symlinks.
        let mut files = BTreeMap::new();
        for entry in std::fs::read_dir(path).map_err(err)? {
            let entry = entry.map_err(err)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !entry.path().is_file() {
                continue;
            }
            let key = std::fs::read_to_string(entry.path()).map_err(err)?;
            files.insert(name, key.trim().to_string());
        }
        files
            .into_iter()
            .filter(|(_, k)| !k.is_empty())
            .map(|(name, key)| {
                fp.update(name.as_bytes());
                fp.update([0]);
                fp.update(key.as_bytes());
                fp.update([0]);
                (name, hash(&key))
            })
            .collect()
    } else {
        let text = std::fs::read_to_string(path).map_err(err)?;
        fp.update(text.as_bytes());
        parse_keys(&text)
            .map_err(|source| KeyError::Parse {
                path: path.to_path_buf(),
                source,
            })?
            .into_iter()
            .map(|(name, key)| (name, hash(&key)))
            .collect()
    };
    Ok((keys, fp.finalize().into()))
}

/// The identity of a key that comes without a name: a digest of the key,
/// so it stays the same when lines move.
fn digest_name(key: &str) -> String {
    let h = hash(key);
    let hex: String = h[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("key-{hex}")
}

/// Parses a key file into (identity, key) pairs; see the module docs for
/// the accepted shapes.
pub fn parse_keys(text: &str) -> Result<Vec<(String, String)>, ParseError> {
    let meaningful = || {
        text.lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim()))
            .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
    };
    if meaningful().next().is_none() {
        return Ok(Vec::new());
    }
    // Plain keys: every meaningful line one token without ':'.
    let plain = |l: &str| !l.contains(':') && !l.contains(char::is_whitespace);
    let looks_yaml =
        |l: &str| l.starts_with("- ") || l == "-" || l.contains(": ") || l.ends_with(':');
    if meaningful().all(|(_, l)| plain(l) && !l.starts_with('-')) {
        return Ok(meaningful()
            .map(|(_, l)| (digest_name(l), l.to_string()))
            .collect());
    }
    if !meaningful().all(|(_, l)| looks_yaml(l) || plain(l)) {
        // Some line is neither a key nor YAML: say which, not what.
        let (line, _) = meaningful()
            .find(|(_, l)| !looks_yaml(l) && !plain(l))
            .unwrap_or((1, ""));
        return Err(ParseError::Malformed { line });
    }
    let value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| ParseError::Yaml {
        line: e.location().map(|l| l.line()),
    })?;
    let key_of = |entry: String, v: &serde_yaml::Value| match v {
        serde_yaml::Value::String(k) if !k.trim().is_empty() => Ok(k.trim().to_string()),
        _ => Err(ParseError::NotAKey { entry }),
    };
    match value {
        serde_yaml::Value::Mapping(map) => {
            let mut out = BTreeMap::new();
            for (name, key) in &map {
                let name = match name {
                    serde_yaml::Value::String(n) if !n.trim().is_empty() => n.trim().to_string(),
                    _ => return Err(ParseError::UnknownShape),
                };
                let key = key_of(name.clone(), key)?;
                out.insert(name, key);
            }
            Ok(out.into_iter().collect())
        }
        serde_yaml::Value::Sequence(list) => list
            .iter()
            .enumerate()
            .map(|(i, v)| key_of(format!("#{}", i + 1), v).map(|k| (digest_name(&k), k)))
            .collect(),
        _ => Err(ParseError::UnknownShape),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(text: &str) -> Vec<(String, String)> {
        parse_keys(text).expect("parses")
    }

    #[test]
    fn parses_yaml_maps_and_plain_lines() {
        let map = keys("alice: sk-a\nbob: sk-b\n");
        assert_eq!(
            map,
            vec![
                ("alice".into(), "sk-a".into()),
                ("bob".into(), "sk-b".into())
            ]
        );
        let lines = keys("# clients\nsk-1\n\nsk-2\n");
        assert_eq!(
            lines,
            vec![
                (digest_name("sk-1"), "sk-1".into()),
                (digest_name("sk-2"), "sk-2".into())
            ]
        );
        assert_eq!(
            keys("just-one-key"),
            vec![(digest_name("just-one-key"), "just-one-key".into())]
        );
    }

    #[test]
    fn line_file_identities_are_key_digests_not_line_numbers() {
        let before = keys("sk-1\nsk-2\n");
        let after = keys("# a comment moves every line\n\nsk-0\nsk-2\nsk-1\n");
        let id = |v: &[(String, String)], k: &str| {
            v.iter().find(|(_, key)| key == k).map(|(n, _)| n.clone())
        };
        assert_eq!(id(&before, "sk-1"), id(&after, "sk-1"));
        assert_eq!(id(&before, "sk-2"), id(&after, "sk-2"));
        // first 16 hex digits of SHA-256("sk-1")
        let want = format!("key-{}", &hex(&hash("sk-1"))[..16]);
        assert_eq!(id(&before, "sk-1"), Some(want));
        assert_ne!(id(&before, "sk-1"), id(&before, "sk-2"));
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn a_map_without_a_space_after_the_colon_is_an_error_not_a_key() {
        assert_eq!(
            parse_keys("alice:sk-a\n"),
            Err(ParseError::Malformed { line: 1 })
        );
        assert_eq!(
            parse_keys("alice: sk-a\nbob:sk-b\n"),
            Err(ParseError::Malformed { line: 2 })
        );
        assert_eq!(
            parse_keys("sk-1\nname:sk-2\n"),
            Err(ParseError::Malformed { line: 2 })
        );
        let msg = parse_keys("alice: sk-a\nbob:sk-secret\n")
            .unwrap_err()
            .to_string();
        assert!(!msg.contains("sk-secret"), "{msg}");
    }

    #[test]
    fn a_yaml_list_is_a_list_of_keys() {
        assert_eq!(
            keys("- sk-1\n- sk-2\n"),
            vec![
                (digest_name("sk-1"), "sk-1".into()),
                (digest_name("sk-2"), "sk-2".into())
            ]
        );
        assert_eq!(
            parse_keys("- sk-1\n- \"\"\n"),
            Err(ParseError::NotAKey { entry: "#2".into() })
        );
    }

    #[test]
    fn map_entries_must_be_non_empty_strings() {
        assert_eq!(
            parse_keys("alice: sk-a\nbob:\n"),
            Err(ParseError::NotAKey {
                entry: "bob".into()
            })
        );
        assert_eq!(
            parse_keys("alice: [a, b]\n"),
            Err(ParseError::NotAKey {
                entry: "alice".into()
            })
        );
    }

    #[test]
    fn empty_file_holds_no_keys_and_missing_file_is_an_error() {
        assert_eq!(keys(""), vec![]);
        assert_eq!(keys("# nobody yet\n\n"), vec![]);
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "").unwrap();
        let loaded = ApiKeys::load(&empty).expect("an empty file loads");
        assert!(loaded.is_empty());
        assert_eq!(loaded.verify(""), None, "no key matches, not even empty");
        assert!(matches!(
            ApiKeys::load(&dir.path().join("missing")),
            Err(KeyError::Read { .. })
        ));
    }

    #[test]
    fn a_malformed_reload_keeps_the_previous_keys() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys.yaml");
        std::fs::write(&file, "alice: sk-a\n").unwrap();
        let keys = ApiKeys::load(&file).unwrap();
        std::fs::write(&file, "alice:sk-a\n").unwrap();
        assert!(matches!(keys.reload(), Err(KeyError::Parse { .. })));
        assert_eq!(keys.verify("sk-a"), Some(Identity::api_key("alice")));
        assert_eq!(keys.verify("alice:sk-a"), None);
        assert!(matches!(ApiKeys::load(&file), Err(KeyError::Parse { .. })));
    }

    #[test]
    fn verifies_against_hashes_and_reloads_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys.yaml");
        std::fs::write(&file, "alice: sk-a\n").unwrap();
        let keys = ApiKeys::load(&file).unwrap();
        assert_eq!(keys.verify("sk-a"), Some(Identity::api_key("alice")));
        assert_eq!(keys.verify("sk-b"), None);
        assert!(!keys.reload().unwrap(), "unchanged source is not a change");
        std::fs::write(&file, "bob: sk-b\n").unwrap();
        assert!(keys.reload().unwrap());
        assert_eq!(keys.verify("sk-a"), None);
        assert_eq!(keys.verify("sk-b"), Some(Identity::api_key("bob")));
        std::fs::remove_file(&file).unwrap();
        assert!(keys.reload().is_err());
        assert_eq!(
            keys.verify("sk-b"),
            Some(Identity::api_key("bob")),
            "old keys kept on error"
        );
    }

    #[test]
    fn reads_a_secret_directory_skipping_dot_entries() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("team-a"), "sk-team-a\n").unwrap();
        std::fs::create_dir(dir.path().join("..data")).unwrap();
        std::fs::write(dir.path().join(".hidden"), "sk-hidden").unwrap();
        let keys = ApiKeys::load(dir.path()).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys.verify("sk-team-a"), Some(Identity::api_key("team-a")));
        assert_eq!(keys.verify("sk-hidden"), None);
    }
}
