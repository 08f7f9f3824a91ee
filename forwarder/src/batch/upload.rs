//! An input file's upload: bytes stored as they arrive, each line checked
//! as it completes, the first bad line refusing the whole file.

use super::files::{Line, LineSplitter, Writer};
use super::jsonl;
use super::model::FileMeta;
use super::BatchError;
use crate::jobs::now_ms;

/// An upload in progress: bytes stored as they come, lines checked.
pub struct Upload {
    writer: Writer,
    split: LineSplitter,
    checker: jsonl::Checker,
    line_no: usize,
    max_bytes: usize,
    max_line: usize,
}

impl Upload {
    /// Into `writer`; lines of at most `max_line` bytes, at most
    /// `max_lines` of them, `max_bytes` in all.
    pub(super) fn new(writer: Writer, max_line: usize, max_lines: usize, max_bytes: usize) -> Self {
        Self {
            writer,
            split: LineSplitter::new(max_line),
            checker: jsonl::Checker::new(max_lines),
            line_no: 0,
            max_bytes,
            max_line,
        }
    }

    pub async fn push(&mut self, data: &[u8]) -> Result<(), BatchError> {
        if self.writer.bytes as usize + data.len() > self.max_bytes {
            return Err(BatchError::BadRequest(format!(
                "the file exceeds the limit of {} bytes",
                self.max_bytes
            )));
        }
        let (checker, n, max) = (&mut self.checker, &mut self.line_no, self.max_line);
        self.split
            .push(data, |line| {
                *n += 1;
                match line {
                    Line::Whole(line) => checker.check(*n, line),
                    Line::TooLong => Err(too_long(*n, max)),
                }
            })
            .map_err(BatchError::BadRequest)?;
        self.writer.write(data).await?;
        Ok(())
    }

    pub async fn finish(mut self, filename: String) -> Result<FileMeta, BatchError> {
        let split = std::mem::replace(&mut self.split, LineSplitter::new(0));
        if let Some(last) = split.finish() {
            self.line_no += 1;
            match last {
                Ok(last) => self.checker.check(self.line_no, &last),
                Err(()) => Err(too_long(self.line_no, self.max_line)),
            }
            .map_err(BatchError::BadRequest)?;
        }
        if self.checker.lines() == 0 {
            return Err(BatchError::BadRequest("the file has no requests".into()));
        }
        self.writer.lines = self.checker.lines() as u64;
        Ok(self
            .writer
            .finish(filename, "batch", now_ms() / 1000)
            .await?)
    }

    pub async fn abandon(self) {
        self.writer.abandon().await;
    }
}

pub(super) fn too_long(n: usize, max: usize) -> String {
    format!("line {n} is longer than the limit of {max} bytes (async.batch.max_line_bytes)")
}

pub(super) fn new_file_id() -> String {
    format!("file-{}", uuid::Uuid::new_v4().simple())
}
