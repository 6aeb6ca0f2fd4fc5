//! TLS (`wss://`): loading the certificate, and a session per connection.
//!
//! Each connection gets a [`LeanTls`] (`c1m_proto::tls_lean`): rustls runs the
//! handshake, then the session keeps only its traffic keys, so an idle `wss://`
//! connection costs about as much as its keys (BENCHMARKS.md). A broadcast frame is
//! still encoded once, but each TLS connection seals its own copy. Session tickets are
//! stateless, so resumption costs no memory per client, and sealed with a key every
//! process of the node shares (see `tickets`), so a client resumes whichever worker
//! takes its reconnect, and after a certificate reload too.
//!
//! The certificate is re-read on SIGHUP (see `server`): connections opened afterwards
//! use the new one, open ones keep theirs.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use c1m_proto::tls_lean::LeanTls;

use crate::tickets::SharedTicketer;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

/// Where the certificate chain and private key are (PEM files).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the TLS certificate file {path}: {message}")]
    Cert { path: PathBuf, message: String },
    #[error("the TLS certificate file {path} holds no certificate")]
    NoCert { path: PathBuf },
    #[error("cannot read a private key from {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("the TLS certificate and key do not go together: {0}")]
    Mismatch(rustls::Error),
}

/// Reads the files and builds a server configuration (HTTP/1.1 only, no ALPN needed)
/// whose session tickets `ticketer` seals.
pub fn load(
    files: &TlsFiles,
    ticketer: &Arc<SharedTicketer>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = read_certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::Key {
        path: files.key.clone(),
        message: e.to_string(),
    })?;
    let mut provider = rustls::crypto::ring::default_provider();
    // The server picks the suite, AES-128-GCM with SHA-256 first: its key schedule runs
    // on SHA-256, which x86 CPUs do in hardware (SHA-NI), while SHA-384 (AES-256-GCM's,
    // rustls's and browsers' usual first choice) does not: 14 % of the server's CPU in
    // a handshake storm went to SHA-512 blocks (perf, BENCHMARKS.md).
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Mismatch)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::Mismatch)?;
    config.ignore_client_order = true;
    // Stateless tickets: resumption costs no memory per client here.
    config.ticketer = Arc::clone(ticketer) as Arc<dyn rustls::server::ProducesTickets>;
    Ok(c1m_proto::tls_lean::lean_config(config))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let error = |message: String| TlsError::Cert {
        path: path.to_owned(),
        message,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::NoCert {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// A new server-side session.
pub fn session(config: &Arc<ServerConfig>) -> io::Result<LeanTls> {
    LeanTls::new(config).map_err(io::Error::other)
}
