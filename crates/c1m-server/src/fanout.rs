//! The hot path: one already-encoded frame handed to many connections.
//!
//! Pure bookkeeping over a slab: no event loop, no clock, no topics. The caller picks
//! the recipients ([`Recipients`]: a snapshot of a topic's subscriber list, or every
//! open connection) and handles what failed after each step (a connection cannot be
//! removed while the slab is being walked). Generic over [`Recipient`] so it is
//! unit-tested with fake connections; the server instantiates it with `Connection` only.
//!
//! A [`Broadcast`] is walked in **slices** ([`Broadcast::step`] with a budget): a
//! worker holding 19,000 connections on a loaded machine may need seconds for one
//! broadcast, and between slices its event loop accepts, answers handshakes, pongs and
//! closes, so a broadcast never shuts the door on newcomers. The recipients are fixed
//! when the broadcast starts (a copy of the subscriber list, 4 bytes each: leaving a
//! topic moves its last subscriber into the hole, which a live cursor would skip), and
//! each one is checked again when reached (still open, still subscribed), since a slab
//! key may have changed owner in between. One broadcast at a time per process keeps
//! the order of messages on every connection.
//!
//! Cost: one non-blocking `write` per connection of a shared `Bytes` (a refcount, no
//! copy); a short write queues the rest in the connection's outbox. Connections that
//! negotiated permessage-deflate get the frame compressed once per window size in use,
//! on the first such connection met.

use std::time::{Duration, Instant};

use bytes::Bytes;
use c1m_proto::deflate;
use c1m_proto::frame::{encode_compressed_frame, split_frame};
use slab::Slab;

use crate::connection::{Connection, End, Limits, PhaseKind, SendError, SlowConsumerPolicy};
use crate::envelope::envelope_frame;
use crate::history::Position;
use crate::topics::TopicId;

/// What the fan-out needs of a connection.
pub trait Recipient {
    /// Upgraded and not closing.
    fn is_open(&self) -> bool;
    /// Whether it is (still) in `topic`.
    fn is_subscribed(&self, topic: TopicId) -> bool;
    /// The server's permessage-deflate window bits (9 to 15), if negotiated.
    fn deflate_window(&self) -> Option<u8>;
    /// Whether it gets publications in envelopes.
    fn wants_envelope(&self) -> bool;
    /// Whether it is a Server-Sent Events stream (gets events, see `sse`).
    fn is_sse(&self) -> bool;
    /// Whether it speaks the Pusher protocol (gets Pusher events, see `pusher`).
    fn is_pusher(&self) -> bool {
        false
    }
    /// Writes or queues `bytes` (see `Connection::send`).
    fn send(&mut self, bytes: &Bytes, limits: &Limits) -> Result<(), SendError>;
}

impl Recipient for Connection {
    fn is_open(&self) -> bool {
        self.kind() == PhaseKind::Open
    }
    fn is_subscribed(&self, topic: TopicId) -> bool {
        Connection::is_subscribed(self, topic)
    }
    fn deflate_window(&self) -> Option<u8> {
        Connection::deflate_window(self)
    }
    fn wants_envelope(&self) -> bool {
        Connection::wants_envelope(self)
    }
    fn is_sse(&self) -> bool {
        Connection::is_sse(self)
    }
    fn is_pusher(&self) -> bool {
        Connection::is_pusher(self)
    }
    fn send(&mut self, bytes: &Bytes, limits: &Limits) -> Result<(), SendError> {
        Connection::send(self, bytes, limits)
    }
}

/// Who gets a publication, fixed when its fan-out starts.
#[derive(Debug, Clone)]
pub enum Recipients {
    /// These slab keys: a copy of a topic's subscriber list (`topic` is then set), or
    /// the open connections a test fault left. A key whose connection is no longer
    /// open, or no longer in `topic`, when its turn comes is passed over.
    Keys {
        keys: Vec<u32>,
        topic: Option<TopicId>,
    },
    /// Every open connection, in slab key order (one that opens at a key not yet
    /// reached gets the message too: it was open when it was delivered).
    EveryOpen,
}

/// What a fan-out came to so far.
#[derive(Debug, Default, PartialEq)]
pub struct FanOut {
    /// Connections the frame was written or queued to.
    pub sent: u64,
    /// Connections that skipped it (`--slow-consumer drop` with a full queue).
    pub dropped: u64,
    /// Connections to end, and why (the caller takes them after each step).
    pub failed: Vec<(usize, End)>,
    /// Time from the first write to the last.
    pub took: Duration,
}

/// What an envelope of a publication says besides its payload: the topic (`None`
/// for a broadcast to every connection) and, for a topic with history, the position.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvelopeFields {
    pub topic: Option<String>,
    pub position: Option<Position>,
    /// A Pusher socket to leave out (a trigger's `socket_id`: the sender's own); only
    /// the process whose token it names skips that slab key.
    pub exclude: Option<crate::pusher::SocketRef>,
}

/// One publication on its way to its recipients, a slice at a time.
#[derive(Debug)]
pub struct Broadcast {
    frame: Bytes,
    envelope: EnvelopeFields,
    /// The envelope frame, made for the first recipient that wants envelopes.
    enveloped: Option<Bytes>,
    /// The Server-Sent Events event, made for the first event stream met.
    event: Option<Bytes>,
    /// The Pusher event, made for the first Pusher client met.
    pusher: Option<Bytes>,
    /// One compressed frame per server window size (9 to 15 bits) in use.
    compressed: [Option<Bytes>; 7],
    recipients: Recipients,
    /// The next index into `keys`, or the next slab key.
    next: usize,
    started: Option<Instant>,
    out: FanOut,
}

impl Broadcast {
    pub fn new(frame: Bytes, recipients: Recipients) -> Broadcast {
        Broadcast::enveloped(frame, EnvelopeFields::default(), recipients)
    }

    /// A broadcast whose envelope (for clients that want one) says `envelope`.
    pub fn enveloped(frame: Bytes, envelope: EnvelopeFields, recipients: Recipients) -> Broadcast {
        Broadcast {
            frame,
            envelope,
            enveloped: None,
            event: None,
            pusher: None,
            compressed: Default::default(),
            recipients,
            next: 0,
            started: None,
            out: FanOut::default(),
        }
    }

    /// The topic it goes to (`None`: every connection).
    pub fn topic(&self) -> Option<&str> {
        self.envelope.topic.as_deref()
    }

    pub fn frame(&self) -> &Bytes {
        &self.frame
    }

    /// What it came to so far (`failed` is emptied by [`Broadcast::take_failed`]).
    pub fn progress(&self) -> &FanOut {
        &self.out
    }

    /// The connections that failed since the last call, to be ended by the caller.
    pub fn take_failed(&mut self) -> Vec<(usize, End)> {
        std::mem::take(&mut self.out.failed)
    }

    /// Hands the frame to at most `budget` more recipients (passed-over keys are
    /// free). Returns how much of the budget it used and whether every recipient had
    /// it; `took` covers the first write to the last so far.
    pub fn step<R: Recipient>(
        &mut self,
        conns: &mut Slab<R>,
        limits: &Limits,
        budget: usize,
    ) -> (usize, bool) {
        let started = *self.started.get_or_insert_with(Instant::now);
        // Past the last occupied slab key there is nobody (for `EveryOpen`).
        let slab_end = conns.iter().next_back().map_or(0, |(key, _)| key + 1);
        let mut used = 0;
        let done = loop {
            if used == budget {
                break match &self.recipients {
                    Recipients::Keys { keys, .. } => self.next >= keys.len(),
                    Recipients::EveryOpen => self.next >= slab_end,
                };
            }
            let key = match &self.recipients {
                Recipients::Keys { keys, topic } => {
                    let Some(&key) = keys.get(self.next) else {
                        break true;
                    };
                    self.next += 1;
                    let wanted = conns
                        .get(key as usize)
                        .is_some_and(|c| c.is_open() && topic.is_none_or(|t| c.is_subscribed(t)));
                    if !wanted {
                        continue;
                    }
                    key as usize
                }
                Recipients::EveryOpen => {
                    if self.next >= slab_end {
                        break true;
                    }
                    self.next += 1;
                    if !conns.get(self.next - 1).is_some_and(|c| c.is_open()) {
                        continue;
                    }
                    self.next - 1
                }
            };
            let conn = &mut conns[key];
            if self.envelope.exclude == Some((crate::pusher::process_token(), key as u32)) {
                continue;
            }
            if conn.is_pusher() && self.envelope.topic.is_none() {
                // A broadcast to every connection names no channel: Pusher clients
                // only hear their channels.
                continue;
            }
            used += 1;
            // An envelope goes uncompressed even to a deflate client (RSV1 is per
            // message): envelopes are opt-in and small.
            let bytes = match conn.deflate_window() {
                _ if conn.is_sse() => {
                    let (fields, frame) = (&self.envelope, &self.frame);
                    let enveloped = &mut self.enveloped;
                    self.event.get_or_insert_with(|| {
                        let id = match (&fields.topic, &fields.position) {
                            (Some(topic), Some(p)) => {
                                Some(crate::sse::position_id(topic, &p.epoch, p.offset))
                            }
                            _ => None,
                        };
                        crate::sse::publication(
                            envelope_of(fields, frame, enveloped),
                            id.as_deref(),
                        )
                    })
                }
                _ if conn.is_pusher() => {
                    let (topic, frame) =
                        (self.envelope.topic.as_deref().unwrap_or(""), &self.frame);
                    self.pusher.get_or_insert_with(|| {
                        crate::pusher::frame_for(crate::pusher::channel_of(topic), frame)
                    })
                }
                _ if conn.wants_envelope() => {
                    envelope_of(&self.envelope, &self.frame, &mut self.enveloped)
                }
                Some(bits) => self.compressed[usize::from(bits - 9)]
                    .get_or_insert_with(|| compress_frame(&self.frame, bits)),
                None => &self.frame,
            };
            match conn.send(bytes, limits) {
                Ok(()) => self.out.sent += 1,
                Err(SendError::Overflow) if limits.slow_consumer == SlowConsumerPolicy::Drop => {
                    self.out.dropped += 1
                }
                Err(SendError::Overflow) => self.out.failed.push((key, End::SlowConsumer)),
                Err(SendError::Io(_)) => self.out.failed.push((key, End::Io)),
            }
        };
        self.out.took = started.elapsed();
        (used, done)
    }
}

/// The envelope frame of a publication, made on first use.
fn envelope_of<'a>(
    fields: &EnvelopeFields,
    frame: &Bytes,
    cache: &'a mut Option<Bytes>,
) -> &'a Bytes {
    cache.get_or_insert_with(|| {
        let position = fields.position.as_ref().map(|p| (p.offset, &*p.epoch));
        envelope_frame(fields.topic.as_deref(), position, frame)
    })
}

/// Hands `frame` to every recipient at once (a broadcast in one step).
pub fn fan_out<R: Recipient>(
    frame: &Bytes,
    conns: &mut Slab<R>,
    recipients: Recipients,
    limits: &Limits,
) -> FanOut {
    let mut broadcast = Broadcast::new(frame.clone(), recipients);
    broadcast.step(conns, limits, usize::MAX);
    broadcast.out
}

/// The permessage-deflate version of a broadcast frame: its payload compressed, RSV1
/// set; the frame itself when compression would not make it smaller (allowed: RSV1 is
/// per message).
fn compress_frame(frame: &Bytes, window_bits: u8) -> Bytes {
    let Some((opcode, payload)) = split_frame(frame) else {
        return frame.clone();
    };
    let compressed = deflate::compress_with_window(payload, window_bits);
    if compressed.len() >= payload.len() {
        return frame.clone();
    }
    let mut out = Vec::with_capacity(compressed.len() + 10);
    encode_compressed_frame(opcode, &compressed, None, &mut out);
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use c1m_proto::{encode_frame, DecoderConfig, OpCode, Role};

    /// A connection that records what it was sent.
    #[derive(Default)]
    struct Fake {
        open: bool,
        window: Option<u8>,
        got: Vec<Bytes>,
        /// Refuse sends: with an overflow, or with an I/O error.
        full: bool,
        broken: bool,
        topics: Vec<TopicId>,
        envelope: bool,
        sse: bool,
    }

    impl Recipient for Fake {
        fn is_open(&self) -> bool {
            self.open
        }
        fn is_subscribed(&self, topic: TopicId) -> bool {
            self.topics.contains(&topic)
        }
        fn deflate_window(&self) -> Option<u8> {
            self.window
        }
        fn wants_envelope(&self) -> bool {
            self.envelope
        }
        fn is_sse(&self) -> bool {
            self.sse
        }
        fn send(&mut self, bytes: &Bytes, _: &Limits) -> Result<(), SendError> {
            if self.broken {
                return Err(SendError::Io(std::io::ErrorKind::BrokenPipe.into()));
            }
            if self.full {
                return Err(SendError::Overflow);
            }
            self.got.push(bytes.clone());
            Ok(())
        }
    }

    fn limits(slow_consumer: SlowConsumerPolicy) -> Limits {
        Limits {
            decoder: DecoderConfig {
                role: Role::Server,
                max_message_size: 1 << 20,
                compression: false,
            },
            max_pending_bytes: 1024,
            max_head_bytes: 1024,
            max_body_bytes: 1024,
            echo: false,
            deflate: true,
            slow_consumer,
        }
    }

    fn open() -> Fake {
        Fake {
            open: true,
            ..Fake::default()
        }
    }

    fn text(payload: &str) -> Bytes {
        let mut frame = Vec::new();
        encode_frame(OpCode::Text, payload.as_bytes(), None, &mut frame);
        Bytes::from(frame)
    }

    /// The envelope fields of a publication to `news` at offset 7.
    fn news_at_7() -> EnvelopeFields {
        EnvelopeFields {
            topic: Some("news".into()),
            position: Some(Position {
                offset: 7,
                epoch: "abcd0123".into(),
            }),
            exclude: None,
        }
    }

    #[test]
    fn envelope_clients_get_one_shared_envelope_and_the_others_the_bare_frame() {
        let mut conns = Slab::new();
        let bare = conns.insert(open());
        let wrapped = |conns: &mut Slab<Fake>| {
            conns.insert(Fake {
                envelope: true,
                window: Some(15),
                ..open()
            })
        };
        let (e1, e2) = (wrapped(&mut conns), wrapped(&mut conns));
        let fields = news_at_7();
        let mut broadcast = Broadcast::enveloped(text("hi"), fields, Recipients::EveryOpen);
        broadcast.step(&mut conns, &limits(SlowConsumerPolicy::Disconnect), 10);
        assert_eq!(conns[bare].got, [text("hi")]);
        let expected = br#"{"data":"hi","epoch":"abcd0123","offset":7,"topic":"news"}"#;
        assert_eq!(
            &conns[e1].got[0][2..],
            &expected[..],
            "uncompressed, even with deflate"
        );
        assert_eq!(
            conns[e1].got[0].as_ptr(),
            conns[e2].got[0].as_ptr(),
            "built once, shared"
        );
    }

    #[test]
    fn event_streams_get_one_shared_event_with_the_position_as_id() {
        let mut conns = Slab::new();
        let stream = || Fake {
            sse: true,
            ..open()
        };
        let (s1, s2) = (conns.insert(stream()), conns.insert(stream()));
        let socket = conns.insert(open());
        let fields = news_at_7();
        let mut broadcast = Broadcast::enveloped(text("hi"), fields, Recipients::EveryOpen);
        broadcast.step(&mut conns, &limits(SlowConsumerPolicy::Disconnect), 10);
        assert_eq!(
            &conns[s1].got[0][..],
            &b"id: news:abcd0123:7\ndata: {\"data\":\"hi\",\"epoch\":\"abcd0123\",\"offset\":7,\"topic\":\"news\"}\n\n"[..]
        );
        assert_eq!(
            conns[s1].got[0].as_ptr(),
            conns[s2].got[0].as_ptr(),
            "built once"
        );
        assert_eq!(conns[socket].got, [text("hi")]);
    }

    #[test]
    fn every_open_connection_gets_the_same_shared_frame() {
        let mut conns = Slab::new();
        let a = conns.insert(open());
        let handshaking = conns.insert(Fake::default());
        let b = conns.insert(open());
        let frame = text("42");
        let out = fan_out(
            &frame,
            &mut conns,
            Recipients::EveryOpen,
            &limits(SlowConsumerPolicy::Disconnect),
        );
        assert_eq!((out.sent, out.dropped, out.failed.len()), (2, 0, 0));
        for key in [a, b] {
            assert_eq!(conns[key].got.len(), 1);
            assert_eq!(conns[key].got[0], frame);
            // Shared, not copied.
            assert_eq!(conns[key].got[0].as_ptr(), frame.as_ptr());
        }
        assert!(conns[handshaking].got.is_empty());
    }

    #[test]
    fn subscribers_only_and_failures_reported_not_removed() {
        let mut conns = Slab::new();
        let a = conns.insert(open()) as u32;
        let _other = conns.insert(open());
        let full = conns.insert(Fake {
            full: true,
            ..open()
        }) as u32;
        let broken = conns.insert(Fake {
            broken: true,
            ..open()
        }) as u32;
        let keys = [a, full, broken];
        let frame = text("x");
        let out = fan_out(
            &frame,
            &mut conns,
            Recipients::Keys {
                keys: keys.to_vec(),
                topic: None,
            },
            &limits(SlowConsumerPolicy::Disconnect),
        );
        assert_eq!(out.sent, 1);
        assert_eq!(
            out.failed,
            [
                (full as usize, End::SlowConsumer),
                (broken as usize, End::Io)
            ]
        );
        assert_eq!(conns.len(), 4, "the caller ends failed connections");
        // With --slow-consumer drop, a full queue skips the message instead.
        let out = fan_out(
            &frame,
            &mut conns,
            Recipients::Keys {
                keys: keys.to_vec(),
                topic: None,
            },
            &limits(SlowConsumerPolicy::Drop),
        );
        assert_eq!((out.sent, out.dropped), (1, 1));
        assert_eq!(out.failed, [(broken as usize, End::Io)]);
    }

    #[test]
    fn deflate_connections_share_one_compressed_frame_per_window() {
        let mut conns = Slab::new();
        let plain = conns.insert(open());
        let w15a = conns.insert(Fake {
            window: Some(15),
            ..open()
        });
        let w15b = conns.insert(Fake {
            window: Some(15),
            ..open()
        });
        let w10 = conns.insert(Fake {
            window: Some(10),
            ..open()
        });
        let frame = text(&"compressible ".repeat(50));
        fan_out(
            &frame,
            &mut conns,
            Recipients::EveryOpen,
            &limits(SlowConsumerPolicy::Disconnect),
        );
        assert_eq!(conns[plain].got[0], frame);
        let (a, b, c) = (&conns[w15a].got[0], &conns[w15b].got[0], &conns[w10].got[0]);
        assert!(a.len() < frame.len(), "compressed");
        assert_eq!(a[0] & 0x40, 0x40, "RSV1 marks a compressed message");
        assert_eq!(a.as_ptr(), b.as_ptr(), "compressed once per window size");
        assert_ne!(a.as_ptr(), c.as_ptr());
        // A payload that does not shrink goes out as it is.
        let tiny = text("a");
        fan_out(
            &tiny,
            &mut conns,
            Recipients::EveryOpen,
            &limits(SlowConsumerPolicy::Disconnect),
        );
        assert_eq!(conns[w10].got[1], tiny);
    }

    #[test]
    fn a_broadcast_walks_its_recipients_a_slice_at_a_time() {
        let mut conns = Slab::new();
        let keys: Vec<u32> = (0..5).map(|_| conns.insert(open()) as u32).collect();
        let limits = limits(SlowConsumerPolicy::Disconnect);
        let mut broadcast = Broadcast::new(
            text("x"),
            Recipients::Keys {
                keys: keys.clone(),
                topic: None,
            },
        );
        assert_eq!(broadcast.step(&mut conns, &limits, 2), (2, false));
        let got = |conns: &Slab<Fake>| {
            keys.iter()
                .map(|&k| conns[k as usize].got.len())
                .collect::<Vec<_>>()
        };
        assert_eq!(got(&conns), [1, 1, 0, 0, 0]);
        assert_eq!(broadcast.step(&mut conns, &limits, 2), (2, false));
        assert_eq!(broadcast.step(&mut conns, &limits, 2), (1, true));
        assert_eq!(got(&conns), [1, 1, 1, 1, 1]);
        assert_eq!(broadcast.progress().sent, 5);
        // A budget that ends exactly at the last recipient finishes too.
        let mut again = Broadcast::new(text("y"), Recipients::EveryOpen);
        assert_eq!(again.step(&mut conns, &limits, 5), (5, true));
    }

    #[test]
    fn recipients_that_left_or_changed_hands_between_slices_are_passed_over() {
        const TOPIC: TopicId = 7;
        let subscribed = || Fake {
            topics: vec![TOPIC],
            ..open()
        };
        let mut conns = Slab::new();
        let keys: Vec<u32> = (0..4).map(|_| conns.insert(subscribed()) as u32).collect();
        let limits = limits(SlowConsumerPolicy::Disconnect);
        let mut broadcast = Broadcast::new(
            text("x"),
            Recipients::Keys {
                keys: keys.clone(),
                topic: Some(TOPIC),
            },
        );
        assert_eq!(broadcast.step(&mut conns, &limits, 1), (1, false));
        // Between slices: key 1 closes and its key goes to a newcomer in no topic;
        // key 2 leaves the topic; key 3 starts closing.
        conns.remove(keys[1] as usize);
        assert_eq!(conns.insert(open()), keys[1] as usize);
        conns[keys[2] as usize].topics.clear();
        conns[keys[3] as usize].open = false;
        assert_eq!(broadcast.step(&mut conns, &limits, 10), (0, true));
        let got: Vec<usize> = keys.iter().map(|&k| conns[k as usize].got.len()).collect();
        assert_eq!(got, [1, 0, 0, 0]);
        assert_eq!(broadcast.progress().sent, 1);
    }

    #[test]
    fn a_connection_opened_ahead_of_the_walk_gets_a_message_to_everyone() {
        let mut conns = Slab::new();
        let first = conns.insert(open());
        let second = conns.insert(open());
        let limits = limits(SlowConsumerPolicy::Disconnect);
        let mut broadcast = Broadcast::new(text("x"), Recipients::EveryOpen);
        assert_eq!(broadcast.step(&mut conns, &limits, 1), (1, false));
        let newcomer = conns.insert(open());
        assert_eq!(broadcast.step(&mut conns, &limits, 10), (2, true));
        for key in [first, second, newcomer] {
            assert_eq!(conns[key].got.len(), 1);
        }
    }
}
