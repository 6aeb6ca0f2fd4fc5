//! One client connection: its phase, its frame decoder and its pending output.
//!
//! The struct is deliberately tiny, because a million of them sit idle: a socket, a
//! phase tag, and two optional boxes that are `None` while the connection is idle.
//! The decoder box exists only while a frame or message is split across reads; the
//! outbox only while the kernel's send buffer is full. Reads go into the worker's
//! shared scratch buffer (see `server`), never into a per-connection buffer.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::time::Instant;

use bytes::Bytes;
use c1m_proto::frame::{close_payload, encode_frame};
use c1m_proto::handshake::{self, HandshakeError, Request};
use c1m_proto::{CloseCode, Decoder, DecoderConfig, Event, OpCode};
use mio::net::TcpStream;

use crate::outbox::Outbox;
use crate::stats::Stats;

/// Reads served to one connection per readiness event before others get a turn.
const MAX_READS_PER_TURN: usize = 4;

/// Limits a connection enforces, copied from the config once at start-up.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub decoder: DecoderConfig,
    pub max_pending_bytes: usize,
    pub max_head_bytes: usize,
    /// Echo every data message back (conformance testing), instead of ignoring it.
    pub echo: bool,
}

/// Where a connection is in its life.
#[derive(Debug)]
pub enum Phase {
    /// Waiting for the HTTP upgrade request; holds its bytes so far.
    Handshake(Box<PendingHandshake>),
    /// Upgraded: receives broadcasts.
    Open,
    /// A close frame or final HTTP response was queued; once it is written the write
    /// side is shut, and the connection waits for the peer's EOF until `deadline`.
    Closing { deadline: Instant },
}

#[derive(Debug)]
pub struct PendingHandshake {
    head: Vec<u8>,
    pub deadline: Instant,
}

/// The phase without its data, for the server's bookkeeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhaseKind {
    Handshake,
    Open,
    Closing,
}

/// What the server should do with the connection after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Wait for the next readiness event.
    Keep,
    /// More input may be waiting: read again after other connections had a turn.
    ReadAgain,
    /// Drop the connection (closing its socket).
    Remove(End),
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The peer closed the TCP connection (after or without a close handshake).
    PeerClosed,
    /// A socket error (reset, broken pipe, ...).
    Io,
    /// The output queue passed `--max-pending-bytes`.
    SlowConsumer,
}

/// A write could not be accepted.
#[derive(Debug)]
pub enum SendError {
    /// Queueing it would pass the per-connection bound.
    Overflow,
    Io(io::Error),
}

#[derive(Debug)]
pub struct Connection {
    stream: TcpStream,
    phase: Phase,
    decoder: Option<Box<Decoder>>,
    outbox: Option<Box<Outbox>>,
    /// Echo mode only: a data message being reassembled across frames or reads.
    #[allow(clippy::box_collection)] // a thin pointer keeps the idle state 16 bytes smaller
    echo: Option<Box<Vec<u8>>>,
}

impl Connection {
    pub fn new(stream: TcpStream, handshake_deadline: Instant) -> Connection {
        Connection {
            stream,
            phase: Phase::Handshake(Box::new(PendingHandshake {
                head: Vec::new(),
                deadline: handshake_deadline,
            })),
            decoder: None,
            outbox: None,
            echo: None,
        }
    }

    pub fn stream_mut(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    pub fn kind(&self) -> PhaseKind {
        match self.phase {
            Phase::Handshake(_) => PhaseKind::Handshake,
            Phase::Open => PhaseKind::Open,
            Phase::Closing { .. } => PhaseKind::Closing,
        }
    }

    /// The deadline of the current phase (none while open).
    pub fn deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Handshake(pending) => Some(pending.deadline),
            Phase::Open => None,
            Phase::Closing { deadline } => Some(*deadline),
        }
    }

    /// Reads what the socket has, into the worker's `scratch` buffer.
    /// `admit` says whether an upgrade completed now may be accepted (else: 503).
    pub fn on_readable(
        &mut self,
        scratch: &mut [u8],
        limits: &Limits,
        closing_deadline: Instant,
        admit: bool,
        stats: &mut Stats,
    ) -> Next {
        for _ in 0..MAX_READS_PER_TURN {
            let n = match self.stream.read(scratch) {
                Ok(0) => return Next::Remove(End::PeerClosed),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Keep,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Next::Remove(End::Io),
            };
            let input = &mut scratch[..n];
            let next = match self.phase {
                Phase::Handshake(_) => {
                    self.handshake_input(input, limits, closing_deadline, admit, stats)
                }
                Phase::Open => self.frame_input(input, limits, closing_deadline, stats),
                // Closing: the peer's last frames (its close echo) are of no further use.
                Phase::Closing { .. } => Next::Keep,
            };
            if next != Next::Keep {
                return next;
            }
        }
        Next::ReadAgain
    }

    /// The socket can take more output: flush the outbox.
    pub fn on_writable(&mut self) -> Next {
        let Some(outbox) = self.outbox.as_mut() else {
            return Next::Keep;
        };
        match outbox.flush(&mut self.stream) {
            Ok(false) => Next::Keep,
            Ok(true) => {
                self.outbox = None;
                if matches!(self.phase, Phase::Closing { .. }) {
                    let _ = self.stream.shutdown(Shutdown::Write);
                }
                Next::Keep
            }
            Err(_) => Next::Remove(End::Io),
        }
    }

    /// Sends bytes shared with other connections (a broadcast frame): written straight
    /// to the socket when nothing is queued, else queued (a reference, not a copy).
    pub fn send(&mut self, bytes: &Bytes, limits: &Limits) -> Result<(), SendError> {
        if let Some(outbox) = self.outbox.as_mut() {
            if outbox.bytes() + bytes.len() > limits.max_pending_bytes {
                return Err(SendError::Overflow);
            }
            outbox.push(bytes.clone());
            return Ok(());
        }
        let written = match self.stream.write(bytes) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                0
            }
            Err(e) => return Err(SendError::Io(e)),
        };
        if written < bytes.len() {
            let mut outbox = Box::<Outbox>::default();
            outbox.push(bytes.slice(written..));
            self.outbox = Some(outbox);
        }
        Ok(())
    }

    /// Queues a close frame and moves to `Closing`.
    pub fn begin_close(
        &mut self,
        code: CloseCode,
        reason: &str,
        deadline: Instant,
        limits: &Limits,
    ) -> Next {
        let mut frame = Vec::new();
        encode_frame(
            OpCode::Close,
            &close_payload(code, reason),
            None,
            &mut frame,
        );
        self.finish_with(frame, deadline, limits)
    }

    /// Sends a last message (close frame or HTTP response), then closes our side.
    fn finish_with(&mut self, last: Vec<u8>, deadline: Instant, limits: &Limits) -> Next {
        self.phase = Phase::Closing { deadline };
        // A last message is allowed past the bound: it is small and ends the queue.
        let limits = Limits {
            max_pending_bytes: usize::MAX,
            ..*limits
        };
        if let Err(SendError::Io(_)) = self.send(&Bytes::from(last), &limits) {
            return Next::Remove(End::Io);
        }
        if self.outbox.is_none() {
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        Next::Keep
    }

    fn handshake_input(
        &mut self,
        input: &mut [u8],
        limits: &Limits,
        closing_deadline: Instant,
        admit: bool,
        stats: &mut Stats,
    ) -> Next {
        let Phase::Handshake(pending) = &mut self.phase else {
            return Next::Keep;
        };
        pending.head.extend_from_slice(input);
        let request = match handshake::parse_request(&pending.head, limits.max_head_bytes) {
            Ok(None) => return Next::Keep,
            Ok(Some(request)) => request,
            Err(error) => {
                stats.handshake_rejects += 1;
                return self.finish_with(handshake::rejection(&error), closing_deadline, limits);
            }
        };
        match request {
            (Request::Upgrade(_), _) if !admit => {
                stats.rejected_full += 1;
                let response = handshake::http_response(
                    503,
                    "Service Unavailable",
                    &[("Retry-After", "5")],
                    "server full: --max-connections reached\n",
                );
                self.finish_with(response, closing_deadline, limits)
            }
            (Request::Upgrade(upgrade), used) => {
                let Phase::Handshake(mut pending) = std::mem::replace(&mut self.phase, Phase::Open)
                else {
                    unreachable!("checked above");
                };
                if let Err(SendError::Io(_)) = self.send(
                    &Bytes::from(handshake::switching_protocols(&upgrade.key)),
                    limits,
                ) {
                    return Next::Remove(End::Io);
                }
                // Frames the client sent right behind its request.
                let rest = &mut pending.head[used..];
                if rest.is_empty() {
                    Next::Keep
                } else {
                    self.frame_input(rest, limits, closing_deadline, stats)
                }
            }
            (Request::Plain { method, path }, _) => {
                stats.plain_http += 1;
                self.finish_with(
                    plain_http_response(&method, &path),
                    closing_deadline,
                    limits,
                )
            }
        }
    }

    fn frame_input(
        &mut self,
        input: &mut [u8],
        limits: &Limits,
        closing_deadline: Instant,
        stats: &mut Stats,
    ) -> Next {
        let mut decoder = self
            .decoder
            .take()
            .unwrap_or_else(|| Box::new(Decoder::new(limits.decoder)));
        // Answers (pongs, echoes) in the order their causes arrived.
        let mut replies: Vec<Vec<u8>> = Vec::new();
        let mut peer_close: Option<Option<CloseCode>> = None;
        let echo = &mut self.echo;
        let result = decoder.decode(input, |event| match event {
            Event::Data {
                text,
                payload,
                message_end,
            } => {
                stats.messages_in += message_end as u64;
                if !limits.echo {
                    return;
                }
                let opcode = if text { OpCode::Text } else { OpCode::Binary };
                match (echo.as_mut(), message_end) {
                    (None, true) => {
                        let mut frame = Vec::new();
                        encode_frame(opcode, payload, None, &mut frame);
                        replies.push(frame);
                    }
                    (buffer, _) => {
                        let buffer = match buffer {
                            Some(buffer) => buffer,
                            None => echo.insert(Box::default()),
                        };
                        buffer.extend_from_slice(payload);
                        if message_end {
                            let mut frame = Vec::new();
                            encode_frame(opcode, buffer, None, &mut frame);
                            replies.push(frame);
                            *echo = None;
                        }
                    }
                }
            }
            Event::Ping(payload) => {
                let mut frame = Vec::with_capacity(2 + payload.len());
                encode_frame(OpCode::Pong, payload, None, &mut frame);
                replies.push(frame);
            }
            Event::Pong(_) => {}
            Event::Close { code, .. } => peer_close = Some(code),
        });
        for reply in replies {
            match self.send(&Bytes::from(reply), limits) {
                Ok(()) => {}
                Err(SendError::Overflow) => return Next::Remove(End::SlowConsumer),
                Err(SendError::Io(_)) => return Next::Remove(End::Io),
            }
        }
        if let Some(code) = peer_close {
            // Echo the peer's code (RFC 6455 §5.5.1); an empty close gets an empty one.
            let mut frame = Vec::new();
            let payload = code.map(|c| c.0.to_be_bytes().to_vec()).unwrap_or_default();
            encode_frame(OpCode::Close, &payload, None, &mut frame);
            return self.finish_with(frame, closing_deadline, limits);
        }
        match result {
            Ok(()) => {
                if !decoder.is_idle() {
                    self.decoder = Some(decoder);
                }
                Next::Keep
            }
            Err(error) => {
                stats.protocol_errors += 1;
                tracing::debug!(%error, "protocol error");
                self.begin_close(
                    error.close_code(),
                    &error.to_string(),
                    closing_deadline,
                    limits,
                )
            }
        }
    }
}

/// The answer to an HTTP request that is not a WebSocket upgrade.
fn plain_http_response(method: &str, path: &str) -> Vec<u8> {
    let path = path.split('?').next().unwrap_or("/");
    match (method, path) {
        ("GET", "/") => handshake::http_response(
            200,
            "OK",
            &[],
            "c1m: a WebSocket push server.\n\
             Connect with a WebSocket client on any path (for example ws://HOST:PORT/) to receive\n\
             the server's clock, in milliseconds since the Unix epoch, at every broadcast.\n",
        ),
        ("GET", _) => handshake::http_response(
            404,
            "Not Found",
            &[],
            "not found: connect with a WebSocket client\n",
        ),
        _ => handshake::rejection(&HandshakeError::MethodNotGet),
    }
}
