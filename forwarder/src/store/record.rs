//! A record and its byte encoding (before sealing):
//! `[version 1][stored_at ms since epoch, u64 BE][fingerprint 32][value]`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};

use super::key::Fingerprint;

const VERSION: u8 = 1;
const HEADER: usize = 1 + 8 + 32;

/// A completed record. `value` is plaintext to callers.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub fingerprint: Fingerprint,
    pub value: Bytes,
    pub stored_at: SystemTime,
}

impl Record {
    pub fn new(fingerprint: Fingerprint, value: Bytes) -> Self {
        Self {
            fingerprint,
            value,
            stored_at: SystemTime::now(),
        }
    }

    /// Seconds since the record was stored (the `Age` header).
    pub fn age(&self) -> Duration {
        SystemTime::now()
            .duration_since(self.stored_at)
            .unwrap_or_default()
    }

    pub fn encode(&self) -> Bytes {
        let ms = self
            .stored_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let mut b = BytesMut::with_capacity(HEADER + self.value.len());
        b.put_u8(VERSION);
        b.put_u64(ms);
        b.put_slice(&self.fingerprint);
        b.put_slice(&self.value);
        b.freeze()
    }

    pub fn decode(mut b: Bytes) -> Option<Self> {
        if b.len() < HEADER || b[0] != VERSION {
            return None;
        }
        let ms = u64::from_be_bytes(b[1..9].try_into().ok()?);
        let fingerprint: Fingerprint = b[9..HEADER].try_into().ok()?;
        let value = b.split_off(HEADER);
        Some(Self {
            fingerprint,
            value,
            stored_at: UNIX_EPOCH + Duration::from_millis(ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_garbage_is_refused() {
        let r = Record::new([7; 32], Bytes::from_static(b"{\"ok\":true}"));
        let back = Record::decode(r.encode()).unwrap();
        assert_eq!(back.fingerprint, r.fingerprint);
        assert_eq!(back.value, r.value);
        assert!(back.age() < Duration::from_secs(5));
        assert!(Record::decode(Bytes::from_static(b"short")).is_none());
        let mut bad = r.encode().to_vec();
        bad[0] = 9;
        assert!(Record::decode(bad.into()).is_none());
    }
}
