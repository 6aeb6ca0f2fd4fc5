//! The permessage-deflate path: arbitrary bytes inflated under a limit must never panic
//! nor produce more than the limit; whatever is compressed must inflate back to itself;
//! arbitrary extension offers must never panic the negotiation.
#![no_main]

use c1m_proto::deflate::{compress_with_window, negotiate, Inflater};
use libfuzzer_sys::fuzz_target;

const LIMIT: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let mut inflater = Inflater::default();
    let mut out = Vec::new();
    if inflater.inflate(data, LIMIT, &mut out).is_ok() {
        assert!(out.len() <= LIMIT, "inflated past the limit");
    }
    // The same inflater is reused for the next message: no state may leak across.
    let window = 9 + data.first().map_or(6, |b| b % 7);
    let compressed = compress_with_window(data, window);
    inflater
        .inflate(&compressed, data.len(), &mut out)
        .expect("our own compressed data inflates");
    assert_eq!(out, data, "round trip");
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(agreement) = negotiate([text]) {
            assert!((9..=15).contains(&agreement.server_window_bits));
        }
    }
});
