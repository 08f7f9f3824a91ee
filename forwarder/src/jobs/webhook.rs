//! Standard Webhooks: the signature over `id.timestamp.body`, the secrets
//! it is made with, which callback URLs are allowed, and the retry backoff.
//! Pure functions; delivery is in `callback.rs`.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use forwarder_config::CallbackHost;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("line {0}: a signing secret is `whsec_` followed by base64")]
    Malformed(usize),
    #[error("no signing secret in the file")]
    Empty,
}

/// Signing keys, newest first: the first signs alone during a normal
/// period; during a rotation every listed key signs, so receivers holding
/// either the old or the new secret verify.
#[derive(Clone)]
pub struct Signer {
    keys: Vec<ring::hmac::Key>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({} keys)", self.keys.len())
    }
}

impl Signer {
    /// Parses a secrets file: one `whsec_…` a line; blank lines and `#`
    /// comments are skipped.
    pub fn parse(text: &str) -> Result<Self, SecretError> {
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let raw = line
                .strip_prefix("whsec_")
                .and_then(|b| STANDARD.decode(b).ok())
                .filter(|k| !k.is_empty())
                .ok_or(SecretError::Malformed(n + 1))?;
            keys.push(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &raw));
        }
        if keys.is_empty() {
            return Err(SecretError::Empty);
        }
        Ok(Self { keys })
    }

    /// The `webhook-signature` value: `v1,<base64>` per key, space-separated.
    pub fn sign(&self, msg_id: &str, timestamp: u64, body: &[u8]) -> String {
        let mut content = Vec::with_capacity(msg_id.len() + 24 + body.len());
        content.extend_from_slice(msg_id.as_bytes());
        content.push(b'.');
        content.extend_from_slice(timestamp.to_string().as_bytes());
        content.push(b'.');
        content.extend_from_slice(body);
        self.keys
            .iter()
            .map(|k| format!("v1,{}", STANDARD.encode(ring::hmac::sign(k, &content))))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Whether `url` may receive callbacks: an absolute `https` URL (or `http`
/// where the host allows it) to an allowed host, with no credentials in it.
pub fn check_url(url: &str, hosts: &[CallbackHost]) -> Result<http::Uri, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| "callback_url is not a valid URL".to_string())?;
    let scheme = uri.scheme_str().unwrap_or("");
    let authority = uri
        .authority()
        .ok_or("callback_url must be an absolute URL")?;
    if authority.as_str().contains('@') {
        return Err("callback_url must not carry credentials".into());
    }
    let host = authority.host();
    let Some(allowed) = hosts.iter().find(|h| h.host.eq_ignore_ascii_case(host)) else {
        return Err(format!("callback host {host} is not allowed"));
    };
    match scheme {
        "https" => Ok(uri),
        "http" if allowed.allow_http => Ok(uri),
        "http" => Err(format!("callback host {host} requires https")),
        _ => Err("callback_url must be http(s)".into()),
    }
}

/// The wait before retry `attempt` (1 = the first retry): exponential,
/// capped, with jitter in [d/2, d] so many receivers' retries spread out.
/// `unit` is a random number in [0, 1).
pub fn backoff(attempt: u32, base: Duration, max: Duration, unit: f64) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let d = exp.min(max);
    d.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    // The Standard Webhooks specification's published example.
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const MSG_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TS: u64 = 1614265330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn signs_the_specifications_example() {
        let s = Signer::parse(SECRET).unwrap();
        assert_eq!(s.sign(MSG_ID, TS, BODY), SIG);
    }

    #[test]
    fn every_rotation_key_signs() {
        let s = Signer::parse(&format!("# new\n{SECRET}\n\nwhsec_c2Vjb25k\n")).unwrap();
        let sig = s.sign(MSG_ID, TS, BODY);
        let parts: Vec<_> = sig.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0], SIG);
        assert!(parts[1].starts_with("v1,") && parts[1] != SIG);
    }

    #[test]
    fn malformed_or_missing_secrets_are_refused() {
        assert_eq!(
            Signer::parse("secret").unwrap_err(),
            SecretError::Malformed(1)
        );
        assert_eq!(
            Signer::parse("\nwhsec_!!").unwrap_err(),
            SecretError::Malformed(2)
        );
        assert_eq!(Signer::parse("# only\n").unwrap_err(), SecretError::Empty);
    }

    #[test]
    fn only_allowed_hosts_and_schemes_pass() {
        let hosts = vec![
            CallbackHost {
                host: "hooks.example".into(),
                allow_http: false,
            },
            CallbackHost {
                host: "127.0.0.1".into(),
                allow_http: true,
            },
        ];
        assert!(check_url("https://hooks.example/x", &hosts).is_ok());
        assert!(check_url("https://HOOKS.example:8443/x", &hosts).is_ok());
        assert!(check_url("http://127.0.0.1:9/cb", &hosts).is_ok());
        for bad in [
            "http://hooks.example/x",
            "https://evil.example/x",
            "https://user:pw@hooks.example/x",
            "ftp://hooks.example/x",
            "/relative",
            "not a url",
        ] {
            assert!(check_url(bad, &hosts).is_err(), "{bad}");
        }
    }

    #[test]
    fn backoff_doubles_is_capped_and_jittered() {
        let (b, m) = (Duration::from_millis(100), Duration::from_millis(1000));
        assert_eq!(backoff(1, b, m, 1.0), Duration::from_millis(100));
        assert_eq!(backoff(2, b, m, 1.0), Duration::from_millis(200));
        assert_eq!(backoff(3, b, m, 0.0), Duration::from_millis(200));
        assert_eq!(backoff(10, b, m, 1.0), m);
        assert_eq!(backoff(99, b, m, 0.0), m / 2);
    }
}
