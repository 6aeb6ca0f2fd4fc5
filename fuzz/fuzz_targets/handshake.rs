//! Arbitrary bytes as an HTTP request head (server side) and response head (client side):
//! the parsers must never panic, and a rejection must map to a valid HTTP status.
#![no_main]

use c1m_proto::handshake::{parse_request, parse_response, rejection};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse_request(data, 1024) {
        Ok(Some((_, used))) => assert!(used <= data.len()),
        Ok(None) => assert!(data.len() <= 1024),
        Err(error) => {
            let (status, _) = error.status();
            assert!((400..500).contains(&status));
            assert!(rejection(&error).starts_with(b"HTTP/1.1 4"));
        }
    }
    let _ = parse_response(data, "dGhlIHNhbXBsZSBub25jZQ==", 1024);
});
