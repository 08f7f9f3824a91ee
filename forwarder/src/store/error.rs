use std::time::Duration;

/// Why a store call failed. Callers apply their use's failure policy
/// (the cache fails open; idempotency is configurable).
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store call timed out after {0:?}")]
    Timeout(Duration),
    /// A record failed authentication or decoding. The layer above turns
    /// it into a miss; backends report it.
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    /// A record sealed under a key id this replica has not loaded (a key
    /// rotation rolling out): unreadable here, kept for the replicas that
    /// can read it. Callers treat it as the store being unavailable.
    #[error("stored record sealed under key {0:?}, not loaded here")]
    UnknownKey(String),
    /// The claim was lost (its lease expired and another request took the key).
    #[error("the claim on this key was lost")]
    ClaimLost,
}
