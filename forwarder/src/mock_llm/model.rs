use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::stream::{self, Stream, StreamExt};
use parking_lot::RwLock;
use rand::Rng;
use rand_distr::{Distribution, Normal};

use crate::api::{
    unix_now, ChatChunk, ChatMessage, ChatRequest, ChatResponse, Choice, ChunkChoice, Delta, Usage,
};
use forwarder_config::{LatencyDist, MockSettings};

/// A fault injected into one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Error {
        status: u16,
        retry_after: Option<Duration>,
    },
    Hang,
    Reset,
    /// A stream ends after its first two events, without its terminal
    /// event (an upstream cut mid-answer). A completion fails as `Reset`.
    Cut,
    /// A stream sends its first two events, then the API's error event
    /// (`event: error` for Messages and Responses, an error `data:` for
    /// chat), then ends. A completion fails with a 500.
    StreamError,
}

/// The deterministic part of the mock (what it answers) plus the random part
/// (latency, faults), with settings that can change at run time.
pub struct MockModel {
    settings: RwLock<MockSettings>,
    /// One-shot faults that take precedence over the random ones.
    fail_next: RwLock<Vec<Fault>>,
    requests: AtomicU64,
    ids: AtomicU64,
    /// Distinguishes this mock's Responses ids from another's.
    instance: u32,
    /// Calls by `Idempotency-Key` (the standalone server's de-duplication).
    pub calls: super::calls::Calls,
    /// Whole Responses answers by id, for `/v1/responses/{id}` and its
    /// `cancel` and `input_items` (the standalone server's; at most
    /// [`MAX_STORED_RESPONSES`]).
    pub stored_responses: parking_lot::Mutex<std::collections::HashMap<String, StoredResponse>>,
}

/// A Responses answer the mock keeps.
#[derive(Debug, Clone)]
pub struct StoredResponse {
    pub body: bytes::Bytes,
    /// The request's input as items, oldest first.
    pub input_items: Vec<serde_json::Value>,
    /// Created with `"background": true` (only those can be cancelled).
    pub background: bool,
}

/// Responses the standalone mock keeps at most; later ones are not kept.
pub const MAX_STORED_RESPONSES: usize = 10_000;

impl MockModel {
    pub fn new(settings: MockSettings) -> Self {
        Self {
            settings: RwLock::new(settings),
            fail_next: RwLock::new(Vec::new()),
            requests: AtomicU64::new(0),
            ids: AtomicU64::new(0),
            instance: rand::random(),
            calls: super::calls::Calls::default(),
            stored_responses: Default::default(),
        }
    }

    pub fn settings(&self) -> MockSettings {
        self.settings.read().clone()
    }

    pub fn set_settings(&self, s: MockSettings) {
        *self.settings.write() = s;
    }

    /// Makes the next `count` requests fail with `fault`.
    pub fn fail_next(&self, count: usize, fault: Fault) {
        let mut q = self.fail_next.write();
        q.clear();
        q.extend(std::iter::repeat_n(fault, count));
    }

    /// Chat requests seen so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Counts the request and decides its latency and fault.
    pub fn begin(&self) -> (Duration, Option<Fault>) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if let Some(f) = self.fail_next.write().pop() {
            return (Duration::ZERO, Some(f));
        }
        let s = self.settings.read();
        let mut rng = rand::rng();
        let latency = sample_latency(&s.latency, &mut rng);
        let roll: f64 = rng.random();
        let fault = if roll < s.error_rate {
            Some(Fault::Error {
                status: s.error_status,
                retry_after: s.retry_after_secs.map(Duration::from_secs),
            })
        } else if roll < s.error_rate + s.hang_rate {
            Some(Fault::Hang)
        } else if roll < s.error_rate + s.hang_rate + s.reset_rate {
            Some(Fault::Reset)
        } else {
            None
        };
        (latency, fault)
    }

    fn next_id(&self) -> String {
        self.id_with("chatcmpl-mock")
    }

    /// A fresh id with `prefix` (`msg_mock`, `resp_mock`, …).
    /// A Responses id, unique across mock servers too (as a provider's
    /// are): the forwarder routes `GET /v1/responses/{id}` by it.
    pub(super) fn response_id(&self) -> String {
        format!(
            "resp_mock-{:08x}-{}",
            self.instance,
            self.ids.fetch_add(1, Ordering::Relaxed)
        )
    }

    pub(super) fn id_with(&self, prefix: &str) -> String {
        format!("{prefix}-{}", self.ids.fetch_add(1, Ordering::Relaxed))
    }

    /// The pause between streamed tokens, if paced.
    pub(super) fn pace(&self) -> Option<Duration> {
        self.settings
            .read()
            .tokens_per_second
            .map(|tps| Duration::from_secs_f64(1.0 / tps))
    }

    /// The reply's words: "mock reply:", an echo of the last user message,
    /// then filler; generated lazily so a huge reply costs no memory.
    fn reply_words(&self, req: &ChatRequest) -> ReplyWords {
        let prompt = req
            .messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(ChatMessage::content_text)
            .unwrap_or_default();
        let max = req.params.get("max_tokens").and_then(|v| v.as_u64());
        self.words_for(&prompt, max)
    }

    /// The reply to `prompt`, at most `max` tokens long.
    pub(super) fn words_for(&self, prompt: &str, max: Option<u64>) -> ReplyWords {
        let mut head: Vec<String> = vec!["mock".into(), "reply:".into()];
        head.extend(prompt.split_whitespace().map(str::to_string));
        let filler = self.settings.read().reply_words as usize;
        let full = head.len() + filler;
        let total = max.map_or(full, |m| full.min(m.max(1) as usize));
        ReplyWords {
            head,
            total,
            truncated: total < full,
        }
    }

    fn usage(req: &ChatRequest, completion: usize) -> Usage {
        let prompt: usize = req
            .messages
            .iter()
            .map(|m| m.content_text().split_whitespace().count())
            .sum();
        Usage {
            prompt_tokens: prompt as u64,
            completion_tokens: completion as u64,
            total_tokens: (prompt + completion) as u64,
        }
    }

    pub fn respond(&self, req: &ChatRequest) -> ChatResponse {
        let words = self.reply_words(req);
        let text: String = (0..words.total).map(|i| words.token(i)).collect();
        ChatResponse {
            id: self.next_id(),
            object: "chat.completion".into(),
            created: unix_now(),
            model: req.model.clone(),
            choices: vec![Choice {
                index: 0,
                message: ChatMessage::text("assistant", text),
                finish_reason: Some("stop".into()),
                extra: Default::default(),
            }],
            usage: Some(Self::usage(req, words.total)),
            extra: Default::default(),
        }
    }

    /// The reply as chunks: role, one chunk per word, then finish with usage;
    /// paced at `tokens_per_second` when set.
    pub fn chunk_stream(
        &self,
        req: &ChatRequest,
    ) -> impl Stream<Item = ChatChunk> + Send + 'static {
        let words = self.reply_words(req);
        let usage = Self::usage(req, words.total);
        let (id, model, created) = (self.next_id(), req.model.clone(), unix_now());
        let chunk = move |delta: Delta, finish: Option<&str>, usage: Option<Usage>| ChatChunk {
            id: id.clone(),
            object: "chat.completion.chunk".into(),
            created,
            model: model.clone(),
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                finish_reason: finish.map(str::to_string),
                extra: Default::default(),
            }],
            usage,
            extra: Default::default(),
        };
        let pace = self.pace();
        // As OpenAI does: usage only when asked for, in a last chunk of its own.
        let include_usage = req
            .params
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false);
        // Chunk 0 is the role, 1..=total the words, total+1 the finish,
        // total+2 the usage (when asked for).
        let total = words.total;
        let count = total + 2 + usize::from(include_usage);
        stream::iter(0..count).then(move |i| {
            let c = if i == 0 {
                chunk(
                    Delta {
                        role: Some("assistant".into()),
                        content: Some(String::new()),
                        ..Default::default()
                    },
                    None,
                    None,
                )
            } else if i <= total {
                chunk(
                    Delta {
                        content: Some(words.token(i - 1)),
                        ..Default::default()
                    },
                    None,
                    None,
                )
            } else if i == total + 1 {
                chunk(Delta::default(), Some("stop"), None)
            } else {
                let mut c = chunk(Delta::default(), None, Some(usage));
                c.choices.clear();
                c
            };
            async move {
                if let (Some(p), true) = (pace, i > 1) {
                    tokio::time::sleep(p).await;
                }
                c
            }
        })
    }
}

/// A reply's words, produced on demand.
pub(super) struct ReplyWords {
    head: Vec<String>,
    pub(super) total: usize,
    /// Cut short by the request's token limit.
    pub(super) truncated: bool,
}

impl ReplyWords {
    /// The whole reply.
    pub(super) fn text(&self) -> String {
        (0..self.total).map(|i| self.token(i)).collect()
    }

    /// Token `i` with its leading space (none before the first).
    pub(super) fn token(&self, i: usize) -> String {
        let word = self.head.get(i).map_or("lorem", String::as_str);
        if i == 0 {
            word.to_string()
        } else {
            format!(" {word}")
        }
    }
}

pub fn sample_latency(dist: &LatencyDist, rng: &mut impl Rng) -> Duration {
    match *dist {
        LatencyDist::Fixed(d) => d,
        LatencyDist::Uniform { min, max } if max > min => rng.random_range(min..=max),
        LatencyDist::Uniform { min, .. } => min,
        LatencyDist::Normal { mean, std_dev } => {
            Normal::new(mean.as_secs_f64(), std_dev.as_secs_f64())
                .map(|n| Duration::from_secs_f64(n.sample(rng).max(0.0)))
                .unwrap_or(mean)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(prompt: &str) -> ChatRequest {
        ChatRequest::from_prompt("m", prompt)
    }

    #[test]
    fn reply_echoes_the_prompt_with_usage() {
        let m = MockModel::new(MockSettings::default());
        let r = m.respond(&req("hello there"));
        assert_eq!(r.reply_text(), "mock reply: hello there");
        assert_eq!(r.usage.unwrap().completion_tokens, 4);
        assert_eq!(r.usage.unwrap().prompt_tokens, 2);
    }

    #[tokio::test]
    async fn stream_concatenates_to_the_same_reply() {
        let m = MockModel::new(MockSettings::default());
        let chunks: Vec<ChatChunk> = m.chunk_stream(&req("a b c")).collect().await;
        let text: String = chunks.iter().map(ChatChunk::delta_text).collect();
        assert_eq!(text, "mock reply: a b c");
        assert_eq!(
            chunks.last().unwrap().choices[0].finish_reason.as_deref(),
            Some("stop")
        );
    }

    #[test]
    fn one_shot_faults_come_first_then_settings_apply() {
        let m = MockModel::new(MockSettings::default());
        m.fail_next(2, Fault::Hang);
        assert_eq!(m.begin().1, Some(Fault::Hang));
        assert_eq!(m.begin().1, Some(Fault::Hang));
        assert_eq!(m.begin().1, None);
        m.set_settings(MockSettings {
            error_rate: 1.0,
            error_status: 429,
            ..Default::default()
        });
        assert!(matches!(
            m.begin().1,
            Some(Fault::Error { status: 429, .. })
        ));
        assert_eq!(m.requests(), 4);
    }

    #[test]
    fn latency_samples_stay_in_range() {
        let mut rng = rand::rng();
        let d = LatencyDist::Uniform {
            min: Duration::from_millis(10),
            max: Duration::from_millis(20),
        };
        for _ in 0..100 {
            let s = sample_latency(&d, &mut rng);
            assert!(s >= Duration::from_millis(10) && s <= Duration::from_millis(20));
        }
    }
}
