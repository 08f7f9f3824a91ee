//! API keys from a file or a mounted Secret directory, kept only as SHA-256
//! hashes, compared in constant time and reloaded when the source changes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::Identity;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read API keys from {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

type Hash = [u8; 32];

fn hash(key: &str) -> Hash {
    Sha256::digest(key.as_bytes()).into()
}

/// The loaded key set. Cheap to share; swapped whole on reload.
pub struct ApiKeys {
    path: PathBuf,
    keys: RwLock<Arc<Vec<(String, Hash)>>>,
    /// Hash of the raw source, to notice changes without keeping it.
    fingerprint: RwLock<Hash>,
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
            keys: RwLock::new(Arc::new(keys)),
            fingerprint: RwLock::new(fingerprint),
        })
    }

    /// The identity owning `presented`, if any. Every stored hash is compared
    /// (no early exit), each in constant time, so timing reveals nothing.
    pub fn verify(&self, presented: &str) -> Option<Identity> {
        let h = hash(presented);
        let keys = self.keys.read().clone();
        let mut found: Option<&str> = None;
        for (name, stored) in keys.iter() {
            if bool::from(stored.ct_eq(&h)) && found.is_none() {
                found = Some(name);
            }
        }
        found.map(|n| Identity(n.to_string()))
    }

    pub fn len(&self) -> usize {
        self.keys.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Re-reads the source; returns whether the keys changed. On error the
    /// current keys stay in force (a half-written Secret must not lock
    /// every client out).
    pub fn reload(&self) -> Result<bool, KeyError> {
        let (keys, fingerprint) = read_source(&self.path)?;
        if *self.fingerprint.read() == fingerprint {
            return Ok(false);
        }
        *self.keys.write() = Arc::new(keys);
        *self.fingerprint.write() = fingerprint;
        Ok(true)
    }

    /// Polls the source every `interval` until the returned task is aborted.
    /// Polling (not inotify) because Kubernetes updates Secret volumes by
    /// swapping symlinks, which file watchers often miss.
    pub fn watch(self: Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match self.reload() {
                    Ok(true) => tracing::info!(keys = self.len(), "API keys reloaded"),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "API key reload failed; keeping the previous keys")
                    }
                }
            }
        })
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
            .into_iter()
            .map(|(name, key)| (name, hash(&key)))
            .collect()
    };
    Ok((keys, fp.finalize().into()))
}

/// Parses a key file: a YAML map `name: key`, or else one key per line
/// (blank lines and `#` comments skipped, clients named `key-<line>`).
pub fn parse_keys(text: &str) -> Vec<(String, String)> {
    if let Ok(map) = serde_yaml::from_str::<BTreeMap<String, String>>(text) {
        return map
            .into_iter()
            .map(|(n, k)| (n, k.trim().to_string()))
            .filter(|(_, k)| !k.is_empty())
            .collect();
    }
    text.lines()
        .enumerate()
        .map(|(i, l)| (i, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        .map(|(i, l)| (format!("key-{}", i + 1), l.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_yaml_maps_and_plain_lines() {
        let map = parse_keys("alice: sk-a\nbob: sk-b\n");
        assert_eq!(
            map,
            vec![
                ("alice".into(), "sk-a".into()),
                ("bob".into(), "sk-b".into())
            ]
        );
        let lines = parse_keys("# clients\nsk-1\n\nsk-2\n");
        assert_eq!(
            lines,
            vec![
                ("key-2".into(), "sk-1".into()),
                ("key-4".into(), "sk-2".into())
            ]
        );
        assert_eq!(
            parse_keys("just-one-key"),
            vec![("key-1".into(), "just-one-key".into())]
        );
    }

    #[test]
    fn verifies_against_hashes_and_reloads_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys.yaml");
        std::fs::write(&file, "alice: sk-a\n").unwrap();
        let keys = ApiKeys::load(&file).unwrap();
        assert_eq!(keys.verify("sk-a"), Some(Identity("alice".into())));
        assert_eq!(keys.verify("sk-b"), None);
        assert!(!keys.reload().unwrap(), "unchanged source is not a change");
        std::fs::write(&file, "bob: sk-b\n").unwrap();
        assert!(keys.reload().unwrap());
        assert_eq!(keys.verify("sk-a"), None);
        assert_eq!(keys.verify("sk-b"), Some(Identity("bob".into())));
        std::fs::remove_file(&file).unwrap();
        assert!(keys.reload().is_err());
        assert_eq!(
            keys.verify("sk-b"),
            Some(Identity("bob".into())),
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
        assert_eq!(keys.verify("sk-team-a"), Some(Identity("team-a".into())));
        assert_eq!(keys.verify("sk-hidden"), None);
    }
}
