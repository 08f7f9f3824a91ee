//! Values read from files or mounted Secrets (API keys, the encryption key
//! ring, JWT keys, TLS certificates) and swapped whole when the source
//! changes. Sources are polled, not watched: Kubernetes updates Secret
//! volumes by swapping symlinks, which file watchers often miss. A reload
//! that fails (a half-written rotation) keeps the current value in force.

use std::fmt::Display;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

/// A digest of a source's raw bytes: a reload that changes nothing is a no-op.
pub type SourceDigest = [u8; 32];

/// The current value and the fingerprint of the source it came from.
pub struct Swap<T> {
    current: RwLock<Arc<T>>,
    fingerprint: Mutex<SourceDigest>,
}

impl<T> Swap<T> {
    pub fn new(value: T, fingerprint: SourceDigest) -> Self {
        Self {
            current: RwLock::new(Arc::new(value)),
            fingerprint: Mutex::new(fingerprint),
        }
    }

    pub fn get(&self) -> Arc<T> {
        self.current.read().clone()
    }

    /// Whether `fingerprint` is the source already in force.
    pub fn is_current(&self, fingerprint: &SourceDigest) -> bool {
        *self.fingerprint.lock() == *fingerprint
    }

    /// Installs `value` unless its source is the one in force; returns
    /// whether the value changed.
    pub fn install(&self, value: T, fingerprint: SourceDigest) -> bool {
        let mut fp = self.fingerprint.lock();
        if *fp == fingerprint {
            return false;
        }
        *self.current.write() = Arc::new(value);
        *fp = fingerprint;
        true
    }
}

/// Something that re-reads its source on demand.
pub trait Reload: Send + Sync + 'static {
    type Error: Display;
    /// What is reloaded, for the log ("API keys", "TLS certificate").
    const WHAT: &'static str;
    /// Re-reads the source; returns whether the value changed.
    fn reload(&self) -> Result<bool, Self::Error>;
}

/// Polls `source` every `interval` until the returned task is aborted.
pub fn poll<R: Reload>(source: Arc<R>, interval: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match source.reload() {
                Ok(true) => tracing::info!(source = R::WHAT, "reloaded"),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(source = R::WHAT, error = %e, "reload failed; keeping the previous version")
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installs_only_a_changed_source() {
        let s = Swap::new(1, [1; 32]);
        assert!(!s.install(2, [1; 32]), "same source: no change");
        assert_eq!(*s.get(), 1);
        assert!(s.install(3, [2; 32]));
        assert_eq!(*s.get(), 3);
        assert!(s.is_current(&[2; 32]));
    }
}
