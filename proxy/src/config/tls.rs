//! `[tls]`: the certificate chain and private key (PEM files) the proxy port serves
//! TLS with. Read and checked when the config loads, so that `corral check` and a
//! reload refuse a missing, unreadable or mismatched file before it could serve.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

use super::source::{ConfigError, Source, Text};

/// `[tls]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileTls {
    cert: Text,
    key: Text,
}

/// TLS on the proxy port: the files, and the server config built from them.
#[derive(Clone)]
pub struct TlsSettings {
    /// The certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// What handshakes use: the chain and key, ALPN `h2` then `http/1.1`.
    pub(crate) server: Arc<rustls::ServerConfig>,
}

impl fmt::Debug for TlsSettings {
    /// The paths only: never the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl PartialEq for TlsSettings {
    /// The same files (their contents are read again on every reload regardless).
    fn eq(&self, other: &TlsSettings) -> bool {
        self.cert == other.cert && self.key == other.key
    }
}

impl FileTls {
    pub(super) fn validate(&self, src: &Source) -> Result<TlsSettings, ConfigError> {
        let cert_path = PathBuf::from(self.cert.get_ref());
        let key_path = PathBuf::from(self.key.get_ref());
        let cert_error = |message: String| src.error(self.cert.span(), "tls.cert", message);
        let key_error = |message: String| src.error(self.key.span(), "tls.key", message);
        let chain = certificates(&cert_path).map_err(cert_error)?;
        let key = private_key(&key_path).map_err(key_error)?;
        let server = server_config(chain, key).map_err(|e| {
            key_error(format!(
                "cannot serve {} with {}: {e}",
                cert_path.display(),
                key_path.display()
            ))
        })?;
        Ok(TlsSettings {
            cert: cert_path,
            key: key_path,
            server: Arc::new(server),
        })
    }
}

/// The certificates in the PEM file at `path`, in order.
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let shown = path.display();
    let chain = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| format!("cannot read certificates from {shown}: {e}"))?;
    if chain.is_empty() {
        return Err(format!(
            "no certificate in {shown} (expected PEM: -----BEGIN CERTIFICATE-----)"
        ));
    }
    Ok(chain)
}

/// The first private key in the PEM file at `path`.
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        format!(
            "cannot read a private key from {}: {e} (expected PEM: -----BEGIN PRIVATE KEY-----)",
            path.display()
        )
    })
}

/// A server config for `chain` and `key` (which must match): TLS 1.2 and 1.3 with
/// rustls's safe defaults, no client certificates, ALPN `h2` then `http/1.1`.
fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig, rustls::Error> {
    // The provider is named, not taken from the process default: with more than one
    // compiled in (redis-rs brings its own choice), the default is ambiguous.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
