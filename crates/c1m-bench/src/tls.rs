//! The bench's TLS client settings for `wss://` targets.
//!
//! By default the server's certificate is checked against the system's CA bundle, or
//! against `--ca-cert`; `--insecure` skips the check (self-signed test certificates),
//! which the report then says, since it measures a connection no client should trust.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};

use rustls::client::{
    ClientSessionStore, Resumption, Tls12ClientSessionValue, Tls13ClientSessionValue,
};
use rustls::NamedGroup;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// Debian's bundle of trusted CAs (package `ca-certificates`).
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("cannot read CA certificates from {path}: {message}")]
    CaFile { path: String, message: String },
    #[error("no CA certificate to check the server with: give --ca-cert FILE, or --insecure for a test certificate")]
    NoRoots,
}

/// Builds the client configuration: trust `ca_file` (or the system bundle), or nothing
/// at all when `insecure`; keep up to `tickets` session tickets for reconnects (0:
/// never resume).
pub fn client_config(
    insecure: bool,
    ca_file: Option<&Path>,
    tickets: usize,
) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions");
    let mut config = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
            .with_no_client_auth()
    } else {
        let path = ca_file.unwrap_or(Path::new(SYSTEM_CA_BUNDLE));
        let error = |message: String| TlsConfigError::CaFile {
            path: path.display().to_string(),
            message,
        };
        let mut roots = RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(path).map_err(|e| error(e.to_string()))?;
        for cert in certs {
            let cert = cert.map_err(|e| error(e.to_string()))?;
            roots.add(cert).map_err(|e| error(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(TlsConfigError::NoRoots);
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.resumption = match tickets {
        0 => Resumption::disabled(),
        n => Resumption::store(Arc::new(TicketPool::new(n))),
    };
    // The bench's sessions keep only their keys once connected (see `tls_lean`).
    Ok(c1m_proto::tls_lean::lean_client_config(config))
}

/// The session tickets of every connection of a bench worker, so that each reconnect
/// can resume: rustls's own cache keeps a handful per server name (right for a browser,
/// too few for thousands of clients of one server). Tickets are used once (TLS 1.3);
/// the oldest are dropped past `capacity`.
#[derive(Debug)]
struct TicketPool {
    capacity: usize,
    inner: Mutex<Pool>,
}

#[derive(Debug, Default)]
struct Pool {
    kx_hints: HashMap<ServerName<'static>, NamedGroup>,
    tls12: HashMap<ServerName<'static>, Tls12ClientSessionValue>,
    tls13: HashMap<ServerName<'static>, VecDeque<Tls13ClientSessionValue>>,
}

impl TicketPool {
    fn new(capacity: usize) -> TicketPool {
        TicketPool {
            capacity: capacity.max(1),
            inner: Mutex::default(),
        }
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        // A panic elsewhere cannot leave a ticket list half-changed: keep using it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ClientSessionStore for TicketPool {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.pool().kx_hints.insert(server_name, group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.pool().kx_hints.get(server_name).copied()
    }

    fn set_tls12_session(&self, server_name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.pool().tls12.insert(server_name, value);
    }

    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.pool().tls12.get(server_name).cloned()
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.pool().tls12.remove(server_name);
    }

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        let mut pool = self.pool();
        let tickets = pool.tls13.entry(server_name).or_default();
        if tickets.len() >= self.capacity {
            tickets.pop_front();
        }
        tickets.push_back(value);
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        // The newest: the likeliest to be still valid.
        self.pool().tls13.get_mut(server_name)?.pop_back()
    }
}

/// `--insecure`: accepts any certificate, but still checks that the handshake
/// signatures are valid for the certificate presented.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
