//! The TLS record path of `LeanTls` (what a `wss://` server reads from the network
//! once the handshake is over): a lean client and a lean server are connected in
//! memory, then the input is a series of steps, each either raw bytes to the server,
//! a record of any content type sealed by the client (alerts, handshake messages such
//! as key updates, padding-free and empty records, oversized ones), or data the
//! server seals for the client. Nothing may panic; a session that failed stays
//! failed; data that both sides sealed with their keys arrives intact. The suite and
//! protocol version come from the first byte.
#![no_main]

use std::sync::{Arc, OnceLock};

use c1m_proto::tls_lean::{lean_client_config, lean_config, LeanTls};
use libfuzzer_sys::fuzz_target;
use rustls::crypto::ring as provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// A self-signed P-256 certificate for `localhost` (valid until 2126), for fuzzing only.
const CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBkjCCATigAwIBAgIUaFHN7d2n6G4IbxC6PLu6qI/WJ+swCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJbG9jYWxob3N0MCAXDTI2MTIwMTE0MDQwNVoYDzIxMjYxMTA3
MTQwNDA1WjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAAQh9SuUXwNQ3VgOPo4NIlpchYOKztfWbPICLZTOKH/wiel0xZP3C0Po
5rEy2igVjw08Kz+bECEYAVi5iVCD77tZo2YwZDAdBgNVHQ4EFgQUEChZfEU9lq/0
GmScTdncS2r9g1gwHwYDVR0jBBgwFoAUEChZfEU9lq/0GmScTdncS2r9g1gwFAYD
VR0RBA0wC4IJbG9jYWxob3N0MAwGA1UdEwEB/wQCMAAwCgYIKoZIzj0EAwIDSAAw
RQIgcZc9MT9YLxQSpoi4qGhBlenNfYWbgKCrFcmb6WnX2sECIQCosZBTUu0B0MvV
HZ8oV+rG917fjsnej1F/oK4+l8NArQ==
-----END CERTIFICATE-----
";
const KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg3R/FtuyItJwIGLI/
U5n950Arfbcl1QRkoPgI6difwgyhRANCAAQh9SuUXwNQ3VgOPo4NIlpchYOKztfW
bPICLZTOKH/wiel0xZP3C0Po5rEy2igVjw08Kz+bECEYAVi5iVCD77tZ
-----END PRIVATE KEY-----
";

struct Configs {
    server: Arc<rustls::ServerConfig>,
    /// One client configuration per suite the certificate can serve.
    clients: Vec<Arc<rustls::ClientConfig>>,
}

fn configs() -> &'static Configs {
    static CONFIGS: OnceLock<Configs> = OnceLock::new();
    CONFIGS.get_or_init(|| {
        let cert = CertificateDer::from_pem_slice(CERT.as_bytes()).unwrap();
        let key = PrivateKeyDer::from_pem_slice(KEY.as_bytes()).unwrap();
        let server =
            rustls::ServerConfig::builder_with_provider(Arc::new(provider::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![cert.clone()], key)
                .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let clients = provider::ALL_CIPHER_SUITES
            .iter()
            .filter(|suite| !format!("{:?}", suite.suite()).contains("_RSA_"))
            .map(|suite| {
                let mut p = provider::default_provider();
                p.cipher_suites = vec![*suite];
                let versions: &[&rustls::SupportedProtocolVersion] = match suite {
                    rustls::SupportedCipherSuite::Tls13(_) => &[&rustls::version::TLS13],
                    _ => &[&rustls::version::TLS12],
                };
                let config = rustls::ClientConfig::builder_with_provider(Arc::new(p))
                    .with_protocol_versions(versions)
                    .unwrap()
                    .with_root_certificates(roots.clone())
                    .with_no_client_auth();
                lean_client_config(config)
            })
            .collect();
        Configs {
            server: lean_config(server),
            clients,
        }
    })
}

/// Hands `bytes` to `session` in pieces of at most `piece` (at least one call, even
/// for no bytes). Returns the plaintext and what the session sent back, or `None` once
/// it failed.
fn feed(session: &mut LeanTls, bytes: &[u8], piece: usize) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut buf = vec![0; LeanTls::scratch_needed()];
    let (mut plaintext, mut said) = (Vec::new(), Vec::new());
    let mut chunks: Vec<&[u8]> = bytes.chunks(piece.max(1)).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    for chunk in chunks {
        let kept = session.restore_partial(&mut buf);
        buf[kept..kept + chunk.len()].copy_from_slice(chunk);
        let received = session
            .receive(&mut buf, kept + chunk.len(), &mut said)
            .ok()?;
        plaintext.extend_from_slice(&buf[..received.plaintext]);
    }
    Some((plaintext, said))
}

fuzz_target!(|data: &[u8]| {
    let Some((&choice, mut steps)) = data.split_first() else {
        return;
    };
    let configs = configs();
    let client_config = &configs.clients[usize::from(choice) % configs.clients.len()];
    let name = ServerName::try_from("localhost").unwrap();
    let mut hello = Vec::new();
    let mut client = LeanTls::client(client_config, name, &mut hello).unwrap();
    let mut server = LeanTls::new(&configs.server).unwrap();
    // The handshake, in memory.
    let mut to_server = hello;
    for _ in 0..10 {
        let mut to_client = Vec::new();
        let mut buf = vec![0; LeanTls::scratch_needed()];
        buf[..to_server.len()].copy_from_slice(&to_server);
        server
            .receive(&mut buf, to_server.len(), &mut to_client)
            .unwrap();
        to_server.clear();
        buf[..to_client.len()].copy_from_slice(&to_client);
        client
            .receive(&mut buf, to_client.len(), &mut to_server)
            .unwrap();
        if to_server.is_empty() && client.is_established() && server.is_established() {
            break;
        }
    }
    assert!(client.is_established() && server.is_established());

    // Once a side failed it must refuse everything; while both stand, data sealed
    // by one arrives intact at the other.
    let (mut server_failed, mut client_failed) = (false, false);
    while let [op, len, rest @ ..] = steps {
        let len = usize::from(*len).min(rest.len());
        let (payload, after) = rest.split_at(len);
        steps = after;
        let piece = usize::from(op >> 3) * 97 + 1;
        let (bytes, intact) = match op % 3 {
            // Raw bytes from the network.
            0 => (payload.to_vec(), false),
            // A record of any content type, sealed by the client.
            1 => {
                let content_type = payload.first().copied().unwrap_or(23);
                let mut record = Vec::new();
                client.seal_record(content_type, payload, &mut record);
                // Intact unless raw bytes left the start of a bogus record before it.
                let clean = server.buffered() == 0;
                (record, content_type == 23 && !client_failed && clean)
            }
            // Data from the server to the client.
            _ => {
                let mut sealed = Vec::new();
                if server.seal(payload, &mut sealed).is_ok() {
                    match feed(&mut client, &sealed, piece) {
                        Some((got, _)) => {
                            assert!(!client_failed, "a failed client took input again");
                            assert_eq!(got, payload, "server data arrives intact");
                        }
                        None => client_failed = true,
                    }
                } else {
                    assert!(server_failed, "a working server could not seal");
                }
                continue;
            }
        };
        match feed(&mut server, &bytes, piece) {
            Some((plaintext, said)) => {
                assert!(!server_failed, "a failed server took input again");
                if intact {
                    assert_eq!(plaintext, payload, "client data arrives intact");
                }
                // What the server answered (a key update) reaches the client.
                if !said.is_empty() && feed(&mut client, &said, piece).is_none() {
                    client_failed = true;
                }
            }
            None => server_failed = true,
        }
    }
});
