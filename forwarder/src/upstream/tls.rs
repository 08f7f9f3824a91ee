//! Client TLS towards one upstream: its own CA bundle instead of the
//! system roots, an optional client certificate (upstream mTLS) and an
//! optional server name (SNI and certificate check) other than the URL's
//! host. A bad file fails the start; the files are then polled and a change
//! builds a new client (new connections use it; a failed reload keeps the
//! old one).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::BuildError;
use forwarder_config::UpstreamTlsConfig;

fn certs(path: &Path, at: &str) -> Result<Vec<CertificateDer<'static>>, BuildError> {
    let bytes = std::fs::read(path)
        .map_err(|e| BuildError::new(format!("{at}: cannot read {}: {e}", path.display())))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| BuildError::new(format!("{at}: {} is not valid PEM", path.display())))?;
    if certs.is_empty() {
        return Err(BuildError::new(format!(
            "{at}: no certificate in {}",
            path.display()
        )));
    }
    Ok(certs)
}

/// The client TLS settings shared by every https peer without files of its
/// own (upstreams, callback receivers, the trace collector): the system's
/// roots, loaded once. Without any (a bare container), https peers fail to
/// verify, plain http ones still work.
pub fn system_roots() -> &'static rustls::ClientConfig {
    static CONFIG: std::sync::OnceLock<rustls::ClientConfig> = std::sync::OnceLock::new();
    CONFIG.get_or_init(|| {
        let mut roots = rustls::RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            tracing::warn!("no system CA certificates found: https peers will not verify");
        }
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth()
    })
}

/// The client config for an upstream with `tls` settings; `system` gives
/// the shared system-roots config used when no CA bundle is set.
pub fn client_config(
    name: &str,
    tls: &UpstreamTlsConfig,
    system: impl FnOnce() -> rustls::ClientConfig,
) -> Result<rustls::ClientConfig, BuildError> {
    client_config_at(&format!("upstreams.{name}.tls"), tls, system)
}

/// [`client_config`] for settings at the config path `at` (for messages).
pub fn client_config_at(
    at: &str,
    tls: &UpstreamTlsConfig,
    system: impl FnOnce() -> rustls::ClientConfig,
) -> Result<rustls::ClientConfig, BuildError> {
    crate::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    match &tls.ca_file {
        Some(path) => {
            for c in certs(path, &format!("{at}.ca_file"))? {
                roots
                    .add(c)
                    .map_err(|e| BuildError::new(format!("{at}.ca_file: {e}")))?;
            }
        }
        // No CA bundle and no client certificate: the shared config.
        None if tls.cert_file.is_none() && tls.key_file.is_none() => return Ok(system()),
        None => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(Arc::new(roots));
    match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            let chain = certs(cert, &format!("{at}.cert_file"))?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|_| {
                BuildError::new(format!(
                    "{at}.key_file: no PEM private key in {}",
                    key.display()
                ))
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| BuildError::new(format!("{at}: {e}")))
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err(BuildError::new(format!(
            "{at}: cert_file and key_file go together"
        ))),
    }
}

/// The configured server name, checked.
pub fn server_name(
    name: &str,
    tls: &UpstreamTlsConfig,
) -> Result<Option<ServerName<'static>>, BuildError> {
    server_name_at(&format!("upstreams.{name}.tls"), tls)
}

/// [`server_name`] for settings at the config path `at`.
pub fn server_name_at(
    at: &str,
    tls: &UpstreamTlsConfig,
) -> Result<Option<ServerName<'static>>, BuildError> {
    tls.server_name
        .as_ref()
        .map(|n| {
            ServerName::try_from(n.clone())
                .map_err(|e| BuildError::new(format!("{at}.server_name: {e}")))
        })
        .transpose()
}

/// A digest of the TLS files' bytes (all zero without any), to notice a
/// rotation on disk.
pub fn files_fingerprint(tls: Option<&UpstreamTlsConfig>) -> crate::reload::SourceDigest {
    use sha2::{Digest, Sha256};
    let Some(tls) = tls else {
        return [0; 32];
    };
    let mut fp = Sha256::new();
    for path in [&tls.ca_file, &tls.cert_file, &tls.key_file]
        .into_iter()
        .flatten()
    {
        fp.update(Sha256::digest(std::fs::read(path).unwrap_or_default()));
    }
    fp.finalize().into()
}
