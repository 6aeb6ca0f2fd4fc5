//! The hot path: one already-encoded frame handed to many connections.
//!
//! Pure bookkeeping over a slab: no event loop, no clock, no topics. The caller picks
//! the recipients ([`Recipients`]: a topic's subscriber list, or every open
//! connection) and handles what failed after the walk (a connection cannot be removed
//! while the slab is being walked). Generic over [`Recipient`] so it is unit-tested
//! with fake connections; the server instantiates it with `Connection` only.
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

/// What the fan-out needs of a connection.
pub trait Recipient {
    /// Upgraded and not closing.
    fn is_open(&self) -> bool;
    /// The server's permessage-deflate window bits (9 to 15), if negotiated.
    fn deflate_window(&self) -> Option<u8>;
    /// Writes or queues `bytes` (see `Connection::send`).
    fn send(&mut self, bytes: &Bytes, limits: &Limits) -> Result<(), SendError>;
}

impl Recipient for Connection {
    fn is_open(&self) -> bool {
        self.kind() == PhaseKind::Open
    }
    fn deflate_window(&self) -> Option<u8> {
        Connection::deflate_window(self)
    }
    fn send(&mut self, bytes: &Bytes, limits: &Limits) -> Result<(), SendError> {
        Connection::send(self, bytes, limits)
    }
}

/// Who gets a publication.
#[derive(Debug, Clone, Copy)]
pub enum Recipients<'a> {
    /// These slab keys (a topic's subscribers: all open, by `Topics`' invariant).
    Keys(&'a [u32]),
    /// Every open connection in the slab.
    EveryOpen,
}

/// The result of one fan-out.
#[derive(Debug, Default, PartialEq)]
pub struct FanOut {
    /// Connections the frame was written or queued to.
    pub sent: u64,
    /// Connections that skipped it (`--slow-consumer drop` with a full queue).
    pub dropped: u64,
    /// Connections to end once the walk is over, and why.
    pub failed: Vec<(usize, End)>,
    /// Time from the first write to the last.
    pub took: Duration,
}

/// Hands `frame` to every recipient.
pub fn fan_out<R: Recipient>(
    frame: &Bytes,
    conns: &mut Slab<R>,
    recipients: Recipients<'_>,
    limits: &Limits,
) -> FanOut {
    let started = Instant::now();
    let mut out = FanOut::default();
    // One compressed frame per server window size (9 to 15 bits) in use.
    let mut compressed: [Option<Bytes>; 7] = Default::default();
    let mut deliver = |key: usize, conn: &mut R| {
        let bytes = match conn.deflate_window() {
            Some(bits) => {
                compressed[usize::from(bits - 9)].get_or_insert_with(|| compress_frame(frame, bits))
            }
            None => frame,
        };
        match conn.send(bytes, limits) {
            Ok(()) => out.sent += 1,
            Err(SendError::Overflow) if limits.slow_consumer == SlowConsumerPolicy::Drop => {
                out.dropped += 1
            }
            Err(SendError::Overflow) => out.failed.push((key, End::SlowConsumer)),
            Err(SendError::Io(_)) => out.failed.push((key, End::Io)),
        }
    };
    match recipients {
        Recipients::Keys(keys) => {
            for &key in keys {
                // A key is always live (`Topics` drops a connection's subscriptions
                // before the slab does); `get_mut` keeps a broken invariant harmless.
                if let Some(conn) = conns.get_mut(key as usize) {
                    deliver(key as usize, conn);
                }
            }
        }
        Recipients::EveryOpen => {
            for (key, conn) in conns.iter_mut() {
                if conn.is_open() {
                    deliver(key, conn);
                }
            }
        }
    }
    out.took = started.elapsed();
    out
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
    }

    impl Recipient for Fake {
        fn is_open(&self) -> bool {
            self.open
        }
        fn deflate_window(&self) -> Option<u8> {
            self.window
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
            Recipients::Keys(&keys),
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
            Recipients::Keys(&keys),
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
}
