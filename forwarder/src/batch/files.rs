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

    /// Deletes a file: its metadata first (it is then gone to readers),
    /// then its chunks.
    pub async fn remove(&self, owner: &Identity, id: &str) -> Result<(), StoreError> {
        let Some(meta) = self.meta(owner, id).await? else {
            return Ok(());
        };
        self.store
            .delete(&file_key("batch-file", owner, id))
            .await?;
        for n in 0..meta.chunks {
            self.store.delete(&chunk_key(owner, id, n)).await?;
        }
        Ok(())
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

/// A line of a file, or the fact that one was longer than the bound.
#[derive(Debug, PartialEq, Eq)]
pub enum Line<'a> {
    Whole(&'a [u8]),
    /// Longer than the splitter's bound: only its length was kept.
    TooLong,
}

/// Splits chunks into lines; a line may span chunks. A partial line is
/// buffered up to `max_line` bytes and no further, however long it grows.
pub struct LineSplitter {
    pending: Vec<u8>,
    max_line: usize,
    /// The current line passed `max_line`: its bytes are dropped.
    overflow: bool,
}

impl LineSplitter {
    pub fn new(max_line: usize) -> Self {
        Self {
            pending: Vec::new(),
            max_line,
            overflow: false,
        }
    }

    /// Calls `f` on every complete line (without `\n`) in `data`.
    pub fn push<E>(
        &mut self,
        data: &[u8],
        mut f: impl FnMut(Line<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut rest = data;
        while let Some(pos) = rest.iter().position(|&b| b == b'\n') {
            let part = &rest[..pos];
            rest = &rest[pos + 1..];
            if self.overflow || self.pending.len() + part.len() > self.max_line {
                self.overflow = false;
                self.pending.clear();
                f(Line::TooLong)?;
            } else if self.pending.is_empty() {
                f(Line::Whole(part))?;
            } else {
                self.pending.extend_from_slice(part);
                let line = std::mem::take(&mut self.pending);
                f(Line::Whole(&line))?;
            }
        }
        if self.overflow || self.pending.len() + rest.len() > self.max_line {
            self.overflow = true;
            self.pending.clear();
        } else {
            self.pending.extend_from_slice(rest);
        }
        Ok(())
    }

    /// The last line, if the data did not end with a newline: its bytes,
    /// or `Err` if it was too long.
    pub fn finish(self) -> Option<Result<Vec<u8>, ()>> {
        if self.overflow {
            return Some(Err(()));
        }
        (!self.pending.is_empty()).then_some(Ok(self.pending))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(max: usize, parts: &[&[u8]]) -> (Vec<String>, Option<Result<Vec<u8>, ()>>) {
        let mut s = LineSplitter::new(max);
        let mut got = Vec::new();
        for part in parts {
            s.push::<()>(part, |l| {
                got.push(match l {
                    Line::Whole(l) => String::from_utf8(l.to_vec()).unwrap(),
                    Line::TooLong => "<too long>".into(),
                });
                Ok(())
            })
            .unwrap();
        }
        (got, s.finish())
    }

    #[test]
    fn lines_spanning_chunks_are_joined() {
        let (got, last) = split(100, &[b"ab", b"c\nd", b"", b"e\n\nf"]);
        assert_eq!(got, ["abc", "de", ""]);
        assert_eq!(last, Some(Ok(b"f".to_vec())));
    }

    /// A line with no newline in sight is not buffered past the bound (it
    /// once grew up to the whole file's limit).
    #[test]
    fn a_line_past_the_bound_is_reported_not_buffered() {
        let mut s = LineSplitter::new(4);
        let mut seen = Vec::new();
        for _ in 0..1000 {
            s.push::<()>(&[b'x'; 100], |l| {
                seen.push(l == Line::TooLong);
                Ok(())
            })
            .unwrap();
            assert!(s.pending.len() <= 4);
        }
        assert!(seen.is_empty());
        s.push::<()>(b"\nok\n12345\nlast", |l| {
            seen.push(l == Line::TooLong);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, [true, false, true]);
        assert_eq!(s.finish(), Some(Ok(b"last".to_vec())));
        let (got, last) = split(4, &[b"1234", b"\n12", b"345"]);
        assert_eq!(got, ["1234"]);
        assert_eq!(
            last,
            Some(Err(())),
            "an unterminated last line past the bound"
        );
    }
}
