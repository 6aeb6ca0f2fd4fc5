//! One client connection of the bench: its phase and its (possibly TLS) I/O.

use super::*;
use c1m_proto::tls_lean::LeanTls;

#[derive(Debug)]
pub(super) enum Phase {
    Connecting {
        deadline: Instant,
    },
    Handshake(Box<Handshake>),
    Open,
    /// We sent close at the end of the run; waiting for the server's close or EOF.
    Closing,
}

#[derive(Debug)]
pub(super) struct Handshake {
    pub(super) key: String,
    pub(super) head: Vec<u8>,
    pub(super) deadline: Instant,
    /// The server refused the upgrade with a `Retry-After`: reconnect no sooner.
    pub(super) retry_after: Option<Duration>,
}

#[derive(Debug)]
pub(super) struct Client {
    pub(super) stream: TcpStream,
    pub(super) phase: Phase,
    pub(super) decoder: Option<Box<Decoder>>,
    /// A message split across frames or reads, while it is being reassembled.
    #[allow(clippy::box_collection)] // a thin pointer keeps the idle state 16 bytes smaller
    pub(super) partial: Option<Box<Vec<u8>>>,
    /// Wall-clock µs when the handshake completed.
    pub(super) opened_us: u64,
    /// Stamp of the latest round received.
    pub(super) last_stamp: u64,
    pub(super) received: u64,
    /// `--pusher-channel`: the server answered the subscription (succeeded or refused),
    /// so with `--messages 0` the connection is ready.
    pub(super) subscribed: bool,
    /// Which of the worker's connections this is (picks its source address).
    pub(super) index: u32,
    /// Consecutive failed attempts before this one (for the backoff).
    pub(super) attempt: u32,
    /// The TLS session of a `wss://` connection.
    pub(super) tls: Option<Box<ClientTls>>,
}

/// A `wss://` connection's TLS: the session (only its keys once connected) and the
/// records the socket did not take yet.
#[derive(Debug)]
pub(super) struct ClientTls {
    pub(super) session: LeanTls,
    unsent: Vec<u8>,
}

impl ClientTls {
    /// A session to `name`; its ClientHello goes out on the first flush.
    pub(super) fn start(
        config: &std::sync::Arc<rustls::ClientConfig>,
        name: rustls::pki_types::ServerName<'static>,
    ) -> Result<ClientTls, c1m_proto::tls_lean::TlsError> {
        let mut unsent = Vec::new();
        let session = LeanTls::client(config, name, &mut unsent)?;
        Ok(ClientTls { session, unsent })
    }
}

/// Writes `bytes` after what is waiting in `unsent`; keeps what the socket does not
/// take.
fn write_or_keep(stream: &mut TcpStream, unsent: &mut Vec<u8>, bytes: &[u8]) -> io::Result<()> {
    unsent.extend_from_slice(bytes);
    flush_unsent(stream, unsent)
}

/// Writes what waits in `unsent` until the socket takes no more.
fn flush_unsent(stream: &mut TcpStream, unsent: &mut Vec<u8>) -> io::Result<()> {
    while !unsent.is_empty() {
        match stream.write(unsent) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                unsent.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if unsent.is_empty() {
        // An idle connection keeps no buffer.
        *unsent = Vec::new();
    }
    Ok(())
}

impl Client {
    /// Reads input: from the socket, or decrypted from the TLS session.
    pub(super) fn read_in(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = self.tls.as_deref_mut() else {
            return self.stream.read(buf);
        };
        let stream = &mut self.stream;
        loop {
            let mut to_send = Vec::new();
            let received = tls
                .session
                .read_with(buf, &mut to_send, |b| stream.read(b))?;
            if !to_send.is_empty() {
                write_or_keep(stream, &mut tls.unsent, &to_send)?;
            }
            if received.plaintext > 0 || received.closed {
                return Ok(received.plaintext);
            }
        }
    }

    /// Writes `bytes`. A plain socket takes what it takes (a load tool does not queue
    /// its few small writes); a TLS session keeps what the socket did not take and
    /// sends it on the next event (see `flush_tls`).
    pub(super) fn write_out(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match self.tls.as_deref_mut() {
            None => self.stream.write(bytes),
            Some(tls) => {
                // Before the handshake is over the session keeps it, and seals it after.
                let mut sealed = Vec::new();
                tls.session
                    .seal(bytes, &mut sealed)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                write_or_keep(&mut self.stream, &mut tls.unsent, &sealed)?;
                Ok(bytes.len())
            }
        }
    }

    /// Sends TLS records still pending (handshake messages, queued output).
    pub(super) fn flush_tls(&mut self) -> io::Result<()> {
        if let Some(tls) = self.tls.as_deref_mut() {
            flush_unsent(&mut self.stream, &mut tls.unsent)?;
        }
        Ok(())
    }

    /// Sends a masked text frame (best effort: a fresh connection's send buffer takes
    /// it whole).
    pub(super) fn send_text(&mut self, payload: &[u8]) {
        let mut frame = Vec::new();
        encode_frame(OpCode::Text, payload, Some(rand::random()), &mut frame);
        let _ = self.write_out(&frame);
    }

    /// Sends a masked close frame carrying `payload` (best effort: the connection is
    /// ending either way).
    pub(super) fn send_close(&mut self, payload: &[u8]) {
        let mut frame = Vec::new();
        encode_frame(OpCode::Close, payload, Some(rand::random()), &mut frame);
        let _ = self.write_out(&frame);
    }

    /// Starts our side of a clean close (1000; a raw TCP connection shuts down its
    /// sending side); the server's close or EOF finishes it.
    pub(super) fn begin_close(&mut self, raw: bool) {
        if raw {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        } else {
            self.send_close(&close_payload(CloseCode::NORMAL, ""));
        }
        self.phase = Phase::Closing;
    }
}
