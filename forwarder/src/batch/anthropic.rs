//! Anthropic's Message Batches API (`/v1/messages/batches`) as a view of
//! the Batch API's batches whose endpoint is `/v1/messages`: the requests
//! become an input file's lines, the batch runs as any other, and its
//! object and results are shown in Anthropic's shapes. Pure: no I/O here.

use serde::Deserialize;
use serde_json::{json, Value};

use super::model::{Batch, BatchStatus};

/// The endpoint a message batch's lines run.
pub const ENDPOINT: &str = "/v1/messages";

const OPENAI_PREFIX: &str = "batch_";
const PREFIX: &str = "msgbatch_";

/// The id Anthropic's API shows for a batch.
pub fn public_id(batch_id: &str) -> String {
    format!(
        "{PREFIX}{}",
        batch_id.strip_prefix(OPENAI_PREFIX).unwrap_or(batch_id)
    )
}

/// The batch behind an id of Anthropic's API; `None` for an id this API
/// never gave out.
pub fn batch_id(public: &str) -> Option<String> {
    let rest = public.strip_prefix(PREFIX)?;
    (!rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric()))
        .then(|| format!("{OPENAI_PREFIX}{rest}"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Create {
    requests: Vec<Request>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    custom_id: String,
    params: Value,
}

/// A create request's `requests` as the lines of a batch input file, or
/// why not. The lines are then checked as an upload's are (a `model`,
/// unique `custom_id`s, no `stream`).
pub fn input_lines(body: &[u8]) -> Result<Vec<u8>, String> {
    let create: Create =
        serde_json::from_slice(body).map_err(|e| format!("invalid message batch request: {e}"))?;
    if create.requests.is_empty() {
        return Err("requests: at least one request is required".into());
    }
    let mut out = Vec::new();
    for (i, r) in create.requests.into_iter().enumerate() {
        let ok = (1..=64).contains(&r.custom_id.len())
            && r.custom_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !ok {
            return Err(format!(
                "requests[{i}].custom_id: 1 to 64 letters, digits, '_' or '-'"
            ));
        }
        if !r.params.is_object() {
            return Err(format!("requests[{i}].params: must be an object"));
        }
        let line =
            json!({"custom_id": r.custom_id, "method": "POST", "url": ENDPOINT, "body": r.params});
        serde_json::to_writer(&mut out, &line).map_err(|e| e.to_string())?;
        out.push(b'\n');
    }
    Ok(out)
}

fn rfc3339(unix_secs: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix_secs);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The batch as a `message_batch` object; `None` for a batch of another
/// endpoint (not one of this API's).
pub fn view(b: &Batch) -> Option<Value> {
    if b.endpoint != ENDPOINT {
        return None;
    }
    let ended = b.status.is_final();
    let processing_status = match b.status {
        BatchStatus::Cancelling => "canceling",
        _ if ended => "ended",
        _ => "in_progress",
    };
    let c = &b.request_counts;
    let never_ran = c.cancelled + c.expired;
    let ended_at = b
        .completed_at
        .or(b.failed_at)
        .or(b.expired_at)
        .or(b.cancelled_at)
        .filter(|_| ended);
    let id = public_id(&b.id);
    Some(json!({
        "id": id,
        "type": "message_batch",
        "processing_status": processing_status,
        "request_counts": {
            "processing": c.total.saturating_sub(c.completed + c.failed),
            "succeeded": c.completed,
            "errored": c.failed.saturating_sub(never_ran),
            "canceled": c.cancelled,
            "expired": c.expired,
        },
        "ended_at": ended_at.map(rfc3339),
        "created_at": rfc3339(b.created_at),
        "expires_at": rfc3339(b.expires_at),
        "archived_at": null,
        "cancel_initiated_at": b.cancelling_at.map(rfc3339),
        // Relative: the client reaches it through the address it used.
        "results_url": ended.then(|| format!("/v1/messages/batches/{id}/results")),
    }))
}

/// One line of a batch's output or error file as a line of Anthropic's
/// results (`{"custom_id", "result": {"type": "succeeded" | "errored" |
/// "canceled" | "expired", ...}}`), newline included.
pub fn result_line(openai: &[u8]) -> Option<Vec<u8>> {
    let v: Value = serde_json::from_slice(openai).ok()?;
    let custom_id = v.get("custom_id")?.clone();
    let result = match (&v["response"], &v["error"]) {
        (Value::Object(r), _) => {
            let status = r.get("status_code").and_then(Value::as_u64).unwrap_or(0);
            let body = r.get("body").cloned().unwrap_or(Value::Null);
            if (200..300).contains(&status) {
                json!({"type": "succeeded", "message": body})
            } else {
                json!({"type": "errored", "error": anthropic_error(status, body)})
            }
        }
        (_, e) => match e["code"].as_str() {
            Some("batch_cancelled") => json!({"type": "canceled"}),
            Some("batch_expired") => json!({"type": "expired"}),
            _ => json!({"type": "errored", "error": {"type": "error", "error": {
                "type": "api_error",
                "message": e["message"].as_str().unwrap_or("the request did not run"),
            }}}),
        },
    };
    let mut line = serde_json::to_vec(&json!({"custom_id": custom_id, "result": result})).ok()?;
    line.push(b'\n');
    Some(line)
}

/// An error body in Anthropic's shape: as it came when it is one, else
/// the status's type with the body's message.
fn anthropic_error(status: u64, body: Value) -> Value {
    if body["type"] == "error" && body["error"].is_object() {
        return body;
    }
    let status = u16::try_from(status).unwrap_or(500);
    json!({"type": "error", "error": {
        "type": crate::mock_llm::anthropic_error_type(status),
        "message": body["error"]["message"].as_str().unwrap_or("the request failed"),
    }})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::model::Counts;

    fn batch(status: BatchStatus, counts: Counts) -> Batch {
        Batch {
            id: "batch_abc123".into(),
            object: "batch".into(),
            endpoint: ENDPOINT.into(),
            errors: None,
            input_file_id: "file-1".into(),
            completion_window: "24h".into(),
            status,
            output_file_id: None,
            error_file_id: None,
            created_at: 1_765_000_000,
            in_progress_at: None,
            expires_at: 1_765_086_400,
            finalizing_at: None,
            completed_at: None,
            failed_at: None,
            expired_at: None,
            cancelling_at: None,
            cancelled_at: Some(1_765_000_100),
            request_counts: counts,
            metadata: None,
        }
    }

    #[test]
    fn ids_map_both_ways_and_foreign_ones_are_refused() {
        assert_eq!(public_id("batch_abc123"), "msgbatch_abc123");
        assert_eq!(batch_id("msgbatch_abc123").as_deref(), Some("batch_abc123"));
        for foreign in ["batch_abc", "msgbatch_", "msgbatch_../x", "x"] {
            assert_eq!(batch_id(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn requests_become_input_lines_and_bad_ones_are_named() {
        let lines = input_lines(
            br#"{"requests": [{"custom_id": "a-1", "params": {"model": "claude", "max_tokens": 5, "messages": []}}]}"#,
        )
        .unwrap();
        let line: Value = serde_json::from_slice(lines.strip_suffix(b"\n").unwrap()).unwrap();
        assert_eq!(line["url"], ENDPOINT);
        assert_eq!(line["method"], "POST");
        assert_eq!(line["custom_id"], "a-1");
        assert_eq!(line["body"]["model"], "claude");
        for (body, says) in [
            (r#"{"requests": []}"#, "at least one"),
            (
                r#"{"requests": [{"custom_id": "a b", "params": {}}]}"#,
                "custom_id",
            ),
            (
                r#"{"requests": [{"custom_id": "a", "params": 1}]}"#,
                "params",
            ),
            (
                r#"{"requests": [{"custom_id": "a", "params": {}}], "x": 1}"#,
                "unknown field",
            ),
            ("nope", "invalid"),
        ] {
            let e = input_lines(body.as_bytes()).unwrap_err();
            assert!(e.contains(says), "{body}: {e}");
        }
    }

    #[test]
    fn a_batch_shows_anthropic_counts_and_status() {
        let counts = Counts {
            total: 10,
            completed: 4,
            failed: 3,
            cancelled: 2,
            expired: 0,
        };
        let v = view(&batch(BatchStatus::InProgress, counts)).unwrap();
        assert_eq!(v["id"], "msgbatch_abc123");
        assert_eq!(v["type"], "message_batch");
        assert_eq!(v["processing_status"], "in_progress");
        assert_eq!(
            v["request_counts"],
            json!({"processing": 3, "succeeded": 4, "errored": 1, "canceled": 2, "expired": 0})
        );
        assert_eq!(v["results_url"], Value::Null);
        assert_eq!(v["ended_at"], Value::Null);
        assert_eq!(v["created_at"], "2025-12-06T05:46:40Z");
        let counts = Counts {
            failed: 6,
            cancelled: 5,
            ..counts
        };
        let v = view(&batch(BatchStatus::Cancelled, counts)).unwrap();
        assert_eq!(v["processing_status"], "ended");
        assert_eq!(v["request_counts"]["processing"], 0);
        assert_eq!(v["request_counts"]["canceled"], 5);
        assert_eq!(v["ended_at"], "2025-12-06T05:48:20Z");
        assert_eq!(
            v["results_url"],
            "/v1/messages/batches/msgbatch_abc123/results"
        );
        let mut chat = batch(BatchStatus::Completed, counts);
        chat.endpoint = "/v1/chat/completions".into();
        assert_eq!(view(&chat), None, "not a message batch");
    }

    #[test]
    fn result_lines_take_anthropics_shape() {
        let line = |s: &str| -> Value {
            let out = result_line(s.as_bytes()).unwrap();
            serde_json::from_slice(&out).unwrap()
        };
        let ok = line(
            r#"{"id":"r","custom_id":"a","response":{"status_code":200,"request_id":"x","body":{"type":"message","id":"msg_1"}},"error":null}"#,
        );
        assert_eq!(
            ok,
            json!({"custom_id": "a", "result": {"type": "succeeded", "message": {"type": "message", "id": "msg_1"}}})
        );
        let refused = line(
            r#"{"id":"r","custom_id":"b","response":{"status_code":429,"request_id":"x","body":{"error":{"message":"budget spent","type":"insufficient_quota"}}},"error":null}"#,
        );
        assert_eq!(refused["result"]["type"], "errored");
        assert_eq!(
            refused["result"]["error"]["error"]["type"],
            "rate_limit_error"
        );
        assert_eq!(
            refused["result"]["error"]["error"]["message"],
            "budget spent"
        );
        let cancelled = line(
            r#"{"id":"r","custom_id":"c","response":null,"error":{"code":"batch_cancelled","message":"m"}}"#,
        );
        assert_eq!(cancelled["result"], json!({"type": "canceled"}));
        let expired = line(
            r#"{"id":"r","custom_id":"d","response":null,"error":{"code":"batch_expired","message":"m"}}"#,
        );
        assert_eq!(expired["result"], json!({"type": "expired"}));
        let lost = line(
            r#"{"id":"r","custom_id":"e","response":null,"error":{"code":"job_lost","message":"lost"}}"#,
        );
        assert_eq!(lost["result"]["type"], "errored");
        assert_eq!(lost["result"]["error"]["error"]["message"], "lost");
        assert_eq!(result_line(b"not json"), None);
    }
}
