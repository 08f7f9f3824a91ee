//! Files of the Batch API in the shared store (sealed when a key ring is
//! configured), in chunks so an upload is written as it streams in and a
//! download is read as it streams out. Every key includes the owner: a
//! file is invisible to any other client.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use serde::{de::DeserializeOwned, Serialize};

use super::model::FileMeta;
use crate::auth::Identity;
use crate::store::{Space, Store, StoreError, StoreKey};

/// Bytes per stored chunk.
pub const CHUNK: usize = 4 << 20;

/// A batch's record or index (`kind`) of `owner`.
pub fn key(kind: &str, owner: &Identity, id: &str) -> StoreKey {
    let k = format!("{}\x1f{id}", owner.0);
    StoreKey::new(Space::Job, kind, k.as_bytes())
}

/// A file's metadata or chunk: payload, kept apart from coordination state.
fn file_key(kind: &str, owner: &Identity, id: &str) -> StoreKey {
    let k = format!("{}\x1f{id}", owner.0);
    StoreKey::new(Space::File, kind, k.as_bytes())
}

fn chunk_key(owner: &Identity, id: &str, n: u32) -> StoreKey {
    file_key("batch-file-chunk", owner, &format!("{id}\x1f{n}"))
}

#[derive(Clone)]
pub struct FileStore {
    pub store: Arc<dyn Store>,
    pub ttl: Duration,
}

impl FileStore {
    pub async fn put_json<T: Serialize>(&self, k: &StoreKey, v: &T) -> Result<(), StoreError> {
        let value = serde_json::to_vec(v).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.store.put(k, [0; 32], value.into(), self.ttl).await
    }

    pub async fn get_json<T: DeserializeOwned>(
        &self,
        k: &StoreKey,
    ) -> Result<Option<T>, StoreError> {
        Ok(self
            .store
            .get(k)
            .await?
            .and_then(|r| serde_json::from_slice(&r.value).ok()))
    }

    pub async fn meta(&self, owner: &Identity, id: &str) -> Result<Option<FileMeta>, StoreError> {
        self.get_json(&file_key("batch-file", owner, id)).await
    }

    pub async fn chunk(&self, owner: &Identity, id: &str, n: u32) -> Result<Bytes, StoreError> {
        match self.store.get(&chunk_key(owner, id, n)).await? {
            Some(r) => Ok(r.value),
            None => Err(StoreError::Corrupt(format!(
                "chunk {n} of a file is missing"
            ))),
        }
    }

    pub fn writer(&self, owner: &Identity, id: String) -> Writer {
        Writer {
            files: self.clone(),
            owner: owner.clone(),
            id,
            buf: BytesMut::new(),
            chunks: 0,
            bytes: 0,
            lines: 0,
        }
    }
}

/// A file being written: chunks go to the store as they fill.
pub struct Writer {
    files: FileStore,
    owner: Identity,
    pub id: String,
    buf: BytesMut,
    chunks: u32,
    pub bytes: u64,
    pub lines: u64,
}

impl Writer {
    pub async fn write(&mut self, data: &[u8]) -> Result<(), StoreError> {
        self.buf.extend_from_slice(data);
        self.bytes += data.len() as u64;
        while self.buf.len() >= CHUNK {
            let chunk = self.buf.split_to(CHUNK).freeze();
            self.flush(chunk).await?;
        }
        Ok(())
    }

    pub async fn write_line(&mut self, line: &[u8]) -> Result<(), StoreError> {
        self.lines += 1;
        self.write(line).await
    }

    async fn flush(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        let k = chunk_key(&self.owner, &self.id, self.chunks);
        self.files
            .store
            .put(&k, [0; 32], chunk, self.files.ttl)
            .await?;
        self.chunks += 1;
        Ok(())
    }

    /// Stores the rest and the file's metadata.
    pub async fn finish(
        mut self,
        filename: String,
        purpose: &str,
        created_at: u64,
    ) -> Result<FileMeta, StoreError> {
        if !self.buf.is_empty() {
            let chunk = std::mem::take(&mut self.buf).freeze();
            self.flush(chunk).await?;
        }
        let meta = FileMeta {
            id: self.id.clone(),
            bytes: self.bytes,
            created_at,
            filename,
            purpose: purpose.into(),
            chunks: self.chunks,
            lines: self.lines,
        };
        self.files
            .put_json(&file_key("batch-file", &self.owner, &self.id), &meta)
            .await?;
        Ok(meta)
    }

    /// Removes what was stored (best effort; the TTL removes the rest).
    pub async fn abandon(self) {
        for n in 0..self.chunks {
            let _ = self
                .files
                .store
                .delete(&chunk_key(&self.owner, &self.id, n))
                .await;
        }
    }
}

/// Splits chunks into lines; a line may span chunks.
#[derive(Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    /// Calls `f` on every complete line (without `\n`) in `data`.
    pub fn push<E>(
        &mut self,
        data: &[u8],
        mut f: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut rest = data;
        while let Some(pos) = rest.iter().position(|&b| b == b'\n') {
            if self.pending.is_empty() {
                f(&rest[..pos])?;
            } else {
                self.pending.extend_from_slice(&rest[..pos]);
                let line = std::mem::take(&mut self.pending);
                f(&line)?;
            }
            rest = &rest[pos + 1..];
        }
        self.pending.extend_from_slice(rest);
        Ok(())
    }

    /// The last line, if the data did not end with a newline.
    pub fn finish(self) -> Option<Vec<u8>> {
        (!self.pending.is_empty()).then_some(self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_spanning_chunks_are_joined() {
        let mut s = LineSplitter::default();
        let mut got = Vec::new();
        for part in [&b"ab"[..], b"c\nd", b"", b"e\n\nf"] {
            s.push::<()>(part, |l| {
                got.push(String::from_utf8(l.to_vec()).unwrap());
                Ok(())
            })
            .unwrap();
        }
        assert_eq!(got, ["abc", "de", ""]);
        assert_eq!(s.finish(), Some(b"f".to_vec()));
    }
}
