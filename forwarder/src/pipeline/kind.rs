//! Which API a request speaks: the one fact about its wire format every
//! stage may ask (the upstream path, what a valid body needs, how a stream
//! ends, which protocol headers cross). Bodies stay bytes; this is a tag.

/// The API of a request, set by its front end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ApiKind {
    /// OpenAI `POST /v1/chat/completions` (also what the simple API,
    /// WebSocket, gRPC, async jobs and batches send).
    #[default]
    ChatCompletions,
    /// OpenAI `POST /v1/embeddings`.
    Embeddings,
    /// OpenAI `POST /v1/responses`.
    Responses,
    /// Anthropic `POST /v1/messages`.
    Messages,
    /// Anthropic `POST /v1/messages/count_tokens`.
    CountTokens,
}

/// The two API families an upstream may speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    OpenAi,
    Anthropic,
}

/// How a streamed answer of this API says it is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Terminal {
    /// `data: [DONE]` (or, from servers that omit it, a `finish_reason`
    /// followed by the end of the body).
    Done,
    /// An event whose `event:` name (or data `type`) is one of these.
    Named(&'static [&'static str]),
}

impl ApiKind {
    pub const ALL: [ApiKind; 5] = [
        Self::ChatCompletions,
        Self::Embeddings,
        Self::Responses,
        Self::Messages,
        Self::CountTokens,
    ];

    /// For logs and error messages.
    pub fn label(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat_completions",
            Self::Embeddings => "embeddings",
            Self::Responses => "responses",
            Self::Messages => "messages",
            Self::CountTokens => "count_tokens",
        }
    }

    /// The path under an upstream's base URL (which includes `/v1`).
    pub fn path(self) -> &'static str {
        match self {
            Self::ChatCompletions => "/chat/completions",
            Self::Embeddings => "/embeddings",
            Self::Responses => "/responses",
            Self::Messages => "/messages",
            Self::CountTokens => "/messages/count_tokens",
        }
    }

    pub fn family(self) -> Family {
        match self {
            Self::ChatCompletions | Self::Embeddings | Self::Responses => Family::OpenAi,
            Self::Messages | Self::CountTokens => Family::Anthropic,
        }
    }

    /// Whether a request of this API may ask for a stream.
    pub fn may_stream(self) -> bool {
        matches!(
            self,
            Self::ChatCompletions | Self::Responses | Self::Messages
        )
    }

    /// Whether a body of this API must carry a non-empty `messages` array.
    pub fn needs_messages(self) -> bool {
        matches!(
            self,
            Self::ChatCompletions | Self::Messages | Self::CountTokens
        )
    }

    /// Whether a body of this API must carry `input`.
    pub fn needs_input(self) -> bool {
        self == Self::Embeddings
    }

    pub fn terminal(self) -> Terminal {
        match self {
            Self::Messages => Terminal::Named(&["message_stop"]),
            Self::Responses => Terminal::Named(&[
                "response.completed",
                "response.incomplete",
                "response.failed",
            ]),
            _ => Terminal::Done,
        }
    }

    /// Client headers that are part of this API's protocol and always go
    /// upstream, whatever `headers.to_upstream` says (Anthropic's version
    /// and beta flags select the wire format the body is written in).
    pub fn protocol_headers(self) -> &'static [&'static str] {
        match self.family() {
            Family::Anthropic => &["anthropic-version", "anthropic-beta"],
            Family::OpenAi => &[],
        }
    }

    /// Whether answers of this API may be cached: chat completions (as
    /// before) and embeddings (deterministic by nature). Responses and
    /// Messages answers are not cached.
    pub fn cacheable(self) -> bool {
        matches!(self, Self::ChatCompletions | Self::Embeddings)
    }

    /// Whether a request is deterministic whatever its `temperature`.
    pub fn deterministic(self) -> bool {
        matches!(self, Self::Embeddings | Self::CountTokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_distinct_and_families_split_as_the_providers_do() {
        let mut paths: Vec<_> = ApiKind::ALL.iter().map(|a| a.path()).collect();
        paths.sort();
        paths.dedup();
        assert_eq!(paths.len(), ApiKind::ALL.len());
        for a in ApiKind::ALL {
            let anthropic = a.family() == Family::Anthropic;
            assert_eq!(anthropic, a.path().starts_with("/messages"), "{a:?}");
            assert_eq!(anthropic, !a.protocol_headers().is_empty(), "{a:?}");
        }
        assert!(!ApiKind::Embeddings.may_stream() && !ApiKind::CountTokens.may_stream());
        // Adapters index per-API tables by discriminant.
        for (i, a) in ApiKind::ALL.iter().enumerate() {
            assert_eq!(*a as usize, i);
        }
    }
}
