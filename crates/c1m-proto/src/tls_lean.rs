//! A lean server-side TLS session: rustls for the handshake, then only what an
//! established connection needs (feature `tls`).
//!
//! Why: a `rustls::ServerConnection` keeps its record layer's expanded AES keys (about
//! half a KiB per direction), its buffers and its handshake state for the
//! connection's life: ~8 KiB per idle `wss://` client (BENCHMARKS.md). A push server's
//! connections are idle nearly all the time. So the handshake runs in rustls's
//! *unbuffered* API (we own the buffers, and free them), and once it is done the
//! session keeps, per direction, the raw traffic key, IV and sequence number (taken
//! from rustls as kernel TLS offload takes them), plus for TLS 1.3 the two application
//! traffic secrets, from which a KeyUpdate derives the next keys (RFC 8446 §7.2). Each
//! record is sealed or opened with a ring AEAD key built from those bytes for that
//! record: a few hundred nanoseconds of key setup, instead of keeping the expanded keys
//! (and rustls's kernel-connection state, 560 B and more) in memory.
//!
//! The traffic secrets come through rustls's key log hook ([`SecretCatcher`]): rustls
//! reports them while it runs the handshake, on this thread, inside one call for one
//! session, so the session takes them right after that call.
//!
//! Written by hand (the record layer, RFC 8446 §5 and RFC 5246 §6.2.3.3, and the key
//! update schedule, ~200 lines) because rustls offers no public way to rebuild its
//! encrypter from stored key bytes, and kernel TLS (which would do this in the kernel)
//! is not available on every machine. rustls still does everything else: the
//! handshake, certificates and session tickets (sent during the handshake).
//!
//! Sans-I/O: the caller reads the socket into a buffer and hands it to [`LeanTls::receive`],
//! which decrypts in place and leaves the plaintext at the front of that buffer; every
//! record the session wants sent (handshake messages, a key update, alerts, sealed
//! application data) is appended to a `Vec` that the caller sends in order with its
//! other output.

use std::cell::RefCell;
use std::sync::Arc;

use ring::{aead, hkdf};
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::pki_types::ServerName;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{ClientConfig, ConnectionTrafficSecrets, ProtocolVersion, ServerConfig};

/// Largest plaintext of one record (2^14).
pub const MAX_PLAINTEXT: usize = 16 * 1024;
/// Largest ciphertext of one record we accept (RFC 8446: 2^14 + 256).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
const HEADER: usize = 5;
const TAG: usize = 16;
/// TLS 1.2 AES-GCM sends 8 bytes of its nonce in each record.
const EXPLICIT_NONCE: usize = 8;

const CHANGE_CIPHER_SPEC: u8 = 20;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;
const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;
const CLOSE_NOTIFY: u8 = 0;
const USER_CANCELED: u8 = 90;

/// Records sealed under one key before we move to a fresh one (a TLS 1.3 key update):
/// far below AES-GCM's confidentiality limit (2^24.5 records).
const TX_RECORDS_PER_KEY: u64 = 1 << 23;

/// Why a session failed; the connection is closed (its peer is not told more).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS handshake: {0}")]
    Handshake(rustls::Error),
    #[error("TLS record: {0}")]
    Record(&'static str),
    #[error("TLS alert {0} from the peer")]
    Alert(u8),
    #[error("TLS key update: {0}")]
    KeyUpdate(&'static str),
}

/// What a call to [`LeanTls::receive`] produced.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Received {
    /// Plaintext bytes now at the front of the buffer.
    pub plaintext: usize,
    /// The peer sent close_notify: nothing more will come.
    pub closed: bool,
}

/// One TLS session, server or client side (16 bytes; its state is boxed).
pub struct LeanTls {
    state: State,
}

enum State {
    Handshaking(Box<Handshake>),
    Established(Box<Established>),
    Failed,
}

struct Handshake {
    conn: Unbuffered,
    /// Application data given before the handshake was over (a client's first
    /// request), sealed as soon as it is.
    early_plaintext: Vec<u8>,
    /// Input not yet taken by rustls.
    incoming: Vec<u8>,
    /// TLS 1.3: the application traffic secrets, once rustls has derived them.
    secrets: Option<TrafficSecrets>,
}

/// rustls's handshake, either side.
enum Unbuffered {
    Server(UnbufferedServerConnection),
    Client(UnbufferedClientConnection),
}

/// An established session: what it needs while idle, and nothing else.
struct Established {
    /// Which side of the connection this session is.
    local: Side,
    /// TLS 1.3: the current application traffic secrets (for a key update).
    secrets: Option<TrafficSecrets>,
    /// A client's rustls state for the session tickets the server sends after the
    /// handshake (so a later connection resumes); dropped at the first application
    /// data, which servers send after their tickets.
    tickets: Option<Box<KernelConnection<ClientConnectionData>>>,
    records: RecordLayer,
    /// The start of a record whose rest has not come yet (unallocated when empty).
    partial: Vec<u8>,
    /// The peer sent close_notify: whatever comes after is not read.
    peer_closed: bool,
    /// The handshake resumed an earlier session (a ticket).
    resumed: bool,
}

impl LeanTls {
    /// A new server-side session. `config` must come from [`lean_config`].
    pub fn new(config: &Arc<ServerConfig>) -> Result<LeanTls, TlsError> {
        let conn =
            UnbufferedServerConnection::new(Arc::clone(config)).map_err(TlsError::Handshake)?;
        Ok(LeanTls::handshaking(Unbuffered::Server(conn)))
    }

    /// A new client-side session to `name`; its ClientHello is appended to `to_send`.
    /// `config` must come from [`lean_client_config`].
    pub fn client(
        config: &Arc<ClientConfig>,
        name: ServerName<'static>,
        to_send: &mut Vec<u8>,
    ) -> Result<LeanTls, TlsError> {
        let conn = UnbufferedClientConnection::new(Arc::clone(config), name)
            .map_err(TlsError::Handshake)?;
        let mut session = LeanTls::handshaking(Unbuffered::Client(conn));
        session.receive(&mut [], 0, to_send)?;
        Ok(session)
    }

    fn handshaking(conn: Unbuffered) -> LeanTls {
        LeanTls {
            state: State::Handshaking(Box::new(Handshake {
                conn,
                early_plaintext: Vec::new(),
                incoming: Vec::new(),
                secrets: None,
            })),
        }
    }

    /// Whether the handshake is in progress (neither over nor failed).
    pub fn is_handshaking(&self) -> bool {
        matches!(self.state, State::Handshaking(_))
    }

    /// Whether the handshake is over.
    pub fn is_established(&self) -> bool {
        matches!(self.state, State::Established(_))
    }

    /// The negotiated protocol version, once established.
    pub fn protocol_version(&self) -> Option<ProtocolVersion> {
        match &self.state {
            State::Established(e) => Some(e.records.version),
            _ => None,
        }
    }

    /// Whether the handshake resumed an earlier session (with a ticket).
    pub fn resumed(&self) -> bool {
        matches!(&self.state, State::Established(e) if e.resumed)
    }

    /// Bytes the session holds beyond its fixed size (for tests and measurements).
    pub fn buffered(&self) -> usize {
        match &self.state {
            State::Handshaking(h) => h.incoming.capacity(),
            State::Established(e) => e.partial.capacity(),
            State::Failed => 0,
        }
    }

    /// Takes `buf[..len]`, the bytes just read from the socket (`buf` is the caller's
    /// scratch buffer, at least [`LeanTls::scratch_needed`] long): decrypts what is
    /// complete, leaves the plaintext at the front of `buf`, and appends whatever must
    /// be sent (in order, before any later application data) to `to_send`.
    ///
    /// Call [`LeanTls::restore_partial`] first: it puts back the start of a record
    /// kept from the previous call.
    pub fn receive(
        &mut self,
        buf: &mut [u8],
        len: usize,
        to_send: &mut Vec<u8>,
    ) -> Result<Received, TlsError> {
        let result = match &mut self.state {
            State::Handshaking(handshake) => {
                handshake.incoming.extend_from_slice(&buf[..len]);
                match handshake.advance(buf, to_send) {
                    Ok((received, true)) => {
                        let State::Handshaking(handshake) =
                            std::mem::replace(&mut self.state, State::Failed)
                        else {
                            unreachable!("matched above");
                        };
                        let mut established = handshake.into_established(to_send)?;
                        // Whatever followed the handshake's last record (a whole
                        // record rustls left, or the start of one) is ours now.
                        let rest = std::mem::take(&mut established.partial);
                        let mut more = Received::default();
                        if !rest.is_empty() {
                            let start = received.plaintext;
                            let room = buf.len() - start;
                            if rest.len() > room {
                                return Err(TlsError::Record("record too long"));
                            }
                            buf[start..start + rest.len()].copy_from_slice(&rest);
                            more =
                                established.open_records(&mut buf[start..], rest.len(), to_send)?;
                        }
                        self.state = State::Established(established);
                        Ok(Received {
                            plaintext: received.plaintext + more.plaintext,
                            closed: more.closed,
                        })
                    }
                    Ok((received, false)) => Ok(received),
                    Err(e) => Err(e),
                }
            }
            State::Established(established) => established.open_records(buf, len, to_send),
            State::Failed => Err(TlsError::Record("the session failed earlier")),
        };
        if result.is_err() {
            self.state = State::Failed;
        }
        result
    }

    /// How many bytes of `buf` the start of a record kept from the last call takes
    /// back: read the socket into `buf[returned..]`, then call [`LeanTls::receive`]
    /// with the total. The kept bytes are freed.
    pub fn restore_partial(&mut self, buf: &mut [u8]) -> usize {
        let State::Established(established) = &mut self.state else {
            return 0;
        };
        let partial = std::mem::take(&mut established.partial);
        buf[..partial.len()].copy_from_slice(&partial);
        partial.len()
    }

    /// Reads the socket once through `read` (into `buf`, after the start of a record
    /// kept from last time) and takes what came, as [`LeanTls::receive`]. The end of
    /// the stream without close_notify counts as closed too (a WebSocket's own close
    /// handshake says whether the end was orderly). A read error (`WouldBlock`
    /// included) leaves the session as it was.
    pub fn read_with(
        &mut self,
        buf: &mut [u8],
        to_send: &mut Vec<u8>,
        read: impl FnOnce(&mut [u8]) -> std::io::Result<usize>,
    ) -> std::io::Result<Received> {
        if let State::Established(established) = &self.state {
            if established.peer_closed {
                return Ok(Received {
                    plaintext: 0,
                    closed: true,
                });
            }
        }
        let kept = self.restore_partial(buf);
        let n = match read(&mut buf[kept..]) {
            Ok(n) => n,
            Err(e) => {
                if let State::Established(established) = &mut self.state {
                    established.partial = buf[..kept].to_vec();
                }
                return Err(e);
            }
        };
        if n == 0 {
            return Ok(Received {
                plaintext: 0,
                closed: true,
            });
        }
        self.receive(buf, kept + n, to_send)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    /// At most how many bytes sealing `plaintext_len` bytes adds (headers, tags, and
    /// a key update when one is due).
    pub const fn seal_overhead(plaintext_len: usize) -> usize {
        (plaintext_len / MAX_PLAINTEXT + 1) * (HEADER + EXPLICIT_NONCE + 1 + TAG) + 64
    }

    /// The scratch buffer a caller needs: room for a kept partial record plus a read.
    pub const fn scratch_needed() -> usize {
        2 * (HEADER + MAX_CIPHERTEXT)
    }

    /// Seals application data into records appended to `out`. Before the handshake is
    /// over it is kept, and sealed (into the `to_send` of [`LeanTls::receive`]) once
    /// the handshake is.
    pub fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), TlsError> {
        match &mut self.state {
            State::Established(e) => e.seal(APPLICATION_DATA, plaintext, out),
            State::Handshaking(h) => {
                h.early_plaintext.extend_from_slice(plaintext);
                Ok(())
            }
            State::Failed => Err(TlsError::Record("the session failed earlier")),
        }
    }

    /// Seals `plaintext` as records of any content type (for tests and fuzzing: a peer
    /// that sends odd records). Nothing before the handshake is over.
    #[doc(hidden)]
    pub fn seal_record(&mut self, content_type: u8, plaintext: &[u8], out: &mut Vec<u8>) {
        if let State::Established(e) = &mut self.state {
            let _ = e.seal(content_type, plaintext, out);
        }
    }

    /// Appends a close_notify alert to `out` (nothing before the handshake is over).
    pub fn close_notify(&mut self, out: &mut Vec<u8>) {
        if let State::Established(e) = &mut self.state {
            let _ = e.seal(ALERT, &[1, CLOSE_NOTIFY], out);
        }
    }
}

impl std::fmt::Debug for LeanTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys.
        let state = match &self.state {
            State::Handshaking(_) => "handshaking",
            State::Established(_) => "established",
            State::Failed => "failed",
        };
        f.debug_struct("LeanTls").field("state", &state).finish()
    }
}

impl Handshake {
    /// Runs rustls until it needs more input or the handshake is over (`true`).
    /// Application data that came during the handshake goes to the front of `buf`.
    fn advance(
        &mut self,
        buf: &mut [u8],
        to_send: &mut Vec<u8>,
    ) -> Result<(Received, bool), TlsError> {
        let mut received = Received::default();
        loop {
            let incoming = &mut self.incoming;
            let step = match &mut self.conn {
                Unbuffered::Server(conn) => drive(
                    conn.process_tls_records(incoming),
                    buf,
                    to_send,
                    &mut received,
                ),
                Unbuffered::Client(conn) => drive(
                    conn.process_tls_records(incoming),
                    buf,
                    to_send,
                    &mut received,
                ),
            };
            // Secrets rustls reported during that call are this session's.
            if let Some(caught) = SecretCatcher::take() {
                self.secrets = Some(caught);
            }
            let (discard, step) = step?;
            self.incoming.drain(..discard);
            match step {
                Step::Done => return Ok((received, true)),
                Step::Blocked => {
                    if self.incoming.len() > 64 * 1024 {
                        return Err(TlsError::Record("handshake too long"));
                    }
                    return Ok((received, false));
                }
                Step::Again => {}
            }
        }
    }

    /// The handshake is over: keep only what an established session needs (and seal
    /// the application data given meanwhile into `to_send`).
    fn into_established(self, to_send: &mut Vec<u8>) -> Result<Box<Established>, TlsError> {
        let Handshake {
            conn,
            early_plaintext,
            incoming,
            secrets: traffic,
        } = self;
        // rustls's kernel-connection state is dropped (but for a client's tickets):
        // the secrets of a key update are kept here, smaller.
        let resumed = match &conn {
            Unbuffered::Server(conn) => conn.handshake_kind(),
            Unbuffered::Client(conn) => conn.handshake_kind(),
        } == Some(rustls::HandshakeKind::Resumed);
        let (local, secrets, version, tickets) = match conn {
            Unbuffered::Server(conn) => {
                let (secrets, kernel) = conn
                    .dangerous_into_kernel_connection()
                    .map_err(TlsError::Handshake)?;
                (Side::Server, secrets, kernel.protocol_version(), None)
            }
            Unbuffered::Client(conn) => {
                let (secrets, kernel) = conn
                    .dangerous_into_kernel_connection()
                    .map_err(TlsError::Handshake)?;
                let version = kernel.protocol_version();
                let tickets = (version == ProtocolVersion::TLSv1_3).then(|| Box::new(kernel));
                (Side::Client, secrets, version, tickets)
            }
        };
        if version == ProtocolVersion::TLSv1_3 && traffic.is_none() {
            return Err(TlsError::KeyUpdate(
                "no traffic secrets (lean_config sets the key log that catches them)",
            ));
        }
        let records = RecordLayer::new(version, secrets.tx, secrets.rx)?;
        let mut established = Box::new(Established {
            local,
            secrets: traffic,
            tickets,
            records,
            partial: incoming,
            peer_closed: false,
            resumed,
        });
        if !early_plaintext.is_empty() {
            established.seal(APPLICATION_DATA, &early_plaintext, to_send)?;
        }
        Ok(established)
    }
}

/// What one handshake step asks for next.
enum Step {
    /// Call rustls again.
    Again,
    /// rustls needs more input.
    Blocked,
    /// The handshake is over.
    Done,
}

/// Handles one state of rustls's handshake (either side): records to send go to
/// `to_send`, application data to `buf` after `received.plaintext`. Returns how many
/// input bytes rustls is done with, and what next.
fn drive<Data>(
    status: UnbufferedStatus<'_, '_, Data>,
    buf: &mut [u8],
    to_send: &mut Vec<u8>,
    received: &mut Received,
) -> Result<(usize, Step), TlsError> {
    let discard = status.discard;
    let state = status.state.map_err(TlsError::Handshake)?;
    let step = match state {
        ConnectionState::EncodeTlsData(mut encode) => {
            let start = to_send.len();
            to_send.resize(start + 4096, 0);
            loop {
                match encode.encode(&mut to_send[start..]) {
                    Ok(n) => {
                        to_send.truncate(start + n);
                        break;
                    }
                    Err(EncodeError::InsufficientSize(size)) => {
                        to_send.resize(start + size.required_size, 0);
                    }
                    Err(EncodeError::AlreadyEncoded) => {
                        to_send.truncate(start);
                        break;
                    }
                }
            }
            Step::Again
        }
        // The records are in `to_send` already: the caller sends them.
        ConnectionState::TransmitTlsData(transmit) => {
            transmit.done();
            Step::Again
        }
        ConnectionState::ReadTraffic(mut traffic) => {
            while let Some(record) = traffic.next_record() {
                let record = record.map_err(TlsError::Handshake)?;
                let end = received.plaintext + record.payload.len();
                if end > buf.len() {
                    return Err(TlsError::Record("too much data during the handshake"));
                }
                buf[received.plaintext..end].copy_from_slice(record.payload);
                received.plaintext = end;
            }
            Step::Again
        }
        ConnectionState::ReadEarlyData(_) => {
            return Err(TlsError::Record("early data is not accepted"));
        }
        ConnectionState::BlockedHandshake => Step::Blocked,
        ConnectionState::WriteTraffic(_) => Step::Done,
        ConnectionState::PeerClosed | ConnectionState::Closed => {
            received.closed = true;
            Step::Blocked
        }
        _ => return Err(TlsError::Record("unexpected handshake state")),
    };
    Ok((discard, step))
}

impl Established {
    /// Opens every complete record of `buf[..len]` in place; plaintext goes to the
    /// front of `buf`, an incomplete last record to `partial`.
    fn open_records(
        &mut self,
        buf: &mut [u8],
        len: usize,
        to_send: &mut Vec<u8>,
    ) -> Result<Received, TlsError> {
        let mut received = Received::default();
        let mut at = 0;
        while len - at >= HEADER {
            let header = &buf[at..at + HEADER];
            let body = usize::from(u16::from_be_bytes([header[3], header[4]]));
            if body > MAX_CIPHERTEXT + EXPLICIT_NONCE {
                return Err(TlsError::Record("record too long"));
            }
            if len - at < HEADER + body {
                break;
            }
            let record = &mut buf[at..at + HEADER + body];
            let (typ, range) = self.records.open(record)?;
            let (start, end) = (at + HEADER + range.start, at + HEADER + range.end);
            at += HEADER + body;
            match typ {
                APPLICATION_DATA => {
                    // Servers send their tickets before any data: rustls's state for
                    // them is no longer needed.
                    self.tickets = None;
                    // Plaintext never overtakes the record it came from.
                    buf.copy_within(start..end, received.plaintext);
                    received.plaintext += end - start;
                }
                ALERT => match buf[start..end] {
                    [_, CLOSE_NOTIFY] => {
                        received.closed = true;
                        self.peer_closed = true;
                        return Ok(received);
                    }
                    [1, USER_CANCELED] => {}
                    [_, description] => return Err(TlsError::Alert(description)),
                    _ => return Err(TlsError::Record("malformed alert")),
                },
                HANDSHAKE => {
                    let messages = buf[start..end].to_vec();
                    self.post_handshake(&messages, to_send)?;
                }
                _ => return Err(TlsError::Record("unexpected record type")),
            }
        }
        if at < len {
            self.partial = buf[at..len].to_vec();
        }
        Ok(received)
    }

    /// Handshake messages after the handshake: a TLS 1.3 KeyUpdate from either side,
    /// a server's NewSessionTicket to a client (kept for resumption until the first
    /// application data, ignored after); anything else (a TLS 1.2 peer asking to
    /// renegotiate) is refused by closing.
    fn post_handshake(
        &mut self,
        mut messages: &[u8],
        to_send: &mut Vec<u8>,
    ) -> Result<(), TlsError> {
        if self.records.version != ProtocolVersion::TLSv1_3 {
            return Err(TlsError::Record("renegotiation is not supported"));
        }
        while !messages.is_empty() {
            let [typ, a, b, c, rest @ ..] = messages else {
                return Err(TlsError::Record("malformed handshake message"));
            };
            let len = u32::from_be_bytes([0, *a, *b, *c]) as usize;
            if rest.len() < len {
                return Err(TlsError::Record("truncated handshake message"));
            }
            let (body, after) = rest.split_at(len);
            messages = after;
            match (*typ, self.local) {
                (KEY_UPDATE, _) => {
                    let requested = match body {
                        [0] => false,
                        [1] => true,
                        _ => return Err(TlsError::Record("malformed key update")),
                    };
                    let peer = self.local.peer();
                    let secrets = self
                        .secrets
                        .as_mut()
                        .ok_or(TlsError::KeyUpdate("no secrets"))?;
                    self.records.rx = secrets.next(peer, self.records.algorithm)?;
                    if requested {
                        self.update_tx(to_send)?;
                    }
                }
                (NEW_SESSION_TICKET, Side::Client) => {
                    if let Some(tickets) = self.tickets.as_mut() {
                        tickets
                            .handle_new_session_ticket(body)
                            .map_err(TlsError::Handshake)?;
                    }
                }
                _ => return Err(TlsError::Record("unexpected handshake message")),
            }
        }
        Ok(())
    }

    /// Tells the peer we move to the next key (KeyUpdate, sealed with the current
    /// one), and moves.
    fn update_tx(&mut self, to_send: &mut Vec<u8>) -> Result<(), TlsError> {
        let local = self.local;
        let secrets = self
            .secrets
            .as_mut()
            .ok_or(TlsError::KeyUpdate("no secrets"))?;
        let next = secrets.next(local, self.records.algorithm)?;
        self.records
            .seal(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0], to_send)?;
        self.records.tx = next;
        Ok(())
    }

    fn seal(&mut self, typ: u8, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), TlsError> {
        let tls13 = self.records.version == ProtocolVersion::TLSv1_3;
        for chunk in plaintext.chunks(MAX_PLAINTEXT) {
            if tls13 && self.records.tx.seq >= TX_RECORDS_PER_KEY {
                self.update_tx(out)?;
            }
            self.records.seal(typ, chunk, out)?;
        }
        Ok(())
    }
}

/// One direction's traffic key, IV and record count.
struct Direction {
    key: [u8; 32],
    key_len: u8,
    iv: [u8; 12],
    seq: u64,
}

impl Direction {
    fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> Direction {
        let (key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv }
            | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
            | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (key.as_ref(), iv.as_ref()),
            _ => (&[][..], &[][..]),
        };
        let mut direction = Direction {
            key: [0; 32],
            key_len: key.len() as u8,
            iv: [0; 12],
            seq,
        };
        direction.key[..key.len()].copy_from_slice(key);
        direction.iv[..iv.len().min(12)].copy_from_slice(&iv[..iv.len().min(12)]);
        direction
    }

    /// The AEAD key for one record (built for it, dropped after).
    fn aead_key(&self, algorithm: &'static aead::Algorithm) -> Result<aead::LessSafeKey, TlsError> {
        aead::UnboundKey::new(algorithm, &self.key[..usize::from(self.key_len)])
            .map(aead::LessSafeKey::new)
            .map_err(|_| TlsError::Record("bad traffic key"))
    }

    /// The per-record nonce: the IV with the sequence number xored into its end.
    fn nonce(&self) -> [u8; 12] {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        nonce
    }
}

impl Drop for Direction {
    fn drop(&mut self) {
        // Traffic keys do not outlive the session in memory (best effort).
        self.key = [0; 32];
        self.iv = [0; 12];
    }
}

/// The record protection of an established session (TLS 1.3, or TLS 1.2 with an AEAD
/// suite: the only TLS 1.2 suites rustls offers).
struct RecordLayer {
    version: ProtocolVersion,
    algorithm: &'static aead::Algorithm,
    /// TLS 1.2 AES-GCM: 8 bytes of each record's nonce travel in the record.
    explicit_nonce: bool,
    tx: Direction,
    rx: Direction,
}

impl RecordLayer {
    fn new(
        version: ProtocolVersion,
        (tx_seq, tx): (u64, ConnectionTrafficSecrets),
        (rx_seq, rx): (u64, ConnectionTrafficSecrets),
    ) -> Result<RecordLayer, TlsError> {
        let algorithm = match &tx {
            ConnectionTrafficSecrets::Aes128Gcm { .. } => &aead::AES_128_GCM,
            ConnectionTrafficSecrets::Aes256Gcm { .. } => &aead::AES_256_GCM,
            ConnectionTrafficSecrets::Chacha20Poly1305 { .. } => &aead::CHACHA20_POLY1305,
            _ => return Err(TlsError::Record("unsupported cipher suite")),
        };
        let tls12 = version == ProtocolVersion::TLSv1_2;
        if !tls12 && version != ProtocolVersion::TLSv1_3 {
            return Err(TlsError::Record("unsupported protocol version"));
        }
        Ok(RecordLayer {
            version,
            algorithm,
            explicit_nonce: tls12 && algorithm != &aead::CHACHA20_POLY1305,
            tx: Direction::new(tx_seq, tx),
            rx: Direction::new(rx_seq, rx),
        })
    }

    /// Appends `plaintext` (at most [`MAX_PLAINTEXT`]) as one record of content type
    /// `typ` to `out`.
    fn seal(&mut self, typ: u8, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), TlsError> {
        let key = self.tx.aead_key(self.algorithm)?;
        let nonce = self.tx.nonce();
        let tls13 = self.version == ProtocolVersion::TLSv1_3;
        let explicit = if self.explicit_nonce {
            EXPLICIT_NONCE
        } else {
            0
        };
        let inner = plaintext.len() + usize::from(tls13);
        let body = explicit + inner + TAG;
        let start = out.len();
        let outer_type = if tls13 { APPLICATION_DATA } else { typ };
        out.extend_from_slice(&[outer_type, 3, 3]);
        out.extend_from_slice(&(body as u16).to_be_bytes());
        let (aad, aad_len) = additional_data(
            tls13,
            &out[start..start + HEADER],
            self.tx.seq,
            plaintext.len(),
        );
        if self.explicit_nonce {
            out.extend_from_slice(&nonce[4..]);
        }
        let sealed_from = out.len();
        out.extend_from_slice(plaintext);
        if tls13 {
            out.push(typ);
        }
        let tag = key
            .seal_in_place_separate_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(&aad[..aad_len]),
                &mut out[sealed_from..],
            )
            .map_err(|_| TlsError::Record("cannot seal"))?;
        out.extend_from_slice(tag.as_ref());
        self.tx.seq += 1;
        Ok(())
    }

    /// Opens one whole record (header included) in place: its content type and where
    /// its plaintext lies in the record's body.
    fn open(&mut self, record: &mut [u8]) -> Result<(u8, std::ops::Range<usize>), TlsError> {
        let (header, body) = record.split_at_mut(HEADER);
        let outer_type = header[0];
        let tls13 = self.version == ProtocolVersion::TLSv1_3;
        if tls13 && outer_type == CHANGE_CIPHER_SPEC {
            return Err(TlsError::Record("change_cipher_spec after the handshake"));
        }
        if tls13 && outer_type != APPLICATION_DATA {
            return Err(TlsError::Record("unprotected record after the handshake"));
        }
        let explicit = if self.explicit_nonce {
            EXPLICIT_NONCE
        } else {
            0
        };
        if body.len() < explicit + TAG {
            return Err(TlsError::Record("record too short"));
        }
        let mut nonce = self.rx.nonce();
        if self.explicit_nonce {
            nonce[4..].copy_from_slice(&body[..EXPLICIT_NONCE]);
        }
        let plaintext_len = body.len() - explicit - TAG;
        let (aad, aad_len) = additional_data(tls13, header, self.rx.seq, plaintext_len);
        let key = self.rx.aead_key(self.algorithm)?;
        let plain_len = key
            .open_in_place(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(&aad[..aad_len]),
                &mut body[explicit..],
            )
            .map_err(|_| TlsError::Record("bad record MAC"))?
            .len();
        self.rx.seq += 1;
        let mut end = explicit + plain_len;
        if !tls13 {
            return Ok((outer_type, explicit..end));
        }
        // TLS 1.3: the real content type is the last non-zero byte (zeros are padding).
        while end > 0 && body[end - 1] == 0 {
            end -= 1;
        }
        if end == 0 {
            return Err(TlsError::Record("record without a content type"));
        }
        if end - 1 > MAX_PLAINTEXT {
            return Err(TlsError::Record("record too long"));
        }
        Ok((body[end - 1], 0..end - 1))
    }
}

/// The AEAD's additional data for a record with this 5-byte `header`: TLS 1.3 protects
/// the header itself, TLS 1.2 the record number, content type, version and plaintext
/// length. Built on the stack: it runs for every record of every connection in a
/// fan-out. Returns the bytes and how many of them count.
fn additional_data(
    tls13: bool,
    header: &[u8],
    seq: u64,
    plaintext_len: usize,
) -> ([u8; 13], usize) {
    let mut aad = [0u8; 13];
    if tls13 {
        aad[..HEADER].copy_from_slice(&header[..HEADER]);
        return (aad, HEADER);
    }
    aad[..8].copy_from_slice(&seq.to_be_bytes());
    aad[8..11].copy_from_slice(&header[..3]);
    aad[11..].copy_from_slice(&(plaintext_len as u16).to_be_bytes());
    (aad, 13)
}

/// A server configuration fit for [`LeanTls`]: secret extraction on (how the session
/// gets its traffic keys after the handshake), and the key log that catches the TLS
/// 1.3 traffic secrets for key updates (it replaces any other key log).
pub fn lean_config(mut config: ServerConfig) -> Arc<ServerConfig> {
    config.enable_secret_extraction = true;
    config.key_log = Arc::new(SecretCatcher);
    Arc::new(config)
}

/// A client configuration fit for [`LeanTls::client`] (as [`lean_config`]).
pub fn lean_client_config(mut config: ClientConfig) -> Arc<ClientConfig> {
    config.enable_secret_extraction = true;
    config.key_log = Arc::new(SecretCatcher);
    Arc::new(config)
}

/// Which side of a connection (whose traffic secret).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Server,
}

impl Side {
    fn peer(self) -> Side {
        match self {
            Side::Client => Side::Server,
            Side::Server => Side::Client,
        }
    }
}

/// The two TLS 1.3 application traffic secrets of a session (32 or 48 bytes each).
struct TrafficSecrets {
    hash: hkdf::Algorithm,
    client: [u8; 48],
    server: [u8; 48],
    len: u8,
}

impl TrafficSecrets {
    /// Moves `side`'s secret to the next generation and returns its keys, sequence
    /// numbers from 0 (RFC 8446 §7.2: `application_traffic_secret_N+1 =
    /// HKDF-Expand-Label(application_traffic_secret_N, "traffic upd", "", Hash.length)`).
    fn next(
        &mut self,
        side: Side,
        algorithm: &'static aead::Algorithm,
    ) -> Result<Direction, TlsError> {
        let len = usize::from(self.len);
        let hash = self.hash;
        let secret = match side {
            Side::Client => &mut self.client,
            Side::Server => &mut self.server,
        };
        let mut next = [0u8; 48];
        expand_label(hash, &secret[..len], b"traffic upd", &mut next[..len])?;
        secret[..len].copy_from_slice(&next[..len]);
        next.fill(0);
        let mut direction = Direction {
            key: [0; 32],
            key_len: algorithm.key_len() as u8,
            iv: [0; 12],
            seq: 0,
        };
        let key = &mut direction.key[..algorithm.key_len()];
        expand_label(hash, &secret[..len], b"key", key)?;
        expand_label(hash, &secret[..len], b"iv", &mut direction.iv)?;
        Ok(direction)
    }
}

impl Drop for TrafficSecrets {
    fn drop(&mut self) {
        self.client = [0; 48];
        self.server = [0; 48];
    }
}

/// HKDF-Expand-Label(secret, label, "", out.len()) of RFC 8446 §7.1.
fn expand_label(
    hash: hkdf::Algorithm,
    secret: &[u8],
    label: &[u8],
    out: &mut [u8],
) -> Result<(), TlsError> {
    struct Len(usize);
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    let length = (out.len() as u16).to_be_bytes();
    let label_len = [(6 + label.len()) as u8];
    let info: [&[u8]; 5] = [&length, &label_len, b"tls13 ", label, &[0]];
    hkdf::Prk::new_less_safe(hash, secret)
        .expand(&info, Len(out.len()))
        .and_then(|okm| okm.fill(out))
        .map_err(|_| TlsError::KeyUpdate("cannot derive the next key"))
}

/// rustls's key log hook, used to catch the TLS 1.3 application traffic secrets of the
/// handshake running on this thread (see the module doc). Nothing is written anywhere.
#[derive(Debug)]
pub struct SecretCatcher;

/// Secrets caught: (client random, client secret, server secret).
type Caught = (Vec<u8>, Option<Vec<u8>>, Option<Vec<u8>>);

thread_local! {
    static CAUGHT: RefCell<Option<Caught>> = const { RefCell::new(None) };
}

impl rustls::KeyLog for SecretCatcher {
    fn log(&self, label: &str, client_random: &[u8], secret: &[u8]) {
        let client = match label {
            "CLIENT_TRAFFIC_SECRET_0" => true,
            "SERVER_TRAFFIC_SECRET_0" => false,
            _ => return,
        };
        CAUGHT.with(|caught| {
            let mut caught = caught.borrow_mut();
            let entry = match caught.take() {
                Some(entry) if entry.0 == client_random => caught.insert(entry),
                // Another session's secret was never taken (its handshake failed in
                // between): this session starts afresh.
                _ => caught.insert((client_random.to_vec(), None, None)),
            };
            let slot = if client { &mut entry.1 } else { &mut entry.2 };
            *slot = Some(secret.to_vec());
        });
    }

    fn will_log(&self, label: &str) -> bool {
        matches!(label, "CLIENT_TRAFFIC_SECRET_0" | "SERVER_TRAFFIC_SECRET_0")
    }
}

impl SecretCatcher {
    /// The pair caught on this thread since the last call, when both came (one alone
    /// is kept for the next call).
    fn take() -> Option<TrafficSecrets> {
        let (client, server) = CAUGHT.with(|caught| {
            let mut caught = caught.borrow_mut();
            // Half of the pair stays: rustls reports the other within the same
            // handshake.
            let complete = caught.as_ref()?.1.is_some() && caught.as_ref()?.2.is_some();
            let (_, client, server) = caught.take().filter(|_| complete)?;
            Some((client?, server?))
        })?;
        let hash = match client.len() {
            32 => hkdf::HKDF_SHA256,
            48 => hkdf::HKDF_SHA384,
            _ => return None,
        };
        if server.len() != client.len() {
            return None;
        }
        let mut secrets = TrafficSecrets {
            hash,
            client: [0; 48],
            server: [0; 48],
            len: client.len() as u8,
        };
        secrets.client[..client.len()].copy_from_slice(&client);
        secrets.server[..server.len()].copy_from_slice(&server);
        Some(secrets)
    }
}

#[cfg(test)]
mod tests;
