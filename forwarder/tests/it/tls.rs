//! TLS on the listeners, driven by third-party clients from the project's
//! `.venv`: the `openai` SDK over HTTPS with a custom CA, `websockets` over
//! WSS, `grpcio` with TLS, mTLS accepted and refused, and a certificate
//! rotated on disk while a stream is open. Certificates are made here with
//! rcgen.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use forwarder::config::{Config, MockSettings, TlsConfig};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

use crate::common::*;

/// A CA that signs server and client certificates.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap().pem();
        Self {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// A leaf certificate for `names` (DNS names or IP addresses) with
    /// subject CN `cn`: (certificate PEM, key PEM).
    pub fn leaf(&self, cn: &str, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn python() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        venv.exists(),
        "these tests need the project virtualenv: run ./scripts/test.sh (it creates .venv from scripts/requirements-test.txt)"
    );
    venv
}

/// Material for one test: a CA, the server's certificate now and after
/// rotation, a client certificate and one from a CA nobody trusts.
fn material(dir: &Path) -> Vec<(&'static str, String)> {
    let ca = Ca::new("forwarder test CA");
    let stranger = Ca::new("untrusted CA");
    let (cert, key) = ca.leaf("forwarder", &["localhost", "127.0.0.1"]);
    let (cert2, key2) = ca.leaf("forwarder rotated", &["localhost", "127.0.0.1"]);
    let (client, client_key) = ca.leaf("team-a", &[]);
    let (bad, bad_key) = stranger.leaf("intruder", &[]);
    let mut env = vec![];
    for (var, name, text) in [
        ("TLS_CA", "ca.pem", &ca.pem),
        ("TLS_CERT", "tls.crt", &cert),
        ("TLS_KEY", "tls.key", &key),
        ("TLS_NEXT_CERT", "next.crt", &cert2),
        ("TLS_NEXT_KEY", "next.key", &key2),
        ("TLS_CLIENT_CERT", "client.crt", &client),
        ("TLS_CLIENT_KEY", "client.key", &client_key),
        ("TLS_BAD_CERT", "bad.crt", &bad),
        ("TLS_BAD_KEY", "bad.key", &bad_key),
    ] {
        env.push((var, write(dir, name, text).display().to_string()));
    }
    env
}

fn tls_config(dir: &Path, mtls: bool) -> Config {
    let mut cfg = config(vec![]);
    cfg.upstreams = Config::default().upstreams;
    // A stream of ~2 s, long enough to rotate the certificate under it.
    cfg.upstreams[0].mock = Some(MockSettings {
        tokens_per_second: Some(25.0),
        reply_words: 40,
        ..MockSettings::default()
    });
    cfg.server.tls = Some(TlsConfig {
        cert_file: dir.join("tls.crt"),
        key_file: dir.join("tls.key"),
        client_ca_file: mtls.then(|| dir.join("ca.pem")),
        client_cert_principal: mtls,
        reload_interval: Duration::from_millis(100),
    });
    if mtls {
        // API keys on too: a request with a verified certificate and no
        // key is admitted only because the certificate names the client.
        std::fs::write(dir.join("keys"), "alice: sk-alice\n").unwrap();
        cfg.auth.api_keys_file = Some(dir.join("keys"));
    }
    cfg
}

#[tokio::test]
async fn https_wss_grpc_tls_mtls_and_rotation_with_python_clients() {
    let dir = tempfile::tempdir().unwrap();
    let mut env = material(dir.path());
    let tls = Server::start(tls_config(dir.path(), false)).await.unwrap();
    let mtls_dir = tempfile::tempdir().unwrap();
    for f in ["tls.crt", "tls.key", "ca.pem"] {
        std::fs::copy(dir.path().join(f), mtls_dir.path().join(f)).unwrap();
    }
    let mtls = Server::start(tls_config(mtls_dir.path(), true))
        .await
        .unwrap();
    env.extend([
        (
            "HTTPS_URL",
            format!("https://127.0.0.1:{}", tls.addr.port()),
        ),
        (
            "WSS_URL",
            format!("wss://127.0.0.1:{}/api/v1/ws", tls.addr.port()),
        ),
        (
            "GRPC_TLS_ADDR",
            format!("127.0.0.1:{}", tls.grpc_addr.unwrap().port()),
        ),
        (
            "MTLS_URL",
            format!("https://127.0.0.1:{}", mtls.addr.port()),
        ),
        (
            "MTLS_GRPC_ADDR",
            format!("127.0.0.1:{}", mtls.grpc_addr.unwrap().port()),
        ),
        ("PROTO_DIR", format!("{}/proto", env!("CARGO_MANIFEST_DIR"))),
    ]);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/tls_clients.py");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .arg(script)
            .envs(env)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ALL OK"), "{stdout}");
    tls.shutdown().await;
    mtls.shutdown().await;
}

use forwarder::reload::Reload;
use forwarder::server::Server;

#[tokio::test]
async fn a_broken_rotation_keeps_the_old_certificate_and_a_bad_start_fails() {
    let dir = tempfile::tempdir().unwrap();
    material(dir.path());
    let cfg = tls_config(dir.path(), false);
    let files =
        forwarder::frontends::tls::TlsFiles::load(cfg.server.tls.as_ref().unwrap()).unwrap();
    assert!(!files.reload().unwrap(), "unchanged files are no change");
    // A key that does not match the certificate (a half-done rotation).
    std::fs::copy(dir.path().join("next.key"), dir.path().join("tls.key")).unwrap();
    assert!(files.reload().is_err());
    std::fs::copy(dir.path().join("next.crt"), dir.path().join("tls.crt")).unwrap();
    assert!(files.reload().unwrap(), "the completed rotation loads");
    std::fs::write(dir.path().join("tls.crt"), "not a certificate").unwrap();
    assert!(files.reload().is_err());
    let err = Server::start(cfg)
        .await
        .err()
        .expect("a bad certificate fails the start");
    assert!(err.to_string().contains("server.tls"), "{err}");
}

/// Upstream TLS: a forwarder with mTLS on its listener is the upstream of
/// another, which trusts its CA, presents a client certificate and connects
/// by IP with `server_name` for SNI and the certificate check.
#[tokio::test]
async fn upstream_tls_with_a_custom_ca_client_certificate_and_server_name() {
    use forwarder::config::{Provider, UpstreamConfig, UpstreamTlsConfig};
    let dir = tempfile::tempdir().unwrap();
    material(dir.path());
    let upstream = Server::start(tls_config(dir.path(), true)).await.unwrap();
    let via = |tls: Option<UpstreamTlsConfig>| {
        let mut cfg = config(vec![]);
        cfg.retry.max_attempts = 1;
        cfg.upstreams = vec![UpstreamConfig {
            name: "tls-upstream".into(),
            provider: Provider::Openai,
            base_url: Some(format!("https://127.0.0.1:{}/v1", upstream.addr.port())),
            models: vec!["mock".into()],
            weight: 1,
            api_key_file: None,
            api_key_env: None,
            connect_timeout: Duration::from_secs(2),
            timeout: Duration::from_secs(10),
            mock: None,
            tls,
        }];
        cfg
    };
    let good = UpstreamTlsConfig {
        ca_file: Some(dir.path().join("ca.pem")),
        cert_file: Some(dir.path().join("client.crt")),
        key_file: Some(dir.path().join("client.key")),
        server_name: Some("localhost".into()),
        ..UpstreamTlsConfig::default()
    };
    let cases = [
        (
            "trusted, with a client certificate",
            Some(good.clone()),
            200,
        ),
        (
            "no client certificate",
            Some(UpstreamTlsConfig {
                cert_file: None,
                key_file: None,
                ..good.clone()
            }),
            502,
        ),
        (
            "a server name the certificate does not carry",
            Some(UpstreamTlsConfig {
                server_name: Some("elsewhere.test".into()),
                ..good.clone()
            }),
            502,
        ),
        ("system roots only", None, 502),
    ];
    for (name, tls, want) in cases {
        let fwd = start(via(tls)).await;
        let r = fwd
            .post("/v1/chat/completions", &chat("mock", "up"), &[])
            .await;
        assert_eq!(r.status, want, "{name}: {}", r.text);
        if want == 200 {
            assert!(r.text.contains("mock reply: up"), "{}", r.text);
        }
        fwd.server.shutdown().await;
    }
    // Rotation on disk: the client certificate starts as one the upstream
    // does not trust (refused), then cert-manager writes a good one, and
    // the next connection presents it without a restart.
    let (rot_crt, rot_key) = (dir.path().join("rot.crt"), dir.path().join("rot.key"));
    std::fs::copy(dir.path().join("bad.crt"), &rot_crt).unwrap();
    std::fs::copy(dir.path().join("bad.key"), &rot_key).unwrap();
    let rotating = UpstreamTlsConfig {
        cert_file: Some(rot_crt.clone()),
        key_file: Some(rot_key.clone()),
        reload_interval: Duration::from_millis(100),
        ..good.clone()
    };
    let fwd = start(via(Some(rotating))).await;
    let r = fwd
        .post("/v1/chat/completions", &chat("mock", "up"), &[])
        .await;
    assert_eq!(r.status, 502, "an untrusted client certificate: {}", r.text);
    std::fs::copy(dir.path().join("client.key"), &rot_key).unwrap();
    std::fs::copy(dir.path().join("client.crt"), &rot_crt).unwrap();
    let mut status = 0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        status = fwd
            .post("/v1/chat/completions", &chat("mock", "up"), &[])
            .await
            .status;
        if status == 200 {
            break;
        }
    }
    assert_eq!(status, 200, "the rotated certificate is presented");
    fwd.server.shutdown().await;
    let bad = UpstreamTlsConfig {
        cert_file: Some(dir.path().join("client.crt")),
        key_file: None,
        ..good
    };
    let err = Server::start(via(Some(bad)))
        .await
        .err()
        .expect("half a client identity fails the start");
    assert!(err.to_string().contains("cert_file and key_file"), "{err}");
}
