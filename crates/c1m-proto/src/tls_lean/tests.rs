//! [`LeanTls`] against rustls's own (buffered) client, in memory: every TLS 1.3 and
//! TLS 1.2 suite, data both ways, records split anywhere, key updates both ways,
//! close_notify, resumption, and damaged or hostile input.

use std::io::{Read, Write};
use std::sync::Arc;

use rustls::crypto::ring as provider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, SupportedCipherSuite};

use super::*;

struct Pair {
    client: ClientConnection,
    server: LeanTls,
    scratch: Vec<u8>,
    /// What the server got as plaintext.
    got: Vec<u8>,
    /// What the client got as plaintext.
    client_got: Vec<u8>,
    closed: bool,
}

fn certified() -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    (
        certified.cert.der().clone(),
        PrivateKeyDer::Pkcs8(certified.key_pair.serialize_der().into()),
    )
}

fn server_config(
    cert: &CertificateDer<'static>,
    key: &PrivateKeyDer<'static>,
) -> Arc<ServerConfig> {
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key.clone_key())
        .unwrap();
    config.ticketer = provider::Ticketer::new().unwrap();
    lean_config(config)
}

fn client_config(cert: &CertificateDer<'static>, suite: SupportedCipherSuite) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let mut provider = provider::default_provider();
    provider.cipher_suites = vec![suite];
    let versions: &[&rustls::SupportedProtocolVersion] = match suite {
        SupportedCipherSuite::Tls13(_) => &[&rustls::version::TLS13],
        _ => &[&rustls::version::TLS12],
    };
    Arc::new(
        ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

impl Pair {
    fn new(server: &Arc<ServerConfig>, client: &Arc<ClientConfig>) -> Pair {
        let name = ServerName::try_from("localhost").unwrap();
        Pair {
            client: ClientConnection::new(Arc::clone(client), name).unwrap(),
            server: LeanTls::new(server).unwrap(),
            scratch: vec![0; LeanTls::scratch_needed()],
            got: Vec::new(),
            client_got: Vec::new(),
            closed: false,
        }
    }

    /// Moves bytes both ways until neither side has anything to say; the client's
    /// bytes reach the server in pieces of `piece` bytes.
    fn pump(&mut self, piece: usize) -> Result<(), TlsError> {
        for _ in 0..100 {
            let mut wire = Vec::new();
            while self.client.wants_write() {
                self.client.write_tls(&mut wire).unwrap();
            }
            let mut to_send = Vec::new();
            // A read takes at most what the scratch buffer has room for.
            for chunk in wire.chunks(piece.min(LeanTls::scratch_needed() / 2)) {
                let kept = self.server.restore_partial(&mut self.scratch);
                self.scratch[kept..kept + chunk.len()].copy_from_slice(chunk);
                let received =
                    self.server
                        .receive(&mut self.scratch, kept + chunk.len(), &mut to_send)?;
                self.got
                    .extend_from_slice(&self.scratch[..received.plaintext]);
                self.closed |= received.closed;
            }
            if wire.is_empty() && to_send.is_empty() {
                return Ok(());
            }
            self.deliver_to_client(&to_send);
        }
        panic!("the two sides never went quiet")
    }

    fn deliver_to_client(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            self.client.read_tls(&mut bytes).unwrap();
            self.client.process_new_packets().unwrap();
            let _ = self.client.reader().read_to_end(&mut self.client_got);
        }
    }

    /// What the client read since it was last asked.
    fn client_reads(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.client_got)
    }

    fn server_sends(&mut self, data: &[u8]) {
        let mut out = Vec::new();
        self.server.seal(data, &mut out).unwrap();
        self.deliver_to_client(&out);
    }
}

/// Every suite the test certificate (ECDSA) can serve.
fn all_suites() -> Vec<SupportedCipherSuite> {
    provider::ALL_CIPHER_SUITES
        .iter()
        .copied()
        .filter(|suite| !format!("{:?}", suite.suite()).contains("_RSA_"))
        .collect()
}

#[test]
fn every_suite_carries_data_both_ways_and_keeps_nothing_while_idle() {
    let (cert, key) = certified();
    let server = server_config(&cert, &key);
    for suite in all_suites() {
        for piece in [1, 7, 100_000] {
            let mut pair = Pair::new(&server, &client_config(&cert, suite));
            pair.client
                .writer()
                .write_all(b"GET / HTTP/1.1\r\n\r\n")
                .unwrap();
            pair.pump(piece).unwrap();
            assert!(pair.server.is_established(), "{suite:?}");
            assert_eq!(
                pair.got, b"GET / HTTP/1.1\r\n\r\n",
                "{suite:?} piece {piece}"
            );
            assert_eq!(
                pair.server.buffered(),
                0,
                "idle: no buffer kept ({suite:?})"
            );
            // Larger than a record, both ways.
            let big: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
            pair.client.writer().write_all(&big).unwrap();
            pair.got.clear();
            pair.pump(piece).unwrap();
            assert_eq!(pair.got, big, "{suite:?}");
            pair.server_sends(&big);
            assert_eq!(pair.client_reads(), big, "{suite:?}");
            pair.server_sends(b"hello");
            assert_eq!(pair.client_reads(), b"hello");
        }
    }
}

#[test]
fn key_updates_from_the_client_and_from_the_server_work() {
    let (cert, key) = certified();
    let server = server_config(&cert, &key);
    for suite in all_suites()
        .into_iter()
        .filter(|s| matches!(s, SupportedCipherSuite::Tls13(_)))
    {
        let mut pair = Pair::new(&server, &client_config(&cert, suite));
        pair.pump(100_000).unwrap();
        for round in 0..3 {
            // rustls asks the server to update its key too.
            pair.client.refresh_traffic_keys().unwrap();
            pair.client.writer().write_all(b"after").unwrap();
            pair.got.clear();
            pair.pump(3).unwrap();
            assert_eq!(pair.got, b"after", "{suite:?} round {round}");
            pair.server_sends(b"back");
            assert_eq!(pair.client_reads(), b"back", "{suite:?} round {round}");
        }
        // The server moves on by itself (as it does after TX_RECORDS_PER_KEY records).
        let State::Established(established) = &mut pair.server.state else {
            panic!("established")
        };
        let mut out = Vec::new();
        established.update_tx(&mut out).unwrap();
        established
            .seal(APPLICATION_DATA, b"fresh key", &mut out)
            .unwrap();
        pair.deliver_to_client(&out);
        assert_eq!(pair.client_reads(), b"fresh key");
    }
}

#[test]
fn close_notify_ends_the_stream_and_the_server_can_say_goodbye() {
    let (cert, key) = certified();
    let server = server_config(&cert, &key);
    for suite in all_suites() {
        let mut pair = Pair::new(&server, &client_config(&cert, suite));
        pair.pump(100_000).unwrap();
        pair.client.writer().write_all(b"last words").unwrap();
        pair.client.send_close_notify();
        pair.pump(100_000).unwrap();
        assert_eq!(pair.got, b"last words");
        assert!(pair.closed, "{suite:?}");

        let mut pair = Pair::new(&server, &client_config(&cert, suite));
        pair.pump(100_000).unwrap();
        let mut out = Vec::new();
        pair.server.close_notify(&mut out);
        pair.deliver_to_client(&out);
        let mut rest = Vec::new();
        assert_eq!(
            pair.client.reader().read_to_end(&mut rest).unwrap(),
            0,
            "clean EOF"
        );
        assert!(pair.client_reads().is_empty());
    }
}

#[test]
fn a_damaged_record_or_a_fatal_alert_fails_the_session() {
    let (cert, key) = certified();
    let server = server_config(&cert, &key);
    let suite = all_suites()[0];
    let mut pair = Pair::new(&server, &client_config(&cert, suite));
    pair.pump(100_000).unwrap();
    pair.client.writer().write_all(b"secret").unwrap();
    let mut wire = Vec::new();
    pair.client.write_tls(&mut wire).unwrap();
    let last = wire.len() - 1;
    wire[last] ^= 1;
    let mut to_send = Vec::new();
    pair.scratch[..wire.len()].copy_from_slice(&wire);
    let result = pair
        .server
        .receive(&mut pair.scratch, wire.len(), &mut to_send);
    assert!(
        matches!(result, Err(TlsError::Record("bad record MAC"))),
        "{result:?}"
    );
    // Failed for good.
    assert!(pair
        .server
        .receive(&mut pair.scratch, 0, &mut to_send)
        .is_err());
    // Garbage instead of a handshake.
    let mut fresh = LeanTls::new(&server).unwrap();
    let mut buf = vec![0; LeanTls::scratch_needed()];
    buf[..16].copy_from_slice(b"GET / HTTP/1.1\r\n");
    assert!(fresh.receive(&mut buf, 16, &mut Vec::new()).is_err());
}

#[test]
fn a_ticket_from_one_connection_resumes_the_next() {
    let (cert, key) = certified();
    let server = server_config(&cert, &key);
    for suite in all_suites() {
        let client = client_config(&cert, suite);
        let mut first = Pair::new(&server, &client);
        first.pump(100_000).unwrap();
        assert_eq!(
            first.client.handshake_kind(),
            Some(rustls::HandshakeKind::Full)
        );
        let mut second = Pair::new(&server, &client);
        second.pump(100_000).unwrap();
        assert_eq!(
            second.client.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed),
            "{suite:?}"
        );
        second.server_sends(b"resumed");
        assert_eq!(second.client_reads(), b"resumed");
    }
}

proptest::proptest! {
    // What comes from the network after the handshake: any bytes are opened or
    // refused, never a panic.
    #[test]
    fn any_bytes_after_the_handshake_are_safe(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..3000), typ in 20u8..25) {
        let (cert, key) = certified_once();
        let server = server_config(cert, key);
        let mut pair = Pair::new(&server, &client_config(cert, all_suites()[0]));
        pair.pump(100_000).unwrap();
        let mut wire = vec![typ, 3, 3];
        wire.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
        wire.extend_from_slice(&bytes);
        let n = wire.len();
        pair.scratch[..n].copy_from_slice(&wire);
        let _ = pair.server.receive(&mut pair.scratch, n, &mut Vec::new());
        let mut raw = bytes.clone();
        let n = raw.len();
        raw.resize(LeanTls::scratch_needed(), 0);
        let _ = pair.server.receive(&mut raw, n, &mut Vec::new());
    }
}

fn certified_once() -> &'static (CertificateDer<'static>, PrivateKeyDer<'static>) {
    static ONCE: std::sync::OnceLock<(CertificateDer<'static>, PrivateKeyDer<'static>)> =
        std::sync::OnceLock::new();
    ONCE.get_or_init(certified)
}

/// What an idle established session keeps (boxed): its keys, secrets and record
/// numbers; a guard against growing it by accident.
#[test]
fn an_established_session_stays_small() {
    let size = std::mem::size_of::<Established>();
    assert!(size <= 320, "Established is {size} bytes");
    assert_eq!(std::mem::size_of::<LeanTls>(), 16);
}

/// Hands `bytes` to `session` in pieces of 1,000: what it received as plaintext goes
/// to `got`, what it says back to `said`.
fn deliver(session: &mut LeanTls, bytes: &[u8], got: &mut Vec<u8>, said: &mut Vec<u8>) {
    let mut buf = vec![0; LeanTls::scratch_needed()];
    for chunk in bytes.chunks(1000) {
        let kept = session.restore_partial(&mut buf);
        buf[kept..kept + chunk.len()].copy_from_slice(chunk);
        let received = session.receive(&mut buf, kept + chunk.len(), said).unwrap();
        got.extend_from_slice(&buf[..received.plaintext]);
    }
}

/// Two lean sessions, client and server, in memory: bytes move between them until
/// both go quiet; returns what each side received as plaintext (client, server).
fn lean_pair_exchange(
    client: &mut LeanTls,
    server: &mut LeanTls,
    mut to_server: Vec<u8>,
) -> (Vec<u8>, Vec<u8>) {
    let (mut client_got, mut server_got) = (Vec::new(), Vec::new());
    for _ in 0..100 {
        let mut to_client = Vec::new();
        deliver(server, &to_server, &mut server_got, &mut to_client);
        to_server = Vec::new();
        deliver(client, &to_client, &mut client_got, &mut to_server);
        if to_server.is_empty() && to_client.is_empty() {
            return (client_got, server_got);
        }
    }
    panic!("never quiet")
}

#[test]
fn a_lean_client_and_a_lean_server_talk_resume_and_update_keys() {
    let (cert, key) = certified();
    let server_config = server_config(&cert, &key);
    for suite in all_suites() {
        let rustls_client = client_config(&cert, suite);
        let client_config = lean_client_config((*rustls_client).clone());
        let name = || ServerName::try_from("localhost").unwrap();
        for round in 0..2 {
            let mut to_server = Vec::new();
            let mut client = LeanTls::client(&client_config, name(), &mut to_server).unwrap();
            // Given before the handshake is over: sent once it is.
            client
                .seal(b"GET / HTTP/1.1\r\n\r\n", &mut to_server)
                .unwrap();
            let mut server = LeanTls::new(&server_config).unwrap();
            let (_, got) = lean_pair_exchange(&mut client, &mut server, to_server);
            assert_eq!(got, b"GET / HTTP/1.1\r\n\r\n", "{suite:?}");
            assert!(client.is_established() && server.is_established());
            assert_eq!(client.resumed(), round == 1, "{suite:?} round {round}");
            assert_eq!(server.resumed(), round == 1, "{suite:?} round {round}");
            let mut to_client = Vec::new();
            server.seal(b"HTTP/1.1 101", &mut to_client).unwrap();
            let mut buf = vec![0; LeanTls::scratch_needed()];
            buf[..to_client.len()].copy_from_slice(&to_client);
            let got = client
                .receive(&mut buf, to_client.len(), &mut Vec::new())
                .unwrap();
            assert_eq!(&buf[..got.plaintext], b"HTTP/1.1 101");
            assert_eq!(client.buffered(), 0);
            if suite.version() == &rustls::version::TLS13 {
                // Both sides move to new keys; data still flows both ways.
                for update in [Side::Client, Side::Server] {
                    let who = if update == Side::Client {
                        &mut client
                    } else {
                        &mut server
                    };
                    let State::Established(established) = &mut who.state else {
                        panic!("established")
                    };
                    let mut out = Vec::new();
                    established.update_tx(&mut out).unwrap();
                    let mut data = Vec::new();
                    established
                        .seal(APPLICATION_DATA, b"new key", &mut data)
                        .unwrap();
                    out.extend_from_slice(&data);
                    let other = if update == Side::Client {
                        &mut server
                    } else {
                        &mut client
                    };
                    buf[..out.len()].copy_from_slice(&out);
                    let got = other.receive(&mut buf, out.len(), &mut Vec::new()).unwrap();
                    assert_eq!(&buf[..got.plaintext], b"new key", "{suite:?} {round}");
                }
            }
        }
    }
}
