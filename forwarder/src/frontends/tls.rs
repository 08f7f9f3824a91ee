//! TLS termination for the HTTP (HTTPS, WSS) and gRPC listeners, with
//! rustls: TLS 1.2 minimum, ALPN `h2` and `http/1.1`, optional client
//! certificates (mTLS) verified against a CA bundle. The certificate, key
//! and CA files are polled; a change builds a new server config that new
//! connections use, while open connections keep theirs (cert-manager
//! rotation drops nothing). A change that does not load keeps the old one.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use sha2::{Digest, Sha256};
use tokio_rustls::TlsAcceptor;

use crate::reload::{self, Reload, Swap};
use forwarder_config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: String },
    #[error("{path}: no PEM private key found")]
    NoKey { path: String },
    #[error("{path}: invalid PEM")]
    Pem { path: String },
    #[error("invalid TLS setup: {0}")]
    Config(String),
}

/// The subject (CN, else the whole subject) of a connection's verified
/// client certificate; a request extension on mTLS connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSubject(pub Arc<str>);

/// The server's TLS settings, kept current with the files.
pub struct TlsFiles {
    cfg: TlsConfig,
    current: Swap<rustls::ServerConfig>,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// The PEM certificates in `pem` (from `path`, for messages).
fn certs(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| TlsError::Pem {
            path: path.display().to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.display().to_string(),
        });
    }
    Ok(certs)
}

/// A rustls server config from PEM bytes: pure, so loading is testable.
pub fn server_config(
    cfg: &TlsConfig,
    cert_pem: &[u8],
    key_pem: &[u8],
    ca_pem: Option<&[u8]>,
) -> Result<rustls::ServerConfig, TlsError> {
    crate::install_crypto_provider();
    let chain = certs(cert_pem, &cfg.cert_file)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| TlsError::NoKey {
        path: cfg.key_file.display().to_string(),
    })?;
    let builder = rustls::ServerConfig::builder_with_protocol_versions(&[
        &rustls::version::TLS13,
        &rustls::version::TLS12,
    ]);
    let builder = match (ca_pem, &cfg.client_ca_file) {
        (Some(ca), Some(path)) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs(ca, path)? {
                roots
                    .add(c)
                    .map_err(|e| TlsError::Config(format!("{}: {e}", path.display())))?;
            }
            let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

impl TlsFiles {
    /// Loads the files; a failure here fails the start.
    pub fn load(cfg: &TlsConfig) -> Result<Arc<Self>, TlsError> {
        let (config, fp) = Self::build(cfg)?;
        Ok(Arc::new(Self {
            cfg: cfg.clone(),
            current: Swap::new(config, fp),
        }))
    }

    fn build(cfg: &TlsConfig) -> Result<(rustls::ServerConfig, [u8; 32]), TlsError> {
        let cert = read(&cfg.cert_file)?;
        let key = read(&cfg.key_file)?;
        let ca = cfg.client_ca_file.as_deref().map(read).transpose()?;
        let mut fp = Sha256::new();
        for part in [Some(&cert), Some(&key), ca.as_ref()].into_iter().flatten() {
            fp.update(Sha256::digest(part));
        }
        let config = server_config(cfg, &cert, &key, ca.as_deref())?;
        Ok((config, fp.finalize().into()))
    }

    /// The acceptor for the next connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.get())
    }

    /// Polls the files until the task is aborted.
    pub fn watch(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        let interval = self.cfg.reload_interval.max(Duration::from_millis(100));
        reload::poll(self, interval)
    }
}

impl Reload for TlsFiles {
    type Error = TlsError;
    const WHAT: &'static str = "TLS certificate";

    /// Re-reads the files; returns whether the settings changed. A
    /// half-written rotation fails here and the old settings stay.
    fn reload(&self) -> Result<bool, TlsError> {
        let (config, fp) = Self::build(&self.cfg)?;
        Ok(self.current.install(config, fp))
    }
}

/// The verified client certificate's subject: its first CN, else the
/// whole subject as text.
pub fn peer_subject(conn: &rustls::ServerConnection) -> Option<PeerSubject> {
    let der = conn.peer_certificates()?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let subject = cert.subject();
    let name = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| subject.to_string());
    (!name.is_empty()).then(|| PeerSubject(Arc::from(name)))
}

/// A TLS connection on a counted TCP connection, with what its handshake
/// learnt; what the gRPC server is given.
pub struct TlsConn {
    pub stream: tokio_rustls::server::TlsStream<super::conn::Counted>,
    pub peer: Option<PeerSubject>,
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = Option<PeerSubject>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
    }
}

impl tokio::io::AsyncRead for TlsConn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsConn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Runs the handshake, bounded by `timeout` (the connection's own header
/// timer also runs); `None` if it failed (logged at debug: scanners and
/// clients that do not trust us are not our errors).
pub async fn handshake(
    acceptor: TlsAcceptor,
    io: super::conn::Counted,
    timeout: Duration,
) -> Option<TlsConn> {
    match tokio::time::timeout(timeout, acceptor.accept(io)).await {
        Ok(Ok(stream)) => {
            let peer = peer_subject(stream.get_ref().1);
            Some(TlsConn { stream, peer })
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!("TLS handshake timed out");
            None
        }
    }
}
