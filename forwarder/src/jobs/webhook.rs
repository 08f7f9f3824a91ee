//! Standard Webhooks: the signature over `id.timestamp.body`, the secrets
//! it is made with, which callback URLs and addresses are allowed, and the
//! retry backoff.
//! Pure functions; delivery is in `callback.rs`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use forwarder_config::{CallbackHost, CallbackNetwork};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("line {0}: a signing secret is `whsec_` followed by base64")]
    Malformed(usize),
    #[error("line {0}: a secret is for `key:<name>`, `jwt:<issuer>:<sub>`, `cert:<CN>` or `tier:<name>`")]
    UnknownClient(usize),
    #[error("no signing secret in the file")]
    Empty,
    #[error("the file holds only shared secrets, used only with shared_secret_fallback: true")]
    OnlyShared,
}

fn hmac_key(secret: &str) -> Option<ring::hmac::Key> {
    secret
        .strip_prefix("whsec_")
        .and_then(|b| STANDARD.decode(b).ok())
        .filter(|k| !k.is_empty())
        .map(|raw| ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &raw))
}

/// Every client's signing keys, from the secrets file. A line is
/// `whsec_…` (a shared secret) or `<client> whsec_…`, the client an
/// identity (`key:alice`, `jwt:<issuer>:<sub>`, `cert:<CN>`) or a tier
/// (`tier:gold`). Several lines for one client are a rotation: all sign.
/// A client's own secrets win over its tier's; the shared ones sign only
/// for a client with neither, and only when `fallback` is set.
#[derive(Debug, Default)]
pub struct Secrets {
    shared: Option<Signer>,
    clients: std::collections::HashMap<String, Signer>,
    tiers: std::collections::HashMap<String, Signer>,
    fallback: bool,
}

impl Secrets {
    pub fn parse(text: &str, fallback: bool) -> Result<Self, SecretError> {
        let mut out = Self {
            fallback,
            ..Self::default()
        };
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (client, secret) = match line.rsplit_once(char::is_whitespace) {
                Some((c, s)) => (Some(c.trim()), s),
                None => (None, line),
            };
            let key = hmac_key(secret).ok_or(SecretError::Malformed(n + 1))?;
            let signer = match client {
                None => out.shared.get_or_insert_with(Signer::default),
                Some(c) => match c.strip_prefix("tier:") {
                    Some(tier) if !tier.is_empty() => out.tiers.entry(tier.into()).or_default(),
                    Some(_) => return Err(SecretError::UnknownClient(n + 1)),
                    None if ["key:", "jwt:", "cert:"].iter().any(|p| c.starts_with(p)) => {
                        out.clients.entry(c.into()).or_default()
                    }
                    None => return Err(SecretError::UnknownClient(n + 1)),
                },
            };
            signer.keys.push(key);
        }
        if out.shared.is_none() && out.clients.is_empty() && out.tiers.is_empty() {
            return Err(SecretError::Empty);
        }
        if out.clients.is_empty() && out.tiers.is_empty() && !fallback {
            return Err(SecretError::OnlyShared);
        }
        Ok(out)
    }

    /// The keys that sign `client`'s callbacks (`tier`: its tier when the
    /// job was accepted), if any.
    pub fn for_client(&self, client: &str, tier: Option<&str>) -> Option<&Signer> {
        self.clients
            .get(client)
            .or_else(|| tier.and_then(|t| self.tiers.get(t)))
            .or(self.shared.as_ref().filter(|_| self.fallback))
    }
}

/// Signing keys, newest first: the first signs alone during a normal
/// period; during a rotation every listed key signs, so receivers holding
/// either the old or the new secret verify.
#[derive(Clone, Default)]
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
            keys.push(hmac_key(line).ok_or(SecretError::Malformed(n + 1))?);
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

/// Why a callback URL, or the address it leads to, is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("callback_url is not a valid URL")]
    Invalid,
    #[error("callback_url must be an absolute URL")]
    NotAbsolute,
    #[error("callback_url must not carry credentials")]
    Credentials,
    #[error("callback_url must be http(s)")]
    Scheme,
    #[error("callback host {0} is not allowed")]
    Host(String),
    #[error("callback host {0} requires https")]
    NeedsHttps(String),
    #[error("callback port {0} is not allowed for this host")]
    Port(u16),
    /// An address outside the allowed networks. Says nothing more, so a
    /// refused target reveals nothing about what answers there.
    #[error("target not allowed")]
    Target,
}

/// A callback URL that passed the allow-list.
#[derive(Debug, Clone)]
pub struct Target {
    pub uri: http::Uri,
    /// The host without IPv6 brackets.
    pub host: String,
    /// The URL's port, or its scheme's default.
    pub port: u16,
}

/// The host of `uri` without IPv6 brackets, and its port (the scheme's
/// default when it names none).
pub fn host_port(uri: &http::Uri) -> Option<(String, u16)> {
    let host = uri.host()?;
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    });
    Some((bare.to_string(), port))
}

/// Whether `url` may receive callbacks: an absolute `https` URL (or `http`
/// where the host allows it) to an allowed host and port, with no
/// credentials in it; an IP literal must also be an allowed address
/// ([`address_allowed`]). A host name is checked after resolution, at
/// delivery (`callback.rs`).
pub fn check_url(
    url: &str,
    hosts: &[CallbackHost],
    networks: &[CallbackNetwork],
) -> Result<Target, UrlError> {
    let uri: http::Uri = url.parse().map_err(|_| UrlError::Invalid)?;
    let scheme = uri.scheme_str().unwrap_or("");
    let authority = uri.authority().ok_or(UrlError::NotAbsolute)?;
    if authority.as_str().contains('@') {
        return Err(UrlError::Credentials);
    }
    let host = authority.host();
    let Some(allowed) = hosts.iter().find(|h| h.host.eq_ignore_ascii_case(host)) else {
        return Err(UrlError::Host(host.to_string()));
    };
    match scheme {
        "https" => {}
        "http" if allowed.allow_http => {}
        "http" => return Err(UrlError::NeedsHttps(host.to_string())),
        _ => return Err(UrlError::Scheme),
    }
    let (bare, port) = host_port(&uri).ok_or(UrlError::NotAbsolute)?;
    if !allowed.ports.is_empty() && !allowed.ports.contains(&port) {
        return Err(UrlError::Port(port));
    }
    if let Ok(ip) = bare.parse::<IpAddr>() {
        if !address_allowed(ip, port, networks) {
            return Err(UrlError::Target);
        }
    }
    Ok(Target {
        uri,
        host: bare,
        port,
    })
}

/// Whether a callback may connect to `ip:port`: a public address, or one
/// inside an allowed network (on one of its ports, when it names ports).
/// IPv4-mapped IPv6 addresses are judged as the IPv4 address they carry.
pub fn address_allowed(ip: IpAddr, port: u16, networks: &[CallbackNetwork]) -> bool {
    let ip = ip.to_canonical();
    let listed = networks
        .iter()
        .any(|n| n.cidr.contains(&ip) && (n.ports.is_empty() || n.ports.contains(&port)));
    listed || !is_internal(ip)
}

/// The addresses to connect to for a resolved host: all of them, when
/// every one is allowed; a host with any refused address is refused whole
/// (a name that also resolves inside the cluster is not a public receiver).
pub fn checked_addresses(
    addrs: &[SocketAddr],
    networks: &[CallbackNetwork],
) -> Result<Vec<SocketAddr>, UrlError> {
    if addrs.is_empty()
        || addrs
            .iter()
            .any(|a| !address_allowed(a.ip(), a.port(), networks))
    {
        return Err(UrlError::Target);
    }
    Ok(addrs.to_vec())
}

/// Loopback, private, shared, link-local, unique-local, site-local,
/// multicast, unspecified, broadcast, documentation, benchmarking and
/// reserved addresses, and IPv6 forms that carry such an IPv4 address
/// (IPv4-compatible, NAT64, 6to4); Teredo is refused whole.
fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_internal_v4(v4),
        IpAddr::V6(v6) => is_internal_v6(v6),
    }
}

fn is_internal_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b))
        || (a == 192 && b == 0 && c == 0)
        || (a == 198 && (b == 18 || b == 19))
        || a >= 240
}

fn is_internal_v6(ip: Ipv6Addr) -> bool {
    let seg = ip.segments();
    let embedded =
        |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || ip.is_unique_local()
        || ip.is_unicast_link_local()
        // Site-local (deprecated, still routed by some networks).
        || (seg[0] & 0xffc0) == 0xfec0
        // IPv4-compatible `::a.b.c.d` and NAT64 `64:ff9b::a.b.c.d`.
        || (seg[..6] == [0; 6])
        || (seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] && is_internal_v4(embedded(seg[6], seg[7])))
        // 6to4 `2002:a.b.c.d::`.
        || (seg[0] == 0x2002 && is_internal_v4(embedded(seg[1], seg[2])))
        // Teredo, documentation, discard-only.
        || (seg[0] == 0x2001 && seg[1] == 0)
        || (seg[0] == 0x2001 && seg[1] == 0x0db8)
        || (seg[..4] == [0x100, 0, 0, 0])
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
    fn each_client_signs_with_its_own_secrets() {
        let alice = "whsec_YWxpY2Utc2VjcmV0LWtleQ==";
        let alice_old = "whsec_YWxpY2Utb2xkLWtleQ==";
        let gold = "whsec_Z29sZC10aWVyLWtleQ==";
        let text = format!(
            "{SECRET}\nkey:alice {alice}\nkey:alice {alice_old}\ntier:gold {gold}\njwt:https%3A//id:bob {gold}\n"
        );
        let s = Secrets::parse(&text, false).unwrap();
        let sig = |client: &str, tier: Option<&str>| {
            s.for_client(client, tier).map(|k| k.sign(MSG_ID, TS, BODY))
        };
        let single = |secret: &str| Signer::parse(secret).unwrap().sign(MSG_ID, TS, BODY);
        assert_eq!(
            sig("key:alice", Some("gold")).unwrap(),
            format!("{} {}", single(alice), single(alice_old)),
            "her own secrets, both during the rotation, not her tier's"
        );
        assert_eq!(sig("key:carol", Some("gold")).unwrap(), single(gold));
        assert_eq!(sig("jwt:https%3A//id:bob", None).unwrap(), single(gold));
        assert_eq!(
            sig("key:carol", None),
            None,
            "no fallback unless configured"
        );
        assert_eq!(
            sig("jwt::alice", None),
            None,
            "a token's alice is not key:alice"
        );
        let with_fallback = Secrets::parse(&text, true).unwrap();
        assert_eq!(
            with_fallback
                .for_client("key:carol", None)
                .map(|k| k.sign(MSG_ID, TS, BODY)),
            Some(SIG.to_string())
        );
        assert_eq!(
            Secrets::parse(SECRET, false).unwrap_err(),
            SecretError::OnlyShared
        );
        assert_eq!(
            Secrets::parse(&format!("alice {SECRET}"), false).unwrap_err(),
            SecretError::UnknownClient(1)
        );
        assert_eq!(
            Secrets::parse("key:a whsec_!!", false).unwrap_err(),
            SecretError::Malformed(1)
        );
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

    fn host(host: &str, allow_http: bool, ports: &[u16]) -> CallbackHost {
        CallbackHost {
            host: host.into(),
            allow_http,
            ports: ports.to_vec(),
        }
    }

    fn net(cidr: &str, ports: &[u16]) -> CallbackNetwork {
        CallbackNetwork {
            cidr: cidr.parse().unwrap(),
            ports: ports.to_vec(),
        }
    }

    #[test]
    fn only_allowed_hosts_ports_and_schemes_pass() {
        let hosts = vec![
            host("hooks.example", false, &[]),
            host("127.0.0.1", true, &[]),
            host("pinned.example", false, &[443, 8443]),
        ];
        let nets = vec![net("127.0.0.1/32", &[9])];
        assert!(check_url("https://hooks.example/x", &hosts, &[]).is_ok());
        assert!(check_url("https://HOOKS.example:8443/x", &hosts, &[]).is_ok());
        assert!(check_url("http://127.0.0.1:9/cb", &hosts, &nets).is_ok());
        assert!(check_url("https://pinned.example/x", &hosts, &[]).is_ok());
        assert!(check_url("https://pinned.example:8443/x", &hosts, &[]).is_ok());
        assert_eq!(
            check_url("https://pinned.example:22/x", &hosts, &[]).unwrap_err(),
            UrlError::Port(22)
        );
        assert_eq!(
            check_url("http://127.0.0.1:10/cb", &hosts, &nets).unwrap_err(),
            UrlError::Target,
            "an allowed host, a port outside its network's ports"
        );
        assert_eq!(
            check_url("http://127.0.0.1:9/cb", &hosts, &[]).unwrap_err(),
            UrlError::Target,
            "an allowed host is not an allowed address"
        );
        for bad in [
            "http://hooks.example/x",
            "https://evil.example/x",
            "https://user:pw@hooks.example/x",
            "http://hooks.example@127.0.0.1/x",
            "ftp://hooks.example/x",
            "/relative",
            "not a url",
        ] {
            assert!(check_url(bad, &hosts, &nets).is_err(), "{bad}");
        }
    }

    #[test]
    fn ip_literals_of_internal_addresses_are_refused_before_any_connection() {
        let hosts: Vec<_> = [
            "0.0.0.0",
            "[::ffff:127.0.0.1]",
            "[::1]",
            "169.254.169.254",
            "[fd00::1]",
            "10.1.2.3",
        ]
        .iter()
        .map(|h| host(h, true, &[]))
        .collect();
        for h in &hosts {
            let url = format!("http://{}:8080/", h.host);
            assert_eq!(
                check_url(&url, &hosts, &[]).unwrap_err(),
                UrlError::Target,
                "{url}"
            );
        }
    }

    #[test]
    fn internal_addresses_are_refused_unless_a_network_names_them() {
        let refused = [
            "127.0.0.1",
            "127.255.255.254",
            "0.0.0.0",
            "0.1.2.3",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "224.0.0.1",
            "239.255.255.250",
            "255.255.255.255",
            "240.0.0.1",
            "192.0.0.170",
            "198.18.0.1",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
            "2002:a9fe:a9fe::1",
            "fd00::1",
            "fc00::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "2001::1",
            "2001:db8::1",
        ];
        for a in refused {
            let ip: IpAddr = a.parse().unwrap();
            assert!(!address_allowed(ip, 80, &[]), "{a} must be refused");
        }
        for a in [
            "93.184.215.14",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            let ip: IpAddr = a.parse().unwrap();
            assert!(address_allowed(ip, 80, &[]), "{a} is public");
        }
        let nets = [net("10.20.0.0/16", &[]), net("127.0.0.1/32", &[8080])];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(address_allowed(ip("10.20.3.4"), 1, &nets));
        assert!(!address_allowed(ip("10.21.3.4"), 1, &nets));
        assert!(address_allowed(ip("127.0.0.1"), 8080, &nets));
        assert!(address_allowed(ip("::ffff:127.0.0.1"), 8080, &nets));
        assert!(!address_allowed(ip("127.0.0.1"), 8081, &nets), "port");
        assert!(!address_allowed(ip("127.0.0.2"), 8080, &nets));
    }

    #[test]
    fn a_name_with_any_refused_address_is_refused_whole() {
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        let public = [sa("93.184.215.14:443"), sa("[2606:4700::1111]:443")];
        assert_eq!(checked_addresses(&public, &[]).unwrap(), public.to_vec());
        let rebound = [sa("93.184.215.14:443"), sa("169.254.169.254:443")];
        assert_eq!(checked_addresses(&rebound, &[]), Err(UrlError::Target));
        assert_eq!(checked_addresses(&[], &[]), Err(UrlError::Target));
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
