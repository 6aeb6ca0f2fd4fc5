//! One client connection of the bench: its phase and its (possibly TLS) I/O.

use super::*;

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
    /// Which of the worker's connections this is (picks its source address).
    pub(super) index: u32,
    /// Consecutive failed attempts before this one (for the backoff).
    pub(super) attempt: u32,
    /// The TLS session of a `wss://` connection.
    pub(super) tls: Option<Box<rustls::ClientConnection>>,
}

impl Client {
    /// Reads input: from the socket, or decrypted from the TLS session.
    pub(super) fn read_in(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.tls.as_deref_mut() {
            None => self.stream.read(buf),
            Some(session) => tls_io::read(session, &mut self.stream, buf),
        }
    }

    /// Writes `bytes`. A plain socket takes what it takes (a load tool does not queue
    /// its few small writes); a TLS session keeps what the socket did not take and
    /// sends it on the next event (see `flush_tls`).
    pub(super) fn write_out(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match self.tls.as_deref_mut() {
            None => self.stream.write(bytes),
            Some(session) => {
                session.writer().write_all(bytes)?;
                tls_io::flush(session, &mut self.stream)?;
                Ok(bytes.len())
            }
        }
    }

    /// Sends TLS records still pending (handshake messages, queued output).
    pub(super) fn flush_tls(&mut self) -> io::Result<()> {
        if let Some(session) = self.tls.as_deref_mut() {
            tls_io::flush(session, &mut self.stream)?;
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
