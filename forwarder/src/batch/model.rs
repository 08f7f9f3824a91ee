//! The Batch API's objects, in OpenAI's shapes, as stored and as shown.

use serde::{Deserialize, Serialize};

/// A stored file (`object: "file"`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileMeta {
    pub id: String,
    pub bytes: u64,
    pub created_at: u64,
    pub filename: String,
    /// `batch` (uploaded) or `batch_output` (written by a batch).
    pub purpose: String,
    /// Chunks the content is stored in.
    pub chunks: u32,
    /// Requests in the file (JSONL lines).
    pub lines: u64,
}

impl FileMeta {
    pub fn view(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": null,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchStatus {
    Validating,
    InProgress,
    Finalizing,
    Completed,
    Failed,
    Expired,
    Cancelling,
    Cancelled,
}

impl BatchStatus {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Failed | Self::Expired | Self::Cancelled
        )
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
    /// Of `failed`: never run because the batch was cancelled, or expired
    /// (Anthropic's API counts them apart; shown only when not zero).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cancelled: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub expired: u64,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if takes a reference
fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A batch (`object: "batch"`), stored and shown as is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Batch {
    pub id: String,
    pub object: String,
    pub endpoint: String,
    pub errors: Option<serde_json::Value>,
    pub input_file_id: String,
    pub completion_window: String,
    pub status: BatchStatus,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub created_at: u64,
    pub in_progress_at: Option<u64>,
    pub expires_at: u64,
    pub finalizing_at: Option<u64>,
    pub completed_at: Option<u64>,
    pub failed_at: Option<u64>,
    pub expired_at: Option<u64>,
    pub cancelling_at: Option<u64>,
    pub cancelled_at: Option<u64>,
    pub request_counts: Counts,
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

/// How one request of a batch ended, for its output or error file line.
pub enum Outcome<'a> {
    /// The upstream's (or the forwarder's) answer.
    Answered {
        status_code: u16,
        request_id: &'a str,
        body: &'a [u8],
    },
    /// Never answered: cancelled or expired.
    NotRun { code: &'a str, message: &'a str },
}

/// One line of an output or error file, in OpenAI's shape; and whether it
/// belongs in the output file (a 2xx answer) rather than the error file.
pub fn result_line(id: &str, custom_id: &str, outcome: &Outcome<'_>) -> (bool, Vec<u8>) {
    let (ok, v) = match outcome {
        Outcome::Answered {
            status_code,
            request_id,
            body,
        } => {
            let body: serde_json::Value = serde_json::from_slice(body).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(body).into_owned())
            });
            (
                (200..300).contains(status_code),
                serde_json::json!({
                    "id": id,
                    "custom_id": custom_id,
                    "response": {"status_code": status_code, "request_id": request_id, "body": body},
                    "error": null,
                }),
            )
        }
        Outcome::NotRun { code, message } => (
            false,
            serde_json::json!({
                "id": id,
                "custom_id": custom_id,
                "response": null,
                "error": {"code": code, "message": message},
            }),
        ),
    };
    let mut line = serde_json::to_vec(&v).unwrap_or_default();
    line.push(b'\n');
    (ok, line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_and_non_answers_have_openais_line_shapes() {
        let (ok, line) = result_line(
            "batch_req_1",
            "c1",
            &Outcome::Answered {
                status_code: 200,
                request_id: "job_1",
                body: br#"{"x":1}"#,
            },
        );
        assert!(ok);
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["custom_id"], "c1");
        assert_eq!(v["response"]["status_code"], 200);
        assert_eq!(v["response"]["body"]["x"], 1);
        assert!(v["error"].is_null());
        let (ok, line) = result_line(
            "batch_req_2",
            "c2",
            &Outcome::NotRun {
                code: "batch_cancelled",
                message: "m",
            },
        );
        assert!(!ok);
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert!(v["response"].is_null());
        assert_eq!(v["error"]["code"], "batch_cancelled");
        let (ok, _) = result_line(
            "r",
            "c3",
            &Outcome::Answered {
                status_code: 404,
                request_id: "j",
                body: b"{}",
            },
        );
        assert!(!ok, "a non-2xx answer goes to the error file");
    }
}
