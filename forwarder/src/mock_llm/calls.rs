//! Calls by idempotency key, as a provider that honours `Idempotency-Key`
//! keeps them: a repeated key gets the first answer back (or waits for the
//! call still running) instead of running the model again. Counted per key
//! (`GET /mock/calls`) so tests can prove how often the upstream was asked
//! and how often it really answered. A request without the key but with a
//! marker in its prompt (`<<m:TOKEN>>`) is counted under the marker, never
//! de-duplicated: a provider that ignores the key.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use serde::Serialize;

/// Keys remembered at most; later keys are answered without de-duplication.
const MAX_KEYS: usize = 200_000;
/// How often a repeated key looks again at a call still running.
const POLL: Duration = Duration::from_millis(5);

#[derive(Default)]
pub struct Calls {
    keys: Mutex<HashMap<String, Entry>>,
}

/// One key's figures.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Counts {
    /// Requests that arrived with the key.
    pub started: u64,
    /// Answers the model produced for it (a first answer, not a replay).
    pub answered: u64,
    /// Requests answered with the stored first answer.
    pub replayed: u64,
    /// When the first and the last request arrived (ms since the epoch):
    /// a repeat is explained by what happened in between.
    pub first_ms: u64,
    pub last_ms: u64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The `TOKEN` of the first `<<m:TOKEN>>` in a request body.
pub fn marker(body: &[u8]) -> Option<&str> {
    const OPEN: &[u8] = b"<<m:";
    let start = body.windows(OPEN.len()).position(|w| w == OPEN)? + OPEN.len();
    let len = body[start..].windows(2).position(|w| w == b">>")?;
    std::str::from_utf8(&body[start..start + len]).ok()
}

#[derive(Default)]
struct Entry {
    counts: Counts,
    running: bool,
    answer: Option<Bytes>,
}

pub enum Begin<'a> {
    /// Run the model, then [`Lead::answered`].
    Lead(Lead<'a>),
    /// The key's first answer, byte for byte.
    Replay(Bytes),
    /// Too many keys: answered without de-duplication.
    Untracked,
}

/// A call running under a key; dropped unanswered (a fault, the client
/// went away and the handler was dropped), the key is free for a retry.
pub struct Lead<'a> {
    calls: &'a Calls,
    key: String,
}

impl Calls {
    pub async fn begin(&self, key: &str) -> Begin<'_> {
        let mut first = true;
        loop {
            {
                let mut keys = self.keys.lock();
                if !keys.contains_key(key) && keys.len() >= MAX_KEYS {
                    return Begin::Untracked;
                }
                let e = keys.entry(key.to_string()).or_default();
                if first {
                    e.counts.arrived();
                    first = false;
                }
                if let Some(answer) = &e.answer {
                    e.counts.replayed += 1;
                    return Begin::Replay(answer.clone());
                }
                if !e.running {
                    e.running = true;
                    return Begin::Lead(Lead {
                        calls: self,
                        key: key.to_string(),
                    });
                }
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// A request under a marker: counted, run every time.
    pub fn note(&self, marker: &str) {
        let mut keys = self.keys.lock();
        if !keys.contains_key(marker) && keys.len() >= MAX_KEYS {
            return;
        }
        let e = keys.entry(marker.to_string()).or_default();
        e.counts.arrived();
        e.counts.answered += 1;
    }

    /// Every key's figures.
    pub fn counts(&self) -> HashMap<String, Counts> {
        self.keys
            .lock()
            .iter()
            .map(|(k, e)| (k.clone(), e.counts))
            .collect()
    }
}

impl Counts {
    fn arrived(&mut self) {
        let now = now_ms();
        if self.started == 0 {
            self.first_ms = now;
        }
        self.last_ms = now;
        self.started += 1;
    }
}

impl Lead<'_> {
    /// The model answered: kept for repeats of the key.
    pub fn answered(self, body: Bytes) {
        let mut keys = self.calls.keys.lock();
        if let Some(e) = keys.get_mut(&self.key) {
            e.counts.answered += 1;
            e.answer = Some(body);
        }
    }
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        if let Some(e) = self.calls.keys.lock().get_mut(&self.key) {
            e.running = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_repeated_key_replays_and_an_abandoned_call_frees_the_key() {
        let calls = Calls::default();
        let Begin::Lead(lead) = calls.begin("k").await else {
            panic!("first leads")
        };
        drop(lead); // the handler was dropped before answering
        let Begin::Lead(lead) = calls.begin("k").await else {
            panic!("the key is free again")
        };
        lead.answered(Bytes::from_static(b"a"));
        let Begin::Replay(b) = calls.begin("k").await else {
            panic!("replayed")
        };
        assert_eq!(b.as_ref(), b"a");
        let c = calls.counts()["k"];
        assert_eq!((c.started, c.answered, c.replayed), (3, 1, 1));
        assert!(c.first_ms > 0 && c.first_ms <= c.last_ms);
    }

    #[test]
    fn a_marker_is_counted_every_time_and_found_in_a_body() {
        let calls = Calls::default();
        let body = br#"{"messages":[{"content":"<<m:s-7>> hi"}]}"#;
        assert_eq!(marker(body), Some("s-7"));
        assert_eq!(marker(b"<<m:open"), None);
        calls.note("s-7");
        calls.note("s-7");
        let c = calls.counts()["s-7"];
        assert_eq!((c.started, c.answered, c.replayed), (2, 2, 0));
    }
}
