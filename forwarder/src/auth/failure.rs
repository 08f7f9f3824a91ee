//! Why a request was not authenticated: the `reason` label of
//! `forwarder_auth_failures_total` and of the log line. Clients only ever
//! see a generic 401.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthFailure {
    /// No credential (and no verified client certificate naming a client).
    Missing,
    /// Not one of the configured API keys (and not a JWT).
    UnknownKey,
    /// Not a well-formed compact JWS (segments, base64url, JSON header).
    Malformed,
    /// Longer than `auth.jwt.max_token_bytes`.
    Oversize,
    /// `alg: none`: unsigned.
    AlgNone,
    /// An algorithm not configured, or not one the key may verify.
    AlgNotAllowed,
    /// A `kid` no key carries.
    UnknownKid,
    BadSignature,
    Expired,
    NotYetValid,
    /// `iat` older than `auth.jwt.max_age`.
    TooOld,
    /// A required claim (`exp`, `iss`, `aud`, `iat`) is absent or mistyped.
    MissingClaim,
    WrongIssuer,
    WrongAudience,
    /// The principal claim is absent or not a non-empty string.
    NoPrincipal,
    /// No verification keys are loaded (a JWKS URL not fetched yet).
    KeysUnavailable,
}

impl AuthFailure {
    pub const ALL: [AuthFailure; 16] = [
        Self::Missing,
        Self::UnknownKey,
        Self::Malformed,
        Self::Oversize,
        Self::AlgNone,
        Self::AlgNotAllowed,
        Self::UnknownKid,
        Self::BadSignature,
        Self::Expired,
        Self::NotYetValid,
        Self::TooOld,
        Self::MissingClaim,
        Self::WrongIssuer,
        Self::WrongAudience,
        Self::NoPrincipal,
        Self::KeysUnavailable,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::UnknownKey => "unknown_key",
            Self::Malformed => "malformed",
            Self::Oversize => "oversize",
            Self::AlgNone => "alg_none",
            Self::AlgNotAllowed => "alg_not_allowed",
            Self::UnknownKid => "unknown_kid",
            Self::BadSignature => "bad_signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::TooOld => "too_old",
            Self::MissingClaim => "missing_claim",
            Self::WrongIssuer => "wrong_issuer",
            Self::WrongAudience => "wrong_audience",
            Self::NoPrincipal => "no_principal",
            Self::KeysUnavailable => "keys_unavailable",
        }
    }
}

impl std::fmt::Display for AuthFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}
