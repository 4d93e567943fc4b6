//! TLS for the proxy listener: rustls with ALPN `h2` and `http/1.1` from PEM files.

use std::io;
use std::path::Path;
use std::sync::Arc;

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;

/// Why the TLS configuration could not be loaded; names the key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.{key}: cannot read {path}: {source}")]
    Read {
        key: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("tls.{key}: {message}")]
    Invalid { key: &'static str, message: String },
}

/// Builds the acceptor from `tls.cert` (chain) and `tls.key`.
pub fn acceptor(config: &TlsConfig) -> Result<TlsAcceptor, TlsError> {
    let certs = read_certs(&config.cert)?;
    let key = read_key(&config.key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid {
            key: "cert",
            message: e.to_string(),
        })?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Invalid {
            key: "key",
            message: format!("does not match tls.cert or is unusable: {e}"),
        })?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(server)))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        key: "cert",
        path: path.display().to_string(),
        source,
    })?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid {
            key: "cert",
            message: format!("{}: not PEM: {e}", path.display()),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Invalid {
            key: "cert",
            message: format!("{}: no CERTIFICATE block", path.display()),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        key: "key",
        path: path.display().to_string(),
        source,
    })?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| TlsError::Invalid {
            key: "key",
            message: format!("{}: not PEM: {e}", path.display()),
        })?
        .ok_or_else(|| TlsError::Invalid {
            key: "key",
            message: format!("{}: no PRIVATE KEY block", path.display()),
        })
}
