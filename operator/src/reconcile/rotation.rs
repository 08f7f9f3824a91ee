//! Key rotation of the store's key ring, in two phases (pure).
//!
//! A key added to the encryption Secret must decrypt in every pod before
//! any pod encrypts with it: otherwise a pod that has not loaded it yet
//! cannot read what the others write. So the operator names the encrypting
//! key itself (the ring's `primary` entry, projected from the ConfigMap):
//! a new key stays decrypt-only until a rollout of the Secret's current
//! version has finished, and only then becomes primary. The keys loaded
//! everywhere are kept in the status, so a new leader continues a rotation
//! where the last one left it.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Secret;

use crate::crd::EncryptionStatus;
use crate::render::config::KEY_RING_PRIMARY;

/// The key ring a Secret holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Ring {
    pub ids: BTreeSet<String>,
    /// The id the Secret's own `primary` entry names: the user drives the
    /// rotation, and the operator writes no primary of its own.
    pub own_primary: Option<String>,
}

impl Ring {
    pub fn of(secret: &Secret) -> Self {
        let mut entries: BTreeMap<String, String> = BTreeMap::new();
        for (k, v) in secret.data.iter().flatten() {
            entries.insert(k.clone(), String::from_utf8_lossy(&v.0).trim().to_string());
        }
        for (k, v) in secret.string_data.iter().flatten() {
            entries.insert(k.clone(), v.trim().to_string());
        }
        let own_primary = entries.remove(KEY_RING_PRIMARY);
        Self {
            // The forwarder skips hidden files in the ring's directory.
            ids: entries
                .into_keys()
                .filter(|k| !k.starts_with('.'))
                .collect(),
            own_primary,
        }
    }
}

/// What the operator renders, and reports, for one ring.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The primary the operator writes into the ConfigMap; `None` when the
    /// Secret names its own.
    pub render_primary: Option<String>,
    pub status: EncryptionStatus,
}

/// Decides the primary. `previous`: the status of the last pass (`None`
/// for a new resource or one an older operator ran, whose pods all loaded
/// the Secret as it is). `rolled_out`: every pod runs the template that
/// carries the Secret's current version.
pub fn decide(ring: &Ring, previous: Option<&EncryptionStatus>, rolled_out: bool) -> Decision {
    let loaded: BTreeSet<String> = match previous {
        Some(p) if !rolled_out => p
            .loaded_keys
            .iter()
            .filter(|id| ring.ids.contains(*id))
            .cloned()
            .collect(),
        _ => ring.ids.clone(),
    };
    // The greatest loaded id, as the forwarder picks the greatest of a
    // directory; when every key was replaced at once none is loaded, and
    // waiting would not help.
    let chosen = loaded.last().or(ring.ids.last()).cloned();
    let (render_primary, primary) = match &ring.own_primary {
        Some(own) => (None, Some(own.clone())),
        None => (chosen.clone(), chosen),
    };
    Decision {
        render_primary,
        status: EncryptionStatus {
            primary,
            pending_keys: ring.ids.difference(&loaded).cloned().collect(),
            loaded_keys: loaded.into_iter().collect(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn ring(ids: &[&str]) -> Ring {
        Ring {
            ids: ids.iter().map(|s| s.to_string()).collect(),
            own_primary: None,
        }
    }

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_new_resource_encrypts_with_the_greatest_key() {
        let d = decide(&ring(&["k1", "k2"]), None, false);
        assert_eq!(d.render_primary.as_deref(), Some("k2"));
        assert_eq!(d.status.loaded_keys, ids(&["k1", "k2"]));
        assert!(d.status.pending_keys.is_empty());
    }

    #[test]
    fn an_added_key_decrypts_everywhere_before_it_encrypts() {
        let before = decide(&ring(&["k1"]), None, true).status;
        // Phase one: k2 is in the Secret, the rollout carrying it runs.
        let during = decide(&ring(&["k1", "k2"]), Some(&before), false);
        assert_eq!(during.render_primary.as_deref(), Some("k1"));
        assert_eq!(during.status.pending_keys, ids(&["k2"]));
        // Passes while it runs change nothing.
        let again = decide(&ring(&["k1", "k2"]), Some(&during.status), false);
        assert_eq!(again, during);
        // Phase two: every pod loaded k2.
        let after = decide(&ring(&["k1", "k2"]), Some(&again.status), true);
        assert_eq!(after.render_primary.as_deref(), Some("k2"));
        assert_eq!(after.status.loaded_keys, ids(&["k1", "k2"]));
        assert!(after.status.pending_keys.is_empty());
        // The rollout of the new primary does not take it back.
        let next = decide(&ring(&["k1", "k2"]), Some(&after.status), false);
        assert_eq!(next, after);
    }

    #[test]
    fn a_removed_key_is_forgotten_and_a_wholesale_replacement_is_not_blocked() {
        let both = decide(&ring(&["k1", "k2"]), None, true).status;
        let d = decide(&ring(&["k2"]), Some(&both), false);
        assert_eq!(d.status.loaded_keys, ids(&["k2"]));
        let d = decide(&ring(&["k9"]), Some(&both), false);
        assert_eq!(d.render_primary.as_deref(), Some("k9"));
        assert_eq!(d.status.pending_keys, ids(&["k9"]));
    }

    #[test]
    fn a_secret_that_names_its_primary_is_left_to_drive_it() {
        let secret = Secret {
            data: Some(BTreeMap::from([
                ("k1".to_string(), ByteString(b"a".to_vec())),
                ("k2".to_string(), ByteString(b"b".to_vec())),
                ("primary".to_string(), ByteString(b"k1\n".to_vec())),
            ])),
            ..Secret::default()
        };
        let r = Ring::of(&secret);
        assert_eq!(r.ids, ["k1", "k2"].map(String::from).into());
        let d = decide(&r, None, false);
        assert_eq!(d.render_primary, None);
        assert_eq!(d.status.primary.as_deref(), Some("k1"));
    }
}
