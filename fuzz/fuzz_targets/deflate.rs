//! The permessage-deflate path: arbitrary bytes inflated under a limit must never panic
//! nor produce more than the limit; whatever is compressed must inflate back to itself;
//! arbitrary extension offers must never panic the negotiation.
#![no_main]

use c1m_proto::deflate::{accept_offer, compress, Inflater};
use libfuzzer_sys::fuzz_target;

const LIMIT: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let mut inflater = Inflater::default();
    let mut out = Vec::new();
    if inflater.inflate(data, LIMIT, &mut out).is_ok() {
        assert!(out.len() <= LIMIT, "inflated past the limit");
    }
    // The same inflater is reused for the next message: no state may leak across.
    let compressed = compress(data);
    inflater
        .inflate(&compressed, data.len(), &mut out)
        .expect("our own compressed data inflates");
    assert_eq!(out, data, "round trip");
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = accept_offer([text]);
    }
});
