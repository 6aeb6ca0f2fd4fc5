//! Feeds arbitrary bytes, split at fuzzer-chosen points, to both decoder roles, with and
//! without permessage-deflate negotiated. Input layout: one head byte (bit 7: deflate
//! negotiated; bits 0-3: how many piece lengths follow), that many bytes of piece
//! lengths (each 1 to 256, used in turn), then the stream itself. The decoder must never panic, and every event
//! it reports must respect the limits.
#![no_main]

use c1m_proto::{Decoder, DecoderConfig, Event, Role};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let compression = head & 0x80 != 0;
    let cuts = usize::from(head & 0x0f).min(rest.len());
    let (lengths, bytes) = rest.split_at(cuts);
    for role in [Role::Server, Role::Client] {
        let mut decoder = Decoder::new(DecoderConfig {
            role,
            max_message_size: 4096,
            compression,
        });
        let mut message = 0usize;
        let mut input = bytes.to_vec();
        let mut pieces = Vec::new();
        let mut rest = &mut input[..];
        for i in 0.. {
            if rest.is_empty() {
                break;
            }
            // Without lengths the stream arrives whole.
            let len = lengths
                .get(i % lengths.len().max(1))
                .map_or(rest.len(), |&l| usize::from(l) + 1);
            let (piece, tail) = rest.split_at_mut(len.min(rest.len()));
            pieces.push(piece);
            rest = tail;
        }
        for piece in pieces {
            let result = decoder.decode(piece, |event| match event {
                Event::Data {
                    payload,
                    message_end,
                    text,
                    compressed,
                } => {
                    assert!(
                        compression || !compressed,
                        "RSV1 accepted without negotiation"
                    );
                    message += payload.len();
                    assert!(message <= 4096, "message over the limit was delivered");
                    if text && message_end {
                        // Validated text: nothing to check beyond not panicking.
                    }
                    if message_end {
                        message = 0;
                    }
                }
                Event::Ping(p) | Event::Pong(p) => assert!(p.len() <= 125),
                Event::Close { reason, .. } => assert!(reason.len() <= 123),
            });
            if result.is_err() {
                break;
            }
        }
    }
});
