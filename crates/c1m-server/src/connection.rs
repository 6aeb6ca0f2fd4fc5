//! One client connection: its phase, its topics, its frame decoder and pending output.
//!
//! The struct is deliberately tiny (32 bytes), because a million of them sit idle: a
//! socket, the first topic subscription inline, a phase tag, two liveness fields for the
//! idle sweep, and two optional boxes that are `None` while the connection is idle. The
//! outbox exists only while the kernel's send buffer is full; [`Extra`] holds everything
//! rarer (handshake bytes, deadlines, a frame split across reads, further topics) and is
//! freed as soon as it is empty again. Reads go into the worker's shared scratch buffer
//! (see `server`), never into a per-connection buffer.
//!
//! The connection does not know the server: what needs server state (admitting an
//! upgrade, answering an HTTP request, a subscribe command) is decided through the
//! [`Gate`] or handed back as an [`Action`].

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use c1m_proto::deflate::{self, InflateError, Inflater};
use c1m_proto::frame::{close_payload, encode_compressed_frame, encode_frame};
use c1m_proto::handshake::{self, PlainRequest, Request};
use c1m_proto::{CloseCode, Decoder, DecoderConfig, Event, OpCode};
use mio::net::TcpStream;

mod input;

use crate::admission::{monotonic_ms, AcceptRate};
use crate::auth::{Admission, Gate, PusherEntry};
use crate::counters::{Counters, TlsFailure};
use crate::outbox::Outbox;
use crate::topics::{Subscription, TopicId};
use c1m_proto::tls_lean::LeanTls;

/// Reads served to one connection per readiness event before others get a turn.
const MAX_READS_PER_TURN: usize = 4;

/// Largest client text message read as a command (subscribe/unsubscribe).
pub const MAX_COMMAND_BYTES: usize = 4096;

/// Flag: input from the peer since the last idle sweep (see `server`).
const HEARD: u8 = 1;
/// Flag: `first` holds the close deadline (see `Connection::first`).
const DEADLINE_INLINE: u8 = 2;
/// Flag: permessage-deflate was negotiated.
const DEFLATE: u8 = 4;
/// Bits 3 to 5 of the flags: the server's deflate window, as bits − 9 (9 to 15).
const WINDOW_SHIFT: u8 = 3;
/// Flag: the client asked for envelopes (topic, position, data) instead of bare
/// payloads (see `envelope`).
const ENVELOPE: u8 = 64;
/// Flag: a Server-Sent Events stream (see `sse`), not a WebSocket: it gets events
/// instead of frames, and nothing it sends is read.
const SSE: u8 = 128;

/// `Connection::protocol` of a connection speaking c1m's own protocol (bare payloads
/// or envelopes, JSON commands); any other value `n` is the Pusher Channels protocol
/// (`/app/{key}`, see `pusher`) for app number `n - 1` of the server's list.
const NATIVE: u8 = 0;

/// Most Pusher apps one server holds (the app's number fits the protocol byte).
pub const MAX_PUSHER_APPS: usize = u8::MAX as usize;

/// `Subscription::topic` of a connection in no topic.
const NO_TOPIC: TopicId = TopicId::MAX;

/// Limits a connection enforces, copied from the config once at start-up.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub decoder: DecoderConfig,
    pub max_pending_bytes: usize,
    pub max_head_bytes: usize,
    /// Largest HTTP request body (the publish API), in bytes.
    pub max_body_bytes: usize,
    /// Echo every data message back (conformance testing), instead of reading commands.
    pub echo: bool,
    /// Accept permessage-deflate offers (`--deflate`).
    pub deflate: bool,
    pub slow_consumer: SlowConsumerPolicy,
}

/// What happens to a connection whose pending output would pass `max_pending_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlowConsumerPolicy {
    /// Skip the message for this connection (counted as a drop); keep the connection.
    Drop,
    /// Close it with 1008, counted as a slow-consumer disconnect.
    Disconnect,
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhaseKind {
    /// Reading the HTTP request head (and a body, for a plain request).
    Handshake,
    /// A plain HTTP request was read and handed to the server; waiting for its answer.
    Http,
    /// Upgraded: receives the messages of its topics.
    Open,
    /// A close frame or final HTTP response was queued; once it is written the write
    /// side is shut, and the connection waits for the peer's EOF until its deadline.
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

/// Work for the server that a connection cannot do itself.
#[derive(Debug)]
pub enum Action {
    /// The upgrade was admitted and answered with 101: join these topics.
    Joined(Admission),
    /// A complete plain HTTP request (body included) to answer.
    Http(PlainRequest, Vec<u8>),
    /// A client's text message, to be read as a command.
    Command(String),
    /// A client's text message too long to be a command (over `MAX_COMMAND_BYTES`):
    /// answered with an error.
    OversizedCommand,
}

/// A write could not be accepted.
#[derive(Debug)]
pub enum SendError {
    /// Queueing it would pass the per-connection bound.
    Overflow,
    Io(io::Error),
}

/// What a read needs from the server.
pub struct ReadContext<'a> {
    pub scratch: &'a mut [u8],
    pub limits: &'a Limits,
    pub gate: &'a Gate,
    /// Whether an upgrade completed now may be admitted.
    pub admit: Admit,
    /// `--max-accept-rate`, asked only when an upgrade completes.
    pub accept_rate: Option<&'a AcceptRate>,
    /// Deadline for a close handshake or final response started now.
    pub closing_deadline: Instant,
    pub counters: &'a mut Counters,
    pub actions: &'a mut Vec<Action>,
    /// The worker's decompressor and its output buffer (permessage-deflate).
    pub inflater: &'a mut Inflater,
    pub inflated: &'a mut Vec<u8>,
}

/// Whether the server can take one more upgraded connection from this client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// `--max-connections` reached: 503.
    ServerFull,
    /// `--max-connections-per-ip` reached for this client's address: 429.
    TooManyFromAddress,
}

/// Writes `bytes` to the socket unless output is queued already; what the socket does
/// not take now is queued (a reference, not a copy).
fn write_or_queue<S: Write>(
    stream: &mut S,
    outbox: &mut Option<Box<Outbox>>,
    bytes: Bytes,
) -> io::Result<()> {
    if let Some(outbox) = outbox.as_mut() {
        outbox.push(bytes);
        return Ok(());
    }
    let written = write_now(stream, &bytes)?;
    if written < bytes.len() {
        queue_first(outbox, bytes.slice(written..));
    }
    Ok(())
}

/// [`write_or_queue`] for bytes that are not kept (a record sealed in a scratch
/// buffer): only what the socket does not take now is copied, to be queued.
fn write_or_queue_copy<S: Write>(
    stream: &mut S,
    outbox: &mut Option<Box<Outbox>>,
    bytes: &[u8],
) -> io::Result<()> {
    if let Some(outbox) = outbox.as_mut() {
        outbox.push(Bytes::copy_from_slice(bytes));
        return Ok(());
    }
    let written = write_now(stream, bytes)?;
    if written < bytes.len() {
        queue_first(outbox, Bytes::copy_from_slice(&bytes[written..]));
    }
    Ok(())
}

/// One write; a socket that takes nothing now (`WouldBlock`) wrote 0 bytes.
fn write_now<S: Write>(stream: &mut S, bytes: &[u8]) -> io::Result<usize> {
    match stream.write(bytes) {
        Ok(n) => Ok(n),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            Ok(0)
        }
        Err(e) => Err(e),
    }
}

/// Starts the queue of a connection that had none with `rest`.
fn queue_first(outbox: &mut Option<Box<Outbox>>, rest: Bytes) {
    let mut queued = Box::<Outbox>::default();
    queued.push(rest);
    *outbox = Some(queued);
}

thread_local! {
    /// Where a TLS connection seals its copy of a message before writing it: reused,
    /// so a broadcast allocates only for the connections whose socket is full.
    static SEALED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Past this, the sealing buffer is given back after use (a rare large message).
const SEALED_KEPT: usize = 256 * 1024;

/// The rarely needed part of a connection's state, boxed so idle connections skip it.
#[derive(Debug, Default)]
struct Extra {
    /// Handshake: the request bytes read so far.
    head: Vec<u8>,
    /// Deadline of the current phase (handshake, HTTP answer or close handshake).
    deadline: Option<Instant>,
    decoder: Option<Decoder>,
    /// A data message being reassembled (echo mode, a command split into frames, or
    /// any compressed message).
    message: Vec<u8>,
    /// The text message in progress is too long to be a command: its rest is ignored.
    skip_message: bool,
    /// Subscriptions beyond `Connection::first`.
    more: Vec<Subscription>,
    /// Topics this client may join, when its token limits them.
    allowed: Option<Box<[Box<str>]>>,
    /// The TLS session of a `wss://` connection (kept for the connection's life).
    tls: Option<LeanTls>,
}

impl Extra {
    fn is_empty(&self) -> bool {
        self.head.capacity() == 0
            && self.deadline.is_none()
            && self.decoder.is_none()
            && self.message.capacity() == 0
            && !self.skip_message
            && self.more.is_empty()
            && self.allowed.is_none()
            && self.tls.is_none()
    }
}

/// What a connection needs of its socket: non-blocking reads and writes, and closing
/// the write side. A `TcpStream` in the server; an in-memory pipe in the tests, so the
/// state machine is tested without sockets.
pub trait Stream: Read + Write {
    fn shutdown_write(&self) -> io::Result<()>;
}

impl Stream for TcpStream {
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

#[derive(Debug)]
pub struct Connection<S = TcpStream> {
    stream: S,
    /// The first topic subscription (`topic == NO_TOPIC` for none); or, once
    /// the `DEADLINE_INLINE` flag is set, the close deadline in milliseconds since
    /// [`deadline_epoch`] (high half in `topic`). A closing connection has left its
    /// topics, so the 8 bytes are free, and keeping its deadline here rather than in
    /// `Extra` spares a mass disconnect one allocation per connection.
    first: Subscription,
    kind: PhaseKind,
    /// `HEARD`, `DEADLINE_INLINE`, `DEFLATE` and the deflate window (one byte, so the
    /// struct stays 32 bytes).
    flags: u8,
    /// Idle sweeps in a row that found the connection silent.
    silent_sweeps: u8,
    /// Which protocol it speaks once open, and for Pusher which app (see [`NATIVE`];
    /// a byte the struct's padding had free).
    protocol: u8,
    outbox: Option<Box<Outbox>>,
    extra: Option<Box<Extra>>,
}

impl<S: Stream> Connection<S> {
    pub fn new(stream: S, handshake_deadline: Instant, tls: Option<LeanTls>) -> Connection<S> {
        Connection {
            stream,
            first: Subscription {
                topic: NO_TOPIC,
                position: 0,
            },
            protocol: NATIVE,
            kind: PhaseKind::Handshake,
            flags: HEARD,
            silent_sweeps: 0,
            outbox: None,
            extra: Some(Box::new(Extra {
                deadline: Some(handshake_deadline),
                tls,
                ..Extra::default()
            })),
        }
    }

    pub fn stream_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    pub fn kind(&self) -> PhaseKind {
        self.kind
    }

    /// The deadline of the current phase (none while open).
    pub fn deadline(&self) -> Option<Instant> {
        if self.flag(DEADLINE_INLINE) {
            let ms = (u64::from(self.first.topic) << 32) | u64::from(self.first.position);
            return Some(deadline_epoch() + Duration::from_millis(ms));
        }
        self.extra.as_ref().and_then(|e| e.deadline)
    }

    /// Moves a closing connection's deadline into the inline slot (see `first`) and
    /// frees `Extra` if nothing else needs it. Called by the server once it has taken
    /// the connection out of its topics.
    pub fn settle_closing(&mut self) {
        if self.kind != PhaseKind::Closing || self.flag(DEADLINE_INLINE) {
            return;
        }
        debug_assert_eq!(self.subscription_count(), 0, "unsubscribed first");
        let Some(deadline) = self.extra.as_mut().and_then(|e| e.deadline.take()) else {
            return;
        };
        let ms = deadline
            .saturating_duration_since(deadline_epoch())
            .as_millis() as u64;
        self.first = Subscription {
            topic: (ms >> 32) as u32,
            position: ms as u32,
        };
        self.set_flag(DEADLINE_INLINE, true);
        self.tidy();
    }

    fn flag(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    fn set_flag(&mut self, flag: u8, on: bool) {
        if on {
            self.flags |= flag;
        } else {
            self.flags &= !flag;
        }
    }

    /// The server window (9 to 15 bits) when permessage-deflate was negotiated:
    /// broadcasts go out compressed with it.
    pub fn deflate_window(&self) -> Option<u8> {
        self.flag(DEFLATE)
            .then(|| 9 + ((self.flags >> WINDOW_SHIFT) & 7))
    }

    /// Whether publications reach this client in envelopes (see `envelope`).
    pub fn wants_envelope(&self) -> bool {
        self.flag(ENVELOPE)
    }

    pub fn set_envelope(&mut self) {
        self.flags |= ENVELOPE;
    }

    /// Whether it speaks the Pusher protocol (see `pusher`).
    pub fn is_pusher(&self) -> bool {
        self.protocol != NATIVE
    }

    /// The Pusher app it belongs to (its number in the server's list), if it speaks
    /// Pusher.
    pub fn pusher_app(&self) -> Option<usize> {
        (self.protocol != NATIVE).then(|| usize::from(self.protocol) - 1)
    }

    /// It speaks Pusher, for app number `app` (below [`MAX_PUSHER_APPS`]).
    pub fn set_pusher_app(&mut self, app: usize) {
        self.protocol = u8::try_from(app + 1).unwrap_or(u8::MAX);
    }

    /// Whether this is a Server-Sent Events stream (see `sse`).
    pub fn is_sse(&self) -> bool {
        self.flag(SSE)
    }

    fn set_deflate_window(&mut self, bits: u8) {
        self.flags |= DEFLATE | ((bits.clamp(9, 15) - 9) << WINDOW_SHIFT);
    }

    fn extra(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Box::default)
    }

    /// Frees the extra state once nothing is left in it.
    fn tidy(&mut self) {
        if self.extra.as_ref().is_some_and(|e| e.is_empty()) {
            self.extra = None;
        }
    }

    // ----- topics -----

    /// Every topic the connection is in.
    pub fn subscriptions(&self) -> impl Iterator<Item = Subscription> + '_ {
        let first =
            (!self.flag(DEADLINE_INLINE) && self.first.topic != NO_TOPIC).then_some(self.first);
        let more = self.extra.iter().flat_map(|e| e.more.iter().copied());
        first.into_iter().chain(more)
    }

    pub fn is_subscribed(&self, topic: TopicId) -> bool {
        self.subscriptions().any(|s| s.topic == topic)
    }

    pub fn subscription_count(&self) -> usize {
        self.subscriptions().count()
    }

    pub fn add_subscription(&mut self, sub: Subscription) {
        if self.first.topic == NO_TOPIC {
            self.first = sub;
        } else {
            self.extra().more.push(sub);
        }
    }

    /// Forgets the subscription to `topic`; returns it (for the registry's removal).
    pub fn take_subscription(&mut self, topic: TopicId) -> Option<Subscription> {
        if self.first.topic == topic {
            let sub = self.first;
            // Keep the inline slot filled if there are more.
            self.first = match self.extra.as_mut().and_then(|e| e.more.pop()) {
                Some(next) => next,
                None => Subscription {
                    topic: NO_TOPIC,
                    position: 0,
                },
            };
            self.tidy();
            return Some(sub);
        }
        let extra = self.extra.as_mut()?;
        let index = extra.more.iter().position(|s| s.topic == topic)?;
        let sub = extra.more.swap_remove(index);
        if extra.more.is_empty() {
            extra.more = Vec::new();
        }
        self.tidy();
        Some(sub)
    }

    /// Records that the connection's place in `topic`'s list is now `position`.
    pub fn move_subscription(&mut self, topic: TopicId, position: u32) {
        if self.first.topic == topic {
            self.first.position = position;
        } else if let Some(extra) = self.extra.as_mut() {
            if let Some(sub) = extra.more.iter_mut().find(|s| s.topic == topic) {
                sub.position = position;
            }
        }
    }

    /// Whether this is a TLS connection in its TLS handshake (not over, not failed).
    pub fn tls_handshaking(&self) -> bool {
        self.extra
            .as_ref()
            .and_then(|e| e.tls.as_ref())
            .is_some_and(LeanTls::is_handshaking)
    }

    /// Whether the client's token lets it join `name` (always, without a token limit).
    pub fn may_join(&self, name: &str) -> bool {
        match self.extra.as_ref().and_then(|e| e.allowed.as_ref()) {
            None => true,
            Some(allowed) => allowed.iter().any(|t| &**t == name),
        }
    }

    pub fn set_allowed_topics(&mut self, allowed: Option<Box<[Box<str>]>>) {
        if allowed.is_some() {
            self.extra().allowed = allowed;
        }
    }

    // ----- liveness (idle sweep) -----

    /// One idle sweep: returns how many sweeps in a row found it silent (0 if it was
    /// heard from since the last one).
    pub fn sweep(&mut self) -> u8 {
        if self.flag(HEARD) {
            self.set_flag(HEARD, false);
            self.silent_sweeps = 0;
        } else {
            self.silent_sweeps = self.silent_sweeps.saturating_add(1);
        }
        self.silent_sweeps
    }

    // ----- I/O -----

    /// Reads what the socket has, into the shared scratch buffer.
    pub fn on_readable(&mut self, cx: &mut ReadContext<'_>) -> Next {
        for _ in 0..MAX_READS_PER_TURN {
            let n = match self.read_input(cx.scratch, cx.counters) {
                Ok(0) => return Next::Remove(End::PeerClosed),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Keep,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Next::Remove(End::Io),
            };
            self.set_flag(HEARD, true);
            // The input is moved out of the scratch buffer's borrow for the handlers.
            let input = std::mem::take(&mut cx.scratch);
            let next = match self.kind {
                PhaseKind::Handshake => self.handshake_input(&input[..n], cx),
                // An event stream's client has nothing more to say: ignored.
                PhaseKind::Open if self.is_sse() => Next::Keep,
                PhaseKind::Open => self.frame_input(&mut input[..n], cx),
                // An HTTP request is being answered: what comes meanwhile is a pipelined
                // request, which is not served (see `answer_http`); it is kept, bounded,
                // only so the answer knows to close.
                PhaseKind::Http => {
                    let limit = cx.limits.max_head_bytes;
                    let head = &mut self.extra().head;
                    if head.len() < limit {
                        head.extend_from_slice(&input[..n.min(limit - head.len())]);
                    }
                    Next::Keep
                }
                // Closing: further input is of no use.
                PhaseKind::Closing => Next::Keep,
            };
            cx.scratch = input;
            if next != Next::Keep {
                return next;
            }
        }
        Next::ReadAgain
    }

    /// The socket can take more output: flush what is queued.
    pub fn on_writable(&mut self) -> Next {
        if self.outbox.is_none() {
            return Next::Keep;
        }
        match self.flush_output() {
            Ok(false) => Next::Keep,
            Ok(true) => {
                self.outbox = None;
                if self.kind == PhaseKind::Closing {
                    let _ = self.stream.shutdown_write();
                }
                Next::Keep
            }
            Err(_) => Next::Remove(End::Io),
        }
    }

    /// Reads input: from the socket, or decrypted by the TLS session (which may have
    /// records to send back on the way: handshake messages, a key update). Counts the
    /// session's handshake, or why it failed.
    fn read_input(&mut self, buf: &mut [u8], counters: &mut Counters) -> io::Result<usize> {
        let Connection {
            stream,
            outbox,
            extra,
            ..
        } = self;
        let Some(session) = extra.as_mut().and_then(|e| e.tls.as_mut()) else {
            return stream.read(buf);
        };
        debug_assert!(buf.len() >= LeanTls::scratch_needed());
        loop {
            let mut to_send = Vec::new();
            let established = session.is_established();
            let received = match session.read_with(buf, &mut to_send, |b| stream.read(b)) {
                Ok(received) => received,
                Err(e) => {
                    let tls_error = e.get_ref().and_then(|inner| inner.downcast_ref());
                    if tls_error.is_some() && !established {
                        // The session is marked failed: no longer in its handshake.
                        counters.tls_handshaking = counters.tls_handshaking.saturating_sub(1);
                    }
                    match tls_error {
                        Some(error) => {
                            counters.count_tls_failure(TlsFailure::of(error, established))
                        }
                        None if !established
                            && e.kind() != io::ErrorKind::WouldBlock
                            && e.kind() != io::ErrorKind::Interrupted =>
                        {
                            counters.count_tls_failure(TlsFailure::ClosedInHandshake)
                        }
                        None => {}
                    }
                    return Err(e);
                }
            };
            if !established && session.is_established() {
                counters.tls_handshaking = counters.tls_handshaking.saturating_sub(1);
                counters.tls_handshakes += 1;
                counters.tls_resumed += u64::from(session.resumed());
            }
            if received.closed && !session.is_established() {
                counters.count_tls_failure(TlsFailure::ClosedInHandshake);
            }
            if !to_send.is_empty() {
                write_or_queue(stream, outbox, Bytes::from(to_send))?;
            }
            if received.plaintext > 0 || received.closed {
                // After a close_notify the next read says so at once.
                return Ok(received.plaintext);
            }
            // Only records with nothing for us (handshake, key update): read on.
        }
    }

    /// Writes queued output. `Ok(true)` when all of it is out.
    fn flush_output(&mut self) -> io::Result<bool> {
        match self.outbox.as_mut() {
            None => Ok(true),
            Some(outbox) => outbox.flush(&mut self.stream),
        }
    }

    /// Sends bytes shared with other connections (a broadcast frame): written straight
    /// to the socket when nothing is queued, else queued (a reference, not a copy).
    /// Over TLS each connection seals its own copy first.
    pub fn send(&mut self, bytes: &Bytes, limits: &Limits) -> Result<(), SendError> {
        let Connection {
            stream,
            outbox,
            extra,
            ..
        } = self;
        let session = extra.as_mut().and_then(|e| e.tls.as_mut());
        if let Some(outbox) = outbox.as_ref() {
            // Checked before sealing: a sealed record that is then dropped would leave
            // a gap in the session's record numbers.
            let overhead = session
                .as_ref()
                .map_or(0, |_| LeanTls::seal_overhead(bytes.len()));
            if outbox.bytes() + bytes.len() + overhead > limits.max_pending_bytes {
                return Err(SendError::Overflow);
            }
        }
        let Some(session) = session else {
            return write_or_queue(stream, outbox, bytes.clone()).map_err(SendError::Io);
        };
        SEALED.with_borrow_mut(|sealed| {
            sealed.clear();
            let result = match session.seal(bytes, sealed) {
                Ok(()) => write_or_queue_copy(stream, outbox, sealed).map_err(SendError::Io),
                Err(e) => Err(SendError::Io(io::Error::new(io::ErrorKind::InvalidData, e))),
            };
            if sealed.capacity() > SEALED_KEPT {
                *sealed = Vec::new();
            }
            result
        })
    }

    /// Queues a close frame and moves to `Closing` (an event stream just ends).
    pub fn begin_close(
        &mut self,
        code: CloseCode,
        reason: &str,
        deadline: Instant,
        limits: &Limits,
    ) -> Next {
        if self.is_sse() {
            return self.finish_with(Vec::new(), deadline, limits);
        }
        let mut frame = Vec::new();
        encode_frame(
            OpCode::Close,
            &close_payload(code, reason),
            None,
            &mut frame,
        );
        self.finish_with(frame, deadline, limits)
    }

    /// Answers an HTTP request. When the client asked to keep the connection
    /// (`keep_alive`) and sent nothing more meanwhile, the connection goes back to
    /// waiting for a request, until `idle_deadline`; the caller must queue that
    /// deadline. Requests are not pipelined: a client that sends its next request
    /// before this answer gets this answer and a close (curl, browsers and HTTP client
    /// libraries wait for the answer). Otherwise as `finish_with`.
    pub fn answer_http(
        &mut self,
        response: Vec<u8>,
        keep_alive: bool,
        idle_deadline: Instant,
        closing_deadline: Instant,
        limits: &Limits,
    ) -> Next {
        let pipelined = self.extra.as_ref().is_some_and(|e| !e.head.is_empty());
        if !keep_alive || pipelined || self.kind != PhaseKind::Http {
            return self.finish_with(response, closing_deadline, limits);
        }
        self.kind = PhaseKind::Handshake;
        self.extra().deadline = Some(idle_deadline);
        match self.send_answer(handshake::keeping_alive(response), limits) {
            Err(SendError::Io(_)) => Next::Remove(End::Io),
            _ => {
                self.tidy();
                Next::Keep
            }
        }
    }

    /// Sends an answer (HTTP response, or a last close frame) past the pending-output
    /// bound: it is small and the client is waiting for it, not falling behind.
    fn send_answer(&mut self, bytes: Vec<u8>, limits: &Limits) -> Result<(), SendError> {
        let limits = Limits {
            max_pending_bytes: usize::MAX,
            ..*limits
        };
        self.send(&Bytes::from(bytes), &limits)
    }

    /// Sends a last message (close frame or HTTP response), then closes our side.
    pub fn finish_with(&mut self, last: Vec<u8>, deadline: Instant, limits: &Limits) -> Next {
        if self.flag(DEADLINE_INLINE) {
            // Already closing: the new deadline goes where `settle_closing` expects it.
            self.set_flag(DEADLINE_INLINE, false);
            self.first = Subscription {
                topic: NO_TOPIC,
                position: 0,
            };
        }
        self.kind = PhaseKind::Closing;
        let extra = self.extra();
        extra.deadline = Some(deadline);
        extra.head = Vec::new();
        extra.decoder = None;
        extra.message = Vec::new();
        if let Err(SendError::Io(_)) = self.send_answer(last, limits) {
            return Next::Remove(End::Io);
        }
        if let Some(session) = self.extra.as_mut().and_then(|e| e.tls.as_mut()) {
            let mut alert = Vec::new();
            session.close_notify(&mut alert);
            if !alert.is_empty()
                && write_or_queue(&mut self.stream, &mut self.outbox, alert.into()).is_err()
            {
                return Next::Remove(End::Io);
            }
        }
        match self.flush_output() {
            Ok(true) => {
                self.outbox = None;
                let _ = self.stream.shutdown_write();
            }
            // The rest goes out when the socket is writable (see `on_writable`).
            Ok(false) => {
                self.outbox.get_or_insert_with(Box::default);
            }
            Err(_) => return Next::Remove(End::Io),
        }
        Next::Keep
    }

    /// Sends a reply to this client only (a command's answer); a reply that does not
    /// fit its pending-output bound ends the connection as a slow consumer.
    pub fn reply(&mut self, payload: &[u8], limits: &Limits) -> Next {
        let mut frame = Vec::with_capacity(payload.len() + 4);
        encode_frame(OpCode::Text, payload, None, &mut frame);
        match self.send_own(&Bytes::from(frame), limits) {
            Ok(()) => Next::Keep,
            Err(SendError::Overflow) => Next::Remove(End::SlowConsumer),
            Err(SendError::Io(_)) => Next::Remove(End::Io),
        }
    }

    /// Sends a text frame meant for this client alone (an answer, a recovered
    /// publication), as an event on an event stream.
    pub fn send_own(&mut self, frame: &Bytes, limits: &Limits) -> Result<(), SendError> {
        if self.is_sse() {
            return self.send(&crate::sse::from_text_frame(frame), limits);
        }
        self.send(frame, limits)
    }
}

/// The origin of inline close deadlines (see `Connection::first`).
fn deadline_epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod size {
    use super::*;

    #[test]
    fn idle_state_is_small() {
        // The memory figure of BENCHMARKS.md depends on this; grow it only on purpose.
        // (mio's socket carries an extra 8-byte selector id in debug builds only.)
        let limit = if cfg!(debug_assertions) { 48 } else { 32 };
        assert!(
            std::mem::size_of::<Connection>() <= limit,
            "{}",
            std::mem::size_of::<Connection>()
        );
    }
}
