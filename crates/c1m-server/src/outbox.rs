//! Output a connection could not hand to the kernel yet.
//!
//! Most writes complete at once (an idle push client's socket buffer is empty), so a
//! connection has no outbox at all until a write comes back short; then the rest of
//! that frame and anything after it wait here, in order, until the socket is writable.
//! Broadcast frames are `Bytes` shared by every connection, so queueing one costs a
//! reference count, not a copy. The total is bounded by the caller.

use std::collections::VecDeque;
use std::io::{self, Write};

use bytes::{Buf, Bytes};

#[derive(Debug, Default)]
pub struct Outbox {
    chunks: VecDeque<Bytes>,
    /// Sum of the lengths of `chunks` (what is still to be written).
    bytes: usize,
}

impl Outbox {
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    pub fn push(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.bytes += chunk.len();
            self.chunks.push_back(chunk);
        }
    }

    /// Takes the oldest chunk off the queue.
    pub fn pop_front(&mut self) -> Option<Bytes> {
        let chunk = self.chunks.pop_front()?;
        self.bytes -= chunk.len();
        Some(chunk)
    }

    /// Writes as much as the socket takes. Returns `Ok(true)` when everything is out.
    pub fn flush(&mut self, out: &mut impl Write) -> io::Result<bool> {
        while let Some(front) = self.chunks.front_mut() {
            match out.write(front) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.bytes -= n;
                    front.advance(n);
                    if front.is_empty() {
                        self.chunks.pop_front();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that accepts at most `room` bytes, then would block.
    struct Trickle {
        room: usize,
        got: Vec<u8>,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.room).min(3);
            self.room -= n;
            self.got.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn keeps_order_across_partial_writes() {
        let mut outbox = Outbox::default();
        outbox.push(Bytes::from_static(b"hello "));
        outbox.push(Bytes::new());
        outbox.push(Bytes::from_static(b"world"));
        assert_eq!(outbox.bytes(), 11);
        let mut sink = Trickle {
            room: 4,
            got: Vec::new(),
        };
        assert!(!outbox.flush(&mut sink).unwrap());
        assert_eq!(outbox.bytes(), 7);
        sink.room = 100;
        assert!(outbox.flush(&mut sink).unwrap());
        assert_eq!(sink.got, b"hello world");
        assert!(outbox.is_empty());
    }
}
