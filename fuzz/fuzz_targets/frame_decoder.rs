//! Feeds arbitrary bytes, split at fuzzer-chosen points, to both decoder roles, with and
//! without permessage-deflate negotiated. The decoder must never panic, and every event
//! it reports must respect the limits.
#![no_main]

use c1m_proto::{Decoder, DecoderConfig, Event, Role};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split_seed, bytes)) = data.split_first() else { return };
    let compression = split_seed & 0x80 != 0;
    for role in [Role::Server, Role::Client] {
        let mut decoder = Decoder::new(DecoderConfig { role, max_message_size: 4096, compression });
        let mut message = 0usize;
        let mut input = bytes.to_vec();
        let step = (split_seed as usize % 17) + 1;
        for piece in input.chunks_mut(step) {
            let result = decoder.decode(piece, |event| match event {
                Event::Data { payload, message_end, text, compressed } => {
                    assert!(compression || !compressed, "RSV1 accepted without negotiation");
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
