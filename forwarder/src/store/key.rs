//! Record keys: a use (space), a scope (tenant) and the caller's key,
//! digested so no prompt, API key or tenant name appears in a backend.

use std::fmt;

use sha2::{Digest, Sha256};

/// A digest of the request that produced a record.
pub type Fingerprint = [u8; 32];

/// What a record is for; part of the key so uses never collide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Space {
    Idempotency,
    Cache,
    /// Async jobs and Batch API batches (records, turns, submission keys,
    /// leases, batch lists) and stored responses' origins. The label stays
    /// `job` whatever else it holds: it is in every stored key.
    Job,
    /// Batch API files: metadata and chunks (payload, like `Cache`).
    File,
    RateLimit,
    /// Per-client budget counters, one per client, period and unit.
    Budget,
}

impl Space {
    pub fn label(self) -> &'static str {
        match self {
            Self::Idempotency => "idem",
            Self::Cache => "cache",
            Self::Job => "job",
            Self::File => "file",
            Self::RateLimit => "rl",
            Self::Budget => "budget",
        }
    }
}

/// A record's key: `<space>:<hex sha256(scope 0x1f key)>`; backends add
/// their own prefix (Redis: `mf:`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct StoreKey {
    space: Space,
    digest: [u8; 32],
    name: String,
}

impl StoreKey {
    pub fn new(space: Space, scope: &str, key: &[u8]) -> Self {
        let mut h = Sha256::new();
        h.update(scope.as_bytes());
        h.update([0x1f]);
        h.update(key);
        let digest: [u8; 32] = h.finalize().into();
        let mut name = String::with_capacity(space.label().len() + 65);
        name.push_str(space.label());
        name.push(':');
        for b in digest {
            use fmt::Write;
            let _ = write!(name, "{b:02x}");
        }
        Self {
            space,
            digest,
            name,
        }
    }

    pub fn space(&self) -> Space {
        self.space
    }

    /// `<space>:<hex digest>`: the backend name (after the backend's prefix)
    /// and the associated data a sealed record is bound to.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn digest(&self) -> &[u8; 32] {
        &self.digest
    }
}

impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_hide_their_inputs_and_never_collide_across_uses_or_scopes() {
        let k = StoreKey::new(Space::Cache, "tenant-a", b"what is the return policy?");
        assert!(k.name().starts_with("cache:"));
        assert_eq!(k.name().len(), "cache:".len() + 64);
        assert!(!k.name().contains("tenant"));
        assert_eq!(
            k,
            StoreKey::new(Space::Cache, "tenant-a", b"what is the return policy?")
        );
        assert_ne!(
            k,
            StoreKey::new(
                Space::Idempotency,
                "tenant-a",
                b"what is the return policy?"
            )
        );
        assert_ne!(
            k,
            StoreKey::new(Space::Cache, "tenant-b", b"what is the return policy?")
        );
        // The separator keeps (scope, key) pairs apart.
        assert_ne!(
            StoreKey::new(Space::Job, "ab", b"c").digest(),
            StoreKey::new(Space::Job, "a", b"bc").digest()
        );
    }
}
