//! The encryption key ring and AES-256-GCM sealing of records.
//!
//! Source: a file of `id: base64(32 bytes)` lines (`#` comments, blank
//! lines skipped) or a directory (a mounted Secret) with one file per key
//! id holding the base64 key. Every key decrypts. The reserved entry
//! `primary` (a line `primary: <id>`, or a file `primary` holding the id)
//! names the key that encrypts; without it the last key of the file, or
//! the greatest id of the directory, does.
//!
//! A fleet rotates in two phases (docs/store.md): add the new key while
//! `primary` still names the old one (decrypt-only everywhere), and only
//! once every replica has loaded it, point `primary` at it. A record sealed
//! under a key a replica has not loaded is refused as [`Refused::UnknownKey`]
//! and never deleted; removing a key makes its records misses.
//!
//! Sealed blob: `[1][id len][id][nonce 12][ciphertext + tag 16]`. The
//! associated data is the header (version and key id) and the record's
//! key name, so a record copied to another key fails authentication.
//! Errors name positions and ids, never key material.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use bytes::{BufMut, Bytes, BytesMut};
use sha2::{Digest, Sha256};

use super::layer::{Refused, Seal};
use crate::reload::{Reload, Swap};

/// First byte of a sealed blob.
pub const SEALED: u8 = 1;
const NONCE: usize = 12;
const MAX_ID: usize = 64;
/// The reserved entry naming the encrypting key.
const PRIMARY: &str = "primary";

#[derive(Debug, thiserror::Error)]
pub enum KeyRingError {
    #[error("cannot read the encryption key ring {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid encryption key ring {path}: {message}")]
    Parse { path: PathBuf, message: String },
}

struct Ring {
    /// In source order.
    keys: Vec<(String, Aes256Gcm)>,
    /// Index of the key that encrypts.
    primary: usize,
}

impl Ring {
    /// `primary`: the id the source names, else the last key.
    fn new(keys: Vec<(String, Aes256Gcm)>, primary: Option<&str>) -> Result<Self, String> {
        if keys.is_empty() {
            return Err("no keys".into());
        }
        let primary = match primary {
            None => keys.len() - 1,
            Some(id) => keys
                .iter()
                .position(|(k, _)| k == id)
                .ok_or_else(|| format!("primary names {id:?}, which is not a key here"))?,
        };
        Ok(Self { keys, primary })
    }

    fn find(&self, id: &[u8]) -> Option<&Aes256Gcm> {
        self.keys
            .iter()
            .find(|(k, _)| k.as_bytes() == id)
            .map(|(_, c)| c)
    }
}

pub struct KeyRing {
    path: PathBuf,
    ring: Swap<Ring>,
}

impl KeyRing {
    pub fn load(path: &Path) -> Result<Self, KeyRingError> {
        let (ring, fingerprint) = read_source(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            ring: Swap::new(ring, fingerprint),
        })
    }

    /// The id of the key that encrypts.
    pub fn primary(&self) -> String {
        let ring = self.ring.get();
        ring.keys[ring.primary].0.clone()
    }

    /// The ids, in source order.
    pub fn ids(&self) -> Vec<String> {
        self.ring
            .get()
            .keys
            .iter()
            .map(|(k, _)| k.clone())
            .collect()
    }
}

impl Reload for KeyRing {
    type Error = KeyRingError;
    const WHAT: &'static str = "encryption key ring";

    /// Re-reads the source; on error the current keys stay in force.
    fn reload(&self) -> Result<bool, KeyRingError> {
        let (ring, fingerprint) = read_source(&self.path)?;
        Ok(self.ring.install(ring, fingerprint))
    }
}

fn aad(header: &[u8], name: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(header.len() + 1 + name.len());
    v.extend_from_slice(header);
    v.push(0x1f);
    v.extend_from_slice(name);
    v
}

impl Seal for KeyRing {
    fn seal(&self, name: &[u8], plain: &[u8]) -> Bytes {
        let ring = self.ring.get();
        let (id, cipher) = &ring.keys[ring.primary];
        let nonce: [u8; NONCE] = rand::random();
        let mut b = BytesMut::with_capacity(2 + id.len() + NONCE + plain.len() + 16);
        b.put_u8(SEALED);
        b.put_u8(id.len() as u8);
        b.put_slice(id.as_bytes());
        let ad = aad(&b, name);
        let ct = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: &ad,
                },
            )
            .expect("AES-GCM encryption of a bounded record cannot fail");
        b.put_slice(&nonce);
        b.put_slice(&ct);
        b.freeze()
    }

    fn open(&self, name: &[u8], blob: &[u8]) -> Result<Bytes, Refused> {
        let invalid = |why: &str| Refused::Invalid(why.into());
        let (&version, rest) = blob.split_first().ok_or_else(|| invalid("empty record"))?;
        if version != SEALED {
            return Err(invalid("not sealed"));
        }
        let (&id_len, rest) = rest
            .split_first()
            .ok_or_else(|| invalid("truncated header"))?;
        let id_len = id_len as usize;
        if rest.len() < id_len + NONCE + 16 {
            return Err(invalid("truncated record"));
        }
        let (id, rest) = rest.split_at(id_len);
        let (nonce, ct) = rest.split_at(NONCE);
        let ring = self.ring.get();
        let Some(cipher) = ring.find(id) else {
            // A well-formed id not in the ring: a key this replica has not
            // loaded yet. Anything else there is tampering.
            return match std::str::from_utf8(id) {
                Ok(id) if valid_id(id) => Err(Refused::UnknownKey(id.to_string())),
                _ => Err(invalid("malformed key id")),
            };
        };
        let ad = aad(&blob[..2 + id_len], name);
        cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad: &ad })
            .map(Bytes::from)
            .map_err(|_| invalid("authentication failed"))
    }
}

fn valid_id(id: &str) -> bool {
    id != PRIMARY
        && !id.is_empty()
        && id.len() <= MAX_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn cipher(key_b64: &str) -> Result<Aes256Gcm, String> {
    let key = base64::engine::general_purpose::STANDARD
        .decode(key_b64.trim())
        .map_err(|_| "the key is not base64".to_string())?;
    Aes256Gcm::new_from_slice(&key).map_err(|_| format!("the key is {} bytes, not 32", key.len()))
}

fn read_source(path: &Path) -> Result<(Ring, [u8; 32]), KeyRingError> {
    let err = |source| KeyRingError::Read {
        path: path.to_path_buf(),
        source,
    };
    let bad = |message: String| KeyRingError::Parse {
        path: path.to_path_buf(),
        message,
    };
    let mut fp = Sha256::new();
    let mut keys = Vec::new();
    let primary;
    if path.is_dir() {
        let mut files = BTreeMap::new();
        for entry in std::fs::read_dir(path).map_err(err)? {
            let entry = entry.map_err(err)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !entry.path().is_file() {
                continue;
            }
            files.insert(name, std::fs::read_to_string(entry.path()).map_err(err)?);
        }
        primary = files.remove(PRIMARY).map(|p| p.trim().to_string());
        if let Some(p) = &primary {
            fp.update(PRIMARY.as_bytes());
            fp.update([0]);
            fp.update(p.as_bytes());
            fp.update([0]);
        }
        for (id, key) in files {
            if !valid_id(&id) {
                return Err(bad(format!(
                    "file {id:?}: ids are letters, digits, . _ - (at most {MAX_ID})"
                )));
            }
            fp.update(id.as_bytes());
            fp.update([0]);
            fp.update(key.trim().as_bytes());
            fp.update([0]);
            keys.push((
                id.clone(),
                cipher(&key).map_err(|m| bad(format!("key {id:?}: {m}")))?,
            ));
        }
    } else {
        let text = std::fs::read_to_string(path).map_err(err)?;
        fp.update(text.as_bytes());
        (keys, primary) = parse(&text).map_err(bad)?;
    }
    let ring = Ring::new(keys, primary.as_deref()).map_err(bad)?;
    Ok((ring, fp.finalize().into()))
}

type Parsed = (Vec<(String, Aes256Gcm)>, Option<String>);

fn parse(text: &str) -> Result<Parsed, String> {
    let mut keys: Vec<(String, Aes256Gcm)> = Vec::new();
    let mut primary = None;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((id, key)) = line.split_once(':') else {
            return Err(format!("line {}: expected `id: base64-key`", n + 1));
        };
        let id = id.trim();
        if id == PRIMARY {
            if primary.is_some() {
                return Err(format!("line {}: a second `primary`", n + 1));
            }
            primary = Some(key.trim().to_string());
            continue;
        }
        if !valid_id(id) {
            return Err(format!(
                "line {}: ids are letters, digits, . _ - (at most {MAX_ID})",
                n + 1
            ));
        }
        if keys.iter().any(|(k, _)| k == id) {
            return Err(format!("line {}: duplicate key id {id:?}", n + 1));
        }
        let c = cipher(key).map_err(|m| format!("line {}: {m}", n + 1))?;
        keys.push((id.to_string(), c));
    }
    Ok((keys, primary))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> String {
        base64::engine::general_purpose::STANDARD.encode([byte; 32])
    }

    fn ring(text: &str) -> (tempfile::TempDir, KeyRing) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, text).unwrap();
        let r = KeyRing::load(&path).unwrap();
        (dir, r)
    }

    #[test]
    fn seals_and_opens_bound_to_the_key_name() {
        let (_d, r) = ring(&format!("# demo\nk1: {}\n", key(1)));
        let blob = r.seal(b"cache:ab", b"secret answer");
        assert!(
            !blob.windows(6).any(|w| w == b"secret"),
            "ciphertext hides the plaintext"
        );
        assert_eq!(
            r.open(b"cache:ab", &blob).unwrap().as_ref(),
            b"secret answer"
        );
        assert!(
            r.open(b"cache:cd", &blob).is_err(),
            "moved to another key: refused"
        );
        for i in 0..blob.len() {
            let mut t = blob.to_vec();
            t[i] ^= 1;
            assert!(
                r.open(b"cache:ab", &t).is_err(),
                "byte {i} flipped: refused"
            );
        }
        assert_ne!(r.seal(b"n", b"x"), r.seal(b"n", b"x"), "random nonces");
    }

    #[test]
    fn rotation_keeps_old_records_readable_and_reload_keeps_keys_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, format!("old: {}\n", key(1))).unwrap();
        let r = KeyRing::load(&path).unwrap();
        let old = r.seal(b"n", b"v1");
        std::fs::write(&path, format!("old: {}\nnew: {}\n", key(1), key(2))).unwrap();
        assert!(r.reload().unwrap());
        assert_eq!(r.ids(), ["old", "new"]);
        let new = r.seal(b"n", b"v2");
        assert_eq!(&new[2..5], b"new", "the newest key encrypts");
        assert_eq!(r.open(b"n", &old).unwrap().as_ref(), b"v1");
        std::fs::write(&path, "broken").unwrap();
        assert!(r.reload().is_err());
        assert_eq!(
            r.open(b"n", &new).unwrap().as_ref(),
            b"v2",
            "previous keys kept"
        );
        std::fs::write(&path, format!("new: {}\n", key(2))).unwrap();
        assert!(r.reload().unwrap());
        assert!(
            r.open(b"n", &old).is_err(),
            "a removed key no longer decrypts"
        );
    }

    #[test]
    fn two_phase_rotation_adds_a_decrypt_only_key_then_promotes_it() {
        let (_d, old) = ring(&format!("k1: {}\n", key(1)));
        // Phase one: k2 is loaded everywhere but k1 still encrypts.
        let (_d2, phase1) = ring(&format!("k1: {}\nk2: {}\nprimary: k1\n", key(1), key(2)));
        assert_eq!(phase1.primary(), "k1");
        let sealed = phase1.seal(b"n", b"v");
        assert_eq!(&sealed[2..4], b"k1");
        assert_eq!(
            old.open(b"n", &sealed).unwrap().as_ref(),
            b"v",
            "an old replica reads it"
        );
        // Phase two: k2 encrypts; a replica that missed phase one cannot
        // read it, and says so as an unknown key, not as tampering.
        let (_d3, phase2) = ring(&format!("k1: {}\nk2: {}\nprimary: k2\n", key(1), key(2)));
        let sealed = phase2.seal(b"n", b"v2");
        assert_eq!(&sealed[2..4], b"k2");
        assert_eq!(
            old.open(b"n", &sealed),
            Err(Refused::UnknownKey("k2".into()))
        );
        assert_eq!(phase1.open(b"n", &sealed).unwrap().as_ref(), b"v2");
        let mut forged = sealed.to_vec();
        forged[2] = 0xff;
        assert!(matches!(old.open(b"n", &forged), Err(Refused::Invalid(_))));
        // The directory form: a `primary` file.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), key(1)).unwrap();
        std::fs::write(dir.path().join("b"), key(2)).unwrap();
        std::fs::write(dir.path().join("primary"), "a\n").unwrap();
        let r = KeyRing::load(dir.path()).unwrap();
        assert_eq!(
            (r.ids(), r.primary()),
            (vec!["a".into(), "b".into()], "a".into())
        );
        std::fs::write(dir.path().join("primary"), "c").unwrap();
        let e = r.reload().err().unwrap().to_string();
        assert!(e.contains("not a key here"), "{e}");
        assert_eq!(r.primary(), "a", "a bad primary keeps the ring in force");
    }

    #[test]
    fn a_secret_directory_is_a_ring_and_bad_sources_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("2026-01"), key(1)).unwrap();
        std::fs::write(dir.path().join("2026-02"), key(2)).unwrap();
        std::fs::write(dir.path().join("..data"), "ignored").unwrap();
        let r = KeyRing::load(dir.path()).unwrap();
        assert_eq!(r.ids(), ["2026-01", "2026-02"]);
        for (text, want) in [
            ("", "no keys"),
            ("k1 AAAA", "line 1: expected"),
            ("k1: notbase64!", "not base64"),
            ("k1: AAAA", "3 bytes, not 32"),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("keys");
            std::fs::write(&p, text).unwrap();
            let e = KeyRing::load(&p).err().unwrap().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        let dup = format!("a: {}\na: {}\n", key(1), key(2));
        let (_d, p) = {
            let d = tempfile::tempdir().unwrap();
            let p = d.path().join("k");
            std::fs::write(&p, dup).unwrap();
            (d, p)
        };
        assert!(KeyRing::load(&p)
            .err()
            .unwrap()
            .to_string()
            .contains("duplicate"));
    }
}
