//! `provider: anthropic`: an Anthropic Messages server. The same pooled,
//! byte-transparent HTTP adapter as OpenAI-compatible upstreams, in its
//! Anthropic dialect: it serves `/messages` and `/messages/count_tokens`,
//! sends the key as `x-api-key`, and sends `anthropic-version` (the
//! client's, else [`super::openai::DEFAULT_ANTHROPIC_VERSION`]).

use super::openai::OpenAiProvider;
use super::AdapterLimits;
use crate::pipeline::Family;
use crate::BuildError;

pub fn provider(
    cfg: &forwarder_config::UpstreamConfig,
    limits: AdapterLimits,
) -> Result<OpenAiProvider, BuildError> {
    OpenAiProvider::with_dialect(cfg, limits, Family::Anthropic)
}
