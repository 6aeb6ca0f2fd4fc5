//! permessage-deflate (RFC 7692), without context takeover in either direction
//! (feature `deflate`).
//!
//! Why only that mode: with context takeover every connection keeps a compressor and a
//! decompressor window (tens of KB each) for its whole life, which a million idle
//! connections cannot afford, and a broadcast would have to be compressed once per
//! connection. Without it, a message is compressed on its own: the server compresses a
//! broadcast once (per server window size in use) and shares the result, and inflates
//! each client message with a decompressor it resets per message. A client may ask for a
//! smaller server window (`server_max_window_bits`, 9 to 15); an offer of 8 bits, which
//! zlib cannot produce, is declined, so that connection simply goes uncompressed.
//!
//! Inflating is bounded: output past the caller's limit stops the inflate and is
//! reported as [`InflateError::TooBig`] (close code 1009), so a compression bomb costs
//! at most the limit.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The `Sec-WebSocket-Extensions` value a server answers an accepted offer with (plus
/// the window size, when the client asked for one; see [`Agreement::response`]).
pub const RESPONSE: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// What was agreed for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreement {
    /// LZ77 window of the server's compressor, 9 to 15 bits.
    pub server_window_bits: u8,
    /// Whether the client asked for it (then the answer must state it).
    pub window_requested: bool,
}

impl Agreement {
    /// The `Sec-WebSocket-Extensions` answer.
    pub fn response(&self) -> String {
        if self.window_requested {
            format!(
                "{RESPONSE}; server_max_window_bits={}",
                self.server_window_bits
            )
        } else {
            RESPONSE.to_string()
        }
    }
}

/// The empty stored block that ends every compressed message (removed by the sender,
/// appended again by the receiver: RFC 7692 §7.2.1-2).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The first permessage-deflate offer among the `Sec-WebSocket-Extensions` header values
/// that can be accepted in our mode, if any.
pub fn negotiate<'a>(headers: impl IntoIterator<Item = &'a str>) -> Option<Agreement> {
    headers
        .into_iter()
        .flat_map(|h| h.split(','))
        .find_map(acceptable_offer)
}

/// Whether any offer can be accepted (see [`negotiate`]).
pub fn accept_offer<'a>(headers: impl IntoIterator<Item = &'a str>) -> bool {
    negotiate(headers).is_some()
}

fn acceptable_offer(offer: &str) -> Option<Agreement> {
    let mut parts = offer.split(';').map(str::trim);
    if parts.next() != Some("permessage-deflate") {
        return None;
    }
    let mut agreement = Agreement {
        server_window_bits: 15,
        window_requested: false,
    };
    let mut seen: Vec<&str> = Vec::new();
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (param, None),
        };
        if seen.contains(&name) {
            return None; // a parameter twice makes the offer invalid (§7)
        }
        seen.push(name);
        let ok = match name {
            "server_no_context_takeover" | "client_no_context_takeover" => value.is_none(),
            // zlib's smallest window is 9 bits: an offer of 8 is declined.
            "server_max_window_bits" => match value.map(str::parse::<u8>) {
                Some(Ok(bits @ 9..=15)) => {
                    agreement.server_window_bits = bits;
                    agreement.window_requested = true;
                    true
                }
                _ => false,
            },
            // Our decompressor's window takes any client window.
            "client_max_window_bits" => value.is_none_or(|v| matches!(v.parse::<u8>(), Ok(8..=15))),
            _ => false,
        };
        if !ok {
            return None;
        }
    }
    Some(agreement)
}

/// Compresses one whole message payload with the standard 15-bit window.
pub fn compress(payload: &[u8]) -> Vec<u8> {
    compress_with_window(payload, 15)
}

/// Compresses one whole message payload (a fresh compressor: no context takeover) with
/// an LZ77 window of `window_bits` (9 to 15). Returns the payload of the compressed
/// frame, tail removed.
pub fn compress_with_window(payload: &[u8], window_bits: u8) -> Vec<u8> {
    let mut compressor =
        Compress::new_with_window_bits(Compression::fast(), false, window_bits.clamp(9, 15));
    // Room for the worst case (zlib's compress bound, plus the sync flush's marker), so
    // one call compresses and flushes everything. (Resuming a sync flush that ran out of
    // output space lost data with the miniz_oxide backend: found by the Autobahn 12.2 and
    // 12.5 cases; the loop below stays as a fallback.)
    let mut out = Vec::with_capacity(128 + payload.len() + payload.len() / 10 + 16);
    loop {
        let consumed = compressor.total_in() as usize;
        let status = compressor
            .compress_vec(&payload[consumed..], &mut out, FlushCompress::Sync)
            .expect("deflate of an in-memory buffer cannot fail");
        let done = compressor.total_in() as usize == payload.len() && out.len() < out.capacity();
        if done || status == Status::StreamEnd {
            break;
        }
        out.reserve(out.capacity().max(64));
    }
    if out.ends_with(&TAIL) {
        out.truncate(out.len() - TAIL.len());
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    #[error("inflated message exceeds the limit of {limit} bytes")]
    TooBig { limit: usize },
    #[error("invalid deflate data")]
    Invalid,
}

/// A decompressor reused for every message (reset before each: no context takeover).
pub struct Inflater {
    decompress: Decompress,
}

impl Default for Inflater {
    fn default() -> Self {
        Inflater {
            decompress: Decompress::new(false),
        }
    }
}

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Inflater")
    }
}

impl Inflater {
    /// Inflates one whole compressed message into `out` (cleared first), producing at
    /// most `limit` bytes.
    pub fn inflate(
        &mut self,
        compressed: &[u8],
        limit: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), InflateError> {
        self.decompress.reset(false);
        out.clear();
        for input in [compressed, &TAIL[..]] {
            let start = self.decompress.total_in();
            // Call until a call makes no progress: the decompressor may hold decoded
            // bytes back (its window) even when the input is used up and there is room.
            loop {
                let consumed = (self.decompress.total_in() - start) as usize;
                // Room for up to one byte past the limit, to tell "exactly the limit"
                // from "more".
                let room = (limit + 1 - out.len()).min(64 * 1024);
                if room == 0 {
                    return Err(InflateError::TooBig { limit });
                }
                out.reserve_exact(room); // exact: the buffer never outgrows the limit
                let (in_before, out_before) = (self.decompress.total_in(), out.len());
                let status = self
                    .decompress
                    .decompress_vec(&input[consumed..], out, FlushDecompress::Sync)
                    .map_err(|_| InflateError::Invalid)?;
                if out.len() > limit {
                    return Err(InflateError::TooBig { limit });
                }
                if status == Status::StreamEnd {
                    // A final block (BFINAL) ends the message; the tail is not needed.
                    return Ok(());
                }
                let progressed = self.decompress.total_in() != in_before || out.len() != out_before;
                if !progressed {
                    if (self.decompress.total_in() - start) as usize == input.len() {
                        break;
                    }
                    return Err(InflateError::Invalid); // stuck with input left
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_we_can_and_cannot_honour() {
        for acceptable in [
            "permessage-deflate",
            "permessage-deflate; client_max_window_bits",
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
            "permessage-deflate; client_max_window_bits=10",
            "permessage-deflate; server_max_window_bits=15",
            // A later acceptable offer in the same header wins.
            "permessage-deflate; server_max_window_bits=8, permessage-deflate",
        ] {
            assert!(accept_offer([acceptable]), "{acceptable}");
        }
        for refused in [
            "permessage-deflate; server_max_window_bits=8",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; foo",
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
            "x-webkit-deflate-frame",
        ] {
            assert!(!accept_offer([refused]), "{refused}");
        }
        let small = negotiate(["permessage-deflate; server_max_window_bits=9"]).unwrap();
        assert_eq!(small.server_window_bits, 9);
        assert!(small.response().ends_with("; server_max_window_bits=9"));
        let plain = negotiate(["permessage-deflate"]).unwrap();
        assert_eq!(plain.server_window_bits, 15);
        assert_eq!(plain.response(), RESPONSE, "no window asked, none stated");
    }

    #[test]
    fn round_trip_and_rfc_example() {
        let mut inflater = Inflater::default();
        let mut out = Vec::new();
        // RFC 7692 §7.2.3.1: "Hello" compressed without context takeover.
        inflater
            .inflate(&[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00], 100, &mut out)
            .unwrap();
        assert_eq!(out, b"Hello");
        for payload in [&b""[..], b"Hello", &[7u8; 100_000][..]] {
            let compressed = compress(payload);
            inflater.inflate(&compressed, 1 << 20, &mut out).unwrap();
            assert_eq!(out, payload);
        }
    }

    /// Payloads from incompressible to very compressible, around the sizes where output
    /// buffers fill up (the Autobahn 12.2/12.5 data found a compressor bug there).
    #[test]
    fn round_trip_across_entropy_and_sizes() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut inflater = Inflater::default();
        let mut out = Vec::new();
        for bits in [1u32, 4, 6, 8] {
            for size in [100usize, 32_768, 65_536, 131_072, 300_000] {
                let payload: Vec<u8> = (0..size)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        (x >> 32) as u8 & ((1u16 << bits) - 1) as u8
                    })
                    .collect();
                inflater
                    .inflate(&compress(&payload), 1 << 20, &mut out)
                    .unwrap();
                assert!(out == payload, "{bits} bits, {size} bytes");
            }
        }
    }

    #[test]
    fn a_bomb_stops_at_the_limit() {
        let bomb = compress(&vec![0u8; 10 << 20]);
        // Small enough to pass a 1 MiB limit on the wire.
        assert!(
            bomb.len() < 256 * 1024,
            "a 10 MiB bomb in {} bytes",
            bomb.len()
        );
        let mut out = Vec::new();
        let error = Inflater::default().inflate(&bomb, 1 << 20, &mut out);
        assert_eq!(error, Err(InflateError::TooBig { limit: 1 << 20 }));
        assert!(
            out.capacity() <= (1 << 20) + 64 * 1024 + 1,
            "{}",
            out.capacity()
        );
        let exact = compress(&[1u8; 1000]);
        assert!(Inflater::default().inflate(&exact, 1000, &mut out).is_ok());
        assert!(Inflater::default().inflate(&exact, 999, &mut out).is_err());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut out = Vec::new();
        let mut inflater = Inflater::default();
        for garbage in [&[0xffu8; 10][..], &[0x07, 0x00], &[0x01, 0x05, 0x00]] {
            let _ = inflater.inflate(garbage, 1000, &mut out);
        }
        assert_eq!(
            inflater.inflate(&[0xff; 10], 1000, &mut out),
            Err(InflateError::Invalid)
        );
    }
}
