//! Checks of a batch input file, one JSONL line at a time (pure, so the
//! upload can check lines as they stream in).

use std::collections::HashSet;

use bytes::Bytes;
use serde::Deserialize;

/// The endpoints batches run (a batch's lines all name its endpoint).
pub const ENDPOINTS: &[&str] = &[
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
];

/// One request of a batch input file.
#[derive(Debug, Deserialize)]
pub struct Line {
    pub custom_id: String,
    pub method: String,
    pub url: String,
    pub body: serde_json::Value,
}

/// A line that passed: what the batch runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub custom_id: String,
    pub model: String,
    pub body: Bytes,
    /// One of [`ENDPOINTS`].
    pub url: String,
}

/// Parses one line (without its newline) into a request, or says why not.
pub fn parse(line: &[u8]) -> Result<Request, String> {
    let l: Line = serde_json::from_slice(line).map_err(|e| {
        format!(
            "not a request object ({e}); expected {{\"custom_id\", \"method\", \"url\", \"body\"}}"
        )
    })?;
    if l.custom_id.is_empty() {
        return Err("custom_id is empty".into());
    }
    if l.method != "POST" {
        return Err(format!("method must be \"POST\", not {:?}", l.method));
    }
    if !ENDPOINTS.contains(&l.url.as_str()) {
        return Err(format!(
            "url must be one of {}, not {:?}",
            ENDPOINTS.join(", "),
            l.url
        ));
    }
    let model = match l.body.get("model") {
        Some(serde_json::Value::String(m)) if !m.is_empty() => m.clone(),
        _ => return Err("body.model must be a non-empty string".into()),
    };
    if l.body.get("stream").and_then(serde_json::Value::as_bool) == Some(true) {
        return Err("body.stream is not allowed in a batch".into());
    }
    let body = serde_json::to_vec(&l.body).map_err(|e| e.to_string())?;
    Ok(Request {
        custom_id: l.custom_id,
        model,
        body: body.into(),
        url: l.url,
    })
}

/// Checks a file's lines in order: each valid, `custom_id`s unique, within
/// the line limit.
pub struct Checker {
    seen: HashSet<String>,
    max_lines: usize,
}

impl Checker {
    pub fn new(max_lines: usize) -> Self {
        Self {
            seen: HashSet::new(),
            max_lines,
        }
    }

    pub fn lines(&self) -> usize {
        self.seen.len()
    }

    /// Checks line number `n` (1-based); blank lines are skipped.
    pub fn check(&mut self, n: usize, line: &[u8]) -> Result<(), String> {
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        let r = parse(line).map_err(|e| format!("line {n}: {e}"))?;
        if self.seen.len() >= self.max_lines {
            return Err(format!(
                "the file has more than {} requests",
                self.max_lines
            ));
        }
        if !self.seen.insert(r.custom_id.clone()) {
            return Err(format!(
                "line {n}: custom_id {:?} is used more than once",
                r.custom_id
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m","messages":[]}}"#;

    #[test]
    fn a_good_line_gives_its_request() {
        let r = parse(OK.as_bytes()).unwrap();
        assert_eq!(r.custom_id, "a");
        assert_eq!(r.model, "m");
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["messages"], serde_json::json!([]));
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        let cases = [
            ("{", "not a request object"),
            (&OK.replace("POST", "GET"), "method must be \"POST\""),
            (
                &OK.replace("/v1/chat/completions", "/v1/audio/speech"),
                "url must be one of /v1/chat/completions, /v1/embeddings, /v1/responses, /v1/messages",
            ),
            (&OK.replace(r#""model":"m","#, ""), "body.model"),
            (
                &OK.replace(r#""custom_id":"a""#, r#""custom_id":"""#),
                "custom_id is empty",
            ),
        ];
        for (line, want) in cases {
            let e = parse(line.as_bytes()).unwrap_err();
            assert!(e.contains(want), "{line}: {e}");
        }
    }

    #[test]
    fn the_checker_refuses_repeats_and_too_many_lines() {
        let mut c = Checker::new(2);
        c.check(1, OK.as_bytes()).unwrap();
        c.check(2, b"  ").unwrap();
        let e = c.check(3, OK.as_bytes()).unwrap_err();
        assert!(e.contains("line 3") && e.contains("more than once"), "{e}");
        c.check(4, OK.replace("\"a\"", "\"b\"").as_bytes()).unwrap();
        let e = c
            .check(5, OK.replace("\"a\"", "\"c\"").as_bytes())
            .unwrap_err();
        assert!(e.contains("more than 2"), "{e}");
        assert_eq!(c.lines(), 2);
    }
}
