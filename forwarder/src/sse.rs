//! Server-Sent Events as bytes: a splitter that cuts an upstream body into
//! whole events without decoding them, and a scanner that reads the few
//! things the forwarder must know (`[DONE]`, `finish_reason`, `usage`) from
//! an event's bytes. Events are relayed to clients verbatim.

use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use memchr::memmem::Finder;

/// The terminal event OpenAI-compatible servers send.
pub const DONE_EVENT: &[u8] = b"data: [DONE]\n\n";

/// Cuts a byte stream into whole events (each ending with its blank line).
/// One event may be at most `max_event` bytes: an upstream that sends a
/// longer one is broken or hostile, and is reported rather than buffered.
pub struct Splitter {
    buf: BytesMut,
    max_event: usize,
    /// Where to resume looking for a blank line.
    scanned: usize,
}

#[derive(Debug, PartialEq, Eq)]
pub struct EventTooLarge(pub usize);

impl Splitter {
    pub fn new(max_event: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            max_event,
            scanned: 0,
        }
    }

    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next whole event, if one is buffered.
    pub fn next_event(&mut self) -> Result<Option<Bytes>, EventTooLarge> {
        // Resume a few bytes back so a terminator split across chunks is found.
        let from = self.scanned.saturating_sub(3);
        match event_end(&self.buf[from..]) {
            Some(end) => {
                self.scanned = 0;
                Ok(Some(self.buf.split_to(from + end).freeze()))
            }
            None if self.buf.len() > self.max_event => Err(EventTooLarge(self.max_event)),
            None => {
                self.scanned = self.buf.len();
                Ok(None)
            }
        }
    }

    /// What is left after the body ended: a partial event, if any.
    pub fn take_partial(&mut self) -> Bytes {
        self.scanned = 0;
        self.buf.split().freeze()
    }
}

/// Cuts a byte stream into runs of whole events: everything up to the last
/// blank line buffered, as one chunk, so a relay writes what the upstream
/// socket yielded in one piece instead of one piece per event. The
/// partial event after the last blank line is kept for the next read and
/// may be at most `max_event` bytes.
pub struct Chunker {
    buf: BytesMut,
    max_event: usize,
    /// Where to resume looking for a blank line.
    scanned: usize,
}

impl Chunker {
    pub fn new(max_event: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            max_event,
            scanned: 0,
        }
    }

    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Every whole event buffered, as one chunk, if there is one.
    pub fn take_events(&mut self) -> Result<Option<Bytes>, EventTooLarge> {
        // A buffer that ends with a blank line (the usual case: a read ends
        // where an event does) needs no scan.
        let end = if self.buf.ends_with(b"\n\n") {
            Some(self.buf.len())
        } else {
            last_event_end(&self.buf, self.scanned.saturating_sub(3))
        };
        match end {
            Some(end) => {
                let chunk = self.buf.split_to(end).freeze();
                self.scanned = self.buf.len();
                if self.buf.len() > self.max_event {
                    return Err(EventTooLarge(self.max_event));
                }
                Ok(Some(chunk))
            }
            None if self.buf.len() > self.max_event => Err(EventTooLarge(self.max_event)),
            None => {
                self.scanned = self.buf.len();
                Ok(None)
            }
        }
    }

    /// What is left after the body ended: a partial event, if any.
    pub fn take_partial(&mut self) -> Bytes {
        self.scanned = 0;
        self.buf.split().freeze()
    }
}

/// The end (exclusive) of the last event in `buf` that ends at or after
/// `from`.
fn last_event_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut last = None;
    let mut i = from;
    while let Some(end) = event_end(&buf[i..]) {
        i += end;
        last = Some(i);
    }
    last
}

/// The whole events of a chunk of events, as slices (and a trailing
/// partial event, if any, as the last item).
pub fn events(chunk: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = chunk;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = event_end(rest).unwrap_or(rest.len());
        let event = &rest[..end];
        rest = &rest[end..];
        Some(event)
    })
}

/// The end (exclusive) of the first event in `buf`: the position after the
/// first blank line (`\n\n`, `\r\n\r\n` or `\r\r`).
fn event_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(off) = memchr::memchr2(b'\n', b'\r', &buf[i..]) {
        let at = i + off;
        let rest = &buf[at..];
        if rest.starts_with(b"\n\n") || rest.starts_with(b"\r\r") {
            return Some(at + 2);
        }
        if rest.starts_with(b"\r\n\r\n") {
            return Some(at + 4);
        }
        if rest.starts_with(b"\r\n\n") || rest.starts_with(b"\n\r\n") {
            return Some(at + 3);
        }
        i = at + 1;
    }
    None
}

/// What the forwarder reads from one event.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EventInfo {
    /// The event carries no data (only comments or other fields): a keep-alive.
    pub comment_only: bool,
    /// `data: [DONE]`.
    pub done: bool,
    /// Some choice carries a non-null `finish_reason`.
    pub finished: bool,
    /// A non-null `usage` object.
    pub has_usage: bool,
}

/// Scans an event's bytes without decoding its JSON. Substring checks are
/// enough here: a `"finish_reason":` key can only appear inside a string
/// value as `\"finish_reason\":`, which these patterns do not match.
/// This runs once per streamed token: lines are found with memchr and the
/// key finders are built once.
pub fn scan(event: &[u8]) -> EventInfo {
    static FINISH: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"finish_reason\":"));
    static USAGE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"usage\":"));
    let mut info = EventInfo {
        comment_only: true,
        ..Default::default()
    };
    for line in lines(event) {
        let Some(data) = line.strip_prefix(b"data:") else {
            continue;
        };
        info.comment_only = false;
        let data = data.strip_prefix(b" ").unwrap_or(data);
        if data.trim_ascii() == b"[DONE]" {
            info.done = true;
            continue;
        }
        info.finished |= has_non_null(data, &FINISH);
        info.has_usage |= has_non_null(data, &USAGE);
    }
    info
}

/// [`scan`] for a run of whole events, over the raw buffer: a handful of
/// substring searches per chunk instead of a walk over every line, so its
/// cost per event is a few instructions. Each hit is checked to sit on a
/// `data:` line, so comments and other fields never count. `has_usage` is
/// not read.
pub fn scan_chunk(buf: &[u8]) -> EventInfo {
    let comment_only = !has_data(buf);
    let (done, finished) = if comment_only {
        (false, false)
    } else {
        chunk_ends(buf)
    };
    EventInfo {
        comment_only,
        done,
        finished,
        has_usage: false,
    }
}

/// Whether a run of events has a `data:` line (else it is keep-alives).
pub fn has_data(buf: &[u8]) -> bool {
    static DATA: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"data:"));
    buf.starts_with(b"data:") || DATA.find_iter(buf).any(|at| line_start(buf, at) == at)
}

/// What the relay of a chat-completions stream reads from each run of
/// events: whether it holds `data: [DONE]`, and whether a choice finished
/// in it (see [`scan_chunk`]).
pub fn chunk_ends(buf: &[u8]) -> (bool, bool) {
    static DONE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"[DONE]"));
    static FINISH: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"finish_reason\":"));
    let done = DONE.find_iter(buf).any(|at| {
        let start = line_start(buf, at);
        let end = memchr::memchr(b'\n', &buf[at..]).map_or(buf.len(), |e| at + e);
        let line = &buf[start..end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        line.strip_prefix(b"data:")
            .is_some_and(|d| d.strip_prefix(b" ").unwrap_or(d).trim_ascii() == b"[DONE]")
    });
    let finished = FINISH.find_iter(buf).any(|at| {
        let value = &buf[at + FINISH.needle().len()..];
        let skip = value
            .iter()
            .position(|b| *b != b' ' && *b != b'\t')
            .unwrap_or(value.len());
        let value = &value[skip..];
        let non_null = !value.is_empty()
            && !value.starts_with(b"null")
            && !value.starts_with(b"\n")
            && !value.starts_with(b"\r");
        non_null && buf[line_start(buf, at)..].starts_with(b"data:")
    });
    (done, finished)
}

/// Where the line holding position `at` begins.
fn line_start(buf: &[u8], at: usize) -> usize {
    memchr::memrchr(b'\n', &buf[..at]).map_or(0, |n| n + 1)
}

/// An event's lines, without their `\r\n` or `\n`.
fn lines(event: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = event;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = memchr::memchr(b'\n', rest).unwrap_or(rest.len());
        let line = &rest[..end];
        rest = rest.get(end + 1..).unwrap_or_default();
        Some(line.strip_suffix(b"\r").unwrap_or(line))
    })
}

/// Whether `key` occurs in `data` followed by a value other than `null`.
fn has_non_null(data: &[u8], key: &Finder<'_>) -> bool {
    key.find_iter(data).any(|at| {
        let value = data[at + key.needle().len()..].trim_ascii_start();
        !value.is_empty() && !value.starts_with(b"null")
    })
}

/// The `data` of an event, with multi-line data joined by `\n` (per the
/// SSE spec); `None` for an event without data.
pub fn data(event: &[u8]) -> Option<std::borrow::Cow<'_, [u8]>> {
    let mut lines = lines(event)
        .filter_map(|l| l.strip_prefix(b"data:"))
        .map(|d| d.strip_prefix(b" ").unwrap_or(d));
    let first = lines.next()?;
    match lines.next() {
        None => Some(std::borrow::Cow::Borrowed(first)),
        Some(second) => {
            let mut joined = first.to_vec();
            for l in std::iter::once(second).chain(lines) {
                joined.push(b'\n');
                joined.extend_from_slice(l);
            }
            Some(std::borrow::Cow::Owned(joined))
        }
    }
}

/// An event's type: its `event:` field, or else the top-level `"type"` of
/// its data (found as the first `"type":` key, which in a JSON string
/// could only appear escaped). Anthropic Messages and OpenAI Responses
/// streams name every event.
pub fn event_type(event: &[u8]) -> Option<&[u8]> {
    static TYPE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"type\":"));
    let mut data = None;
    for line in lines(event) {
        if let Some(name) = line.strip_prefix(b"event:") {
            return Some(name.trim_ascii());
        }
        if data.is_none() {
            data = line.strip_prefix(b"data:");
        }
    }
    let data = data?;
    let at = TYPE.find(data)?;
    let value = data[at + TYPE.needle().len()..].trim_ascii_start();
    let value = value.strip_prefix(b"\"")?;
    let end = memchr::memchr(b'"', value)?;
    Some(&value[..end])
}

/// One event named `name` holding `json` (Anthropic's and the Responses
/// API's framing).
pub fn named_event(name: &str, json: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(json.len() + name.len() + 16);
    b.extend_from_slice(b"event: ");
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(b"\ndata: ");
    b.extend_from_slice(json);
    b.extend_from_slice(b"\n\n");
    b.freeze()
}

/// One data event holding `json`.
pub fn data_event(json: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(json.len() + 8);
    b.extend_from_slice(b"data: ");
    b.extend_from_slice(json);
    b.extend_from_slice(b"\n\n");
    b.freeze()
}

/// Splits a recorded stream (events concatenated) back into events.
pub fn split_all(mut recorded: Bytes) -> Vec<Bytes> {
    let mut out = Vec::new();
    while let Some(end) = event_end(&recorded) {
        out.push(recorded.split_to(end));
    }
    if recorded.iter().any(|b| !b.is_ascii_whitespace()) {
        out.push(recorded);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<Bytes> {
        let mut s = Splitter::new(1024);
        let mut out = Vec::new();
        for c in chunks {
            s.push(c);
            while let Some(e) = s.next_event().unwrap() {
                out.push(e);
            }
        }
        out
    }

    #[test]
    fn events_are_cut_at_blank_lines_across_chunk_boundaries() {
        let events = split(&[b"data: {\"a\":1}\n", b"\ndata: x\r\n\r", b"\n: ping\n\n"]);
        assert_eq!(
            events,
            vec![
                Bytes::from_static(b"data: {\"a\":1}\n\n"),
                Bytes::from_static(b"data: x\r\n\r\n"),
                Bytes::from_static(b": ping\n\n"),
            ]
        );
    }

    #[test]
    fn an_oversized_event_is_an_error_not_a_buffer() {
        let mut s = Splitter::new(8);
        s.push(b"data: 0123456789");
        assert_eq!(s.next_event(), Err(EventTooLarge(8)));
    }

    #[test]
    fn scanner_reads_done_finish_and_usage() {
        assert!(scan(b"data: [DONE]\n\n").done);
        assert!(scan(b": keep-alive\n\n").comment_only);
        let chunk = br#"data: {"choices":[{"delta":{"content":"\"finish_reason\": x"},"finish_reason":null}],"usage":null}"#;
        let info = scan(chunk);
        assert!(!info.finished && !info.has_usage && !info.done && !info.comment_only);
        let last = br#"data: {"choices":[{"delta":{},"finish_reason": "stop"}],"usage":{"total_tokens":3}}"#;
        let info = scan(last);
        assert!(info.finished && info.has_usage);
    }

    #[test]
    fn event_types_come_from_the_name_or_the_data() {
        assert_eq!(
            event_type(b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"),
            Some(&b"message_stop"[..])
        );
        assert_eq!(
            event_type(b"data: {\"type\": \"response.completed\",\"x\":1}\n\n"),
            Some(&b"response.completed"[..])
        );
        // Text that mentions a type is escaped, so it is not one.
        assert_eq!(
            event_type(br#"data: {"delta":{"text":"\"type\":\"message_stop\""}}"#),
            None
        );
        assert_eq!(event_type(b": ping\n\n"), None);
        assert_eq!(
            named_event("ping", br#"{"type":"ping"}"#).as_ref(),
            b"event: ping\ndata: {\"type\":\"ping\"}\n\n"
        );
    }

    #[test]
    fn data_joins_multi_line_fields() {
        assert_eq!(data(b"data: a\ndata: b\n\n").unwrap().as_ref(), b"a\nb");
        assert_eq!(data(b"data:x\n\n").unwrap().as_ref(), b"x");
        assert!(data(b": c\n\n").is_none());
    }

    #[test]
    fn a_chunker_yields_every_whole_event_buffered_as_one_chunk() {
        let mut c = Chunker::new(16);
        c.push(b"data: 1\n\ndata: 2\n");
        assert_eq!(c.take_events().unwrap().unwrap().as_ref(), b"data: 1\n\n");
        assert_eq!(c.take_events().unwrap(), None);
        c.push(b"\ndata: 3\r\n\r");
        assert_eq!(c.take_events().unwrap().unwrap().as_ref(), b"data: 2\n\n");
        c.push(b"\n: ping\n\n");
        assert_eq!(
            c.take_events().unwrap().unwrap().as_ref(),
            b"data: 3\r\n\r\n: ping\n\n"
        );
        assert!(c.is_empty());
        c.push(b"data: 0123456789abcdef");
        assert_eq!(c.take_events(), Err(EventTooLarge(16)));
    }

    #[test]
    fn events_of_a_chunk_are_its_whole_events() {
        let all: Vec<&[u8]> = events(b"data: 1\n\n: c\r\n\r\ndata: [DONE]\n\n").collect();
        assert_eq!(
            all,
            vec![&b"data: 1\n\n"[..], b": c\r\n\r\n", b"data: [DONE]\n\n"]
        );
    }

    #[test]
    fn a_chunk_scan_reads_what_the_event_scan_reads() {
        let cases: &[&[u8]] = &[
            b"data: [DONE]\n\n",
            b": keep-alive\n\n",
            b": data: [DONE]\n\n: \"finish_reason\": \"stop\"\n\n",
            br#"data: {"choices":[{"delta":{"content":"\"finish_reason\": x"},"finish_reason":null}],"usage":null}"#,
            b"data: {\"choices\":[{\"finish_reason\":null}]}\n\ndata: {\"choices\":[{\"delta\":{},\"finish_reason\": \"stop\"}]}\n\n",
            b"data: {\"finish_reason\":\n\n",
            b"data: {\"a\":\"[DONE]\"}\n\n",
            b"data:[DONE]\r\n\r\n",
            b"event: x\ndata: {}\n\ndata: [DONE]\n\n",
        ];
        for chunk in cases {
            let mut want = EventInfo {
                comment_only: true,
                ..Default::default()
            };
            for e in events(chunk) {
                let i = scan(e);
                want.comment_only &= i.comment_only;
                want.done |= i.done;
                want.finished |= i.finished;
            }
            let got = scan_chunk(chunk);
            assert_eq!(
                (got.comment_only, got.done, got.finished),
                (want.comment_only, want.done, want.finished),
                "{}",
                String::from_utf8_lossy(chunk)
            );
        }
    }

    #[test]
    fn recorded_streams_split_back_into_events() {
        let rec = Bytes::from_static(b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n");
        assert_eq!(split_all(rec).len(), 3);
    }
}
