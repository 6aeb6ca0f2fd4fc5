//! Sans-I/O WebSocket protocol pieces for c1m (RFC 6455).
//!
//! Nothing here touches a socket: the handshake parsers take byte slices and the frame
//! decoder is fed whatever a `read` returned, so every piece can be unit- and
//! property-tested with plain buffers, and the server and the load generator share
//! one implementation.
//!
//! The decoder is *streaming*: it never buffers a data payload. It unmasks the bytes in
//! place, validates UTF-8 incrementally and hands out slices, keeping only a few bytes
//! of state between reads. That is what lets an idle connection cost almost nothing.

pub mod close;
#[cfg(feature = "deflate")]
pub mod deflate;
pub mod frame;
pub mod handshake;
#[cfg(feature = "tls")]
pub mod tls_lean;
pub mod utf8;

pub use close::CloseCode;
pub use frame::{encode_frame, Decoder, DecoderConfig, Event, OpCode, ProtocolError, Role};
