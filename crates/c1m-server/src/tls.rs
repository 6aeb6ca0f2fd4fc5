//! TLS (`wss://`) with rustls: loading the certificate, and moving bytes between a
//! socket and a rustls session without blocking.
//!
//! rustls is sans-I/O like our own codec, which suits the event loop: the socket is
//! read into the session (`read_tls`), records are decrypted (`process_new_packets`),
//! plaintext is taken out (`reader`), and encrypted output is pushed back to the socket
//! (`write_tls`) whenever there is some. A broadcast frame is still encoded once, but
//! each TLS connection encrypts its own copy: TLS costs CPU and memory per connection
//! (BENCHMARKS.md measures how much), which is why it is optional.
//!
//! The certificate is re-read on SIGHUP (see `server`): connections opened afterwards
//! use the new one, open ones keep theirs.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection};

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

/// Reads the files and builds a server configuration (HTTP/1.1 only, no ALPN needed).
pub fn load(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = read_certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::Key {
        path: files.key.clone(),
        message: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Mismatch)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::Mismatch)?;
    Ok(Arc::new(config))
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

/// A new server-side session. Our own output bound (`--max-pending-bytes`) limits what
/// is handed to rustls (see `Connection::send`), so rustls's buffers are unlimited.
pub fn session(config: &Arc<ServerConfig>) -> io::Result<ServerConnection> {
    let mut session = ServerConnection::new(Arc::clone(config)).map_err(io::Error::other)?;
    session.set_buffer_limit(None);
    Ok(session)
}

pub use c1m_proto::tls_io::{flush, read};
