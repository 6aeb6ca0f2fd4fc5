//! The connection state machine without sockets: a [`Pipe`] stands in for the TCP
//! stream, the test plays the client byte by byte and reads what the server wrote.

use std::cell::RefCell;
use std::rc::Rc;

use c1m_proto::{encode_frame, DecoderConfig, OpCode, Role};

use super::*;
use crate::config::SlowConsumerPolicy as Policy;

/// Both ends of an in-memory, non-blocking socket.
#[derive(Debug, Default)]
struct PipeState {
    /// Bytes the client sent that the server has not read.
    to_server: Vec<u8>,
    /// The client closed its side (reads then return 0).
    client_closed: bool,
    /// Everything the server wrote.
    from_server: Vec<u8>,
    /// Bytes the "kernel" takes before a write would block (`None`: unbounded).
    room: Option<usize>,
    server_shut_write: bool,
}

#[derive(Debug, Clone, Default)]
struct Pipe(Rc<RefCell<PipeState>>);

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut s = self.0.borrow_mut();
        if s.to_server.is_empty() {
            return if s.client_closed {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        let n = buf.len().min(s.to_server.len());
        buf[..n].copy_from_slice(&s.to_server[..n]);
        s.to_server.drain(..n);
        Ok(n)
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut s = self.0.borrow_mut();
        let n = s.room.map_or(buf.len(), |room| room.min(buf.len()));
        if n == 0 && !buf.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        if let Some(room) = s.room.as_mut() {
            *room -= n;
        }
        s.from_server.extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Stream for Pipe {
    fn shutdown_write(&self) -> io::Result<()> {
        self.0.borrow_mut().server_shut_write = true;
        Ok(())
    }
}

impl Pipe {
    fn send(&self, bytes: &[u8]) {
        self.0.borrow_mut().to_server.extend_from_slice(bytes);
    }
    /// What the server wrote since the last call.
    fn written(&self) -> Vec<u8> {
        std::mem::take(&mut self.0.borrow_mut().from_server)
    }
    fn set_room(&self, room: Option<usize>) {
        self.0.borrow_mut().room = room;
    }
}

/// The server's side of the test: everything a read needs.
struct Harness {
    conn: Connection<Pipe>,
    pipe: Pipe,
    limits: Limits,
    gate: Gate,
    counters: Counters,
    scratch: Vec<u8>,
    inflater: Inflater,
    inflated: Vec<u8>,
}

impl Harness {
    fn new() -> Harness {
        let pipe = Pipe::default();
        Harness {
            conn: Connection::new(pipe.clone(), Instant::now() + Duration::from_secs(10), None),
            pipe,
            limits: Limits {
                decoder: DecoderConfig {
                    role: Role::Server,
                    max_message_size: 1 << 16,
                    compression: false,
                },
                max_pending_bytes: 64,
                max_head_bytes: 4096,
                max_body_bytes: 1024,
                echo: false,
                deflate: false,
                slow_consumer: Policy::Disconnect,
            },
            gate: Gate::open(8),
            counters: Counters::default(),
            scratch: vec![0; 64 * 1024],
            inflater: Inflater::default(),
            inflated: Vec::new(),
        }
    }

    /// The client sends `bytes`; the server reads them (as the loop would on a
    /// readable event). Returns what the connection asked of the server.
    fn client_sends(&mut self, bytes: &[u8], admit: Admit) -> (Next, Vec<Action>) {
        self.pipe.send(bytes);
        let mut actions = Vec::new();
        let mut cx = ReadContext {
            scratch: &mut self.scratch,
            limits: &self.limits,
            gate: &self.gate,
            admit,
            accept_rate: None,
            closing_deadline: Instant::now() + Duration::from_secs(3),
            counters: &mut self.counters,
            actions: &mut actions,
            inflater: &mut self.inflater,
            inflated: &mut self.inflated,
        };
        let next = self.conn.on_readable(&mut cx);
        (next, actions)
    }

    /// Upgrades the connection (to topic `time`).
    fn upgraded() -> Harness {
        let mut h = Harness::new();
        let (next, actions) = h.client_sends(UPGRADE, Admit::Yes);
        assert_eq!(next, Next::Keep);
        assert!(matches!(&actions[..], [Action::Joined(a)] if a.topics == ["time"]));
        assert_eq!(h.conn.kind(), PhaseKind::Open);
        h.pipe.written();
        h
    }
}

const UPGRADE: &[u8] =
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// A masked client frame.
fn client_frame(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(opcode, payload, Some([1, 2, 3, 4]), &mut out);
    out
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn an_upgrade_split_anywhere_is_answered_once_with_101() {
    for split in [1, 17, UPGRADE.len() - 1] {
        let mut h = Harness::new();
        let (next, actions) = h.client_sends(&UPGRADE[..split], Admit::Yes);
        assert_eq!((next, actions.len()), (Next::Keep, 0), "incomplete head");
        assert_eq!(h.conn.kind(), PhaseKind::Handshake);
        assert!(h.pipe.written().is_empty());
        let (_, actions) = h.client_sends(&UPGRADE[split..], Admit::Yes);
        assert_eq!(actions.len(), 1);
        let answer = text(&h.pipe.written());
        assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
        assert!(
            answer.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "accept key: {answer}"
        );
        assert_eq!(h.conn.kind(), PhaseKind::Open);
        assert_eq!(h.conn.deadline(), None, "no handshake deadline once open");
    }
}

#[test]
fn a_full_server_and_a_crowded_address_are_refused_with_their_status() {
    for (admit, status) in [
        (Admit::ServerFull, "503"),
        (Admit::TooManyFromAddress, "429"),
    ] {
        let mut h = Harness::new();
        let (next, actions) = h.client_sends(UPGRADE, admit);
        assert_eq!(next, Next::Keep);
        assert!(actions.is_empty());
        let answer = text(&h.pipe.written());
        assert_eq!(&answer[9..12], status, "{answer}");
        assert_eq!(h.conn.kind(), PhaseKind::Closing);
        assert!(
            h.pipe.0.borrow().server_shut_write,
            "answer written, then our side shut"
        );
    }
}

#[test]
fn a_plain_request_waits_for_its_answer_and_keep_alive_returns_to_the_handshake() {
    let mut h = Harness::new();
    let (_, actions) = h.client_sends(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", Admit::Yes);
    assert!(
        matches!(&actions[..], [Action::Http(r, body)] if r.path == "/healthz" && body.is_empty())
    );
    assert_eq!(h.conn.kind(), PhaseKind::Http);
    let idle = Instant::now() + Duration::from_secs(10);
    let next = h.conn.answer_http(
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec(),
        true,
        idle,
        idle,
        &h.limits,
    );
    assert_eq!(next, Next::Keep);
    assert_eq!(
        h.conn.kind(),
        PhaseKind::Handshake,
        "kept for the next request"
    );
    assert_eq!(h.conn.deadline(), Some(idle));
    assert!(text(&h.pipe.written()).starts_with("HTTP/1.1 200"));
    // The next request on the same connection is read as a new one.
    let (_, actions) = h.client_sends(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n", Admit::Yes);
    assert!(matches!(&actions[..], [Action::Http(r, _)] if r.path == "/readyz"));
}

#[test]
fn open_connections_hand_commands_up_and_answer_pings_themselves() {
    let mut h = Harness::upgraded();
    let (_, actions) = h.client_sends(
        &client_frame(OpCode::Text, br#"{"op":"subscribe","topic":"a"}"#),
        Admit::Yes,
    );
    assert!(matches!(&actions[..], [Action::Command(c)] if c.contains("subscribe")));
    let (_, actions) = h.client_sends(&client_frame(OpCode::Ping, b"hi"), Admit::Yes);
    assert!(actions.is_empty());
    assert_eq!(
        h.pipe.written(),
        [0x8a, 2, b'h', b'i'],
        "a pong with the ping's payload"
    );
    // A text message longer than any command is refused as one, not buffered whole.
    let long = vec![b'x'; MAX_COMMAND_BYTES + 1];
    let (_, actions) = h.client_sends(&client_frame(OpCode::Text, &long), Admit::Yes);
    assert!(matches!(&actions[..], [Action::OversizedCommand]));
}

#[test]
fn a_client_close_is_echoed_and_a_protocol_error_closes_with_its_code() {
    let mut h = Harness::upgraded();
    let (next, _) = h.client_sends(&client_frame(OpCode::Close, &[0x03, 0xe8]), Admit::Yes);
    assert_eq!(next, Next::Keep);
    assert_eq!(h.conn.kind(), PhaseKind::Closing);
    assert_eq!(h.pipe.written(), [0x88, 2, 0x03, 0xe8], "close 1000 echoed");
    // An unmasked frame from a client is a protocol error: close 1002.
    let mut h = Harness::upgraded();
    let mut unmasked = Vec::new();
    encode_frame(OpCode::Text, b"x", None, &mut unmasked);
    h.client_sends(&unmasked, Admit::Yes);
    assert_eq!(h.conn.kind(), PhaseKind::Closing);
    let out = h.pipe.written();
    assert_eq!(&out[..4], [0x88, out[1], 0x03, 0xea], "close 1002: {out:?}");
    // The peer's EOF ends a connection.
    let mut h = Harness::upgraded();
    h.pipe.0.borrow_mut().client_closed = true;
    let (next, _) = h.client_sends(b"", Admit::Yes);
    assert_eq!(next, Next::Remove(End::PeerClosed));
}

#[test]
fn short_writes_queue_shared_bytes_until_the_bound() {
    let mut h = Harness::upgraded();
    let frame = Bytes::from_static(b"0123456789abcdef0123456789abcdef"); // 32 bytes
    h.pipe.set_room(Some(10));
    assert!(h.conn.send(&frame, &h.limits).is_ok());
    assert_eq!(h.pipe.written(), &frame[..10], "what the socket took");
    // Queued: 22 bytes; the bound is 64.
    assert!(h.conn.send(&frame, &h.limits).is_ok(), "54 queued");
    assert!(matches!(
        h.conn.send(&frame, &h.limits),
        Err(SendError::Overflow)
    ));
    // The socket drains: the queue goes out in order, and nothing was lost or doubled.
    h.pipe.set_room(None);
    assert_eq!(h.conn.on_writable(), Next::Keep);
    let mut expected = frame[10..].to_vec();
    expected.extend_from_slice(&frame);
    assert_eq!(h.pipe.written(), expected);
    assert!(h.conn.send(&frame, &h.limits).is_ok(), "room again");
    assert_eq!(h.pipe.written(), &frame[..]);
}

#[test]
fn idle_sweeps_count_silence_and_input_resets_it() {
    let mut h = Harness::upgraded();
    // The upgrade itself was input: the first sweep finds the connection heard.
    assert_eq!(h.conn.sweep(), 0);
    assert_eq!(h.conn.sweep(), 1);
    assert_eq!(h.conn.sweep(), 2);
    h.client_sends(&client_frame(OpCode::Pong, b""), Admit::Yes);
    assert_eq!(h.conn.sweep(), 0, "heard since the last sweep");
}
